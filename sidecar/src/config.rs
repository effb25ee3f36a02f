//! The sidecar's configuration: one TOML file, every field with a safe default, plus
//! environment overrides for what Kubernetes injection sets. Errors name the field and
//! the fix; `main` maps them to exit code 64.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use nexus_audit::{AuditConfig, AuditMode, Sink as AuditSink};
use nexus_identity::AllowList;
pub use nexus_identity::source::{IdentityConfig, IdentitySource};
use serde::Deserialize;

pub use crate::telemetry::TelemetryConfig;

/// A configuration the sidecar cannot run with.
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
    /// The file is not valid TOML for this schema (the message carries line and column).
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: String,
        /// toml's message, with line, column and the offending field.
        message: String,
    },
    /// A field has a value the sidecar cannot use.
    #[error("config field `{field}`: {problem}; fix: {fix}")]
    Invalid {
        /// Dotted path of the field.
        field: String,
        /// What is wrong.
        problem: String,
        /// What to do.
        fix: String,
    },
}

fn invalid(
    field: impl Into<String>,
    problem: impl Into<String>,
    fix: impl Into<String>,
) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
        fix: fix.into(),
    }
}

/// The whole sidecar configuration.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the SVID comes from.
    pub identity: IdentityConfig,
    /// TLS settings shared by inbound and outbound.
    pub tls: TlsConfig,
    /// The mTLS listener in front of the local app; absent in pods that only call out.
    pub inbound: Option<InboundConfig>,
    /// Plain-HTTP loopback listeners, one per upstream the local app calls.
    pub outbound: Vec<OutboundConfig>,
    /// Health and metrics.
    pub admin: AdminConfig,
    /// Resource limits applied to every connection.
    pub limits: LimitsConfig,
    /// Rego policy evaluated on every request; absent means authentication only.
    pub policy: Option<PolicyConfig>,
    /// OpenTelemetry export (spans and metrics over OTLP/gRPC); off without an endpoint.
    pub telemetry: TelemetryConfig,
    /// Hash-chained execution records, one per request; absent means none are written.
    /// `sink = "stdout"` or `sink = { file = { path = "...", max_bytes = N, max_files = N } }`,
    /// `mode = "best_effort" | "strict"`, `queue_capacity = N`.
    pub audit: Option<AuditConfig>,
    /// The control stream to the gateway (revocations, executions; signals and records
    /// back); absent: standalone, runtime data from `policy.state_file`.
    pub gateway: Option<GatewayConfig>,
    /// Anomaly detectors (nexus-anomaly's thresholds). They run whenever `[gateway]` is
    /// set (their signals go there) and `gateway.detect_anomalies` is not false, with
    /// these settings or the defaults.
    pub anomaly: Option<nexus_anomaly::DetectorConfig>,
    /// The in-pod channel `nexus-launch` reports sandbox violations on; absent: reports
    /// are refused. Never a TCP port: the admin listener refuses them.
    pub reports: Option<ReportsConfig>,
    /// The plugin version this pod was admitted as (docs/registry.md): set by the
    /// admission webhook (`NEXUS_PLUGIN_UID`, `NEXUS_PLUGIN_VERSION`,
    /// `NEXUS_PLUGIN_IMAGE_DIGEST`); shown by `/ready` and logged at start.
    pub plugin: Option<PluginConfig>,
}

/// `[plugin]`: the registry version a plugin pod runs (what admission checked).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PluginConfig {
    /// The plugin's UUID.
    pub uid: String,
    /// Its certified version.
    pub version: String,
    /// The image digest, `sha256:` + 64 lowercase hex.
    pub image_digest: String,
}

impl std::fmt::Display for PluginConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} v{} ({})", self.uid, self.version, self.image_digest)
    }
}

/// `[reports]`: a unix socket in a folder only this pod shares (an `emptyDir` mounted in
/// the sidecar and the plugin container), `POST /v1/signals` on it. Its callers are
/// checked: their uid (`SO_PEERCRED`) against `peer_uids`, and/or the per-pod token of
/// `token_file`; at least one of the two is required.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportsConfig {
    /// The socket to listen on (created at start, mode 0666: the checks below decide).
    pub socket: PathBuf,
    /// Callers must run as one of these uids (checked with `SO_PEERCRED`). Default:
    /// none checked.
    #[serde(default)]
    pub peer_uids: Vec<u32>,
    /// The sidecar writes a fresh random token here at start (mode 0644, beside the
    /// socket) and requires it in every report (`Authorization: Bearer TOKEN`); the
    /// launcher reads it (`NEXUS_REPORT_TOKEN_FILE`) outside the plugin's sandbox, whose
    /// profile must not grant this folder. Default: no token.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

/// What a sidecar does while its gateway is unreachable.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum GatewayLoss {
    /// Enforce the last snapshot, then refuse every request once the link has been
    /// down for `fail_closed_after` (the default).
    #[default]
    FailClosed,
    /// Enforce the last snapshot for as long as it takes.
    KeepLast,
}

/// `[gateway]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GatewayConfig {
    /// The gateway's gRPC address, `host:port`. Required.
    pub address: String,
    /// The gateway's SPIFFE ID (or a `spiffe://td/path/*` prefix); its certificate must
    /// match. Required.
    pub identity: String,
    /// Where the last snapshot is kept (JSON, the `policy.state_file` format), so a
    /// sidecar restarted while the gateway is down still enforces revocations.
    /// Default: `policy.state_file`.
    #[serde(default)]
    pub snapshot_file: Option<PathBuf>,
    /// `fail_closed` (default) or `keep_last`.
    #[serde(default)]
    pub on_gateway_loss: GatewayLoss,
    /// With `fail_closed`: how long the link may be down before every request is
    /// refused. Default 5m.
    #[serde(default = "default_fail_closed_after", with = "humantime_serde")]
    pub fail_closed_after: Duration,
    /// Heartbeat period. Default 5s.
    #[serde(default = "default_heartbeat", with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A stream silent this long is dropped and reconnected. Default 20s.
    #[serde(default = "default_gateway_idle", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Connect (TCP + TLS) timeout. Default 5s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// First reconnect delay; doubles up to `backoff_max`, with full jitter. Default 100ms.
    #[serde(default = "default_backoff_initial", with = "humantime_serde")]
    pub backoff_initial: Duration,
    /// Longest reconnect delay. Default 5s.
    #[serde(default = "default_backoff_max", with = "humantime_serde")]
    pub backoff_max: Duration,
    /// Largest message accepted from the gateway. Default 16 MiB (a snapshot).
    #[serde(default = "default_gateway_max_message")]
    pub max_message_bytes: usize,
    /// Signals held while the gateway is away; beyond it the oldest are dropped and
    /// counted. Default 1024.
    #[serde(default = "default_signal_buffer")]
    pub signal_buffer: usize,
    /// Ship execution records (from `[audit]`'s file sink) to the gateway. Default true.
    #[serde(default = "default_true")]
    pub ship_records: bool,
    /// Most record lines per batch. Default 500.
    #[serde(default = "default_record_batch")]
    pub record_batch: usize,
    /// How often new records are looked for. Default 1s. After a full batch the next
    /// one goes as soon as it is acknowledged, so shipping keeps up with any rate.
    #[serde(default = "default_ship_interval", with = "humantime_serde")]
    pub ship_interval: Duration,
    /// Run the anomaly detectors (`[anomaly]`) and send their signals. Default true.
    #[serde(default = "default_true")]
    pub detect_anomalies: bool,
}

