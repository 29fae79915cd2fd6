//! MySQL-protocol sources: a real MariaDB server on loopback (Debian's package,
//! started by the tests). The same contract as PostgreSQL sources: types read
//! faithfully, pushdown that means what it means in DataFusion (checked against
//! DataFusion over the same rows in memory), failures named, statements cancelled,
//! TLS verified.

use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::prelude::SessionContext;
use fedgate::owner::source::remote::{RemoteDatabase, RemoteTable};
use fedgate::tools::local_mariadb::{LocalMariaDb, ServerTls};

use crate::support::{column_strings, member_rows as rows, run_member_sql as run};

fn config(db: &LocalMariaDb, name: &str, dbname: &str) -> fedgate::config::Database {
    fedgate::config::Database {
        name: name.into(),
        kind: fedgate::config::DatabaseKind::MySql,
        host: "127.0.0.1".into(),
        port: db.port,
        dbname: dbname.into(),
        user: db.user.clone(),
        password: fedgate::config::Secret::new(db.password.clone()),
        tls: fedgate::config::DatabaseTls::Disable,
        pool_size: 4,
        connect_timeout: Duration::from_secs(5),
        settings: Vec::new(),
    }
}

/// Registers `dbname.table` of `db` as `name` in a member's private context.
async fn register(
    ctx: &SessionContext,
    database: &Arc<dyn RemoteDatabase>,
    dbname: &str,
    table: &str,
    name: &str,
) {
    let t = RemoteTable::discover(database.clone(), dbname, table)
        .await
        .unwrap();
    ctx.register_table(name, Arc::new(t)).unwrap();
}

