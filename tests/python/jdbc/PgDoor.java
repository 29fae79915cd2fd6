import java.sql.*;
import java.util.Properties;

/** The PostgreSQL JDBC driver against fedgate's PostgreSQL port: prints what it saw. */
public class PgDoor {
    public static void main(String[] a) throws Exception {
        String url = "jdbc:postgresql://localhost:" + a[0] + "/yrd";
        Properties p = new Properties();
        p.setProperty("user", "office");
        p.setProperty("sslmode", "verify-full");
        p.setProperty("sslrootcert", a[1] + "/ca.crt");
        p.setProperty("sslcert", a[1] + "/" + a[2] + ".crt");
        p.setProperty("sslkey", a[3]);
        try (Connection c = DriverManager.getConnection(url, p)) {
            DatabaseMetaData md = c.getMetaData();
            System.out.println("product " + md.getDatabaseProductName() + " " + md.getDatabaseProductVersion());
            try (ResultSet r = md.getTables(null, "canonical", "%", new String[] {"TABLE"})) {
                StringBuilder b = new StringBuilder();
                while (r.next()) b.append(r.getString("TABLE_NAME")).append(',');
                System.out.println("tables " + b);
            }
            try (PreparedStatement s = c.prepareStatement("SELECT county_name, pop_total FROM census WHERE county_code = ?")) {
                s.setString(1, "330523");
                try (ResultSet r = s.executeQuery()) {
                    while (r.next()) System.out.println("row " + r.getString(1) + " " + r.getLong(2));
                }
                SQLWarning w = s.getWarnings();
                System.out.println("warning " + (w == null ? "none" : w.getMessage().split(";")[0]));
            }
            c.setAutoCommit(false);
            try (Statement s = c.createStatement()) {
                s.setFetchSize(7);
                int n = 0;
                try (ResultSet r = s.executeQuery("SELECT county_code FROM census")) { while (r.next()) n++; }
                System.out.println("fetched " + n);
            }
            c.commit();
            c.setAutoCommit(true);
            try (Statement s = c.createStatement()) {
                s.executeQuery("SELECT * FROM no_such_dataset");
            } catch (SQLException e) {
                System.out.println("sqlstate " + e.getSQLState());
            }
        }
    }
}
