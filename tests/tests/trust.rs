//! "Nobody can turn the guards" (docs/threat-model.md): attacks on the control plane
//! around the request path, each against the real binaries, each failing on the code
//! before issue 13 and refused now.
//!
//! 1. Forged and peer-reported signals: an unlisted SVID gets no control stream; a listed
//!    one reporting another workload gets at most an alert, verified or not; signals per
//!    reporter are rate-limited; a corroborated report does revoke.
//! 2. The sidecar's write endpoint: reports are refused on the network listener and on
//!    the in-pod socket without the per-pod token or from an unlisted uid; the launcher's
//!    report over the socket goes through.
//! 3. Enforcement state: a sidecar whose kept snapshot is damaged refuses everything until
//!    the gateway answers; it never starts empty.
//! 4. A revision is acknowledged only once applied; a failure is reported and retried.
//! 5. Runaway policies: a load that does not finish is refused with file, rule and limit,
//!    later edits load, and SIGTERM stops the sidecar whatever the policy does.
//! 6. Smaller ones: scoped streams, SPIFFE ID normalization, revocation TTL cap, terminal
//!    escaping, a closed pipe, the gateway's revocation policy hot reload, a full disk.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use nexus_tests::copy_dir;
use nexus_tests::stack::{
    DATA_API_ID, GATEWAY_ID, Gateway, PLUGIN_ID, Sidecar, TwoHop, TwoHopOptions, WorkloadApi,
    gateway, gateway_toml, sidecar, two_hop, workload_api,
};
use nexus_tests::{bin, cert, curl, eventually, free_port, repo_root, temp_dir};

const INTRUDER_ID: &str = "spiffe://nexus.local/ns/other/sa/intruder";
const WAIT: Duration = Duration::from_secs(20);

fn now_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(0)
}

/// A control-stream message carrying one signal, in grpcurl's JSON.
fn signal_msg(
    batch: u64,
    kind: &str,
    workload: &str,
    observed_as: &str,
    score: f64,
    decision_ids: &[String],
) -> String {
    serde_json::json!({"signals": {"batch": batch, "signals": [{
        "kind": kind, "workload": workload, "observed_as": observed_as, "score": score,
        "evidenceJson": "{\"count\": 40}", "timeUnixMs": now_ms(), "decisionIds": decision_ids,
    }]}})
    .to_string()
}

fn hello(id: &str) -> String {
    serde_json::json!({"hello": {"spiffe_id": id}}).to_string()
}

/// The policy table of a sidecar: the reference policies.
fn policy_toml() -> String {
    format!(
        "[policy]\ndir = {:?}\nreload_interval = \"100ms\"\n",
        repo_root().join("policies").to_string_lossy()
    )
}

/// Gateway (reference revocation policy from `revocation_dir`) and the two-hop stack,
/// both sidecars on the reference policy, writing and shipping execution records, their
/// anomaly detectors off (the signals here are the test's own).
fn stack(dir: &Path, revocation_dir: &Path, data_extra: &str) -> (Gateway, TwoHop, WorkloadApi) {
    let gw_api = workload_api(dir, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(
        dir,
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", free_port())),
        &format!(
            "\n[revocation_policy]\ndir = {:?}\nreload_interval = \"100ms\"\n",
            revocation_dir.to_string_lossy()
        ),
    );
    let sidecar_toml = |name: &str, extra: &str| {
        format!(
            "{}\n[audit]\nsink = {{ file = {{ path = {:?} }} }}\n\n{}",
            policy_toml(),
            dir.join(format!("{name}-records.jsonl")).to_string_lossy(),
            gateway_toml(
                &gw,
                dir,
                name,
                &format!("ship_interval = \"200ms\"\ndetect_anomalies = false\n{extra}"),
            )
        )
    };
    let options = TwoHopOptions {
        data_toml: sidecar_toml("data", data_extra),
        plugin_toml: sidecar_toml("plugin", ""),
        ..TwoHopOptions::default()
    };
    let hop = two_hop(dir, &options);
    gw.wait_in_sync(2);
    (gw, hop, gw_api)
}

/// The decision ids in a record file whose record satisfies `keep`.
fn decision_ids(file: &Path, keep: impl Fn(&serde_json::Value) -> bool) -> Vec<String> {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|r| keep(r))
        .filter_map(|r| r["decision_id"].as_str().map(String::from))
        .filter(|id| !id.is_empty())
        .collect()
}

fn signals_about(gw: &Gateway, workload: &str) -> Vec<serde_json::Value> {
    let out = gw.nexusctl(&["signals", "--workload", workload, "-o", "json"]);
    serde_json::from_str::<serde_json::Value>(&out)
        .ok()
        .and_then(|v| v.as_array().cloned())
        .unwrap_or_default()
}

/// Waits until every signal about `workload` has been judged and returns them.
fn judged(gw: &Gateway, workload: &str, at_least: usize) -> Vec<serde_json::Value> {
    eventually(
        WAIT,
        &format!("{at_least} judged signals about {workload}"),
        || {
            let list = signals_about(gw, workload);
            (list.len() >= at_least && list.iter().all(|s| s["action"] != "")).then_some(list)
        },
    )
}

