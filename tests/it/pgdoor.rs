//! The PostgreSQL port, spoken to by a real PostgreSQL client library (tokio-postgres,
//! the protocol implementation of the Rust ecosystem) over client-certificate TLS:
//! identity, the catalog, plain and parameterized queries, qualified names, SQLSTATEs,
//! partial answers' notices, portals fetched in pieces, and cancel requests. psql,
//! psycopg, SQLAlchemy and the JDBC driver run against the sample region in
//! `tests/python`.

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::StreamExt;
use tokio_postgres::error::SqlState;
use tokio_postgres::{AsyncMessage, Client, SimpleQueryMessage};

use crate::proxy::Fault;
use crate::support::{OFFICE, Region};

/// A TLS connector presenting `cert`/`key` and trusting the region CA only.
pub(crate) fn tls(ca: &Path, cert: &Path, key: &Path) -> tokio_postgres_rustls::MakeRustlsConnect {
    let material = fedgate::trust::tls::TlsMaterial::load(ca, cert, key).unwrap();
    let mut cfg = (*material.client_config().unwrap()).clone();
    // The gateway's client config offers HTTP/2 for gRPC; a PostgreSQL client
    // offers no ALPN (or "postgresql").
    cfg.alpn_protocols.clear();
    tokio_postgres_rustls::MakeRustlsConnect::new(cfg)
}

/// Notices a connection received, in order.
pub(crate) type Notices = Arc<Mutex<Vec<tokio_postgres::error::DbError>>>;

/// Connects to `gateway`'s PostgreSQL port as `who` (a client or member certificate).
async fn connect_as(region: &Region, who: &str, gateway: &str) -> (Client, Notices) {
    let (cert, key) = if who == "office" {
        region.office()
    } else {
        let certs = region.layout.dir.join("certs");
        (
            certs.join(format!("{who}.crt")),
            certs.join(format!("{who}.key")),
        )
    };
    connect_with(region, gateway, tls(&region.layout.ca, &cert, &key)).await
}

pub(crate) async fn connect_with(
    region: &Region,
    gateway: &str,
    tls: tokio_postgres_rustls::MakeRustlsConnect,
) -> (Client, Notices) {
    let addr = region.gateways[gateway]
        .postgres_addr
        .expect("a PostgreSQL port");
    let conn = format!(
        "host=localhost port={} user=analyst dbname=yrd sslmode=require",
        addr.port()
    );
    let (client, mut connection) = tokio_postgres::connect(&conn, tls).await.unwrap();
    let notices: Notices = Arc::default();
    let seen = notices.clone();
    tokio::spawn(async move {
        let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(m)) = messages.next().await {
            if let AsyncMessage::Notice(n) = m {
                seen.lock().unwrap().push(n);
            }
        }
    });
    (client, notices)
}

/// How the last answer's plan was made, as its summary notice's `plan` says.
fn summary_plan(notices: &Notices) -> serde_json::Value {
    let summary = notices
        .lock()
        .unwrap()
        .last()
        .cloned()
        .expect("a summary notice");
    let detail: serde_json::Value =
        serde_json::from_str(summary.detail().expect("the summary's detail")).unwrap();
    detail["plan"].clone()
}

/// The fever clinics a member's file lists (none for a member without one).
fn clinics_in(region: &Region, member: &str) -> usize {
    let file = region.data().join(member).join("fever_clinics.csv");
    if file.exists() {
        crate::support::read_csv(&file).1.len()
    } else {
        0
    }
}

/// The members a run's `member IN (...)` values name, each once.
fn named<'a>(values: &[&'a str]) -> Vec<&'a str> {
    let mut members = values.to_vec();
    members.sort();
    members.dedup();
    members
}

/// The first column of every row of a simple query, as text.
async fn simple_column(client: &Client, sql: &str) -> Vec<Option<String>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e:?}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(r.get(0).map(String::from)),
            _ => None,
        })
        .collect()
}

/// The server's message of an error.
fn message_of(e: &tokio_postgres::Error) -> String {
    e.as_db_error()
        .map(|d| d.message().to_string())
        .unwrap_or_else(|| e.to_string())
}

