//! Generates the gRPC code for `proto/fedgate/v1` at build time.
//!
//! The `protoc` used is the vendored one from `protoc-bin-vendored`, so a fresh machine
//! needs no system protobuf compiler.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment here.
    unsafe { std::env::set_var("PROTOC", protoc) };
    println!("cargo:rerun-if-changed=proto");
    // The descriptor set feeds gRPC server reflection.
    let descriptors =
        std::path::PathBuf::from(std::env::var("OUT_DIR")?).join("fedgate_descriptor.bin");
    tonic_prost_build::configure()
        .file_descriptor_set_path(&descriptors)
        .build_client(true)
        .build_server(true)
        .bytes(".fedgate.v1.ArrowChunk")
        .compile_protos(&["proto/fedgate/v1/fedgate.proto"], &["proto"])?;
    Ok(())
}
