//! Fair admission: a flood from one principal class is refused fast while another
//! class keeps its reserved share; a class over its rate is told when to retry.

use std::time::Duration;

use fedgate::config::raw::RawAdmission;

use crate::proxy::Fault;
use crate::support::{PER_MEMBER, Region};

fn admission(class: &str) -> RawAdmission {
    RawAdmission {
        class: class.into(),
        reserved: 0,
        max_concurrent: None,
        max_per_origin: None,
        priority: None,
        rate_per_second: None,
        burst: None,
    }
}

#[tokio::test]
async fn a_flood_from_the_cities_leaves_the_counties_their_reserved_share() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| {
            m.limits.max_concurrent_queries = Some(3);
            m.admission = vec![RawAdmission {
                reserved: 1,
                ..admission("county")
            }];
        })
    })
    .await;
    // Every query waits on a slow member, so the ones admitted hold their slots.
    proxies["suzhou"].set(Fault::Delay(Duration::from_millis(300)));
    let flood: Vec<_> = (0..12)
        .map(|_| {
            let c = region.client_as("shanghai", "hangzhou");
            tokio::spawn(async move {
                c.query(PER_MEMBER, true, Some(Duration::from_secs(4)))
                    .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let county = region.client_as("anji", "hangzhou");
    for i in 0..3 {
        let a = county
            .query(PER_MEMBER, true, Some(Duration::from_secs(4)))
            .await
            .unwrap_or_else(|f| panic!("county query {i} refused during the flood: {f}"));
        assert_eq!(a.summary.rows, 5);
    }
    let (mut answered, mut refused) = (0, 0);
    for q in flood {
        match q.await.unwrap() {
            Ok(_) => answered += 1,
            Err(f) => {
                refused += 1;
                assert_eq!(f.status.code(), tonic::Code::ResourceExhausted, "{f}");
                assert!(
                    f.status
                        .message()
                        .contains("no slots are reserved for city callers"),
                    "{f}"
                );
                let hint = f
                    .status
                    .metadata()
                    .get("grpc-retry-pushback-ms")
                    .expect("a retry hint");
                assert!(hint.to_str().unwrap().parse::<u64>().unwrap() > 0);
            }
        }
    }
    // Two shared slots: at most two city queries ran at once, and each of the twelve
    // either ran or was refused at once.
    assert!(answered >= 2, "{answered} answered, {refused} refused");
    assert!(refused >= 6, "{answered} answered, {refused} refused");
}

#[tokio::test]
async fn a_class_over_its_rate_is_refused_with_the_time_to_wait() {
    let region = Region::start_patched(None, &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| {
            m.admission = vec![RawAdmission {
                rate_per_second: Some(0.5),
                burst: Some(2.0),
                ..admission("office")
            }];
        })
    })
    .await;
    let office = region.client("hangzhou");
    office.query(PER_MEMBER, false, None).await.unwrap();
    office.query(PER_MEMBER, false, None).await.unwrap();
    let f = office.query(PER_MEMBER, false, None).await.unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::ResourceExhausted, "{f}");
    assert!(
        f.status
            .message()
            .contains("office callers are over their rate of 0.5 queries per second"),
        "{f}"
    );
    let wait: u64 = f
        .status
        .metadata()
        .get("grpc-retry-pushback-ms")
        .unwrap()
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    // A token every two seconds.
    assert!(wait > 0 && wait <= 2000, "{wait}");
    // Another class is not held to the office's rate.
    region
        .client_as("suzhou", "hangzhou")
        .query(PER_MEMBER, false, None)
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(wait + 50)).await;
    office.query(PER_MEMBER, false, None).await.unwrap();
}

#[tokio::test]
async fn an_answer_over_the_row_limit_fails_with_the_limit_named() {
    let region = Region::start_patched(None, &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| m.limits.max_rows = Some(20))
    })
    .await;
    let client = region.client("hangzhou");
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(a.summary.rows, 5);
    // More rows than an answer may have: an error, not an answer cut at 20 rows.
    let f = client
        .query("SELECT * FROM census", false, None)
        .await
        .unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::ResourceExhausted, "{f}");
    assert!(
        f.status
            .message()
            .contains("more than 20 rows (limits.max_rows)"),
        "{f}"
    );
    assert!(f.summary.unwrap().rows <= 20);
}

#[tokio::test]
async fn a_merge_over_the_memory_limit_fails_with_the_limit_named() {
    let region = Region::start_patched(None, &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| {
            m.limits.query_memory_bytes = Some(1024 * 1024)
        })
    })
    .await;
    let client = region.client("hangzhou");
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(a.summary.rows, 5);
    // A three-way cross join sorted at the coordinator: some 59,000 rows of three
    // names, more than a mebibyte, and the coordinator does not spill to disk.
    let f = client
        .query(
            "SELECT a.county_name AS x, b.county_name AS y, c.county_name AS z \
             FROM census a, census b, census c ORDER BY x, y, z",
            false,
            None,
        )
        .await
        .unwrap_err();
    assert_eq!(f.status.code(), tonic::Code::ResourceExhausted, "{f}");
    assert!(
        f.status.message().contains("limits.query_memory_bytes"),
        "{f}"
    );
}

