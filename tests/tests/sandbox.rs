//! The sandbox escape suite: the escape probe (tests/escape) tries each escape under
//! `nexus-launch` and the default profile; every one must be blocked (EPERM/EACCES back
//! to the probe, or the probe killed), and every kill must reach the real sidecar's
//! `POST /v1/signals` with the syscall's name. A well-behaved run must be unharmed and its
//! exit code must come back; signals must be forwarded.
//!
//! These run as root here: the sandbox must hold for root too (no_new_privs, seccomp and
//! Landlock all apply to uid 0). Controls run the same probe without the launcher to show
//! each escape is real.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nexus_tests::{bin, curl, eventually, repo_root, stack};

const BLOCKED: i32 = 3;
const ESCAPED: i32 = 42;
const WORKLOAD: &str = "spiffe://nexus.local/ns/plugins/sa/escape-probe";

fn default_profile() -> PathBuf {
    repo_root().join("profiles/default.toml")
}

/// A plugin's world: a work folder it may write, a data file it may read, a secret it
/// may not, the sidecar port it may reach and another it may not.
struct World {
    dir: tempfile::TempDir,
    work: PathBuf,
    data: PathBuf,
    secret: PathBuf,
    allowed_port: u16,
    other_port: u16,
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
    World {
        work,
        data,
        secret,
        allowed_port: echo_listener(),
        other_port: echo_listener(),
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

/// Output of one run.
struct Run {
    code: i32,
    stdout: String,
    stderr: String,
}

fn wait_with_timeout(mut child: Child, timeout: Duration) -> Run {
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait") {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let mut stdout = String::new();
    let mut stderr = String::new();
    if let Some(mut out) = child.stdout.take() {
        let _ = out.read_to_string(&mut stdout);
    }
    if let Some(mut err) = child.stderr.take() {
        let _ = err.read_to_string(&mut stderr);
    }
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Run {
        code,
        stdout,
        stderr,
    }
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
        .env("NEXUS_PLUGIN_WORKDIR", &world.work)
        .env("NEXUS_PLUGIN_DATA", &world.data)
        .env("NEXUS_SIDECAR_PORT", world.allowed_port.to_string())
        .env("NEXUS_WORKLOAD_ID", WORKLOAD)
        .env_remove("NEXUS_SIGNAL_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    command
}

fn launch(world: &World, report: Option<&str>, probe: &[&str]) -> Run {
    let child = launcher(world, &default_profile(), report, probe)
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
    /// The call failed with EPERM or EACCES and the probe said so.
    Blocked,
    /// The probe was killed (exit code) and a violation naming the syscall was reported.
    Killed(i32, &'static str),
}

#[test]
fn every_escape_is_blocked_and_every_kill_is_reported() {
    let w = world("escapes");
    let sidecar = signal_sidecar(w.dir.path());
    let report = report_url(w.dir.path());
    let secret = w.secret.to_string_lossy().into_owned();
    let outside = w.dir.path().join("pwned").to_string_lossy().into_owned();
    let other = w.other_port.to_string();
    let mut cases: Vec<(Vec<&str>, Expect)> = vec![
        (vec!["read", &secret], Expect::Blocked),
        (vec!["read", "/etc/shadow"], Expect::Blocked),
        (vec!["write", &outside], Expect::Blocked),
        (vec!["write", "/etc/nexus-pwned"], Expect::Blocked),
        (vec!["exec", "/bin/sh"], Expect::Blocked),
        (vec!["read", "/proc/self/root/etc/shadow"], Expect::Blocked),
        (vec!["read", "/proc/1/environ"], Expect::Blocked),
        (vec!["connect", &other], Expect::Blocked),
        (vec!["bind"], Expect::Blocked),
        (vec!["udp-socket"], Expect::Blocked),
        (vec!["mount"], Expect::Blocked),
        (vec!["unshare-user"], Expect::Blocked),
        (vec!["unshare-net"], Expect::Blocked),
        (vec!["io-uring"], Expect::Blocked),
        (vec!["kill-parent"], Expect::Blocked),
        (vec!["caps"], Expect::Blocked),
        (vec!["ptrace"], Expect::Killed(137, "ptrace")),
        (vec!["bpf"], Expect::Killed(137, "bpf")),
        (vec!["raw-socket"], Expect::Killed(137, "socket")),
        (vec!["packet-socket"], Expect::Killed(137, "socket")),
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
            Expect::Blocked,
        ));
        // The x32 ABI's ptrace: killed by the kernel (SIGSYS), so the name is unknown.
        cases.push((vec!["x32-ptrace"], Expect::Killed(159, "unknown")));
    }
    let mut expected_reports = Vec::new();
    for (probe, expect) in &cases {
        let run = launch(&w, Some(&report), probe);
        let what = probe.join(" ");
        assert!(
            !run.stdout.contains("ESCAPED"),
            "ESCAPE under the sandbox: {what}\n{}\n{}",
            run.stdout,
            run.stderr
        );
        match expect {
            Expect::Blocked => {
                assert_eq!(run.code, BLOCKED, "{what}: {}\n{}", run.stdout, run.stderr);
                assert!(
                    run.stdout.contains("(os error 1)") || run.stdout.contains("(os error 13)"),
                    "{what} must fail with EPERM or EACCES: {}",
                    run.stdout
                );
            }
            Expect::Killed(code, syscall) => {
                assert_eq!(run.code, *code, "{what}: {}\n{}", run.stdout, run.stderr);
                assert!(
                    run.stderr.contains(&format!("\"syscall\":\"{syscall}\"")),
                    "{what}: the launcher logs the violation: {}",
                    run.stderr
                );
                expected_reports.push((what.clone(), *syscall, *code - 128));
            }
        }
    }
    assert!(!Path::new(&outside).exists(), "nothing written outside");
    assert!(
        !Path::new("/etc/nexus-pwned").exists(),
        "nothing written in /etc"
    );

    let received = signals(&sidecar);
    assert_eq!(
        received.len(),
        expected_reports.len(),
        "one signal per kill: {received:#?}"
    );
    for ((what, syscall, signal), got) in expected_reports.iter().zip(&received) {
        assert_eq!(got["kind"], "sandbox_violation", "{what}");
        assert_eq!(got["syscall"], *syscall, "{what}: {got}");
        assert_eq!(got["action"], "kill", "{what}");
        assert_eq!(got["exit_signal"], *signal, "{what}");
        assert_eq!(got["workload"], WORKLOAD, "{what}");
        assert_eq!(got["profile"], "default", "{what}");
        assert!(got["pid"].as_u64().unwrap_or(0) > 0, "{what}");
    }
    let kills = sidecar.metric_sum("nexus_sandbox_violations_total{action=\"kill\"}");
    assert_eq!(kills, expected_reports.len() as f64);
}

#[test]
fn the_escapes_are_real_without_the_sandbox() {
    let w = world("controls");
    let secret = w.secret.to_string_lossy().into_owned();
    let outside = w.dir.path().join("written").to_string_lossy().into_owned();
    let other = w.other_port.to_string();
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
    ] {
        let run = unsandboxed(&probe);
        assert_eq!(
            run.code, ESCAPED,
            "control {:?} should succeed unsandboxed: {}",
            probe, run.stdout
        );
    }
}

#[test]
fn a_well_behaved_plugin_runs_unharmed_and_its_exit_code_comes_back() {
    let w = world("behave");
    let input = w.data.join("input.csv").to_string_lossy().into_owned();
    let work = w.work.to_string_lossy().into_owned();
    let port = w.allowed_port.to_string();
    let run = launch(&w, None, &["behave", &input, &work, &port, "7"]);
    assert_eq!(run.code, 7, "{}\n{}", run.stdout, run.stderr);
    for step in ["ok read", "ok write", "ok connect", "ok thread"] {
        assert!(run.stdout.contains(step), "{step}: {}", run.stdout);
    }
    assert_eq!(
        std::fs::read_to_string(w.work.join("out.txt")).expect("written"),
        "result"
    );
    assert!(!run.stderr.contains("violation"), "{}", run.stderr);
}

#[test]
fn signals_are_forwarded_and_the_launcher_exits_like_the_child() {
    let w = world("signals");
    for (signal, name, code) in [
        (libc_sig::TERM, "TERM", 143),
        (libc_sig::HUP, "HUP", 129),
        (libc_sig::USR1, "USR1", 138),
    ] {
        let mut child = launcher(&w, &default_profile(), None, &["wait"])
            .spawn()
            .expect("start");
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
        assert_eq!(run.code, code, "SIG{name} ({signal}): {}", run.stderr);
    }
}

/// Signal numbers without a libc dependency in this test crate.
mod libc_sig {
    pub const HUP: i32 = 1;
    pub const USR1: i32 = 10;
    pub const TERM: i32 = 15;
}

#[test]
fn log_rules_let_the_call_run_and_report_it() {
    let w = world("log");
    let sidecar = signal_sidecar(w.dir.path());
    let profile = w.dir.path().join("audit.toml");
    std::fs::write(
        &profile,
        "version = 1\nname = \"audit\"\nmode = \"best_effort\"\n\n[[syscall]]\nnames = [\"getcpu\"]\naction = \"log\"\n",
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
            "version = 1\nmode = \"required\"\n\n[[syscall]]\nnames = [\"ptrace\", \"mount_everything\"]\naction = \"kill\"\n",
            ":5: unknown syscall \"mount_everything\"",
        ),
        (
            "version = 1\nmode = \"required\"\n[filesystem]\nread = [\n  \"/usr/lib\",\n  \"/no/such/plugin/data\",\n]\n",
            ":6: \"/no/such/plugin/data\" does not exist",
        ),
        (
            "version = 1\nmode = \"required\"\n\n[[syscall]]\nnames = [\"mount\"]\naction = \"kill\"\n\n[[syscall]]\nnames = [\"mount\"]\naction = \"eperm\"\n",
            ":8: \"mount\" is already ruled unconditionally on line 4",
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

/// Runs the launcher inside an outer launcher whose profile makes Landlock look absent
/// (`landlock_create_ruleset` answers ENOSYS), as on a kernel without it.
fn launch_without_landlock(w: &World, profile: &Path, probe: &[&str]) -> Run {
    let outer = w.dir.path().join("no-landlock.toml");
    std::fs::write(
        &outer,
        "version = 1\nname = \"no-landlock\"\nmode = \"best_effort\"\n\n[[syscall]]\nnames = [\"landlock_create_ruleset\"]\naction = \"enosys\"\n",
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
        .env("NEXUS_PLUGIN_WORKDIR", &w.work)
        .env("NEXUS_PLUGIN_DATA", &w.data)
        .env("NEXUS_SIDECAR_PORT", w.allowed_port.to_string())
        .env_remove("NEXUS_SIGNAL_URL")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    wait_with_timeout(command.spawn().expect("start"), Duration::from_secs(30))
}

#[test]
fn required_refuses_and_best_effort_reports_when_the_kernel_lacks_landlock() {
    let w = world("no-landlock");
    let input = w.data.join("input.csv").to_string_lossy().into_owned();
    let work = w.work.to_string_lossy().into_owned();
    let port = w.allowed_port.to_string();
    let behave = ["behave", input.as_str(), work.as_str(), port.as_str(), "7"];

    let run = launch_without_landlock(&w, &default_profile(), &behave);
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
    let run = launch_without_landlock(&w, &relaxed, &behave);
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
    // seccomp still holds without Landlock.
    let run = launch_without_landlock(&w, &relaxed, &["ptrace"]);
    assert_eq!(run.code, 137, "{}\n{}", run.stdout, run.stderr);
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

#[test]
fn export_seccomp_writes_a_valid_oci_profile_with_the_same_rules() {
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("nexus-plugin.json");
    let status = Command::new(bin("nexusctl"))
        .args(["sandbox", "export-seccomp"])
        .arg(default_profile())
        .arg("-o")
        .arg(&out)
        .status()
        .expect("nexusctl");
    assert!(status.success());
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&out).expect("written")).expect("json");
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
    // socket(AF_PACKET) is killed; socket(AF_INET, SOCK_RAW) is two AND'ed args.
    let socket = find("socket", "SCMP_ACT_KILL_PROCESS");
    assert!(socket.iter().any(|e| e["args"][0]["value"] == 17));
    assert!(
        socket
            .iter()
            .any(|e| { e["args"][0]["value"] == 2 && e["args"][1]["op"] == "SCMP_CMP_MASKED_EQ" })
    );

    // The schema itself refuses what the runtime would.
    let mut broken = json.clone();
    broken["syscalls"][0]["action"] = "SCMP_ACT_MAYBE".into();
    assert!(oci_schema::validate(&broken).is_err());
    let mut broken = json;
    broken["defaultActions"] = "SCMP_ACT_ALLOW".into();
    assert!(oci_schema::validate(&broken).is_err());
}
