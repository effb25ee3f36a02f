//! Generates the gRPC code with a vendored protoc (the build machines have no system
//! protoc): the Nexus control protocol from `proto/`, and the SPIFFE Workload API from
//! the proto the `spiffe` crate ships in its own source, found through `cargo metadata`,
//! so no copy of third-party source lives in this repository. Not `--offline`: a build
//! of some packages only (the Dockerfile's) has not fetched every package the metadata
//! lists (dev-dependencies), and cargo fetches them here (tried on an empty registry
//! cache: no lock contention with the outer build).

use std::path::{Path, PathBuf};
use std::process::Command;

/// Where the `spiffe` crate keeps the Workload API proto, relative to its manifest.
const WORKLOAD_PROTO: &str = "src/proto/workload.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let workload = spiffe_workload_proto()?;
    let workload_dir = workload
        .parent()
        .ok_or("the spiffe crate's workload.proto has no parent folder")?;
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_with_config(
            config,
            &[
                workload.as_path(),
                Path::new("proto/nexus/control/v1/control.proto"),
            ],
            &[Path::new("proto"), workload_dir, well_known.as_path()],
        )?;
    // For grpcurl in the tests, which needs the .proto itself.
    println!(
        "cargo:rustc-env=NEXUS_WORKLOAD_PROTO={}",
        workload.display()
    );
    println!("cargo:rerun-if-changed=proto");
    println!("cargo:rerun-if-changed={}", workload.display());
    println!("cargo:rerun-if-changed=../../Cargo.lock");
    Ok(())
}

/// The Workload API proto inside the `spiffe` package this workspace resolved.
fn spiffe_workload_proto() -> Result<PathBuf, Box<dyn std::error::Error>> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let manifest = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("Cargo.toml");
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1", "--locked"])
        .args(["--filter-platform", &std::env::var("TARGET")?])
        .arg("--manifest-path")
        .arg(&manifest)
        .output()?;
    if !out.status.success() {
        return Err(format!(
            "cargo metadata failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let packages = metadata["packages"]
        .as_array()
        .ok_or("cargo metadata: no packages")?;
    let spiffe: Vec<&serde_json::Value> =
        packages.iter().filter(|p| p["name"] == "spiffe").collect();
    let [package] = spiffe.as_slice() else {
        return Err(format!(
            "cargo metadata lists {} `spiffe` packages; exactly one must provide the Workload API proto",
            spiffe.len()
        )
        .into());
    };
    let manifest_path = package["manifest_path"]
        .as_str()
        .ok_or("cargo metadata: spiffe has no manifest_path")?;
    let proto = Path::new(manifest_path)
        .parent()
        .ok_or("the spiffe manifest has no parent folder")?
        .join(WORKLOAD_PROTO);
    if !proto.is_file() {
        return Err(format!(
            "{} is missing: the spiffe crate {} no longer ships {WORKLOAD_PROTO}",
            proto.display(),
            package["version"]
        )
        .into());
    }
    Ok(proto)
}
