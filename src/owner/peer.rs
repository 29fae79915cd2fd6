//! `Peer`, the gateway-to-gateway service at the data owner: who is calling and for
//! whom (`PeerService::admit`: a member gateway, speaking for its own identity or with
//! the origin's gateway's assertion, on a loop-free path), then the owner's path
//! ([`crate::owner::answer`], [`crate::owner::explain`]) under the member's limits, and
//! `Catalog` (what an origin may read here).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::arrow_ipc::counted_chunks;
use crate::config::MemberConfig;
use crate::error::{Error, Result};
use crate::ops::audit::AuditLog;
use crate::owner;
use crate::owner::member::MemberEngine;
use crate::proto::v1::peer_server::Peer;
use crate::proto::v1::*;
use crate::proto::{ResponseStream, grpc_timeout};
use crate::trust::identity::Principal;
use crate::trust::tls::{TlsMaterial, caller};

/// The gateway-to-gateway service at the data owner.
pub struct PeerService {
    pub(crate) config: Arc<MemberConfig>,
    pub(crate) engine: Option<Arc<MemberEngine>>,
    /// Sub-query slots by the class of each sub-query's origin
    /// (`[[subquery_admission]]`), kept across reloads while the limits are unchanged.
    pub(crate) admission: Arc<crate::ops::admission::Admission>,
    pub(crate) audit: Arc<AuditLog>,
    pub(crate) observer: Arc<crate::ops::observe::Observer>,
    /// The region CA this member checks origin assertions' signers against.
    pub(crate) tls: Arc<TlsMaterial>,
    /// Origin assertions seen, each bound to the query it was first used for; kept
    /// across reloads.
    pub(crate) nonces: Arc<crate::trust::assertion::Nonces>,
    /// The incident declarations this member holds; kept across reloads.
    pub(crate) incidents: Arc<owner::incidents::Register>,
}

/// A sub-query's origin, once the owner accepts that the calling gateway speaks for
/// it.
struct Admitted {
    origin: Principal,
    /// The datasets the origin's assertion covers, when one was needed.
    covered: Option<std::collections::BTreeSet<String>>,
}

impl PeerService {
    /// Checks the calling gateway, the origin, who speaks for it, and the hop path.
    fn admit(&self, via: &Principal, q: &ExecuteRequest) -> Result<Admitted> {
        let region = &self.config.region;
        match region.member_by_principal(via) {
            Some(m) if m.endpoint.is_some() => {}
            _ => {
                return Err(Error::PermissionDenied(format!(
                    "{via} is not a member gateway of region {}; only member gateways may call Peer",
                    region.name
                )));
            }
        }
        let origin = Principal::parse(&q.origin).map_err(|e| Error::InvalidQuery(e.to_string()))?;
        if region.member_by_principal(&origin).is_none() {
            return Err(Error::PermissionDenied(format!(
                "origin {origin} is not a member or known client of region {}",
                region.name
            )));
        }
        if q.hops == 0 || q.hops as usize != q.path.len() {
            return Err(Error::InvalidQuery(format!(
                "hop count {} does not match the path of {} gateways",
                q.hops,
                q.path.len()
            )));
        }
        if q.hops > self.config.limits.max_hops {
            return Err(Error::InvalidQuery(format!(
                "sub-query has taken {} hops, more than this member's limit of {}",
                q.hops, self.config.limits.max_hops
            )));
        }
        if q.path
            .iter()
            .any(|p| p == &self.config.member.principal.uri())
        {
            return Err(Error::InvalidQuery(format!(
                "sub-query has already passed through {} (loop in path {:?})",
                self.config.member.name, q.path
            )));
        }
        // An organization's own gateway speaks for its identity; any other gateway
        // needs the origin's gateway's signed word for this query.
        if &origin == via {
            return Ok(Admitted {
                origin,
                covered: None,
            });
        }
        if q.origin_assertion.is_empty() {
            return Err(Error::PermissionDenied(format!(
                "{via} forwards for {origin} without an origin assertion; a gateway speaks \
                 only for its own identity unless the origin's gateway vouches for the query \
                 (Federation.Vouch), so ask through {origin}'s own gateway"
            )));
        }
        let now = std::time::SystemTime::now();
        let v = crate::trust::assertion::verify(
            &self.tls,
            &|p| region.has_gateway(p),
            &q.origin_assertion,
            now,
        )?;
        v.covers(&crate::trust::assertion::Expected {
            origin: &origin,
            via,
            audience: Some(&self.config.member.principal),
            purpose: &q.purpose,
            incident_sha256: &crate::trust::assertion::incident_digest(Some(&q.incident)),
            query_sha256: None,
            now,
        })?;
        self.nonces.bind(&v, &q.query_id)?;
        Ok(Admitted {
            origin,
            covered: Some(v.datasets()),
        })
    }
}

