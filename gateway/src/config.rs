//! The gateway's configuration: one TOML file, every limit named with a safe default,
//! environment overrides for what a Deployment sets. Errors name the field; `main`
//! exits 64 on them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use nexus_identity::AllowList;
pub use nexus_identity::source::{IdentityConfig, IdentitySource};
use serde::Deserialize;

/// A configuration the gateway cannot run with.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// Not valid TOML for this schema (line and column in the message).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message.
        message: String,
    },
    /// A field has a value the gateway cannot use.
    #[error("config field `{field}`: {problem}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong and what to do.
        problem: String,
    },
}

/// The whole gateway configuration.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// This replica's name in status output. Default: `$HOSTNAME` or `gateway`.
    pub name: String,
    /// The mTLS gRPC listener (control streams and the admin API). Default `0.0.0.0:7443`.
    pub listen: SocketAddr,
    /// Where the gateway's SVID comes from (as the sidecar's `[identity]`).
    pub identity: IdentityConfig,
    /// SPIFFE IDs or `spiffe://td/path/*` prefixes allowed to open control streams.
    /// Default: none (`[]`): no identity gets a control stream unless it is listed here.
    pub sidecars: Vec<String>,
    /// Which of the `sidecars` stand in front of data APIs and so enforce any plugin's
    /// executions: their streams carry every open execution and the full revocation
    /// records (reason, by). Every other sidecar receives only the executions opened for
    /// its own workload and revocations without reason or author (what its policy needs
    /// to refuse a revoked peer). Default: none.
    pub data_sidecars: Vec<String>,
    /// SPIFFE IDs allowed to call the admin API (revoke, reinstate, executions, status).
    /// Default: none, so nothing can be changed until operators are named.
    pub operators: Vec<String>,
    /// SPIFFE IDs or prefixes allowed to certify plugin versions (`nexusctl plugin
    /// certify`); nobody certifies a version they registered. Default: none.
    pub reviewers: Vec<String>,
    /// The plugin registry (docs/registry.md). Present: executions run only certified
    /// plugin versions. Absent: executions name a SPIFFE ID only (no registry).
    pub registry: Option<RegistryConfig>,
    /// SPIFFE IDs allowed to watch the gateway read-only (the Admin `Watch` feed that
    /// `nexusctl console` shows), without changing anything. Operators may watch too.
    /// Default: none.
    pub viewers: Vec<String>,
    /// The HTTP admin listener: `/live`, `/ready`, `/metrics`.
    pub admin: AdminConfig,
    /// The state store.
    pub database: DatabaseConfig,
    /// Control-stream limits and timers.
    pub stream: StreamConfig,
    /// Limits on changes.
    pub limits: LimitsConfig,
    /// The anomaly revocation policy (Rego); absent: signals are stored, never acted on.
    pub revocation_policy: Option<RevocationPolicyConfig>,
    /// How anomaly signals are accepted and verified before the policy sees them.
    pub signals: SignalsConfig,
    /// The anomaly watch's fleet baselines (docs/anomaly.md).
    pub baselines: BaselinesConfig,
    /// The Kubernetes admission webhook that injects the sidecar; absent: not served.
    pub webhook: Option<WebhookConfig>,
    /// Opt-in: a revocation also evicts the workload's pods through the Kubernetes API
    /// (`spiffe://td/ns/NS/sa/SA` -> pods of NS running as SA); absent: off.
    pub eviction: Option<nexus_kube::EvictorConfig>,
}

/// `[webhook]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// HTTPS listen address. Default `0.0.0.0:8443`.
    #[serde(default = "default_webhook_listen")]
    pub listen: SocketAddr,
    /// PEM certificate chain the API server verifies (the webhook configuration's
    /// caBundle signs it), e.g. from cert-manager.
    pub cert: PathBuf,
    /// Its PEM private key.
    pub key: PathBuf,
    /// What injection adds (nexus-kube's InjectConfig: images, resources, socket, ...).
    #[serde(default)]
    pub inject: nexus_kube::InjectConfig,
    /// Most concurrent connections. Default 256.
    #[serde(default = "default_webhook_connections")]
    pub max_connections: usize,
}

