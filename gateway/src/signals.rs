//! Anomaly signals from sidecars: attributed to the sidecar that sent them (its
//! certificate's SPIFFE ID, never a field), rate-limited per reporter, stored, checked
//! against their evidence, and, when `[revocation_policy]` is set, judged by the Rego
//! revocation policy with the workload's recent history. A `revoke` decision goes
//! through the same path as `nexusctl revoke`, recorded as made by `policy:<signal id>`.
//!
//! What a signal is worth depends on who could have seen it (docs/threat-model.md):
//!
//! - observed as `self` by the workload's own sidecar (reporter = workload): the
//!   sidecar that carries the workload's traffic; no evidence needed
//!   (`verification.status = "not_required"`);
//! - observed as `peer`: it counts only if the decision ids it cites are execution
//!   records the reporter itself shipped, each showing a request between the reporter
//!   and the workload within the signal's window (`"verified"`), else `"unverified"`.
//!   Records and signals travel in separate batches, so a peer signal whose cited records
//!   have not all arrived waits for them up to `signals.evidence_wait`, and is judged
//!   with what arrived then;
//! - observed as `self` by anyone else: a claim about another workload's insides that its
//!   reporter cannot make (`"unverified"`).
//!
//! The policy sees the outcome as `input.signal.verification` (and each history entry's
//! own), documented in policies/README.md. The revocation policy hot-reloads like the
//! sidecars' policies: a changed folder is checked in an isolated child under
//! `load_timeout`/`load_max_memory` (its tests included) and swapped in only if it
//! passes; the last good revision keeps judging.

