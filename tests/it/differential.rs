//! Differential tests: the region's answers against one independent DataFusion
//! session holding every member's canonical rows in a single table per dataset.
//!
//! The reference session knows nothing of members, pushdown or the network; if the
//! planner splits a query wrongly (a partial aggregate combined wrongly, a top-k cut
//! too early, a member pruned that should not be), the answers differ.

use std::collections::BTreeMap;
use std::sync::Arc;

use datafusion::arrow::record_batch::RecordBatch;
use datafusion::arrow::util::display::array_value_to_string;
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;
use fedgate::config::MemberConfig;
use fedgate::owner::member::MemberEngine;

use crate::support::Region;

/// Starts the sample region with Anji's census mapped to no rows (a member with zero
/// rows), and builds the reference session from every member's canonical rows.
async fn setup() -> (Region, SessionContext) {
    let region = Region::start_with_database(None, &|m| {
        let path = m.dir.join("anji.toml");
        let mut cfg: fedgate::config::raw::RawMemberConfig =
            toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let census = cfg
            .mappings
            .iter_mut()
            .find(|x| x.dataset == "census")
            .unwrap();
        census.filter = Some("1 = 0".into());
        std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
    })
    .await;
    let reference = SessionContext::new();
    let mut tables: BTreeMap<String, Vec<RecordBatch>> = BTreeMap::new();
    let mut schemas = BTreeMap::new();
    // The region's members (not the engines they read, such as Suzhou's data lake).
    for (_, path, _) in region
        .layout
        .gateways
        .iter()
        .filter(|(n, _, _)| !n.contains('/'))
    {
        let cfg = Arc::new(MemberConfig::load(path).unwrap());
        let engine = MemberEngine::build(cfg.clone()).await.unwrap();
        for ds in engine.datasets() {
            let prepared = engine
                .prepare(&format!("SELECT * FROM {}", ds.name))
                .await
                .unwrap();
            let permit = engine.owner_permit(&prepared);
            let stream = engine.execute(&permit, prepared).await.unwrap().stream;
            let batches: Vec<RecordBatch> =
                futures::TryStreamExt::try_collect(stream).await.unwrap();
            schemas.insert(ds.name.clone(), ds.schema.clone());
            tables.entry(ds.name.clone()).or_default().extend(batches);
        }
    }
    for (name, batches) in tables {
        let schema = schemas[&name].clone();
        let batches: Vec<RecordBatch> = batches
            .into_iter()
            .map(|b| RecordBatch::try_new(schema.clone(), b.columns().to_vec()).unwrap())
            .collect();
        reference
            .register_table(
                name.as_str(),
                Arc::new(MemTable::try_new(schema, vec![batches]).unwrap()),
            )
            .unwrap();
    }
    (region, reference)
}

/// Rows as text; floating point values rounded to 6 decimals, since summing in another
/// order changes the last bits.
fn rows(batches: &[RecordBatch]) -> Vec<Vec<String>> {
    let mut out = Vec::new();
    for b in batches {
        for r in 0..b.num_rows() {
            let row = b
                .columns()
                .iter()
                .map(|c| {
                    let v = array_value_to_string(c, r).unwrap();
                    match c.data_type() {
                        datafusion::arrow::datatypes::DataType::Float64
                        | datafusion::arrow::datatypes::DataType::Float32 => {
                            v.parse::<f64>().map(|f| format!("{f:.6}")).unwrap_or(v)
                        }
                        _ => v,
                    }
                })
                .collect();
            out.push(row);
        }
    }
    out
}

