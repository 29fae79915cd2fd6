//! Data sovereignty in the sample region: enrollment (generated people) is served by
//! Hangzhou and Suzhou, whose own rules make it aggregate-only for the regional office,
//! masked for a county handling a transfer, keyed hashes for a duplicate check,
//! verify-only for other cities, and nothing for anyone else. Every answer here is
//! compared with what the owners' files hold.

use std::collections::{BTreeMap, BTreeSet};

use datafusion::arrow::record_batch::RecordBatch;
use fedgate::owner::masking::Mask;
use fedgate::proto::v1::{MemberState, QueryRequest};
use fedgate::tools::client::{Answer, Client, Failure};

use crate::support::{Region, audit_records, column_strings, sub_query_records};

/// One person as the owner's canonical view has them.
#[derive(Debug, Clone)]
struct Person {
    member: String,
    id: String,
    name: String,
    phone: String,
    county: String,
    sex: String,
    scheme: String,
    status: String,
    /// Empty when the owner has no value.
    birth_year: String,
}

async fn people(region: &Region) -> Vec<Person> {
    let mut out = Vec::new();
    for m in ["hangzhou", "suzhou"] {
        let b = region
            .owner_rows(
                m,
                "SELECT member, id_number, name, phone, county_code, sex, scheme, status, birth_year FROM enrollment",
            )
            .await;
        let col = |n: &str| column_strings(&b, n);
        let birth_year = col("birth_year");
        let (member, id, name, phone, county, sex, scheme, status) = (
            col("member"),
            col("id_number"),
            col("name"),
            col("phone"),
            col("county_code"),
            col("sex"),
            col("scheme"),
            col("status"),
        );
        for i in 0..id.len() {
            out.push(Person {
                member: member[i].clone(),
                id: id[i].clone(),
                name: name[i].clone(),
                phone: phone[i].clone(),
                county: county[i].clone(),
                sex: sex[i].clone(),
                scheme: scheme[i].clone(),
                status: status[i].clone(),
                birth_year: birth_year[i].clone(),
            });
        }
    }
    assert!(out.len() > 1000, "the demo has generated enrollment data");
    out
}

fn q(sql: &str, purpose: &str) -> QueryRequest {
    QueryRequest {
        sql: sql.into(),
        purpose: purpose.into(),
        timeout_ms: 30_000,
        ..Default::default()
    }
}

async fn ok(c: &Client, sql: &str, purpose: &str) -> Answer {
    c.query_with(q(sql, purpose))
        .await
        .unwrap_or_else(|f| panic!("{sql}: {f}"))
}

async fn refused(c: &Client, sql: &str, purpose: &str) -> Failure {
    match c.query_with(q(sql, purpose)).await {
        Ok(a) => panic!("{sql}: expected a refusal, got {:?}", a.batches),
        Err(f) => f,
    }
}

fn ints(b: &[RecordBatch], col: &str) -> Vec<i64> {
    column_strings(b, col)
        .iter()
        .map(|s| s.parse().unwrap())
        .collect()
}

/// The sizes of the (county, sex, scheme, status) cells of each member: the unit the
/// aggregate rule suppresses by.
fn cells(people: &[Person]) -> BTreeMap<(String, String, String, String, String), i64> {
    let mut m = BTreeMap::new();
    for p in people {
        *m.entry((
            p.member.clone(),
            p.county.clone(),
            p.sex.clone(),
            p.scheme.clone(),
            p.status.clone(),
        ))
        .or_insert(0) += 1;
    }
    m
}

