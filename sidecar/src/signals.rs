//! Sandbox violation signals from `nexus-launch`, on the in-pod report socket.
//!
//! Reports are writes into the sidecar (a `kill` report revokes the pod's own workload
//! through the gateway's revocation policy), so they are taken only on a unix socket in
//! a folder the pod shares with nobody else (`[reports] socket`), from a caller whose
//! uid is listed (`SO_PEERCRED`) and/or who presents the per-pod token the sidecar wrote
//! at start ([`serve_socket`]). The admin listener, on the pod IP, answers `POST` with
//! 403 and counts it (`nexus_reports_refused_total{reason="network"}`); it still lists
//! the recent violations (`GET`), which is read-only.
//!
//! `POST /v1/signals` takes one JSON violation (`{"kind": "sandbox_violation", "workload",
//! "syscall", "action": "kill|eperm|log", "pid", "exit_signal", "time"}`), answers 202,
//! counts `nexus_sandbox_violations_total{action}`, logs it and keeps it in a bounded ring.
//! `GET /v1/signals` lists the ring. Bodies are capped at [`MAX_BODY`] bytes; malformed or
//! oversized input gets a 4xx and changes nothing.
//!
//! The ring is the local interface the anomaly detectors read: [`Signals::since`] with
//! the last sequence number seen, woken by [`Signals::changed`]. A full ring drops its
//! oldest entry and counts it ([`Signals::dropped`]).
//!

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::{Deserialize, Serialize};

use crate::metrics::Metrics;

/// The route on the admin listener.
pub const PATH: &str = "/v1/signals";
/// Largest accepted body.
pub const MAX_BODY: usize = 16 * 1024;
/// Signals kept for the forwarder when nothing else is configured.
pub const DEFAULT_CAPACITY: usize = 256;

/// A violation as the launcher reports it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxViolation {
    /// Always `sandbox_violation`.
    pub kind: String,
    /// The plugin's workload (SPIFFE ID) as the launcher saw it; the forwarder attributes
    /// the signal to this sidecar's own identity whatever this says.
    #[serde(default)]
    pub workload: Option<String>,
    /// The syscall name, or `unknown`.
    pub syscall: String,
    /// `kill`, `eperm` or `log`.
    pub action: String,
    /// The offending process.
    pub pid: u32,
    /// The signal that ended it, if it was ended.
    #[serde(default)]
    pub exit_signal: Option<i32>,
    /// When it happened (RFC 3339).
    pub time: String,
    /// The sandbox profile in force.
    #[serde(default)]
    pub profile: Option<String>,
}

/// A stored violation with its sequence number and arrival time.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Received {
    /// Increases by one per accepted signal, from 1.
    pub seq: u64,
    /// When the sidecar accepted it (RFC 3339).
    pub received: String,
    /// The violation.
    #[serde(flatten)]
    pub violation: SandboxViolation,
}

#[derive(Debug, Default)]
struct Ring {
    last_seq: u64,
    dropped: u64,
    items: VecDeque<Received>,
}

/// The sidecar's store of recent sandbox signals.
#[derive(Debug)]
pub struct Signals {
    ring: Mutex<Ring>,
    capacity: usize,
    metrics: Arc<Metrics>,
    changed: tokio::sync::Notify,
}

/// Why a report was refused (each a 4xx).
#[derive(Debug, thiserror::Error)]
pub enum SignalError {
    /// The body is larger than [`MAX_BODY`].
    #[error("body larger than {MAX_BODY} bytes")]
    TooLarge,
    /// The body could not be read.
    #[error("cannot read the body")]
    Body,
    /// Not JSON of the expected shape.
    #[error("malformed signal: {0}")]
    Malformed(String),
}

impl SignalError {
    fn status(&self) -> StatusCode {
        match self {
            SignalError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            SignalError::Body | SignalError::Malformed(_) => StatusCode::BAD_REQUEST,
        }
    }
}