/// The hand-written part of the corpus: joins, NULLs, DISTINCT, subqueries, empty
/// answers, every aggregate shape.
const HAND_WRITTEN: &[&str] = &[
    "SELECT * FROM census",
    "SELECT * FROM divisions",
    "SELECT * FROM fever_clinics",
    "SELECT count(*) FROM census",
    "SELECT count(*) FROM fever_clinics WHERE member = 'nowhere'",
    "SELECT sum(pop_total), min(pop_total), max(pop_total), avg(pop_total) FROM census WHERE member = 'nowhere'",
    "SELECT member, count(*) FROM census GROUP BY member",
    "SELECT member, count(*), sum(pop_total), avg(share_65_plus_pct), median(pop_total) FROM census GROUP BY member",
    "SELECT count(DISTINCT member), count(DISTINCT county_published) FROM fever_clinics",
    "SELECT county_code, count(DISTINCT hospital_name) FROM fever_clinics GROUP BY county_code",
    "SELECT median(pop_total), stddev(share_65_plus_pct) FROM census",
    "SELECT count(county_code), count(*) FROM fever_clinics",
    "SELECT count(address), count(phone), count(is_designated) FROM fever_clinics",
    "SELECT is_designated, count(*) FROM fever_clinics GROUP BY is_designated",
    "SELECT * FROM fever_clinics WHERE county_code IS NULL",
    "SELECT * FROM fever_clinics WHERE address IS NULL AND member <> 'shanghai'",
    "SELECT DISTINCT member FROM fever_clinics",
    "SELECT DISTINCT county_code, member FROM fever_clinics",
    "SELECT DISTINCT level FROM divisions",
    "SELECT level, count(*) FROM divisions GROUP BY level HAVING count(*) > 3",
    "SELECT f.county_code, d.name, count(*) AS n FROM fever_clinics f JOIN divisions d ON f.county_code = d.code GROUP BY f.county_code, d.name",
    "SELECT d.member, count(*) FROM divisions d LEFT JOIN fever_clinics f ON f.county_code = d.code GROUP BY d.member",
    "SELECT c.county_code, c.pop_total, d.name FROM census c JOIN divisions d ON c.county_code = d.code WHERE c.pop_total > 1000000",
    "SELECT d.name, c.share_65_plus_pct FROM census c RIGHT JOIN divisions d ON c.county_code = d.code WHERE d.level = 'county'",
    "SELECT c.member, sum(c.pop_total) FROM census c JOIN divisions d ON c.county_code = d.code AND c.member = d.member GROUP BY c.member",
    "SELECT county_name FROM census WHERE county_code IN (SELECT county_code FROM fever_clinics)",
    "SELECT county_name FROM census c WHERE EXISTS (SELECT 1 FROM fever_clinics f WHERE f.county_code = c.county_code AND f.is_designated)",
    "SELECT county_name, pop_total FROM census WHERE pop_total > (SELECT avg(pop_total) FROM census)",
    "SELECT member, county_name, pop_total, rank() OVER (PARTITION BY member ORDER BY pop_total DESC) AS r FROM census",
    "SELECT code FROM divisions WHERE member = 'hefei' UNION SELECT county_code FROM census WHERE member = 'hefei'",
    "SELECT code FROM divisions EXCEPT SELECT county_code FROM census",
    "SELECT substr(county_code, 1, 4) AS city, sum(pop_total) FROM census GROUP BY substr(county_code, 1, 4)",
    "SELECT member, min(published_on), max(published_on) FROM fever_clinics GROUP BY member",
    "SELECT published_on, count(*) FROM fever_clinics GROUP BY published_on",
    "SELECT count(*) FILTER (WHERE is_designated), count(*) FROM fever_clinics",
    "SELECT member, sum(pop_total) FILTER (WHERE share_65_plus_pct > 15) FROM census GROUP BY member",
    "SELECT avg(pop_rural) FILTER (WHERE pop_rural > 0), count(pop_rural) FROM census",
    // SUM, AVG and COUNT of one column: the members' partials must not clash by name.
    "SELECT county_code, sum(pop_total), avg(pop_total), count(pop_total) FROM census GROUP BY county_code",
    "SELECT sum(share_65_plus_pct), avg(share_65_plus_pct), count(share_65_plus_pct), count(*) FROM census",
    "SELECT sum(DISTINCT family_households), avg(DISTINCT avg_years_schooling) FROM census",
    "SELECT member, array_length(array_agg(county_code)) FROM census GROUP BY member",
    "SELECT max(county_name), min(county_name) FROM census WHERE member IN ('hangzhou', 'suzhou')",
    "SELECT county_name FROM census WHERE county_name LIKE '%县' AND member = 'hangzhou'",
    "SELECT upper(member), length(county_name) FROM census WHERE pop_rural = 0",
    "SELECT CASE WHEN pop_total > 1000000 THEN 'big' ELSE 'small' END AS size, count(*) FROM census GROUP BY 1",
    "SELECT member, pop_total / NULLIF(family_households, 0) AS per_household FROM census",
    "SELECT county_code FROM census ORDER BY pop_total DESC, county_code LIMIT 5",
    "SELECT member, county_code, pop_total FROM census ORDER BY member, pop_total LIMIT 7",
    "SELECT hospital_name FROM fever_clinics ORDER BY published_on DESC, hospital_name LIMIT 4",
    "SELECT county_code, pop_total FROM census WHERE member <> 'shanghai' ORDER BY pop_total LIMIT 3",
    "SELECT * FROM census LIMIT 0",
    "SELECT member, count(*) AS n FROM fever_clinics GROUP BY member ORDER BY n DESC, member LIMIT 2",
    "SELECT county_code, sum(pop_total) AS p FROM census GROUP BY county_code ORDER BY p DESC, county_code LIMIT 3",
    "WITH big AS (SELECT * FROM census WHERE pop_total > 800000) SELECT member, count(*) FROM big GROUP BY member",
    "SELECT member, count(*) FROM (SELECT * FROM census WHERE share_65_plus_pct > 14) t GROUP BY member",
];

