//! How the coordinator reaches a member: in process for itself, over mutual TLS with
//! `Peer.Execute` for everyone else. Both paths end in [`crate::owner::answer`] at the
//! data owner, so the owner's policy and audit apply whichever way the sub-query
//! arrives.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use datafusion::arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::transport::Channel;

use crate::arrow_ipc::{self, Decoded};
use crate::coordinator::breaker::{BreakerVerdict, MemberHealth, retry_pause};
use crate::error::{Error, MemberFailure, Result};
use crate::ops::audit::AuditLog;
use crate::owner::member::MemberEngine;
use crate::owner::{self, Note};
use crate::proto::v1::peer_client::PeerClient;
use crate::proto::v1::{ExecuteRequest, ExecuteSummary, execute_response};
use crate::trust::identity::Principal;

/// A sub-query for one member.
#[derive(Debug, Clone)]
pub struct SubQuery {
    /// Canonical SQL.
    pub sql: String,
    /// The original caller.
    pub origin: Principal,
    /// The coordinator's query id.
    pub query_id: String,
    /// Time left for this member.
    pub budget: Duration,
    /// Gateways passed so far (the coordinator first).
    pub path: Vec<String>,
    /// Counts the Arrow IPC bytes received for this sub-query.
    pub received: Arc<std::sync::atomic::AtomicU64>,
    /// The purpose the caller stated.
    pub purpose: Option<String>,
    /// The origin's assertion, when the coordinator is not the origin's own gateway.
    pub assertion: Option<Arc<Vec<u8>>>,
    /// The incident the caller asks under (a signed declaration).
    pub incident: Option<Arc<Vec<u8>>>,
    /// Ask the member for a signed statement of its answer.
    pub receipt: bool,
    /// Filled by the member: how it shared the data and its audit record's hash.
    pub note: Arc<Note>,
    /// The member call's span; its trace context goes with the request.
    pub span: tracing::Span,
}

impl SubQuery {
    /// The sub-query as the data owner sees it when it arrives through `via`.
    fn ask<'a>(&'a self, via: &'a Principal) -> owner::SubQueryAsk<'a> {
        owner::SubQueryAsk {
            via,
            origin: &self.origin,
            purpose: self.purpose.as_deref(),
            query_id: &self.query_id,
            sql: &self.sql,
            // In process: the owner sees the caller first-hand.
            covered: None,
            incident: self.incident.as_deref().map(Vec::as_slice),
        }
    }

    /// The sub-query as a `Peer` request, with its budget as the gRPC timeout.
    fn request(&self) -> tonic::Request<ExecuteRequest> {
        let mut req = tonic::Request::new(ExecuteRequest {
            sql: self.sql.clone(),
            origin: self.origin.uri(),
            hops: self.path.len() as u32,
            path: self.path.clone(),
            budget_ms: self.budget.as_millis() as u64,
            query_id: self.query_id.clone(),
            purpose: self.purpose.clone().unwrap_or_default(),
            origin_assertion: self
                .assertion
                .as_ref()
                .map(|a| a.as_ref().clone())
                .unwrap_or_default(),
            incident: self
                .incident
                .as_ref()
                .map(|a| a.as_ref().clone())
                .unwrap_or_default(),
            receipt: self.receipt,
        });
        req.set_timeout(self.budget);
        crate::ops::telemetry::inject(&self.span, req.metadata_mut());
        req
    }
}

fn emergency<'a>(
    register: &'a owner::incidents::Register,
    tls: &'a crate::trust::tls::TlsMaterial,
) -> owner::Emergency<'a> {
    owner::Emergency {
        register,
        tls: Some(tls),
    }
}

/// Batches from a member, each error already a member error naming it.
pub type MemberStream = BoxStream<'static, Result<RecordBatch>>;