impl Signals {
    /// An empty store keeping the last `capacity` signals.
    pub fn new(metrics: Arc<Metrics>, capacity: usize) -> Arc<Self> {
        Arc::new(Self {
            ring: Mutex::new(Ring::default()),
            capacity: capacity.max(1),
            metrics,
            changed: tokio::sync::Notify::new(),
        })
    }

    /// Checks and stores one violation; returns its sequence number.
    pub fn record(&self, violation: SandboxViolation) -> Result<u64, SignalError> {
        let action = validate(&violation)?;
        self.metrics.sandbox_violation(action);
        tracing::warn!(
            syscall = %violation.syscall,
            action,
            pid = violation.pid,
            exit_signal = ?violation.exit_signal,
            workload = violation.workload.as_deref().unwrap_or("-"),
            profile = violation.profile.as_deref().unwrap_or("-"),
            "sandbox violation"
        );
        let received = nexus_audit::rfc3339_ms(time::OffsetDateTime::now_utc());
        let seq = {
            let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
            ring.last_seq += 1;
            let seq = ring.last_seq;
            if ring.items.len() >= self.capacity {
                ring.items.pop_front();
                ring.dropped += 1;
            }
            ring.items.push_back(Received {
                seq,
                received,
                violation,
            });
            seq
        };
        self.changed.notify_waiters();
        Ok(seq)
    }

    /// Every stored signal, oldest first.
    pub fn recent(&self) -> Vec<Received> {
        self.since(0)
    }

    /// The stored signals with a sequence number above `seq`, oldest first.
    pub fn since(&self, seq: u64) -> Vec<Received> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        ring.items.iter().filter(|r| r.seq > seq).cloned().collect()
    }

    /// Signals pushed out of the ring before anyone read them.
    pub fn dropped(&self) -> u64 {
        self.ring.lock().unwrap_or_else(|p| p.into_inner()).dropped
    }

    /// Resolves at the next accepted signal.
    pub async fn changed(&self) {
        self.changed.notified().await;
    }

    /// Serves `PATH`: POST a violation, GET the recent ones.
    pub async fn handle<B>(&self, req: Request<B>) -> Response<Full<Bytes>>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        match *req.method() {
            Method::POST => match self.accept(req.into_body()).await {
                Ok(seq) => json(StatusCode::ACCEPTED, &serde_json::json!({ "seq": seq })),
                Err(e) => json(e.status(), &serde_json::json!({ "error": e.to_string() })),
            },
            Method::GET => json(
                StatusCode::OK,
                &serde_json::json!({ "signals": self.recent(), "dropped": self.dropped() }),
            ),
            _ => json(
                StatusCode::METHOD_NOT_ALLOWED,
                &serde_json::json!({ "error": "use POST (report) or GET (list)" }),
            ),
        }
    }

    async fn accept<B>(&self, body: B) -> Result<u64, SignalError>
    where
        B: hyper::body::Body,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let collected = Limited::new(body, MAX_BODY).collect().await.map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                SignalError::TooLarge
            } else {
                SignalError::Body
            }
        })?;
        let violation: SandboxViolation = serde_json::from_slice(&collected.to_bytes())
            .map_err(|e| SignalError::Malformed(e.to_string()))?;
        self.record(violation)
    }
}

/// Who may report on the socket.
#[derive(Clone, Debug)]
pub struct ReportAuth {
    /// Allowed peer uids (empty: not checked).
    pub peer_uids: Vec<u32>,
    /// The token every report must carry, if any.
    pub token: Option<String>,
}

/// Creates the per-pod token: 32 random bytes, hex, written to `path` (mode 0644 through
/// a temporary file and a rename).
pub fn write_token(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut bytes = [0u8; 32];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut bytes)
        .map_err(|_| std::io::Error::other("no randomness for the report token"))?;
    let token = data_encoding::HEXLOWER.encode(&bytes);
    let mut tmp_name = path.file_name().unwrap_or_default().to_os_string();
    tmp_name.push(".tmp");
    let tmp = path.with_file_name(tmp_name);
    let _ = std::fs::remove_file(&tmp);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)?;
    file.write_all(token.as_bytes())?;
    file.sync_all()?;
    std::fs::rename(&tmp, path)?;
    Ok(token)
}

