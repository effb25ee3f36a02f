//! Prometheus metrics, served in text format on the admin listener.
//!
//! Label values are bounded sets (direction, a known method or `OTHER`, the status code,
//! a fixed list of failure reasons) so the series count stays bounded whatever the
//! traffic.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::{Arc, OnceLock};

use nexus_audit::AuditStats;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// Inbound (mTLS from a peer) or outbound (plain from the local app).
pub type Direction = &'static str;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    direction: &'static str,
    method: &'static str,
    status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LinkLabels {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    direction: &'static str,
    reason: &'static str,
}

/// All the sidecar's metrics.
pub struct Metrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    handshake_failures: Family<ReasonLabels, Counter>,
    connection_errors: Family<ReasonLabels, Counter>,
    svid_expiry: Gauge<i64, AtomicI64>,
    rotations: Counter,
    rejected: Family<ReasonLabels, Counter>,
    decisions: Family<DecisionLabels, Counter>,
    evaluation: Family<DirectionLabels, Histogram>,
    reloads: Family<ResultLabels, Counter>,
    policy_checks: Histogram,
    enforcement_hold: Family<ReasonOnlyLabels, Gauge<i64, AtomicI64>>,
    snapshots_rejected: Counter,
    apply_failures: Counter,
    reports_refused: Family<ReasonOnlyLabels, Counter>,
    sandbox_violations: Family<ActionLabels, Counter>,
    gateway_link: Family<LinkLabels, Gauge<i64, AtomicI64>>,
    gateway_revision: Gauge<i64, AtomicI64>,
    fleet_baselines: Gauge<i64, AtomicI64>,
    records_shipped: Counter,
    signals_dropped: Counter,
    revoked_refusals: Family<DirectionLabels, Counter>,
    connections_closed_revoked: Counter,
    anomaly_signals: Family<KindLabels, Counter>,
    otel_spans_exported: Counter,
    otel_spans_dropped: Family<ReasonOnlyLabels, Counter>,
    otel_export_failures: Family<SignalLabels, Counter>,
    audit_written: Counter,
    audit_dropped: Counter,
    audit_write_errors: Counter,
    audit_queue_depth: Gauge<i64, AtomicI64>,
    audit_refused: Counter,
    shed: Family<DirectionLabels, Counter>,
    timed_out: Family<DirectionLabels, Counter>,
    in_flight: Family<DirectionLabels, Gauge<i64, AtomicI64>>,
    worker_connections: Family<WorkerLabels, Gauge<i64, AtomicI64>>,
    /// The connection workers, read at scrape time (`limits.runtime = "workers"`).
    workers: OnceLock<Arc<nexus_serve::Workers>>,
    /// Where the audit counters are read at scrape time (the recorder keeps its own).
    audit_stats: OnceLock<AuditStatsSource>,
    policy_mode: Family<ModeLabels, Gauge<i64, AtomicI64>>,
    policy_cached: Family<ModeLabels, Gauge<i64, AtomicI64>>,
    cache_hits: Counter,
    cache_misses: Counter,
    cache_uncached: Counter,
    cache_evictions: Counter,
    cache_refused: Counter,
    cache_entries: Gauge<i64, AtomicI64>,
    cache_bytes: Gauge<i64, AtomicI64>,
    engine_panics: Counter,
    rvm_checks: Counter,
    rvm_disagreements: Counter,
    rvm_routed: Counter,
    native_decisions: Counter,
    native_fallbacks: Counter,
    /// Where the policy's mode and cache counters are read at scrape time.
    policy_stats: OnceLock<PolicyStatsSource>,
}

