//! Who may speak for a caller: origin assertions, over real mutual TLS.
//!
//! The attacker here holds a member gateway's certificate (Anji's, a county) and calls
//! `Peer.Execute` on Hangzhou directly, naming origins it does not own, with no
//! assertion and with assertions forged, tampered with, replayed, expired, or made for
//! another gateway, member, dataset or purpose. Every one must be refused and on
//! Hangzhou's audit record; the real thing must be answered.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use fedgate::proto::v1::peer_client::PeerClient;
use fedgate::proto::v1::{ExecuteRequest, OriginAssertion, SignedOriginAssertion};
use fedgate::trust::assertion::{self, Vouch};
use fedgate::trust::identity::Principal;
use fedgate::trust::tls::{Connector, TlsMaterial};
use prost::Message;
use tonic::transport::Channel;

use crate::support::{OFFICE, Region, member_state, patch_member};

const OFFICE_URI: &str = "fedgate://yrd/office/coordination";
const ANJI_URI: &str = "fedgate://yrd/county/anji";
const HANGZHOU_URI: &str = "fedgate://yrd/city/hangzhou";

fn material(region: &Region, who: &str) -> TlsMaterial {
    region.material(who)
}

/// A `Peer` client of `target` holding `who`'s certificate.
fn peer_as(region: &Region, who: &str, target: &str) -> PeerClient<Channel> {
    let ch = Connector::new(
        material(region, who).client_config().unwrap(),
        "127.0.0.1",
        region.port(target),
        None,
    )
    .channel(Duration::from_secs(5))
    .unwrap();
    PeerClient::new(ch)
}

fn request(sql: &str, origin: &str, via: &str, query_id: &str, a: Vec<u8>) -> ExecuteRequest {
    ExecuteRequest {
        incident: Vec::new(),
        receipt: false,
        sql: sql.into(),
        origin: origin.into(),
        hops: 1,
        path: vec![via.into()],
        budget_ms: 10_000,
        query_id: query_id.into(),
        purpose: String::new(),
        origin_assertion: a,
    }
}

/// Rows answered, or the refusal.
async fn execute(peer: &mut PeerClient<Channel>, r: ExecuteRequest) -> Result<u64, tonic::Status> {
    let mut s = peer.execute(r).await?.into_inner();
    let mut rows = None;
    while let Some(m) = s.message().await? {
        if let Some(fedgate::proto::v1::execute_response::Payload::Summary(x)) = m.payload {
            rows = Some(x.rows);
        }
    }
    Ok(rows.expect("an answer ends with its summary"))
}

