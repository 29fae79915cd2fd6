//! Origin assertions: who may speak for a caller at a data owner.
//!
//! A sub-query names its origin (the caller who asked) and arrives through a gateway
//! (the coordinator, verified by mutual TLS). The owner answers under the origin's
//! rules only when the gateway is entitled to speak for the origin:
//!
//! - **Its own gateway.** A gateway whose certificate names the origin's identity is
//!   the origin's organization itself (an organization's gateway and its clients share
//!   one identity), so it needs no further proof.
//! - **An assertion from the origin's gateway.** Through any other gateway, the request
//!   must carry a [`SignedOriginAssertion`] signed with the TLS key of the origin's own
//!   gateway. It names the only gateway that may present it (`via`), the members it may
//!   be presented to (`audience`), the datasets and purpose of the query, a validity of
//!   at most [`MAX_VALIDITY`] and a nonce that each owner binds to the first query id it
//!   is used with ([`Nonces`]). The origin's client obtains it from its own gateway
//!   (`Federation.Vouch`, which only that gateway's own identity may call) and hands it
//!   to the gateway it asks.
//!
//! The signer's certificate must chain to the region CA, name the origin, and belong to
//! a member with a gateway (an endpoint in the region file). What a gateway holding a
//! valid assertion can still do is written in ARCHITECTURE.md ("Origin trust").

use std::time::{Duration, SystemTime};

use prost::Message;
use sha2::{Digest, Sha256};

use crate::error::{Error, Result};
use crate::proto::v1::{OriginAssertion, SignedOriginAssertion, SignedStatement};
use crate::trust::identity::Principal;
use crate::trust::statement::{self, millis};
use crate::trust::tls::TlsMaterial;

/// The gRPC metadata key a client sends an assertion under (binary metadata).
pub const METADATA_KEY: &str = "fedgate-origin-assertion-bin";

/// The HTTP header a client sends an assertion under (standard base64).
pub const HTTP_HEADER: &str = "fedgate-origin-assertion";

/// Validity when the request does not ask for one.
pub const DEFAULT_VALIDITY: Duration = Duration::from_secs(60);

/// The longest validity a gateway signs or an owner accepts.
pub const MAX_VALIDITY: Duration = Duration::from_secs(300);

/// How far apart the clocks of two gateways may be.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The largest encoded assertion read (a chain of a few certificates fits easily).
const MAX_ENCODED: usize = 32 * 1024;

/// The context an assertion is signed under (see [`crate::trust::statement`]), so
/// that a signature made for anything else with the gateway's key (a TLS handshake, an
/// incident declaration) can never pass as an assertion.
const CONTEXT: &str = "fedgate origin assertion v1";

/// The digest an assertion binds a query by: SHA-256 of its SQL text.
pub fn sql_digest(sql: &str) -> String {
    hex::encode(Sha256::digest(sql.as_bytes()))
}

/// The digest an assertion binds a query's incident declaration by (empty: none).
pub fn incident_digest(declaration: Option<&[u8]>) -> String {
    declaration
        .filter(|d| !d.is_empty())
        .map(|d| hex::encode(Sha256::digest(d)))
        .unwrap_or_default()
}

/// The digest an assertion binds a published service call by.
pub fn service_digest(service: &str) -> String {
    sql_digest(&format!("service:{service}"))
}

/// Why an assertion is refused, worded for the caller and the audit record. It names
/// identities and fields, never record values (an assertion holds none).
fn refused(why: impl std::fmt::Display) -> Error {
    Error::PermissionDenied(format!("origin assertion refused: {why}"))
}

/// Signs `body` with the gateway's TLS key; the result is an encoded
/// [`SignedOriginAssertion`].
pub fn sign(material: &TlsMaterial, body: &OriginAssertion) -> Result<Vec<u8>> {
    let signed = statement::sign(material, CONTEXT, body.encode_to_vec())?;
    Ok(SignedOriginAssertion {
        body: signed.body,
        scheme: signed.scheme,
        signature: signed.signature,
        chain: signed.chain,
    }
    .encode_to_vec())
}

