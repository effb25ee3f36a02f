//! The one path every change takes, whoever asks (an operator, the expiry loop, the
//! revocation policy): validate, commit to the store, ingest into the hub (which pushes
//! it), and optionally wait for the sidecars' acknowledgements.

use std::sync::Arc;
use std::time::{Duration, Instant};

use nexus_proto::control::{ChangeResponse, Execution, ExecutionClosed, Reinstatement, Revocation};

use crate::config::Config;
use crate::hub::Hub;
use crate::metrics::Metrics;
use crate::store::{Change, Store, StoreError};

/// A change refused before or by the store.
#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    /// The request is malformed (the message says what to fix).
    #[error("{0}")]
    Invalid(String),
    /// The change does not apply to the current state.
    #[error("{0}")]
    Conflict(String),
    /// The store failed.
    #[error("{0}")]
    Store(StoreError),
}

impl From<StoreError> for ChangeError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Conflict(m) => Self::Conflict(m),
            other => Self::Store(other),
        }
    }
}

impl From<ChangeError> for tonic::Status {
    fn from(e: ChangeError) -> Self {
        match e {
            ChangeError::Invalid(m) => tonic::Status::invalid_argument(m),
            ChangeError::Conflict(m) => tonic::Status::failed_precondition(m),
            ChangeError::Store(s) => {
                tracing::error!(error = %s, "store failure");
                tonic::Status::unavailable(format!("the gateway's store failed: {s}"))
            }
        }
    }
}

/// The gateway's core: store, hub, limits.
pub struct Changes {
    /// The store.
    pub store: Arc<Store>,
    /// The hub.
    pub hub: Arc<Hub>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// The configuration.
    pub config: Config,
    /// Evicts a revoked workload's pods (opt-in, `[eviction]`).
    pub evictor: Option<Arc<nexus_kube::PodEvictor>>,
    /// This process's key in the store's replicas table (`name` plus a random suffix).
    pub instance: String,
}

pub(crate) fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// The actor of the changes the gateway makes itself (the expiry loop), followed by its
/// `name`. Operators are SPIFFE IDs (`operators`), so the two never meet.
pub(crate) const GATEWAY_ACTOR: &str = "gateway:";

/// Whether a reinstatement was an operator's decision (made through the admin API, by
/// a SPIFFE ID listed in `operators`), rather than a revocation running out. Only an
/// operator's reinstatement closes a workload's earlier signals (docs/anomaly.md).
pub(crate) fn by_operator(r: &Reinstatement) -> bool {
    r.by.starts_with("spiffe://")
}

/// `bytes` random bytes as lowercase hex.
pub(crate) fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut buf);
    data_encoding::HEXLOWER.encode(&buf)
}

/// A revocation subject: a SPIFFE ID or a `spiffe://td/path/*` prefix, in its
/// normalized spelling (lower-case trust domain), so that one workload has one entry.
pub fn validate_subject(subject: &str) -> Result<String, ChangeError> {
    if subject.is_empty() {
        return Err(ChangeError::Invalid(
            "no workload given: pass a SPIFFE ID or a spiffe://trust-domain/path/* pattern".into(),
        ));
    }
    nexus_identity::canonical_pattern(subject).map_err(|e| ChangeError::Invalid(e.to_string()))
}

pub(crate) fn validate_clause(clause: &str) -> Result<(), ChangeError> {
    let ok = !clause.is_empty()
        && clause.len() <= 128
        && clause
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(ChangeError::Invalid(format!(
            "clause `{clause}` must be 1-128 characters of letters, digits, `-`, `_`, `.`, `:`"
        )))
    }
}