fn default_webhook_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 8443))
}
fn default_webhook_connections() -> usize {
    256
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: std::env::var("HOSTNAME").unwrap_or_else(|_| "gateway".into()),
            listen: SocketAddr::from(([0, 0, 0, 0], 7443)),
            identity: IdentityConfig::default(),
            sidecars: Vec::new(),
            data_sidecars: Vec::new(),
            operators: Vec::new(),
            reviewers: Vec::new(),
            registry: None,
            viewers: Vec::new(),
            admin: AdminConfig::default(),
            database: DatabaseConfig::default(),
            stream: StreamConfig::default(),
            limits: LimitsConfig::default(),
            revocation_policy: None,
            signals: SignalsConfig::default(),
            baselines: BaselinesConfig::default(),
            webhook: None,
            eviction: None,
        }
    }
}

/// `[registry]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RegistryConfig {
    /// Trusted publisher keys: `[[registry.publishers]] name = "acme", key = "acme.pub"`
    /// (a cosign.pub: PEM ECDSA P-256). A version is accepted only with a signature by
    /// its plugin's publisher's key. Default: none (nothing can be registered).
    pub publishers: Vec<PublisherConfig>,
    /// Largest export bundle accepted by `plugin import` (bytes). Default 1 MiB.
    pub max_bundle_bytes: usize,
    /// Most versions in one bundle. Default 500.
    pub max_bundle_versions: usize,
    /// Most clauses bound to one version. Default 64.
    pub max_clauses: usize,
    /// Largest signed payload (bytes). Default 4096.
    pub max_payload_bytes: usize,
    /// Largest plugin description (bytes). Default 1024.
    pub max_description_bytes: usize,
    /// Largest `budgets` JSON object of a version (bytes). Default 4096.
    pub max_budgets_bytes: usize,
    /// Namespaces whose pods are plugin pods: the webhook admits them only with images
    /// pinned to certified versions (so are pods anywhere that ask for the sandbox).
    /// Default `["plugins"]`.
    pub plugin_namespaces: Vec<String>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self {
            publishers: Vec::new(),
            max_bundle_bytes: 1024 * 1024,
            max_bundle_versions: 500,
            max_clauses: 64,
            max_payload_bytes: 4096,
            max_description_bytes: 1024,
            max_budgets_bytes: 4096,
            plugin_namespaces: vec!["plugins".into()],
        }
    }
}

/// `[[registry.publishers]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PublisherConfig {
    /// The publisher's name, as plugins name it.
    pub name: String,
    /// Its public key (PEM `PUBLIC KEY`, ECDSA P-256, as `cosign generate-key-pair` writes).
    pub key: PathBuf,
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Default `127.0.0.1:9090`.
    pub listen: SocketAddr,
    /// Written once listening: JSON `{"grpc": "ip:port", "admin": "ip:port"}`.
    pub address_file: Option<PathBuf>,
    /// Concurrent connections; more wait in the accept queue. Default 10000, as the
    /// sidecar's listeners.
    pub max_connections: usize,
    /// A client must send its request head within this time. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Largest request head, bytes. Default 16384; at least 8192.
    pub max_header_bytes: usize,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 9090)),
            address_file: None,
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            max_header_bytes: 16 * 1024,
        }
    }
}

impl AdminConfig {
    /// The connection limits of the admin listener (and the webhook's head limits).
    pub fn conn(&self) -> nexus_serve::ConnLimits {
        nexus_serve::ConnLimits {
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_concurrent_streams: 100,
        }
    }
}

