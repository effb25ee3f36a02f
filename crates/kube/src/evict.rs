//! Revocation that reaches the pods (opt-in): when the gateway revokes
//! `spiffe://<td>/ns/<ns>/sa/<sa>`, the pods running as that ServiceAccount are evicted
//! through the `policy/v1` Eviction subresource, so PodDisruptionBudgets are honoured and
//! the controllers start clean replacements (which SPIRE then decides whether to attest).
//!
//! The gateway's ServiceAccount needs exactly two rights (see `deploy/base/rbac.yaml`):
//! `list` on `pods` and `create` on `pods/eviction`.

use std::path::PathBuf;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::api::policy::v1::Eviction;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, ListParams, PostParams};
use serde::Deserialize;

const SERVICE_ACCOUNT_DIR: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// Where the Kubernetes API is and how to authenticate; the defaults are the in-cluster
/// ones (the pod's projected ServiceAccount token and the cluster CA).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct EvictorConfig {
    /// The API server's URL.
    pub api_server: String,
    /// Bearer token file; re-read as the kubelet rotates it.
    pub token_file: PathBuf,
    /// PEM bundle of the API server's CA; re-read as it rotates.
    pub ca_file: PathBuf,
    /// Accept an `http://` API server URL (tests only: the token would travel in clear).
    pub danger_allow_plain_http: bool,
    /// Per-request timeout.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// How long to wait between tries of a pod a PodDisruptionBudget protects (429), as
    /// `kubectl drain` waits 5 s.
    #[serde(with = "humantime_serde")]
    pub retry_interval: Duration,
    /// How long to keep retrying blocked pods after the revocation (zero: one pass). The
    /// retries stop as soon as the workload is reinstated.
    #[serde(with = "humantime_serde")]
    pub retry_for: Duration,
}

impl Default for EvictorConfig {
    fn default() -> Self {
        EvictorConfig {
            api_server: "https://kubernetes.default.svc".into(),
            token_file: PathBuf::from(format!("{SERVICE_ACCOUNT_DIR}/token")),
            ca_file: PathBuf::from(format!("{SERVICE_ACCOUNT_DIR}/ca.crt")),
            danger_allow_plain_http: false,
            timeout: Duration::from_secs(10),
            retry_interval: Duration::from_secs(5),
            retry_for: Duration::from_secs(300),
        }
    }
}

/// What an eviction pass did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EvictionReport {
    /// The workload's namespace.
    pub namespace: String,
    /// Its ServiceAccount.
    pub service_account: String,
    /// Pods whose eviction was accepted.
    pub evicted: Vec<String>,
    /// Pods a PodDisruptionBudget protects right now (429); retry later.
    pub blocked: Vec<String>,
    /// Pods already gone (404).
    pub gone: Vec<String>,
    /// Pods whose eviction failed otherwise, with the API server's message.
    pub failed: Vec<(String, String)>,
}

/// Why eviction could not run.
#[derive(Debug, thiserror::Error)]
pub enum EvictError {
    /// The ID does not name a Kubernetes workload.
    #[error(
        "`{id}` is not a Kubernetes workload ID ({reason}): eviction needs spiffe://<trust domain>/ns/<namespace>/sa/<service account>"
    )]
    NotAWorkloadId {
        /// The ID.
        id: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The configuration cannot be used.
    #[error("eviction config: {0}")]
    Config(String),
    /// Listing the pods failed.
    #[error("cannot list pods of service account `{service_account}` in `{namespace}`: {source}")]
    List {
        /// The namespace.
        namespace: String,
        /// The ServiceAccount.
        service_account: String,
        /// The client's error.
        #[source]
        source: kube::Error,
    },
}

/// A Kubernetes workload identity: `spiffe://<td>/ns/<namespace>/sa/<service account>`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadId {
    /// The trust domain.
    pub trust_domain: String,
    /// The namespace.
    pub namespace: String,
    /// The ServiceAccount.
    pub service_account: String,
}

