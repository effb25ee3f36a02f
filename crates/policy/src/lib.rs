//! The Nexus policy engine: a folder of Rego modules and data files is one revision,
//! compiled once with regorus and evaluated per request without locks. Policies are
//! tested OPA-style (`test_` rules in `*_test.rego`) before a revision is used.
#![forbid(unsafe_code)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

pub mod builtins;
pub mod bundle;
pub mod cache;
pub mod compat;
pub mod engine;
pub mod error;
pub mod isolate;
pub mod metrics;
mod native;
mod panics;
mod rewrite;
pub mod routing;
pub mod testing;
pub mod verify;

pub use bundle::{Bundle, Module};
pub use cache::{CacheLimits, CacheStats, DecisionCache, KeyPart, KeyPlan};
pub use engine::{
    CachedDecision, Decision, EvalMode, ModeReport, Policy, PolicyOptions, decision_from,
    engine_for,
};
pub use error::{Location, PolicyError};
pub use regorus::Value;
pub use verify::{Verification, VerifyOptions};
