//! Tools around a gateway, not on its request path: `fedgate check` ([`check`]), the
//! gRPC client the CLI and the tests use ([`client`]), the load generator ([`loadgen`]), the sample region
//! ([`demo`]) and throwaway PostgreSQL and MariaDB servers ([`local_postgres`],
//! [`local_mariadb`]).

pub mod check;
pub mod client;
pub mod demo;
pub mod incident;
pub mod loadgen;
pub mod local_mariadb;
pub mod local_postgres;
mod local_server;
