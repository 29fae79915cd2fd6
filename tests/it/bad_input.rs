//! Bad queries and bad configs: each a clear error naming the problem, and the
//! gateway keeps serving.

use crate::support::{Region, read_csv};

#[tokio::test]
async fn bad_queries_are_refused_by_name_and_the_gateway_keeps_serving() {
    let region = Region::start().await;
    let client = region.client("suzhou");
    let cases = [
        ("SELEC * FROM census", "SELEC"),
        (
            "SELECT * FROM hospitals",
            "unknown dataset hospitals; the region's canonical datasets are: divisions, census, fever_clinics, enrollment",
        ),
        ("SELECT no_such_column FROM census", "no_such_column"),
        ("CREATE TABLE t AS SELECT 1", "not supported"),
        ("SELECT 1; SELECT 2", "single SQL statement"),
    ];
    for (sql, needle) in cases {
        let f = client.query(sql, false, None).await.unwrap_err();
        assert_eq!(f.status.code(), tonic::Code::InvalidArgument, "{sql}: {f}");
        assert!(f.status.message().contains(needle), "{sql}: {f}");
    }
    let a = client
        .query("SELECT count(*) AS n FROM divisions", false, None)
        .await
        .unwrap();
    assert_eq!(a.summary.members.len(), 5);
}

#[tokio::test]
async fn config_with_unknown_keys_or_missing_files_is_reported_with_file_and_key() {
    let region = Region::start_only(Some(&[])).await;
    let path = region.layout.dir.join("anji.toml");
    let text = std::fs::read_to_string(&path).unwrap();

    std::fs::write(&path, format!("colour = \"green\"\n{text}")).unwrap();
    let r = fedgate::tools::check::check(&path).await;
    let all: Vec<String> = r.errors.iter().map(|p| p.to_string()).collect();
    assert!(
        all.iter()
            .any(|e| e.contains("anji.toml") && e.contains("unknown field `colour`")),
        "{all:?}"
    );

    std::fs::write(
        &path,
        text.replace("data/anji/census_2020.csv", "data/anji/missing.csv"),
    )
    .unwrap();
    let r = fedgate::tools::check::check(&path).await;
    let all: Vec<String> = r.errors.iter().map(|p| p.to_string()).collect();
    assert!(
        all.iter()
            .any(|e| e.contains("sources[1].path") && e.contains("missing.csv does not exist")),
        "{all:?}"
    );

    std::fs::write(
        &path,
        text.replace("pop_total = \"rk\"", "pop_total = \"no_such_column\""),
    )
    .unwrap();
    let r = fedgate::tools::check::check(&path).await;
    let all: Vec<String> = r.errors.iter().map(|p| p.to_string()).collect();
    assert!(all.iter().any(|e| e.contains("no_such_column")), "{all:?}");
}

#[tokio::test]
async fn values_a_code_table_cannot_map_are_counted_by_check() {
    let region = Region::start_with_database(Some(&[]), &|_| {}).await;
    let path = region.layout.dir.join("hangzhou.toml");
    // Without its aliases, Hangzhou's abolished district names no longer map.
    let mut cfg: fedgate::config::raw::RawMemberConfig =
        toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for t in &mut cfg.code_tables {
        t.aliases.clear();
    }
    std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    let r = fedgate::tools::check::check(&path).await;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let (h, rows) = read_csv(&region.data().join("hangzhou/fever_clinics.csv"));
    let i = h.iter().position(|c| c == "district").unwrap();
    let count = |name: &str| rows.iter().filter(|r| r[i] == name).count();
    let w: Vec<String> = r.warnings.iter().map(|p| p.to_string()).collect();
    let field = w
        .iter()
        .find(|x| x.contains("fields.county_code"))
        .unwrap_or_else(|| panic!("{w:?}"));
    for name in ["下城区", "江干区", "钱塘新区"] {
        assert!(
            field.contains(&format!("\"{name}\" ({})", count(name))),
            "{field}"
        );
    }
    assert!(
        field.contains(&format!(
            "{} rows",
            count("下城区") + count("江干区") + count("钱塘新区")
        )),
        "{field}"
    );
}

