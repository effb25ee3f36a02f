//! [`Detectors`]: every detector's state for every tracked workload, fed by the request
//! path, the TLS acceptor and the sandbox, and turned into [`Signal`]s.
//!
//! State is sharded by workload (one mutex per shard, held for well under a
//! microsecond) and bounded: at most `max_workloads` entries of fixed size.
//! Authentication failures live in a table of their own, since the peer id of a failed
//! handshake is not authenticated and anyone can invent new ones.

use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::config::DetectorConfig;
use crate::signal::{Observed, RequestEvent, Signal, SignalKind};
use crate::table::{Lru, Outcome};
use crate::window::{Ewma, Gate, Ring, Span};

/// The key authentication failures without a parsable peer identity are counted under.
pub const UNKNOWN_PEER: &str = "unknown";

/// The score of a sandbox `kill`: far above any revocation threshold.
const KILL_SCORE: f64 = 100.0;

/// Strings from the network (clause names, failure reasons) are cut to this many bytes
/// in evidence.
const MAX_EVIDENCE_STR: usize = 128;

/// Tables this small are exact LRUs (one shard); larger ones are split in 16 shards.
const SHARD_FROM: usize = 256;
const SHARDS: usize = 16;

/// The anomaly detectors of one sidecar.
pub struct Detectors {
    s: Settings,
    shards: Box<[Mutex<Shard>]>,
    hasher: std::hash::RandomState,
    tracked: AtomicUsize,
    evicted: AtomicU64,
}

impl std::fmt::Debug for Detectors {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Detectors")
            .field("shards", &self.shards.len())
            .field("tracked", &self.tracked())
            .field("evicted", &self.evicted())
            .finish_non_exhaustive()
    }
}

struct Shard {
    workloads: Lru<WorkloadState>,
    auth: Lru<AuthState>,
}