/// What `Federation.Vouch` signs for: `origin` asks `sql_digest` over `datasets`
/// stating `purpose`, through `via`, presented to `audience`, from `now` for `validity`.
pub struct Vouch<'a> {
    /// The caller (the signing gateway's own identity).
    pub origin: &'a Principal,
    /// The gateway the caller will ask.
    pub via: &'a Principal,
    /// The members the query may reach.
    pub audience: Vec<String>,
    /// The datasets the query reads.
    pub datasets: Vec<String>,
    /// The purpose text the query states.
    pub purpose: &'a str,
    /// [`sql_digest`] or [`service_digest`].
    pub query_sha256: String,
    /// [`incident_digest`] of the declaration the query states.
    pub incident_sha256: String,
    /// When it starts.
    pub now: SystemTime,
    /// How long it lasts (at most [`MAX_VALIDITY`]).
    pub validity: Duration,
}

impl Vouch<'_> {
    /// The assertion body, with a fresh nonce.
    pub fn body(&self) -> OriginAssertion {
        let from = millis(self.now);
        OriginAssertion {
            origin: self.origin.uri(),
            via: self.via.uri(),
            audience: self.audience.clone(),
            datasets: self.datasets.clone(),
            purpose: self.purpose.to_string(),
            query_sha256: self.query_sha256.clone(),
            nonce: uuid::Uuid::new_v4().simple().to_string(),
            not_before_ms: from,
            not_after_ms: from + self.validity.min(MAX_VALIDITY).as_millis() as u64,
            incident_sha256: self.incident_sha256.clone(),
        }
    }
}

/// An assertion whose signature and signer have been checked.
#[derive(Debug, Clone)]
pub struct Verified {
    /// What it asserts.
    pub body: OriginAssertion,
    /// The identity in the signer's certificate.
    pub signer: Principal,
}

/// Reads an encoded assertion and checks its signer: the certificate chain is issued
/// by the region CA and valid at `now`, the signature over the body verifies with that
/// certificate's key, the certificate names the asserted origin, and that identity
/// has a gateway in the region (`has_gateway`, from the region file).
pub fn verify(
    material: &TlsMaterial,
    has_gateway: &dyn Fn(&Principal) -> bool,
    encoded: &[u8],
    now: SystemTime,
) -> Result<Verified> {
    if encoded.len() > MAX_ENCODED {
        return Err(refused(format!(
            "it is {} bytes long, more than {MAX_ENCODED}",
            encoded.len()
        )));
    }
    let signed = SignedOriginAssertion::decode(encoded)
        .map_err(|e| refused(format!("it is not a signed origin assertion ({e})")))?;
    let signed = SignedStatement {
        body: signed.body,
        scheme: signed.scheme,
        signature: signed.signature,
        chain: signed.chain,
    };
    let signer = statement::verify(material, CONTEXT, &signed, now).map_err(refused)?;
    let body = OriginAssertion::decode(signed.body.as_slice())
        .map_err(|e| refused(format!("its body is unreadable ({e})")))?;
    if body.origin != signer.uri() {
        return Err(refused(format!(
            "it is signed by {signer}, not by the gateway of the origin it names ({})",
            body.origin
        )));
    }
    if !has_gateway(&signer) {
        return Err(refused(format!(
            "its signer {signer} has no gateway in the region"
        )));
    }
    Ok(Verified { body, signer })
}

/// What a request presenting an assertion must agree with.
#[derive(Clone, Copy)]
pub struct Expected<'a> {
    /// The origin the request names.
    pub origin: &'a Principal,
    /// The gateway presenting it (verified by TLS).
    pub via: &'a Principal,
    /// The member checking it (`None` at the coordinator, which is not in the audience).
    pub audience: Option<&'a Principal>,
    /// The purpose the request states (empty for none).
    pub purpose: &'a str,
    /// The query digest, where the checker sees the caller's query (the coordinator).
    pub query_sha256: Option<&'a str>,
    /// [`incident_digest`] of the declaration the request states.
    pub incident_sha256: &'a str,
    /// Now.
    pub now: SystemTime,
}

