//! PostgreSQL sources: a real server on loopback (started by the tests), Hangzhou's
//! pipelines in three departments' databases, Suzhou's in its data lake over Arrow Flight SQL.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use fedgate::proto::v1::MemberState;

use crate::support::{Region, column_strings, read_csv, states};

/// In-service sections per (member, department), counted from the files the
/// databases were loaded from and from Suzhou's CSV file.
fn expected_in_service(region: &Region) -> BTreeMap<(String, String), usize> {
    let mut out = BTreeMap::new();
    let data = region.data();
    let mut count = |member: &str, dept: &str, file: &str, col: &str, yes: &str| {
        let (h, rows) = read_csv(&data.join(file));
        let i = h.iter().position(|c| c == col).unwrap();
        let n = rows.iter().filter(|r| r[i] == yes).count();
        *out.entry((member.to_string(), dept.to_string()))
            .or_default() += n;
    };
    count(
        "hangzhou",
        "water",
        "hangzhou/pipelines/water_mains.csv",
        "status_code",
        "1",
    );
    count(
        "hangzhou",
        "gas",
        "hangzhou/pipelines/gas_lines.csv",
        "state",
        "运行",
    );
    count(
        "hangzhou",
        "power",
        "hangzhou/pipelines/cable_ducts.csv",
        "retired",
        "f",
    );
    let (h, rows) = read_csv(&data.join("suzhou/pipelines.csv"));
    let (owner, state) = (
        h.iter().position(|c| c == "权属单位").unwrap(),
        h.iter().position(|c| c == "状态").unwrap(),
    );
    for r in rows.iter().filter(|r| r[state] == "在用") {
        let dept = match r[owner].as_str() {
            "自来水公司" => "water",
            "燃气集团" => "gas",
            _ => "power",
        };
        *out.entry(("suzhou".to_string(), dept.to_string()))
            .or_default() += 1;
    }
    out
}

/// One canonical query over three PostgreSQL databases (Hangzhou) and a CSV file
/// (Suzhou) gives the counts of the source files.
#[tokio::test]
async fn departments_databases_and_files_answer_one_query() {
    let region =
        Region::start_with_database(Some(&["shanghai", "hangzhou", "suzhou"]), &|_| {}).await;
    let a = region
        .client("shanghai")
        .query(
            "SELECT member, department, count(*) AS n FROM underground_pipelines \
             WHERE in_service GROUP BY member, department ORDER BY member, department",
            false,
            None,
        )
        .await
        .unwrap();
    let got: BTreeMap<(String, String), usize> = column_strings(&a.batches, "member")
        .into_iter()
        .zip(column_strings(&a.batches, "department"))
        .zip(column_strings(&a.batches, "n"))
        .map(|((m, d), n)| ((m, d), n.parse().unwrap()))
        .collect();
    let want = expected_in_service(&region);
    assert_eq!(got, want);
    assert_eq!(got.len(), 6);
    let st = states(&a.summary);
    assert_eq!(st["hangzhou"], MemberState::Ok, "{st:?}");
    assert_eq!(st["suzhou"], MemberState::Ok, "{st:?}");
}

