//! Operator commands against the gateway's admin API (gRPC over mTLS): revoke,
//! reinstate, status, executions, signals.
//!
//! Which gateway and which operator identity: flags, else environment
//! (`NEXUS_GATEWAY`, `NEXUS_GATEWAY_ID`, `NEXUS_OPERATOR_CERT`, `NEXUS_OPERATOR_KEY`,
//! `NEXUS_CA_BUNDLE`), else the local stack that `nexusctl up` started (its state file),
//! as kubectl falls back to its current context. In a cluster the operator's SVID comes
//! from the SPIFFE Workload API instead (`--workload-api` or `SPIFFE_ENDPOINT_SOCKET`, as
//! in the `nexus-operator` toolbox pod of deploy/), when no certificate file is named.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use nexus_identity::source::files::{FileSourceConfig, load};
use nexus_identity::{AllowList, IdentityStore};
use nexus_proto::control::admin_client::AdminClient;
use nexus_proto::control::{
    ChangeResponse, CloseExecutionRequest, ListExecutionsRequest, ListSignalsRequest,
    OpenExecutionRequest, ReinstateRequest, RevokeRequest, StatusRequest,
};
use tonic::transport::Channel;

use crate::term::{json_line, json_pretty, safe};

/// Where the gateway is and who is calling.
#[derive(Args, Clone, Debug)]
pub struct Target {
    /// The gateway's gRPC address (host:port).
    #[arg(long, env = "NEXUS_GATEWAY", global = true)]
    gateway: Option<String>,
    /// The gateway's SPIFFE ID (its certificate must match).
    #[arg(long, env = "NEXUS_GATEWAY_ID", global = true)]
    gateway_id: Option<String>,
    /// The operator's certificate (PEM, an SVID listed in the gateway's `operators`).
    #[arg(long, env = "NEXUS_OPERATOR_CERT", global = true)]
    cert: Option<PathBuf>,
    /// The operator's private key (PEM).
    #[arg(long, env = "NEXUS_OPERATOR_KEY", global = true)]
    key: Option<PathBuf>,
    /// The trust bundle (PEM CA certificates) of the gateway's trust domain.
    #[arg(long, env = "NEXUS_CA_BUNDLE", global = true)]
    ca: Option<PathBuf>,
    /// Take the operator's SVID and trust bundle from this SPIFFE Workload API socket
    /// (`unix:///path`), as a workload does, when no --cert is given. In a pod registered
    /// with SPIRE, `SPIFFE_ENDPOINT_SOCKET` names it.
    #[arg(
        long,
        env = "SPIFFE_ENDPOINT_SOCKET",
        global = true,
        value_name = "SOCKET"
    )]
    workload_api: Option<String>,
    /// The local stack's state file (default: the one `nexusctl up` writes).
    #[arg(long, global = true)]
    up_state: Option<PathBuf>,
    /// Output: `text` (default) or `json`.
    #[arg(short = 'o', long, default_value = "text", global = true)]
    pub(crate) output: String,
}

/// `nexusctl exec ...`
#[derive(Subcommand)]
pub enum ExecCommand {
    /// Open an execution: the plugin may read the clause's data until it ends. Prints its id.
    Open {
        /// The plugin: its workload's SPIFFE ID, or (with a registry) its UUID or name.
        #[arg(long)]
        plugin: String,
        /// The plugin version to run (a certified one; default: its one certified version).
        #[arg(long, default_value = "")]
        version: String,
        /// The clause.
        #[arg(long)]
        clause: String,
        /// How long it stays open (e.g. 10m).
        #[arg(long, value_parser = humantime::parse_duration)]
        ttl: Duration,
    },
    /// Close an open execution.
    Close {
        /// Its id.
        id: String,
    },
    /// List executions.
    List {
        /// Include closed and expired ones.
        #[arg(long)]
        all: bool,
    },
}

