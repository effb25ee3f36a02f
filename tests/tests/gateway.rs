//! The gateway end to end: real `nexus-gateway`, real sidecars, `nexusctl` as the
//! operator. Revocation reaches every sidecar and is acknowledged; open connections with
//! the revoked workload close; executions open, close and expire everywhere; nothing
//! acknowledged is lost on kill -9; a sidecar restarted while the gateway is down still
//! enforces the last snapshot, and fails closed after the grace period; bad clients are
//! cut off while the others keep being served; two gateways share PostgreSQL.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nexus_tests::stack::{
    DATA_API_ID, GATEWAY_ID, Gateway, PLUGIN_ID, TwoHop, TwoHopOptions, WorkloadApi, gateway,
    gateway_toml, sidecar, two_hop, workload_api,
};
use nexus_tests::{curl, curl_status, eventually, free_port, repo_root, temp_dir};

fn policy_toml() -> String {
    format!(
        "[policy]\ndir = {:?}\nreload_interval = \"100ms\"\n",
        repo_root().join("policies").to_string_lossy()
    )
}

/// Gateway + two-hop stack: the plugin sidecar runs the reference policy, the data
/// sidecar authenticates only; both are on the gateway's control stream.
fn stack(
    dir: &Path,
    gateway_extra: &str,
    data_gateway: &str,
    plugin_gateway: &str,
) -> (Gateway, TwoHop, WorkloadApi) {
    let gw_api = workload_api(dir, "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(
        dir,
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", free_port())),
        gateway_extra,
    );
    let options = TwoHopOptions {
        data_toml: gateway_toml(&gw, dir, "data", data_gateway),
        plugin_toml: format!(
            "{}\n{}",
            policy_toml(),
            gateway_toml(&gw, dir, "plugin", plugin_gateway)
        ),
        ..TwoHopOptions::default()
    };
    let hop = two_hop(dir, &options);
    gw.wait_in_sync(2);
    (gw, hop, gw_api)
}