/// Explain shows the SQL each database receives: a GROUP BY over one department's
/// table is computed by PostgreSQL, and PostgreSQL's own statistics show it sent one
/// row per county, not the table. A top-k goes down as ORDER BY ... LIMIT.
#[tokio::test]
async fn aggregates_and_top_k_run_in_the_database() {
    let region = Region::start_with_database(Some(&["hangzhou"]), &|_| {}).await;
    let pg = region.pg.as_ref().unwrap();
    let water = pg.connect("hz_water").await.unwrap();
    water
        .batch_execute(
            "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset()",
        )
        .await
        .unwrap();
    let client = region.client("hangzhou");
    let sql = "SELECT county_code, count(*) AS n, sum(length_m) AS total FROM underground_pipelines \
               WHERE member = 'hangzhou' AND department = 'water' GROUP BY county_code";
    let e = client.explain(sql).await.unwrap();
    let stmts: Vec<_> = e
        .database_statements
        .iter()
        .filter(|s| s.member == "hangzhou")
        .collect();
    assert_eq!(
        stmts.len(),
        1,
        "only the water database is asked: {stmts:?}"
    );
    assert_eq!(stmts[0].database, "water");
    let pushed = &stmts[0].sql;
    assert!(pushed.contains("GROUP BY"), "{pushed}");
    assert!(
        pushed.contains("count(") && pushed.contains("sum("),
        "{pushed}"
    );
    assert!(pushed.contains("\"public\".\"water_mains\""), "{pushed}");

    let a = client.query(sql, false, None).await.unwrap();
    let counties = column_strings(&a.batches, "county_code");
    let (h, rows) = read_csv(&region.data().join("hangzhou/pipelines/water_mains.csv"));
    let c = h.iter().position(|x| x == "district_code").unwrap();
    let mut want: BTreeMap<String, usize> = BTreeMap::new();
    for r in &rows {
        *want.entry(r[c].clone()).or_default() += 1;
    }
    let got: BTreeMap<String, usize> = counties
        .iter()
        .cloned()
        .zip(
            column_strings(&a.batches, "n")
                .iter()
                .map(|n| n.parse().unwrap()),
        )
        .collect();
    assert_eq!(got, want);
    let returned: i64 = water
        .query_one(
            "SELECT coalesce(sum(rows), 0)::int8 FROM pg_stat_statements \
             WHERE query LIKE '%GROUP BY%' AND query LIKE '%water_mains%'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(
        returned as usize,
        want.len(),
        "PostgreSQL returned one row per county"
    );

    let topk = "SELECT pipe_id, length_m FROM underground_pipelines \
                WHERE member = 'hangzhou' AND department = 'water' \
                ORDER BY length_m DESC, pipe_id LIMIT 3";
    let e = client.explain(topk).await.unwrap();
    let pushed = &e.database_statements[0].sql;
    assert!(
        pushed.contains("ORDER BY") && pushed.contains("LIMIT 3"),
        "{pushed}"
    );
    let a = client.query(topk, false, None).await.unwrap();
    let l = h.iter().position(|x| x == "length_m").unwrap();
    let p = h.iter().position(|x| x == "pipe_no").unwrap();
    let mut by_len: Vec<(f64, String)> = rows
        .iter()
        .map(|r| (r[l].parse().unwrap(), r[p].clone()))
        .collect();
    by_len.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    let want: Vec<String> = by_len.iter().take(3).map(|x| x.1.clone()).collect();
    assert_eq!(column_strings(&a.batches, "pipe_id"), want);
}

