//! The front ends: the gRPC `Federation` service ([`grpc`]), Arrow Flight SQL
//! ([`flight_sql`]), the HTTP port with the JSON API and the status board ([`http`], its map and charts
//! in [`pictures`]),
//! and published services ([`services`]). Each builds an [`Ask`] and starts it through
//! the one query entry point, [`FederationService::start`] ([`query`]).
//!
//! The front ends know nothing of how a gateway is assembled or reloaded: they are
//! handed a [`Current`], which yields the service of the configuration version in
//! force. The gateway builder depends on them, never the other way round.

pub mod flight_sql;
pub mod grpc;
pub mod http;
pub mod pictures;
pub mod postgres;
pub mod query;
pub mod services;

use std::sync::Arc;

pub use query::{Ask, FederationService, Outcome, Started};

use crate::error::{Error, Result};
use crate::trust::identity::Principal;

/// The query entry point of the configuration version in force. A reload swaps the
/// version; every call takes the one in force when it arrives and keeps it to its end,
/// so a query runs under exactly one configuration version.
#[derive(Clone)]
pub struct Current(Arc<dyn Fn() -> FederationService + Send + Sync>);

impl Current {
    /// A front end's view of the versions `load` yields.
    pub fn new(load: impl Fn() -> FederationService + Send + Sync + 'static) -> Current {
        Current(Arc::new(load))
    }

    /// The service in force now.
    pub fn load(&self) -> FederationService {
        (self.0)()
    }
}

/// Refuses a request on a connection whose certificate the revocation lists in force
/// name. Every front end asks this for every request, not only at the handshake, so a
/// revocation reaches connections opened before it as soon as the lists reload.
pub(crate) fn not_revoked(g: &FederationService, p: &Principal, serial: &[u8]) -> Result<()> {
    if g.coordinator().is_revoked(serial) {
        tracing::warn!(principal = %p, "Revoked certificate refused");
        return Err(Error::Unauthenticated(format!(
            "the certificate of {p} on this connection has been revoked by the region"
        )));
    }
    Ok(())
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