fn get(url: &str) -> (u16, String) {
    let out = curl(&["-s", "-w", "\n%{http_code}", url]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn revocation_reaches_every_sidecar_closes_connections_and_is_lifted() {
    let dir = temp_dir("gateway-revoke");
    let (gw, hop, _api) = stack(dir.path(), "", "", "");
    let exec = gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let exec = exec.trim().to_string();
    assert!(exec.starts_with("ex-"), "execution id: {exec}");
    let rainfall = hop.outbound_url("/clauses/c-flood-17/rainfall");
    assert_eq!(get(&rainfall).0, 200, "allowed under the open execution");

    // A long response from the data sidecar to the plugin's identity, in flight.
    let mut args = hop.inbound_args(Some("nexus.local/flood-model"));
    args.extend([
        "-s".into(),
        "-N".into(),
        "--max-time".into(),
        "30".into(),
        hop.inbound_url("/stream?chunks=300&interval_ms=100"),
    ]);
    let stream = Command::new("curl")
        .args(&args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("curl");
    std::thread::sleep(Duration::from_millis(600));

    let out = gw.nexusctl(&["revoke", PLUGIN_ID, "--reason", "test: stolen SVID"]);
    let revoked_at = Instant::now();
    assert!(out.contains("acknowledged by all 2 sidecars"), "{out}");

    // Refused by its own sidecar (it stops forwarding for it) ...
    let (status, body) = get(&rainfall);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("is revoked"), "{body}");
    // ... and by the data API's sidecar: a new connection with its SVID is closed.
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
    let out = curl(&refs);
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        "000",
        "no HTTP answer to a revoked peer"
    );
    // The open stream was cut well before its 30 s.
    let out = stream.wait_with_output().expect("stream curl");
    let chunks = String::from_utf8_lossy(&out.stdout).lines().count();
    assert!(
        revoked_at.elapsed() < Duration::from_secs(10),
        "stream not cut"
    );
    assert!(
        !out.status.success() && chunks < 300,
        "stream ended with {:?} after {chunks} chunks",
        out.status
    );
    hop.data.wait_metric(
        "nexus_revoked_connections_closed_total",
        1.0,
        Duration::from_secs(5),
    );

    let status = gw.status();
    let revoked = &status["revoked"][0];
    assert_eq!(revoked["subject"], PLUGIN_ID);
    assert_eq!(revoked["by"], nexus_tests::stack::OPERATOR_ID);
    assert_eq!(revoked["reason"], "test: stolen SVID");
    assert!(
        status["last_revocation"]["all_acknowledged_after_ms"]
            .as_f64()
            .unwrap()
            > 0.0,
        "{status}"
    );
    // Kept on disk with its checksum; the plugin's sidecar is told who is revoked, not
    // who revoked them or why (it is not a data sidecar); the data sidecar is.
    let snapshot: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("plugin.snapshot.json")).expect("snapshot on disk"),
    )
    .expect("snapshot JSON");
    assert_eq!(snapshot["format"], "nexus-gateway-snapshot/2", "{snapshot}");
    assert_eq!(
        snapshot["sha256"].as_str().map(str::len),
        Some(64),
        "{snapshot}"
    );
    let revoked = &snapshot["state"]["revoked"][PLUGIN_ID];
    assert_eq!(
        revoked["reason"], "revoked (details at the gateway)",
        "{snapshot}"
    );
    assert_eq!(revoked["by"], "", "{snapshot}");
    let data: serde_json::Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("data.snapshot.json")).expect("data snapshot on disk"),
    )
    .expect("snapshot JSON");
    assert_eq!(
        data["state"]["revoked"][PLUGIN_ID]["reason"], "test: stolen SVID",
        "{data}"
    );

    let out = gw.nexusctl(&["reinstate", PLUGIN_ID]);
    assert!(out.contains("acknowledged by all 2 sidecars"), "{out}");
    assert_eq!(get(&rainfall).0, 200, "allowed again after reinstatement");

    // A pattern revokes the whole namespace, the data API is untouched.
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/plugins/*",
        "--reason",
        "namespace",
    ]);
    assert_eq!(get(&rainfall).0, 403);
    gw.nexusctl(&["reinstate", "spiffe://nexus.local/ns/plugins/*"]);
    assert_eq!(get(&rainfall).0, 200);

    // Revoking the destination: the plugin's sidecar refuses to call it.
    gw.nexusctl(&["revoke", DATA_API_ID, "--reason", "data API compromised"]);
    let (status, body) = get(&rainfall);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains(DATA_API_ID), "{body}");
    gw.nexusctl(&["reinstate", DATA_API_ID]);

    // Closing the execution ends the plugin's access everywhere.
    gw.nexusctl(&["exec", "close", &exec]);
    let (status, body) = get(&rainfall);
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("no open execution"), "{body}");
    let list = gw.nexusctl(&["exec", "list", "--all", "-o", "json"]);
    assert!(
        list.contains(&format!("closed by {}", nexus_tests::stack::OPERATOR_ID)),
        "{list}"
    );
}

#[test]
fn executions_expire_by_themselves_everywhere() {
    let dir = temp_dir("gateway-expiry");
    let (gw, hop, _api) = stack(
        dir.path(),
        "[limits]\nexpiry_interval = \"200ms\"\n",
        "",
        "",
    );
    let rainfall = hop.outbound_url("/clauses/c-flood-18/rainfall");
    assert_eq!(get(&rainfall).0, 403, "no execution yet");
    gw.open_execution(PLUGIN_ID, "c-flood-18", "2s");
    assert_eq!(get(&rainfall).0, 200);
    eventually(Duration::from_secs(10), "the execution to expire", || {
        (get(&rainfall).0 == 403).then_some(())
    });
    let list: serde_json::Value =
        serde_json::from_str(&gw.nexusctl(&["exec", "list", "--all", "-o", "json"])).unwrap();
    eventually(
        Duration::from_secs(5),
        "the gateway to close the expired execution",
        || {
            let list: serde_json::Value =
                serde_json::from_str(&gw.nexusctl(&["exec", "list", "--all", "-o", "json"]))
                    .ok()?;
            (list[0]["close_reason"] == "expired").then_some(())
        },
    );
    assert_eq!(list.as_array().map(Vec::len), Some(1));
    // The sidecars dropped it from their data too.
    gw.wait_in_sync(2);
    let snapshot = std::fs::read_to_string(dir.path().join("plugin.snapshot.json")).unwrap();
    assert!(!snapshot.contains("c-flood-18"), "{snapshot}");
    // Bad input: a malformed plugin ID, a zero TTL.
    let out = gw.nexusctl_as(
        "nexus.local/operator",
        &[
            "exec",
            "open",
            "--plugin",
            "flood-model",
            "--clause",
            "c1",
            "--ttl",
            "1m",
        ],
    );
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("INVALID_ARGUMENT"),
        "{out:?}"
    );
}

#[test]
fn acknowledged_revocations_survive_kill_9_of_the_gateway() {
    let dir = temp_dir("gateway-kill9");
    let (mut gw, hop, _api) = stack(dir.path(), "", "", "");
    const N: usize = 25;
    for i in 0..N {
        gw.nexusctl(&[
            "revoke",
            &format!("spiffe://nexus.local/ns/t/sa/w{i}"),
            "--reason",
            "kill-9 test",
        ]);
    }
    gw.kill9();
    // While it is down, the sidecars keep enforcing and say so.
    eventually(
        Duration::from_secs(10),
        "plugin sidecar to notice the loss",
        || {
            hop.plugin
                .metrics()
                .contains("nexus_gateway_link{state=\"disconnected\"} 1")
                .then_some(())
        },
    );
    gw.restart();
    let status = gw.wait_in_sync(2);
    assert_eq!(
        status["revoked"].as_array().map(Vec::len),
        Some(N),
        "{status}"
    );
    assert_eq!(status["revision"].as_u64(), Some(N as u64));
    // The next change continues the revision sequence and reaches both.
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/t/sa/after",
        "--reason",
        "after restart",
    ]);
    let status = gw.wait_in_sync(2);
    assert_eq!(status["revision"].as_u64(), Some(N as u64 + 1));
}

#[test]
fn sidecars_enforce_the_last_snapshot_without_the_gateway_and_fail_closed_when_asked() {
    let dir = temp_dir("gateway-loss");
    let (mut gw, mut hop, _api) = stack(
        dir.path(),
        "",
        // Long enough for the plugin sidecar's restart below (its policy loads in a
        // child process: 2s here, 8.5s seen under the whole suite) to be served before
        // this fails closed.
        "fail_closed_after = \"20s\"\n",
        "on_gateway_loss = \"keep_last\"\n",
    );
    gw.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/plugins/sa/other",
        "--reason",
        "loss test",
    ]);
    let rainfall = hop.outbound_url("/clauses/c-flood-17/rainfall");
    assert_eq!(get(&rainfall).0, 200);
    gw.kill9();

    // The plugin sidecar, restarted while the gateway is down, still enforces the
    // snapshot it kept: the execution is open, the revocation holds.
    hop.plugin.proc.signal("KILL");
    let plugin_toml = std::fs::read_to_string(&hop.plugin.config).unwrap();
    let plugin_toml = plugin_toml.split("\n[admin]").next().unwrap().to_string();
    let _ = std::fs::remove_file(dir.path().join("plugin-sidecar-2.addresses.json"));
    let plugin = sidecar(dir.path(), "plugin-sidecar-2", &plugin_toml, true);
    let rainfall = format!(
        "http://{}/clauses/c-flood-17/rainfall",
        plugin.outbound("hazard")
    );
    eventually(Duration::from_secs(15), "keep_last sidecar serving", || {
        (get(&rainfall).0 == 200).then_some(())
    });
    let ready = curl(&[&format!("{}/ready", plugin.admin())]);
    assert!(
        String::from_utf8_lossy(&ready.stdout).contains("gateway: disconnected"),
        "{ready:?}"
    );
    assert!(
        plugin
            .proc
            .log_text()
            .contains("restored the last gateway snapshot"),
        "{}",
        plugin.proc.log_text()
    );

    // The data sidecar fails closed after 20 s without its gateway.
    eventually(
        Duration::from_secs(40),
        "data sidecar to fail closed",
        || (hop.data.ready_status() == 503).then_some(()),
    );
    let (status, body) = get(&rainfall);
    assert_eq!(status, 503, "the data sidecar refuses everything: {body}");
    assert!(
        hop.data
            .metrics()
            .contains("nexus_gateway_link{state=\"fail_closed\"} 1")
    );

    // Back: the gateway returns on the same port and the data sidecar reopens.
    gw.restart();
    eventually(Duration::from_secs(15), "data sidecar to reconnect", || {
        (hop.data.ready_status() == 200).then_some(())
    });
    eventually(Duration::from_secs(5), "requests flow again", || {
        (get(&rainfall).0 == 200).then_some(())
    });
    hop.plugin = plugin;
}

#[test]
fn bad_clients_are_cut_off_and_the_others_keep_being_served() {
    let dir = temp_dir("gateway-bad-input");
    let (gw, hop, _api) = stack(dir.path(), "[stream]\nmax_message_bytes = 4096\n", "", "");
    let rainfall = hop.outbound_url("/clauses/c-flood-17/rainfall");

    // An unknown operator.
    let out = gw.nexusctl_as(
        "nexus.local/flood-model",
        &["revoke", DATA_API_ID, "--reason", "x"],
    );
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("PERMISSION_DENIED") && err.contains("is not an operator"),
        "{err}"
    );
    assert!(gw.metric_sum("nexus_gateway_admin_denied_total") >= 1.0);
    // A malformed ID, with the reason.
    let out = gw.nexusctl_as(
        "nexus.local/operator",
        &["revoke", "spiffe://nexus.local/a/*/b"],
    );
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("INVALID_ARGUMENT") && err.contains("wildcard"),
        "{err}"
    );

    // A hello claiming another identity (grpc-go's client, the plugin's SVID).
    let out = gw.grpcurl_stream(
        "nexus.local/flood-model",
        &format!("{{\"hello\":{{\"spiffe_id\":\"{DATA_API_ID}\"}}}}"),
    );
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("PermissionDenied") && text.contains("hello claims"),
        "{text}"
    );
    // No hello first.
    let out = gw.grpcurl_stream("nexus.local/flood-model", "{\"ack\":{\"revision\":1}}");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("first message must be a hello"), "{text}");
    // An oversized message after a correct hello.
    let big = "x".repeat(8000);
    let out = gw.grpcurl_stream("nexus.local/flood-model",
        &format!(
            "{{\"hello\":{{\"spiffe_id\":\"{PLUGIN_ID}\"}}}} {{\"records\":{{\"batch\":1,\"lines\":[\"{big}\"]}}}}"
        ),
    );
    assert!(!out.status.success(), "{out:?}");
    // Garbage bytes on the gRPC port.
    let port = nexus_tests::stack::port_of(&gw.grpc());
    let _ = nexus_tests::raw_tcp(
        port,
        b"\x16\x03\x01garbage that is not TLS\r\n\r\n",
        Duration::from_secs(1),
    );
    let log = gw.proc.log_text();
    assert!(log.contains("claims another identity"), "{log}");
    assert!(
        gw.metric_sum("nexus_gateway_control_stream_errors_total{reason=\"identity_mismatch\"}")
            >= 1.0
    );
    assert!(
        gw.metric_sum("nexus_gateway_control_stream_errors_total{reason=\"handshake\"}") >= 1.0
    );

    // The real sidecars were never disturbed: a change still reaches both.
    gw.open_execution(PLUGIN_ID, "c-flood-17", "1m");
    gw.wait_in_sync(2);
    assert_eq!(get(&rainfall).0, 200);
}

