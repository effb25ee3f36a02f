//! Per-request Rego policy, end to end: the real sidecars on 127.0.0.1 port 0, both
//! loading a copy of `policies/` and a runtime state file (open executions,
//! revocations) from the test's temp dir, driven with curl and raw python3 sockets:
//!
//! ```text
//! curl ──plain──▶ plugin sidecar (outbound, policy) ──mTLS──▶ data sidecar (inbound,
//!                                                              policy) ──▶ data API
//! ```
//!
//! Every assertion is about what a user sees: statuses, the JSON of a 403, the
//! `x-nexus-decision-id` header, `/metrics`, `/ready` and the sidecar's log.
//!
//! Needs `cargo build --workspace --bins` first (`scripts/test.sh` does it).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use nexus_tests::copy_dir;
use nexus_tests::stack::{self, DATA_API_ID, PLUGIN_ID, TwoHop, TwoHopOptions, two_hop};
use nexus_tests::{bin, curl, eventually, repo_root, rfc3339, run_bounded, temp_dir};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
/// The certs-dev identity curl presents to the data sidecar's inbound.
const FLOOD: &str = "nexus.local/flood-model";

// --- the stack -----------------------------------------------------------------------

/// A two-hop stack whose sidecars both evaluate the policy folder `policies` with the
/// runtime data in `state`. Field order is drop order: processes before the folder.
struct PolicyStack {
    hop: TwoHop,
    policies: PathBuf,
    state: PathBuf,
    dir: tempfile::TempDir,
}

/// The `[policy]` table both sidecars get, plus `extra` lines.
fn policy_toml(policies: &Path, state: &Path, extra: &str) -> String {
    format!(
        "[policy]\ndir = {:?}\nstate_file = {:?}\nreload_interval = \"100ms\"\n{extra}\n",
        policies.to_string_lossy(),
        state.to_string_lossy(),
    )
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

/// One execution of the state file, for the flood-model plugin.
fn execution(clause: &str, not_after: SystemTime) -> Value {
    json!({"plugin": PLUGIN_ID, "clause": clause, "not_after": rfc3339(not_after)})
}

/// Writes `path` the way a careful writer does: a temp file (in the test's folder,
/// outside the policy folder), then a rename.
fn write_atomically(path: &Path, bytes: &[u8]) {
    let name = path.file_name().expect("file name").to_string_lossy();
    let root = path
        .ancestors()
        .find(|a| {
            a.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("nexus-policy-"))
        })
        .expect("inside a test temp dir");
    let tmp = root.join(format!(".{name}.tmp"));
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// Starts the stack; `data_extra` / `plugin_extra` are more `[policy]` lines for each
/// sidecar, `edit` changes the policy copy before the sidecars start.
fn start_with(
    name: &str,
    data_extra: &str,
    plugin_extra: &str,
    edit: impl FnOnce(&Path),
) -> PolicyStack {
    let dir = temp_dir(name);
    let policies = dir.path().join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    edit(&policies);
    let state = dir.path().join("state").join("runtime-data.json");
    std::fs::create_dir_all(state.parent().expect("state folder")).expect("state folder");
    let stack_state =
        json!({"executions": {"ex-1": execution("c-flood-17", in_an_hour())}, "revoked": {}});
    std::fs::write(&state, stack_state.to_string()).expect("write state");
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml: policy_toml(&policies, &state, data_extra),
            plugin_toml: policy_toml(&policies, &state, plugin_extra),
            ..TwoHopOptions::default()
        },
    );
    PolicyStack {
        hop,
        policies,
        state,
        dir,
    }
}

fn start(name: &str) -> PolicyStack {
    start_with(name, "", "", |_| {})
}

/// What curl saw.
#[derive(Debug, Clone)]
struct Reply {
    status: u16,
    /// The `x-nexus-decision-id` response header ("" when absent).
    decision_id: String,
    /// The body as JSON (a JSON string if it is not JSON).
    body: Value,
}

impl Reply {
    fn reasons(&self) -> Vec<String> {
        self.body["reasons"]
            .as_array()
            .map(|r| {
                r.iter()
                    .filter_map(|v| v.as_str().map(String::from))
                    .collect()
            })
            .unwrap_or_default()
    }

