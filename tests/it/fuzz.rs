//! Fuzzing on stable Rust: property-based harnesses (proptest) over the hostile
//! inputs a gateway takes: SQL at the coordinator and at the owner (parse, plan, the
//! owner's guard and run), `Peer` requests as bytes off the wire (decoding, the origin
//! assertion, the sub-query), configuration files, and HTTP request bodies. The
//! property is the same everywhere: an answer or a typed error, never a panic, and no
//! error that reports one.
//!
//! `FEDGATE_FUZZ_CASES` sets the cases per target (default 200, what CI runs);
//! `scripts/fuzz` runs 1,000,000 per target under a memory limit and reports.

use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use fedgate::config::MemberConfig;
use fedgate::coordinator::Coordinator;
use fedgate::owner::member::MemberEngine;
use fedgate::trust::identity::Principal;
use fedgate::trust::tls::TlsMaterial;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestCaseError, TestRunner};
use tower::ServiceExt;

use crate::support::Region;

fn cases() -> u32 {
    std::env::var("FEDGATE_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200)
}

/// Runs `cases()` cases of `strategy` through `test`, and reports the count and time
/// (`scripts/fuzz` reads the line).
fn fuzz<S: Strategy>(
    target: &str,
    strategy: S,
    test: impl Fn(S::Value) -> Result<(), TestCaseError>,
) where
    S::Value: std::fmt::Debug,
{
    let n = cases();
    let mut runner = TestRunner::new(Config {
        cases: n,
        failure_persistence: None,
        max_shrink_iters: 256,
        ..Config::default()
    });
    let started = Instant::now();
    if let Err(e) = runner.run(&strategy, test) {
        panic!("fuzz target {target}: {e}");
    }
    eprintln!(
        "fuzz target {target}: {n} cases, no failure, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

/// An error may say anything but that the gateway panicked.
fn no_panic_reported(what: &str, e: impl std::fmt::Display) -> Result<(), TestCaseError> {
    let text = e.to_string();
    prop_assert!(
        !text.to_lowercase().contains("panicked"),
        "{what}: an error reports a panic: {text}"
    );
    Ok(())
}

const TOKENS: &[&str] = &[
    "SELECT",
    "FROM",
    "WHERE",
    "GROUP BY",
    "ORDER BY",
    "HAVING",
    "LIMIT",
    "OFFSET",
    "JOIN",
    "LEFT JOIN",
    "ON",
    "UNION ALL",
    "WITH",
    "AS",
    "IN",
    "NOT",
    "AND",
    "OR",
    "IS NULL",
    "CASE",
    "WHEN",
    "THEN",
    "ELSE",
    "END",
    "DISTINCT",
    "OVER",
    "PARTITION BY",
    "census",
    "fever_clinics",
    "enrollment",
    "pipelines",
    "member",
    "county_code",
    "pop_total",
    "name",
    "id_number",
    "*",
    "(",
    ")",
    ",",
    "=",
    "<",
    ">",
    "+",
    "-",
    "/",
    "%",
    "||",
    "::",
    ";",
    "count(*)",
    "sum(",
    "avg(",
    "min(",
    "max(",
    "repeat(",
    "lpad(",
    "concat(",
    "generate_series(",
    "range(",
    "array_agg(",
    "string_agg(",
    "substr(",
    "length(",
    "CAST(",
    "AS BIGINT",
    "AS VARCHAR",
    "'x'",
    "''''",
    "'a%'",
    "LIKE",
    "ILIKE",
    "0",
    "1",
    "-1",
    "9223372036854775807",
    "1e308",
    "NULL",
    "true",
    "$1",
    "?",
    "/*",
    "*/",
    "--",
    "\"member\"",
    "t",
    "t.",
    "s",
    "VALUES",
    "EXISTS",
    "ANY",
    "ALL",
    "unnest(",
];

/// Expressions over `columns`: columns, literals, operators, functions (the
/// size-bounded ones among them), CASE, casts, aggregates and scalar subqueries.
fn expr(columns: &'static [&'static str]) -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        4 => prop::sample::select(columns).prop_map(str::to_string),
        1 => any::<i64>().prop_map(|n| n.to_string()),
        1 => (-1000i32..1000).prop_map(|n| n.to_string()),
        1 => "'[a-z0-9%_]{0,6}'",
        1 => Just("NULL".to_string()),
        1 => Just("1.5e3".to_string()),
        1 => Just("DATE '2020-02-29'".to_string()),
    ];
    leaf.prop_recursive(4, 24, 3, |inner| {
        let ops = &[
            "+", "-", "*", "/", "%", "||", "=", "<>", "<", ">=", "AND", "OR", "LIKE",
        ][..];
        let unary = &[
            "abs", "length", "upper", "lower", "count", "sum", "max", "min", "avg", "md5", "trim",
            "reverse",
        ][..];
        let binary = &[
            "coalesce", "nullif", "repeat", "lpad", "concat", "substr", "left", "power", "round",
        ][..];
        let types = &["BIGINT", "VARCHAR", "DOUBLE", "DATE", "BOOLEAN"][..];
        prop_oneof![
            (inner.clone(), prop::sample::select(ops), inner.clone())
                .prop_map(|(a, op, b)| format!("({a} {op} {b})")),
            (prop::sample::select(unary), inner.clone()).prop_map(|(f, a)| format!("{f}({a})")),
            (prop::sample::select(binary), inner.clone(), inner.clone())
                .prop_map(|(f, a, b)| format!("{f}({a}, {b})")),
            (inner.clone(), inner.clone(), inner.clone())
                .prop_map(|(a, b, c)| format!("CASE WHEN {a} THEN {b} ELSE {c} END")),
            (inner.clone(), prop::sample::select(types))
                .prop_map(|(a, t)| format!("CAST({a} AS {t})")),
            inner.clone().prop_map(|a| format!("{a} IS NULL")),
            prop::sample::select(TABLES).prop_map(|t| format!("(SELECT count(*) FROM {t})")),
            (inner.clone(), prop::sample::select(TABLES))
                .prop_map(|(a, t)| format!("{a} IN (SELECT county_code FROM {t})")),
        ]
    })
}