/// `url` with its passwords replaced by `***` (of the user info,
/// `scheme://user:PASSWORD@host/…`, and a `password=` query parameter), for logs and
/// errors.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let authority_end = rest.find(['/', '?']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(authority_end);
    let authority = match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let hidden = if userinfo.contains(':') { ":***" } else { "" };
            format!("{user}{hidden}@{host}")
        }
        None => authority.to_string(),
    };
    let tail = match tail.split_once('?') {
        Some((path, query)) => {
            let params: Vec<String> = query
                .split('&')
                .map(|p| match p.split_once('=') {
                    Some((key, _)) if key.eq_ignore_ascii_case("password") => format!("{key}=***"),
                    _ => p.to_string(),
                })
                .collect();
            format!("{path}?{}", params.join("&"))
        }
        None => tail.to_string(),
    };
    format!("{scheme}://{authority}{tail}")
}

/// `[database]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// `sqlite://PATH` (default `sqlite://nexus-gateway.db`, created if missing) or
    /// `postgres://user:pass@host/db` (several replicas share it). Env:
    /// `NEXUS_GATEWAY_DATABASE_URL`.
    pub url: String,
    /// Pool size. Default 8.
    pub max_connections: u32,
    /// How often the store is checked for changes made through other replicas. With
    /// PostgreSQL they also arrive at once through LISTEN/NOTIFY; polling bounds the
    /// delay if the listening connection is lost. Default 100ms.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// PostgreSQL: how often this replica writes its status (connected sidecars, their
    /// acknowledged revisions, its newest revocation's propagation) to the store, so that
    /// status through any replica shows every replica. Default 1s.
    #[serde(with = "humantime_serde")]
    pub status_report_interval: Duration,
    /// A replica silent this long is left out of status, and its row deleted (a killed
    /// replica). Default 5s; at least twice `status_report_interval`.
    #[serde(with = "humantime_serde")]
    pub status_stale_after: Duration,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "sqlite://nexus-gateway.db".into(),
            max_connections: 8,
            poll_interval: Duration::from_millis(100),
            status_report_interval: Duration::from_secs(1),
            status_stale_after: Duration::from_secs(5),
        }
    }
}

/// `[stream]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StreamConfig {
    /// The gateway sends a heartbeat this often. Default 5s.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A stream silent this long is cut. Default 20s.
    #[serde(with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// A hello must arrive within this. Default 5s.
    #[serde(with = "humantime_serde")]
    pub hello_timeout: Duration,
    /// A TLS handshake that takes longer is dropped. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
    /// Largest message accepted from a sidecar (bytes). Default 1 MiB.
    pub max_message_bytes: usize,
    /// Most streams at once. Default 20000.
    pub max_streams: usize,
    /// Deltas kept in memory for resuming sidecars (older ones get a snapshot). Default 4096.
    pub delta_log: usize,
    /// Most lines in one record batch, signals in one signal batch. Default 1000.
    pub max_batch: usize,
}