/// A member the coordinator can send sub-queries to.
#[derive(Clone)]
pub enum MemberClient {
    /// This gateway's own data.
    Local {
        /// Member name.
        name: String,
        /// The engine.
        engine: Arc<MemberEngine>,
        /// This gateway's identity, the `via` of local sub-queries.
        me: Principal,
        /// This gateway's audit log, where its own data's answers are recorded.
        audit: Arc<AuditLog>,
        /// The incident declarations this gateway holds.
        register: Arc<owner::incidents::Register>,
        /// This gateway's trust material, to check declarations with.
        tls: Arc<crate::trust::tls::TlsMaterial>,
    },
    /// Another gateway.
    Remote {
        /// Member name.
        name: String,
        /// Its endpoint, for messages.
        endpoint: String,
        /// The `Peer` client over the lazily connected channel.
        client: PeerClient<Channel>,
        /// The same channel, for health probes.
        channel: Channel,
        /// Its breaker and retry budget.
        health: Arc<MemberHealth>,
    },
}

/// A retry is worth it only if this much of the budget is left after the pause.
const MIN_BUDGET_TO_RETRY: Duration = Duration::from_millis(100);

/// True for a failure of the link or the member's gateway itself, as opposed to an
/// answer from the member (a refusal, an error of one of its databases).
/// The retry hint of a refusal for load (`grpc-retry-pushback-ms`).
fn retry_hint(s: &tonic::Status) -> Option<Duration> {
    let v = s.metadata().get(crate::error::RETRY_PUSHBACK_METADATA)?;
    v.to_str().ok()?.parse().ok().map(Duration::from_millis)
}

fn is_transport_failure(s: &tonic::Status) -> bool {
    s.metadata().get(crate::error::DATABASE_METADATA).is_none()
        && (s.code() == tonic::Code::Unavailable || crate::error::link_failed(s))
}

/// Marks a health probe abandoned if its query is dropped before the probe ends, so
/// the breaker does not wait a whole cool-down for a verdict that never comes.
struct ProbeGuard<'a>(Option<&'a MemberHealth>);

impl Drop for ProbeGuard<'_> {
    fn drop(&mut self) {
        if let Some(h) = self.0 {
            h.breaker.probe_abandoned(Instant::now());
        }
    }
}

fn member_error(member: &str, e: Error) -> Error {
    match e {
        Error::Member { .. } => e,
        Error::PermissionDenied(m) => Error::Member {
            member: member.into(),
            failure: MemberFailure::Denied,
            reason: m,
        },
        Error::Database {
            unavailable: true, ..
        } => Error::Member {
            member: member.into(),
            failure: MemberFailure::Unavailable,
            reason: e.to_string(),
        },
        other => Error::Member {
            member: member.into(),
            failure: MemberFailure::Failed,
            reason: other.to_string(),
        },
    }
}

/// Classifies a gRPC status from a member that had `budget` to answer.
fn status_error(member: &str, endpoint: &str, budget: Duration, s: tonic::Status) -> Error {
    use tonic::Code;
    let failure = match s.code() {
        _ if crate::error::link_failed(&s) => MemberFailure::Unavailable,
        Code::Unavailable => MemberFailure::Unavailable,
        Code::DeadlineExceeded | Code::Cancelled => MemberFailure::TimedOut,
        Code::PermissionDenied | Code::Unauthenticated => MemberFailure::Denied,
        // The owner refused for load and said when to try again: its admission, not
        // the link or the member failing.
        Code::ResourceExhausted => match retry_hint(&s) {
            Some(after) => MemberFailure::Busy(after),
            None => MemberFailure::Failed,
        },
        _ => MemberFailure::Failed,
    };
    if s.metadata().get(crate::error::DATABASE_METADATA).is_some() {
        // The member answered: one of its databases failed, with its own reason.
        return Error::Member {
            member: member.into(),
            failure,
            reason: s.message().to_string(),
        };
    }
    let mut reason = s.message().to_string();
    // Transport failures carry the useful part (connection refused, TLS alert) in
    // the error's sources, not in the message.
    let mut src = std::error::Error::source(&s);
    while let Some(e) = src {
        let t = e.to_string();
        if !reason.contains(&t) {
            reason = format!("{reason}: {t}");
        }
        src = e.source();
    }
    match failure {
        MemberFailure::Unavailable => {
            reason = format!(
                "{endpoint}: {}",
                crate::trust::tls::explain_transport_error(&reason)
            );
        }
        MemberFailure::TimedOut => {
            reason = format!("no complete answer within its budget of {budget:?} ({reason})");
        }
        _ => {}
    }
    Error::Member {
        member: member.into(),
        failure,
        reason,
    }
}

