//! A development certificate authority for a region (`fedgate pki`).
//!
//! Real deployments use the region's own CA; this module exists so that a demo region,
//! the tests and a first trial deployment can make a CA and member/client certificates
//! without other tools. Certificates carry the principal as a URI SAN and, for
//! gateways, the host names and addresses their endpoints use.
//!
//! It also keeps the region's revocation list (`ca.crl`, [`Ca::revoke`]) and renews a
//! certificate for the same identity and hosts ([`Ca::renew`]).

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, CertificateRevocationListParams, DistinguishedName,
    DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyIdMethod, KeyPair, KeyUsagePurpose,
    RevokedCertParams, SanType, SerialNumber,
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

/// A certificate named in a revocation list: its serial number, and when it was
/// revoked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    /// The serial number's bytes, as in the certificate.
    pub serial: Vec<u8>,
    /// When it was revoked (Unix seconds).
    pub at: i64,
}

/// The certificates a revocation list (PEM or DER) names.
pub fn revoked_in(crl: &[u8]) -> Result<Vec<Revoked>> {
    use rustls_pki_types::{CertificateRevocationListDer, pem::PemObject};
    use x509_parser::prelude::*;
    let der = match CertificateRevocationListDer::from_pem_slice(crl) {
        Ok(d) => d.as_ref().to_vec(),
        Err(_) => crl.to_vec(),
    };
    let (_, list) = CertificateRevocationList::from_der(&der)
        .map_err(|e| pki_err("reading the revocation list", e))?;
    Ok(list
        .iter_revoked_certificates()
        .map(|r| Revoked {
            serial: r.raw_serial().to_vec(),
            at: r.revocation_date.timestamp(),
        })
        .collect())
}

/// The serial number of a certificate (PEM), and the identity it carries.
pub fn serial_of(cert_pem: &str) -> Result<(Vec<u8>, Principal)> {
    use x509_parser::prelude::*;
    let der = cert_der(cert_pem)?;
    let (_, cert) =
        X509Certificate::from_der(&der).map_err(|e| pki_err("reading the certificate", e))?;
    let principal = crate::trust::identity::principal_from_cert(&der)?;
    Ok((cert.raw_serial().to_vec(), principal))
}

fn cert_der(cert_pem: &str) -> Result<Vec<u8>> {
    use rustls_pki_types::{CertificateDer, pem::PemObject};
    CertificateDer::from_pem_slice(cert_pem.as_bytes())
        .map(|d| d.as_ref().to_vec())
        .map_err(|e| pki_err("reading the certificate", e))
}

impl Ca {
    /// A revocation list naming `revoked` (and nothing else), valid for `days`, signed
    /// by this CA, PEM. Its number is the time of issue in milliseconds, so that a
    /// later list always has a larger number.
    pub fn revocation_list(&self, revoked: &[Revoked], days: i64) -> Result<String> {
        let now = OffsetDateTime::now_utc();
        let number = u64::try_from(now.unix_timestamp_nanos() / 1_000_000).unwrap_or(0);
        let params = CertificateRevocationListParams {
            this_update: now,
            next_update: now + Duration::days(days.max(1)),
            crl_number: SerialNumber::from(number),
            issuing_distribution_point: None,
            revoked_certs: revoked
                .iter()
                .map(|r| RevokedCertParams {
                    serial_number: SerialNumber::from_slice(&r.serial),
                    revocation_time: OffsetDateTime::from_unix_timestamp(r.at).unwrap_or(now),
                    reason_code: None,
                    invalidity_date: None,
                })
                .collect(),
            key_identifier_method: KeyIdMethod::Sha256,
        };
        let crl = params
            .signed_by(&self.issuer)
            .map_err(|e| pki_err("signing the revocation list", e))?;
        crl.pem()
            .map_err(|e| pki_err("encoding the revocation list", e))
    }