fn default_fail_closed_after() -> Duration {
    Duration::from_secs(300)
}
fn default_heartbeat() -> Duration {
    Duration::from_secs(5)
}
fn default_gateway_idle() -> Duration {
    Duration::from_secs(20)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(5)
}
fn default_backoff_initial() -> Duration {
    Duration::from_millis(100)
}
fn default_backoff_max() -> Duration {
    Duration::from_secs(5)
}
fn default_gateway_max_message() -> usize {
    16 * 1024 * 1024
}
fn default_signal_buffer() -> usize {
    1024
}
fn default_record_batch() -> usize {
    500
}
fn default_ship_interval() -> Duration {
    Duration::from_secs(1)
}

/// `[policy]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyConfig {
    /// Folder of `.rego` modules, `*_test.rego` tests and JSON/YAML data files. Required.
    pub dir: PathBuf,
    /// The rule giving `{"allow": bool, "reasons": [...]}`. Default `data.nexus.authz.decision`.
    #[serde(default = "default_decision_rule")]
    pub decision_rule: String,
    /// Evaluate and record, but always allow: for rolling out a new policy. Default false.
    #[serde(default)]
    pub dry_run: bool,
    /// A second rule evaluated in dry-run beside the enforced one (e.g. the next version
    /// of the policy); its decisions are logged and counted, never enforced.
    #[serde(default)]
    pub shadow_rule: Option<String>,
    /// JSON file with `{"executions": {...}, "revoked": {...}}`, merged into `data.nexus`
    /// and re-read when it changes. Until the gateway feeds these live.
    #[serde(default)]
    pub state_file: Option<PathBuf>,
    /// The clause is the path segment after this one. Default `clauses`.
    #[serde(default = "default_clause_segment")]
    pub clause_after_segment: String,
    /// Request headers copied into `input.request.headers` (lowercase names). Default:
    /// content-type, content-length, user-agent, x-nexus-execution, x-request-id, traceparent.
    #[serde(default = "default_headers")]
    pub input_headers: Vec<String>,
    /// One evaluation may take this long, then it denies. Default 250ms: generous, since
    /// the clock also runs while a busy machine has the evaluating thread descheduled.
    #[serde(default = "default_eval_timeout", with = "humantime_serde")]
    pub eval_timeout: Duration,
    /// One evaluation may run this many VM instructions, then it denies. Default 1000000.
    #[serde(default = "default_max_instructions")]
    pub max_instructions: usize,
    /// Values (strings, lists, objects) one evaluation by nexus's own evaluator may
    /// make: it keeps them until the decision is made, so an evaluation that would make
    /// more (a loop making a value per iteration) is handed to the RVM, which frees each
    /// iteration's. Default 4096; 16..=1048576.
    #[serde(default = "default_max_made_values")]
    pub max_made_values: usize,
    /// With connection workers (`limits.runtime = "workers"`), decisions of a revision
    /// that does not run natively (the RVM, the interpreter) are taken off the workers,
    /// on the blocking pool: at most this many at once, the others wait their turn
    /// without holding a worker. Default 32; 1..=1024.
    #[serde(default = "default_max_slow_decisions")]
    pub max_slow_decisions: usize,
    /// How often the folder and state file are checked for changes. Default 1s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// Run the folder's `*_test.rego` before using a new revision; a failing test refuses
    /// it. Default true.
    #[serde(default = "default_true")]
    pub run_tests_on_reload: bool,
    /// `compiled` (default: nexus's own evaluator where it applies, regorus's RVM
    /// otherwise), `rvm` (the RVM only) or `interpreted`.
    #[serde(default)]
    pub mode: PolicyMode,
    /// Loading a revision (reading the folder, running its tests, compiling the decision
    /// rule and evaluating it once) runs in a child process, off the serving path, that
    /// is killed past this wall-clock time; the revision is then refused with the test
    /// or rule that was running, and the last good one keeps serving. Default 10s.
    #[serde(default = "default_load_timeout", with = "humantime_serde")]
    pub load_timeout: Duration,
    /// ... and that may use at most this much memory (address space, bytes); beyond, it
    /// stops and the revision is refused the same way. Default 1073741824 (1 GiB).
    #[serde(default = "default_load_max_memory")]
    pub load_max_memory: u64,
    /// Decisions kept in the decision cache (docs/policy-cache.md); 0 turns the cache
    /// off. Default 10000.
    #[serde(default = "default_cache_max_entries")]
    pub cache_max_entries: usize,
    /// Bytes the decision cache may hold (keys and decisions). Default 8388608 (8 MiB).
    #[serde(default = "default_cache_max_bytes")]
    pub cache_max_bytes: usize,
    /// Recent request inputs kept to check the next revision's compiled program against
    /// the interpreter (`nexus_policy::VerifyOptions::sample`). Default 64.
    #[serde(default = "default_verify_sample")]
    pub verify_sample: usize,
}

fn default_cache_max_entries() -> usize {
    10_000
}
fn default_cache_max_bytes() -> usize {
    8 * 1024 * 1024
}
fn default_verify_sample() -> usize {
    64
}

fn default_load_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_load_max_memory() -> u64 {
    1024 * 1024 * 1024
}

/// Policy engine mode.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum PolicyMode {
    /// nexus's own evaluator where the decision rule is within what it takes and it
    /// agrees with regorus's interpreter on the revision's check, regorus's RVM bytecode
    /// otherwise (docs/opa-compatibility.md, "Evaluation modes").
    #[default]
    Compiled,
    /// regorus's RVM bytecode only (nexus's own evaluator off).
    Rvm,
    /// regorus interpreter.
    Interpreted,
}

