//! fedgate's integration tests: real gateways over real mutual TLS on loopback.
//!
//! One test binary (modules below) so the crate links once.

mod proxy;
mod support;

mod admission;
mod adversarial;
mod bad_input;
mod cache;
mod configs;
mod differential;
mod faults;
mod federation;
mod flight_source;
mod frontends;
mod fuzz;
mod incidents;
mod lifecycle;
mod loadgen;
mod mysql;
mod oracle;
mod origin;
mod pgdoor;
mod planner;
mod policy_props;
mod postgres;
mod receipts;
mod reload;
mod shapes;
mod sources;
mod sovereignty;
mod tls;
