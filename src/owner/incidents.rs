//! The incident declarations a member holds, and the one in force for a query.
//!
//! A member keeps every declaration it has checked whose declarer one of its emergency
//! rules honours, the latest issued per (declarer, number), in memory and in a file
//! beside its audit log (one JSON line per declaration taken, the signed statement in
//! base64), so an end survives a restart. A query states its incident by carrying a
//! signed declaration; the member checks it, takes it if it is newer than what it
//! holds, and decides under the latest it holds ([`Register::in_force`]). Each taken
//! declaration is on the audit record as a `declaration` record.

use std::collections::BTreeMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use base64::Engine as _;

use crate::error::{Error, Result};
use crate::ops::audit::{AuditEntry, AuditLog, Decision, DeclarationRecord, EntryKind};
use crate::owner::policy::AccessRule;
use crate::trust::identity::{Principal, matches_pattern};
use crate::trust::incident::{self, Declaration, rfc3339, rfc3339_ms};
use crate::trust::tls::TlsMaterial;

/// The most incidents a member holds (past it, new incidents are refused; renewals
/// and ends of held ones are still taken).
const MAX_HELD: usize = 10_000;

/// The most incidents one declarer may have held at a member, so that one honoured
/// declarer cannot fill the register for the others.
const MAX_PER_DECLARER: usize = 500;

/// The declarations a member holds.
#[derive(Debug)]
pub struct Register {
    /// Where they are kept (`None`: in memory only, for `fedgate check` and tests).
    path: Option<PathBuf>,
    held: Mutex<BTreeMap<(String, String), Declaration>>,
}

/// What became of a declaration given to the register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// It is newer than what was held, and is now in force for its incident.
    New,
    /// The register already holds it or a later one.
    Held,
}

#[derive(serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Line {
    declaration: String,
}

/// The register's file beside an audit log: `audit.log` keeps its incidents in
/// `audit.log.incidents`.
pub fn path_beside(audit: &Path) -> PathBuf {
    let mut p = audit.as_os_str().to_owned();
    p.push(".incidents");
    PathBuf::from(p)
}

fn key(d: &Declaration) -> (String, String) {
    (d.declarer.uri(), d.number().to_string())
}

impl Register {
    /// A register held in memory only.
    pub fn in_memory() -> Register {
        Register::none()
    }

    /// An empty register held in memory only, as a constant.
    pub const fn none() -> Register {
        Register {
            path: None,
            held: Mutex::new(BTreeMap::new()),
        }
    }

