//! Who is calling, and who may speak for whom: identities read from certificates
//! ([`identity`]), mutual TLS ([`tls`]), the development CA ([`pki`]) and origin
//! assertions ([`assertion`]).

pub mod assertion;
pub mod identity;
pub mod incident;
pub mod pki;
pub mod receipt;
pub mod statement;
pub mod tls;
