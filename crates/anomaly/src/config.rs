//! Detector thresholds. Every field has a safe default, so an empty `[anomaly]` table
//! (or none) gives working detectors; [`DetectorConfig::validate`] names a field that
//! cannot work and says how to fix it.

use std::time::Duration;

use serde::Deserialize;

/// All detector settings (the sidecar's `[anomaly]` table).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DetectorConfig {
    /// Most workloads (peers and the sidecar's own) tracked at once; beyond it the least
    /// recently seen is dropped and counted. One eighth of it is reserved for
    /// authentication failures, whose peer ids are not authenticated, so a flood of
    /// forged ids cannot evict the state of real peers. Default 4096 (about 1 KiB each).
    pub max_workloads: usize,
    /// Least time between two signals of one kind about one workload; what arrives in
    /// between is counted as `suppressed` in the next signal's evidence. A signal whose
    /// score is at least twice the last one's still goes out (an escalating attack is
    /// reported as it grows). Default 5s: a workload reinstated and re-offending is seen again within seconds.
    #[serde(with = "humantime_serde")]
    pub cooldown: Duration,
    /// The adaptive baseline shared by the rate and egress detectors.
    pub baseline: BaselineConfig,
    /// Declared budgets from the bindings.
    pub budget: BudgetConfig,
    /// Fleet baselines shared through the gateway.
    pub fleet: FleetConfig,
    /// Request-rate spikes against the baseline.
    pub rate_spike: RateSpikeConfig,
    /// Bursts of policy denials.
    pub denial_burst: DenialBurstConfig,
    /// Bytes a workload sends.
    pub egress_bytes: EgressConfig,
    /// Requests naming clauses outside the workload's bindings.
    pub unbound_clause: UnboundClauseConfig,
    /// TLS and authentication failures attributed to one peer.
    pub auth_failures: AuthFailuresConfig,
    /// Sandbox violations other than `kill` (a `kill` signals at once).
    pub sandbox_violation: SandboxViolationConfig,
}

impl Default for DetectorConfig {
    fn default() -> Self {
        Self {
            max_workloads: 4096,
            cooldown: Duration::from_secs(5),
            baseline: BaselineConfig::default(),
            budget: BudgetConfig::default(),
            fleet: FleetConfig::default(),
            rate_spike: RateSpikeConfig::default(),
            denial_burst: DenialBurstConfig::default(),
            egress_bytes: EgressConfig::default(),
            unbound_clause: UnboundClauseConfig::default(),
            auth_failures: AuthFailuresConfig::default(),
            sandbox_violation: SandboxViolationConfig::default(),
        }
    }
}

/// The per-workload EWMA of requests and bytes per tick, where it starts, and how fast
/// it may move (docs/anomaly.md: a plugin must not be able to train it).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BaselineConfig {
    /// Length of one baseline sample. Default 1s.
    #[serde(with = "humantime_serde")]
    pub tick: Duration,
    /// Weight of each new tick in the EWMA (0 < alpha <= 1). Ticks already judged
    /// anomalous count as at most twice the baseline at a tenth of the weight, so a
    /// flood does not become the new normal.
    /// Ticks without requests are not sampled: the baseline is the rate while active,
    /// so a workload resuming after a pause is not a spike. Default 0.05 (about 20 ticks).
    pub alpha: f64,
    /// Where a workload with no fleet baseline (the gateway has no history of it yet)
    /// starts: it is watched against this from its first request, never against
    /// itself. Requests per second while active. Default 25.
    pub prior_rate_per_s: f64,
    /// The same for bytes the workload takes out, per second while active. Default
    /// 65536 (64 KiB/s).
    pub prior_bytes_per_s: f64,
    /// The baseline may grow at most by this factor per `growth_period` (a slow ramp
    /// cannot teach it faster than this). Default 2.
    pub max_growth: f64,
    /// See `max_growth`. Default 1h. (Tests compress time by shortening it.)
    #[serde(with = "humantime_serde")]
    pub growth_period: Duration,
    /// The long-window baseline: an EWMA over about this long (also growth-bounded),
    /// against which the short baseline is compared; it is kept in the fleet baseline,
    /// so a restart does not reset it. Default 24h.
    #[serde(with = "humantime_serde")]
    pub long_horizon: Duration,
    /// Signal (`rate_spike`, trigger `long_window`) when the short baseline has grown
    /// to at least this multiple of the long one: what a ramp inside the growth bound
    /// taught the short window over hours. Default 4.
    pub long_factor: f64,
}