    /// Opens the register kept at `path` (a missing file is an empty register). The
    /// file is this member's own, written only by it: its lines are read without
    /// checking their signatures again (they were checked when taken), and a line that
    /// is not a readable declaration fails the start, naming the line.
    pub fn open(path: &Path) -> Result<Register> {
        let mut held = BTreeMap::new();
        match std::fs::read(path) {
            Ok(bytes) => {
                // A line cut short by a crash (or a full disk) while it was written was
                // never taken: it is cut off, as the audit log does with its own.
                let whole = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                if whole < bytes.len() {
                    tracing::warn!(path = %path.display(), bytes = bytes.len() - whole, "Cutting off a torn last line of the incident register");
                    let f = std::fs::OpenOptions::new()
                        .write(true)
                        .open(path)
                        .and_then(|f| f.set_len(whole as u64).and_then(|()| f.sync_data()));
                    f.map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
                }
                for (i, line) in bytes[..whole].lines().enumerate() {
                    let bad = |why: String| {
                        Error::Config(format!(
                            "{} line {}: {why} (the incident register is written by this \
                             gateway only; restore it or move it away)",
                            path.display(),
                            i + 1
                        ))
                    };
                    let line = line.map_err(|e| bad(e.to_string()))?;
                    if line.trim().is_empty() {
                        continue;
                    }
                    let l: Line = serde_json::from_str(&line).map_err(|e| bad(e.to_string()))?;
                    let bytes = base64::engine::general_purpose::STANDARD
                        .decode(l.declaration)
                        .map_err(|e| bad(e.to_string()))?;
                    let d = incident::read_unchecked(&bytes).map_err(|e| bad(e.to_string()))?;
                    let k = key(&d);
                    if held
                        .get(&k)
                        .is_none_or(|h: &Declaration| h.body.issued_ms < d.body.issued_ms)
                    {
                        held.insert(k, d);
                    }
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(Error::Config(format!("{}: {e}", path.display())));
            }
        }
        Ok(Register {
            path: Some(path.to_path_buf()),
            held: Mutex::new(held),
        })
    }

    /// Takes a checked declaration if it is newer than the one held for its incident,
    /// writing it to the file (on disk before this returns) and recording it in
    /// `audit`, noting who delivered it (`via`).
    pub fn take(&self, d: &Declaration, audit: &AuditLog, via: &Principal) -> Result<Taken> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let k = key(d);
        match held.get(&k) {
            Some(h) if h.body.issued_ms >= d.body.issued_ms => return Ok(Taken::Held),
            None if held.len() >= MAX_HELD => {
                return Err(Error::Overloaded(format!(
                    "this member holds {MAX_HELD} incidents, as many as it keeps; ask its \
                     operators"
                )));
            }
            None if held.keys().filter(|(who, _)| *who == k.0).count() >= MAX_PER_DECLARER => {
                return Err(Error::Overloaded(format!(
                    "this member holds {MAX_PER_DECLARER} incidents of {}, as many as it keeps \
                     for one declarer; ask its operators",
                    d.declarer
                )));
            }
            _ => {}
        }
        if let Some(path) = &self.path {
            let line = serde_json::to_string(&Line {
                declaration: base64::engine::general_purpose::STANDARD.encode(&d.signed),
            })
            .map_err(|e| Error::Internal(e.to_string()))?;
            let mut f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
            f.write_all(format!("{line}\n").as_bytes())
                .and_then(|()| f.sync_data())
                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
        }
        audit.append(&declaration_entry(d, via))?;
        held.insert(k, d.clone());
        Ok(Taken::New)
    }

    /// The declaration in force for `d`'s incident: the latest issued of `d` and the
    /// one held.
    pub fn in_force(&self, d: &Declaration) -> Declaration {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        match held.get(&key(d)) {
            Some(h) if h.body.issued_ms >= d.body.issued_ms => h.clone(),
            _ => d.clone(),
        }
    }

    /// The declarations held, latest of each incident.
    pub fn held(&self) -> Vec<Declaration> {
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        held.values().cloned().collect()
    }
}

/// Whether any of `rules` honours declarations of `declarer`.
pub fn honoured(rules: &[AccessRule], declarer: &Principal) -> bool {
    rules.iter().any(|r| {
        r.incident
            .as_ref()
            .is_some_and(|i| i.declarers.iter().any(|p| matches_pattern(p, declarer)))
    })
}

/// Checks a declaration delivered to this member and takes it into `register` when a
/// rule honours its declarer; the outcome in words.
pub fn deliver(
    register: &Register,
    tls: &TlsMaterial,
    rules: &[AccessRule],
    audit: &AuditLog,
    via: &Principal,
    encoded: &[u8],
) -> Result<String> {
    let d = incident::verify(tls, encoded, std::time::SystemTime::now())?;
    if !honoured(rules, &d.declarer) {
        return Err(Error::PermissionDenied(format!(
            "incident declaration refused: no emergency rule of this member honours \
             declarations of {}",
            d.declarer
        )));
    }
    Ok(match register.take(&d, audit, via)? {
        Taken::New => format!(
            "kept: incident {} ({}) from {}, {} to {}",
            d.number(),
            d.kind.word(),
            d.declarer,
            rfc3339(d.body.starts_ms),
            rfc3339(d.body.ends_ms)
        ),
        Taken::Held => format!(
            "already held: incident {} has this declaration or a later one here",
            d.number()
        ),
    })
}