fn default_decision_rule() -> String {
    "data.nexus.authz.decision".into()
}
fn default_clause_segment() -> String {
    "clauses".into()
}
fn default_headers() -> Vec<String> {
    [
        "content-type",
        "content-length",
        "user-agent",
        "x-nexus-execution",
        "x-request-id",
        "traceparent",
    ]
    .map(String::from)
    .to_vec()
}
fn default_eval_timeout() -> Duration {
    Duration::from_millis(250)
}
fn default_max_slow_decisions() -> usize {
    32
}
/// Largest `policy.max_slow_decisions`.
pub const MAX_SLOW_DECISIONS: usize = 1024;
fn default_max_instructions() -> usize {
    1_000_000
}
fn default_max_made_values() -> usize {
    nexus_policy::PolicyOptions::default().max_made_values
}
/// Bounds of `policy.max_made_values`.
pub const MADE_VALUES: std::ops::RangeInclusive<usize> = 16..=1_048_576;
fn default_reload_interval() -> Duration {
    Duration::from_secs(1)
}
fn default_true() -> bool {
    true
}

/// `[tls]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// `"1.3"` (default) or `"1.2"` to also accept TLS 1.2.
    pub min_version: String,
    /// A TLS handshake that takes longer is dropped. Default 10s.
    #[serde(with = "humantime_serde")]
    pub handshake_timeout: Duration,
}

impl Default for TlsConfig {
    fn default() -> Self {
        Self {
            min_version: "1.3".into(),
            handshake_timeout: Duration::from_secs(10),
        }
    }
}

/// Which HTTP version the sidecar uses towards the local app.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AppProtocol {
    /// The version the caller used (HTTP/2 callers such as gRPC reach the app over h2c).
    #[default]
    Auto,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2 over cleartext (h2c prior knowledge).
    Http2,
}

/// `[inbound]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InboundConfig {
    /// mTLS listen address. Default `0.0.0.0:15006`.
    #[serde(default = "default_inbound_listen")]
    pub listen: SocketAddr,
    /// The local app, `host:port` on loopback. Required.
    pub app: String,
    /// HTTP version towards the app. Default `auto`.
    #[serde(default)]
    pub app_protocol: AppProtocol,
    /// Peers allowed to connect: exact SPIFFE IDs or `spiffe://td/path/*`. Empty denies all.
    #[serde(default)]
    pub allowed_ids: Vec<String>,
}

fn default_inbound_listen() -> SocketAddr {
    SocketAddr::from(([0, 0, 0, 0], 15006))
}

/// `[[outbound]]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutboundConfig {
    /// A name for logs and metrics.
    pub name: String,
    /// Loopback plain-HTTP listen address the local app calls.
    pub listen: SocketAddr,
    /// `host:port` of the upstream's Nexus inbound (mTLS).
    pub upstream: String,
    /// The SPIFFE ID the upstream must present (or a `spiffe://td/path/*` prefix).
    pub expected_id: String,
}

/// `[admin]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// `/live`, `/ready`, `/metrics`. Default `127.0.0.1:15090`.
    pub listen: SocketAddr,
    /// If set, the bound addresses are written here as JSON once listening (useful with
    /// port 0 in tests and scripts).
    pub address_file: Option<PathBuf>,
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 15090)),
            address_file: None,
        }
    }
}

/// `[limits]`
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Largest request head (HTTP/1 buffer / HTTP/2 header list), bytes. Default 16384;
    /// at least 8192. Larger heads get 431 (HTTP/1) or a stream reset (HTTP/2).
    pub max_header_bytes: usize,
    /// A client must send its request head within this time. Default 10s.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// Concurrent downstream connections per listener; more wait in the accept queue.
    /// Default 10000.
    pub max_connections: usize,
    /// HTTP/2 streams per connection. Default 256.
    pub max_concurrent_streams: u32,
    /// Connecting to the app or an upstream. Default 5s.
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle pooled connections to the app or upstream are closed after this. Default 5s:
    /// shorter than a peer sidecar's `header_read_timeout`, so the pool drops an idle
    /// connection before the far side does.
    #[serde(with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// A request whose response head has not come within this gets 504 with the reason.
    /// Default 30s; more than 0, at most 1h. Streaming after the head is not cut.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Requests in flight per listener (until their response body ends); more are shed
    /// at once with 503 and `retry-after`, never queued. Default 10000; 1 to 1000000.
    pub max_in_flight: usize,
    /// On SIGTERM, in-flight requests and streams get this long (from the signal) to
    /// finish before the sidecar stops waiting. Default 30s; more than 0, at most 1h.
    /// The pod's terminationGracePeriodSeconds must be longer.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
    /// On SIGTERM, `/ready` answers 503 at once; listeners keep accepting for this long
    /// (so load balancers and endpoints stop sending) and then close. Default 5s; 0 or
    /// more, less than `shutdown_grace`.
    #[serde(with = "humantime_serde")]
    pub drain_delay: Duration,
    /// Threads that serve connections (as Envoy's `--concurrency`, Linkerd's proxy
    /// cores). Default 0: one per CPU the process may use (a cgroup CPU quota included,
    /// rounded down, at least one). At most 1024. Env `NEXUS_WORKER_THREADS`. One thread
    /// took about 15% less CPU per request than two at the same load here (no hand-offs
    /// between threads), but then serves at most one core's worth (docs/benchmarks.md,
    /// "One worker thread").
    pub worker_threads: usize,
    /// How those threads share the work. Default `workers`: each runs its own
    /// single-threaded runtime and serves whole connections, with its own upstream pool
    /// (thread per core, as Envoy's workers and nginx's worker processes); the control
    /// plane (admin, gateway stream, reloads) runs on one more thread. `shared`: one
    /// runtime whose threads take each other's tasks (tokio's default). Env
    /// `NEXUS_RUNTIME`.
    pub runtime: RuntimeKind,
}

/// How the request threads share the work (`limits.runtime`).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RuntimeKind {
    /// A single-threaded runtime per thread; a connection stays on the thread it was
    /// given (the one serving the fewest connections then).
    #[default]
    Workers,
    /// One multi-threaded runtime: a connection's tasks run on whichever thread is
    /// free, woken across threads.
    Shared,
}

/// Largest `limits.worker_threads`.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Largest `request_timeout` and `shutdown_grace`.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(3600);
/// Largest `max_in_flight`.
pub const MAX_IN_FLIGHT: usize = 1_000_000;

