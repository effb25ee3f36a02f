//! SPIFFE identity for Nexus.
//!
//! An [`IdentityStore`] holds the workload's current X.509-SVID and the trust bundles it
//! accepts, fully converted to rustls types, and publishes changes atomically: a handshake
//! sees either the old identity or the new one, never a half-built one. Sources feed the
//! store (the SPIFFE Workload API through the `spiffe` crate, or static PEM files);
//! [`tls`] builds rustls configs that read the store on every handshake, so a rotation
//! applies to new connections without touching open ones.

pub mod allow;
pub mod clock;
pub mod cosign;
pub mod process;
pub mod source;
pub mod store;
pub mod tls;
mod verify;

pub use allow::{AllowList, AllowListError, canonical_id, canonical_pattern};
pub use store::{Bundles, Identity, IdentityError, IdentityStore, Svid, not_after_of};
pub use verify::{SpiffeVerifyError, handshake_failure_reason, spiffe_id_of};
