//! The data owner's answer to one sub-query, on the record.
//!
//! Both ways a sub-query reaches a member's data (over `Peer.Execute` from another
//! gateway, or in process when the coordinator is itself a member) go through
//! [`answer`]: prepare, authorize (the [`crate::owner::policy::Permit`]), execute under the
//! permit's grants, and write one audit record. A refusal is recorded before the
//! error is returned. An answer is recorded when its stream ends — after the last
//! batch and before the end-of-answer summary that the coordinator requires, so no
//! answer is complete without its record — or when it fails or is abandoned.

pub mod bounded;
pub mod incidents;
pub mod lanes;
pub mod mapping;
pub mod masking;
pub mod member;
pub mod peer;
pub mod policy;
pub mod restricted;
pub mod session;
pub mod shape;
pub mod source;

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};

use datafusion::arrow::datatypes::SchemaRef;
use datafusion::arrow::record_batch::RecordBatch;
use datafusion::execution::{RecordBatchStream, SendableRecordBatchStream};
use futures::{Stream, StreamExt};

use crate::error::{Error, Result};
use crate::ops::audit::{AuditEntry, AuditLog, Decision, EntryKind, sql_hash};
use crate::owner::member::MemberEngine;
use crate::owner::policy::Permit;
use crate::trust::identity::Principal;

/// Who asks what, as the data owner sees it.
#[derive(Debug, Clone, Copy)]
pub struct SubQueryAsk<'a> {
    /// The gateway that sent the sub-query (this gateway for local ones).
    pub via: &'a Principal,
    /// The original caller.
    pub origin: &'a Principal,
    /// The purpose the caller stated.
    pub purpose: Option<&'a str>,
    /// The coordinator's query id.
    pub query_id: &'a str,
    /// The sub-query's SQL as received.
    pub sql: &'a str,
    /// The datasets the origin's assertion covers, when the sub-query arrived with one
    /// (through a gateway that is not the origin's own); `None` when no assertion is
    /// needed.
    pub covered: Option<&'a BTreeSet<String>>,
    /// The incident the caller asks under: a signed declaration, as received.
    pub incident: Option<&'a [u8]>,
}

/// What a member decides incidents with: the declarations it holds and the trust
/// material it checks new ones against.
#[derive(Clone, Copy)]
pub struct Emergency<'a> {
    /// The declarations held.
    pub register: &'a incidents::Register,
    /// The region CA and revocation lists in force (`None`: this path cannot check
    /// declarations, and refuses any).
    pub tls: Option<&'a crate::trust::tls::TlsMaterial>,
}

/// The register of a path that takes no incidents.
static NO_INCIDENTS: incidents::Register = incidents::Register::none();

impl Emergency<'static> {
    /// A path without trust material (an engine run in process by a tool or a
    /// test): a sub-query stating an incident is refused.
    pub fn none() -> Emergency<'static> {
        Emergency {
            register: &NO_INCIDENTS,
            tls: None,
        }
    }
}

/// The incident a sub-query states, checked: its declaration verified, taken into
/// the register when a rule honours its declarer, and the latest one held returned.
fn stated_incident(
    engine: &MemberEngine,
    emergency: Emergency<'_>,
    audit: &AuditLog,
    ask: &SubQueryAsk<'_>,
) -> Result<Option<crate::trust::incident::Declaration>> {
    let Some(bytes) = ask.incident else {
        return Ok(None);
    };
    let Some(tls) = emergency.tls else {
        return Err(Error::PermissionDenied(
            "incident declaration refused: this path does not check declarations".into(),
        ));
    };
    let d = crate::trust::incident::verify(tls, bytes, std::time::SystemTime::now())?;
    if incidents::honoured(&engine.config().access, &d.declarer) {
        emergency.register.take(&d, audit, ask.via)?;
    }
    Ok(Some(emergency.register.in_force(&d)))
}

/// The member's signed statement of its answer to `ask` (see
/// [`crate::trust::receipt`]): `rows` are the digest and count of the rows it sent,
/// `audit_hash` its record's hash.
pub fn member_statement(
    tls: &crate::trust::tls::TlsMaterial,
    member: &str,
    ask: &SubQueryAsk<'_>,
    rows: (String, u64),
    audit_hash: &str,
) -> Result<Vec<u8>> {
    crate::trust::receipt::sign(
        tls,
        &crate::proto::v1::AnswerStatement {
            kind: "member".into(),
            signer: tls.principal.uri(),
            member: member.to_string(),
            query_id: ask.query_id.to_string(),
            origin: ask.origin.uri(),
            via: ask.via.uri(),
            purpose: ask.purpose.unwrap_or_default().to_string(),
            incident: stated_number(ask).unwrap_or_default(),
            query_sha256: sql_hash(ask.sql),
            rows_sha256: rows.0,
            rows: rows.1,
            audit_hash: audit_hash.to_string(),
            time_ms: crate::trust::receipt::now_ms(),
            parts: Vec::new(),
        },
    )
}