impl LimitsConfig {
    /// The connection limits of every listener (`nexus_serve`).
    pub fn conn(&self) -> nexus_serve::ConnLimits {
        nexus_serve::ConnLimits {
            header_read_timeout: self.header_read_timeout,
            max_header_bytes: self.max_header_bytes,
            max_concurrent_streams: self.max_concurrent_streams,
        }
    }

    /// The request threads: `worker_threads`, or one per CPU the process may use.
    pub fn request_threads(&self) -> usize {
        match self.worker_threads {
            0 => std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get),
            n => n,
        }
    }

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
            max_header_bytes: 16 * 1024,
            header_read_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            max_concurrent_streams: 256,
            connect_timeout: Duration::from_secs(5),
            pool_idle_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(30),
            max_in_flight: 10_000,
            shutdown_grace: Duration::from_secs(30),
            drain_delay: Duration::from_secs(5),
            worker_threads: 0,
            runtime: RuntimeKind::Workers,
        }
    }
}

impl Config {
    /// Reads and validates a file, then applies environment overrides.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut config = match path {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.to_path_buf(),
                    source,
                })?;
                Self::parse(&text, &path.display().to_string())?
            }
            None => Self::default(),
        };
        config.apply_env(|key| std::env::var(key).ok())?;
        config.validate()?;
        config.normalize_ids();
        Ok(config)
    }

    /// Parses TOML text; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: origin.to_string(),
            message: e.to_string(),
        })
    }

    /// Environment overrides, the names Kubernetes injection sets.
    pub fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(socket) =
            get("SPIFFE_ENDPOINT_SOCKET").filter(|_| self.identity.workload_api_socket.is_none())
        {
            self.identity.workload_api_socket = Some(socket);
        }
        if let Some(v) = get("NEXUS_WORKLOAD_API_SOCKET") {
            self.identity.workload_api_socket = Some(v);
        }
        if let Some(v) = get("NEXUS_ADMIN_LISTEN") {
            self.admin.listen = v.parse().map_err(|e| {
                invalid(
                    "NEXUS_ADMIN_LISTEN",
                    format!("`{v}`: {e}"),
                    "use host:port, e.g. 127.0.0.1:15090",
                )
            })?;
        }
        if let Some(v) = get("NEXUS_ADDRESS_FILE") {
            self.admin.address_file = Some(PathBuf::from(v));
        }
        // Injection sets it from the same value it gives the pod's
        // terminationGracePeriodSeconds, so the two cannot disagree.
        if let Some(v) = get("NEXUS_SHUTDOWN_GRACE") {
            self.limits.shutdown_grace = humantime::parse_duration(&v).map_err(|e| {
                invalid(
                    "NEXUS_SHUTDOWN_GRACE",
                    format!("`{v}`: {e}"),
                    "use a duration such as 30s",
                )
            })?;
        }
        if let Some(v) = get("NEXUS_WORKER_THREADS") {
            self.limits.worker_threads = v.trim().parse().map_err(|e| {
                invalid(
                    "NEXUS_WORKER_THREADS",
                    format!("`{v}`: {e}"),
                    "use a whole number: 0 (one per CPU) or the threads to run",
                )
            })?;
        }
        if let Some(v) = get("NEXUS_RUNTIME") {
            self.limits.runtime = match v.trim() {
                "workers" => RuntimeKind::Workers,
                "shared" => RuntimeKind::Shared,
                other => {
                    return Err(invalid(
                        "NEXUS_RUNTIME",
                        format!("`{other}` is not a runtime"),
                        "use workers (a runtime per thread, the default) or shared",
                    ));
                }
            };
        }
        // Injection (nexusctl inject, the admission webhook) names the gateway this way.
        if let Some(address) = get("NEXUS_GATEWAY_ADDRESS").filter(|a| !a.is_empty()) {
            match &mut self.gateway {
                Some(gateway) => {
                    gateway.address = address;
                    if let Some(id) = get("NEXUS_GATEWAY_ID") {
                        gateway.identity = id;
                    }
                    if gateway.snapshot_file.is_none() {
                        gateway.snapshot_file =
                            get("NEXUS_GATEWAY_SNAPSHOT_FILE").map(PathBuf::from);
                    }
                }
                None => {
                    let identity = get("NEXUS_GATEWAY_ID").ok_or_else(|| {
                        invalid(
                            "gateway.identity",
                            "NEXUS_GATEWAY_ADDRESS is set but not the gateway's SPIFFE ID",
                            "set NEXUS_GATEWAY_ID (or a [gateway] table with identity)",
                        )
                    })?;
                    self.gateway = Some(GatewayConfig {
                        address,
                        identity,
                        snapshot_file: get("NEXUS_GATEWAY_SNAPSHOT_FILE").map(PathBuf::from),
                        on_gateway_loss: GatewayLoss::default(),
                        fail_closed_after: default_fail_closed_after(),
                        heartbeat_interval: default_heartbeat(),
                        idle_timeout: default_gateway_idle(),
                        connect_timeout: default_connect_timeout(),
                        backoff_initial: default_backoff_initial(),
                        backoff_max: default_backoff_max(),
                        max_message_bytes: default_gateway_max_message(),
                        signal_buffer: default_signal_buffer(),
                        ship_records: true,
                        record_batch: default_record_batch(),
                        ship_interval: default_ship_interval(),
                        detect_anomalies: true,
                    });
                }
            }
        }
        // The admission webhook names the plugin version the pod was admitted as.
        let plugin = [
            "NEXUS_PLUGIN_UID",
            "NEXUS_PLUGIN_VERSION",
            "NEXUS_PLUGIN_IMAGE_DIGEST",
        ]
        .map(|key| get(key).filter(|v| !v.is_empty()));
        match plugin {
            [Some(uid), Some(version), Some(image_digest)] => {
                self.plugin = Some(PluginConfig {
                    uid,
                    version,
                    image_digest,
                });
            }
            [None, None, None] => {}
            _ => {
                return Err(invalid(
                    "NEXUS_PLUGIN_UID",
                    "only some of NEXUS_PLUGIN_UID, NEXUS_PLUGIN_VERSION, NEXUS_PLUGIN_IMAGE_DIGEST are set",
                    "set all three (the admission webhook does) or none",
                ));
            }
        }
        // Injection names the in-pod report channel this way.
        if let Some(socket) = get("NEXUS_REPORT_SOCKET").filter(|s| !s.is_empty()) {
            let mut reports = self.reports.take().unwrap_or(ReportsConfig {
                socket: PathBuf::new(),
                peer_uids: Vec::new(),
                token_file: None,
            });
            reports.socket = PathBuf::from(socket);
            if let Some(token) = get("NEXUS_REPORT_TOKEN_FILE").filter(|s| !s.is_empty()) {
                reports.token_file = Some(PathBuf::from(token));
            }
            if let Some(uids) = get("NEXUS_REPORT_PEER_UIDS").filter(|s| !s.is_empty()) {
                reports.peer_uids = uids
                    .split(',')
                    .map(|u| {
                        u.trim().parse().map_err(|e| {
                            invalid(
                                "NEXUS_REPORT_PEER_UIDS",
                                format!("`{u}`: {e}"),
                                "give comma-separated numeric uids, e.g. 1000,1001",
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?;
            }
            self.reports = Some(reports);
        }
        let listen = get("NEXUS_INBOUND_LISTEN");
        let app = get("NEXUS_INBOUND_APP");
        let allowed = get("NEXUS_INBOUND_ALLOWED_IDS");
        if listen.is_some() || app.is_some() || allowed.is_some() {
            let inbound = match self.inbound.take() {
                Some(inbound) => inbound,
                None => InboundConfig {
                    listen: default_inbound_listen(),
                    app: app.clone().ok_or_else(|| {
                        invalid(
                            "NEXUS_INBOUND_APP",
                            "inbound overrides are set but no app",
                            "set NEXUS_INBOUND_APP=127.0.0.1:PORT",
                        )
                    })?,
                    app_protocol: AppProtocol::Auto,
                    allowed_ids: Vec::new(),
                },
            };
            let mut inbound = inbound;
            if let Some(v) = listen {
                inbound.listen = v.parse().map_err(|e| {
                    invalid(
                        "NEXUS_INBOUND_LISTEN",
                        format!("`{v}`: {e}"),
                        "use host:port, e.g. 0.0.0.0:15006",
                    )
                })?;
            }
            if let Some(v) = app {
                inbound.app = v;
            }
            if let Some(v) = allowed {
                inbound.allowed_ids = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect();
            }
            self.inbound = Some(inbound);
        }
        Ok(())
    }

    /// Rewrites every SPIFFE ID and pattern in its canonical spelling (lower-case scheme
    /// and trust domain), so the IDs in policy input, execution records and signals are
    /// the ones certificates carry. Call after `validate` (which refuses invalid ones).
    pub fn normalize_ids(&mut self) {
        let canonical = |id: &mut String| {
            if let Ok(c) = nexus_identity::canonical_pattern(id) {
                *id = c;
            }
        };
        if let Some(gateway) = &mut self.gateway {
            canonical(&mut gateway.identity);
        }
        if let Some(inbound) = &mut self.inbound {
            inbound.allowed_ids.iter_mut().for_each(canonical);
        }
        for out in &mut self.outbound {
            canonical(&mut out.expected_id);
        }
    }

    /// Checks what serde cannot.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if let Some(plugin) = &self.plugin {
            let hex = plugin.image_digest.strip_prefix("sha256:").unwrap_or("");
            if hex.len() != 64 || !hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
                return Err(invalid(
                    "plugin.image_digest",
                    format!("`{}` is not an image digest", plugin.image_digest),
                    "give sha256: and 64 lowercase hex digits, as `nexusctl plugin list` shows",
                ));
            }
            let printable = |v: &str| {
                !v.is_empty()
                    && v.len() <= 64
                    && v.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-.+".contains(&b))
            };
            if !printable(&plugin.uid) || !printable(&plugin.version) {
                return Err(invalid(
                    "plugin",
                    format!(
                        "uid `{}` or version `{}` is not a plugin UUID and semantic version",
                        plugin.uid, plugin.version
                    ),
                    "give the values `nexusctl plugin list` shows",
                ));
            }
        }
        if let Some(anomaly) = &self.anomaly {
            anomaly.validate().map_err(|e| {
                invalid(
                    "anomaly",
                    e.to_string(),
                    "see the [anomaly] reference in the README",
                )
            })?;
        }
        if let Some(gateway) = &self.gateway {
            AllowList::parse(&[&gateway.identity]).map_err(|e| {
                invalid(
                    "gateway.identity",
                    e.to_string(),
                    "give the gateway's SPIFFE ID, e.g. spiffe://nexus.local/ns/nexus/sa/gateway",
                )
            })?;
            if gateway.address.rsplit_once(':').is_none() {
                return Err(invalid(
                    "gateway.address",
                    format!("`{}` has no port", gateway.address),
                    "use host:port, e.g. nexus-gateway.nexus:7443",
                ));
            }
            if gateway.snapshot_file.is_none()
                && self
                    .policy
                    .as_ref()
                    .and_then(|p| p.state_file.as_ref())
                    .is_none()
            {
                return Err(invalid(
                    "gateway.snapshot_file",
                    "nowhere to keep the gateway's last snapshot",
                    "set gateway.snapshot_file (or policy.state_file)",
                ));
            }
        }
        match self.identity.source {
            IdentitySource::Files if self.identity.files.is_none() => {
                return Err(invalid(
                    "identity.files",
                    "source is \"files\" but no files are given",
                    "add identity.files = { cert = \"...\", key = \"...\", bundle = \"...\" }",
                ));
            }
            IdentitySource::WorkloadApi if self.identity.workload_api_socket.is_none() => {
                return Err(invalid(
                    "identity.workload_api_socket",
                    "no Workload API socket configured",
                    "set SPIFFE_ENDPOINT_SOCKET=unix:///path/to/agent.sock, or identity.workload_api_socket, or use source = \"files\"",
                ));
            }
            _ => {}
        }
        match self.tls.min_version.as_str() {
            "1.2" | "1.3" => {}
            other => {
                return Err(invalid(
                    "tls.min_version",
                    format!("`{other}` is not supported"),
                    "use \"1.3\" (default) or \"1.2\"",
                ));
            }
        }
        if self.limits.max_header_bytes < 8192 {
            return Err(invalid(
                "limits.max_header_bytes",
                "must be at least 8192",
                "raise it to 8192 or more",
            ));
        }
        if self.limits.max_connections == 0 {
            return Err(invalid(
                "limits.max_connections",
                "must be at least 1",
                "use the default, 10000",
            ));
        }
        for (field, value) in [
            ("limits.request_timeout", self.limits.request_timeout),
            ("limits.shutdown_grace", self.limits.shutdown_grace),
            (
                "limits.header_read_timeout",
                self.limits.header_read_timeout,
            ),
        ] {
            if value.is_zero() || value > MAX_TIMEOUT {
                return Err(invalid(
                    field,
                    format!("{value:?} is outside 1ms..=1h"),
                    "use a duration more than 0 and at most 1h (the defaults: request_timeout 30s, shutdown_grace 30s, header_read_timeout 10s)",
                ));
            }
        }
        if self.limits.drain_delay >= self.limits.shutdown_grace {
            return Err(invalid(
                "limits.drain_delay",
                format!(
                    "{:?} is not less than limits.shutdown_grace ({:?}): in-flight requests would get no time to finish",
                    self.limits.drain_delay, self.limits.shutdown_grace
                ),
                "make drain_delay shorter than shutdown_grace (defaults 5s and 30s)",
            ));
        }
        if self.limits.worker_threads > MAX_WORKER_THREADS {
            return Err(invalid(
                "limits.worker_threads",
                format!(
                    "{} is more than {MAX_WORKER_THREADS}",
                    self.limits.worker_threads
                ),
                "use 0 (one per CPU) or the CPUs the pod may use",
            ));
        }
        if self.limits.max_in_flight == 0 || self.limits.max_in_flight > MAX_IN_FLIGHT {
            return Err(invalid(
                "limits.max_in_flight",
                format!("{} is outside 1..=1000000", self.limits.max_in_flight),
                "use the default, 10000",
            ));
        }
        if let Some(inbound) = &self.inbound {
            AllowList::parse(&inbound.allowed_ids).map_err(|e| {
                invalid(
                    "inbound.allowed_ids",
                    e.to_string(),
                    "list SPIFFE IDs or spiffe://td/path/* prefixes",
                )
            })?;
            if inbound.allowed_ids.is_empty() {
                tracing::warn!("inbound.allowed_ids is empty: every peer will be refused");
            }
            check_authority("inbound.app", &inbound.app)?;
        }
        if let Some(policy) = &self.policy {
            if !policy.dir.is_dir() {
                return Err(invalid(
                    "policy.dir",
                    format!("{} is not a folder", policy.dir.display()),
                    "point it at the folder holding your .rego files",
                ));
            }
            for (field, rule) in [
                ("policy.decision_rule", Some(&policy.decision_rule)),
                ("policy.shadow_rule", policy.shadow_rule.as_ref()),
            ] {
                if let Some(rule) = rule
                    && !rule.starts_with("data.")
                {
                    return Err(invalid(
                        field,
                        format!("`{rule}` is not a rule path"),
                        "write it as data.package.rule",
                    ));
                }
            }
            if policy.load_timeout.is_zero() {
                return Err(invalid(
                    "policy.load_timeout",
                    "must be more than 0",
                    "use the default, 10s",
                ));
            }
            if policy.load_max_memory < 64 * 1024 * 1024 {
                return Err(invalid(
                    "policy.load_max_memory",
                    format!(
                        "{} bytes is too little to load any policy",
                        policy.load_max_memory
                    ),
                    "use at least 67108864 (64 MiB); the default is 1073741824 (1 GiB)",
                ));
            }
            if !MADE_VALUES.contains(&policy.max_made_values) {
                return Err(invalid(
                    "policy.max_made_values",
                    format!(
                        "{} is not within {}..={}",
                        policy.max_made_values,
                        MADE_VALUES.start(),
                        MADE_VALUES.end()
                    ),
                    "use the default, 4096",
                ));
            }
            if policy.max_slow_decisions == 0 || policy.max_slow_decisions > MAX_SLOW_DECISIONS {
                return Err(invalid(
                    "policy.max_slow_decisions",
                    format!(
                        "{} is not within 1..={MAX_SLOW_DECISIONS}",
                        policy.max_slow_decisions
                    ),
                    "use the default, 32",
                ));
            }
            if policy.eval_timeout.is_zero() {
                return Err(invalid(
                    "policy.eval_timeout",
                    "must be more than 0",
                    "use the default, 250ms",
                ));
            }
        }
        if let Some(reports) = &self.reports {
            if reports.socket.as_os_str().is_empty() || !reports.socket.is_absolute() {
                return Err(invalid(
                    "reports.socket",
                    format!("`{}` is not an absolute path", reports.socket.display()),
                    "give the socket's path in the folder shared with the plugin container, e.g. /var/run/nexus/reports/signals.sock",
                ));
            }
            // sun_path holds 108 bytes with its terminating NUL.
            if reports.socket.as_os_str().len() > 107 {
                return Err(invalid(
                    "reports.socket",
                    format!(
                        "`{}` is longer than a unix socket path may be (107 bytes)",
                        reports.socket.display()
                    ),
                    "use a shorter path",
                ));
            }
            if reports.peer_uids.is_empty() && reports.token_file.is_none() {
                return Err(invalid(
                    "reports",
                    "neither peer_uids nor token_file is set: any process that reaches the socket could report",
                    "set reports.peer_uids = [UID of nexus-launch] and/or reports.token_file = \"/var/run/nexus/reports/token\"",
                ));
            }
        }
        self.telemetry.validate()?;
        if let Some(audit) = &self.audit {
            validate_audit(audit)?;
        }
        let mut names = BTreeSet::new();
        for (i, out) in self.outbound.iter().enumerate() {
            let field = |f: &str| format!("outbound[{i}].{f}");
            if !names.insert(out.name.as_str()) {
                return Err(invalid(
                    field("name"),
                    format!("`{}` is used twice", out.name),
                    "give every outbound a unique name",
                ));
            }
            if !out.listen.ip().is_loopback() {
                return Err(invalid(
                    field("listen"),
                    format!(
                        "{} is not a loopback address; outbound listeners are plain HTTP",
                        out.listen
                    ),
                    "listen on 127.0.0.1:PORT",
                ));
            }
            check_authority(&field("upstream"), &out.upstream)?;
            AllowList::parse(&[&out.expected_id]).map_err(|e| {
                invalid(
                    field("expected_id"),
                    e.to_string(),
                    "give the upstream's SPIFFE ID",
                )
            })?;
        }
        Ok(())
    }

    /// The TLS versions to offer.
    pub fn tls_versions(&self) -> nexus_identity::tls::TlsVersions {
        if self.tls.min_version == "1.2" {
            nexus_identity::tls::TlsVersions::Tls12And13
        } else {
            nexus_identity::tls::TlsVersions::Tls13Only
        }
    }
}

