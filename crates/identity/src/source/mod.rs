//! Where the identity comes from: the SPIFFE Workload API (SPIRE in production, the
//! development server on a laptop) or static PEM files for users without SPIRE.

pub mod files;
pub mod workload_api;