/// A deterministic generator of aggregate queries: group keys x aggregates x
/// filters x HAVING x ORDER/LIMIT, sampled with a fixed seed.
fn generated() -> Vec<String> {
    let groups: &[&[&str]] = &[
        &[],
        &["member"],
        &["county_code"],
        &["member", "county_name"],
        &["substr(county_code, 1, 4)"],
        &["pop_rural = 0"],
    ];
    let aggs = [
        "count(*)",
        "count(pop_rural)",
        "sum(pop_total)",
        "sum(pop_urban)",
        "min(pop_male)",
        "max(avg_years_schooling)",
        "avg(share_65_plus_pct)",
        "avg(pop_female)",
        "count(DISTINCT member)",
        "count(DISTINCT substr(county_code, 1, 4))",
        "min(county_name)",
        "median(pop_total)",
        "sum(pop_total) FILTER (WHERE pop_rural > 0)",
    ];
    let filters = [
        "",
        "WHERE pop_total > 500000",
        "WHERE member IN ('hangzhou', 'anji')",
        "WHERE member = 'suzhou'",
        "WHERE county_name LIKE '%区'",
        "WHERE share_65_plus_pct BETWEEN 12 AND 18",
        "WHERE pop_rural IS NULL OR pop_rural = 0",
        "WHERE member <> 'shanghai' AND pop_total < 1000000",
        "WHERE member = 'nowhere'",
    ];
    let mut seed: u64 = 0x5eed_f00d_cafe_d00d;
    let mut next = move |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let mut out = Vec::new();
    while out.len() < 220 {
        let g = groups[next(groups.len())];
        let k = 1 + next(3);
        let mut chosen: Vec<&str> = (0..k).map(|_| aggs[next(aggs.len())]).collect();
        chosen.dedup();
        let f = filters[next(filters.len())];
        let mut select: Vec<String> = g.iter().map(|s| s.to_string()).collect();
        select.extend(
            chosen
                .iter()
                .enumerate()
                .map(|(i, a)| format!("{a} AS a{i}")),
        );
        let mut sql = format!("SELECT {} FROM census {f}", select.join(", "));
        if !g.is_empty() {
            sql.push_str(&format!(" GROUP BY {}", g.join(", ")));
            if next(4) == 0 {
                sql.push_str(" HAVING count(*) > 1");
            }
            if next(3) == 0 {
                let all: Vec<String> = (1..=select.len()).map(|i| i.to_string()).collect();
                sql.push_str(&format!(
                    " ORDER BY {} LIMIT {}",
                    all.join(", "),
                    1 + next(6)
                ));
            }
        }
        out.push(sql);
    }
    out
}

/// Whether the query's answer order is fixed: a final ORDER BY, not one inside a
/// window's OVER (...).
fn ordered(sql: &str) -> bool {
    sql.rfind("ORDER BY")
        .is_some_and(|i| !sql[i..].contains(')'))
}

/// Asks `sql` at `client` and compares the answer with the reference's; a difference
/// is added to `failures` and the answer's summary returned.
async fn compare(
    client: &fedgate::tools::client::Client,
    reference: &SessionContext,
    sql: &str,
    pass: &str,
    failures: &mut Vec<String>,
) -> Option<fedgate::proto::v1::QuerySummary> {
    let want = match reference.sql(sql).await {
        Ok(df) => df.collect().await.map(|b| rows(&b)),
        Err(e) => Err(e),
    };
    match (want, client.query(sql, false, None).await) {
        (Ok(mut want), Ok(answer)) => {
            assert!(!answer.summary.partial, "{sql}");
            let mut got = rows(&answer.batches);
            // Order matters only where the query fixes it completely; LIMIT without a
            // total order is not used in the corpus.
            if !ordered(sql) {
                want.sort();
                got.sort();
            }
            if want != got {
                failures.push(format!("{sql} ({pass})\n  want {want:?}\n  got  {got:?}"));
            }
            Some(answer.summary)
        }
        (Err(e), _) => {
            failures.push(format!("{sql}\n  reference failed: {e}"));
            None
        }
        (_, Err(f)) => {
            failures.push(format!("{sql} ({pass})\n  region failed: {f}"));
            None
        }
    }
}