impl Default for StreamConfig {
    fn default() -> Self {
        Self {
            heartbeat_interval: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(20),
            hello_timeout: Duration::from_secs(5),
            handshake_timeout: Duration::from_secs(10),
            max_message_bytes: 1024 * 1024,
            max_streams: 20_000,
            delta_log: 4096,
            max_batch: 1000,
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Longest execution a call may open. Default 24h.
    #[serde(with = "humantime_serde")]
    pub max_execution_ttl: Duration,
    /// Longest wait an admin call may ask for. Default 30s.
    #[serde(with = "humantime_serde")]
    pub max_wait: Duration,
    /// How often expired executions and revocations are closed. Default 1s.
    #[serde(with = "humantime_serde")]
    pub expiry_interval: Duration,
    /// Longest reason text. Default 1024 bytes.
    pub max_reason_bytes: usize,
    /// Longest revocation a call (or the revocation policy) may ask for with a ttl; a
    /// revocation without ttl lasts until reinstated. Default 30d.
    #[serde(with = "humantime_serde")]
    pub max_revocation_ttl: Duration,
    /// On SIGTERM, unary calls, webhook reviews and admin requests in flight get this
    /// long (from the signal) to finish. Default 30s; more than 0, at most 1h.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM, `/ready` answers 503 at once; listeners keep accepting for this long,
    /// then close and control streams end (sidecars reconnect to another replica).
    /// Default 5s; less than `shutdown_grace`.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
}

impl LimitsConfig {
    /// The SIGTERM sequence's timing.
    pub fn shutdown(&self) -> nexus_serve::ShutdownTiming {
        nexus_serve::ShutdownTiming {
            drain_delay: self.drain_delay,
            grace: self.shutdown_grace,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_execution_ttl: Duration::from_secs(24 * 3600),
            max_wait: Duration::from_secs(30),
            expiry_interval: Duration::from_secs(1),
            max_reason_bytes: 1024,
            max_revocation_ttl: Duration::from_secs(30 * 24 * 3600),
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
        }
    }
}

/// `[revocation_policy]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RevocationPolicyConfig {
    /// The policy folder (e.g. `policies/`), loaded like `opa eval -d`.
    pub dir: PathBuf,
    /// The rule that decides. Default `data.nexus.revocation.decision`.
    #[serde(default = "default_revocation_rule")]
    pub decision_rule: String,
    /// Signals about the same workload given to the policy as history. Default 10m.
    #[serde(default = "default_history_window", with = "humantime_serde")]
    pub history_window: Duration,
    /// At most this many history entries. Default 100.
    #[serde(default = "default_history_limit")]
    pub history_limit: u32,
    /// Evaluation time limit. Default 250ms.
    #[serde(default = "default_eval_timeout", with = "humantime_serde")]
    pub eval_timeout: Duration,
    /// How often the folder is checked for changes; a changed folder is loaded, tested
    /// and swapped in only if it passes (the last good revision keeps judging). Default 1s.
    #[serde(default = "default_policy_reload", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Run the folder's `*_test.rego` before using a revision. Default true.
    #[serde(default = "default_true")]
    pub run_tests_on_reload: bool,
    /// Loading, testing and compiling a revision runs in a child process that is
    /// killed past this wall-clock time. Default 10s.
    #[serde(default = "default_load_timeout", with = "humantime_serde")]
    pub load_timeout: Duration,
    /// ... and past this much memory (address space, bytes). Default 1 GiB.
    #[serde(default = "default_load_max_memory")]
    pub load_max_memory: u64,
}

fn default_policy_reload() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}
fn default_load_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_load_max_memory() -> u64 {
    1024 * 1024 * 1024
}

/// `[signals]`: what an anomaly signal must carry before the revocation policy trusts
/// it (docs/threat-model.md).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SignalsConfig {
    /// Signals one reporter may send at once before the rate limit applies. Default 60.
    pub per_reporter_burst: u32,
    /// Signals one reporter may send per minute, sustained; beyond, they are dropped
    /// unstored and counted (`nexus_gateway_signals_total{result="rate_limited"}`).
    /// Default 120.
    pub per_reporter_per_minute: u32,
    /// A peer-observed signal waits this long for the execution records it cites to
    /// arrive from its reporter (records and signals travel in separate batches); then
    /// it is judged with what arrived. Default 5s.
    #[serde(with = "humantime_serde")]
    pub evidence_wait: Duration,
    /// Cited records count when they fall within this long before the signal's time.
    /// Default 2m.
    #[serde(with = "humantime_serde")]
    pub evidence_window: Duration,
    /// Clock difference tolerated between a sidecar and the gateway. Default 5s.
    #[serde(with = "humantime_serde")]
    pub clock_skew: Duration,
    /// Most decision ids one signal may cite (more are ignored). Default 32.
    pub max_cited: usize,
    /// Most signals waiting for their evidence at once; a signal beyond it is judged at
    /// once with what has arrived. Default 10000.
    pub max_pending: usize,
}

impl Default for SignalsConfig {
    fn default() -> Self {
        Self {
            per_reporter_burst: 60,
            per_reporter_per_minute: 120,
            evidence_wait: Duration::from_secs(5),
            evidence_window: Duration::from_secs(120),
            clock_skew: Duration::from_secs(5),
            max_cited: 32,
            max_pending: 10_000,
        }
    }
}

