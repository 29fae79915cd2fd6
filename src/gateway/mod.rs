//! A gateway assembled: the builder that puts the front ends and the data owner's
//! service behind one TLS port and the HTTP port ([`server`]), and the configuration
//! generations it serves with and reloads ([`generation`], [`reload`]).

pub mod generation;
pub mod reload;
pub mod server;

pub use reload::ReloadOutcome;
pub use server::Gateway;
