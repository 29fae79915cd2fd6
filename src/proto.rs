//! Code generated from `proto/fedgate/v1/fedgate.proto` by `build.rs`.

#![allow(clippy::all, missing_docs)]

/// Version 1 of the fedgate protocol.
pub mod v1 {
    tonic::include_proto!("fedgate.v1");
}
