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
        settings: Vec::new(),
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

/// The sample region's Flight SQL source: Suzhou's pipeline survey lives in the city's
/// data lake, an engine of its own behind its own CA. A query's sub-plan over it runs
/// there as one statement (the aggregate included), the answer is the survey's, the
/// lake's own log shows Suzhou's gateway reading it, and when the lake is down the
/// answer names it while Suzhou's other datasets keep serving.
#[tokio::test]
async fn the_sample_regions_data_lake_answers_over_flight_sql_and_its_outage_is_named() {
    use crate::support::{column_strings, read_csv, states, sub_query_records};
    let mut region = Region::start_only(Some(&["shanghai", "suzhou"])).await;
    let client = region.client("shanghai");
    let sql = "SELECT department, count(*) AS n FROM underground_pipelines \
               WHERE member = 'suzhou' AND in_service GROUP BY department ORDER BY department";
    let e = client.explain(sql).await.unwrap();
    let lake: Vec<&str> = e
        .database_statements
        .iter()
        .filter(|s| s.database == "lake")
        .map(|s| s.sql.as_str())
        .collect();
    assert!(
        lake.len() == 1 && lake[0].contains("count(") && lake[0].contains("gx_guanxian"),
        "{lake:?}"
    );

    // The reference: the survey file the lake serves, counted here.
    let (h, rows) = read_csv(&region.data().join("suzhou/pipelines.csv"));
    let (owner, status) = (
        h.iter().position(|c| c == "权属单位").unwrap(),
        h.iter().position(|c| c == "状态").unwrap(),
    );
    let mut want = std::collections::BTreeMap::<&str, usize>::new();
    for r in rows.iter().filter(|r| r[status] == "在用") {
        let d = match r[owner].as_str() {
            "自来水公司" => "water",
            "燃气集团" => "gas",
            "供电公司" => "power",
            other => panic!("unexpected department {other}"),
        };
        *want.entry(d).or_default() += 1;
    }
    assert!(want.len() == 3, "{want:?}");
    let a = client.query(sql, false, None).await.unwrap();
    assert_eq!(
        column_strings(&a.batches, "department"),
        want.keys().map(|k| k.to_string()).collect::<Vec<_>>()
    );
    assert_eq!(
        column_strings(&a.batches, "n"),
        want.values().map(|n| n.to_string()).collect::<Vec<_>>()
    );

    // The lake answered Suzhou's gateway under its own rules, and wrote it down.
    let lake_log = region.layout.dir.join("lake/audit/warehouse.log");
    let read: Vec<_> = sub_query_records(&lake_log)
        .into_iter()
        .filter(|r| r["entry"]["origin"] == "fedgate://szlake/city/suzhou")
        .collect();
    assert!(
        !read.is_empty(),
        "no record of suzhou in {}",
        lake_log.display()
    );
    for r in &read {
        assert_eq!(
            r["entry"]["datasets"],
            serde_json::json!(["gx_guanxian"]),
            "{r}"
        );
    }

    region.stop("lake/warehouse").await;
    let f = client.query(sql, false, None).await.unwrap_err();
    let text = f.to_string();
    assert!(
        text.contains("member suzhou is unavailable: database lake"),
        "{text}"
    );
    let st = states(f.summary.as_ref().unwrap());
    assert_eq!(
        st["suzhou"],
        fedgate::proto::v1::MemberState::Unavailable,
        "{st:?}"
    );
    let a = client
        .query(
            "SELECT count(*) AS n FROM fever_clinics WHERE member = 'suzhou'",
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(column_strings(&a.batches, "n").len(), 1);
    assert_ne!(column_strings(&a.batches, "n"), ["0"]);
}

/// Under the MySQL dialect (Doris, StarRocks) `||` is a logical OR unless the session
/// says otherwise, and a member sets up no session on a Flight SQL engine: a
/// concatenation stays in the gateway while the rest of the query goes to the engine.
#[tokio::test]
async fn a_mysql_dialect_engine_is_never_sent_a_concatenation() {
    let region = Region::start_only(Some(&["shanghai"])).await;
    let mut cfg = config(&region, region.layout.ca.clone());
    cfg.kind = fedgate::config::DatabaseKind::FlightSql(fedgate::config::Dialect::MySql);
    let engine = fedgate::owner::source::open(&cfg).unwrap();
    let ctx = fedgate::owner::session::member_context();
    let t = RemoteTable::discover(engine, "", "census").await.unwrap();
    ctx.register_table("census", Arc::new(t)).unwrap();
    let sql = "SELECT county_name || '-' || county_code AS label, pop_total FROM census \
               WHERE pop_total > 100000";
    let plan = ctx.state().create_logical_plan(sql).await.unwrap();
    let physical = fedgate::owner::member::physical_plan(&ctx, &plan)
        .await
        .unwrap();
    let text = datafusion::physical_plan::displayable(physical.as_ref())
        .indent(true)
        .to_string();
    let statement = text
        .lines()
        .find(|l| l.contains("DatabaseExec"))
        .unwrap_or_else(|| panic!("nothing ran in the engine\n{text}"));
    assert!(statement.contains("100000"), "{statement}");
    assert!(!statement.contains("||"), "{statement}");
    // The concatenation is computed here, over what the engine sent.
    assert!(text.contains("||"), "{text}");
}

/// The lake ends every connection after a second (`[lifecycle] max_connection_age`,
/// as an engine behind a load balancer may): Suzhou keeps reading it whole, a call
/// that starts just as a connection ends being asked again on a fresh one.
#[tokio::test]
async fn a_lake_that_ends_its_connections_every_second_is_still_read_whole() {
    use crate::support::member_state;
    use fedgate::proto::v1::MemberState;
    let region = Region::start_patched(Some(&["shanghai", "suzhou"]), &|layout| {
        crate::support::patch_member(layout, "lake/warehouse", |m| {
            m.lifecycle = Some(fedgate::config::raw::RawLifecycle {
                max_connection_age: Some("1s".into()),
                ..Default::default()
            });
        })
    })
    .await;
    let client = region.client("shanghai");
    let sql = "SELECT count(*) AS n FROM underground_pipelines WHERE member = 'suzhou'";
    let first = client.query(sql, false, None).await.unwrap();
    let want = first.batches.clone();
    let started = std::time::Instant::now();
    let mut answered = 0;
    while started.elapsed() < Duration::from_secs(6) {
        let a = client
            .query(sql, false, None)
            .await
            .unwrap_or_else(|e| panic!("after {answered} answers: {e}"));
        assert_eq!(member_state(&a.summary, "suzhou"), MemberState::Ok);
        assert_eq!(a.batches, want);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    assert!(answered >= 10, "{answered}");
}
