//! Tests of aggregate and verify grants by construction: answers computed from cells of at
//! least k, refusals of what cells cannot say, the owner's existence check, and a withheld
//! table that fails when read.

use super::*;
use crate::owner::policy::Grant;
use datafusion::arrow::array::{Float64Array, Int64Array, RecordBatch, StringArray};
use datafusion::arrow::datatypes::{Field, Schema};
use datafusion::datasource::MemTable;
use datafusion::prelude::SessionContext;

const K: u64 = 5;

/// A record: id, name, county, sex, age, score.
type Person = (String, String, &'static str, &'static str, Option<i64>, f64);

/// Cells (county, sex): a/f 7, a/m 6, b/f 5 are released; b/m 2 and c/f 1 are
/// below k = 5.
fn people() -> Vec<Person> {
    let mut out = Vec::new();
    for (county, sex, n) in [
        ("a", "f", 7),
        ("a", "m", 6),
        ("b", "f", 5),
        ("b", "m", 2),
        ("c", "f", 1),
    ] {
        for _ in 0..n {
            let k = out.len() as i64;
            let age = (k % 4 != 3).then_some(20 + 3 * k);
            out.push((
                format!("p{k}"),
                format!("name{k}"),
                county,
                sex,
                age,
                k as f64 * 0.5,
            ));
        }
    }
    out
}

fn released(p: &Person) -> bool {
    let n = people().iter().filter(|q| q.2 == p.2 && q.3 == p.3).count() as u64;
    n >= K
}

fn schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("id", DataType::Utf8, true),
        Field::new("name", DataType::Utf8, true),
        Field::new("county", DataType::Utf8, true),
        Field::new("sex", DataType::Utf8, true),
        Field::new("age", DataType::Int64, true),
        Field::new("score", DataType::Float64, true),
        Field::new(MEMBER_COLUMN, DataType::Utf8, true),
    ]))
}

fn batch(people: &[Person]) -> RecordBatch {
    let s = |f: &dyn Fn(&Person) -> String| {
        Arc::new(StringArray::from(people.iter().map(f).collect::<Vec<_>>())) as _
    };
    RecordBatch::try_new(
        schema(),
        vec![
            s(&|p| p.0.clone()),
            s(&|p| p.1.clone()),
            s(&|p| p.2.to_string()),
            s(&|p| p.3.to_string()),
            Arc::new(Int64Array::from(
                people.iter().map(|p| p.4).collect::<Vec<_>>(),
            )),
            Arc::new(Float64Array::from(
                people.iter().map(|p| p.5).collect::<Vec<_>>(),
            )),
            s(&|_| "m1".to_string()),
        ],
    )
    .unwrap()
}

fn grant(level: AccessLevel) -> Grant {
    Grant {
        rule: 3,
        level,
        masks: BTreeMap::new(),
        dimensions: ["county", "sex"].iter().map(|s| s.to_string()).collect(),
        keys: ["id"].iter().map(|s| s.to_string()).collect(),
        incident: None,
        passed_over: Vec::new(),
    }
}

/// The caller's context (the dataset withheld) and the owner's plans, as the
/// member engine builds them.
async fn setup(level: AccessLevel) -> (SessionContext, BTreeMap<String, Restricted>) {
    let private = SessionContext::new();
    private
        .register_table(
            "records",
            Arc::new(MemTable::try_new(schema(), vec![vec![batch(&people())]]).unwrap()),
        )
        .unwrap();
    let records = "SELECT * FROM records";
    let fields: Vec<(String, DataType)> = schema()
        .fields()
        .iter()
        .map(|f| (f.name().clone(), f.data_type().clone()))
        .collect();
    let g = grant(level);
    let plan = |sql: String| {
        let private = private.clone();
        async move { private.sql(&sql).await.unwrap().into_unoptimized_plan() }
    };
    let owned = match level {
        AccessLevel::Aggregate { min_group } => {
            let (sql, measures) = cells_sql(records, &fields, &g, min_group);
            Owned::Cells {
                plan: plan(sql).await,
                measures,
            }
        }
        _ => Owned::Records {
            plan: plan(records.to_string()).await,
        },
    };
    let caller = SessionContext::new();
    caller
        .register_table("t", Arc::new(Withheld::new("t", schema())))
        .unwrap();
    let mut r = BTreeMap::new();
    r.insert(
        "t".to_string(),
        Restricted {
            grant: g,
            fields,
            owned,
        },
    );
    (caller, r)
}