/// A PostgreSQL for this test: `NEXUS_TEST_POSTGRES_URL` (scripts/test.sh starts one),
/// else one started here with scripts/postgres.sh. Each test gets its own database.
/// TLS is on; `ca` signed its certificate (`NEXUS_TEST_POSTGRES_CA` with a given URL).
struct Postgres {
    base: String,
    ca: std::path::PathBuf,
    own: Option<tempfile::TempDir>,
}

impl Postgres {
    fn start() -> Self {
        if let Ok(url) = std::env::var("NEXUS_TEST_POSTGRES_URL") {
            return Self {
                base: url,
                ca: std::env::var_os("NEXUS_TEST_POSTGRES_CA")
                    .expect("NEXUS_TEST_POSTGRES_CA with NEXUS_TEST_POSTGRES_URL")
                    .into(),
                own: None,
            };
        }
        let dir = tempfile::Builder::new()
            .prefix("nexus-pg")
            .tempdir_in("/tmp")
            .expect("pg dir");
        let data = dir.path().join("data");
        let base = nexus_tests::stdout_of(
            Command::new(repo_root().join("scripts/postgres.sh")).args([
                "start",
                &data.to_string_lossy(),
                &free_port().to_string(),
            ]),
            "scripts/postgres.sh start",
        );
        Self {
            base,
            ca: data.join("nexus-test-ca.pem"),
            own: Some(dir),
        }
    }