/// Where the operator's SVID comes from.
enum OperatorIdentity {
    /// PEM files (flags, environment, or the local stack's state file).
    Files(FileSourceConfig),
    /// A SPIFFE Workload API socket.
    WorkloadApi(String),
}

/// How long to wait for the Workload API's first SVID.
const WORKLOAD_API_WAIT: Duration = Duration::from_secs(15);

fn operator_identity(target: &Target) -> anyhow::Result<(String, String, OperatorIdentity)> {
    let up: Option<serde_json::Value> = {
        let path = target
            .up_state
            .clone()
            .unwrap_or_else(|| crate::up::default_dir().join("state.json"));
        std::fs::read(&path)
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
    };
    let from_up = |key: &str| -> Option<String> {
        up.as_ref()
            .and_then(|v| v.get(key))
            .and_then(|v| v.as_str())
            .map(str::to_string)
    };
    let missing = |what: &str, flag: &str| {
        anyhow::anyhow!(
            "no {what}: pass {flag} (or its environment variable), or start the local stack with `nexusctl up`"
        )
    };
    let gateway = target
        .gateway
        .clone()
        .or_else(|| from_up("gateway_address"))
        .ok_or_else(|| missing("gateway address", "--gateway"))?;
    let gateway_id = target
        .gateway_id
        .clone()
        .or_else(|| from_up("gateway_id"))
        .ok_or_else(|| missing("gateway SPIFFE ID", "--gateway-id"))?;
    // Certificate files named on the command line or in the environment win; else the
    // Workload API when one is named; else the local stack's files.
    let files_named = target.cert.is_some() || target.key.is_some() || target.ca.is_some();
    if !files_named && let Some(socket) = &target.workload_api {
        return Ok((
            gateway,
            gateway_id,
            OperatorIdentity::WorkloadApi(socket.clone()),
        ));
    }
    let path = |flag: &Option<PathBuf>, key: &str, name: &str| -> anyhow::Result<PathBuf> {
        flag.clone()
            .or_else(|| from_up(key).map(PathBuf::from))
            .ok_or_else(|| {
                missing(
                    name,
                    &format!("--{}", name.split(' ').next_back().unwrap_or(name)),
                )
            })
    };
    let files = FileSourceConfig {
        cert: path(&target.cert, "operator_cert", "operator cert")?,
        key: path(&target.key, "operator_key", "operator key")?,
        bundle: path(&target.ca, "ca_bundle", "trust bundle ca")?,
        federated_bundles: Default::default(),
    };
    Ok((gateway, gateway_id, OperatorIdentity::Files(files)))
}

pub(crate) async fn client(target: &Target) -> anyhow::Result<AdminClient<Channel>> {
    let (gateway, gateway_id, identity) = operator_identity(target)?;
    let store = IdentityStore::new(Arc::new(rustls::crypto::ring::default_provider()));
    match identity {
        OperatorIdentity::Files(files) => {
            let (svid, bundles) =
                load(&files).with_context(|| "cannot load the operator identity")?;
            store
                .publish(svid, &bundles)
                .map_err(|e| anyhow::anyhow!("the operator identity is unusable: {e}"))?;
        }
        OperatorIdentity::WorkloadApi(socket) => {
            let mut updates = store.subscribe();
            tokio::spawn(nexus_identity::source::workload_api::run(
                Some(socket.clone()),
                store.clone(),
            ));
            let first = tokio::time::timeout(WORKLOAD_API_WAIT, async {
                while !store.is_ready() {
                    if updates.changed().await.is_err() {
                        break;
                    }
                }
            })
            .await;
            if first.is_err() || !store.is_ready() {
                anyhow::bail!(
                    "no SVID from the Workload API at {socket} within {}s: is the agent \
                     running there, and is this workload registered (in Kubernetes, does a \
                     ClusterSPIFFEID select this pod)?",
                    WORKLOAD_API_WAIT.as_secs()
                );
            }
        }
    }
    let expected = AllowList::parse(&[&gateway_id])?;
    let channel =
        nexus_identity::tls::grpc_channel(store, expected, &gateway, Duration::from_secs(5))
            .await
            .map_err(|e| anyhow::anyhow!("cannot reach the gateway at {gateway}: {e}"))?;
    Ok(AdminClient::new(channel))
}

