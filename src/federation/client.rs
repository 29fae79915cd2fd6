//! How the coordinator reaches a member: in process for itself, over mutual TLS with
//! `Peer.Execute` for everyone else. Both paths end in [`crate::owner::answer`] at the
//! data owner, so the owner's policy and audit apply whichever way the sub-query
//! arrives.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use datafusion::arrow::record_batch::RecordBatch;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use tonic::transport::Channel;

use crate::arrow_ipc::{self, Decoded};
use crate::audit::AuditLog;
use crate::error::{Error, MemberFailure, Result};
use crate::identity::Principal;
use crate::member::MemberEngine;
use crate::owner::{self, Note};
use crate::proto::v1::peer_client::PeerClient;
use crate::proto::v1::{ExecuteRequest, ExecuteSummary, execute_response};

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
    /// Filled by the member: how it shared the data and its audit record's hash.
    pub note: Arc<Note>,
}

impl SubQuery {
    /// The sub-query as the data owner sees it when it arrives through `via`.
    fn ask<'a>(&'a self, via: &'a Principal) -> owner::Ask<'a> {
        owner::Ask {
            via,
            origin: &self.origin,
            purpose: self.purpose.as_deref(),
            query_id: &self.query_id,
            sql: &self.sql,
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
        });
        req.set_timeout(self.budget);
        req
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
    },
    /// Another gateway.
    Remote {
        /// Member name.
        name: String,
        /// Its endpoint, for messages.
        endpoint: String,
        /// The lazily connected channel.
        client: PeerClient<Channel>,
    },
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
        Code::Unavailable => MemberFailure::Unavailable,
        Code::DeadlineExceeded | Code::Cancelled => MemberFailure::TimedOut,
        Code::PermissionDenied | Code::Unauthenticated => MemberFailure::Denied,
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
                crate::tls::explain_transport_error(&reason)
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

    /// The statements a sub-query would send to the member's databases, as
    /// (database, SQL).
    pub async fn explain(&self, q: SubQuery) -> Result<Vec<(String, String)>> {
        match self {
            MemberClient::Local {
                name, engine, me, ..
            } => owner::explain(engine, &q.ask(me))
                .await
                .map_err(|e| member_error(name, e)),
            MemberClient::Remote {
                name,
                endpoint,
                client,
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
            } => {
                let ask = q.ask(me);
                let stream = owner::answer(engine, audit, ask, q.note.clone())
                    .await
                    .map_err(|e| member_error(name, e))?;
                let name = name.clone();
                Ok(stream
                    .map_err(move |e| member_error(&name, Error::from_datafusion(e)))
                    .boxed())
            }
            MemberClient::Remote {
                name,
                endpoint,
                client,
            } => {
                let budget = q.budget;
                let req = q.request();
                let response = client
                    .clone()
                    .execute(req)
                    .await
                    .map_err(|s| status_error(name, endpoint, budget, s))?;
                Ok(remote_batches(
                    name.clone(),
                    endpoint.clone(),
                    budget,
                    q.received,
                    q.note,
                    response.into_inner(),
                ))
            }
        }
    }
}

/// Decodes a member's response stream. The member ends every complete answer with a
/// summary giving its row count; a stream that ends without one, or with a different
/// count, was cut short and is an error, never a silently short answer.
fn remote_batches(
    name: String,
    endpoint: String,
    budget: Duration,
    received: Arc<std::sync::atomic::AtomicU64>,
    note: Arc<Note>,
    responses: tonic::Streaming<crate::proto::v1::ExecuteResponse>,
) -> MemberStream {
    let summary: Arc<Mutex<Option<ExecuteSummary>>> = Arc::default();
    let seen = summary.clone();
    let (n1, e1) = (name.clone(), endpoint.clone());
    let chunks = responses
        .map_err(move |s| status_error(&n1, &e1, budget, s))
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
                        *seen.lock().unwrap_or_else(|p| p.into_inner()) = Some(s);
                        Ok(None)
                    }
                    None => Ok(None),
                }
            }
        });
    let n2 = name.clone();
    let batches = arrow_ipc::decode(chunks)
        .map_err(move |e| member_error(&n2, e))
        .try_filter_map(|d| async move {
            Ok(match d {
                Decoded::Batch(b) => Some(b),
                Decoded::Schema(_) => None,
            })
        });
    // Count rows as they pass and check them against the summary at the end.
    let rows = Arc::new(Mutex::new(0u64));
    let counted = rows.clone();
    let body = batches.inspect_ok(move |b| {
        *counted.lock().unwrap_or_else(|p| p.into_inner()) += b.num_rows() as u64;
    });
    let check = futures::stream::once(async move {
        let got = *rows.lock().unwrap_or_else(|p| p.into_inner());
        let s = summary.lock().unwrap_or_else(|p| p.into_inner()).take();
        match s {
            Some(s) if s.rows == got => Ok(None),
            Some(s) => Err(Error::Member {
                member: name.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer cut short: received {got} of {} rows", s.rows),
            }),
            None => Err(Error::Member {
                member: name.clone(),
                failure: MemberFailure::Failed,
                reason: format!("answer from {endpoint} ended without its summary after {got} rows (connection cut midway)"),
            }),
        }
    })
    .try_filter_map(|x: Option<RecordBatch>| async move { Ok(x) });
    body.chain(check).boxed()
}