/// PostgreSQL column types arrive as the Arrow types they are, NULLs included, and
/// aggregates pushed into the database keep them.
#[tokio::test]
async fn column_types_map_faithfully() {
    let region = Region::start_with_database(Some(&[]), &|_| {}).await;
    let pg = region.pg.as_ref().unwrap();
    let admin = pg.connect("postgres").await.unwrap();
    admin.batch_execute("CREATE DATABASE typed").await.unwrap();
    let db = pg.connect("typed").await.unwrap();
    db.batch_execute(
        "CREATE TABLE t (id int4 PRIMARY KEY, small int2, big int8, f4 float4, f8 float8, \
           amount numeric(12,3), free numeric, label text, code varchar(8), flag bool, \
           day date, at timestamp, at_utc timestamptz, doc jsonb); \
         INSERT INTO t VALUES \
           (1, -3, 9007199254740993, 1.5, -2.25, 123456789.125, 1.5, '杭州', 'A1', true, \
            '2020-02-29', '2020-01-23 10:00:00.123456', '2020-01-23 10:00:00+08', '{\"a\": 1}'), \
           (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL), \
           (3, 7, -1, 0, 0, -0.001, 0, '', 'B', false, '1969-12-31', '1900-01-01 00:00:00', \
            '2038-01-19 03:14:08+00', '[]')",
    )
    .await
    .unwrap();
    let mut cfg = fedgate::config::Database {
        name: "typed".into(),
        kind: fedgate::config::DatabaseKind::Postgres,
        host: "127.0.0.1".into(),
        port: pg.port,
        dbname: "typed".into(),
        user: pg.user.clone(),
        password: Default::default(),
        tls: fedgate::config::DatabaseTls::Disable,
        pool_size: 2,
        connect_timeout: Duration::from_secs(5),
        settings: Vec::new(),
    };
    // Without the password the server refuses, with a clear reason.
    let refused = fedgate::owner::source::open(&cfg).unwrap();
    let e = fedgate::owner::source::remote::RemoteTable::discover(refused, "public", "t")
        .await
        .unwrap_err();
    assert!(e.to_string().contains("password"), "{e}");
    cfg.password = fedgate::config::Secret::new(pg.password.clone());
    let database = fedgate::owner::source::open(&cfg).unwrap();
    let table = fedgate::owner::source::remote::RemoteTable::discover(database, "public", "t")
        .await
        .unwrap();
    let ctx = fedgate::owner::session::member_context();
    ctx.register_table("t", Arc::new(table)).unwrap();

    let run = |sql: &'static str| {
        let ctx = ctx.clone();
        async move {
            let plan = ctx.state().create_logical_plan(sql).await.unwrap();
            let physical = fedgate::owner::member::physical_plan(&ctx, &plan)
                .await
                .unwrap();
            let text = datafusion::physical_plan::displayable(physical.as_ref())
                .indent(true)
                .to_string();
            let batches: Vec<RecordBatch> =
                datafusion::physical_plan::collect(physical, ctx.task_ctx())
                    .await
                    .unwrap();
            (batches, text)
        }
    };
    let (b, _) = run("SELECT * FROM t ORDER BY id").await;
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
            "Int64",
            "Float32",
            "Float64",
            "Decimal128(12, 3)",
            "Decimal128(38, 10)",
            "Utf8",
            "Utf8",
            "Boolean",
            "Date32",
            "Timestamp(µs)",
            "Timestamp(µs, \"UTC\")",
            "Utf8"
        ]
    );
    let row = |col: &str| column_strings(&b, col);
    assert_eq!(row("small"), ["-3", "", "7"]);
    assert_eq!(row("big"), ["9007199254740993", "", "-1"]);
    assert_eq!(row("f4"), ["1.5", "", "0.0"]);
    assert_eq!(row("amount"), ["123456789.125", "", "-0.001"]);
    assert_eq!(row("free"), ["1.5000000000", "", "0.0000000000"]);
    assert_eq!(row("label"), ["杭州", "", ""]);
    assert_eq!(row("code"), ["A1", "", "B"]);
    assert_eq!(row("flag"), ["true", "", "false"]);
    assert_eq!(row("day"), ["2020-02-29", "", "1969-12-31"]);
    assert_eq!(
        row("at"),
        ["2020-01-23T10:00:00.123456", "", "1900-01-01T00:00:00"]
    );
    assert_eq!(
        row("at_utc"),
        ["2020-01-23T02:00:00Z", "", "2038-01-19T03:14:08Z"]
    );
    assert_eq!(row("doc"), ["{\"a\": 1}", "", "[]"]);
    // NULLs are NULLs, not empty strings.
    assert!(b[0].column(7).is_null(1) && !b[0].column(7).is_null(2));

    let (b, plan) = run("SELECT sum(amount) AS s, max(at_utc) AS m, count(big) AS n FROM t").await;
    assert!(
        plan.contains("sum(") && plan.contains("DatabaseExec"),
        "{plan}"
    );
    assert_eq!(column_strings(&b, "s"), ["123456789.124"]);
    assert_eq!(column_strings(&b, "m"), ["2038-01-19T03:14:08Z"]);
    assert_eq!(column_strings(&b, "n"), ["2"]);

    // char(n) compares without trailing blanks in PostgreSQL, and is read without
    // them: a literal ending in a blank matches nothing here, so it is not sent.
    db.batch_execute("CREATE TABLE padded (c char(4)); INSERT INTO padded VALUES ('ab')")
        .await
        .unwrap();
    let padded = fedgate::owner::source::remote::RemoteTable::discover(
        fedgate::owner::source::open(&cfg).unwrap(),
        "public",
        "padded",
    )
    .await
    .unwrap();
    ctx.register_table("padded", Arc::new(padded)).unwrap();
    let (b, plan) = run("SELECT count(*) AS n FROM padded WHERE c = 'ab '").await;
    assert_eq!(column_strings(&b, "n"), ["0"], "{plan}");
    let (b, plan) = run("SELECT count(*) AS n FROM padded WHERE c = 'ab'").await;
    assert_eq!(column_strings(&b, "n"), ["1"], "{plan}");
    assert!(plan.contains("count("), "{plan}");

    // An unconstrained numeric with more places than the 10 it is read with fails,
    // without the value: it is never rounded (by a cast in the database or by the
    // parser here). The column is named as the statement sent names it (`c0`): the
    // names below a pushed plan can be the member's local ones.
    db.batch_execute("UPDATE t SET free = 0.123456789012 WHERE id = 3")
        .await
        .unwrap();
    let plan = ctx
        .state()
        .create_logical_plan("SELECT free FROM t ORDER BY id")
        .await
        .unwrap();
    let physical = fedgate::owner::member::physical_plan(&ctx, &plan)
        .await
        .unwrap();
    let e = datafusion::physical_plan::collect(physical, ctx.task_ctx())
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("more places") && e.contains("column c0"), "{e}");
    assert!(!e.contains("123456789012"), "{e}");

    // The operator's settings reach every session, a value with white space intact,
    // and the gateway's own settings stay as it needs them.
    db.batch_execute(
        "CREATE VIEW seen AS SELECT current_setting('max_parallel_workers_per_gather') AS workers, \
           current_setting('statement_timeout') AS timeout, current_setting('TimeZone') AS tz",
    )
    .await
    .unwrap();
    let mut with = cfg.clone();
    with.settings = vec![
        ("max_parallel_workers_per_gather".into(), "0".into()),
        ("statement_timeout".into(), "5 s".into()),
    ];
    for (name, cfg, query, workers, timeout) in [
        (
            "seen_set",
            &with,
            "SELECT workers, timeout, tz FROM seen_set",
            "0",
            "5s",
        ),
        (
            "seen_default",
            &cfg,
            "SELECT workers, timeout, tz FROM seen_default",
            "2",
            "0",
        ),
    ] {
        let seen = fedgate::owner::source::remote::RemoteTable::discover(
            fedgate::owner::source::open(cfg).unwrap(),
            "public",
            "seen",
        )
        .await
        .unwrap();
        ctx.register_table(name, Arc::new(seen)).unwrap();
        let (b, _) = run(query).await;
        assert_eq!(column_strings(&b, "workers"), [workers], "{name}");
        assert_eq!(column_strings(&b, "timeout"), [timeout], "{name}");
        assert_eq!(column_strings(&b, "tz"), ["UTC"], "{name}");
    }
}