    /// Runs `sql` as the test user in `url`'s database; its unaligned output.
    fn query(url: &str, sql: &str) -> String {
        nexus_tests::stdout_of(
            Command::new("psql").args([url, "-qtAc", sql]),
            &format!("psql {sql}"),
        )
    }

    /// A new empty database; its URL.
    fn database(&self, name: &str) -> String {
        let admin = self
            .base
            .rsplit_once('/')
            .map(|(b, _)| format!("{b}/postgres"))
            .unwrap_or_default();
        let db = format!("{name}_{}", std::process::id());
        for sql in [
            format!("DROP DATABASE IF EXISTS {db}"),
            format!("CREATE DATABASE {db}"),
        ] {
            Self::query(&admin, &sql);
        }
        self.base
            .rsplit_once('/')
            .map(|(b, _)| format!("{b}/{db}"))
            .unwrap_or_default()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(dir) = &self.own {
            let _ = Command::new(repo_root().join("scripts/postgres.sh"))
                .args(["stop", &dir.path().join("data").to_string_lossy()])
                .output();
        }
    }
}

#[test]
fn two_gateways_on_postgresql_share_state_and_reach_each_others_sidecars() {
    let pg = Postgres::start();
    let url = pg.database("nexus_two_gateways");
    let dir = temp_dir("gateway-postgres");
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    // Each replica writes its status row every 200 ms; one silent for 1 s drops out.
    let status_timers = "status_report_interval = \"200ms\"\nstatus_stale_after = \"1s\"";
    let a = gateway(
        dir.path(),
        "gateway-a",
        &gw_api,
        Some(&url),
        None,
        status_timers,
    );
    // B polls only every 30 s: what reaches it fast comes through LISTEN/NOTIFY.
    let mut b = gateway(
        dir.path(),
        "gateway-b",
        &gw_api,
        Some(&url),
        None,
        &format!("poll_interval = \"30s\"\n{status_timers}"),
    );
    // The plugin's sidecar is on gateway B; changes are made through gateway A.
    let options = TwoHopOptions {
        data_toml: gateway_toml(&a, dir.path(), "data", ""),
        plugin_toml: format!(
            "{}\n{}",
            policy_toml(),
            gateway_toml(&b, dir.path(), "plugin", "")
        ),
        ..TwoHopOptions::default()
    };
    let hop = two_hop(dir.path(), &options);
    // Status through either replica lists both sidecars, each with the replica holding
    // its stream.
    for gw in [&a, &b] {
        let status = gw.wait_in_sync(2);
        let via: Vec<(&str, &str)> = status["sidecars"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| {
                (
                    x["spiffe_id"].as_str().unwrap(),
                    x["gateway"].as_str().unwrap(),
                )
            })
            .collect();
        assert_eq!(
            via,
            [(DATA_API_ID, "gateway-a"), (PLUGIN_ID, "gateway-b")],
            "{status}"
        );
        assert_eq!(
            status["replicas"].as_array().map(Vec::len),
            Some(2),
            "{status}"
        );
    }
    a.open_execution(PLUGIN_ID, "c-flood-17", "10m");
    let rainfall = hop.outbound_url("/clauses/c-flood-17/rainfall");
    eventually(
        Duration::from_secs(5),
        "execution opened via A to reach B's sidecar",
        || (get(&rainfall).0 == 200).then_some(()),
    );
    let started = Instant::now();
    a.nexusctl(&["revoke", PLUGIN_ID, "--reason", "via A"]);
    eventually(
        Duration::from_secs(5),
        "revocation via A enforced by B's sidecar",
        || (get(&rainfall).0 == 403).then_some(()),
    );
    let took = started.elapsed();
    eprintln!("revoke via gateway A -> refused by a sidecar of gateway B: {took:?}");
    // Well under B's 30 s poll: NOTIFY carried it.
    assert!(took < Duration::from_secs(3), "{took:?}");
    assert_eq!(
        b.status()["revoked"][0]["by"],
        nexus_tests::stack::OPERATOR_ID
    );
    // The revocation's propagation across both replicas: A's sidecar and B's, both
    // acknowledged, timed from the call at A to the last acknowledgement at B.
    let last = eventually(
        Duration::from_secs(5),
        "the revocation measured across both replicas",
        || {
            let last = a.status()["last_revocation"].clone();
            (last["replicas"] == 2 && last["all_acknowledged_after_ms"].is_number()).then_some(last)
        },
    );
    assert_eq!(
        (last["sidecars"].as_u64(), last["acknowledged"].as_u64()),
        (Some(2), Some(2)),
        "{last}"
    );
    assert_eq!(last["subject"], PLUGIN_ID);
    let across_ms = last["all_acknowledged_after_ms"].as_f64().unwrap();
    eprintln!("revocation acknowledged by both replicas' sidecars in {across_ms} ms");
    // Not a speed claim: the figure is consistent, between zero and the time this test
    // saw pass since just before the revoke (a unit or clock mix-up would break it).
    let observed_ms = started.elapsed().as_secs_f64() * 1000.0;
    assert!(
        across_ms > 0.0 && across_ms <= observed_ms,
        "{across_ms} ms vs {observed_ms} ms observed: {last}"
    );

    // Concurrent changes through both replicas get dense, distinct revisions.
    std::thread::scope(|scope| {
        for (name, gw) in [("a", &a), ("b", &b)] {
            scope.spawn(move || {
                for i in 0..8 {
                    gw.nexusctl(&[
                        "revoke",
                        &format!("spiffe://nexus.local/ns/c/sa/{name}{i}"),
                        "--reason",
                        "race",
                    ]);
                }
            });
        }
    });
    let end = 2 + 16; // open, revoke, then 16 revocations
    for gw in [&a, &b] {
        let status = eventually(
            Duration::from_secs(5),
            "both replicas at the last revision",
            || {
                let s = gw.status();
                (s["revision"].as_u64() == Some(end)).then_some(s)
            },
        );
        assert_eq!(
            status["revoked"].as_array().map(Vec::len),
            Some(17),
            "{status}"
        );
        assert_eq!(status["store"], "postgres");
    }
    a.wait_in_sync(2);
    b.wait_in_sync(2);

    // B killed with -9: it cannot say goodbye; A's status drops it once it is silent
    // for status_stale_after, and lists only its own sidecar.
    b.kill9();
    let status = eventually(Duration::from_secs(10), "B dropped from A's status", || {
        let s = a.status();
        (s["replicas"].as_array()?.len() == 1).then_some(s)
    });
    assert_eq!(status["replicas"][0]["gateway"], "gateway-a", "{status}");
    assert_eq!(
        status["sidecars"].as_array().map(Vec::len),
        Some(1),
        "{status}"
    );
    assert_eq!(status["sidecars"][0]["spiffe_id"], DATA_API_ID);

    // The other replicas cannot be read (here: their table is gone): status still shows
    // this replica, and says what it left out.
    Postgres::query(&url, "ALTER TABLE replicas RENAME TO replicas_gone");
    let status = a.status();
    assert!(
        status["warnings"][0]
            .as_str()
            .is_some_and(|w| w.contains("cannot read the other replicas")),
        "{status}"
    );
    assert_eq!(status["sidecars"][0]["spiffe_id"], DATA_API_ID, "{status}");
}

