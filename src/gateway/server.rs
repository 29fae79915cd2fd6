//! The one builder that assembles a gateway from its front ends and the data owner's
//! service, and runs it.
//!
//! Stack, outermost first: TLS edge ([`crate::trust::tls::incoming`], principal) -> identity
//! check (the principal must be a region member or known client) -> services:
//! `Federation` and Flight SQL (the query entry point, then the coordinator), `Peer`
//! (the data owner's engine), `grpc.health.v1.Health` and reflection; and the HTTP port.
//!
//! Life: the probe port is served first, answering "starting" while the first
//! configuration (sources included) is built; then every port is served and the gateway
//! is ready. [`Gateway::begin_drain`] (SIGTERM) makes `/readyz` and gRPC health say
//! "not serving" while everything is still served; [`Gateway::shutdown`] then stops
//! accepting and waits for the queries in flight.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::oneshot;

use super::generation::{Generation, LivePeer};
use super::reload::{RELOAD_POLL, ReloadOutcome, Reloader, hangup};
use crate::config::MemberConfig;
use crate::error::{Error, Result};
use crate::frontend::Current;
use crate::frontend::grpc::{LiveFederation, identity_check};
use crate::ops::audit::AuditLog;
use crate::ops::lifecycle::Lifecycle;
use crate::proto::v1::federation_server::FederationServer;
use crate::proto::v1::peer_server::PeerServer;

/// How often recorded latencies are folded into the metrics' histogram buckets.
const METRICS_UPKEEP: Duration = Duration::from_secs(5);

