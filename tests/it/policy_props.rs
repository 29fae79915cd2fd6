//! Property: random access rules at two members x random queries through a real region.
//! A reference evaluator, written from the rules alone, knows which values each
//! member may let out; no answer ever holds a value outside that set, aggregate
//! groups never count fewer than k records, and verifications answer only 0 or 1.

use std::collections::BTreeSet;

use fedgate::config::raw::{RawAccessRule, RawMemberConfig};
use fedgate::proto::v1::QueryRequest;
use proptest::prelude::*;

use crate::support::{Region, column_strings};

const MEMBERS: [&str; 2] = ["hangzhou", "suzhou"];
const DIMS: [&str; 4] = ["county_code", "sex", "scheme", "status"];

/// One member's rule for the regional office.
#[derive(Debug, Clone)]
enum Policy {
    Rows,
    Masked(Vec<(&'static str, &'static str)>),
    Aggregate { k: u64, dims: Vec<&'static str> },
    Verify,
    Deny,
}

fn policy() -> impl Strategy<Value = Policy> {
    let masks = (
        prop::sample::select(vec![
            None,
            Some("id_keep_ends"),
            Some("id_region"),
            Some("hmac"),
            Some("deny"),
        ]),
        prop::sample::select(vec![None, Some("surname"), Some("deny")]),
        prop::sample::select(vec![None, Some("phone"), Some("deny")]),
    )
        .prop_filter_map("at least one mask", |(i, n, p)| {
            let v: Vec<_> = [("id_number", i), ("name", n), ("phone", p)]
                .into_iter()
                .filter_map(|(f, m)| m.map(|m| (f, m)))
                .collect();
            (!v.is_empty()).then_some(Policy::Masked(v))
        });
    prop_oneof![
        Just(Policy::Rows),
        masks,
        (2u64..40, prop::sample::subsequence(DIMS.to_vec(), 0..=4))
            .prop_map(|(k, dims)| Policy::Aggregate { k, dims }),
        Just(Policy::Verify),
        Just(Policy::Deny),
    ]
}

fn rule(p: &Policy) -> RawAccessRule {
    let mut r = RawAccessRule {
        incident: None,
        principals: vec!["fedgate://yrd/office/*".into()],
        datasets: vec!["enrollment".into()],
        level: String::new(),
        fields: Default::default(),
        min_group: None,
        dimensions: Vec::new(),
        keys: Vec::new(),
        purposes: Vec::new(),
        via: Vec::new(),
    };
    match p {
        Policy::Rows => r.level = "rows".into(),
        Policy::Masked(m) => {
            r.level = "masked".into();
            r.fields = m
                .iter()
                .map(|(f, m)| (f.to_string(), m.to_string()))
                .collect();
        }
        Policy::Aggregate { k, dims } => {
            r.level = "aggregate".into();
            r.min_group = Some(*k);
            r.dimensions = dims.iter().map(|d| d.to_string()).collect();
        }
        Policy::Verify => {
            r.level = "verify".into();
            r.keys = vec!["id_number".into()];
        }
        Policy::Deny => r.level = "deny".into(),
    }
    r
}

/// A query against one member, from templates with values drawn from the data.
fn query(member: &str, shape: usize, pick: usize, people: &[Vec<String>]) -> String {
    let p = &people[pick % people.len()];
    let (id, name, county) = (&p[0], &p[1], &p[3]);
    let dim = DIMS[pick % DIMS.len()];
    let w = format!("member = '{member}'");
    match shape % 11 {
        0 => format!(
            "SELECT id_number, name, phone, county_code FROM enrollment WHERE {w} LIMIT 300"
        ),
        1 => format!(
            "SELECT county_code, sex, count(*) AS n FROM enrollment WHERE {w} GROUP BY county_code, sex"
        ),
        2 => format!(
            "SELECT {dim}, count(*) AS n FROM enrollment WHERE {w} AND county_code = '{county}' GROUP BY {dim}"
        ),
        3 => format!("SELECT count(*) AS n FROM enrollment WHERE {w} AND id_number = '{id}'"),
        4 => format!(
            "SELECT substr(id_number, 1, 14) AS p, count(*) AS n FROM enrollment WHERE {w} GROUP BY 1"
        ),
        5 => format!("SELECT name, count(*) AS n FROM enrollment WHERE {w} GROUP BY name"),
        6 => format!(
            "SELECT max(phone) AS x, min(id_number) AS y, count(*) AS n FROM enrollment WHERE {w}"
        ),
        7 => format!(
            "SELECT count(*) AS n FROM enrollment WHERE {w} AND id_number LIKE '{}%'",
            &id[..10.min(id.len())]
        ),
        8 => format!(
            "SELECT county_code, count(*) AS n, sum(birth_year) AS s FROM enrollment WHERE {w} GROUP BY county_code"
        ),
        9 => {
            format!("SELECT id_number, phone FROM enrollment WHERE {w} ORDER BY id_number LIMIT 5")
        }
        _ => format!(
            "SELECT count(*) AS n FROM enrollment WHERE {w} AND id_number = '{id}' AND name = '{name}'"
        ),
    }
}

/// What must never appear in an answer of a member under `policy`: whole values of
/// protected fields, and the hidden middle (the birth date) of ID numbers masked by
/// keeping their ends or region. The third set holds the values the member may
/// return as they are, which are not searched for hidden parts (an unmasked mobile
/// number can contain someone's birth date by chance). Keyed hashes are not searched
/// either: they are not derived from digits, and the whole-value check covers them.
fn forbidden(
    policy: &Policy,
    people: &[Vec<String>],
) -> (BTreeSet<String>, BTreeSet<String>, BTreeSet<String>) {
    let mut whole = BTreeSet::new();
    let mut parts = BTreeSet::new();
    let mut shown = BTreeSet::new();
    let field = |f: &str| ["id_number", "name", "phone"].iter().position(|x| *x == f);
    let protected: Vec<usize> = match policy {
        Policy::Rows => vec![],
        Policy::Masked(m) => m.iter().filter_map(|(f, _)| field(f)).collect(),
        Policy::Aggregate { .. } | Policy::Verify | Policy::Deny => vec![0, 1, 2],
    };
    let id_digits_hidden = match policy {
        Policy::Masked(m) => m
            .iter()
            .any(|(f, m)| *f == "id_number" && matches!(*m, "id_keep_ends" | "id_region")),
        Policy::Rows => false,
        _ => true,
    };
    for p in people {
        for (i, v) in p.iter().enumerate().take(3) {
            if v.is_empty() {
                continue;
            }
            if protected.contains(&i) {
                whole.insert(v.clone());
            } else {
                shown.insert(v.clone());
            }
        }
        if id_digits_hidden && p[0].len() == 18 {
            parts.insert(p[0][6..14].to_string());
        }
    }
    (whole, parts, shown)
}

fn run_case(
    policies: [Policy; 2],
    queries: Vec<(usize, usize, usize)>,
) -> Result<(), TestCaseError> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let rules = policies.clone();
        let region = Region::start_patched(Some(&MEMBERS), &move |layout| {
            for (i, m) in MEMBERS.iter().enumerate() {
                let path = layout.dir.join(format!("{m}.toml"));
                let mut cfg: RawMemberConfig =
                    toml::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
                cfg.access = vec![rule(&rules[i])];
                std::fs::write(&path, toml::to_string(&cfg).unwrap()).unwrap();
            }
        })
        .await;
        let mut people: [Vec<Vec<String>>; 2] = Default::default();
        for (i, m) in MEMBERS.iter().enumerate() {
            let b = region
                .owner_rows(
                    m,
                    "SELECT id_number, name, phone, county_code FROM enrollment",
                )
                .await;
            let cols: Vec<Vec<String>> = ["id_number", "name", "phone", "county_code"]
                .iter()
                .map(|c| column_strings(&b, c))
                .collect();
            people[i] = (0..cols[0].len())
                .map(|r| cols.iter().map(|c| c[r].clone()).collect())
                .collect();
        }
        let client = region.client("hangzhou");
        let mut answered = 0;
        // Each member also gets a query its rule allows, which must be answered, so a
        // run where everything is refused cannot pass unnoticed.
        let allowed = |m: usize| -> Option<String> {
            let w = format!("member = '{}'", MEMBERS[m]);
            match &policies[m] {
                Policy::Rows | Policy::Masked(_) => Some(format!(
                    "SELECT id_number, name, phone FROM enrollment WHERE {w}"
                )),
                Policy::Aggregate { .. } => {
                    Some(format!("SELECT count(*) AS n FROM enrollment WHERE {w}"))
                }
                Policy::Verify => Some(format!(
                    "SELECT count(*) AS n FROM enrollment WHERE {w} AND id_number = '{}'",
                    people[m][0][0]
                )),
                Policy::Deny => None,
            }
        };
        let mut must_answer = BTreeSet::new();
        let mut work: Vec<(usize, String)> = Vec::new();
        for m in 0..2 {
            if let Some(sql) = allowed(m) {
                must_answer.insert(sql.clone());
                work.push((m, sql));
            }
        }
        for (m, shape, pick) in queries {
            let m = m % 2;
            work.push((m, query(MEMBERS[m], shape, pick, &people[m])));
        }
        for (m, sql) in work {
            let result = client
                .query_with(QueryRequest {
                    sql: sql.clone(),
                    timeout_ms: 30_000,
                    ..Default::default()
                })
                .await;
            let policy = &policies[m];
            let answer = match (result, policy) {
                (Err(f), Policy::Deny) => {
                    prop_assert_eq!(f.status.code(), tonic::Code::PermissionDenied, "{}", sql);
                    continue;
                }
                (Ok(_), Policy::Deny) => {
                    return Err(TestCaseError::fail(format!(
                        "{sql}: a denied member answered"
                    )));
                }
                (Err(f), Policy::Rows) => {
                    return Err(TestCaseError::fail(format!(
                        "{sql}: refused under rows: {f}"
                    )));
                }
                (Err(f), _) if must_answer.contains(&sql) => {
                    return Err(TestCaseError::fail(format!(
                        "{sql}: allowed by {policy:?}, refused: {f}"
                    )));
                }
                // Refusing is always within the rules.
                (Err(f), _) => {
                    prop_assert_eq!(
                        f.status.code(),
                        tonic::Code::PermissionDenied,
                        "{}: {}",
                        sql,
                        f
                    );
                    continue;
                }
                (Ok(a), _) => a,
            };
            answered += 1;
            let (whole, parts, shown) = forbidden(policy, &people[m]);
            for field in answer.schema.fields() {
                let values = column_strings(&answer.batches, field.name());
                for v in &values {
                    prop_assert!(
                        !whole.contains(v),
                        "{}: {} leaked {:?}",
                        sql,
                        field.name(),
                        v
                    );
                    for p in parts.iter().filter(|_| !shown.contains(v)) {
                        prop_assert!(
                            !v.contains(p.as_str()),
                            "{}: {} leaked the hidden part of an ID in {:?}",
                            sql,
                            field.name(),
                            v
                        );
                    }
                }
                if field.name() == "n" {
                    let ns: Vec<i64> = values.iter().map(|v| v.parse().unwrap()).collect();
                    match policy {
                        Policy::Aggregate { k, .. } => {
                            prop_assert!(
                                ns.iter().all(|n| *n == 0 || *n >= *k as i64),
                                "{}: group below k={}: {:?}",
                                sql,
                                k,
                                ns
                            )
                        }
                        Policy::Verify => {
                            prop_assert!(ns.iter().all(|n| *n == 0 || *n == 1), "{}: {:?}", sql, ns)
                        }
                        _ => {}
                    }
                }
            }
        }
        prop_assert!(
            answered >= must_answer.len(),
            "{} answered, {:?}",
            answered,
            policies
        );
        Ok(())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, failure_persistence: None, max_shrink_iters: 4, ..ProptestConfig::default() })]

    #[test]
    fn no_answer_holds_a_value_the_owners_rules_withhold(
        a in policy(),
        b in policy(),
        queries in prop::collection::vec((0usize..2, 0usize..11, 0usize..10_000), 14),
    ) {
        run_case([a, b], queries)?;
    }
}
