//! [`Detectors`]: every detector's state for every tracked workload, fed by the request
//! path, the TLS acceptor and the sandbox, and turned into [`Signal`]s.
//!
//! State is sharded by workload (one mutex per shard, held for well under a
//! microsecond) and bounded: at most `max_workloads` entries of fixed size.
//! Authentication failures live in a table of their own, since the peer id of a failed
//! handshake is not authenticated and anyone can invent new ones.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock};
use std::time::Duration;

use serde_json::{Map, Value, json};

use crate::budget::{Budget, MAX_DISTINCT_CLAUSES};
use crate::config::DetectorConfig;
use crate::signal::{Baseline, FleetSample, Observed, RequestEvent, Signal, SignalKind};
use crate::table::{Lru, Outcome};
use crate::window::{Bounded, Gate, Ring, Span};

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
    /// The fleet's baselines (from the gateway): a workload first seen here starts from
    /// its fleet baseline, else from the prior.
    fleet: RwLock<HashMap<String, Baseline>>,
    max_fleet: usize,
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
    /// Priors, per tick.
    prior_rate: f64,
    prior_bytes: f64,
    /// Most a baseline may grow in one tick.
    growth_per_tick: f64,
    long_alpha: f64,
    long_factor: f64,
    budget_rate: Span,
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

fn positive(v: f64, default: f64) -> f64 {
    if v.is_finite() && v > 0.0 { v } else { default }
}

