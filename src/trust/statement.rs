//! Statements signed with a region identity's TLS key: origin assertions, incident
//! declarations and answer receipts all use the same envelope ([`SignedStatement`]).
//!
//! The signature covers a context string naming the statement's kind, a NUL byte and
//! the encoded body, so that a signature made for one kind of statement (or a TLS
//! handshake, which signs with the same key) never passes as another. The signer's
//! certificate chain travels with the statement, so anyone holding the region CA can
//! check it offline.

use std::time::{SystemTime, UNIX_EPOCH};

use prost::Message;
use rustls::SignatureScheme;
use rustls_pki_types::{CertificateDer, UnixTime};

use crate::error::{Error, Result};
use crate::proto::v1::SignedStatement;
use crate::trust::identity::{Principal, principal_from_cert};
use crate::trust::tls::TlsMaterial;

/// Schemes a key signs with, in order of preference.
const SCHEMES: &[SignatureScheme] = &[
    SignatureScheme::ECDSA_NISTP256_SHA256,
    SignatureScheme::ECDSA_NISTP384_SHA384,
    SignatureScheme::ED25519,
    SignatureScheme::RSA_PSS_SHA256,
];

/// The bytes a signature covers: the context, NUL, the body.
fn signed_message(context: &str, body: &[u8]) -> Vec<u8> {
    let mut msg = Vec::with_capacity(context.len() + 1 + body.len());
    msg.extend_from_slice(context.as_bytes());
    msg.push(0);
    msg.extend_from_slice(body);
    msg
}

/// Signs `body` under `context` with `material`'s private key.
pub fn sign(material: &TlsMaterial, context: &str, body: Vec<u8>) -> Result<SignedStatement> {
    let key = material.signing_key()?;
    let signer = key.choose_scheme(SCHEMES).ok_or_else(|| {
        Error::Tls(format!(
            "the key of {} supports none of the signature schemes {SCHEMES:?}",
            material.principal
        ))
    })?;
    let signature = signer
        .sign(&signed_message(context, &body))
        .map_err(|e| Error::Tls(format!("signing a {context}: {e}")))?;
    Ok(SignedStatement {
        body,
        scheme: u32::from(u16::from(signer.scheme())),
        signature,
        chain: material.chain().iter().map(|c| c.to_vec()).collect(),
    })
}

/// Why a signed statement does not verify; names no content of the statement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Unverified {
    /// The signer's certificate is not accepted by the region CA at the time given.
    #[error("its signer's certificate is not accepted by the region CA ({0})")]
    Certificate(String),
    /// The signature does not verify with the signer's certificate.
    #[error(
        "its signature does not verify with its signer's certificate (it was altered, or \
         signed with another key)"
    )]
    Signature,
    /// The scheme is unknown or not accepted.
    #[error("its signature scheme {0} is not accepted")]
    Scheme(String),
    /// The certificate names no region identity.
    #[error("its signer's certificate names no identity ({0})")]
    Identity(String),
}

/// Checks `signed` under `context`: the chain is issued by the region CA and valid at
/// `at` (and not revoked, per `material`'s lists), and the signature over the body
/// verifies with the end certificate's key. Returns the signer's identity.
pub fn verify(
    material: &TlsMaterial,
    context: &str,
    signed: &SignedStatement,
    at: SystemTime,
) -> std::result::Result<Principal, Unverified> {
    let chain: Vec<CertificateDer<'_>> = signed
        .chain
        .iter()
        .map(|c| CertificateDer::from(c.as_slice()))
        .collect();
    let when = UnixTime::since_unix_epoch(at.duration_since(UNIX_EPOCH).unwrap_or_default());
    material
        .verify_chain(&chain, when)
        .map_err(|e| Unverified::Certificate(e.to_string()))?;
    let end = webpki::EndEntityCert::try_from(&chain[0])
        .map_err(|e| Unverified::Certificate(format!("unreadable: {e}")))?;
    let scheme = u16::try_from(signed.scheme)
        .map(SignatureScheme::from)
        .map_err(|_| Unverified::Scheme(signed.scheme.to_string()))?;
    let provider = crate::trust::tls::provider();
    let algorithms = provider
        .signature_verification_algorithms
        .mapping
        .iter()
        .find(|(s, _)| *s == scheme)
        .map(|(_, a)| *a)
        .ok_or_else(|| Unverified::Scheme(format!("{scheme:?}")))?;
    let msg = signed_message(context, &signed.body);
    if !algorithms
        .iter()
        .any(|alg| end.verify_signature(*alg, &msg, &signed.signature).is_ok())
    {
        return Err(Unverified::Signature);
    }
    principal_from_cert(&chain[0]).map_err(|e| Unverified::Identity(e.to_string()))
}

/// Decodes a [`SignedStatement`] of at most `max` bytes.
pub fn decode(encoded: &[u8], max: usize) -> std::result::Result<SignedStatement, String> {
    if encoded.len() > max {
        return Err(format!(
            "it is {} bytes long, more than {max}",
            encoded.len()
        ));
    }
    SignedStatement::decode(encoded).map_err(|e| format!("it is not a signed statement ({e})"))
}

/// Milliseconds since the Unix epoch.
pub fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The time `ms` milliseconds after the Unix epoch.
pub fn at_millis(ms: u64) -> SystemTime {
    UNIX_EPOCH + std::time::Duration::from_millis(ms)
}