/// The number of the incident a sub-query states, for its record.
fn stated_number(ask: &SubQueryAsk<'_>) -> Option<String> {
    ask.incident.map(crate::trust::incident::stated_number)
}

/// Refuses a sub-query that reads a dataset its origin assertion does not cover.
fn within_assertion(ask: &SubQueryAsk<'_>, datasets: &BTreeSet<String>) -> Result<()> {
    let Some(covered) = ask.covered else {
        return Ok(());
    };
    let outside: Vec<&str> = datasets
        .iter()
        .filter(|d| !covered.contains(*d))
        .map(String::as_str)
        .collect();
    if outside.is_empty() {
        return Ok(());
    }
    Err(Error::PermissionDenied(format!(
        "origin assertion refused: it does not cover dataset(s) {}",
        outside.join(", ")
    )))
}

/// What the owner tells the coordinator besides rows: how it shared the data and the
/// hash of its audit record.
#[derive(Debug, Default)]
pub struct Note {
    /// How the data was shared, e.g. `enrollment: masked ... by access[2]`.
    pub access: Mutex<String>,
    /// The audit record's hash, once written.
    pub audit_hash: OnceLock<String>,
    /// Why earlier attempts of this sub-query failed, when the coordinator retried it.
    pub retried: Mutex<Vec<String>>,
    /// The member's signed statement of its answer, when a receipt was asked for
    /// (from another gateway: once its digest matched the rows received).
    pub statement: OnceLock<Vec<u8>>,
    /// The SHA-256 of the sub-query sent, which the statement must name.
    pub sub_query_sha256: OnceLock<String>,
    /// The member's own time for the sub-query in microseconds, from its arrival to
    /// its summary (its audit record included), as another gateway reported it.
    pub elapsed_us: OnceLock<u64>,
}