fn revoked_subjects(gw: &Gateway) -> Vec<String> {
    gw.status()["revoked"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| r["subject"].as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

/// Writes `text` to `path` through a hidden temporary file and a rename.
fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_file_name(format!(
        ".{}.tmp",
        path.file_name().unwrap_or_default().to_string_lossy()
    ));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
}

fn get(url: &str) -> (u16, String) {
    let out = curl(&["-s", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// The plugin calls the data API through both sidecars `n` times (records on both).
fn traffic(hop: &TwoHop, n: usize) {
    let url = hop.outbound_url("/clauses/c-flood-17/rainfall");
    for _ in 0..n {
        assert_eq!(get(&url).0, 200);
    }
}

// 1 ------------------------------------------------------------------------------------

#[test]
fn forged_and_single_peer_signals_never_revoke_and_intruders_get_no_stream() {
    let dir = temp_dir("trust-signals");
    let revocation = repo_root().join("policies/revocation");
    let (gw, hop, _api) = stack(dir.path(), &revocation, "");
    gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    traffic(&hop, 6);
    // Both sidecars' records of those requests reach the gateway.
    eventually(WAIT, "records shipped", || {
        (gw.metric_sum("nexus_gateway_records_stored_total") >= 12.0).then_some(())
    });
    let plugin_ids = decision_ids(&dir.path().join("plugin-records.jsonl"), |r| {
        r["destination"] == DATA_API_ID
    });
    let data_ids = decision_ids(&dir.path().join("data-records.jsonl"), |r| {
        r["source"] == PLUGIN_ID
    });
    assert!(
        plugin_ids.len() >= 6 && data_ids.len() >= 6,
        "{plugin_ids:?} {data_ids:?}"
    );

    // An SVID listed nowhere: no stream, so nothing it says is stored.
    let out = gw.grpcurl_stream(
        "nexus.local/intruder",
        &format!(
            "{} {}",
            hello(INTRUDER_ID),
            signal_msg(1, "unbound_clause", DATA_API_ID, "peer", 5.0, &[])
        ),
    );
    assert!(!out.status.success(), "the intruder got a stream: {out:?}");

    // The plugin's own SVID (a compromised plugin or its sidecar) reports the data API:
    // without evidence, with forged decision ids, with its real ones (which do show
    // requests to the data API), and as a self-observation it cannot make.
    let forged: Vec<String> = (0..4).map(|i| format!("{i:032x}")).collect();
    let messages = [
        hello(PLUGIN_ID),
        signal_msg(1, "unbound_clause", DATA_API_ID, "peer", 5.0, &[]),
        signal_msg(2, "rate_spike", DATA_API_ID, "peer", 9.0, &forged),
        signal_msg(3, "unbound_clause", DATA_API_ID, "peer", 5.0, &plugin_ids),
        signal_msg(4, "rate_spike", DATA_API_ID, "peer", 50.0, &plugin_ids),
        signal_msg(5, "sandbox_violation", DATA_API_ID, "self", 100.0, &[]),
    ]
    .join(" ");
    gw.grpcurl_stream("nexus.local/flood-model", &messages);
    let list = judged(&gw, DATA_API_ID, 5);
    assert!(
        list.iter().all(|s| s["reporter"] == PLUGIN_ID),
        "only the plugin reported: {list:?}"
    );
    assert!(
        list.iter()
            .all(|s| s["action"] == "alert" || s["action"] == "ignore"),
        "{list:#?}"
    );
    let by_ids = |ids: &[String]| {
        list.iter()
            .filter(|s| s["decision_ids"].as_array().map(Vec::len) == Some(ids.len()))
            .filter(|s| s["observed_as"] == "peer")
            .cloned()
            .collect::<Vec<_>>()
    };
    for s in by_ids(&forged) {
        assert_eq!(s["verification"]["status"], "unverified", "{s}");
    }
    let verified = by_ids(&plugin_ids);
    assert!(!verified.is_empty(), "{list:#?}");
    for s in &verified {
        assert_eq!(s["verification"]["status"], "verified", "{s}");
        assert_eq!(s["action"], "alert", "{s}");
        let reasons = s["reasons"].to_string();
        assert!(
            reasons.contains("a single peer-observed signal never revokes"),
            "{reasons}"
        );
    }
    assert!(
        !revoked_subjects(&gw).contains(&DATA_API_ID.to_string()),
        "the data API was revoked on a peer's word"
    );
    assert_eq!(
        gw.metric_sum("nexus_gateway_signals_total{action=\"revoke\"}"),
        0.0
    );

    // The same kind of report corroborated by a second, independent reporter revokes:
    // the data API's sidecar (verified by its own records) and the plugin's own sidecar.
    let hazard = [
        hello(DATA_API_ID),
        signal_msg(1, "rate_spike", PLUGIN_ID, "peer", 10.0, &data_ids),
    ]
    .join(" ");
    gw.grpcurl_stream("nexus.local/hazard-api", &hazard);
    let first = judged(&gw, PLUGIN_ID, 1);
    assert_eq!(first[0]["verification"]["status"], "verified", "{first:?}");
    assert_eq!(first[0]["action"], "alert", "alone it alerts: {first:?}");
    assert!(!revoked_subjects(&gw).contains(&PLUGIN_ID.to_string()));
    let own = [
        hello(PLUGIN_ID),
        signal_msg(9, "rate_spike", PLUGIN_ID, "self", 5.0, &[]),
    ]
    .join(" ");
    gw.grpcurl_stream("nexus.local/flood-model", &own);
    eventually(WAIT, "the corroborated plugin revoked", || {
        revoked_subjects(&gw)
            .contains(&PLUGIN_ID.to_string())
            .then_some(())
    });
    let list = judged(&gw, PLUGIN_ID, 2);
    let revoke = list
        .iter()
        .find(|s| s["action"] == "revoke")
        .expect("a revoking signal");
    assert!(
        revoke["reasons"]
            .to_string()
            .contains("corroborated by 2 reporters"),
        "{revoke}"
    );

    // A flood from one reporter is cut by its rate limit (signals.per_reporter_burst 60).
    let flood: Vec<String> = std::iter::once(hello(DATA_API_ID))
        .chain((0..150).map(|i| {
            signal_msg(
                100 + i,
                "denial_burst",
                "spiffe://nexus.local/ns/plugins/sa/other",
                "peer",
                0.5,
                &[],
            )
        }))
        .collect();
    gw.grpcurl_stream("nexus.local/hazard-api", &flood.join(" "));
    let limited = eventually(WAIT, "rate-limited signals counted", || {
        let n = gw.metric_sum("nexus_gateway_signals_total{action=\"rate_limited\"}");
        (n >= 80.0).then_some(n)
    });
    let stored = signals_about(&gw, "spiffe://nexus.local/ns/plugins/sa/other").len();
    assert!(
        stored <= 70,
        "{stored} stored, {limited} rate-limited: the limit did not hold"
    );
    assert!(
        gw.proc
            .log_text()
            .contains("signals over the reporter's rate limit dropped"),
        "no log line for the rate limit"
    );
}

// 2 ------------------------------------------------------------------------------------

/// The report socket is served like every other listener (`nexus_serve`), with the
/// sidecar's `[limits]`: a process in the pod that opens connections and never finishes a
/// request head cannot pin them open; each is cut after `limits.header_read_timeout`,
/// before any token check, and the socket still takes reports afterwards.
#[test]
fn the_report_socket_cuts_a_request_head_that_never_ends() {
    use std::io::{Read, Write};
    use std::os::unix::net::UnixStream;

    let dir = temp_dir("trust-report-slow-head");
    let d = dir.path();
    let api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &[]);
    let socket = d.join("reports/signals.sock");
    std::fs::create_dir_all(d.join("reports")).expect("reports dir");
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[reports]\nsocket = {:?}\ntoken_file = {:?}\n\n[limits]\nheader_read_timeout = \"1s\"\n",
        api.url(),
        socket.to_string_lossy(),
        d.join("reports/token").to_string_lossy(),
    );
    let _plugin = sidecar(d, "plugin-sidecar", &toml, true);

    let mut slow = UnixStream::connect(&socket).expect("connect the report socket");
    slow.write_all(b"POST /v1/signals HTTP/1.1\r\nHost: sidecar\r\n")
        .expect("write half a head");
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let started = Instant::now();
    let mut buf = [0u8; 256];
    let ended = match slow.read(&mut buf) {
        Ok(0) => "eof",
        Ok(_) => "data",
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => "reset",
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "still open",
        Err(_) => "error",
    };
    assert!(
        ended == "eof" || ended == "reset",
        "an unfinished head on the report socket was not cut: {ended} after {:?}",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "cut after {:?}, not header_read_timeout (1s)",
        started.elapsed()
    );
    // The socket still answers (401 without the token: nothing was taken from the cut one).
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--unix-socket",
        &socket.to_string_lossy(),
        "http://sidecar/v1/signals",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "401");
}

#[test]
fn reports_are_taken_only_on_the_in_pod_socket_from_the_launcher() {
    let dir = temp_dir("trust-reports");
    let d = dir.path();
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(
        d,
        "gateway",
        &gw_api,
        None,
        None,
        &format!(
            "\n[revocation_policy]\ndir = {:?}\n",
            repo_root().join("policies/revocation").to_string_lossy()
        ),
    );
    let plugin_api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &[]);
    let socket = d.join("reports/signals.sock");
    let token_file = d.join("reports/token");
    std::fs::create_dir_all(d.join("reports")).expect("reports dir");
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[reports]\nsocket = {:?}\ntoken_file = {:?}\n\n{}",
        plugin_api.url(),
        socket.to_string_lossy(),
        token_file.to_string_lossy(),
        gateway_toml(&gw, d, "plugin", "")
    );
    let plugin = sidecar(d, "plugin-sidecar", &toml, true);
    gw.wait_in_sync(1);
    let kill = serde_json::json!({
        "kind": "sandbox_violation", "workload": PLUGIN_ID, "syscall": "ptrace",
        "action": "kill", "pid": 4242, "exit_signal": 9, "time": "2026-11-26T09:41:07Z",
    })
    .to_string();

    // The attack of the issue: one curl to the admin listener (on the pod IP in a pod).
    let out = curl(&[
        "-s",
        "-w",
        "\n%{http_code}",
        "-X",
        "POST",
        "-H",
        "content-type: application/json",
        "--data",
        &kill,
        &format!("{}/v1/signals", plugin.admin()),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("403"), "{text}");
    assert!(text.contains("in-pod report socket"), "{text}");
    // On the socket without the token, and with a wrong one: 401.
    let socket_arg = socket.to_string_lossy().into_owned();
    for auth in [None, Some("Authorization: Bearer 00")] {
        let mut args = vec![
            "-s",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--unix-socket",
            &socket_arg,
            "-X",
            "POST",
            "--data",
            &kill,
        ];
        if let Some(auth) = auth {
            args.extend(["-H", auth]);
        }
        args.push("http://sidecar/v1/signals");
        let out = curl(&args);
        assert_eq!(String::from_utf8_lossy(&out.stdout), "401", "{auth:?}");
    }
    assert_eq!(
        plugin.metric_sum("nexus_reports_refused_total"),
        3.0,
        "network + two bad tokens"
    );
    assert_eq!(plugin.metric_sum("nexus_sandbox_violations_total"), 0.0);
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        signals_about(&gw, PLUGIN_ID).is_empty(),
        "a refused report reached the gateway"
    );
    assert!(revoked_subjects(&gw).is_empty());

    // The launcher's report, over the socket with the pod's token: a sandbox kill of the
    // plugin's own workload, reported by its own sidecar, revokes it.
    let work = d.join("work");
    let data = d.join("data");
    std::fs::create_dir_all(&work).expect("work");
    std::fs::create_dir_all(&data).expect("data");
    let out = Command::new(bin("nexus-launch"))
        .arg("--profile")
        .arg(repo_root().join("profiles/default.toml"))
        .args(["--report", &format!("unix://{}", socket.display())])
        .arg("--")
        .arg(bin("nexus-escape-probe"))
        .arg("ptrace")
        .env("NEXUS_PLUGIN_WORKDIR", &work)
        .env("NEXUS_PLUGIN_DATA", &data)
        .env("NEXUS_SIDECAR_PORT", "1")
        .env("NEXUS_WORKLOAD_ID", PLUGIN_ID)
        .env("NEXUS_REPORT_TOKEN_FILE", &token_file)
        .env_remove("NEXUS_SIGNAL_URL")
        .output()
        .expect("nexus-launch");
    assert_eq!(out.status.code(), Some(137), "{out:?}");
    plugin.wait_metric("nexus_sandbox_violations_total{action=\"kill\"}", 1.0, WAIT);
    eventually(WAIT, "the plugin revoked by its own report", || {
        revoked_subjects(&gw)
            .contains(&PLUGIN_ID.to_string())
            .then_some(())
    });

    // A caller whose uid is not listed is refused before anything is read.
    let uid_only = d.join("reports/uid.sock");
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[reports]\nsocket = {:?}\npeer_uids = [{}]\n",
        plugin_api.url(),
        uid_only.to_string_lossy(),
        nexus_tests::current_uid() + 4242,
    );
    let other = sidecar(d, "uid-sidecar", &toml, false);
    eventually(WAIT, "the uid-checked socket", || {
        uid_only.exists().then_some(())
    });
    let out = curl(&[
        "-s",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
        "--unix-socket",
        &uid_only.to_string_lossy(),
        "-X",
        "POST",
        "--data",
        &kill,
        "http://sidecar/v1/signals",
    ]);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "000");
    other.wait_metric(
        "nexus_reports_refused_total{reason=\"peer_uid\"}",
        1.0,
        WAIT,
    );
}