/// MySQL column types arrive as the Arrow types they are (unsigned integers widened,
/// `BOOLEAN` as booleans, DATETIME and TIMESTAMP apart), NULLs included; aggregates
/// pushed into the database keep the plan's types.
#[tokio::test]
async fn mysql_column_types_map_faithfully() {
    let db = LocalMariaDb::launch(None).await.unwrap();
    db.execute(
        "CREATE DATABASE typed; \
         CREATE TABLE typed.t (id INT PRIMARY KEY, tiny TINYINT, small SMALLINT UNSIGNED, \
           i INT UNSIGNED, big BIGINT, ubig BIGINT UNSIGNED, f4 FLOAT, f8 DOUBLE, \
           amount DECIMAL(12,3), wide DECIMAL(50,2), label VARCHAR(20), flag BOOLEAN, \
           day DATE, at DATETIME(6), at_utc TIMESTAMP(6) NULL, span TIME, raw VARBINARY(8), \
           doc JSON); \
         INSERT INTO typed.t VALUES \
           (1, -3, 65535, 4294967295, 9007199254740993, 18446744073709551615, 1.5, -2.25, \
            123456789.125, 12345678901234567890123456789012345678901234567.89, '杭州', TRUE, \
            '2020-02-29', '2020-01-23 10:00:00.123456', '2020-01-23 02:00:00', '-01:02:03', \
            0x00ff, '{\"a\": 1}'), \
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
            NULL, NULL, NULL, NULL), \
           (3, 7, 0, 0, -1, 0, 0, -0.001, -0.001, 0, '', FALSE, '1969-12-31', \
            '1900-01-01 00:00:00', '2038-01-19 03:14:07', '838:59:59', '', '[]')",
    )
    .await
    .unwrap();
    let database = fedgate::owner::source::open(&config(&db, "typed", "typed")).unwrap();
    let ctx = fedgate::owner::session::member_context();
    register(&ctx, &database, "typed", "t", "t").await;

    let (b, _) = run(&ctx, "SELECT * FROM t ORDER BY id").await;
    let schema = b[0].schema();
    let types: Vec<String> = schema
        .fields()
        .iter()
        .map(|f| f.data_type().to_string())
        .collect();
    assert_eq!(
        types,
        [
            "Int32",
            "Int16",
            "Int32",
            "Int64",
            "Int64",
            "Decimal128(20, 0)",
            "Float32",
            "Float64",
            "Decimal128(12, 3)",
            "Utf8",
            "Utf8",
            "Boolean",
            "Date32",
            "Timestamp(µs)",
            "Timestamp(µs, \"UTC\")",
            "Utf8",
            "Binary",
            "Utf8"
        ]
    );
    let col = |c: &str| column_strings(&b, c);
    assert_eq!(col("tiny"), ["-3", "", "7"]);
    assert_eq!(col("small"), ["65535", "", "0"]);
    assert_eq!(col("i"), ["4294967295", "", "0"]);
    assert_eq!(col("big"), ["9007199254740993", "", "-1"]);
    assert_eq!(col("ubig"), ["18446744073709551615", "", "0"]);
    assert_eq!(col("f4"), ["1.5", "", "0.0"]);
    assert_eq!(col("amount"), ["123456789.125", "", "-0.001"]);
    assert_eq!(
        col("wide"),
        [
            "12345678901234567890123456789012345678901234567.89",
            "",
            "0.00"
        ]
    );
    assert_eq!(col("label"), ["杭州", "", ""]);
    assert_eq!(col("flag"), ["true", "", "false"]);
    assert_eq!(col("day"), ["2020-02-29", "", "1969-12-31"]);
    assert_eq!(
        col("at"),
        ["2020-01-23T10:00:00.123456", "", "1900-01-01T00:00:00"]
    );
    assert_eq!(
        col("at_utc"),
        ["2020-01-23T02:00:00Z", "", "2038-01-19T03:14:07Z"]
    );
    assert_eq!(col("span"), ["-01:02:03", "", "838:59:59"]);
    assert_eq!(col("raw"), ["00ff", "", ""]);
    assert_eq!(col("doc"), ["{\"a\": 1}", "", "[]"]);
    // NULLs are NULLs, not empty strings.
    assert!(b[0].column(10).is_null(1) && !b[0].column(10).is_null(2));

    // SUM of an INT is a DECIMAL in MariaDB, read as the Int64 of the plan.
    let (b, plan) = run(
        &ctx,
        "SELECT sum(big) AS s, sum(amount) AS a, max(at_utc) AS m, count(tiny) AS n FROM t",
    )
    .await;
    assert!(
        plan.contains("sum(") && plan.contains("DatabaseExec"),
        "{plan}"
    );
    assert_eq!(
        schema_types(&b),
        [
            "Int64",
            "Decimal128(22, 3)",
            "Timestamp(µs, \"UTC\")",
            "Int64"
        ]
    );
    assert_eq!(column_strings(&b, "s"), ["9007199254740992"]);
    assert_eq!(column_strings(&b, "a"), ["123456789.124"]);
    assert_eq!(column_strings(&b, "m"), ["2038-01-19T03:14:07Z"]);
    assert_eq!(column_strings(&b, "n"), ["2"]);
}

fn schema_types(b: &[RecordBatch]) -> Vec<String> {
    b[0].schema()
        .fields()
        .iter()
        .map(|f| f.data_type().to_string())
        .collect()
}

/// The rows of the comparison table: mixed case, accents, a trailing space, NULLs in
/// every nullable column.
const PEOPLE: &str = "(1, 'a', 'hz', 10, 1.50, '2001-05-01', 0.5), \
    (2, 'A', 'hz', NULL, 2.25, '1999-12-31', NULL), \
    (3, 'b', 'sh', 7, NULL, NULL, 1.25), \
    (4, NULL, 'sh', 3, 0.10, '2010-01-01', -2.5), \
    (5, 'ä', 'sz', 12, 9.99, '2000-01-01', 3.0), \
    (6, 'a ', 'hz', -4, 100.00, '2020-02-29', 0.125), \
    (7, 'B', 'sz', 10, 5.00, '1980-07-07', NULL), \
    (8, 'ab', 'sh', NULL, NULL, '2000-01-02', 8.5)";