/// A wrong password, a missing table and a missing column are each reported by
/// database and cause; the member keeps serving its other datasets.
#[tokio::test]
async fn database_problems_are_named_and_other_datasets_keep_serving() {
    type Edit<'a> = &'a dyn Fn(&str) -> String;
    let cases: [(&str, Edit, &str); 3] = [
        (
            "wrong password",
            &|toml: &str| {
                toml.replacen("secrets/hangzhou-db.password", "secrets/wrong.password", 1)
            },
            "password authentication failed",
        ),
        (
            "missing table",
            &|toml: &str| toml.replace("public.water_mains", "public.water_mainz"),
            "table public.water_mainz does not exist",
        ),
        (
            "missing column",
            &|toml: &str| toml.replacen("road = \"road\"", "road = \"road_nam\"", 1),
            "road_nam",
        ),
    ];
    for (what, edit, expected) in cases {
        let region = Region::start_with_database(Some(&["hangzhou"]), &|m| {
            let path = m.dir.join("hangzhou.toml");
            let text = std::fs::read_to_string(&path).unwrap();
            std::fs::write(&path, edit(&text)).unwrap();
            std::fs::write(m.dir.join("secrets/wrong.password"), "not-the-password").unwrap();
        })
        .await;
        let client = region.client("hangzhou");
        let f = client
            .query(
                "SELECT count(*) FROM underground_pipelines WHERE member = 'hangzhou'",
                false,
                None,
            )
            .await
            .unwrap_err();
        let text = f.to_string();
        assert!(text.contains("database water"), "{what}: {text}");
        assert!(text.contains(expected), "{what}: {text}");
        let a = client
            .query(
                "SELECT count(*) AS n FROM census WHERE member = 'hangzhou'",
                false,
                None,
            )
            .await
            .unwrap();
        assert_eq!(column_strings(&a.batches, "n"), ["13"], "{what}");
    }
}

