//! The adversarial suite at the data owner: generated queries of every class an
//! attacker tries (derived tables, CTEs, renames, unions, joins, casts, arithmetic,
//! CASE, NULL tricks, expressions that provoke errors) against `aggregate` and
//! `verify` grants, through the owner's real path (`owner::answer`: parse, policy,
//! the rewrite, the local engine, the audit record).
//!
//! The oracle is non-interference. The same member runs over two record sets, A and
//! B, that agree on everything the grants release and on nothing else: the same
//! cells of at least k records (count, sums and non-null counts of every numeric
//! field), and the same two probe records for verifications; every other ID, name
//! and phone number differs, the numbers are spread differently inside each cell,
//! and the cells below k differ. A query whose constants are chosen without knowing
//! the records must then get the same answer, or the same error, from A and from B,
//! and nothing either returns or records may hold a record value outside the probes.
//! A check runs the oracle against weakened rules and requires it to find the leak.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;

use fedgate::ops::audit::AuditLog;
use fedgate::owner::member::MemberEngine;
use fedgate::trust::identity::Principal;
use futures::TryStreamExt;

/// One record: id, name, phone, county, sex, age, score.
#[derive(Clone)]
struct Rec {
    id: String,
    name: String,
    phone: String,
    county: &'static str,
    sex: &'static str,
    age: Option<i64>,
    score: f64,
}

/// The released cells, the same in A and B.
const CELLS: [(&str, &str, usize); 4] =
    [("a", "f", 7), ("a", "m", 6), ("b", "f", 5), ("b", "m", 9)];

/// Records of `world` (0 = A, 1 = B).
fn records(world: usize) -> Vec<Rec> {
    let tag = ["x", "y"][world];
    let mut out = Vec::new();
    // The probes, identical in both, in cell (a, f).
    for (i, (id, name)) in [("P1", "probe one"), ("P2", "probe two")]
        .iter()
        .enumerate()
    {
        out.push(Rec {
            id: id.to_string(),
            name: name.to_string(),
            phone: format!("1390000000{i}"),
            county: "a",
            sex: "f",
            age: Some(40 + i as i64),
            score: 1.5,
        });
    }
    for (c, (county, sex, n)) in CELLS.iter().enumerate() {
        let probes = if (*county, *sex) == ("a", "f") { 2 } else { 0 };
        let others = n - probes;
        for i in 0..others {
            // The same sums per cell: A and B move 3 years (and 0.5 points) between
            // the first two records, and B lists the values in another order.
            let base = 20 + 5 * (c as i64) + 4 * i as i64;
            let shift = match (world, i) {
                (1, 0) => 3,
                (1, 1) => -3,
                _ => 0,
            };
            let age = (i != 2).then_some(base + shift);
            let score = 0.25 * (c * 10 + i) as f64 + shift as f64 / 6.0;
            out.push(Rec {
                id: format!("33{tag}{c}{i:04}"),
                name: format!("{tag}-person-{c}-{i}"),
                phone: format!("15{}{c}{i:05}", world + 7),
                county,
                sex,
                age,
                score,
            });
        }
    }
    // Cells below k, different in A and B.
    let small: &[(&str, &str, usize)] = if world == 0 {
        &[("c", "f", 2), ("c", "m", 1), ("d", "f", 3)]
    } else {
        &[("c", "f", 1), ("d", "m", 4), ("e", "f", 2)]
    };
    for (c, (county, sex, n)) in small.iter().enumerate() {
        for i in 0..*n {
            out.push(Rec {
                id: format!("44{tag}{c}{i:04}"),
                name: format!("{tag}-small-{c}-{i}"),
                phone: format!("18{}{c}{i:05}", world + 3),
                county,
                sex,
                age: Some(60 + 7 * i as i64 + world as i64),
                score: 9.0 + world as f64,
            });
        }
    }
    out
}

/// Record values a caller must never see (everything but the probes), as text.
fn secrets(world: usize) -> BTreeSet<String> {
    records(world)
        .iter()
        .filter(|r| !r.id.starts_with('P'))
        .flat_map(|r| [r.id.clone(), r.name.clone(), r.phone.clone()])
        .collect()
}

