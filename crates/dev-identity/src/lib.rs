//! Development identity, never for production: a CA that mints X.509-SVIDs
//! ([`ca`]), the committed development PKI in `certs-dev/` ([`pki`]), and a SPIFFE
//! Workload API server that stands in for a SPIRE agent on one machine
//! ([`workload_api`]).
//!
//! A crate of its own so that what production binaries link cannot hold it: the sidecar,
//! the gateway and the launcher do not depend on it (only `nexusctl`, which runs the
//! local stack, and tests do), whatever else a build compiles beside them.
#![forbid(unsafe_code)]

pub mod ca;
pub mod pki;
mod uds_authority;
pub mod workload_api;

pub use ca::{DevCa, DevCaError, MintedSvid};
pub use pki::{DEV_PKI_HEADER, PkiFile, generate_dev_pki, write_dev_pki};
pub use workload_api::{
    DevWorkloadApi, DevWorkloadApiConfig, SECURITY_HEADER, WorkloadApiError, bind_socket, serve,
};

/// The trust domain of the development PKI.
pub const DEV_TRUST_DOMAIN: &str = "nexus.local";
/// The federated trust domain of the development PKI.
pub const PARTNER_TRUST_DOMAIN: &str = "partner.example";

/// The `nexus.local` development CA certificate (`certs-dev/nexus.local/ca.pem`), embedded
/// so that development tooling needs no files on disk.
pub const EMBEDDED_CA_CERT_PEM: &str = include_str!("../../../certs-dev/nexus.local/ca.pem");
/// The `nexus.local` development CA key (`certs-dev/nexus.local/ca.key`). Public by design:
/// it is committed to the repository.
pub const EMBEDDED_CA_KEY_PEM: &str = include_str!("../../../certs-dev/nexus.local/ca.key");
/// The federated `partner.example` development CA certificate
/// (`certs-dev/partner.example/ca.pem`).
pub const EMBEDDED_PARTNER_CA_CERT_PEM: &str =
    include_str!("../../../certs-dev/partner.example/ca.pem");