    fn revision(&self) -> String {
        self.body["revision"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }

    /// A 403 whose reasons include one containing `reason`.
    fn denied_because(&self, reason: &str) -> bool {
        self.status == 403 && self.reasons().iter().any(|r| r.contains(reason))
    }
}

fn curl_reply(args: &[&str]) -> Reply {
    let mut all = vec![
        "--max-time",
        "10",
        "-w",
        "\n%{http_code} %header{x-nexus-decision-id}",
    ];
    all.extend_from_slice(args);
    let out = curl(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
    let mut last = last.split(' ');
    let status = last.next().and_then(|s| s.parse().ok()).unwrap_or(0);
    let decision_id = last.next().unwrap_or_default().trim().to_string();
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    Reply {
        status,
        decision_id,
        body,
    }
}

impl PolicyStack {
    /// `METHOD path` through the plugin sidecar's outbound (both hops), with `headers`.
    fn outbound(&self, method: &str, path: &str, headers: &[&str]) -> Reply {
        let url = self.hop.outbound_url(path);
        let mut args = vec!["--path-as-is", "-X", method];
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        curl_reply(&args)
    }

    /// `METHOD path` directly on the data sidecar's inbound, as flood-model.
    fn inbound(&self, method: &str, path: &str, headers: &[&str]) -> Reply {
        let tls = self.hop.inbound_args(Some(FLOOD));
        let url = self.hop.inbound_url(path);
        let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
        args.extend(["--path-as-is", "-X", method]);
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        curl_reply(&args)
    }

    /// Both ways in: (outbound, inbound).
    fn both(&self, method: &str, path: &str) -> [(&'static str, Reply); 2] {
        [
            ("outbound", self.outbound(method, path, &[])),
            ("inbound", self.inbound(method, path, &[])),
        ]
    }

    /// Waits until `check` holds for `GET path` through both hops and on the inbound.
    fn eventually_both(&self, path: &str, what: &str, check: impl Fn(&Reply) -> bool) {
        eventually(WAIT, &format!("{what} (GET {path})"), || {
            self.both("GET", path)
                .iter()
                .all(|(_, reply)| check(reply))
                .then_some(())
        });
    }

    fn write_state(&self, state: &Value) {
        write_atomically(&self.state, state.to_string().as_bytes());
    }

    fn authz_rego(&self) -> PathBuf {
        self.policies.join("nexus/authz/authz.rego")
    }

    fn logs(&self) -> String {
        format!("{}\n{}", log_of(&self.hop.plugin), log_of(&self.hop.data))
    }
}

/// A sidecar's log without terminal colour codes.
fn log_of(sidecar: &stack::Sidecar) -> String {
    let text = sidecar.proc.log_text();
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // CSI: ESC [ parameters final-letter.
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn decisions(direction: &str, result: &str) -> String {
    format!("nexus_policy_decisions_total{{direction=\"{direction}\",result=\"{result}\"}}")
}

fn reloads(result: &str) -> String {
    format!("nexus_policy_reloads_total{{result=\"{result}\"}}")
}

fn rejected(direction: &str, reason: &str) -> String {
    format!("nexus_rejected_requests_total{{direction=\"{direction}\",reason=\"{reason}\"}}")
}

fn is_decision_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())
}

const NOT_BOUND_QUAKE: &str =
    "spiffe://nexus.local/ns/plugins/sa/flood-model is not bound to clause c-quake-3";
const NO_RULE: &str = "no rule allows this request";

// 1 ------------------------------------------------------------------------------------

#[test]
fn allowed_and_denied_requests_through_both_hops_and_on_the_inbound() {
    let st = start("policy-basic");
    let revision = st.outbound("GET", "/clauses/c-flood-18/x", &[]).revision();
    assert!(revision.starts_with("sha256:"), "revision {revision:?}");

    for (way, reply) in st.both("GET", "/clauses/c-flood-17/rainfall") {
        assert_eq!(reply.status, 200, "{way}: {reply:?}");
        assert!(is_decision_id(&reply.decision_id), "{way}: {reply:?}");
        assert_eq!(reply.body["clause"], "c-flood-17", "{way}: {reply:?}");
        assert_eq!(
            reply.body["path"], "/clauses/c-flood-17/rainfall",
            "{way}: {reply:?}"
        );
    }

    let denials = [
        (
            "GET",
            "/clauses/c-flood-18/x",
            "no open execution of clause c-flood-18 for spiffe://nexus.local/ns/plugins/sa/flood-model",
        ),
        ("GET", "/clauses/c-quake-3/x", NOT_BOUND_QUAKE),
        (
            "DELETE",
            "/clauses/c-flood-17/rainfall",
            "method DELETE is not allowed on clause data",
        ),
        ("GET", "/admin", NO_RULE),
    ];
    for (method, path, reason) in denials {
        for (way, reply) in st.both(method, path) {
            let what = format!("{way} {method} {path}: {reply:?}");
            assert_eq!(reply.status, 403, "{what}");
            assert_eq!(reply.body["allow"], false, "{what}");
            assert_eq!(reply.reasons(), [reason], "{what}");
            assert_eq!(reply.revision(), revision, "{what}");
            let id = reply.body["decision_id"].as_str().unwrap_or_default();
            assert!(is_decision_id(id), "{what}");
            assert_eq!(
                reply.decision_id, id,
                "the header names the body's decision"
            );
        }
    }

    for (way, reply) in st.both("GET", "/healthz") {
        assert_eq!(reply.status, 200, "{way}: {reply:?}");
        assert_eq!(reply.body["status"], "ok", "{way}: {reply:?}");
    }

    // Decision ids are per request.
    let a = st.outbound("GET", "/healthz", &[]).decision_id;
    let b = st.outbound("GET", "/healthz", &[]).decision_id;
    assert_ne!(a, b);

    // Outbound: allowed 4 (rainfall, healthz x3), denied 5 (the revision probe + 4).
    // Inbound: what the outbound let through plus the direct calls; the outbound's
    // denials never reach the data hop.
    let plugin = &st.hop.plugin;
    let data = &st.hop.data;
    assert_eq!(plugin.metric_sum(&decisions("outbound", "allow")), 4.0);
    assert_eq!(plugin.metric_sum(&decisions("outbound", "deny")), 5.0);
    assert_eq!(data.metric_sum(&decisions("inbound", "allow")), 6.0);
    assert_eq!(data.metric_sum(&decisions("inbound", "deny")), 4.0);
    assert_eq!(
        data.metric_sum("nexus_policy_decisions_total{direction=\"outbound\""),
        0.0
    );
    assert!(
        plugin
            .metrics()
            .contains("nexus_policy_evaluation_seconds_count{direction=\"outbound\"} 9"),
        "{}",
        plugin.metrics()
    );
}

// 2 ------------------------------------------------------------------------------------

#[test]
fn executions_in_the_state_file_open_and_close_access() {
    let st = start("policy-executions");
    let path17 = "/clauses/c-flood-17/rainfall";
    let path18 = "/clauses/c-flood-18/rainfall";
    st.eventually_both(path17, "ex-1 open", |r| r.status == 200);

    // The gateway closes ex-1.
    st.write_state(&json!({"executions": {}, "revoked": {}}));
    st.eventually_both(path17, "ex-1 closed", |r| {
        r.denied_because("no open execution of clause c-flood-17")
    });

    // ...and opens one for c-flood-18.
    st.write_state(&json!({
        "executions": {"ex-2": execution("c-flood-18", in_an_hour())},
        "revoked": {},
    }));
    st.eventually_both(path18, "ex-2 open", |r| {
        r.status == 200 && r.body["clause"] == "c-flood-18"
    });
    assert_eq!(st.outbound("GET", path17, &[]).status, 403);

    // Naming the execution: the right one, an unknown one, one for another clause.
    let named = |id: &str, path: &str| {
        let header = format!("x-nexus-execution: {id}");
        [
            st.outbound("GET", path, &[&header]),
            st.inbound("GET", path, &[&header]),
        ]
    };
    for reply in named("ex-2", path18) {
        assert_eq!(reply.status, 200, "{reply:?}");
    }
    for reply in named("ex-unknown", path18) {
        assert!(
            reply.denied_because("no open execution of clause c-flood-18"),
            "{reply:?}"
        );
    }
    for reply in named("ex-2", path17) {
        assert_eq!(reply.status, 403, "{reply:?}");
    }

    // An execution that ends 3 s from now: allowed, then denied once it has passed.
    let ends = SystemTime::now() + Duration::from_secs(3);
    st.write_state(&json!({
        "executions": {"ex-2": execution("c-flood-18", in_an_hour()), "ex-3": execution("c-flood-17", ends)},
        "revoked": {},
    }));
    let allowed_at = eventually(WAIT, "ex-3 open", || {
        (st.outbound("GET", path17, &[]).status == 200).then(SystemTime::now)
    });
    assert!(
        allowed_at < ends,
        "the short execution was never seen open; machine too slow?"
    );
    let denied = eventually(WAIT, "ex-3 expired", || {
        let reply = st.outbound("GET", path17, &[]);
        (reply.status == 403).then_some((reply, SystemTime::now()))
    });
    assert!(denied.1 >= ends, "denied before not_after: {:?}", denied.0);
    assert!(
        denied
            .0
            .denied_because("no open execution of clause c-flood-17"),
        "{:?}",
        denied.0
    );
    let reply = st.inbound("GET", path17, &[]);
    assert_eq!(reply.status, 403, "{reply:?}");
    assert_eq!(st.outbound("GET", path18, &[]).status, 200);

    // A state file that is not valid JSON is refused; the last good data keeps serving.
    let errors = st.hop.data.metric_sum(&reloads("error"));
    write_atomically(&st.state, b"{\"executions\": {\"ex-9\": ");
    st.hop
        .data
        .wait_metric(&reloads("error"), errors + 1.0, WAIT);
    assert!(
        log_of(&st.hop.data).contains("runtime-data.json"),
        "the log names the state file"
    );
    assert_eq!(st.outbound("GET", path18, &[]).status, 200);
}

// 3 ------------------------------------------------------------------------------------

#[test]
fn a_revoked_plugin_is_refused_everywhere_until_reinstated() {
    let st = start("policy-revoked");
    let path = "/clauses/c-flood-17/rainfall";
    st.eventually_both(path, "open execution", |r| r.status == 200);

    st.write_state(&json!({
        "executions": {"ex-1": execution("c-flood-17", in_an_hour())},
        "revoked": {PLUGIN_ID: {"reason": "exfiltration", "by": "test"}},
    }));
    let written = Instant::now();
    let reason = format!("workload {PLUGIN_ID} is revoked");
    st.eventually_both(path, "revocation applied", |r| {
        r.status == 403 && r.reasons() == [reason.as_str()]
    });
    // reload_interval is 100ms: applied within a few of them, not "eventually".
    let took = written.elapsed();
    assert!(took < Duration::from_secs(2), "revocation took {took:?}");
    // Public paths too.
    for (way, reply) in st.both("GET", "/healthz") {
        assert!(reply.denied_because(&reason), "{way}: {reply:?}");
    }

    // Revoking the data API's workload: the plugin's sidecar refuses to call it.
    st.write_state(&json!({
        "executions": {"ex-1": execution("c-flood-17", in_an_hour())},
        "revoked": {DATA_API_ID: {"reason": "compromised"}},
    }));
    let reason = format!("workload {DATA_API_ID} is revoked");
    eventually(WAIT, "destination revoked", || {
        st.outbound("GET", path, &[])
            .denied_because(&reason)
            .then_some(())
    });

    st.write_state(&json!({
        "executions": {"ex-1": execution("c-flood-17", in_an_hour())},
        "revoked": {},
    }));
    st.eventually_both(path, "reinstated", |r| r.status == 200);
}

#[test]
fn a_vanished_state_file_does_not_reinstate_revoked_workloads() {
    let st = start("policy-vanished-state");
    st.write_state(&json!({
        "executions": {},
        "revoked": {PLUGIN_ID: {"reason": "exfiltration"}},
    }));
    let reason = format!("workload {PLUGIN_ID} is revoked");
    st.eventually_both("/healthz", "revocation applied", |r| {
        r.denied_because(&reason)
    });
    let sidecars = [&st.hop.plugin, &st.hop.data];
    let loads = sidecars.map(|s| s.metric_sum("nexus_policy_reloads_total"));
    std::fs::remove_file(&st.state).expect("remove the state file");
    // Both watchers notice (a load is counted once its result is in use).
    for (sidecar, before) in sidecars.iter().zip(loads) {
        sidecar.wait_metric("nexus_policy_reloads_total", before + 1.0, WAIT);
    }
    for (way, reply) in st.both("GET", "/healthz") {
        assert!(reply.denied_because(&reason), "{way}: {reply:?}");
    }
}

/// A policy test that takes a few seconds (e.g. a large table of cases).
const SLOW_TEST_REGO: &str = r#"package nexus.slow_test

import rego.v1

test_many_cases if {
	count([x | some i in numbers.range(1, 500); some j in numbers.range(1, 1000); x := i * j]) > 0
}
"#;

#[test]
fn a_revocation_does_not_wait_for_the_policy_tests() {
    let st = start_with("policy-slow-tests", "", "", |p| {
        std::fs::write(p.join("nexus/authz/slow_test.rego"), SLOW_TEST_REGO).expect("slow test");
    });
    // Startup loads once, before listening.
    st.hop
        .data
        .wait_metric(&reloads("ok"), 1.0, Duration::from_secs(60));
    st.hop
        .plugin
        .wait_metric(&reloads("ok"), 1.0, Duration::from_secs(60));
    assert_eq!(st.outbound("GET", "/clauses/c-flood-17/x", &[]).status, 200);

    st.write_state(&json!({
        "executions": {"ex-1": execution("c-flood-17", in_an_hour())},
        "revoked": {PLUGIN_ID: {"reason": "exfiltration"}},
    }));
    let written = Instant::now();
    let reason = format!("workload {PLUGIN_ID} is revoked");
    eventually(Duration::from_secs(60), "revocation applied", || {
        st.inbound("GET", "/healthz", &[])
            .denied_because(&reason)
            .then_some(())
    });
    let took = written.elapsed();
    assert!(took < Duration::from_secs(1), "revocation took {took:?}");
}

#[test]
fn a_same_size_rewrite_with_the_same_mtime_is_still_loaded() {
    let st = start("policy-same-mtime");
    let path18 = "/clauses/c-flood-18/x";
    assert_eq!(st.outbound("GET", path18, &[]).status, 403);
    let before = std::fs::read_to_string(&st.state).expect("state");
    let mtime = std::fs::metadata(&st.state)
        .and_then(|m| m.modified())
        .expect("mtime");
    // The same execution moved to c-flood-18: the same number of bytes.
    let after = before.replace("c-flood-17", "c-flood-18");
    assert_eq!(after.len(), before.len());
    std::fs::write(&st.state, &after).expect("rewrite state");
    std::fs::File::options()
        .write(true)
        .open(&st.state)
        .and_then(|f| f.set_modified(mtime))
        .expect("keep the mtime");
    eventually(
        Duration::from_secs(5),
        "the rewritten state file is loaded",
        || (st.outbound("GET", path18, &[]).status == 200).then_some(()),
    );
}

// 4 ------------------------------------------------------------------------------------

/// What a target in the corpus must come to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    /// Forwarded, and the data API saw exactly this (normalized) path.
    Served(&'static str),
    /// 403 from the policy with this reason (on the normalized path).
    Denied(&'static str),
    /// 400 from normalization, with this `reason` in the body and the metric label.
    Refused(&'static str),
    /// 400 from the HTTP parser itself: never reaches normalization or policy.
    Unparsable,
}

use Expect::{Denied, Refused, Served, Unparsable};

/// A corpus row: the target (or whole request head) and what it must come to.
type Case<'a> = (&'a str, Expect);

/// What came back for one row: status, body, and the raw response for messages.
type Answer = (u16, Value, String);

/// Bypass attempts. A target starting with `/` is sent as `GET TARGET HTTP/1.1` with a
/// Host header; anything else is the whole request head, `{host}` filled in. All of
/// them go out as raw bytes, so nothing on the client side tidies them up.
const CORPUS: &[Case<'static>] = &[
    // Dot segments are resolved before the policy looks: what it checks is served.
    (
        "/clauses/c-quake-3/../c-flood-17/x",
        Served("/clauses/c-flood-17/x"),
    ),
    ("/clauses/%2e%2e/c-flood-17/x", Denied(NO_RULE)),
    (
        "/clauses/c-flood-17/%2e%2e/c-quake-3/x",
        Denied(NOT_BOUND_QUAKE),
    ),
    (
        "/clauses/c-flood-17/.%2E/c-quake-3/x",
        Denied(NOT_BOUND_QUAKE),
    ),
    (
        "/clauses/c-flood-17/../../clauses/c-quake-3/x",
        Denied(NOT_BOUND_QUAKE),
    ),
    (
        "/../../clauses/c-flood-17/x",
        Served("/clauses/c-flood-17/x"),
    ),
    ("/clauses//c-quake-3/x", Denied(NOT_BOUND_QUAKE)),
    (
        "/clauses/c%2Dflood-17/./rainfall",
        Served("/clauses/c-flood-17/rainfall"),
    ),
    ("/clauses/%63-quake-3/x", Denied(NOT_BOUND_QUAKE)),
    // Case is not folded: another path, which no rule allows.
    ("/CLAUSES/c-quake-3/x", Denied(NO_RULE)),
    ("/Clauses/c-flood-17/x", Denied(NO_RULE)),
    // Spellings servers disagree on: refused.
    (
        "/clauses/c-flood-17/..%2Fc-quake-3",
        Refused("encoded_slash"),
    ),
    ("/clauses/c-flood-17;/../c-quake-3", Refused("semicolon")),
    ("/clauses/c-flood-17%3B/x", Refused("semicolon")),
    (
        "/clauses/c-flood-17/%c0%ae%c0%ae/c-quake-3",
        Refused("invalid_utf8"),
    ),
    ("/clauses/c-flood-17/%e0%80%ae", Refused("invalid_utf8")),
    ("/clauses/c-flood-17/x%00", Refused("nul")),
    (
        "/clauses/c-flood-17/x%0d%0aX-Injected:1",
        Refused("control_character"),
    ),
    ("/clauses/c-flood-17/x%09", Refused("control_character")),
    ("/clauses/c-flood-17\\..\\c-quake-3", Refused("backslash")),
    (
        "/clauses/c-flood-17/%5c..%5cc-quake-3",
        Refused("backslash"),
    ),
    (
        "/clauses/c-flood-17/%252e%252e/c-quake-3",
        Refused("double_encoding"),
    ),
    (
        "/clauses/c-flood-17/%",
        Refused("malformed_percent_encoding"),
    ),
    ("/clauses/c-flood-17/x?c=%00", Refused("nul")),
    ("/clauses/c-flood-17/x?a=1;b=2", Refused("semicolon")),
    // The HTTP parser drops the fragment: the rest is what is checked and served.
    (
        "/clauses/c-flood-17/x#frag",
        Served("/clauses/c-flood-17/x"),
    ),
    (
        "/clauses/c-flood-17/x#/../../c-quake-3",
        Served("/clauses/c-flood-17/x"),
    ),
    // Target forms and Host.
    (
        "GET http://evil.example/clauses/c-flood-17/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Refused("host_mismatch"),
    ),
    (
        "GET http://evil.example/clauses/c-quake-3/x HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        Denied(NOT_BOUND_QUAKE),
    ),
    (
        "GET http://user@{host}/clauses/c-flood-17/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Refused("invalid_host"),
    ),
    (
        "GET /clauses/c-flood-17/x HTTP/1.1\r\nHost: {host}\r\nHost: evil.example\r\nConnection: close\r\n\r\n",
        Refused("invalid_host"),
    ),
    (
        "GET /clauses/c-flood-17/x HTTP/1.1\r\nConnection: close\r\n\r\n",
        Refused("missing_host"),
    ),
    (
        "OPTIONS * HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Refused("unsupported_target"),
    ),
    // Raw CR/LF or spaces in the request line: the parser refuses the request.
    (
        "GET /clauses/c-flood-17/x\r\nX-Injected: 1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Unparsable,
    ),
    (
        "GET /clauses/c-flood-17/x\rX-Injected:1 HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Unparsable,
    ),
    (
        "GET /clauses/c-flood-17/x /clauses/c-quake-3/x HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n",
        Unparsable,
    ),
];

/// Sends each request on its own connection (TLS with the flood-model SVID if `tls`)
/// and returns everything the server sent before it closed.
const RAW_HTTP_PY: &str = r#"
import json, socket, ssl, sys
port, tls, requests = int(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
out = []
for payload in requests:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    if tls:
        ctx = ssl.create_default_context(cafile=tls["ca"])
        ctx.load_cert_chain(tls["cert"], tls["key"])
        s = ctx.wrap_socket(s, server_hostname="localhost")
    s.sendall(bytes.fromhex(payload))
    data, end = b"", "eof"
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    except socket.timeout:
        end = "timeout"
    except (ConnectionResetError, BrokenPipeError, ssl.SSLError):
        end = "reset"
    s.close()
    out.append({"raw": data.decode("latin-1"), "end": end})
print(json.dumps(out))
"#;

/// A parsed raw HTTP/1.1 response.
#[derive(Debug)]
struct RawReply {
    status: u16,
    body: Value,
    raw: String,
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(n) = usize::from_str_radix(size.trim(), 16) else {
            break;
        };
        if n == 0 || after.len() < n {
            break;
        }
        out.push_str(&after[..n]);
        rest = after[n..].trim_start_matches("\r\n");
    }
    out
}

fn parse_raw(raw: &str) -> RawReply {
    let (head, body) = raw.split_once("\r\n\r\n").unwrap_or((raw, ""));
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    let body = if chunked {
        dechunk(body)
    } else {
        body.to_string()
    };
    RawReply {
        status,
        body: serde_json::from_str(&body).unwrap_or(Value::String(body)),
        raw: raw.to_string(),
    }
}

fn raw_requests(port: u16, tls: bool, payloads: &[String]) -> Vec<RawReply> {
    let tls = if tls {
        let p = |rel: &str| nexus_tests::cert(rel).to_string_lossy().into_owned();
        json!({"ca": p("nexus.local/ca.pem"), "cert": p(&format!("{FLOOD}.pem")), "key": p(&format!("{FLOOD}.key"))})
    } else {
        Value::Null
    };
    let hex: Vec<String> = payloads
        .iter()
        .map(|p| data_encoding::HEXLOWER.encode(p.as_bytes()))
        .collect();
    let out = run_bounded(
        120,
        "python3",
        &[
            "-c",
            RAW_HTTP_PY,
            &port.to_string(),
            &tls.to_string(),
            &json!(hex).to_string(),
        ],
    );
    let results: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "raw HTTP client gave no JSON ({e}): {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    results
        .iter()
        .map(|r| parse_raw(r["raw"].as_str().unwrap_or_default()))
        .collect()
}

fn corpus_payload(target: &str, host: &str) -> String {
    if target.starts_with('/') {
        format!("GET {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n")
    } else {
        target.replace("{host}", host)
    }
}

/// The sidecar's "policy decision" log lines that allowed the request.
fn allowed_paths(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("policy decision") && l.contains("allow=true"))
        .filter_map(|l| {
            let at = l.find(" path=")? + 6;
            l[at..].split(' ').next().map(String::from)
        })
        .collect()
}

/// Whether a response (status and JSON body) is what `expect` says.
fn judge(expect: Expect, status: u16, body: &Value) -> bool {
    match expect {
        Served(path) => status == 200 && body["path"] == path && body["clause"] == "c-flood-17",
        Denied(reason) => {
            status == 403
                && body["reasons"]
                    .as_array()
                    .is_some_and(|r| r.iter().any(|v| v == reason))
        }
        Refused(label) => status == 400 && body["reason"] == label,
        Unparsable => status == 400 && body.get("reason").is_none(),
    }
}

/// Sends `cases` with `send` (which answers (status, body, raw) per case), checks each
/// against its expectation, that every refusal was counted under its reason, and, for
/// the outbound, that only the requests it allowed reached the data sidecar.
fn check_corpus(
    st: &PolicyStack,
    direction: &str,
    pass: &str,
    cases: &[Case],
    send: impl FnOnce(&[Case]) -> Vec<Answer>,
) {
    let sidecar = if direction == "outbound" {
        &st.hop.plugin
    } else {
        &st.hop.data
    };
    let mut labels: Vec<&str> = cases
        .iter()
        .filter_map(|(_, e)| match e {
            Refused(label) => Some(*label),
            _ => None,
        })
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let rejected_before: Vec<f64> = labels
        .iter()
        .map(|l| sidecar.metric_sum(&rejected(direction, l)))
        .collect();
    let data_decisions = st.hop.data.metric_sum("nexus_policy_decisions_total");

    let replies = send(cases);
    assert_eq!(replies.len(), cases.len());
    let failures: Vec<String> = cases
        .iter()
        .zip(&replies)
        .filter(|((_, expect), (status, body, _))| !judge(*expect, *status, body))
        .map(|((target, expect), (status, _, raw))| {
            format!(
                "{pass} {target:?}: expected {expect:?}, got {status} {}",
                raw.escape_debug()
            )
        })
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n"));

    for (label, before) in labels.iter().zip(rejected_before) {
        let n = cases.iter().filter(|(_, e)| *e == Refused(label)).count();
        sidecar.wait_metric(&rejected(direction, label), before + n as f64, WAIT);
    }
    if direction == "outbound" {
        let served = cases.iter().filter(|(_, e)| matches!(e, Served(_))).count();
        assert_eq!(
            st.hop.data.metric_sum("nexus_policy_decisions_total") - data_decisions,
            served as f64,
            "{pass}: the data sidecar saw only the requests the outbound allowed"
        );
    }
}

/// Raw HTTP/1.1 on `port` (TLS as flood-model if `tls`), `Host: host`.
fn send_raw(port: u16, host: &str, tls: bool) -> impl FnOnce(&[Case]) -> Vec<Answer> {
    move |cases| {
        let payloads: Vec<String> = cases
            .iter()
            .map(|(target, _)| corpus_payload(target, host))
            .collect();
        raw_requests(port, tls, &payloads)
            .into_iter()
            .map(|r| (r.status, r.body, r.raw))
            .collect()
    }
}

/// HTTP/2 with curl `--path-as-is` (`:path` exactly as in the table), `args` before
/// the URL `base` + target.
fn send_h2(args: Vec<String>, base: String) -> impl FnOnce(&[Case]) -> Vec<Answer> {
    move |cases| {
        cases
            .iter()
            .map(|(target, _)| {
                let url = format!("{base}{target}");
                let mut all: Vec<&str> = args.iter().map(String::as_str).collect();
                all.extend(["--path-as-is", &url]);
                let reply = curl_reply(&all);
                (reply.status, reply.body.clone(), format!("{reply:?}"))
            })
            .collect()
    }
}

#[test]
fn path_bypass_corpus_never_reaches_another_clause() {
    assert!(CORPUS.len() >= 20);
    let mut st = start("policy-corpus");
    let out_port = stack::port_of(&st.hop.plugin.outbound("hazard"));
    let in_port = st.hop.data.inbound_port();

    // HTTP/1.1, raw bytes, on both listeners.
    let out_host = format!("127.0.0.1:{out_port}");
    check_corpus(
        &st,
        "outbound",
        "outbound HTTP/1.1",
        CORPUS,
        send_raw(out_port, &out_host, false),
    );
    let in_host = format!("localhost:{in_port}");
    check_corpus(
        &st,
        "inbound",
        "inbound HTTP/1.1",
        CORPUS,
        send_raw(in_port, &in_host, true),
    );

    // HTTP/2: the same paths as `:path` (curl cannot send a fragment or a raw request
    // head, so those rows are HTTP/1.1 only).
    let paths: Vec<Case> = CORPUS
        .iter()
        .copied()
        .filter(|(target, _)| target.starts_with('/') && !target.contains('#'))
        .collect();
    check_corpus(
        &st,
        "outbound",
        "outbound h2c",
        &paths,
        send_h2(
            vec!["--http2-prior-knowledge".into()],
            format!("http://{out_host}"),
        ),
    );
    let mut tls = st.hop.inbound_args(Some(FLOOD));
    tls.push("--http2".into());
    check_corpus(
        &st,
        "inbound",
        "inbound h2",
        &paths,
        send_h2(tls, format!("https://{in_host}")),
    );

    // Nothing allowed on either sidecar named another clause than c-flood-17.
    let served = CORPUS
        .iter()
        .filter(|(_, e)| matches!(e, Served(_)))
        .count();
    let allowed = allowed_paths(&st.logs());
    assert!(
        allowed.len() >= 2 * served,
        "allowed decisions are logged: {allowed:?}"
    );
    for path in &allowed {
        assert!(
            path.starts_with("/clauses/c-flood-17/") && !path.to_lowercase().contains("quake"),
            "allowed path {path:?}"
        );
    }
    assert!(st.hop.plugin.proc.is_running() && st.hop.data.proc.is_running());
    assert_eq!(st.outbound("GET", "/clauses/c-flood-17/x", &[]).status, 200);
}

// 5 ------------------------------------------------------------------------------------

/// A rule the reference policy does not have: GET /headers for any peer (one more
/// definition of its `granted` rule).
const HEADERS_GRANT: &str = "\n# Added by the hot-reload test.\ngranted := \"debug path /headers\" if {\n\tnot is_string(input.clause)\n\tinput.request.method == \"GET\"\n\tinput.request.path == \"/headers\"\n}\n";

/// `text` cut off just after the first line of its first rule body, as a write
/// interrupted mid-way leaves it.
fn cut_mid_rule(text: &str) -> &str {
    let body = text.find(" if {\n").expect("a rule with a body") + " if {\n".len();
    &text[..body + text[body..].find('\n').expect("a line in the body") + 1]
}

#[test]
fn policy_edits_reload_and_broken_or_untested_edits_are_refused() {
    let st = start("policy-reload");
    let rego = st.authz_rego();
    let original = std::fs::read_to_string(&rego).expect("authz.rego");
    assert!(
        original.contains("\ngranted := "),
        "the reference policy grants through a `granted` rule; update HEADERS_GRANT"
    );
    let first = st.outbound("GET", "/clauses/c-quake-3/x", &[]).revision();
    assert!(first.starts_with("sha256:"));
    for (way, reply) in st.both("GET", "/headers") {
        assert!(reply.denied_because(NO_RULE), "{way}: {reply:?}");
    }

    // (a) A new grant: served within a few reload intervals, under a new revision.
    let ok = st.hop.data.metric_sum(&reloads("ok"));
    write_atomically(&rego, format!("{original}{HEADERS_GRANT}").as_bytes());
    st.eventually_both("/headers", "the new grant", |r| {
        r.status == 200 && r.body["headers"].is_object()
    });
    let second = st.outbound("GET", "/clauses/c-quake-3/x", &[]).revision();
    assert!(second.starts_with("sha256:") && second != first, "{second}");
    assert_eq!(st.inbound("GET", "/admin", &[]).revision(), second);
    assert!(st.hop.data.metric_sum(&reloads("ok")) > ok);
    assert!(log_of(&st.hop.data).contains(&second));

    // (b) A write cut off mid-way: refused with file:line:col, the last good one serves.
    let errors = (
        st.hop.data.metric_sum(&reloads("error")),
        st.hop.plugin.metric_sum(&reloads("error")),
    );
    std::fs::write(&rego, cut_mid_rule(&original)).expect("truncate authz.rego");
    st.hop
        .data
        .wait_metric(&reloads("error"), errors.0 + 1.0, WAIT);
    st.hop
        .plugin
        .wait_metric(&reloads("error"), errors.1 + 1.0, WAIT);
    for log in [log_of(&st.hop.data), log_of(&st.hop.plugin)] {
        let line = log
            .lines()
            .rfind(|l| l.contains("policy refused"))
            .unwrap_or_else(|| panic!("no refusal in the log:\n{log}"));
        assert!(
            has_file_line_col(line, "nexus/authz/authz.rego"),
            "no file:line:col in {line:?}"
        );
        assert!(
            line.contains(&second),
            "names the revision still serving: {line}"
        );
    }
    for (way, reply) in st.both("GET", "/clauses/c-flood-17/x") {
        assert_eq!(reply.status, 200, "{way}: {reply:?}");
    }
    for (way, reply) in st.both("GET", "/clauses/c-quake-3/x") {
        assert!(reply.denied_because(NOT_BOUND_QUAKE), "{way}: {reply:?}");
        assert_eq!(reply.revision(), second, "{way}");
    }
    assert_eq!(
        st.hop.data.ready_status(),
        200,
        "still ready on the last good one"
    );

    // Fixed: the original revision is back (the id hashes the files). Both sidecars
    // must have reloaded it: a request the plugin's sidecar still judges on `second`
    // would be refused there, under that revision, before the data sidecar sees it.
    let ok = (
        st.hop.data.metric_sum(&reloads("ok")),
        st.hop.plugin.metric_sum(&reloads("ok")),
    );
    write_atomically(&rego, original.as_bytes());
    st.hop.data.wait_metric(&reloads("ok"), ok.0 + 1.0, WAIT);
    st.hop.plugin.wait_metric(&reloads("ok"), ok.1 + 1.0, WAIT);
    st.eventually_both("/headers", "the grant is gone", |r| {
        r.denied_because(NO_RULE) && r.revision() == first
    });

    // (c) A change that breaks a policy test (allow DELETE on clause data) is refused.
    let errors = st.hop.data.metric_sum(&reloads("error"));
    let bindings = st.policies.join("nexus/bindings.yaml");
    let text = std::fs::read_to_string(&bindings).expect("bindings.yaml");
    let loosened = text.replace("  - HEAD\n", "  - HEAD\n  - DELETE\n");
    assert_ne!(loosened, text, "bindings.yaml lists allowed_methods");
    write_atomically(&bindings, loosened.as_bytes());
    st.hop
        .data
        .wait_metric(&reloads("error"), errors + 1.0, WAIT);
    let log = log_of(&st.hop.data);
    let line = log
        .lines()
        .rfind(|l| l.contains("policy refused"))
        .expect("a refusal in the log");
    assert!(
        line.contains("test(s) failed") && line.contains("test_write_method_is_denied"),
        "{line}"
    );
    for (way, reply) in st.both("DELETE", "/clauses/c-flood-17/x") {
        assert!(
            reply.denied_because("method DELETE is not allowed on clause data"),
            "{way}: {reply:?}"
        );
        assert_eq!(reply.revision(), first, "{way}");
    }
}

/// `line` names `file:LINE:COL`.
fn has_file_line_col(line: &str, file: &str) -> bool {
    line.match_indices(file).any(|(i, _)| {
        let mut parts = line[i + file.len()..].splitn(3, ':');
        let empty = parts.next() == Some("");
        let num = |s: Option<&str>| {
            s.map(|s| {
                s.chars()
                    .take_while(char::is_ascii_digit)
                    .collect::<String>()
            })
            .is_some_and(|d| !d.is_empty())
        };
        empty && num(parts.next()) && num(parts.next())
    })
}

// 6 ------------------------------------------------------------------------------------

#[test]
fn a_broken_policy_at_start_fails_closed_until_fixed() {
    let dir = temp_dir("policy-fail-closed");
    let policies = dir.path().join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    let rego = policies.join("nexus/authz/authz.rego");
    let original = std::fs::read_to_string(&rego).expect("authz.rego");
    std::fs::write(&rego, cut_mid_rule(&original)).expect("break");
    let state = dir.path().join("runtime-data.json");
    std::fs::write(
        &state,
        json!({"executions": {"ex-1": execution("c-flood-17", in_an_hour())}, "revoked": {}})
            .to_string(),
    )
    .expect("state");

    let wapi = stack::workload_api(
        dir.path(),
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let api = stack::data_api(dir.path());
    let data = stack::sidecar(
        dir.path(),
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n{}",
            wapi.url(),
            api.http,
            policy_toml(&policies, &state, "")
        ),
        false,
    );
    let ready = || {
        let out = curl(&["-w", "\n%{http_code}", &format!("{}/ready", data.admin())]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Once it has an SVID, only the policy keeps it unready.
    let text = eventually(WAIT, "an SVID", || {
        let text = ready();
        (!text.contains("no SVID")).then_some(text)
    });
    assert!(text.ends_with("\n503"), "{text}");
    assert!(text.contains("no policy revision loaded"), "{text}");

    let port = data.inbound_port();
    let tls = stack::inbound_curl_args(port, Some(FLOOD));
    let url = format!("https://localhost:{port}/clauses/c-flood-17/rainfall");
    let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
    args.push(&url);
    let reply = curl_reply(&args);
    assert_eq!(reply.status, 503, "{reply:?}");
    assert_eq!(reply.body["allow"], false, "{reply:?}");
    assert!(
        reply.body.get("clause").is_none(),
        "not forwarded: {reply:?}"
    );
    assert!(
        reply
            .reasons()
            .iter()
            .any(|r| r.contains("no policy revision")),
        "{reply:?}"
    );
    assert_eq!(data.metric_sum(&decisions("inbound", "no_policy")), 1.0);
    let log = log_of(&data);
    assert!(
        log.lines()
            .any(|l| l.contains("policy refused") && has_file_line_col(l, "nexus/authz/authz.rego")),
        "{log}"
    );
    assert!(log.contains("none: denying every request"), "{log}");

    write_atomically(&rego, original.as_bytes());
    eventually(WAIT, "ready once the policy is fixed", || {
        (data.ready_status() == 200).then_some(())
    });
    let text = ready();
    assert!(text.contains("policy: sha256:"), "{text}");
    let reply = curl_reply(&args);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["clause"], "c-flood-17");
}

// 7 ------------------------------------------------------------------------------------

/// A decision that is quick for /healthz and very expensive for /heavy.
const HEAVY_REGO: &str = r#"package nexus.authz

import rego.v1

default decision := {"allow": false, "reasons": ["default"]}

decision := {"allow": true, "reasons": ["public"]} if input.request.path == "/healthz"

decision := {"allow": true, "reasons": [sprintf("%d products", [count(xs)])]} if {
	input.request.path == "/heavy"
	xs := [x | some i in numbers.range(1, 3000); some j in numbers.range(1, 3000); x := i * j]
}
"#;

fn heavy_policy(policies: &Path, rego: &str) {
    std::fs::remove_dir_all(policies).expect("clear the policy copy");
    std::fs::create_dir_all(policies.join("nexus")).expect("policy folder");
    std::fs::write(policies.join("nexus/heavy.rego"), rego).expect("heavy.rego");
}

#[test]
fn expensive_decisions_are_cut_off_and_denied_quickly() {
    // The data sidecar hits the 20 ms timeout; the plugin sidecar (5 s timeout) hits
    // its 10000-instruction limit first.
    let st = start_with(
        "policy-limits",
        "eval_timeout = \"20ms\"\nmax_instructions = 1000000000\n",
        "eval_timeout = \"5s\"\nmax_instructions = 10000\n",
        |p| heavy_policy(p, HEAVY_REGO),
    );
    for (way, reply) in st.both("GET", "/healthz") {
        assert_eq!(reply.status, 200, "{way}: {reply:?}");
    }

    let started = Instant::now();
    let reply = st.inbound("GET", "/heavy", &[]);
    let took = started.elapsed();
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(
        reply.reasons().iter().any(|r| r.contains("time limit")),
        "{reply:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");

    let started = Instant::now();
    let reply = st.outbound("GET", "/heavy", &[]);
    let took = started.elapsed();
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(
        reply.reasons().iter().any(|r| r.contains("instruction")),
        "{reply:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");

    assert_eq!(st.hop.data.metric_sum(&decisions("inbound", "error")), 1.0);
    assert_eq!(
        st.hop.plugin.metric_sum(&decisions("outbound", "error")),
        1.0
    );
    // Several at once, then it still serves.
    let handles: Vec<_> = (0..4)
        .map(|_| {
            let url = st.hop.outbound_url("/heavy");
            std::thread::spawn(move || curl_reply(&["--max-time", "5", &url]).status)
        })
        .collect();
    for h in handles {
        assert_eq!(h.join().expect("request thread"), 403);
    }
    for (way, reply) in st.both("GET", "/healthz") {
        assert_eq!(reply.status, 200, "{way}: {reply:?}");
    }

    // The interpreter honours the time limit too.
    let interpreted = another_plugin_sidecar(
        &st,
        "plugin-interpreted",
        "mode = \"interpreted\"\neval_timeout = \"20ms\"\n",
        "",
    );
    let base = format!("http://{}", interpreted.outbound("hazard"));
    let started = Instant::now();
    let reply = curl_reply(&[&format!("{base}/heavy")]);
    let took = started.elapsed();
    assert_eq!(reply.status, 403, "{reply:?}");
    assert!(
        reply.reasons().iter().any(|r| r.contains("time limit")),
        "{reply:?}"
    );
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert_eq!(curl_reply(&[&format!("{base}/healthz")]).status, 200);
}

/// With connection workers (the default runtime), a decision that takes long (here the
/// interpreter, running a plugin's request into `policy.eval_timeout`) is taken off the
/// worker: another request on the same, only worker is answered meanwhile, instead of
/// waiting behind it.
#[test]
fn a_slow_decision_does_not_hold_the_other_connections_of_its_worker() {
    let st = start_with("policy-offload", "", "", |p| heavy_policy(p, HEAVY_REGO));
    let one_worker = another_plugin_sidecar(
        &st,
        "plugin-one-worker",
        "mode = \"interpreted\"\neval_timeout = \"3s\"\n",
        "[limits]\nworker_threads = 1\n",
    );
    let base = format!("http://{}", one_worker.outbound("hazard"));
    assert_eq!(curl_reply(&[&format!("{base}/healthz")]).status, 200);
    let heavy_url = format!("{base}/heavy");
    let heavy_sent = Instant::now();
    let heavy = std::thread::spawn(move || {
        let reply = curl_reply(&["--max-time", "20", &heavy_url]);
        (reply, heavy_sent.elapsed())
    });
    // The heavy decision has started on the one worker's connection.
    std::thread::sleep(Duration::from_millis(300));
    // A decision the cache holds (answered on the worker) and one it does not (taken
    // off the worker like the heavy one, in another place).
    let started = Instant::now();
    let quick = curl_reply(&["--max-time", "20", &format!("{base}/healthz")]);
    let took = started.elapsed();
    let started = Instant::now();
    let missed = curl_reply(&["--max-time", "20", &format!("{base}/not-public")]);
    let missed_took = started.elapsed();
    let (heavy, heavy_took) = heavy.join().expect("heavy request");
    // The heavy decision held its thread until the time limit (3 s)...
    assert_eq!(heavy.status, 403, "{heavy:?}");
    assert!(
        heavy.reasons().iter().any(|r| r.contains("time limit")),
        "{heavy:?}"
    );
    assert!(heavy_took >= Duration::from_millis(2500), "{heavy_took:?}");
    // ...while the other request was decided and answered at once.
    assert_eq!(quick.status, 200, "{quick:?}");
    assert!(
        took < Duration::from_millis(1500),
        "the quick request waited {took:?} behind the heavy decision"
    );
    assert_eq!(missed.status, 403, "{missed:?}");
    assert_eq!(missed.reasons(), ["default"], "{missed:?}");
    assert!(
        missed_took < Duration::from_millis(1500),
        "the uncached request waited {missed_took:?} behind the heavy decision"
    );
    assert!(
        heavy_took > took + missed_took,
        "both were answered while the heavy decision ran"
    );
}

/// One more plugin sidecar beside `st`'s, on the same policy folder, with `policy` added
/// to its `[policy]` table and `more` (other tables) after it.
fn another_plugin_sidecar(
    st: &PolicyStack,
    name: &str,
    policy: &str,
    more: &str,
) -> stack::Sidecar {
    stack::sidecar(
        st.dir.path(),
        name,
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = {:?}\nexpected_id = {DATA_API_ID:?}\n{}\n{more}",
            st.hop.plugin_workload_api.url(),
            st.hop.data.inbound(),
            policy_toml(&st.policies, &st.state, policy),
        ),
        true,
    )
}

/// One builtin call that builds a 20-million-element array.
const HUGE_RANGE_REGO: &str = r#"package nexus.authz

import rego.v1

default decision := {"allow": false, "reasons": ["default"]}

decision := {"allow": true, "reasons": ["public"]} if input.request.path == "/healthz"

decision := {"allow": true, "reasons": [sprintf("%d", [count(numbers.range(1, 3000000))])]} if {
	input.request.path == "/heavy"
}
"#;

#[test]
fn a_single_huge_builtin_call_is_bounded_by_the_timeout() {
    let st = start_with(
        "policy-huge-builtin",
        "eval_timeout = \"20ms\"\n",
        "eval_timeout = \"20ms\"\n",
        |p| heavy_policy(p, HUGE_RANGE_REGO),
    );
    let started = Instant::now();
    let reply = st.inbound("GET", "/heavy", &[]);
    let took = started.elapsed();
    let (_, peak_kib) = st.hop.data.proc.rss_kib();
    eprintln!("took {took:?}, peak RSS {peak_kib} KiB: {reply:?}");
    // One builtin call cannot be interrupted mid-way (documented in policies/README.md):
    // what the sidecar guarantees is that its overrun result is never enforced.
    assert_eq!(reply.status, 403, "took {took:?}: {reply:?}");
    assert!(reply.body.to_string().contains("time limit"), "{reply:?}");
    // The sidecar keeps deciding. The overrunning call may still hold a core for a
    // while (it cannot be interrupted), and a decision that itself runs past the 20 ms
    // limit on the loaded machine is refused, as it should be: so the next allowed
    // answer is awaited, bounded (CI once saw one 403 here).
    eventually(Duration::from_secs(10), "/healthz allowed again", || {
        (st.outbound("GET", "/healthz", &[]).status == 200).then_some(())
    });
}

// 8 ------------------------------------------------------------------------------------

/// The next version of the policy: as today's, but the rainfall series is withheld.
const NEXT_REGO: &str = r#"package nexus.next

import rego.v1

import data.nexus.authz

default decision := {"allow": false, "reasons": ["next: rainfall is withheld"]}

decision := authz.decision if not "rainfall" in input.request.segments
"#;

#[test]
fn dry_run_forwards_denials_and_a_shadow_rule_is_only_counted() {
    let st = start_with(
        "policy-dry-run",
        "dry_run = true\n",
        "shadow_rule = \"data.nexus.next.decision\"\n",
        |p| {
            std::fs::create_dir_all(p.join("nexus/next")).expect("next folder");
            std::fs::write(p.join("nexus/next/next.rego"), NEXT_REGO).expect("next.rego");
        },
    );

    // Dry run on the data sidecar: a denied request is forwarded and counted.
    let reply = st.inbound("GET", "/clauses/c-quake-3/x", &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(reply.body["clause"], "c-quake-3");
    assert!(is_decision_id(&reply.decision_id), "{reply:?}");
    let data = &st.hop.data;
    assert_eq!(data.metric_sum(&decisions("inbound", "dry_run_deny")), 1.0);
    assert_eq!(data.metric_sum(&decisions("inbound", "deny")), 0.0);

    // The plugin sidecar enforces today's rule; the shadow rule only counts and logs.
    let reply = st.outbound("GET", "/clauses/c-flood-17/rainfall", &[]);
    assert_eq!(reply.status, 200, "enforced allow stands: {reply:?}");
    let reply = st.outbound("GET", "/clauses/c-flood-17/x", &[]);
    assert_eq!(reply.status, 200, "{reply:?}");
    let reply = st.outbound("GET", "/clauses/c-quake-3/x", &[]);
    assert!(reply.denied_because(NOT_BOUND_QUAKE), "{reply:?}");
    let plugin = &st.hop.plugin;
    assert_eq!(plugin.metric_sum(&decisions("outbound", "allow")), 2.0);
    assert_eq!(plugin.metric_sum(&decisions("outbound", "deny")), 1.0);
    assert_eq!(
        plugin.metric_sum(&decisions("outbound", "shadow_deny")),
        2.0
    );
    assert_eq!(
        plugin.metric_sum(&decisions("outbound", "shadow_allow")),
        1.0
    );
    let log = log_of(plugin);
    let disagreements: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("shadow policy disagrees"))
        .collect();
    assert_eq!(disagreements.len(), 1, "{log}");
    assert!(
        disagreements[0].contains("next: rainfall is withheld")
            && disagreements[0].contains("data.nexus.next.decision"),
        "{}",
        disagreements[0]
    );
    // What passed the plugin sidecar was allowed at the data sidecar too.
    assert_eq!(data.metric_sum(&decisions("inbound", "allow")), 2.0);
}

// 9 ------------------------------------------------------------------------------------

#[test]
fn policy_config_errors_exit_64_and_name_the_field() {
    let dir = temp_dir("policy-config");
    let policies = dir.path().join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    let cases = [
        (
            format!("dir = {:?}\n", dir.path().join("missing").to_string_lossy()),
            "policy.dir",
        ),
        (
            format!(
                "dir = {:?}\n",
                policies.join("nexus/bindings.yaml").to_string_lossy()
            ),
            "policy.dir",
        ),
        (
            format!(
                "dir = {:?}\ndecision_rule = \"nexus.authz.decision\"\n",
                policies.to_string_lossy()
            ),
            "policy.decision_rule",
        ),
        (
            format!(
                "dir = {:?}\nshadow_rule = \"next\"\n",
                policies.to_string_lossy()
            ),
            "policy.shadow_rule",
        ),
        (
            format!(
                "dir = {:?}\neval_timeout = \"0s\"\n",
                policies.to_string_lossy()
            ),
            "policy.eval_timeout",
        ),
        (
            format!("dir = {:?}\ndry_rnu = true\n", policies.to_string_lossy()),
            "dry_rnu",
        ),
        ("state_file = \"x.json\"\n".to_string(), "`dir`"),
    ];
    for (i, (policy, needle)) in cases.iter().enumerate() {
        let config = dir.path().join(format!("case-{i}.toml"));
        std::fs::write(
            &config,
            format!(
                "[identity]\nworkload_api_socket = \"unix:///nonexistent.sock\"\n\n[policy]\n{policy}"
            ),
        )
        .expect("config");
        let out = Command::new("timeout")
            .args(["--kill-after=5", "20"])
            .arg(bin("nexus-sidecar"))
            .arg("--config")
            .arg(&config)
            .env_remove("SPIFFE_ENDPOINT_SOCKET")
            .output()
            .expect("nexus-sidecar");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "[policy] {policy}: {stderr}");
        assert!(stderr.contains(needle), "[policy] {policy}: {stderr}");
    }
}
