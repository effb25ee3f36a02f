//! Anomaly signals from sidecars: attributed to the sidecar that sent them (its
//! certificate's SPIFFE ID, never a field), stored, and, when `[revocation_policy]` is
//! set, judged by the Rego revocation policy with the workload's recent history. A
//! `revoke` decision goes through the same path as `nexusctl revoke`, recorded as made
//! by `policy:<signal id>`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nexus_policy::{Bundle, EvalMode, Policy, PolicyOptions, Value};
use nexus_proto::control::Signal;

use crate::changes::{Changes, unix_ms};
use crate::config::RevocationPolicyConfig;
use crate::store::{StoreError, StoredSignal};

/// Longest accepted signal kind, evidence (bytes).
const MAX_KIND: usize = 64;
const MAX_EVIDENCE: usize = 16 * 1024;

/// The signal intake.
pub struct Signals {
    changes: Arc<Changes>,
    policy: Option<(Policy, RevocationPolicyConfig)>,
    seq: AtomicU64,
    prefix: String,
}

/// What the policy decided about one signal.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `revoke`, `alert` or `ignore`.
    pub action: String,
    /// Why.
    pub reasons: Vec<String>,
    /// How long a revocation lasts (zero: until reinstated).
    pub ttl: Duration,
}

impl Signals {
    /// Loads and compiles the revocation policy if one is configured.
    pub fn new(changes: Arc<Changes>) -> Result<Self, String> {
        let policy = match &changes.config.revocation_policy {
            Some(cfg) => {
                let bundle = Bundle::load(&cfg.dir).map_err(|e| e.to_string())?;
                let policy = Policy::compile(
                    &bundle,
                    &Value::new_object(),
                    PolicyOptions {
                        decision_rule: cfg.decision_rule.clone(),
                        eval_timeout: cfg.eval_timeout,
                        max_instructions: 10_000_000,
                        mode: EvalMode::Compiled,
                    },
                )
                .map_err(|e| format!("revocation policy {}: {e}", cfg.dir.display()))?;
                tracing::info!(dir = %cfg.dir.display(), rule = %cfg.decision_rule, revision = %policy.revision(), "revocation policy loaded");
                Some((policy, cfg.clone()))
            }
            None => None,
        };
        let mut salt = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
        Ok(Self {
            changes,
            policy,
            seq: AtomicU64::new(0),
            prefix: format!(
                "sig-{}-{:02x}{:02x}{:02x}{:02x}",
                unix_ms(),
                salt[0],
                salt[1],
                salt[2],
                salt[3]
            ),
        })
    }

