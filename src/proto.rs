//! Code generated from `proto/fedgate/v1/fedgate.proto` by `build.rs`.

#![allow(clippy::all, missing_docs)]

/// Version 1 of the fedgate protocol.
pub mod v1 {
    tonic::include_proto!("fedgate.v1");

    /// The encoded descriptors of the protocol, for gRPC server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        tonic::include_file_descriptor_set!("fedgate_descriptor");
}