/// The audit record of a taken declaration.
fn declaration_entry(d: &Declaration, via: &Principal) -> AuditEntry {
    AuditEntry {
        kind: EntryKind::Declaration,
        time: AuditEntry::now_utc(),
        via: via.uri(),
        origin: d.declarer.uri(),
        datasets: d.body.datasets.clone(),
        sql_sha256: crate::ops::audit::sql_hash(&hex::encode(&d.signed)),
        decision: Decision::Answered,
        incident: Some(d.number().to_string()),
        declaration: Some(DeclarationRecord {
            number: d.number().to_string(),
            kind: d.kind.word().to_string(),
            declarer: d.declarer.uri(),
            summary: d.body.summary.clone(),
            datasets: d.body.datasets.clone(),
            scope: d.scope_text(),
            purposes: d.body.purposes.clone(),
            starts: rfc3339_ms(d.body.starts_ms),
            ends: rfc3339_ms(d.body.ends_ms),
            issued: rfc3339_ms(d.body.issued_ms),
        }),
        ..AuditEntry::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::v1::IncidentDeclaration;
    use crate::trust::incident::Kind;

    fn declaration(number: &str, issued_ms: u64, kind: Kind) -> Declaration {
        let body = IncidentDeclaration {
            number: number.into(),
            kind: kind.word().into(),
            declarer: "fedgate://r/office/o".into(),
            summary: "s".into(),
            datasets: vec!["d".into()],
            scope: vec![crate::proto::v1::ScopeCondition {
                field: "f".into(),
                values: vec!["v".into()],
            }],
            purposes: vec!["p".into()],
            starts_ms: 1,
            ends_ms: 10,
            issued_ms,
        };
        let signed = crate::proto::v1::SignedStatement {
            body: prost::Message::encode_to_vec(&body),
            ..Default::default()
        };
        Declaration {
            body,
            kind,
            declarer: Principal::parse("fedgate://r/office/o").unwrap(),
            signed: prost::Message::encode_to_vec(&signed),
        }
    }

    #[test]
    fn the_latest_issued_is_in_force_and_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let audit = AuditLog::open(&dir.path().join("audit.log")).unwrap();
        let path = path_beside(&dir.path().join("audit.log"));
        let via = Principal::parse("fedgate://r/city/c").unwrap();
        let r = Register::open(&path).unwrap();
        let first = declaration("N-1", 100, Kind::Declare);
        let end = declaration("N-1", 200, Kind::End);
        assert_eq!(r.take(&first, &audit, &via).unwrap(), Taken::New);
        assert_eq!(r.take(&end, &audit, &via).unwrap(), Taken::New);
        // Presenting the first again changes nothing: the end is in force.
        assert_eq!(r.take(&first, &audit, &via).unwrap(), Taken::Held);
        assert_eq!(r.in_force(&first).kind, Kind::End);
        drop(r);
        let again = Register::open(&path).unwrap();
        assert_eq!(again.in_force(&first).kind, Kind::End);
        assert_eq!(again.held().len(), 1);
        // Each taken declaration is on the audit record.
        let report = crate::ops::audit::verify(&dir.path().join("audit.log")).unwrap();
        assert_eq!(report.records, 2);
        // A torn last line is cut off; the lines before it stay.
        let mut bytes = std::fs::read(&path).unwrap();
        let before = bytes.len();
        bytes.extend_from_slice(b"{\"declaration\":\"QUJD");
        std::fs::write(&path, &bytes).unwrap();
        let torn = Register::open(&path).unwrap();
        assert_eq!(torn.in_force(&first).kind, Kind::End);
        assert_eq!(std::fs::metadata(&path).unwrap().len() as usize, before);
        // A damaged whole line fails the start, naming the line.
        std::fs::write(&path, "{\"declaration\":\"AAAA\"}\nnot json\n").unwrap();
        let e = Register::open(&path).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
    }
}