fn code_of(e: &tokio_postgres::Error) -> SqlState {
    e.code()
        .cloned()
        .unwrap_or_else(|| panic!("no SQLSTATE: {e:?}"))
}

/// A statement prepared once and run with new values (the extended protocol's Bind
/// and Execute) whose placeholders are only compared is bound, from its second run on,
/// into its plan as optimized with the placeholders in place (the summary notice's
/// `plan` says so), and answers for each run's value: the counts come from the
/// members' files.
#[tokio::test]
async fn prepared_runs_bind_their_values_into_the_optimized_plan() {
    let region = Region::start().await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;
    let stmt = client
        .prepare("SELECT count(*) AS n FROM fever_clinics WHERE member = $1")
        .await
        .unwrap();
    for (i, member) in ["anji", "hangzhou", "shanghai", "suzhou"]
        .into_iter()
        .enumerate()
    {
        notices.lock().unwrap().clear();
        let rows = client.query(&stmt, &[&member]).await.unwrap();
        let n: i64 = rows[0].get("n");
        assert_eq!(n as usize, clinics_in(&region, member), "{member}");
        let expected = if i == 0 { "planned" } else { "bound optimized" };
        assert_eq!(summary_plan(&notices), expected, "{member}");
    }
}

/// A statement prepared once whose runs ask the same members with other values runs,
/// from the second such run on, the physical plan the first was planned into, with
/// its own values in the member SQL (the summary's `plan` says `reused`): one plan is
/// kept per set of members asked, for four sets at most, so a run that asks others is
/// planned for them. Each answer is the count in the asked members' files, so no run
/// answers with another's values or members, and a value that would be SQL if spliced
/// stays a value.
#[tokio::test]
async fn prepared_runs_asking_the_same_members_reuse_one_physical_plan() {
    let region = Region::start().await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;
    let stmt = client
        .prepare("SELECT count(*) AS n FROM fever_clinics WHERE member IN ($1, $2, $3)")
        .await
        .unwrap();
    let cases: [([&str; 3], &str); 12] = [
        (["anji", "hangzhou", "hangzhou"], "planned"),
        (["hangzhou", "anji", "hangzhou"], "bound optimized"),
        (["hangzhou", "hangzhou", "anji"], "reused"),
        (["suzhou", "suzhou", "suzhou"], "bound optimized"),
        (["anji", "anji", "hangzhou"], "reused"),
        // Hefei serves no fever-clinic list: suzhou alone is asked, as before.
        (["suzhou", "hefei", "suzhou"], "reused"),
        (
            ["hangzhou", "x' OR member <> 'x", "hangzhou"],
            "bound optimized",
        ),
        (["hangzhou", "hangzhou", "y' OR '1'='1"], "reused"),
        (["shanghai", "suzhou", "anji"], "bound optimized"),
        // A fifth set of members: the statement keeps four split plans at most, so
        // shanghai's runs are planned each time.
        (["shanghai", "shanghai", "shanghai"], "bound optimized"),
        (["shanghai", "hefei", "shanghai"], "bound optimized"),
        (["anji", "hangzhou", "anji"], "reused"),
    ];
    for (values, expected) in cases {
        notices.lock().unwrap().clear();
        let rows = client
            .query(&stmt, &[&values[0], &values[1], &values[2]])
            .await
            .unwrap();
        let n: i64 = rows[0].get("n");
        let want: usize = named(&values).iter().map(|m| clinics_in(&region, m)).sum();
        assert_eq!(n as usize, want, "{values:?}");
        assert_eq!(summary_plan(&notices), expected, "{values:?}");
    }
}

