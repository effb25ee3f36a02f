//! The sandbox escape suite: the escape probe (tests/escape) tries each escape under
//! `nexus-launch` and *both* shipped profiles (`profiles/default.toml`,
//! `profiles/example-python-model.toml`); every one must be blocked (the errno the rule
//! gives back to the probe, or the probe killed), and every kill must reach the real
//! sidecar's `POST /v1/signals` with the syscall's name. A well-behaved run (the probe,
//! and a real Python model) must be unharmed and its exit code must come back; signals
//! must be forwarded.
//!
//! These run as root here: the sandbox must hold for root too (no_new_privs, seccomp and
//! Landlock all apply to uid 0). Controls run the same probe without the launcher to show
//! each escape is real; each escape added for issue 21 (MPTCP, netlink/vsock/UNIX
//! sockets, listen without bind, TIOCSTI, inherited descriptors, SysV IPC, a filter of
//! the plugin's own masking a kill, memfd exec) got through the launcher before it.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_tests::{bin, curl, eventually, repo_root, stack};

const BLOCKED: i32 = 3;
const ESCAPED: i32 = 42;
const WORKLOAD: &str = "spiffe://nexus.local/ns/plugins/sa/escape-probe";

const EPERM: i32 = 1;
const EBADF: i32 = 9;
const EACCES: i32 = 13;
const EINVAL: i32 = 22;

/// A shipped profile and the name it reports under.
#[derive(Clone, Copy, Debug)]
struct Shipped {
    file: &'static str,
    name: &'static str,
}

const DEFAULT: Shipped = Shipped {
    file: "profiles/default.toml",
    name: "default",
};
const PYTHON: Shipped = Shipped {
    file: "profiles/example-python-model.toml",
    name: "python-model",
};
const SHIPPED: [Shipped; 2] = [DEFAULT, PYTHON];

impl Shipped {
    fn path(self) -> PathBuf {
        repo_root().join(self.file)
    }
}

fn default_profile() -> PathBuf {
    DEFAULT.path()
}

/// A plugin's world: a work folder it may write, a data folder it may read, a secret it
/// may not, the sidecar port it may reach and another it may not, and UNIX sockets outside
/// its grants (a stream listener like a container runtime's, a datagram socket, an
/// abstract one).
struct World {
    dir: tempfile::TempDir,
    work: PathBuf,
    data: PathBuf,
    secret: PathBuf,
    allowed_port: u16,
    other_port: u16,
    /// A free port the python profile may bind (`NEXUS_HEALTH_PORT`).
    health_port: u16,
    runtime_socket: PathBuf,
    dgram_socket: PathBuf,
    abstract_name: String,
    _unix: Vec<Box<dyn std::any::Any + Send>>,
}

fn world(name: &str) -> World {
    // The tempdir itself is outside every grant: only work/ and data/ are given.
    let dir = tempfile::Builder::new()
        .prefix(&format!("nexus-sandbox-{name}-"))
        .tempdir()
        .expect("tempdir");
    let work = dir.path().join("work");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&work).expect("work");
    std::fs::create_dir_all(&data).expect("data");
    std::fs::write(data.join("input.csv"), "rainfall,12\n").expect("input");
    let secret = dir.path().join("secret.key");
    std::fs::write(&secret, "-----BEGIN PRIVATE KEY-----\n").expect("secret");
    let runtime_socket = dir.path().join("runtime.sock");
    let dgram_socket = dir.path().join("dgram.sock");
    let abstract_name = format!("nexus-sandbox-test-{}-{name}", std::process::id());
    let unix = vec![
        Box::new(unix_echo(&runtime_socket)) as Box<dyn std::any::Any + Send>,
        Box::new(std::os::unix::net::UnixDatagram::bind(&dgram_socket).expect("dgram")),
        Box::new(abstract_listener(&abstract_name)),
    ];
    World {
        work,
        data,
        secret,
        allowed_port: echo_listener(),
        other_port: echo_listener(),
        health_port: free_port(),
        runtime_socket,
        dgram_socket,
        abstract_name,
        _unix: unix,
        dir,
    }
}

/// A listener on 127.0.0.1:0 answering "ok" to whatever connects; returns its port.
fn echo_listener() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = listener.local_addr().expect("addr").port();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            let mut buf = [0u8; 16];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"ok");
        }
    });
    port
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A UNIX stream listener answering "ok"; counts the connections it accepted.
fn unix_echo(path: &Path) -> std::sync::Arc<std::sync::atomic::AtomicUsize> {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("unix bind");
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let count = accepted.clone();
    std::thread::spawn(move || {
        for mut stream in listener.incoming().flatten() {
            count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let mut buf = [0u8; 16];
            let _ = stream.read(&mut buf);
            let _ = stream.write_all(b"ok");
        }
    });
    accepted
}

fn abstract_listener(name: &str) -> std::os::unix::net::UnixListener {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name).expect("abstract");
    std::os::unix::net::UnixListener::bind_addr(&addr).expect("abstract bind")
}