/// Starts the sample region with Suzhou's data lake behind a fault proxy and Suzhou
/// answering at most three sub-queries at once, with `county_reserved` of them kept
/// for counties.
async fn suzhou_behind_a_slow_lake(county_reserved: usize) -> (Region, crate::proxy::FaultProxy) {
    let lake = crate::proxy::FaultProxy::start().await;
    let region = Region::start_patched(None, &|layout| {
        let (_, _, endpoint) = layout
            .gateways
            .iter()
            .find(|(n, _, _)| n == "lake/warehouse")
            .expect("the sample region's data lake");
        lake.set_target(endpoint.rsplit(':').next().unwrap().parse().unwrap());
        crate::support::patch_member(layout, "suzhou", |m| {
            let db = m.databases.iter_mut().find(|d| d.name == "lake").unwrap();
            db.port = Some(lake.port);
            m.limits.max_concurrent_subqueries = Some(3);
            m.subquery_admission = if county_reserved > 0 {
                vec![RawAdmission {
                    reserved: county_reserved,
                    ..admission("county")
                }]
            } else {
                Vec::new()
            };
        })
    })
    .await;
    (region, lake)
}

/// Shanghai's analysts flood Suzhou's pipeline survey (every such sub-query waits on
/// the slow lake and holds its slot at Suzhou), while Anji's county gateway asks a
/// question of every member. Returns Anji's summary and how the flood's queries
/// ended.
async fn county_query_during_a_city_flood(
    region: &Region,
) -> (fedgate::proto::v1::QuerySummary, Vec<Result<(), String>>) {
    let flood: Vec<_> = (0..6)
        .map(|_| {
            let c = region.client_as("shanghai", "shanghai");
            tokio::spawn(async move {
                c.query(
                    "SELECT count(*) FROM underground_pipelines WHERE member = 'suzhou'",
                    false,
                    Some(Duration::from_secs(20)),
                )
                .await
                .map(|_| ())
                .map_err(|f| f.to_string())
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let county = region
        .client_as("anji", "anji")
        .query(PER_MEMBER, true, Some(Duration::from_secs(10)))
        .await
        .unwrap_or_else(|f| panic!("the county's query failed: {f}"));
    let mut ended = Vec::new();
    for q in flood {
        ended.push(q.await.unwrap());
    }
    (county.summary, ended)
}

#[tokio::test]
async fn a_city_flooding_an_owner_leaves_the_counties_their_share_there() {
    let (region, lake) = suzhou_behind_a_slow_lake(1).await;
    lake.set(Fault::Delay(Duration::from_millis(300)));
    let (summary, flood) = county_query_during_a_city_flood(&region).await;
    // The county's sub-query at Suzhou took the slot kept for counties.
    assert_eq!(
        crate::support::member_state(&summary, "suzhou"),
        fedgate::proto::v1::MemberState::Ok,
        "{summary:?}"
    );
    assert_eq!(summary.rows, 5, "{summary:?}");
    assert!(!summary.partial, "{summary:?}");
    // The city held the two shared slots; the rest of its flood was refused by
    // Suzhou as busy (the owner's refusal, named as such), not failed on the link.
    let answered = flood.iter().filter(|r| r.is_ok()).count();
    assert!((1..=2).contains(&answered), "{flood:?}");
    for e in flood.iter().filter_map(|r| r.as_ref().err()) {
        assert!(
            e.contains("member suzhou is busy")
                && e.contains("no slots are reserved for city callers"),
            "{e}"
        );
    }
    // Suzhou's board and metrics show the shares, their use and the refusals.
    let loads = region.gateways["suzhou"].admission();
    let (_, sub) = loads.iter().find(|(d, _)| *d == "subqueries").unwrap();
    let city = sub.classes.iter().find(|c| c.class == "city").unwrap();
    let county = sub.classes.iter().find(|c| c.class == "county").unwrap();
    assert_eq!((county.reserved, county.refused), (1, 0));
    assert!(city.refused >= 4, "{sub:?}");
    // Refusals are on the owner's record.
    let refused = crate::support::sub_query_records(&region.audit_log("suzhou"))
        .into_iter()
        .filter(|r| {
            r["entry"]["reason"]
                .as_str()
                .is_some_and(|m| m.contains("no slots are reserved for city callers"))
        })
        .count();
    assert!(refused >= 4, "{refused} refusals recorded");
}

#[tokio::test]
async fn without_a_county_share_the_county_finds_the_owner_busy_and_is_told_so() {
    let (region, lake) = suzhou_behind_a_slow_lake(0).await;
    lake.set(Fault::Delay(Duration::from_millis(300)));
    let (summary, _) = county_query_during_a_city_flood(&region).await;
    // The same flood, no share kept: Suzhou refuses the county too. The partial answer
    // says so, as the owner's refusal with its retry hint, after the coordinator asked
    // once more.
    let s = crate::support::member_status(&summary, "suzhou");
    assert_eq!(
        crate::support::member_state(&summary, "suzhou"),
        fedgate::proto::v1::MemberState::Busy,
        "{summary:?}"
    );
    assert!(
        s.reason
            .contains("no slots are reserved for county callers")
            && s.reason.contains("retry in"),
        "{}",
        s.reason
    );
    assert!(summary.partial, "{summary:?}");
    assert_eq!(summary.rows, 4, "{summary:?}");
    assert_eq!(
        crate::support::member_state(&summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Ok
    );
}