/// Writes a one-member region whose `people` dataset is `records(world)`, under
/// `rules`, and builds the member's engine and audit log.
async fn member(dir: &Path, world: usize, rules: &str) -> (MemberEngine, Arc<AuditLog>) {
    let d = dir.join(format!("w{world}"));
    std::fs::create_dir_all(&d).unwrap();
    for f in ["ca.crt", "m1.crt", "m1.key"] {
        std::fs::write(d.join(f), "unused by this test\n").unwrap();
    }
    std::fs::write(
        d.join("region.toml"),
        r#"region = "adv"
ca = "ca.crt"

[[members]]
name = "m1"
kind = "city"
endpoint = "https://127.0.0.1:1"
serves = ["people"]

[[members]]
name = "o1"
kind = "office"

[[members]]
name = "c1"
kind = "county"

[[datasets]]
name = "people"
description = "generated people"
fields = [
  { name = "id", type = "utf8" },
  { name = "name", type = "utf8" },
  { name = "phone", type = "utf8" },
  { name = "county", type = "utf8" },
  { name = "sex", type = "utf8" },
  { name = "age", type = "int64" },
  { name = "score", type = "float64" },
]
"#,
    )
    .unwrap();
    let mut csv = String::from("id,name,phone,county,sex,age,score\n");
    for r in records(world) {
        csv += &format!(
            "{},{},{},{},{},{},{}\n",
            r.id,
            r.name,
            r.phone,
            r.county,
            r.sex,
            r.age.map(|a| a.to_string()).unwrap_or_default(),
            r.score
        );
    }
    std::fs::write(d.join("people.csv"), csv).unwrap();
    std::fs::write(
        d.join("m1.toml"),
        format!(
            r#"member = "m1"
region = "region.toml"
listen = "127.0.0.1:1"
cert = "m1.crt"
key = "m1.key"

[[sources]]
name = "people"
format = "csv"
path = "people.csv"

[[mappings]]
dataset = "people"
source = "people"
fields.id = "id"
fields.name = "name"
fields.phone = "phone"
fields.county = "county"
fields.sex = "sex"
fields.age = "age"
fields.score = "score"

{rules}
"#
        ),
    )
    .unwrap();
    let cfg =
        fedgate::config::MemberConfig::load(&d.join("m1.toml")).unwrap_or_else(|p| panic!("{p}"));
    let engine = MemberEngine::build(Arc::new(cfg)).await.unwrap();
    let audit = Arc::new(AuditLog::open(&d.join("audit.log")).unwrap());
    (engine, audit)
}

const RULES: &str = r#"
[[access]]
principals = ["fedgate://adv/office/*"]
datasets = ["people"]
level = "aggregate"
min_group = 5
dimensions = ["county", "sex"]

[[access]]
principals = ["fedgate://adv/county/*"]
datasets = ["people"]
level = "verify"
keys = ["id"]
"#;

/// A small deterministic generator (xorshift), so that a failure names its seed.
struct Gen(u64);

impl Gen {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
    fn pick<'a>(&mut self, v: &[&'a str]) -> &'a str {
        v[self.below(v.len())]
    }
}

const COLS: [&str; 8] = [
    "id", "name", "phone", "county", "sex", "age", "score", "member",
];
const GROUPS: [&str; 12] = [
    "county", "sex", "member", "county", "sex", "id", "name", "phone", "county", "sex", "age",
    "score",
];
const LITS: [&str; 17] = [
    "'P1'",
    "'P2'",
    "'nobody'",
    "'a'",
    "'b'",
    "'c'",
    "'f'",
    "'m'",
    "0",
    "1",
    "5",
    "30",
    "2.5",
    "NULL",
    "'probe one'",
    "'m1'",
    "-1",
];

