//! Attacks on the decision cache (docs/policy-cache.md), end to end: the real data
//! sidecar evaluating the reference policy with its cache on, its execution records in
//! a file, driven with curl as the certs-dev identities.
//!
//! - a request crafted to reuse a cached allow made for another identity, clause,
//!   execution, method or path is decided on its own;
//! - a revocation, an execution's close and an execution's `not_after` passing take
//!   effect although an allow for the same request is cached;
//! - requests that miss the cache every time (unique paths) do not grow it past its
//!   bounds, nor push out a decision that is asked for again;
//! - a revision the cache cannot key is served uncached, and the log says why;
//! - a decision served from the cache is still recorded, with its own decision id and
//!   `"cached": true`.
//!
//! Needs `cargo build --workspace --bins` first (`scripts/test.sh` does it).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use nexus_tests::copy_dir;
use nexus_tests::stack::{PLUGIN_ID, TwoHop, TwoHopOptions, two_hop};
use nexus_tests::{curl, eventually, repo_root, rfc3339, temp_dir};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(20);
const FLOOD: &str = "nexus.local/flood-model";
const INTRUDER: &str = "nexus.local/intruder";
const INTRUDER_ID: &str = "spiffe://nexus.local/ns/other/sa/intruder";
const PATH17: &str = "/clauses/c-flood-17/rainfall";

struct Stack {
    hop: TwoHop,
    state: PathBuf,
    records: PathBuf,
    policies: PathBuf,
    _dir: tempfile::TempDir,
}

fn execution(plugin: &str, clause: &str, not_after: SystemTime) -> Value {
    json!({"plugin": plugin, "clause": clause, "not_after": rfc3339(not_after)})
}

fn in_an_hour() -> SystemTime {
    SystemTime::now() + Duration::from_secs(3600)
}

fn write_atomically(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).expect("write temp file");
    std::fs::rename(&tmp, path).expect("rename into place");
}

/// The data sidecar with the reference policy (`policies/nexus`, what a sidecar
/// loads), a state file with ex-1 (flood-model, c-flood-17) open, records on, and
/// `extra` `[policy]` lines; the intruder identity may connect (so its requests reach
/// the policy).
fn start(name: &str, extra: &str, edit: impl FnOnce(&Path)) -> Stack {
    let dir = temp_dir(name);
    let policies = dir.path().join("policies");
    copy_dir(&repo_root().join("policies/nexus"), &policies.join("nexus"));
    edit(&policies);
    let state = dir.path().join("runtime-data.json");
    std::fs::write(
        &state,
        json!({"executions": {"ex-1": execution(PLUGIN_ID, "c-flood-17", in_an_hour())}, "revoked": {}})
            .to_string(),
    )
    .expect("write state");
    let records = dir.path().join("records.jsonl");
    let data_toml = format!(
        "[policy]\ndir = {:?}\nstate_file = {:?}\nreload_interval = \"100ms\"\n{extra}\n\n[audit]\nsink = {{ file = {{ path = {:?} }} }}\n",
        policies.to_string_lossy(),
        state.to_string_lossy(),
        records.to_string_lossy(),
    );
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml,
            allowed_ids: vec![
                "spiffe://nexus.local/ns/plugins/*".into(),
                INTRUDER_ID.into(),
            ],
            ..TwoHopOptions::default()
        },
    );
    Stack {
        hop,
        state,
        records,
        policies,
        _dir: dir,
    }
}

#[derive(Debug)]
struct Reply {
    status: u16,
    decision_id: String,
    body: String,
}

impl Stack {
    /// `METHOD path` on the data sidecar's inbound as `identity`, with `headers`.
    fn call(&self, identity: &str, method: &str, path: &str, headers: &[&str]) -> Reply {
        let tls = self.hop.inbound_args(Some(identity));
        let url = self.hop.inbound_url(path);
        let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
        args.extend([
            "--path-as-is",
            "-X",
            method,
            "-w",
            "\n%{http_code} %header{x-nexus-decision-id}",
        ]);
        for h in headers {
            args.extend(["-H", h]);
        }
        args.push(&url);
        let out = curl(&args);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, last) = text.rsplit_once('\n').unwrap_or(("", &text));
        let mut last = last.split(' ');
        Reply {
            status: last.next().and_then(|s| s.parse().ok()).unwrap_or(0),
            decision_id: last.next().unwrap_or_default().trim().to_string(),
            body: body.to_string(),
        }
    }

    fn get(&self, identity: &str, path: &str) -> Reply {
        self.call(identity, "GET", path, &[])
    }

    fn metric(&self, name: &str) -> f64 {
        self.hop.data.metric_sum(name)
    }

    fn write_state(&self, state: &Value) {
        write_atomically(&self.state, state.to_string().as_bytes());
    }

    /// Sends `GET PATH17` as flood-model until the cache has answered it at least
    /// `n` more times: the allow is cached.
    fn warm(&self, n: f64) {
        let hits = self.metric("nexus_policy_cache_hits_total");
        eventually(WAIT, "a cached allow", || {
            let reply = self.get(FLOOD, PATH17);
            assert_eq!(reply.status, 200, "{reply:?}");
            (self.metric("nexus_policy_cache_hits_total") >= hits + n).then_some(())
        });
    }

    fn records(&self) -> Vec<Value> {
        std::fs::read_to_string(&self.records)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }
}

