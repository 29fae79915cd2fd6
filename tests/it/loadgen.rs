//! The load generator (`fedgate bench`) against a real region: it counts complete
//! answers and their rows, keeps an open loop's schedule, and counts every failure
//! by its status instead of hiding it in the latency figures.

use std::time::Duration;

use fedgate::tools::loadgen::{self, Load, Mode};

use crate::support::{Region, read_csv};

fn load(sql: &str, mode: Mode) -> Load {
    Load {
        sql: vec![sql.to_string()],
        mode,
        duration: Duration::from_secs(60),
        warmup: Duration::ZERO,
        timeout: Duration::from_secs(20),
        ..Default::default()
    }
}

fn closed(concurrency: usize) -> Mode {
    Mode::Closed {
        concurrency,
        expected_interval: None,
    }
}

#[tokio::test]
async fn answers_rows_schedule_and_failures_are_counted() {
    let mut region = Region::start().await;
    let client = region.client("shanghai");
    let rows_of = |m: &str| {
        read_csv(&region.data().join(m).join("fever_clinics.csv"))
            .1
            .len() as u64
    };
    let hangzhou = rows_of("hangzhou");
    let all: u64 = ["anji", "hangzhou", "shanghai", "suzhou"]
        .iter()
        .map(|m| rows_of(m))
        .sum();
    let anji = rows_of("anji");

    // Closed loop: exactly the requested number of queries, all complete.
    let one = "SELECT * FROM fever_clinics WHERE member = 'hangzhou'";
    let r = loadgen::run(
        &client,
        &Load {
            max_requests: Some(12),
            ..load(one, closed(3))
        },
    )
    .await
    .unwrap();
    assert_eq!((r.requests, r.ok, r.failed()), (12, 12, 0), "{r:?}");
    assert_eq!(r.rows, 12 * hangzhou);
    let l = &r.latency_us;
    assert!(l.p50 > 0 && l.p50 <= l.p99 && l.p99 <= l.max, "{l:?}");

    // Open loop: 40 per second for half a second is 20 queries due, whatever the
    // gateway does.
    let r = loadgen::run(
        &client,
        &Load {
            duration: Duration::from_millis(500),
            ..load(one, Mode::Open { rate: 40.0 })
        },
    )
    .await
    .unwrap();
    assert_eq!((r.requests, r.ok), (20, 20), "{r:?}");
    assert_eq!(r.mode, "open");

    // A query the gateway refuses: every one is counted, by status code.
    let r = loadgen::run(
        &client,
        &Load {
            max_requests: Some(3),
            ..load("SELECT * FROM no_such_dataset", closed(1))
        },
    )
    .await
    .unwrap();
    assert_eq!((r.ok, r.failed()), (0, 3), "{r:?}");
    assert!(
        r.first_error
            .as_deref()
            .unwrap_or("")
            .contains("no_such_dataset"),
        "{r:?}"
    );
    assert_eq!(r.latency_us.p50, 0, "failures are not latencies");

    // A published service: every call binds a key from the range as its parameter,
    // and the rows counted are the service's.
    let near = client
        .query(
            "SELECT count(*) AS n FROM fever_clinics WHERE substr(county_code, 1, 4) = '3305'",
            false,
            None,
        )
        .await
        .unwrap();
    let near = crate::support::column_strings(&near.batches, "n")[0]
        .parse::<u64>()
        .unwrap();
    assert!(near > 0);
    let r = loadgen::run(
        &client,
        &Load {
            sql: Vec::new(),
            range: (330523, 330523),
            max_requests: Some(3),
            service: Some(loadgen::ServiceCall {
                name: "fever_clinics_near".into(),
                param: "county_code".into(),
                text: true,
            }),
            ..load("", closed(1))
        },
    )
    .await
    .unwrap();
    assert_eq!((r.ok, r.failed(), r.rows), (3, 0, 3 * near), "{r:?}");

    // A member down: without allow_partial every query fails; with it, every answer
    // is complete apart from that member's rows.
    region.stop("anji").await;
    let every = "SELECT * FROM fever_clinics";
    let r = loadgen::run(
        &client,
        &Load {
            max_requests: Some(4),
            ..load(every, closed(2))
        },
    )
    .await
    .unwrap();
    assert_eq!((r.ok, r.failed()), (0, 4), "{r:?}");
    let r = loadgen::run(
        &client,
        &Load {
            max_requests: Some(4),
            allow_partial: true,
            ..load(every, closed(2))
        },
    )
    .await
    .unwrap();
    assert_eq!((r.ok, r.failed()), (4, 0), "{r:?}");
    assert_eq!(r.rows, 4 * (all - anji));
}