/// A running gateway.
pub struct Gateway {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// The HTTP port's address, if it has one.
    pub http_addr: Option<SocketAddr>,
    /// The PostgreSQL port's address, if it has one.
    pub postgres_addr: Option<SocketAddr>,
    /// The probe port's address, if it has one.
    pub probes_addr: Option<SocketAddr>,
    /// This gateway's member name.
    pub member: String,
    lifecycle: Arc<Lifecycle>,
    health: tonic_health::server::HealthReporter,
    /// `[lifecycle] drain`.
    drain: Duration,
    /// The longest a query may run here: how long [`Gateway::shutdown`] waits for the
    /// queries in flight at most.
    longest_query: Duration,
    probes_task: Option<tokio::task::JoinHandle<()>>,
    exporter: Option<tokio::task::JoinHandle<()>>,
    shutdown: Option<oneshot::Sender<()>>,
    http_stop: tokio::sync::watch::Sender<bool>,
    http_task: Option<tokio::task::JoinHandle<()>>,
    postgres_task: Option<tokio::task::JoinHandle<()>>,
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
        let lifecycle = Arc::new(Lifecycle::default());
        // Every port but the probes' stops when this says so (or when it is dropped,
        // should the start fail below).
        let (http_stop, http_stopped) = tokio::sync::watch::channel(false);
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        // The probes come first, so that an orchestrator sees "starting" while the
        // sources load, not a refused connection it would take for a dead process.
        let (probes_addr, probes_task) = match config.lifecycle.probes {
            Some(a) => {
                let l = TcpListener::bind(a)
                    .await
                    .map_err(|e| Error::Config(format!("lifecycle.probes {a}: {e}")))?;
                let addr = l.local_addr().map_err(|e| Error::Internal(e.to_string()))?;
                let task = tokio::spawn(crate::frontend::http::serve_probes(
                    l,
                    lifecycle.clone(),
                    stopped(http_stopped.clone()),
                ));
                (Some(addr), Some(task))
            }
            None => (None, None),
        };
        let audit = Arc::new(AuditLog::open(&config.audit_path)?);
        // Off every query's path: the exporter reads the log back from the file.
        let exporter = match &config.audit_export {
            Some(sink) => Some(tokio::spawn(
                crate::ops::audit::export::Exporter::new(
                    audit.clone(),
                    sink,
                    &config.member.name,
                    &config.member.principal.uri(),
                )?
                .run(),
            )),
            None => None,
        };
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
        let postgres_listener = match &config.postgres {
            Some(p) => Some(
                TcpListener::bind(p.listen)
                    .await
                    .map_err(|e| Error::Config(format!("postgres.listen {}: {e}", p.listen)))?,
            ),
            None => None,
        };
        let postgres_addr = match &postgres_listener {
            Some(l) => Some(l.local_addr().map_err(|e| Error::Internal(e.to_string()))?),
            None => None,
        };
        let tls = Arc::new(ArcSwap::from(first.server_tls.clone()));
        let http_tls = Arc::new(ArcSwap::from(first.http_tls.clone()));
        let postgres_tls = Arc::new(ArcSwap::from(first.postgres_tls.clone()));
        let current = Arc::new(ArcSwap::from_pointee(first));
        let front = {
            let current = current.clone();
            Current::new(move || current.load().federation.clone())
        };
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
        let router = tonic::transport::Server::builder()
            // A connection is asked to end (GOAWAY) at this age, so that a peer whose
            // certificate has since been revoked must handshake again; its calls in
            // flight finish (each within its deadline). No grace period is set: with
            // one, tonic skips the GOAWAY and closes the connection only when age and
            // grace have both passed, cutting whatever is in flight then.
            .max_connection_age(config.lifecycle.max_connection_age)
            .layer(tonic::service::InterceptorLayer::new(identity_check(
                front.clone(),
            )))
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(
                FederationServer::new(LiveFederation(front.clone()))
                    .max_decoding_message_size(16 * 1024 * 1024),
            )
            .add_service(
                PeerServer::new(LivePeer(current.clone()))
                    .max_decoding_message_size(16 * 1024 * 1024),
            )
            .add_service(
                arrow_flight::flight_service_server::FlightServiceServer::new(
                    crate::frontend::flight_sql::FlightSql::new(front.clone()),
                ),
            );
        let task = tokio::spawn(router.serve_with_incoming_shutdown(incoming, async {
            let _ = rx.await;
        }));
        let postgres_task = postgres_listener
            .zip(config.postgres.as_ref())
            .map(|(l, p)| {
                tokio::spawn(crate::frontend::postgres::serve(
                    l,
                    postgres_tls.clone(),
                    crate::frontend::postgres::Door::new(front.clone(), p.max_connections),
                    stopped(http_stopped.clone()),
                ))
            });
        let http_task = match (http_listener, &config.http) {
            (Some(l), Some(h)) => {
                let routes =
                    crate::frontend::http::router(front.clone(), audit.clone(), lifecycle.clone());
                Some(tokio::spawn(crate::frontend::http::serve(
                    l,
                    routes,
                    h.tls.then(|| http_tls.clone()),
                    config.member.principal.clone(),
                    stopped(http_stopped.clone()),
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
            postgres_tls,
            audit,
            observer,
            busy: tokio::sync::Mutex::new(()),
            retired: std::sync::Mutex::new(Vec::new()),
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
        lifecycle.ready();
        tracing::info!(member = %config.member.name, %addr, http = ?http_addr, postgres = ?postgres_addr, probes = ?probes_addr, version = %config.version, "Gateway serving");
        Ok(Gateway {
            addr,
            http_addr,
            postgres_addr,
            probes_addr,
            member: config.member.name.clone(),
            lifecycle,
            health,
            drain: config.lifecycle.drain,
            longest_query: config.limits.max_timeout,
            probes_task,
            exporter,
            shutdown: Some(tx),
            http_stop,
            http_task,
            postgres_task,
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

    /// The slots of both doors now (as the board shows them).
    pub fn admission(&self) -> [(&'static str, crate::ops::admission::Load); 2] {
        self.reloader.current.load().federation.admission()
    }

    /// The routes of the HTTP port, without its listener (identity comes from a
    /// [`crate::frontend::http::Caller`] extension): for driving requests in process.
    pub fn http_routes(&self) -> axum::Router {
        let current = self.reloader.current.clone();
        crate::frontend::http::router(
            Current::new(move || current.load().federation.clone()),
            self.reloader.audit.clone(),
            self.lifecycle.clone(),
        )
    }

    /// `[lifecycle] drain`: how long to keep serving after [`Gateway::begin_drain`].
    pub fn drain_period(&self) -> Duration {
        self.drain
    }

    /// Stops being ready: `/readyz` answers 503 "draining" and gRPC health says
    /// NOT_SERVING for every service, so load balancers and coordinators' probes send
    /// new work elsewhere. Everything is still served; [`Gateway::shutdown`] ends it.
    pub async fn begin_drain(&self) {
        self.lifecycle.drain();
        self.health
            .set_not_serving::<FederationServer<LiveFederation>>()
            .await;
        self.health.set_not_serving::<PeerServer<LivePeer>>().await;
        // The empty name is the server as a whole, which is what most probes ask.
        self.health
            .set_service_status("", tonic_health::ServingStatus::NotServing)
            .await;
        tracing::info!(member = %self.member, drain = ?self.drain, "draining: not ready, still serving");
    }

    /// Drains for the configured period, then shuts down (SIGTERM's course).
    pub async fn drain(self) {
        self.begin_drain().await;
        tokio::time::sleep(self.drain).await;
        self.shutdown().await;
    }

    /// Queries running here now: client queries this gateway coordinates and
    /// sub-queries it answers for peers, on every door, including the doors of
    /// configurations replaced while they ran.
    pub fn in_flight(&self) -> usize {
        let current: usize = self
            .admission()
            .iter()
            .flat_map(|(_, load)| load.classes.iter().map(|c| c.in_use))
            .sum();
        current + self.reloader.retired_in_use()
    }

    /// Stops accepting, lets in-flight calls finish, and waits.
    pub async fn shutdown(mut self) {
        self.lifecycle.drain();
        self.watcher.abort();
        self.upkeep.abort();
        // What it has not exported yet it exports at the next start, from its cursor.
        if let Some(e) = self.exporter.take() {
            e.abort();
        }
        let _ = self.http_stop.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        // Every query ends by its deadline, which bounds the whole wait: a client that
        // keeps a stream open without sending (a health watch, a request whose body
        // never comes) cannot hold the process past it.
        let until = tokio::time::Instant::now() + self.longest_query + Duration::from_secs(5);
        if tokio::time::timeout_at(until, &mut self.task)
            .await
            .is_err()
        {
            tracing::warn!("calls still open at the longest query deadline; stopping without them");
            self.task.abort();
        }
        for h in [self.http_task.take(), self.postgres_task.take()]
            .into_iter()
            .flatten()
        {
            let abort = h.abort_handle();
            if tokio::time::timeout_at(until, h).await.is_err() {
                abort.abort();
            }
        }
        // gRPC and HTTP waited for their calls above; a PostgreSQL session outlives its
        // port's accept loop, so its query in flight is waited for here, by the slots
        // queries hold.
        while self.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if let Some(h) = self.probes_task.take() {
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
        if let Some(e) = &self.exporter {
            e.abort();
        }
        self.watcher.abort();
        self.upkeep.abort();
        let _ = self.http_stop.send(true);
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}