/// A database that goes down makes its datasets unavailable, by name, at once; and a
/// query past its deadline is cancelled in PostgreSQL too, not left running there.
#[tokio::test]
async fn a_database_down_or_past_the_deadline_is_reported_and_cancelled() {
    let region = Region::start_with_database(Some(&["shanghai", "hangzhou"]), &|_| {}).await;
    let pg = region.pg.as_ref().unwrap();
    let client = region.client("shanghai");
    let sql = "SELECT count(*) AS n FROM underground_pipelines WHERE member = 'hangzhou'";
    let a = client.query(sql, false, None).await.unwrap();
    assert_eq!(column_strings(&a.batches, "n"), ["2600"]);

    // A lock held by another session makes the database's answer wait.
    let gas = pg.connect("hz_gas").await.unwrap();
    gas.batch_execute("BEGIN; LOCK TABLE gis.gas_lines IN ACCESS EXCLUSIVE MODE")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let f = client
        .query(sql, false, Some(Duration::from_secs(2)))
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(6),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(f.status.code(), tonic::Code::DeadlineExceeded, "{f}");
    // Another session: statistics read inside a transaction are a snapshot.
    let observer = pg.connect("hz_gas").await.unwrap();
    let waiting = || async {
        observer
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'fedgate' \
             AND state = 'active' AND query LIKE '%gas_lines%'",
                &[],
            )
            .await
            .unwrap()
            .get::<_, i64>(0)
    };
    let mut left = waiting().await;
    for _ in 0..50 {
        if left == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        left = waiting().await;
    }
    assert_eq!(
        left, 0,
        "the database query was cancelled when the deadline passed"
    );
    gas.batch_execute("ROLLBACK").await.unwrap();

    pg.stop();
    let f = client.query(sql, false, None).await.unwrap_err();
    let text = f.to_string();
    assert!(
        text.contains("member hangzhou is unavailable: database "),
        "{text}"
    );
    assert!(
        !text.contains("nothing is listening"),
        "the member itself answered: {text}"
    );
    let st = states(f.summary.as_ref().unwrap());
    assert_eq!(st["hangzhou"], MemberState::Unavailable, "{st:?}");
    // Hangzhou's files are still served.
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