/// Pushed into MariaDB, filters, orderings with NULLs, groupings, DISTINCT, joins,
/// LIMIT and OFFSET, casts and text functions answer what DataFusion answers over the
/// same rows in memory; what means something else in MariaDB (division, a
/// case-insensitive collation) stays in the gateway and still answers right.
#[tokio::test]
async fn mysql_pushdown_answers_what_datafusion_answers() {
    let db = LocalMariaDb::launch(None).await.unwrap();
    let columns = "id INT PRIMARY KEY, name VARCHAR(20) NULL, city VARCHAR(8) NOT NULL, \
                   score INT NULL, amount DECIMAL(8,2) NULL, born DATE NULL, ratio DOUBLE NULL";
    db.execute(&format!(
        "CREATE DATABASE cmp; \
         CREATE TABLE cmp.people ({columns}); INSERT INTO cmp.people VALUES {PEOPLE}; \
         CREATE DATABASE ci; \
         CREATE TABLE ci.people ({columns}) COLLATE utf8mb4_general_ci; \
         INSERT INTO ci.people VALUES {PEOPLE}"
    ))
    .await
    .unwrap();
    let binary = fedgate::owner::source::open(&config(&db, "cmp", "cmp")).unwrap();
    let ci = fedgate::owner::source::open(&config(&db, "ci", "ci")).unwrap();
    let ctx = fedgate::owner::session::member_context();
    register(&ctx, &binary, "cmp", "people", "p").await;
    register(&ctx, &ci, "ci", "people", "c").await;
    assert!(binary.byte_wise_text() && !ci.byte_wise_text());

    // The reference: the same rows in DataFusion's memory, no database involved.
    let reference = SessionContext::new();
    let (all, _) = run(&ctx, "SELECT * FROM p").await;
    let mem = datafusion::datasource::MemTable::try_new(all[0].schema(), vec![all]).unwrap();
    let mem = Arc::new(mem);
    reference.register_table("p", mem.clone()).unwrap();
    reference.register_table("c", mem).unwrap();

    // (query, whether its order is total, text the pushed statement must contain)
    let cases: &[(&str, bool, &str)] = &[
        (
            "SELECT name, score FROM p ORDER BY score, id LIMIT 5",
            true,
            "IS NULL",
        ),
        (
            "SELECT id, name FROM p ORDER BY name DESC, id LIMIT 4",
            true,
            "ORDER BY",
        ),
        (
            "SELECT id FROM p ORDER BY ratio NULLS FIRST, id",
            true,
            "ORDER BY",
        ),
        (
            "SELECT city, count(*) AS n, sum(score) AS s, min(name) AS lo, max(amount) AS hi, \
             avg(ratio) AS r, count(DISTINCT name) AS d FROM p GROUP BY city",
            false,
            "GROUP BY",
        ),
        // The optimizer writes DISTINCT as a GROUP BY.
        ("SELECT DISTINCT name FROM p", false, "GROUP BY"),
        (
            "SELECT count(*) AS n FROM p WHERE name = 'a'",
            false,
            "WHERE",
        ),
        ("SELECT id FROM p WHERE name < 'b'", false, "<"),
        ("SELECT id FROM p WHERE name LIKE 'a%'", false, "LIKE"),
        ("SELECT id FROM p WHERE name IN ('a', 'B')", false, "'B'"),
        ("SELECT id, name || city AS nc FROM p", false, "||"),
        (
            "SELECT id FROM p ORDER BY id LIMIT 3 OFFSET 2",
            true,
            "OFFSET 2",
        ),
        (
            "SELECT a.id AS x, b.id AS y FROM p a JOIN p b ON a.city = b.city AND a.id < b.id",
            false,
            "JOIN",
        ),
        (
            "SELECT a.id AS x, b.name AS y FROM p a LEFT JOIN p b ON a.score = b.score AND a.id <> b.id",
            false,
            "LEFT OUTER JOIN",
        ),
        (
            "SELECT sum(score) AS s FROM p WHERE born >= DATE '2000-01-01'",
            false,
            "DATE",
        ),
        (
            "SELECT character_length(name) AS l, coalesce(score, 0) AS s FROM p",
            false,
            "character_length",
        ),
        (
            "SELECT CAST(score AS VARCHAR) AS t, CAST(score AS DOUBLE) AS d, \
             CAST(born AS VARCHAR) AS b FROM p",
            false,
            "CAST",
        ),
        (
            "SELECT id, score + 1 AS s, -score AS n, amount * 2 AS a FROM p",
            false,
            "*",
        ),
        (
            "SELECT id, CASE WHEN score > 5 THEN 'hi' ELSE 'lo' END AS k FROM p",
            false,
            "CASE",
        ),
        // Literals built only of constants compare under the session's byte-wise
        // collation: 'A' and 'a' are two groups.
        (
            "SELECT CASE WHEN score > 5 THEN 'A' ELSE 'a' END AS k, count(*) AS n FROM p \
             GROUP BY CASE WHEN score > 5 THEN 'A' ELSE 'a' END",
            false,
            "",
        ),
        // Not pushed (their meaning differs in MariaDB), still right.
        // A literal whose quote follows a backslash would end early in the database
        // (`'x\' OR 1=1 #'` is `'x\'` and a comment there): it stays in the gateway.
        (
            "SELECT id FROM p WHERE name = concat('x', chr(92), chr(39), ' OR 1=1 #')",
            false,
            "",
        ),
        ("SELECT id FROM p WHERE name <> 'a''''b'", false, ""),
        ("SELECT id, upper(name) AS u FROM p", false, ""),
        ("SELECT id FROM p WHERE score + score > 10", false, ""),
        (
            "SELECT id, score / 3 AS q, score % 3 AS r FROM p",
            false,
            "",
        ),
        ("SELECT id, concat(name, city) AS c FROM p", false, ""),
        ("SELECT avg(score) AS a FROM p", false, ""),
        (
            "SELECT a.id AS x, b.id AS y FROM p a FULL JOIN p b ON a.score = b.id",
            false,
            "",
        ),
        ("SELECT count(*) AS n FROM c WHERE name = 'a'", false, ""),
        ("SELECT id FROM c ORDER BY name, id", true, ""),
        ("SELECT name, count(*) AS n FROM c GROUP BY name", false, ""),
    ];
    for (sql, ordered, pushed) in cases {
        let (got, plan) = run(&ctx, sql).await;
        let want = reference.sql(sql).await.unwrap().collect().await.unwrap();
        let (mut got, mut want) = (rows(&got), rows(&want));
        if !ordered {
            got.sort();
            want.sort();
        }
        assert_eq!(got, want, "{sql}\n{plan}");
        if !pushed.is_empty() {
            let statement = plan
                .lines()
                .find(|l| l.contains("DatabaseExec"))
                .unwrap_or_else(|| panic!("{sql}: nothing ran in the database\n{plan}"));
            assert!(statement.contains(pushed), "{sql}: {statement}");
        }
    }
    // Every session's literals compare byte-wise, without padding.
    let text = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "c",
            datafusion::arrow::datatypes::DataType::Utf8,
            true,
        ),
        datafusion::arrow::datatypes::Field::new(
            "z",
            datafusion::arrow::datatypes::DataType::Utf8,
            true,
        ),
    ]));
    let (tx, mut rx) = tokio::sync::mpsc::channel(4);
    binary
        .run("SELECT @@collation_connection, @@time_zone", text, &tx)
        .await
        .unwrap();
    drop(tx);
    let b = rx.recv().await.unwrap().unwrap();
    assert_eq!(rows(&[b]), ["utf8mb4_nopad_bin|+00:00"]);
    // The injected literal never reached the database.
    let (_, plan) = run(
        &ctx,
        "SELECT id FROM p WHERE name = concat('x', chr(92), chr(39), ' OR 1=1 #')",
    )
    .await;
    let statement = plan.lines().find(|l| l.contains("DatabaseExec")).unwrap();
    assert!(!statement.contains("1=1"), "{statement}");
    // The case-insensitive table's text comparisons stayed in the gateway.
    let (_, plan) = run(&ctx, "SELECT count(*) AS n FROM c WHERE name = 'a'").await;
    let statement = plan.lines().find(|l| l.contains("DatabaseExec")).unwrap();
    assert!(!statement.contains("WHERE"), "{statement}");

    // A LIMIT without ORDER BY (a BI tool's preview) runs in the database.
    let (got, plan) = run(&ctx, "SELECT name, city FROM p LIMIT 3").await;
    assert_eq!(rows(&got).len(), 3, "{plan}");
    assert!(plan.contains("LIMIT 3"), "{plan}");
}

