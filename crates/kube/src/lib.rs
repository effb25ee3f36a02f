//! nexus-kube: Nexus on Kubernetes.
//!
//! - [`inject`]: what sidecar injection does to a pod (native sidecar, Workload API
//!   socket, config, optional sandbox), shared by the webhook and `nexusctl inject`;
//! - [`admission`]: the mutating webhook's `review(body) -> (status, body)`, which the
//!   gateway serves at `/inject`;
//! - [`manifests`]: offline injection of multi-document YAML;
//! - [`evict`]: evicting a revoked workload's pods through the Kubernetes API (opt-in).
#![forbid(unsafe_code)]
#![deny(clippy::unwrap_used)]

pub mod admission;
pub mod config;
pub mod evict;
pub mod inject;
pub mod manifests;

pub use admission::{review, review_plugin};
pub use config::{
    DEFAULT_MAX_REVIEW_BYTES, InjectConfig, LAUNCHER_IMAGE_ENV, MAX_SHUTDOWN_GRACE_SECS, Resources,
    SHUTDOWN_FLUSH_MARGIN_SECS, SIDECAR_IMAGE_ENV, WorkloadApiSocket,
};
pub use evict::{EvictError, EvictionReport, EvictorConfig, PodEvictor, WorkloadId};
pub use inject::{InjectError, Outcome, PluginRun};
pub use manifests::{Injected, ManifestError, Overrides, inject_manifests};