/// `tls = "verify-full"`: the server's certificate must chain to the configured CA and
/// name the host; a certificate from another CA is refused, by name.
#[tokio::test]
async fn tls_to_the_database_verifies_the_server() {
    let ca = fedgate::trust::pki::Ca::generate("dbs").unwrap();
    let server =
        fedgate::trust::identity::Principal::new("dbs", fedgate::trust::identity::Kind::City, "pg")
            .unwrap();
    let issued = ca
        .issue(&server, &fedgate::trust::pki::default_hosts(), 2)
        .unwrap();
    let pg = fedgate::tools::local_postgres::LocalPostgres::launch(Some((
        issued.cert_pem.clone(),
        issued.key_pem.clone(),
    )))
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (good_ca, _) = fedgate::trust::pki::write_ca(&ca, dir.path()).unwrap();
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).unwrap();
    let (bad_ca, _) =
        fedgate::trust::pki::write_ca(&fedgate::trust::pki::Ca::generate("other").unwrap(), &other)
            .unwrap();
    let connect = |ca: std::path::PathBuf| {
        let cfg = fedgate::config::Database {
            name: "tls".into(),
            kind: fedgate::config::DatabaseKind::Postgres,
            host: "127.0.0.1".into(),
            port: pg.port,
            dbname: "postgres".into(),
            user: pg.user.clone(),
            password: fedgate::config::Secret::new(pg.password.clone()),
            tls: fedgate::config::DatabaseTls::VerifyFull { ca, client: None },
            pool_size: 1,
            connect_timeout: Duration::from_secs(5),
            settings: Vec::new(),
        };
        async move {
            let db = fedgate::owner::source::open(&cfg).unwrap();
            fedgate::owner::source::remote::RemoteTable::discover(db, "pg_catalog", "pg_class")
                .await
        }
    };
    let table = connect(good_ca).await.unwrap();
    let _ = table;
    let e = connect(bad_ca).await.unwrap_err().to_string();
    assert!(e.contains("database tls"), "{e}");
    assert!(e.to_lowercase().contains("certificate"), "{e}");
    // The server really was asked for TLS: its statistics show an encrypted session.
    let c = pg.connect("postgres").await.unwrap();
    let ssl: i64 = c
        .query_one("SELECT count(*) FROM pg_stat_ssl WHERE ssl", &[])
        .await
        .unwrap()
        .get(0);
    assert!(ssl >= 1, "the verified connection uses TLS");
}

/// An `aggregate` rule over a dataset in databases: the office gets counts of cells of
/// at least k, equal to the files', and no records.
#[tokio::test]
async fn aggregate_access_over_database_tables_releases_only_cells() {
    let region = Region::start_with_database(Some(&["hangzhou"]), &|m| {
        let path = m.dir.join("hangzhou.toml");
        let text = std::fs::read_to_string(&path).unwrap();
        let rule = "[[access]]\nprincipals = [\"fedgate://yrd/office/*\"]\n\
                    datasets = [\"underground_pipelines\"]\nlevel = \"aggregate\"\nmin_group = 10\n\
                    dimensions = [\"county_code\", \"department\"]\n\n[[access]]";
        std::fs::write(&path, text.replacen("[[access]]", rule, 1)).unwrap();
    })
    .await;
    let client = region.client("hangzhou");
    let a = client
        .query(
            "SELECT department, count(*) AS n FROM underground_pipelines \
             WHERE member = 'hangzhou' AND county_code = '330106' \
             GROUP BY department ORDER BY department",
            false,
            None,
        )
        .await
        .unwrap();
    let data = region.data().join("hangzhou/pipelines");
    let count = |file: &str, col: &str, values: &[&str]| {
        let (h, rows) = read_csv(&data.join(file));
        let i = h.iter().position(|c| c == col).unwrap();
        rows.iter()
            .filter(|r| values.contains(&r[i].as_str()))
            .count()
    };
    let want = [
        count("gas_lines.csv", "qx_dm", &["330106"]),
        count("cable_ducts.csv", "area", &["西湖区"]),
        count("water_mains.csv", "district_code", &["330106"]),
    ];
    assert!(want.iter().all(|n| *n >= 10), "{want:?}");
    let got: Vec<usize> = column_strings(&a.batches, "n")
        .iter()
        .map(|n| n.parse().unwrap())
        .collect();
    assert_eq!(
        column_strings(&a.batches, "department"),
        ["gas", "power", "water"]
    );
    assert_eq!(got, want);
    let f = client
        .query(
            "SELECT pipe_id FROM underground_pipelines WHERE member = 'hangzhou'",
            false,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::PermissionDenied, "{f}");
    // One department alone: a plan over one database, cell counting included.
    let a = client
        .query(
            "SELECT count(*) AS n FROM underground_pipelines \
             WHERE member = 'hangzhou' AND department = 'water'",
            false,
            None,
        )
        .await
        .unwrap();
    let (_, rows) = read_csv(&data.join("water_mains.csv"));
    assert_eq!(column_strings(&a.batches, "n"), [rows.len().to_string()]);
}