// 3 ------------------------------------------------------------------------------------

#[test]
fn a_sidecar_without_a_verifiable_snapshot_refuses_everything_until_the_gateway_answers() {
    let dir = temp_dir("trust-snapshot");
    let d = dir.path();
    let revocation = repo_root().join("policies/revocation");
    let (mut gw, mut hop, _api) = stack(d, &revocation, "");
    // The plugin is revoked: the data sidecar refuses its handshake's requests.
    gw.nexusctl(&["revoke", PLUGIN_ID, "--reason", "stolen SVID"]);
    gw.wait_in_sync(2);
    let inbound = |hop_port: u16, identity: &str| {
        let mut args = nexus_tests::stack::inbound_curl_args(hop_port, Some(identity));
        args.extend(
            [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://localhost:{hop_port}/clauses/c-flood-17/rainfall"),
            ]
            .map(String::from),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        String::from_utf8_lossy(&curl(&refs).stdout).into_owned()
    };
    // Refused at the handshake (000) or with a 403: never served.
    let refused = |code: String| code == "000" || code == "403";
    assert!(refused(inbound(
        hop.data.inbound_port(),
        "nexus.local/flood-model"
    )));
    gw.kill9();

    let snapshot = d.join("data.snapshot.json");
    let good = std::fs::read(&snapshot).expect("kept snapshot");
    let data_toml = std::fs::read_to_string(&hop.data.config).expect("data config");
    let data_toml = data_toml
        .split("\n[admin]")
        .next()
        .unwrap_or_default()
        .to_string();
    // Damage the kept state two ways: cut short (as a truncated write leaves it), and
    // one byte of its content changed.
    let flipped = String::from_utf8(good.clone())
        .expect("utf-8")
        .replacen("stolen SVID", "stolen SVIE", 1)
        .into_bytes();
    for (n, damaged) in [good[..good.len() / 2].to_vec(), flipped]
        .into_iter()
        .enumerate()
    {
        hop.data.proc.signal("KILL");
        std::fs::write(&snapshot, &damaged).expect("damage the snapshot");
        let name = format!("data-sidecar-{n}");
        let _ = std::fs::remove_file(d.join(format!("{name}.addresses.json")));
        hop.data = sidecar(d, &name, &data_toml, false);
        let port = hop.data.inbound_port();
        // Not ready, and nobody served: the revoked plugin is refused, not let in.
        eventually(WAIT, "the refusal", || {
            (hop.data.ready_status() == 503).then_some(())
        });
        assert_eq!(
            inbound(port, "nexus.local/flood-model"),
            "503",
            "damage {n}"
        );
        let ready = curl(&[&format!("{}/ready", hop.data.admin())]);
        let ready = String::from_utf8_lossy(&ready.stdout);
        assert!(
            ready.contains("no verified gateway state") && ready.contains("data.snapshot.json"),
            "{ready}"
        );
        assert_eq!(
            hop.data
                .metric_sum("nexus_enforcement_hold{reason=\"no_valid_snapshot\"}"),
            1.0
        );
        assert!(hop.data.metric_sum("nexus_snapshot_files_rejected_total") >= 1.0);
        let log = hop.data.proc.log_text();
        assert!(
            log.contains("no verified gateway snapshot") && log.contains("data.snapshot.json"),
            "{log}"
        );
    }

    // The gateway answers: the state is enforced again, the revocation with it.
    gw.restart();
    eventually(WAIT, "ready once the gateway answered", || {
        (hop.data.ready_status() == 200).then_some(())
    });
    let port = hop.data.inbound_port();
    assert!(refused(inbound(port, "nexus.local/flood-model")));
    assert_eq!(
        hop.data
            .metric_sum("nexus_enforcement_hold{reason=\"no_valid_snapshot\"}"),
        0.0
    );
    // And the kept snapshot verifies again (a restart now starts from it).
    let kept: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&snapshot).expect("snapshot")).expect("json");
    assert_eq!(kept["format"], "nexus-gateway-snapshot/2");
    assert!(d.join("data.snapshot.json.prev").exists());
}

