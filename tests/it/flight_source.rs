//! Arrow Flight SQL sources, against a real Flight SQL server: another fedgate region
//! served on loopback, reached over mutual TLS as that region's office. What the
//! member pushes runs there as one statement and streams back as Arrow, answering
//! what the region answers when asked directly.

use std::sync::Arc;
use std::time::Duration;

use fedgate::owner::source::remote::{RemoteDatabase, RemoteTable};

use crate::support::{OFFICE, Region, member_rows as rows, run_member_sql as run};

fn config(region: &Region, ca: std::path::PathBuf) -> fedgate::config::Database {
    let certs = region.layout.dir.join("certs");
    fedgate::config::Database {
        name: "lake".into(),
        kind: fedgate::config::DatabaseKind::FlightSql(fedgate::config::Dialect::DataFusion),
        host: "127.0.0.1".into(),
        port: region.port(OFFICE),
        dbname: String::new(),
        user: String::new(),
        password: Default::default(),
        tls: fedgate::config::DatabaseTls::VerifyFull {
            ca,
            client: Some((
                certs.join(format!("{OFFICE}.crt")),
                certs.join(format!("{OFFICE}.key")),
            )),
        },
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
    }
}

/// Tables of another region, read over Flight SQL: their columns are the schema the
/// region announces, whole queries run there as one statement, and the answers are
/// the region's own; a server whose certificate is from another CA is refused, and a
/// missing table is named.
#[tokio::test]
async fn flight_sql_sources_answer_what_the_engine_answers() {
    // The whole region: a Flight SQL answer is whole unless partial answers are asked
    // for, and the member asks for none.
    let region = Region::start().await;
    let lake: Arc<dyn RemoteDatabase> =
        fedgate::owner::source::open(&config(&region, region.layout.ca.clone())).unwrap();
    let ctx = fedgate::owner::session::member_context();
    for table in ["fever_clinics", "census"] {
        let t = RemoteTable::discover(lake.clone(), "", table)
            .await
            .unwrap();
        ctx.register_table(table, Arc::new(t)).unwrap();
    }
    let direct = region.client(OFFICE);
    let cases = [
        (
            "SELECT member, count(*) AS n FROM fever_clinics GROUP BY member ORDER BY member",
            "GROUP BY",
        ),
        (
            "SELECT hospital_name, county_code FROM fever_clinics WHERE member = 'shanghai' \
             ORDER BY hospital_name, county_code LIMIT 5",
            "LIMIT 5",
        ),
        (
            "SELECT * FROM census ORDER BY member, county_code",
            "ORDER BY",
        ),
        (
            "SELECT c.member, c.county_code, count(f.hospital_name) AS clinics \
             FROM census c LEFT JOIN fever_clinics f \
               ON f.county_code = c.county_code AND f.member = c.member \
             GROUP BY c.member, c.county_code ORDER BY c.member, c.county_code",
            "JOIN",
        ),
    ];
    for (sql, pushed) in cases {
        let (got, plan) = run(&ctx, sql).await;
        let statement = plan
            .lines()
            .find(|l| l.contains("DatabaseExec"))
            .unwrap_or_else(|| panic!("{sql}: nothing ran in the engine\n{plan}"));
        assert!(statement.contains(pushed), "{sql}: {statement}");
        let want = direct.query(sql, false, None).await.unwrap();
        assert!(!want.batches.is_empty(), "{sql}");
        assert_eq!(rows(&got), rows(&want.batches), "{sql}\n{plan}");
    }

    // A table the engine does not have is named.
    let e = RemoteTable::discover(lake.clone(), "", "no_such_dataset")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("database lake") && e.contains("no_such_dataset"),
        "{e}"
    );

    // A server certificate from another CA is refused, by name.
    let other = tempfile::tempdir().unwrap();
    let (bad_ca, _) = fedgate::trust::pki::write_ca(
        &fedgate::trust::pki::Ca::generate("other").unwrap(),
        other.path(),
    )
    .unwrap();
    let refused = fedgate::owner::source::open(&config(&region, bad_ca)).unwrap();
    let e = RemoteTable::discover(refused, "", "census")
        .await
        .unwrap_err();
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
}