/// An aggregate over a dataset mapped from several databases is split: each database
/// computes its own part, and the member combines the parts.
#[tokio::test]
async fn an_aggregate_over_several_databases_runs_in_each() {
    let region = Region::start_with_database(Some(&["hangzhou"]), &|_| {}).await;
    let client = region.client("hangzhou");
    let sql = "SELECT department, count(*) AS n, min(laid_on) AS first, max(diameter_mm) AS widest, \
               round(avg(length_m), 6) AS mean FROM underground_pipelines WHERE member = 'hangzhou' \
               GROUP BY department ORDER BY department";
    let e = client.explain(sql).await.unwrap();
    let by_db: BTreeMap<String, String> = e
        .database_statements
        .iter()
        .map(|s| (s.database.clone(), s.sql.clone()))
        .collect();
    assert_eq!(by_db.len(), 3, "{by_db:?}");
    for (db, sql) in &by_db {
        assert!(sql.contains("GROUP BY"), "{db}: {sql}");
    }
    let a = client.query(sql, false, None).await.unwrap();
    let data = region.data().join("hangzhou/pipelines");
    let stats = |file: &str, date: &str, width: &str| {
        let (h, rows) = read_csv(&data.join(file));
        let (d, w) = (
            h.iter().position(|c| c == date).unwrap(),
            h.iter().position(|c| c == width).unwrap(),
        );
        let l = h.iter().position(|c| c == "length_m").unwrap();
        let total: f64 = rows.iter().map(|r| r[l].parse::<f64>().unwrap()).sum();
        (
            format!("{:.6}", total / rows.len() as f64),
            rows.len().to_string(),
            rows.iter().map(|r| r[d].clone()).min().unwrap(),
            rows.iter()
                .map(|r| r[w].parse::<i64>().unwrap())
                .max()
                .unwrap()
                .to_string(),
        )
    };
    let want = [
        stats("gas_lines.csv", "laid_on", "dn"),
        stats("cable_ducts.csv", "commissioned", "duct_width_mm"),
        stats("water_mains.csv", "laid_on", "diameter_mm"),
    ];
    let got: Vec<(String, String, String, String)> = column_strings(&a.batches, "mean")
        .into_iter()
        .map(|m| format!("{:.6}", m.parse::<f64>().unwrap()))
        .zip(column_strings(&a.batches, "n"))
        .zip(column_strings(&a.batches, "first"))
        .zip(column_strings(&a.batches, "widest"))
        .map(|(((m, n), f), w)| (m, n, f, w))
        .collect();
    assert_eq!(
        column_strings(&a.batches, "department"),
        ["gas", "power", "water"]
    );
    assert_eq!(got, want);
}

