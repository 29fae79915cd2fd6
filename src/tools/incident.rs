//! Incident declarations off the request path: making one (`fedgate incident
//! declare`, `renew`, `end`), its file form, and the after-action review of members'
//! audit logs (`fedgate audit report --incident N`).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use base64::Engine as _;

use crate::error::{Error, Result};
use crate::ops::audit::{AuditEntry, Decision, DeclarationRecord, EntryKind};
use crate::proto::v1::{IncidentDeclaration, ScopeCondition};
use crate::trust::incident::{self, Declaration, Kind};
use crate::trust::statement::millis;
use crate::trust::tls::TlsMaterial;

/// What a new declaration says (the declarer is the signing identity).
#[derive(Debug, Clone, Default)]
pub struct Draft {
    /// The incident's number.
    pub number: String,
    /// What happened.
    pub summary: String,
    /// Datasets opened.
    pub datasets: Vec<String>,
    /// Rows opened: each `(field, values)`.
    pub scope: Vec<(String, Vec<String>)>,
    /// Purpose codes covered (empty: any).
    pub purposes: Vec<String>,
    /// When it starts (default: now).
    pub starts: Option<SystemTime>,
    /// How long it lasts (default [`incident::DEFAULT_WINDOW`]).
    pub lasts: Option<Duration>,
}

/// Parses `field=v1,v2` into a scope condition.
pub fn parse_scope(s: &str) -> Result<(String, Vec<String>)> {
    let (field, values) = s
        .split_once('=')
        .ok_or_else(|| Error::InvalidQuery(format!("scope {s:?} is not FIELD=VALUE[,VALUE...]")))?;
    let values: Vec<String> = values.split(',').map(|v| v.trim().to_string()).collect();
    Ok((field.trim().to_string(), values))
}

/// Signs a new declaration of `draft` with `material` (the declarer's identity).
pub fn declare(material: &TlsMaterial, draft: &Draft, now: SystemTime) -> Result<Vec<u8>> {
    let starts = millis(draft.starts.unwrap_or(now));
    let lasts = draft.lasts.unwrap_or(incident::DEFAULT_WINDOW);
    let body = IncidentDeclaration {
        number: draft.number.clone(),
        kind: Kind::Declare.word().into(),
        declarer: material.principal.uri(),
        summary: draft.summary.clone(),
        datasets: draft.datasets.clone(),
        scope: draft
            .scope
            .iter()
            .map(|(field, values)| ScopeCondition {
                field: field.clone(),
                values: values.clone(),
            })
            .collect(),
        purposes: draft.purposes.clone(),
        starts_ms: starts,
        ends_ms: starts + lasts.as_millis() as u64,
        issued_ms: millis(now),
    };
    incident::sign(material, &body)
}

/// Signs a renewal of `from` (same number and scope) ending `lasts` after `now`, or,
/// with `lasts` of `None`, its end at `now`.
pub fn follow_up(
    material: &TlsMaterial,
    from: &Declaration,
    lasts: Option<Duration>,
    now: SystemTime,
) -> Result<Vec<u8>> {
    let mut body = from.body.clone();
    body.issued_ms = millis(now).max(from.body.issued_ms + 1);
    match lasts {
        Some(d) => {
            // A renewal's window starts when it is signed, so that each step is
            // measured against an owner's longest window on its own.
            body.kind = Kind::Renew.word().into();
            body.starts_ms = millis(now);
            body.ends_ms = millis(now) + d.as_millis() as u64;
        }
        None => {
            body.kind = Kind::End.word().into();
            body.ends_ms = millis(now).max(body.starts_ms);
        }
    }
    incident::sign(material, &body)
}

/// The file form of a signed declaration: standard base64 on one line.
pub fn to_file_text(signed: &[u8]) -> String {
    format!(
        "{}\n",
        base64::engine::general_purpose::STANDARD.encode(signed)
    )
}

/// Reads a declaration file (base64 text, or the signed statement as raw bytes).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let bytes =
        std::fs::read(path).map_err(|e| Error::InvalidQuery(format!("{}: {e}", path.display())))?;
    let text = String::from_utf8_lossy(&bytes);
    match base64::engine::general_purpose::STANDARD.decode(text.trim()) {
        Ok(b) => Ok(b),
        Err(_) => Ok(bytes),
    }
}

/// A declaration in words, for `fedgate incident show` and the CLI's answers.
pub fn describe(d: &Declaration) -> String {
    let b = &d.body;
    let mut s = format!(
        "incident {} ({}) by {}\n  {}\n  datasets: {}\n  rows: {}\n  window: {} to {} (issued {})",
        b.number,
        d.kind.word(),
        d.declarer,
        b.summary,
        b.datasets.join(", "),
        d.scope_text(),
        incident::rfc3339(b.starts_ms),
        incident::rfc3339(b.ends_ms),
        incident::rfc3339(b.issued_ms)
    );
    if !b.purposes.is_empty() {
        s.push_str(&format!("\n  purposes: {}", b.purposes.join(", ")));
    }
    s
}

