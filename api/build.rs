//! Compiles the protobuf contracts with the vendored protoc, so no system protoc is
//! needed on a fresh machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // One encoded config is shared by every proxy that gets it: `Bytes` clones are
    // reference counts, a `Vec` would be copied per proxy.
    config.bytes([".trellis.discovery.v1.ConfigPush.config_json"]);
    tonic_prost_build::configure().compile_with_config(
        config,
        &[
            "proto/trellis/identity/v1/identity.proto",
            "proto/trellis/discovery/v1/discovery.proto",
        ],
        &["proto"],
    )?;
    Ok(())
}
