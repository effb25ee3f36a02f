//! The gateway's Prometheus metrics (prefix `nexus_gateway`), served on its HTTP admin
//! listener. Label values are fixed sets.

use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ActionLabels {
    action: &'static str,
}

/// All the gateway's metrics.
pub struct Metrics {
    registry: Registry,
    revision: Gauge<i64, AtomicI64>,
    streams: Gauge<i64, AtomicI64>,
    propagation: Family<KindLabels, Histogram>,
    changes: Family<KindLabels, Counter>,
    stream_errors: Family<ReasonLabels, Counter>,
    admin_denied: Counter,
    records_stored: Counter,
    records_refused: Counter,
    signals: Family<ActionLabels, Counter>,
    signals_dropped_by_sidecars: Counter,
    evidence: Family<StatusLabels, Counter>,
    apply_failures: Counter,
    policy_reloads: Family<ResultLabels, Counter>,
    baseline_reports: Family<ResultLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabels {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ResultLabels {
    result: &'static str,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Metrics {
    /// Registers every metric.
    pub fn new() -> Arc<Self> {
        let mut registry = Registry::with_prefix("nexus_gateway");
        let revision = Gauge::default();
        registry.register(
            "revision",
            "The latest revision this gateway has ingested",
            revision.clone(),
        );
        let streams = Gauge::default();
        registry.register(
            "control_streams",
            "Connected sidecar control streams",
            streams.clone(),
        );
        let propagation = Family::<KindLabels, Histogram>::new_with_constructor(|| {
            Histogram::new([
                0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ])
        });
        registry.register(
            "propagation_seconds",
            "Time from a change's call to the last acknowledgement by the sidecars connected then",
            propagation.clone(),
        );
        let changes = Family::<KindLabels, Counter>::default();
        registry.register(
            "changes",
            "Changes committed through this gateway",
            changes.clone(),
        );
        let stream_errors = Family::<ReasonLabels, Counter>::default();
        registry.register(
            "control_stream_errors",
            "Control streams refused or cut, by reason",
            stream_errors.clone(),
        );
        let admin_denied = Counter::default();
        registry.register(
            "admin_denied",
            "Admin calls refused because the caller is not an operator",
            admin_denied.clone(),
        );
        let records_stored = Counter::default();
        registry.register(
            "records_stored",
            "Execution records stored",
            records_stored.clone(),
        );
        let records_refused = Counter::default();
        registry.register(
            "records_refused",
            "Execution record lines refused (malformed or bad hash)",
            records_refused.clone(),
        );
        let signals = Family::<ActionLabels, Counter>::default();
        registry.register(
            "signals",
            "Anomaly signals received, by the revocation policy's action",
            signals.clone(),
        );
        let signals_dropped_by_sidecars = Counter::default();
        registry.register(
            "signals_dropped_by_sidecars",
            "Signals the sidecars report having dropped from their bounded buffers",
            signals_dropped_by_sidecars.clone(),
        );
        let evidence = Family::<StatusLabels, Counter>::default();
        registry.register(
            "signal_evidence",
            "Anomaly signals by what their evidence showed (verified, unverified, not_required)",
            evidence.clone(),
        );
        let apply_failures = Counter::default();
        registry.register(
            "sidecar_apply_failures",
            "Reports from sidecars that could not apply a revision (they refuse requests and retry)",
            apply_failures.clone(),
        );
        let policy_reloads = Family::<ResultLabels, Counter>::default();
        registry.register(
            "revocation_policy_reloads",
            "Revocation policy revisions loaded (ok) or refused (error)",
            policy_reloads.clone(),
        );
        let baseline_reports = Family::<ResultLabels, Counter>::default();
        registry.register(
            "baseline_reports",
            "Fleet baseline reports from sidecars: stored, not_own (about another workload), unusable",
            baseline_reports.clone(),
        );
        Arc::new(Self {
            baseline_reports,
            registry,
            evidence,
            apply_failures,
            policy_reloads,
            revision,
            streams,
            propagation,
            changes,
            stream_errors,
            admin_denied,
            records_stored,
            records_refused,
            signals,
            signals_dropped_by_sidecars,
        })
    }

    /// A fleet baseline report, by result.
    pub fn baseline_report(&self, result: &'static str) {
        self.baseline_reports
            .get_or_create(&ResultLabels { result })
            .inc();
    }

    /// The text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    pub(crate) fn set_revision(&self, revision: u64) {
        self.revision
            .set(i64::try_from(revision).unwrap_or(i64::MAX));
    }

    pub(crate) fn set_streams(&self, n: usize) {
        self.streams.set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub(crate) fn propagation(&self, revocation: bool, after: Duration) {
        let kind = if revocation { "revocation" } else { "other" };
        self.propagation
            .get_or_create(&KindLabels { kind })
            .observe(after.as_secs_f64());
    }

    pub(crate) fn change(&self, kind: &'static str) {
        self.changes.get_or_create(&KindLabels { kind }).inc();
    }

    pub(crate) fn stream_error(&self, reason: &'static str) {
        self.stream_errors
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub(crate) fn admin_denied(&self) {
        self.admin_denied.inc();
    }

    pub(crate) fn records(&self, stored: u64, refused: u64) {
        self.records_stored.inc_by(stored);
        self.records_refused.inc_by(refused);
    }

    pub(crate) fn signal(&self, action: &'static str) {
        self.signals.get_or_create(&ActionLabels { action }).inc();
    }

    pub(crate) fn signals_dropped(&self, n: u64) {
        self.signals_dropped_by_sidecars.inc_by(n);
    }

    pub(crate) fn evidence(&self, status: &'static str) {
        self.evidence.get_or_create(&StatusLabels { status }).inc();
    }

    pub(crate) fn apply_failure(&self) {
        self.apply_failures.inc();
    }

    pub(crate) fn policy_reload(&self, result: &'static str) {
        self.policy_reloads
            .get_or_create(&ResultLabels { result })
            .inc();
    }
}
