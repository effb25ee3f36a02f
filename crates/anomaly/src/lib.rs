//! Anomaly detectors for a Nexus sidecar: per workload (each peer, and the sidecar's own
//! workload), declared budgets from the bindings (no warm-up), a request-rate spike
//! against a growth-bounded baseline that starts from the fleet's (or a conservative
//! prior) and a long-window comparison, a burst of denials,
//! egress bytes over a window, requests for clauses outside the workload's bindings,
//! authentication failures, and sandbox violations. Each turns what it sees into
//! [`Signal`]s for the gateway's revocation policy (`policies/revocation`).
//!
//! The library is pure and deterministic: no I/O, no clock, no runtime. The caller
//! passes the time (`now_ms`, unix milliseconds) on every call, so a test replays ten
//! minutes of traffic in milliseconds. Calls take `&self` and are safe from any number of
//! threads. Memory is bounded: at most `max_workloads` entries of fixed size, the least
//! recently seen evicted first, and a per-(workload, kind) cooldown turns a flood into a
//! signal or a few, not thousands.

#![forbid(unsafe_code)]

pub mod budget;
mod config;
mod detectors;
mod signal;
mod table;
mod window;

pub use budget::{Budget, BudgetError, Budgets};
pub use config::{
    AuthFailuresConfig, BaselineConfig, BudgetConfig, ConfigError, DenialBurstConfig,
    DetectorConfig, EgressConfig, FleetConfig, RateSpikeConfig, SandboxViolationConfig,
    UnboundClauseConfig,
};
pub use detectors::{Detectors, UNKNOWN_PEER};
pub use signal::{Baseline, FleetSample, Observed, RequestEvent, Signal, SignalKind};