/// What the office's gateway signs for a query Anji's gateway forwards to Hangzhou.
fn body(datasets: &[&str]) -> OriginAssertion {
    let office = Principal::parse(OFFICE_URI).unwrap();
    let anji = Principal::parse(ANJI_URI).unwrap();
    Vouch {
        origin: &office,
        via: &anji,
        audience: vec![HANGZHOU_URI.into()],
        datasets: datasets.iter().map(|d| d.to_string()).collect(),
        purpose: "",
        query_sha256: assertion::sql_digest("SELECT count(*) FROM census"),
        incident_sha256: String::new(),
        now: SystemTime::now(),
        validity: Duration::from_secs(60),
    }
    .body()
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// Hangzhou's refused sub-query records whose reason mentions `what`.
fn refusals(region: &Region, what: &str) -> usize {
    crate::support::sub_query_records(&region.audit_log("hangzhou"))
        .into_iter()
        .filter(|r| {
            r["entry"]["decision"] == "refused"
                && r["entry"]["via"] == ANJI_URI
                && r["entry"]["reason"]
                    .as_str()
                    .is_some_and(|s| s.contains(what))
        })
        .count()
}

#[tokio::test]
async fn a_gateway_speaks_only_for_itself_or_with_the_origins_signed_word() {
    let region = Region::start().await;
    let mut anji = peer_as(&region, "anji", "hangzhou");
    let office = material(&region, OFFICE);
    let census = "SELECT count(*) FROM census";

    // Anji's gateway speaking for itself is answered.
    let rows = execute(
        &mut anji,
        request(census, ANJI_URI, ANJI_URI, "own", vec![]),
    )
    .await
    .unwrap();
    assert_eq!(rows, 1);

    // Claiming the city's own identity (whose rule is "rows" on its people) or the
    // office's without an assertion is refused before anything runs, and recorded.
    for origin in [HANGZHOU_URI, OFFICE_URI] {
        let e = execute(
            &mut anji,
            request(
                "SELECT name, phone FROM enrollment LIMIT 1",
                origin,
                ANJI_URI,
                "claim",
                vec![],
            ),
        )
        .await
        .unwrap_err();
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
        assert!(e.message().contains("without an origin assertion"), "{e:?}");
    }
    assert_eq!(refusals(&region, "without an origin assertion"), 2);

    // The real thing: the office's gateway vouched for this query through Anji's.
    let good = assertion::sign(&office, &body(&["census"])).unwrap();
    let rows = execute(
        &mut anji,
        request(census, OFFICE_URI, ANJI_URI, "q1", good.clone()),
    )
    .await
    .unwrap();
    assert_eq!(rows, 1);
    // The same query presenting it again (a retry) passes; any other query is a replay.
    execute(
        &mut anji,
        request(census, OFFICE_URI, ANJI_URI, "q1", good.clone()),
    )
    .await
    .unwrap();
    let e = execute(
        &mut anji,
        request(census, OFFICE_URI, ANJI_URI, "q2", good.clone()),
    )
    .await
    .unwrap_err();
    assert!(
        e.message().contains("already used for another query"),
        "{e:?}"
    );
    assert_eq!(refusals(&region, "already used"), 1);

    // Each forgery, with the words its refusal must contain.
    let mut cases: Vec<(&str, Vec<u8>, &str, &str)> = Vec::new();
    // Signed by Anji's own key, claiming the office as origin.
    let anji_key = material(&region, "anji");
    cases.push((
        "signed by the wrong gateway",
        assertion::sign(&anji_key, &body(&["census"])).unwrap(),
        "not by the gateway of the origin",
        census,
    ));
    // Signed by a certificate for the office's identity from a CA the region does not
    // trust.
    let rogue_dir = region.layout.dir.join("rogue");
    std::fs::create_dir_all(&rogue_dir).unwrap();
    let rogue = fedgate::trust::pki::Ca::generate("yrd").unwrap();
    let (rogue_ca, _) = fedgate::trust::pki::write_ca(&rogue, &rogue_dir).unwrap();
    let issued = rogue
        .issue(
            &Principal::parse(OFFICE_URI).unwrap(),
            &fedgate::trust::pki::default_hosts(),
            1,
        )
        .unwrap();
    let (crt, key) = fedgate::trust::pki::write_issued(&issued, &rogue_dir, "office").unwrap();
    let rogue_material = TlsMaterial::load(&rogue_ca, &crt, &key).unwrap();
    cases.push((
        "signed under another CA",
        assertion::sign(&rogue_material, &body(&["census"])).unwrap(),
        "not accepted by the region CA",
        census,
    ));
    // Tampered: the body widened to enrollment after signing.
    let mut signed = SignedOriginAssertion::decode(
        assertion::sign(&office, &body(&["census"]))
            .unwrap()
            .as_slice(),
    )
    .unwrap();
    let mut widened = OriginAssertion::decode(signed.body.as_slice()).unwrap();
    widened.datasets.push("enrollment".into());
    signed.body = widened.encode_to_vec();
    cases.push((
        "tampered with",
        signed.encode_to_vec(),
        "signature does not verify",
        "SELECT count(*) FROM enrollment",
    ));
    // Garbage.
    cases.push((
        "not an assertion",
        b"not an assertion".to_vec(),
        "not a signed origin assertion",
        census,
    ));
    // Expired two minutes ago (beyond the allowed clock skew).
    let mut old = body(&["census"]);
    old.not_before_ms = now_ms() - 180_000;
    old.not_after_ms = now_ms() - 120_000;
    cases.push((
        "expired",
        assertion::sign(&office, &old).unwrap(),
        "expired",
        census,
    ));
    // Valid for a day.
    let mut long = body(&["census"]);
    long.not_after_ms = long.not_before_ms + 86_400_000;
    cases.push((
        "valid too long",
        assertion::sign(&office, &long).unwrap(),
        "longer than",
        census,
    ));
    // Made for Suzhou's gateway to present.
    let mut other_via = body(&["census"]);
    other_via.via = "fedgate://yrd/city/suzhou".into();
    cases.push((
        "for another gateway",
        assertion::sign(&office, &other_via).unwrap(),
        "may be presented only by",
        census,
    ));
    // Made for Suzhou as audience.
    let mut other_audience = body(&["census"]);
    other_audience.audience = vec!["fedgate://yrd/city/suzhou".into()];
    cases.push((
        "for another member",
        assertion::sign(&office, &other_audience).unwrap(),
        "not among its audience",
        census,
    ));
    // Made for census, used for enrollment.
    cases.push((
        "for another dataset",
        assertion::sign(&office, &body(&["census"])).unwrap(),
        "does not cover dataset(s) enrollment",
        "SELECT count(*) FROM enrollment",
    ));
    // Made for another purpose.
    let mut other_purpose = body(&["census"]);
    other_purpose.purpose = "epidemic-response: X-1".into();
    cases.push((
        "for another purpose",
        assertion::sign(&office, &other_purpose).unwrap(),
        "purpose",
        census,
    ));
    let before = refusals(&region, "origin assertion refused");
    for (i, (what, a, words, sql)) in cases.iter().enumerate() {
        let e = execute(
            &mut anji,
            request(sql, OFFICE_URI, ANJI_URI, &format!("forged-{i}"), a.clone()),
        )
        .await
        .expect_err(what);
        assert_eq!(e.code(), tonic::Code::PermissionDenied, "{what}: {e:?}");
        assert!(e.message().contains(words), "{what}: {e:?}");
    }
    assert_eq!(
        refusals(&region, "origin assertion refused") - before,
        cases.len(),
        "every refused assertion is on Hangzhou's record"
    );

    // Presented by another gateway (Shanghai's) than the one it names: refused.
    let mut shanghai = peer_as(&region, "shanghai", "hangzhou");
    let e = execute(
        &mut shanghai,
        request(
            census,
            OFFICE_URI,
            "fedgate://yrd/city/shanghai",
            "stolen",
            assertion::sign(&office, &body(&["census"])).unwrap(),
        ),
    )
    .await
    .unwrap_err();
    assert!(e.message().contains("may be presented only by"), "{e:?}");

    // Peer.Explain follows the same rule, and is on the record either way.
    let explains = || {
        std::fs::read_to_string(region.audit_log("hangzhou"))
            .unwrap()
            .lines()
            .filter(|l| l.contains("\"kind\":\"explain\""))
            .count()
    };
    let e = anji
        .explain(request(census, OFFICE_URI, ANJI_URI, "x1", vec![]))
        .await
        .unwrap_err();
    assert!(e.message().contains("without an origin assertion"), "{e:?}");
    anji.explain(request(census, ANJI_URI, ANJI_URI, "x2", vec![]))
        .await
        .unwrap();
    assert_eq!(explains(), 2);
}

#[tokio::test]
async fn the_office_asks_through_its_own_gateway_or_brings_its_assertion() {
    let region = Region::start().await;
    let sql = "SELECT member, count(*) AS n FROM census GROUP BY member ORDER BY member";
    // Through its own gateway: every member answers.
    let a = region.client(OFFICE).query(sql, false, None).await.unwrap();
    assert_eq!(a.summary.members.len(), 5);
    assert!(
        a.summary
            .members
            .iter()
            .all(|m| m.state == fedgate::proto::v1::MemberState::Ok as i32),
        "{:?}",
        a.summary.members
    );
    // Through Shanghai's gateway without an assertion: Shanghai answers from its own
    // data (it sees the office first-hand), every other member refuses and says why.
    let f = region
        .client_unvouched("shanghai")
        .query(sql, true, None)
        .await
        .unwrap();
    for m in &f.summary.members {
        let want = if m.member == "shanghai" {
            fedgate::proto::v1::MemberState::Ok
        } else {
            fedgate::proto::v1::MemberState::Denied
        };
        assert_eq!(m.state, want as i32, "{m:?}");
        if m.member != "shanghai" {
            assert!(m.reason.contains("without an origin assertion"), "{m:?}");
        }
    }
    // With the office gateway's assertion (what `fedgate query --home` does): answered.
    let v = region
        .client("shanghai")
        .query(sql, false, None)
        .await
        .unwrap();
    assert_eq!(v.summary.members.len(), 5);
    assert_eq!(
        member_state(&v.summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Ok
    );
    // An assertion is good for one query: the coordinator refuses it the second time.
    let home = region.client(OFFICE);
    let a = home.vouch("shanghai", Some(sql), None, "").await.unwrap();
    let send = |a: Vec<u8>| {
        let sh = region.client_unvouched("shanghai");
        async move {
            let mut req = tonic::Request::new(fedgate::proto::v1::QueryRequest {
                sql: sql.into(),
                ..Default::default()
            });
            req.metadata_mut().insert_bin(
                assertion::METADATA_KEY,
                tonic::metadata::MetadataValue::from_bytes(&a),
            );
            sh.raw().query(req).await.map(|_| ())
        }
    };
    send(a.clone()).await.unwrap();
    let e = send(a).await.unwrap_err();
    assert!(e.message().contains("already used"), "{e:?}");
    // One made for another query does not pass at the coordinator.
    let other = home
        .vouch("shanghai", Some("SELECT 1 AS x FROM census"), None, "")
        .await
        .unwrap();
    let e = send(other).await.unwrap_err();
    assert!(e.message().contains("another query"), "{e:?}");
    // A gateway vouches only for its own identity: Anji cannot get one from the
    // office's gateway, nor name a gateway the region does not have.
    let e = region
        .client_as("anji", OFFICE)
        .vouch("shanghai", Some(sql), None, "")
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::PermissionDenied, "{e:?}");
    assert!(
        e.message().contains("vouches only for its own identity"),
        "{e:?}"
    );
    let e = home
        .vouch("nowhere", Some(sql), None, "")
        .await
        .unwrap_err();
    assert!(e.message().contains("not a member gateway"), "{e:?}");
}

#[tokio::test]
async fn an_owner_may_accept_an_origin_only_through_named_gateways() {
    // Hangzhou shares census with the office only through the office's own gateway.
    let region = Region::start_patched(None, &|l| {
        patch_member(l, "hangzhou", |m| {
            let mut only = m.access.last().unwrap().clone();
            only.principals = vec!["fedgate://yrd/office/*".into()];
            only.datasets = vec!["census".into()];
            only.via = vec!["fedgate://yrd/office/*".into()];
            let mut deny = only.clone();
            deny.via = Vec::new();
            deny.level = "deny".into();
            m.access.insert(0, deny);
            m.access.insert(0, only);
        })
    })
    .await;
    let sql = "SELECT count(*) AS n FROM census WHERE member = 'hangzhou'";
    region.client(OFFICE).query(sql, false, None).await.unwrap();
    let f = region
        .client("shanghai")
        .query(sql, false, None)
        .await
        .unwrap_err();
    let s = f.summary.unwrap();
    let m = s.members.iter().find(|m| m.member == "hangzhou").unwrap();
    assert_eq!(
        m.state,
        fedgate::proto::v1::MemberState::Denied as i32,
        "{m:?}"
    );
    assert!(
        m.reason
            .contains("only through the gateways: fedgate://yrd/office/*"),
        "{m:?}"
    );
}

#[tokio::test]
async fn an_answer_given_on_an_assertion_is_never_reused_for_a_later_query() {
    let region = Region::start_patched(None, &|l| {
        crate::support::patch_region(l, |r| {
            let census = r.datasets.iter_mut().find(|d| d.name == "census").unwrap();
            census.cache_fresh_for = Some("1h".into());
        })
    })
    .await;
    let sql = "SELECT member, count(*) AS n FROM census GROUP BY member ORDER BY member";
    let state = |s: &fedgate::proto::v1::QuerySummary, m: &str| member_state(s, m);
    // Control: through its own gateway the office's second query is served from the
    // cache, so caching is on here.
    let own = region.client(OFFICE);
    own.query(sql, false, None).await.unwrap();
    let again = own.query(sql, false, None).await.unwrap();
    assert_eq!(
        state(&again.summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Cached
    );
    // Through Shanghai with an assertion: answered by the members themselves.
    let vouched = region
        .client("shanghai")
        .query(sql, false, None)
        .await
        .unwrap();
    assert_eq!(
        state(&vouched.summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Ok
    );
    // The same query without one right after: refused, not served from a cache.
    let later = region
        .client_unvouched("shanghai")
        .query(sql, true, None)
        .await
        .unwrap();
    assert_eq!(
        state(&later.summary, "hangzhou"),
        fedgate::proto::v1::MemberState::Denied
    );
}
