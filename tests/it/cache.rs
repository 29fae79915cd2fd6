//! The coordinator's cache of member answers: fresh hits, expiry, stale answers in
//! place of failed members (never in place of a refusal), no hit across callers, and
//! identical queries in flight sharing one fan-out.

use std::time::Duration;

use fedgate::config::raw::RawAccessRule;
use fedgate::proto::v1::{MemberState, QueryRequest};
use fedgate::tools::demo::Materialized;

use crate::proxy::Fault;
use crate::support::{Region, member_state, member_status, patch_member, patch_region, states};

const PER_MEMBER: &str = "SELECT member, count(*) AS n FROM census GROUP BY member ORDER BY member";

/// Caches `census` answers for `fresh`, then `stale` more for failed members.
fn cache_census(fresh: &'static str, stale: Option<&'static str>) -> impl Fn(&Materialized) {
    move |layout: &Materialized| {
        patch_region(layout, |r| {
            let d = r.datasets.iter_mut().find(|d| d.name == "census").unwrap();
            d.cache_fresh_for = Some(fresh.into());
            d.cache_stale_for = stale.map(Into::into);
        })
    }
}

/// Sub-queries the member's audit log has recorded.
fn audited(region: &Region, member: &str) -> usize {
    crate::support::sub_query_records(&region.audit_log(member)).len()
}

#[tokio::test]
async fn a_fresh_answer_is_served_without_asking_the_members_and_expires() {
    let region = Region::start_patched(None, &cache_census("800ms", None)).await;
    let client = region.client(crate::support::OFFICE);
    let first = client.query(PER_MEMBER, false, None).await.unwrap();
    assert!(
        states(&first.summary)
            .iter()
            .all(|(_, s)| *s == MemberState::Ok)
    );
    let before = audited(&region, "suzhou");

    let second = client.query(PER_MEMBER, false, None).await.unwrap();
    assert!(
        states(&second.summary)
            .iter()
            .all(|(_, s)| *s == MemberState::Cached),
        "{:?}",
        second.summary
    );
    assert!(!second.summary.partial);
    let suzhou = member_status(&second.summary, "suzhou");
    assert!(suzhou.age_ms < 800, "{suzhou:?}");
    assert!(suzhou.reason.contains("cache"), "{suzhou:?}");
    assert_eq!(
        crate::support::column_strings(&second.batches, "n"),
        crate::support::column_strings(&first.batches, "n")
    );
    assert_eq!(audited(&region, "suzhou"), before, "suzhou was not asked");

    // Past its freshness the answer is asked for again.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let third = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(member_state(&third.summary, "suzhou"), MemberState::Ok);
    assert_eq!(audited(&region, "suzhou"), before + 1);
}

#[tokio::test]
async fn answers_are_not_shared_across_callers_or_purposes() {
    let region = Region::start_patched(None, &cache_census("1h", None)).await;
    let office = region.client(crate::support::OFFICE);
    office.query(PER_MEMBER, false, None).await.unwrap();
    let city = region.client_as("shanghai", "hangzhou");
    let other = city.query(PER_MEMBER, false, None).await.unwrap();
    assert!(
        states(&other.summary)
            .iter()
            .all(|(_, s)| *s == MemberState::Ok),
        "another caller is answered by the members: {:?}",
        other.summary
    );
    let with_purpose = office
        .query_with(QueryRequest {
            sql: PER_MEMBER.into(),
            purpose: "planning".into(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(
        member_state(&with_purpose.summary, "suzhou"),
        MemberState::Ok
    );
    let again = office.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(member_state(&again.summary, "suzhou"), MemberState::Cached);
}

#[tokio::test]
async fn a_failed_member_is_answered_from_its_stale_answer_marked_with_its_age() {
    let (region, proxies) =
        Region::start_behind_proxies(&["suzhou"], &cache_census("200ms", Some("1h"))).await;
    let client = region.client(crate::support::OFFICE);
    let first = client.query(PER_MEMBER, false, None).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    proxies["suzhou"].set(Fault::Reset);
    proxies["suzhou"].kill_connections();
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    let suzhou = member_status(&a.summary, "suzhou");
    assert_eq!(
        member_state(&a.summary, "suzhou"),
        MemberState::Stale,
        "{suzhou:?}"
    );
    assert!(suzhou.age_ms >= 300, "{suzhou:?}");
    assert!(
        suzhou.reason.contains("served its cached answer"),
        "{suzhou:?}"
    );
    assert_eq!(member_state(&a.summary, "shanghai"), MemberState::Ok);
    // The stale answer is whole: every member's row is there.
    assert_eq!(a.summary.rows, first.summary.rows);
    assert_eq!(
        crate::support::column_strings(&a.batches, "n"),
        crate::support::column_strings(&first.batches, "n")
    );
}

#[tokio::test]
async fn a_refusal_is_never_covered_by_a_cached_answer() {
    let mut region = Region::start_patched(None, &cache_census("200ms", Some("1h"))).await;
    let client = region.client(crate::support::OFFICE);
    client.query(PER_MEMBER, false, None).await.unwrap();
    // Suzhou now refuses census to everyone.
    region.stop("suzhou").await;
    patch_member(&region.layout, "suzhou", |m| {
        m.access.insert(
            0,
            RawAccessRule {
                incident: None,
                principals: vec!["*".into()],
                datasets: vec!["census".into()],
                level: "deny".into(),
                fields: Default::default(),
                min_group: None,
                dimensions: vec![],
                keys: vec![],
                purposes: vec![],
                via: vec![],
            },
        )
    });
    region.restart("suzhou").await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    assert_eq!(
        member_state(&a.summary, "suzhou"),
        MemberState::Denied,
        "{:?}",
        a.summary
    );
    assert!(a.summary.partial);
    assert!(!crate::support::column_strings(&a.batches, "member").contains(&"suzhou".to_string()));
}

#[tokio::test]
async fn identical_queries_in_flight_share_one_fan_out() {
    let (region, proxies) =
        Region::start_behind_proxies(&["suzhou"], &cache_census("1h", None)).await;
    proxies["suzhou"].set(Fault::Delay(Duration::from_millis(200)));
    let before = audited(&region, "suzhou");
    let queries: Vec<_> = (0..4)
        .map(|_| {
            let c = region.client(crate::support::OFFICE);
            tokio::spawn(async move { c.query(PER_MEMBER, false, None).await })
        })
        .collect();
    let mut suzhou = Vec::new();
    for q in queries {
        let a = q.await.unwrap().unwrap();
        assert_eq!(a.summary.rows, 5);
        suzhou.push(member_state(&a.summary, "suzhou"));
    }
    suzhou.sort_by_key(|s| *s as i32);
    assert_eq!(
        suzhou,
        vec![
            MemberState::Ok,
            MemberState::Cached,
            MemberState::Cached,
            MemberState::Cached
        ]
    );
    assert_eq!(audited(&region, "suzhou"), before + 1);
}
