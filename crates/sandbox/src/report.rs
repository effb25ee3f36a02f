//! Violation reports: the JSON the launcher POSTs to the sidecar's admin listener
//! (`POST /v1/signals`), over a plain HTTP/1.1 client small enough for plugin images.
//!
//! The sidecar is on loopback and the report is best effort: one attempt with short
//! timeouts, failures logged to stderr, never blocking the plugin for long.

use std::io::{Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
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
    /// Only `http://host:port/path` is understood (the sidecar is on loopback).
    #[error("report URL {0:?} is not http://host:port/path")]
    Url(String),
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
    split(url).map(|_| ())
}

fn split(url: &str) -> Result<(&str, &str), ReportError> {
    let rest = url
        .strip_prefix("http://")
        .ok_or_else(|| ReportError::Url(url.into()))?;
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    if authority.is_empty() || authority.contains('@') {
        return Err(ReportError::Url(url.into()));
    }
    Ok((authority, path))
}

/// POSTs one violation; returns once the sidecar answered 2xx.
pub fn send(url: &str, violation: &Violation) -> Result<(), ReportError> {
    let (authority, path) = split(url)?;
    let io = |source| ReportError::Io {
        url: url.into(),
        source,
    };
    let body = serde_json::to_vec(violation).map_err(|e| io(std::io::Error::other(e)))?;
    let addr = authority
        .to_socket_addrs()
        .map_err(io)?
        .next()
        .ok_or_else(|| io(std::io::Error::other("no address")))?;
    let timeout = Duration::from_secs(2);
    let mut stream = TcpStream::connect_timeout(&addr, timeout).map_err(io)?;
    stream.set_read_timeout(Some(timeout)).map_err(io)?;
    stream.set_write_timeout(Some(timeout)).map_err(io)?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: {authority}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
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
        assert!(check_url("http://127.0.0.1:15090/v1/signals").is_ok());
        assert!(check_url("https://127.0.0.1/v1/signals").is_err());
        assert!(check_url("http:///x").is_err());
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