#[test]
fn the_gateway_reaches_postgresql_over_verified_tls() {
    let pg = Postgres::start();
    let url = pg.database("nexus_tls");
    let dir = temp_dir("gateway-postgres-tls");
    let app = format!("nexus-gateway-tls-{}", std::process::id());
    let tls_url = format!(
        "{url}?sslmode=verify-full&sslrootcert={}&application_name={app}",
        pg.ca.display()
    );
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(dir.path(), "gateway-tls", &gw_api, Some(&tls_url), None, "");
    gw.nexusctl(&["revoke", PLUGIN_ID, "--reason", "over TLS"]);
    assert_eq!(gw.status()["revoked"][0]["reason"], "over TLS");
    // Every connection the gateway holds (the pool and the LISTEN one) is TLS 1.3.
    let sessions = eventually(Duration::from_secs(10), "the gateway's sessions", || {
        let sessions = Postgres::query(
            &url,
            &format!(
                "SELECT s.ssl, s.version FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid) \
                 WHERE a.application_name = '{app}'"
            ),
        );
        (sessions.lines().count() >= 2).then_some(sessions)
    });
    let lines: Vec<&str> = sessions.lines().collect();
    assert!(lines.iter().all(|l| *l == "t|TLSv1.3"), "{sessions}");
    drop(gw);

    // A database whose certificate the configured CA did not sign: the gateway refuses
    // to start, naming the store, and writes nothing.
    let wrong_ca = repo_root().join("certs-dev/nexus.local/ca.pem");
    let config = dir.path().join("wrong-ca.toml");
    std::fs::write(
        &config,
        format!(
            "[identity]\nworkload_api_socket = {:?}\n\n[database]\nurl = {:?}\n",
            gw_api.url(),
            format!(
                "{url}?sslmode=verify-full&sslrootcert={}",
                wrong_ca.display()
            )
        ),
    )
    .unwrap();
    let out = nexus_tests::run_bounded(
        30,
        &nexus_tests::bin("nexus-gateway").to_string_lossy(),
        &["--config", &config.to_string_lossy()],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("cannot open the store"), "{stderr}");
    assert!(
        stderr.to_lowercase().contains("certificate"),
        "the reason names the certificate: {stderr}"
    );
}

