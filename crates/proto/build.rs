//! Generates the gRPC code from the protos in `proto/` with a vendored protoc
//! (the build machines have no system protoc).
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                std::path::Path::new("proto/workload.proto"),
                std::path::Path::new("proto/nexus/control/v1/control.proto"),
            ],
            &[std::path::Path::new("proto"), well_known.as_path()],
        )?;
    println!("cargo:rerun-if-changed=proto");
    Ok(())
}
