//! What operators read and set: the hash-chained audit log ([`audit`]), metrics and the
//! status board's data ([`observe`]) with each member's last hour ([`history`]), traces and logs ([`telemetry`]), and the fair
//! admission of queries and sub-queries by principal class ([`admission`]), and the
//! phase of the gateway's life that probes report ([`lifecycle`]).

pub mod admission;
pub mod audit;
pub mod history;
pub mod lifecycle;
pub mod observe;
pub mod telemetry;
