//! fedgate: a regional cross-city federation gateway.
//!
//! A gateway runs in front of each member's (city's, county's) own data. A query
//! written against the region's canonical schema goes to any gateway (the
//! coordinator), which fans it out over mutual TLS to the members that serve the
//! datasets it reads, merges their answers and reports one status per member.
//!
//! The modules follow the one-way data flow described in `ARCHITECTURE.md`:
//! [`tls`] and [`identity`] (accept, principal) -> [`server`] (admission) ->
//! [`federation`] (plan, member scans, merge) -> [`member`] at the data owner
//! ([`policy`] permit, [`mapping`] views over [`source`]s).

pub mod admission;
pub mod arrow_ipc;
pub mod assertion;
pub mod audit;
pub mod check;
pub mod client;
pub mod config;
pub mod demo;
pub mod error;
pub mod federation;
pub mod flight_sql;
pub mod http;
pub mod identity;
pub mod loadgen;
pub mod local_postgres;
pub mod mapping;
pub mod masking;
pub mod member;
pub mod observe;
pub mod owner;
pub mod pki;
pub mod policy;
pub mod proto;
pub mod restricted;
pub mod server;
pub mod services;
pub mod source;
pub mod telemetry;
pub mod tls;

pub use error::{Error, Fault, Result};
