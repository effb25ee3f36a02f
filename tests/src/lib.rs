//! Helpers shared by the end-to-end tests: locate and start the real binaries, wait for
//! them with bounded polling (never a bare sleep), and clean up processes on drop.
//!
//! The binaries must be built first (`cargo build --workspace --bins`, which
//! `scripts/test.sh` does).

pub mod stack;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// Path of a workspace binary in the debug target folder. Panics if it is missing or
/// older than one of its sources ([`stale_source`]), so a test never runs a stale build.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build --workspace --bins` before the tests",
        path.display()
    );
    static CHECKED: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());
    let mut checked = CHECKED.lock().unwrap_or_else(|p| p.into_inner());
    if !checked.iter().any(|c| c == name) {
        if let Err(why) = stale_source(&path) {
            panic!("{why}: run `cargo build --workspace --bins` before the tests");
        }
        checked.push(name.to_string());
    }
    path
}

/// Checks that `binary` is newer than every source file it was built from, as cargo
/// lists them in the dep-info file it writes beside the binary (`BINARY.d`, a Makefile
/// rule `BINARY: SOURCE...` with spaces escaped as `\ `). Cargo rebuilds a binary when
/// one of those files is newer than its last build, so a newer file means the binary
/// is stale.
pub fn stale_source(binary: &Path) -> Result<(), String> {
    let modified = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified());
    let built = modified(binary).map_err(|e| format!("{}: {e}", binary.display()))?;
    let mut dep_info = binary.as_os_str().to_owned();
    dep_info.push(".d");
    let dep_info = PathBuf::from(dep_info);
    let text = std::fs::read_to_string(&dep_info).map_err(|e| {
        format!(
            "cannot tell whether {} is up to date: {}: {e}",
            binary.display(),
            dep_info.display()
        )
    })?;
    for source in dep_info_sources(&text, binary) {
        match modified(&source) {
            Ok(changed) if changed > built => {
                return Err(format!(
                    "{} is older than its source {}",
                    binary.display(),
                    source.display()
                ));
            }
            Ok(_) => {}
            // A source deleted since the build also makes it stale.
            Err(e) => {
                return Err(format!(
                    "{} was built from {}, which is gone ({e})",
                    binary.display(),
                    source.display()
                ));
            }
        }
    }
    Ok(())
}

/// The prerequisites of `target`'s rule (by file name: the dep-info path may be spelled
/// differently from ours) in a Makefile-style dep-info text.
fn dep_info_sources(text: &str, target: &Path) -> Vec<PathBuf> {
    let mut sources = Vec::new();
    for line in text.lines() {
        let mut words = Vec::new();
        let mut word = String::new();
        let mut chars = line.chars();
        while let Some(c) = chars.next() {
            match c {
                '\\' => word.extend(chars.next()),
                ' ' => words.push(std::mem::take(&mut word)),
                _ => word.push(c),
            }
        }
        words.push(word);
        words.retain(|w| !w.is_empty());
        let Some(head) = words.first().and_then(|w| w.strip_suffix(':')) else {
            continue;
        };
        if Path::new(head).file_name() == target.file_name() {
            sources.extend(words[1..].iter().map(PathBuf::from));
        }
    }
    sources
}

/// `t` as Nexus writes and prints times (RFC 3339, UTC, milliseconds), so the two compare
/// as strings.
pub fn rfc3339(t: std::time::SystemTime) -> String {
    nexus_audit::rfc3339_ms(time::OffsetDateTime::from(t))
}

/// Copies the folder `from` to `to`, recursively (a test's own copy of `policies/`).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create dir");
    for entry in std::fs::read_dir(from).expect("read dir").flatten() {
        let target = to.join(entry.file_name());
        if entry.path().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy");
        }
    }
}

/// A file under certs-dev/.
pub fn cert(rel: &str) -> PathBuf {
    repo_root().join("certs-dev").join(rel)
}

/// Polls `f` every 50 ms until it yields a value or `timeout` passes (then panics
/// naming `what`).
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed (SIGKILL) and reaped on drop; its output goes to a log file.
pub struct Proc {
    /// The process.
    pub child: Child,
    /// Its log file.
    pub log: PathBuf,
    name: String,
}