/// Binds the report socket at `path` (a stale socket left by a previous run is
/// replaced; anything else in the way is an error), mode 0666: the peer checks decide.
pub fn bind_socket(path: &std::path::Path) -> std::io::Result<tokio::net::UnixListener> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path)?,
        Ok(_) => {
            return Err(std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                format!("{} exists and is not a socket", path.display()),
            ));
        }
        Err(_) => {}
    }
    let listener = tokio::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o666))?;
    Ok(listener)
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Serves `POST`/`GET /v1/signals` on the report socket until the process exits (at
/// most `max_connections` at once, HTTP/1 with the head limits of `limits`), each
/// connection's peer uid and each request's token checked first.
pub async fn serve_socket(
    listener: tokio::net::UnixListener,
    auth: ReportAuth,
    signals: Arc<Signals>,
    limits: nexus_serve::ConnLimits,
    max_connections: usize,
) {
    let auth = Arc::new(auth);
    let server = nexus_serve::http_server(&limits).http1_only();
    // Open until exit, as the admin listener: the launcher reports through the drain.
    let open = nexus_serve::Watch::never();
    nexus_serve::accept(listener, max_connections, open, "reports", |stream, _, drain| {
        let (auth, signals, server) = (auth.clone(), signals.clone(), server.clone());
        async move {
            let uid = stream.peer_cred().map(|c| c.uid()).ok();
            let pid = stream.peer_cred().ok().and_then(|c| c.pid());
            if !auth.peer_uids.is_empty() && !uid.is_some_and(|u| auth.peer_uids.contains(&u)) {
                signals.metrics.report_refused("peer_uid");
                tracing::warn!(?uid, ?pid, allowed = ?auth.peer_uids, "report refused: the caller's uid is not in reports.peer_uids");
                // Dropped unanswered: nothing is read from a caller that may not report.
                return;
            }
            let service = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                let auth = auth.clone();
                let signals = signals.clone();
                async move {
                    if let Some(token) = &auth.token {
                        let presented = req
                            .headers()
                            .get(http::header::AUTHORIZATION)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.strip_prefix("Bearer "))
                            .unwrap_or("");
                        if !constant_time_eq(presented.as_bytes(), token.as_bytes()) {
                            signals.metrics.report_refused("token");
                            tracing::warn!(
                                ?uid,
                                ?pid,
                                "report refused: missing or wrong token (reports.token_file)"
                            );
                            return Ok::<_, std::convert::Infallible>(json(
                                StatusCode::UNAUTHORIZED,
                                &serde_json::json!({"error": "a report needs the pod's report token: Authorization: Bearer <contents of reports.token_file>"}),
                            ));
                        }
                    }
                    if req.uri().path() != PATH {
                        return Ok(json(
                            StatusCode::NOT_FOUND,
                            &serde_json::json!({"error": format!("only {PATH} is served here")}),
                        ));
                    }
                    Ok(signals.handle(req).await)
                }
            });
            if let Err(error) = nexus_serve::serve_connection(&server, stream, service, drain).await
            {
                tracing::debug!(%error, "report connection ended with an error");
            }
        }
    })
    .await;
}

/// The answer to a report on the network listener: refused, pointing at the socket.
pub fn refuse_on_network(metrics: &Metrics) -> Response<Full<Bytes>> {
    metrics.report_refused("network");
    tracing::warn!(
        "report refused: POST /v1/signals arrived on the admin listener (network); reports are taken only on the in-pod socket ([reports] socket)"
    );
    json(
        StatusCode::FORBIDDEN,
        &serde_json::json!({"error": "reports are accepted only on the in-pod report socket ([reports] socket), never on the network listener"}),
    )
}