/// Prepared lookups of a dataset's own rows (a filter and a projection, no
/// aggregate: the coordinator's scan is the dataset's table, whose member SQL its
/// filters make) reuse the physical plan kept for the members they ask, each with its
/// own filter in the member SQL: every answer is the asked members' rows in their
/// files less the one hospital the run excludes, so no run answers with another's
/// filter or members, and a value that would be SQL if spliced stays a value.
#[tokio::test]
async fn prepared_lookups_of_a_dataset_reuse_its_physical_plan_with_their_own_filters() {
    let region = Region::start().await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;
    let stmt = client
        .prepare(
            "SELECT hospital_name FROM fever_clinics \
             WHERE member IN ($1, $2, $3) AND hospital_name <> $4",
        )
        .await
        .unwrap();
    // Anji's hospitals are named in its column `yymc`, each once.
    let (header, anji) =
        crate::support::read_csv(&region.data().join("anji").join("fever_clinics.csv"));
    let yymc = header
        .iter()
        .position(|h| h == "yymc")
        .expect("anji's yymc");
    let hospital = anji[0][yymc].as_str();
    let cases: [([&str; 4], &str); 8] = [
        (["anji", "hangzhou", "hangzhou", "none"], "planned"),
        (
            ["hangzhou", "anji", "hangzhou", hospital],
            "bound optimized",
        ),
        (["hangzhou", "hangzhou", "anji", "none"], "reused"),
        (["anji", "anji", "hangzhou", hospital], "reused"),
        (["suzhou", "suzhou", "suzhou", "none"], "bound optimized"),
        // Hefei serves no fever-clinic list: suzhou alone is asked, as before.
        (["suzhou", "hefei", "suzhou", "x' OR '1'='1"], "reused"),
        (["anji", "anji", "anji", hospital], "bound optimized"),
        (["anji", "anji", "anji", "none"], "reused"),
    ];
    for (values, expected) in cases {
        notices.lock().unwrap().clear();
        let rows = client
            .query(&stmt, &[&values[0], &values[1], &values[2], &values[3]])
            .await
            .unwrap();
        let asked = named(&values[..3]);
        let excluded = usize::from(asked.contains(&"anji") && values[3] == hospital);
        let want = asked.iter().map(|m| clinics_in(&region, m)).sum::<usize>() - excluded;
        assert_eq!(rows.len(), want, "{values:?}");
        let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        assert_eq!(
            names.iter().any(|n| n == hospital),
            asked.contains(&"anji") && excluded == 0,
            "{values:?}"
        );
        assert_eq!(summary_plan(&notices), expected, "{values:?}");
    }
}

/// A run whose values that stay at the coordinator (here a `HAVING` over the final
/// count) hold more constant text than a kept plan may is planned physically each
/// time: a kept plan holding it would be memory the shape cache never charged. The
/// same statement with a short value reuses its plan, so the long value is what
/// decides; every count is still the members' files'.
#[tokio::test]
async fn a_run_holding_a_long_value_at_the_coordinator_keeps_no_plan() {
    let region = Region::start().await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;
    let stmt = client
        .prepare(
            "SELECT count(*) AS n FROM fever_clinics WHERE member IN ($1, $2, $3) \
             HAVING CAST(count(*) AS VARCHAR) <> $4",
        )
        .await
        .unwrap();
    let want = clinics_in(&region, "anji") + clinics_in(&region, "hangzhou");
    let long = "x".repeat(fedgate::owner::session::MOST_KEPT_CONSTANT_BYTES + 1);
    // Each run asks anji and hangzhou with values of its own (a run with the values
    // of an earlier one would find that one's plan in the plan cache).
    let cases: [([&str; 4], &str); 6] = [
        (["anji", "hangzhou", "hangzhou", &long], "planned"),
        (["hangzhou", "anji", "hangzhou", &long], "bound optimized"),
        // Kept, this run would be `reused`: the same members and the same long value.
        (["hangzhou", "hangzhou", "anji", &long], "bound optimized"),
        (["anji", "anji", "hangzhou", "short"], "bound optimized"),
        (["hangzhou", "anji", "anji", "short"], "reused"),
        (["anji", "hangzhou", "anji", &long], "bound optimized"),
    ];
    for (values, expected) in cases {
        notices.lock().unwrap().clear();
        let rows = client
            .query(&stmt, &[&values[0], &values[1], &values[2], &values[3]])
            .await
            .unwrap();
        let n: i64 = rows[0].get("n");
        let asked = (&values[..3], values[3].len());
        assert_eq!(n as usize, want, "{asked:?}");
        assert_eq!(summary_plan(&notices), expected, "{asked:?}");
    }
}

