//! Fleet baselines (docs/anomaly.md): the gateway keeps one learned baseline per
//! workload (all the pods of one SPIFFE ID together) in its store, so every replica of
//! the gateway and every new pod of the workload starts from it instead of from zero.
//!
//! Who can move it, and how far: only a sidecar reporting about its own workload (the
//! SPIFFE ID of its certificate); reports about anyone else are dropped and counted.
//! A workload with no row starts at the prior. Each report moves the row by `weight`
//! toward what it says, but the row may never grow faster than `max_growth` per
//! `growth_period` of the gateway's clock: a plugin that ramps slowly, a sidecar that
//! lies, or a storm of new replicas all reporting at once move it by the same bounded
//! amount per hour. Values that are not finite or not above zero are refused; values
//! above the clamp bounds are clamped; both are logged, in reports and in rows read
//! back from the store.

use std::sync::Arc;

use nexus_proto::control::{Baseline, FleetBaselines};

use crate::changes::{Changes, unix_ms};
use crate::config::BaselinesConfig;
use crate::store::{StoreError, StoredBaseline};

/// The fleet's baselines.
pub struct Fleet {
    changes: Arc<Changes>,
}

impl std::fmt::Debug for Fleet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Fleet")
    }
}

/// What became of one reported baseline.
#[derive(Debug, PartialEq, Eq)]
pub enum Merged {
    /// Merged into the workload's row.
    Stored,
    /// About another workload than the reporter's own: dropped.
    NotOwn,
    /// A value not finite or negative, or no request rate: dropped.
    Unusable,
}

fn values(b: &StoredBaseline) -> [f64; 4] {
    [
        b.rate_per_s,
        b.bytes_per_s,
        b.long_rate_per_s,
        b.long_bytes_per_s,
    ]
}

/// Clamps `b` to the configured bounds; `None` when a value cannot be used at all.
/// Logs what it changed (`source` says where the values came from).
fn clamp(mut b: StoredBaseline, c: &BaselinesConfig, source: &str) -> Option<StoredBaseline> {
    if !(values(&b).iter().all(|v| v.is_finite() && *v >= 0.0) && b.rate_per_s > 0.0) {
        tracing::warn!(workload = %b.workload, source, values = ?values(&b), "unusable baseline (not finite, negative, or no requests): ignored");
        return None;
    }
    let mut clamped = false;
    for (v, max) in [
        (&mut b.rate_per_s, c.max_rate_per_s),
        (&mut b.long_rate_per_s, c.max_rate_per_s),
        (&mut b.bytes_per_s, c.max_bytes_per_s),
        (&mut b.long_bytes_per_s, c.max_bytes_per_s),
    ] {
        if *v > max {
            *v = max;
            clamped = true;
        }
    }
    if clamped {
        tracing::warn!(workload = %b.workload, source, "absurd baseline clamped to baselines.max_rate_per_s / max_bytes_per_s");
    }
    Some(b)
}

/// The prior row of a workload with no history.
fn prior(workload: &str, c: &BaselinesConfig, now: i64) -> StoredBaseline {
    StoredBaseline {
        workload: workload.to_string(),
        rate_per_s: c.prior_rate_per_s,
        bytes_per_s: c.prior_bytes_per_s,
        long_rate_per_s: c.prior_rate_per_s,
        long_bytes_per_s: c.prior_bytes_per_s,
        reports: 0,
        updated_ms: now,
    }
}

/// `old` moved toward `reported` by the weight, growth-bounded by the time since `old`
/// changed (at most one growth period counts, so a long silence is no licence to jump).
pub fn merge(
    old: &StoredBaseline,
    reported: &StoredBaseline,
    c: &BaselinesConfig,
    now: i64,
) -> StoredBaseline {
    let elapsed = (now - old.updated_ms).max(0) as f64;
    let period = c.growth_period.as_millis().max(1) as f64;
    let up = c.max_growth.powf((elapsed / period).min(1.0));
    // Growth counts on the value plus the prior, so a value that fell to zero can grow
    // back (by at most the prior per period).
    let step = |o: f64, r: f64, prior: f64| (o + c.weight * (r - o)).min((o + prior) * up - prior);
    let (pr, pb) = (c.prior_rate_per_s, c.prior_bytes_per_s);
    StoredBaseline {
        workload: old.workload.clone(),
        rate_per_s: step(old.rate_per_s, reported.rate_per_s, pr),
        bytes_per_s: step(old.bytes_per_s, reported.bytes_per_s, pb),
        long_rate_per_s: step(old.long_rate_per_s, reported.long_rate_per_s, pr),
        long_bytes_per_s: step(old.long_bytes_per_s, reported.long_bytes_per_s, pb),
        reports: old.reports.saturating_add(1),
        updated_ms: now,
    }
}