impl Proc {
    /// Starts `program` with `args`, logging to `dir/name.log`.
    pub fn spawn(
        name: &str,
        dir: &Path,
        program: &Path,
        args: &[&str],
        envs: &[(&str, &str)],
    ) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::File::create(&log).expect("create log");
        let mut command = Command::new(program);
        command
            .args(args)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("log fd"))
            .stderr(file);
        command.env_remove("SPIFFE_ENDPOINT_SOCKET");
        for (k, v) in envs {
            command.env(k, v);
        }
        let child = command
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", program.display()));
        Proc {
            child,
            log,
            name: name.to_string(),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The log so far.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends a signal (e.g. "HUP", "TERM", "KILL") with kill(1).
    pub fn signal(&self, sig: &str) {
        let status = Command::new("kill")
            .args([&format!("-{sig}"), &self.pid().to_string()])
            .status()
            .expect("kill");
        assert!(status.success(), "kill -{sig} {} failed", self.name);
    }

    /// True while the process runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Resident set size in KiB (VmRSS) and its high-water mark (VmHWM).
    pub fn rss_kib(&self) -> (u64, u64) {
        let status =
            std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find(|l| l.starts_with(name))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        (field("VmRSS:"), field("VmHWM:"))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!(
                "---- log of {} ({}) ----\n{}",
                self.name,
                self.log.display(),
                self.log_text()
            );
        }
    }
}

/// Waits for a JSON file written by a started binary (`address_file`).
pub fn read_json(path: &Path, timeout: Duration) -> serde_json::Value {
    eventually(timeout, &format!("{}", path.display()), || {
        std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok())
    })
}

/// Runs curl with `-sS --max-time 30` and the given arguments.
pub fn curl(args: &[&str]) -> Output {
    Command::new("curl")
        .args(["-sS", "--max-time", "30"])
        .args(args)
        .output()
        .expect("curl is installed")
}