/// A self-signed serving certificate for `localhost` (what cert-manager would issue).
fn serving_cert(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = dir.join("webhook.pem");
    let key = dir.join("webhook.key");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

#[test]
fn the_gateway_serves_the_admission_webhook_and_evicts_revoked_pods() {
    let dir = temp_dir("gateway-kube");
    let (cert, key) = serving_cert(dir.path());
    // The recording stand-in for the API server.
    let port_file = dir.path().join("api.port");
    let record = dir.path().join("api.jsonl");
    let _api = nexus_tests::Proc::spawn(
        "recording-api",
        dir.path(),
        Path::new("python3"),
        &[
            &repo_root()
                .join("tests/py/recording_api.py")
                .to_string_lossy(),
            &port_file.to_string_lossy(),
            &record.to_string_lossy(),
        ],
        &[],
    );
    let port = eventually(Duration::from_secs(10), "recording API port", || {
        std::fs::read_to_string(&port_file)
            .ok()?
            .trim()
            .parse::<u16>()
            .ok()
    });
    let token = dir.path().join("token");
    std::fs::write(&token, "test-token").unwrap();
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(
        dir.path(),
        "gateway",
        &gw_api,
        None,
        None,
        &format!(
            "\n[webhook]\nlisten = \"127.0.0.1:0\"\ncert = {cert:?}\nkey = {key:?}\n\n[webhook.inject]\nmax_review_bytes = 65536\n\n\
             [eviction]\napi_server = \"http://127.0.0.1:{port}\"\ntoken_file = {token:?}\nca_file = {token:?}\ndanger_allow_plain_http = true\nretry_interval = \"100ms\"\n"
        ),
    );
    let webhook = gw.addresses["webhook"].as_str().unwrap().to_string();
    let url = format!(
        "https://localhost:{}/inject",
        nexus_tests::stack::port_of(&webhook)
    );
    let resolve = format!(
        "localhost:{}:127.0.0.1",
        nexus_tests::stack::port_of(&webhook)
    );
    let post = |file: &Path| {
        let out = curl(&[
            "-s",
            "--cacert",
            &cert.to_string_lossy(),
            "--resolve",
            &resolve,
            "-H",
            "content-type: application/json",
            "--data-binary",
            &format!("@{}", file.display()),
            "-w",
            "\n%{http_code}",
            &url,
        ]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse::<u16>().unwrap_or(0), body.to_string())
    };
    // A Deployment's pod: allowed with a JSONPatch that adds the sidecar.
    let (status, body) = post(&repo_root().join("tests/kube/reviews/deployment-pod.json"));
    assert_eq!(status, 200, "{body}");
    let review: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(review["response"]["allowed"], true, "{body}");
    assert_eq!(review["response"]["patchType"], "JSONPatch", "{body}");
    // Malformed: a clear 400, never a 500.
    let (status, body) = post(&repo_root().join("tests/kube/reviews/malformed.json"));
    assert_eq!(status, 400, "{body}");
    // Oversized: 413.
    let big = dir.path().join("big.json");
    std::fs::write(&big, format!("{{\"pad\":\"{}\"}}", "x".repeat(70_000))).unwrap();
    assert_eq!(post(&big).0, 413);
    assert_eq!(
        curl_status(&[
            "--cacert",
            &cert.to_string_lossy(),
            "--resolve",
            &resolve,
            &url
        ]),
        405
    );

    // cert-manager renews the certificate in place: the next handshake presents the new
    // one, without a restart (the old CA no longer verifies it, the new one does).
    let old_cert = std::fs::read(&cert).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    let renewed = dir.path().join("renewed");
    std::fs::create_dir_all(&renewed).unwrap();
    let (new_cert, new_key) = serving_cert(&renewed);
    std::fs::copy(&new_key, &key).unwrap();
    std::fs::copy(&new_cert, &cert).unwrap();
    assert_ne!(old_cert, std::fs::read(&cert).unwrap());
    let (status, body) = post(&repo_root().join("tests/kube/reviews/job-pod.json"));
    assert_eq!(status, 200, "after renewal: {body}");
    assert!(gw.proc.log_text().contains("webhook certificate reloaded"));

    // Revocation reaches the pods: the workload's pods are listed and evicted; the one a
    // PodDisruptionBudget protects at first (429) is tried again and evicted.
    gw.nexusctl(&["revoke", PLUGIN_ID, "--reason", "evict me"]);
    let lines = eventually(Duration::from_secs(10), "eviction requests", || {
        let text = std::fs::read_to_string(&record).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        (lines.iter().filter(|l| l["method"] == "POST").count() >= 3).then_some(lines)
    });
    assert_eq!(lines[0]["method"], "GET");
    assert_eq!(lines[0]["path"], "/api/v1/namespaces/plugins/pods");
    assert!(
        lines[0]["query"]
            .as_str()
            .unwrap()
            .contains("spec.serviceAccountName%3Dflood-model"),
        "{}",
        lines[0]
    );
    assert_eq!(lines[0]["authorization"], "Bearer test-token");
    assert_eq!(
        lines[1]["path"],
        "/api/v1/namespaces/plugins/pods/flood-model-0/eviction"
    );
    assert_eq!(lines[1]["body"]["kind"], "Eviction");
    assert_eq!(lines[1]["body"]["apiVersion"], "policy/v1");
    let pod_1 = "/api/v1/namespaces/plugins/pods/flood-model-1/eviction";
    assert_eq!(lines[2]["path"], pod_1);
    assert_eq!(lines[3]["path"], pod_1, "the blocked pod is retried");
    eventually(
        Duration::from_secs(5),
        "the eviction outcome in the log",
        || {
            let log = gw.proc.log_text();
            let line = log
                .lines()
                .find(|l| l.contains("evicted the revoked workload's pods"))?;
            (line.contains("flood-model-1") && line.contains("blocked=[]")).then_some(())
        },
    );
    // A pattern never evicts (it names no single workload).
    gw.nexusctl(&[
        "revoke",
        "spiffe://nexus.local/ns/other/*",
        "--reason",
        "pattern",
    ]);
    std::thread::sleep(Duration::from_millis(500));
    let posts = std::fs::read_to_string(&record)
        .unwrap()
        .lines()
        .filter(|l| l.contains("\"POST\""))
        .count();
    assert_eq!(posts, 3);
}

#[test]
fn the_deployed_gateway_config_is_valid() {
    // The gateway.toml inside deploy/base/gateway-config.yaml, checked by the binary, with
    // its revocation policy folder where this checkout has it (in the cluster, the
    // ConfigMap made from policies/revocation/; tests/tests/rehearsal.rs starts the
    // gateway from the mounted files themselves).
    let dir = temp_dir("gateway-deploy-config");
    let toml = dir.path().join("gateway.toml");
    let out = Command::new("python3")
        .args([
            "-c",
            "import sys,yaml; d=yaml.safe_load(open(sys.argv[1])); open(sys.argv[2],'w').write(d['data']['gateway.toml'].replace('/etc/nexus/revocation-policy', sys.argv[3]))",
        ])
        .arg(repo_root().join("deploy/base/gateway-config.yaml"))
        .arg(&toml)
        .arg(repo_root().join("policies/revocation"))
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = Command::new(nexus_tests::bin("nexus-gateway"))
        .args(["--check", "--config"])
        .arg(&toml)
        .env("SPIFFE_ENDPOINT_SOCKET", "unix:///run/spire/agent.sock")
        .output()
        .expect("nexus-gateway");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A broken config exits 64 naming the field.
    std::fs::write(&toml, "listen = \"nowhere\"\n").unwrap();
    let out = Command::new(nexus_tests::bin("nexus-gateway"))
        .args(["--check", "--config"])
        .arg(&toml)
        .output()
        .expect("nexus-gateway");
    assert_eq!(out.status.code(), Some(64));
    assert!(String::from_utf8_lossy(&out.stderr).contains("listen"));
}

fn sqlite_count(db: &Path, sql: &str) -> u64 {
    let out = Command::new("python3")
        .args([
            "-c",
            "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute(sys.argv[2]).fetchone()[0])",
        ])
        .arg(db)
        .arg(sql)
        .output()
        .expect("python3 sqlite3");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// The two-hop stack whose plugin sidecar writes records to `records` and ships them to
/// `gw` with `shipping` (its `[gateway]` settings), in sync with the gateway.
fn recording_two_hop(dir: &Path, gw: &Gateway, records: &Path, shipping: &str) -> TwoHop {
    let options = TwoHopOptions {
        plugin_toml: format!(
            "[audit]\nsink = {{ file = {{ path = {:?} }} }}\n\n{}",
            records.to_string_lossy(),
            gateway_toml(gw, dir, "plugin", shipping)
        ),
        ..TwoHopOptions::default()
    };
    let hop = two_hop(dir, &options);
    gw.wait_in_sync(1);
    hop
}

#[test]
fn execution_records_reach_the_gateway_once_each_across_a_kill_9() {
    let dir = temp_dir("gateway-records");
    let records = dir.path().join("plugin-records.jsonl");
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let mut gw = gateway(
        dir.path(),
        "gateway",
        &gw_api,
        None,
        Some(&format!("127.0.0.1:{}", free_port())),
        "",
    );
    let hop = recording_two_hop(
        dir.path(),
        &gw,
        &records,
        "ship_interval = \"200ms\"\nrecord_batch = 7\n",
    );
    let url = hop.outbound_url("/healthz");
    for _ in 0..30 {
        assert_eq!(get(&url).0, 200);
    }
    let db = dir.path().join("gateway.db");
    eventually(Duration::from_secs(15), "30 records stored", || {
        (sqlite_count(&db, "SELECT COUNT(*) FROM records") >= 30).then_some(())
    });
    // The gateway dies; the sidecar keeps recording; nothing is lost or doubled.
    gw.kill9();
    for _ in 0..20 {
        assert_eq!(get(&url).0, 200);
    }
    gw.restart();
    let lines = || {
        std::fs::read_to_string(&records)
            .unwrap_or_default()
            .lines()
            .count() as u64
    };
    eventually(Duration::from_secs(20), "every record line stored", || {
        let stored = sqlite_count(&db, "SELECT COUNT(*) FROM records");
        (stored == lines() && stored >= 50).then_some(())
    });
    assert_eq!(
        sqlite_count(&db, "SELECT COUNT(DISTINCT hash) FROM records"),
        lines()
    );
    assert!(hop.plugin.metric_sum("nexus_records_shipped_total") >= 50.0);
}

/// A sidecar that writes more records per `ship_interval` than fit in one
/// `record_batch` still ships them all promptly: after a full batch the next goes as
/// soon as the gateway acknowledged it. (Shipping one batch per tick, 5 records every
/// 2 s here, would take 40 s for these 100 records, and under real load it fell
/// behind for good until the file rotated records out unshipped.)
#[test]
fn records_written_faster_than_one_batch_per_tick_reach_the_gateway_promptly() {
    let dir = temp_dir("gateway-records-keep-up");
    let records = dir.path().join("plugin-records.jsonl");
    let gw_api = workload_api(dir.path(), "gateway-workload-api", GATEWAY_ID, &[]);
    let gw = gateway(dir.path(), "gateway", &gw_api, None, None, "");
    let hop = recording_two_hop(
        dir.path(),
        &gw,
        &records,
        "ship_interval = \"2s\"\nrecord_batch = 5\n",
    );
    let url = hop.outbound_url("/healthz");
    for _ in 0..100 {
        assert_eq!(get(&url).0, 200);
    }
    let written = std::time::Instant::now();
    let db = dir.path().join("gateway.db");
    eventually(Duration::from_secs(60), "100 records stored", || {
        (sqlite_count(&db, "SELECT COUNT(*) FROM records") >= 100).then_some(())
    });
    let took = written.elapsed();
    assert!(
        took < Duration::from_secs(12),
        "100 records in batches of 5 took {took:?} to reach the gateway (one batch per 2 s tick would take 40 s)"
    );
}

/// The README's first command: `nexusctl up` on the embedded defaults, and the demo it
/// prints (allowed, denied by policy, revoke -> refused -> reinstate -> allowed), driven
/// with the plain `nexusctl` commands it suggests (no flags: its state file), then
/// Ctrl-C stops every process it started.
#[test]
fn nexusctl_up_runs_the_local_stack_and_its_revocation_demo() {
    let dir = temp_dir("nexusctl-up");
    let home = dir.path().join("home");
    let home_str = home.to_string_lossy().into_owned();
    let envs = [("NEXUS_HOME", home_str.as_str())];
    let mut up = nexus_tests::Proc::spawn(
        "nexusctl-up",
        dir.path(),
        &nexus_tests::bin("nexusctl"),
        &["up"],
        &envs,
    );
    let state_file = home.join("up/state.json");
    let state: serde_json::Value = eventually(Duration::from_secs(60), "nexusctl up ready", || {
        let text = std::fs::read_to_string(&state_file).ok()?;
        let state: serde_json::Value = serde_json::from_str(&text).ok()?;
        up.log_text()
            .contains("Press Ctrl-C to stop.")
            .then_some(state)
    });
    let nexusctl = |args: &[&str]| {
        nexus_tests::stdout_of(
            Command::new(nexus_tests::bin("nexusctl"))
                .args(args)
                .env("NEXUS_HOME", &home),
            &format!("nexusctl {args:?}"),
        )
    };
    let plugin = state["plugin_outbound_url"].as_str().unwrap().to_string();
    let read = |path: &str| {
        let out = curl(&["-s", "-w", "\n%{http_code}", &format!("{plugin}{path}")]);
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        (code.parse::<u16>().unwrap_or(0), body.to_string())
    };
    assert_eq!(read("/clauses/c-flood-17/rainfall").0, 200);
    assert_eq!(read("/clauses/c-flood-18/rainfall").0, 403);
    assert_eq!(read("/clauses/c-quake-3/magnitude").0, 403);
    // The demo plugin is registered and certified (docs/registry.md), and the demo's
    // execution runs that version.
    let plugins: serde_json::Value =
        serde_json::from_str(&nexusctl(&["plugin", "list", "-o", "json"])).unwrap();
    assert_eq!(plugins[0]["name"], "flood-model", "{plugins}");
    assert_eq!(plugins[0]["versions"][0]["state"], "certified", "{plugins}");
    assert!(
        up.log_text()
            .contains("Plugin registry (only certified versions run): flood-model v1.0.0")
    );
    let execs: serde_json::Value =
        serde_json::from_str(&nexusctl(&["exec", "list", "-o", "json"])).unwrap();
    assert_eq!(execs[0]["plugin_version"], "1.0.0", "{execs}");
    // Straight to the data API's sidecar with the plugin's dev SVID; without one, refused.
    let direct = format!(
        "{}/clauses/c-flood-17/rainfall",
        state["data_api_inbound_url"].as_str().unwrap()
    );
    let ca = state["ca_bundle"].as_str().unwrap();
    assert_eq!(
        curl_status(&[
            "--cacert",
            ca,
            "--cert",
            state["client_cert"].as_str().unwrap(),
            "--key",
            state["client_key"].as_str().unwrap(),
            &direct
        ]),
        200
    );
    assert_eq!(curl_status(&["--cacert", ca, &direct]), 0);

    // The revocation demo, as printed: each line run by a shell whose PATH does not hold
    // target/debug (the quick start does not put nexusctl on PATH).
    let printed = up.log_text();
    let printed_line = |needle: &str| -> String {
        printed
            .lines()
            .map(str::trim)
            .find(|l| l.contains("nexusctl ") && l.contains(needle))
            .unwrap_or_else(|| panic!("nexusctl up printed no `{needle}` command:\n{printed}"))
            .to_string()
    };
    let as_printed = |line: &str| {
        nexus_tests::stdout_of(
            Command::new("sh")
                .arg("-c")
                .arg(line)
                .env("NEXUS_HOME", &home)
                .env("PATH", "/usr/bin:/bin"),
            line,
        )
    };
    let revoke_line = printed_line(" revoke ");
    assert!(
        revoke_line.starts_with(&nexus_tests::bin("nexusctl").to_string_lossy().into_owned()),
        "printed with the full path: {revoke_line}"
    );
    let revoked = as_printed(&revoke_line);
    assert!(
        revoked.contains("acknowledged by all 2 sidecars"),
        "{revoked}"
    );
    let (code, body) = read("/clauses/c-flood-17/rainfall");
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("revoked"), "{body}");
    assert!(as_printed(&printed_line(" status")).contains("REVOKED (1)"));
    let status: serde_json::Value =
        serde_json::from_str(&nexusctl(&["status", "-o", "json"])).unwrap();
    assert_eq!(
        status["sidecars"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    assert_eq!(status["revoked"][0]["subject"], PLUGIN_ID, "{status}");
    as_printed(&printed_line(" reinstate "));
    assert_eq!(read("/clauses/c-flood-17/rainfall").0, 200);
    assert!(as_printed(&printed_line(" exec list")).contains("c-flood-17"));
    let opened = as_printed(&printed_line(" exec open "));
    assert!(opened.starts_with("ex-"), "{opened}");
    assert_eq!(read("/clauses/c-flood-18/rainfall").0, 200);
    // Every request left a record, and the chain verifies (the printed command).
    as_printed(&printed_line(" audit verify "));
    let records = state["record_files"]["data-sidecar"].as_str().unwrap();
    nexusctl(&["audit", "verify", records]);

    // Ctrl-C: nexusctl up and everything it started are gone.
    up.signal("INT");
    eventually(Duration::from_secs(20), "nexusctl up to exit", || {
        (!up.is_running()).then_some(())
    });
    for (name, pid) in state["pids"].as_object().unwrap() {
        let alive = Path::new(&format!("/proc/{pid}")).exists()
            && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .unwrap_or_default()
                .contains(") Z ");
        assert!(!alive, "{name} (pid {pid}) still runs after Ctrl-C");
    }
}