/// What the policy layer reports at scrape time.
#[derive(Clone, Debug, Default)]
pub struct PolicyStats {
    /// Per decision rule (enforced and shadow): the mode it runs in
    /// (`compiled`/`interpreted`) and whether its decisions are cached.
    pub rules: Vec<(String, &'static str, bool)>,
    /// The decision cache's counters.
    pub cache: nexus_policy::CacheStats,
}

/// Reads the policy layer's state; `None` before a revision is loaded.
pub type PolicyStatsSource = Box<dyn Fn() -> Option<PolicyStats> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ModeLabels {
    rule: String,
    mode: &'static str,
}

/// Reads the execution recorder's counters; `None` before it has started.
pub type AuditStatsSource = Box<dyn Fn() -> Option<AuditStats> + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonOnlyLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SignalLabels {
    signal: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    direction: &'static str,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DirectionLabels {
    direction: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WorkerLabels {
    worker: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("nexus");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "requests",
            "Requests proxied, by direction, method and response status",
            requests.clone(),
        );
        let handshake_failures = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "tls_handshake_failures",
            "TLS handshakes that failed, by direction and reason",
            handshake_failures.clone(),
        );
        let connection_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "connection_errors",
            "Connections closed on an HTTP error (malformed request, oversized head, header timeout)",
            connection_errors.clone(),
        );
        let svid_expiry = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "svid_expiry_timestamp_seconds",
            "notAfter of the current X.509-SVID as a unix timestamp",
            svid_expiry.clone(),
        );
        let rotations = Counter::default();
        registry.register(
            "svid_rotations",
            "SVIDs published after the first",
            rotations.clone(),
        );
        let rejected = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "rejected_requests",
            "Requests answered 400 before policy because their target is ambiguous or malformed, by reason",
            rejected.clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "policy_decisions",
            "Policy decisions by direction and result (allow, deny, error, dry_run_deny, no_policy, shadow_*)",
            decisions.clone(),
        );
        let evaluation = Family::<DirectionLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                1e-6, 2.5e-6, 5e-6, 1e-5, 2.5e-5, 5e-5, 1e-4, 1e-3, 1e-2, 5e-2,
            ])
        });
        registry.register(
            "policy_evaluation_seconds",
            "Time to evaluate the decision rule",
            evaluation.clone(),
        );
        let reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "policy_reloads",
            "Policy revision loads by result (ok, error: refused, the last good revision kept)",
            reloads.clone(),
        );
        let policy_checks = Histogram::new([0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]);
        registry.register(
            "policy_check_seconds",
            "Time to check a policy revision in the isolated child (spawn, load, tests, compile)",
            policy_checks.clone(),
        );
        let enforcement_hold = Family::<ReasonOnlyLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "enforcement_hold",
            "1 while every request is refused for this reason (no_valid_snapshot: no verified gateway state yet; apply_failed: a revision could not be applied)",
            enforcement_hold.clone(),
        );
        let snapshots_rejected = Counter::default();
        registry.register(
            "snapshot_files_rejected",
            "Kept gateway snapshot files refused at start (unreadable, damaged, checksum mismatch)",
            snapshots_rejected.clone(),
        );
        let apply_failures = Counter::default();
        registry.register(
            "gateway_apply_failures",
            "Gateway revisions that could not be applied (reported to the gateway, retried)",
            apply_failures.clone(),
        );
        let reports_refused = Family::<ReasonOnlyLabels, Counter>::default();
        registry.register(
            "reports_refused",
            "Violation reports refused (wrong listener, peer uid, token, malformed)",
            reports_refused.clone(),
        );
        let otel_spans_exported = Counter::default();
        registry.register(
            "otel_spans_exported",
            "Spans delivered to the OTLP collector",
            otel_spans_exported.clone(),
        );
        let otel_spans_dropped = Family::<ReasonOnlyLabels, Counter>::default();
        registry.register(
            "otel_spans_dropped",
            "Spans that never reached the OTLP collector, by reason (queue_full: the bounded export queue was full; export_failed: lost in a failed export)",
            otel_spans_dropped.clone(),
        );
        let otel_export_failures = Family::<SignalLabels, Counter>::default();
        registry.register(
            "otel_export_failures",
            "OTLP exports that failed, by signal (traces, metrics)",
            otel_export_failures.clone(),
        );
        let sandbox_violations = Family::<ActionLabels, Counter>::default();
        registry.register(
            "sandbox_violations",
            "Sandbox violations reported by nexus-launch, by action (kill, eperm, log)",
            sandbox_violations.clone(),
        );
        let gateway_link = Family::<LinkLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "gateway_link",
            "1 for the control stream's current state (standalone, connected, disconnected, fail_closed)",
            gateway_link.clone(),
        );
        let fleet_baselines = Gauge::default();
        registry.register(
            "anomaly_fleet_baselines",
            "Workloads whose fleet baseline the gateway last sent (a workload new here starts from it)",
            fleet_baselines.clone(),
        );
        let gateway_revision = Gauge::default();
        registry.register(
            "gateway_revision",
            "The gateway revision this sidecar applied and acknowledged",
            gateway_revision.clone(),
        );
        let records_shipped = Counter::default();
        registry.register(
            "records_shipped",
            "Execution records the gateway acknowledged as stored",
            records_shipped.clone(),
        );
        let signals_dropped = Counter::default();
        registry.register(
            "signals_dropped",
            "Anomaly signals dropped because the buffer for the gateway was full",
            signals_dropped.clone(),
        );
        let revoked_refusals = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "revocation_refusals",
            "Requests refused because a party is revoked or the gateway is lost past fail_closed_after",
            revoked_refusals.clone(),
        );
        let connections_closed_revoked = Counter::default();
        registry.register(
            "revoked_connections_closed",
            "Open connections closed because their peer (or this workload) was revoked",
            connections_closed_revoked.clone(),
        );
        let anomaly_signals = Family::<KindLabels, Counter>::default();
        registry.register(
            "anomaly_signals",
            "Anomaly signals raised by this sidecar's detectors, by kind",
            anomaly_signals.clone(),
        );
        let audit_written = Counter::default();
        registry.register(
            "audit_records_written",
            "Execution records handed to the audit sink",
            audit_written.clone(),
        );
        let audit_dropped = Counter::default();
        registry.register(
            "audit_records_dropped",
            "Execution records dropped because the recorder's queue was full or it was not running",
            audit_dropped.clone(),
        );
        let audit_write_errors = Counter::default();
        registry.register(
            "audit_write_errors",
            "Execution records lost because the audit sink failed to write them",
            audit_write_errors.clone(),
        );
        let audit_queue_depth = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "audit_queue_depth",
            "Execution records waiting for the writer",
            audit_queue_depth.clone(),
        );
        let audit_refused = Counter::default();
        registry.register(
            "audit_refused",
            "Requests refused with 503 in strict audit mode because records could not be written",
            audit_refused.clone(),
        );
        let shed = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "requests_shed",
            "Requests answered 503 with retry-after because limits.max_in_flight requests were already in flight on the listener",
            shed.clone(),
        );
        let timed_out = Family::<DirectionLabels, Counter>::default();
        registry.register(
            "requests_timed_out",
            "Requests answered 504 because no response came within limits.request_timeout",
            timed_out.clone(),
        );
        let in_flight = Family::<DirectionLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "requests_in_flight",
            "Requests in flight (until their response body ends), by direction",
            in_flight.clone(),
        );
        let worker_connections = Family::<WorkerLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "worker_connections",
            "Connections each connection worker is serving (limits.runtime = \"workers\")",
            worker_connections.clone(),
        );
        let policy_mode = Family::<ModeLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "policy_mode",
            "1 for the mode each decision rule of the current revision runs in (native: nexus's own evaluator, with the RVM for the inputs it hands on; compiled: regorus RVM; interpreted: regorus's interpreter; native and compiled are checked against the interpreter before serving)",
            policy_mode.clone(),
        );
        let policy_cached = Family::<ModeLabels, Gauge<i64, AtomicI64>>::default();
        registry.register(
            "policy_cache_enabled",
            "1 when the rule's decisions are cached (the revision can be keyed soundly, docs/policy-cache.md), else 0",
            policy_cached.clone(),
        );
        let cache_hits = Counter::default();
        registry.register(
            "policy_cache_hits",
            "Decisions answered from the decision cache",
            cache_hits.clone(),
        );
        let cache_misses = Counter::default();
        registry.register(
            "policy_cache_misses",
            "Cacheable decisions that were evaluated (not kept, expired or of an older revision)",
            cache_misses.clone(),
        );
        let cache_uncached = Counter::default();
        registry.register("policy_cache_bypassed", "Decisions evaluated without the cache (revision not keyable, or no time_ns in the input)", cache_uncached.clone());
        let cache_evictions = Counter::default();
        registry.register(
            "policy_cache_evictions",
            "Cache entries removed to stay within cache_max_entries / cache_max_bytes",
            cache_evictions.clone(),
        );
        let cache_refused = Counter::default();
        registry.register(
            "policy_cache_refused",
            "Misses not kept: the cache was full and the entry that would have made room was asked for at least as often (docs/policy-cache.md)",
            cache_refused.clone(),
        );
        let cache_entries = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "policy_cache_entries",
            "Decisions in the cache",
            cache_entries.clone(),
        );
        let cache_bytes = Gauge::<i64, AtomicI64>::default();
        registry.register(
            "policy_cache_bytes",
            "Bytes held by the decision cache",
            cache_bytes.clone(),
        );
        let engine_panics = Counter::default();
        registry.register(
            "policy_engine_panics",
            "Policy engine panics caught (each a deny)",
            engine_panics.clone(),
        );
        let rvm_checks = Counter::default();
        registry.register(
            "policy_rvm_checks",
            "Compiled programs checked against the interpreter",
            rvm_checks.clone(),
        );
        let rvm_disagreements = Counter::default();
        registry.register(
            "policy_rvm_disagreements",
            "Checks that found a disagreement (the rule then runs interpreted)",
            rvm_disagreements.clone(),
        );
        let rvm_routed = Counter::default();
        registry.register(
            "policy_rvm_routed",
            "Compilations routed to the interpreter by a construct the RVM gets wrong",
            rvm_routed.clone(),
        );
        let native_decisions = Counter::default();
        registry.register(
            "policy_native_decisions",
            "Decisions answered by nexus's own policy evaluator",
            native_decisions.clone(),
        );
        let native_fallbacks = Counter::default();
        registry.register(
            "policy_native_fallbacks",
            "Decisions nexus's own evaluator handed to the RVM (a value it does not model, its step budget)",
            native_fallbacks.clone(),
        );
        Arc::new(Self {
            shed,
            timed_out,
            in_flight,
            worker_connections,
            workers: OnceLock::new(),
            policy_mode,
            policy_cached,
            cache_hits,
            cache_misses,
            cache_uncached,
            cache_evictions,
            cache_refused,
            cache_entries,
            cache_bytes,
            engine_panics,
            rvm_checks,
            rvm_disagreements,
            rvm_routed,
            native_decisions,
            native_fallbacks,
            policy_stats: OnceLock::new(),
            audit_written,
            audit_dropped,
            audit_write_errors,
            audit_queue_depth,
            audit_refused,
            audit_stats: OnceLock::new(),
            sandbox_violations,
            gateway_link,
            gateway_revision,
            fleet_baselines,
            records_shipped,
            signals_dropped,
            revoked_refusals,
            connections_closed_revoked,
            anomaly_signals,
            otel_spans_exported,
            otel_spans_dropped,
            otel_export_failures,
            rejected,
            decisions,
            evaluation,
            reloads,
            policy_checks,
            enforcement_hold,
            snapshots_rejected,
            apply_failures,
            reports_refused,
            registry,
            requests,
            handshake_failures,
            connection_errors,
            svid_expiry,
            rotations,
        })
    }

    /// Counts a proxied request.
    pub fn request(&self, direction: Direction, method: &http::Method, status: http::StatusCode) {
        self.requests
            .get_or_create(&RequestLabels {
                direction,
                method: method_label(method),
                status: status.as_u16(),
            })
            .inc();
    }

    /// Counts a failed handshake.
    pub fn handshake_failure(&self, direction: Direction, reason: &'static str) {
        self.handshake_failures
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts a connection ended by an HTTP-level error.
    pub fn connection_error(&self, direction: Direction, reason: &'static str) {
        self.connection_errors
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts a request refused before policy (bad target).
    pub fn rejected_request(&self, direction: Direction, reason: &'static str) {
        self.rejected
            .get_or_create(&ReasonLabels { direction, reason })
            .inc();
    }

    /// Counts a policy decision.
    pub fn decision(&self, direction: Direction, result: &'static str) {
        self.decisions
            .get_or_create(&DecisionLabels { direction, result })
            .inc();
    }

    /// Records the time one evaluation took.
    pub fn policy_evaluation(&self, direction: Direction, elapsed: std::time::Duration) {
        self.evaluation
            .get_or_create(&DirectionLabels { direction })
            .observe(elapsed.as_secs_f64());
    }

    /// Counts a policy load attempt.
    /// The control stream's state: sets its label to 1 and the others to 0.
    pub fn gateway_link(&self, state: &'static str) {
        for s in ["standalone", "connected", "disconnected", "fail_closed"] {
            self.gateway_link
                .get_or_create(&LinkLabels { state: s })
                .set(i64::from(s == state));
        }
    }

    /// The gateway revision applied.
    pub fn gateway_revision(&self, revision: u64) {
        self.gateway_revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    /// Records acknowledged by the gateway.
    pub fn records_shipped(&self, n: u64) {
        self.records_shipped.inc_by(n);
    }

    /// Signals dropped from the buffer.
    pub fn signals_dropped(&self, n: u64) {
        self.signals_dropped.inc_by(n);
    }

    /// A request shed: the listener was at `limits.max_in_flight`.
    pub fn request_shed(&self, direction: Direction) {
        self.shed
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// A request answered 504: no response within `limits.request_timeout`.
    pub fn request_timed_out(&self, direction: Direction) {
        self.timed_out
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// One more (`delta` 1) or one fewer (`delta` -1) request in flight.
    pub fn in_flight(&self, direction: Direction, delta: i64) {
        self.in_flight
            .get_or_create(&DirectionLabels { direction })
            .inc_by(delta);
    }

    /// A request refused by revocation or gateway loss.
    pub fn revocation_refusal(&self, direction: Direction) {
        self.revoked_refusals
            .get_or_create(&DirectionLabels { direction })
            .inc();
    }

    /// Fleet baselines received from the gateway.
    pub fn fleet_baselines(&self, n: usize) {
        self.fleet_baselines
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    /// An anomaly signal raised.
    pub fn anomaly_signal(&self, kind: &'static str) {
        self.anomaly_signals
            .get_or_create(&KindLabels { kind })
            .inc();
    }

    /// A connection closed because of a revocation.
    pub fn revoked_connection_closed(&self) {
        self.connections_closed_revoked.inc();
    }

    pub fn policy_reload(&self, result: &'static str) {
        self.reloads.get_or_create(&ResultLabels { result }).inc();
    }

    /// Observes the duration of one isolated policy check.
    pub fn policy_check(&self, took: std::time::Duration) {
        self.policy_checks.observe(took.as_secs_f64());
    }

    /// Sets whether every request is refused for `reason`.
    pub fn enforcement_hold(&self, reason: &'static str, on: bool) {
        self.enforcement_hold
            .get_or_create(&ReasonOnlyLabels { reason })
            .set(i64::from(on));
    }

    /// Counts a kept snapshot file refused at start.
    pub fn snapshot_rejected(&self) {
        self.snapshots_rejected.inc();
    }

    /// Counts a gateway revision that could not be applied.
    pub fn apply_failure(&self) {
        self.apply_failures.inc();
    }

    /// Counts a refused violation report.
    pub fn report_refused(&self, reason: &'static str) {
        self.reports_refused
            .get_or_create(&ReasonOnlyLabels { reason })
            .inc();
    }

    /// Counts spans delivered to the OTLP collector.
    pub fn otel_spans_exported(&self, n: u64) {
        self.otel_spans_exported.inc_by(n);
    }

    /// Counts spans that will never reach the collector (`queue_full`, `export_failed`).
    pub fn otel_spans_dropped(&self, reason: &'static str, n: u64) {
        self.otel_spans_dropped
            .get_or_create(&ReasonOnlyLabels { reason })
            .inc_by(n);
    }

    /// Counts a failed OTLP export of `signal` (`traces`, `metrics`).
    pub fn otel_export_failure(&self, signal: &'static str) {
        self.otel_export_failures
            .get_or_create(&SignalLabels { signal })
            .inc();
    }

    /// Counts a sandbox violation reported by the launcher (`kill`, `eperm`, `log`).
    pub fn sandbox_violation(&self, action: &'static str) {
        self.sandbox_violations
            .get_or_create(&ActionLabels { action })
            .inc();
    }

    /// Records a newly published SVID.
    pub fn svid_published(&self, not_after: i64, rotations: u64) {
        self.svid_expiry.set(not_after);
        let seen = self.rotations.get();
        if rotations > seen {
            self.rotations.inc_by(rotations - seen);
        }
    }

    /// Reads the execution recorder's counters from `source` at every scrape.
    pub fn watch_audit(&self, source: AuditStatsSource) {
        let _ = self.audit_stats.set(source);
    }

    /// Counts a request refused because its record could not be written (strict mode).
    pub fn audit_refused(&self) {
        self.audit_refused.inc();
    }

    fn refresh_audit(&self) {
        let Some(stats) = self.audit_stats.get().and_then(|source| source()) else {
            return;
        };
        // The recorder owns these counts: mirror them (they only grow).
        for (counter, value) in [
            (&self.audit_written, stats.written),
            (&self.audit_dropped, stats.dropped),
            (&self.audit_write_errors, stats.write_errors),
        ] {
            counter.inner().fetch_max(value, Ordering::Relaxed);
        }
        self.audit_queue_depth
            .set(i64::try_from(stats.queue_depth).unwrap_or(i64::MAX));
    }

    /// Reads the connections of each of `workers` at every scrape.
    pub fn watch_workers(&self, workers: Arc<nexus_serve::Workers>) {
        let _ = self.workers.set(workers);
    }

    fn refresh_workers(&self) {
        let Some(workers) = self.workers.get() else {
            return;
        };
        for (i, n) in workers.connections().into_iter().enumerate() {
            self.worker_connections
                .get_or_create(&WorkerLabels {
                    worker: i.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// Reads the policy layer's mode and cache counters from `source` at every scrape.
    pub fn watch_policy(&self, source: PolicyStatsSource) {
        let _ = self.policy_stats.set(source);
    }

    fn refresh_policy(&self) {
        let engine = nexus_policy::metrics::counters();
        for (counter, value) in [
            (&self.engine_panics, engine.panics),
            (&self.rvm_checks, engine.verified),
            (&self.rvm_disagreements, engine.disagreements),
            (&self.rvm_routed, engine.routed),
            (&self.native_decisions, engine.native),
            (&self.native_fallbacks, engine.native_fallbacks),
        ] {
            counter.inner().fetch_max(value, Ordering::Relaxed);
        }
        let Some(stats) = self.policy_stats.get().and_then(|source| source()) else {
            return;
        };
        for (rule, mode, cached) in &stats.rules {
            for m in ["native", "compiled", "interpreted"] {
                self.policy_mode
                    .get_or_create(&ModeLabels {
                        rule: rule.clone(),
                        mode: m,
                    })
                    .set(i64::from(*mode == m));
            }
            self.policy_cached
                .get_or_create(&ModeLabels {
                    rule: rule.clone(),
                    mode,
                })
                .set(i64::from(*cached));
        }
        let c = stats.cache;
        for (counter, value) in [
            (&self.cache_hits, c.hits),
            (&self.cache_misses, c.misses),
            (&self.cache_uncached, c.uncached),
            (&self.cache_evictions, c.evictions),
            (&self.cache_refused, c.refused),
        ] {
            counter.inner().fetch_max(value, Ordering::Relaxed);
        }
        self.cache_entries
            .set(i64::try_from(c.entries).unwrap_or(i64::MAX));
        self.cache_bytes
            .set(i64::try_from(c.bytes).unwrap_or(i64::MAX));
    }

    /// The Prometheus text exposition.
    pub fn encode(&self) -> String {
        self.refresh_audit();
        self.refresh_policy();
        self.refresh_workers();
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}

fn method_label(method: &http::Method) -> &'static str {
    known_method(method).unwrap_or("OTHER")
}

/// The name of a standard method (RFC 9110); `None` for an extension method, which a
/// label must not carry as is (unbounded cardinality).
pub fn known_method(method: &http::Method) -> Option<&'static str> {
    Some(match *method {
        http::Method::GET => "GET",
        http::Method::HEAD => "HEAD",
        http::Method::POST => "POST",
        http::Method::PUT => "PUT",
        http::Method::PATCH => "PATCH",
        http::Method::DELETE => "DELETE",
        http::Method::OPTIONS => "OPTIONS",
        http::Method::CONNECT => "CONNECT",
        http::Method::TRACE => "TRACE",
        _ => return None,
    })
}