impl MemberClient {
    /// The member's name.
    pub fn name(&self) -> &str {
        match self {
            MemberClient::Local { name, .. } | MemberClient::Remote { name, .. } => name,
        }
    }

    /// The breaker and retry budget of a remote member.
    pub fn health(&self) -> Option<&Arc<MemberHealth>> {
        match self {
            MemberClient::Local { .. } => None,
            MemberClient::Remote { health, .. } => Some(health),
        }
    }

    /// Asks a member whose breaker is open whether it serves again
    /// (`grpc.health.v1`), and records the verdict.
    async fn probe(
        name: &str,
        endpoint: &str,
        channel: &Channel,
        health: &MemberHealth,
        budget: Duration,
    ) -> Result<()> {
        use tonic_health::pb::health_check_response::ServingStatus;
        let mut guard = ProbeGuard(Some(health));
        let mut req = tonic::Request::new(tonic_health::pb::HealthCheckRequest {
            service: "fedgate.v1.Peer".into(),
        });
        req.set_timeout(budget.min(Duration::from_secs(2)));
        let verdict = tonic_health::pb::health_client::HealthClient::new(channel.clone())
            .check(req)
            .await;
        guard.0 = None;
        let why = match verdict {
            Ok(r) if r.get_ref().status == ServingStatus::Serving as i32 => {
                health.breaker.success();
                return Ok(());
            }
            Ok(r) => format!("health probe: status {}", r.get_ref().status),
            Err(s) => format!(
                "health probe failed: {}",
                status_error(name, endpoint, budget, s).reason()
            ),
        };
        health.breaker.failure(Instant::now(), &why);
        Err(Error::Member {
            member: name.into(),
            failure: MemberFailure::Unavailable,
            reason: format!("circuit breaker open; {why}"),
        })
    }

    /// The statements a sub-query would send to the member's databases, as
    /// (database, SQL).
    pub async fn explain(&self, q: SubQuery) -> Result<Vec<(String, String)>> {
        match self {
            MemberClient::Local {
                name,
                engine,
                me,
                audit,
                register,
                tls,
            } => owner::explain(engine, audit, emergency(register, tls), &q.ask(me))
                .await
                .map_err(|e| member_error(name, e)),
            MemberClient::Remote {
                name,
                endpoint,
                client,
                ..
            } => {
                let budget = q.budget;
                let req = q.request();
                let response = client
                    .clone()
                    .explain(req)
                    .await
                    .map_err(|s| status_error(name, endpoint, budget, s))?;
                Ok(response
                    .into_inner()
                    .statements
                    .into_iter()
                    .map(|s| (s.database, s.sql))
                    .collect())
            }
        }
    }