/// The config in the units the hot path uses, clamped to what can work.
struct Settings {
    cooldown_ms: u64,
    tick_ms: u64,
    alpha: f64,
    warmup: u32,
    rate: Span,
    rate_factor: f64,
    rate_min: f64,
    denial: Span,
    denial_threshold: u64,
    egress: Span,
    egress_max: u64,
    egress_factor: f64,
    egress_min: u64,
    unbound: Span,
    unbound_threshold: u64,
    auth: Span,
    auth_threshold: u64,
    sandbox: Span,
    sandbox_threshold: u64,
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

impl Settings {
    fn new(c: &DetectorConfig) -> Self {
        let factor = |f: f64| if f.is_finite() { f.max(1.0) } else { 4.0 };
        let alpha = c.baseline.alpha;
        Self {
            cooldown_ms: ms(c.cooldown),
            tick_ms: ms(c.baseline.tick),
            alpha: if alpha > 0.0 && alpha <= 1.0 {
                alpha
            } else {
                0.05
            },
            warmup: c.baseline.warmup_ticks,
            rate: Span::new(c.rate_spike.window),
            rate_factor: factor(c.rate_spike.factor),
            rate_min: if c.rate_spike.min_rate_per_s.is_finite() {
                c.rate_spike.min_rate_per_s.max(0.0)
            } else {
                25.0
            },
            denial: Span::new(c.denial_burst.window),
            denial_threshold: c.denial_burst.threshold.max(1),
            egress: Span::new(c.egress_bytes.window),
            egress_max: c.egress_bytes.max_bytes.max(1),
            egress_factor: factor(c.egress_bytes.factor),
            egress_min: c.egress_bytes.min_bytes,
            unbound: Span::new(c.unbound_clause.window),
            unbound_threshold: c.unbound_clause.threshold.max(1),
            auth: Span::new(c.auth_failures.window),
            auth_threshold: c.auth_failures.threshold.max(1),
            sandbox: Span::new(c.sandbox_violation.window),
            sandbox_threshold: c.sandbox_violation.threshold.max(1),
        }
    }
}

/// Everything known about one workload: about 1 KiB, whatever it does.
#[derive(Default)]
struct WorkloadState {
    /// Latest time seen: a clock stepping back is read as no time passing.
    last_ms: u64,
    /// The tick the entry was created in (partial, so never sampled).
    first_tick: u64,
    tick: u64,
    tick_requests: u64,
    tick_bytes: u64,
    /// Requests and bytes per tick while active.
    rate_base: Ewma,
    bytes_base: Ewma,
    rate: Ring,
    denials: Ring,
    egress: Ring,
    unbound: Ring,
    sandbox: Ring,
    gates: [Gate; SignalKind::ALL.len()],
}

#[derive(Default)]
struct AuthState {
    last_ms: u64,
    failures: Ring,
    gate: Gate,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

fn split(total: usize, parts: usize, i: usize) -> usize {
    total / parts + usize::from(i < total % parts)
}

fn truncated(s: &str) -> &str {
    if s.len() <= MAX_EVIDENCE_STR {
        return s;
    }
    let mut end = MAX_EVIDENCE_STR;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn gate_index(kind: SignalKind) -> usize {
    kind as usize
}

/// Builds the signal if the gate lets it through, with `suppressed` in its evidence.
#[allow(clippy::too_many_arguments)]
fn emit(
    out: &mut Vec<Signal>,
    gate: &mut Gate,
    cooldown_ms: u64,
    kind: SignalKind,
    workload: &str,
    observed_as: Observed,
    score: f64,
    now_ms: u64,
    evidence: impl FnOnce() -> Value,
) {
    let Some(suppressed) = gate.admit(now_ms, score, cooldown_ms) else {
        return;
    };
    let mut map = match evidence() {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    map.insert("suppressed".into(), suppressed.into());
    out.push(Signal {
        kind,
        workload: workload.to_owned(),
        observed_as,
        score,
        evidence: map,
        time_ms: now_ms,
    });
}

impl WorkloadState {
    fn new(now_ms: u64, s: &Settings) -> Self {
        let tick = now_ms / s.tick_ms;
        Self {
            last_ms: now_ms,
            first_tick: tick,
            tick,
            ..Self::default()
        }
    }

    fn warm(&self, s: &Settings) -> bool {
        self.rate_base.samples() >= s.warmup
    }

    /// Requests per second the baseline expects.
    fn base_rate(&self, s: &Settings) -> f64 {
        self.rate_base.value() * 1000.0 / s.tick_ms as f64
    }

    /// Bytes per egress window the baseline expects.
    fn base_bytes(&self, s: &Settings) -> f64 {
        self.bytes_base.value() * s.egress.window_ms() as f64 / s.tick_ms as f64
    }

    /// Moves the clock to `now_ms` (never backwards), sampling the tick that ended.
    fn advance(&mut self, now_ms: u64, s: &Settings) -> u64 {
        let now = now_ms.max(self.last_ms);
        self.last_ms = now;
        let tick = now / s.tick_ms;
        if tick != self.tick {
            // Idle ticks in between are not sampled (the baseline is the rate while
            // active), nor is the partial tick the entry was created in.
            if self.tick != self.first_tick && self.tick_requests > 0 {
                let warm = self.warm(s);
                let requests = self.tick_requests as f64;
                let tick_s = s.tick_ms as f64 / 1000.0;
                let rate_anomalous = warm
                    && requests / tick_s >= s.rate_min
                    && requests >= s.rate_factor * self.rate_base.value();
                self.rate_base.fold(requests, s.alpha, rate_anomalous);
                let bytes = self.tick_bytes as f64;
                let min_per_tick =
                    s.egress_min as f64 * s.tick_ms as f64 / s.egress.window_ms() as f64;
                let bytes_anomalous =
                    warm && bytes > (s.egress_factor * self.bytes_base.value()).max(min_per_tick);
                self.bytes_base.fold(bytes, s.alpha, bytes_anomalous);
            }
            self.tick = tick;
            self.tick_requests = 0;
            self.tick_bytes = 0;
        }
        now
    }
}

impl Detectors {
    /// Detectors with `config`'s thresholds. Values [`DetectorConfig::validate`] refuses
    /// are clamped here rather than failing.
    pub fn new(config: DetectorConfig) -> Self {
        let s = Settings::new(&config);
        let max = config.max_workloads.max(2);
        let auth_total = (max / 8).max(1);
        let workload_total = max - auth_total;
        let n = if max >= SHARD_FROM { SHARDS } else { 1 };
        let shards = (0..n)
            .map(|i| {
                Mutex::new(Shard {
                    workloads: Lru::new(split(workload_total, n, i)),
                    auth: Lru::new(split(auth_total, n, i)),
                })
            })
            .collect();
        Self {
            s,
            shards,
            hasher: std::hash::RandomState::new(),
            tracked: AtomicUsize::new(0),
            evicted: AtomicU64::new(0),
        }
    }

    fn shard(&self, key: &str) -> &Mutex<Shard> {
        let n = self.shards.len();
        let i = if n == 1 {
            0
        } else {
            (self.hasher.hash_one(key) % n as u64) as usize
        };
        &self.shards[i]
    }

    fn count(&self, outcome: &Outcome) {
        match outcome {
            Outcome::Found => {}
            Outcome::Inserted => {
                self.tracked.fetch_add(1, Ordering::Relaxed);
            }
            Outcome::Evicted => {
                self.evicted.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Feeds one proxied request (after its policy decision) and returns the signals it
    /// completes: rate spike, denial burst, egress bytes, unbound clause.
    pub fn on_request(&self, event: &RequestEvent<'_>, now_ms: u64) -> Vec<Signal> {
        let s = &self.s;
        let mut out = Vec::new();
        let mut shard = lock(self.shard(event.workload));
        let Some((st, outcome)) =
            shard
                .workloads
                .get_or_insert(event.observed_as, event.workload, || {
                    WorkloadState::new(now_ms, s)
                })
        else {
            return out;
        };
        self.count(&outcome);
        let now = st.advance(now_ms, s);
        st.tick_requests += 1;
        st.tick_bytes = st.tick_bytes.saturating_add(event.bytes_out);
        let (who, observed) = (event.workload, event.observed_as);
        let warm = st.warm(s);

        let slot = s.rate.slot(now);
        st.rate.add(slot, 1);
        if warm {
            let count = st.rate.sum(slot);
            let covered = s.rate.covered_ms(now);
            let rate = count as f64 * 1000.0 / covered as f64;
            let base = st.base_rate(s);
            if rate >= s.rate_min && rate >= s.rate_factor * base {
                let score = rate / base.max(f64::MIN_POSITIVE);
                let gate = &mut st.gates[gate_index(SignalKind::RateSpike)];
                emit(
                    &mut out,
                    gate,
                    s.cooldown_ms,
                    SignalKind::RateSpike,
                    who,
                    observed,
                    score,
                    now,
                    || {
                        json!({
                            "count": count,
                            "window_ms": covered,
                            "rate_per_s": rate,
                            "baseline_per_s": base,
                            "factor": s.rate_factor,
                            "min_rate_per_s": s.rate_min,
                        })
                    },
                );
            }
        }

        if !event.allowed {
            let slot = s.denial.slot(now);
            st.denials.add(slot, 1);
            let count = st.denials.sum(slot);
            if count >= s.denial_threshold {
                let score = count as f64 / s.denial_threshold as f64;
                let gate = &mut st.gates[gate_index(SignalKind::DenialBurst)];
                emit(
                    &mut out,
                    gate,
                    s.cooldown_ms,
                    SignalKind::DenialBurst,
                    who,
                    observed,
                    score,
                    now,
                    || {
                        json!({
                            "count": count,
                            "window_ms": s.denial.window_ms(),
                            "threshold": s.denial_threshold,
                        })
                    },
                );
            }
        }

        if event.clause_bound == Some(false) {
            let slot = s.unbound.slot(now);
            st.unbound.add(slot, 1);
            let count = st.unbound.sum(slot);
            if count >= s.unbound_threshold {
                let score = count as f64 / s.unbound_threshold as f64;
                let clause = event.clause.map(truncated);
                let gate = &mut st.gates[gate_index(SignalKind::UnboundClause)];
                emit(
                    &mut out,
                    gate,
                    s.cooldown_ms,
                    SignalKind::UnboundClause,
                    who,
                    observed,
                    score,
                    now,
                    || {
                        json!({
                            "count": count,
                            "window_ms": s.unbound.window_ms(),
                            "threshold": s.unbound_threshold,
                            "clause": clause,
                            "allowed": event.allowed,
                        })
                    },
                );
            }
        }

        if event.bytes_out > 0 {
            let slot = s.egress.slot(now);
            st.egress.add(slot, event.bytes_out);
            let bytes = st.egress.sum(slot);
            let base = st.base_bytes(s);
            let relative = (s.egress_factor * base).max(s.egress_min as f64);
            let (limit, trigger) = if warm && relative < s.egress_max as f64 {
                (relative, "baseline")
            } else {
                (s.egress_max as f64, "absolute")
            };
            if bytes as f64 > limit {
                let score = bytes as f64 / limit;
                let gate = &mut st.gates[gate_index(SignalKind::EgressBytes)];
                emit(
                    &mut out,
                    gate,
                    s.cooldown_ms,
                    SignalKind::EgressBytes,
                    who,
                    observed,
                    score,
                    now,
                    || {
                        json!({
                            "bytes": bytes,
                            "window_ms": s.egress.window_ms(),
                            "threshold": limit,
                            "trigger": trigger,
                            "baseline_bytes": if warm { Value::from(base) } else { Value::Null },
                            "factor": s.egress_factor,
                        })
                    },
                );
            }
        }
        out
    }

    /// Feeds one failed TLS handshake or authentication. `workload` is the peer's SPIFFE
    /// ID when its certificate parsed (unauthenticated: the signal says so); failures
    /// without one are counted together under [`UNKNOWN_PEER`].
    pub fn on_auth_failure(
        &self,
        workload: Option<&str>,
        reason: &str,
        now_ms: u64,
    ) -> Vec<Signal> {
        let s = &self.s;
        let mut out = Vec::new();
        let who = workload.unwrap_or(UNKNOWN_PEER);
        let mut shard = lock(self.shard(who));
        let Some((st, outcome)) = shard.auth.get_or_insert(Observed::Peer, who, || AuthState {
            last_ms: now_ms,
            ..AuthState::default()
        }) else {
            return out;
        };
        self.count(&outcome);
        let now = now_ms.max(st.last_ms);
        st.last_ms = now;
        let slot = s.auth.slot(now);
        st.failures.add(slot, 1);
        let count = st.failures.sum(slot);
        if count >= s.auth_threshold {
            let score = count as f64 / s.auth_threshold as f64;
            emit(
                &mut out,
                &mut st.gate,
                s.cooldown_ms,
                SignalKind::AuthFailures,
                who,
                Observed::Peer,
                score,
                now,
                || {
                    json!({
                        "count": count,
                        "window_ms": s.auth.window_ms(),
                        "threshold": s.auth_threshold,
                        "reason": truncated(reason),
                        "identified": workload.is_some(),
                    })
                },
            );
        }
        out
    }

    /// Feeds one sandbox violation of the sidecar's own workload. `action` is what the
    /// sandbox did: `kill` signals at once; `eperm`, `log` (and anything else) count
    /// toward the threshold.
    pub fn on_sandbox_violation(
        &self,
        workload: &str,
        syscall: &str,
        action: &str,
        now_ms: u64,
    ) -> Vec<Signal> {
        let s = &self.s;
        let mut out = Vec::new();
        let mut shard = lock(self.shard(workload));
        let Some((st, outcome)) = shard
            .workloads
            .get_or_insert(Observed::Own, workload, || WorkloadState::new(now_ms, s))
        else {
            return out;
        };
        self.count(&outcome);
        let now = st.advance(now_ms, s);
        let slot = s.sandbox.slot(now);
        st.sandbox.add(slot, 1);
        let count = st.sandbox.sum(slot);
        let score = if action == "kill" {
            KILL_SCORE
        } else if count >= s.sandbox_threshold {
            count as f64 / s.sandbox_threshold as f64
        } else {
            return out;
        };
        let gate = &mut st.gates[gate_index(SignalKind::SandboxViolation)];
        emit(
            &mut out,
            gate,
            s.cooldown_ms,
            SignalKind::SandboxViolation,
            workload,
            Observed::Own,
            score,
            now,
            || {
                json!({
                    "count": count,
                    "window_ms": s.sandbox.window_ms(),
                    "threshold": s.sandbox_threshold,
                    "syscall": truncated(syscall),
                    "action": truncated(action),
                })
            },
        );
        out
    }

    /// Workloads currently tracked (peers, own, and authentication-failure sources).
    pub fn tracked(&self) -> usize {
        self.tracked.load(Ordering::Relaxed)
    }

    /// Workloads dropped (least recently seen first) to stay within `max_workloads`.
    pub fn evicted(&self) -> u64 {
        self.evicted.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests;