impl Changes {
    /// Commits and pushes a change; `started` is when the call arrived.
    pub async fn apply(
        &self,
        change: Change,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        let kind = match &change {
            Change::Revoke(_) => "revoke",
            Change::Reinstate(_) => "reinstate",
            Change::Open(_) => "open",
            Change::Close(_) => "close",
            Change::Registry(_) => "registry",
        };
        let id = match &change {
            Change::Open(e) => e.id.clone(),
            _ => String::new(),
        };
        let subject = match &change {
            Change::Revoke(r) => r.subject.clone(),
            Change::Reinstate(r) => r.subject.clone(),
            Change::Open(e) => e.plugin.clone(),
            Change::Close(c) => c.id.clone(),
            Change::Registry(_) => String::new(),
        };
        let started_ms =
            unix_ms().saturating_sub(u64::try_from(started.elapsed().as_millis()).unwrap_or(0));
        let delta = self
            .hub
            .commit(&self.store, change, actor, started, started_ms)
            .await?;
        self.metrics.change(kind);
        let wait = wait.min(self.config.limits.max_wait);
        let propagation = if wait.is_zero() {
            self.hub.propagation(delta.revision)
        } else {
            self.hub.wait(delta.revision, wait).await
        };
        let mut response = ChangeResponse {
            revision: delta.revision,
            id,
            subject,
            ..ChangeResponse::default()
        };
        if let Some(p) = propagation {
            response.sidecars = p.sidecars;
            response.acknowledged = p.acknowledged;
            response.all_acknowledged_after_us = p
                .done_after
                .map(|d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1))
                .unwrap_or(0);
        }
        Ok(response)
    }

    /// Revokes `subject` (validated) for `ttl` (zero: until reinstated).
    pub async fn revoke(
        &self,
        subject: &str,
        reason: &str,
        ttl: Duration,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        let subject = &validate_subject(subject)?;
        if reason.len() > self.config.limits.max_reason_bytes {
            return Err(ChangeError::Invalid(format!(
                "reason is {} bytes; the limit is {} (limits.max_reason_bytes)",
                reason.len(),
                self.config.limits.max_reason_bytes
            )));
        }
        let max = self.config.limits.max_revocation_ttl;
        if ttl > max {
            return Err(ChangeError::Invalid(format!(
                "ttl {} is longer than {} (limits.max_revocation_ttl); give a shorter ttl, or none to revoke until reinstated",
                humantime_serde::re::humantime::format_duration(ttl),
                humantime_serde::re::humantime::format_duration(max)
            )));
        }
        let now = unix_ms();
        let expires = if ttl.is_zero() {
            0
        } else {
            now.saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX))
        };
        let revocation = Revocation {
            subject: subject.to_string(),
            reason: if reason.is_empty() {
                "no reason given".into()
            } else {
                reason.to_string()
            },
            by: actor.to_string(),
            at_unix_ms: now,
            expires_unix_ms: expires,
        };
        let response = self
            .apply(Change::Revoke(revocation), actor, started, wait)
            .await?;
        // Revocation reaching the pods: the sidecars already refuse the workload; its
        // pods are evicted too when configured (an exact ID of the ns/NS/sa/SA form).
        if let Some(evictor) = &self.evictor
            && !subject.ends_with("/*")
        {
            let evictor = evictor.clone();
            let hub = self.hub.clone();
            let subject = subject.to_string();
            tokio::spawn(async move {
                // Pods a PodDisruptionBudget protects are retried (eviction.retry_interval,
                // for at most eviction.retry_for) while the workload stays revoked.
                let still_revoked = || hub.is_revoked(&subject);
                match evictor
                    .evict_workload_until_done(&subject, still_revoked)
                    .await
                {
                    Ok(report) => {
                        tracing::warn!(%subject, evicted = ?report.evicted, blocked = ?report.blocked, gone = ?report.gone, failed = ?report.failed, "evicted the revoked workload's pods")
                    }
                    Err(error) => {
                        tracing::error!(%subject, %error, "cannot evict the revoked workload's pods")
                    }
                }
            });
        }
        Ok(response)
    }

    /// Lifts the revocation of `subject`.
    pub async fn reinstate(
        &self,
        subject: &str,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        let subject = &validate_subject(subject)?;
        let change = Change::Reinstate(Reinstatement {
            subject: subject.to_string(),
            by: actor.to_string(),
            at_unix_ms: unix_ms(),
        });
        self.apply(change, actor, started, wait).await
    }

    /// Opens an execution of `clause` for `plugin`; the response carries its id. With a
    /// registry, `plugin` may be a SPIFFE ID, plugin UUID or name, and the execution
    /// runs a certified version (`version`, or the plugin's one certified version).
    #[allow(clippy::too_many_arguments)]
    pub async fn open(
        &self,
        plugin: &str,
        version: &str,
        clause: &str,
        ttl: Duration,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        let registered = if self.config.registry.is_some() {
            Some(self.resolve_version(plugin, version).await?)
        } else if !version.is_empty() {
            return Err(ChangeError::Invalid(
                "this gateway has no plugin registry: open the execution by SPIFFE ID without a version".into(),
            ));
        } else {
            None
        };
        let plugin = match &registered {
            Some(v) => v.spiffe_id.as_str(),
            None => plugin,
        };
        if plugin.contains('*') {
            return Err(ChangeError::Invalid(
                "an execution is for one plugin workload: give its exact SPIFFE ID".into(),
            ));
        }
        let plugin = &nexus_identity::canonical_id(plugin)
            .map_err(|e| ChangeError::Invalid(e.to_string()))?;
        validate_clause(clause)?;
        if ttl.is_zero() || ttl > self.config.limits.max_execution_ttl {
            return Err(ChangeError::Invalid(format!(
                "ttl must be between 1ms and {} (limits.max_execution_ttl)",
                humantime_serde::re::humantime::format_duration(
                    self.config.limits.max_execution_ttl
                )
            )));
        }
        let execution = Execution {
            id: format!("ex-{}", random_hex(8)),
            plugin: plugin.to_string(),
            clause: clause.to_string(),
            not_after_unix_ms: unix_ms()
                .saturating_add(u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX)),
            opened_by: actor.to_string(),
            plugin_uid: registered
                .as_ref()
                .map(|v| v.plugin_uid.clone())
                .unwrap_or_default(),
            plugin_version: registered
                .as_ref()
                .map(|v| v.version.clone())
                .unwrap_or_default(),
            image_digest: registered
                .as_ref()
                .map(|v| v.image_digest.clone())
                .unwrap_or_default(),
        };
        self.apply(Change::Open(execution), actor, started, wait)
            .await
    }

    /// Closes an open execution.
    pub async fn close(
        &self,
        id: &str,
        reason: &str,
        actor: &str,
        started: Instant,
        wait: Duration,
    ) -> Result<ChangeResponse, ChangeError> {
        let change = Change::Close(ExecutionClosed {
            id: id.to_string(),
            reason: reason.to_string(),
            // Filled in by the store, from the execution it closes.
            plugin: String::new(),
        });
        self.apply(change, actor, started, wait).await
    }

    /// Closes expired executions and lifts expired revocations. Another replica may
    /// get there first: its change wins and this one is a no-op.
    pub async fn expire(&self) {
        let now = unix_ms();
        let actor = format!("{GATEWAY_ACTOR}{}", self.config.name);
        for e in self.hub.executions() {
            if e.not_after_unix_ms <= now {
                match self
                    .close(&e.id, "expired", &actor, Instant::now(), Duration::ZERO)
                    .await
                {
                    Ok(_) => {
                        tracing::info!(id = %e.id, plugin = %e.plugin, clause = %e.clause, "execution expired")
                    }
                    Err(ChangeError::Conflict(_)) => {}
                    Err(error) => {
                        tracing::warn!(%error, id = %e.id, "could not close an expired execution")
                    }
                }
            }
        }
        for r in self.hub.revoked() {
            if r.expires_unix_ms != 0 && r.expires_unix_ms <= now {
                match self
                    .reinstate(&r.subject, &actor, Instant::now(), Duration::ZERO)
                    .await
                {
                    Ok(_) => tracing::info!(subject = %r.subject, "revocation expired"),
                    Err(ChangeError::Conflict(_)) => {}
                    Err(error) => {
                        tracing::warn!(%error, subject = %r.subject, "could not lift an expired revocation")
                    }
                }
            }
        }
    }
}
