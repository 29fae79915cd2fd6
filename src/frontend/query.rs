//! The one query entry point every front end calls: [`FederationService::start`] admits,
//! plans and starts a client query, records it (audit, metrics, status board) and hands
//! back its batches and, after the last one, its [`Outcome`]. gRPC `Query` and `Invoke`,
//! Flight SQL and the JSON API only encode the answer differently, so identity,
//! admission, audit, members' rules and partial answers are the same on every front end.

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tokio::sync::oneshot;
use tonic::Request;
use tracing::Instrument;

use crate::config::MemberConfig;
use crate::coordinator::{Coordinator, QueryOptions};
use crate::error::{Error, Result};
use crate::ops::audit::AuditLog;
use crate::owner::peer::{Sent, send_by};
use crate::proto::v1::*;
use crate::trust::identity::Principal;
use crate::trust::tls::TlsMaterial;

/// A client query as any front end (gRPC `Query` and `Invoke`, Flight SQL, HTTP)
/// asks it of this coordinator.
#[derive(Debug, Clone, Default)]
pub struct Ask {
    /// Canonical SQL.
    pub sql: String,
    /// The published service called, if any (its SQL is `sql`).
    pub service: Option<String>,
    /// Values bound to the SQL's placeholders.
    pub params: Option<datafusion::common::ParamValues>,
    /// Return the answering members' rows when some members fail.
    pub allow_partial: bool,
    /// The caller's time budget(s); the shortest applies, capped by the limits.
    pub timeouts: Vec<Duration>,
    /// Diagnosis only: no aggregate or top-k pushdown.
    pub no_pushdown: bool,
    /// Diagnosis only: plan anew.
    pub no_plan_cache: bool,
    /// The stated purpose (empty: none).
    pub purpose: String,
    /// The origin's assertion (an encoded `SignedOriginAssertion`), when the caller
    /// asks through a gateway that is not its own.
    pub assertion: Option<Arc<Vec<u8>>>,
    /// The incident the caller asks under (an encoded signed declaration).
    pub incident: Option<Arc<Vec<u8>>>,
    /// Return a signed receipt with the answer.
    pub receipt: bool,
}

/// The origin assertion a gRPC caller sent, if any.
pub(crate) fn assertion_of<T>(req: &Request<T>) -> Option<Arc<Vec<u8>>> {
    req.metadata()
        .get_bin(crate::trust::assertion::METADATA_KEY)
        .and_then(|v| v.to_bytes().ok())
        .map(|b| Arc::new(b.to_vec()))
}

impl Ask {
    /// A plain SQL query with the gateway's defaults.
    pub fn sql(sql: impl Into<String>) -> Ask {
        Ask {
            sql: sql.into(),
            ..Ask::default()
        }
    }

    /// The text whose hash the audit record keeps: the SQL, and for a service its
    /// name and bound values (which may be personal data, so only hashed).
    fn audited_text(&self) -> String {
        match (&self.service, &self.params) {
            (Some(name), Some(p)) => format!("-- service {name} {p:?}\n{}", self.sql),
            (Some(name), None) => format!("-- service {name}\n{}", self.sql),
            _ => self.sql.clone(),
        }
    }
}

/// How a started query ended.
#[derive(Debug)]
pub struct Outcome {
    /// The summary (absent only when the query could not be recorded).
    pub summary: Option<QuerySummary>,
    /// Why the answer is incomplete, if it is.
    pub failure: Option<Error>,
}

/// The outcome of a started query, sent once the query is on the record.
#[derive(Debug)]
pub struct PendingOutcome(oneshot::Receiver<Outcome>);

impl PendingOutcome {
    /// Waits for the outcome. A query whose driver ended without sending one (which
    /// would be a defect) ends as an internal failure rather than as a silent success,
    /// the same on every front end.
    pub async fn wait(self) -> Outcome {
        self.0.await.unwrap_or_else(|_| Outcome {
            summary: None,
            failure: Some(Error::Internal("the query ended without an outcome".into())),
        })
    }
}