// 4 ------------------------------------------------------------------------------------

#[test]
fn a_revision_is_acknowledged_only_once_applied_and_failures_are_reported_and_retried() {
    let dir = temp_dir("trust-ack");
    let d = dir.path();
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(d, "gateway", &gw_api, None, None, "");
    // A policy folder that does not load yet (a syntax error).
    let policies = d.join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    let authz = policies.join("nexus/authz/authz.rego");
    let original = std::fs::read_to_string(&authz).expect("authz.rego");
    write_atomically(&authz, &format!("{original}\nbroken := {{\n"));
    let plugin_api = workload_api(d, "plugin-workload-api", PLUGIN_ID, &[]);
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[policy]\ndir = {:?}\nreload_interval = \"100ms\"\n\n{}",
        plugin_api.url(),
        policies.to_string_lossy(),
        gateway_toml(&gw, d, "plugin", "")
    );
    let plugin = sidecar(d, "plugin-sidecar", &toml, false);
    gw.nexusctl(&["revoke", "spiffe://nexus.local/ns/plugins/sa/other"]);
    // Connected, told revision 1, but it could not apply it: not acknowledged, and why.
    let status = eventually(WAIT, "the apply failure at the gateway", || {
        let s = gw.status();
        let sidecar = s["sidecars"].as_array()?.first()?.clone();
        sidecar["apply_error"]
            .is_string()
            .then(|| (s.clone(), sidecar.clone()))
    });
    let (s, sidecar_info) = status;
    assert!(
        sidecar_info["acknowledged_revision"].as_u64() < s["revision"].as_u64(),
        "acknowledged what it did not apply: {s}"
    );
    assert!(
        sidecar_info["apply_error"]
            .as_str()
            .unwrap_or("")
            .contains("no policy revision"),
        "{sidecar_info}"
    );
    assert!(gw.metric_sum("nexus_gateway_sidecar_apply_failures_total") >= 1.0);
    let text = gw.nexusctl(&["status"]);
    assert!(text.contains("cannot apply revision"), "{text}");
    assert_eq!(plugin.ready_status(), 503);
    // Retried (with backoff) while it fails.
    plugin.wait_metric("nexus_gateway_apply_failures_total", 2.0, WAIT);

    // Fixed: the retry applies it and only then acknowledges.
    write_atomically(&authz, &original);
    gw.wait_in_sync(1);
    eventually(WAIT, "ready once applied", || {
        (plugin.ready_status() == 200).then_some(())
    });
    assert!(gw.status()["sidecars"][0]["apply_error"].is_null());

    // The kept snapshot cannot be written (a directory where its temporary file goes):
    // the revision is enforced in memory but neither acknowledged nor served as if kept.
    let blocker = d.join("plugin.snapshot.json.tmp");
    std::fs::create_dir(&blocker).expect("block the snapshot write");
    gw.nexusctl(&["revoke", "spiffe://nexus.local/ns/plugins/sa/third"]);
    let error = eventually(WAIT, "the write failure at the gateway", || {
        let s = gw.status();
        s["sidecars"][0]["apply_error"].as_str().map(String::from)
    });
    assert!(
        error.contains("cannot write the gateway snapshot"),
        "{error}"
    );
    assert_eq!(plugin.ready_status(), 503);
    // The older generations are gone: a restart now cannot enforce them as current.
    assert!(!d.join("plugin.snapshot.json").exists());
    std::fs::remove_dir(&blocker).expect("unblock");
    gw.wait_in_sync(1);
    eventually(WAIT, "ready once kept", || {
        (plugin.ready_status() == 200).then_some(())
    });
    assert!(d.join("plugin.snapshot.json").exists());
}