/// Records a sub-query refused before the engine answered it and returns the status
/// for the caller (or the audit failure, if the record could not be written).
fn record_refusal(audit: &AuditLog, ask: &owner::SubQueryAsk, e: Error) -> Status {
    tracing::warn!(query_id = %ask.query_id, via = %ask.via, error = %e, "Sub-query refused");
    match owner::refuse(audit, ask, Vec::new(), None, &e) {
        Ok(()) => e.to_status(),
        Err(a) => a.to_status(),
    }
}

#[tonic::async_trait]
impl Peer for PeerService {
    type ExecuteStream = ResponseStream<ExecuteResponse>;

    async fn execute(
        &self,
        req: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<Self::ExecuteStream>, Status> {
        let via = caller(&req)?;
        let grpc = grpc_timeout(&req);
        // The data owner's part of the caller's trace.
        let span = tracing::info_span!(
            "execute",
            member = %self.config.member.name,
            query_id = %req.get_ref().query_id,
            %via,
        );
        crate::ops::telemetry::continue_trace(&span, req.metadata());
        let q = req.into_inner();
        let answer = self
            .execute_traced(via, grpc, q, span.clone())
            .instrument(span)
            .await;
        self.observer.peer_subquery(if answer.is_ok() {
            "answered"
        } else {
            "refused"
        });
        answer
    }

    async fn explain(
        &self,
        req: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<PeerExplainResponse>, Status> {
        self.explain_impl(req).await
    }

    async fn catalog(
        &self,
        req: Request<CatalogRequest>,
    ) -> std::result::Result<Response<CatalogResponse>, Status> {
        self.catalog_impl(req).await
    }

    async fn declare(
        &self,
        req: Request<DeclareRequest>,
    ) -> std::result::Result<Response<PeerDeclareResponse>, Status> {
        self.declare_impl(req).await
    }
}

impl PeerService {
    async fn execute_traced(
        &self,
        via: Principal,
        grpc: Option<Duration>,
        q: ExecuteRequest,
        span: tracing::Span,
    ) -> std::result::Result<Response<ResponseStream<ExecuteResponse>>, Status> {
        let purpose = (!q.purpose.is_empty()).then_some(q.purpose.as_str());
        let engine = self.engine.clone().ok_or_else(|| {
            Error::InvalidQuery(format!(
                "member {} serves no datasets",
                self.config.member.name
            ))
            .to_status()
        })?;
        // A refusal before the engine runs is on the record too; the origin is the
        // claimed one when it does not parse.
        let refused = |origin: &Principal, e: Error| -> Status {
            let ask = owner::SubQueryAsk {
                via: &via,
                origin,
                purpose,
                query_id: &q.query_id,
                sql: &q.sql,
                covered: None,
                incident: (!q.incident.is_empty()).then_some(q.incident.as_slice()),
            };
            record_refusal(&self.audit, &ask, e)
        };
        let Admitted { origin, covered } = match self.admit(&via, &q) {
            Ok(a) => a,
            Err(e) => {
                let claimed = Principal::parse(&q.origin).unwrap_or_else(|_| via.clone());
                return Err(refused(&claimed, e));
            }
        };
        let budget = [
            (q.budget_ms > 0).then(|| Duration::from_millis(q.budget_ms)),
            grpc,
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or(self.config.limits.default_timeout)
        .min(self.config.limits.max_timeout);
        // Admission by the origin's class, not by the calling gateway: a city's
        // analysts asking through any gateway share the city class's slots here, and
        // a county's sub-queries find the share reserved for counties. The refusal is
        // the owner's own, with a hint of when to retry, and is on the record.
        let slot = match self
            .admission
            .try_admit(origin.kind(), &origin.uri(), Instant::now())
        {
            Ok(t) => t,
            Err(r) => {
                return Err(refused(
                    &origin,
                    Error::Busy {
                        reason: r.reason,
                        retry_after: r.retry_after,
                    },
                ));
            }
        };
        let started = Instant::now();
        tracing::info!(query_id = %q.query_id, %via, %origin, sql = %q.sql, "Sub-query");
        // The whole sub-query (planning, the engine's own tasks, its databases) runs
        // on the lane of the origin's class; the call's outcome comes back here, so
        // a refusal or a planning error is still the call's status.
        let lane = crate::owner::lanes::handle(self.admission.low_priority(origin.kind()));
        let (ready, planned) = tokio::sync::oneshot::channel::<std::result::Result<(), Status>>();
        let (tx, rx) =
            tokio::sync::mpsc::channel::<std::result::Result<ExecuteResponse, Status>>(8);
        // The answer's last message (its summary, or why it ends early) goes after the
        // chunks without waiting for room: the sub-query never waits on its caller for
        // it, and a caller that reads the chunks still in the channel then reads it.
        let (last_tx, last_rx) =
            tokio::sync::oneshot::channel::<std::result::Result<ExecuteResponse, Status>>();
        // The budget counts from the sub-query's arrival, planning included.
        let until = tokio::time::Instant::from_std(started) + budget;
        let (audit, version, observer) = (
            self.audit.clone(),
            self.config.version.clone(),
            self.observer.clone(),
        );
        let (register, tls) = (self.incidents.clone(), self.tls.clone());
        let member = self.config.member.name.clone();
        lane.spawn(async move {
            let _slot = slot;
            // Where the sub-query's time goes, from its arrival (reported at debug).
            let mut phases = crate::owner::session::Phases::since(started);
            phases.mark("lane");
            let purpose = (!q.purpose.is_empty()).then_some(q.purpose.as_str());
            let ask = owner::SubQueryAsk {
                via: &via,
                origin: &origin,
                purpose,
                query_id: &q.query_id,
                sql: &q.sql,
                covered: covered.as_ref(),
                incident: (!q.incident.is_empty()).then_some(q.incident.as_slice()),
            };
            let note = Arc::new(owner::Note::default());
            let emergency = owner::Emergency {
                register: &register,
                tls: Some(&tls),
            };
            let answer = owner::answer(&engine, &audit, emergency, ask, note.clone());
            let stream = match tokio::time::timeout_at(until, answer).await {
                Ok(Ok(a)) => a,
                Ok(Err(e)) => {
                    // Already recorded by `owner::answer`.
                    tracing::warn!(query_id = %q.query_id, error = %e, "Sub-query refused");
                    let _ = ready.send(Err(e.to_status()));
                    return;
                }
                Err(_) => {
                    let ask = owner::SubQueryAsk { covered: None, ..ask };
                    let status = record_refusal(&audit, &ask, Error::DeadlineExceeded(budget));
                    let _ = ready.send(Err(status));
                    return;
                }
            };
            phases.mark("answer");
            if ready.send(Ok(())).is_err() {
                // The caller is gone; dropping the stream records the sub-query as
                // cancelled.
                return;
            }
            // With a receipt asked for, the rows are digested as they leave.
            let digest = Arc::new(std::sync::Mutex::new(
                q.receipt
                    .then(|| crate::trust::receipt::RowsDigest::new(&stream.schema())),
            ));
            let digesting = digest.clone();
            let stream: datafusion::execution::SendableRecordBatchStream = if q.receipt {
                let schema = stream.schema();
                Box::pin(datafusion::physical_plan::stream::RecordBatchStreamAdapter::new(
                    schema,
                    stream.map(move |b| {
                        let b = b?;
                        if let Some(d) = digesting.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                            d.update(&b).map_err(|e| e.into_datafusion())?;
                        }
                        Ok(b)
                    }),
                ))
            } else {
                stream
            };
            let (chunks, rows) = counted_chunks(stream);
            tokio::pin!(chunks);
            let deadline = tokio::time::sleep_until(until);
            tokio::pin!(deadline);
            // Every chunk's send races the sub-query's deadline: a caller that stops
            // reading and keeps its stream open would otherwise hold the sub-query, its
            // slot and its databases' work for as long as it liked. Past the deadline
            // the stream is dropped (which records the sub-query as cancelled) and the
            // caller is told why after the chunks it has not read.
            let late = || Err(Error::DeadlineExceeded(budget).to_status());
            let mut first = true;
            loop {
                tokio::select! {
                    next = chunks.next() => match next {
                        Some(Ok(c)) => {
                            if std::mem::take(&mut first) {
                                phases.mark("first");
                            }
                            observer.bytes_sent("peer", (c.header.len() + c.body.len()) as u64);
                            let m = Ok(ExecuteResponse { payload: Some(execute_response::Payload::Arrow(c)) });
                            match send_by(&tx, m, deadline.as_mut()).await {
                                Sent::Yes => {}
                                Sent::Gone => return,
                                Sent::Late => { let _ = last_tx.send(late()); return; }
                            }
                        }
                        Some(Err(e)) => { let _ = last_tx.send(Err(e.to_status())); return; }
                        None => break,
                    },
                    _ = &mut deadline => { let _ = last_tx.send(late()); return; }
                }
            }
            // The rows' end includes the audit record, written when they end.
            phases.mark("rest");
            let audit_hash = note.audit_hash.get().cloned().unwrap_or_default();
            let taken = digest.lock().unwrap_or_else(|p| p.into_inner()).take();
            let statement = match taken {
                None => Vec::new(),
                Some(d) => {
                    let ask = owner::SubQueryAsk {
                        via: &via,
                        origin: &origin,
                        purpose: (!q.purpose.is_empty()).then_some(q.purpose.as_str()),
                        query_id: &q.query_id,
                        sql: &q.sql,
                        covered: None,
                        incident: (!q.incident.is_empty()).then_some(q.incident.as_slice()),
                    };
                    match owner::member_statement(&tls, &member, &ask, d.finish(), &audit_hash) {
                        Ok(s) => s,
                        Err(e) => {
                            let _ = last_tx.send(Err(e.to_status()));
                            return;
                        }
                    }
                }
            };
            let summary = ExecuteSummary {
                rows: rows.load(std::sync::atomic::Ordering::Relaxed),
                elapsed_us: started.elapsed().as_micros() as u64,
                config_version: version,
                access: note.access(),
                audit_hash,
                statement,
            };
            let m = Ok(ExecuteResponse {
                payload: Some(execute_response::Payload::Summary(summary)),
            });
            let _ = last_tx.send(m);
            phases.mark("summary");
            phases.report_sub_query();
        }.instrument(span));
        match planned.await {
            Ok(Ok(())) => Ok(Response::new(Box::pin(
                tokio_stream::wrappers::ReceiverStream::new(rx).chain(
                    futures::stream::once(last_rx).filter_map(|m| std::future::ready(m.ok())),
                ),
            ))),
            Ok(Err(status)) => Err(status),
            Err(_) => Err(Error::Internal(
                "the sub-query's task ended before it was planned".into(),
            )
            .to_status()),
        }
    }

    async fn explain_impl(
        &self,
        req: Request<ExecuteRequest>,
    ) -> std::result::Result<Response<PeerExplainResponse>, Status> {
        let via = caller(&req)?;
        let q = req.into_inner();
        let engine = self.engine.clone().ok_or_else(|| {
            Error::InvalidQuery(format!(
                "member {} serves no datasets",
                self.config.member.name
            ))
            .to_status()
        })?;
        let purpose = (!q.purpose.is_empty()).then_some(q.purpose.as_str());
        let Admitted { origin, covered } = match self.admit(&via, &q) {
            Ok(a) => a,
            Err(e) => {
                // A refused explanation is on the record too, under the claimed origin.
                let claimed = Principal::parse(&q.origin).unwrap_or_else(|_| via.clone());
                let ask = owner::SubQueryAsk {
                    via: &via,
                    origin: &claimed,
                    purpose,
                    query_id: &q.query_id,
                    sql: &q.sql,
                    covered: None,
                    incident: (!q.incident.is_empty()).then_some(q.incident.as_slice()),
                };
                tracing::warn!(query_id = %q.query_id, %via, error = %e, "Explain refused");
                return Err(match owner::refuse_explain(&self.audit, &ask, &e) {
                    Ok(()) => e.to_status(),
                    Err(a) => a.to_status(),
                });
            }
        };
        let ask = owner::SubQueryAsk {
            via: &via,
            origin: &origin,
            purpose,
            query_id: &q.query_id,
            sql: &q.sql,
            covered: covered.as_ref(),
            incident: (!q.incident.is_empty()).then_some(q.incident.as_slice()),
        };
        let emergency = owner::Emergency {
            register: &self.incidents,
            tls: Some(&self.tls),
        };
        let statements = owner::explain(&engine, &self.audit, emergency, &ask)
            .await
            .map_err(|e| e.to_status())?
            .into_iter()
            .map(|(database, sql)| DatabaseStatement {
                member: self.config.member.name.clone(),
                database,
                sql,
                error: String::new(),
            })
            .collect();
        Ok(Response::new(PeerExplainResponse { statements }))
    }

    /// Takes a declaration delivered by a member gateway into this member's register.
    async fn declare_impl(
        &self,
        req: Request<DeclareRequest>,
    ) -> std::result::Result<Response<PeerDeclareResponse>, Status> {
        let via = caller(&req)?;
        if self
            .config
            .region
            .member_by_principal(&via)
            .is_none_or(|m| m.endpoint.is_none())
        {
            return Err(Error::PermissionDenied(format!(
                "{via} is not a member gateway; only member gateways may call Peer"
            ))
            .to_status());
        }
        let outcome = owner::incidents::deliver(
            &self.incidents,
            &self.tls,
            &self.config.access,
            &self.audit,
            &via,
            &req.get_ref().declaration,
        )
        .map_err(|e| e.to_status())?;
        tracing::info!(%via, %outcome, "Incident declaration delivered");
        Ok(Response::new(PeerDeclareResponse { outcome }))
    }

    async fn catalog_impl(
        &self,
        req: Request<CatalogRequest>,
    ) -> std::result::Result<Response<CatalogResponse>, Status> {
        let via = caller(&req)?;
        if self.config.region.member_by_principal(&via).is_none() {
            return Err(
                Error::PermissionDenied(format!("{via} is not a region member")).to_status(),
            );
        }
        let q = req.into_inner();
        // A gateway describes access for the caller it forwards for; anyone else
        // (a client) may only ask about itself.
        let origin = if q.origin.is_empty() {
            via.clone()
        } else {
            let o = Principal::parse(&q.origin)
                .map_err(|e| Error::InvalidQuery(e.to_string()).to_status())?;
            let is_gateway = self
                .config
                .region
                .member_by_principal(&via)
                .is_some_and(|m| m.endpoint.is_some());
            if o != via && !is_gateway {
                return Err(Error::PermissionDenied(format!(
                    "{via} may ask only about its own access"
                ))
                .to_status());
            }
            o
        };
        let purpose = (!q.purpose.is_empty()).then_some(q.purpose.as_str());
        Ok(Response::new(CatalogResponse {
            member: self.config.member.name.clone(),
            config_version: self.config.version.clone(),
            datasets: self.config.member.serves.iter().cloned().collect(),
            access: self
                .engine
                .as_ref()
                .map(|e| e.describe_access(&origin, purpose))
                .unwrap_or_default(),
        }))
    }
}

/// How a message handed to a caller's channel fared.
pub(crate) enum Sent {
    /// It is in the channel.
    Yes,
    /// The caller went away.
    Gone,
    /// The deadline passed while the channel was full.
    Late,
}

/// Sends `m` to a caller's channel, unless `deadline` passes first: a caller that stops
/// reading must not hold a query past its deadline. The owner's sub-queries and the
/// coordinator's query driver (`frontend::query`) hand over their answers through it.
pub(crate) async fn send_by<T>(
    tx: &tokio::sync::mpsc::Sender<T>,
    m: T,
    deadline: std::pin::Pin<&mut tokio::time::Sleep>,
) -> Sent {
    tokio::select! {
        sent = tx.send(m) => if sent.is_ok() { Sent::Yes } else { Sent::Gone },
        _ = deadline => Sent::Late,
    }
}