/// A wrong password and a missing table are named with the database and cause; a
/// statement whose reader goes away is killed in MariaDB, not left running; a server
/// that is down is unavailable (a retry may help), not misconfigured.
#[tokio::test]
async fn mysql_problems_are_named_and_statements_cancelled() {
    let db = LocalMariaDb::launch(None).await.unwrap();
    db.execute("CREATE DATABASE shop; CREATE TABLE shop.t (id INT)")
        .await
        .unwrap();
    let mut cfg = config(&db, "shop", "shop");
    cfg.password = fedgate::config::Secret::new("wrong".into());
    let e = RemoteTable::discover(fedgate::owner::source::open(&cfg).unwrap(), "shop", "t")
        .await
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("database shop") && e.contains("Access denied"),
        "{e}"
    );

    let database = fedgate::owner::source::open(&config(&db, "shop", "shop")).unwrap();
    let e = RemoteTable::discover(database.clone(), "shop", "nope")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("table shop.nope does not exist"), "{e}");

    // A value the database refuses is named by kind; the server's message, which
    // quotes the value, is not passed on.
    let one = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "n",
            datafusion::arrow::datatypes::DataType::Int64,
            true,
        ),
    ]));
    let (tx, _rx) = tokio::sync::mpsc::channel(1);
    let e = database
        .run("SELECT 9223372036854775807 + 4242", one, &tx)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("a value out of range (1690)"), "{e}");
    assert!(!e.contains("4242"), "{e}");

    // A statement that would run for a minute; its reader goes away after a moment.
    let schema = Arc::new(datafusion::arrow::datatypes::Schema::new(vec![
        datafusion::arrow::datatypes::Field::new(
            "s",
            datafusion::arrow::datatypes::DataType::Int64,
            true,
        ),
    ]));
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    let running = {
        let database = database.clone();
        tokio::spawn(async move { database.run("SELECT SLEEP(60)", schema, &tx).await })
    };
    let mut observer = db.connect(None).await.unwrap();
    use mysql_async::prelude::Queryable;
    let sleeping =
        "SELECT count(*) FROM information_schema.PROCESSLIST WHERE INFO = 'SELECT SLEEP(60)'";
    let mut seen: i64 = 0;
    for _ in 0..50 {
        seen = observer.query_first(sleeping).await.unwrap().unwrap();
        if seen == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(seen, 1, "the statement ran in MariaDB");
    drop(rx);
    let started = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(10), running)
        .await
        .expect("the reader stopped without waiting for the statement")
        .unwrap()
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(10));
    let mut left: i64 = 1;
    for _ in 0..50 {
        left = observer.query_first(sleeping).await.unwrap().unwrap();
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(left, 0, "the statement was killed in MariaDB");
    drop(observer);

    db.stop();
    let e = RemoteTable::discover(database, "shop", "t")
        .await
        .unwrap_err();
    assert!(e.retryable(), "{e}");
    assert!(e.to_string().contains("database shop"), "{e}");
}