impl Verified {
    /// Checks that the assertion covers this request: origin, presenting gateway,
    /// audience, purpose, query (where known) and time.
    pub fn covers(&self, e: &Expected<'_>) -> Result<()> {
        let b = &self.body;
        if b.origin != e.origin.uri() {
            return Err(refused(format!(
                "it vouches for {}, not for the origin {} the request names",
                b.origin, e.origin
            )));
        }
        if b.via != e.via.uri() {
            return Err(refused(format!(
                "it may be presented only by {}, not by {}",
                b.via, e.via
            )));
        }
        if let Some(me) = e.audience
            && !b.audience.iter().any(|a| *a == me.uri())
        {
            return Err(refused(format!("{me} is not among its audience")));
        }
        if b.purpose != e.purpose {
            return Err(refused(format!(
                "it was made for the purpose {:?}, not {:?}",
                b.purpose, e.purpose
            )));
        }
        if let Some(q) = e.query_sha256
            && b.query_sha256 != q
        {
            return Err(refused("it was made for another query"));
        }
        if b.incident_sha256 != e.incident_sha256 {
            return Err(refused(
                "it was made for a query under another incident declaration, or none",
            ));
        }
        let now = millis(e.now);
        let skew = CLOCK_SKEW.as_millis() as u64;
        if b.not_after_ms < b.not_before_ms
            || b.not_after_ms - b.not_before_ms > MAX_VALIDITY.as_millis() as u64
        {
            return Err(refused(format!(
                "its validity is longer than the {} s an owner accepts",
                MAX_VALIDITY.as_secs()
            )));
        }
        if now + skew < b.not_before_ms {
            return Err(refused("it is not valid yet (check the gateways' clocks)"));
        }
        if now > b.not_after_ms + skew {
            return Err(refused(format!(
                "it expired {} s ago",
                (now - b.not_after_ms) / 1000
            )));
        }
        Ok(())
    }

    /// The datasets it covers.
    pub fn datasets(&self) -> std::collections::BTreeSet<String> {
        self.body.datasets.iter().cloned().collect()
    }
}

/// The most assertions a gateway remembers at once; past it, new ones are refused
/// (never is a remembered one forgotten early, which would make it replayable).
const MAX_REMEMBERED: u64 = 1_000_000;

/// The longest nonce or query id accepted.
const MAX_ID_LEN: usize = 64;

/// Nonces a gateway has seen, each bound to the query id it was first used with. An
/// assertion presented again for the same query (a retry, a second scan of the same
/// query) passes; for any other query it is a replay. They live in memory: after a
/// restart, assertions made before it are refused instead.
pub struct Nonces {
    /// (signer, nonce) to query id.
    seen: moka::sync::Cache<(String, String), String>,
    /// Assertions made before this moment may have been used before a restart.
    since_ms: u64,
}

impl Default for Nonces {
    fn default() -> Self {
        Nonces {
            // Kept past the longest validity and the clock skew on both sides: an
            // assertion that could still pass the time check is still remembered.
            // No capacity: moka would evict entries to make room, so the bound is
            // checked by `bind` instead.
            seen: moka::sync::Cache::builder()
                .time_to_live(MAX_VALIDITY + CLOCK_SKEW * 2 + Duration::from_secs(1))
                .build(),
            since_ms: millis(SystemTime::now()),
        }
    }
}

