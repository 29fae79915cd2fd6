//! What the planner pushes to members, read back through `Explain`, so pushdown
//! cannot silently regress.

use crate::support::Region;

async fn explain(region: &Region, sql: &str) -> fedgate::proto::v1::ExplainResponse {
    region.client("shanghai").explain(sql).await.unwrap()
}

#[tokio::test]
async fn member_sub_queries_carry_the_pushable_work() {
    let region = Region::start().await;

    // Partial aggregation: members group and sum; the coordinator combines.
    let e = explain(&region, "SELECT county_code, sum(pop_total), avg(share_65_plus_pct), count(*) FROM census WHERE pop_total > 100000 GROUP BY county_code").await;
    assert_eq!(e.subqueries.len(), 1);
    let s = &e.subqueries[0];
    assert_eq!(
        s.members,
        vec!["shanghai", "hangzhou", "suzhou", "hefei", "anji"]
    );
    for part in [
        "sum(census.pop_total)",
        "count(",
        "GROUP BY census.county_code",
        "WHERE (census.pop_total > 100000)",
    ] {
        assert!(s.sql.contains(part), "{part} missing in {}", s.sql);
    }
    assert!(e.plan.contains("AggregateExec"), "{}", e.plan);

    // Grouped by member: the whole aggregate, even one that cannot be split.
    let e = explain(
        &region,
        "SELECT member, median(pop_total) FROM census GROUP BY member",
    )
    .await;
    assert!(
        e.subqueries[0]
            .sql
            .contains("median(CAST(census.pop_total AS DOUBLE))"),
        "{}",
        e.subqueries[0].sql
    );
    assert!(!e.plan.contains("AggregateExec"), "{}", e.plan);

    // Not splittable and not grouped by member: rows come, the median is computed here.
    let e = explain(&region, "SELECT median(pop_total) FROM census").await;
    assert!(
        !e.subqueries[0].sql.contains("median"),
        "{}",
        e.subqueries[0].sql
    );
    assert!(
        !e.subqueries[0].sql.contains("GROUP BY"),
        "{}",
        e.subqueries[0].sql
    );

    // Top-k: each member sends its own top 3.
    let e = explain(
        &region,
        "SELECT county_name, pop_total FROM census ORDER BY pop_total DESC LIMIT 3",
    )
    .await;
    let sql = &e.subqueries[0].sql;
    assert!(
        sql.contains("ORDER BY census.pop_total DESC") && sql.ends_with("LIMIT 3"),
        "{sql}"
    );

    // A plain LIMIT without order is pushed as is.
    let e = explain(&region, "SELECT county_name FROM census LIMIT 2").await;
    assert!(
        e.subqueries[0].sql.ends_with("LIMIT 2"),
        "{}",
        e.subqueries[0].sql
    );

    // Pruning by member and by catalog.
    let e = explain(
        &region,
        "SELECT * FROM census WHERE member IN ('hangzhou', 'anji')",
    )
    .await;
    assert_eq!(e.subqueries[0].members, vec!["hangzhou", "anji"]);
    let e = explain(&region, "SELECT count(*) FROM fever_clinics").await;
    assert!(!e.subqueries[0].members.contains(&"hefei".to_string()));

    // Every dataset answered by one member alone: that member gets the whole query.
    let whole = "SELECT d.name, c.pop_total FROM census c JOIN divisions d ON c.county_code = d.code \
                 WHERE c.member = 'hangzhou' AND d.member = 'hangzhou' ORDER BY c.pop_total DESC LIMIT 3";
    let e = explain(&region, whole).await;
    assert_eq!(e.subqueries.len(), 1, "{:?}", e.subqueries);
    assert_eq!(e.subqueries[0].members, vec!["hangzhou"]);
    assert_eq!(e.subqueries[0].sql, whole);
    assert_eq!(e.subqueries[0].dataset, "census+divisions");
    let a = region
        .client("anji")
        .query(whole, false, None)
        .await
        .unwrap();
    assert_eq!(a.summary.rows, 3);
    let hz = a
        .summary
        .members
        .iter()
        .find(|m| m.member == "hangzhou")
        .unwrap();
    assert_eq!(hz.rows, 3, "only the final rows travel");

    // A join across datasets: one sub-query per dataset, the join at the coordinator.
    let e = explain(&region, "SELECT d.name, count(*) FROM fever_clinics f JOIN divisions d ON f.county_code = d.code GROUP BY d.name").await;
    let datasets: Vec<&str> = e.subqueries.iter().map(|s| s.dataset.as_str()).collect();
    assert!(
        datasets.contains(&"fever_clinics") && datasets.contains(&"divisions"),
        "{datasets:?}"
    );
    assert!(e.plan.contains("HashJoinExec"), "{}", e.plan);
}