const TABLES: &[&str] = &[
    "census",
    "fever_clinics",
    "enrollment",
    "divisions",
    "underground_pipelines",
];

/// Each dataset with some of its columns (the implicit `member` included).
const COLUMNS: &[(&str, &[&str])] = &[
    (
        "census",
        &[
            "member",
            "county_code",
            "county_name",
            "pop_total",
            "pop_male",
            "share_65_plus_pct",
        ],
    ),
    (
        "fever_clinics",
        &[
            "member",
            "county_code",
            "hospital_name",
            "phone",
            "is_designated",
            "published_on",
        ],
    ),
    (
        "enrollment",
        &[
            "member",
            "county_code",
            "id_number",
            "name",
            "phone",
            "birth_year",
            "status",
        ],
    ),
    (
        "divisions",
        &["member", "code", "name", "level", "parent_code"],
    ),
    (
        "underground_pipelines",
        &[
            "member",
            "county_code",
            "road",
            "diameter_mm",
            "length_m",
            "in_service",
        ],
    ),
];

/// Queries built from the grammar over one dataset's columns: projections, filters,
/// grouping, ordering, limits, CTEs, unions and derived tables.
fn structured_sql() -> impl Strategy<Value = String> {
    prop::sample::select(COLUMNS).prop_flat_map(|(table, columns)| {
        let grouped =
            prop::collection::vec(prop::sample::select(columns).prop_map(str::to_string), 1..3);
        (
            prop::collection::vec(expr(columns), 1..4),
            prop::option::of(expr(columns)),
            prop::option::of(grouped),
            prop::option::of(expr(columns)),
            prop::option::of(0u64..1_000_000),
            0u8..4,
        )
            .prop_map(move |(items, filter, group, order, limit, shape)| {
                let mut q = format!("SELECT {} FROM {table}", items.join(", "));
                if let Some(f) = filter {
                    q.push_str(&format!(" WHERE {f}"));
                }
                if let Some(g) = group {
                    q.push_str(&format!(" GROUP BY {}", g.join(", ")));
                }
                if let Some(o) = order {
                    q.push_str(&format!(" ORDER BY {o} DESC"));
                }
                if let Some(l) = limit {
                    q.push_str(&format!(" LIMIT {l}"));
                }
                match shape {
                    0 => format!("WITH t AS ({q}) SELECT * FROM t"),
                    1 => format!("{q} UNION ALL {q}"),
                    2 => format!("SELECT count(*) FROM ({q}) AS s"),
                    _ => q,
                }
            })
    })
}