/// `[baselines]`: the per-workload baselines the gateway keeps for the fleet of
/// sidecars (docs/anomaly.md): where a new workload starts, how fast a baseline may
/// move, and what is never believed.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BaselinesConfig {
    /// Where a workload with no history starts (requests per second while active):
    /// the first reports move it from here, within the growth bound. Default 25.
    pub prior_rate_per_s: f64,
    /// The same for egress bytes per second. Default 65536.
    pub prior_bytes_per_s: f64,
    /// A fleet baseline grows at most by this factor per `growth_period` of the
    /// gateway's clock, however many sidecars report and whatever they say. Default 2.
    pub max_growth: f64,
    /// See `max_growth`. Default 1h.
    #[serde(with = "humantime_serde")]
    pub growth_period: Duration,
    /// How far one report moves the baseline toward what it says (0 < w <= 1).
    /// Default 0.2.
    pub weight: f64,
    /// Clamp bounds: a reported or stored requests-per-second above this is clamped
    /// to it and logged. Default 100000.
    pub max_rate_per_s: f64,
    /// The same for bytes per second. Default 1073741824 (1 GiB/s).
    pub max_bytes_per_s: f64,
    /// Most baselines sent to a sidecar at once (the most recently updated first).
    /// Default 4096.
    pub max_workloads: u32,
}

impl Default for BaselinesConfig {
    fn default() -> Self {
        Self {
            prior_rate_per_s: 25.0,
            prior_bytes_per_s: 65536.0,
            max_growth: 2.0,
            growth_period: Duration::from_secs(3600),
            weight: 0.2,
            max_rate_per_s: 100_000.0,
            max_bytes_per_s: 1_073_741_824.0,
            max_workloads: 4096,
        }
    }
}

impl BaselinesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let bad = |field: &str, problem: &str| {
            Err(ConfigError::Invalid {
                field: format!("baselines.{field}"),
                problem: problem.into(),
            })
        };
        let positive = |v: f64| v.is_finite() && v > 0.0;
        if !positive(self.prior_rate_per_s) || self.prior_rate_per_s > self.max_rate_per_s {
            return bad(
                "prior_rate_per_s",
                "must be above 0 and at most max_rate_per_s",
            );
        }
        if !positive(self.prior_bytes_per_s) || self.prior_bytes_per_s > self.max_bytes_per_s {
            return bad(
                "prior_bytes_per_s",
                "must be above 0 and at most max_bytes_per_s",
            );
        }
        if !(self.max_growth.is_finite() && self.max_growth > 1.0) {
            return bad("max_growth", "must be a number above 1 (e.g. 2)");
        }
        if self.growth_period < Duration::from_secs(1) {
            return bad("growth_period", "must be at least 1s (e.g. \"1h\")");
        }
        if !(positive(self.weight) && self.weight <= 1.0) {
            return bad("weight", "must be in (0, 1] (e.g. 0.2)");
        }
        if !positive(self.max_rate_per_s) || !positive(self.max_bytes_per_s) {
            return bad(
                "max_rate_per_s",
                "max_rate_per_s and max_bytes_per_s must be above 0",
            );
        }
        if self.max_workloads == 0 {
            return bad("max_workloads", "must be at least 1");
        }
        Ok(())
    }
}

fn default_revocation_rule() -> String {
    "data.nexus.revocation.decision".into()
}
fn default_history_window() -> Duration {
    Duration::from_secs(600)
}
fn default_history_limit() -> u32 {
    100
}
fn default_eval_timeout() -> Duration {
    Duration::from_millis(250)
}