/// Checks the fields; returns the action as a bounded label value.
fn validate(v: &SandboxViolation) -> Result<&'static str, SignalError> {
    if v.kind != "sandbox_violation" {
        return Err(SignalError::Malformed(format!(
            "kind {:?} is not \"sandbox_violation\"",
            v.kind
        )));
    }
    let action = match v.action.as_str() {
        "kill" => "kill",
        "eperm" => "eperm",
        "log" => "log",
        other => {
            return Err(SignalError::Malformed(format!(
                "action {other:?} is not kill, eperm or log"
            )));
        }
    };
    if v.syscall.is_empty()
        || v.syscall.len() > 64
        || !v
            .syscall
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(SignalError::Malformed(
            "syscall must be a syscall name ([a-z0-9_], at most 64 bytes)".into(),
        ));
    }
    if time::OffsetDateTime::parse(&v.time, &time::format_description::well_known::Rfc3339).is_err()
    {
        return Err(SignalError::Malformed(format!(
            "time {:?} is not RFC 3339",
            v.time
        )));
    }
    for (name, value) in [("workload", &v.workload), ("profile", &v.profile)] {
        if value.as_ref().is_some_and(|s| s.len() > 2048) {
            return Err(SignalError::Malformed(format!(
                "{name} is longer than 2048 bytes"
            )));
        }
    }
    Ok(action)
}

fn json(status: StatusCode, value: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violation(syscall: &str, action: &str) -> SandboxViolation {
        SandboxViolation {
            kind: "sandbox_violation".into(),
            workload: Some("spiffe://nexus.local/ns/plugins/sa/flood-model".into()),
            syscall: syscall.into(),
            action: action.into(),
            pid: 42,
            exit_signal: Some(9),
            time: "2026-11-26T09:41:07Z".into(),
            profile: Some("default".into()),
        }
    }

    async fn post(signals: &Signals, body: impl Into<Bytes>) -> StatusCode {
        let req = Request::post(PATH)
            .body(Full::new(body.into()))
            .expect("request");
        signals.handle(req).await.status()
    }

    #[tokio::test]
    async fn accepts_counts_and_keeps_a_bounded_ring() {
        let metrics = Metrics::new();
        let signals = Signals::new(metrics.clone(), 2);
        for syscall in ["ptrace", "bpf", "socket"] {
            let body = serde_json::to_vec(&violation(syscall, "kill")).expect("json");
            assert_eq!(post(&signals, body).await, StatusCode::ACCEPTED);
        }
        let recent = signals.recent();
        assert_eq!(
            recent
                .iter()
                .map(|r| r.violation.syscall.as_str())
                .collect::<Vec<_>>(),
            ["bpf", "socket"]
        );
        assert_eq!(signals.dropped(), 1);
        assert_eq!(signals.since(2).len(), 1);
        assert!(
            metrics
                .encode()
                .contains("nexus_sandbox_violations_total{action=\"kill\"} 3")
        );
    }

    #[tokio::test]
    async fn malformed_and_oversized_bodies_are_4xx() {
        let signals = Signals::new(Metrics::new(), 8);
        assert_eq!(post(&signals, "not json").await, StatusCode::BAD_REQUEST);
        let mut bad = violation("ptrace", "explode");
        assert_eq!(
            post(&signals, serde_json::to_vec(&bad).expect("json")).await,
            StatusCode::BAD_REQUEST
        );
        bad = violation("pt race; rm", "kill");
        assert_eq!(
            post(&signals, serde_json::to_vec(&bad).expect("json")).await,
            StatusCode::BAD_REQUEST
        );
        assert_eq!(
            post(&signals, vec![b' '; MAX_BODY + 1]).await,
            StatusCode::PAYLOAD_TOO_LARGE
        );
        assert!(signals.recent().is_empty());
    }
}
