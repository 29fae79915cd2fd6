//! The gRPC services of a gateway and the one builder that assembles them.
//!
//! Stack, outermost first: TLS edge ([`crate::trust::tls::incoming`], principal) -> identity
//! check (the principal must be a region member or known client) -> services:
//! `Federation` (admission, then the [`Coordinator`]), `Peer` (the data owner's
//! [`MemberEngine`]) and `grpc.health.v1.Health`.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use futures::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, oneshot};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::arrow_ipc;
use crate::config::MemberConfig;
use crate::coordinator::{Coordinator, QueryOptions};
use crate::error::{Error, Result};
use crate::ops::audit::AuditLog;
use crate::owner::member::MemberEngine;
use crate::proto::v1::federation_server::{Federation, FederationServer};
use crate::proto::v1::peer_server::{Peer, PeerServer};
use crate::proto::v1::*;
use crate::trust::identity::Principal;
use crate::trust::tls::TlsMaterial;

pub(crate) use crate::owner::peer::PeerService;
pub(crate) use crate::proto::{ResponseStream, grpc_timeout};
pub(crate) use crate::trust::tls::caller;

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

/// A query that has been admitted and planned and is running.
pub struct Started {
    /// The answer's schema.
    pub schema: datafusion::arrow::datatypes::SchemaRef,
    /// The answer's batches; the channel closes at the end of the answer (complete
    /// or not: see `outcome`). Dropping it cancels the query.
    pub batches: tokio::sync::mpsc::Receiver<datafusion::arrow::record_batch::RecordBatch>,
    /// Sent after the last batch, once the query is on the record.
    pub outcome: oneshot::Receiver<Outcome>,
    /// The per-member states, for progress reports.
    pub state: Arc<crate::coordinator::state::QueryState>,
    /// When the query arrived.
    pub started: Instant,
}

