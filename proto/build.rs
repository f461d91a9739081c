//! Generates the `onevision.v1` gRPC code with the protoc shipped by `protoc-bin-vendored`, so a
//! fresh machine needs no system protoc.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()
        .map_err(|e| format!("no vendored protoc for this platform: {e}"))?;
    let include = protoc_bin_vendored::include_path()
        .map_err(|e| format!("no vendored protobuf include dir: {e}"))?;
    let root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let protos = ["common.proto", "coordinator.proto", "rollout.proto", "reward.proto"]
        .map(|f| root.join("onevision/v1").join(f));

    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    // Tensor payloads and images are large: `bytes::Bytes` avoids a copy when decoding.
    config.bytes([
        ".onevision.v1.TensorChunk.data",
        ".onevision.v1.Image.encoded",
        ".onevision.v1.PixelValues.data",
    ]);
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_with_config(config, &protos, &[root.clone(), include])?;
    println!("cargo:rerun-if-changed=onevision");
    Ok(())
}