pub(crate) fn status_error(status: tonic::Status) -> anyhow::Error {
    anyhow::anyhow!("{}: {}", code_name(status.code()), status.message())
}

fn code_name(code: tonic::Code) -> &'static str {
    match code {
        tonic::Code::PermissionDenied => "PERMISSION_DENIED",
        tonic::Code::InvalidArgument => "INVALID_ARGUMENT",
        tonic::Code::FailedPrecondition => "FAILED_PRECONDITION",
        tonic::Code::Unavailable => "UNAVAILABLE",
        tonic::Code::Unauthenticated => "UNAUTHENTICATED",
        _ => "ERROR",
    }
}

pub(crate) fn print_change(target: &Target, what: &str, r: &ChangeResponse) {
    if target.output == "json" {
        crate::outln!(
            "{}",
            json_line(&serde_json::json!({
                "revision": r.revision, "id": r.id, "subject": r.subject, "sidecars": r.sidecars,
                "acknowledged": r.acknowledged,
                "all_acknowledged_after_us": r.all_acknowledged_after_us,
            }))
        );
        return;
    }
    let acks = if r.all_acknowledged_after_us > 0 {
        format!(
            "acknowledged by all {} sidecars in {:.3} ms",
            r.sidecars,
            r.all_acknowledged_after_us as f64 / 1000.0
        )
    } else {
        format!(
            "acknowledged by {} of {} sidecars so far",
            r.acknowledged, r.sidecars
        )
    };
    crate::outln!("{} at revision {}; {acks}", safe(what), r.revision);
}

/// How long change commands wait for the sidecars' acknowledgements.
pub(crate) const WAIT_MS: u64 = 5_000;

/// `nexusctl revoke`.
pub async fn revoke(
    target: Target,
    subject: String,
    reason: String,
    ttl: Option<Duration>,
) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    let r = c
        .revoke(RevokeRequest {
            subject: subject.clone(),
            reason,
            ttl_ms: ttl.map(|t| t.as_millis() as u64).unwrap_or(0),
            wait_ms: WAIT_MS,
        })
        .await
        .map_err(status_error)?
        .into_inner();
    // The gateway answers with the subject as stored (its normalized spelling).
    let shown = if r.subject.is_empty() {
        subject
    } else {
        r.subject.clone()
    };
    print_change(&target, &format!("revoked {shown}"), &r);
    Ok(())
}

/// `nexusctl reinstate`.
pub async fn reinstate(target: Target, subject: String) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    let r = c
        .reinstate(ReinstateRequest {
            subject: subject.clone(),
            wait_ms: WAIT_MS,
            ..Default::default()
        })
        .await
        .map_err(status_error)?
        .into_inner();
    let shown = if r.subject.is_empty() {
        subject
    } else {
        r.subject.clone()
    };
    print_change(&target, &format!("reinstated {shown}"), &r);
    Ok(())
}