impl Note {
    /// The access description.
    pub fn access(&self) -> String {
        self.access
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Sets the access description.
    pub fn set_access(&self, s: String) {
        *self.access.lock().unwrap_or_else(|p| p.into_inner()) = s;
    }

    /// Records that an attempt failed for `reason` and the sub-query is retried.
    pub fn retrying(&self, reason: String) {
        self.retried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(reason);
    }

    /// Why earlier attempts failed.
    pub fn retries(&self) -> Vec<String> {
        self.retried
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// The statements a sub-query would send to the owner's databases, as (database,
/// SQL), decided by the same access rules as [`answer`]; nothing is read. The showing
/// (or the refusal) is recorded like an answer, as an [`EntryKind::Explain`] record.
pub async fn explain(
    engine: &MemberEngine,
    audit: &AuditLog,
    emergency: Emergency<'_>,
    ask: &SubQueryAsk<'_>,
) -> Result<Vec<(String, String)>> {
    let record = |datasets: Vec<String>, permit: Option<&Permit>, failed: Option<&Error>| {
        let mut e = entry(ask, datasets, permit);
        e.kind = EntryKind::Explain;
        match failed {
            Some(why) => {
                e.decision = Decision::Refused;
                e.reason = Some(why.to_string());
            }
            None => e.decision = Decision::Answered,
        }
        audit.append(&e).map(|_| ())
    };
    let prepared = match engine.prepare(ask.sql).await {
        Ok(p) => p,
        Err(e) => {
            record(Vec::new(), None, Some(&e))?;
            return Err(e);
        }
    };
    let datasets: Vec<String> = prepared.datasets.iter().cloned().collect();
    let permit = match within_assertion(ask, &prepared.datasets)
        .and_then(|()| stated_incident(engine, emergency, audit, ask))
        .and_then(|incident| {
            let now = std::time::SystemTime::now();
            let stated = incident
                .as_ref()
                .map(|declaration| policy::Incident { declaration, now });
            engine.authorize(ask.via, ask.origin, ask.purpose, stated.as_ref(), &prepared)
        }) {
        Ok(p) => p,
        Err(e) => {
            record(datasets, None, Some(&e))?;
            return Err(e);
        }
    };
    match engine.database_queries(&permit, prepared).await {
        Ok(statements) => {
            record(datasets, Some(&permit), None)?;
            Ok(statements)
        }
        Err(e) => {
            record(datasets, Some(&permit), Some(&e))?;
            Err(e)
        }
    }
}

fn entry(ask: &SubQueryAsk, datasets: Vec<String>, permit: Option<&Permit>) -> AuditEntry {
    AuditEntry {
        kind: EntryKind::SubQuery,
        time: AuditEntry::now_utc(),
        query_id: crate::ops::audit::caller_text(ask.query_id),
        via: ask.via.uri(),
        origin: ask.origin.uri(),
        purpose: ask.purpose.map(crate::ops::audit::caller_text),
        datasets,
        sql_sha256: sql_hash(ask.sql),
        rule: permit.map(|p| {
            p.grants()
                .values()
                .map(|g| g.rule_name())
                .collect::<Vec<_>>()
                .join(",")
        }),
        level: permit.map(Permit::describe),
        incident: stated_number(ask),
        ..AuditEntry::default()
    }
}

/// Records a refused sub-query. The refusal itself is returned to the caller either
/// way; if the record cannot be written, that error is returned instead, since a
/// gateway that cannot keep its record must not look as if it did. A refusal for load
/// (`Error::Busy`) released nothing and is most likely one of a flood: its record is
/// written in chain order at once but not waited on (`append_unawaited`), so the flood
/// costs no sync of its own.
pub fn refuse(
    audit: &AuditLog,
    ask: &SubQueryAsk,
    datasets: Vec<String>,
    permit: Option<&Permit>,
    why: &Error,
) -> Result<()> {
    let mut e = entry(ask, datasets, permit);
    e.decision = Decision::Refused;
    e.reason = Some(why.to_string());
    if matches!(why, Error::Busy { .. }) {
        audit.append_unawaited(&e)?;
    } else {
        audit.append(&e)?;
    }
    Ok(())
}

/// Records a refused `Peer.Explain` (refused before the engine saw it).
pub fn refuse_explain(audit: &AuditLog, ask: &SubQueryAsk, why: &Error) -> Result<()> {
    let mut e = entry(ask, Vec::new(), None);
    e.kind = EntryKind::Explain;
    e.decision = Decision::Refused;
    e.reason = Some(why.to_string());
    audit.append(&e)?;
    Ok(())
}

/// The whole data-owner path for one sub-query: prepare, authorize, execute, audit.
/// Returns the rows; the record is written when the stream ends or is dropped. `note`
/// receives how the data is shared at once, and the record's hash once written.
pub async fn answer(
    engine: &MemberEngine,
    audit: &Arc<AuditLog>,
    emergency: Emergency<'_>,
    ask: SubQueryAsk<'_>,
    note: Arc<Note>,
) -> Result<SendableRecordBatchStream> {
    let prepared = match engine.prepare(ask.sql).await {
        Ok(p) => p,
        Err(e) => {
            refuse(audit, &ask, Vec::new(), None, &e)?;
            return Err(e);
        }
    };
    let datasets: Vec<String> = prepared.datasets.iter().cloned().collect();
    if let Err(e) = within_assertion(&ask, &prepared.datasets) {
        refuse(audit, &ask, datasets, None, &e)?;
        return Err(e);
    }
    let incident = match stated_incident(engine, emergency, audit, &ask) {
        Ok(i) => i,
        Err(e) => {
            refuse(audit, &ask, datasets, None, &e)?;
            return Err(e);
        }
    };
    let now = std::time::SystemTime::now();
    let stated = incident
        .as_ref()
        .map(|declaration| policy::Incident { declaration, now });
    let permit =
        match engine.authorize(ask.via, ask.origin, ask.purpose, stated.as_ref(), &prepared) {
            Ok(p) => p,
            Err(e) => {
                refuse(audit, &ask, datasets, None, &e)?;
                return Err(e);
            }
        };
    let executed = match engine.execute(&permit, prepared).await {
        Ok(x) => x,
        Err(e) => {
            refuse(audit, &ask, datasets, Some(&permit), &e)?;
            return Err(e);
        }
    };
    let mut record = entry(&ask, datasets, Some(&permit));
    // The plan hash covers the rewrite the grants imposed, not only the text received.
    record.sql_sha256 = executed.plan_sha256;
    note.set_access(permit.describe());
    let schema = executed.stream.schema();
    let in_full = permit
        .grants()
        .values()
        .all(|g| g.level == crate::owner::policy::AccessLevel::Rows && g.masks.is_empty());
    Ok(Box::pin(Audited {
        inner: executed.stream,
        schema,
        record: Some(record),
        audit: audit.clone(),
        note,
        failures: if in_full {
            Failures::InFull
        } else {
            Failures::ByKind(permit.describe())
        },
    }))
}

/// A result stream that writes its audit record when it ends, fails or is dropped.
struct Audited {
    inner: SendableRecordBatchStream,
    schema: SchemaRef,
    /// The record still to be written (`None` once written).
    record: Option<AuditEntry>,
    audit: Arc<AuditLog>,
    note: Arc<Note>,
    failures: Failures,
}

/// How a failure while the answer is computed is told to the caller.
enum Failures {
    /// In full: the caller may read every record value the message could hold.
    InFull,
    /// By its kind only, naming the access (masked, aggregate or verify grants).
    ByKind(String),
}

/// Says what went wrong while an answer was computed without any value of the data
/// in it: execution errors can quote the value that failed (a cast, a division), and
/// a caller whose grant is not unmasked rows may not see record values. The first
/// error is for the caller (the full one under [`Failures::InFull`]), the second
/// for the audit record, which never holds the failure's text.
fn worded(e: datafusion::error::DataFusionError, failures: &Failures) -> (Error, Error) {
    let kind = failure_kind(&e);
    let full = Error::from_datafusion(e);
    let access = match failures {
        Failures::InFull => "the member's operators can read its text in their log".to_string(),
        Failures::ByKind(a) => format!(
            "its text is not shown under {a}; the member's operators can read it in their log"
        ),
    };
    let by_kind = match &full {
        // These carry no values of the data.
        Error::DeadlineExceeded(_)
        | Error::Overloaded(_)
        | Error::Busy { .. }
        | Error::TooLarge(_)
        | Error::Member { .. }
        | Error::Unauthenticated(_)
        | Error::PermissionDenied(_) => full.clone(),
        Error::Database {
            database,
            unavailable: true,
            reason,
        } => Error::Database {
            database: database.clone(),
            unavailable: true,
            reason: reason.clone(),
        },
        Error::Database { database, .. } => Error::Database {
            database: database.clone(),
            unavailable: false,
            reason: format!("a statement failed ({access})"),
        },
        _ => match kind {
            Some(k) => Error::InvalidQuery(format!("the query failed on the data: {k} ({access})")),
            None => Error::Internal(format!(
                "the answer failed while it was computed ({access})"
            )),
        },
    };
    match failures {
        Failures::InFull => (full, by_kind),
        Failures::ByKind(_) => (by_kind.clone(), by_kind),
    }
}

/// The kind of a failure that the caller's own expressions cause on some value.
fn failure_kind(e: &datafusion::error::DataFusionError) -> Option<&'static str> {
    use datafusion::arrow::error::ArrowError as A;
    use datafusion::error::DataFusionError as D;
    match e {
        D::Context(_, inner) => failure_kind(inner),
        D::Shared(inner) => failure_kind(inner),
        D::ArrowError(a, _) => match a.as_ref() {
            A::DivideByZero => Some("division by zero"),
            A::CastError(_) | A::ParseError(_) => Some("a value that does not convert"),
            A::ArithmeticOverflow(_) | A::ComputeError(_) => Some("an arithmetic overflow"),
            A::InvalidArgumentError(_) => Some("an invalid argument"),
            _ => None,
        },
        _ => None,
    }
}

impl Audited {
    fn finish(&mut self, decision: Decision, reason: Option<String>) -> Result<()> {
        let Some(mut r) = self.record.take() else {
            return Ok(());
        };
        r.decision = decision;
        r.reason = reason;
        let receipt = self.audit.append(&r)?;
        let _ = self.note.audit_hash.set(receipt.hash);
        Ok(())
    }

    fn tally(&mut self, b: &RecordBatch) {
        if let Some(r) = &mut self.record {
            r.rows += b.num_rows() as u64;
            r.bytes += b
                .columns()
                .iter()
                .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0) as u64)
                .sum::<u64>();
        }
    }
}

