//! What the detectors see (a [`RequestEvent`]) and what they report (a [`Signal`]): the
//! signal's JSON shape is what the gateway's revocation policy reads as `input.signal`
//! (plus the `id` and `reporter` the gateway adds), so its field names are a contract.

use serde::{Deserialize, Serialize};

/// What a detector noticed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SignalKind {
    /// The request rate is far above the workload's baseline.
    RateSpike,
    /// Many of the workload's requests were denied.
    DenialBurst,
    /// The workload sent far more bytes than usual, or than allowed.
    EgressBytes,
    /// The workload asked for clauses it is not bound to.
    UnboundClause,
    /// Repeated TLS or authentication failures from one peer.
    AuthFailures,
    /// The workload's sandbox refused or killed a syscall.
    SandboxViolation,
    /// The workload went over a budget its binding declares (requests per second,
    /// egress bytes or distinct clauses per window): no baseline, no warm-up.
    BudgetExceeded,
}

impl SignalKind {
    /// Every kind, in declaration order.
    pub const ALL: [SignalKind; 7] = [
        SignalKind::RateSpike,
        SignalKind::DenialBurst,
        SignalKind::EgressBytes,
        SignalKind::UnboundClause,
        SignalKind::AuthFailures,
        SignalKind::SandboxViolation,
        SignalKind::BudgetExceeded,
    ];

    /// The snake_case name used in JSON and metrics labels.
    pub fn as_str(self) -> &'static str {
        match self {
            SignalKind::RateSpike => "rate_spike",
            SignalKind::DenialBurst => "denial_burst",
            SignalKind::EgressBytes => "egress_bytes",
            SignalKind::UnboundClause => "unbound_clause",
            SignalKind::AuthFailures => "auth_failures",
            SignalKind::SandboxViolation => "sandbox_violation",
            SignalKind::BudgetExceeded => "budget_exceeded",
        }
    }
}

impl std::fmt::Display for SignalKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How the reporting sidecar saw the workload a signal is about. The revocation policy
/// trusts `own` observations only from the workload's own sidecar.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Observed {
    /// The remote party of a connection (an inbound caller, an upstream).
    #[serde(rename = "peer")]
    Peer,
    /// The reporter's own workload (its outbound requests, its sandbox).
    #[serde(rename = "self")]
    Own,
}

impl Observed {
    /// `"peer"` or `"self"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Observed::Peer => "peer",
            Observed::Own => "self",
        }
    }
}

/// One anomaly about one workload.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Signal {
    /// What was noticed.
    pub kind: SignalKind,
    /// The SPIFFE ID the signal is about (`unknown` for authentication failures whose
    /// peer presented no parsable identity).
    pub workload: String,
    /// Whether the reporter saw it as a peer or as its own workload.
    pub observed_as: Observed,
    /// How anomalous: for `rate_spike` the current rate over the baseline; for the
    /// others the observed count or bytes over the threshold (or budget) that tripped
    /// (>= 1), and 100 for a sandbox `kill`.
    pub score: f64,
    /// Counts, window, baseline, threshold and `suppressed` (signals of this kind about
    /// this workload held back by the cooldown since the previous one).
    pub evidence: serde_json::Map<String, serde_json::Value>,
    /// When, in unix milliseconds.
    pub time_ms: u64,
}

/// One proxied request, as the detectors see it.
#[derive(Clone, Copy, Debug)]
pub struct RequestEvent<'a> {
    /// The workload the request is attributed to: the authenticated peer (inbound), or
    /// the sidecar's own workload (outbound).
    pub workload: &'a str,
    /// `Peer` for an inbound caller, `Own` for the local plugin's outbound requests.
    pub observed_as: Observed,
    /// The policy decision.
    pub allowed: bool,
    /// The clause the request names, if any.
    pub clause: Option<&'a str>,
    /// Whether `clause` is among the workload's bindings; `None` when the sidecar does
    /// not know the bindings.
    pub clause_bound: Option<bool>,
    /// Bytes the workload sent (the request body for an inbound peer).
    pub bytes_out: u64,
    /// Bytes the workload received.
    pub bytes_in: u64,
}

/// A workload's baseline as the fleet shares it (the gateway's per-workload record, and
/// what one sidecar contributes to it): per second while active.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Baseline {
    /// Requests per second (short window).
    pub rate_per_s: f64,
    /// Egress bytes per second (short window).
    pub bytes_per_s: f64,
    /// Requests per second (long window).
    pub long_rate_per_s: f64,
    /// Egress bytes per second (long window).
    pub long_bytes_per_s: f64,
}

impl Baseline {
    /// Whether every value is a finite number, 0 or more, and the request rate above 0
    /// (anything else is never used).
    pub fn is_usable(&self) -> bool {
        self.rate_per_s > 0.0 && self.all_finite_non_negative()
    }

    fn all_finite_non_negative(&self) -> bool {
        [
            self.rate_per_s,
            self.bytes_per_s,
            self.long_rate_per_s,
            self.long_bytes_per_s,
        ]
        .iter()
        .all(|v| v.is_finite() && *v >= 0.0)
    }
}

/// One sidecar's view of its own workload since its last report.
#[derive(Clone, Debug, PartialEq)]
pub struct FleetSample {
    /// The workload (the sidecar's own SPIFFE ID).
    pub workload: String,
    /// The local baseline now.
    pub baseline: Baseline,
    /// Active ticks folded in since the last report (its weight).
    pub ticks: u32,
}