/// `tls = "verify-full"`: the server's certificate must chain to the configured CA and
/// name the host; a certificate from another CA is refused, by name; a user that
/// requires TLS cannot be reached without it.
#[tokio::test]
async fn mysql_tls_verifies_the_server() {
    let ca = fedgate::trust::pki::Ca::generate("dbs").unwrap();
    let server = fedgate::trust::identity::Principal::new(
        "dbs",
        fedgate::trust::identity::Kind::City,
        "mariadb",
    )
    .unwrap();
    let issued = ca
        .issue(&server, &fedgate::trust::pki::default_hosts(), 2)
        .unwrap();
    let db = LocalMariaDb::launch(Some(ServerTls {
        cert: issued.cert_pem.clone(),
        key: issued.key_pem.clone(),
        ca: ca.cert_pem().to_string(),
    }))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (good_ca, _) = fedgate::trust::pki::write_ca(&ca, dir.path()).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (bad_ca, _) =
        fedgate::trust::pki::write_ca(&fedgate::trust::pki::Ca::generate("other").unwrap(), &other)
            .unwrap();
    let discover = |tls: fedgate::config::DatabaseTls| {
        let mut cfg = config(&db, "tls", "mysql");
        cfg.tls = tls;
        async move {
            let database = fedgate::owner::source::open(&cfg).unwrap();
            RemoteTable::discover(database, "mysql", "db").await
        }
    };
    discover(fedgate::config::DatabaseTls::VerifyFull {
        ca: good_ca,
        client: None,
    })
    .await
    .unwrap();
    let e = discover(fedgate::config::DatabaseTls::VerifyFull {
        ca: bad_ca,
        client: None,
    })
    .await
    .unwrap_err()
    .to_string();
    assert!(e.contains("database tls"), "{e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    let e = discover(fedgate::config::DatabaseTls::Disable)
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("Access denied"), "{e}");
}

