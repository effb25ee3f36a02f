//! Execution records, end to end: the real sidecars with `[audit]` file sinks, driven
//! with curl through both hops, the record files checked field by field and with
//! `nexusctl audit verify` (edits, crashes, strict mode, a burst without drops).
//!
//! ```text
//! curl ──plain──▶ plugin sidecar (outbound, policy, records) ──mTLS──▶ data sidecar
//!                                            (inbound, policy, records) ──▶ data API
//! ```
//!
//! Needs `cargo build --workspace --bins` first (`scripts/test.sh` does it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use nexus_tests::stack::{self, DATA_API_ID, PLUGIN_ID, TwoHop, TwoHopOptions, two_hop};
use nexus_tests::{Proc, bin, curl, eventually, read_json, temp_dir};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);

/// A policy for these tests: everything is allowed but paths under `/forbidden`.
const POLICY: &str = r#"package nexus.authz

import rego.v1

default decision := {"allow": false, "reasons": ["forbidden by the audit test policy"]}

decision := {"allow": true, "reasons": ["allowed by the audit test policy"]} if {
	not startswith(input.request.path, "/forbidden")
}
"#;

/// A two-hop stack whose sidecars both write records. Field order is drop order.
struct AuditStack {
    hop: TwoHop,
    data_records: PathBuf,
    plugin_records: PathBuf,
    dir: tempfile::TempDir,
}

fn audit_toml(records: &Path, extra: &str) -> String {
    format!(
        "[audit]\nsink = {{ file = {{ path = {:?} }} }}\n{extra}\n",
        records.to_string_lossy()
    )
}

/// Writes the test policy and the runtime data (execution `ex-1` open for c-flood-17);
/// returns the `[policy]` table.
fn policy_toml(dir: &Path) -> String {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).expect("policy folder");
    std::fs::write(policies.join("authz.rego"), POLICY).expect("write policy");
    let state = dir.join("runtime-data.json");
    let executions = json!({"executions": {"ex-1": {
        "plugin": PLUGIN_ID, "clause": "c-flood-17", "not_after": "2099-01-01T00:00:00.000Z"
    }}, "revoked": {}});
    std::fs::write(&state, executions.to_string()).expect("write state");
    format!(
        "[policy]\ndir = {:?}\nstate_file = {:?}\n",
        policies.to_string_lossy(),
        state.to_string_lossy()
    )
}

fn start(name: &str) -> AuditStack {
    let dir = temp_dir(name);
    let policy = policy_toml(dir.path());
    let data_records = dir.path().join("records").join("data.jsonl");
    let plugin_records = dir.path().join("records").join("plugin.jsonl");
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml: format!("{policy}\n{}", audit_toml(&data_records, "")),
            plugin_toml: format!("{policy}\n{}", audit_toml(&plugin_records, "")),
            ..TwoHopOptions::default()
        },
    );
    AuditStack {
        hop,
        data_records,
        plugin_records,
        dir,
    }
}

