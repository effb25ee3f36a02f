//! Process-wide counters of the policy engine's safety mechanisms, ready for a metrics
//! exporter (the sidecar and gateway may export them as `nexus_policy_*`): how often the
//! engine panicked (each turned into an error and a deny), how many revisions were
//! checked RVM-against-interpreter, and how many were moved to the interpreter because
//! the two disagreed or because of a construct the RVM gets wrong; and how many
//! decisions nexus's own evaluator answered or handed on (`native`).

use std::sync::atomic::{AtomicU64, Ordering};

static PANICS: AtomicU64 = AtomicU64::new(0);
static VERIFIED: AtomicU64 = AtomicU64::new(0);
static DISAGREEMENTS: AtomicU64 = AtomicU64::new(0);
static ROUTED: AtomicU64 = AtomicU64::new(0);
static NATIVE: AtomicU64 = AtomicU64::new(0);
static NATIVE_FALLBACKS: AtomicU64 = AtomicU64::new(0);

/// A snapshot of the counters.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Engine panics caught (`nexus_policy_engine_panics_total`).
    pub panics: u64,
    /// Compiled programs checked against the interpreter (`nexus_policy_rvm_checks_total`).
    pub verified: u64,
    /// Checks that found a disagreement, so the rule serves on the interpreter
    /// (`nexus_policy_rvm_disagreements_total`).
    pub disagreements: u64,
    /// Compilations routed to the interpreter by a construct found in the policy
    /// (`nexus_policy_rvm_routed_total`).
    pub routed: u64,
    /// Decisions answered by nexus's own evaluator (`nexus_policy_native_decisions_total`).
    pub native: u64,
    /// Decisions it handed to the RVM or the interpreter at run time (a value it does
    /// not model: `nexus_policy_native_fallbacks_total`).
    pub native_fallbacks: u64,
}

/// The counters now.
pub fn counters() -> Counters {
    Counters {
        panics: PANICS.load(Ordering::Relaxed),
        verified: VERIFIED.load(Ordering::Relaxed),
        disagreements: DISAGREEMENTS.load(Ordering::Relaxed),
        routed: ROUTED.load(Ordering::Relaxed),
        native: NATIVE.load(Ordering::Relaxed),
        native_fallbacks: NATIVE_FALLBACKS.load(Ordering::Relaxed),
    }
}

pub(crate) fn count_panic() {
    PANICS.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_verified(disagreed: bool) {
    VERIFIED.fetch_add(1, Ordering::Relaxed);
    if disagreed {
        DISAGREEMENTS.fetch_add(1, Ordering::Relaxed);
    }
}

pub(crate) fn count_routed() {
    ROUTED.fetch_add(1, Ordering::Relaxed);
}

pub(crate) fn count_native(fell_back: bool) {
    if fell_back {
        NATIVE_FALLBACKS.fetch_add(1, Ordering::Relaxed);
    } else {
        NATIVE.fetch_add(1, Ordering::Relaxed);
    }
}
