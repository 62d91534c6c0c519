//! Generates the gRPC baseline's code from `proto/bench.proto`.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/bench.proto";
    println!("cargo:rerun-if-changed={proto}");
    println!("cargo:rerun-if-env-changed=PROTOC");

    // Use the protoc shipped inside the protoc-bin-vendored crate so a plain
    // `cargo build` works on a machine with nothing installed; an explicit
    // PROTOC still wins for anyone who needs a different one. Passing it
    // through the prost config instead of `std::env::set_var` avoids mutating
    // the process environment (unsafe in edition 2024).
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);

    tonic_prost_build::configure()
        // `bytes` fields become `prost::bytes::Bytes` (prost re-exports the
        // crate): the client clones a request by reference count instead of
        // copying up to megabytes per call, and the server echoes the
        // request's buffer without a copy, as the raw-TCP baseline does.
        .bytes(".")
        .compile_with_config(config, &[proto], &["proto"])?;
    Ok(())
}