#[tokio::test]
async fn psql_style_sessions_query_the_region_over_client_certificate_tls() {
    let region = Region::start().await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;

    // The catalog: the canonical datasets as tables of one schema, in a database
    // named after the region, with their columns' PostgreSQL types.
    let tables = simple_column(
        &client,
        "SELECT table_name FROM information_schema.tables \
         WHERE table_schema = 'canonical' ORDER BY table_name",
    )
    .await;
    let expected: Vec<Option<String>> = {
        let (_, path, _) = region
            .layout
            .gateways
            .iter()
            .find(|(n, _, _)| n == OFFICE)
            .unwrap();
        let cfg = fedgate::config::MemberConfig::load(path).unwrap();
        let mut names: Vec<_> = cfg
            .region
            .datasets
            .iter()
            .map(|d| Some(d.name.clone()))
            .collect();
        names.sort();
        names
    };
    assert_eq!(tables, expected);
    let classes = simple_column(
        &client,
        "SELECT c.relname FROM pg_catalog.pg_class c \
         JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
         WHERE n.nspname = 'canonical' AND c.relkind = 'r' ORDER BY 1",
    )
    .await;
    assert_eq!(classes, expected);
    // LIKE with an escape character of the driver's choosing (SQLAlchemy's).
    let schemas = simple_column(
        &client,
        "SELECT nspname FROM pg_catalog.pg_namespace \
         WHERE nspname NOT LIKE 'pg/_%' ESCAPE '/' AND nspname LIKE 'c%' ORDER BY 1",
    )
    .await;
    assert_eq!(schemas, [Some("canonical".to_string())]);
    let pg_schemas = simple_column(
        &client,
        "SELECT count(*) FROM pg_catalog.pg_namespace WHERE nspname LIKE 'pg/_%' ESCAPE '/'",
    )
    .await;
    assert_ne!(
        pg_schemas,
        [Some("0".to_string())],
        "pg_catalog is a pg_ schema"
    );
    let columns = client
        .query(
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_name = 'census' AND column_name IN ('county_code', 'pop_total') \
             ORDER BY column_name",
            &[],
        )
        .await
        .unwrap();
    let columns: Vec<(String, String)> = columns.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(columns[0].0, "county_code");
    assert_eq!(columns[1].0, "pop_total");
    assert_eq!(simple_column(&client, "SELECT 1").await, [Some("1".into())]);
    assert_eq!(
        simple_column(&client, "SHOW search_path").await,
        [Some("canonical".into())]
    );

    // A query of a dataset, answered by the members, the same through every name a
    // client may use for it, and the same as the gRPC port answers.
    let grpc = region
        .client(OFFICE)
        .query("SELECT sum(pop_total) AS total FROM census", false, None)
        .await
        .unwrap();
    let total = crate::support::column_strings(&grpc.batches, "total");
    for name in [
        "census",
        "canonical.census",
        "yrd.canonical.census",
        "YRD.Canonical.census",
    ] {
        let rows = simple_column(&client, &format!("SELECT sum(pop_total) FROM {name}")).await;
        assert_eq!(rows, [Some(total[0].clone())], "{name}");
    }
    // Every answer ends with its per-member summary as a notice.
    let n = notices.lock().unwrap().clone();
    let last = n.last().expect("a summary notice");
    assert_eq!(last.severity(), "NOTICE");
    assert!(
        last.message().starts_with("fedgate answer: 1 rows"),
        "{}",
        last.message()
    );
    for member in ["shanghai", "hangzhou", "suzhou", "hefei", "anji"] {
        assert!(
            last.message().contains(&format!("{member} ok")),
            "{}",
            last.message()
        );
    }
    let detail: serde_json::Value = serde_json::from_str(last.detail().unwrap()).unwrap();
    assert_eq!(detail["partial"], false);

    // A parameterized query: the value is bound into the plan as a typed value (a
    // text that would be SQL if spliced matches nothing), and prepared statements run
    // again with other values.
    let stmt = client
        .prepare("SELECT county_name, pop_total FROM census WHERE county_code = $1")
        .await
        .unwrap();
    assert_eq!(stmt.params(), [tokio_postgres::types::Type::TEXT]);
    let literal = simple_column(
        &client,
        "SELECT county_name FROM census WHERE county_code = '330523'",
    )
    .await;
    assert_eq!(literal.len(), 1, "{literal:?}");
    let rows = client.query(&stmt, &[&"330523"]).await.unwrap();
    assert_eq!(rows.len(), 1);
    assert_eq!(Some(rows[0].get::<_, String>(0)), literal[0]);
    assert!(rows[0].get::<_, i64>(1) > 0);
    let hostile = client.query(&stmt, &[&"330523' OR '1'='1"]).await.unwrap();
    assert!(hostile.is_empty(), "a bound value is a value, never SQL");
    let int_param = client
        .query(
            "SELECT count(*) FROM census WHERE pop_total > $1",
            &[&1_000_000_i64],
        )
        .await
        .unwrap();
    assert!(int_param[0].get::<_, i64>(0) > 0);

    // fedgate's settings: a bad value is refused with what is accepted.
    let e = client
        .simple_query("SET fedgate.allow_partial = maybe")
        .await
        .unwrap_err();
    assert!(message_of(&e).contains("on or off"), "{e:?}");
    client
        .batch_execute("SET fedgate.purpose = 'census review'; SET fedgate.timeout = '20s'")
        .await
        .unwrap();
    assert_eq!(
        simple_column(&client, "SHOW fedgate.purpose").await,
        [Some("census review".into())]
    );

    // Errors carry the SQLSTATE of their kind.
    let big_constant_over_pg_proc = format!(
        "SELECT '{}' AS a FROM pg_catalog.pg_proc",
        "x".repeat(100_000)
    );
    for (sql, code) in [
        ("SELECT * FROM no_such_dataset", SqlState::UNDEFINED_TABLE),
        (
            "SELECT no_such_column FROM census",
            SqlState::UNDEFINED_COLUMN,
        ),
        ("SELEC 1", SqlState::SYNTAX_ERROR),
        (
            "SELECT c.relname FROM pg_catalog.pg_class c, census",
            SqlState::SYNTAX_ERROR_OR_ACCESS_RULE_VIOLATION,
        ),
        // A value of a size picked with a number, on the catalog path (no dataset)
        // and on the federation path.
        (
            "SELECT repeat('x', 100000000000)",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        (
            "SELECT repeat(county_name, 100000000000) FROM census",
            SqlState::PROGRAM_LIMIT_EXCEEDED,
        ),
        // A constant copied into every row of a catalog table.
        (&big_constant_over_pg_proc, SqlState::PROGRAM_LIMIT_EXCEEDED),
    ] {
        let e = client.simple_query(sql).await.unwrap_err();
        assert_eq!(code_of(&e), code, "{sql}: {e:?}");
    }
    let e = client.simple_query("DROP TABLE census").await.unwrap_err();
    assert!(message_of(&e).contains("only queries"), "{e:?}");
    // The session survives its errors.
    assert_eq!(simple_column(&client, "SELECT 2").await, [Some("2".into())]);

    // A portal fetched a few rows at a time (a client's fetch size): the same rows as
    // one fetch, in pieces.
    let mut client = client;
    let tx = client.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT county_code FROM census ORDER BY county_code")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut pieces = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 7).await.unwrap();
        if rows.is_empty() {
            break;
        }
        assert!(rows.len() <= 7);
        pieces.push(rows.len());
        if rows.len() < 7 {
            break;
        }
    }
    tx.commit().await.unwrap();
    let all = simple_column(&client, "SELECT count(*) FROM census").await;
    let total: usize = all[0].as_ref().unwrap().parse().unwrap();
    assert_eq!(pieces.iter().sum::<usize>(), total);
    assert!(pieces.len() > 1, "{pieces:?}");
}