impl Fleet {
    /// The fleet baselines kept in `changes.store`.
    pub fn new(changes: Arc<Changes>) -> Self {
        Self { changes }
    }

    fn config(&self) -> &BaselinesConfig {
        &self.changes.config.baselines
    }

    /// Merges one report from the sidecar `reporter` (its certificate's SPIFFE ID).
    pub async fn report(
        &self,
        reporter: &str,
        baselines: &[Baseline],
    ) -> Result<Vec<Merged>, StoreError> {
        let c = self.config();
        let mut out = Vec::new();
        for b in baselines {
            if b.workload != reporter {
                tracing::warn!(%reporter, workload = %b.workload, "baseline about another workload than the reporter's own: ignored");
                self.changes.metrics.baseline_report("not_own");
                out.push(Merged::NotOwn);
                continue;
            }
            let now = i64::try_from(unix_ms()).unwrap_or(i64::MAX);
            let reported = StoredBaseline {
                workload: b.workload.clone(),
                rate_per_s: b.rate_per_s,
                bytes_per_s: b.bytes_per_s,
                long_rate_per_s: b.long_rate_per_s,
                long_bytes_per_s: b.long_bytes_per_s,
                reports: 0,
                updated_ms: now,
            };
            let Some(reported) = clamp(reported, c, "report") else {
                self.changes.metrics.baseline_report("unusable");
                out.push(Merged::Unusable);
                continue;
            };
            let old = match self.changes.store.baseline(reporter).await? {
                Some(row) => clamp(row, c, "store").unwrap_or_else(|| prior(reporter, c, now)),
                None => prior(reporter, c, now),
            };
            let new = merge(&old, &reported, c, now);
            self.changes.store.put_baseline(&new).await?;
            self.changes.metrics.baseline_report("stored");
            self.changes.hub.baseline_changed(|| to_proto(new));
            out.push(Merged::Stored);
        }
        Ok(out)
    }

    /// Every baseline to send to sidecars (clamped; unusable rows left out).
    pub async fn all(&self) -> Result<FleetBaselines, StoreError> {
        let c = self.config();
        let rows = self
            .changes
            .store
            .baselines(i64::from(c.max_workloads))
            .await?;
        Ok(FleetBaselines {
            baselines: rows
                .into_iter()
                .filter_map(|row| clamp(row, c, "store"))
                .map(to_proto)
                .collect(),
        })
    }
}

/// The wire form of a fleet baseline (`ticks`: how many reports it merged).
fn to_proto(b: StoredBaseline) -> Baseline {
    Baseline {
        workload: b.workload,
        rate_per_s: b.rate_per_s,
        bytes_per_s: b.bytes_per_s,
        long_rate_per_s: b.long_rate_per_s,
        long_bytes_per_s: b.long_bytes_per_s,
        ticks: u64::try_from(b.reports).unwrap_or(0),
        updated_unix_ms: u64::try_from(b.updated_ms).unwrap_or(0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(rate: f64, updated_ms: i64) -> StoredBaseline {
        StoredBaseline {
            workload: "spiffe://nexus.local/w".into(),
            rate_per_s: rate,
            bytes_per_s: 1000.0,
            long_rate_per_s: rate,
            long_bytes_per_s: 1000.0,
            reports: 0,
            updated_ms,
        }
    }

    #[test]
    fn growth_is_bounded_by_the_gateway_clock_whatever_is_reported() {
        let c = BaselinesConfig::default();
        // A million reports of 1e5/s within one second barely move it.
        let mut b = row(20.0, 0);
        for i in 1..=1000 {
            b = merge(&b, &row(100_000.0, 0), &c, i);
        }
        // (20 + prior 25) * 2^(1s/1h) - 25
        let bound = 45.0 * 2f64.powf(1.0 / 3600.0) - 25.0;
        assert!(b.rate_per_s <= bound + 1e-9, "{b:?} vs {bound}");
        // An hour later: at most x2 more, however long the silence was.
        let later = merge(&b, &row(100_000.0, 0), &c, 1000 + 10 * 3_600_000);
        assert!(
            later.rate_per_s <= (b.rate_per_s + 25.0) * 2.0 - 25.0 + 1e-9,
            "{later:?}"
        );
        // Falling is by the weight.
        let down = merge(&row(100.0, 0), &row(50.0, 0), &c, 1);
        assert!((down.rate_per_s - 90.0).abs() < 1e-9, "{down:?}");
    }

    #[test]
    fn absurd_values_are_clamped_or_refused() {
        let c = BaselinesConfig::default();
        assert!(clamp(row(f64::NAN, 0), &c, "test").is_none());
        assert!(clamp(row(-1.0, 0), &c, "test").is_none());
        assert_eq!(
            clamp(row(1e12, 0), &c, "test").unwrap().rate_per_s,
            100_000.0
        );
    }
}
