//! fedgate's integration tests: real gateways over real mutual TLS on loopback.
//!
//! One test binary (modules below) so the crate links once.

mod support;

mod bad_input;
mod configs;
mod differential;
mod federation;
mod loadgen;
mod planner;
mod policy_props;
mod postgres;
mod sources;
mod sovereignty;
mod tls;