/// A query that has been admitted and planned and is running.
pub struct Started {
    /// The answer's schema.
    pub schema: datafusion::arrow::datatypes::SchemaRef,
    /// The answer's batches; the channel closes at the end of the answer (complete
    /// or not: see `outcome`). Dropping it cancels the query.
    pub batches: Batches,
    /// Sent after the last batch, once the query is on the record.
    pub outcome: PendingOutcome,
    /// The per-member states, for progress reports.
    pub state: Arc<crate::coordinator::state::QueryState>,
    /// When the query arrived.
    pub started: Instant,
}

/// A started query's batches, as the front end reads them. The channel closes at the
/// end of the answer (complete or not). It holds the query's admission slot with the
/// driver: a caller that stops reading keeps its slot (and the answer's buffered
/// batches) until it goes away, while the members' work ends at the deadline, so the
/// memory such callers hold is bounded by the slots of their class.
pub struct Batches {
    rx: tokio::sync::mpsc::Receiver<datafusion::arrow::record_batch::RecordBatch>,
    _slot: Arc<crate::ops::admission::Ticket>,
}

impl Batches {
    /// The next batch; `None` at the end of the answer.
    pub async fn recv(&mut self) -> Option<datafusion::arrow::record_batch::RecordBatch> {
        self.rx.recv().await
    }
}

impl futures::Stream for Batches {
    type Item = datafusion::arrow::record_batch::RecordBatch;

    fn poll_next(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Self::Item>> {
        self.rx.poll_recv(cx)
    }
}

/// The client-facing service.
#[derive(Clone)]
pub struct FederationService {
    pub(crate) coordinator: Arc<Coordinator>,
    pub(crate) admission: Arc<crate::ops::admission::Admission>,
    /// The data owner's admission of sub-queries (shown beside this door's).
    pub(crate) subquery_admission: Arc<crate::ops::admission::Admission>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) observer: Arc<crate::ops::observe::Observer>,
    /// This gateway's certificate and key: it signs assertions for its own identity
    /// and checks the ones callers bring.
    pub(crate) tls: Arc<TlsMaterial>,
    /// Assertions callers have presented here, each good for one query.
    pub(crate) nonces: Arc<crate::trust::assertion::Nonces>,
}

/// The outcome word of a finished query, for metrics and the status board.
fn outcome_word(d: crate::ops::audit::Decision) -> &'static str {
    match d {
        crate::ops::audit::Decision::Answered => "answered",
        crate::ops::audit::Decision::Refused => "refused",
        crate::ops::audit::Decision::Failed => "failed",
        crate::ops::audit::Decision::Cancelled => "cancelled",
    }
}

impl FederationService {
    /// The configuration version this service answers under.
    pub fn config(&self) -> &Arc<MemberConfig> {
        self.coordinator.config()
    }

