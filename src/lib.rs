//! fedgate: a regional cross-city federation gateway.
//!
//! A gateway runs in front of each member's (city's, county's) own data. A query
//! written against the region's canonical schema goes to any gateway (the
//! coordinator), which fans it out over mutual TLS to the members that serve the
//! datasets it reads, merges their answers and reports one status per member.
//!
//! The folders follow the one-way data flow described in `ARCHITECTURE.md`:
//! [`trust`] (accept, principal, who speaks for whom) -> [`gateway`] (services,
//! admission) and [`frontend`] (Flight SQL, HTTP, services) -> [`coordinator`] (plan,
//! member scans, merge) -> [`owner`] at the data owner (policy permit, the member
//! engine, views over sources). [`ops`] keeps the record, [`config`] is read once,
//! [`tools`] are not on the request path.

pub mod arrow_ipc;
pub mod config;
pub mod coordinator;
pub mod error;
pub mod frontend;
pub mod gateway;
pub mod ops;
pub mod owner;
pub mod proto;
pub mod tools;
pub mod trust;

pub use error::{Error, Fault, Result};