fn expr(g: &mut Gen, depth: usize) -> String {
    let c = g.pick(&COLS);
    let l = g.pick(&LITS);
    match if depth == 0 { g.below(2) } else { g.below(16) } {
        0 => c.to_string(),
        1 => c.to_string(),
        2 => l.to_string(),
        3 => format!(
            "({} {} {l})",
            expr(g, depth - 1),
            g.pick(&["+", "-", "*", "/", "%"])
        ),
        4 => format!(
            "CAST({} AS {})",
            expr(g, depth - 1),
            g.pick(&["INT", "BIGINT", "DOUBLE", "VARCHAR", "DATE"])
        ),
        5 => format!(
            "CASE WHEN {} THEN {} ELSE {} END",
            cond(g, depth - 1),
            expr(g, depth - 1),
            expr(g, depth - 1)
        ),
        6 => format!("nullif({c}, {l})"),
        7 => format!("coalesce({c}, {l})"),
        8 => format!("upper({c})"),
        9 => format!("substr({c}, 1, 3)"),
        10 => format!("length({c})"),
        11 => format!("({c} / 0)"),
        12 => format!(
            "CAST({} AS INT)",
            g.pick(&["name", "id", "phone", "county"])
        ),
        13 => format!("({c} * 1.0)"),
        14 => format!("(CAST({c} AS DOUBLE) * 1.0)"),
        _ => format!("({c} + {c})"),
    }
}

fn cond(g: &mut Gen, depth: usize) -> String {
    match if depth == 0 { g.below(4) } else { g.below(8) } {
        0 => format!(
            "{} {} {}",
            expr(g, depth),
            g.pick(&["=", "<>", "<", ">=", "="]),
            g.pick(&LITS)
        ),
        1 => format!("{} IS NULL", g.pick(&COLS)),
        2 => format!("{} = {}", g.pick(&COLS), g.pick(&LITS)),
        3 => format!(
            "{} LIKE '{}%'",
            g.pick(&COLS),
            g.pick(&["P", "3", "a", "x"])
        ),
        4 => format!("({} AND {})", cond(g, depth - 1), cond(g, depth - 1)),
        5 => format!("({} OR {})", cond(g, depth - 1), cond(g, depth - 1)),
        6 => format!("NOT ({})", cond(g, depth - 1)),
        _ => format!(
            "{} IN ({}, {})",
            g.pick(&COLS),
            g.pick(&LITS),
            g.pick(&LITS)
        ),
    }
}

fn agg(g: &mut Gen) -> String {
    let e = expr(g, 1);
    match g.below(12) {
        0 | 1 | 10 => "count(*)".into(),
        11 => format!(
            "{}({})",
            g.pick(&["sum", "avg", "count"]),
            g.pick(&["age", "score"])
        ),
        2 => format!("count({e})"),
        3 => format!("sum({e})"),
        4 => format!("avg({e})"),
        5 => format!("min({e})"),
        6 => format!("max({e})"),
        7 => format!("count(DISTINCT {e})"),
        8 => format!("sum({}) FILTER (WHERE {})", g.pick(&COLS), cond(g, 0)),
        _ => format!("sum({})", g.pick(&["age", "score", "age * 2 + 1"])),
    }
}