/// The records of a file (lines that do not parse, e.g. a truncated one, are skipped).
fn records(path: &Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// Waits until `path` holds `n` records, and returns them.
fn wait_records(path: &Path, n: usize) -> Vec<Value> {
    eventually(WAIT, &format!("{n} records in {}", path.display()), || {
        let found = records(path);
        (found.len() >= n).then_some(found)
    })
}

fn verify(files: &[&Path], json: bool) -> Output {
    let mut command = Command::new(bin("nexusctl"));
    command.args(["audit", "verify"]);
    if json {
        command.args(["-o", "json"]);
    }
    command.args(files).output().expect("run nexusctl")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn sha256_of(path: &Path) -> String {
    let out = Command::new("sha256sum")
        .arg(path)
        .output()
        .expect("sha256sum");
    text(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string()
}

/// curl `args`, the body saved to `body`: the status.
fn fetch(body: &Path, args: &[&str]) -> u16 {
    let body_str = body.to_string_lossy().into_owned();
    let mut all = vec!["-o", body_str.as_str(), "-w", "%{http_code}"];
    all.extend_from_slice(args);
    text(&curl(&all).stdout).trim().parse().unwrap_or(0)
}

/// `(status, decision, path, method)` of a record, for assertions that read well.
fn summary(record: &Value) -> (u64, &str, &str, &str) {
    (
        record["status"].as_u64().unwrap_or(0),
        record["decision"].as_str().unwrap_or(""),
        record["path"].as_str().unwrap_or(""),
        record["method"].as_str().unwrap_or(""),
    )
}

#[test]
fn every_request_is_recorded_on_both_hops_and_the_chain_verifies() {
    let stack = start("audit-both-hops");
    let dir = stack.dir.path();
    let hop = &stack.hop;

    // 1 MiB of non-repeating bytes to upload.
    let upload = dir.join("upload.bin");
    let bytes: Vec<u8> = (0u32..(1 << 20))
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&upload, &bytes).expect("write upload");
    let upload_sha = sha256_of(&upload);

    let bodies: Vec<PathBuf> = (0..4).map(|i| dir.join(format!("body-{i}"))).collect();
    let allowed = hop.outbound_url("/clauses/c-flood-17/rainfall");
    assert_eq!(fetch(&bodies[0], &[&allowed]), 200);
    assert_eq!(fetch(&bodies[1], &[&hop.outbound_url("/forbidden/x")]), 403);
    let bypass = hop.outbound_url("/clauses/c-flood-17%2f..%2fforbidden");
    assert_eq!(fetch(&bodies[2], &["--path-as-is", &bypass]), 400);
    let upload_arg = format!("@{}", upload.to_string_lossy());
    assert_eq!(
        fetch(
            &bodies[3],
            &["--data-binary", &upload_arg, &hop.outbound_url("/upload")]
        ),
        200
    );
    let answer: Value =
        serde_json::from_slice(&std::fs::read(&bodies[3]).expect("upload answer")).expect("json");
    assert_eq!(
        answer["sha256"],
        upload_sha.as_str(),
        "the app got the upload"
    );
    let received: Vec<String> = bodies.iter().map(|b| sha256_of(b)).collect();

    let plugin = wait_records(&stack.plugin_records, 4);
    let data = wait_records(&stack.data_records, 2);
    assert_eq!(plugin.len(), 4, "{plugin:#?}");
    assert_eq!(
        data.len(),
        2,
        "only allowed requests reach the data sidecar: {data:#?}"
    );

    for (records, direction) in [(&plugin, "outbound"), (&data, "inbound")] {
        for (seq, record) in records.iter().enumerate() {
            assert_eq!(record["seq"], seq as u64);
            assert_eq!(record["direction"], direction);
            assert_eq!(record["source"], PLUGIN_ID);
            assert_eq!(record["destination"], DATA_API_ID);
        }
    }
    assert_eq!(plugin[0]["sidecar"], PLUGIN_ID);
    assert_eq!(data[0]["sidecar"], DATA_API_ID);

    // The allowed read, on both hops.
    for record in [&plugin[0], &data[0]] {
        assert_eq!(
            summary(record),
            (200, "allow", "/clauses/c-flood-17/rainfall", "GET")
        );
        assert_eq!(record["clause"], "c-flood-17");
        assert_eq!(record["execution_id"], "ex-1");
        assert_eq!(
            record["reasons"],
            json!(["allowed by the audit test policy"])
        );
        assert_eq!(record["response_sha256"], received[0].as_str());
        assert_eq!(record["request_bytes"], 0);
        assert!(!record["decision_id"].as_str().unwrap_or("").is_empty());
        assert!(record["policy_revision"].is_string());
    }
    // Denied by policy, at the first hop.
    assert_eq!(summary(&plugin[1]), (403, "deny", "/forbidden/x", "GET"));
    assert_eq!(
        plugin[1]["reasons"],
        json!(["forbidden by the audit test policy"])
    );
    assert_eq!(plugin[1]["response_sha256"], received[1].as_str());
    // Refused before policy: the raw path is kept, the reason says why.
    let (status, decision, path, _) = summary(&plugin[2]);
    assert_eq!((status, decision), (400, "deny"));
    assert!(path.contains("%2f"), "{path}");
    assert!(
        plugin[2]["reasons"][0]
            .as_str()
            .unwrap_or("")
            .contains("malformed request target"),
        "{}",
        plugin[2]
    );
    assert_eq!(plugin[2]["response_sha256"], received[2].as_str());
    // The upload, hashed as it streamed through both hops.
    for record in [&plugin[3], &data[1]] {
        assert_eq!(summary(record), (200, "allow", "/upload", "POST"));
        assert_eq!(record["request_sha256"], upload_sha.as_str());
        assert_eq!(record["request_bytes"], 1 << 20);
        assert_eq!(record["response_sha256"], received[3].as_str());
        assert!(record["latency_ms"].as_f64().unwrap_or(-1.0) >= 0.0);
    }

    for file in [&stack.plugin_records, &stack.data_records] {
        let out = verify(&[file], false);
        assert!(
            out.status.success(),
            "{}{}",
            text(&out.stdout),
            text(&out.stderr)
        );
    }

    // An edited record breaks the chain there, and verify names the line.
    let edited = dir.join("edited.jsonl");
    let original = std::fs::read_to_string(&stack.plugin_records).expect("records");
    let mut lines: Vec<String> = original.lines().map(String::from).collect();
    lines[1] = lines[1].replacen("\"status\":403", "\"status\":200", 1);
    std::fs::write(&edited, lines.join("\n") + "\n").expect("write edited copy");
    let out = verify(&[&edited], false);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    let said = format!("{}{}", text(&out.stdout), text(&out.stderr));
    assert!(said.contains("edited.jsonl:2"), "{said}");
}

#[test]
fn a_crash_mid_write_is_reported_and_the_chain_continues_after_restart() {
    let stack = start("audit-crash");
    let AuditStack {
        hop,
        plugin_records,
        dir,
        ..
    } = stack;
    let TwoHop {
        plugin,
        data,
        data_api,
        data_workload_api,
        plugin_workload_api,
    } = hop;
    let _keep = (data, data_api, data_workload_api, plugin_workload_api);
    let url = format!(
        "http://{}/clauses/c-flood-17/rainfall",
        plugin.outbound("hazard")
    );

    // Traffic while the sidecar is killed.
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = {
        let (stop, url) = (stop.clone(), url.clone());
        std::thread::spawn(move || {
            while !stop.load(Ordering::Relaxed) {
                curl(&["-o", "/dev/null", "--max-time", "5", &url]);
            }
        })
    };
    wait_records(&plugin_records, 5);
    let mut plugin = plugin;
    plugin.proc.signal("KILL");
    eventually(WAIT, "the killed sidecar to exit", || {
        (!plugin.proc.is_running()).then_some(())
    });
    stop.store(true, Ordering::Relaxed);
    traffic.join().expect("traffic thread");

    // A crash in the middle of a write: cut the last line short.
    let mut bytes = std::fs::read(&plugin_records).expect("records");
    if bytes.last() == Some(&b'\n') {
        bytes.pop();
    }
    let last_start = bytes.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
    let cut = last_start + (bytes.len() - last_start) / 2;
    bytes.truncate(cut);
    std::fs::write(&plugin_records, &bytes).expect("truncate");
    let before = records(&plugin_records);
    let last_seq = before
        .last()
        .and_then(|r| r["seq"].as_u64())
        .expect("a record");

    // Restart with the same configuration.
    let address_file = dir.path().join("plugin-sidecar.addresses.json");
    std::fs::remove_file(&address_file).expect("remove old address file");
    let config = plugin.config.to_string_lossy().into_owned();
    let restarted = Proc::spawn(
        "plugin-sidecar-restarted",
        dir.path(),
        &bin("nexus-sidecar"),
        &["--config", &config],
        &[],
    );
    let addresses = read_json(&address_file, WAIT);
    let outbound = addresses["outbound"]["hazard"].as_str().unwrap_or_default();
    let url = format!("http://{outbound}/clauses/c-flood-17/rainfall");
    eventually(WAIT, "the restarted sidecar to serve", || {
        (nexus_tests::curl_status(&[&url]) == 200).then_some(())
    });
    for _ in 0..2 {
        assert_eq!(nexus_tests::curl_status(&[&url]), 200);
    }
    let after = wait_records(&plugin_records, before.len() + 3);
    let resumed: Vec<u64> = after[before.len()..]
        .iter()
        .filter_map(|r| r["seq"].as_u64())
        .collect();
    assert_eq!(resumed, vec![last_seq + 1, last_seq + 2, last_seq + 3]);

    let out = verify(&[&plugin_records], true);
    assert!(out.status.success(), "{}", text(&out.stdout));
    let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
    assert_eq!(
        report["warnings"].as_array().map(Vec::len),
        Some(1),
        "{report:#}"
    );
    assert!(
        report["warnings"][0].to_string().contains("truncated"),
        "{report:#}"
    );
    drop(restarted);
}

#[test]
fn strict_mode_refuses_requests_when_records_cannot_be_written() {
    let dir = temp_dir("audit-strict");
    // The app: a listener that must never see a connection.
    let app = std::net::TcpListener::bind("127.0.0.1:0").expect("bind app");
    app.set_nonblocking(true).expect("nonblocking");
    let app_addr = app.local_addr().expect("app address");
    // The sink's folder is a regular file: no one (not even root) can create it.
    let blocker = dir.path().join("blocker");
    std::fs::write(&blocker, b"not a folder").expect("write blocker");
    let records = blocker.join("records.jsonl");
    let api = stack::workload_api(
        dir.path(),
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let data = stack::sidecar(
        dir.path(),
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"{app_addr}\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n{audit}",
            socket = api.url(),
            audit = audit_toml(&records, "mode = \"strict\""),
        ),
        true,
    );
    let mut args = stack::inbound_curl_args(data.inbound_port(), Some("nexus.local/flood-model"));
    let url = format!(
        "https://localhost:{}/clauses/c-flood-17/rainfall",
        data.inbound_port()
    );
    args.push(url);
    let mut all: Vec<&str> = vec!["-w", "\n%{http_code}"];
    all.extend(args.iter().map(String::as_str));
    for _ in 0..3 {
        let out = text(&curl(&all).stdout);
        let (body, status) = out.rsplit_once('\n').expect("status line");
        assert_eq!(status, "503", "{out}");
        let body: Value = serde_json::from_str(body).expect("json body");
        assert_eq!(body, json!({"error": "audit records cannot be written"}));
    }
    assert!(
        matches!(app.accept(), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "a refused request reached the app"
    );
    assert_eq!(data.metric_sum("nexus_audit_refused_total"), 3.0);
    assert!(
        data.proc
            .log_text()
            .contains("cannot open the execution record sink")
    );
}

#[test]
fn a_burst_is_recorded_without_drops() {
    let stack = start("audit-burst");
    const N: usize = 2000;
    let url = stack
        .hop
        .outbound_url(&format!("/clauses/c-flood-17/rainfall?i=[1-{N}]"));
    let out = nexus_tests::run_bounded(
        120,
        "curl",
        &["-sS", "-o", "/dev/null", "-w", "%{http_code}\n", &url],
    );
    let statuses = text(&out.stdout);
    assert_eq!(
        statuses.lines().filter(|s| *s == "200").count(),
        N,
        "{}",
        text(&out.stderr)
    );
    for (file, sidecar) in [
        (&stack.plugin_records, &stack.hop.plugin),
        (&stack.data_records, &stack.hop.data),
    ] {
        wait_records(file, N);
        let out = verify(&[file], true);
        assert!(out.status.success(), "{}", text(&out.stdout));
        let report: Value = serde_json::from_slice(&out.stdout).expect("json report");
        assert_eq!(report["records"], N as u64);
        sidecar.wait_metric("nexus_audit_records_written_total", N as f64, WAIT);
        assert_eq!(sidecar.metric_sum("nexus_audit_records_dropped_total"), 0.0);
        assert_eq!(sidecar.metric_sum("nexus_audit_write_errors_total"), 0.0);
        // The record writer (best-effort mode) runs below the request workers: `ps -L`
        // shows its thread at the sidecar's nice + 10.
        let (process, writers) = nice_of_threads(sidecar.proc.pid(), "nexus-audit");
        assert_eq!(
            writers,
            vec![(process + 10).min(19)],
            "sidecar at nice {process}"
        );
    }
}

/// The nice value of process `pid`'s main thread, and of each of its threads named
/// `name` (`/proc/PID/task/TID/stat`, field 19).
fn nice_of_threads(pid: u32, name: &str) -> (i32, Vec<i32>) {
    let nice = |stat: &str| -> i32 {
        let after_name = &stat[stat.rfind(')').expect("stat") + 1..];
        after_name
            .split_whitespace()
            .nth(16)
            .and_then(|n| n.parse().ok())
            .expect("nice field")
    };
    let stat = |task: &Path| std::fs::read_to_string(task.join("stat")).expect("task stat");
    let tasks = Path::new("/proc").join(pid.to_string()).join("task");
    let process = nice(&stat(&tasks.join(pid.to_string())));
    let named = std::fs::read_dir(&tasks)
        .expect("tasks")
        .filter_map(|task| {
            let task = task.ok()?.path();
            let comm = std::fs::read_to_string(task.join("comm")).ok()?;
            (comm.trim() == name).then(|| nice(&stat(&task)))
        })
        .collect();
    (process, named)
}

/// A plugin controls some of the text its records carry: the execution it names in
/// `x-nexus-execution` (recorded as it was named when no such execution is open) and
/// the path. Quotes, backslashes and tabs in them stay inside their field: no record
/// gains a field or a second `decision`, and the chain still verifies.
#[test]
fn text_a_plugin_sends_cannot_add_fields_to_its_records() {
    let stack = start("audit-injection");
    let body = stack.dir.path().join("body");
    let hop = &stack.hop;
    assert_eq!(
        fetch(&body, &[&hop.outbound_url("/clauses/c-flood-17/rainfall")]),
        200
    );
    let named = "ex-9\",\"decision\":\"allow\",\"extra\":\"\\\"\t\\u0000";
    let header = format!("x-nexus-execution: {named}");
    let status = fetch(
        &body,
        &[
            "-H",
            &header,
            "--path-as-is",
            &hop.outbound_url("/forbidden/%22,%22decision%22:%22allow%22"),
        ],
    );
    assert_eq!(status, 403, "the test policy forbids /forbidden");

    let lines = eventually(WAIT, "2 records", || {
        let text = std::fs::read_to_string(&stack.plugin_records).unwrap_or_default();
        (text.lines().count() >= 2).then_some(text)
    });
    let records: Vec<Value> = lines
        .lines()
        .map(|line| serde_json::from_str(line).expect("every line is one JSON record"))
        .collect();
    assert_eq!(records.len(), 2, "{lines}");
    let keys = |record: &Value| -> Vec<String> {
        record
            .as_object()
            .expect("a record is an object")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(
        keys(&records[1]),
        keys(&records[0]),
        "a hostile request's record has the fields of any other: {lines}"
    );
    assert_eq!(records[1]["decision"], "deny", "{lines}");
    assert_eq!(
        records[1]["execution_id"], named,
        "recorded as named: {lines}"
    );
    assert!(
        lines
            .lines()
            .nth(1)
            .unwrap_or_default()
            .matches("\"decision\":")
            .count()
            == 1,
        "one decision member in the line: {lines}"
    );
    let out = verify(&[&stack.plugin_records], true);
    assert!(out.status.success(), "{}", text(&out.stdout));
}