#[tokio::test]
async fn connections_without_a_certificate_of_the_region_are_refused() {
    let region = Region::start_only(Some(&[])).await;
    let addr = region.gateways[OFFICE].postgres_addr.unwrap();

    // Without TLS: refused before the session starts, with SQLSTATE 28000 and the
    // settings to use.
    let e = tokio_postgres::connect(
        &format!("host=127.0.0.1 port={} user=analyst", addr.port()),
        tokio_postgres::NoTls,
    )
    .await
    .err()
    .expect("a plaintext connection is refused");
    assert_eq!(
        code_of(&e),
        SqlState::INVALID_AUTHORIZATION_SPECIFICATION,
        "{e:?}"
    );
    assert!(message_of(&e).contains("sslmode=verify-full"), "{e:?}");

    // TLS without a client certificate: the handshake itself fails.
    let material = fedgate::trust::tls::TlsMaterial::load(
        &region.layout.ca,
        &region.office().0,
        &region.office().1,
    )
    .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in material.chain().iter().skip(1) {
        let _ = roots.add(c.clone());
    }
    let ca_pem = std::fs::read(&region.layout.ca).unwrap();
    for c in rustls_pki_types::pem::PemObject::pem_slice_iter(&ca_pem) {
        roots.add(c.unwrap()).unwrap();
    }
    let anonymous = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let e = tokio_postgres::connect(
        &format!(
            "host=localhost port={} user=analyst sslmode=require",
            addr.port()
        ),
        tokio_postgres_rustls::MakeRustlsConnect::new(anonymous),
    )
    .await
    .err()
    .expect("a connection without a client certificate is refused");
    assert!(
        e.code().is_none(),
        "refused in the handshake, not by SQL: {e:?}"
    );
}