    /// Stores (and judges) a batch from `reporter`; returns how many were stored.
    pub async fn receive(&self, reporter: &str, batch: Vec<Signal>) -> Result<u64, StoreError> {
        let mut stored = 0;
        for signal in batch {
            let valid = !signal.kind.is_empty()
                && signal.kind.len() <= MAX_KIND
                && signal.evidence_json.len() <= MAX_EVIDENCE
                && nexus_identity::AllowList::parse(&[&signal.workload]).is_ok()
                && !signal.workload.ends_with("/*")
                && signal.score.is_finite();
            if !valid {
                tracing::warn!(reporter, kind = %signal.kind, workload = %signal.workload, "malformed signal dropped");
                self.changes.metrics.signal("malformed");
                continue;
            }
            let evidence = serde_json::from_str::<serde_json::Value>(&signal.evidence_json)
                .ok()
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({}));
            let row = StoredSignal {
                id: format!(
                    "{}-{}",
                    self.prefix,
                    self.seq.fetch_add(1, Ordering::Relaxed)
                ),
                reporter: reporter.to_string(),
                workload: signal.workload.clone(),
                kind: signal.kind.clone(),
                observed_as: if signal.observed_as == "self" {
                    "self".into()
                } else {
                    "peer".into()
                },
                score: signal.score,
                evidence: evidence.to_string(),
                time_ms: i64::try_from(signal.time_unix_ms).unwrap_or(i64::MAX),
                received_ms: i64::try_from(unix_ms()).unwrap_or(i64::MAX),
                action: String::new(),
                reasons: "[]".into(),
            };
            self.changes.store.insert_signal(&row).await?;
            stored += 1;
            tracing::info!(reporter, workload = %row.workload, kind = %row.kind, score = row.score, "signal");
            let Some((policy, cfg)) = &self.policy else {
                self.changes.metrics.signal("none");
                continue;
            };
            let started = Instant::now();
            let since =
                row.received_ms - i64::try_from(cfg.history_window.as_millis()).unwrap_or(i64::MAX);
            let history: Vec<StoredSignal> = self
                .changes
                .store
                .signals(Some(&row.workload), since, i64::from(cfg.history_limit) + 1)
                .await?
                .into_iter()
                .filter(|s| s.id != row.id)
                .take(cfg.history_limit as usize)
                .collect();
            let verdict = judge(
                policy,
                &row,
                &history,
                self.changes.hub.is_revoked(&row.workload),
            );
            let reasons = serde_json::to_string(&verdict.reasons).unwrap_or_else(|_| "[]".into());
            self.changes
                .store
                .set_signal_decision(&row.id, &verdict.action, &reasons)
                .await?;
            self.changes.metrics.signal(match verdict.action.as_str() {
                "revoke" => "revoke",
                "alert" => "alert",
                "ignore" => "ignore",
                _ => "error",
            });
            if verdict.action == "revoke" {
                let reason = format!(
                    "{} signal from {}: {}",
                    row.kind,
                    reporter,
                    verdict.reasons.join("; ")
                );
                match self
                    .changes
                    .revoke(
                        &row.workload,
                        &reason,
                        verdict.ttl,
                        &format!("policy:{}", row.id),
                        started,
                        Duration::ZERO,
                    )
                    .await
                {
                    Ok(change) => {
                        tracing::warn!(workload = %row.workload, revision = change.revision, %reason, "revoked by the revocation policy")
                    }
                    Err(error) => {
                        tracing::error!(%error, workload = %row.workload, "the revocation policy's revoke failed")
                    }
                }
            } else if verdict.action == "alert" {
                tracing::warn!(workload = %row.workload, kind = %row.kind, reasons = ?verdict.reasons, "anomaly alert");
            }
        }
        Ok(stored)
    }
}

fn signal_json(s: &StoredSignal) -> serde_json::Value {
    serde_json::json!({
        "id": s.id,
        "kind": s.kind,
        "workload": s.workload,
        "reporter": s.reporter,
        "observed_as": s.observed_as,
        "score": s.score,
        "evidence": serde_json::from_str::<serde_json::Value>(&s.evidence).unwrap_or_default(),
        "time_ms": s.time_ms,
        "received_ms": s.received_ms,
    })
}

/// Evaluates the revocation policy; an error or an unknown answer is an `alert` (never
/// a silent revoke, never a silent drop).
pub fn judge(
    policy: &Policy,
    signal: &StoredSignal,
    history: &[StoredSignal],
    revoked: bool,
) -> Verdict {
    let input = serde_json::json!({
        "signal": signal_json(signal),
        "history": history.iter().map(signal_json).collect::<Vec<_>>(),
        "workload": {"spiffe_id": signal.workload, "revoked": revoked},
        "now_ms": unix_ms(),
    });
    let value = match policy.evaluate_value(Value::from(input)) {
        Ok(value) => value,
        Err(error) => {
            return Verdict {
                action: "alert".into(),
                reasons: vec![format!("revocation policy failed: {error}")],
                ttl: Duration::ZERO,
            };
        }
    };
    let json: serde_json::Value = serde_json::to_value(&value).unwrap_or_default();
    let action = json["action"].as_str().unwrap_or("");
    let reasons: Vec<String> = json["reasons"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    match action {
        "revoke" | "alert" | "ignore" => Verdict {
            action: action.into(),
            reasons,
            ttl: json["ttl"]
                .as_str()
                .and_then(|t| humantime_serde::re::humantime::parse_duration(t).ok())
                .unwrap_or(Duration::ZERO),
        },
        _ => Verdict {
            action: "alert".into(),
            reasons: vec![format!("revocation policy answered no action (`{}`)", json)],
            ttl: Duration::ZERO,
        },
    }
}