/// A source exposing the dataset's column names: the dataset itself, or a derived
/// table, CTE, union or join that may relabel anything as anything.
fn source(g: &mut Gen) -> (String, String) {
    let relabel = |g: &mut Gen| -> String {
        COLS.iter()
            .map(|c| {
                if g.below(3) == 0 {
                    format!("{} AS {c}", expr(g, 1))
                } else {
                    c.to_string()
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let filter = |g: &mut Gen| {
        if g.below(2) == 0 {
            format!(" WHERE {}", cond(g, 1))
        } else {
            String::new()
        }
    };
    match g.below(8) {
        0..=2 => (String::new(), "people".into()),
        3 => {
            let r = relabel(g);
            let f = filter(g);
            (String::new(), format!("(SELECT {r} FROM people{f}) AS s"))
        }
        4 => {
            let r = relabel(g);
            let f = filter(g);
            (format!("WITH s AS (SELECT {r} FROM people{f}) "), "s".into())
        }
        5 => (
            String::new(),
            "(SELECT * FROM people UNION ALL SELECT * FROM people) AS s".into(),
        ),
        6 => (
            String::new(),
            format!(
                "(SELECT x.* FROM people x JOIN people y ON x.{c} = y.{c}) AS s",
                c = g.pick(&COLS)
            ),
        ),
        _ => (
            "WITH s AS (SELECT county, sex, member, count(*) AS n, sum(age) AS age FROM people GROUP BY county, sex, member) "
                .into(),
            "(SELECT county AS id, county AS name, county AS phone, county, sex, n AS age, age AS score, member FROM s) AS t"
                .into(),
        ),
    }
}

fn query(g: &mut Gen) -> String {
    let (with, from) = source(g);
    let w = if g.below(2) == 0 {
        format!(" WHERE {}", cond(g, 1))
    } else {
        String::new()
    };
    // Grouping and filtering by dimensions is what a grant allows, so the generator
    // leans that way: a suite of refusals would prove nothing.
    let gcol = g.pick(&GROUPS);
    let w = if g.below(3) == 0 {
        format!(
            " WHERE {} = {}",
            g.pick(&["county", "sex", "member"]),
            g.pick(&LITS)
        )
    } else {
        w
    };
    let body = match g.below(9) {
        0 => format!(
            "SELECT {}, {} FROM {from}{w}{}",
            expr(g, 2),
            expr(g, 1),
            g.pick(&["", " ORDER BY 1", " ORDER BY 1 LIMIT 1", " LIMIT 3"])
        ),
        1 | 2 => format!(
            "SELECT {gcol}, {}, {} FROM {from}{w} GROUP BY {gcol}",
            agg(g),
            agg(g)
        ),
        3 => format!("SELECT {} FROM {from}{w}", agg(g)),
        4 => format!(
            "SELECT q.x, q.n * 2 FROM (SELECT {gcol} AS x, {} AS n FROM {from}{w} GROUP BY {gcol}) q WHERE q.n > {}",
            agg(g),
            g.pick(&["0", "3", "5", "10"])
        ),
        5 => format!("SELECT DISTINCT {} FROM {from}{w}", expr(g, 1)),
        6 => format!(
            "SELECT {gcol}, {} FROM {from}{w} GROUP BY {gcol} HAVING {} > {}",
            agg(g),
            agg(g),
            g.pick(&["0", "1", "6"])
        ),
        7 => format!(
            "SELECT count(*) FROM {from} WHERE id = {}{}",
            g.pick(&["'P1'", "'P2'", "'nobody'", "3", "'P'"]),
            if g.below(2) == 0 {
                format!(" AND {}", cond(g, 0))
            } else {
                String::new()
            }
        ),
        _ => format!(
            "SELECT member, count(*) FROM {from} WHERE id = {} GROUP BY member",
            g.pick(&["'P1'", "'nobody'", "CAST('P2' AS VARCHAR)"])
        ),
    };
    format!("{with}{body}")
}

/// An answer as sorted lines of text, or the error's text.
async fn ask(
    engine: &MemberEngine,
    audit: &Arc<AuditLog>,
    origin: &Principal,
    sql: &str,
) -> Result<Vec<String>, String> {
    let via = Principal::parse("fedgate://adv/city/m1").unwrap();
    let a = fedgate::owner::SubQueryAsk {
        via: &via,
        origin,
        purpose: None,
        query_id: "adversarial",
        sql,
        covered: None,
        incident: None,
    };
    let stream = fedgate::owner::answer(
        engine,
        audit,
        fedgate::owner::Emergency::none(),
        a,
        Default::default(),
    )
    .await
    .map_err(|e| e.to_string())?;
    let batches: Vec<_> = stream
        .try_collect()
        .await
        .map_err(|e| fedgate::error::Error::from_datafusion(e).to_string())?;
    let mut lines = Vec::new();
    for b in &batches {
        for i in 0..b.num_rows() {
            let row: Vec<String> = b
                .columns()
                .iter()
                .map(|c| arrow::util::display::array_value_to_string(c, i).unwrap())
                .collect();
            lines.push(row.join("|"));
        }
    }
    lines.sort();
    Ok(lines)
}

/// Runs `cases` generated queries from `seed` against A and B under `rules`, for
/// the office (aggregate) and a county (verify). Returns the first violation of the
/// oracle, and how many (query, grant) cases were answered and run.
async fn suite(rules: &str, seed: u64, cases: usize) -> (Option<String>, usize, usize) {
    let dir = tempfile::tempdir().unwrap();
    let a = member(dir.path(), 0, rules).await;
    let b = member(dir.path(), 1, rules).await;
    let secrets: BTreeSet<String> = secrets(0).union(&secrets(1)).cloned().collect();
    let leaks = |text: &str| secrets.iter().find(|s| text.contains(s.as_str())).cloned();
    let origins = [
        Principal::parse("fedgate://adv/office/o1").unwrap(),
        Principal::parse("fedgate://adv/county/c1").unwrap(),
    ];
    let mut g = Gen(seed.max(1));
    let (mut answered, mut run) = (0, 0);
    while run < cases {
        let sql = query(&mut g);
        for origin in &origins {
            run += 1;
            let ra = ask(&a.0, &a.1, origin, &sql).await;
            let rb = ask(&b.0, &b.1, origin, &sql).await;
            if ra.is_ok() {
                answered += 1;
            }
            for (w, r) in [("A", &ra), ("B", &rb)] {
                let text = match r {
                    Ok(lines) => lines.join("\n"),
                    Err(e) => e.clone(),
                };
                if let Some(s) = leaks(&text) {
                    return (
                        Some(format!(
                            "{origin} {sql}: {w} released the record value {s:?} in {text}"
                        )),
                        answered,
                        run,
                    );
                }
            }
            if ra != rb {
                return (
                    Some(format!(
                        "{origin} {sql}: the answer depends on records the grant withholds:\n A: {ra:?}\n B: {rb:?}"
                    )),
                    answered,
                    run,
                );
            }
        }
    }
    // The audit records hold no record values either.
    for w in ["w0", "w1"] {
        let log = std::fs::read_to_string(dir.path().join(w).join("audit.log")).unwrap();
        if let Some(s) = leaks(&log) {
            return (
                Some(format!("the audit log of {w} holds the record value {s:?}")),
                answered,
                run,
            );
        }
    }
    (None, answered, run)
}

async fn generated(seed: u64) {
    let (violation, answered, run) = suite(RULES, seed, 2_500).await;
    assert!(violation.is_none(), "seed {seed}: {}", violation.unwrap());
    // A suite that only collects refusals would prove nothing: most generated queries
    // are refused (they are attacks), and at least one in twenty must be answered
    // (about one in eleven were when this was written).
    assert!(
        answered * 20 >= run,
        "seed {seed}: only {answered} of {run} cases were answered"
    );
}

// Four runs of 2,500 (query, grant) cases each: 10,000 in all, each asked of A and B.
#[tokio::test]
async fn generated_queries_release_nothing_beyond_the_grant_1() {
    generated(0x5eed_0001).await;
}

#[tokio::test]
async fn generated_queries_release_nothing_beyond_the_grant_2() {
    generated(0x5eed_0002).await;
}

#[tokio::test]
async fn generated_queries_release_nothing_beyond_the_grant_3() {
    generated(0x5eed_0003).await;
}

#[tokio::test]
async fn generated_queries_release_nothing_beyond_the_grant_4() {
    generated(0x5eed_0004).await;
}

/// The oracle finds the leak when the enforcement is weakened: records shared as
/// rows, and cells of 2 records released where the rule says 5.
#[tokio::test]
async fn the_suite_catches_a_weakened_enforcement() {
    for weakened in [
        RULES
            .replace("level = \"aggregate\"\nmin_group = 5", "level = \"rows\"")
            .replace("dimensions = [\"county\", \"sex\"]\n", ""),
        RULES.replace("min_group = 5", "min_group = 2"),
    ] {
        assert_ne!(weakened, RULES);
        let (violation, _, run) = suite(&weakened, 0x5eed_0001, 2_000).await;
        assert!(
            violation.is_some(),
            "{run} cases found nothing under the weakened rules:\n{weakened}"
        );
    }
}