/// The client-facing service.
#[derive(Clone)]
pub struct FederationService {
    coordinator: Arc<Coordinator>,
    admission: Arc<crate::gateway::admission::Admission>,
    audit: Arc<AuditLog>,
    observer: Arc<crate::ops::observe::Observer>,
    /// This gateway's certificate and key: it signs assertions for its own identity
    /// and checks the ones callers bring.
    tls: Arc<TlsMaterial>,
    /// Assertions callers have presented here, each good for one query.
    nonces: Arc<crate::trust::assertion::Nonces>,
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
    /// The coordinator of this configuration version.
    pub fn coordinator(&self) -> &Arc<Coordinator> {
        &self.coordinator
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
    ) -> Result<()> {
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
            ..AuditEntry::default()
        };
        let recorded = self.audit.append(&entry).map(|_| ());
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
            now,
        })?;
        // Each query presents it once here; the owners bind it to the query id.
        self.nonces.bind(&v, &uuid::Uuid::new_v4().to_string())
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
                Ok(()) => e,
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
        let timeout = ask
            .timeouts
            .iter()
            .copied()
            .filter(|t| !t.is_zero())
            .min()
            .unwrap_or(limits.default_timeout)
            .min(limits.max_timeout);
        let permit = match self.admission.try_admit(origin.kind(), Instant::now()) {
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
        let planning_us = running.planning.as_micros() as u64;
        let version = self.coordinator.config().version.clone();
        let max_rows = self.coordinator.config().limits.max_rows;
        let schema = running.schema.clone();
        let (batch_tx, batch_rx) = tokio::sync::mpsc::channel(8);
        let (done_tx, done_rx) = oneshot::channel();
        let task_state = state.clone();
        tokio::spawn(
            async move {
                let state = task_state;
                let _permit = permit;
                let mut stream = running.stream;
                let deadline = tokio::time::sleep(timeout);
                tokio::pin!(deadline);
                let mut failure = None;
                let mut gone = false;
                let mut rows = 0u64;
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
                                rows += n;
                                if batch_tx.send(b).await.is_err() {
                                    // The caller went away; dropping the stream cancels
                                    // the members. The query is still recorded.
                                    gone = true;
                                    break;
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
                let summary = QuerySummary {
                    query_id: state.query_id.clone(),
                    rows,
                    elapsed_us: started.elapsed().as_micros() as u64,
                    partial: state.is_partial() || failure.is_some(),
                    config_version: version,
                    members: state.statuses(),
                    bytes_received: state.bytes_received(),
                    plan_cached,
                    planning_us,
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
                    Ok(()) => {
                        if let Some(e) = &failure {
                            tracing::warn!(error = %e, "Query failed");
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
            batches: batch_rx,
            outcome: done_rx,
            state,
            started,
        })
    }

    /// Streams a started query as gRPC `QueryResponse`s: Arrow IPC chunks, progress
    /// messages if asked, then the summary, then the error if the answer is
    /// incomplete.
    fn respond(&self, started: Started, progress: bool) -> ResponseStream<QueryResponse> {
        let observer = self.observer.clone();
        let (tx, rx) = tokio::sync::mpsc::channel::<std::result::Result<QueryResponse, Status>>(8);
        tokio::spawn(async move {
            let Started {
                schema,
                batches,
                outcome,
                state,
                started,
            } = started;
            let batches = tokio_stream::wrappers::ReceiverStream::new(batches).map(Ok);
            let chunks = arrow_ipc::encode(schema, batches);
            tokio::pin!(chunks);
            // The first tick is one period away; a query that did not ask for progress
            // never polls the timer, so it is never registered.
            let mut tick = tokio::time::interval_at(
                tokio::time::Instant::now() + PROGRESS_EVERY,
                PROGRESS_EVERY,
            );
            loop {
                tokio::select! {
                    next = chunks.next() => match next {
                        Some(Ok(c)) => {
                            observer.bytes_sent("client", (c.header.len() + c.body.len()) as u64);
                            let msg = QueryResponse { payload: Some(query_response::Payload::Arrow(c)) };
                            if tx.send(Ok(msg)).await.is_err() {
                                return;
                            }
                        }
                        Some(Err(e)) => {
                            let _ = tx.send(Err(e.to_status())).await;
                            return;
                        }
                        None => break,
                    },
                    _ = tick.tick(), if progress => {
                        let msg = QueryResponse {
                            payload: Some(query_response::Payload::Progress(Progress {
                                elapsed_us: started.elapsed().as_micros() as u64,
                                members: state.progress(),
                            })),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                }
            }
            match outcome.await {
                Ok(Outcome { summary, failure }) => {
                    if let Some(s) = summary {
                        let msg = QueryResponse {
                            payload: Some(query_response::Payload::Summary(s)),
                        };
                        if tx.send(Ok(msg)).await.is_err() {
                            return;
                        }
                    }
                    if let Some(e) = failure {
                        let _ = tx.send(Err(e.to_status())).await;
                    }
                }
                Err(_) => {
                    let _ = tx
                        .send(Err(Error::Internal(
                            "the query ended without an outcome".into(),
                        )
                        .to_status()))
                        .await;
                }
            }
        });
        Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
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
            Ok(()) => e,
            Err(a) => a,
        }
    }
}

/// How often a query that asked for progress gets a progress message.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

#[tonic::async_trait]
impl Federation for FederationService {
    type QueryStream = ResponseStream<QueryResponse>;
    type InvokeStream = ResponseStream<QueryResponse>;

    async fn query(
        &self,
        req: Request<QueryRequest>,
    ) -> std::result::Result<Response<Self::QueryStream>, Status> {
        let origin = caller(&req)?;
        let grpc = grpc_timeout(&req);
        let assertion = assertion_of(&req);
        let q = req.into_inner();
        let ask = Ask {
            sql: q.sql,
            allow_partial: q.allow_partial,
            timeouts: [Some(Duration::from_millis(q.timeout_ms)), grpc]
                .into_iter()
                .flatten()
                .collect(),
            no_pushdown: q.no_pushdown,
            no_plan_cache: q.no_plan_cache,
            purpose: q.purpose,
            assertion,
            ..Ask::default()
        };
        let started = self.start(origin, ask).await.map_err(|e| e.to_status())?;
        Ok(Response::new(self.respond(started, q.progress)))
    }

    async fn invoke(
        &self,
        req: Request<InvokeRequest>,
    ) -> std::result::Result<Response<Self::InvokeStream>, Status> {
        let origin = caller(&req)?;
        let grpc = grpc_timeout(&req);
        let assertion = assertion_of(&req);
        let q = req.into_inner();
        let given = q
            .params
            .iter()
            .map(|(k, v)| (k.clone(), crate::frontend::services::Given::from_proto(v)))
            .collect();
        let mut ask = self
            .service_ask(&origin, &q.service, &given, Some(q.purpose.as_str()))
            .map_err(|e| self.refuse_service(&origin, &q.service, e).to_status())?;
        ask.allow_partial = q.allow_partial;
        ask.assertion = assertion;
        ask.timeouts = [Some(Duration::from_millis(q.timeout_ms)), grpc]
            .into_iter()
            .flatten()
            .collect();
        let started = self.start(origin, ask).await.map_err(|e| e.to_status())?;
        Ok(Response::new(self.respond(started, q.progress)))
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> std::result::Result<Response<ExplainResponse>, Status> {
        let origin = caller(&req)?;
        let assertion = assertion_of(&req);
        let q = req.into_inner();
        let purpose = (!q.purpose.is_empty()).then_some(q.purpose);
        let e = self
            .coordinator
            .explain(origin, &q.sql, purpose, assertion)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(ExplainResponse {
            plan: e.plan,
            subqueries: e
                .subqueries
                .into_iter()
                .map(|(dataset, members, sql)| MemberSubquery {
                    dataset,
                    members,
                    sql,
                })
                .collect(),
            database_statements: e
                .database_statements
                .into_iter()
                .flat_map(|(member, r)| match r {
                    Ok(list) => list
                        .into_iter()
                        .map(|(database, sql)| DatabaseStatement {
                            member: member.clone(),
                            database,
                            sql,
                            error: String::new(),
                        })
                        .collect::<Vec<_>>(),
                    Err(e) => vec![DatabaseStatement {
                        member,
                        database: String::new(),
                        sql: String::new(),
                        error: e.to_string(),
                    }],
                })
                .collect(),
        }))
    }

    async fn vouch(
        &self,
        req: Request<VouchRequest>,
    ) -> std::result::Result<Response<VouchResponse>, Status> {
        let who = caller(&req)?;
        self.vouch_for(&who, req.get_ref())
            .map(Response::new)
            .map_err(|e| e.to_status())
    }

    async fn describe(
        &self,
        req: Request<DescribeRequest>,
    ) -> std::result::Result<Response<DescribeResponse>, Status> {
        let who = caller(&req)?;
        let purpose = req.into_inner().purpose;
        let purpose = (!purpose.is_empty()).then_some(purpose);
        let cfg = self.coordinator.config();
        let region = &cfg.region;
        let mut access = self
            .coordinator
            .describe_access(&who, purpose.as_deref())
            .await;
        Ok(Response::new(DescribeResponse {
            region: region.name.clone(),
            config_version: cfg.version.clone(),
            caller: who.uri(),
            services: region
                .services
                .iter()
                .map(|s| ServiceInfo {
                    name: s.name.clone(),
                    description: s.description.clone(),
                    params: s
                        .params
                        .iter()
                        .map(|p| ParamInfo {
                            name: p.name.clone(),
                            data_type: p.type_name.clone(),
                            description: p.description.clone(),
                        })
                        .collect(),
                    callers: s.callers.clone(),
                    purpose: s.purpose.clone().unwrap_or_default(),
                    callable: s.allows(&who),
                })
                .collect(),
            datasets: region
                .datasets
                .iter()
                .map(|d| DatasetInfo {
                    name: d.name.clone(),
                    description: d.description.clone(),
                    fields: d
                        .fields
                        .iter()
                        .map(|f| FieldInfo {
                            name: f.name.clone(),
                            data_type: f.data_type.to_string(),
                            nullable: true,
                            description: f.description.clone(),
                            unit: f.unit.clone(),
                        })
                        .chain(std::iter::once(FieldInfo {
                            name: crate::config::MEMBER_COLUMN.into(),
                            data_type: "Utf8".into(),
                            nullable: false,
                            description: "the member that answered this row".into(),
                            unit: String::new(),
                        }))
                        .collect(),
                    members: region.servers_of(&d.name).map(|m| m.name.clone()).collect(),
                    access: {
                        let (mine, rest) = std::mem::take(&mut access)
                            .into_iter()
                            .partition(|a| a.dataset == d.name);
                        access = rest;
                        mine
                    },
                })
                .collect(),
            members: region
                .members
                .iter()
                .map(|m| MemberInfo {
                    name: m.name.clone(),
                    kind: m.kind.to_string(),
                    identity: m.principal.uri(),
                    endpoint: m
                        .endpoint
                        .as_ref()
                        .map(|e| e.url.clone())
                        .unwrap_or_default(),
                })
                .collect(),
        }))
    }
}

/// Refuses callers whose (CA-verified) identity the region does not know, under the
/// configuration in force when the call arrives.
fn identity_check(current: Arc<ArcSwap<Generation>>) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| -> std::result::Result<Request<()>, Status> {
        let p = caller(&req)?;
        known_identity(&current.load().config.region, &p).map_err(|e| e.to_status())?;
        Ok(req)
    }
}

/// Refuses a (CA-verified) identity the region file does not name as a member or
/// known client. The gRPC interceptor and the HTTP port both ask this.
pub(crate) fn known_identity(region: &crate::config::Region, p: &Principal) -> Result<()> {
    if region.member_by_principal(p).is_none() {
        tracing::warn!(principal = %p, "Unknown identity refused");
        return Err(Error::Unauthenticated(format!(
            "certificate identity {p} is not a member or known client of region {}",
            region.name
        )));
    }
    Ok(())
}

/// Everything one configuration version serves with. A reload builds a new one and
/// swaps it in; every call takes the one in force when it arrives and keeps it to its
/// end, so a query runs under exactly one configuration version.
pub struct Generation {
    /// The configuration.
    pub config: Arc<MemberConfig>,
    /// The client-facing service of this version.
    pub federation: FederationService,
    peer: PeerService,
    server_tls: Arc<rustls::ServerConfig>,
    /// The same for the HTTP port (which also offers HTTP/1.1).
    http_tls: Arc<rustls::ServerConfig>,
    /// A digest of the CA, certificate and key files, to notice rotated certificates.
    tls_digest: String,
}

/// A digest of the files the gateway's TLS identity is made of.
fn tls_digest(config: &MemberConfig) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    for p in [&config.region.ca_path, &config.cert_path, &config.key_path] {
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

impl Generation {
    /// Builds what `config` serves with. Slot limits that did not change keep their
    /// counters, so queries running across a reload still count.
    async fn build(
        config: Arc<MemberConfig>,
        audit: Arc<AuditLog>,
        observer: Arc<crate::ops::observe::Observer>,
        previous: Option<&Generation>,
    ) -> Result<Generation> {
        let tls = Arc::new(TlsMaterial::load(
            &config.region.ca_path,
            &config.cert_path,
            &config.key_path,
        )?);
        if tls.principal != config.member.principal {
            return Err(Error::Config(format!(
                "{}: certificate identity {} does not match member {} ({})",
                config.cert_path.display(),
                tls.principal,
                config.member.name,
                config.member.principal
            )));
        }
        // An expired certificate, or one the region CA did not sign, would be refused
        // by every peer: refuse it here, with the reason, instead.
        tls.verify_own_certificate()?;
        let engine = if config.member.serves.is_empty() {
            None
        } else {
            Some(Arc::new(MemberEngine::build(config.clone()).await?))
        };
        let coordinator = Arc::new(Coordinator::new(
            config.clone(),
            engine.clone(),
            &tls,
            audit.clone(),
        )?);
        // A published service that does not plan, or whose placeholders are not its
        // declared parameters, is a configuration error, found before it is served.
        let mut bad = Vec::new();
        for service in &config.region.services {
            if let Err(e) = coordinator.check_service(service).await {
                bad.push(match e {
                    Error::Config(m) => m,
                    other => format!("service {}: {}", service.name, other),
                });
            }
        }
        if !bad.is_empty() {
            return Err(Error::Config(format!(
                "{}: {}",
                config.region.path.display(),
                bad.join("; ")
            )));
        }
        let same_slots = previous.filter(|p| {
            p.config.limits.max_concurrent_queries == config.limits.max_concurrent_queries
                && p.config.limits.classes == config.limits.classes
        });
        let admission = match same_slots {
            Some(p) => p.federation.admission.clone(),
            None => crate::gateway::admission::Admission::new(
                config.limits.max_concurrent_queries,
                config.limits.classes.clone(),
            ),
        };
        let sub_admission = match previous.filter(|p| {
            p.config.limits.max_concurrent_subqueries == config.limits.max_concurrent_subqueries
        }) {
            Some(p) => p.peer.admission.clone(),
            None => Arc::new(Semaphore::new(config.limits.max_concurrent_subqueries)),
        };
        Ok(Generation {
            tls_digest: tls_digest(&config),
            server_tls: tls.server_config()?,
            http_tls: tls.http_server_config()?,
            federation: FederationService {
                coordinator,
                admission,
                audit: audit.clone(),
                observer: observer.clone(),
                tls: tls.clone(),
                nonces: previous
                    .map(|p| p.federation.nonces.clone())
                    .unwrap_or_default(),
            },
            peer: PeerService {
                config: config.clone(),
                engine,
                admission: sub_admission,
                audit,
                observer,
                tls,
                // Kept across reloads: a reload must not make a used assertion new.
                nonces: previous.map(|p| p.peer.nonces.clone()).unwrap_or_default(),
            },
            config,
        })
    }
}

/// `Federation` under the configuration in force when each call arrives.
#[derive(Clone)]
struct LiveFederation(Arc<ArcSwap<Generation>>);

#[tonic::async_trait]
impl Federation for LiveFederation {
    type QueryStream = ResponseStream<QueryResponse>;
    type InvokeStream = ResponseStream<QueryResponse>;

    async fn invoke(
        &self,
        req: Request<InvokeRequest>,
    ) -> std::result::Result<Response<Self::InvokeStream>, Status> {
        let g = self.0.load_full();
        g.federation.invoke(req).await
    }

    async fn query(
        &self,
        req: Request<QueryRequest>,
    ) -> std::result::Result<Response<Self::QueryStream>, Status> {
        let g = self.0.load_full();
        g.federation.query(req).await
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> std::result::Result<Response<ExplainResponse>, Status> {
        let g = self.0.load_full();
        g.federation.explain(req).await
    }

    async fn describe(
        &self,
        req: Request<DescribeRequest>,
    ) -> std::result::Result<Response<DescribeResponse>, Status> {
        let g = self.0.load_full();
        g.federation.describe(req).await
    }

    async fn vouch(
        &self,
        req: Request<VouchRequest>,
    ) -> std::result::Result<Response<VouchResponse>, Status> {
        let g = self.0.load_full();
        Federation::vouch(&g.federation, req).await
    }
}

/// `Peer` under the configuration in force when each call arrives.
#[derive(Clone)]
struct LivePeer(Arc<ArcSwap<Generation>>);

#[tonic::async_trait]
impl Peer for LivePeer {
    type ExecuteStream = ResponseStream<ExecuteResponse>;

    async fn execute(
        &self,
        req: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<Self::ExecuteStream>, Status> {
        let g = self.0.load_full();
        g.peer.execute(req).await
    }

    async fn explain(
        &self,
        req: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<PeerExplainResponse>, Status> {
        let g = self.0.load_full();
        g.peer.explain(req).await
    }

    async fn catalog(
        &self,
        req: Request<CatalogRequest>,
    ) -> std::result::Result<Response<CatalogResponse>, Status> {
        let g = self.0.load_full();
        g.peer.catalog(req).await
    }
}

/// What a reload did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReloadOutcome {
    /// The files say what the running configuration says.
    Unchanged,
    /// A new configuration (or certificate) is in force.
    Applied {
        /// Its version.
        version: String,
    },
    /// The new files were refused; the running configuration stays.
    Rejected {
        /// Every problem found.
        reason: String,
    },
}

/// How often recorded latencies are folded into the metrics' histogram buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// How often the configuration and certificate files are checked for changes.
const RELOAD_POLL: Duration = Duration::from_secs(1);

/// (length, modification time) of a file, or `None` if it cannot be read.
type Stamp = Option<(u64, std::time::SystemTime)>;

fn stamp(p: &std::path::Path) -> Stamp {
    let m = std::fs::metadata(p).ok()?;
    Some((m.len(), m.modified().ok()?))
}

/// Reloads a gateway's configuration and certificates.
struct Reloader {
    path: std::path::PathBuf,
    current: Arc<ArcSwap<Generation>>,
    tls: Arc<ArcSwap<rustls::ServerConfig>>,
    http_tls: Arc<ArcSwap<rustls::ServerConfig>>,
    audit: Arc<AuditLog>,
    observer: Arc<crate::ops::observe::Observer>,
    /// The watched files as last seen.
    seen: std::sync::Mutex<Vec<(std::path::PathBuf, Stamp)>>,
    /// One reload at a time.
    busy: tokio::sync::Mutex<()>,
}

impl Reloader {
    fn watched(config: &MemberConfig) -> Vec<std::path::PathBuf> {
        vec![
            config.path.clone(),
            config.region.path.clone(),
            config.region.ca_path.clone(),
            config.cert_path.clone(),
            config.key_path.clone(),
        ]
    }

    fn look(
        config: &MemberConfig,
    ) -> Vec<(std::path::PathBuf, Option<(u64, std::time::SystemTime)>)> {
        Self::watched(config)
            .into_iter()
            .map(|p| {
                let s = stamp(&p);
                (p, s)
            })
            .collect()
    }

    /// Whether a watched file changed since it was last seen.
    fn changed(&self) -> bool {
        let seen = self.seen.lock().unwrap_or_else(|p| p.into_inner());
        seen.iter().any(|(p, s)| stamp(p) != *s)
    }

    async fn reload(&self) -> ReloadOutcome {
        let _one = self.busy.lock().await;
        let old = self.current.load_full();
        // Seen before reading, so a change made while this reload runs is noticed
        // by the next check.
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Self::look(&old.config);
        let outcome = self.try_reload(&old).await;
        match &outcome {
            ReloadOutcome::Applied { version } => {
                tracing::info!(member = %old.config.member.name, from = %old.config.version, to = %version, "Configuration reloaded");
            }
            ReloadOutcome::Rejected { reason } => {
                tracing::error!(member = %old.config.member.name, version = %old.config.version, "New configuration refused; the running one stays:\n{reason}");
            }
            ReloadOutcome::Unchanged => {}
        }
        outcome
    }

    async fn try_reload(&self, old: &Generation) -> ReloadOutcome {
        let rejected = |reason: String| ReloadOutcome::Rejected { reason };
        let config = match MemberConfig::load(&self.path) {
            Ok(c) => c,
            Err(problems) => return rejected(problems.to_string()),
        };
        *self.seen.lock().unwrap_or_else(|p| p.into_inner()) = Self::look(&config);
        if config.version == old.config.version && tls_digest(&config) == old.tls_digest {
            return ReloadOutcome::Unchanged;
        }
        for (what, changed) in [
            ("listen", config.listen != old.config.listen),
            ("member", config.member.name != old.config.member.name),
            ("audit", config.audit_path != old.config.audit_path),
            ("http", config.http != old.config.http),
            (
                "telemetry",
                config.otlp_endpoint != old.config.otlp_endpoint,
            ),
        ] {
            if changed {
                return rejected(format!(
                    "{}: `{what}` changed; that takes a restart",
                    self.path.display()
                ));
            }
        }
        match Generation::build(
            Arc::new(config),
            self.audit.clone(),
            self.observer.clone(),
            Some(old),
        )
        .await
        {
            Ok(g) => {
                let version = g.config.version.clone();
                self.tls.store(g.server_tls.clone());
                self.http_tls.store(g.http_tls.clone());
                self.current.store(Arc::new(g));
                ReloadOutcome::Applied { version }
            }
            Err(e) => rejected(e.to_string()),
        }
    }
}

/// Waits for SIGHUP (forever where there are no signals).
async fn hangup(signal: &mut Option<tokio::signal::unix::Signal>) {
    match signal {
        Some(s) => {
            s.recv().await;
        }
        None => std::future::pending().await,
    }
}

/// A running gateway.
pub struct Gateway {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The HTTP port's address, if it has one.
    pub http_addr: Option<SocketAddr>,
    /// This gateway's member name.
    pub member: String,
    shutdown: Option<oneshot::Sender<()>>,
    http_stop: tokio::sync::watch::Sender<bool>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    task: tokio::task::JoinHandle<std::result::Result<(), tonic::transport::Error>>,
    reloader: Arc<Reloader>,
    watcher: tokio::task::JoinHandle<()>,
    upkeep: tokio::task::JoinHandle<()>,
}

impl Gateway {
    /// Starts a gateway. `listener` lets tests and the demo bind ports first; without
    /// it the configured listen address is bound. The gateway reloads its
    /// configuration and certificates on SIGHUP and when their files change.
    pub async fn start(
        config: Arc<MemberConfig>,
        listener: Option<TcpListener>,
    ) -> Result<Gateway> {
        let audit = Arc::new(AuditLog::open(&config.audit_path)?);
        let observer = Arc::new(crate::ops::observe::Observer::new());
        let first =
            Generation::build(config.clone(), audit.clone(), observer.clone(), None).await?;
        let listener = match listener {
            Some(l) => l,
            None => TcpListener::bind(config.listen)
                .await
                .map_err(|e| Error::Config(format!("listen {}: {e}", config.listen)))?,
        };
        let addr = listener
            .local_addr()
            .map_err(|e| Error::Internal(e.to_string()))?;
        // The HTTP port is bound before anything is served, so a taken port fails the
        // start instead of leaving a gateway without its board and metrics.
        let http_listener = match &config.http {
            Some(h) => Some(
                TcpListener::bind(h.listen)
                    .await
                    .map_err(|e| Error::Config(format!("http.listen {}: {e}", h.listen)))?,
            ),
            None => None,
        };
        let http_addr = match &http_listener {
            Some(l) => Some(l.local_addr().map_err(|e| Error::Internal(e.to_string()))?),
            None => None,
        };
        let tls = Arc::new(ArcSwap::from(first.server_tls.clone()));
        let http_tls = Arc::new(ArcSwap::from(first.http_tls.clone()));
        let current = Arc::new(ArcSwap::from_pointee(first));
        let incoming = crate::trust::tls::incoming(listener, tls.clone());

        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<FederationServer<LiveFederation>>()
            .await;
        health.set_serving::<PeerServer<LivePeer>>().await;
        let reflection = |b: tonic_reflection::server::Builder<'static>| {
            b.register_encoded_file_descriptor_set(crate::proto::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection(tonic_reflection::server::Builder::configure())
            .build_v1()
            .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;
        let reflection_v1alpha = reflection(tonic_reflection::server::Builder::configure())
            .build_v1alpha()
            .map_err(|e| Error::Internal(format!("gRPC reflection: {e}")))?;

        let (tx, rx) = oneshot::channel::<()>();
        let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
        let router = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(identity_check(
                current.clone(),
            )))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                FederationServer::new(LiveFederation(current.clone()))
                    .max_decoding_message_size(16 * 1024 * 1024),
            )
            .add_service(
                PeerServer::new(LivePeer(current.clone()))
                    .max_decoding_message_size(16 * 1024 * 1024),
            )
            .add_service(
                arrow_flight::flight_service_server::FlightServiceServer::new(
                    crate::frontend::flight_sql::FlightSql::new(current.clone()),
                ),
            );
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = rx.await;
        }));
        let http_task = match (http_listener, &config.http) {
            (Some(l), Some(h)) => {
                let routes = crate::frontend::http::router(current.clone(), audit.clone());
                let mut stopped = http_stopped;
                let shutdown = async move {
                    let _ = stopped.wait_for(|s| *s).await;
                };
                Some(tokio::spawn(crate::frontend::http::serve(
                    l,
                    routes,
                    h.tls.then(|| http_tls.clone()),
                    config.member.principal.clone(),
                    shutdown,
                )))
            }
            _ => None,
        };
        let reloader = Arc::new(Reloader {
            path: config.path.clone(),
            seen: std::sync::Mutex::new(Reloader::look(&config)),
            current,
            tls,
            http_tls,
            audit,
            observer,
            busy: tokio::sync::Mutex::new(()),
        });
        // Latency samples are folded into histogram buckets every few seconds, so
        // the recorder holds buckets, not every sample, whether or not anyone scrapes.
        let upkeep = {
            let observer = reloader.observer.clone();
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(METRICS_UPKEEP).await;
                    observer.upkeep();
                }
            })
        };
        let watcher = {
            let r = reloader.clone();
            tokio::spawn(async move {
                let mut hup =
                    tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
                loop {
                    tokio::select! {
                        _ = tokio::time::sleep(RELOAD_POLL) => {
                            if !r.changed() {
                                continue;
                            }
                        }
                        _ = hangup(&mut hup) => {
                            tracing::info!("SIGHUP: reloading");
                        }
                    }
                    r.reload().await;
                }
            })
        };
        tracing::info!(member = %config.member.name, %addr, http = ?http_addr, version = %config.version, "Gateway serving");
        Ok(Gateway {
            addr,
            http_addr,
            member: config.member.name.clone(),
            shutdown: Some(tx),
            http_stop,
            http_task,
            task,
            reloader,
            watcher,
            upkeep,
        })
    }

    /// Reloads the configuration and certificates now (as SIGHUP does).
    pub async fn reload(&self) -> ReloadOutcome {
        self.reloader.reload().await
    }

    /// The configuration version in force.
    pub fn version(&self) -> String {
        self.reloader.current.load().config.version.clone()
    }

    /// Stops accepting, lets in-flight calls finish, and waits.
    pub async fn shutdown(mut self) {
        self.watcher.abort();
        self.upkeep.abort();
        let _ = self.http_stop.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = (&mut self.task).await;
        if let Some(h) = self.http_task.take() {
            let _ = h.await;
        }
    }

    /// Waits until the server stops on its own (an error).
    pub async fn wait(&mut self) -> Result<()> {
        match (&mut self.task).await {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Error::Internal(e.to_string())),
            Err(e) => Err(Error::Internal(e.to_string())),
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.watcher.abort();
        self.upkeep.abort();
        let _ = self.http_stop.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