fn validate_audit(audit: &AuditConfig) -> Result<(), ConfigError> {
    if audit.queue_capacity == 0 || audit.queue_capacity > 1 << 24 {
        return Err(invalid(
            "audit.queue_capacity",
            format!("{} is out of range", audit.queue_capacity),
            format!(
                "use 1..=16777216 (default {})",
                nexus_audit::DEFAULT_QUEUE_CAPACITY
            ),
        ));
    }
    if audit.linger > nexus_audit::MAX_LINGER {
        return Err(invalid(
            "audit.linger",
            format!(
                "{:?} is longer than {:?}",
                audit.linger,
                nexus_audit::MAX_LINGER
            ),
            format!(
                "use 0 (off) up to {:?} (default {:?})",
                nexus_audit::MAX_LINGER,
                nexus_audit::DEFAULT_LINGER
            ),
        ));
    }
    if let AuditSink::File {
        path,
        max_bytes,
        max_files,
    } = &audit.sink
    {
        if path.as_os_str().is_empty() || path.is_dir() {
            return Err(invalid(
                "audit.sink.file.path",
                format!("`{}` is not a file path", path.display()),
                "name the record file, e.g. /var/log/nexus/records.jsonl",
            ));
        }
        if *max_bytes < 4096 {
            return Err(invalid(
                "audit.sink.file.max_bytes",
                format!("{max_bytes} is too small for a few records"),
                format!("use the default, {}", nexus_audit::DEFAULT_MAX_BYTES),
            ));
        }
        if *max_files == 0 {
            return Err(invalid(
                "audit.sink.file.max_files",
                "must be at least 1",
                format!("use the default, {}", nexus_audit::DEFAULT_MAX_FILES),
            ));
        }
    }
    Ok(())
}