impl WorkloadId {
    /// Parses the SPIRE Kubernetes ID shape; anything else is refused with the reason.
    pub fn parse(id: &str) -> Result<WorkloadId, EvictError> {
        let refuse = |reason| EvictError::NotAWorkloadId {
            id: id.into(),
            reason,
        };
        let rest = id
            .strip_prefix("spiffe://")
            .ok_or_else(|| refuse("not a spiffe:// URI"))?;
        let mut parts = rest.split('/');
        let (Some(td), Some("ns"), Some(ns), Some("sa"), Some(sa), None) = (
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
            parts.next(),
        ) else {
            return Err(refuse(
                "the path is not /ns/<namespace>/sa/<service account>",
            ));
        };
        if td.is_empty() {
            return Err(refuse("no trust domain"));
        }
        if !is_dns_label(ns) {
            return Err(refuse("the namespace is not a DNS label"));
        }
        if !is_dns_subdomain(sa) {
            return Err(refuse("the service account is not a DNS subdomain"));
        }
        Ok(WorkloadId {
            trust_domain: td.into(),
            namespace: ns.into(),
            service_account: sa.into(),
        })
    }
}

/// Evicts the pods of a revoked workload.
#[derive(Clone)]
pub struct PodEvictor {
    client: kube::Client,
    retry_interval: Duration,
    retry_for: Duration,
}

impl std::fmt::Debug for PodEvictor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodEvictor").finish_non_exhaustive()
    }
}