/// The first query a BI tool sends to preview a table, `SELECT columns FROM dataset
/// LIMIT n` without ORDER BY, runs its LIMIT in the database and answers rows of the
/// dataset, also when the source's name differs from its table's (the gas source is
/// renamed `g` over table `gis.gas_lines`, in a second schema). An aggregate under a
/// LIMIT, whose unaliased columns the database writes aggregates first, comes back
/// in the plan's column order.
#[tokio::test]
async fn a_limit_without_order_runs_in_the_database_over_renamed_sources() {
    let region = Region::start_with_database(Some(&["hangzhou"]), &|m| {
        let p = m.dir.join("hangzhou.toml");
        let t = std::fs::read_to_string(&p)
            .unwrap()
            .replace("name = \"gas_lines\"", "name = \"g\"")
            .replace("source = \"gas_lines\"", "source = \"g\"");
        std::fs::write(&p, t).unwrap();
    })
    .await;
    let client = region.client("hangzhou");
    let rows = |a: &fedgate::tools::client::Answer| -> Vec<String> {
        let (i, r, l) = (
            column_strings(&a.batches, "pipe_id"),
            column_strings(&a.batches, "r"),
            column_strings(&a.batches, "length_m"),
        );
        (0..i.len())
            .map(|k| format!("{}|{}|{}", i[k], r[k], l[k]))
            .collect()
    };
    for dept in ["water", "gas"] {
        let base = format!(
            "SELECT pipe_id, upper(road) AS r, length_m FROM underground_pipelines \
             WHERE member = 'hangzhou' AND department = '{dept}'"
        );
        let all: BTreeSet<String> = rows(&client.query(&base, false, None).await.unwrap())
            .into_iter()
            .collect();
        assert!(all.len() > 8, "{dept}: {}", all.len());
        for tail in ["LIMIT 5", "LIMIT 5 OFFSET 2", "AND length_m > 0 LIMIT 5"] {
            let sql = format!("{base} {tail}");
            let e = client.explain(&sql).await.unwrap();
            let s: Vec<_> = e
                .database_statements
                .iter()
                .filter(|s| s.member == "hangzhou")
                .collect();
            assert_eq!(s.len(), 1, "{sql}: {s:?}");
            assert!(s[0].error.is_empty(), "{sql}: {s:?}");
            assert!(
                s[0].sql.contains("LIMIT") && !s[0].sql.contains("derived_limit"),
                "{sql}: {}",
                s[0].sql
            );
            let got = rows(&client.query(&sql, false, None).await.unwrap());
            assert_eq!(got.len(), 5, "{sql}\n{}\n{:?}", e.plan, e.subqueries);
            for r in &got {
                assert!(all.contains(r), "{sql}: {r} is not a row of the dataset");
            }
        }
    }
    // All three databases at once (water, gas and power), each with its LIMIT.
    let a = client
        .query(
            "SELECT pipe_id FROM underground_pipelines WHERE member = 'hangzhou' LIMIT 7",
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(column_strings(&a.batches, "pipe_id").len(), 7);

    // An aggregate under a LIMIT, without aliases: every (county, count) pair returned
    // is one of the full answer's pairs, in the columns asked for.
    let grouped = |tail: &str| {
        let client = client.clone();
        let sql = format!(
            "SELECT county_code, count(*) FROM underground_pipelines \
             WHERE member = 'hangzhou' AND department = 'water' GROUP BY county_code {tail}"
        );
        async move {
            let a = client.query(&sql, false, None).await.unwrap();
            let name = a.batches[0].schema().field(1).name().clone();
            let (c, n) = (
                column_strings(&a.batches, "county_code"),
                column_strings(&a.batches, &name),
            );
            (0..c.len())
                .map(|k| (c[k].clone(), n[k].parse::<i64>().unwrap()))
                .collect::<BTreeSet<(String, i64)>>()
        }
    };
    let full = grouped("").await;
    let limited = grouped("LIMIT 2").await;
    assert!(full.len() > 2, "{full:?}");
    assert_eq!(limited.len(), 2, "{limited:?}");
    assert!(limited.is_subset(&full), "{limited:?} within {full:?}");
}