fn check_authority(field: &str, value: &str) -> Result<(), ConfigError> {
    value
        .parse::<http::uri::Authority>()
        .ok()
        .filter(|a| a.port_u16().is_some())
        .map(|_| ())
        .ok_or_else(|| {
            invalid(
                field,
                format!("`{value}` is not host:port"),
                "write it as host:port, e.g. 127.0.0.1:8080",
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| {
            pairs
                .iter()
                .find(|(key, _)| *key == k)
                .map(|(_, v)| v.to_string())
        }
    }

    #[test]
    fn unknown_field_names_line() {
        let err = Config::parse(
            "[inbound]\napp = \"127.0.0.1:1\"\nalowed_ids = []\n",
            "x.toml",
        )
        .unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("x.toml"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(msg.contains("alowed_ids"), "{msg}");
    }

    #[test]
    fn injection_env_builds_the_gateway_link() {
        let mut config = Config::default();
        config
            .apply_env(env(&[
                (
                    "NEXUS_GATEWAY_ADDRESS",
                    "nexus-gateway.nexus-system.svc:7443",
                ),
                (
                    "NEXUS_GATEWAY_ID",
                    "spiffe://nexus.local/ns/nexus-system/sa/nexus-gateway",
                ),
                (
                    "NEXUS_GATEWAY_SNAPSHOT_FILE",
                    "/var/run/nexus/gateway-snapshot.json",
                ),
            ]))
            .unwrap();
        let gateway = config.gateway.as_ref().unwrap();
        assert_eq!(gateway.address, "nexus-gateway.nexus-system.svc:7443");
        assert_eq!(gateway.on_gateway_loss, GatewayLoss::FailClosed);
        assert_eq!(gateway.fail_closed_after, Duration::from_secs(300));
        // An address without the gateway's identity is refused with the fix.
        let mut config = Config::default();
        let err = config
            .apply_env(env(&[("NEXUS_GATEWAY_ADDRESS", "gw:7443")]))
            .unwrap_err();
        assert!(err.to_string().contains("NEXUS_GATEWAY_ID"), "{err}");
    }

    #[test]
    fn worker_threads_come_from_the_environment_and_are_bounded() {
        let mut config = Config::default();
        assert_eq!(config.limits.worker_threads, 0, "default: one per CPU");
        config
            .apply_env(env(&[
                ("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock"),
                ("NEXUS_WORKER_THREADS", "2"),
            ]))
            .unwrap();
        assert_eq!(config.limits.worker_threads, 2);
        config.validate().unwrap();
        let err = Config::default()
            .apply_env(env(&[("NEXUS_WORKER_THREADS", "two")]))
            .unwrap_err();
        assert!(err.to_string().contains("NEXUS_WORKER_THREADS"), "{err}");
        config.limits.worker_threads = MAX_WORKER_THREADS + 1;
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("limits.worker_threads"), "{err}");
    }

    #[test]
    fn the_runtime_comes_from_the_file_or_the_environment() {
        assert_eq!(Config::default().limits.runtime, RuntimeKind::Workers);
        let config = Config::parse("[limits]\nruntime = \"shared\"\n", "test.toml").unwrap();
        assert_eq!(config.limits.runtime, RuntimeKind::Shared);
        let err = Config::parse("[limits]\nruntime = \"threads\"\n", "test.toml").unwrap_err();
        assert!(err.to_string().contains("runtime"), "{err}");
        let mut config = Config::default();
        config
            .apply_env(env(&[("NEXUS_RUNTIME", "shared")]))
            .unwrap();
        assert_eq!(config.limits.runtime, RuntimeKind::Shared);
        let err = Config::default()
            .apply_env(env(&[("NEXUS_RUNTIME", "per-core")]))
            .unwrap_err();
        assert!(err.to_string().contains("NEXUS_RUNTIME"), "{err}");
        assert!(config.limits.request_threads() >= 1);
        config.limits.worker_threads = 3;
        assert_eq!(config.limits.request_threads(), 3);
        // The places for decisions taken off the workers, and the values one native
        // evaluation may keep: named, bounded.
        let dir = tempfile::tempdir().unwrap();
        let policy = |line: String| {
            Config::parse(
                &format!(
                    "[identity]\nworkload_api_socket = \"unix:///run/spire/agent.sock\"\n[policy]\ndir = {:?}\n{line}\n",
                    dir.path().to_string_lossy()
                ),
                "test.toml",
            )
            .and_then(|c| c.validate().map(|()| c))
        };
        let slow = |n: usize| policy(format!("max_slow_decisions = {n}"));
        assert_eq!(slow(8).unwrap().policy.unwrap().max_slow_decisions, 8);
        for n in [0, MAX_SLOW_DECISIONS + 1] {
            let err = slow(n).unwrap_err();
            assert!(
                err.to_string().contains("policy.max_slow_decisions"),
                "{err}"
            );
        }
        let made = |n: usize| policy(format!("max_made_values = {n}"));
        assert_eq!(made(64).unwrap().policy.unwrap().max_made_values, 64);
        for n in [MADE_VALUES.start() - 1, MADE_VALUES.end() + 1] {
            let err = made(n).unwrap_err();
            assert!(err.to_string().contains("policy.max_made_values"), "{err}");
        }
    }

    #[test]
    fn the_admitted_plugin_version_comes_from_injection_and_is_checked() {
        let digest = format!("sha256:{}", "a".repeat(64));
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock"),
                ("NEXUS_PLUGIN_UID", "6f1c2d3e-0000-4000-8000-000000000001"),
                ("NEXUS_PLUGIN_VERSION", "1.4.2"),
                ("NEXUS_PLUGIN_IMAGE_DIGEST", &digest),
            ]))
            .unwrap();
        config.validate().unwrap();
        assert_eq!(
            config.plugin.as_ref().unwrap().to_string(),
            format!("6f1c2d3e-0000-4000-8000-000000000001 v1.4.2 ({digest})")
        );
        // Some but not all: refused with the fix.
        let err = Config::default()
            .apply_env(env(&[("NEXUS_PLUGIN_VERSION", "1.4.2")]))
            .unwrap_err();
        assert!(err.to_string().contains("set all three"), "{err}");
        // A digest that is not one.
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock"),
                ("NEXUS_PLUGIN_UID", "u"),
                ("NEXUS_PLUGIN_VERSION", "1.4.2"),
                ("NEXUS_PLUGIN_IMAGE_DIGEST", "sha256:AB"),
            ]))
            .unwrap();
        let err = config.validate().unwrap_err();
        assert!(err.to_string().contains("plugin.image_digest"), "{err}");
    }

    #[test]
    fn env_overrides_build_inbound() {
        let mut config = Config::default();
        config
            .apply_env(env(&[
                ("SPIFFE_ENDPOINT_SOCKET", "unix:///tmp/agent.sock"),
                ("NEXUS_INBOUND_APP", "127.0.0.1:8080"),
                (
                    "NEXUS_INBOUND_ALLOWED_IDS",
                    "spiffe://nexus.local/ns/a/*, spiffe://nexus.local/x",
                ),
            ]))
            .unwrap();
        config.validate().unwrap();
        let inbound = config.inbound.unwrap();
        assert_eq!(inbound.app, "127.0.0.1:8080");
        assert_eq!(inbound.allowed_ids.len(), 2);
        assert_eq!(
            config.identity.workload_api_socket.as_deref(),
            Some("unix:///tmp/agent.sock")
        );
    }

    #[test]
    fn invalid_fields_are_named() {
        let mut config = Config::parse(
            "[identity]\nworkload_api_socket = \"/tmp/s\"\n[[outbound]]\nname = \"a\"\nlisten = \"0.0.0.0:1\"\nupstream = \"h:1\"\nexpected_id = \"spiffe://nexus.local/x\"\n",
            "t",
        )
        .unwrap();
        let err = config.validate().unwrap_err().to_string();
        assert!(err.contains("outbound[0].listen"), "{err}");
        config.outbound[0].listen = "127.0.0.1:1".parse().unwrap();
        config.validate().unwrap();
        config.limits.max_header_bytes = 100;
        assert!(
            config
                .validate()
                .unwrap_err()
                .to_string()
                .contains("limits.max_header_bytes")
        );
    }

    #[test]
    fn audit_section_parses_and_is_checked() {
        let dir = tempfile::tempdir().unwrap();
        let base = "[identity]\nworkload_api_socket = \"/tmp/s\"\n";
        let none = Config::parse(base, "t").unwrap();
        assert!(none.audit.is_none());
        let path = dir.path().join("records.jsonl");
        let text = format!(
            "{base}[audit]\nmode = \"strict\"\nqueue_capacity = 16\nsink = {{ file = {{ path = {:?}, max_files = 3 }} }}\n",
            path.to_string_lossy()
        );
        let config = Config::parse(&text, "t").unwrap();
        config.validate().unwrap();
        let audit = config.audit.unwrap();
        assert_eq!(audit.mode, AuditMode::Strict);
        assert_eq!(audit.queue_capacity, 16);
        assert!(matches!(audit.sink, AuditSink::File { max_files: 3, .. }));
        let stdout = Config::parse(&format!("{base}[audit]\nsink = \"stdout\"\n"), "t").unwrap();
        assert_eq!(stdout.audit.unwrap().sink, AuditSink::Stdout);
        let err = Config::parse(
            &format!("{base}[audit]\nmode = \"sometimes\"\nsink = \"stdout\"\n"),
            "t",
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("sometimes"), "{err}");
        let bad = Config::parse(
            &format!("{base}[audit]\nqueue_capacity = 0\nsink = \"stdout\"\n"),
            "t",
        )
        .unwrap();
        let err = bad.validate().unwrap_err().to_string();
        assert!(err.contains("audit.queue_capacity"), "{err}");
        let folder = Config::parse(
            &format!(
                "{base}[audit]\nsink = {{ file = {{ path = {:?} }} }}\n",
                dir.path().to_string_lossy()
            ),
            "t",
        )
        .unwrap();
        let err = folder.validate().unwrap_err().to_string();
        assert!(err.contains("audit.sink.file.path"), "{err}");
        let tiny = Config::parse(
            &format!(
                "{base}[audit]\nsink = {{ file = {{ path = {:?}, max_bytes = 10 }} }}\n",
                path.to_string_lossy()
            ),
            "t",
        )
        .unwrap();
        let err = tiny.validate().unwrap_err().to_string();
        assert!(err.contains("audit.sink.file.max_bytes"), "{err}");
        assert_eq!(audit.linger, nexus_audit::DEFAULT_LINGER);
        let slow = Config::parse(
            &format!("{base}[audit]\nlinger = \"1s\"\nsink = \"stdout\"\n"),
            "t",
        )
        .unwrap();
        let err = slow.validate().unwrap_err().to_string();
        assert!(err.contains("audit.linger"), "{err}");
        let off = Config::parse(
            &format!("{base}[audit]\nlinger = \"0s\"\nsink = \"stdout\"\n"),
            "t",
        )
        .unwrap();
        off.validate().unwrap();
    }

    #[test]
    fn no_identity_source_is_an_error() {
        let err = Config::default().validate().unwrap_err().to_string();
        assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");
    }
}
