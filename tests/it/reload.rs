//! Live reload: configuration and certificates change under continuous queries
//! without a failed query; a tightened rule applies to the next query; bad
//! configurations and certificates are refused and the running ones kept.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use fedgate::config::raw::RawAccessRule;
use fedgate::gateway::ReloadOutcome;
use fedgate::proto::v1::MemberState;

use crate::support::{PER_MEMBER, Region, member_status, patch_member};

/// Queries Hangzhou as the office until stopped; returns (answered, failures, the
/// configuration versions the summaries reported).
fn keep_querying(
    region: &Region,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>, Vec<String>)> {
    let client = region.client("hangzhou");
    tokio::spawn(async move {
        let (mut answered, mut failures, mut versions) = (0, Vec::new(), Vec::new());
        while !stop.load(Ordering::SeqCst) {
            match client.query(PER_MEMBER, false, None).await {
                Ok(a) if a.summary.rows == 5 => {
                    answered += 1;
                    if versions.last() != Some(&a.summary.config_version) {
                        versions.push(a.summary.config_version.clone());
                    }
                }
                Ok(a) => failures.push(format!("{} rows: {:?}", a.summary.rows, a.summary)),
                Err(f) => failures.push(f.to_string()),
            }
        }
        (answered, failures, versions)
    })
}

fn deny_all(dataset: &str) -> RawAccessRule {
    RawAccessRule {
        incident: None,
        principals: vec!["*".into()],
        datasets: vec![dataset.into()],
        level: "deny".into(),
        fields: Default::default(),
        min_group: None,
        dimensions: vec![],
        keys: vec![],
        purposes: vec![],
        via: vec![],
    }
}