    /// Issues a new certificate and key for the identity and host names of
    /// `cert_pem`, valid from an hour ago for `days` days. The old certificate stays
    /// valid until it expires or is revoked.
    pub fn renew(&self, cert_pem: &str, days: i64) -> Result<(Principal, Issued)> {
        use x509_parser::prelude::*;
        let der = cert_der(cert_pem)?;
        let principal = crate::trust::identity::principal_from_cert(&der)?;
        let (_, cert) =
            X509Certificate::from_der(&der).map_err(|e| pki_err("reading the certificate", e))?;
        let mut hosts = Vec::new();
        if let Ok(Some(san)) = cert.subject_alternative_name() {
            for name in &san.value.general_names {
                match name {
                    GeneralName::DNSName(d) => hosts.push(d.to_string()),
                    GeneralName::IPAddress(b) => {
                        let ip = match b.len() {
                            4 => <[u8; 4]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            16 => <[u8; 16]>::try_from(*b).ok().map(std::net::IpAddr::from),
                            _ => None,
                        };
                        hosts.extend(ip.map(|ip| ip.to_string()));
                    }
                    _ => {}
                }
            }
        }
        let issued = self.issue(&principal, &hosts, days)?;
        Ok((principal, issued))
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

/// Writes `text` to `path` through a temporary file in the same folder and a rename,
/// so that a gateway watching the file never reads half of it.
pub fn write_atomically(path: &Path, text: &str, private: bool) -> Result<()> {
    let tmp = path.with_extension(format!(
        "{}.tmp",
        path.extension().and_then(|e| e.to_str()).unwrap_or("")
    ));
    write(&tmp, text, private)?;
    std::fs::rename(&tmp, path).map_err(|e| pki_err(&format!("replacing {}", path.display()), e))
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

    fn chain_of(pem: &str) -> Vec<CertificateDer<'static>> {
        vec![CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()]
    }

    #[test]
    fn a_revoked_certificate_is_refused_everywhere_and_the_others_are_not() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("yrd").unwrap();
        let (ca_crt, _) = write_ca(&ca, dir.path()).unwrap();
        let hefei = Principal::parse("fedgate://yrd/city/hefei").unwrap();
        let anji = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let h = ca.issue(&hefei, &default_hosts(), 30).unwrap();
        let a = ca.issue(&anji, &[], 30).unwrap();
        let (h_crt, h_key) = write_issued(&h, dir.path(), "hefei").unwrap();
        let (serial, who) = serial_of(&a.cert_pem).unwrap();
        assert_eq!(who, anji);
        let crl = dir.path().join("ca.crl");
        let pem = ca
            .revocation_list(
                &[Revoked {
                    serial,
                    at: 1_700_000_000,
                }],
                7,
            )
            .unwrap();
        std::fs::write(&crl, &pem).unwrap();
        assert_eq!(revoked_in(pem.as_bytes()).unwrap().len(), 1);

        let now = rustls_pki_types::UnixTime::now();
        let plain = crate::trust::tls::TlsMaterial::load(&ca_crt, &h_crt, &h_key).unwrap();
        plain.verify_chain(&chain_of(&a.cert_pem), now).unwrap();
        let checked = crate::trust::tls::TlsMaterial::load_with_crls(
            &ca_crt,
            std::slice::from_ref(&crl),
            &h_crt,
            &h_key,
        )
        .unwrap();
        let e = checked
            .verify_chain(&chain_of(&a.cert_pem), now)
            .unwrap_err()
            .to_string();
        assert!(e.contains("Revoked"), "{e}");
        checked.verify_chain(&chain_of(&h.cert_pem), now).unwrap();
        checked.verify_own_certificate().unwrap();
        assert!(checked.expiries.crl_next_update.is_some());

        // A list signed by another CA says nothing about this region's certificates,
        // so a certificate it would have to vouch for is refused, not let through.
        let other = Ca::generate("elsewhere").unwrap();
        std::fs::write(&crl, other.revocation_list(&[], 7).unwrap()).unwrap();
        let foreign = crate::trust::tls::TlsMaterial::load_with_crls(
            &ca_crt,
            std::slice::from_ref(&crl),
            &h_crt,
            &h_key,
        )
        .unwrap();
        assert!(foreign.verify_own_certificate().is_err());
        // A file that is not a revocation list is refused with its name.
        std::fs::write(&crl, "not a list").unwrap();
        let e = crate::trust::tls::TlsMaterial::load_with_crls(
            &ca_crt,
            std::slice::from_ref(&crl),
            &h_crt,
            &h_key,
        )
        .err()
        .unwrap()
        .to_string();
        assert!(e.contains("ca.crl"), "{e}");
    }