/// One record of the review.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Access {
    /// Which log (the name given, or the file's name).
    pub log: String,
    /// The record's number in its log.
    pub seq: u64,
    /// The record.
    pub entry: AuditEntry,
    /// What is wrong with it (empty: nothing).
    pub flags: Vec<String>,
}

/// The after-action review of one incident over members' logs.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Review {
    /// The incident's number.
    pub incident: String,
    /// Each log's chain, verified: (log, problem or `None`).
    pub chains: Vec<(String, Option<String>)>,
    /// The declarations each member took, in log order.
    pub declarations: Vec<Access>,
    /// Every query and sub-query asked under the incident, answered or refused.
    pub accesses: Vec<Access>,
}

impl Review {
    /// Whether anything is flagged (an access outside the declared scope or window,
    /// or a log whose chain is broken).
    pub fn flagged(&self) -> bool {
        self.accesses.iter().any(|a| !a.flags.is_empty())
            || self.chains.iter().any(|(_, broken)| broken.is_some())
    }
}

#[derive(serde::Deserialize)]
struct Line {
    seq: u64,
    entry: AuditEntry,
}

/// Whether `at` lies in the window of `record` (never for an end), with the clock
/// skew an owner allows at its start (records written before times were kept to the
/// millisecond are read to the second, hence the second's slack at the end).
fn within(at: SystemTime, record: &DeclarationRecord) -> bool {
    match (parse_time(&record.starts), parse_time(&record.ends)) {
        (Some(starts), Some(ends)) => {
            record.kind != "end"
                && at + incident::CLOCK_SKEW >= starts
                && at <= ends + Duration::from_secs(1)
        }
        _ => false,
    }
}

fn parse_time(s: &str) -> Option<SystemTime> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| SystemTime::from(t.with_timezone(&chrono::Utc)))
}

/// Reviews incident `number` over `logs` (each `(name, path)`): every record stating
/// the incident, and every declaration of it a member took. An answer under the
/// incident's emergency rule is flagged when, by that member's own record of the
/// declarations, it came outside the window in force, opened other rows than the
/// declared scope or read a dataset the declaration does not open; and when, by the
/// latest declaration any of the logs holds from before it, it came outside the
/// window (a member an end did not reach). Refused attempts are listed, not flagged.
pub fn review(number: &str, logs: &[(String, PathBuf)]) -> Result<Review> {
    let mut out = Review {
        incident: number.to_string(),
        ..Review::default()
    };
    let marker = format!("under incident {number} ");
    for (name, path) in logs {
        let report = crate::ops::audit::verify(path)?;
        out.chains.push((
            name.clone(),
            report
                .broken
                .as_ref()
                .map(|b| format!("line {}: {}", b.line, b.problem)),
        ));
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::InvalidQuery(format!("{}: {e}", path.display())))?;
        // The declarations this member had taken so far, in its own log's order.
        let mut declared: Vec<AuditEntry> = Vec::new();
        for line in text.lines().take(report.records as usize) {
            let Ok(Line { seq, entry }) = serde_json::from_str::<Line>(line) else {
                continue;
            };
            if entry.incident.as_deref() != Some(number) {
                continue;
            }
            if entry.kind == EntryKind::Declaration {
                declared.push(entry.clone());
                out.declarations.push(Access {
                    log: name.clone(),
                    seq,
                    entry,
                    flags: Vec::new(),
                });
                continue;
            }
            let mut flags = Vec::new();
            let opened = entry.level.as_deref().is_some_and(|l| l.contains(&marker));
            if opened && entry.decision != Decision::Refused {
                flags.extend(outside(&entry, &declared));
            }
            out.accesses.push(Access {
                log: name.clone(),
                seq,
                entry,
                flags,
            });
        }
    }
    // Against the latest declaration issued before each access on any log.
    let all: Vec<&DeclarationRecord> = out
        .declarations
        .iter()
        .filter_map(|d| d.entry.declaration.as_ref())
        .collect();
    for a in &mut out.accesses {
        let opened = a
            .entry
            .level
            .as_deref()
            .is_some_and(|l| l.contains(&marker));
        if !opened || a.entry.decision == Decision::Refused || !a.flags.is_empty() {
            continue;
        }
        let Some(at) = parse_time(&a.entry.time) else {
            continue;
        };
        let latest = all
            .iter()
            .filter(|d| parse_time(&d.issued).is_some_and(|t| t <= at))
            .max_by(|x, y| x.issued.cmp(&y.issued));
        if let Some(d) = latest
            && !within(at, d)
        {
            a.flags.push(format!(
                "at {} outside the window of the latest declaration on any log ({} {} to {}): \
                 this member had not taken it",
                a.entry.time, d.kind, d.starts, d.ends
            ));
        }
    }
    // In time order across the logs (each log's own order kept for equal times).
    out.accesses
        .sort_by(|a, b| a.entry.time.cmp(&b.entry.time).then(a.log.cmp(&b.log)));
    out.declarations
        .sort_by(|a, b| a.entry.time.cmp(&b.entry.time).then(a.log.cmp(&b.log)));
    Ok(out)
}