// 5 ------------------------------------------------------------------------------------

/// The process ids whose parent is `pid`.
fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(child) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let stat = std::fs::read_to_string(entry.path().join("stat")).unwrap_or_default();
        // pid (comm) state ppid ...: comm may hold spaces, so read after its ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

#[test]
fn a_policy_that_never_finishes_is_refused_and_later_edits_still_load() {
    let dir = temp_dir("trust-runaway");
    let d = dir.path();
    let policies = d.join("policies");
    copy_dir(&repo_root().join("policies"), &policies);
    let api = workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let data_api = nexus_tests::stack::data_api(d);
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n[policy]\ndir = {:?}\nreload_interval = \"100ms\"\nload_timeout = \"3s\"\nload_max_memory = 268435456\n\n[limits]\ndrain_delay = \"1s\"\n",
        api.url(),
        data_api.http,
        policies.to_string_lossy(),
    );
    let side = sidecar(d, "data-sidecar", &toml, true);
    let headers = || {
        let mut args = nexus_tests::stack::inbound_curl_args(
            side.inbound_port(),
            Some("nexus.local/flood-model"),
        );
        args.extend(
            [
                "-s",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                &format!("https://localhost:{}/headers", side.inbound_port()),
            ]
            .map(String::from),
        );
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        String::from_utf8_lossy(&curl(&refs).stdout).into_owned()
    };
    assert_eq!(headers(), "403", "no rule grants /headers yet");
    let refusals = |side: &Sidecar| side.metric_sum("nexus_policy_reloads_total{result=\"error\"}");

    // A test that spins for ever (no builtin call long enough to be noticed by the
    // engine's own clock): refused at the time limit, naming the file and the rule.
    let spin = policies.join("nexus/authz/spin_test.rego");
    let started = Instant::now();
    write_atomically(
        &spin,
        "package nexus.spin_test\n\nimport rego.v1\n\ntest_spins_for_ever if {\n\tevery x in numbers.range(1, 100000) {\n\t\tevery y in numbers.range(1, 100000) {\n\t\t\tx + y > 0\n\t\t}\n\t}\n}\n",
    );
    side.wait_metric("nexus_policy_reloads_total{result=\"error\"}", 1.0, WAIT);
    let took = started.elapsed();
    let log = side.proc.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("policy refused"))
        .expect("a refusal")
        .to_string();
    assert!(
        line.contains("data.nexus.spin_test.test_spins_for_ever")
            && line.contains("spin_test.rego")
            && line.contains("policy.load_timeout"),
        "{line}"
    );
    assert!(took < Duration::from_secs(15), "refused after {took:?}");
    assert_eq!(side.ready_status(), 200, "the last good revision serves");
    assert_eq!(headers(), "403");

    // One that allocates without end: refused at the memory limit, same way.
    let before = refusals(&side);
    std::fs::remove_file(&spin).expect("remove spin");
    let hog = policies.join("nexus/authz/hog_test.rego");
    write_atomically(
        &hog,
        "package nexus.hog_test\n\nimport rego.v1\n\ntest_allocates_for_ever if {\n\tcount([x | some x in numbers.range(1, 400000000)]) > 0\n}\n",
    );
    side.wait_metric(
        "nexus_policy_reloads_total{result=\"error\"}",
        before + 1.0,
        WAIT,
    );
    let log = side.proc.log_text();
    let line = log
        .lines()
        .rfind(|l| l.contains("policy refused"))
        .expect("a refusal")
        .to_string();
    assert!(
        line.contains("test_allocates_for_ever") && line.contains("policy.load_max_memory"),
        "{line}"
    );
    let (rss, _) = side.proc.rss_kib();
    assert!(rss < 200 * 1024, "the sidecar itself grew to {rss} KiB");

    // Later edits still load: the hog goes, a grant for /headers comes.
    std::fs::remove_file(&hog).expect("remove hog");
    let authz = policies.join("nexus/authz/authz.rego");
    let text = std::fs::read_to_string(&authz).expect("authz");
    write_atomically(
        &authz,
        &format!(
            "{text}\ngranted := \"debug path /headers\" if {{\n\tnot is_string(input.clause)\n\tinput.request.method == \"GET\"\n\tinput.request.path == \"/headers\"\n}}\n"
        ),
    );
    eventually(WAIT, "the later edit served", || {
        (headers() == "200").then_some(())
    });

    // SIGTERM while a check spins: the sidecar is gone within its grace (after its 1s
    // drain delay; no connection is open), and so is the checker it started.
    let mut side = side;
    write_atomically(
        &spin,
        "package nexus.spin_test\n\nimport rego.v1\n\ntest_spins_for_ever if {\n\tevery x in numbers.range(1, 100000) {\n\t\tevery y in numbers.range(1, 100000) {\n\t\t\tx + y > 1\n\t\t}\n\t}\n}\n",
    );
    let checker = eventually(WAIT, "a policy checker running", || {
        children_of(side.proc.pid()).into_iter().next()
    });
    side.proc.signal("TERM");
    let stopping = Instant::now();
    eventually(Duration::from_secs(10), "the sidecar to exit", || {
        (!side.proc.is_running()).then_some(())
    });
    let stopped = stopping.elapsed();
    assert!(stopped < Duration::from_secs(5), "took {stopped:?} to stop");
    eventually(Duration::from_secs(5), "the checker to die with it", || {
        (!Path::new(&format!("/proc/{checker}")).exists()
            || std::fs::read_to_string(format!("/proc/{checker}/stat"))
                .map(|s| s.contains(") Z "))
                .unwrap_or(true))
        .then_some(())
    });
    eprintln!("runaway test refused after {took:?}; SIGTERM stopped the sidecar in {stopped:?}");
}