#[test]
fn a_cached_allow_is_never_served_to_another_identity_clause_execution_method_or_path() {
    let st = start("cache-keys", "", |_| {});
    eventually(WAIT, "ex-1 open", || {
        (st.get(FLOOD, PATH17).status == 200).then_some(())
    });
    st.warm(3.0);
    assert_eq!(
        st.metric("nexus_policy_cache_enabled{rule=\"data.nexus.authz.decision\""),
        1.0,
        "{}",
        st.hop.data.metrics()
    );
    // The reference policy is served by nexus's own evaluator (checked against the
    // interpreter before it served), and it answered the misses.
    assert_eq!(
        st.metric("nexus_policy_mode{rule=\"data.nexus.authz.decision\",mode=\"native\"}"),
        1.0,
        "{}",
        st.hop.data.metrics()
    );
    assert!(st.metric("nexus_policy_native_decisions_total") >= 1.0);

    // Each variation differs from the cached request in one thing the policy reads.
    let ex1 = "x-nexus-execution: ex-1";
    let cases: Vec<(&str, Reply, &str)> = vec![
        (
            "another identity naming flood-model's execution",
            st.call(INTRUDER, "GET", PATH17, &[ex1]),
            "is not bound to clause c-flood-17",
        ),
        (
            "another clause",
            st.get(FLOOD, "/clauses/c-flood-18/rainfall"),
            "no open execution of clause c-flood-18",
        ),
        (
            "another (unknown) execution",
            st.call(FLOOD, "GET", PATH17, &["x-nexus-execution: ex-forged"]),
            "no open execution of clause c-flood-17",
        ),
        (
            "another method",
            st.call(FLOOD, "DELETE", PATH17, &[]),
            "method DELETE is not allowed",
        ),
        (
            "a path that normalizes to another clause",
            st.get(FLOOD, "/clauses/c-flood-17/../c-quake-3/rainfall"),
            "is not bound to clause c-quake-3",
        ),
    ];
    for (what, reply, reason) in &cases {
        assert_eq!(reply.status, 403, "{what}: {reply:?}");
        assert!(reply.body.contains(reason), "{what}: {reply:?}");
    }
    // ... and asked twice, the denial is the same (a cached deny is still a deny).
    let again = st.call(INTRUDER, "GET", PATH17, &[ex1]);
    assert_eq!(again.status, 403, "{again:?}");

    // Every request has its own record and decision id; the ones the cache answered say
    // so, and each id matches the response header.
    let last = st.get(FLOOD, PATH17);
    assert_eq!(last.status, 200);
    let records = eventually(WAIT, "the records", || {
        let r = st.records();
        r.iter()
            .any(|r| r["decision_id"] == last.decision_id.as_str())
            .then_some(r)
    });
    let mine = records
        .iter()
        .find(|r| r["decision_id"] == last.decision_id.as_str())
        .expect("record of the last request");
    assert_eq!(mine["cached"], true, "{mine}");
    assert_eq!(mine["decision"], "allow");
    let cached: Vec<&Value> = records.iter().filter(|r| r["cached"] == true).collect();
    assert!(cached.len() >= 3, "{records:?}");
    let mut ids: Vec<&str> = records
        .iter()
        .filter_map(|r| r["decision_id"].as_str())
        .collect();
    let n = ids.len();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), n, "decision ids are unique per request");
    // The records still chain.
    let verify = std::process::Command::new(nexus_tests::bin("nexusctl"))
        .args(["audit", "verify"])
        .arg(&st.records)
        .output()
        .expect("nexusctl audit verify");
    assert!(
        verify.status.success(),
        "{}",
        String::from_utf8_lossy(&verify.stderr)
    );
}