/// The HTTP status curl saw (`-w %{http_code}`), with the body discarded; 0 if the
/// connection failed.
pub fn curl_status(args: &[&str]) -> u16 {
    let mut all = vec!["-o", "/dev/null", "-w", "%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(&all);
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// A temporary folder for one test, kept (and printed) if the test fails.
pub fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("nexus-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// Runs `command` to completion and returns its stdout (trimmed); panics with `what` and
/// its stderr if it fails.
pub fn stdout_of(command: &mut Command, what: &str) -> String {
    let out = command
        .output()
        .unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Runs `program` with `args`, killed after `secs` seconds (coreutils `timeout`), and
/// returns its output.
pub fn run_bounded(secs: u32, program: &str, args: &[&str]) -> Output {
    Command::new("timeout")
        .args(["--kill-after=5", &secs.to_string(), program])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"))
}

/// Runs `openssl x509 ARGS` on PEM text; its stdout if it succeeded.
fn openssl_x509(pem: &str, args: &[&str]) -> Option<String> {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .arg("x509")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl is installed");
    // Dropping stdin after the write closes it, so openssl sees the end of its input.
    let written = child
        .stdin
        .take()
        .is_some_and(|mut stdin| stdin.write_all(pem.as_bytes()).is_ok());
    let out = child.wait_with_output().ok()?;
    (written && out.status.success()).then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Lower-case hex SHA-256 of a certificate's DER (what `openssl x509 -fingerprint -sha256`
/// prints, without the colons), from PEM text.
pub fn cert_fingerprint_pem(pem: &str) -> Option<String> {
    let text = openssl_x509(pem, &["-noout", "-fingerprint", "-sha256"])?;
    let hex = text
        .trim()
        .rsplit('=')
        .next()?
        .replace(':', "")
        .to_lowercase();
    (hex.len() == 64).then_some(hex)
}

/// [`cert_fingerprint_pem`] of a PEM file.
pub fn cert_fingerprint(path: &Path) -> Option<String> {
    cert_fingerprint_pem(&std::fs::read_to_string(path).ok()?)
}

/// The SPIFFE ID (URI SAN) of a PEM certificate.
pub fn cert_uri_san(pem: &str) -> Option<String> {
    openssl_x509(pem, &["-noout", "-ext", "subjectAltName"])?
        .split([',', '\n'])
        .find_map(|s| s.trim().strip_prefix("URI:").map(String::from))
}

/// The leaf certificate (PEM) a TLS server on `127.0.0.1:port` presents to
/// `openssl s_client` authenticating with `cert`/`key` (SNI `localhost`); `None` if the
/// handshake gave no certificate.
pub fn presented_leaf(port: u16, cert: &Path, key: &Path) -> Option<String> {
    let addr = format!("127.0.0.1:{port}");
    let cert = cert.to_string_lossy();
    let key = key.to_string_lossy();
    let out = run_bounded(
        15,
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-servername",
            "localhost",
            "-cert",
            &cert,
            "-key",
            &key,
        ],
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = text.find("-----BEGIN CERTIFICATE-----")?;
    let end_marker = "-----END CERTIFICATE-----";
    let end = begin + text[begin..].find(end_marker)? + end_marker.len();
    Some(format!("{}\n", &text[begin..end]))
}

/// What [`raw_tcp`] saw.
#[derive(Debug, Clone)]
pub struct RawExchange {
    /// Everything the server sent, decoded as latin-1.
    pub received: String,
    /// How the exchange ended: `eof`, `reset` or `timeout` (the server kept it open).
    pub end: String,
    /// Seconds from the end of sending to that end.
    pub elapsed: f64,
}

const RAW_TCP_PY: &str = r#"
import json, socket, sys, time
host, port, payload, wait = sys.argv[1], int(sys.argv[2]), bytes.fromhex(sys.argv[3]), float(sys.argv[4])
s = socket.create_connection((host, port), timeout=wait)
s.sendall(payload)
start = time.monotonic()
deadline = start + wait
data, end = b"", "timeout"
try:
    while time.monotonic() < deadline:
        s.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = s.recv(65536)
        if not chunk:
            end = "eof"
            break
        data += chunk
except socket.timeout:
    end = "timeout"
except (ConnectionResetError, BrokenPipeError):
    end = "reset"
print(json.dumps({"received": data.decode("latin-1"), "end": end, "elapsed": time.monotonic() - start}))
"#;

/// Opens a TCP connection to `127.0.0.1:port` with python3, sends `payload`, and reads
/// until the server closes or `wait` passes.
pub fn raw_tcp(port: u16, payload: &[u8], wait: Duration) -> RawExchange {
    let hex = data_encoding::HEXLOWER.encode(payload);
    let secs = wait.as_secs_f64().to_string();
    let port = port.to_string();
    let limit = u32::try_from(wait.as_secs()).unwrap_or(60) + 10;
    let out = run_bounded(
        limit,
        "python3",
        &["-c", RAW_TCP_PY, "127.0.0.1", &port, &hex, &secs],
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "raw_tcp: no JSON from python3 ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    RawExchange {
        received: json["received"].as_str().unwrap_or_default().to_string(),
        end: json["end"].as_str().unwrap_or_default().to_string(),
        elapsed: json["elapsed"].as_f64().unwrap_or(f64::NAN),
    }
}

/// The uid this test runs as (for `[reports] peer_uids`), from `id -u`.
pub fn current_uid() -> u32 {
    let out = Command::new("id").arg("-u").output().expect("id -u");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .expect("a numeric uid")
}

/// A TCP port on 127.0.0.1 that was free a moment ago (for a process that must keep
/// its port across a restart, or a port written into a config before its process
/// starts).
///
/// Taken from just below the kernel's ephemeral range (`ip_local_port_range`), not
/// from `bind(0)`: a port from the ephemeral range, once released, can be taken by any
/// outgoing connection of the tests running alongside before its process binds it
/// ("Address already in use"). Below the range only explicit binds compete; each port
/// is handed out once per test process, from a start that differs between processes.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const SPAN: u32 = 10_000;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32_768);
    if low > SPAN + 1024 {
        let base = low - SPAN;
        let start = (std::process::id() * 97) % SPAN;
        for _ in 0..SPAN {
            let n = NEXT.fetch_add(1, Ordering::Relaxed);
            let Ok(port) = u16::try_from(base + (start + n) % SPAN) else {
                break;
            };
            if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
                return port;
            }
        }
    }
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn touch(path: &Path, at: SystemTime) {
        std::fs::write(path, b"x").expect("write");
        std::fs::File::options()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(at))
            .expect("set mtime");
    }

    /// A binary built after its sources passes; one older than a source, or built from
    /// a source that is gone, is reported with that source's name.
    #[test]
    fn a_binary_older_than_a_source_is_stale() {
        let dir = tempfile::tempdir().expect("temp dir");
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        let (main, lib) = (dir.path().join("main.rs"), dir.path().join("with space.rs"));
        let binary = dir.path().join("nexus-x");
        touch(&main, now - 2 * hour);
        touch(&lib, now - 2 * hour);
        touch(&binary, now - hour);
        std::fs::write(
            dir.path().join("nexus-x.d"),
            format!(
                "/elsewhere/target/debug/nexus-x: {} {}\n",
                main.display(),
                lib.display().to_string().replace(' ', "\\ ")
            ),
        )
        .expect("write dep-info");
        assert_eq!(stale_source(&binary), Ok(()));

        touch(&lib, now);
        let why = stale_source(&binary).expect_err("stale");
        assert!(
            why.contains("older than its source") && why.contains("with space.rs"),
            "{why}"
        );

        touch(&lib, now - 2 * hour);
        std::fs::remove_file(&main).expect("remove");
        let why = stale_source(&binary).expect_err("stale");
        assert!(
            why.contains("which is gone") && why.contains("main.rs"),
            "{why}"
        );

        std::fs::remove_file(dir.path().join("nexus-x.d")).expect("remove");
        let why = stale_source(&binary).expect_err("no dep-info");
        assert!(why.contains("cannot tell whether"), "{why}");
    }
}
