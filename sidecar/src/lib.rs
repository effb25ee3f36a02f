//! nexus-sidecar: one per pod. Takes the workload's SPIFFE identity, terminates and
//! originates mTLS for it, and (with later issues) evaluates policy on every request.
//!
//! Reading order for "what happens to a request": [`proxy::inbound`] and
//! [`proxy::outbound`] compose the layers of [`proxy::layers`] over [`proxy::forward`].
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod config;
pub mod control;
pub mod metrics;
pub mod policy;
pub mod proxy;
pub mod signals;
pub mod telemetry;

pub use app::{Addresses, Exit, Running, run, start};
pub use config::{Config, ConfigError};