    /// Sends a sub-query and returns the member's batches.
    pub async fn run(&self, q: SubQuery) -> Result<MemberStream> {
        match self {
            MemberClient::Local {
                name,
                engine,
                me,
                audit,
                register,
                tls,
            } => {
                let ask = q.ask(me);
                let stream =
                    owner::answer(engine, audit, emergency(register, tls), ask, q.note.clone())
                        .await
                        .map_err(|e| member_error(name, e))?;
                let name = name.clone();
                let schema = stream.schema();
                let rows = stream.map_err({
                    let name = name.clone();
                    move |e| member_error(&name, Error::from_datafusion(e))
                });
                if !q.receipt {
                    return Ok(rows.boxed());
                }
                // This gateway's own answer, stated and signed like any member's once
                // its record is written (the stream's end).
                let digest = Arc::new(Mutex::new(Some(crate::trust::receipt::RowsDigest::new(
                    &schema,
                ))));
                let digesting = digest.clone();
                let rows = rows.and_then(move |b| {
                    let r = match digesting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                        Some(d) => d.update(&b).map(|()| b),
                        None => Ok(b),
                    };
                    async move { r }
                });
                let (tls, me) = (tls.clone(), me.clone());
                let end = futures::stream::once(async move {
                    let taken = digest.lock().unwrap_or_else(|p| p.into_inner()).take();
                    let Some(d) = taken else {
                        return Ok(None);
                    };
                    let ask = q.ask(&me);
                    let hash = q.note.audit_hash.get().cloned().unwrap_or_default();
                    let st = owner::member_statement(&tls, &name, &ask, d.finish(), &hash)
                        .map_err(|e| member_error(&name, e))?;
                    let _ = q.note.statement.set(st);
                    Ok(None)
                })
                .try_filter_map(|x: Option<RecordBatch>| async move { Ok(x) });
                Ok(rows.chain(end).boxed())
            }
            MemberClient::Remote {
                name,
                endpoint,
                client,
                channel,
                health,
            } => {
                let deadline = Instant::now() + q.budget;
                match health.breaker.admit(Instant::now()) {
                    BreakerVerdict::Go => {}
                    BreakerVerdict::Refuse { reason } => {
                        return Err(Error::Member {
                            member: name.clone(),
                            failure: MemberFailure::Unavailable,
                            reason,
                        });
                    }
                    BreakerVerdict::Probe => {
                        Self::probe(name, endpoint, channel, health, q.budget).await?;
                    }
                }
                let mut q = q;
                let mut attempt = 0;
                loop {
                    q.budget = deadline.saturating_duration_since(Instant::now());
                    let budget = q.budget;
                    match client.clone().execute(q.request()).await {
                        Ok(response) => {
                            return Ok(remote_batches(
                                name.clone(),
                                endpoint.clone(),
                                q,
                                health.clone(),
                                response.into_inner(),
                            ));
                        }
                        Err(s) => {
                            let transport = is_transport_failure(&s);
                            let e = status_error(name, endpoint, budget, s);
                            if let Error::Member {
                                failure: MemberFailure::Busy(after),
                                ..
                            } = &e
                            {
                                // The owner is healthy and said when it expects a
                                // slot: wait that long and ask once more, if the
                                // deadline leaves room for an answer afterwards. No
                                // breaker failure: the link and the member are fine.
                                let left = deadline.saturating_duration_since(Instant::now());
                                if attempt >= health.retries || left < *after + MIN_BUDGET_TO_RETRY
                                {
                                    return Err(e);
                                }
                                attempt += 1;
                                tracing::info!(member = %name, attempt, error = %e, "Asking a busy member again");
                                q.note.retrying(e.reason());
                                tokio::time::sleep(*after).await;
                                continue;
                            }
                            if !transport {
                                return Err(e);
                            }
                            // Nothing arrived: the sub-query is an idempotent read and
                            // may be sent again, within the attempts and the budget.
                            let now = Instant::now();
                            health.breaker.failure(now, &e.reason());
                            let may = health.retry.failure_may_retry();
                            let pause = retry_pause();
                            if attempt >= health.retries
                                || !may
                                || deadline.saturating_duration_since(now)
                                    < pause + MIN_BUDGET_TO_RETRY
                                || !health.breaker.is_closed()
                            {
                                return Err(e);
                            }
                            attempt += 1;
                            tracing::info!(member = %name, attempt, error = %e, "Retrying a sub-query");
                            q.note.retrying(e.reason());
                            tokio::time::sleep(pause).await;
                        }
                    }
                }
            }
        }
    }
}

/// Whether a member's signed statement (in its summary) states the rows received.
fn statement_matches(
    s: &ExecuteSummary,
    received: Option<crate::trust::receipt::RowsDigest>,
) -> std::result::Result<(), String> {
    let Some(received) = received else {
        return Err("the member's answer announced no schema before its end".into());
    };
    let (digest, rows) = received.finish();
    let st = crate::trust::receipt::read_unchecked(&s.statement).map_err(|e| {
        format!("the member's statement of its answer is missing or unreadable ({e})")
    })?;
    if st.rows_sha256 != digest || st.rows != rows {
        return Err(
            "the member's signed statement does not match the rows received (digest or count)"
                .into(),
        );
    }
    Ok(())
}