impl Nonces {
    /// Binds the nonce of `v` to `query_id`, or refuses it when it is bound to another
    /// query, was made before this gateway started, or too many are remembered.
    pub fn bind(&self, v: &Verified, query_id: &str) -> Result<()> {
        let nonce = &v.body.nonce;
        if nonce.is_empty() || query_id.is_empty() {
            return Err(refused("it has no nonce, or the request no query id"));
        }
        if nonce.len() > MAX_ID_LEN || query_id.len() > MAX_ID_LEN {
            return Err(refused(format!(
                "its nonce or the request's query id is longer than {MAX_ID_LEN} bytes"
            )));
        }
        if v.body.not_before_ms + (CLOCK_SKEW.as_millis() as u64) < self.since_ms {
            return Err(refused(
                "it was made before this gateway last started, when its use could not be \
                 remembered; ask for a new one",
            ));
        }
        let key = (v.signer.uri(), nonce.clone());
        if !self.seen.contains_key(&key) && self.seen.entry_count() >= MAX_REMEMBERED {
            return Err(Error::Overloaded(
                "this gateway remembers as many origin assertions as it can; try again in \
                 a few minutes"
                    .into(),
            ));
        }
        let bound = self.seen.get_with(key, || query_id.to_string());
        if bound != query_id {
            return Err(refused(
                "it was already used for another query (an assertion is good for one query)",
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nonce_is_good_for_one_query_of_its_signer() {
        let n = Nonces::default();
        let now = millis(SystemTime::now());
        let v = verified(now, now + 60_000);
        n.bind(&v, "q1").unwrap();
        n.bind(&v, "q1").unwrap();
        let e = n.bind(&v, "q2").unwrap_err().to_string();
        assert!(e.contains("already used"), "{e}");
        // The same nonce from another signer is another assertion.
        let mut other = v.clone();
        other.signer = Principal::parse("fedgate://r/city/w").unwrap();
        n.bind(&other, "q2").unwrap();
        assert!(n.bind(&v, "").is_err());
        let mut long = v.clone();
        long.body.nonce = "n".repeat(65);
        assert!(
            n.bind(&long, "q3")
                .unwrap_err()
                .to_string()
                .contains("longer than")
        );
        // Made before this gateway started: its earlier uses are not remembered.
        let old = verified(now - 120_000, now + 60_000);
        let e = n.bind(&old, "q4").unwrap_err().to_string();
        assert!(e.contains("before this gateway last started"), "{e}");
    }

    fn verified(not_before_ms: u64, not_after_ms: u64) -> Verified {
        Verified {
            body: OriginAssertion {
                origin: "fedgate://r/office/o".into(),
                via: "fedgate://r/city/v".into(),
                audience: vec!["fedgate://r/city/w".into()],
                datasets: vec!["d".into()],
                purpose: "p: 1".into(),
                query_sha256: sql_digest("SELECT 1"),
                nonce: "n".into(),
                not_before_ms,
                not_after_ms,
                incident_sha256: String::new(),
            },
            signer: Principal::parse("fedgate://r/office/o").unwrap(),
        }
    }

    #[test]
    fn every_field_of_the_request_must_match() {
        let now = SystemTime::now();
        let t = millis(now);
        let v = verified(t, t + 60_000);
        let o = Principal::parse("fedgate://r/office/o").unwrap();
        let via = Principal::parse("fedgate://r/city/v").unwrap();
        let w = Principal::parse("fedgate://r/city/w").unwrap();
        let other = Principal::parse("fedgate://r/city/x").unwrap();
        let digest = sql_digest("SELECT 1");
        let ok = Expected {
            origin: &o,
            via: &via,
            audience: Some(&w),
            purpose: "p: 1",
            query_sha256: Some(&digest),
            incident_sha256: "",
            now,
        };
        v.covers(&ok).unwrap();
        let cases: Vec<(Expected<'_>, &str)> = vec![
            (
                Expected {
                    origin: &other,
                    ..ok
                },
                "vouches for",
            ),
            (Expected { via: &other, ..ok }, "presented only by"),
            (
                Expected {
                    audience: Some(&other),
                    ..ok
                },
                "audience",
            ),
            (
                Expected {
                    purpose: "p: 2",
                    ..ok
                },
                "purpose",
            ),
            (
                Expected {
                    query_sha256: Some("00"),
                    ..ok
                },
                "another query",
            ),
            (
                Expected {
                    incident_sha256: "ab",
                    ..ok
                },
                "another incident declaration",
            ),
            (
                Expected {
                    now: now + MAX_VALIDITY,
                    ..ok
                },
                "expired",
            ),
            (
                Expected {
                    now: now - Duration::from_secs(120),
                    ..ok
                },
                "not valid yet",
            ),
        ];
        for (e, want) in cases {
            let got = v.covers(&e).unwrap_err().to_string();
            assert!(got.contains(want), "{got} should say {want}");
        }
        // Within the clock skew either way it still passes.
        v.covers(&Expected {
            now: now + Duration::from_secs(80),
            ..ok
        })
        .unwrap();
        v.covers(&Expected {
            now: now - Duration::from_secs(20),
            ..ok
        })
        .unwrap();
        // A validity longer than the maximum is refused even while current.
        let long = verified(t, t + MAX_VALIDITY.as_millis() as u64 + 1);
        let got = long.covers(&ok).unwrap_err().to_string();
        assert!(got.contains("longer than"), "{got}");
    }
}