impl Stream for Audited {
    type Item = datafusion::error::Result<RecordBatch>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        if self.record.is_none() {
            return Poll::Ready(None);
        }
        match self.inner.poll_next_unpin(cx) {
            Poll::Ready(Some(Ok(b))) => {
                self.tally(&b);
                Poll::Ready(Some(Ok(b)))
            }
            Poll::Ready(Some(Err(e))) => {
                tracing::warn!(error = %e, "A sub-query failed while its answer was computed");
                let (told, recorded) = worded(e, &self.failures);
                match self.finish(Decision::Failed, Some(recorded.to_string())) {
                    Ok(()) => Poll::Ready(Some(Err(told.into_datafusion()))),
                    Err(a) => Poll::Ready(Some(Err(a.into_datafusion()))),
                }
            }
            Poll::Ready(None) => match self.finish(Decision::Answered, None) {
                Ok(()) => Poll::Ready(None),
                // The answer must not end normally without its record.
                Err(a) => Poll::Ready(Some(Err(a.into_datafusion()))),
            },
            Poll::Pending => Poll::Pending,
        }
    }
}

impl RecordBatchStream for Audited {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }
}

impl Drop for Audited {
    fn drop(&mut self) {
        if self.record.is_some()
            && let Err(e) = self.finish(
                Decision::Cancelled,
                Some("the answer was abandoned before its end (caller stopped, deadline, or limit met)".into()),
            )
        {
            tracing::error!(error = %e, "Writing the audit record of an abandoned sub-query failed");
        }
    }
}
