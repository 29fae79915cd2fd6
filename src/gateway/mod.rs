//! A gateway assembled: the gRPC services, configuration generations and live reload
//! ([`server`]), and admission of client queries ([`admission`]).

pub mod admission;
pub mod server;
