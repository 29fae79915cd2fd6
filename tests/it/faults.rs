//! Faults between gateways, injected by a TCP proxy in front of a member: slow, stalled,
//! cut and killed links, a restarted member, refused connections and the breaker. Each
//! gives a documented member state, meets the caller's deadline, and never returns a
//! silently short answer.

use std::time::{Duration, Instant};

use fedgate::proto::v1::MemberState;
use fedgate::tools::demo::Materialized;

use crate::proxy::Fault;
use crate::support::{PER_MEMBER, Region, member_state as state, member_status as status};

/// Repeats every data row of Shanghai's fever-clinic list, so its answer spans many
/// HTTP/2 frames and can be cut in the middle.
fn big_shanghai_list(copies: usize) -> impl Fn(&Materialized) {
    move |layout: &Materialized| {
        let path = layout.dir.join("data/shanghai/fever_clinics.csv");
        let text = std::fs::read_to_string(&path).unwrap();
        let (header, body) = text.split_once('\n').unwrap();
        let mut out = format!("{header}\n");
        for _ in 0..copies {
            out.push_str(body);
            if !body.ends_with('\n') {
                out.push('\n');
            }
        }
        std::fs::write(&path, out).unwrap();
    }
}

#[tokio::test]
async fn a_slow_member_is_cut_off_at_its_deadline_and_the_others_answer() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|_| {}).await;
    proxies["suzhou"].set(Fault::Delay(Duration::from_millis(1500)));
    let client = region.client("hangzhou");
    let timeout = Duration::from_secs(1);

    let started = Instant::now();
    let a = client.query(PER_MEMBER, true, Some(timeout)).await.unwrap();
    let took = started.elapsed();
    // The deadline is the caller's: the answer comes when it expires, not when the
    // slow member would have finished. The slack covers planning and a loaded machine.
    assert!(took < timeout + Duration::from_millis(700), "{took:?}");
    assert!(a.summary.partial);
    assert_eq!(state(&a.summary, "suzhou"), MemberState::TimedOut);
    assert!(
        status(&a.summary, "suzhou").reason.contains("budget"),
        "{:?}",
        status(&a.summary, "suzhou")
    );
    for m in ["shanghai", "hangzhou", "hefei", "anji"] {
        assert_eq!(state(&a.summary, m), MemberState::Ok, "{m}");
    }
    let members = crate::support::column_strings(&a.batches, "member");
    assert_eq!(members.len(), 4, "{members:?}");
    assert!(!members.contains(&"suzhou".to_string()));

    // Without a partial answer allowed, the query fails and names the member.
    let f = client
        .query(PER_MEMBER, false, Some(timeout))
        .await
        .unwrap_err();
    assert!(f.to_string().contains("suzhou"), "{f}");
    assert_eq!(
        state(f.summary.as_ref().unwrap(), "suzhou"),
        MemberState::TimedOut
    );
}

#[tokio::test]
async fn a_connection_stalled_without_closing_is_timed_out_not_waited_for() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|_| {}).await;
    let client = region.client("hangzhou");
    // An established connection that stops carrying bytes: no error ever arrives,
    // only the deadline ends the wait.
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(state(&a.summary, "suzhou"), MemberState::Ok);
    proxies["suzhou"].set(Fault::Stall);
    let timeout = Duration::from_millis(800);
    let started = Instant::now();
    let a = client.query(PER_MEMBER, true, Some(timeout)).await.unwrap();
    let took = started.elapsed();
    assert!(took < timeout + Duration::from_millis(700), "{took:?}");
    assert_eq!(state(&a.summary, "suzhou"), MemberState::TimedOut);
    assert_eq!(
        crate::support::column_strings(&a.batches, "member").len(),
        4
    );
}

#[tokio::test]
async fn an_answer_cut_midway_is_an_error_and_never_a_short_answer() {
    let (region, proxies) =
        Region::start_behind_proxies(&["shanghai"], &big_shanghai_list(300)).await;
    let client = region.client("hangzhou");
    let sql = "SELECT * FROM fever_clinics WHERE member = 'shanghai'";
    let full = client.query(sql, false, None).await.unwrap();
    let rows = full.summary.rows;
    let bytes = status(&full.summary, "shanghai").bytes_received;
    assert_eq!(rows, 110 * 300);
    assert!(bytes > 1_000_000, "{bytes}");

    proxies["shanghai"].set(Fault::CutAfter(bytes / 2));
    let f = client.query(sql, false, None).await.unwrap_err();
    assert!(f.to_string().contains("shanghai"), "{f}");
    let s = f.summary.expect("a failed query still reports its members");
    assert_ne!(state(&s, "shanghai"), MemberState::Ok, "{s:?}");

    // With a partial answer allowed, the rows that did arrive are delivered, and
    // both the answer and the member's status say the member's part is incomplete.
    proxies["shanghai"].set(Fault::CutAfter(bytes / 2));
    let a = client.query(sql, true, None).await.unwrap();
    assert!(a.summary.partial);
    let st = status(&a.summary, "shanghai");
    assert!(
        matches!(
            state(&a.summary, "shanghai"),
            MemberState::Error | MemberState::Unavailable
        ),
        "{st:?}"
    );
    assert!(a.summary.rows < rows, "{} of {rows}", a.summary.rows);
    assert_eq!(st.rows, a.summary.rows, "{st:?}");

    // Once the link is whole again, so is the answer.
    proxies["shanghai"].set(Fault::Pass);
    let again = client.query(sql, false, None).await.unwrap();
    assert_eq!(again.summary.rows, rows);
}