    /// The coordinator of this configuration version.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
    }

    /// The slots of both doors now: client queries here, and sub-queries other
    /// gateways send to this data owner.
    pub fn admission(&self) -> [(&'static str, crate::ops::admission::Load); 2] {
        [
            ("queries", self.admission.load()),
            ("subqueries", self.subquery_admission.load()),
        ]
    }

    /// The gateway's metrics and recent history.
    pub fn observer(&self) -> &Arc<crate::ops::observe::Observer> {
        &self.observer
    }

    /// Records a client query at the coordinator: who asked what, for which purpose,
    /// which members were asked and how each answered (with the hash of each member's
    /// own audit record, a witness against later removal of that record). The
    /// observer (metrics, status board) learns of it too.
    fn record_query(
        &self,
        origin: &Principal,
        ask: &Ask,
        started: (std::time::SystemTime, Instant),
        decision: crate::ops::audit::Decision,
        reason: Option<String>,
        summary: Option<&QuerySummary>,
    ) -> Result<String> {
        use crate::ops::audit::{AuditEntry, EntryKind, MemberOutcome, sql_hash};
        let members = summary
            .map(|s| {
                s.members
                    .iter()
                    .map(|m| MemberOutcome {
                        member: m.member.clone(),
                        state: crate::proto::state_word(m.state).to_string(),
                        rows: m.rows,
                        audit_hash: (!m.audit_hash.is_empty()).then(|| m.audit_hash.clone()),
                    })
                    .collect()
            })
            .unwrap_or_default();
        let entry = AuditEntry {
            kind: EntryKind::Query,
            time: AuditEntry::now_utc(),
            query_id: summary.map(|s| s.query_id.clone()).unwrap_or_default(),
            origin: origin.uri(),
            purpose: (!ask.purpose.is_empty()).then(|| ask.purpose.clone()),
            sql_sha256: sql_hash(&ask.audited_text()),
            decision,
            reason: reason.clone(),
            rows: summary.map(|s| s.rows).unwrap_or(0),
            members,
            incident: ask
                .incident
                .as_deref()
                .map(|d| crate::trust::incident::stated_number(d)),
            ..AuditEntry::default()
        };
        let recorded = self.audit.append(&entry).map(|r| r.hash);
        self.observer.finished(
            &self.coordinator.config().region,
            crate::ops::observe::Finished {
                origin,
                sql: &ask.sql,
                service: ask.service.as_deref(),
                started_at: started.0,
                elapsed: started.1.elapsed(),
                outcome: outcome_word(decision),
                error: reason,
                summary,
            },
        );
        recorded
    }

    /// Checks an assertion a caller brought: signed by the caller's own gateway, for
    /// this gateway, this query and purpose, current, and not used before.
    fn check_assertion(&self, origin: &Principal, ask: &Ask, encoded: &[u8]) -> Result<()> {
        let config = self.coordinator.config();
        let now = std::time::SystemTime::now();
        let v = crate::trust::assertion::verify(
            &self.tls,
            &|p| config.region.has_gateway(p),
            encoded,
            now,
        )?;
        let digest = match &ask.service {
            Some(s) => crate::trust::assertion::service_digest(s),
            None => crate::trust::assertion::sql_digest(&ask.sql),
        };
        v.covers(&crate::trust::assertion::Expected {
            origin,
            via: &config.member.principal,
            audience: None,
            purpose: &ask.purpose,
            query_sha256: Some(&digest),
            incident_sha256: &crate::trust::assertion::incident_digest(
                ask.incident.as_deref().map(Vec::as_slice),
            ),
            now,
        })?;
        // Each query presents it once here; the owners bind it to the query id.
        self.nonces.bind(&v, &uuid::Uuid::new_v4().to_string())
    }

    /// The receipt of a complete answer: the members' statements and this gateway's
    /// own over the client's query and the digest of the rows sent (`d`), naming its
    /// audit record.
    fn receipt(
        &self,
        origin: &Principal,
        ask: &Ask,
        state: &crate::coordinator::state::QueryState,
        d: crate::trust::receipt::RowsDigest,
        audit_hash: &str,
    ) -> Result<Vec<u8>> {
        use prost::Message;
        let me = self.tls.principal.uri();
        let incident = ask
            .incident
            .as_deref()
            .map(|d| crate::trust::incident::stated_number(d))
            .unwrap_or_default();
        let region = &self.coordinator.config().region;
        let now = crate::trust::receipt::now_ms();
        // Every member asked must have stated its answer, and each statement is
        // checked in full before it is listed: the coordinator signs for what it lists.
        let mut members = Vec::new();
        for s in state.statements() {
            let Some(st) = s.statement else {
                return Err(Error::InvalidQuery(format!(
                    "no receipt: the answer of member {} ended before it could state it (a \
                     LIMIT met by other members' rows, or the caller stopped); ask without \
                     LIMIT, or ask that member alone",
                    s.member
                )));
            };
            let signer = region
                .members
                .iter()
                .find(|m| m.name == s.member)
                .map(|m| m.principal.uri())
                .unwrap_or_default();
            crate::trust::receipt::check_member(
                &self.tls,
                &st,
                &crate::trust::receipt::Expected {
                    member: &s.member,
                    signer: &signer,
                    query_id: &state.query_id,
                    origin: &origin.uri(),
                    via: &me,
                    purpose: &ask.purpose,
                    incident: &incident,
                    query_sha256: &s.sub_query_sha256,
                },
                now,
            )
            .map_err(|why| Error::Member {
                member: s.member.clone(),
                failure: crate::error::MemberFailure::Failed,
                reason: format!("its statement of its answer does not hold: {why}"),
            })?;
            members.push(st);
        }
        let (rows_sha256, rows) = d.finish();
        let statement = crate::proto::v1::AnswerStatement {
            kind: "coordinator".into(),
            signer: self.tls.principal.uri(),
            member: self.coordinator.config().member.name.clone(),
            query_id: state.query_id.clone(),
            origin: origin.uri(),
            via: String::new(),
            purpose: ask.purpose.clone(),
            incident,
            query_sha256: crate::ops::audit::sql_hash(&ask.audited_text()),
            rows_sha256,
            rows,
            audit_hash: audit_hash.to_string(),
            time_ms: crate::trust::receipt::now_ms(),
            parts: members
                .iter()
                .map(|m| crate::trust::receipt::part_hash(m))
                .collect(),
        };
        Ok(crate::proto::v1::Receipt {
            coordinator: crate::trust::receipt::sign(&self.tls, &statement)?,
            members,
        }
        .encode_to_vec())
    }

    /// Delivers a signed incident declaration to every member (`Federation.Declare`),
    /// after checking its form and signature here. Any region identity may deliver
    /// one: a declaration says only what its declarer signed, and each member decides
    /// by its own rules whether to honour it.
    pub async fn declare(
        &self,
        who: &Principal,
        declaration: &[u8],
    ) -> Result<crate::proto::v1::DeclareResponse> {
        crate::frontend::known_identity(&self.coordinator.config().region, who)?;
        let d =
            crate::trust::incident::verify(&self.tls, declaration, std::time::SystemTime::now())?;
        tracing::info!(%who, incident = %d.number(), kind = d.kind.word(), declarer = %d.declarer, "Delivering an incident declaration");
        Ok(crate::proto::v1::DeclareResponse {
            members: self.coordinator.declare(declaration).await,
        })
    }

    /// Signs an origin assertion for this gateway's own identity (`Federation.Vouch`).
    pub fn vouch_for(&self, caller: &Principal, r: &VouchRequest) -> Result<VouchResponse> {
        let config = self.coordinator.config();
        let region = &config.region;
        let me = &config.member.principal;
        if caller != me {
            return Err(Error::PermissionDenied(format!(
                "{caller} asked {me}'s gateway to vouch for it; a gateway vouches only for \
                 its own identity (ask your own gateway)"
            )));
        }
        // The gateway by identity, member name or endpoint URL.
        let via = region
            .members
            .iter()
            .filter(|m| m.endpoint.is_some())
            .find(|m| {
                m.principal.uri() == r.gateway
                    || m.name == r.gateway
                    || m.endpoint.as_ref().is_some_and(|e| {
                        e.url.trim_end_matches('/') == r.gateway.trim_end_matches('/')
                    })
            })
            .map(|m| m.principal.clone())
            .ok_or_else(|| {
                Error::InvalidQuery(format!(
                    "gateway {:?} is not a member gateway of region {} (name it by member \
                     name, identity or endpoint URL)",
                    r.gateway, region.name
                ))
            })?;
        if !r.purpose.is_empty() {
            crate::owner::policy::validate_purpose(&r.purpose).map_err(Error::InvalidQuery)?;
        }
        // The purpose as the coordinator will state it (a service may fix its code).
        let (datasets, digest, purpose) = match (r.sql.is_empty(), r.service.is_empty()) {
            (false, true) => (
                self.coordinator.datasets_of(&r.sql)?,
                crate::trust::assertion::sql_digest(&r.sql),
                r.purpose.clone(),
            ),
            (true, false) => {
                let s = region
                    .services
                    .iter()
                    .find(|s| s.name == r.service)
                    .ok_or_else(|| {
                        Error::NotFound(format!("no published service {:?}", r.service))
                    })?;
                (
                    self.coordinator.datasets_of(&s.sql)?,
                    crate::trust::assertion::service_digest(&s.name),
                    crate::frontend::services::purpose(s, Some(&r.purpose))?,
                )
            }
            _ => {
                return Err(Error::InvalidQuery(
                    "a vouch names either sql or a service, not both or neither".into(),
                ));
            }
        };
        let validity = match r.validity_ms {
            0 => crate::trust::assertion::DEFAULT_VALIDITY,
            ms => Duration::from_millis(ms),
        };
        if validity > crate::trust::assertion::MAX_VALIDITY {
            return Err(Error::InvalidQuery(format!(
                "an assertion is valid for at most {} s",
                crate::trust::assertion::MAX_VALIDITY.as_secs()
            )));
        }
        let audience: std::collections::BTreeSet<String> = datasets
            .iter()
            .flat_map(|d| region.servers_of(d))
            .filter(|m| m.endpoint.is_some())
            .map(|m| m.principal.uri())
            .collect();
        let body = crate::trust::assertion::Vouch {
            origin: me,
            via: &via,
            audience: audience.into_iter().collect(),
            datasets: datasets.into_iter().collect(),
            purpose: &purpose,
            query_sha256: digest,
            incident_sha256: {
                let i = &r.incident_sha256;
                if !i.is_empty() && (i.len() != 64 || !i.chars().all(|c| c.is_ascii_hexdigit())) {
                    return Err(Error::InvalidQuery(
                        "incident_sha256 is not a SHA-256 in hex".into(),
                    ));
                }
                i.to_ascii_lowercase()
            },
            now: std::time::SystemTime::now(),
            validity,
        }
        .body();
        let assertion = crate::trust::assertion::sign(&self.tls, &body)?;
        tracing::info!(%via, datasets = ?body.datasets, nonce = %body.nonce, "Vouched for a query through another gateway");
        Ok(VouchResponse {
            assertion,
            covers: Some(body),
        })
    }

    /// Admits, plans and starts a client query. A query refused before it runs is
    /// recorded and returned as the error; one that starts is recorded when it ends.
    pub async fn start(&self, origin: Principal, ask: Ask) -> Result<Started> {
        let started = Instant::now();
        let wall = std::time::SystemTime::now();
        let limits = &self.coordinator.config().limits;
        // A query refused before it runs is on the record too.
        let refuse = |e: Error| -> Error {
            match self.record_query(
                &origin,
                &ask,
                (wall, started),
                crate::ops::audit::Decision::Refused,
                Some(e.to_string()),
                None,
            ) {
                Ok(_) => e,
                Err(a) => a,
            }
        };
        if !ask.purpose.is_empty()
            && let Err(why) = crate::owner::policy::validate_purpose(&ask.purpose)
        {
            return Err(refuse(Error::InvalidQuery(why)));
        }
        // The owners check the assertion themselves; checking it here too tells a
        // caller at once, and by name, what is wrong with it.
        if let Some(a) = &ask.assertion
            && let Err(e) = self.check_assertion(&origin, &ask, a)
        {
            return Err(refuse(e));
        }
        // The owners check the declaration themselves against their own rules; a
        // forged or malformed one is refused here at once.
        if let Some(d) = &ask.incident
            && let Err(e) =
                crate::trust::incident::verify(&self.tls, d, std::time::SystemTime::now())
        {
            return Err(refuse(e));
        }
        let timeout = ask
            .timeouts
            .iter()
            .copied()
            .filter(|t| !t.is_zero())
            .min()
            .unwrap_or(limits.default_timeout)
            .min(limits.max_timeout);
        let ticket = match self
            .admission
            .try_admit(origin.kind(), &origin.uri(), Instant::now())
        {
            Ok(t) => t,
            Err(r) => {
                return Err(refuse(Error::Busy {
                    reason: r.reason,
                    retry_after: r.retry_after,
                }));
            }
        };
        let span = tracing::info_span!(
            "query",
            member = %self.coordinator.config().member.name,
            %origin,
            query_id = tracing::field::Empty,
            service = ask.service.as_deref().unwrap_or(""),
        );
        tracing::info!(parent: &span, sql = %ask.sql, allow_partial = ask.allow_partial, ?timeout, "Query");
        let running = self
            .coordinator
            .query(
                origin.clone(),
                &ask.sql,
                QueryOptions {
                    allow_partial: ask.allow_partial,
                    timeout,
                    pushdown: !ask.no_pushdown,
                    plan_cache: !ask.no_plan_cache,
                    purpose: (!ask.purpose.is_empty()).then(|| ask.purpose.clone()),
                    params: ask.params.clone(),
                    assertion: ask.assertion.clone(),
                    incident: ask.incident.clone(),
                    receipt: ask.receipt,
                    span: span.clone(),
                },
            )
            .await;
        let running = match running {
            Ok(r) => r,
            Err(e) => return Err(refuse(e)),
        };
        span.record("query_id", running.state.query_id.as_str());
        let service = self.clone();
        let state = running.state.clone();
        let plan_cached = running.plan_cached;
        let plan_bound = running.plan_bound;
        let plan_bound_optimized = running.plan_bound_optimized;
        let plan_reused = running.plan_reused;
        let planning_us = running.planning.as_micros() as u64;
        let version = self.coordinator.config().version.clone();
        let max_rows = self.coordinator.config().limits.max_rows;
        let schema = running.schema.clone();
        let schema_for_digest = schema.clone();
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(8);
        let slot = Arc::new(ticket);
        let reader_slot = slot.clone();
        let (done_tx, done_rx) = oneshot::channel();
        let task_state = state.clone();
        tokio::spawn(
            async move {
                let state = task_state;
                // The admission slot is held until both this driver and the caller's
                // side of the answer are done (see `Batches`).
                let _slot = slot;
                let mut stream = running.stream;
                // The deadline counts from the query's arrival, planning included.
                let deadline = tokio::time::sleep_until(tokio::time::Instant::from_std(started) + timeout);
                tokio::pin!(deadline);
                let mut failure = None;
                let mut gone = false;
                let mut rows = 0u64;
                let mut digest = ask
                    .receipt
                    .then(|| crate::trust::receipt::RowsDigest::new(&schema_for_digest));
                loop {
                    tokio::select! {
                        next = stream.next() => match next {
                            Some(Ok(b)) => {
                                let n = b.num_rows() as u64;
                                // Refused before the batch that crosses the limit is
                                // sent: the caller gets an error, never an answer
                                // silently cut at the limit.
                                if let Some(max) = max_rows && rows + n > max {
                                    failure = Some(Error::TooLarge(format!(
                                        "the answer has more than {max} rows (limits.max_rows); \
                                         narrow it with WHERE, aggregate it, or add LIMIT"
                                    )));
                                    break;
                                }
                                if let Some(d) = &mut digest
                                    && let Err(e) = d.update(&b)
                                {
                                    failure = Some(e);
                                    break;
                                }
                                // A caller that stops reading (and keeps its stream)
                                // blocks this send; the deadline still holds while it
                                // does, or such a caller would keep the query, its
                                // slot and the members' work for as long as it liked.
                                // Rows count once handed over: the summary and the
                                // record say what the caller can have received.
                                match send_by(&batch_tx, b, deadline.as_mut()).await {
                                    Sent::Yes => rows += n,
                                    // The caller went away; dropping the stream cancels
                                    // the members. The query is still recorded.
                                    Sent::Gone => { gone = true; break; }
                                    Sent::Late => {
                                        failure = Some(Error::DeadlineExceeded(timeout));
                                        break;
                                    }
                                }
                            }
                            Some(Err(e)) => { failure = Some(Error::from_datafusion(e)); break; }
                            None => break,
                        },
                        _ = &mut deadline => { failure = Some(Error::DeadlineExceeded(timeout)); break; }
                    }
                }
                drop(stream);
                drop(batch_tx);
                let mut summary = QuerySummary {
                    query_id: state.query_id.clone(),
                    rows,
                    elapsed_us: started.elapsed().as_micros() as u64,
                    partial: state.is_partial() || failure.is_some(),
                    config_version: version,
                    members: state.statuses(),
                    bytes_received: state.bytes_received(),
                    plan_cached,
                    plan_bound,
                    plan_bound_optimized,
                    plan_reused,
                    planning_us,
                    receipt: Vec::new(),
                };
                tracing::info!(rows = summary.rows, partial = summary.partial, elapsed_us = summary.elapsed_us, "Query done");
                let decision = if gone {
                    crate::ops::audit::Decision::Cancelled
                } else if failure.is_some() {
                    crate::ops::audit::Decision::Failed
                } else {
                    crate::ops::audit::Decision::Answered
                };
                let outcome = match service.record_query(
                    &origin,
                    &ask,
                    (wall, started),
                    decision,
                    failure.as_ref().map(|e| e.to_string()),
                    Some(&summary),
                ) {
                    Err(a) => {
                        tracing::error!(error = %a, "Recording the query in the audit log failed");
                        Outcome {
                            summary: None,
                            failure: Some(a),
                        }
                    }
                    Ok(audit_hash) => {
                        if let Some(e) = &failure {
                            tracing::warn!(error = %e, "Query failed");
                        }
                        // A receipt only for a complete answer: it states what the
                        // caller received, and every member's part of it.
                        let mut failure = failure;
                        if let Some(d) = digest
                            && failure.is_none()
                            && !summary.partial
                        {
                            match service.receipt(&origin, &ask, &state, d, &audit_hash) {
                                Ok(r) => summary.receipt = r,
                                Err(e) => failure = Some(e),
                            }
                        }
                        Outcome {
                            summary: Some(summary),
                            failure,
                        }
                    }
                };
                let _ = done_tx.send(outcome);
            }
            .instrument(span),
        );
        Ok(Started {
            schema,
            batches: Batches {
                rx: batch_rx,
                _slot: reader_slot,
            },
            outcome: PendingOutcome(done_rx),
            state,
            started,
        })
    }

    /// Binds a published service's parameters into an [`Ask`], after checking that
    /// `origin` may call it.
    pub fn service_ask(
        &self,
        origin: &Principal,
        name: &str,
        given: &std::collections::BTreeMap<String, crate::frontend::services::Given>,
        purpose: Option<&str>,
    ) -> Result<Ask> {
        let region = &self.coordinator.config().region;
        let service = crate::frontend::services::find(region, name, origin)?;
        let params = crate::frontend::services::bind(service, given)?;
        Ok(Ask {
            sql: service.sql.clone(),
            service: Some(service.name.clone()),
            params: Some(params),
            purpose: crate::frontend::services::purpose(service, purpose)?,
            ..Ask::default()
        })
    }

    /// Records a service call refused before it could be bound (unknown service,
    /// caller not allowed, bad parameters), and returns the error.
    pub fn refuse_service(&self, origin: &Principal, name: &str, e: Error) -> Error {
        let ask = Ask {
            sql: String::new(),
            service: Some(name.to_string()),
            ..Ask::default()
        };
        let now = (std::time::SystemTime::now(), Instant::now());
        match self.record_query(
            origin,
            &ask,
            now,
            crate::ops::audit::Decision::Refused,
            Some(e.to_string()),
            None,
        ) {
            Ok(_) => e,
            Err(a) => a,
        }
    }
}
