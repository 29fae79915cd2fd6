//! A gateway's life as orchestrators see it: `/livez` and `/readyz`, gRPC health, and
//! the drain after SIGTERM in which nothing in flight is lost.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use fedgate::config::raw::RawLifecycle;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic_health::pb::health_check_response::ServingStatus;

use crate::proxy::Fault;
use crate::support::{OFFICE, PER_MEMBER, Region, member_state, patch_member};

/// `GET path` over plain HTTP/1.1 (the tests have no HTTP client crate): the status
/// code and body, or `None` when nothing listens.
async fn get(addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes()).await.ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).await.ok()?;
    let text = String::from_utf8_lossy(&raw).to_string();
    let status = text.split_whitespace().nth(1)?.parse().ok()?;
    let body = text.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
    Some((status, body))
}

/// The gRPC health of `service` ("" for the server as a whole) at the gateway on
/// `port`, asked as the regional office.
async fn health(region: &Region, port: u16, service: &str) -> i32 {
    let (cert, key) = region.office();
    let tls = fedgate::trust::tls::TlsMaterial::load(&region.layout.ca, &cert, &key).unwrap();
    let ch =
        fedgate::trust::tls::Connector::new(tls.client_config().unwrap(), "127.0.0.1", port, None)
            .channel(Duration::from_secs(5))
            .unwrap();
    tonic_health::pb::health_client::HealthClient::new(ch)
        .check(tonic_health::pb::HealthCheckRequest {
            service: service.into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status
}

fn lifecycle(drain: &str, probes: &str) -> Option<RawLifecycle> {
    Some(RawLifecycle {
        drain: Some(drain.into()),
        probes: Some(probes.into()),
        ..Default::default()
    })
}

/// The office's coordinator is drained while it waits on a slow member (after new
/// admission limits replaced the door its first query holds a slot on): the probes and
/// gRPC health turn at once, a query that arrives during the drain is still taken, and
/// both it and the one already in flight end complete, every member answering. Only
/// then does the gateway stop, and its ports close.
#[tokio::test]
async fn a_drained_gateway_turns_unready_at_once_and_finishes_every_query_in_flight() {
    let (mut region, proxies) = Region::start_behind_proxies(&["hangzhou"], &|layout| {
        patch_member(layout, OFFICE, |m| {
            m.lifecycle = lifecycle("10s", "127.0.0.1:0");
        })
    })
    .await;
    let probes = region.gateways[OFFICE].probes_addr.expect("a probe port");
    let port = region.port(OFFICE);
    assert_eq!(get(probes, "/readyz").await, Some((200, "ready\n".into())));
    assert_eq!(get(probes, "/livez").await, Some((200, "live\n".into())));
    assert_eq!(get(probes, "/v1/status").await.map(|r| r.0), Some(404));
    assert_eq!(
        health(&region, port, "").await,
        ServingStatus::Serving as i32
    );

    // Every chunk to and from Hangzhou waits, so the census query stays in flight at
    // the coordinator for a while.
    proxies["hangzhou"].set(Fault::Delay(Duration::from_millis(300)));
    let client = region.client(OFFICE);
    let ask = |c: fedgate::tools::client::Client| {
        tokio::spawn(async move { c.query(PER_MEMBER, false, None).await })
    };
    let first = ask(client.clone());
    let gw = region.gateways.remove(OFFICE).unwrap();
    let waited = Instant::now();
    while gw.in_flight() == 0 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "never in flight"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    // New admission limits replace the door the first query holds its slot on; the
    // gateway still counts it as in flight (and the drain below waits for it).
    patch_member(&region.layout, OFFICE, |m| {
        m.limits.max_concurrent_queries = Some(m.limits.max_concurrent_queries.unwrap_or(64) + 1);
    });
    assert!(matches!(
        gw.reload().await,
        fedgate::gateway::ReloadOutcome::Applied { .. }
    ));
    assert_eq!(gw.in_flight(), 1, "the query admitted before the reload");

    gw.begin_drain().await;
    assert_eq!(
        get(probes, "/readyz").await,
        Some((503, "draining\n".into()))
    );
    assert_eq!(get(probes, "/livez").await.map(|r| r.0), Some(200));
    for service in ["", "fedgate.v1.Federation", "fedgate.v1.Peer"] {
        assert_eq!(
            health(&region, port, service).await,
            ServingStatus::NotServing as i32,
            "{service:?}"
        );
    }
    // A load balancer that has not noticed yet still gets its query answered.
    let second = ask(client.clone());
    let waited = Instant::now();
    while gw.in_flight() < 2 {
        assert!(
            waited.elapsed() < Duration::from_secs(20),
            "the query sent during the drain was not taken"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    tokio::time::timeout(Duration::from_secs(30), gw.shutdown())
        .await
        .expect("the gateway stopped once its queries ended");
    // A process exits as soon as its gateway has stopped, so by then every answer must
    // have been sent: what is left is the client reading it.
    for (which, q) in [("first", first), ("second", second)] {
        let answer = tokio::time::timeout(Duration::from_millis(500), q)
            .await
            .unwrap_or_else(|_| panic!("{which}: still running when the gateway had stopped"))
            .unwrap()
            .unwrap_or_else(|f| panic!("{which}: {f:?}"));
        for m in ["hangzhou", "suzhou", "hefei"] {
            assert_eq!(
                member_state(&answer.summary, m),
                fedgate::proto::v1::MemberState::Ok,
                "{which}: {m}"
            );
        }
        assert!(answer.batches.iter().map(|b| b.num_rows()).sum::<usize>() >= 3);
    }
    assert!(
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
    );
    assert_eq!(get(probes, "/livez").await, None);
}

/// `fedgate serve` as an orchestrator runs it: ready once serving, SIGTERM turns
/// `/readyz` to 503 at once while queries are still answered for the drain period,
/// and the process exits 0 only after it.
#[tokio::test]
async fn sigterm_drains_the_serving_process_for_its_configured_period_then_exits_cleanly() {
    let probes = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let region = Region::start_patched(Some(&[]), &|layout| {
        patch_member(layout, "hefei", |m| {
            m.lifecycle = lifecycle("3s", &probes.to_string());
        })
    })
    .await;
    let (_, config, _) = region
        .layout
        .gateways
        .iter()
        .find(|(name, _, _)| name == "hefei")
        .unwrap()
        .clone();
    let logs = tempfile::tempdir().unwrap();
    let log_path = logs.path().join("hefei.log");
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_fedgate"))
        .args(["serve", "--config"])
        .arg(&config)
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let started = Instant::now();
    loop {
        if let Some((200, body)) = get(probes, "/readyz").await {
            assert_eq!(body, "ready\n");
            break;
        }
        assert!(child.try_wait().unwrap().is_none(), "exited:\n{}", log());
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "never ready:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let hefei_answers = |client: fedgate::tools::client::Client| async move {
        let a = client.query(PER_MEMBER, true, None).await.unwrap();
        member_state(&a.summary, "hefei")
    };
    let client = region.client(OFFICE);
    assert_eq!(
        hefei_answers(client.clone()).await,
        fedgate::proto::v1::MemberState::Ok
    );

    // SAFETY: kill(2) with a child's pid and a valid signal number has no memory
    // effects in this process.
    assert_eq!(
        unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) },
        0
    );
    let termed = Instant::now();
    loop {
        if get(probes, "/readyz").await == Some((503, "draining\n".into())) {
            break;
        }
        assert!(
            termed.elapsed() < Duration::from_secs(2),
            "still ready after SIGTERM:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(
        hefei_answers(client).await,
        fedgate::proto::v1::MemberState::Ok,
        "a query during the drain"
    );
    assert!(
        termed.elapsed() < Duration::from_secs(3),
        "the drain-time query came too late to prove anything"
    );
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(
            termed.elapsed() < Duration::from_secs(30),
            "still running 30 s after SIGTERM:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let took = termed.elapsed();
    assert!(status.success(), "{status:?}:\n{}", log());
    assert!(
        took >= Duration::from_millis(2900),
        "exited {took:?} after SIGTERM, before its 3 s drain"
    );
    assert!(log().contains("draining for 3s"), "{}", log());
}

/// Connections to the ports that ask no certificate (the probe port, Hangzhou's plain
/// loopback HTTP port) that send no request, or send their headers a byte at a time,
/// are closed by the header timeout (10 s) instead of being held open for as long as
/// the client likes; the ports answer other requests meanwhile.
#[tokio::test]
async fn connections_that_send_no_request_or_a_slow_one_are_closed() {
    let region = Region::start_patched(None, &|layout| {
        patch_member(layout, "hangzhou", |m| {
            m.lifecycle = lifecycle("1s", "127.0.0.1:0");
        })
    })
    .await;
    let probes = region.gateways["hangzhou"]
        .probes_addr
        .expect("a probe port");
    let http = region.gateways["hangzhou"].http_addr.expect("an HTTP port");
    let closed_after = |addr: SocketAddr, trickle: bool| async move {
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let (mut r, mut w) = s.into_split();
        let started = Instant::now();
        let writer = tokio::spawn(async move {
            if trickle {
                let _ = w
                    .write_all(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n")
                    .await;
                for _ in 0..60 {
                    if w.write_all(b"X").await.is_err() {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
            // Keep the writing half open (an idle client) until the test ends.
            tokio::time::sleep(Duration::from_secs(60)).await;
            drop(w);
        });
        let mut rest = Vec::new();
        let ended = tokio::time::timeout(Duration::from_secs(25), r.read_to_end(&mut rest)).await;
        writer.abort();
        assert!(
            ended.is_ok(),
            "{addr}: still open after 25 s (trickle: {trickle})"
        );
        started.elapsed()
    };
    let (a, b, c, d, ()) = tokio::join!(
        closed_after(probes, false),
        closed_after(probes, true),
        closed_after(http, false),
        closed_after(http, true),
        // Meanwhile both ports answer.
        async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert_eq!(get(probes, "/livez").await.map(|r| r.0), Some(200));
            assert_eq!(get(http, "/healthz").await.map(|r| r.0), Some(200));
        },
    );
    for w in [a, b, c, d] {
        // Closed by the timeout, not refused at once.
        assert!(w >= Duration::from_secs(9), "{w:?}");
    }
}