impl Config {
    /// Reads, applies the environment, validates.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        let mut config = Self::parse(&text, &path.display().to_string())?;
        config.apply_env(|k| std::env::var(k).ok())?;
        config.validate()?;
        Ok(config)
    }

    /// Parses TOML text (`origin` names it in errors).
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Environment overrides: `NEXUS_GATEWAY_DATABASE_URL`, `NEXUS_GATEWAY_LISTEN`,
    /// `NEXUS_GATEWAY_ADMIN_LISTEN`, `SPIFFE_ENDPOINT_SOCKET`, and the webhook's injected
    /// images `NEXUS_INJECT_SIDECAR_IMAGE`, `NEXUS_INJECT_LAUNCHER_IMAGE`.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(url) = get("NEXUS_GATEWAY_DATABASE_URL") {
            self.database.url = url;
        }
        for (var, field, target) in [
            ("NEXUS_GATEWAY_LISTEN", "listen", &mut self.listen),
            (
                "NEXUS_GATEWAY_ADMIN_LISTEN",
                "admin.listen",
                &mut self.admin.listen,
            ),
        ] {
            if let Some(v) = get(var) {
                *target = v.parse().map_err(|e| ConfigError::Invalid {
                    field: field.into(),
                    problem: format!("{var}={v} is not ip:port: {e}"),
                })?;
            }
        }
        if self.identity.workload_api_socket.is_none() {
            self.identity.workload_api_socket = get("SPIFFE_ENDPOINT_SOCKET");
        }
        if let Some(webhook) = &mut self.webhook {
            webhook.inject.apply_env(&get);
        }
        Ok(())
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        AllowList::parse(&self.sidecars).map_err(|e| ConfigError::Invalid {
            field: "sidecars".into(),
            problem: e.to_string(),
        })?;
        AllowList::parse(&self.data_sidecars).map_err(|e| ConfigError::Invalid {
            field: "data_sidecars".into(),
            problem: e.to_string(),
        })?;
        AllowList::parse(&self.reviewers).map_err(|e| ConfigError::Invalid {
            field: "reviewers".into(),
            problem: e.to_string(),
        })?;
        if let Some(registry) = &self.registry {
            let mut names = std::collections::HashSet::new();
            for (i, p) in registry.publishers.iter().enumerate() {
                let field = format!("registry.publishers[{i}]");
                if !crate::registry::valid_name(&p.name) || !names.insert(p.name.clone()) {
                    return Err(ConfigError::Invalid {
                        field: format!("{field}.name"),
                        problem: format!(
                            "`{}` must be a unique name of 1-64 letters, digits, `-`, `_`, `.`",
                            p.name
                        ),
                    });
                }
                crate::registry::read_key(&p.key).map_err(|problem| ConfigError::Invalid {
                    field: format!("{field}.key"),
                    problem,
                })?;
            }
        }
        AllowList::parse(&self.operators).map_err(|e| ConfigError::Invalid {
            field: "operators".into(),
            problem: e.to_string(),
        })?;
        for (field, value) in [
            ("limits.shutdown_grace", self.limits.shutdown_grace),
            ("admin.header_read_timeout", self.admin.header_read_timeout),
        ] {
            if value.is_zero() || value > Duration::from_secs(3600) {
                return Err(ConfigError::Invalid {
                    field: field.into(),
                    problem: format!(
                        "{value:?} is outside 1ms..=1h: use a duration more than 0 and at most 1h (defaults: shutdown_grace 30s, header_read_timeout 10s)"
                    ),
                });
            }
        }
        if self.limits.drain_delay >= self.limits.shutdown_grace {
            return Err(ConfigError::Invalid {
                field: "limits.drain_delay".into(),
                problem: format!(
                    "{:?} is not less than limits.shutdown_grace ({:?}): make it shorter (defaults 5s and 30s)",
                    self.limits.drain_delay, self.limits.shutdown_grace
                ),
            });
        }
        if let Some(webhook) = &self.webhook {
            let grace = webhook.inject.sidecar_shutdown_grace_seconds;
            if grace == 0 || grace > nexus_kube::MAX_SHUTDOWN_GRACE_SECS {
                return Err(ConfigError::Invalid {
                    field: "webhook.inject.sidecar_shutdown_grace_seconds".into(),
                    problem: format!("{grace} is outside 1..=3600 seconds (default 30)"),
                });
            }
        }
        if self.admin.max_connections == 0 || self.admin.max_header_bytes < 8192 {
            return Err(ConfigError::Invalid {
                field: "admin.max_connections".into(),
                problem: "admin.max_connections must be at least 1 and admin.max_header_bytes at least 8192 (defaults 10000 and 16384)".into(),
            });
        }
        AllowList::parse(&self.viewers).map_err(|e| ConfigError::Invalid {
            field: "viewers".into(),
            problem: e.to_string(),
        })?;
        if self.limits.max_revocation_ttl.is_zero() {
            return Err(ConfigError::Invalid {
                field: "limits.max_revocation_ttl".into(),
                problem: "must be more than 0 (e.g. \"30d\")".into(),
            });
        }
        self.baselines.validate()?;
        if self.signals.per_reporter_per_minute == 0 || self.signals.per_reporter_burst == 0 {
            return Err(ConfigError::Invalid {
                field: "signals.per_reporter_per_minute".into(),
                problem: "signals.per_reporter_per_minute and signals.per_reporter_burst must be at least 1".into(),
            });
        }
        if let Some(policy) = &self.revocation_policy
            && (policy.load_timeout.is_zero() || policy.load_max_memory < 64 * 1024 * 1024)
        {
            return Err(ConfigError::Invalid {
                field: "revocation_policy.load_timeout".into(),
                problem: "load_timeout must be more than 0 and load_max_memory at least 64 MiB (67108864)".into(),
            });
        }
        if !(self.database.url.starts_with("sqlite:")
            || self.database.url.starts_with("postgres:")
            || self.database.url.starts_with("postgresql:"))
        {
            return Err(ConfigError::Invalid {
                field: "database.url".into(),
                problem: format!(
                    "`{}` is neither sqlite://PATH nor postgres://…",
                    redact_url(&self.database.url)
                ),
            });
        }
        if self.database.status_report_interval.is_zero()
            || self.database.status_stale_after < 2 * self.database.status_report_interval
        {
            return Err(ConfigError::Invalid {
                field: "database.status_stale_after".into(),
                problem: format!(
                    "must be at least twice database.status_report_interval ({:?}), which must not be zero",
                    self.database.status_report_interval
                ),
            });
        }
        if self.stream.max_message_bytes < 1024 {
            return Err(ConfigError::Invalid {
                field: "stream.max_message_bytes".into(),
                problem: "must be at least 1024".into(),
            });
        }
        match self.identity.source {
            IdentitySource::Files if self.identity.files.is_none() => Err(ConfigError::Invalid {
                field: "identity.files".into(),
                problem: "required with source = \"files\"".into(),
            }),
            IdentitySource::WorkloadApi if self.identity.workload_api_socket.is_none() => {
                Err(ConfigError::Invalid {
                    field: "identity.workload_api_socket".into(),
                    problem: "no Workload API socket: set it or SPIFFE_ENDPOINT_SOCKET".into(),
                })
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::redact_url;

    #[test]
    fn database_passwords_never_reach_logs() {
        for (url, shown) in [
            (
                "postgres://nexus:s3cret@db.svc:5432/nexus?sslmode=verify-full",
                "postgres://nexus:***@db.svc:5432/nexus?sslmode=verify-full",
            ),
            (
                "postgres://nexus@127.0.0.1/nexus",
                "postgres://nexus@127.0.0.1/nexus",
            ),
            ("postgres://a:b:c@h/d", "postgres://a:***@h/d"),
            (
                "postgres://h/d?user=u&password=p&sslmode=require",
                "postgres://h/d?user=u&password=***&sslmode=require",
            ),
            ("sqlite://nexus-gateway.db", "sqlite://nexus-gateway.db"),
            ("nonsense", "nonsense"),
        ] {
            assert_eq!(redact_url(url), shown);
        }
    }
}
