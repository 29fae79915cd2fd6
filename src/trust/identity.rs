//! Who is calling: principals read from certificates once, at the TLS edge.
//!
//! Every gateway and client presents a certificate issued by the region CA whose URI
//! subject alternative name is its identity, `fedgate://<region>/<kind>/<name>` (for
//! example `fedgate://yrd/city/hangzhou`). The TLS layer turns the verified peer
//! certificate into a [`Principal`] and nothing after it looks at certificates again.

use std::fmt;

use crate::error::{Error, Result};

/// The URI scheme of fedgate identities.
pub const SCHEME: &str = "fedgate://";

/// What kind of party a principal is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    /// A city platform.
    City,
    /// A county (often rural) platform or portal.
    County,
    /// A regional coordination office.
    Office,
}

impl Kind {
    /// Parses `city`, `county` or `office`.
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "city" => Some(Kind::City),
            "county" => Some(Kind::County),
            "office" => Some(Kind::Office),
            _ => None,
        }
    }

    /// The lowercase word used in identities and configs.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::City => "city",
            Kind::County => "county",
            Kind::Office => "office",
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A verified identity: `fedgate://<region>/<kind>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Principal {
    region: String,
    kind: Kind,
    name: String,
}

impl Principal {
    /// Builds a principal from its parts (names are checked like parsed ones).
    pub fn new(region: &str, kind: Kind, name: &str) -> Result<Principal> {
        for (what, v) in [("region", region), ("name", name)] {
            if !valid_segment(v) {
                return Err(Error::Config(format!(
                    "identity {what} {v:?} must be non-empty lowercase letters, digits, '-' or '_'"
                )));
            }
        }
        Ok(Principal {
            region: region.to_string(),
            kind,
            name: name.to_string(),
        })
    }

    /// Parses `fedgate://<region>/<kind>/<name>`.
    pub fn parse(uri: &str) -> Result<Principal> {
        let bad = |why: &str| {
            Error::Unauthenticated(format!(
                "identity {uri:?} is not of the form fedgate://<region>/<city|county|office>/<name>: {why}"
            ))
        };
        let rest = uri
            .strip_prefix(SCHEME)
            .ok_or_else(|| bad("wrong scheme"))?;
        let parts: Vec<&str> = rest.split('/').collect();
        let [region, kind, name] = parts[..] else {
            return Err(bad("expected three path segments"));
        };
        let kind = Kind::parse(kind).ok_or_else(|| bad("unknown kind"))?;
        Principal::new(region, kind, name).map_err(|_| bad("invalid characters"))
    }

    /// The region this identity belongs to.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// City, county or office.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// The short name, e.g. `hangzhou`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The full URI form.
    pub fn uri(&self) -> String {
        self.to_string()
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/{}/{}", self.region, self.kind, self.name)
    }
}

fn valid_segment(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

/// Reads the fedgate identity from a DER certificate's URI subject alternative names.
///
/// Exactly one `fedgate://` URI must be present, so that a certificate can never
/// speak for two principals.
pub fn principal_from_cert(der: &[u8]) -> Result<Principal> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der)
        .map_err(|e| Error::Unauthenticated(format!("unreadable client certificate: {e}")))?;
    let mut uris = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let GeneralName::URI(u) = name
                && u.starts_with(SCHEME)
            {
                uris.push(u.to_string());
            }
        }
    }
    match uris.as_slice() {
        [one] => Principal::parse(one),
        [] => Err(Error::Unauthenticated(
            "certificate has no fedgate:// URI subject alternative name".into(),
        )),
        _ => Err(Error::Unauthenticated(format!(
            "certificate names more than one fedgate identity: {}",
            uris.join(", ")
        ))),
    }
}

/// Matches a principal against a pattern: an exact URI, or a URI whose last segments
/// are `*` (`fedgate://yrd/county/*`, `fedgate://yrd/*`), or `*` for anyone.
pub fn matches_pattern(pattern: &str, p: &Principal) -> bool {
    if pattern == "*" {
        return true;
    }
    let uri = p.uri();
    match pattern.strip_suffix("/*") {
        Some(prefix) => uri.starts_with(prefix) && uri[prefix.len()..].starts_with('/'),
        None => pattern == uri,
    }
}

/// Checks that a pattern is well formed (used when validating config).
pub fn validate_pattern(pattern: &str) -> std::result::Result<(), String> {
    if pattern == "*" {
        return Ok(());
    }
    let Some(rest) = pattern.strip_prefix(SCHEME) else {
        return Err(format!(
            "pattern {pattern:?} must start with {SCHEME} or be \"*\""
        ));
    };
    let segs: Vec<&str> = rest.split('/').collect();
    if segs.is_empty() || segs.len() > 3 {
        return Err(format!("pattern {pattern:?} has too many segments"));
    }
    for (i, s) in segs.iter().enumerate() {
        let last = i + 1 == segs.len();
        if *s == "*" && last {
            continue;
        }
        if i == 1 && Kind::parse(s).is_none() {
            return Err(format!("pattern {pattern:?}: unknown kind {s:?}"));
        }
        if !valid_segment(s) {
            return Err(format!("pattern {pattern:?}: bad segment {s:?}"));
        }
    }
    if segs.len() < 3 && segs.last() != Some(&"*") {
        return Err(format!(
            "pattern {pattern:?} must name a principal or end in /*"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_identities() {
        let p = Principal::parse("fedgate://yrd/city/hangzhou").unwrap();
        assert_eq!(p.region(), "yrd");
        assert_eq!(p.kind(), Kind::City);
        assert_eq!(p.name(), "hangzhou");
        assert_eq!(p.to_string(), "fedgate://yrd/city/hangzhou");
    }

    #[test]
    fn rejects_malformed_identities() {
        for bad in [
            "https://yrd/city/x",
            "fedgate://yrd/city",
            "fedgate://yrd/town/x",
            "fedgate://yrd/city/X",
            "fedgate://yrd/city/a/b",
            "fedgate:///city/x",
        ] {
            let e = Principal::parse(bad).unwrap_err();
            assert!(e.to_string().contains(bad), "{e}");
        }
    }

    #[test]
    fn patterns_match_by_segment() {
        let p = Principal::parse("fedgate://yrd/county/anji").unwrap();
        assert!(matches_pattern("*", &p));
        assert!(matches_pattern("fedgate://yrd/*", &p));
        assert!(matches_pattern("fedgate://yrd/county/*", &p));
        assert!(matches_pattern("fedgate://yrd/county/anji", &p));
        assert!(!matches_pattern("fedgate://yrd/city/*", &p));
        assert!(!matches_pattern("fedgate://yr/*", &p));
        assert!(!matches_pattern("fedgate://yrd/county/anj", &p));
        assert!(validate_pattern("fedgate://yrd/county/*").is_ok());
        assert!(validate_pattern("fedgate://yrd/village/*").is_err());
        assert!(validate_pattern("yrd/*").is_err());
        assert!(validate_pattern("fedgate://yrd/city").is_err());
    }
}