impl Default for BaselineConfig {
    fn default() -> Self {
        Self {
            tick: Duration::from_secs(1),
            alpha: 0.05,
            prior_rate_per_s: 25.0,
            prior_bytes_per_s: 65536.0,
            max_growth: 2.0,
            growth_period: Duration::from_secs(3600),
            long_horizon: Duration::from_secs(24 * 3600),
            long_factor: 4.0,
        }
    }
}

/// Declared budgets (`data.nexus.bindings[ID].budgets`): how they are measured.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetConfig {
    /// The sliding window a budget's `requests_per_s` is measured over. Default 1s.
    #[serde(with = "humantime_serde")]
    pub rate_window: Duration,
}

impl Default for BudgetConfig {
    fn default() -> Self {
        Self {
            rate_window: Duration::from_secs(1),
        }
    }
}

/// Fleet baselines: what this sidecar contributes to the gateway's per-workload
/// baselines, and how often.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct FleetConfig {
    /// How often the sidecar reports its own workload's baseline to the gateway (and
    /// gets the fleet's back). Default 10s.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for FleetConfig {
    fn default() -> Self {
        Self {
            report_interval: Duration::from_secs(10),
        }
    }
}

/// Rate spike: the current rate over a short sliding window against the baseline.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RateSpikeConfig {
    /// The sliding window the current rate is measured over; a spike is seen within
    /// about this long of its onset. Default 250ms.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Signal when the current rate is at least `factor` × the baseline. Default 4.
    pub factor: f64,
    /// ... and at least this many requests per second, so that 1 → 10 requests/s is not
    /// a spike. Default 25.
    pub min_rate_per_s: f64,
}

impl Default for RateSpikeConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_millis(250),
            factor: 4.0,
            min_rate_per_s: 25.0,
        }
    }
}

/// Egress: the bytes a workload sent over a sliding window.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct EgressConfig {
    /// The sliding window. Default 10s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Signal above this many bytes per window, whatever the baseline. Default 256 MiB.
    pub max_bytes: u64,
    /// Once the baseline is warm, also signal above `factor` × the baseline's bytes per
    /// window ... Default 10.
    pub factor: f64,
    /// ... when that is at least this many bytes per window (a workload that usually
    /// sends nothing may still send a little). Default 4 MiB.
    pub min_bytes: u64,
}

impl Default for EgressConfig {
    fn default() -> Self {
        Self {
            window: Duration::from_secs(10),
            max_bytes: 256 << 20,
            factor: 10.0,
            min_bytes: 4 << 20,
        }
    }
}