/// SQL-shaped text: queries from the grammar, known tokens in any order, known
/// queries with characters inserted, removed or replaced, and arbitrary text.
fn sql() -> impl Strategy<Value = String> {
    let tokens =
        prop::collection::vec(prop::sample::select(TOKENS), 1..40).prop_map(|t| t.join(" "));
    let base = prop::sample::select(
        &[
            "SELECT member, count(*) FROM census GROUP BY member",
            "SELECT county_code, pop_total FROM census WHERE pop_total > 100000 ORDER BY 2 DESC LIMIT 5",
            "SELECT name FROM fever_clinics WHERE county_code = '330102'",
            "WITH t AS (SELECT * FROM census) SELECT count(*) FROM t",
            "SELECT a.member, count(*) FROM census a JOIN fever_clinics b ON a.county_code = b.county_code GROUP BY 1",
        ][..],
    );
    let mutated = (
        base,
        prop::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<char>()), 1..6),
    )
        .prop_map(|(q, edits)| {
            let mut chars: Vec<char> = q.chars().collect();
            for (at, how, c) in edits {
                if !edit(&mut chars, at, how, c) {
                    chars.push(c);
                }
            }
            chars.into_iter().collect()
        });
    prop_oneof![6 => structured_sql(), 2 => tokens, 2 => mutated, 1 => any::<String>()]
}

/// One edit of `chars` at `at`: 0 inserts `c`, 1 removes a character, 2 replaces one
/// with `c`. False when the edit does not apply (another kind, or past the end), for
/// the caller's own.
fn edit(chars: &mut Vec<char>, at: prop::sample::Index, how: u8, c: char) -> bool {
    let i = at.index(chars.len() + 1);
    match how {
        0 => chars.insert(i, c),
        1 if i < chars.len() => {
            chars.remove(i);
        }
        2 if i < chars.len() => chars[i] = c,
        _ => return false,
    }
    true
}

/// A runtime for the async calls of one target.
fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Hangzhou's engine and a coordinator over the sample region, built once.
fn engines(
    rt: &tokio::runtime::Runtime,
    dir: &std::path::Path,
) -> (
    Arc<MemberConfig>,
    Arc<MemberEngine>,
    Coordinator,
    TlsMaterial,
) {
    let layout =
        fedgate::tools::demo::materialize(&fedgate::tools::demo::default_source(), dir, &|_, p| p)
            .unwrap();
    let path = layout.dir.join("hangzhou.toml");
    let config = Arc::new(MemberConfig::load(&path).unwrap_or_else(|p| panic!("{p}")));
    let tls =
        TlsMaterial::load(&config.region.ca_path, &config.cert_path, &config.key_path).unwrap();
    let engine = Arc::new(rt.block_on(MemberEngine::build(config.clone())).unwrap());
    let audit = Arc::new(fedgate::ops::audit::AuditLog::open(&dir.join("fuzz-audit.log")).unwrap());
    // Its member clients' channels need a runtime to exist in.
    let _inside = rt.enter();
    let coordinator = Coordinator::new(
        config.clone(),
        Some(engine.clone()),
        &tls,
        audit,
        Arc::new(fedgate::owner::incidents::Register::in_memory()),
    )
    .unwrap();
    (config, engine, coordinator, tls)
}

/// The owner's whole path for one sub-query: parse, find the datasets, authorize
/// for the county (the weakest grants of the sample region), rewrite and run.
async fn owner_path(
    engine: &MemberEngine,
    via: &Principal,
    origin: &Principal,
    sql: &str,
) -> Result<(), TestCaseError> {
    let prepared = match engine.prepare(sql).await {
        Ok(p) => p,
        Err(e) => return no_panic_reported(sql, e),
    };
    let permit = match engine.authorize(via, origin, None, None, &prepared) {
        Ok(p) => p,
        Err(e) => return no_panic_reported(sql, e),
    };
    match engine.execute(&permit, prepared).await {
        Ok(executed) => {
            use futures::StreamExt;
            let mut stream = executed.stream;
            let mut rows = 0usize;
            while let Some(batch) = stream.next().await {
                match batch {
                    Ok(b) => rows += b.num_rows(),
                    Err(e) => return no_panic_reported(sql, e),
                }
                if rows > 1_000_000 {
                    break;
                }
            }
            Ok(())
        }
        Err(e) => no_panic_reported(sql, e),
    }
}

