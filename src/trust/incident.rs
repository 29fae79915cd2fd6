//! Incident declarations: time-boxed emergency access, declared by a region identity
//! and honoured by each owner under its own emergency rules.
//!
//! A declaration ([`IncidentDeclaration`]) names an incident number, what happened,
//! the datasets and rows (a scope of `field IN (values)` conditions) it opens, the
//! purposes it covers and a window; it is signed with the declarer's TLS key in a
//! [`crate::proto::v1::SignedStatement`] under [`CONTEXT`]. A renewal and an early end
//! are declarations too: the same number and declarer, issued later. Of the
//! declarations an owner has seen for one (declarer, number), the latest issued is in
//! force (`owner::incidents`), so a caller who keeps presenting the first one after
//! an end that reached the owner gains nothing; an owner the end did not reach still
//! stops at the window's end, which is why windows are short by default.
//!
//! This module checks form and signature only; whether a declaration opens anything
//! is each owner's decision (`owner::policy`).

use std::time::{Duration, SystemTime};

use prost::Message;

use crate::error::{Error, Result};
use crate::proto::v1::{IncidentDeclaration, ScopeCondition, SignedStatement};
use crate::trust::identity::Principal;
use crate::trust::statement::{self, at_millis, millis};
use crate::trust::tls::TlsMaterial;

/// The context declarations are signed under.
pub const CONTEXT: &str = "fedgate incident declaration v1";

/// The longest window any declaration may have (owners honour less, by their rules).
pub const MAX_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

/// The window `fedgate incident declare` gives when none is asked for.
pub const DEFAULT_WINDOW: Duration = Duration::from_secs(4 * 3600);

/// The largest encoded declaration read.
pub const MAX_ENCODED: usize = 64 * 1024;

/// How far apart the declarer's and an owner's clocks may be.
pub const CLOCK_SKEW: Duration = Duration::from_secs(30);

/// The latest time a declaration may name: the end of the year 9999.
const MAX_TIME_MS: u64 = 253_402_300_799_999;

/// What a declaration does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    /// Opens an incident.
    Declare,
    /// Extends (or changes) an incident in force.
    Renew,
    /// Ends an incident early.
    End,
}

impl Kind {
    /// The word used in declarations.
    pub fn word(self) -> &'static str {
        match self {
            Kind::Declare => "declare",
            Kind::Renew => "renew",
            Kind::End => "end",
        }
    }

    fn parse(s: &str) -> Option<Kind> {
        Some(match s {
            "declare" => Kind::Declare,
            "renew" => Kind::Renew,
            "end" => Kind::End,
            _ => return None,
        })
    }
}

/// A declaration whose form and signature have been checked.
#[derive(Debug, Clone, PartialEq)]
pub struct Declaration {
    /// What it says.
    pub body: IncidentDeclaration,
    /// What it does.
    pub kind: Kind,
    /// The declarer (the signer's identity, equal to `body.declarer`).
    pub declarer: Principal,
    /// The signed statement as received, to keep and pass on.
    pub signed: Vec<u8>,
}

fn refused(why: impl std::fmt::Display) -> Error {
    Error::PermissionDenied(format!("incident declaration refused: {why}"))
}

