//! Plans reused across constants: a query that differs from an earlier one only in the
//! constants of its filters is bound from the earlier one's shape, at the coordinator
//! and at each member, and answers for its own values. The expected answers are
//! computed here from the members' files, never from fedgate's output.

use std::collections::BTreeMap;

use fedgate::proto::v1::QueryRequest;

use crate::support::{Region, column_strings, read_csv};

/// Rows of `file` at `member` whose column `col`, as `normalize` makes it, is `value`.
fn count_where(
    region: &Region,
    member: &str,
    file: &str,
    col: &str,
    normalize: &dyn Fn(&str) -> String,
    value: &str,
) -> usize {
    let (h, rows) = read_csv(&region.data().join(member).join(file));
    let i = h.iter().position(|c| c == col).unwrap();
    rows.iter().filter(|r| normalize(&r[i]) == value).count()
}

#[tokio::test]
async fn lookups_with_new_constants_are_bound_from_their_shape_and_answer_for_their_values() {
    let region = Region::start().await;
    let office = region.client("hangzhou");
    let mut bound = 0;
    for (i, m) in ["anji", "hangzhou", "shanghai", "suzhou", "anji"]
        .into_iter()
        .enumerate()
    {
        let sql = format!("SELECT count(*) AS n FROM fever_clinics WHERE member = '{m}'");
        let a = office.query(&sql, false, None).await.unwrap();
        let want = read_csv(&region.data().join(m).join("fever_clinics.csv"))
            .1
            .len();
        assert_eq!(column_strings(&a.batches, "n"), [want.to_string()], "{sql}");
        // The first query plans the shape; the others bind the shape's optimized
        // plan (the last one repeats the first's text, which the plan cache answers).
        let s = &a.summary;
        match i {
            0 => assert!(
                !s.plan_bound && !s.plan_bound_optimized && !s.plan_cached,
                "{sql}"
            ),
            4 => assert!(s.plan_cached, "{sql}"),
            _ => {
                assert!(
                    s.plan_bound && s.plan_bound_optimized && !s.plan_cached,
                    "{sql}"
                );
                bound += 1;
            }
        }
    }
    assert_eq!(bound, 3);
    // Planned from the text (the plan caches off), the answer is the same.
    let sql = "SELECT count(*) AS n FROM fever_clinics WHERE member = 'suzhou'";
    let a = office
        .query_with(QueryRequest {
            sql: sql.into(),
            no_plan_cache: true,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(!a.summary.plan_bound && !a.summary.plan_cached);
    let want = read_csv(&region.data().join("suzhou").join("fever_clinics.csv"))
        .1
        .len();
    assert_eq!(column_strings(&a.batches, "n"), [want.to_string()]);
}

/// The weakest useful grant, `verify`, under plans bound from a shape: each value is
/// checked by the owner's rewrite as the constant it is (an ID enrolled here counts,
/// one that is not counts nothing), and a constant of another kind (a number for a
/// text key, which binding refuses, so the text is planned) or another operator is a
/// shape of its own, and refused.
#[tokio::test]
async fn a_verify_grant_checks_every_bound_value_and_other_shapes_are_refused() {
    let region = Region::start().await;
    let hefei = region.client_as("hefei", "hefei");
    let normalize = |s: &str| s.trim().to_uppercase();
    let (h, rows) = read_csv(&region.data().join("hangzhou").join("ybcb.csv"));
    let col = h.iter().position(|c| c == "公民身份号码").unwrap();
    let valid = |s: &str| {
        s.len() == 18
            && s[..17].bytes().all(|b| b.is_ascii_digit())
            && (s.as_bytes()[17].is_ascii_digit() || s.ends_with('X'))
    };
    let mut ids: Vec<String> = rows
        .iter()
        .map(|r| normalize(&r[col]))
        .filter(|s| valid(s))
        .take(3)
        .collect();
    assert_eq!(ids.len(), 3);
    // An ID of the right form that no member enrolls.
    ids.push("110101190001010017".into());
    let ask = |id: &str| {
        format!(
            "SELECT member, count(*) AS enrolled FROM enrollment WHERE id_number = '{id}' \
             GROUP BY member"
        )
    };
    let mut seen = BTreeMap::new();
    for (i, id) in ids.iter().enumerate() {
        let a = hefei.query(&ask(id), false, None).await.unwrap();
        assert_eq!(a.summary.plan_bound, i > 0, "{id}");
        let members = column_strings(&a.batches, "member");
        let counts = column_strings(&a.batches, "enrolled");
        let got: BTreeMap<_, _> = members.into_iter().zip(counts).collect();
        let want = count_where(
            &region,
            "hangzhou",
            "ybcb.csv",
            "公民身份号码",
            &normalize,
            id,
        );
        let at_hangzhou = got.get("hangzhou").map(String::as_str).unwrap_or("0");
        assert_eq!(at_hangzhou, want.to_string(), "{id}: {got:?}");
        seen.insert(id.clone(), want);
    }
    assert!(seen.values().any(|n| *n > 0) && seen.values().any(|n| *n == 0));
    // The same query with a number, or with another operator, is another shape: the
    // verify rule refuses it as it refuses the text planned anew.
    for sql in [
        "SELECT member, count(*) AS enrolled FROM enrollment WHERE id_number = 5 GROUP BY member",
        "SELECT member, count(*) AS enrolled FROM enrollment WHERE id_number > '3' GROUP BY member",
        "SELECT member, count(*) AS enrolled FROM enrollment WHERE id_number >= '3' GROUP BY member",
    ] {
        let e = hefei.query(sql, false, None).await.unwrap_err().to_string();
        assert!(e.contains("verif"), "{sql}: {e}");
    }
}

/// Nanoseconds since the epoch, now.
fn wall_ns() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as i64
}

/// `now()` is each query's own time, whatever plan the query reuses: the same text
/// again (the plan caches), new constants (bound from the shape, then into its
/// optimized plan), at the coordinator (which computes the select list of an
/// aggregate over several members) and at a member answering the whole query.
#[tokio::test]
async fn now_is_each_querys_own_time_whatever_plan_it_reuses() {
    let region = Region::start().await;
    let office = region.client("hangzhou");
    let templates = [
        "SELECT CAST(now() AS BIGINT) AS t, count(*) AS n FROM census WHERE pop_total > {k}",
        "SELECT CAST(now() AS BIGINT) AS t, count(*) AS n FROM census \
         WHERE member = 'anji' AND pop_total > {k}",
    ];
    for template in templates {
        for k in [1, 1, 2, 3, 3] {
            let sql = template.replace("{k}", &k.to_string());
            let before = wall_ns();
            let a = office.query(&sql, false, None).await.unwrap();
            let after = wall_ns();
            let t: i64 = column_strings(&a.batches, "t")[0].parse().unwrap();
            assert!(
                before <= t && t <= after,
                "{sql}: now() was {} ms before the query was sent",
                (before - t) / 1_000_000
            );
        }
    }
}