#[test]
fn revocation_close_and_expiry_take_effect_despite_a_cached_allow() {
    let st = start("cache-invalidation", "", |_| {});
    eventually(WAIT, "ex-1 open", || {
        (st.get(FLOOD, PATH17).status == 200).then_some(())
    });

    // Revoked while its allow is cached.
    st.warm(3.0);
    st.write_state(&json!({
        "executions": {"ex-1": execution(PLUGIN_ID, "c-flood-17", in_an_hour())},
        "revoked": {PLUGIN_ID: {"reason": "test", "by": "test", "at": "2026-01-01T00:00:00Z"}},
    }));
    eventually(WAIT, "the revocation applies", || {
        let r = st.get(FLOOD, PATH17);
        (r.status == 403 && r.body.contains("is revoked")).then_some(())
    });
    // ... and stays applied (no cached allow comes back).
    for _ in 0..5 {
        assert_eq!(st.get(FLOOD, PATH17).status, 403);
    }

    // Reinstated, cached again, then the execution is closed.
    st.write_state(&json!({
        "executions": {"ex-1": execution(PLUGIN_ID, "c-flood-17", in_an_hour())},
        "revoked": {},
    }));
    eventually(WAIT, "reinstated", || {
        (st.get(FLOOD, PATH17).status == 200).then_some(())
    });
    st.warm(3.0);
    st.write_state(&json!({"executions": {}, "revoked": {}}));
    eventually(WAIT, "the close applies", || {
        let r = st.get(FLOOD, PATH17);
        (r.status == 403 && r.body.contains("no open execution")).then_some(())
    });
    for _ in 0..5 {
        assert_eq!(st.get(FLOOD, PATH17).status, 403);
    }

    // An execution whose not_after passes while its allow is cached, with no data
    // change at all: denied from not_after on.
    let ends = SystemTime::now() + Duration::from_secs(6);
    st.write_state(&json!({
        "executions": {"ex-short": execution(PLUGIN_ID, "c-flood-17", ends)},
        "revoked": {},
    }));
    eventually(WAIT, "ex-short open", || {
        (st.get(FLOOD, PATH17).status == 200).then_some(())
    });
    let hits = st.metric("nexus_policy_cache_hits_total");
    let mut served_cached = false;
    let denied = eventually(WAIT, "ex-short expired", || {
        let r = st.get(FLOOD, PATH17);
        let now = SystemTime::now();
        if r.status == 200 {
            served_cached |= st.metric("nexus_policy_cache_hits_total") > hits;
            None
        } else {
            Some((r, now))
        }
    });
    assert!(
        served_cached,
        "the allow was never served from the cache before not_after; machine too slow?"
    );
    assert!(denied.1 >= ends, "denied before not_after: {:?}", denied.0);
    assert!(
        denied.0.body.contains("no open execution"),
        "{:?}",
        denied.0
    );
    for _ in 0..3 {
        assert_eq!(st.get(FLOOD, PATH17).status, 403);
    }
}

/// A plugin floods the data sidecar with requests crafted to miss the cache (a unique
/// path each) while the same plugin's ordinary request keeps being asked for. The cache
/// stays within its bounds, keeps no flood decision once full (each is refused, not
/// put in place of another), and the ordinary request is answered from the cache after
/// every batch: before admission by frequency (stop 36) the flood pushed it out (40
/// entries, oldest first out).
#[test]
fn cache_busting_requests_stay_within_the_bounds_and_push_nothing_out() {
    let st = start(
        "cache-busting",
        "cache_max_entries = 40\ncache_max_bytes = 32768",
        |_| {},
    );
    eventually(WAIT, "ex-1 open", || {
        (st.get(FLOOD, PATH17).status == 200).then_some(())
    });
    st.warm(3.0);
    // 400 unique paths (each a new key), in batches on one connection per curl.
    let tls = st.hop.inbound_args(Some(FLOOD));
    for batch in 0..8 {
        let urls: Vec<String> = (0..50)
            .map(|i| {
                st.hop.inbound_url(&format!(
                    "/clauses/c-flood-17/bust-{batch}-{i}-{}",
                    "x".repeat(200)
                ))
            })
            .collect();
        let mut args: Vec<&str> = tls.iter().map(String::as_str).collect();
        args.extend(["-o", "/dev/null"]);
        args.extend(urls.iter().map(String::as_str));
        curl(&args);
        let entries = st.metric("nexus_policy_cache_entries");
        let bytes = st.metric("nexus_policy_cache_bytes");
        assert!(entries <= 40.0, "{entries} entries");
        assert!(bytes <= 32768.0, "{bytes} bytes");
        let reply = st.get(FLOOD, PATH17);
        assert_eq!(reply.status, 200, "{reply:?}");
        let record = eventually(WAIT, "the ordinary request's record", || {
            st.records()
                .into_iter()
                .find(|r| r["decision_id"] == reply.decision_id.as_str())
        });
        assert_eq!(
            record["cached"],
            json!(true),
            "after flood batch {batch}, the ordinary request was evaluated again: {record}"
        );
    }
    let misses = st.metric("nexus_policy_cache_misses_total");
    assert!(misses >= 400.0, "{misses} misses");
    let refused = st.metric("nexus_policy_cache_refused_total");
    let evictions = st.metric("nexus_policy_cache_evictions_total");
    assert!(
        refused >= 300.0 && evictions < 40.0,
        "refused {refused}, evicted {evictions}"
    );
}