/// Why an access under an incident's rule lies outside what the member had on record
/// as declared at that time (the latest declaration it took before the access).
fn outside(entry: &AuditEntry, declared: &[AuditEntry]) -> Vec<String> {
    let Some(record) = declared
        .iter()
        .filter_map(|d| d.declaration.as_ref())
        .max_by(|a, b| a.issued.cmp(&b.issued))
    else {
        return vec!["no declaration of the incident is on this member's record before it".into()];
    };
    let mut flags = Vec::new();
    let (at, starts, ends) = (
        parse_time(&entry.time),
        parse_time(&record.starts),
        parse_time(&record.ends),
    );
    match (at, starts, ends) {
        (Some(at), Some(_), Some(_)) => {
            if !within(at, record) {
                flags.push(format!(
                    "at {} outside the window in force ({} {} to {})",
                    entry.time, record.kind, record.starts, record.ends
                ));
            }
        }
        _ => flags.push("its time or the declaration's window is unreadable".into()),
    }
    // The rows opened, as the access's record states them, against the declared scope.
    if let Some(level) = &entry.level
        && let Some(within) = level.split(" within ").nth(1)
    {
        let stated = within.split(" by access[").next().unwrap_or(within);
        if stated != record.scope {
            flags.push(format!(
                "opened the rows {stated}, not the declared {}",
                record.scope
            ));
        }
    }
    let opened: BTreeSet<&String> = record.datasets.iter().collect();
    let beyond: Vec<&String> = entry
        .datasets
        .iter()
        .filter(|d| !opened.contains(d))
        .collect();
    if !beyond.is_empty() {
        flags.push(format!(
            "read {} beyond the declared datasets ({})",
            beyond
                .iter()
                .map(|s| s.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            record.datasets.join(", ")
        ));
    }
    flags
}

/// The review as text: the declarations, then every access, flagged ones marked.
pub fn review_text(r: &Review) -> String {
    let mut s = format!("Incident {}: after-action review\n", r.incident);
    for (log, broken) in &r.chains {
        match broken {
            None => s.push_str(&format!("  log {log}: chain verifies\n")),
            Some(why) => s.push_str(&format!("  log {log}: CHAIN BROKEN: {why}\n")),
        }
    }
    s.push_str(&format!(
        "\nDeclarations taken ({}):\n",
        r.declarations.len()
    ));
    for d in &r.declarations {
        if let Some(rec) = &d.entry.declaration {
            s.push_str(&format!(
                "  {} {}#{}: {} by {} (delivered by {}), {} to {}, datasets {}, rows {}\n",
                d.entry.time,
                d.log,
                d.seq,
                rec.kind,
                rec.declarer,
                d.entry.via,
                rec.starts,
                rec.ends,
                rec.datasets.join(", "),
                rec.scope
            ));
        }
    }
    s.push_str(&format!(
        "\nAccesses under the incident ({}):\n",
        r.accesses.len()
    ));
    for a in &r.accesses {
        let e = &a.entry;
        let decision = match e.decision {
            Decision::Answered => "answered",
            Decision::Refused => "REFUSED",
            Decision::Failed => "failed",
            Decision::Cancelled => "cancelled",
        };
        let kind = match e.kind {
            EntryKind::Query => "query",
            EntryKind::Explain => "explain",
            _ => "sub-query",
        };
        s.push_str(&format!(
            "  {} {}#{} {kind} {} {} by {}{} datasets [{}] rows {}",
            e.time,
            a.log,
            a.seq,
            e.query_id,
            decision,
            e.origin,
            if e.via.is_empty() {
                String::new()
            } else {
                format!(" via {}", e.via)
            },
            e.datasets.join(", "),
            e.rows
        ));
        if let Some(l) = &e.level {
            s.push_str(&format!(" under {l}"));
        }
        if let Some(why) = &e.reason {
            s.push_str(&format!(" ({why})"));
        }
        s.push('\n');
        for f in &a.flags {
            s.push_str(&format!("    OUTSIDE THE DECLARATION: {f}\n"));
        }
    }
    let flagged = r.accesses.iter().filter(|a| !a.flags.is_empty()).count();
    s.push_str(&format!(
        "\n{flagged} access(es) outside the declared scope or window.\n"
    ));
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::audit::{AuditLog, DeclarationRecord};

    fn record(kind: &str, starts: &str, ends: &str, issued: &str) -> AuditEntry {
        AuditEntry {
            kind: EntryKind::Declaration,
            time: issued.into(),
            incident: Some("N-1".into()),
            decision: Decision::Answered,
            declaration: Some(DeclarationRecord {
                number: "N-1".into(),
                kind: kind.into(),
                declarer: "fedgate://r/office/o".into(),
                datasets: vec!["pipes".into()],
                scope: "road IN ('A')".into(),
                starts: starts.into(),
                ends: ends.into(),
                issued: issued.into(),
                ..DeclarationRecord::default()
            }),
            ..AuditEntry::default()
        }
    }

    fn access(time: &str, datasets: &[&str], decision: Decision) -> AuditEntry {
        AuditEntry {
            time: time.into(),
            incident: Some("N-1".into()),
            origin: "fedgate://r/office/o".into(),
            datasets: datasets.iter().map(|s| s.to_string()).collect(),
            decision,
            level: Some("pipes: rows under incident N-1 within road IN ('A') by access[0]".into()),
            rows: 3,
            ..AuditEntry::default()
        }
    }

    #[test]
    fn accesses_outside_the_window_or_datasets_are_flagged_and_refusals_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.log");
        let log = AuditLog::open(&path).unwrap();
        let t = |h: u32| format!("2026-12-05T{h:02}:00:00.000Z");
        let s = |h: u32| format!("2026-12-05T{h:02}:00:00Z");
        // An access before anything was declared, the declaration, one inside, one
        // reading another dataset, the end, one after the end, a refusal, and a record
        // of another incident.
        log.append(&access(&t(7), &["pipes"], Decision::Answered))
            .unwrap();
        log.append(&record("declare", &s(8), &s(12), &s(8)))
            .unwrap();
        log.append(&access(&t(9), &["pipes"], Decision::Answered))
            .unwrap();
        log.append(&access(&t(9), &["pipes", "census"], Decision::Answered))
            .unwrap();
        log.append(&record("end", &s(8), &s(10), &s(10))).unwrap();
        log.append(&access(&t(11), &["pipes"], Decision::Answered))
            .unwrap();
        let mut refused = access(&t(11), &["pipes"], Decision::Refused);
        refused.level = None;
        log.append(&refused).unwrap();
        let mut other = access(&t(9), &["pipes"], Decision::Answered);
        other.incident = Some("N-2".into());
        log.append(&other).unwrap();
        drop(log);
        let r = review("N-1", &[("m".into(), path.clone())]).unwrap();
        assert_eq!(r.declarations.len(), 2);
        assert_eq!(r.accesses.len(), 5, "every access of N-1, none of N-2");
        let flags: Vec<usize> = r.accesses.iter().map(|a| a.flags.len()).collect();
        assert_eq!(flags, vec![1, 0, 1, 1, 0]);
        assert!(r.accesses[0].flags[0].contains("no declaration"));
        assert!(r.accesses[2].flags[0].contains("census beyond"));
        assert!(r.accesses[3].flags[0].contains("outside the window"));
        assert!(r.flagged());
        let text = review_text(&r);
        assert!(text.contains("REFUSED"), "{text}");
        assert!(text.contains("3 access(es) outside"), "{text}");

        // A second member that took the declaration but not the end, and answered
        // after it: its own record finds nothing, the other log's end flags it.
        let late = dir.path().join("late.log");
        let log = AuditLog::open(&late).unwrap();
        log.append(&record("declare", &s(8), &s(12), &s(8)))
            .unwrap();
        log.append(&access(&t(9), &["pipes"], Decision::Answered))
            .unwrap();
        log.append(&access(&t(11), &["pipes"], Decision::Answered))
            .unwrap();
        drop(log);
        let alone = review("N-1", &[("late".into(), late.clone())]).unwrap();
        assert!(!alone.flagged(), "{}", review_text(&alone));
        let both = review("N-1", &[("m".into(), path), ("late".into(), late)]).unwrap();
        let late_flags: Vec<&Vec<String>> = both
            .accesses
            .iter()
            .filter(|a| a.log == "late")
            .map(|a| &a.flags)
            .collect();
        assert_eq!(late_flags[0].len(), 0);
        assert!(
            late_flags[1][0].contains("had not taken it"),
            "{late_flags:?}"
        );
    }
}