#[tokio::test]
async fn a_partial_answer_is_never_silent_and_a_refusal_has_its_sqlstate() {
    let region = Region::start_only(Some(&["shanghai", "hangzhou", "hefei", "anji"])).await;
    let (client, notices) = connect_as(&region, "office", OFFICE).await;
    let sql = "SELECT member, count(*) FROM census GROUP BY member ORDER BY member";

    // Suzhou's gateway is down: by default the answer fails, naming it, as a
    // connection failure.
    let e = client.simple_query(sql).await.unwrap_err();
    assert_eq!(code_of(&e), SqlState::CONNECTION_FAILURE, "{e:?}");
    assert!(message_of(&e).contains("suzhou"), "{e:?}");

    // Asked for, the partial answer comes with a WARNING naming what is missing.
    client
        .simple_query("SET fedgate.allow_partial = on")
        .await
        .unwrap();
    notices.lock().unwrap().clear();
    let members = simple_column(&client, sql).await;
    assert_eq!(members.len(), 4, "{members:?}");
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1, "{n:?}");
    assert_eq!(n[0].severity(), "WARNING");
    assert_eq!(n[0].code(), &SqlState::WARNING);
    assert!(
        n[0].message().starts_with("fedgate partial answer"),
        "{}",
        n[0].message()
    );
    assert!(
        n[0].message().contains("suzhou unavailable"),
        "{}",
        n[0].message()
    );

    // The same over the extended protocol (what JDBC and psycopg use).
    notices.lock().unwrap().clear();
    let rows = client.query(sql, &[]).await.unwrap();
    assert_eq!(rows.len(), 4);
    tokio::time::sleep(Duration::from_millis(50)).await;
    let n = notices.lock().unwrap().clone();
    assert_eq!(n.len(), 1, "{n:?}");
    assert!(
        n[0].message().contains("suzhou unavailable"),
        "{}",
        n[0].message()
    );

    // An owner's refusal: Anji, through its own gateway's PostgreSQL port, reads
    // enrollment without a purpose and is refused with 42501 and the purposes that
    // would do; with one stated in `fedgate.purpose`, it is answered (by the members
    // that are up).
    let (anji, _) = connect_as(&region, "anji", "anji").await;
    let sql = "SELECT count(*) AS n FROM enrollment";
    let e = anji.simple_query(sql).await.unwrap_err();
    assert_eq!(code_of(&e), SqlState::INSUFFICIENT_PRIVILEGE, "{e:?}");
    assert!(message_of(&e).contains("insurance-transfer"), "{e:?}");
    anji.batch_execute(
        "SET fedgate.purpose = 'insurance-transfer: AJ-2026-0117'; \
         SET fedgate.allow_partial = on",
    )
    .await
    .unwrap();
    let n = simple_column(&anji, sql).await;
    assert_eq!(n.len(), 1, "{n:?}");
}