#[tokio::test]
async fn a_reload_under_continuous_queries_fails_none_and_a_tightened_rule_applies_next() {
    let region = Region::start().await;
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_querying(&region, stop.clone());
    let client = region.client("hangzhou");
    let clinics = "SELECT count(*) AS n FROM fever_clinics WHERE member = 'suzhou'";
    let before = client.query(clinics, false, None).await.unwrap();
    assert!(before.summary.rows == 1);
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Suzhou stops sharing its fever-clinic list: the next query is refused there.
    let old = region.gateways["suzhou"].version();
    patch_member(&region.layout, "suzhou", |m| {
        m.access.insert(0, deny_all("fever_clinics"))
    });
    let outcome = region.gateways["suzhou"].reload().await;
    let new = region.gateways["suzhou"].version();
    assert_ne!(old, new);
    assert!(
        matches!(&outcome, ReloadOutcome::Applied { version } if *version == new)
            || outcome == ReloadOutcome::Unchanged,
        "{outcome:?}"
    );
    let after = client.query(clinics, true, None).await.unwrap();
    let suzhou = member_status(&after.summary, "suzhou");
    assert_eq!(suzhou.state, MemberState::Denied as i32, "{suzhou:?}");

    // The coordinator's own file changes; the file watcher applies it by itself.
    let coordinator = region.gateways["hangzhou"].version();
    patch_member(&region.layout, "hangzhou", |m| {
        m.limits.default_timeout = Some("20s".into())
    });
    let mut waited = Duration::ZERO;
    while region.gateways["hangzhou"].version() == coordinator {
        assert!(
            waited < Duration::from_secs(10),
            "the change was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        waited += Duration::from_millis(100);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (answered, failures, versions) = load.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answered > 5, "{answered}");
    // Each answer reports the one version it ran under: the old, then the new.
    assert_eq!(
        versions,
        vec![coordinator, region.gateways["hangzhou"].version()]
    );
}

#[tokio::test]
async fn a_bad_new_configuration_is_refused_and_the_running_one_kept() {
    let region = Region::start().await;
    let client = region.client("hangzhou");
    let version = region.gateways["suzhou"].version();
    let path = region.layout.dir.join("suzhou.toml");
    let good = std::fs::read_to_string(&path).unwrap();
    std::fs::write(&path, format!("{good}\ncolour = \"red\"\n")).unwrap();
    match region.gateways["suzhou"].reload().await {
        ReloadOutcome::Rejected { reason } => {
            assert!(reason.contains("unknown field `colour`"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    // A change that needs a restart is refused too, and says so.
    std::fs::write(
        &path,
        good.replacen("listen = \"127.0.0.1:", "listen = \"127.0.0.2:", 1),
    )
    .unwrap();
    match region.gateways["suzhou"].reload().await {
        ReloadOutcome::Rejected { reason } => {
            assert!(reason.contains("`listen` changed"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(region.gateways["suzhou"].version(), version);
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(a.summary.rows, 5);
}

/// The certificate `port`'s gateway presents to a new connection.
async fn served_certificate(region: &Region, port: u16) -> Vec<u8> {
    let (cert, key) = region.office();
    let tls = fedgate::trust::tls::TlsMaterial::load(&region.layout.ca, &cert, &key).unwrap();
    let connector = tokio_rustls::TlsConnector::from(tls.client_config().unwrap());
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let conn = connector.connect(name, tcp).await.unwrap();
    conn.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn pem_der(pem: &str) -> Vec<u8> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes())
        .unwrap()
        .to_vec()
}

#[tokio::test]
async fn certificates_rotate_under_continuous_queries_and_bad_ones_are_refused() {
    let region = Region::start().await;
    let port = region.port("suzhou");
    let certs = region.layout.dir.join("certs");
    let principal =
        fedgate::trust::identity::Principal::parse("fedgate://yrd/city/suzhou").unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let load = keep_querying(&region, stop.clone());
    tokio::time::sleep(Duration::from_millis(200)).await;

    // A new certificate from the region CA: used from the next connection on.
    let rotated = region
        .ca()
        .issue(&principal, &fedgate::trust::pki::default_hosts(), 30)
        .unwrap();
    fedgate::trust::pki::write_issued(&rotated, &certs, "suzhou").unwrap();
    let outcome = region.gateways["suzhou"].reload().await;
    assert!(
        matches!(
            outcome,
            ReloadOutcome::Applied { .. } | ReloadOutcome::Unchanged
        ),
        "{outcome:?}"
    );
    assert_eq!(
        served_certificate(&region, port).await,
        pem_der(&rotated.cert_pem)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;

    // An expired replacement is refused; the rotated one stays in use.
    let now = time::OffsetDateTime::now_utc();
    let expired = region
        .ca()
        .issue_with_validity(
            &principal,
            &fedgate::trust::pki::default_hosts(),
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    fedgate::trust::pki::write_issued(&expired, &certs, "suzhou").unwrap();
    match region.gateways["suzhou"].reload().await {
        ReloadOutcome::Rejected { reason } => assert!(reason.contains("expired"), "{reason}"),
        other => panic!("{other:?}"),
    }
    // So is one from another CA.
    let stranger = fedgate::trust::pki::Ca::generate("yrd")
        .unwrap()
        .issue(&principal, &fedgate::trust::pki::default_hosts(), 30)
        .unwrap();
    fedgate::trust::pki::write_issued(&stranger, &certs, "suzhou").unwrap();
    match region.gateways["suzhou"].reload().await {
        ReloadOutcome::Rejected { reason } => {
            assert!(reason.contains("not accepted by the region CA"), "{reason}")
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        served_certificate(&region, port).await,
        pem_der(&rotated.cert_pem)
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let (answered, failures, _) = load.await.unwrap();
    assert!(failures.is_empty(), "{failures:?}");
    assert!(answered > 5, "{answered}");
}

#[tokio::test]
async fn sighup_reloads_a_change_the_file_watcher_cannot_see() {
    let region = Region::start().await;
    let client = region.client("hangzhou");
    let a = client.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(a.summary.rows, 5);
    let version = region.gateways["suzhou"].version();

    // Suzhou's catch-all rule turns from rows to deny: the same length, and with the
    // modification time put back, a file the watcher sees as unchanged.
    let path = region.layout.dir.join("suzhou.toml");
    let before = std::fs::metadata(&path).unwrap();
    let mtime = before
        .modified()
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap();
    let mut text = std::fs::read_to_string(&path).unwrap();
    let at = text.rfind("level = \"rows\"").unwrap();
    text.replace_range(at..at + 14, "level = \"deny\"");
    std::fs::write(&path, &text).unwrap();
    let touched = std::process::Command::new("touch")
        .arg("-d")
        .arg(format!("@{}.{:09}", mtime.as_secs(), mtime.subsec_nanos()))
        .arg(&path)
        .status()
        .unwrap();
    assert!(touched.success());
    let after = std::fs::metadata(&path).unwrap();
    assert_eq!(
        (after.len(), after.modified().unwrap()),
        (before.len(), before.modified().unwrap())
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        region.gateways["suzhou"].version(),
        version,
        "the watcher saw it"
    );

    // The operator's signal: every gateway in this process reloads; only Suzhou's
    // configuration changed.
    let sent = std::process::Command::new("kill")
        .args(["-HUP", &std::process::id().to_string()])
        .status()
        .unwrap();
    assert!(sent.success());
    let mut waited = Duration::ZERO;
    while region.gateways["suzhou"].version() == version {
        assert!(waited < Duration::from_secs(10), "SIGHUP did not reload");
        tokio::time::sleep(Duration::from_millis(50)).await;
        waited += Duration::from_millis(50);
    }
    let a = client.query(PER_MEMBER, true, None).await.unwrap();
    let suzhou = member_status(&a.summary, "suzhou");
    assert_eq!(suzhou.state, MemberState::Denied as i32, "{suzhou:?}");
}

/// A member's configuration version covers the files its member file names: a
/// changed code table is a new version, noticed by the file watcher and applied to
/// the next query; so is a changed HMAC key file.
#[tokio::test]
async fn a_changed_code_table_or_secret_file_is_a_new_version() {
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let gateway = &region.gateways["hangzhou"];
    let client = region.client("hangzhou");
    let sql = "SELECT DISTINCT county_code FROM fever_clinics \
               WHERE member = 'hangzhou' AND county_published = '西湖区'";
    let a = client.query(sql, false, None).await.unwrap();
    assert_eq!(
        crate::support::column_strings(&a.batches, "county_code"),
        ["330106"]
    );

    // The code table gives 西湖区 another code; nothing else changes.
    let table = region.layout.dir.join("data/hangzhou/district_codes.csv");
    let text = std::fs::read_to_string(&table).unwrap();
    assert!(text.contains("西湖区,330106"));
    let version = gateway.version();
    std::fs::write(&table, text.replace("西湖区,330106", "西湖区,330199")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while gateway.version() == version {
        assert!(
            std::time::Instant::now() < deadline,
            "the changed code table was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let a = client.query(sql, false, None).await.unwrap();
    assert_eq!(
        crate::support::column_strings(&a.batches, "county_code"),
        ["330199"]
    );

    // A new HMAC key is a new version too (an explicit reload, as after a rotation).
    let version = gateway.version();
    let key = region.layout.dir.join("secrets/enrollment.hmac");
    std::fs::write(&key, "a-rotated-secret-key-of-enough-bytes\n").unwrap();
    match gateway.reload().await {
        ReloadOutcome::Applied { version: v } => assert_ne!(v, version),
        // The watcher may have applied it first.
        ReloadOutcome::Unchanged => assert_ne!(gateway.version(), version),
        other => panic!("{other:?}"),
    }
    // Writing the same bytes again changes nothing.
    std::fs::write(&key, "a-rotated-secret-key-of-enough-bytes\n").unwrap();
    let now = gateway.version();
    assert_eq!(gateway.reload().await, ReloadOutcome::Unchanged);
    assert_eq!(gateway.version(), now);
}
