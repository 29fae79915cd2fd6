//! What operators read: the hash-chained audit log ([`audit`]), metrics and the status
//! board's data ([`observe`]), and traces and logs ([`telemetry`]).

pub mod audit;
pub mod observe;
pub mod telemetry;