#[test]
fn fuzz_sql_at_the_coordinator_and_the_owner() {
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (config, engine, coordinator, _) = engines(&rt, dir.path());
    let office = Principal::parse("fedgate://yrd/office/coordination").unwrap();
    let county = Principal::parse("fedgate://yrd/county/anji").unwrap();
    let via = config
        .region
        .member("coordination")
        .unwrap()
        .principal
        .clone();
    let planned = std::sync::atomic::AtomicU64::new(0);
    fuzz("sql", sql(), |sql| {
        rt.block_on(async {
            match coordinator.schema_of(office.clone(), &sql, None).await {
                Ok(_) => {
                    planned.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
                Err(e) => no_panic_reported(&sql, e)?,
            }
            owner_path(&engine, &via, &county, &sql).await
        })
    });
    // The inputs reach the planner, not only the parser.
    let planned = planned.into_inner();
    eprintln!(
        "fuzz target sql: {planned} of {} planned at the coordinator",
        cases()
    );
    assert!(planned > 0);
}

#[test]
fn fuzz_peer_requests_off_the_wire() {
    use prost::Message;
    let rt = runtime();
    let dir = tempfile::tempdir().unwrap();
    let (config, engine, _, tls) = engines(&rt, dir.path());
    // Real requests, encoded, then cut and flipped; and arbitrary bytes.
    let real = fedgate::proto::v1::ExecuteRequest {
        incident: Vec::new(),
        receipt: false,
        sql: "SELECT member, count(*) FROM census GROUP BY member".into(),
        origin: "fedgate://yrd/county/anji".into(),
        path: vec!["fedgate://yrd/office/coordination".into()],
        hops: 1,
        budget_ms: 5_000,
        query_id: "q-1".into(),
        purpose: "planning".into(),
        origin_assertion: vec![1, 2, 3],
    }
    .encode_to_vec();
    let bytes = prop_oneof![
        prop::collection::vec(any::<u8>(), 0..512),
        (
            prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..8),
            any::<prop::sample::Index>()
        )
            .prop_map(move |(flips, cut)| {
                let mut b = real.clone();
                for (at, v) in flips {
                    let i = at.index(b.len());
                    b[i] = v;
                }
                b.truncate(cut.index(b.len() + 1));
                b
            }),
    ];
    let via = config
        .region
        .member("coordination")
        .unwrap()
        .principal
        .clone();
    let has_gateway = |p: &Principal| {
        config
            .region
            .member_by_principal(p)
            .is_some_and(|m| m.endpoint.is_some())
    };
    fuzz("peer", bytes, |b| {
        let Ok(req) = fedgate::proto::v1::ExecuteRequest::decode(b.as_slice()) else {
            return Ok(());
        };
        if let Err(e) = fedgate::trust::assertion::verify(
            &tls,
            &has_gateway,
            &req.origin_assertion,
            std::time::SystemTime::now(),
        ) {
            no_panic_reported("assertion", e)?;
        }
        let Ok(origin) = Principal::parse(&req.origin) else {
            return Ok(());
        };
        rt.block_on(owner_path(&engine, &via, &origin, &req.sql))
    });
}