/// `nexusctl exec ...`.
pub async fn exec(target: Target, command: ExecCommand) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    match command {
        ExecCommand::Open {
            plugin,
            version,
            clause,
            ttl,
        } => {
            let r = c
                .open_execution(OpenExecutionRequest {
                    plugin,
                    clause,
                    ttl_ms: ttl.as_millis() as u64,
                    wait_ms: WAIT_MS,
                    plugin_version: version,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            if target.output == "json" {
                print_change(&target, "", &r);
            } else {
                crate::outln!("{}", safe(&r.id));
            }
        }
        ExecCommand::Close { id } => {
            let r = c
                .close_execution(CloseExecutionRequest {
                    id: id.clone(),
                    wait_ms: WAIT_MS,
                    ..Default::default()
                })
                .await
                .map_err(status_error)?
                .into_inner();
            print_change(&target, &format!("closed {id}"), &r);
        }
        ExecCommand::List { all } => {
            let list = c
                .list_executions(ListExecutionsRequest {
                    include_closed: all,
                })
                .await
                .map_err(status_error)?
                .into_inner()
                .executions;
            let rows: Vec<serde_json::Value> = list
                .iter()
                .filter_map(|e| {
                    let x = e.execution.as_ref()?;
                    Some(serde_json::json!({
                        "id": x.id, "plugin": x.plugin, "clause": x.clause,
                        "not_after": rfc3339(x.not_after_unix_ms), "opened_by": x.opened_by,
                        "open": e.closed_revision == 0, "close_reason": e.close_reason,
                        "plugin_uid": x.plugin_uid, "plugin_version": x.plugin_version,
                        "image_digest": x.image_digest,
                    }))
                })
                .collect();
            if target.output == "json" {
                crate::outln!("{}", json_line(&serde_json::Value::Array(rows)));
            } else {
                crate::outln!(
                    "{:<22} {:<10} {:<22} {:<7} PLUGIN",
                    "ID",
                    "CLAUSE",
                    "NOT AFTER",
                    "STATE"
                );
                for r in rows {
                    let version = match r["plugin_version"].as_str().unwrap_or("") {
                        "" => String::new(),
                        v => format!(
                            " v{v} ({}, {})",
                            r["plugin_uid"].as_str().unwrap_or(""),
                            r["image_digest"].as_str().unwrap_or("")
                        ),
                    };
                    crate::outln!(
                        "{:<22} {:<10} {:<22} {:<7} {}{}",
                        safe(r["id"].as_str().unwrap_or("")),
                        safe(r["clause"].as_str().unwrap_or("")),
                        safe(r["not_after"].as_str().unwrap_or("")),
                        safe(if r["open"] == true {
                            "open"
                        } else {
                            r["close_reason"].as_str().unwrap_or("closed")
                        }),
                        safe(r["plugin"].as_str().unwrap_or("")),
                        safe(&version)
                    );
                }
            }
        }
    }
    Ok(())
}

pub(crate) fn rfc3339(ms: u64) -> String {
    nexus_audit::rfc3339_unix_ms(ms)
}

/// `nexusctl status`.
pub async fn status(target: Target) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    let s = c
        .status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    let last = s.last_revocation.as_ref().map(|p| {
        serde_json::json!({
            "revision": p.revision, "subject": p.subject, "started": rfc3339(p.started_unix_ms),
            "sidecars": p.sidecars, "acknowledged": p.acknowledged,
            "all_acknowledged_after_ms": (p.all_acknowledged_after_us > 0).then(|| p.all_acknowledged_after_us as f64 / 1000.0),
            "replicas": p.replicas,
        })
    });
    let json = serde_json::json!({
        "gateway": s.gateway,
        "store": s.store,
        "revision": s.revision,
        "open_executions": s.open_executions,
        "sidecars": s.sidecars.iter().map(|x| serde_json::json!({
            "spiffe_id": x.spiffe_id, "address": x.remote_addr, "connected": rfc3339(x.connected_unix_ms),
            "acknowledged_revision": x.acknowledged_revision, "last_heard": rfc3339(x.last_heard_unix_ms),
            "version": x.version, "gateway": x.gateway,
            "apply_error": (!x.apply_error.is_empty()).then_some(&x.apply_error),
            "policy": x.policy.as_ref().map(|p| serde_json::json!({
                "revision": p.revision,
                "loaded": (p.loaded_unix_ms > 0).then(|| rfc3339(p.loaded_unix_ms)),
                "reload_error": (!p.reload_error.is_empty()).then_some(&p.reload_error),
                "failed": (p.failed_unix_ms > 0).then(|| rfc3339(p.failed_unix_ms)),
            })),
        })).collect::<Vec<_>>(),
        "replicas": s.replicas.iter().map(|r| serde_json::json!({
            "gateway": r.gateway, "revision": r.revision, "sidecars": r.sidecar_count,
            "reported": rfc3339(r.reported_unix_ms),
        })).collect::<Vec<_>>(),
        "revoked": s.revoked.iter().map(|r| serde_json::json!({
            "subject": r.subject, "reason": r.reason, "by": r.by, "at": rfc3339(r.at_unix_ms),
            "expires": (r.expires_unix_ms > 0).then(|| rfc3339(r.expires_unix_ms)),
        })).collect::<Vec<_>>(),
        "last_revocation": last,
        "warnings": s.warnings,
    });
    if target.output == "json" {
        crate::outln!("{}", json_pretty(&json));
        return Ok(());
    }
    crate::outln!(
        "gateway {} ({}), revision {}, {} open executions",
        safe(&s.gateway),
        safe(&s.store),
        s.revision,
        s.open_executions
    );
    for warning in &s.warnings {
        crate::outln!("warning: {}", safe(warning));
    }
    crate::outln!("\nSIDECARS ({})", s.sidecars.len());
    for x in &s.sidecars {
        let lag = if x.acknowledged_revision >= s.revision {
            "in sync".to_string()
        } else {
            format!("behind ({} < {})", x.acknowledged_revision, s.revision)
        };
        crate::outln!(
            "  {:<60} acked {:<6} {lag}  {} via {}",
            safe(&x.spiffe_id),
            x.acknowledged_revision,
            safe(&x.remote_addr),
            safe(&x.gateway)
        );
        if !x.apply_error.is_empty() {
            crate::outln!("    cannot apply {}", safe(&x.apply_error));
        }
        match &x.policy {
            Some(p) if p.revision.is_empty() => {
                crate::outln!("    policy: none loaded (denies every request)")
            }
            Some(p) => crate::outln!(
                "    policy {} (loaded {})",
                safe(&p.revision),
                rfc3339(p.loaded_unix_ms)
            ),
            None => crate::outln!("    policy: not reported"),
        }
        if let Some(p) = x.policy.as_ref().filter(|p| !p.reload_error.is_empty()) {
            crate::outln!(
                "    last policy reload failed ({}): {}",
                rfc3339(p.failed_unix_ms),
                safe(&p.reload_error)
            );
        }
    }
    if s.replicas.len() > 1 {
        crate::outln!("\nREPLICAS ({})", s.replicas.len());
        for r in &s.replicas {
            crate::outln!(
                "  {:<30} revision {:<6} {} sidecars, reported {}",
                safe(&r.gateway),
                r.revision,
                r.sidecar_count,
                rfc3339(r.reported_unix_ms)
            );
        }
    }
    crate::outln!("\nREVOKED ({})", s.revoked.len());
    for r in &s.revoked {
        let expires = if r.expires_unix_ms > 0 {
            format!(" (until {})", rfc3339(r.expires_unix_ms))
        } else {
            String::new()
        };
        crate::outln!(
            "  {:<60} by {}{expires}: {}",
            safe(&r.subject),
            safe(&r.by),
            safe(&r.reason)
        );
    }
    if let Some(p) = &s.last_revocation {
        if p.all_acknowledged_after_us > 0 {
            crate::outln!(
                "\nlast revocation: {} (revision {}) acknowledged by all {} sidecars{} in {:.3} ms",
                safe(&p.subject),
                p.revision,
                p.sidecars,
                if p.replicas > 1 {
                    format!(" of {} replicas", p.replicas)
                } else {
                    String::new()
                },
                p.all_acknowledged_after_us as f64 / 1000.0
            );
        } else {
            crate::outln!(
                "\nlast revocation: {} (revision {}) acknowledged by {} of {} sidecars so far",
                safe(&p.subject),
                p.revision,
                p.acknowledged,
                p.sidecars
            );
        }
    }
    Ok(())
}