// 6 ------------------------------------------------------------------------------------

#[test]
fn each_stream_gets_only_what_its_workload_needs() {
    let dir = temp_dir("trust-scope");
    let d = dir.path();
    let gw_api = workload_api(d, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(d, "gateway", &gw_api, None, None, "");
    let mine = gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let theirs = gw.open_execution(
        "spiffe://nexus.local/ns/plugins/sa/other",
        "c-flood-17",
        "10m",
    );
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/plugins/sa/third",
        "--reason",
        "reported by a secret witness",
    ]);
    // The plugin's sidecar identity: its own execution, revocations without who or why.
    let plugin = gw.grpcurl_stream("nexus.local/flood-model", &hello(PLUGIN_ID));
    let seen = String::from_utf8_lossy(&plugin.stdout);
    assert!(seen.contains(&mine), "{seen}");
    assert!(
        !seen.contains(&theirs),
        "another plugin's execution leaked: {seen}"
    );
    assert!(
        seen.contains("spiffe://nexus.local/ns/plugins/sa/third"),
        "{seen}"
    );
    assert!(!seen.contains("secret witness"), "{seen}");
    assert!(!seen.contains("ns/ops/sa/operator"), "{seen}");
    // A data sidecar enforces every plugin's executions: it gets them all.
    let data = gw.grpcurl_stream("nexus.local/hazard-api", &hello(DATA_API_ID));
    let seen = String::from_utf8_lossy(&data.stdout);
    assert!(seen.contains(&mine) && seen.contains(&theirs), "{seen}");
    assert!(seen.contains("secret witness"), "{seen}");
    // Nobody else gets a stream.
    let intruder = gw.grpcurl_stream("nexus.local/intruder", &hello(INTRUDER_ID));
    assert!(!intruder.status.success());
    assert!(!String::from_utf8_lossy(&intruder.stdout).contains(&mine));
    // Nor with the gateway's sidecars left unset: the default lets nobody in.
    let closed = nexus_tests::stack::gateway_with(d, "closed", &gw_api, None, None, "", "");
    let refused = closed.grpcurl_stream("nexus.local/flood-model", &hello(PLUGIN_ID));
    assert!(!refused.status.success(), "{refused:?}");
    assert!(
        closed.proc.log_text().contains("`sidecars` is empty"),
        "{}",
        closed.proc.log_text()
    );
}