#[test]
fn a_policy_the_cache_cannot_key_runs_uncached_and_says_why() {
    let st = start("cache-unkeyable", "", |policies| {
        let rego = policies.join("nexus/authz/authz.rego");
        let text = std::fs::read_to_string(&rego).expect("authz.rego");
        // Reading the input whole makes every field part of what a decision depends on.
        std::fs::write(&rego, format!("{text}\nseen := input\n")).expect("edit");
    });
    for _ in 0..3 {
        assert_eq!(st.get(FLOOD, PATH17).status, 200);
    }
    assert_eq!(st.metric("nexus_policy_cache_hits_total"), 0.0);
    assert!(st.metric("nexus_policy_cache_bypassed_total") >= 3.0);
    assert_eq!(
        st.metric("nexus_policy_cache_enabled{rule=\"data.nexus.authz.decision\""),
        0.0
    );
    let log = st.hop.data.proc.log_text();
    assert!(
        log.contains("not cached") && log.contains("reads `input` whole"),
        "{log}"
    );
    let _ = &st.policies;
}

/// A request made to have the native evaluator make a value per part of it (here a
/// string per path segment, which it keeps until it decides) past
/// `policy.max_made_values`: the evaluation is handed to the RVM (counted), which gives
/// the policy's answer, allow or deny; a request under the bound is decided natively.
#[test]
fn a_request_that_would_make_too_many_values_is_decided_by_the_rvm() {
    let st = start("made-values", "max_made_values = 16", |policies| {
        let authz = policies.join("nexus/authz");
        std::fs::remove_file(authz.join("authz_test.rego")).expect("remove tests");
        std::fs::write(
            authz.join("authz.rego"),
            r#"package nexus.authz

import rego.v1

marked := [concat("", ["/", s]) | some s in split(input.request.path, "/")]

decision := {"allow": count(marked) < 40, "reasons": [concat(" ", ["segments:", format_int(count(marked), 10)])]}
"#,
        )
        .expect("write policy");
    });
    let mode = "nexus_policy_mode{rule=\"data.nexus.authz.decision\",mode=\"native\"}";
    assert_eq!(st.metric(mode), 1.0, "{}", st.hop.data.metrics());
    let path = |segments: usize| {
        let mut p = PATH17.to_string();
        for i in 0..segments {
            p.push_str(&format!("/s{i}"));
        }
        p
    };
    let fallbacks = || st.metric("nexus_policy_native_fallbacks_total");
    let natives = st.metric("nexus_policy_native_decisions_total");
    // 4 segments: 4 strings, the list, the reason: within 16, decided natively.
    assert_eq!(st.get(FLOOD, &path(0)).status, 200);
    assert_eq!(fallbacks(), 0.0);
    assert!(st.metric("nexus_policy_native_decisions_total") > natives);
    // 30 segments: past 16 values, the RVM decides (allow: fewer than 40)...
    assert_eq!(st.get(FLOOD, &path(26)).status, 200);
    assert_eq!(fallbacks(), 1.0);
    // ... and 50 segments the RVM denies, as the policy says.
    let denied = st.get(FLOOD, &path(46));
    assert_eq!(denied.status, 403, "{denied:?}");
    assert!(denied.body.contains("segments: 50"), "{denied:?}");
    assert_eq!(fallbacks(), 2.0);
    // The sidecar goes on deciding natively below the bound.
    assert_eq!(st.get(FLOOD, &format!("{}/x", path(1))).status, 200);
    assert_eq!(fallbacks(), 2.0);
}