fn signal_row(s: &nexus_proto::control::StoredSignal) -> serde_json::Value {
    let sig = s.signal.clone().unwrap_or_default();
    let mut row = serde_json::json!({
        "id": s.id, "observed": rfc3339(sig.time_unix_ms),
        "received": rfc3339(s.received_unix_ms), "kind": sig.kind,
        "workload": sig.workload, "reporter": s.reporter, "observed_as": sig.observed_as,
        "score": sig.score,
        "evidence": serde_json::from_str::<serde_json::Value>(&sig.evidence_json).unwrap_or_default(),
        "decision_ids": sig.decision_ids,
        "verification": serde_json::from_str::<serde_json::Value>(&s.verification_json).unwrap_or_default(),
        "action": s.action, "reasons": s.reasons,
    });
    // The plugin versions the workload ran (the gateway's, from its open executions).
    row["plugins"] = row["verification"]["plugins"].clone();
    if row["plugins"].is_null() {
        row["plugins"] = serde_json::json!([]);
    }
    row
}

/// ` vVERSION (UID, DIGEST)` for each plugin version of a signal or execution row.
fn plugin_versions(plugins: &serde_json::Value) -> String {
    plugins
        .as_array()
        .map(|list| {
            list.iter()
                .map(|p| {
                    format!(
                        " v{} ({}, {})",
                        p["plugin_version"].as_str().unwrap_or(""),
                        p["plugin_uid"].as_str().unwrap_or(""),
                        p["image_digest"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `nexusctl signals --show ID`: the signal and the execution records it cites.
pub async fn signal_evidence(target: Target, id: String) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    let answer = c
        .signal_evidence(nexus_proto::control::SignalEvidenceRequest { id })
        .await
        .map_err(status_error)?
        .into_inner();
    let signal = answer.signal.as_ref().map(signal_row).unwrap_or_default();
    let records: Vec<serde_json::Value> = answer
        .records
        .iter()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|_| serde_json::Value::String(line.clone()))
        })
        .collect();
    if target.output == "json" {
        crate::outln!(
            "{}",
            json_pretty(&serde_json::json!({
                "signal": signal,
                "records": records,
                "missing": answer.missing,
            }))
        );
        return Ok(());
    }
    let text = |v: &serde_json::Value| safe(v.as_str().unwrap_or("")).into_owned();
    crate::outln!(
        "signal {}: {} of {} (observed as {} by {}), score {:.2}, action {}",
        text(&signal["id"]),
        text(&signal["kind"]),
        text(&signal["workload"]),
        text(&signal["observed_as"]),
        text(&signal["reporter"]),
        signal["score"].as_f64().unwrap_or(0.0),
        text(&signal["action"]),
    );
    crate::outln!(
        "  observed {}  received {}",
        text(&signal["observed"]),
        text(&signal["received"])
    );
    crate::outln!("  evidence {}", safe(&signal["evidence"].to_string()));
    if let Some(reasons) = signal["reasons"].as_array() {
        for r in reasons {
            crate::outln!("  reason: {}", text(r));
        }
    }
    crate::outln!(
        "records cited: {} ({} found in the record store, {} missing)",
        records.len() + answer.missing.len(),
        records.len(),
        answer.missing.len()
    );
    crate::outln!(
        "{:<24} {:<32} {:<6} {:<12} {:<8} {:<6} PATH (SOURCE -> DESTINATION)",
        "TIME",
        "DECISION ID",
        "METHOD",
        "CLAUSE",
        "DECISION",
        "STATUS"
    );
    for r in &records {
        crate::outln!(
            "{:<24} {:<32} {:<6} {:<12} {:<8} {:<6} {} ({} -> {})",
            text(&r["time"]),
            text(&r["decision_id"]),
            text(&r["method"]),
            text(&r["clause"]),
            text(&r["decision"]),
            r["status"].as_u64().unwrap_or(0),
            text(&r["path"]),
            text(&r["source"]),
            text(&r["destination"]),
        );
    }
    for id in &answer.missing {
        crate::outln!("(not in the record store: {})", safe(id));
    }
    Ok(())
}

/// `nexusctl signals`.
pub async fn signals(
    target: Target,
    workload: Option<String>,
    since: Duration,
) -> anyhow::Result<()> {
    let mut c = client(&target).await?;
    let since_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .saturating_sub(since)
        .as_millis() as u64;
    let list = c
        .list_signals(ListSignalsRequest {
            workload: workload.unwrap_or_default(),
            since_unix_ms: since_ms,
            limit: 1000,
        })
        .await
        .map_err(status_error)?
        .into_inner()
        .signals;
    let rows: Vec<serde_json::Value> = list.iter().map(signal_row).collect();
    if target.output == "json" {
        crate::outln!("{}", json_pretty(&serde_json::Value::Array(rows)));
        return Ok(());
    }
    crate::outln!(
        "{:<24} {:<18} {:>7} {:<7} {:<12} WORKLOAD [PLUGIN VERSION] (REPORTER) REASONS",
        "RECEIVED",
        "KIND",
        "SCORE",
        "ACTION",
        "EVIDENCE"
    );
    for r in rows {
        let reasons: Vec<String> = r["reasons"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|x| safe(x.as_str().unwrap_or("")).into_owned())
                    .collect()
            })
            .unwrap_or_default();
        crate::outln!(
            "{:<24} {:<18} {:>7.1} {:<7} {:<12} {}{} ({}) {}",
            safe(r["received"].as_str().unwrap_or("")),
            safe(r["kind"].as_str().unwrap_or("")),
            r["score"].as_f64().unwrap_or(0.0),
            safe(r["action"].as_str().unwrap_or("")),
            safe(r["verification"]["status"].as_str().unwrap_or("")),
            safe(r["workload"].as_str().unwrap_or("")),
            safe(&plugin_versions(&r["plugins"])),
            safe(r["reporter"].as_str().unwrap_or("")),
            reasons.join("; ")
        );
    }
    Ok(())
}

impl Target {
    /// A target given in full (for `nexusctl up`).
    pub fn local(
        gateway: &str,
        gateway_id: &str,
        cert: &std::path::Path,
        key: &std::path::Path,
        ca: &std::path::Path,
    ) -> Self {
        Self {
            gateway: Some(gateway.to_string()),
            gateway_id: Some(gateway_id.to_string()),
            cert: Some(cert.to_path_buf()),
            key: Some(key.to_path_buf()),
            ca: Some(ca.to_path_buf()),
            workload_api: None,
            up_state: None,
            output: "text".into(),
        }
    }
}

/// How many sidecars are connected to the gateway.
pub async fn connected_sidecars(target: &Target) -> anyhow::Result<usize> {
    let mut c = client(target).await?;
    Ok(c.status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner()
        .sidecars
        .len())
}

/// The gateway's revocations and its number of open executions.
pub async fn current_state(
    target: &Target,
) -> anyhow::Result<(Vec<nexus_proto::control::Revocation>, u32)> {
    let mut c = client(target).await?;
    let status = c
        .status(StatusRequest {})
        .await
        .map_err(status_error)?
        .into_inner();
    Ok((status.revoked, status.open_executions))
}

/// Opens an execution and waits for the sidecars to apply it; returns its id.
pub async fn open_execution(
    target: &Target,
    plugin: &str,
    clause: &str,
    ttl: Duration,
) -> anyhow::Result<String> {
    let mut c = client(target).await?;
    Ok(c.open_execution(OpenExecutionRequest {
        plugin: plugin.to_string(),
        clause: clause.to_string(),
        ttl_ms: ttl.as_millis() as u64,
        wait_ms: WAIT_MS,
        plugin_version: String::new(),
        ..Default::default()
    })
    .await
    .map_err(status_error)?
    .into_inner()
    .id)
}