use std::collections::{HashMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use nexus_identity::AllowList;
use nexus_policy::{Bundle, EvalMode, Policy, PolicyError, PolicyOptions, Value, isolate};
use nexus_proto::control::Signal;
use tokio::sync::Notify;

use crate::changes::{Changes, unix_ms};
use crate::config::RevocationPolicyConfig;
use crate::store::{RecordFacts, StoreError, StoredSignal};

/// Longest accepted signal kind, evidence (bytes), decision id.
const MAX_KIND: usize = 64;
const MAX_EVIDENCE: usize = 16 * 1024;
const MAX_DECISION_ID: usize = 64;

/// The revocation policy: the revision judging now, reloaded when its folder changes.
pub struct RevocationPolicy {
    config: RevocationPolicyConfig,
    current: ArcSwap<Policy>,
    metrics: Arc<crate::metrics::Metrics>,
    /// The last refusal, for logs and `--check` (empty when the current folder loaded).
    last_error: Mutex<Option<String>>,
}

impl RevocationPolicy {
    fn options(config: &RevocationPolicyConfig) -> PolicyOptions {
        PolicyOptions {
            decision_rule: config.decision_rule.clone(),
            eval_timeout: config.eval_timeout,
            max_instructions: 10_000_000,
            max_made_values: PolicyOptions::default().max_made_values,
            mode: EvalMode::Compiled,
            native: true,
        }
    }

    fn limits(config: &RevocationPolicyConfig) -> isolate::Limits {
        isolate::Limits {
            timeout: config.load_timeout,
            max_memory: config.load_max_memory,
        }
    }

    /// Checks `config.dir` in an isolated child (tests included), then compiles it here.
    pub fn build(config: &RevocationPolicyConfig) -> Result<Policy, PolicyError> {
        let options = Self::options(config);
        let limits = Self::limits(config);
        let request = isolate::request(
            &config.dir,
            vec![config.decision_rule.clone()],
            config.run_tests_on_reload,
            &options,
            limits,
        );
        let checked = isolate::check(&request, limits)?;
        let bundle = Bundle::load(&config.dir)?;
        if bundle.revision != checked.revision {
            return Err(PolicyError::Data {
                file: config.dir.display().to_string(),
                message: format!(
                    "changed while revision {} was being checked; checking the new one next",
                    checked.revision
                ),
            });
        }
        Policy::compile(&bundle, &Value::new_object(), options)
    }

    /// Loads the first revision (an error here stops the gateway: no policy, no start).
    pub fn load(
        config: RevocationPolicyConfig,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Result<Arc<Self>, PolicyError> {
        let policy = Self::build(&config)?;
        tracing::info!(dir = %config.dir.display(), rule = %config.decision_rule, revision = %policy.revision(), "revocation policy loaded");
        metrics.policy_reload("ok");
        Ok(Arc::new(Self {
            config,
            current: ArcSwap::from_pointee(policy),
            metrics,
            last_error: Mutex::new(None),
        }))
    }

    /// The revision judging now.
    pub fn current(&self) -> Arc<Policy> {
        self.current.load_full()
    }

    /// Loads the folder again; swaps it in only if it passes. Blocking.
    pub fn reload(&self) -> Result<(), PolicyError> {
        match Self::build(&self.config) {
            Ok(policy) => {
                let revision = policy.revision().to_string();
                let previous = self.current.swap(Arc::new(policy));
                self.metrics.policy_reload("ok");
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                if previous.revision() != revision {
                    tracing::info!(dir = %self.config.dir.display(), %revision, previous = %previous.revision(), "revocation policy revision loaded");
                }
                Ok(())
            }
            Err(error) => {
                self.metrics.policy_reload("error");
                tracing::error!(
                    dir = %self.config.dir.display(),
                    %error,
                    location = error.location().map(|l| l.to_string()).unwrap_or_default(),
                    serving = %self.current().revision(),
                    "revocation policy refused; the last good revision keeps judging"
                );
                *self.last_error.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(error.to_string());
                Err(error)
            }
        }
    }

    /// Watches the folder forever (`reload_interval`), reloading on every change.
    pub async fn watch(self: Arc<Self>) {
        let dir = self.config.dir.clone();
        let mut last = fingerprint(&dir).await;
        loop {
            tokio::time::sleep(self.config.reload_interval.max(Duration::from_millis(50))).await;
            let now = fingerprint(&dir).await;
            if now == last {
                continue;
            }
            let this = self.clone();
            // Bounded by load_timeout: the check runs in a child that is killed then.
            let _ = tokio::task::spawn_blocking(move || this.reload()).await;
            last = now;
        }
    }
}

async fn fingerprint(dir: &Path) -> isolate::Fingerprint {
    let dir = dir.to_path_buf();
    tokio::task::spawn_blocking(move || isolate::fingerprint(&dir))
        .await
        .unwrap_or_default()
}

/// A token bucket per reporter.
#[derive(Clone, Copy, Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

/// A peer-observed signal waiting for the records it cites.
struct Pending {
    row: StoredSignal,
    cited: Vec<String>,
    deadline: Instant,
    started: Instant,
}

/// The signal intake.
pub struct Signals {
    changes: Arc<Changes>,
    policy: Option<Arc<RevocationPolicy>>,
    seq: AtomicU64,
    prefix: String,
    sidecars: AllowList,
    buckets: Mutex<HashMap<String, Bucket>>,
    pending: Mutex<VecDeque<Pending>>,
    /// Woken when records arrive, so waiting signals are checked again at once.
    records_arrived: Notify,
}

/// What the policy decided about one signal.
#[derive(Clone, Debug, PartialEq)]
pub struct Verdict {
    /// `revoke`, `alert` or `ignore`.
    pub action: String,
    /// Why.
    pub reasons: Vec<String>,
    /// How long a revocation lasts (zero: the policy named none).
    pub ttl: Duration,
}

/// A well-formed decision id (hex, as sidecars make them, or another opaque token).
fn valid_decision_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_DECISION_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn valid_kind(kind: &str) -> bool {
    !kind.is_empty()
        && kind.len() <= MAX_KIND
        && kind
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

impl Signals {
    /// Loads the revocation policy (if one is configured) and starts watching it.
    pub fn new(changes: Arc<Changes>) -> Result<Arc<Self>, String> {
        let policy = match &changes.config.revocation_policy {
            Some(cfg) => Some(
                RevocationPolicy::load(cfg.clone(), changes.metrics.clone())
                    .map_err(|e| format!("revocation policy {}: {e}", cfg.dir.display()))?,
            ),
            None => None,
        };
        let sidecars = AllowList::parse(&changes.config.sidecars).map_err(|e| e.to_string())?;
        let mut salt = [0u8; 4];
        let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut salt);
        let this = Arc::new(Self {
            changes,
            policy,
            seq: AtomicU64::new(0),
            prefix: format!(
                "sig-{}-{}",
                unix_ms(),
                data_encoding::HEXLOWER.encode(&salt)
            ),
            sidecars,
            buckets: Mutex::new(HashMap::new()),
            pending: Mutex::new(VecDeque::new()),
            records_arrived: Notify::new(),
        });
        Ok(this)
    }

    /// Starts the background work: the policy watcher and the evidence waiter.
    pub fn spawn(self: &Arc<Self>) {
        if let Some(policy) = &self.policy {
            tokio::spawn(policy.clone().watch());
        }
        tokio::spawn(self.clone().wait_for_evidence());
    }

    /// The revocation policy, if one is configured.
    pub fn policy(&self) -> Option<&Arc<RevocationPolicy>> {
        self.policy.as_ref()
    }

    /// Records from `reporter` were stored: signals waiting for them are checked again.
    pub fn records_arrived(&self) {
        self.records_arrived.notify_one();
    }

    /// Takes one token of `reporter`'s bucket; false when it is empty.
    fn admit(&self, reporter: &str) -> bool {
        let cfg = &self.changes.config.signals;
        let burst = f64::from(cfg.per_reporter_burst);
        let rate = f64::from(cfg.per_reporter_per_minute) / 60.0;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if buckets.len() > 10_000 {
            // Full buckets carry no state worth keeping.
            buckets.retain(|_, b| b.tokens + b.at.elapsed().as_secs_f64() * rate < burst);
        }
        let bucket = buckets.entry(reporter.to_string()).or_insert(Bucket {
            tokens: burst,
            at: now,
        });
        bucket.tokens =
            (bucket.tokens + now.duration_since(bucket.at).as_secs_f64() * rate).min(burst);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// Stores (and judges, or queues for its evidence) a batch from `reporter`; returns
    /// how many were stored (rate-limited and malformed ones are not).
    pub async fn receive(&self, reporter: &str, batch: Vec<Signal>) -> Result<u64, StoreError> {
        let mut stored = 0;
        let mut limited = 0u64;
        for signal in batch {
            if !self.admit(reporter) {
                limited += 1;
                self.changes.metrics.signal("rate_limited");
                continue;
            }
            let workload = nexus_identity::canonical_id(&signal.workload).ok();
            let valid = valid_kind(&signal.kind)
                && signal.evidence_json.len() <= MAX_EVIDENCE
                && workload.is_some()
                && signal.score.is_finite();
            let Some(workload) = workload.filter(|_| valid) else {
                tracing::warn!(reporter, kind = %signal.kind.escape_debug(), workload = %signal.workload.escape_debug(), "malformed signal dropped");
                self.changes.metrics.signal("malformed");
                continue;
            };
            let evidence = serde_json::from_str::<serde_json::Value>(&signal.evidence_json)
                .ok()
                .filter(|v| v.is_object())
                .unwrap_or_else(|| serde_json::json!({}));
            let max_cited = self.changes.config.signals.max_cited;
            let cited: Vec<String> = signal
                .decision_ids
                .iter()
                .filter(|id| valid_decision_id(id))
                .take(max_cited)
                .cloned()
                .collect();
            let observed_as = if signal.observed_as == "self" {
                "self"
            } else {
                "peer"
            };
            let verification = self.pending_verification(&workload);
            let mut row = StoredSignal {
                id: format!(
                    "{}-{}",
                    self.prefix,
                    self.seq.fetch_add(1, Ordering::Relaxed)
                ),
                reporter: reporter.to_string(),
                workload,
                kind: signal.kind.clone(),
                observed_as: observed_as.into(),
                score: signal.score,
                evidence: evidence.to_string(),
                time_ms: i64::try_from(signal.time_unix_ms).unwrap_or(i64::MAX),
                received_ms: i64::try_from(unix_ms()).unwrap_or(i64::MAX),
                action: String::new(),
                reasons: "[]".into(),
                decision_ids: serde_json::to_string(&cited).unwrap_or_else(|_| "[]".into()),
                verification,
            };
            self.changes.store.insert_signal(&row).await?;
            self.changes
                .hub
                .signal_changed(|| crate::admin::signal_to_proto(&row));
            stored += 1;
            tracing::info!(reporter, workload = %row.workload, kind = %row.kind, observed_as, score = row.score, cited = cited.len(), "signal");
            let started = Instant::now();
            match self.verify(&row, &cited, false).await? {
                Some(verification) => {
                    row.verification = verification.to_string();
                    self.judge_and_act(row, started).await?;
                }
                None => {
                    let queued = {
                        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                        if pending.len() < self.changes.config.signals.max_pending {
                            pending.push_back(Pending {
                                row: row.clone(),
                                cited: cited.clone(),
                                deadline: Instant::now()
                                    + self.changes.config.signals.evidence_wait,
                                started,
                            });
                            true
                        } else {
                            false
                        }
                    };
                    if !queued {
                        // Beyond signals.max_pending a signal is judged now, with what
                        // has arrived.
                        if let Some(verification) = self.verify(&row, &cited, true).await? {
                            row.verification = verification.to_string();
                            self.judge_and_act(row, started).await?;
                        }
                    }
                }
            }
        }
        if limited > 0 {
            tracing::warn!(
                reporter,
                dropped = limited,
                limit_per_minute = self.changes.config.signals.per_reporter_per_minute,
                burst = self.changes.config.signals.per_reporter_burst,
                "signals over the reporter's rate limit dropped (signals.per_reporter_*)"
            );
        }
        Ok(stored)
    }

    /// A new signal's verification, until its evidence is checked: `pending`, with the
    /// plugin versions `workload` runs (with a registry, its open executions' versions,
    /// what its records carry) so that the signal names them.
    fn pending_verification(&self, workload: &str) -> String {
        let mut plugins: Vec<serde_json::Value> = Vec::new();
        for e in self.changes.hub.executions() {
            if e.plugin == workload && !e.plugin_uid.is_empty() {
                let p = serde_json::json!({
                    "plugin_uid": e.plugin_uid,
                    "plugin_version": e.plugin_version,
                    "image_digest": e.image_digest,
                });
                if !plugins.contains(&p) {
                    plugins.push(p);
                }
            }
        }
        let mut out = serde_json::json!({"status": "pending"});
        if !plugins.is_empty() {
            out["plugins"] = plugins.into();
        }
        out.to_string()
    }

    /// Checks a signal's evidence. `None` when it waits for cited records that have not
    /// arrived yet (and `last_chance` is false).
    async fn verify(
        &self,
        row: &StoredSignal,
        cited: &[String],
        last_chance: bool,
    ) -> Result<Option<serde_json::Value>, StoreError> {
        let cfg = &self.changes.config.signals;
        let listed = self.sidecars.allows(&row.reporter);
        let own = row.reporter == row.workload;
        let mut out = serde_json::json!({
            "reporter_listed": listed,
            "reporter_is_workload": own,
            "cited": cited.len(),
        });
        // The plugin versions noted when the signal arrived (see `plugins_of`).
        if let Some(plugins) = serde_json::from_str::<serde_json::Value>(&row.verification)
            .ok()
            .and_then(|v| v.get("plugins").cloned())
        {
            out["plugins"] = plugins;
        }
        let verdict = |out: &mut serde_json::Value, status: &str, reason: String| {
            out["status"] = status.into();
            out["reason"] = reason.into();
        };
        if row.observed_as == "self" {
            if own && listed {
                verdict(
                    &mut out,
                    "not_required",
                    "observed by the workload's own sidecar".into(),
                );
            } else {
                verdict(
                    &mut out,
                    "unverified",
                    format!(
                        "{} reported self-observed behaviour of {}: only the workload's own sidecar can see it",
                        row.reporter, row.workload
                    ),
                );
            }
            return Ok(Some(out));
        }
        if !listed {
            verdict(
                &mut out,
                "unverified",
                format!("{} is not a listed sidecar (`sidecars`)", row.reporter),
            );
            return Ok(Some(out));
        }
        let skew = i64::try_from(cfg.clock_skew.as_millis()).unwrap_or(i64::MAX);
        let window = i64::try_from(cfg.evidence_window.as_millis()).unwrap_or(i64::MAX);
        if row.time_ms > row.received_ms.saturating_add(skew)
            || row.time_ms < row.received_ms.saturating_sub(window)
        {
            verdict(
                &mut out,
                "unverified",
                format!(
                    "the signal's time ({} ms) is not within signals.evidence_window of its arrival ({} ms)",
                    row.time_ms, row.received_ms
                ),
            );
            return Ok(Some(out));
        }
        if cited.is_empty() {
            verdict(
                &mut out,
                "unverified",
                "the signal cites no execution record (does its reporter write and ship records?)"
                    .into(),
            );
            return Ok(Some(out));
        }
        let found: Vec<RecordFacts> = self.changes.store.evidence(&row.reporter, cited).await?;
        if found.len() < cited.len() && !last_chance {
            return Ok(None);
        }
        let (from, to) = (
            row.time_ms.saturating_sub(window),
            row.time_ms.saturating_add(skew),
        );
        let matching: Vec<&RecordFacts> = found
            .iter()
            .filter(|r| {
                let parties = (r.source == row.workload && r.destination == row.reporter)
                    || (r.source == row.reporter && r.destination == row.workload);
                parties && r.time_ms >= from && r.time_ms <= to
            })
            .collect();
        out["found"] = found.len().into();
        out["matching"] = matching.len().into();
        out["window_ms"] = serde_json::json!([from, to]);
        out["decision_ids"] = matching
            .iter()
            .map(|r| r.decision_id.clone())
            .collect::<Vec<_>>()
            .into();
        if !matching.is_empty() && matching.len() == found.len() {
            verdict(
                &mut out,
                "verified",
                format!(
                    "{} of {} cited records shipped by {} show requests between it and {} within the signal's window",
                    matching.len(),
                    cited.len(),
                    row.reporter,
                    row.workload
                ),
            );
        } else if found.is_empty() {
            verdict(
                &mut out,
                "unverified",
                format!(
                    "none of the {} cited records arrived from {} within signals.evidence_wait",
                    cited.len(),
                    row.reporter
                ),
            );
        } else {
            verdict(
                &mut out,
                "unverified",
                format!(
                    "{} of {} cited records shipped by {} do not show a request between it and {} within the signal's window",
                    found.len() - matching.len(),
                    found.len(),
                    row.reporter,
                    row.workload
                ),
            );
        }
        Ok(Some(out))
    }

    /// Judges waiting signals as their records arrive or their wait ends.
    async fn wait_for_evidence(self: Arc<Self>) {
        loop {
            tokio::select! {
                _ = self.records_arrived.notified() => {}
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
            }
            let waiting: Vec<Pending> = {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                pending.drain(..).collect()
            };
            let mut keep = Vec::new();
            for p in waiting {
                let last_chance = Instant::now() >= p.deadline;
                match self.verify(&p.row, &p.cited, last_chance).await {
                    Ok(Some(verification)) => {
                        let mut row = p.row;
                        row.verification = verification.to_string();
                        if let Err(error) = self.judge_and_act(row, p.started).await {
                            tracing::error!(%error, "cannot judge a signal");
                        }
                    }
                    Ok(None) => keep.push(p),
                    Err(error) => {
                        tracing::warn!(%error, "cannot read the records a signal cites; trying again");
                        keep.push(p);
                    }
                }
            }
            if !keep.is_empty() {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                for p in keep.into_iter().rev() {
                    pending.push_front(p);
                }
            }
        }
    }

    /// Runs the policy on a verified-or-not signal, stores the outcome, acts on it.
    async fn judge_and_act(&self, row: StoredSignal, started: Instant) -> Result<(), StoreError> {
        let verification: serde_json::Value =
            serde_json::from_str(&row.verification).unwrap_or_default();
        self.changes
            .metrics
            .evidence(match verification["status"].as_str() {
                Some("verified") => "verified",
                Some("not_required") => "not_required",
                _ => "unverified",
            });
        let Some(policy) = &self.policy else {
            self.changes
                .store
                .set_signal_decision(&row.id, "", "[]", &row.verification)
                .await?;
            self.changes
                .hub
                .signal_changed(|| crate::admin::signal_to_proto(&row));
            self.changes.metrics.signal("none");
            return Ok(());
        };
        let cfg = &policy.config;
        // An operator's reinstatement closes the workload's earlier episode: what was
        // observed before it is kept and listed, but neither judged again nor counted
        // as history (docs/anomaly.md, "After a reinstatement").
        let reinstated = self
            .changes
            .hub
            .reinstated(&row.workload)
            .map(|r| (i64::try_from(r.at_unix_ms).unwrap_or(i64::MAX), r.by));
        let reinstated_ms = reinstated.as_ref().map(|(at, _)| *at);
        let verdict = match &reinstated {
            Some((at, by)) if !after_reinstatement(&row, *at) => Verdict {
                action: "ignore".into(),
                reasons: vec![format!(
                    "observed at {} ms (received at {} ms), before {} was reinstated by {by} at {at} ms: a signal from before an operator's reinstatement does not count toward a new revocation",
                    row.time_ms, row.received_ms, row.workload
                )],
                ttl: Duration::ZERO,
            },
            _ => {
                let window = i64::try_from(cfg.history_window.as_millis()).unwrap_or(i64::MAX);
                let mut since = row.received_ms.saturating_sub(window);
                if let Some(at) = reinstated_ms {
                    since = since.max(at.saturating_add(1));
                }
                let history: Vec<StoredSignal> = self
                    .changes
                    .store
                    .signals(Some(&row.workload), since, i64::from(cfg.history_limit) + 1)
                    .await?
                    .into_iter()
                    .filter(|s| s.id != row.id)
                    .filter(|s| reinstated_ms.is_none_or(|at| after_reinstatement(s, at)))
                    .take(cfg.history_limit as usize)
                    .collect();
                judge(
                    &policy.current(),
                    &row,
                    &history,
                    self.changes.hub.is_revoked(&row.workload),
                )
            }
        };
        let reasons = serde_json::to_string(&verdict.reasons).unwrap_or_else(|_| "[]".into());
        self.changes
            .store
            .set_signal_decision(&row.id, &verdict.action, &reasons, &row.verification)
            .await?;
        self.changes.hub.signal_changed(|| {
            let mut judged = row.clone();
            judged.action = verdict.action.clone();
            judged.reasons = reasons.clone();
            crate::admin::signal_to_proto(&judged)
        });
        self.changes.metrics.signal(match verdict.action.as_str() {
            "revoke" => "revoke",
            "alert" => "alert",
            "ignore" => "ignore",
            _ => "error",
        });
        match verdict.action.as_str() {
            "revoke" => {
                let reason = format!(
                    "{} signal from {}: {}",
                    row.kind,
                    row.reporter,
                    verdict.reasons.join("; ")
                );
                // An automatic revocation always ends: the policy's ttl, at most
                // limits.max_revocation_ttl (also when it named none).
                let max = self.changes.config.limits.max_revocation_ttl;
                let ttl = if verdict.ttl.is_zero() || verdict.ttl > max {
                    if !verdict.ttl.is_zero() {
                        tracing::warn!(asked = ?verdict.ttl, max = ?max, "the revocation policy's ttl is capped at limits.max_revocation_ttl");
                    }
                    max
                } else {
                    verdict.ttl
                };
                let mut reason = reason;
                if reason.len() > self.changes.config.limits.max_reason_bytes {
                    let mut cut = self
                        .changes
                        .config
                        .limits
                        .max_reason_bytes
                        .saturating_sub(3);
                    while !reason.is_char_boundary(cut) {
                        cut -= 1;
                    }
                    reason.truncate(cut);
                    reason.push_str("...");
                }
                match self
                    .changes
                    .revoke(
                        &row.workload,
                        &reason,
                        ttl,
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
            }
            "alert" => {
                tracing::warn!(workload = %row.workload, kind = %row.kind, reporter = %row.reporter, verification = %verification["status"], reasons = ?verdict.reasons, "anomaly alert");
            }
            _ => {}
        }
        Ok(())
    }
}

/// Whether `s` came after a reinstatement at `reinstated_ms` (unix ms): observed after
/// it by its reporter's clock, and received after it by the gateway's. Observed time
/// decides: a signal raised before the reinstatement but buffered through a gateway
/// outage arrives after it and still belongs to the episode the operator closed. The
/// receipt time bounds the reporter's claim: a signal that reached the gateway before
/// the reinstatement cannot be moved past it by dating it in the future.
fn after_reinstatement(s: &StoredSignal, reinstated_ms: i64) -> bool {
    s.time_ms.min(s.received_ms) > reinstated_ms
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
        "decision_ids": serde_json::from_str::<serde_json::Value>(&s.decision_ids).unwrap_or_default(),
        "verification": serde_json::from_str::<serde_json::Value>(&s.verification).unwrap_or_default(),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn signal(time_ms: i64, received_ms: i64) -> StoredSignal {
        StoredSignal {
            id: "sig-1".into(),
            reporter: "spiffe://nexus.local/w".into(),
            workload: "spiffe://nexus.local/w".into(),
            kind: "rate_spike".into(),
            observed_as: "self".into(),
            score: 9.0,
            evidence: "{}".into(),
            time_ms,
            received_ms,
            action: String::new(),
            reasons: "[]".into(),
            decision_ids: "[]".into(),
            verification: "{}".into(),
        }
    }

    #[test]
    fn only_signals_observed_and_received_after_a_reinstatement_count() {
        let reinstated = 1_000;
        assert!(after_reinstatement(&signal(1_001, 1_002), reinstated));
        // Observed before, buffered through a gateway outage, received after.
        assert!(!after_reinstatement(&signal(900, 5_000), reinstated));
        // Received before, dated after by its reporter.
        assert!(!after_reinstatement(&signal(9_000, 999), reinstated));
        // The reinstatement's own millisecond belongs to the episode it closed.
        assert!(!after_reinstatement(&signal(1_000, 1_001), reinstated));
    }
}
