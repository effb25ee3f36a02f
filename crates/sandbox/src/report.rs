//! Violation reports: the JSON the launcher POSTs to the sidecar (`POST /v1/signals`),
//! over a plain HTTP/1.1 client small enough for plugin images.
//!
//! Reports go over the pod's own report socket (`unix:///var/run/nexus-reports/signals.sock`,
//! an `emptyDir` shared with the sidecar only), never a TCP port: the sidecar refuses
//! them on its network listener. The sidecar checks the caller's uid and/or the per-pod
//! token, which the launcher reads from `$NEXUS_REPORT_TOKEN_FILE` at each report (it
//! runs outside the plugin's sandbox; the plugin's profile must not grant that file).
//!
//! The report is best effort: one attempt with short timeouts, failures logged to
//! stderr, never blocking the plugin for long.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// The `kind` of a sandbox violation signal.
pub const KIND: &str = "sandbox_violation";

/// The `syscall` of the report a `best_effort` launch of a profile that confines nothing
/// sends once at start (`action` "log"): the plugin runs, and the sidecar hears of it.
pub const UNCONFINED: &str = "profile_confines_nothing";

/// One violation, as the sidecar receives it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Violation {
    /// Always [`KIND`].
    pub kind: String,
    /// The plugin's workload (SPIFFE ID), from `NEXUS_WORKLOAD_ID`, if set.
    pub workload: Option<String>,
    /// The syscall name, or "unknown" when the kernel killed without saying which.
    pub syscall: String,
    /// `kill`, `eperm` or `log`.
    pub action: String,
    /// The offending process (in the launcher's pid namespace).
    pub pid: u32,
    /// The signal that ended the process (9 for a launcher kill, 31 for a kernel
    /// seccomp kill), absent for `log`.
    pub exit_signal: Option<i32>,
    /// When (RFC 3339, UTC).
    pub time: String,
    /// The profile in force.
    #[serde(default)]
    pub profile: Option<String>,
}

impl Violation {
    /// A violation observed now.
    pub fn now(
        syscall: &str,
        action: &str,
        pid: u32,
        exit_signal: Option<i32>,
        profile: &str,
    ) -> Violation {
        let time = time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default();
        Violation {
            kind: KIND.into(),
            workload: std::env::var("NEXUS_WORKLOAD_ID")
                .ok()
                .filter(|w| !w.is_empty()),
            syscall: syscall.into(),
            action: action.into(),
            pid,
            exit_signal,
            time,
            profile: Some(profile.into()),
        }
    }
}

/// Why a report was not delivered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    /// Only `unix:///path/to/socket` is understood: reports never travel over the network.
    #[error(
        "report URL {0:?} is not unix:///path/to/socket (violations go to the sidecar's in-pod report socket, e.g. unix:///var/run/nexus-reports/signals.sock)"
    )]
    Url(String),
    /// The token file could not be read.
    #[error("cannot read the report token {file}: {source}")]
    Token {
        /// The file (`NEXUS_REPORT_TOKEN_FILE`).
        file: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// Connecting, writing or reading failed.
    #[error("cannot deliver the report to {url}: {source}")]
    Io {
        /// The URL.
        url: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The sidecar answered with an error status.
    #[error("{url} answered {status}")]
    Status {
        /// The URL.
        url: String,
        /// The status line.
        status: String,
    },
}

/// Checks a report URL without sending anything.
pub fn check_url(url: &str) -> Result<(), ReportError> {
    socket_path(url).map(|_| ())
}

/// The socket path of `unix:///abs/path` (or `unix:/abs/path`).
fn socket_path(url: &str) -> Result<PathBuf, ReportError> {
    let rest = url
        .strip_prefix("unix://")
        .or_else(|| url.strip_prefix("unix:"))
        .ok_or_else(|| ReportError::Url(url.into()))?;
    if !rest.starts_with('/') || rest.len() > 107 || rest.contains('\0') {
        return Err(ReportError::Url(url.into()));
    }
    Ok(PathBuf::from(rest))
}

/// The per-pod token, from the file `$NEXUS_REPORT_TOKEN_FILE` names (none if unset).
fn token() -> Result<Option<String>, ReportError> {
    let Some(file) = std::env::var_os("NEXUS_REPORT_TOKEN_FILE").filter(|f| !f.is_empty()) else {
        return Ok(None);
    };
    let file = PathBuf::from(file);
    let text = std::fs::read_to_string(&file).map_err(|source| ReportError::Token {
        file: file.clone(),
        source,
    })?;
    Ok(Some(text.trim().to_string()))
}

/// POSTs one violation; returns once the sidecar answered 2xx.
pub fn send(url: &str, violation: &Violation) -> Result<(), ReportError> {
    let path = socket_path(url)?;
    let io = |source| ReportError::Io {
        url: url.into(),
        source,
    };
    let body = serde_json::to_vec(violation).map_err(|e| io(std::io::Error::other(e)))?;
    let token = token()?;
    let timeout = Duration::from_secs(2);
    let mut stream = UnixStream::connect(&path).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let authorization = token
        .map(|t| format!("Authorization: Bearer {t}\r\n"))
        .unwrap_or_default();
    let head = format!(
        "POST /v1/signals HTTP/1.1\r\nHost: nexus-sidecar\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    stream.write_all(head.as_bytes()).map_err(io)?;
    stream.write_all(&body).map_err(io)?;
    let mut response = Vec::new();
    let mut buf = [0u8; 512];
    // The status line is all we need; stop reading there.
    while !response.contains(&b'\n') && response.len() < 4096 {
        let n = stream.read(&mut buf).map_err(io)?;
        if n == 0 {
            break;
        }
        response.extend_from_slice(&buf[..n]);
    }
    let status = String::from_utf8_lossy(&response)
        .lines()
        .next()
        .unwrap_or_default()
        .to_string();
    let code = status.split_whitespace().nth(1).unwrap_or_default();
    if code.starts_with('2') {
        Ok(())
    } else {
        Err(ReportError::Status {
            url: url.into(),
            status,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert!(check_url("unix:///var/run/nexus-reports/signals.sock").is_ok());
        assert!(check_url("unix:/var/run/nexus-reports/signals.sock").is_ok());
        // Never over the network, never a relative path.
        assert!(check_url("http://127.0.0.1:15090/v1/signals").is_err());
        assert!(check_url("https://127.0.0.1/v1/signals").is_err());
        assert!(check_url("unix://relative.sock").is_err());
    }

    #[test]
    fn json_shape() {
        let v = Violation::now("ptrace", "kill", 42, Some(9), "default");
        let json = serde_json::to_value(&v).expect("json");
        assert_eq!(json["kind"], "sandbox_violation");
        assert_eq!(json["syscall"], "ptrace");
        assert_eq!(json["exit_signal"], 9);
        assert!(json["time"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