#[tokio::test]
async fn masked_answers_equal_the_owners_rows_masked() {
    let region = Region::start().await;
    let people = people(&region).await;
    let anji = region.client_as("anji", "anji");
    let a = ok(
        &anji,
        "SELECT member, id_number, name, phone, county_code FROM enrollment",
        "insurance-transfer: AJ-2026-0117",
    )
    .await;
    let got: BTreeSet<(String, String, String, String, String)> = {
        let c = |n: &str| column_strings(&a.batches, n);
        let (m, i, n, p, k) = (
            c("member"),
            c("id_number"),
            c("name"),
            c("phone"),
            c("county_code"),
        );
        (0..m.len())
            .map(|r| {
                (
                    m[r].clone(),
                    i[r].clone(),
                    n[r].clone(),
                    p[r].clone(),
                    k[r].clone(),
                )
            })
            .collect()
    };
    // The reference: the owners' rows passed through the masks the rule names.
    let mask = |m: Mask, v: &str| {
        if v.is_empty() {
            String::new()
        } else {
            m.apply(v, b"").unwrap()
        }
    };
    let want: BTreeSet<_> = people
        .iter()
        .map(|p| {
            (
                p.member.clone(),
                mask(Mask::IdKeepEnds, &p.id),
                mask(Mask::Surname, &p.name),
                mask(Mask::Phone, &p.phone),
                p.county.clone(),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert!(!got.is_empty(), "the rule releases masked rows");
    let raw: BTreeSet<&str> = people
        .iter()
        .flat_map(|p| [p.id.as_str(), p.phone.as_str()])
        .collect();
    for row in &got {
        assert!(!raw.contains(row.1.as_str()) && !raw.contains(row.3.as_str()));
        assert_eq!(&row.1[6..14], "********", "{row:?}");
    }
    for m in &a.summary.members {
        if m.state == MemberState::Ok as i32 {
            assert!(m.access.contains("masked"), "{m:?}");
            assert!(!m.audit_hash.is_empty(), "{m:?}");
        }
    }
}

#[tokio::test]
async fn filters_functions_and_orderings_over_masked_fields_reveal_nothing_hidden() {
    let region = Region::start().await;
    let people = people(&region).await;
    let anji = region.client_as("anji", "anji");
    let purpose = "insurance-transfer: AJ-2026-0117";
    let p = &people[0];
    // A prefix running into the hidden birth date matches nothing: the filter sees
    // only the masked value.
    let prefix = &p.id[..9];
    let truth = people.iter().filter(|x| x.id.starts_with(prefix)).count();
    assert!(truth >= 1);
    let a = ok(
        &anji,
        &format!("SELECT count(*) AS n FROM enrollment WHERE id_number LIKE '{prefix}%'"),
        purpose,
    )
    .await;
    assert_eq!(ints(&a.batches, "n"), vec![0]);
    // Equality with a real value finds nothing either.
    for (field, value) in [("id_number", &p.id), ("phone", &p.phone), ("name", &p.name)] {
        let a = ok(
            &anji,
            &format!("SELECT count(*) AS n FROM enrollment WHERE {field} = '{value}'"),
            purpose,
        )
        .await;
        assert_eq!(ints(&a.batches, "n"), vec![0], "{field}");
    }
    let a = ok(
        &anji,
        "SELECT DISTINCT substr(id_number, 7, 8) AS mid FROM enrollment",
        purpose,
    )
    .await;
    assert_eq!(column_strings(&a.batches, "mid"), vec!["********"]);
    let a = ok(
        &anji,
        "SELECT DISTINCT length(name) AS l FROM enrollment ORDER BY l",
        purpose,
    )
    .await;
    for l in ints(&a.batches, "l") {
        assert!(
            l == 2 || l == 3,
            "a masked name is a surname and one *: {l}"
        );
    }
    let a = ok(
        &anji,
        "SELECT id_number, phone FROM enrollment ORDER BY id_number DESC, phone LIMIT 20",
        purpose,
    )
    .await;
    for id in column_strings(&a.batches, "id_number") {
        assert!(id.contains("********"), "{id}");
    }
}

/// Lookups of one shape under a masked grant, from the second on bound into the
/// shape's optimized plan at the coordinator and at the owners: each value is still
/// compared with the masked field, as a constant written in the text is. A real ID
/// finds nothing; the masked form of an ID finds the people whose IDs mask to it.
#[tokio::test]
async fn values_bound_into_an_optimized_shape_meet_only_masked_fields() {
    let region = Region::start().await;
    let people = people(&region).await;
    let anji = region.client_as("anji", "anji");
    let purpose = "insurance-transfer: AJ-2026-0117";
    let seen = ok(&anji, "SELECT id_number FROM enrollment", purpose).await;
    let masked = column_strings(&seen.batches, "id_number");
    let m0 = masked[0].clone();
    assert!(m0.contains("********"), "{m0}");
    let want_m0 = masked.iter().filter(|m| **m == m0).count() as i64;
    let cases = [
        (people[0].id.clone(), 0),
        (people[1].id.clone(), 0),
        (m0, want_m0),
        (people[2].id.clone(), 0),
    ];
    for (i, (value, want)) in cases.iter().enumerate() {
        let sql = format!("SELECT count(*) AS n FROM enrollment WHERE id_number = '{value}'");
        let a = ok(&anji, &sql, purpose).await;
        assert_eq!(ints(&a.batches, "n"), vec![*want], "{sql}");
        assert_eq!(a.summary.plan_bound_optimized, i > 0, "{sql}");
    }
}

#[tokio::test]
async fn purposes_are_required_checked_and_named_in_denials() {
    let region = Region::start().await;
    let anji = region.client_as("anji", "anji");
    let sql = "SELECT count(*) AS n FROM enrollment";
    for purpose in ["", "curiosity: none"] {
        let f = refused(&anji, sql, purpose).await;
        assert_eq!(f.status.code(), tonic::Code::PermissionDenied, "{f}");
        let msg = f.status.message();
        assert!(msg.contains("insurance-transfer"), "{msg}");
        assert!(
            msg.contains("hangzhou") || msg.contains("suzhou"),
            "the denial names the member: {msg}"
        );
        let s = f.summary.expect("a summary comes with a denial");
        let denied: Vec<_> = s
            .members
            .iter()
            .filter(|m| m.state == MemberState::Denied as i32)
            .map(|m| m.member.as_str())
            .collect();
        assert_eq!(denied, vec!["hangzhou", "suzhou"], "{s:?}");
    }
    let f = refused(&anji, sql, "insurance-transfer\n: x").await;
    assert_eq!(f.status.code(), tonic::Code::InvalidArgument, "{f}");
    ok(&anji, sql, "insurance-transfer: AJ-2026-0117").await;
}

#[tokio::test]
async fn aggregate_answers_release_only_groups_of_whole_cells_of_at_least_k() {
    let region = Region::start().await;
    let people = people(&region).await;
    let cells = cells(&people);
    assert!(
        cells.values().any(|n| *n < 10),
        "the demo data has small cells to suppress"
    );
    let office = region.client("shanghai");
    let a = ok(
        &office,
        "SELECT member, county_code, sex, count(*) AS n FROM enrollment \
         GROUP BY member, county_code, sex ORDER BY member, county_code, sex",
        "",
    )
    .await;
    // Reference: cells of fewer than 10 records are left out, the rest summed.
    let mut want: BTreeMap<(String, String, String), i64> = BTreeMap::new();
    for ((m, c, s, _, _), n) in &cells {
        if *n >= 10 {
            *want.entry((m.clone(), c.clone(), s.clone())).or_insert(0) += n;
        }
    }
    let got: BTreeMap<(String, String, String), i64> = {
        let (m, c, s) = (
            column_strings(&a.batches, "member"),
            column_strings(&a.batches, "county_code"),
            column_strings(&a.batches, "sex"),
        );
        let n = ints(&a.batches, "n");
        (0..n.len())
            .map(|i| ((m[i].clone(), c[i].clone(), s[i].clone()), n[i]))
            .collect()
    };
    assert_eq!(got, want);
    // The comparison above proves something only if the reference both releases and
    // suppresses: some groups lose records to small cells, and some answer.
    let groups: BTreeSet<(&str, &str, &str)> = people
        .iter()
        .map(|p| (p.member.as_str(), p.county.as_str(), p.sex.as_str()))
        .collect();
    let whole = groups.iter().filter(|(m, c, s)| {
        let key = (m.to_string(), c.to_string(), s.to_string());
        let all = people
            .iter()
            .filter(|p| (p.member.as_str(), p.county.as_str(), p.sex.as_str()) == (*m, *c, *s))
            .count() as i64;
        want.get(&key) == Some(&all)
    });
    assert!(!want.is_empty());
    assert!(
        whole.count() < groups.len(),
        "some group loses a small cell"
    );

    // Differencing: a county's count minus the count of any sub-population selected by
    // dimensions is again a sum of whole cells: zero or at least k, never a lone person.
    let counties: BTreeSet<&str> = people.iter().map(|p| p.county.as_str()).collect();
    let count = |filter: String| {
        let office = office.clone();
        async move {
            let a = ok(
                &office,
                &format!("SELECT count(*) AS n FROM enrollment WHERE {filter}"),
                "",
            )
            .await;
            ints(&a.batches, "n")[0]
        }
    };
    let mut diffs = 0;
    for c in counties.iter().take(6) {
        let all = count(format!("county_code = '{c}'")).await;
        for sub in [
            "sex = 'male'",
            "status = 'active'",
            "scheme = 'employee' AND status = 'active'",
            "NOT (sex = 'female' AND status = 'suspended')",
        ] {
            let part = count(format!("county_code = '{c}' AND {sub}")).await;
            let d = all - part;
            assert!(d == 0 || d >= 10, "{c} minus {sub}: difference {d}");
            diffs += 1;
        }
    }
    assert!(diffs >= 12);
}

#[tokio::test]
async fn aggregate_access_refuses_records_and_everything_that_could_single_one_out() {
    let region = Region::start().await;
    let people = people(&region).await;
    let office = region.client("shanghai");
    let id = &people[0].id;
    let cases = [
        ("SELECT * FROM enrollment", "returns its records"),
        (
            "SELECT county_code, name FROM enrollment",
            "returns its records",
        ),
        (
            "SELECT birth_year, count(*) FROM enrollment GROUP BY birth_year",
            "grouped only by its dimensions",
        ),
        (
            "SELECT id_number, count(*) FROM enrollment GROUP BY id_number",
            "grouped only by its dimensions",
        ),
        (
            "SELECT county_code, count(*) FROM enrollment WHERE name LIKE '张%' GROUP BY county_code",
            "filtered only by its dimensions",
        ),
        (
            "SELECT county_code, max(birth_year) AS m FROM enrollment GROUP BY county_code",
            "one record's value",
        ),
        (
            &format!(
                "SELECT county_code, sum(CASE WHEN id_number = '{id}' THEN 1 ELSE 0 END) AS s \
                 FROM enrollment GROUP BY county_code"
            ),
            "cannot be computed from its cells",
        ),
        (
            "SELECT count(*) FROM (SELECT * FROM enrollment ORDER BY birth_year LIMIT 1) t",
            "not allowed",
        ),
        (
            &format!(
                "SELECT count(*) FROM enrollment WHERE county_code IN \
                 (SELECT county_code FROM enrollment WHERE id_number = '{id}')"
            ),
            // Planned as a semi join, either side's sub-query may be refused first.
            "shared with this caller",
        ),
    ];
    for (sql, needle) in cases {
        let f = refused(&office, sql, "").await;
        assert_eq!(f.status.code(), tonic::Code::PermissionDenied, "{sql}: {f}");
        let msg = f.status.message();
        assert!(msg.contains(needle), "{sql}: {msg}");
        assert!(msg.contains("aggregate(k=10)"), "{sql}: {msg}");
        assert!(msg.contains("access["), "the rule is named: {msg}");
    }
    // Measures may be summed and averaged; groups that fail HAVING simply vanish.
    // The reference is computed from the owners' records: per county, the records of
    // cells of at least 10 (the rest are suppressed before any caller's expression
    // runs), and HAVING keeps the counties whose released count is at least 25.
    let cells = cells(&people);
    let mut want: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for p in &people {
        let key = (
            p.member.clone(),
            p.county.clone(),
            p.sex.clone(),
            p.scheme.clone(),
            p.status.clone(),
        );
        if cells[&key] >= 10 {
            let e = want.entry(p.county.clone()).or_insert((0, 0));
            e.0 += 1;
            e.1 += p.birth_year.parse::<i64>().unwrap_or(0);
        }
    }
    let before = want.len();
    want.retain(|_, (n, _)| *n >= 25);
    assert!(
        !want.is_empty() && want.len() < before,
        "HAVING keeps some counties and drops others"
    );
    let a = ok(
        &office,
        "SELECT county_code, sum(birth_year) AS s, count(*) AS n \
         FROM enrollment GROUP BY county_code HAVING count(*) >= 25",
        "",
    )
    .await;
    let (c, s, n) = (
        column_strings(&a.batches, "county_code"),
        ints(&a.batches, "s"),
        ints(&a.batches, "n"),
    );
    let got: BTreeMap<String, (i64, i64)> =
        (0..c.len()).map(|i| (c[i].clone(), (n[i], s[i]))).collect();
    assert_eq!(got, want);
}

#[tokio::test]
async fn verification_answers_yes_or_no_and_nothing_else() {
    let region = Region::start().await;
    let people = people(&region).await;
    let hefei = region.client_as("hefei", "hefei");
    let p = people.iter().find(|p| p.member == "suzhou").unwrap();
    let yes = |sql: String| {
        let hefei = hefei.clone();
        async move { ints(&ok(&hefei, &sql, "").await.batches, "n") }
    };
    assert_eq!(
        yes(format!(
            "SELECT count(*) AS n FROM enrollment WHERE id_number = '{}'",
            p.id
        ))
        .await,
        vec![1]
    );
    assert_eq!(
        yes(format!(
            "SELECT count(*) AS n FROM enrollment WHERE id_number = '{}' AND name = '{}'",
            p.id, p.name
        ))
        .await,
        vec![1]
    );
    assert_eq!(
        yes(format!(
            "SELECT count(*) AS n FROM enrollment WHERE id_number = '{}' AND name = 'nobody'",
            p.id
        ))
        .await,
        vec![0],
        "no match"
    );
    assert_eq!(
        yes("SELECT count(*) AS n FROM enrollment WHERE id_number = '000000190001010000'".into())
            .await,
        vec![0],
        "not found"
    );
    let a = ok(
        &hefei,
        &format!(
            "SELECT member, count(*) AS n FROM enrollment WHERE id_number = '{}' GROUP BY member",
            p.id
        ),
        "",
    )
    .await;
    assert_eq!(column_strings(&a.batches, "member"), vec!["suzhou"]);
    assert_eq!(ints(&a.batches, "n"), vec![1]);
    // A county with several people of one sex: the count is still capped at one per
    // member, so a verification never tells how many records match.
    let county = &p.county;
    let cases = [
        format!("SELECT name FROM enrollment WHERE id_number = '{}'", p.id),
        "SELECT count(*) AS n FROM enrollment WHERE id_number LIKE '3205%'".to_string(),
        format!("SELECT count(*) AS n FROM enrollment WHERE county_code = '{county}'"),
        format!(
            "SELECT count(*) AS n FROM enrollment WHERE id_number = '{}' OR id_number = 'x'",
            p.id
        ),
        format!(
            "SELECT name, count(*) AS n FROM enrollment WHERE id_number = '{}' GROUP BY name",
            p.id
        ),
        format!(
            "SELECT count(DISTINCT name) AS n FROM enrollment WHERE id_number = '{}'",
            p.id
        ),
    ];
    for sql in &cases {
        let f = refused(&hefei, sql, "").await;
        assert_eq!(f.status.code(), tonic::Code::PermissionDenied, "{sql}: {f}");
        assert!(f.status.message().contains("verify"), "{sql}: {f}");
    }
}

#[tokio::test]
async fn keyed_hashes_join_across_members_without_revealing_ids() {
    let region = Region::start().await;
    let people = people(&region).await;
    let ids: BTreeMap<&str, BTreeSet<&str>> = people.iter().fold(BTreeMap::new(), |mut m, p| {
        m.entry(p.id.as_str())
            .or_default()
            .insert(p.member.as_str());
        m
    });
    let both = ids.values().filter(|m| m.len() == 2).count() as i64;
    let shanghai = region.client_as("shanghai", "shanghai");
    let a = ok(
        &shanghai,
        "SELECT count(*) AS n FROM enrollment h JOIN enrollment s ON h.id_number = s.id_number \
         WHERE h.member = 'hangzhou' AND s.member = 'suzhou'",
        "duplicate-check: SH-2026-0042",
    )
    .await;
    assert_eq!(ints(&a.batches, "n"), vec![both]);
    let a = ok(
        &shanghai,
        "SELECT id_number, name, phone FROM enrollment LIMIT 50",
        "duplicate-check: SH-2026-0042",
    )
    .await;
    let raw: BTreeSet<&str> = people.iter().map(|p| p.id.as_str()).collect();
    for id in column_strings(&a.batches, "id_number") {
        assert_eq!(id.len(), 32, "{id}");
        assert!(!raw.contains(id.as_str()));
    }
    // Withheld fields read as NULL.
    for v in column_strings(&a.batches, "name")
        .into_iter()
        .chain(column_strings(&a.batches, "phone"))
    {
        assert_eq!(v, "");
    }
}

#[tokio::test]
async fn describe_tells_each_caller_its_access_per_member_and_field() {
    let region = Region::start().await;
    let enrollment = |d: fedgate::proto::v1::DescribeResponse| {
        d.datasets
            .into_iter()
            .find(|d| d.name == "enrollment")
            .unwrap()
            .access
    };
    let office = enrollment(region.client("suzhou").describe(None).await.unwrap());
    assert_eq!(office.len(), 2, "{office:?}");
    for a in &office {
        assert_eq!(a.level, "aggregate");
        assert_eq!(a.min_group, 10);
        let f: BTreeMap<&str, &str> = a
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.access.as_str()))
            .collect();
        assert_eq!(f["county_code"], "dimension");
        assert_eq!(f["id_number"], "measure");
    }
    let anji = region.client_as("anji", "anji");
    for a in enrollment(anji.describe(None).await.unwrap()) {
        assert_eq!(a.level, "denied", "{a:?}");
        assert_eq!(a.purposes, vec!["insurance-transfer", "enrollment-check"]);
    }
    for a in enrollment(anji.describe(Some("insurance-transfer")).await.unwrap()) {
        assert_eq!(a.level, "masked", "{a:?}");
        let f: BTreeMap<&str, &str> = a
            .fields
            .iter()
            .map(|f| (f.field.as_str(), f.access.as_str()))
            .collect();
        assert_eq!(f["id_number"], "masked:id_keep_ends");
        assert_eq!(f["county_code"], "rows");
    }
    let hefei = region.client_as("hefei", "hefei");
    for a in enrollment(hefei.describe(None).await.unwrap()) {
        assert_eq!(a.level, "verify");
        assert!(
            a.fields
                .iter()
                .any(|f| f.field == "id_number" && f.access == "key")
        );
    }
}

#[tokio::test]
async fn every_sub_query_answered_or_refused_is_on_a_chain_that_shows_tampering() {
    let region = Region::start().await;
    let people = people(&region).await;
    let office = region.client("shanghai");
    let hangzhou_log = region.audit_log("hangzhou");
    let before = sub_query_records(&hangzhou_log).len();
    // Answered at hangzhou: 3. Refused at hangzhou: 2 (the filter on member keeps
    // the other members out, so each query is exactly one sub-query there).
    let mut hashes = Vec::new();
    for sql in [
        "SELECT county_code, count(*) AS n FROM enrollment WHERE member = 'hangzhou' GROUP BY county_code",
        "SELECT sex, count(*) AS n FROM enrollment WHERE member = 'hangzhou' GROUP BY sex",
        "SELECT count(*) AS n FROM enrollment WHERE member = 'hangzhou'",
    ] {
        let a = ok(&office, sql, "planning: 2026 budget").await;
        let h = &a
            .summary
            .members
            .iter()
            .find(|m| m.member == "hangzhou")
            .unwrap()
            .audit_hash;
        assert_eq!(h.len(), 64, "{:?}", a.summary);
        hashes.push(h.clone());
    }
    for sql in [
        "SELECT * FROM enrollment WHERE member = 'hangzhou'",
        &format!(
            "SELECT count(*) AS n FROM enrollment WHERE member = 'hangzhou' AND id_number = '{}'",
            people[0].id
        ),
    ] {
        refused(&office, sql, "").await;
    }
    let subs = sub_query_records(&hangzhou_log);
    let new = &subs[before..];
    let decisions: Vec<&str> = new
        .iter()
        .map(|r| r["entry"]["decision"].as_str().unwrap())
        .collect();
    assert_eq!(
        decisions,
        vec!["answered", "answered", "answered", "refused", "refused"]
    );
    for r in new {
        assert_eq!(r["entry"]["origin"], "fedgate://yrd/office/coordination");
        assert_eq!(r["entry"]["via"], "fedgate://yrd/city/shanghai");
        assert_eq!(r["entry"]["datasets"], serde_json::json!(["enrollment"]));
    }
    assert_eq!(new[0]["entry"]["purpose"], "planning: 2026 budget");
    assert!(
        new[3]["entry"]["reason"]
            .as_str()
            .unwrap()
            .contains("aggregate(k=10)")
    );
    // The hashes the coordinator received are the records' hashes.
    let logged: Vec<&str> = new[..3]
        .iter()
        .map(|r| r["hash"].as_str().unwrap())
        .collect();
    assert_eq!(
        logged,
        hashes.iter().map(String::as_str).collect::<Vec<_>>()
    );
    // The coordinator recorded each client query with the members it asked.
    let queries: Vec<_> = audit_records(&region.audit_log("shanghai"))
        .into_iter()
        .filter(|r| r["entry"]["kind"] == "query")
        .collect();
    assert!(queries.len() >= 5, "{}", queries.len());
    let last_answered = &queries[queries.len() - 3];
    assert_eq!(last_answered["entry"]["decision"], "answered");
    let asked = last_answered["entry"]["members"].as_array().unwrap();
    assert!(
        asked
            .iter()
            .any(|m| m["member"] == "hangzhou" && m["audit_hash"] == hashes[2].as_str()),
        "{asked:?}"
    );

    // The real log verifies; copies with an edited, a deleted or a swapped record,
    // or cut mid-record, do not, and the first broken record is named.
    let report = fedgate::ops::audit::verify(&hangzhou_log).unwrap();
    assert!(report.broken.is_none(), "{:?}", report.broken);
    let n = report.records;
    assert!(n as usize >= subs.len());
    let text = std::fs::read_to_string(&hangzhou_log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let bin = env!("CARGO_BIN_EXE_fedgate");
    let verify_cli = |p: &std::path::Path| {
        std::process::Command::new(bin)
            .args(["audit", "verify"])
            .arg(p)
            .output()
            .unwrap()
    };
    let out = verify_cli(&hangzhou_log);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = tempfile::tempdir().unwrap();
    let k = lines.len() - 2;
    let edited: Vec<String> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| {
            if i == k {
                l.replace("\"rows\":", "\"rows\":1")
            } else {
                l.to_string()
            }
        })
        .collect();
    let mut deleted: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    deleted.remove(k);
    let mut swapped: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
    swapped.swap(k, k + 1);
    for (what, body) in [
        ("edited", edited.join("\n") + "\n"),
        ("deleted", deleted.join("\n") + "\n"),
        ("swapped", swapped.join("\n") + "\n"),
    ] {
        let p = dir.path().join(what);
        std::fs::write(&p, body).unwrap();
        let r = fedgate::ops::audit::verify(&p).unwrap();
        let b = r.broken.unwrap_or_else(|| panic!("{what} copy verified"));
        assert_eq!(b.seq, k as u64 + 1, "{what}: {}", b.problem);
        let out = verify_cli(&p);
        assert_eq!(out.status.code(), Some(1), "{what}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("broken"),
            "{what}"
        );
    }
    // A gateway killed while writing leaves a partial last line: everything before it
    // still verifies.
    let p = dir.path().join("cut");
    std::fs::write(&p, &text[..text.len() - 20]).unwrap();
    let r = fedgate::ops::audit::verify(&p).unwrap();
    assert_eq!(r.records, n - 1);
    assert_eq!(r.broken.unwrap().seq, n);
}
