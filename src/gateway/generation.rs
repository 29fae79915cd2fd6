//! A configuration generation: everything one configuration version serves with (the
//! query entry point with its coordinator, the data owner's service, the TLS server
//! configurations), built once per version and swapped in whole by a reload.

use std::collections::BTreeMap;
use std::sync::Arc;

use arc_swap::ArcSwap;
use tonic::{Request, Response, Status};

use crate::config::MemberConfig;
use crate::coordinator::Coordinator;
use crate::error::{Error, Result};
use crate::frontend::FederationService;
use crate::ops::admission::Admission;
use crate::ops::audit::AuditLog;
use crate::owner::member::MemberEngine;
use crate::owner::peer::PeerService;
use crate::proto::ResponseStream;
use crate::proto::v1::peer_server::Peer;
use crate::proto::v1::*;
use crate::trust::tls::TlsMaterial;

/// Everything one configuration version serves with. A reload builds a new one and
/// swaps it in; every call takes the one in force when it arrives and keeps it to its
/// end, so a query runs under exactly one configuration version.
pub struct Generation {
    /// The configuration.
    pub config: Arc<MemberConfig>,
    /// The client-facing service of this version.
    pub federation: FederationService,
    pub(super) peer: PeerService,
    pub(super) server_tls: Arc<rustls::ServerConfig>,
    /// The same for the HTTP port (which also offers HTTP/1.1).
    pub(super) http_tls: Arc<rustls::ServerConfig>,
    /// The same for the PostgreSQL port (PostgreSQL's ALPN name).
    pub(super) postgres_tls: Arc<rustls::ServerConfig>,
    /// A digest of the CA, certificate and key files, to notice rotated certificates.
    pub(super) tls_digest: String,
}

/// A digest of the files the gateway's TLS identity is made of.
pub(super) fn tls_digest(config: &MemberConfig) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    let files = [&config.region.ca_path, &config.cert_path, &config.key_path]
        .into_iter()
        .chain(&config.region.crl_paths);
    for p in files {
        h.update(std::fs::read(p).unwrap_or_default());
        h.update([0u8]);
    }
    hex::encode(h.finalize())
}

impl Generation {
    /// Builds what `config` serves with. Slot limits that did not change keep their
    /// counters, so queries running across a reload still count.
    pub(super) async fn build(
        config: Arc<MemberConfig>,
        audit: Arc<AuditLog>,
        observer: Arc<crate::ops::observe::Observer>,
        previous: Option<&Generation>,
    ) -> Result<Generation> {
        let tls = Arc::new(TlsMaterial::load_with_crls(
            &config.region.ca_path,
            &config.region.crl_paths,
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
        // by every peer: refuse it here, with the reason, instead. One the region has
        // revoked is refused at start too; on a reload the new lists are taken all the
        // same, so that the other certificates they revoke are refused here as well,
        // and the operators are told to renew this one.
        if previous.is_some() && tls.own_certificate_revoked() {
            tracing::error!(
                member = %config.member.name,
                "The region has revoked this gateway's own certificate: its peers refuse it. \
                 The new revocation lists are in force here; renew the certificate (fedgate pki renew)"
            );
        } else {
            tls.verify_own_certificate()?;
        }
        let engine = if config.member.serves.is_empty() {
            None
        } else {
            Some(Arc::new(MemberEngine::build(config.clone()).await?))
        };
        // The declarations held are kept across reloads, like the nonces: a reload
        // must not forget that an incident ended.
        let incidents = match previous {
            Some(p) => p.peer.incidents.clone(),
            None => Arc::new(crate::owner::incidents::Register::open(
                &crate::owner::incidents::path_beside(&config.audit_path),
            )?),
        };
        let coordinator = Arc::new(Coordinator::new(
            config.clone(),
            engine.clone(),
            &tls,
            audit.clone(),
            incidents.clone(),
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
        // Each door keeps its controller, and the slots held, across a reload that
        // leaves its limits unchanged.
        let keep = |old: Option<&Arc<Admission>>, total: usize, classes: &BTreeMap<_, _>| match old
        {
            Some(a) if a.has_limits(total, classes) => a.clone(),
            _ => Admission::new(total, classes.clone()),
        };
        let limits = &config.limits;
        let admission = keep(
            previous.map(|p| &p.federation.admission),
            limits.max_concurrent_queries,
            &limits.classes,
        );
        let sub_admission = keep(
            previous.map(|p| &p.peer.admission),
            limits.max_concurrent_subqueries,
            &limits.subquery_classes,
        );
        Ok(Generation {
            tls_digest: tls_digest(&config),
            server_tls: tls.server_config()?,
            http_tls: tls.http_server_config()?,
            postgres_tls: tls.postgres_server_config()?,
            federation: FederationService {
                coordinator,
                admission,
                subquery_admission: sub_admission.clone(),
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
                incidents,
            },
            config,
        })
    }
}

/// `Peer` under the configuration in force when each call arrives.
#[derive(Clone)]
pub(super) struct LivePeer(pub(super) Arc<ArcSwap<Generation>>);

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

    async fn declare(
        &self,
        req: Request<DeclareRequest>,
    ) -> std::result::Result<Response<PeerDeclareResponse>, Status> {
        let g = self.0.load_full();
        g.peer.declare(req).await
    }
}
