//! Mutual TLS at the edge: every bad certificate is refused with a clear error.

use std::time::Duration;

use fedgate::tools::client::Client;
use fedgate::trust::identity::Principal;
use fedgate::trust::pki::{self, Ca};
use time::OffsetDateTime;

use crate::support::Region;

fn write_cert(
    dir: &std::path::Path,
    name: &str,
    issued: &pki::Issued,
) -> (std::path::PathBuf, std::path::PathBuf) {
    pki::write_issued(issued, dir, name).unwrap()
}

async fn query_error(region: &Region, cert: &std::path::Path, key: &std::path::Path) -> String {
    let client =
        Client::connect(&region.endpoint("hangzhou"), &region.layout.ca, cert, key).unwrap();
    let f = client
        .query(
            "SELECT count(*) FROM census",
            false,
            Some(Duration::from_secs(5)),
        )
        .await
        .expect_err("the gateway must refuse this client");
    f.to_string()
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused() {
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let p = Principal::parse("fedgate://yrd/office/coordination").unwrap();
    // A CA of another region, and one that copies this region CA's name.
    for (region_name, file) in [("elsewhere", "foreign"), ("yrd", "lookalike")] {
        let other = Ca::generate(region_name).unwrap();
        let (c, k) = write_cert(region.dir.path(), file, &other.issue(&p, &[], 1).unwrap());
        let e = query_error(&region, &c, &k).await;
        assert!(e.contains("does not chain to the region CA"), "{file}: {e}");
    }
}

#[tokio::test]
async fn an_expired_certificate_is_refused() {
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let p = Principal::parse("fedgate://yrd/office/coordination").unwrap();
    let now = OffsetDateTime::now_utc();
    let issued = region
        .ca()
        .issue_with_validity(
            &p,
            &[],
            now - time::Duration::days(30),
            now - time::Duration::days(1),
        )
        .unwrap();
    let (c, k) = write_cert(region.dir.path(), "expired", &issued);
    let e = query_error(&region, &c, &k).await;
    assert!(e.contains("expired"), "{e}");
}

#[tokio::test]
async fn an_identity_the_region_does_not_know_is_refused() {
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let p = Principal::parse("fedgate://yrd/city/nanjing").unwrap();
    let (c, k) = write_cert(
        region.dir.path(),
        "nanjing",
        &region.ca().issue(&p, &[], 1).unwrap(),
    );
    let e = query_error(&region, &c, &k).await;
    assert!(e.contains("Unauthenticated"), "{e}");
    assert!(
        e.contains("fedgate://yrd/city/nanjing is not a member or known client of region yrd"),
        "{e}"
    );
}

#[tokio::test]
async fn a_client_without_a_certificate_is_refused() {
    use fedgate::proto::v1::DescribeRequest;
    use fedgate::proto::v1::federation_client::FederationClient;
    let region = Region::start_only(Some(&["hangzhou"])).await;
    let mut roots = rustls::RootCertStore::empty();
    use rustls_pki_types::pem::PemObject;
    for c in rustls_pki_types::CertificateDer::pem_file_iter(&region.layout.ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let mut cfg = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(&[&rustls::version::TLS13])
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    let port: u16 = region
        .endpoint("hangzhou")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let ch = fedgate::trust::tls::Connector::new(std::sync::Arc::new(cfg), "127.0.0.1", port, None)
        .channel(Duration::from_secs(5))
        .unwrap();
    let e = FederationClient::new(ch)
        .describe(DescribeRequest::default())
        .await
        .unwrap_err();
    let text = fedgate::tools::client::describe_status(&e);
    assert!(text.contains("requires a client certificate"), "{text}");
}

#[tokio::test]
async fn a_gateway_presenting_another_members_identity_is_not_trusted() {
    // A coordinator dials hangzhou's address expecting hangzhou; a valid certificate of
    // another member there (a misrouted or hijacked address) must not be accepted.
    let region = Region::start_only(Some(&["suzhou"])).await;
    let certs = region.layout.dir.join("certs");
    let tls = fedgate::trust::tls::TlsMaterial::load(
        &region.layout.ca,
        &certs.join("shanghai.crt"),
        &certs.join("shanghai.key"),
    )
    .unwrap();
    let port: u16 = region
        .endpoint("suzhou")
        .rsplit(':')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let expected = Principal::parse("fedgate://yrd/city/hangzhou").unwrap();
    let ch = fedgate::trust::tls::Connector::new(
        tls.client_config().unwrap(),
        "127.0.0.1",
        port,
        Some(expected),
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    let e = fedgate::proto::v1::peer_client::PeerClient::new(ch)
        .catalog(fedgate::proto::v1::CatalogRequest::default())
        .await
        .unwrap_err();
    let text = fedgate::tools::client::describe_status(&e);
    assert!(
        text.contains(
            "presented identity fedgate://yrd/city/suzhou, expected fedgate://yrd/city/hangzhou"
        ),
        "{text}"
    );
}

#[tokio::test]
async fn a_member_certificate_that_does_not_match_its_config_does_not_start() {
    let region = Region::start_only(Some(&[])).await;
    let path = region.layout.dir.join("hefei.toml");
    let text = std::fs::read_to_string(&path)
        .unwrap()
        .replace("certs/hefei.", "certs/anji.");
    std::fs::write(&path, text).unwrap();
    let cfg = fedgate::config::MemberConfig::load(&path).unwrap();
    let e = fedgate::gateway::Gateway::start(std::sync::Arc::new(cfg), None)
        .await
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("certificate identity fedgate://yrd/county/anji does not match member hefei"),
        "{e}"
    );
}

/// The region revokes a portal's certificate and Hangzhou's gateway certificate. Once
/// the gateways reload the list: a new connection with the portal's certificate is
/// refused, naming the revocation; so is the next request on connections it opened
/// before (gRPC, and a PostgreSQL session); coordinators no longer reach Hangzhou, and
/// Hangzhou, as a client, no longer reaches the others; Hangzhou itself takes the list
/// that revokes its own certificate, and refuses the portal too.
#[tokio::test]
async fn revoked_certificates_are_refused_on_new_connections_and_on_the_ones_already_open() {
    use crate::support::{OFFICE, PER_MEMBER, member_state, patch_region};
    use fedgate::gateway::ReloadOutcome;
    use fedgate::proto::v1::MemberState;
    let region = Region::start_patched(None, &|layout| {
        let certs = layout.dir.join("certs");
        let ca = Ca::load(&certs.join("ca.crt"), &certs.join("ca.key")).unwrap();
        std::fs::write(certs.join("ca.crl"), ca.revocation_list(&[], 7).unwrap()).unwrap();
        patch_region(layout, |r| r.crls = vec!["certs/ca.crl".into()]);
    })
    .await;
    let certs = region.layout.dir.join("certs");
    let office = Principal::parse("fedgate://yrd/office/coordination").unwrap();
    let (portal_crt, portal_key) = write_cert(
        region.dir.path(),
        "portal",
        &region.ca().issue(&office, &[], 1).unwrap(),
    );
    let portal = Client::connect(
        &region.endpoint(OFFICE),
        &region.layout.ca,
        &portal_crt,
        &portal_key,
    )
    .unwrap();
    let a = portal.query(PER_MEMBER, false, None).await.unwrap();
    assert_eq!(member_state(&a.summary, "hangzhou"), MemberState::Ok);
    let (pg, _) = crate::pgdoor::connect_with(
        &region,
        OFFICE,
        crate::pgdoor::tls(&region.layout.ca, &portal_crt, &portal_key),
    )
    .await;
    pg.simple_query("SELECT count(*) FROM census")
        .await
        .unwrap();

    let mut revoked = Vec::new();
    for pem in [
        std::fs::read_to_string(&portal_crt).unwrap(),
        std::fs::read_to_string(certs.join("hangzhou.crt")).unwrap(),
    ] {
        let (serial, _) = pki::serial_of(&pem).unwrap();
        revoked.push(pki::Revoked {
            serial,
            at: time::OffsetDateTime::now_utc().unix_timestamp(),
        });
    }
    pki::write_atomically(
        &certs.join("ca.crl"),
        &region.ca().revocation_list(&revoked, 7).unwrap(),
        false,
    )
    .unwrap();
    assert!(matches!(
        region.gateways[OFFICE].reload().await,
        ReloadOutcome::Applied { .. }
    ));
    // The connections the portal opened before: the next request is refused.
    let e = portal
        .query(PER_MEMBER, true, Some(Duration::from_secs(5)))
        .await
        .expect_err("a request on a connection opened before the revocation")
        .to_string();
    assert!(e.contains("revoked"), "{e}");
    let e = pg
        .simple_query("SELECT count(*) FROM census")
        .await
        .expect_err("a statement in a session opened before the revocation");
    assert!(format!("{e:?}").contains("revoked"), "{e:?}");
    let e = Client::connect(
        &region.endpoint(OFFICE),
        &region.layout.ca,
        &portal_crt,
        &portal_key,
    )
    .unwrap()
    .query(PER_MEMBER, false, Some(Duration::from_secs(5)))
    .await
    .expect_err("a new connection with a revoked certificate")
    .to_string();
    assert!(e.contains("revoked"), "{e}");

    // The coordinator's new configuration dials Hangzhou afresh and refuses its
    // revoked certificate.
    let a = region
        .client(OFFICE)
        .query(PER_MEMBER, true, None)
        .await
        .unwrap();
    assert_eq!(
        member_state(&a.summary, "hangzhou"),
        MemberState::Unavailable
    );
    assert_eq!(member_state(&a.summary, "suzhou"), MemberState::Ok);

    // The revoked gateway as a client: the others refuse it once they reload. Hangzhou
    // takes the list too, though it names its own certificate (logged as an error), so
    // that it refuses the revoked portal like everyone else.
    for (name, g) in &region.gateways {
        let outcome = g.reload().await;
        // (The office took the list above: nothing changed for it since; the lake is
        // a region of its own, with its own CA and no list.)
        let want_applied = name != OFFICE && !name.contains('/');
        assert!(
            matches!(outcome, ReloadOutcome::Applied { .. }) == want_applied
                && !matches!(outcome, ReloadOutcome::Rejected { .. }),
            "{name}: {outcome:?}"
        );
    }
    let e = Client::connect(
        &region.endpoint("hangzhou"),
        &region.layout.ca,
        &portal_crt,
        &portal_key,
    )
    .unwrap()
    .query(PER_MEMBER, true, Some(Duration::from_secs(5)))
    .await
    .expect_err("the revoked portal at the gateway whose own certificate is revoked")
    .to_string();
    assert!(e.contains("revoked"), "{e}");
    // Hangzhou's own certificate is refused by Hangzhou now too; the office, vouched
    // for by its own gateway, still reaches Hangzhou's gateway, which as a client is
    // refused by Suzhou.
    let e = region
        .client_as_unvouched("hangzhou", "hangzhou")
        .query(PER_MEMBER, true, Some(Duration::from_secs(5)))
        .await
        .expect_err("the revoked gateway certificate as a client of its own gateway")
        .to_string();
    assert!(e.contains("transport error"), "{e}");
    let a = region
        .client_as(OFFICE, "hangzhou")
        .query(PER_MEMBER, true, None)
        .await
        .unwrap();
    let suzhou = crate::support::member_status(&a.summary, "suzhou");
    assert_eq!(suzhou.state, MemberState::Unavailable as i32, "{suzhou:?}");
    assert!(suzhou.reason.contains("revoked"), "{suzhou:?}");
    assert_eq!(member_state(&a.summary, "hangzhou"), MemberState::Ok);
}

/// A revocation takes effect while the rest of a new configuration is refused: an
/// edit that takes a restart waits in the office's member file, the region revokes a
/// portal, and the office's reload reports the refusal and applies the list alone.
#[tokio::test]
async fn a_revocation_list_applies_even_when_the_rest_of_a_reload_is_refused() {
    use crate::support::{OFFICE, PER_MEMBER, patch_member, patch_region};
    use fedgate::gateway::ReloadOutcome;
    let region = Region::start_patched(None, &|layout| {
        let certs = layout.dir.join("certs");
        let ca = Ca::load(&certs.join("ca.crt"), &certs.join("ca.key")).unwrap();
        std::fs::write(certs.join("ca.crl"), ca.revocation_list(&[], 7).unwrap()).unwrap();
        patch_region(layout, |r| r.crls = vec!["certs/ca.crl".into()]);
    })
    .await;
    let office = Principal::parse("fedgate://yrd/office/coordination").unwrap();
    let (portal_crt, portal_key) = write_cert(
        region.dir.path(),
        "portal",
        &region.ca().issue(&office, &[], 1).unwrap(),
    );
    let portal = || {
        Client::connect(
            &region.endpoint(OFFICE),
            &region.layout.ca,
            &portal_crt,
            &portal_key,
        )
        .unwrap()
    };
    portal().query(PER_MEMBER, true, None).await.unwrap();

    patch_member(&region.layout, OFFICE, |m| {
        m.listen = "127.0.0.1:1".into();
    });
    let (serial, _) = pki::serial_of(&std::fs::read_to_string(&portal_crt).unwrap()).unwrap();
    pki::write_atomically(
        &region.layout.dir.join("certs/ca.crl"),
        &region
            .ca()
            .revocation_list(
                &[pki::Revoked {
                    serial,
                    at: time::OffsetDateTime::now_utc().unix_timestamp(),
                }],
                7,
            )
            .unwrap(),
        false,
    )
    .unwrap();
    match region.gateways[OFFICE].reload().await {
        ReloadOutcome::Rejected { reason } => {
            assert!(
                reason.contains("`listen` changed; that takes a restart"),
                "{reason}"
            );
            assert!(reason.contains("in force nonetheless"), "{reason}");
        }
        other => panic!("the restart-only edit was not refused: {other:?}"),
    }
    let e = portal()
        .query(PER_MEMBER, true, Some(Duration::from_secs(5)))
        .await
        .expect_err("the revoked portal")
        .to_string();
    assert!(e.contains("revoked"), "{e}");
    // The office still answers everyone else, on its running configuration.
    region
        .client(OFFICE)
        .query(PER_MEMBER, false, None)
        .await
        .unwrap();
}