/// Decodes a member's response stream. The member ends every complete answer with a
/// summary giving its row count; a stream that ends without one, or with a different
/// count, was cut short and is an error, never a silently short answer.
fn remote_batches(
    name: String,
    endpoint: String,
    q: SubQuery,
    health: Arc<MemberHealth>,
    responses: tonic::Streaming<crate::proto::v1::ExecuteResponse>,
) -> MemberStream {
    let SubQuery {
        budget,
        received,
        note,
        receipt,
        ..
    } = q;
    let stated = note.clone();
    let summary: Arc<Mutex<Option<ExecuteSummary>>> = Arc::default();
    let seen = summary.clone();
    let (n1, e1, h1) = (name.clone(), endpoint.clone(), health.clone());
    let chunks = responses
        .map_err(move |s| {
            let transport = is_transport_failure(&s);
            let e = status_error(&n1, &e1, budget, s);
            if transport {
                h1.breaker.failure(Instant::now(), &e.reason());
            }
            e
        })
        .try_filter_map(move |r| {
            let seen = seen.clone();
            let received = received.clone();
            let note = note.clone();
            async move {
                match r.payload {
                    Some(execute_response::Payload::Arrow(c)) => {
                        received.fetch_add(
                            (c.header.len() + c.body.len()) as u64,
                            std::sync::atomic::Ordering::Relaxed,
                        );
                        Ok(Some(c))
                    }
                    Some(execute_response::Payload::Summary(s)) => {
                        note.set_access(s.access.clone());
                        if !s.audit_hash.is_empty() {
                            let _ = note.audit_hash.set(s.audit_hash.clone());
                        }
                        let _ = note.elapsed_us.set(s.elapsed_us);
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        Ok(None)
                    }
                    None => Ok(None),
                }
            }
        });
    // With a receipt asked for, the rows are digested as they arrive (from the schema
    // the member announces first), to check against the member's statement.
    let digest: Arc<Mutex<Option<crate::trust::receipt::RowsDigest>>> = Arc::default();
    let announced = digest.clone();
    let n2 = name.clone();
    let batches = arrow_ipc::decode(chunks)
        .map_err(move |e| member_error(&n2, e))
        .try_filter_map(move |d| {
            let batch = match d {
                Decoded::Batch(b) => Some(b),
                Decoded::Schema(s) => {
                    if receipt {
                        *announced.lock().unwrap_or_else(|p| p.into_inner()) =
                            Some(crate::trust::receipt::RowsDigest::new(&s));
                    }
                    None
                }
            };
            async move { Ok(batch) }
        });
    // Count rows as they pass and check them against the summary at the end.
    let rows = Arc::new(Mutex::new(0u64));
    let counted = rows.clone();
    let digesting = digest.clone();
    let n3 = name.clone();
    let body = batches.and_then(move |b| {
        *counted.lock().unwrap_or_else(|p| p.into_inner()) += b.num_rows() as u64;
        let r = match digesting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            Some(d) => d.update(&b).map(|()| b).map_err(|e| member_error(&n3, e)),
            None => Ok(b),
        };
        async move { r }
    });
    let check = futures::stream::once(async move {
        let got = *rows.lock().unwrap_or_else(|p| p.into_inner());
        let s = summary.lock().unwrap_or_else(|p| p.into_inner()).take();
        let digest = digest.lock().unwrap_or_else(|p| p.into_inner()).take();
        let reason = match s {
            Some(s) if s.rows == got => match receipt.then(|| statement_matches(&s, digest)) {
                None => {
                    health.success();
                    return Ok(None);
                }
                Some(Ok(())) => {
                    health.success();
                    let _ = stated.statement.set(s.statement);
                    return Ok(None);
                }
                // The member's link and gateway work; what it signed is not what it
                // sent. No breaker failure, but no answer either.
                Some(Err(why)) => {
                    return Err(Error::Member {
                        member: name.clone(),
                        failure: MemberFailure::Failed,
                        reason: why,
                    });
                }
            },
            Some(s) => format!("answer cut short: received {got} of {} rows", s.rows),
            None => format!(
                "answer from {endpoint} ended without its summary after {got} rows (connection cut midway)"
            ),
        };
        health.breaker.failure(Instant::now(), &reason);
        Err(Error::Member {
            member: name.clone(),
            failure: MemberFailure::Failed,
            reason,
        })
    })
    .try_filter_map(|x: Option<RecordBatch>| async move { Ok(x) });
    body.chain(check).boxed()
}