/// A count of events over a sliding window: one type per detector, so that a table
/// setting only `threshold` keeps that detector's own default window.
macro_rules! count_config {
    ($(#[$doc:meta])* $name:ident, window: $window:expr, threshold: $threshold:expr) => {
        $(#[$doc])*
        #[derive(Clone, Debug, Deserialize, PartialEq)]
        #[serde(deny_unknown_fields, default)]
        pub struct $name {
            /// The sliding window.
            #[serde(with = "humantime_serde")]
            pub window: Duration,
            /// Signal when the window holds at least this many events.
            pub threshold: u64,
        }

        impl Default for $name {
            fn default() -> Self {
                Self {
                    window: $window,
                    threshold: $threshold,
                }
            }
        }
    };
}

count_config!(
    /// Denials of the workload's requests. Default 20 in 10s.
    DenialBurstConfig,
    window: Duration::from_secs(10),
    threshold: 20
);
count_config!(
    /// Requests naming a clause the workload is not bound to. Default 3 in 10s.
    UnboundClauseConfig,
    window: Duration::from_secs(10),
    threshold: 3
);
count_config!(
    /// Failed handshakes or authentications of one peer. Default 10 in 10s.
    AuthFailuresConfig,
    window: Duration::from_secs(10),
    threshold: 10
);
count_config!(
    /// `eperm` and `log` sandbox violations (a `kill` signals at once). Default 5 in 60s.
    SandboxViolationConfig,
    window: Duration::from_secs(60),
    threshold: 5
);

/// A setting that cannot work.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    /// A duration is zero or shorter than the detector can measure.
    #[error("anomaly.{field} must be at least 10ms (got {got:?})")]
    TooShort {
        /// The dotted field name.
        field: &'static str,
        /// The configured value.
        got: Duration,
    },
    /// A number is out of its range.
    #[error("anomaly.{field} must be {expected} (got {got})")]
    OutOfRange {
        /// The dotted field name.
        field: &'static str,
        /// The accepted range, in words.
        expected: &'static str,
        /// The configured value.
        got: String,
    },
}

impl DetectorConfig {
    /// Checks every field; the sidecar refuses a config that fails (exit 64).
    /// [`crate::Detectors::new`] clamps such values instead of failing.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let durations = [
            ("cooldown", self.cooldown),
            ("baseline.tick", self.baseline.tick),
            ("baseline.growth_period", self.baseline.growth_period),
            ("baseline.long_horizon", self.baseline.long_horizon),
            ("budget.rate_window", self.budget.rate_window),
            ("fleet.report_interval", self.fleet.report_interval),
            ("rate_spike.window", self.rate_spike.window),
            ("denial_burst.window", self.denial_burst.window),
            ("egress_bytes.window", self.egress_bytes.window),
            ("unbound_clause.window", self.unbound_clause.window),
            ("auth_failures.window", self.auth_failures.window),
            ("sandbox_violation.window", self.sandbox_violation.window),
        ];
        for (field, got) in durations {
            if got < Duration::from_millis(10) {
                return Err(ConfigError::TooShort { field, got });
            }
        }
        let range = |field, expected, ok: bool, got: String| {
            if ok {
                Ok(())
            } else {
                Err(ConfigError::OutOfRange {
                    field,
                    expected,
                    got,
                })
            }
        };
        range(
            "max_workloads",
            "at least 2",
            self.max_workloads >= 2,
            self.max_workloads.to_string(),
        )?;
        let alpha = self.baseline.alpha;
        range(
            "baseline.alpha",
            "in (0, 1]",
            alpha > 0.0 && alpha <= 1.0,
            alpha.to_string(),
        )?;
        for (field, prior) in [
            ("baseline.prior_rate_per_s", self.baseline.prior_rate_per_s),
            (
                "baseline.prior_bytes_per_s",
                self.baseline.prior_bytes_per_s,
            ),
        ] {
            range(
                field,
                "above 0",
                prior > 0.0 && prior.is_finite(),
                prior.to_string(),
            )?;
        }
        for (field, factor) in [
            ("baseline.max_growth", self.baseline.max_growth),
            ("baseline.long_factor", self.baseline.long_factor),
            ("rate_spike.factor", self.rate_spike.factor),
            ("egress_bytes.factor", self.egress_bytes.factor),
        ] {
            range(
                field,
                "greater than 1",
                factor > 1.0 && factor.is_finite(),
                factor.to_string(),
            )?;
        }
        let min_rate = self.rate_spike.min_rate_per_s;
        range(
            "rate_spike.min_rate_per_s",
            "0 or more",
            min_rate >= 0.0 && min_rate.is_finite(),
            min_rate.to_string(),
        )?;
        range(
            "egress_bytes.max_bytes",
            "at least 1",
            self.egress_bytes.max_bytes >= 1,
            "0".into(),
        )?;
        for (field, threshold) in [
            ("denial_burst.threshold", self.denial_burst.threshold),
            ("unbound_clause.threshold", self.unbound_clause.threshold),
            ("auth_failures.threshold", self.auth_failures.threshold),
            (
                "sandbox_violation.threshold",
                self.sandbox_violation.threshold,
            ),
        ] {
            range(field, "at least 1", threshold >= 1, "0".into())?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_table_gives_the_defaults_and_they_validate() {
        let c: DetectorConfig = toml::from_str("").unwrap();
        assert_eq!(c, DetectorConfig::default());
        c.validate().unwrap();
    }

    #[test]
    fn durations_are_humantime_and_unknown_fields_are_refused() {
        let c: DetectorConfig = toml::from_str(
            "cooldown = \"5s\"\n[rate_spike]\nwindow = \"200ms\"\nfactor = 6.0\n\
             [unbound_clause]\nthreshold = 1\n",
        )
        .unwrap();
        assert_eq!(c.cooldown, Duration::from_secs(5));
        assert_eq!(c.rate_spike.window, Duration::from_millis(200));
        assert_eq!(c.rate_spike.min_rate_per_s, 25.0);
        assert_eq!(c.unbound_clause.threshold, 1);
        assert_eq!(c.unbound_clause.window, Duration::from_secs(10));
        let err = toml::from_str::<DetectorConfig>("[rate_spike]\nfactr = 3.0\n").unwrap_err();
        assert!(err.to_string().contains("factr"), "{err}");
    }

    #[test]
    fn validate_names_the_field() {
        let mut c = DetectorConfig::default();
        c.rate_spike.factor = 1.0;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("anomaly.rate_spike.factor"), "{e}");
        let mut c = DetectorConfig::default();
        c.denial_burst.window = Duration::ZERO;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("anomaly.denial_burst.window"), "{e}");
        let mut c = DetectorConfig::default();
        c.auth_failures.threshold = 0;
        assert!(c.validate().is_err());
    }
}
