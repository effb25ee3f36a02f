//! The anomaly watch end to end: the demo plugin turns hostile (a 10x flood, then reads
//! of a clause it is not bound to); the sidecars' detectors raise signals, the gateway's
//! Rego revocation policy revokes it, and the data API's sidecar refuses it. The
//! onset-to-enforcement time is printed. Forged and self-serving signals cannot revoke
//! beyond what the policy allows.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nexus_tests::stack::{
    GATEWAY_ID, Gateway, PLUGIN_ID, TwoHop, TwoHopOptions, WorkloadApi, gateway, gateway_toml,
    two_hop, workload_api,
};
use nexus_tests::{eventually, free_port, repo_root, temp_dir};

/// Detector settings for a test that cannot wait for the default 10 s warm-up.
const ANOMALY: &str =
    "[anomaly]\ncooldown = \"2s\"\n[anomaly.baseline]\ntick = \"250ms\"\nwarmup_ticks = 8\n";

fn stack(dir: &Path) -> (Gateway, TwoHop, WorkloadApi) {
    stack_with(dir, "")
}

/// The stack, with `plugin_gateway` added to the plugin sidecar's `[gateway]` table.
fn stack_with(dir: &Path, plugin_gateway: &str) -> (Gateway, TwoHop, WorkloadApi) {
    let gw_api = workload_api(dir, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(
        dir,
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", free_port())),
        &format!(
            "\n[revocation_policy]\ndir = {:?}\n",
            repo_root().join("policies/revocation").to_string_lossy()
        ),
    );
    let policy = format!(
        "[policy]\ndir = {:?}\nreload_interval = \"100ms\"\n",
        repo_root().join("policies").to_string_lossy()
    );
    let options = TwoHopOptions {
        data_toml: format!(
            "{policy}\n{}\n{ANOMALY}",
            gateway_toml(&gw, dir, "data", "")
        ),
        plugin_toml: format!(
            "{policy}\n{}\n{ANOMALY}",
            gateway_toml(&gw, dir, "plugin", plugin_gateway)
        ),
        ..TwoHopOptions::default()
    };
    let hop = two_hop(dir, &options);
    gw.wait_in_sync(2);
    (gw, hop, gw_api)
}

fn load(url: &str, rate: u32, seconds: f64, stop_on: Option<u16>) -> serde_json::Value {
    let mut cmd = Command::new("python3");
    cmd.arg(repo_root().join("tests/py/load.py")).args([
        url,
        &rate.to_string(),
        &seconds.to_string(),
    ]);
    if let Some(code) = stop_on {
        cmd.args(["--stop-on", &code.to_string()]);
    }
    let out = cmd.output().expect("python3 load.py");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("load.py JSON")
}

fn signals(gw: &Gateway) -> Vec<serde_json::Value> {
    let out = gw.nexusctl(&[
        "signals",
        "--workload",
        PLUGIN_ID,
        "--since",
        "10m",
        "-o",
        "json",
    ]);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

#[test]
fn a_flooding_plugin_is_revoked_automatically_and_refused_everywhere() {
    let dir = temp_dir("anomaly-flood");
    let (gw, hop, _api) = stack(dir.path());
    gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let url = hop.outbound_url("/clauses/c-flood-17/rainfall");
    // Well-behaved: 20 requests/s, long enough to warm the baselines; no revocation.
    let calm = load(&url, 20, 3.5, None);
    assert_eq!(
        calm["statuses"]["200"].as_u64(),
        calm["sent"].as_u64(),
        "{calm}"
    );
    assert!(gw.status()["revoked"].as_array().unwrap().is_empty());

    // Hostile: 10x the rate. Onset is the first request of the flood.
    let flood = load(&url, 200, 8.0, Some(403));
    // Refused: a 403, or the connection closed as the revocation lands (0).
    let onset_to_refused = ["403", "0"]
        .iter()
        .filter_map(|c| flood["first"][c].as_f64())
        .fold(f64::NAN, f64::min);
    eprintln!("flood: onset -> refused after {onset_to_refused:.3} s ({flood})");
    assert!(
        onset_to_refused.is_finite(),
        "the flood was never refused: {flood}"
    );
    assert!(
        onset_to_refused < 3.0,
        "onset -> enforcement took {onset_to_refused} s"
    );

    let status = gw.status();
    let revoked = &status["revoked"][0];
    assert_eq!(revoked["subject"], PLUGIN_ID, "{status}");
    assert!(
        revoked["by"].as_str().unwrap().starts_with("policy:sig-"),
        "{revoked}"
    );
    let list = signals(&gw);
    let spike = list
        .iter()
        .find(|s| s["kind"] == "rate_spike" && s["action"] == "revoke")
        .unwrap_or_else(|| panic!("no revoking rate_spike signal: {list:?}"));
    // A spike score of at least the detector's factor (4), revoked on its own (>= 8) or
    // corroborated by the second sidecar's report.
    assert!(spike["score"].as_f64().unwrap() >= 4.0, "{spike}");
    // Refused by the data API's sidecar too (its revoked set, not only the plugin's own).
    let mut args = hop.inbound_args(Some("nexus.local/flood-model"));
    args.extend([
        "-s".into(),
        "-o".into(),
        "/dev/null".into(),
        "-w".into(),
        "%{http_code}".into(),
        hop.inbound_url("/clauses/c-flood-17/rainfall"),
    ]);
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    assert_eq!(
        String::from_utf8_lossy(&nexus_tests::curl(&refs).stdout),
        "000"
    );
}

#[test]
fn reads_of_an_unbound_clause_revoke_and_the_reporter_is_recorded() {
    let dir = temp_dir("anomaly-unbound");
    let (gw, hop, _api) = stack(dir.path());
    // c-quake-3 is not bound to the plugin: every read is denied, and counted.
    let url = hop.outbound_url("/clauses/c-quake-3/magnitude");
    let out = load(&url, 10, 1.0, None);
    assert!(out["statuses"]["403"].as_u64().unwrap_or(0) >= 5, "{out}");
    let list = eventually(
        Duration::from_secs(10),
        "an unbound_clause signal with a revoke",
        || {
            let list = signals(&gw);
            list.iter()
                .any(|s| s["kind"] == "unbound_clause" && s["action"] == "revoke")
                .then_some(list)
        },
    );
    let unbound: Vec<_> = list
        .iter()
        .filter(|s| s["kind"] == "unbound_clause")
        .collect();
    // The plugin's own sidecar reported it (the plugin's requests pass through it).
    assert!(
        unbound.iter().any(|s| s["reporter"] == PLUGIN_ID),
        "{unbound:?}"
    );
    eventually(Duration::from_secs(5), "the plugin revoked", || {
        (gw.status()["revoked"][0]["subject"] == PLUGIN_ID).then_some(())
    });
    gw.wait_in_sync(2);
}

#[test]
fn forged_signals_about_another_workload_do_not_revoke_it() {
    let dir = temp_dir("anomaly-forged");
    let (gw, _hop, _api) = stack(dir.path());
    // The plugin's SVID (a compromised plugin) sends signals over its own control
    // stream: a sandbox "kill" about the data API, claimed as self-observed, and a
    // burst of them. The policy sees the reporter and ignores them.
    let forged: Vec<String> = (0..20)
        .map(|i| {
            format!(
                "{{\"signals\":{{\"batch\":{i},\"signals\":[{{\"kind\":\"sandbox_violation\",\"workload\":\"{}\",\"observed_as\":\"self\",\"score\":100,\"evidenceJson\":\"{{\\\"action\\\":\\\"kill\\\"}}\",\"timeUnixMs\":1}}]}}}}",
                nexus_tests::stack::DATA_API_ID
            )
        })
        .collect();
    let data = format!(
        "{{\"hello\":{{\"spiffe_id\":\"{PLUGIN_ID}\"}}}} {}",
        forged.join(" ")
    );
    let _ = gw.grpcurl_stream("nexus.local/flood-model", &data);
    let out = gw.nexusctl(&[
        "signals",
        "--workload",
        nexus_tests::stack::DATA_API_ID,
        "-o",
        "json",
    ]);
    let list: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
    assert!(
        list.len() >= 10,
        "signals stored with their reporter: {out}"
    );
    assert!(
        list.iter()
            .all(|s| s["reporter"] == PLUGIN_ID && s["action"] == "ignore"),
        "{out}"
    );
    assert!(gw.status()["revoked"].as_array().unwrap().is_empty());
}

#[test]
fn signals_raised_while_the_gateway_is_away_wait_for_it_and_overflow_is_counted() {
    let dir = temp_dir("anomaly-buffer");
    // The plugin's sidecar keeps at most 2 signals while the gateway is away.
    let (mut gw, hop, _api) = stack_with(dir.path(), "signal_buffer = 2");
    gw.kill9();
    // Reads of an unbound clause for 6 s: denied by the plugin's own sidecar (its kept
    // snapshot), each cooldown (2 s) bringing new unbound_clause and denial signals.
    let out = load(
        &hop.outbound_url("/clauses/c-quake-3/magnitude"),
        10,
        6.0,
        None,
    );
    assert!(out["statuses"]["403"].as_u64().unwrap_or(0) >= 30, "{out}");
    let dropped = eventually(Duration::from_secs(5), "signals dropped", || {
        let n = hop.plugin.metric_sum("nexus_signals_dropped_total");
        (n >= 1.0).then_some(n)
    });
    let outage_ended = nexus_tests::stack::rfc3339_now();
    gw.restart();
    // The two kept signals arrive once the stream is back, observed during the outage,
    // and the gateway learns how many the sidecar dropped.
    let kept = eventually(Duration::from_secs(15), "the kept signals", || {
        let kept: Vec<_> = signals(&gw)
            .into_iter()
            .filter(|s| s["reporter"] == PLUGIN_ID)
            .collect();
        (kept.len() >= 2).then_some(kept)
    });
    assert_eq!(kept.len(), 2, "at most signal_buffer were kept: {kept:?}");
    for s in &kept {
        let observed = s["observed"].as_str().unwrap();
        assert!(observed < outage_ended.as_str(), "{s} vs {outage_ended}");
        assert!(
            s["received"].as_str().unwrap() > outage_ended.as_str(),
            "{s}"
        );
    }
    let reported = eventually(
        Duration::from_secs(5),
        "the drop count at the gateway",
        || {
            let n = gw.metric_sum("nexus_gateway_signals_dropped_by_sidecars_total");
            (n >= dropped).then_some(n)
        },
    );
    eprintln!(
        "while the gateway was away: 2 signals kept, {dropped} dropped (gateway told: {reported})"
    );
}