/// Deeply nested or chained expressions are refused by name before anything plans
/// them (planning walks expression trees recursively), and a query just within the
/// limit is answered: no input stops the gateway.
#[tokio::test]
async fn deep_expressions_are_refused_and_the_gateway_keeps_serving() {
    let region = Region::start_only(Some(&["suzhou"])).await;
    let client = region.client("suzhou");
    let chain = |n: usize| vec!["pop_total"; n].join(" + ");
    for sql in [
        format!("SELECT {} AS x FROM census", chain(1_000)),
        format!("SELECT {} AS x FROM census", chain(50_000)),
        format!("SELECT {}1{} AS x", "(".repeat(5_000), ")".repeat(5_000)),
        format!(
            "SELECT count(*) FROM census WHERE {}",
            vec!["pop_total > 1"; 2_000].join(" AND ")
        ),
    ] {
        let f = client.query(&sql, false, None).await.unwrap_err();
        assert_eq!(f.status.code(), tonic::Code::InvalidArgument, "{f}");
        assert!(f.status.message().contains("nest"), "{f}");
    }
    let big = format!(
        "SELECT '{}' AS x",
        "a".repeat(fedgate::owner::session::MAX_QUERY_BYTES)
    );
    let f = client.query(&big, false, None).await.unwrap_err();
    assert!(f.status.message().contains("bytes long"), "{f}");
    // Within the limit: planned, pushed to the members and answered.
    let a = client
        .query(
            &format!(
                "SELECT sum({}) AS x FROM census WHERE member = 'suzhou'",
                chain(100)
            ),
            false,
            None,
        )
        .await
        .unwrap();
    assert_eq!(a.batches.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
}

/// A sub-query sent whole to a member runs there in a memory pool of its own: one
/// that needs more than the member's `limits.query_memory_bytes` fails at that member
/// with the limit named, while the coordinator (with the default, far larger limit)
/// and the member keep serving.
#[tokio::test]
async fn a_sub_query_over_the_members_memory_limit_fails_there_with_the_limit_named() {
    let region = Region::start_patched(None, &|l| {
        crate::support::patch_member(l, "hangzhou", |m| {
            m.limits.query_memory_bytes = Some(4 * 1024 * 1024);
        })
    })
    .await;
    // Hangzhou's own identity (rows of its people) through Shanghai's gateway, which
    // sends the whole self-join to Hangzhou: 2,400 people paired by sex and sorted.
    let client = region.client_as("hangzhou", "shanghai");
    let big = "SELECT a.name, b.name AS other FROM enrollment a JOIN enrollment b \
               ON a.sex = b.sex WHERE a.member = 'hangzhou' AND b.member = 'hangzhou' \
               ORDER BY a.name, other";
    let f = client.query(big, false, None).await.unwrap_err();
    let summary = f.summary.expect("a summary names the member");
    let m = crate::support::member_status(&summary, "hangzhou");
    assert!(
        m.reason.contains("limits.query_memory_bytes"),
        "hangzhou's refusal names its limit: {m:?}"
    );
    // Both keep serving.
    let small = "SELECT count(*) AS n FROM enrollment WHERE member = 'hangzhou'";
    let a = client.query(small, false, None).await.unwrap();
    assert_eq!(a.summary.rows, 1);
}

/// A function asked to make a value of a size the caller picks with a number
/// (`repeat('x', 100000000000)`: 40 bytes of SQL, 100 GB of memory) is refused before
/// it runs: while the coordinator folds constants, and at the member that evaluates
/// it over rows. The gateways keep serving.
#[tokio::test]
async fn functions_asked_for_huge_values_are_refused_and_the_gateways_keep_serving() {
    let region = Region::start_only(Some(&["shanghai", "suzhou"])).await;
    let client = region.client("shanghai");
    for sql in [
        "SELECT repeat('x', 100000000000) AS x",
        "SELECT length(lpad('x', 2000000000)) AS n",
        "SELECT cardinality(range(1, 100000000000)) AS n",
        "SELECT length(repeat(county_name, 1000000000)) AS n FROM census WHERE member = 'suzhou'",
    ] {
        let f = client.query(sql, false, None).await.unwrap_err();
        let reasons = f
            .summary
            .as_ref()
            .map(|s| format!("{:?}", s.members))
            .unwrap_or_default();
        assert!(
            f.status.message().contains("one call may make")
                || reasons.contains("one call may make"),
            "{sql}: {f} {reasons}"
        );
    }
    let a = client
        .query(
            "SELECT length(repeat(county_name, 3)) AS n FROM census WHERE member = 'suzhou'",
            false,
            None,
        )
        .await
        .unwrap();
    assert!(a.summary.rows > 0);
}

/// The allocator is chosen by the environment before anything else runs: a value that
/// names none stops the binary with the value named, and the two there are both run.
#[test]
fn an_allocator_the_binary_does_not_have_is_refused_by_name() {
    let run = |value: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fedgate"))
            .arg("--version")
            .env("FEDGATE_ALLOCATOR", value)
            .output()
            .unwrap()
    };
    let bad = run("mimaloc");
    assert_eq!(bad.status.code(), Some(2));
    let said = String::from_utf8_lossy(&bad.stderr);
    assert!(
        said.contains("FEDGATE_ALLOCATOR=\"mimaloc\"") && said.contains("\"mimalloc\""),
        "{said}"
    );
    for good in ["mimalloc", "system"] {
        let out = run(good);
        assert!(out.status.success(), "{good}: {out:?}");
        assert!(String::from_utf8_lossy(&out.stdout).contains("fedgate"));
    }
}

/// The runtime's worker thread count comes from the environment too: a value that is
/// not a count stops the binary with the value named (not a panic), and a count runs.
#[test]
fn a_worker_thread_count_that_is_not_one_is_refused_by_name() {
    let run = |value: &str| {
        std::process::Command::new(env!("CARGO_BIN_EXE_fedgate"))
            .arg("--version")
            .env("TOKIO_WORKER_THREADS", value)
            .output()
            .unwrap()
    };
    for bad in ["abc", "0", "-1"] {
        let out = run(bad);
        assert_eq!(out.status.code(), Some(2), "{bad}: {out:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains(&format!("TOKIO_WORKER_THREADS=\"{bad}\"")) && !said.contains("panicked"),
            "{said}"
        );
    }
    let out = run("1");
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains("fedgate"));
}
