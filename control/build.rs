//! Generates the control plane's gRPC code (`proto/control.proto`) and the
//! etcd v3 client stubs (`proto/etcd.proto`) with the vendored protoc, so a
//! plain `cargo build` needs nothing installed.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = ["proto/control.proto", "proto/etcd.proto"];
    for proto in protos {
        println!("cargo:rerun-if-changed={proto}");
    }
    println!("cargo:rerun-if-env-changed=PROTOC");
    // An explicit PROTOC wins; otherwise the one inside protoc-bin-vendored.
    let protoc = match std::env::var_os("PROTOC") {
        Some(path) => PathBuf::from(path),
        None => protoc_bin_vendored::protoc_bin_path()?,
    };
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure()
        // The etcd stubs are a client only: etcd is the server.
        .compile_with_config(config, &protos, &["proto"])?;
    Ok(())
}