/// Output of one run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Run {
    // Read both pipes while waiting: a chatty child must never block on a full pipe.
    let drain = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut pipe) = pipe {
                let _ = pipe.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = drain(
        child
            .stdout
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let stderr = drain(
        child
            .stderr
            .take()
            .map(|p| Box::new(p) as Box<dyn Read + Send>),
    );
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            // What every process of the tree was doing, for a hang that does not repeat;
            // then the launcher's children are killed too (they hold the pipes open).
            let pid = child.id().to_string();
            let listing = Command::new("ps")
                .args(["-eo", "pid,ppid,stat,wchan:32,args"])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            let tree: Vec<&str> = listing
                .lines()
                .filter(|l| {
                    let f: Vec<&str> = l.split_whitespace().collect();
                    f.first() == Some(&pid.as_str()) || f.get(1) == Some(&pid.as_str())
                })
                .collect();
            for line in &tree {
                let f: Vec<&str> = line.split_whitespace().collect();
                if f.get(1) == Some(&pid.as_str()) {
                    let _ = Command::new("kill").args(["-KILL", f[0]]).status();
                }
            }
            let _ = child.kill();
            let _ = child.wait();
            let stderr = stderr.join().unwrap_or_default();
            let tree = tree.join("\n");
            panic!("timed out after {timeout:?}; processes:\n{tree}\nstderr:\n{stderr}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Run {
        code,
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    }
}

/// The environment the shipped profiles expand (`${NEXUS_PLUGIN_WORKDIR}`, ...).
fn plugin_env(command: &mut Command, w: &World) {
    command
        .env("NEXUS_PLUGIN_WORKDIR", &w.work)
        .env("NEXUS_PLUGIN_DATA", &w.data)
        .env("NEXUS_SIDECAR_PORT", w.allowed_port.to_string())
        .env("NEXUS_HEALTH_PORT", w.health_port.to_string())
        .env("NEXUS_WORKLOAD_ID", WORKLOAD)
        .env_remove("NEXUS_SIGNAL_URL")
        .env_remove("NEXUS_PLUGIN_BIN");
}

fn launcher(world: &World, profile: &Path, report: Option<&str>, probe: &[&str]) -> Command {
    let mut command = Command::new(bin("nexus-launch"));
    command.arg("--profile").arg(profile);
    if let Some(url) = report {
        command.args(["--report", url]);
    }
    command
        .arg("--")
        .arg(bin("nexus-escape-probe"))
        .args(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    plugin_env(&mut command, world);
    command
}

fn launch_with(w: &World, profile: &Path, report: Option<&str>, probe: &[&str]) -> Run {
    let child = launcher(w, profile, report, probe)
        .spawn()
        .expect("start nexus-launch");
    wait_with_timeout(child, Duration::from_secs(30))
}

fn unsandboxed(probe: &[&str]) -> Run {
    let child = Command::new(bin("nexus-escape-probe"))
        .args(probe)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start probe");
    wait_with_timeout(child, Duration::from_secs(30))
}

/// Runs a harness helper of the probe (outside the sandbox) that must succeed.
fn harness(args: &[&str]) -> String {
    nexus_tests::stdout_of(
        Command::new(bin("nexus-escape-probe")).args(args),
        &format!("nexus-escape-probe {}", args.join(" ")),
    )
    .lines()
    .last()
    .unwrap_or_default()
    .to_string()
}

/// IPC objects another process in the pod made: a SysV shared memory segment holding a
/// secret and a POSIX message queue. Removed on drop.
struct Ipc {
    shm: String,
    queue: String,
}

impl Ipc {
    fn create(tag: &str) -> Ipc {
        let queue = format!("nexus-sandbox-{}-{tag}", std::process::id());
        harness(&["mq-create", &queue]);
        Ipc {
            shm: harness(&["shm-create"]),
            queue,
        }
    }
}

impl Drop for Ipc {
    fn drop(&mut self) {
        let _ = unsandboxed(&["shm-remove", &self.shm]);
        let _ = unsandboxed(&["mq-remove", &self.queue]);
    }
}

/// A real sidecar with no SVID (its listeners serve regardless): the receiver of
/// violation signals, on its in-pod report socket (callers of this test's uid).
fn signal_sidecar(dir: &Path) -> stack::Sidecar {
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[reports]\nsocket = {:?}\npeer_uids = [{}]\n",
        format!("unix://{}", dir.join("no-workload-api.sock").display()),
        dir.join("reports.sock").to_string_lossy(),
        nexus_tests::current_uid(),
    );
    stack::sidecar(dir, "signals-sidecar", &toml, false)
}

/// The report URL of [`signal_sidecar`].
fn report_url(dir: &Path) -> String {
    let socket = dir.join("reports.sock");
    eventually(Duration::from_secs(10), "the report socket", || {
        socket.exists().then_some(())
    });
    format!("unix://{}", socket.display())
}

fn signals(sidecar: &stack::Sidecar) -> Vec<serde_json::Value> {
    let out = curl(&[&format!("{}/v1/signals", sidecar.admin())]);
    let body: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    body["signals"].as_array().cloned().unwrap_or_default()
}

enum Expect {
    /// The call failed with one of these errnos and the probe said so.
    Blocked(&'static [i32]),
    /// The probe was killed (exit code) and a violation naming the syscall was reported.
    Killed(i32, &'static str),
}

/// Asserts a run ended as `expect` says; returns the kill to find at the sidecar.
fn assert_outcome(what: &str, run: &Run, expect: &Expect) -> Option<(String, &'static str, i32)> {
    assert!(
        !run.stdout.contains("ESCAPED"),
        "ESCAPE under the sandbox: {what}\n{}\n{}",
        run.stdout,
        run.stderr
    );
    match expect {
        Expect::Blocked(errnos) => {
            assert_eq!(run.code, BLOCKED, "{what}: {}\n{}", run.stdout, run.stderr);
            assert!(
                errnos
                    .iter()
                    .any(|e| run.stdout.contains(&format!("(os error {e})"))),
                "{what} must fail with errno {errnos:?}: {}",
                run.stdout
            );
            None
        }
        Expect::Killed(code, syscall) => {
            assert_eq!(run.code, *code, "{what}: {}\n{}", run.stdout, run.stderr);
            assert!(
                run.stderr.contains(&format!("\"syscall\":\"{syscall}\"")),
                "{what}: the launcher logs the violation: {}",
                run.stderr
            );
            Some((what.to_string(), *syscall, *code - 128))
        }
    }
}

/// Every escape of the suite, as (probe arguments, expected outcome), for `w`.
fn escapes(w: &World, ipc: &Ipc) -> Vec<(Vec<String>, Expect)> {
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let secret = s(&w.secret);
    let outside = s(&w.dir.path().join("pwned"));
    let other = w.other_port.to_string();
    let allowed = w.allowed_port.to_string();
    let work = s(&w.work);
    let runtime = s(&w.runtime_socket);
    let dgram = s(&w.dgram_socket);
    let denied: &'static [i32] = &[EPERM, EACCES];
    let mut cases: Vec<(Vec<&str>, Expect)> = vec![
        // Files, exec, TCP, namespaces and the rest that held before issue 21.
        (vec!["read", &secret], Expect::Blocked(denied)),
        (vec!["read", "/etc/shadow"], Expect::Blocked(denied)),
        (vec!["write", &outside], Expect::Blocked(denied)),
        (vec!["write", "/etc/nexus-pwned"], Expect::Blocked(denied)),
        (vec!["exec", "/bin/sh"], Expect::Blocked(denied)),
        (
            vec!["read", "/proc/self/root/etc/shadow"],
            Expect::Blocked(denied),
        ),
        (vec!["read", "/proc/1/environ"], Expect::Blocked(denied)),
        (vec!["connect", &other], Expect::Blocked(denied)),
        (vec!["bind"], Expect::Blocked(denied)),
        (vec!["udp-socket"], Expect::Blocked(&[EPERM])),
        (vec!["mount"], Expect::Blocked(&[EPERM])),
        (vec!["unshare-user"], Expect::Blocked(&[EPERM])),
        (vec!["unshare-net"], Expect::Blocked(&[EPERM])),
        (vec!["io-uring"], Expect::Blocked(&[EPERM])),
        (vec!["kill-parent"], Expect::Blocked(denied)),
        (vec!["caps"], Expect::Blocked(&[EPERM])),
        (vec!["ptrace"], Expect::Killed(137, "ptrace")),
        (vec!["bpf"], Expect::Killed(137, "bpf")),
        (vec!["raw-socket"], Expect::Killed(137, "socket")),
        (vec!["packet-socket"], Expect::Killed(137, "socket")),
        // 1. Sockets: MPTCP (plain TCP on the wire, not IPPROTO_TCP to Landlock), with
        // and without flags in the type, over IPv6; every family but TCP's.
        (vec!["mptcp", &other], Expect::Blocked(&[EPERM])),
        (vec!["mptcp6", &other], Expect::Blocked(&[EPERM])),
        (vec!["mptcp-flags", &other], Expect::Blocked(&[EPERM])),
        (vec!["mptcp-listen"], Expect::Blocked(&[EPERM])),
        (vec!["socket", "16", "3", "0"], Expect::Blocked(&[EPERM])), // netlink route
        (vec!["socket", "16", "3", "9"], Expect::Blocked(&[EPERM])), // netlink audit
        (vec!["socket", "16", "2", "15"], Expect::Blocked(&[EPERM])), // uevent
        (vec!["socket", "40", "1", "0"], Expect::Blocked(&[EPERM])), // vsock
        (vec!["socket", "38", "5", "0"], Expect::Blocked(&[EPERM])), // AF_ALG
        (vec!["socket", "2", "2", "1"], Expect::Blocked(&[EPERM])),  // ICMP ping
        (vec!["socket", "2", "1", "256"], Expect::Blocked(&[EPERM])), // IPPROTO_SMC
        (vec!["socket", "2", "1", "132"], Expect::Blocked(&[EPERM])), // SCTP
        (vec!["socket", "1", "1", "0"], Expect::Blocked(&[EPERM])),  // AF_UNIX
        (
            vec!["socket", "1", "0x80802", "0"],
            Expect::Blocked(&[EPERM]),
        ),
        (vec!["socketpair", "1", "2"], Expect::Blocked(&[EPERM])),
        (vec!["socketpair", "16", "3"], Expect::Blocked(&[EPERM])),
        // UNIX sockets outside the grants: by path, datagram, a datagram pair, abstract.
        (vec!["unix-connect", &runtime], Expect::Blocked(&[EPERM])),
        (vec!["unix-dgram", &dgram], Expect::Blocked(&[EPERM])),
        (
            vec!["socketpair-dgram-sendto", &dgram],
            Expect::Blocked(&[EPERM]),
        ),
        (
            vec!["abstract-connect", &w.abstract_name],
            Expect::Blocked(&[EPERM]),
        ),
        // listen() without a bind: the kernel would bind an ephemeral port on 0.0.0.0.
        (vec!["listen-unbound"], Expect::Blocked(denied)),
        (
            vec!["listen-after-disconnect", &allowed],
            Expect::Blocked(&[EPERM, EACCES, EINVAL]),
        ),
        // TCP Fast Open connects in sendto: Landlock checks it on this kernel.
        (vec!["tcp-fastopen", &other], Expect::Blocked(&[EACCES])),
        // 2. The terminal (stdin is /dev/null here; see the pty test for the real thing).
        (vec!["tiocsti", "echo pwned"], Expect::Blocked(&[EPERM])),
        (
            vec!["tiocsti-high-bits", "echo pwned"],
            Expect::Blocked(&[EPERM]),
        ),
        (vec!["tioclinux"], Expect::Blocked(&[EPERM])),
        (vec!["tiocsctty"], Expect::Blocked(&[EPERM])),
        // 3. SysV IPC and POSIX queues made outside; own seccomp filters masking a kill;
        // programs that are not files Landlock can see.
        (vec!["shm-read", &ipc.shm], Expect::Blocked(&[EPERM])),
        (vec!["msgget"], Expect::Blocked(&[EPERM])),
        (vec!["semget"], Expect::Blocked(&[EPERM])),
        (vec!["mq-open", &ipc.queue], Expect::Blocked(&[EPERM])),
        (vec!["mask-kill"], Expect::Killed(137, "ptrace")),
        (vec!["mask-kill-errno"], Expect::Killed(137, "ptrace")),
        (vec!["mask-kill-prctl"], Expect::Killed(137, "ptrace")),
        (vec!["memfd-exec"], Expect::Blocked(&[EPERM])),
        (vec!["memfd-proc-exec"], Expect::Blocked(&[EPERM])),
        (vec!["memfd-noexec-exec"], Expect::Blocked(denied)),
        // A sealed memfd is allowed, but has no execute bit, ever.
        (vec!["memfd-noexec-proc-exec"], Expect::Blocked(&[EACCES])),
        // The launcher's descriptors (its seccomp listener among them).
        (vec!["steal-fds"], Expect::Blocked(denied)),
        (vec!["tmpfile-exec", &work], Expect::Blocked(denied)),
        (vec!["file-exec", &work], Expect::Blocked(&[EACCES])),
    ];
    if cfg!(target_arch = "x86_64") {
        // The loader may be executed; it must not be able to map a shell it cannot read.
        cases.push((
            vec![
                "exec",
                "/lib64/ld-linux-x86-64.so.2",
                "/bin/sh",
                "-c",
                "true",
            ],
            Expect::Blocked(denied),
        ));
        // The x32 ABI's ptrace, and the i386 ABI's socketcall (int 0x80): killed by the
        // kernel (SIGSYS), so the name is unknown.
        cases.push((vec!["x32-ptrace"], Expect::Killed(159, "unknown")));
        cases.push((vec!["socketcall-i386"], Expect::Killed(159, "unknown")));
    }
    cases
        .into_iter()
        .map(|(args, e)| (args.into_iter().map(String::from).collect(), e))
        .collect()
}

fn every_escape_is_blocked_and_every_kill_is_reported(profile: Shipped) {
    let w = world(profile.name);
    let ipc = Ipc::create(profile.name);
    let sidecar = signal_sidecar(w.dir.path());
    let report = report_url(w.dir.path());
    let mut kills = Vec::new();
    for (probe, expect) in escapes(&w, &ipc) {
        let args: Vec<&str> = probe.iter().map(String::as_str).collect();
        let run = launch_with(&w, &profile.path(), Some(&report), &args);
        let what = format!("{}: {}", profile.name, probe.join(" "));
        kills.extend(assert_outcome(&what, &run, &expect));
    }
    assert!(
        !w.dir.path().join("pwned").exists(),
        "nothing written outside"
    );
    assert!(
        !Path::new("/etc/nexus-pwned").exists(),
        "nothing written in /etc"
    );
    // Eperm and log signals may come too (the python profile logs chmod and memfd_create,
    // and the launcher reports the listen it refused); every kill must be there, in order.
    let received: Vec<serde_json::Value> = signals(&sidecar)
        .into_iter()
        .filter(|s| s["action"] == "kill")
        .collect();
    assert_eq!(
        received.len(),
        kills.len(),
        "one signal per kill: {received:#?}"
    );
    for ((what, syscall, signal), got) in kills.iter().zip(&received) {
        assert_eq!(got["kind"], "sandbox_violation", "{what}");
        assert_eq!(got["syscall"], *syscall, "{what}: {got}");
        assert_eq!(got["exit_signal"], *signal, "{what}");
        assert_eq!(got["workload"], WORKLOAD, "{what}");
        assert_eq!(got["profile"], profile.name, "{what}");
        assert!(got["pid"].as_u64().unwrap_or(0) > 0, "{what}");
    }
    let counted = sidecar.metric_sum("nexus_sandbox_violations_total{action=\"kill\"}");
    assert_eq!(counted, kills.len() as f64);
}

#[test]
fn every_escape_is_blocked_under_the_default_profile() {
    every_escape_is_blocked_and_every_kill_is_reported(DEFAULT);
}

#[test]
fn every_escape_is_blocked_under_the_python_profile() {
    every_escape_is_blocked_and_every_kill_is_reported(PYTHON);
}

#[test]
fn the_escapes_are_real_without_the_sandbox() {
    let w = world("controls");
    let ipc = Ipc::create("controls");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let secret = s(&w.secret);
    let outside = s(&w.dir.path().join("written"));
    let other = w.other_port.to_string();
    let runtime = s(&w.runtime_socket);
    let dgram = s(&w.dgram_socket);
    for probe in [
        vec!["read", secret.as_str()],
        vec!["write", outside.as_str()],
        vec!["connect", other.as_str()],
        vec!["exec", "/bin/sh"],
        vec![
            "exec",
            "/lib64/ld-linux-x86-64.so.2",
            "/bin/sh",
            "-c",
            "true",
        ],
        vec!["read", "/proc/self/root/etc/shadow"],
        vec!["ptrace"],
        vec!["unshare-user"],
        vec!["caps"],
        vec!["mptcp", other.as_str()],
        vec!["mptcp6", other.as_str()],
        vec!["mptcp-flags", other.as_str()],
        vec!["mptcp-listen"],
        vec!["socket", "16", "3", "0"],
        vec!["socket", "16", "2", "15"],
        vec!["socket", "40", "1", "0"],
        vec!["socket", "1", "1", "0"],
        vec!["socketpair", "1", "2"],
        vec!["unix-connect", runtime.as_str()],
        vec!["unix-dgram", dgram.as_str()],
        vec!["socketpair-dgram-sendto", dgram.as_str()],
        vec!["abstract-connect", w.abstract_name.as_str()],
        vec!["listen-unbound"],
        vec!["shm-read", ipc.shm.as_str()],
        vec!["msgget"],
        vec!["semget"],
        vec!["mq-open", ipc.queue.as_str()],
        vec!["mask-kill"],
        vec!["mask-kill-errno"],
        vec!["mask-kill-prctl"],
        vec!["memfd-exec"],
        vec!["memfd-proc-exec"],
        vec!["steal-fds"],
    ] {
        let run = unsandboxed(&probe);
        assert_eq!(
            run.code, ESCAPED,
            "control {:?} should succeed unsandboxed: {}\n{}",
            probe, run.stdout, run.stderr
        );
    }
}

#[test]
fn a_well_behaved_plugin_runs_unharmed_and_its_exit_code_comes_back() {
    let w = world("behave");
    let input = w.data.join("input.csv").to_string_lossy().into_owned();
    let work = w.work.to_string_lossy().into_owned();
    let port = w.allowed_port.to_string();
    for profile in SHIPPED {
        let run = launch_with(
            &w,
            &profile.path(),
            None,
            &["behave", &input, &work, &port, "7"],
        );
        assert_eq!(run.code, 7, "{profile:?}: {}\n{}", run.stdout, run.stderr);
        for step in [
            "ok read",
            "ok write",
            "ok connect",
            "ok thread",
            "ok self-pipe",
        ] {
            assert!(
                run.stdout.contains(step),
                "{profile:?} {step}: {}",
                run.stdout
            );
        }
        assert_eq!(
            std::fs::read_to_string(w.work.join("out.txt")).expect("written"),
            "result"
        );
        assert!(!run.stderr.contains("violation"), "{}", run.stderr);
        // A memfd that can never be executed is still fine (shared memory, libffi).
        let run = launch_with(&w, &profile.path(), None, &["--allowed", "memfd-noexec"]);
        assert_eq!(run.code, 0, "{profile:?}: {}\n{}", run.stdout, run.stderr);
    }
    // The python profile's health port: bound, then listened on (the launcher performs
    // the listen after checking the socket is bound).
    let health = w.health_port.to_string();
    let run = launch_with(&w, &PYTHON.path(), None, &["--allowed", "serve", &health]);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
}

/// The reference demo plugin is a Python model: the distribution's interpreter (its
/// standard library under /usr/lib, which both profiles grant) running asyncio (a
/// socketpair self-pipe and a TCP connection to the sidecar port), hashlib, uuid and a
/// ctypes callback (libffi closures).
#[test]
fn a_python_model_runs_under_both_shipped_profiles() {
    let python = Path::new("/usr/bin/python3");
    assert!(
        python.exists(),
        "/usr/bin/python3 is missing: run scripts/install-test-deps.sh"
    );
    let w = world("python");
    let model = w.data.join("model.py");
    std::fs::write(
        &model,
        r#"import asyncio, ctypes, hashlib, json, sys, uuid
async def main():
    r, w = await asyncio.open_connection("127.0.0.1", int(sys.argv[1]))
    w.write(b"hello")
    await w.drain()
    data = await r.read(2)
    w.close()
    return data
assert asyncio.run(main()) == b"ok"
assert ctypes.CFUNCTYPE(ctypes.c_int)(lambda: 7)() == 7
print("model ok", hashlib.sha256(json.dumps({"c": "c-flood-17"}).encode()).hexdigest()[:8], uuid.uuid4().version)
"#,
    )
    .expect("model");
    for profile in SHIPPED {
        let mut command = Command::new(bin("nexus-launch"));
        command
            .arg("--profile")
            .arg(profile.path())
            .arg("--")
            .arg(python)
            .arg(&model)
            .arg(w.allowed_port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        plugin_env(&mut command, &w);
        let run = wait_with_timeout(command.spawn().expect("start"), Duration::from_secs(60));
        assert_eq!(run.code, 0, "{profile:?}: {}\n{}", run.stdout, run.stderr);
        assert!(run.stdout.contains("model ok"), "{}", run.stdout);
    }
}

/// Also with the launcher started with the signals ignored (as under `nohup`, or by a
/// supervisor that ignores them): the ignored disposition would pass on to the plugin
/// through exec, and the plugin would sleep through every forwarded signal.
#[test]
fn signals_are_forwarded_and_the_launcher_exits_like_the_child() {
    let w = world("signals");
    let cases = [
        (libc_sig::TERM, "TERM", 143),
        (libc_sig::HUP, "HUP", 129),
        (libc_sig::USR1, "USR1", 138),
    ];
    for ((signal, name, code), ignored) in cases.iter().flat_map(|c| [(*c, false), (*c, true)]) {
        let plain = launcher(&w, &default_profile(), None, &["wait"]);
        let mut command = if ignored {
            // `trap ''` ignores them; `exec` keeps the pid, so the signal below reaches
            // the launcher itself.
            let mut shell = Command::new("sh");
            shell
                .arg("-c")
                .arg("trap '' HUP TERM USR1; exec \"$@\"")
                .arg("sh")
                .arg(plain.get_program())
                .args(plain.get_args())
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            plugin_env(&mut shell, &w);
            shell
        } else {
            plain
        };
        let mut child = command.spawn().expect("start");
        let mut stdout = child.stdout.take().expect("stdout");
        // Wait for "ready" from the probe (it blocks in sleep after printing it).
        let mut seen = String::new();
        let started = Instant::now();
        while !seen.contains("ready") {
            let mut buf = [0u8; 64];
            let n = stdout.read(&mut buf).expect("read");
            assert!(n > 0, "probe ended early: {seen}");
            seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            assert!(started.elapsed() < Duration::from_secs(20), "no ready");
        }
        let status = Command::new("kill")
            .args([&format!("-{name}"), &child.id().to_string()])
            .status()
            .expect("kill");
        assert!(status.success());
        let run = wait_with_timeout(child, Duration::from_secs(20));
        assert_eq!(
            run.code, code,
            "SIG{name} ({signal}), ignored by the launcher's parent: {ignored}: {}",
            run.stderr
        );
    }
}

/// Signal numbers without a libc dependency in this test crate.
mod libc_sig {
    pub const HUP: i32 = 1;
    pub const USR1: i32 = 10;
    pub const TERM: i32 = 15;
}

/// Item 2 of issue 21: TIOCSTI for real: the launcher runs on a pseudo-terminal that is its controlling
/// terminal (as from a login shell), and the harness prints what waits in the terminal's
/// input queue afterwards: what the shell would read and run.
#[test]
fn the_plugin_cannot_type_into_its_terminal() {
    let w = world("tty");
    let harnessed = |probe: &[&str], sandbox: Option<Shipped>| -> Run {
        let mut command = Command::new(bin("nexus-escape-probe"));
        command.arg("tty-harness");
        if let Some(profile) = sandbox {
            command
                .arg(bin("nexus-launch"))
                .arg("--profile")
                .arg(profile.path())
                .arg("--");
        }
        command
            .arg(bin("nexus-escape-probe"))
            .args(probe)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        plugin_env(&mut command, &w);
        wait_with_timeout(command.spawn().expect("harness"), Duration::from_secs(30))
    };
    let control = harnessed(&["tiocsti", "echo INJECTED"], None);
    assert_eq!(control.code, ESCAPED, "{}", control.stdout);
    assert!(
        control.stdout.contains("tty input: \"echo INJECTED\\n\""),
        "{}",
        control.stdout
    );
    let control = harnessed(&["ctty"], None);
    assert_eq!(control.code, ESCAPED, "{}", control.stdout);
    for profile in SHIPPED {
        for probe in [
            &["tiocsti", "echo INJECTED"][..],
            &["tiocsti-high-bits", "echo INJECTED"],
        ] {
            let run = harnessed(probe, Some(profile));
            assert_eq!(
                run.code, BLOCKED,
                "{profile:?} {probe:?}: {}\n{}",
                run.stdout, run.stderr
            );
            assert!(run.stdout.contains("(os error 1)"), "{}", run.stdout);
            assert!(
                run.stdout.contains("tty input: \"\""),
                "nothing reached the shell: {}",
                run.stdout
            );
        }
        // setsid: the plugin has no controlling terminal at all.
        let run = harnessed(&["ctty"], Some(profile));
        assert_eq!(
            run.code, BLOCKED,
            "{profile:?}: {}\n{}",
            run.stdout, run.stderr
        );
    }
}

/// Item 2 of issue 21: Descriptors: the caller's fd 5 (a secret) is not the plugin's, unless the profile
/// names it in `keep_fds`.
#[test]
fn inherited_descriptors_are_closed_unless_the_profile_keeps_them() {
    let w = world("fds");
    let with_fd5 = |launch: &[&Path], profile: Option<&Path>| -> Run {
        let mut command = Command::new("/bin/sh");
        command
            .arg("-c")
            .arg("exec \"$@\" 5<\"$SECRET\"")
            .arg("sh")
            .env("SECRET", &w.secret);
        for part in launch {
            command.arg(part);
        }
        if let Some(profile) = profile {
            command.arg("--profile").arg(profile).arg("--");
        }
        command
            .arg(bin("nexus-escape-probe"))
            .args(["read-fd", "5"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        plugin_env(&mut command, &w);
        wait_with_timeout(command.spawn().expect("sh"), Duration::from_secs(30))
    };
    let control = with_fd5(&[], None);
    assert_eq!(control.code, ESCAPED, "{}", control.stdout);
    let launcher = bin("nexus-launch");
    for profile in SHIPPED {
        let run = with_fd5(&[&launcher], Some(&profile.path()));
        assert_eq!(
            run.code, BLOCKED,
            "{profile:?}: {}\n{}",
            run.stdout, run.stderr
        );
        assert!(
            run.stdout.contains(&format!("(os error {EBADF})")),
            "{}",
            run.stdout
        );
    }
    let keeping = w.dir.path().join("keep.toml");
    let text = std::fs::read_to_string(default_profile()).expect("default");
    std::fs::write(&keeping, format!("{text}\n[process]\nkeep_fds = [5]\n")).expect("write");
    let run = with_fd5(&[&launcher], Some(&keeping));
    assert_eq!(run.code, ESCAPED, "kept: {}\n{}", run.stdout, run.stderr);
}

/// Item 1 of issue 21: A profile that grants UNIX socket paths: the launcher performs connect and listen
/// for the plugin, so it reaches exactly the listed socket, never another one (not by a
/// symlink swapped in, not by an abstract name, not by racing the check), and TCP still
/// only to `connect_tcp`.
#[test]
fn unix_connect_reaches_only_the_listed_sockets() {
    let w = world("unix");
    let sidecar = signal_sidecar(w.dir.path());
    let report = report_url(w.dir.path());
    let granted_dir = w.work.join("sockets");
    std::fs::create_dir_all(&granted_dir).expect("dir");
    let granted = granted_dir.join("db.sock");
    let granted_count = unix_echo(&granted);
    let runtime_count = unix_echo(&w.dir.path().join("runtime2.sock"));
    let runtime2 = w.dir.path().join("runtime2.sock");
    let profile = w.dir.path().join("unix.toml");
    let text = std::fs::read_to_string(default_profile()).expect("default");
    let text = text.replace(
        "bind_tcp = []",
        &format!(
            "bind_tcp = [{}]\nunix_connect = [{:?}]",
            w.health_port,
            granted.to_string_lossy()
        ),
    );
    std::fs::write(&profile, text).expect("profile");
    let s = |p: &Path| p.to_string_lossy().into_owned();
    let (granted_s, runtime_s) = (s(&granted), s(&runtime2));
    let (allowed, other, health) = (
        w.allowed_port.to_string(),
        w.other_port.to_string(),
        w.health_port.to_string(),
    );
    let ok = |probe: &[&str]| {
        let run = launch_with(&w, &profile, Some(&report), probe);
        assert_eq!(run.code, 0, "{probe:?}: {}\n{}", run.stdout, run.stderr);
    };
    ok(&["--allowed", "unix-connect", &granted_s]);
    ok(&["--allowed", "connect", &allowed]);
    ok(&["--allowed", "serve", &health]);
    ok(&["--allowed", "self-pipe"]);
    assert_eq!(granted_count.load(std::sync::atomic::Ordering::SeqCst), 1);
    let before = signals(&sidecar).len();
    let refused: Vec<(Vec<&str>, &'static [i32])> = vec![
        (vec!["unix-connect", &runtime_s], &[EACCES]),
        (vec!["unix-seqpacket", &runtime_s], &[EACCES]),
        (vec!["abstract-connect", &w.abstract_name], &[EACCES]),
        (vec!["connect", &other], &[EACCES]),
        (vec!["listen-unbound"], &[EACCES]),
        (vec!["unix-dgram", &runtime_s], &[EPERM]),
        (vec!["mptcp", &other], &[EPERM]),
    ];
    for (probe, errnos) in &refused {
        let run = launch_with(&w, &profile, Some(&report), probe);
        assert_outcome(&probe.join(" "), &run, &Expect::Blocked(errnos));
    }
    // The launcher reports what it refused itself (eperm, named by syscall).
    let got: Vec<serde_json::Value> = signals(&sidecar).into_iter().skip(before).collect();
    let named = |syscall: &str| got.iter().filter(|g| g["syscall"] == syscall).count();
    assert_eq!(named("connect"), 4, "{got:#?}");
    assert_eq!(named("listen"), 1, "{got:#?}");
    assert!(got.iter().all(|g| g["action"] == "eperm"), "{got:#?}");
    // The plugin may write the folder of its granted socket: swapping the socket for a
    // symlink to another one does not redirect the launcher.
    let run = launch_with(&w, &profile, None, &["unix-swap", &granted_s, &runtime_s]);
    assert_outcome("unix-swap", &run, &Expect::Blocked(&[EACCES]));
    // Racing the check (swap descriptor and address from another thread) gets nowhere.
    let run = launch_with(&w, &profile, None, &["unix-race", &allowed, &runtime_s]);
    assert_outcome("unix-race", &run, &Expect::Blocked(&[EACCES]));
    assert_eq!(
        runtime_count.load(std::sync::atomic::Ordering::SeqCst),
        0,
        "the other socket never saw a connection"
    );
    // The control: unsandboxed, the race reaches the other socket.
    let control = unsandboxed(&["unix-race", &allowed, &runtime_s]);
    assert_eq!(control.code, ESCAPED, "{}", control.stdout);
}

/// Item 4 of issue 21: A profile with no [filesystem] and no [network] table confines nothing: refused in
/// required mode (before anything runs), warned about and reported in best_effort.
#[test]
fn a_profile_that_confines_nothing_is_refused_or_reported() {
    let w = world("unconfined");
    let sidecar = signal_sidecar(w.dir.path());
    let report = report_url(w.dir.path());
    let profile = w.dir.path().join("nothing.toml");
    let marker = w.dir.path().join("launched");
    let body = "\n[[syscall]]\nnames = [\"ptrace\"]\naction = \"kill\"\n";
    std::fs::write(
        &profile,
        format!("version = 1\nmode = \"required\"\n{body}"),
    )
    .expect("profile");
    let child = Command::new(bin("nexus-launch"))
        .arg("--profile")
        .arg(&profile)
        .args(["--", "/usr/bin/touch"])
        .arg(&marker)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start");
    let run = wait_with_timeout(child, Duration::from_secs(20));
    assert_eq!(run.code, 64, "{}", run.stderr);
    assert!(
        run.stderr
            .contains("nothing.toml:2: this required profile confines nothing"),
        "{}",
        run.stderr
    );
    assert!(!marker.exists(), "nothing was launched");

    std::fs::write(
        &profile,
        format!("version = 1\nname = \"nothing\"\nmode = \"best_effort\"\n{body}"),
    )
    .expect("profile");
    let input = w.data.join("input.csv").to_string_lossy().into_owned();
    let work = w.work.to_string_lossy().into_owned();
    let port = w.allowed_port.to_string();
    let run = launch_with(
        &w,
        &profile,
        Some(&report),
        &["behave", &input, &work, &port, "5"],
    );
    assert_eq!(run.code, 5, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("WARNING: profile nothing") && run.stderr.contains("confines nothing"),
        "{}",
        run.stderr
    );
    let got = eventually(Duration::from_secs(10), "the unconfined report", || {
        signals(&sidecar)
            .into_iter()
            .find(|s| s["syscall"] == "profile_confines_nothing")
    });
    assert_eq!(got["action"], "log");
    assert_eq!(got["profile"], "nothing");
    // --check says so too.
    let out = Command::new(bin("nexus-launch"))
        .arg("--profile")
        .arg(&profile)
        .arg("--check")
        .output()
        .expect("check");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("profile    unconfined   confines nothing"),
        "{text}"
    );
}

#[test]
fn log_rules_let_the_call_run_and_report_it() {
    let w = world("log");
    let sidecar = signal_sidecar(w.dir.path());
    let profile = w.dir.path().join("audit.toml");
    std::fs::write(
        &profile,
        "version = 1\nname = \"audit\"\nmode = \"best_effort\"\n[filesystem]\nread = [\"/usr/lib\"]\nexecute = [{ path = \"/lib64/ld-linux-x86-64.so.2\", optional = true }, { path = \"/lib/ld-linux-aarch64.so.1\", optional = true }]\n\n[[syscall]]\nnames = [\"getcpu\"]\naction = \"log\"\n",
    )
    .expect("profile");
    let report = report_url(w.dir.path());
    let child = launcher(&w, &profile, Some(&report), &["getcpu"])
        .spawn()
        .expect("start");
    let run = wait_with_timeout(child, Duration::from_secs(30));
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stdout.contains("getcpu: Ok"),
        "the call ran: {}",
        run.stdout
    );
    let got = eventually(Duration::from_secs(10), "the log signal", || {
        signals(&sidecar).into_iter().next()
    });
    assert_eq!(got["syscall"], "getcpu");
    assert_eq!(got["action"], "log");
    assert_eq!(got["exit_signal"], serde_json::Value::Null);
    assert_eq!(got["profile"], "audit");
    assert_eq!(
        sidecar.metric_sum("nexus_sandbox_violations_total{action=\"log\"}"),
        1.0
    );
}

#[test]
fn a_bad_profile_is_refused_with_its_line_before_anything_runs() {
    let w = world("bad");
    let marker = w.dir.path().join("launched");
    let cases = [
        (
            "version = 1\nmode = \"required\"\n[network]\n[[syscall]]\nnames = [\"ptrace\", \"mount_everything\"]\naction = \"kill\"\n",
            ":5: unknown syscall \"mount_everything\"",
        ),
        (
            "version = 1\nmode = \"required\"\n[filesystem]\nread = [\n  \"/usr/lib\",\n  \"/no/such/plugin/data\",\n]\n",
            ":6: \"/no/such/plugin/data\" does not exist",
        ),
        (
            "version = 1\nmode = \"required\"\n[network]\n[[syscall]]\nnames = [\"mount\"]\naction = \"kill\"\n\n[[syscall]]\nnames = [\"mount\"]\naction = \"eperm\"\n",
            ":8: \"mount\" is already ruled unconditionally on line 4",
        ),
        (
            "version = 1\nmode = \"required\"\n[network]\nunix_connect = [\"/no/such/folder/db.sock\"]\n",
            ":4: unix_connect \"/no/such/folder/db.sock\": its folder /no/such/folder cannot be resolved",
        ),
        (
            "version = 1\nmode = \"required\"\n[filesystem]\n[process]\nkeep_fds = [1]\n",
            ":5: keep_fds: 1 is not a descriptor above 2",
        ),
    ];
    for (text, expected) in cases {
        let profile = w.dir.path().join("bad.toml");
        std::fs::write(&profile, text).expect("profile");
        let child = Command::new(bin("nexus-launch"))
            .arg("--profile")
            .arg(&profile)
            .args(["--", "/usr/bin/touch"])
            .arg(&marker)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start");
        let run = wait_with_timeout(child, Duration::from_secs(20));
        assert_eq!(run.code, 64, "{}", run.stderr);
        assert!(
            run.stderr.contains(&format!("bad.toml{expected}")),
            "expected {expected:?} in {}",
            run.stderr
        );
        assert!(!marker.exists(), "nothing was launched");
    }
}

/// Runs the launcher inside an outer launcher whose profile answers `missing` with ENOSYS,
/// as on a kernel without them (the outer profile lets the inner launcher install its
/// own filters: `danger_nested_seccomp`).
fn launch_on_older_kernel(w: &World, missing: &[&str], profile: &Path, probe: &[&str]) -> Run {
    let outer = w.dir.path().join("older-kernel.toml");
    std::fs::write(
        &outer,
        format!(
            "version = 1\nname = \"older-kernel\"\nmode = \"best_effort\"\n[process]\ndanger_nested_seccomp = true\n\n[[syscall]]\nnames = {missing:?}\naction = \"enosys\"\n"
        ),
    )
    .expect("outer profile");
    let mut command = Command::new(bin("nexus-launch"));
    command
        .arg("--profile")
        .arg(&outer)
        .arg("--")
        .arg(bin("nexus-launch"))
        .arg("--profile")
        .arg(profile)
        .arg("--")
        .arg(bin("nexus-escape-probe"))
        .args(probe)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    plugin_env(&mut command, w);
    wait_with_timeout(command.spawn().expect("start"), Duration::from_secs(30))
}

#[test]
fn required_refuses_and_best_effort_reports_when_the_kernel_lacks_landlock() {
    let w = world("no-landlock");
    let input = w.data.join("input.csv").to_string_lossy().into_owned();
    let work = w.work.to_string_lossy().into_owned();
    let port = w.allowed_port.to_string();
    let behave = ["behave", input.as_str(), work.as_str(), port.as_str(), "7"];
    let no_landlock = ["landlock_create_ruleset"];

    let run = launch_on_older_kernel(&w, &no_landlock, &default_profile(), &behave);
    assert_eq!(
        run.code, 69,
        "required must refuse: {}\n{}",
        run.stdout, run.stderr
    );
    assert!(run.stderr.contains("Landlock ABI 0"), "{}", run.stderr);
    assert!(run.stderr.contains("filesystem:"), "{}", run.stderr);
    assert!(!run.stdout.contains("ok read"), "the plugin never started");

    let relaxed = w.dir.path().join("best-effort.toml");
    let text = std::fs::read_to_string(default_profile()).expect("default");
    std::fs::write(
        &relaxed,
        text.replace("mode = \"required\"", "mode = \"best_effort\""),
    )
    .expect("profile");
    let run = launch_on_older_kernel(&w, &no_landlock, &relaxed, &behave);
    assert_eq!(
        run.code, 7,
        "best_effort starts: {}\n{}",
        run.stdout, run.stderr
    );
    assert!(
        run.stderr.contains("not enforced on this kernel"),
        "and says what is not enforced: {}",
        run.stderr
    );
    for feature in ["filesystem:", "tcp:", "scopes:"] {
        assert!(run.stderr.contains(feature), "{feature} {}", run.stderr);
    }
    // seccomp still holds without Landlock: kills, and the socket allow-list.
    let run = launch_on_older_kernel(&w, &no_landlock, &relaxed, &["ptrace"]);
    assert_eq!(run.code, 137, "{}\n{}", run.stdout, run.stderr);
    let other = w.other_port.to_string();
    let run = launch_on_older_kernel(&w, &no_landlock, &relaxed, &["mptcp", &other]);
    assert_outcome("mptcp without Landlock", &run, &Expect::Blocked(&[EPERM]));
}

/// Bad input: a profile asking for what the launcher cannot do on this kernel (checking
/// UNIX connects and listen needs pidfd_getfd, Linux 5.6) fails in required mode with
/// the reason, and best_effort prints exactly what is not enforced.
#[test]
fn a_profile_needing_what_the_kernel_lacks_is_refused_or_listed() {
    let w = world("no-pidfd");
    let granted = w.work.join("db.sock");
    let _listener = unix_echo(&granted);
    let profile = w.dir.path().join("unix.toml");
    let text = std::fs::read_to_string(default_profile())
        .expect("default")
        .replace(
            "bind_tcp = []",
            &format!(
                "bind_tcp = []\nunix_connect = [{:?}]",
                granted.to_string_lossy()
            ),
        );
    std::fs::write(&profile, &text).expect("profile");
    let granted_s = granted.to_string_lossy().into_owned();
    let probe = ["--allowed", "unix-connect", granted_s.as_str()];
    let run = launch_on_older_kernel(&w, &["pidfd_getfd"], &profile, &probe);
    assert_eq!(run.code, 69, "{}\n{}", run.stdout, run.stderr);
    assert!(
        run.stderr.contains("is required but this kernel cannot enforce it")
            && run.stderr.contains(
                "  unix: needs seccomp user notification and pidfd_getfd (Linux 5.6): AF_UNIX connect reaches any socket the plugin can name"
            ),
        "{}",
        run.stderr
    );
    assert!(!run.stdout.contains("ok "), "the plugin never started");

    let relaxed = w.dir.path().join("unix-best-effort.toml");
    std::fs::write(
        &relaxed,
        text.replace("mode = \"required\"", "mode = \"best_effort\""),
    )
    .expect("profile");
    let run = launch_on_older_kernel(&w, &["pidfd_getfd"], &relaxed, &probe);
    assert_eq!(run.code, 0, "{}\n{}", run.stdout, run.stderr);
    let listed: Vec<&str> = run
        .stderr
        .lines()
        .skip_while(|l| !l.contains("not enforced on this kernel:"))
        .skip(1)
        .take_while(|l| l.starts_with("  "))
        .collect();
    assert_eq!(
        listed,
        [
            "  listen: needs seccomp user notification and pidfd_getfd (Linux 5.6): listen() is unchecked, an unbound socket listens on an ephemeral port",
            "  unix: needs seccomp user notification and pidfd_getfd (Linux 5.6): AF_UNIX connect reaches any socket the plugin can name",
        ],
        "{}",
        run.stderr
    );
}

#[test]
fn check_reports_the_landlock_abi_and_what_is_enforced() {
    let out = Command::new(bin("nexus-launch"))
        .arg("--profile")
        .arg(default_profile())
        .arg("--check")
        .output()
        .expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("Landlock ABI"), "{text}");
    // On kernels with Landlock ABI >= 6 and seccomp (as here) everything is enforced.
    if out.status.success() {
        assert!(!text.contains("NOT enforced"), "{text}");
    } else {
        assert_eq!(out.status.code(), Some(69), "{text}");
    }
}

/// Item 4 of issue 21: docs/sandbox.md shows `--check` of both shipped profiles on the machines this
/// project runs on; this kernel must print exactly that.
#[test]
fn the_docs_show_what_check_prints_on_this_kernel() {
    let docs = std::fs::read_to_string(repo_root().join("docs/sandbox.md")).expect("docs");
    for profile in SHIPPED {
        let marker = format!("<!-- check: {} -->", profile.file);
        let start = docs
            .find(&marker)
            .unwrap_or_else(|| panic!("docs/sandbox.md has no {marker}"));
        let block = &docs[start..];
        let body_start = block.find("```\n").expect("a fenced block") + 4;
        let body_end = block[body_start..].find("```").expect("closing fence") + body_start;
        let documented = &block[body_start..body_end];
        let out = Command::new(bin("nexus-launch"))
            .current_dir(repo_root())
            .args(["--profile", profile.file, "--check"])
            .env_clear()
            .env("NEXUS_PLUGIN_DATA", "/usr/share")
            .env("NEXUS_PLUGIN_WORKDIR", "/tmp")
            .output()
            .expect("check");
        let printed = format!(
            "$ nexus-launch --profile {} --check\n{}",
            profile.file,
            String::from_utf8_lossy(&out.stdout)
        );
        assert_eq!(
            printed, documented,
            "docs/sandbox.md is out of date for {} on this kernel (regenerate the block under {marker} with NEXUS_PLUGIN_DATA=/usr/share NEXUS_PLUGIN_WORKDIR=/tmp)",
            profile.file
        );
    }
}

/// A small schema of the OCI runtime-spec's `linux.seccomp` object (config-linux.md,
/// schema/defs-linux.json): the allowed fields at each level, the required ones, and
/// the enumerations. `kubernetes-validate` validates Kubernetes objects only, and a
/// Localhost seccomp profile is not one.
mod oci_schema {
    use serde_json::Value;

    const TOP: &[&str] = &[
        "defaultAction",
        "defaultErrnoRet",
        "architectures",
        "flags",
        "listenerPath",
        "listenerMetadata",
        "syscalls",
    ];
    const SYSCALL: &[&str] = &["names", "action", "errnoRet", "args"];
    const ARG: &[&str] = &["index", "value", "valueTwo", "op"];
    const ACTIONS: &[&str] = &[
        "SCMP_ACT_KILL",
        "SCMP_ACT_KILL_PROCESS",
        "SCMP_ACT_KILL_THREAD",
        "SCMP_ACT_TRAP",
        "SCMP_ACT_ERRNO",
        "SCMP_ACT_TRACE",
        "SCMP_ACT_ALLOW",
        "SCMP_ACT_LOG",
        "SCMP_ACT_NOTIFY",
    ];
    const ARCHES: &[&str] = &[
        "SCMP_ARCH_X86",
        "SCMP_ARCH_X86_64",
        "SCMP_ARCH_X32",
        "SCMP_ARCH_ARM",
        "SCMP_ARCH_AARCH64",
        "SCMP_ARCH_MIPS",
        "SCMP_ARCH_MIPS64",
        "SCMP_ARCH_MIPS64N32",
        "SCMP_ARCH_MIPSEL",
        "SCMP_ARCH_MIPSEL64",
        "SCMP_ARCH_MIPSEL64N32",
        "SCMP_ARCH_PPC",
        "SCMP_ARCH_PPC64",
        "SCMP_ARCH_PPC64LE",
        "SCMP_ARCH_S390",
        "SCMP_ARCH_S390X",
        "SCMP_ARCH_PARISC",
        "SCMP_ARCH_PARISC64",
        "SCMP_ARCH_RISCV64",
    ];
    const OPS: &[&str] = &[
        "SCMP_CMP_NE",
        "SCMP_CMP_LT",
        "SCMP_CMP_LE",
        "SCMP_CMP_EQ",
        "SCMP_CMP_GE",
        "SCMP_CMP_GT",
        "SCMP_CMP_MASKED_EQ",
    ];

    fn object<'a>(
        v: &'a Value,
        at: &str,
        allowed: &[&str],
        required: &[&str],
    ) -> Result<&'a serde_json::Map<String, Value>, String> {
        let map = v.as_object().ok_or(format!("{at}: not an object"))?;
        for key in map.keys() {
            if !allowed.contains(&key.as_str()) {
                return Err(format!("{at}: unknown field {key:?}"));
            }
        }
        for key in required {
            if !map.contains_key(*key) {
                return Err(format!("{at}: missing {key:?}"));
            }
        }
        Ok(map)
    }

    fn one_of(v: &Value, at: &str, values: &[&str]) -> Result<(), String> {
        match v.as_str() {
            Some(s) if values.contains(&s) => Ok(()),
            _ => Err(format!("{at}: {v} is not one of the allowed values")),
        }
    }

    fn uint(v: &Value, at: &str, max: u64) -> Result<(), String> {
        match v.as_u64() {
            Some(n) if n <= max => Ok(()),
            _ => Err(format!("{at}: {v} is not an unsigned integer <= {max}")),
        }
    }

    /// Validates a `linux.seccomp` object.
    pub fn validate(v: &Value) -> Result<(), String> {
        let top = object(v, "$", TOP, &["defaultAction"])?;
        one_of(&top["defaultAction"], "$.defaultAction", ACTIONS)?;
        if let Some(arches) = top.get("architectures") {
            for (i, a) in arches
                .as_array()
                .ok_or("architectures: not an array")?
                .iter()
                .enumerate()
            {
                one_of(a, &format!("$.architectures[{i}]"), ARCHES)?;
            }
        }
        let syscalls = top
            .get("syscalls")
            .and_then(Value::as_array)
            .ok_or("$.syscalls: not an array")?;
        for (i, s) in syscalls.iter().enumerate() {
            let at = format!("$.syscalls[{i}]");
            let entry = object(s, &at, SYSCALL, &["names", "action"])?;
            let names = entry["names"]
                .as_array()
                .ok_or(format!("{at}.names: not an array"))?;
            if names.is_empty() || !names.iter().all(Value::is_string) {
                return Err(format!("{at}.names: needs at least one string"));
            }
            one_of(&entry["action"], &format!("{at}.action"), ACTIONS)?;
            if let Some(errno) = entry.get("errnoRet") {
                uint(errno, &format!("{at}.errnoRet"), u64::from(u32::MAX))?;
            }
            if let Some(args) = entry.get("args") {
                for (j, a) in args
                    .as_array()
                    .ok_or(format!("{at}.args: not an array"))?
                    .iter()
                    .enumerate()
                {
                    let at = format!("{at}.args[{j}]");
                    let arg = object(a, &at, ARG, &["index", "value", "op"])?;
                    uint(&arg["index"], &format!("{at}.index"), 5)?;
                    uint(&arg["value"], &format!("{at}.value"), u64::MAX)?;
                    if let Some(two) = arg.get("valueTwo") {
                        uint(two, &format!("{at}.valueTwo"), u64::MAX)?;
                    }
                    one_of(&arg["op"], &format!("{at}.op"), OPS)?;
                }
            }
        }
        Ok(())
    }
}

/// The action a runtime's libseccomp filter takes for a call, read from an exported OCI
/// profile as runc builds it: entries naming the syscall whose `args` all hold (64-bit
/// comparisons); the most restrictive action among them; the default otherwise.
fn oci_action(profile: &serde_json::Value, syscall: &str, args: [u64; 6]) -> String {
    let rank = |a: &str| match a {
        "SCMP_ACT_KILL_PROCESS" | "SCMP_ACT_KILL" | "SCMP_ACT_KILL_THREAD" => 0,
        "SCMP_ACT_TRAP" => 1,
        "SCMP_ACT_ERRNO" => 2,
        "SCMP_ACT_NOTIFY" => 3,
        "SCMP_ACT_TRACE" => 4,
        "SCMP_ACT_LOG" => 5,
        _ => 6,
    };
    let holds = |arg: &serde_json::Value| {
        let index = arg["index"].as_u64().unwrap_or(9) as usize;
        let value = arg["value"].as_u64().unwrap_or(0);
        let x = args.get(index).copied().unwrap_or(0);
        match arg["op"].as_str().unwrap_or_default() {
            "SCMP_CMP_EQ" => x == value,
            "SCMP_CMP_NE" => x != value,
            "SCMP_CMP_LT" => x < value,
            "SCMP_CMP_LE" => x <= value,
            "SCMP_CMP_GT" => x > value,
            "SCMP_CMP_GE" => x >= value,
            "SCMP_CMP_MASKED_EQ" => x & value == arg["valueTwo"].as_u64().unwrap_or(0),
            other => panic!("unknown op {other}"),
        }
    };
    let mut action = profile["defaultAction"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    for entry in profile["syscalls"].as_array().into_iter().flatten() {
        let named = entry["names"]
            .as_array()
            .is_some_and(|n| n.iter().any(|x| x == syscall));
        let all = entry["args"].as_array().is_none_or(|a| a.iter().all(holds));
        let this = entry["action"].as_str().unwrap_or_default();
        if named && all && rank(this) < rank(&action) {
            action = this.to_string();
        }
    }
    action
}

fn export(profile: &Path, dir: &Path) -> serde_json::Value {
    let out = dir.join("nexus-plugin.json");
    let status = Command::new(bin("nexusctl"))
        .args(["sandbox", "export-seccomp"])
        .arg(profile)
        .arg("-o")
        .arg(&out)
        .env_clear()
        .status()
        .expect("nexusctl");
    assert!(status.success());
    serde_json::from_str(&std::fs::read_to_string(&out).expect("written")).expect("json")
}

#[test]
fn export_seccomp_writes_a_valid_oci_profile_with_the_same_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let json = export(&default_profile(), dir.path());
    oci_schema::validate(&json).unwrap_or_else(|e| panic!("not an OCI seccomp profile: {e}"));
    assert_eq!(json["defaultAction"], "SCMP_ACT_ALLOW");
    let entries = json["syscalls"].as_array().expect("syscalls");
    let find = |name: &str, action: &str| {
        entries
            .iter()
            .filter(|e| {
                e["action"] == action
                    && e["names"]
                        .as_array()
                        .is_some_and(|n| n.iter().any(|x| x == name))
            })
            .collect::<Vec<_>>()
    };
    assert_eq!(find("ptrace", "SCMP_ACT_KILL_PROCESS").len(), 1);
    assert!(
        find("ptrace", "SCMP_ACT_KILL_PROCESS")[0]
            .get("args")
            .is_none()
    );
    let clone3 = find("clone3", "SCMP_ACT_ERRNO");
    assert_eq!(clone3[0]["errnoRet"], 38, "clone3 gets ENOSYS");
    // clone: one entry per namespace flag, each a masked compare of argument 0.
    let clone = find("clone", "SCMP_ACT_ERRNO");
    assert_eq!(clone.len(), 7);
    let newuser = clone
        .iter()
        .find(|e| e["args"][0]["value"] == 0x1000_0000)
        .expect("CLONE_NEWUSER entry");
    assert_eq!(newuser["args"][0]["op"], "SCMP_CMP_MASKED_EQ");
    assert_eq!(newuser["args"][0]["valueTwo"], 0x1000_0000);
    // socket(AF_PACKET) is killed: an equality is exported as a compare of the low 32
    // bits (what the kernel reads of an int), so high bits cannot slip past it.
    let socket = find("socket", "SCMP_ACT_KILL_PROCESS");
    assert!(socket.iter().any(|e| {
        e["args"][0]["op"] == "SCMP_CMP_MASKED_EQ"
            && e["args"][0]["value"] == 0xffff_ffffu64
            && e["args"][0]["valueTwo"] == 17
    }));

    // The schema itself refuses what the runtime would.
    let mut broken = json.clone();
    broken["syscalls"][0]["action"] = "SCMP_ACT_MAYBE".into();
    assert!(oci_schema::validate(&broken).is_err());
    let mut broken = json;
    broken["defaultActions"] = "SCMP_ACT_ALLOW".into();
    assert!(oci_schema::validate(&broken).is_err());
}

/// Item 5 of issue 21: The exported profile carries the launcher's implied rules for both shipped
/// profiles: evaluated as a runtime would, it refuses what the launcher refuses.
#[test]
fn the_exported_profile_refuses_what_the_launcher_refuses() {
    let dir = tempfile::tempdir().expect("tempdir");
    for profile in SHIPPED {
        let json = export(&profile.path(), dir.path());
        oci_schema::validate(&json).unwrap_or_else(|e| panic!("{profile:?}: {e}"));
        let act = |syscall: &str, args: [u64; 6]| oci_action(&json, syscall, args);
        let errno = "SCMP_ACT_ERRNO";
        let allow = "SCMP_ACT_ALLOW";
        let kill = "SCMP_ACT_KILL_PROCESS";
        // Sockets: an allow-list of (domain, type & 0xf, protocol). The runtime's filter
        // confines the launcher too, so it also leaves the launcher's report socket open
        // (AF_UNIX stream, protocol 0); the launcher's own filter refuses it to the plugin
        // (`unix-connect` in the escape suite shows that).
        for domain in 0..48u64 {
            for ty in [1u64, 2, 3, 5, 10, 1 | 0x80800, 2 | 0x800] {
                for proto in [0u64, 1, 6, 17, 132, 256, 262] {
                    let tcp = (domain == 2 || domain == 10)
                        && ty & 0xf == 1
                        && (proto == 0 || proto == 6);
                    let report = domain == 1 && ty & 0xf == 1 && proto == 0;
                    let allowed = tcp || report;
                    let got = act("socket", [domain, ty, proto, 0, 0, 0]);
                    if allowed {
                        assert_eq!(got, allow, "{profile:?} socket({domain}, {ty:#x}, {proto})");
                    } else {
                        assert!(
                            got == errno || got == kill,
                            "{profile:?} socket({domain}, {ty:#x}, {proto}) is {got}"
                        );
                    }
                }
            }
        }
        assert_eq!(act("socket", [2, 1, 262, 0, 0, 0]), errno, "MPTCP");
        assert_eq!(act("socket", [10, 0x80801, 262, 0, 0, 0]), errno, "MPTCP6");
        assert_eq!(act("socket", [1 << 32 | 2, 1, 262, 0, 0, 0]), errno);
        assert_eq!(act("socketpair", [1, 1 | 0x80000, 0, 0, 0, 0]), allow);
        assert_eq!(act("socketpair", [1, 2, 0, 0, 0, 0]), errno);
        // listen: refused where nothing may be bound (default); performed by the
        // launcher, hence left to it, where a port may be (python).
        let listen = act("listen", [3, 16, 0, 0, 0, 0]);
        assert_eq!(
            listen,
            if profile.name == "default" {
                errno
            } else {
                allow
            }
        );
        // The terminal, high bits included.
        for cmd in [0x5412u64, 0x541c, 0x540e, 1 << 32 | 0x5412] {
            assert_eq!(act("ioctl", [0, cmd, 0, 0, 0, 0]), errno, "{cmd:#x}");
        }
        assert_eq!(act("ioctl", [0, 0x5401, 0, 0, 0, 0]), allow, "TCGETS");
        // SysV IPC and POSIX queues.
        for name in ["shmget", "shmat", "msgget", "semget", "mq_open"] {
            assert_eq!(act(name, [0; 6]), errno, "{name}");
        }
        // What the launcher itself does under the runtime's filter stays open: installing
        // its filters, and taking the plugin's socket to perform a listen or connect.
        assert_eq!(act("seccomp", [1, 0, 0, 0, 0, 0]), allow);
        assert_eq!(act("pidfd_getfd", [3, 4, 0, 0, 0, 0]), allow);
        assert_eq!(act("pidfd_open", [42, 0, 0, 0, 0, 0]), allow);
        assert_eq!(act("socketpair", [1, 5 | 0x80000, 0, 0, 0, 0]), allow);
        assert_eq!(
            act("prctl", [38, 1, 0, 0, 0, 0]),
            allow,
            "PR_SET_NO_NEW_PRIVS"
        );
        // Anonymous executables.
        assert_eq!(act("memfd_create", [0, 1, 0, 0, 0, 0]), errno);
        // Allowed (and audited by the python profile's log rule).
        let sealed = act("memfd_create", [0, 1 | 8, 0, 0, 0, 0]);
        assert!(sealed == allow || sealed == "SCMP_ACT_LOG", "{sealed}");
        assert_eq!(act("execveat", [3, 0, 0, 0, 0x1000, 0]), errno);
        assert_eq!(act("execveat", [3, 0, 0, 0, 0, 0]), allow);
        assert_eq!(act("io_uring_setup", [0; 6]), errno);
        assert_eq!(act("ptrace", [0; 6]), kill);
        assert_eq!(act("read", [0; 6]), allow);
    }
}
