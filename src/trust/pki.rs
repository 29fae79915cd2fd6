//! A development certificate authority for a region (`fedgate pki`).
//!
//! Real deployments use the region's own CA; this module exists so that a demo region,
//! the tests and a first trial deployment can make a CA and member/client certificates
//! without other tools. Certificates carry the principal as a URI SAN and, for
//! gateways, the host names and addresses their endpoints use.

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use time::{Duration, OffsetDateTime};

use crate::error::{Error, Result};
use crate::trust::identity::Principal;

/// A loaded CA able to issue certificates.
pub struct Ca {
    cert_pem: String,
    issuer: Issuer<'static, KeyPair>,
}

/// PEM text of an issued certificate and its private key.
pub struct Issued {
    /// The certificate, PEM.
    pub cert_pem: String,
    /// The private key, PEM (PKCS#8).
    pub key_pem: String,
}

fn pki_err(what: &str, e: impl std::fmt::Display) -> Error {
    Error::Tls(format!("{what}: {e}"))
}

impl Ca {
    /// Makes a new self-signed region CA valid for ten years.
    pub fn generate(region: &str) -> Result<Ca> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pki_err("CA parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, format!("fedgate region {region} CA"));
        dn.push(DnType::OrganizationName, format!("fedgate region {region}"));
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::hours(1);
        params.not_after = now + Duration::days(3650);
        let key = KeyPair::generate().map_err(|e| pki_err("CA key", e))?;
        let cert = params
            .self_signed(&key)
            .map_err(|e| pki_err("self-signing the CA", e))?;
        Ok(Ca {
            cert_pem: cert.pem(),
            issuer: Issuer::new(params, key),
        })
    }

    /// Loads a CA from its certificate and key PEM files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Ca> {
        let cert_pem = read(cert_path)?;
        let key_pem = read(key_path)?;
        let key = KeyPair::from_pem(&key_pem)
            .map_err(|e| pki_err(&format!("CA key {}", key_path.display()), e))?;
        let issuer = Issuer::from_ca_cert_pem(&cert_pem, key)
            .map_err(|e| pki_err(&format!("CA certificate {}", cert_path.display()), e))?;
        Ok(Ca { cert_pem, issuer })
    }

    /// The CA certificate, PEM.
    pub fn cert_pem(&self) -> &str {
        &self.cert_pem
    }

    /// The CA private key, PEM.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Issues a certificate for `principal`, usable both as a TLS server (for
    /// `hosts`) and as a TLS client, valid from `not_before` to `not_after`.
    pub fn issue_with_validity(
        &self,
        principal: &Principal,
        hosts: &[String],
        not_before: OffsetDateTime,
        not_after: OffsetDateTime,
    ) -> Result<Issued> {
        let mut params = CertificateParams::new(Vec::<String>::new())
            .map_err(|e| pki_err("certificate parameters", e))?;
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, principal.uri());
        params.distinguished_name = dn;
        let uri = principal
            .uri()
            .try_into()
            .map_err(|e| pki_err("URI subject alternative name", e))?;
        params.subject_alt_names.push(SanType::URI(uri));
        for h in hosts {
            let san = match h.parse::<std::net::IpAddr>() {
                Ok(ip) => SanType::IpAddress(ip),
                Err(_) => SanType::DnsName(
                    h.clone()
                        .try_into()
                        .map_err(|e| pki_err(&format!("host name {h:?}"), e))?,
                ),
            };
            params.subject_alt_names.push(san);
        }
        params.is_ca = IsCa::ExplicitNoCa;
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        params.not_before = not_before;
        params.not_after = not_after;
        let key = KeyPair::generate().map_err(|e| pki_err("key", e))?;
        let cert = params
            .signed_by(&key, &self.issuer)
            .map_err(|e| pki_err("signing", e))?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// Issues a certificate valid from an hour ago for `days` days.
    pub fn issue(&self, principal: &Principal, hosts: &[String], days: i64) -> Result<Issued> {
        let now = OffsetDateTime::now_utc();
        self.issue_with_validity(
            principal,
            hosts,
            now - Duration::hours(1),
            now + Duration::days(days),
        )
    }
}

/// The host names a loopback gateway certificate carries by default.
pub fn default_hosts() -> Vec<String> {
    vec!["localhost".into(), "127.0.0.1".into(), "::1".into()]
}

/// Writes a CA into `dir` as `ca.crt` and `ca.key`.
pub fn write_ca(ca: &Ca, dir: &Path) -> Result<(PathBuf, PathBuf)> {
    let crt = dir.join("ca.crt");
    let key = dir.join("ca.key");
    write(&crt, ca.cert_pem(), false)?;
    write(&key, &ca.key_pem(), true)?;
    Ok((crt, key))
}

/// Writes an issued certificate as `<name>.crt` and `<name>.key` in `dir`.
pub fn write_issued(issued: &Issued, dir: &Path, name: &str) -> Result<(PathBuf, PathBuf)> {
    let crt = dir.join(format!("{name}.crt"));
    let key = dir.join(format!("{name}.key"));
    write(&crt, &issued.cert_pem, false)?;
    write(&key, &issued.key_pem, true)?;
    Ok((crt, key))
}

fn read(path: &Path) -> Result<String> {
    std::fs::read_to_string(path).map_err(|e| pki_err(&format!("reading {}", path.display()), e))
}

fn write(path: &Path, text: &str, private: bool) -> Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)
            .map_err(|e| pki_err(&format!("creating {}", parent.display()), e))?;
    }
    std::fs::write(path, text).map_err(|e| pki_err(&format!("writing {}", path.display()), e))?;
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| pki_err(&format!("protecting {}", path.display()), e))?;
    }
    #[cfg(not(unix))]
    let _ = private;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::trust::identity::principal_from_cert;
    use rustls_pki_types::{CertificateDer, pem::PemObject};

    #[test]
    fn issued_certificates_carry_the_principal() {
        let ca = Ca::generate("yrd").unwrap();
        let p = Principal::parse("fedgate://yrd/city/hefei").unwrap();
        let issued = ca.issue(&p, &default_hosts(), 30).unwrap();
        let der = CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap();
        assert_eq!(principal_from_cert(&der).unwrap(), p);
    }

    #[test]
    fn a_saved_ca_can_be_loaded_and_issue() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("yrd").unwrap();
        let (crt, key) = write_ca(&ca, dir.path()).unwrap();
        let loaded = Ca::load(&crt, &key).unwrap();
        let p = Principal::parse("fedgate://yrd/office/coordination").unwrap();
        assert!(
            loaded
                .issue(&p, &[], 1)
                .unwrap()
                .cert_pem
                .contains("BEGIN CERTIFICATE")
        );
    }
}
