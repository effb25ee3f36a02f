//! Generated gRPC code shared by the Nexus products.
//!
//! `workload` is the SPIFFE Workload API exactly as the `spiffe` crate ships its proto;
//! Nexus serves it only from the development Workload API (`nexusctl dev workload-api`),
//! production sidecars talk to SPIRE through the `spiffe` crate's own client.

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