/// Whether `s` may be an incident number.
pub fn valid_number(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// Checks a declaration's form; every problem is named.
pub fn check_form(b: &IncidentDeclaration) -> std::result::Result<Kind, String> {
    let mut problems = Vec::new();
    if !valid_number(&b.number) {
        problems.push("its number must be 1 to 64 letters, digits, '-', '_' or '.'".to_string());
    }
    let kind = Kind::parse(&b.kind);
    if kind.is_none() {
        problems.push("its kind must be declare, renew or end".into());
    }
    if b.summary.chars().count() > 500 || b.summary.chars().any(char::is_control) {
        problems.push("its summary must be one line of at most 500 characters".into());
    }
    if b.datasets.is_empty() || b.datasets.len() > 64 || !b.datasets.iter().all(|d| valid_name(d)) {
        problems.push("it must name 1 to 64 datasets by their canonical names".into());
    }
    if b.scope.len() > 16 {
        problems.push("its scope has more than 16 conditions".into());
    }
    // A declaration opens named rows for named purposes: one that named none would
    // open every row of its datasets, for anything.
    if kind.is_some_and(|k| k != Kind::End) {
        if b.scope.is_empty() {
            problems.push(
                "it names no rows: a declaration needs at least one scope condition \
                 (FIELD=VALUE)"
                    .into(),
            );
        }
        if b.purposes.is_empty() {
            problems.push("it names no purpose: a declaration covers at least one".into());
        }
    }
    for c in &b.scope {
        if !valid_name(&c.field) {
            problems.push("a scope condition names no valid field".into());
        }
        if c.values.is_empty() || c.values.len() > 1000 {
            problems.push(format!(
                "the scope condition on {} needs 1 to 1000 values",
                c.field
            ));
        }
        if c.values
            .iter()
            .any(|v| v.chars().count() > 200 || v.chars().any(char::is_control))
        {
            problems.push(format!(
                "a value of the scope condition on {} is longer than 200 characters or holds \
                 control characters",
                c.field
            ));
        }
    }
    if b.purposes.len() > 32 || b.purposes.iter().any(|p| !valid_name(&p.replace('-', "_"))) {
        problems.push("its purposes must be purpose codes (one word each)".into());
    }
    let max_window = MAX_WINDOW.as_millis() as u64;
    if [b.starts_ms, b.ends_ms, b.issued_ms]
        .iter()
        .any(|t| *t > MAX_TIME_MS)
    {
        problems.push("a time of it lies after the year 9999".into());
    } else if b.ends_ms < b.starts_ms {
        problems.push("it ends before it starts".into());
    } else if b.ends_ms - b.starts_ms > max_window {
        problems.push(format!(
            "its window is longer than {} days",
            MAX_WINDOW.as_secs() / 86_400
        ));
    } else if b.ends_ms > b.issued_ms.saturating_add(max_window) {
        problems.push(format!(
            "it ends more than {} days after it was signed",
            MAX_WINDOW.as_secs() / 86_400
        ));
    }
    if b.issued_ms == 0 {
        problems.push("it has no issue time".into());
    }
    match (problems.is_empty(), kind) {
        (true, Some(k)) => Ok(k),
        _ => Err(problems.join("; ")),
    }
}

/// Signs `body` with the declarer's key (`material` must name `body.declarer`).
pub fn sign(material: &TlsMaterial, body: &IncidentDeclaration) -> Result<Vec<u8>> {
    if body.declarer != material.principal.uri() {
        return Err(Error::InvalidQuery(format!(
            "the declaration names {} as its declarer, but the key is {}'s",
            body.declarer, material.principal
        )));
    }
    check_form(body).map_err(|e| Error::InvalidQuery(format!("incident declaration: {e}")))?;
    Ok(statement::sign(material, CONTEXT, body.encode_to_vec())?.encode_to_vec())
}

/// Reads a signed declaration and checks its form and its signature: the declarer's
/// certificate chains to the region CA and was valid (and not revoked) when it was
/// issued, and names the declarer. Whether it is in force, and what it opens, is for
/// the owner to decide.
/// A declaration issued after `now` (beyond the clock skew) is refused: it would stay
/// the latest, and so in force, until its issue time came.
pub fn verify(material: &TlsMaterial, encoded: &[u8], now: SystemTime) -> Result<Declaration> {
    let (signed, body, kind) = read(encoded).map_err(refused)?;
    if body.issued_ms > millis(now) + CLOCK_SKEW.as_millis() as u64 {
        return Err(refused(format!(
            "it is issued in the future ({}); check the declarer's clock",
            rfc3339(body.issued_ms)
        )));
    }
    // A declaration is checked at the time it says it was signed, and one that opens
    // anything (declare, renew) also now: a key whose certificate has expired cannot
    // open an incident by naming an earlier issue time. An end stays good evidence
    // after its signer's certificate expires. A revoked certificate is refused either
    // way.
    let declarer = statement::verify(material, CONTEXT, &signed, at_millis(body.issued_ms))
        .map_err(refused)?;
    if kind != Kind::End {
        statement::verify(material, CONTEXT, &signed, now).map_err(|e| {
            refused(format!(
                "{e}, now (a declaration that opens anything needs a current certificate)"
            ))
        })?;
    }
    if body.declarer != declarer.uri() {
        return Err(refused(format!(
            "it is signed by {declarer}, not by the declarer it names ({})",
            body.declarer
        )));
    }
    Ok(Declaration {
        body,
        kind,
        declarer,
        signed: encoded.to_vec(),
    })
}

/// Decodes a signed declaration and checks its form, not its signature.
fn read(
    encoded: &[u8],
) -> std::result::Result<(SignedStatement, IncidentDeclaration, Kind), String> {
    let signed: SignedStatement = statement::decode(encoded, MAX_ENCODED)?;
    let body = IncidentDeclaration::decode(signed.body.as_slice())
        .map_err(|e| format!("its body is unreadable ({e})"))?;
    let kind = check_form(&body)?;
    Ok((signed, body, kind))
}

/// A declaration read back from where this gateway itself kept it after checking it
/// (its register): its form is checked, its signature is not checked again.
pub fn read_unchecked(encoded: &[u8]) -> std::result::Result<Declaration, String> {
    let (_, body, kind) = read(encoded)?;
    let declarer = Principal::parse(&body.declarer).map_err(|e| e.to_string())?;
    Ok(Declaration {
        body,
        kind,
        declarer,
        signed: encoded.to_vec(),
    })
}

/// The number of the incident an encoded declaration states, for records: read
/// without checking its signature (a refused declaration's number is recorded too),
/// and only ever a checked form of letters, digits and `-_.`.
pub fn stated_number(encoded: &[u8]) -> String {
    read_unchecked(encoded)
        .map(|d| d.body.number)
        .unwrap_or_else(|_| "(unreadable)".into())
}

impl Declaration {
    /// The number.
    pub fn number(&self) -> &str {
        &self.body.number
    }

    /// Whether it is in force at `now` (an end never is), with [`CLOCK_SKEW`] allowed
    /// at its start only: an owner never extends a window.
    pub fn in_force(&self, now: SystemTime) -> bool {
        let now = millis(now);
        self.kind != Kind::End
            && now + CLOCK_SKEW.as_millis() as u64 >= self.body.starts_ms
            && now <= self.body.ends_ms
    }

    /// Its window's length.
    pub fn window(&self) -> Duration {
        Duration::from_millis(self.body.ends_ms.saturating_sub(self.body.starts_ms))
    }

    /// The scope as text, e.g. `road IN ('文一西路')`, for records and messages.
    pub fn scope_text(&self) -> String {
        scope_text(&self.body.scope)
    }
}

/// A scope as text.
pub fn scope_text(scope: &[ScopeCondition]) -> String {
    if scope.is_empty() {
        return "all rows".into();
    }
    scope
        .iter()
        .map(|c| {
            let v: Vec<String> = c
                .values
                .iter()
                .map(|v| format!("'{}'", v.replace('\'', "''")))
                .collect();
            format!("{} IN ({})", c.field, v.join(", "))
        })
        .collect::<Vec<_>>()
        .join(" AND ")
}

/// An RFC 3339 UTC time for `ms` milliseconds after the epoch, to the second.
pub fn rfc3339(ms: u64) -> String {
    format_ms(ms, chrono::SecondsFormat::Secs)
}

/// An RFC 3339 UTC time for `ms` milliseconds after the epoch, to the millisecond
/// (as records keep it, so that their order is the order of events).
pub fn rfc3339_ms(ms: u64) -> String {
    format_ms(ms, chrono::SecondsFormat::Millis)
}

fn format_ms(ms: u64, precision: chrono::SecondsFormat) -> String {
    match i64::try_from(ms)
        .ok()
        .and_then(chrono::DateTime::<chrono::Utc>::from_timestamp_millis)
    {
        Some(t) => t.to_rfc3339_opts(precision, true),
        None => format!("{ms} ms after 1970"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body() -> IncidentDeclaration {
        IncidentDeclaration {
            number: "HZ-2026-0107".into(),
            kind: "declare".into(),
            declarer: "fedgate://yrd/office/coordination".into(),
            summary: "road collapse".into(),
            datasets: vec!["underground_pipelines".into()],
            scope: vec![ScopeCondition {
                field: "road".into(),
                values: vec!["O'Brien Rd".into()],
            }],
            purposes: vec!["emergency-response".into()],
            starts_ms: 1_000,
            ends_ms: 3_601_000,
            issued_ms: 1_000,
        }
    }

    #[test]
    fn the_form_is_checked_and_each_problem_named() {
        assert_eq!(check_form(&body()), Ok(Kind::Declare));
        let mut b = body();
        b.number = "HZ 1; DROP".into();
        b.kind = "pause".into();
        b.datasets.clear();
        b.scope[0].values = vec!["a\nb".into()];
        b.ends_ms = 0;
        let e = check_form(&b).unwrap_err();
        for want in ["number", "kind", "datasets", "control", "ends before"] {
            assert!(e.contains(want), "{e} should name {want}");
        }
        let mut long = body();
        long.ends_ms = long.starts_ms + MAX_WINDOW.as_millis() as u64 + 1;
        assert!(
            check_form(&long)
                .unwrap_err()
                .contains("longer than 7 days")
        );
        // Opening every row, or for any purpose, is not a declaration.
        let mut open = body();
        open.scope.clear();
        open.purposes.clear();
        let e = check_form(&open).unwrap_err();
        assert!(
            e.contains("names no rows") && e.contains("names no purpose"),
            "{e}"
        );
        // An end needs neither.
        open.kind = "end".into();
        assert_eq!(check_form(&open), Ok(Kind::End));
        // Times past the year 9999 are refused (and never formatted by a panic).
        let mut far = body();
        far.issued_ms = u64::MAX;
        assert!(check_form(&far).unwrap_err().contains("year 9999"));
        assert!(rfc3339(u64::MAX).contains("ms after 1970"));
        // A window reaching further than 7 days past its signing.
        let mut late = body();
        late.starts_ms = 6 * 86_400_000;
        late.ends_ms = 9 * 86_400_000;
        assert!(
            check_form(&late)
                .unwrap_err()
                .contains("after it was signed")
        );
    }

    #[test]
    fn a_window_is_never_extended_and_an_end_is_never_in_force() {
        let mut d = Declaration {
            body: body(),
            kind: Kind::Declare,
            declarer: Principal::parse("fedgate://yrd/office/coordination").unwrap(),
            signed: Vec::new(),
        };
        assert!(d.in_force(at_millis(1_000)));
        assert!(d.in_force(at_millis(3_601_000)));
        assert!(!d.in_force(at_millis(3_601_001)));
        // Early by less than the skew: in force (the declarer's clock may be ahead).
        d.body.starts_ms = 20_000;
        assert!(d.in_force(at_millis(1_000)));
        d.body.starts_ms = 40_000;
        assert!(!d.in_force(at_millis(1_000)));
        d.kind = Kind::End;
        d.body.starts_ms = 1_000;
        assert!(!d.in_force(at_millis(2_000)));
        assert_eq!(
            d.scope_text(),
            "road IN ('O''Brien Rd')",
            "quotes are doubled"
        );
    }
}
