//! The gRPC `Federation` service: the query entry point's answers encoded as
//! `QueryResponse` messages, published services, Explain, Vouch and Describe; and the
//! interceptor that refuses identities the region does not know.

use std::time::Duration;

use futures::StreamExt;
use tonic::{Request, Response, Status};

use super::query::{Ask, FederationService, Outcome, Started, assertion_of};
use super::{Current, known_identity};
use crate::arrow_ipc;
use crate::proto::v1::federation_server::Federation;
use crate::proto::v1::*;
use crate::proto::{ResponseStream, grpc_timeout};
use crate::trust::tls::caller;

impl FederationService {
    /// Streams a started query as gRPC `QueryResponse`s: Arrow IPC chunks, progress
    /// messages if asked, then the summary, then the error if the answer is
    /// incomplete.
    fn respond(&self, started: Started, progress: bool) -> ResponseStream<QueryResponse> {
        // The answer is encoded as tonic polls for the next message, in the request's
        // own task: no task and channel of its own between the query's driver and the
        // connection (each was a wake-up of another task per message). Dropping the
        // stream (the caller went away) drops the batches' receiver, which the
        // driver records as a cancelled query.
        let Started {
            schema,
            batches,
            outcome,
            state,
            started,
        } = started;
        let batches = batches.map(Ok);
        // The first tick is one period away; a query that did not ask for progress
        // never polls the timer, so it is never registered.
        let tick =
            tokio::time::interval_at(tokio::time::Instant::now() + PROGRESS_EVERY, PROGRESS_EVERY);
        let answer = Answer {
            chunks: Box::pin(arrow_ipc::encode(schema, batches)),
            tick,
            progress,
            outcome: Some(outcome),
            failure: None,
            state,
            started,
            observer: self.observer.clone(),
        };
        Box::pin(futures::stream::unfold(answer, |mut a| async move {
            let next = a.next().await?;
            Some((next, a))
        }))
    }
}

/// A started query's answer as gRPC messages, in order: Arrow IPC chunks (with
/// progress messages between them if asked for), the summary, then the error if
/// the answer is incomplete. After an encoding error nothing follows it.
struct Answer {
    chunks: std::pin::Pin<Box<dyn futures::Stream<Item = crate::error::Result<ArrowChunk>> + Send>>,
    tick: tokio::time::Interval,
    progress: bool,
    /// Taken when the chunks end; `None` after that (or after an error).
    outcome: Option<super::query::PendingOutcome>,
    /// The incomplete answer's error, sent after its summary.
    failure: Option<Status>,
    state: std::sync::Arc<crate::coordinator::state::QueryState>,
    started: std::time::Instant,
    observer: std::sync::Arc<crate::ops::observe::Observer>,
}

impl Answer {
    async fn next(&mut self) -> Option<std::result::Result<QueryResponse, Status>> {
        if let Some(e) = self.failure.take() {
            return Some(Err(e));
        }
        let outcome = self.outcome.take()?;
        // The next chunk or progress message; past the last chunk, the outcome.
        tokio::select! {
            next = self.chunks.next() => match next {
                Some(Ok(c)) => {
                    self.outcome = Some(outcome);
                    self.observer.bytes_sent("client", (c.header.len() + c.body.len()) as u64);
                    return Some(Ok(QueryResponse { payload: Some(query_response::Payload::Arrow(c)) }));
                }
                // Nothing follows an encoding error (the outcome stays taken).
                Some(Err(e)) => return Some(Err(e.to_status())),
                None => {}
            },
            _ = self.tick.tick(), if self.progress => {
                self.outcome = Some(outcome);
                return Some(Ok(QueryResponse {
                    payload: Some(query_response::Payload::Progress(Progress {
                        elapsed_us: self.started.elapsed().as_micros() as u64,
                        members: self.state.progress(),
                    })),
                }));
            }
        }
        let Outcome { summary, failure } = outcome.wait().await;
        let failure = failure.map(|e| e.to_status());
        match summary {
            Some(s) => {
                self.failure = failure;
                Some(Ok(QueryResponse {
                    payload: Some(query_response::Payload::Summary(s)),
                }))
            }
            None => failure.map(Err),
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
            incident: (!q.incident.is_empty()).then(|| std::sync::Arc::new(q.incident)),
            receipt: q.receipt,
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

    async fn declare(
        &self,
        req: Request<DeclareRequest>,
    ) -> std::result::Result<Response<DeclareResponse>, Status> {
        let who = caller(&req)?;
        FederationService::declare(self, &who, &req.get_ref().declaration)
            .await
            .map(Response::new)
            .map_err(|e| e.to_status())
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
pub fn identity_check(current: Current) -> impl tonic::service::Interceptor + Clone {
    move |req: Request<()>| -> std::result::Result<Request<()>, Status> {
        let p = caller(&req)?;
        let g = current.load();
        known_identity(&g.config().region, &p).map_err(|e| e.to_status())?;
        if let Some(info) = req.extensions().get::<crate::trust::tls::PeerInfo>() {
            super::not_revoked(&g, &p, &info.serial).map_err(|e| e.to_status())?;
        }
        Ok(req)
    }
}

/// `Federation` under the configuration in force when each call arrives.
#[derive(Clone)]
pub struct LiveFederation(pub Current);

#[tonic::async_trait]
impl Federation for LiveFederation {
    type QueryStream = ResponseStream<QueryResponse>;
    type InvokeStream = ResponseStream<QueryResponse>;

    async fn invoke(
        &self,
        req: Request<InvokeRequest>,
    ) -> std::result::Result<Response<Self::InvokeStream>, Status> {
        self.0.load().invoke(req).await
    }

    async fn query(
        &self,
        req: Request<QueryRequest>,
    ) -> std::result::Result<Response<Self::QueryStream>, Status> {
        self.0.load().query(req).await
    }

    async fn explain(
        &self,
        req: Request<ExplainRequest>,
    ) -> std::result::Result<Response<ExplainResponse>, Status> {
        self.0.load().explain(req).await
    }

    async fn describe(
        &self,
        req: Request<DescribeRequest>,
    ) -> std::result::Result<Response<DescribeResponse>, Status> {
        self.0.load().describe(req).await
    }

    async fn vouch(
        &self,
        req: Request<VouchRequest>,
    ) -> std::result::Result<Response<VouchResponse>, Status> {
        Federation::vouch(&self.0.load(), req).await
    }

    async fn declare(
        &self,
        req: Request<DeclareRequest>,
    ) -> std::result::Result<Response<DeclareResponse>, Status> {
        Federation::declare(&self.0.load(), req).await
    }
}
