//! Generated gRPC code shared by the Nexus products.
//!
//! `workload` is the SPIFFE Workload API generated from the proto the `spiffe` crate
//! ships (build.rs finds it with `cargo metadata`; no copy lives here); Nexus serves it
//! only from the development Workload API (`nexusctl dev workload-api`), production
//! sidecars talk to SPIRE through the `spiffe` crate's own client.

/// The path of the Workload API proto `workload` is generated from (inside the `spiffe`
/// crate's source), for tools that need the `.proto` itself (grpcurl in the tests).
pub const WORKLOAD_PROTO: &str = env!("NEXUS_WORKLOAD_PROTO");

#[allow(clippy::all, missing_docs)]
pub mod workload {
    tonic::include_proto!("_");
}

/// The Nexus control protocol (`proto/nexus/control/v1/control.proto`): the sidecar's
/// control stream and the operators' admin API, both served by the gateway.
#[allow(clippy::all, missing_docs)]
pub mod control {
    tonic::include_proto!("nexus.control.v1");
}
