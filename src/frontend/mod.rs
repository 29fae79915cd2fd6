//! The front ends besides the gRPC `Federation` service: Arrow Flight SQL
//! ([`flight_sql`]), the HTTP port with the JSON API and the status board ([`http`]),
//! and published services ([`services`]). Each builds an `Ask` and starts it through
//! the one query entry point, `FederationService::start`.

pub mod flight_sql;
pub mod http;
pub mod services;