#[tokio::test]
async fn an_aggregate_moves_one_row_per_group_not_every_row() {
    let region = Region::start().await;
    let a = region
        .client("hefei")
        .query("SELECT count(*), sum(pop_total) FROM census", false, None)
        .await
        .unwrap();
    assert!(
        a.summary.members.iter().all(|m| m.rows == 1),
        "{:?}",
        a.summary.members
    );
    let a = region
        .client("hefei")
        .query(
            "SELECT substr(county_code, 1, 4) AS city, sum(pop_total) FROM census GROUP BY 1",
            false,
            None,
        )
        .await
        .unwrap();
    // Every member's counties share one city prefix: one partial row each.
    assert!(
        a.summary.members.iter().all(|m| m.rows == 1),
        "{:?}",
        a.summary.members
    );
}

#[tokio::test]
async fn plans_are_reused_for_the_same_query_config_and_caller_only() {
    let region = Region::start().await;
    let office = region.client("suzhou");
    let sql = "SELECT member, sum(pop_total) FROM census GROUP BY member";
    let first = office.query(sql, false, None).await.unwrap();
    assert!(!first.summary.plan_cached);
    // Spacing and keyword case do not make a different query.
    let again = office
        .query(
            "select member,\n   sum(pop_total) from census  group by member",
            false,
            None,
        )
        .await
        .unwrap();
    assert!(again.summary.plan_cached);
    let rows = |a: &fedgate::tools::client::Answer| {
        let mut v: Vec<(String, String)> = crate::support::column_strings(&a.batches, "member")
            .into_iter()
            .zip(crate::support::column_strings(
                &a.batches,
                "sum(census.pop_total)",
            ))
            .collect();
        v.sort();
        v
    };
    assert_eq!(rows(&first), rows(&again));
    assert_eq!(rows(&first).len(), 5);
    // Another caller gets its own plan (plans are made per access scope).
    let as_hefei = region.client_as("hefei", "suzhou");
    let other = as_hefei.query(sql, false, None).await.unwrap();
    assert!(!other.summary.plan_cached);
    // A different query is planned anew.
    let different = office
        .query(
            "SELECT member, max(pop_total) FROM census GROUP BY member",
            false,
            None,
        )
        .await
        .unwrap();
    assert!(!different.summary.plan_cached);
}

/// A cached physical plan is copied with fresh execution state for every run: the
/// same query run many times at once (a hash join, a top-k and pruning included)
/// gives the same rows and its own per-member summary each time.
#[tokio::test]
async fn a_cached_plan_runs_concurrently_with_separate_state() {
    let region = Region::start().await;
    let office = region.client("hangzhou");
    let sql = "SELECT f.county_code, d.name, count(*) AS n FROM fever_clinics f \
               JOIN divisions d ON f.county_code = d.code WHERE f.member <> 'anji' \
               GROUP BY f.county_code, d.name ORDER BY n DESC, f.county_code LIMIT 5";
    let first = office.query(sql, false, None).await.unwrap();
    assert!(!first.summary.plan_cached);
    let want = crate::support::column_strings(&first.batches, "county_code");
    assert_eq!(want.len(), 5);
    let runs = futures::future::join_all((0..8).map(|_| {
        let office = office.clone();
        async move { office.query(sql, false, None).await.unwrap() }
    }))
    .await;
    let mut ids = std::collections::BTreeSet::new();
    for a in &runs {
        assert!(a.summary.plan_cached);
        assert_eq!(
            crate::support::column_strings(&a.batches, "county_code"),
            want
        );
        ids.insert(a.summary.query_id.clone());
        // Each run reports its own members, every one answered once (anji is pruned
        // from the clinic scan but asked for divisions).
        assert_eq!(a.summary.members.len(), 5, "{:?}", a.summary.members);
        assert!(
            a.summary
                .members
                .iter()
                .all(|m| m.state == fedgate::proto::v1::MemberState::Ok as i32),
            "{:?}",
            a.summary.members
        );
        assert_eq!(
            a.summary.members.iter().map(|m| m.rows).sum::<u64>(),
            first.summary.members.iter().map(|m| m.rows).sum::<u64>()
        );
    }
    assert_eq!(ids.len(), 8);
}