#[tokio::test]
async fn a_cancel_request_cancels_the_federated_query() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|_| {}).await;
    proxies["suzhou"].set(Fault::Stall);
    let (client, _) = connect_as(&region, "office", OFFICE).await;
    client
        .simple_query("SET fedgate.timeout = '60s'")
        .await
        .unwrap();
    let token = client.cancel_token();
    let (cert, key) = region.office();
    let connector = tls(&region.layout.ca, &cert, &key);
    let started = std::time::Instant::now();
    let canceller = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        token.cancel_query(connector).await.unwrap();
    });
    let e = client
        .simple_query(crate::support::PER_MEMBER)
        .await
        .unwrap_err();
    canceller.await.unwrap();
    assert_eq!(code_of(&e), SqlState::QUERY_CANCELED, "{e:?}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    // The connection goes on.
    proxies["suzhou"].set(Fault::Pass);
    assert_eq!(simple_column(&client, "SELECT 3").await, [Some("3".into())]);
}

#[tokio::test]
async fn the_port_caps_its_connections_and_catalog_queries_get_a_time_budget() {
    let region = Region::start_patched(Some(&[]), &|layout| {
        crate::support::patch_member(layout, OFFICE, |raw| {
            raw.postgres
                .as_mut()
                .expect("a [postgres] section")
                .max_connections = Some(1);
        })
    })
    .await;
    let (first, _) = connect_as(&region, "office", OFFICE).await;
    assert_eq!(simple_column(&first, "SELECT 1").await, [Some("1".into())]);

    // A second connection while the first is open: refused with 53300, naming the cap.
    let (cert, key) = region.office();
    let addr = region.gateways[OFFICE].postgres_addr.unwrap();
    let conn = format!(
        "host=localhost port={} user=analyst sslmode=require",
        addr.port()
    );
    let e = tokio_postgres::connect(&conn, tls(&region.layout.ca, &cert, &key))
        .await
        .err()
        .expect("a connection beyond the cap is refused");
    assert_eq!(code_of(&e), SqlState::TOO_MANY_CONNECTIONS, "{e:?}");
    assert!(message_of(&e).contains("max_connections"), "{e:?}");

    // A catalog query (no dataset: answered at the gateway) that runs for most of a
    // second in a debug build
    // (millions of rows of catalog tables crossed) ends at its budget with 57014.
    first
        .simple_query("SET fedgate.timeout = '10ms'")
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let e = first
        .simple_query(
            "SELECT count(*) FROM pg_catalog.pg_proc a, pg_catalog.pg_proc b \
             WHERE a.oid + b.oid = 7",
        )
        .await
        .unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(code_of(&e), SqlState::QUERY_CANCELED, "{e:?}");
    assert!(message_of(&e).contains("deadline"), "{e:?}");
    // With room, the same query answers: the budget alone stopped it.
    first
        .simple_query("SET fedgate.timeout = '120s'")
        .await
        .unwrap();
    assert_eq!(
        simple_column(
            &first,
            "SELECT count(*) FROM pg_catalog.pg_proc a, pg_catalog.pg_proc b \
             WHERE a.oid + b.oid = 7"
        )
        .await,
        [Some("0".into())]
    );

    // Closing the first connection frees its slot.
    drop(first);
    let mut reconnected = None;
    for _ in 0..50 {
        if let Ok(c) = tokio_postgres::connect(&conn, tls(&region.layout.ca, &cert, &key)).await {
            reconnected = Some(c);
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        reconnected.is_some(),
        "the slot of a closed connection is freed"
    );
}