async fn run(level: AccessLevel, sql: &str) -> Result<Vec<Vec<String>>, String> {
    let (ctx, r) = setup(level).await;
    let plan = ctx.state().create_logical_plan(sql).await.unwrap();
    let plan = rewrite(plan, &r)?;
    let batches = ctx
        .execute_logical_plan(plan)
        .await
        .map_err(|e| e.to_string())?
        .collect()
        .await
        .map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            rows.push(
                b.columns()
                    .iter()
                    .map(|c| datafusion::arrow::util::display::array_value_to_string(c, i).unwrap())
                    .collect(),
            );
        }
    }
    Ok(rows)
}

const AGG: AccessLevel = AccessLevel::Aggregate { min_group: K };

fn row(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[tokio::test]
async fn aggregates_are_computed_from_cells_of_at_least_k() {
    let p: Vec<Person> = people().into_iter().filter(released).collect();
    let count = |c: &str| p.iter().filter(|x| x.2 == c).count().to_string();
    assert_eq!(
        run(
            AGG,
            "SELECT county, count(*) AS n FROM t GROUP BY county ORDER BY county"
        )
        .await
        .unwrap(),
        vec![row(&["a", &count("a")]), row(&["b", &count("b")])]
    );
    let ages: Vec<i64> = p.iter().filter_map(|x| x.4).collect();
    let sum: i64 = ages.iter().sum();
    let avg = sum as f64 / ages.len() as f64;
    assert_eq!(
        run(
            AGG,
            "SELECT sum(age), avg(age), count(age), count(*), sum(score * 2 + 1) FROM t"
        )
        .await
        .unwrap(),
        vec![row(&[
            &sum.to_string(),
            &format!("{avg:?}"),
            &ages.len().to_string(),
            &p.len().to_string(),
            &format!("{:?}", p.iter().map(|x| x.5 * 2.0 + 1.0).sum::<f64>())
        ])]
    );
    // The coordinator's partial average, a derived table, a CTE, DISTINCT, a
    // FILTER and dimension-only min/max all read cells.
    let f: Vec<&Person> = p.iter().filter(|x| x.3 == "f").collect();
    for (sql, want) in [
        (
            "SELECT count(CAST(age AS DOUBLE) * 1.0) FROM t",
            ages.len().to_string(),
        ),
        (
            "SELECT count(*) FROM (SELECT * FROM t WHERE sex = 'f') s",
            f.len().to_string(),
        ),
        (
            "WITH x AS (SELECT county, count(*) AS n FROM t GROUP BY county) SELECT max(n) FROM x",
            count("a"),
        ),
        ("SELECT count(DISTINCT county) FROM t", "2".into()),
        (
            "SELECT count(*) FILTER (WHERE sex = 'm') FROM t",
            p.iter().filter(|x| x.3 == "m").count().to_string(),
        ),
        ("SELECT max(county) FROM t", "b".into()),
        ("SELECT count(*) FROM t WHERE county = 'c'", "0".into()),
    ] {
        assert_eq!(run(AGG, sql).await.unwrap(), vec![vec![want]], "{sql}");
    }
    assert_eq!(
        run(AGG, "SELECT DISTINCT county FROM t ORDER BY county")
            .await
            .unwrap(),
        vec![row(&["a"]), row(&["b"])]
    );
}

#[tokio::test]
async fn what_cells_cannot_say_is_refused_whatever_the_query_calls_it() {
    for (bad, why) in [
        ("SELECT * FROM t", "returns its records"),
        ("SELECT id FROM t LIMIT 1", "LIMIT"),
        // Derived tables and CTEs that relabel record fields as dimensions.
        (
            "SELECT county, count(*) FROM (SELECT id AS county FROM t) x GROUP BY county",
            "grouped only",
        ),
        (
            "WITH x AS (SELECT name AS sex, county FROM t) SELECT sex, count(*) FROM x GROUP BY sex",
            "grouped only",
        ),
        (
            "SELECT count(*) FROM (SELECT county, id AS sex FROM t) x WHERE sex = 'p3'",
            "filtered only",
        ),
        // Casts, arithmetic and CASE as filters.
        (
            "SELECT count(CASE WHEN id = 'p3' THEN 1 END) FROM t",
            "cannot be computed from its cells",
        ),
        (
            "SELECT count(nullif(id, 'p3')) FROM t",
            "cannot be computed from its cells",
        ),
        (
            "SELECT sum(CASE WHEN age > 30 THEN 1 ELSE 0 END) FROM t",
            "cannot be computed from its cells",
        ),
        (
            "SELECT sum(age / age) FROM t",
            "cannot be computed from its cells",
        ),
        ("SELECT count(*) FROM t WHERE age > 30", "filtered only"),
        (
            "SELECT count(*) FROM t WHERE CAST(id AS INT) = 3",
            "filtered only",
        ),
        ("SELECT max(age) FROM t", "one record's value"),
        ("SELECT count(DISTINCT name) FROM t", "cannot be computed"),
        ("SELECT age, count(*) FROM t GROUP BY age", "grouped only"),
        (
            "SELECT count(*) FROM t a JOIN t b ON a.county = b.county",
            "joined",
        ),
        (
            "SELECT county FROM t UNION ALL SELECT county FROM t",
            "combined",
        ),
        ("SELECT county, row_number() OVER () FROM t", "window"),
        ("SELECT array_agg(county) FROM t", "not allowed"),
        (
            "SELECT count(*) FROM t WHERE county IN (SELECT county FROM t)",
            "subqueries",
        ),
        ("SELECT count(*) FILTER (WHERE id = 'p3') FROM t", "FILTER"),
        (
            "SELECT county, count(*) FROM t GROUP BY ROLLUP (county)",
            "grouped only",
        ),
    ] {
        let e = run(AGG, bad).await.unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
        assert!(
            e.contains("aggregate(k=5)") && e.contains("access[3]"),
            "{e}"
        );
    }
}

#[tokio::test]
async fn verifications_run_the_owners_existence_check_on_stated_constants() {
    let v = AccessLevel::Verify;
    for (sql, want) in [
        (
            "SELECT count(*) AS n FROM t WHERE id = 'p3'",
            vec![row(&["1"])],
        ),
        (
            "SELECT count(*) FROM t WHERE id = 'nobody'",
            vec![row(&["0"])],
        ),
        (
            "SELECT count(*) FROM t WHERE id = 'p3' AND name = 'name4'",
            vec![row(&["0"])],
        ),
        (
            "SELECT count(*) FROM t WHERE 'name2' = name AND id = 'p2' AND age = 26",
            vec![row(&["1"])],
        ),
        (
            "SELECT member, count(*) FROM t WHERE id = 'p3' GROUP BY member",
            vec![row(&["m1", "1"])],
        ),
        (
            "SELECT member, count(*) FROM t WHERE id = 'nobody' GROUP BY member",
            vec![],
        ),
        // A rename is followed by position: the key is what the column holds.
        (
            "SELECT count(*) FROM (SELECT name AS id, id AS name FROM t) x WHERE id = 'name3' AND name = 'p3'",
            vec![row(&["1"])],
        ),
    ] {
        assert_eq!(run(v, sql).await.unwrap(), want, "{sql}");
    }
    for (bad, why) in [
        ("SELECT name FROM t WHERE id = 'p3'", "returns its records"),
        (
            "SELECT count(*) FROM t WHERE name = 'name3'",
            "must state id",
        ),
        (
            "SELECT count(*) FROM (SELECT name AS id FROM t) x WHERE id = 'name3'",
            "must state id",
        ),
        ("SELECT count(*) FROM t WHERE id LIKE 'p%'", "field = value"),
        (
            "SELECT count(*) FROM t WHERE id = 'p3' OR id = 'p4'",
            "field = value",
        ),
        ("SELECT count(*) FROM t WHERE id IS NULL", "field = value"),
        (
            "SELECT count(*) FROM t WHERE upper(id) = 'P3'",
            "field = value",
        ),
        // A key compared through a (lossy) cast, or with a constant of another type.
        (
            "SELECT count(*) FROM t WHERE CAST(id AS VARCHAR(1)) = 'p'",
            "field = value",
        ),
        ("SELECT count(*) FROM t WHERE id = 3", "field = value"),
        (
            "SELECT count(*) FROM t WHERE id = 'p3' AND CAST(age AS INT) = 29",
            "field = value",
        ),
        (
            "SELECT name, count(*) FROM t WHERE id = 'p3' GROUP BY name",
            "only by member",
        ),
        ("SELECT count(name) FROM t WHERE id = 'p3'", "only count(*)"),
        ("SELECT sum(age) FROM t WHERE id = 'p3'", "only count(*)"),
        (
            "SELECT count(*) FROM t a JOIN t b ON a.id = b.id WHERE a.id = 'p3'",
            "joined",
        ),
    ] {
        let e = run(v, bad).await.unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
}

#[tokio::test]
async fn a_withheld_table_that_is_read_fails_instead_of_answering() {
    let (ctx, _) = setup(AGG).await;
    // Planned without the rewrite, the caller's query has nothing to read.
    let e = ctx
        .sql("SELECT id FROM t")
        .await
        .unwrap()
        .collect()
        .await
        .unwrap_err();
    assert!(e.to_string().contains("not readable"), "{e}");
}