fn tick_s(c: &DetectorConfig) -> f64 {
    ms(c.baseline.tick) as f64 / 1000.0
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
            prior_rate: positive(c.baseline.prior_rate_per_s, 25.0) * tick_s(c),
            prior_bytes: positive(c.baseline.prior_bytes_per_s, 65536.0) * tick_s(c),
            growth_per_tick: factor(c.baseline.max_growth)
                .powf(ms(c.baseline.tick) as f64 / ms(c.baseline.growth_period) as f64),
            long_alpha: (ms(c.baseline.tick) as f64 / ms(c.baseline.long_horizon) as f64)
                .clamp(f64::MIN_POSITIVE, 1.0),
            long_factor: factor(c.baseline.long_factor),
            budget_rate: Span::new(c.budget.rate_window),
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
    /// Requests and bytes per tick while active: the short baseline, and the long one
    /// it is compared against (both growth-bounded).
    rate_base: Bounded,
    bytes_base: Bounded,
    long_rate: Bounded,
    long_bytes: Bounded,
    /// Still on the prior: replaced by the fleet's baseline when that arrives.
    from_prior: bool,
    /// Active ticks folded in since the last fleet report.
    report_ticks: u32,
    /// Budget windows: requests over `budget.rate_window`, bytes over the budget's own
    /// window (whose slot length is `budget_slot_ms`), and the clauses named in it
    /// (hash, last seen), at most `MAX_DISTINCT_CLAUSES`.
    budget_rate: Ring,
    budget_bytes: Ring,
    budget_slot_ms: u64,
    clauses: Vec<(u64, u64)>,
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
    /// A workload first seen now: it starts from the fleet's baseline when the gateway
    /// has one, else from the prior; never from nothing, so it is never its own
    /// baseline.
    fn new(now_ms: u64, s: &Settings, fleet: Option<&Baseline>) -> Self {
        let tick = now_ms / s.tick_ms;
        let mut st = Self {
            last_ms: now_ms,
            first_tick: tick,
            tick,
            ..Self::default()
        };
        st.seed(s, fleet);
        st
    }

    fn seed(&mut self, s: &Settings, fleet: Option<&Baseline>) {
        let tick_s = s.tick_ms as f64 / 1000.0;
        let (rate, bytes, long_rate, long_bytes) = match fleet {
            Some(b) => (
                b.rate_per_s * tick_s,
                b.bytes_per_s * tick_s,
                b.long_rate_per_s * tick_s,
                b.long_bytes_per_s * tick_s,
            ),
            None => (s.prior_rate, s.prior_bytes, s.prior_rate, s.prior_bytes),
        };
        self.rate_base = Bounded::seeded(rate);
        self.bytes_base = Bounded::seeded(bytes);
        self.long_rate = Bounded::seeded(long_rate);
        self.long_bytes = Bounded::seeded(long_bytes);
        self.from_prior = fleet.is_none();
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
    /// Returns (short, long) baseline requests per second when the short baseline has
    /// outgrown the long one by `long_factor`.
    fn advance(&mut self, now_ms: u64, s: &Settings) -> (u64, Option<(f64, f64)>) {
        let now = now_ms.max(self.last_ms);
        self.last_ms = now;
        let tick = now / s.tick_ms;
        let mut drift = None;
        if tick != self.tick {
            // Idle ticks in between are not sampled (the baseline is the rate while
            // active), nor is the partial tick the entry was created in.
            if self.tick != self.first_tick && self.tick_requests > 0 {
                let requests = self.tick_requests as f64;
                let tick_s = s.tick_ms as f64 / 1000.0;
                let rate_anomalous = requests / tick_s >= s.rate_min
                    && requests >= s.rate_factor * self.rate_base.value();
                let (up, relax) = (s.growth_per_tick, s.long_alpha);
                self.rate_base
                    .fold(requests, s.alpha, rate_anomalous, up, relax, s.prior_rate);
                self.long_rate.fold(
                    requests,
                    s.long_alpha,
                    rate_anomalous,
                    up,
                    relax,
                    s.prior_rate,
                );
                let bytes = self.tick_bytes as f64;
                let min_per_tick =
                    s.egress_min as f64 * s.tick_ms as f64 / s.egress.window_ms() as f64;
                let bytes_anomalous =
                    bytes > (s.egress_factor * self.bytes_base.value()).max(min_per_tick);
                self.bytes_base
                    .fold(bytes, s.alpha, bytes_anomalous, up, relax, s.prior_bytes);
                self.long_bytes.fold(
                    bytes,
                    s.long_alpha,
                    bytes_anomalous,
                    up,
                    relax,
                    s.prior_bytes,
                );
                self.report_ticks = self.report_ticks.saturating_add(1);
                let short = self.rate_base.value() / tick_s;
                let long = self.long_rate.value() / tick_s;
                if short >= s.rate_min && short >= s.long_factor * long {
                    drift = Some((short, long));
                }
            }
            self.tick = tick;
            self.tick_requests = 0;
            self.tick_bytes = 0;
        }
        (now, drift)
    }

    fn baseline(&self, s: &Settings) -> Baseline {
        let per_s = 1000.0 / s.tick_ms as f64;
        Baseline {
            rate_per_s: self.rate_base.value() * per_s,
            bytes_per_s: self.bytes_base.value() * per_s,
            long_rate_per_s: self.long_rate.value() * per_s,
            long_bytes_per_s: self.long_bytes.value() * per_s,
        }
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
            fleet: RwLock::new(HashMap::new()),
            max_fleet: max,
        }
    }

    fn fleet_of(&self, workload: &str) -> Option<Baseline> {
        self.fleet
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(workload)
            .copied()
    }

    /// Takes the fleet's baselines (from the gateway): workloads first seen from now on
    /// start from them, and those still on the prior switch to them. Unusable values
    /// (not finite, not above 0) are skipped; at most `max_workloads` are kept.
    pub fn set_fleet(&self, baselines: impl IntoIterator<Item = (String, Baseline)>) {
        let map: HashMap<String, Baseline> = baselines
            .into_iter()
            .filter(|(_, b)| b.is_usable())
            .take(self.max_fleet)
            .collect();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.workloads.for_each(|key, _, st| {
                if st.from_prior
                    && let Some(b) = map.get(key)
                {
                    st.seed(&self.s, Some(b));
                }
            });
        }
        *self.fleet.write().unwrap_or_else(PoisonError::into_inner) = map;
    }

    /// This sidecar's contribution to the fleet baselines: its own workloads' local
    /// baselines, those with active ticks since the last call (which resets them).
    pub fn fleet_report(&self) -> Vec<FleetSample> {
        let mut out = Vec::new();
        for shard in self.shards.iter() {
            let mut shard = lock(shard);
            shard.workloads.for_each(|key, observed, st| {
                if observed == Observed::Own && st.report_ticks > 0 {
                    out.push(FleetSample {
                        workload: key.to_string(),
                        baseline: st.baseline(&self.s),
                        ticks: std::mem::take(&mut st.report_ticks),
                    });
                }
            });
        }
        out
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
    /// completes: budget exceeded (when `budget` is the workload's declared one), rate
    /// spike (short window, and the long-window comparison), denial burst, egress bytes,
    /// unbound clause.
    pub fn on_request(
        &self,
        event: &RequestEvent<'_>,
        budget: Option<&Budget>,
        now_ms: u64,
    ) -> Vec<Signal> {
        let s = &self.s;
        let mut out = Vec::new();
        let mut shard = lock(self.shard(event.workload));
        let Some((st, outcome)) =
            shard
                .workloads
                .get_or_insert(event.observed_as, event.workload, || {
                    WorkloadState::new(now_ms, s, self.fleet_of(event.workload).as_ref())
                })
        else {
            return out;
        };
        self.count(&outcome);
        let (now, drift) = st.advance(now_ms, s);
        st.tick_requests += 1;
        st.tick_bytes = st.tick_bytes.saturating_add(event.bytes_out);
        let (who, observed) = (event.workload, event.observed_as);

        if let Some(budget) = budget {
            self.check_budget(&mut out, st, budget, event, now);
        }

        if let Some((short, long)) = drift {
            let gate = &mut st.gates[gate_index(SignalKind::RateSpike)];
            emit(
                &mut out,
                gate,
                s.cooldown_ms,
                SignalKind::RateSpike,
                who,
                observed,
                short / long.max(f64::MIN_POSITIVE),
                now,
                || {
                    json!({
                        "trigger": "long_window",
                        "baseline_per_s": short,
                        "long_baseline_per_s": long,
                        "factor": s.long_factor,
                    })
                },
            );
        }

        let slot = s.rate.slot(now);
        st.rate.add(slot, 1);
        {
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
                            "trigger": "baseline",
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
            let (limit, trigger) = if relative < s.egress_max as f64 {
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
                            "baseline_bytes": base,
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
        let Some((st, outcome)) = shard.workloads.get_or_insert(Observed::Own, workload, || {
            WorkloadState::new(now_ms, s, self.fleet_of(workload).as_ref())
        }) else {
            return out;
        };
        self.count(&outcome);
        let (now, _) = st.advance(now_ms, s);
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

    /// The declared budget's three ceilings, from the first request.
    fn check_budget(
        &self,
        out: &mut Vec<Signal>,
        st: &mut WorkloadState,
        budget: &Budget,
        event: &RequestEvent<'_>,
        now: u64,
    ) {
        let s = &self.s;
        let (who, observed) = (event.workload, event.observed_as);
        let window = Span::new(budget.window);
        if st.budget_slot_ms != window.slot_ms() {
            // A new budget window (or the first request): start its counts afresh.
            st.budget_slot_ms = window.slot_ms();
            st.budget_bytes = Ring::default();
            st.clauses.clear();
        }
        let window_ms = window.window_ms();
        let mut overruns: Vec<(f64, Value)> = Vec::new();

        let slot = s.budget_rate.slot(now);
        st.budget_rate.add(slot, 1);
        let count = st.budget_rate.sum(slot);
        let rate_window_s = s.budget_rate.window_ms() as f64 / 1000.0;
        let limit = budget.requests_per_s * rate_window_s;
        if count as f64 > limit {
            overruns.push((
                count as f64 / limit,
                json!({
                    "budget": "requests_per_s",
                    "limit": budget.requests_per_s,
                    "observed": count as f64 / rate_window_s,
                    "count": count,
                    "window_ms": s.budget_rate.window_ms(),
                }),
            ));
        }

        if event.bytes_out > 0 {
            let slot = window.slot(now);
            st.budget_bytes.add(slot, event.bytes_out);
            let bytes = st.budget_bytes.sum(slot);
            if bytes > budget.egress_bytes {
                overruns.push((
                    bytes as f64 / budget.egress_bytes as f64,
                    json!({
                        "budget": "egress_bytes",
                        "limit": budget.egress_bytes,
                        "observed": bytes,
                        "window_ms": window_ms,
                    }),
                ));
            }
        }

        if let Some(clause) = event.clause {
            let h = self.hasher.hash_one(clause);
            st.clauses.retain(|(_, seen)| seen + window_ms > now);
            if let Some(e) = st.clauses.iter_mut().find(|(c, _)| *c == h) {
                e.1 = now;
            } else {
                if st.clauses.len() >= MAX_DISTINCT_CLAUSES as usize
                    && let Some(oldest) = st
                        .clauses
                        .iter()
                        .enumerate()
                        .min_by_key(|(_, (_, seen))| *seen)
                        .map(|(i, _)| i)
                {
                    st.clauses.swap_remove(oldest);
                }
                st.clauses.push((h, now));
            }
            let distinct = st.clauses.len() as u32;
            if distinct > budget.distinct_clauses {
                overruns.push((
                    f64::from(distinct) / f64::from(budget.distinct_clauses),
                    json!({
                        "budget": "distinct_clauses",
                        "limit": budget.distinct_clauses,
                        "observed": distinct,
                        "window_ms": window_ms,
                        "clause": truncated(clause),
                    }),
                ));
            }
        }

        // The worst overrun speaks for the request (one gate for the kind).
        if let Some((score, evidence)) = overruns.into_iter().max_by(|a, b| a.0.total_cmp(&b.0)) {
            let gate = &mut st.gates[gate_index(SignalKind::BudgetExceeded)];
            emit(
                out,
                gate,
                s.cooldown_ms,
                SignalKind::BudgetExceeded,
                who,
                observed,
                score,
                now,
                || evidence,
            );
        }
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