#[test]
fn ids_are_normalized_ttls_capped_and_terminal_output_escaped() {
    let dir = temp_dir("trust-input");
    let revocation = repo_root().join("policies/revocation");
    let (gw, hop, _api) = stack(dir.path(), &revocation, "");
    gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let url = hop.outbound_url("/clauses/c-flood-17/rainfall");
    assert_eq!(get(&url).0, 200);

    // An upper-case trust domain is the same workload: stored in its canonical spelling,
    // and enforced.
    let out = gw.nexusctl(&["revoke", "spiffe://NEXUS.Local/ns/plugins/sa/flood-model"]);
    assert!(out.contains(&format!("revoked {PLUGIN_ID}")), "{out}");
    assert_eq!(revoked_subjects(&gw), vec![PLUGIN_ID.to_string()]);
    eventually(WAIT, "the plugin refused", || {
        (get(&url).0 == 403).then_some(())
    });
    gw.nexusctl(&[
        "reinstate",
        "spiffe://nexus.LOCAL/ns/plugins/sa/flood-model",
    ]);
    assert!(revoked_subjects(&gw).is_empty());
    // Characters the SPIFFE ID spec does not allow are refused.
    for bad in [
        "spiffe://nexus.local/ns/plugins/sa/flood\u{1b}[2J",
        "spiffe://nexus.local/ns/plugins/sa/flood\u{202e}ledom",
        "spiffe://nexus.local/ns/plugins/../x",
        "spiffe://nexus local/x",
    ] {
        let out = gw.nexusctl_as("nexus.local/operator", &["revoke", bad]);
        assert!(!out.status.success(), "{bad:?} accepted");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
            "{out:?}"
        );
    }

    // TTLs: capped like execution TTLs (limits.max_revocation_ttl, 30d by default).
    let out = gw.nexusctl_as(
        "nexus.local/operator",
        &["revoke", PLUGIN_ID, "--ttl", "100000000h"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("limits.max_revocation_ttl"),
        "{out:?}"
    );
    // u64::MAX milliseconds straight through the API (what showed as expiring in 1970).
    let proto = repo_root().join("crates/proto/proto");
    let out = nexus_tests::run_bounded(
        20,
        "grpcurl",
        &[
            "-insecure",
            "-cert",
            &cert("nexus.local/operator.pem").to_string_lossy(),
            "-key",
            &cert("nexus.local/operator.key").to_string_lossy(),
            "-import-path",
            &proto.to_string_lossy(),
            "-proto",
            "nexus/control/v1/control.proto",
            "-d",
            &format!("{{\"subject\": \"{PLUGIN_ID}\", \"ttl_ms\": \"18446744073709551615\"}}"),
            &gw.grpc(),
            "nexus.control.v1.Admin/Revoke",
        ],
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("limits.max_revocation_ttl"), "{text}");
    assert!(revoked_subjects(&gw).is_empty());

    // A reason full of terminal controls: escaped in every output, never raw.
    let evil = "ok\u{1b}]0;pwned\u{7}\u{1b}[2J\u{202e}tpyrced\nFAKE LINE";
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/plugins/sa/other",
        "--reason",
        evil,
    ]);
    for args in [
        vec!["status"],
        vec!["status", "-o", "json"],
        vec!["signals", "--since", "1h"],
    ] {
        let out = gw.nexusctl(&args);
        for raw in ['\u{1b}', '\u{202e}', '\u{7}'] {
            assert!(!out.contains(raw), "{args:?} printed {raw:?} raw: {out:?}");
        }
        assert!(!out.contains("\nFAKE LINE"), "{args:?}: {out}");
    }
    let text = gw.nexusctl(&["status"]);
    assert!(
        text.contains("\\u{1b}[2J\\u{202e}tpyrced\\nFAKE LINE"),
        "{text}"
    );
    let json = gw.nexusctl(&["status", "-o", "json"]);
    let parsed: serde_json::Value = serde_json::from_str(&json).expect("still JSON");
    assert_eq!(parsed["revoked"][0]["reason"], evil);

    // A reader that stops early: nexusctl ends quietly.
    let nexusctl = bin("nexusctl").to_string_lossy().into_owned();
    let mut cmd = format!("{nexusctl} status");
    for (flag, value) in [
        ("--gateway", gw.grpc()),
        ("--gateway-id", GATEWAY_ID.to_string()),
        (
            "--cert",
            cert("nexus.local/operator.pem")
                .to_string_lossy()
                .into_owned(),
        ),
        (
            "--key",
            cert("nexus.local/operator.key")
                .to_string_lossy()
                .into_owned(),
        ),
        (
            "--ca",
            cert("nexus.local/ca.pem").to_string_lossy().into_owned(),
        ),
        ("--up-state", "/nonexistent".into()),
    ] {
        cmd.push_str(&format!(" {flag} {value}"));
    }
    // Enough output to outlast the pipe: status, many times over.
    // The second call writes to a pipe whose reader is long gone.
    let out = nexus_tests::run_bounded(
        30,
        "bash",
        &[
            "-c",
            &format!("set -o pipefail; {{ {cmd} && sleep 1 && {cmd}; }} | head -c 1"),
        ],
    );
    assert!(out.status.success(), "{out:?}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("panicked") && !stderr.contains("Broken pipe"),
        "{stderr}"
    );
}