    /// Two lists of the one CA, the older (revoking nothing) named first: the newer
    /// decides, in the handshake's verifier as in the per-request serial check, and
    /// the next update reported is the newer list's.
    #[test]
    fn an_older_revocation_list_next_to_a_newer_one_does_not_undo_a_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::generate("yrd").unwrap();
        let (ca_crt, _) = write_ca(&ca, dir.path()).unwrap();
        let hefei = Principal::parse("fedgate://yrd/city/hefei").unwrap();
        let anji = Principal::parse("fedgate://yrd/county/anji").unwrap();
        let h = ca.issue(&hefei, &default_hosts(), 30).unwrap();
        let a = ca.issue(&anji, &[], 30).unwrap();
        let (h_crt, h_key) = write_issued(&h, dir.path(), "hefei").unwrap();
        let (serial, _) = serial_of(&a.cert_pem).unwrap();
        let old = dir.path().join("old.crl");
        std::fs::write(&old, ca.revocation_list(&[], 30).unwrap()).unwrap();
        // The CRL number is the time of issue in milliseconds.
        std::thread::sleep(std::time::Duration::from_millis(5));
        let new = dir.path().join("new.crl");
        let revoked = [Revoked {
            serial: serial.clone(),
            at: 1_700_000_000,
        }];
        std::fs::write(&new, ca.revocation_list(&revoked, 7).unwrap()).unwrap();

        let now = rustls_pki_types::UnixTime::now();
        for files in [[old.clone(), new.clone()], [new.clone(), old.clone()]] {
            let m = crate::trust::tls::TlsMaterial::load_with_crls(&ca_crt, &files, &h_crt, &h_key)
                .unwrap();
            let e = m
                .verify_chain(&chain_of(&a.cert_pem), now)
                .unwrap_err()
                .to_string();
            assert!(e.contains("Revoked"), "{files:?}: {e}");
            m.verify_chain(&chain_of(&h.cert_pem), now).unwrap();
            assert!(m.revoked.contains(&serial), "{files:?}");
            // The newer list is due in 7 days, the older in 30.
            let due = m.expiries.crl_next_update.unwrap();
            let in_days = (due - time::OffsetDateTime::now_utc().unix_timestamp()) / 86_400;
            assert!((6..=7).contains(&in_days), "{files:?}: {in_days}");
        }
    }

    #[test]
    fn a_renewed_certificate_keeps_its_identity_and_hosts_with_a_new_key() {
        let ca = Ca::generate("yrd").unwrap();
        let p = Principal::parse("fedgate://yrd/city/suzhou").unwrap();
        let hosts = vec!["gw.suzhou.example".to_string(), "10.1.2.3".to_string()];
        let old = ca.issue(&p, &hosts, 1).unwrap();
        let (who, new) = ca.renew(&old.cert_pem, 400).unwrap();
        assert_eq!(who, p);
        assert_ne!(new.key_pem, old.key_pem);
        assert_ne!(
            serial_of(&new.cert_pem).unwrap().0,
            serial_of(&old.cert_pem).unwrap().0
        );
        let (again, _) = ca.renew(&new.cert_pem, 1).unwrap();
        assert_eq!(again, p);
        use x509_parser::prelude::*;
        let der = chain_of(&new.cert_pem).remove(0);
        let (_, cert) = X509Certificate::from_der(der.as_ref()).unwrap();
        let names: Vec<String> = cert
            .subject_alternative_name()
            .unwrap()
            .unwrap()
            .value
            .general_names
            .iter()
            .map(|n| n.to_string())
            .collect();
        for want in [
            "gw.suzhou.example",
            "0a:01:02:03",
            "fedgate://yrd/city/suzhou",
        ] {
            assert!(
                names.iter().any(|n| n.contains(want)),
                "{want} not in {names:?}"
            );
        }
        let days =
            (cert.validity().not_after.timestamp() - chrono::Utc::now().timestamp()) / 86_400;
        assert!((399..=400).contains(&days), "{days}");
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