#[tokio::test]
async fn a_member_killed_mid_query_is_reported_and_its_part_is_not_passed_off_as_whole() {
    let (region, proxies) =
        Region::start_behind_proxies(&["shanghai"], &big_shanghai_list(300)).await;
    let client = region.client("hangzhou");
    let sql = "SELECT * FROM fever_clinics WHERE member = 'shanghai'";
    client.query(sql, false, None).await.unwrap();
    // Slow the answer down so the kill lands in the middle of it.
    let proxy = &proxies["shanghai"];
    proxy.set(Fault::Delay(Duration::from_millis(30)));
    let query = tokio::spawn({
        let client = region.client("hangzhou");
        async move { client.query(sql, true, Some(Duration::from_secs(20))).await }
    });
    tokio::time::sleep(Duration::from_millis(400)).await;
    // Every connection drops, and a new one is refused, as with a dead process.
    proxy.set(Fault::Reset);
    proxy.kill_connections();
    let a = query.await.unwrap().unwrap();
    assert!(a.summary.partial, "{:?}", a.summary);
    let st = status(&a.summary, "shanghai");
    assert!(
        matches!(
            state(&a.summary, "shanghai"),
            MemberState::Error | MemberState::Unavailable
        ),
        "{st:?}"
    );
    assert!(a.summary.rows < 110 * 300, "{}", a.summary.rows);
}

#[tokio::test]
async fn a_restarted_member_answers_again() {
    let mut region = Region::start().await;
    let client = region.client("hangzhou");
    region.stop("hefei").await;
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    assert_eq!(state(&a.summary, "hefei"), MemberState::Unavailable);
    assert!(
        status(&a.summary, "hefei").reason.contains("refused"),
        "{:?}",
        status(&a.summary, "hefei")
    );
    region.restart("hefei").await;
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(state(&a.summary, "hefei"), MemberState::Ok);
    assert_eq!(a.summary.rows, 5);
}

#[tokio::test]
async fn a_refused_connection_is_retried_once_and_the_answer_is_complete() {
    let (region, proxies) = Region::start_behind_proxies(&["hefei"], &|_| {}).await;
    let proxy = &proxies["hefei"];
    proxy.reset_next(1);
    let client = region.client("hangzhou");
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    let st = status(&a.summary, "hefei");
    assert_eq!(state(&a.summary, "hefei"), MemberState::Ok, "{st:?}");
    assert!(
        st.reason.starts_with("answered after 1 retried attempt"),
        "{st:?}"
    );
    assert_eq!(proxy.accepted(), 2);
    assert_eq!(a.summary.rows, 5);

    // Two refusals in a row are more than the one retry allowed.
    let before = proxy.accepted();
    proxy.reset_next(2);
    // The open connection is gone too, so the next query has to dial.
    proxy.kill_connections();
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    assert_eq!(state(&a.summary, "hefei"), MemberState::Unavailable);
    assert_eq!(proxy.accepted() - before, 2);
}

#[tokio::test]
async fn the_breaker_opens_after_repeated_failures_and_closes_after_recovery() {
    let (region, proxies) = Region::start_behind_proxies(&["suzhou"], &|layout| {
        crate::support::patch_member(layout, "hangzhou", |m| {
            m.limits.breaker_failures = Some(3);
            m.limits.breaker_open_for = Some("600ms".into());
            m.limits.retries = Some(0);
        })
    })
    .await;
    let proxy = &proxies["suzhou"];
    let client = region.client("hangzhou");
    proxy.set(Fault::Reset);
    for i in 1..=3 {
        let a = client.query(PER_MEMBER, true, None).await.unwrap();
        assert_eq!(state(&a.summary, "suzhou"), MemberState::Unavailable, "{i}");
        assert_eq!(proxy.accepted(), i, "each failure is a real attempt");
    }
    // Open: reported at once, without contacting the member.
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    let st = status(&a.summary, "suzhou");
    assert_eq!(state(&a.summary, "suzhou"), MemberState::Unavailable);
    assert!(
        st.reason
            .contains("circuit breaker open after 3 consecutive failures"),
        "{st:?}"
    );
    assert_eq!(proxy.accepted(), 3);

    // After the cool-down a health probe goes out; while the member is still down
    // it fails and the breaker stays open.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    let st = status(&a.summary, "suzhou");
    assert!(st.reason.contains("health probe failed"), "{st:?}");
    assert_eq!(proxy.accepted(), 4);
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    assert!(
        status(&a.summary, "suzhou")
            .reason
            .contains("circuit breaker open"),
        "{:?}",
        status(&a.summary, "suzhou")
    );
    assert_eq!(proxy.accepted(), 4);

    // Recovered: the next probe passes and the query is answered in full.
    proxy.set(Fault::Pass);
    tokio::time::sleep(Duration::from_millis(700)).await;
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(state(&a.summary, "suzhou"), MemberState::Ok);
    assert_eq!(a.summary.rows, 5);
    assert!(!a.summary.partial);
}