/// The sample region's power department is MariaDB: its count runs there and equals
/// the file it was loaded from; when MariaDB goes down, Hangzhou is unavailable by
/// that database's name while its files are still served.
#[tokio::test]
async fn the_sample_regions_mariadb_department_answers_and_its_outage_is_named() {
    use crate::support::{Region, read_csv, states};
    let region = Region::start_with_database(Some(&["shanghai", "hangzhou"]), &|_| {}).await;
    let client = region.client("shanghai");
    let sql = "SELECT count(*) AS n FROM underground_pipelines \
               WHERE member = 'hangzhou' AND department = 'power' AND in_service";
    let e = client.explain(sql).await.unwrap();
    let power: Vec<&str> = e
        .database_statements
        .iter()
        .filter(|s| s.database == "power")
        .map(|s| s.sql.as_str())
        .collect();
    assert!(
        power.len() == 1 && power[0].contains("count(") && power[0].contains('`'),
        "{power:?}"
    );
    let (h, rows) = read_csv(&region.data().join("hangzhou/pipelines/cable_ducts.csv"));
    let retired = h.iter().position(|c| c == "retired").unwrap();
    let want = rows.iter().filter(|r| r[retired] == "f").count();
    assert!(want > 0 && want < rows.len());
    let a = client.query(sql, false, None).await.unwrap();
    assert_eq!(column_strings(&a.batches, "n"), [want.to_string()]);

    region.mariadb.as_ref().unwrap().stop();
    let f = client.query(sql, false, None).await.unwrap_err();
    let text = f.to_string();
    assert!(
        text.contains("member hangzhou is unavailable: database power"),
        "{text}"
    );
    let st = states(f.summary.as_ref().unwrap());
    assert_eq!(
        st["hangzhou"],
        fedgate::proto::v1::MemberState::Unavailable,
        "{st:?}"
    );
    let a = client
        .query(
            "SELECT count(*) AS n FROM census WHERE member = 'hangzhou'",
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(column_strings(&a.batches, "n"), ["13"]);
}