#[test]
fn fuzz_configuration_files() {
    let dir = tempfile::tempdir().unwrap();
    let layout = fedgate::tools::demo::materialize(
        &fedgate::tools::demo::default_source(),
        dir.path(),
        &|_, p| p,
    )
    .unwrap();
    let member = std::fs::read_to_string(layout.dir.join("hangzhou.toml")).unwrap();
    let region = std::fs::read_to_string(&layout.region).unwrap();
    let edits = prop::collection::vec(
        (
            any::<prop::sample::Index>(),
            0u8..4,
            prop::sample::select(
                &[
                    '"', '[', ']', '=', '\n', '#', '.', ',', '{', '}', 'x', '0', '\\', '\u{3000}',
                ][..],
            ),
        ),
        1..8,
    );
    let case = (any::<bool>(), edits);
    let scratch = tempfile::tempdir().unwrap();
    // The mutated files sit beside the real certificates and data, so validation goes
    // as far as it can.
    for entry in std::fs::read_dir(&layout.dir).unwrap() {
        let entry = entry.unwrap();
        let to = scratch.path().join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::os::unix::fs::symlink(entry.path(), &to).unwrap();
        } else {
            std::fs::copy(entry.path(), &to).unwrap();
        }
    }
    fuzz("config", case, |(edit_region, edits)| {
        let mut chars: Vec<char> = if edit_region { &region } else { &member }
            .chars()
            .collect();
        for (at, how, c) in edits {
            if !edit(&mut chars, at, how, c) {
                // Duplicate a line: repeated keys and tables.
                let text: String = chars.iter().collect();
                let line = text
                    .lines()
                    .nth(at.index(text.lines().count().max(1)))
                    .unwrap_or("")
                    .to_string();
                chars.extend(format!("\n{line}\n").chars());
            }
        }
        let text: String = chars.into_iter().collect();
        let (m, r) = if edit_region {
            (member.clone(), text)
        } else {
            (text, region.clone())
        };
        std::fs::write(scratch.path().join("hangzhou.toml"), m).unwrap();
        std::fs::write(scratch.path().join("region.toml"), r).unwrap();
        if let Err(p) = MemberConfig::load(&scratch.path().join("hangzhou.toml")) {
            prop_assert!(!p.0.is_empty(), "refused without a problem");
            no_panic_reported("config", p)?;
        }
        Ok(())
    });
}

#[test]
fn fuzz_http_request_bodies() {
    let rt = runtime();
    let region = rt.block_on(Region::start_only(Some(&["hangzhou"])));
    let routes = region.gateways["hangzhou"].http_routes();
    let caller =
        fedgate::frontend::http::Caller(Principal::parse("fedgate://yrd/county/anji").unwrap());
    let body = prop_oneof![
        // A valid query among the hostile ones, so that every run also goes the whole
        // way to an answer (and the check below that some did cannot fail by chance).
        // Only Hangzhou's gateway runs, so the others are missing: partial allowed.
        Just(
            r#"{"sql":"SELECT member, count(*) AS n FROM census GROUP BY member","allow_partial":true}"#
                .to_string()
        ),
        any::<String>(),
        sql().prop_map(|s| serde_json::json!({ "sql": s }).to_string()),
        (sql(), any::<bool>(), any::<Option<u64>>(), any::<Option<String>>()).prop_map(
            |(s, p, t, purpose)| serde_json::json!({ "sql": s, "allow_partial": p, "timeout_ms": t, "purpose": purpose }).to_string()
        ),
        prop::collection::btree_map("[a-z_]{1,12}", any::<i64>(), 0..4)
            .prop_map(|m| serde_json::to_string(&m).unwrap()),
        "[\\[\\]{}\":,0-9a-z ]{0,64}",
    ];
    let path = prop::sample::select(
        &[
            "/v1/query",
            "/v1/services/fever_clinics_near",
            "/v1/services/nonexistent",
            "/v1/query?allow_partial=true",
            "/v1/services/fever_clinics_near?timeout_ms=x",
        ][..],
    );
    let statuses = std::sync::Mutex::new(std::collections::BTreeMap::<u16, u64>::new());
    fuzz("http", (path, body), |(path, body)| {
        rt.block_on(async {
            let req = http::Request::builder()
                .method("POST")
                .uri(path)
                .header("content-type", "application/json")
                .extension(caller.clone())
                .body(Body::from(body.clone()))
                .unwrap();
            let resp = routes.clone().oneshot(req).await.unwrap();
            let status = resp.status();
            *statuses.lock().unwrap().entry(status.as_u16()).or_default() += 1;
            let bytes = axum::body::to_bytes(resp.into_body(), 64 << 20)
                .await
                .unwrap();
            prop_assert!(
                status.as_u16() < 500 || status.as_u16() == 503 || status.as_u16() == 504,
                "{path} {body:?}: {status} {}",
                String::from_utf8_lossy(&bytes)
            );
            no_panic_reported(&body, String::from_utf8_lossy(&bytes))?;
            Ok(())
        })
    });
    // The bodies reach the query path, not only the JSON decoder: some queries are
    // answered.
    let statuses = statuses.into_inner().unwrap();
    eprintln!("fuzz target http: statuses {statuses:?}");
    assert!(
        statuses.contains_key(&200) && statuses.contains_key(&400),
        "{statuses:?}"
    );
}