impl PodEvictor {
    /// Builds the client. Must be called inside a tokio runtime. Reads the CA file now
    /// (a missing file is an error naming it); the token is read per request.
    pub fn new(cfg: &EvictorConfig) -> Result<PodEvictor, EvictError> {
        let url: http::Uri = cfg
            .api_server
            .parse()
            .map_err(|e| EvictError::Config(format!("api_server `{}`: {e}", cfg.api_server)))?;
        let mut config = kube::Config::new(url.clone());
        match url.scheme_str() {
            Some("https") => {
                let pem = std::fs::read(&cfg.ca_file).map_err(|e| {
                    EvictError::Config(format!(
                        "ca_file `{}`: {e} (in a pod, mount the ServiceAccount token)",
                        cfg.ca_file.display()
                    ))
                })?;
                let certs = rustls_pemfile::certs(&mut pem.as_slice())
                    .map(|c| c.map(|c| c.to_vec()))
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| {
                        EvictError::Config(format!("ca_file `{}`: {e}", cfg.ca_file.display()))
                    })?;
                if certs.is_empty() {
                    return Err(EvictError::Config(format!(
                        "ca_file `{}` holds no PEM certificate",
                        cfg.ca_file.display()
                    )));
                }
                config.root_cert = Some(certs);
                config.root_cert_file = Some(cfg.ca_file.clone());
            }
            Some("http") if cfg.danger_allow_plain_http => {}
            _ => {
                return Err(EvictError::Config(format!(
                    "api_server `{}` must be an https:// URL",
                    cfg.api_server
                )));
            }
        }
        config.auth_info.token_file = Some(cfg.token_file.to_string_lossy().into_owned());
        config.read_timeout = Some(cfg.timeout);
        config.reset_reader_on_write = true;
        config.write_timeout = Some(cfg.timeout);
        // One attempt per call: the gateway decides when to retry (e.g. a 429 from a PDB).
        config.default_retry = false;
        let client = kube::Client::try_from(config)
            .map_err(|e| EvictError::Config(format!("cannot build the client: {e}")))?;
        Ok(PodEvictor {
            client,
            retry_interval: cfg.retry_interval,
            retry_for: cfg.retry_for,
        })
    }

    /// Evicts every pod of the workload `spiffe_id` names: the pods in its namespace whose
    /// `spec.serviceAccountName` is its ServiceAccount. A pod that cannot be evicted does
    /// not stop the others; the report says which.
    pub async fn evict_workload(&self, spiffe_id: &str) -> Result<EvictionReport, EvictError> {
        let id = WorkloadId::parse(spiffe_id)?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &id.namespace);
        let selector = format!("spec.serviceAccountName={}", id.service_account);
        let list = pods
            .list(&ListParams::default().fields(&selector))
            .await
            .map_err(|source| EvictError::List {
                namespace: id.namespace.clone(),
                service_account: id.service_account.clone(),
                source,
            })?;
        let mut report = EvictionReport {
            namespace: id.namespace.clone(),
            service_account: id.service_account.clone(),
            ..Default::default()
        };
        let mut names = Vec::new();
        for pod in list.items {
            let Some(name) = pod.metadata.name else {
                continue;
            };
            if pod.metadata.deletion_timestamp.is_some() {
                report.gone.push(name);
            } else {
                names.push(name);
            }
        }
        self.evict_pods(&pods, spiffe_id, &names, &mut report).await;
        Ok(report)
    }

    /// Evicts the workload's pods as [`PodEvictor::evict_workload`] does, then retries
    /// the pods a PodDisruptionBudget blocked, every `retry_interval` for at most
    /// `retry_for`, while `still_revoked()` holds. Only the blocked pods are retried:
    /// replacements a controller started meanwhile are left to SPIRE and the sidecars.
    /// The report's `blocked` lists the pods still protected when it gave up.
    pub async fn evict_workload_until_done(
        &self,
        spiffe_id: &str,
        still_revoked: impl Fn() -> bool,
    ) -> Result<EvictionReport, EvictError> {
        let mut report = self.evict_workload(spiffe_id).await?;
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &report.namespace);
        let deadline = tokio::time::Instant::now() + self.retry_for;
        while !report.blocked.is_empty()
            && tokio::time::Instant::now() + self.retry_interval <= deadline
        {
            tokio::time::sleep(self.retry_interval).await;
            if !still_revoked() {
                tracing::info!(spiffe_id, blocked = ?report.blocked, "reinstated: no more eviction retries");
                break;
            }
            let blocked = std::mem::take(&mut report.blocked);
            self.evict_pods(&pods, spiffe_id, &blocked, &mut report)
                .await;
        }
        Ok(report)
    }

    async fn evict_pods(
        &self,
        pods: &Api<Pod>,
        spiffe_id: &str,
        names: &[String],
        report: &mut EvictionReport,
    ) {
        for name in names {
            let name = name.clone();
            let namespace = &report.namespace;
            let eviction = Eviction {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    namespace: Some(namespace.clone()),
                    ..Default::default()
                },
                delete_options: None,
            };
            let result: Result<serde_json::Value, _> = pods
                .create_subresource("eviction", &name, &PostParams::default(), &eviction)
                .await;
            match result {
                Ok(_) => {
                    tracing::info!(pod = %name, %namespace, spiffe_id, "evicted pod of revoked workload");
                    report.evicted.push(name);
                }
                Err(kube::Error::Api(status)) if status.code == 429 => {
                    tracing::warn!(pod = %name, %namespace, "eviction blocked by a PodDisruptionBudget");
                    report.blocked.push(name);
                }
                Err(kube::Error::Api(status)) if status.code == 404 => report.gone.push(name),
                Err(e) => {
                    tracing::warn!(pod = %name, %namespace, error = %e, "eviction failed");
                    report.failed.push((name, e.to_string()));
                }
            }
        }
    }
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && !s.starts_with('-')
        && !s.ends_with('-')
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_ids_parse_or_are_refused_with_a_reason() {
        let id = WorkloadId::parse("spiffe://nexus.local/ns/plugins/sa/flood-model").expect("ok");
        assert_eq!(
            (id.namespace.as_str(), id.service_account.as_str()),
            ("plugins", "flood-model")
        );
        for (bad, why) in [
            ("https://nexus.local/ns/a/sa/b", "spiffe://"),
            ("spiffe://nexus.local/plugins/flood", "/ns/"),
            ("spiffe://nexus.local/ns/a/sa/b/extra", "/ns/"),
            ("spiffe://nexus.local/ns/A_B/sa/b", "namespace"),
            ("spiffe://nexus.local/ns/a/sa/", "service account"),
            ("spiffe:///ns/a/sa/b", "trust domain"),
            ("spiffe://nexus.local/ns/a/sa/b,c", "service account"),
        ] {
            let err = WorkloadId::parse(bad).expect_err(bad).to_string();
            assert!(err.contains(why), "{bad}: {err}");
        }
    }

    #[tokio::test]
    async fn plain_http_and_missing_ca_are_refused() {
        let cfg = EvictorConfig {
            api_server: "http://127.0.0.1:1".into(),
            ..Default::default()
        };
        let err = PodEvictor::new(&cfg).expect_err("plain http").to_string();
        assert!(err.contains("https://"), "{err}");
        let cfg = EvictorConfig {
            ca_file: "/nonexistent/ca.crt".into(),
            ..Default::default()
        };
        let err = PodEvictor::new(&cfg).expect_err("no CA").to_string();
        assert!(err.contains("/nonexistent/ca.crt"), "{err}");
    }
}