#[test]
fn the_revocation_policy_hot_reloads_and_keeps_its_last_good_revision() {
    let dir = temp_dir("trust-reload");
    let d = dir.path();
    let revocation = d.join("revocation");
    copy_dir(&repo_root().join("policies/revocation"), &revocation);
    let (gw, _hop, _api) = stack(d, &revocation, "");
    let reloads = |result: &str| {
        gw.metric_sum(&format!(
            "nexus_gateway_revocation_policy_reloads_total{{result=\"{result}\"}}"
        ))
    };
    let loaded = reloads("ok");
    // The plugin is made protected by an edit of data.yaml: no restart.
    let data = revocation.join("data.yaml");
    let text = std::fs::read_to_string(&data).expect("data.yaml");
    let protected = text.replace(
        "    protected: []",
        &format!("    protected: [\"{PLUGIN_ID}\"]"),
    );
    assert_ne!(protected, text);
    write_atomically(&data, &protected);
    eventually(WAIT, "the edit loaded", || {
        (reloads("ok") > loaded).then_some(())
    });
    // A strong self-observation of the plugin now alerts instead of revoking.
    let own = [
        hello(PLUGIN_ID),
        signal_msg(1, "rate_spike", PLUGIN_ID, "self", 20.0, &[]),
    ]
    .join(" ");
    gw.grpcurl_stream("nexus.local/flood-model", &own);
    let list = judged(&gw, PLUGIN_ID, 1);
    assert_eq!(list[0]["action"], "alert", "{list:?}");
    assert!(
        list[0]["reasons"].to_string().contains("is protected"),
        "{list:?}"
    );
    assert!(revoked_subjects(&gw).is_empty());

    // An edit whose tests fail is refused; the protected list stays in force.
    let rego = revocation.join("revocation.rego");
    let policy = std::fs::read_to_string(&rego).expect("revocation.rego");
    let loosened = policy.replace("revoke_score: 8", "revoke_score: 1");
    let broken = policy.replace(
        "default revoke_ttl := \"1h\"",
        "default revoke_ttl := \"10h\"",
    );
    assert_ne!(broken, policy);
    let _ = loosened;
    let errors = reloads("error");
    write_atomically(&rego, &broken);
    eventually(WAIT, "the failing edit refused", || {
        (reloads("error") > errors).then_some(())
    });
    assert!(
        gw.proc
            .log_text()
            .contains("revocation policy refused; the last good revision keeps judging"),
        "{}",
        gw.proc.log_text()
    );
    gw.grpcurl_stream(
        "nexus.local/flood-model",
        &[
            hello(PLUGIN_ID),
            signal_msg(2, "rate_spike", PLUGIN_ID, "self", 30.0, &[]),
        ]
        .join(" "),
    );
    let list = judged(&gw, PLUGIN_ID, 2);
    assert!(list.iter().all(|s| s["action"] == "alert"), "{list:?}");
    assert!(revoked_subjects(&gw).is_empty());
}

/// Runs `sidecar --config CONFIG` with a 64 KiB tmpfs mounted on `records_dir` in a
/// mount namespace of its own (`unshare`: as root, or in a user namespace otherwise).
fn sidecar_on_small_disk(dir: &Path, name: &str, toml: &str, records_dir: &Path) -> Sidecar {
    let address_file = dir.join(format!("{name}.addresses.json"));
    let config = dir.join(format!("{name}.toml"));
    std::fs::write(
        &config,
        format!(
            "{toml}\n[admin]\nlisten = \"127.0.0.1:0\"\naddress_file = {:?}\n",
            address_file.to_string_lossy()
        ),
    )
    .expect("config");
    std::fs::create_dir_all(records_dir).expect("records dir");
    let script = format!(
        "mount -t tmpfs -o size=64k nexus-test-full {} && exec {} --config {}",
        records_dir.display(),
        bin("nexus-sidecar").display(),
        config.display()
    );
    let user_ns = nexus_tests::current_uid() != 0;
    let mut args = vec!["--mount", "--propagation", "private"];
    if user_ns {
        args.push("--map-root-user");
    }
    args.extend(["sh", "-c", &script]);
    let proc = nexus_tests::Proc::spawn(
        name,
        dir,
        Path::new("unshare"),
        &args,
        &[("NEXUS_LOG", "info,nexus_audit=debug")],
    );
    let addresses = nexus_tests::read_json(&address_file, Duration::from_secs(20));
    Sidecar {
        proc,
        addresses,
        config,
    }
}

#[test]
fn a_full_disk_for_records_is_counted_as_dropped_with_a_clear_log_line() {
    let dir = temp_dir("trust-full-disk");
    let d = dir.path();
    let api = workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    let data_api = nexus_tests::stack::data_api(d);
    let records = d.join("records");
    let toml = format!(
        "[identity]\nworkload_api_socket = {:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n[audit]\nsink = {{ file = {{ path = {:?}, max_bytes = 1048576, max_files = 2 }} }}\n",
        api.url(),
        data_api.http,
        records.join("records.jsonl").to_string_lossy(),
    );
    let side = sidecar_on_small_disk(d, "full-sidecar", &toml, &records);
    let port = side.inbound_port();
    eventually(WAIT, "the sidecar ready", || {
        (side.ready_status() == 200).then_some(())
    });
    let mut args = nexus_tests::stack::inbound_curl_args(port, Some("nexus.local/flood-model"));
    args.extend(["-s", "-w", "%{http_code}\n"].map(String::from));
    // 300 records of ~700 bytes: three times what 64 KiB holds.
    for _ in 0..300 {
        args.extend(["-o".into(), "/dev/null".into()]);
        args.push(format!(
            "https://localhost:{port}/clauses/c-flood-17/rainfall"
        ));
    }
    let refs: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = curl(&refs);
    let codes = String::from_utf8_lossy(&out.stdout);
    assert!(
        codes.lines().all(|c| c == "200"),
        "best effort: requests are served while records drop: {codes}"
    );
    let dropped = side.wait_metric("nexus_audit_records_dropped_total", 1.0, WAIT);
    let written = side.metric_sum("nexus_audit_records_written_total");
    assert!(written > 10.0, "{written} written before the disk filled");
    assert!(
        dropped + written >= 290.0,
        "{dropped} dropped + {written} written"
    );
    assert_eq!(side.metric_sum("nexus_audit_write_errors_total"), 0.0);
    let log = side.proc.log_text();
    assert!(
        log.contains("disk full: execution records dropped"),
        "{log}"
    );
    assert!(!log.contains("crash during write"), "{log}");
    eprintln!("full disk: {written} records written, {dropped} dropped and counted");
}