fn corpus() -> Vec<String> {
    let mut corpus: Vec<String> = HAND_WRITTEN.iter().map(|s| s.to_string()).collect();
    corpus.extend(generated());
    assert!(corpus.len() >= 250);
    corpus
}

#[tokio::test]
async fn the_region_answers_like_one_database_holding_every_member() {
    let (region, reference) = setup().await;
    let gateways = ["shanghai", "hefei", "anji"];
    let corpus = corpus();
    let mut failures = Vec::new();
    for (i, sql) in corpus.iter().enumerate() {
        let client = region.client(gateways[i % gateways.len()]);
        // Asked twice: the second time the plan comes from the coordinator's and the
        // members' plan caches and runs as a copy with fresh state, which must answer
        // exactly as the first run did.
        for pass in ["first", "again"] {
            compare(&client, &reference, sql, pass, &mut failures).await;
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} queries differ:\n{}",
        failures.len(),
        corpus.len(),
        failures.join("\n")
    );
}

/// `sql` with every constant a shape lifts changed (a number plus one, a fraction
/// with a digit more, a text with a letter more), or `None` when it has none: a query
/// of the same shape ([`fedgate::owner::shape`]) with other values.
fn with_other_constants(sql: &str) -> Option<String> {
    use datafusion::sql::sqlparser::ast::{Expr, Value, visit_expressions_mut};
    let state = SessionContext::new().state();
    let stmt = fedgate::owner::session::parse_query(&state, sql).ok()?;
    let shaped = fedgate::owner::shape::shape(&stmt)?;
    let datafusion::sql::parser::Statement::Statement(mut inner) = shaped.statement else {
        return None;
    };
    let _ = visit_expressions_mut(inner.as_mut(), |e| {
        if let Expr::Value(v) = e
            && let Value::Placeholder(p) = &v.value
        {
            let i: usize = p[1..].parse().unwrap();
            let l = &shaped.literals[i - 1];
            v.value = match l.kind {
                fedgate::owner::shape::Kind::Integer => {
                    Value::Number((l.text.parse::<i64>().unwrap() + 1).to_string(), false)
                }
                fedgate::owner::shape::Kind::Fraction => {
                    Value::Number(format!("{}1", l.text), false)
                }
                fedgate::owner::shape::Kind::Text => {
                    Value::SingleQuotedString(format!("{}x", l.text))
                }
            };
        }
        std::ops::ControlFlow::<()>::Continue(())
    });
    Some(inner.to_string())
}

/// Every query of the corpus that has constants to lift, asked after a query of its
/// shape with other constants: it is bound into the shape's plan as the coordinator
/// optimized it with placeholders in place (the summary says so), and answers like
/// the reference; so does the query that came first.
#[tokio::test]
async fn queries_bound_into_their_shapes_optimized_plan_answer_like_one_database() {
    let (region, reference) = setup().await;
    let gateways = ["shanghai", "hefei", "anji"];
    let mut corpus = corpus();
    corpus.sort();
    corpus.dedup();
    let mut failures = Vec::new();
    let mut optimized = 0;
    for (i, sql) in corpus.iter().enumerate() {
        let Some(first) = with_other_constants(sql) else {
            continue;
        };
        let client = region.client(gateways[i % gateways.len()]);
        compare(
            &client,
            &reference,
            &first,
            "first of its shape",
            &mut failures,
        )
        .await;
        let Some(summary) = compare(&client, &reference, sql, "bound", &mut failures).await else {
            continue;
        };
        if summary.plan_cached {
            // A query of the corpus whose text an earlier one's changed constants
            // happened to write.
            continue;
        }
        if summary.plan_bound_optimized {
            optimized += 1;
        } else {
            failures.push(format!(
                "{sql}\n  not bound into its shape's optimized plan"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} problems:\n{}",
        failures.len(),
        failures.join("\n")
    );
    // The hand-written and generated filters hold constants in most queries.
    assert!(optimized >= 150, "only {optimized} queries were bound");
}
