//! nexus-sidecar end to end: the real binaries on 127.0.0.1 port 0, driven by real peers
//! (curl, grpcurl, openssl s_client, raw python3 sockets). Each test builds its own
//! stack in its own temp dir; the reference stack is [`stack::two_hop`]:
//!
//! ```text
//! curl ──plain──▶ plugin sidecar (outbound) ──mTLS──▶ data sidecar (inbound) ──▶ data API
//! ```
//!
//! Needs `cargo build --workspace --bins` first and the peers from
//! `tests/requirements.txt` (`scripts/test.sh` does both).

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use nexus_tests::stack::{
    self, DATA_API_ID, PLUGIN_ID, TwoHop, TwoHopOptions, inbound_curl_args, two_hop,
};
use nexus_tests::{
    Proc, bin, cert, cert_fingerprint, cert_fingerprint_pem, cert_uri_san, curl, curl_status,
    eventually, presented_leaf, raw_tcp, run_bounded, temp_dir,
};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(20);
const FLOOD: &str = "nexus.local/flood-model";
const PARTNER_ID: &str = "spiffe://partner.example/ns/plugins/sa/partner-model";

fn s(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

/// curl `args`, expecting a JSON body; returns (status, body).
fn curl_json(args: &[&str]) -> (u16, Value) {
    let mut all = vec!["-w", "\n%{http_code}"];
    all.extend_from_slice(args);
    let out = curl(&all);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    let status = status.trim().parse().unwrap_or(0);
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_string()));
    (status, body)
}

/// GET through the data sidecar's inbound as `identity`.
fn get_inbound(hop: &TwoHop, identity: &str, extra: &[&str], path: &str) -> (u16, Value) {
    let args = hop.inbound_args(Some(identity));
    let url = hop.inbound_url(path);
    let mut all = s(&args);
    all.extend_from_slice(extra);
    all.push(&url);
    curl_json(&all)
}

/// GET through the plugin sidecar's outbound.
fn get_outbound(hop: &TwoHop, extra: &[&str], path: &str) -> (u16, Value) {
    let url = hop.outbound_url(path);
    let mut all = extra.to_vec();
    all.push(&url);
    curl_json(&all)
}

/// `By=...;Hash=...;URI=...` as a map.
fn xfcc_fields(value: &str) -> BTreeMap<String, String> {
    value
        .split(';')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

fn only_xfcc(body: &Value) -> BTreeMap<String, String> {
    let all = body["xfcc"].as_array().cloned().unwrap_or_default();
    assert_eq!(
        all.len(),
        1,
        "exactly one XFCC value reaches the app: {body}"
    );
    xfcc_fields(all[0].as_str().unwrap_or_default())
}

fn assert_caller(body: &Value, caller: &str, by: &str) {
    let fields = only_xfcc(body);
    assert_eq!(
        fields.get("URI").map(String::as_str),
        Some(caller),
        "{body}"
    );
    assert_eq!(fields.get("By").map(String::as_str), Some(by), "{body}");
    assert_eq!(
        fields.get("Hash").map(String::len),
        Some(64),
        "Hash is a sha256: {body}"
    );
}

const INBOUND_GET_200: &str =
    r#"nexus_requests_total{direction="inbound",method="GET",status="200"}"#;
const INBOUND_REQUESTS: &str = r#"nexus_requests_total{direction="inbound""#;

fn handshake_failures(reason: &str) -> String {
    format!(r#"nexus_tls_handshake_failures_total{{direction="inbound",reason="{reason}"}}"#)
}

fn connection_errors(direction: &str, reason: &str) -> String {
    format!(r#"nexus_connection_errors_total{{direction="{direction}",reason="{reason}"}}"#)
}

// 1 ------------------------------------------------------------------------------------

#[test]
fn requests_cross_both_hops_over_http1_and_http2() {
    let dir = temp_dir("both-hops");
    let hop = two_hop(dir.path(), &TwoHopOptions::default());

    for (extra, version) in [
        (&["--http1.1"][..], "HTTP/1.1"),
        (&["--http2"][..], "HTTP/2.0"),
    ] {
        let (status, body) = get_inbound(&hop, FLOOD, extra, "/clauses/c-flood-17/rainfall");
        assert_eq!(status, 200, "inbound {extra:?}: {body}");
        assert_eq!(body["clause"], "c-flood-17", "{body}");
        let caller = xfcc_fields(body["caller"].as_str().unwrap_or_default());
        assert_eq!(caller.get("URI").map(String::as_str), Some(PLUGIN_ID));
        assert_eq!(caller.get("By").map(String::as_str), Some(DATA_API_ID));
        // curl's own certificate is what the inbound authenticated.
        let hash = cert_fingerprint(&cert("nexus.local/flood-model.pem")).expect("fingerprint");
        assert_eq!(caller.get("Hash"), Some(&hash), "{body}");

        let (status, body) = get_inbound(&hop, FLOOD, extra, "/headers");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["version"], version,
            "inbound {extra:?} reaches the app as {version}"
        );
        assert_caller(&body, PLUGIN_ID, DATA_API_ID);
    }

    for (extra, version) in [
        (&["--http1.1"][..], "HTTP/1.1"),
        (&["--http2-prior-knowledge"][..], "HTTP/2.0"),
    ] {
        let (status, body) = get_outbound(&hop, extra, "/clauses/c-flood-17/rainfall");
        assert_eq!(status, 200, "outbound {extra:?}: {body}");
        assert_eq!(body["clause"], "c-flood-17", "{body}");
        let caller = xfcc_fields(body["caller"].as_str().unwrap_or_default());
        assert_eq!(caller.get("URI").map(String::as_str), Some(PLUGIN_ID));
        assert_eq!(caller.get("By").map(String::as_str), Some(DATA_API_ID));

        let (status, body) = get_outbound(&hop, extra, "/headers");
        assert_eq!(status, 200, "{body}");
        assert_eq!(
            body["version"], version,
            "outbound {extra:?} reaches the app as {version}"
        );
        assert_caller(&body, PLUGIN_ID, DATA_API_ID);
    }

    // 4 direct + 4 via the plugin sidecar reached the app; the plugin sidecar sent 4.
    hop.data.wait_metric(INBOUND_GET_200, 8.0, WAIT);
    hop.plugin.wait_metric(
        r#"nexus_requests_total{direction="outbound",method="GET",status="200"}"#,
        4.0,
        WAIT,
    );
    assert_eq!(hop.data.metric_sum(INBOUND_GET_200), 8.0);
}

// 2 ------------------------------------------------------------------------------------

#[test]
fn refused_peers_get_no_http_and_are_counted_by_reason() {
    let dir = temp_dir("refused");
    // The CA given explicitly: no default partner.example federation, so the partner's
    // certificate is from an unknown trust domain here.
    let ca = cert("nexus.local/ca.pem").to_string_lossy().into_owned();
    let ca_key = cert("nexus.local/ca.key").to_string_lossy().into_owned();
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_workload_api_args: vec!["--ca-cert".into(), ca, "--ca-key".into(), ca_key],
            ..TwoHopOptions::default()
        },
    );
    let url = hop.inbound_url("/headers");

    let cases: [(Option<&str>, &str); 6] = [
        (None, "no_client_certificate"),
        (Some("rogue/flood-model"), "unknown_issuer"),
        (Some("nexus.local/expired"), "expired"),
        (Some("nexus.local/not-yet-valid"), "not_yet_valid"),
        (
            Some("partner.example/partner-model"),
            "unknown_trust_domain",
        ),
        (Some("nexus.local/intruder"), "peer_not_allowed"),
    ];
    for (identity, reason) in cases {
        let counter = handshake_failures(reason);
        let before = hop.data.metric_sum(&counter);
        let args = hop.inbound_args(identity);
        let mut all = s(&args);
        all.push(&url);
        let status = curl_status(&all);
        assert_eq!(status, 0, "{identity:?} must get no HTTP response");
        hop.data.wait_metric(&counter, before + 1.0, WAIT);
        assert_eq!(
            hop.data.metric_sum(INBOUND_REQUESTS),
            0.0,
            "{identity:?}: nothing may reach the app"
        );
    }

    // The same sidecar still serves an allowed peer.
    let (status, body) = get_inbound(&hop, FLOOD, &[], "/headers");
    assert_eq!(status, 200, "{body}");
    assert_eq!(hop.data.metric_sum(INBOUND_REQUESTS), 1.0);
}

// 3 ------------------------------------------------------------------------------------

#[test]
fn federated_partner_is_authenticated_but_needs_an_allow_entry() {
    let dir = temp_dir("federation");
    let d = dir.path();
    let ca = cert("nexus.local/ca.pem").to_string_lossy().into_owned();
    let ca_key = cert("nexus.local/ca.key").to_string_lossy().into_owned();
    let federate = format!(
        "partner.example={}",
        cert("partner.example/ca.pem").display()
    );
    // An explicit CA turns the embedded default federation off, so only --federate
    // brings the partner bundle.
    let wl = stack::workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &[
            "--dns-name",
            "localhost",
            "--ca-cert",
            &ca,
            "--ca-key",
            &ca_key,
            "--federate",
            &federate,
        ],
    );
    let app = stack::data_api(d);
    let inbound = |name: &str, allowed: &str| {
        stack::sidecar(
            d,
            name,
            &format!(
                "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [{allowed:?}]\n",
                wl.url(),
                app.http
            ),
            true,
        )
    };
    let partner_ok = inbound("partner-allowed", PARTNER_ID);
    let local_only = inbound("local-only", "spiffe://nexus.local/*");

    let call = |sidecar: &stack::Sidecar| {
        let args = inbound_curl_args(
            sidecar.inbound_port(),
            Some("partner.example/partner-model"),
        );
        let url = format!("https://localhost:{}/headers", sidecar.inbound_port());
        let mut all = s(&args);
        all.push(&url);
        curl_json(&all)
    };

    let (status, body) = call(&partner_ok);
    assert_eq!(status, 200, "{body}");
    assert_caller(&body, PARTNER_ID, DATA_API_ID);

    let counter = handshake_failures("peer_not_allowed");
    let (status, body) = call(&local_only);
    assert_eq!(status, 0, "{body}");
    local_only.wait_metric(&counter, 1.0, WAIT);
    assert_eq!(local_only.metric_sum(INBOUND_REQUESTS), 0.0);
    assert_eq!(
        local_only.metric_sum(&handshake_failures("unknown_trust_domain")),
        0.0,
        "the partner bundle is known: it is the allow list that refuses"
    );
}

// 4 ------------------------------------------------------------------------------------

/// What [`mismatch_response`] leaves running (dropped in field order, the dir last).
struct Mismatch {
    body: Value,
    _plugin2: stack::Sidecar,
    _workload_api: stack::WorkloadApi,
    _hop: TwoHop,
    _dir: tempfile::TempDir,
}

/// A two-hop stack plus a second plugin sidecar whose outbound `hazard` expects
/// `expected_id` from the same data sidecar; checks the 502 and that the upstream saw
/// nothing.
fn mismatch_response(name: &str, expected_id: &str) -> Mismatch {
    let dir = temp_dir(name);
    let hop = two_hop(dir.path(), &TwoHopOptions::default());
    let wl = stack::workload_api(dir.path(), "plugin2-workload-api", PLUGIN_ID, &[]);
    let plugin2 = stack::sidecar(
        dir.path(),
        "plugin2-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = {:?}\nexpected_id = {expected_id:?}\n",
            wl.url(),
            hop.data.inbound()
        ),
        true,
    );
    let (status, body) = curl_json(&[&format!(
        "http://{}/clauses/c-flood-17/rainfall",
        plugin2.outbound("hazard")
    )]);
    assert_eq!(status, 502, "{body}");
    plugin2.wait_metric(
        r#"nexus_requests_total{direction="outbound",method="GET",status="502"}"#,
        1.0,
        WAIT,
    );
    assert_eq!(
        hop.data.metric_sum(INBOUND_REQUESTS),
        0.0,
        "the upstream must not see a request"
    );
    Mismatch {
        body,
        _plugin2: plugin2,
        _workload_api: wl,
        _hop: hop,
        _dir: dir,
    }
}

const OTHER_API_ID: &str = "spiffe://nexus.local/ns/data/sa/other-api";

#[test]
fn outbound_refuses_an_upstream_with_another_identity() {
    let text = mismatch_response("mismatch", OTHER_API_ID).body.to_string();
    assert!(text.to_lowercase().contains("mismatch"), "{text}");
    assert!(text.contains(OTHER_API_ID), "names the expected ID: {text}");
    assert!(text.contains(DATA_API_ID), "names the presented ID: {text}");
}

#[test]
fn outbound_mismatch_says_identity_rejected_in_plain_words() {
    let body = mismatch_response("mismatch-words", OTHER_API_ID).body;
    assert_eq!(body["error"], "upstream identity rejected", "{body}");
    let detail = body["detail"].as_str().unwrap_or_default();
    assert!(
        detail.contains(&format!("expected {OTHER_API_ID}")),
        "{detail}"
    );
    assert!(
        detail.contains(&format!("presented {DATA_API_ID}")),
        "{detail}"
    );
}

// 5 ------------------------------------------------------------------------------------

fn leaf_fingerprint(port: u16) -> String {
    let pem = presented_leaf(
        port,
        &cert("nexus.local/flood-model.pem"),
        &cert("nexus.local/flood-model.key"),
    )
    .expect("the inbound presents a certificate");
    assert_eq!(cert_uri_san(&pem).as_deref(), Some(DATA_API_ID));
    cert_fingerprint_pem(&pem).expect("fingerprint")
}

#[test]
fn svid_rotation_keeps_a_long_http2_stream_and_changes_the_next_leaf() {
    let dir = temp_dir("rotation-stream");
    let hop = two_hop(dir.path(), &TwoHopOptions::default());
    let port = hop.data.inbound_port();
    let before = leaf_fingerprint(port);
    let expiry_before = hop.data.metric_sum("nexus_svid_expiry_timestamp_seconds");

    let args = hop.inbound_args(Some(FLOOD));
    let url = hop.inbound_url("/stream?chunks=40&interval_ms=100");
    let mut all = vec![
        "-sS",
        "--max-time",
        "30",
        "--http2",
        "-N",
        "-w",
        "\nversion=%{http_version}\n",
    ];
    all.extend(s(&args));
    all.push(&url);
    let mut stream = Proc::spawn("curl-stream", dir.path(), Path::new("curl"), &all, &[]);
    let lines = |p: &Proc| {
        p.log_text()
            .lines()
            .filter(|l| l.starts_with("{\"chunk\""))
            .count()
    };
    eventually(WAIT, "the stream to start", || {
        (lines(&stream) >= 5).then_some(())
    });

    hop.data_workload_api.proc.signal("HUP");
    hop.data
        .wait_metric("nexus_svid_rotations_total", 1.0, Duration::from_secs(10));
    let at_rotation = lines(&stream);
    assert!(
        at_rotation < 40,
        "the rotation must land mid-stream (saw {at_rotation} lines already)"
    );

    let status = eventually(WAIT, "the stream to end", || {
        stream.child.try_wait().ok().flatten()
    });
    let log = stream.log_text();
    assert!(status.success(), "curl failed ({status}): {log}");
    let got: Vec<String> = log
        .lines()
        .filter(|l| l.starts_with("{\"chunk\""))
        .map(String::from)
        .collect();
    let want: Vec<String> = (0..40).map(|i| format!("{{\"chunk\":{i}}}")).collect();
    assert_eq!(got, want, "all 40 lines in order");
    assert!(log.contains("version=2\n"), "the stream was HTTP/2: {log}");

    let after = leaf_fingerprint(port);
    assert_ne!(
        before, after,
        "the next handshake presents the rotated leaf"
    );
    let expiry_after = hop.data.metric_sum("nexus_svid_expiry_timestamp_seconds");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs_f64();
    assert!(
        expiry_after >= expiry_before && expiry_after > now && expiry_after <= now + 3700.0,
        "SVID expiry gauge {expiry_before} -> {expiry_after} (now {now}, ttl 1h)"
    );
}

#[test]
fn sequential_requests_survive_repeated_rotations() {
    let dir = temp_dir("rotation-loop");
    let hop = two_hop(dir.path(), &TwoHopOptions::default());
    let args = hop.inbound_args(Some(FLOOD));
    let inbound_url = hop.inbound_url("/clauses/c-flood-17/rainfall");
    let outbound_url = hop.outbound_url("/clauses/c-flood-17/rainfall");
    let mut direct = s(&args);
    direct.push(&inbound_url);

    let done = AtomicBool::new(false);
    let mut failures = Vec::new();
    let mut hups = 0;
    std::thread::scope(|scope| {
        let rotator = scope.spawn(|| {
            let mut sent = 0;
            // Rotate both workloads every 150 ms while the requests run (at most 20 times).
            while !done.load(Ordering::Relaxed) && sent < 20 {
                std::thread::sleep(Duration::from_millis(150));
                hop.data_workload_api.proc.signal("HUP");
                hop.plugin_workload_api.proc.signal("HUP");
                sent += 1;
            }
            sent
        });
        for i in 0..50 {
            // Direct calls make a new handshake each time; outbound calls go through
            // the plugin sidecar's pooled connection.
            let status = if i % 2 == 0 {
                curl_status(&direct)
            } else {
                curl_status(&[&outbound_url])
            };
            if status != 200 {
                failures.push((i, status));
            }
        }
        done.store(true, Ordering::Relaxed);
        hups = rotator.join().expect("rotator");
    });
    assert!(
        failures.is_empty(),
        "failed requests (index, status): {failures:?}"
    );
    assert!(hups >= 3, "only {hups} rotations happened during the loop");
    hop.data
        .wait_metric("nexus_svid_rotations_total", 3.0, Duration::from_secs(10));
    hop.plugin
        .wait_metric("nexus_svid_rotations_total", 3.0, Duration::from_secs(10));
}

// 6 ------------------------------------------------------------------------------------

const HEALTH_PROTO: &str = r#"syntax = "proto3";
package grpc.health.v1;
message HealthCheckRequest { string service = 1; }
message HealthCheckResponse {
  enum ServingStatus { UNKNOWN = 0; SERVING = 1; NOT_SERVING = 2; SERVICE_UNKNOWN = 3; }
  ServingStatus status = 1;
}
service Health {
  rpc Check(HealthCheckRequest) returns (HealthCheckResponse);
  rpc Watch(HealthCheckRequest) returns (stream HealthCheckResponse);
}
"#;

const REFLECTION_V1_PROTO: &str = r#"syntax = "proto3";
package grpc.reflection.v1;
service ServerReflection {
  rpc ServerReflectionInfo(stream ServerReflectionRequest) returns (stream ServerReflectionResponse);
}
message ServerReflectionRequest {
  string host = 1;
  oneof message_request {
    string file_by_filename = 3;
    string file_containing_symbol = 4;
    ExtensionRequest file_containing_extension = 5;
    string all_extension_numbers_of_type = 6;
    string list_services = 7;
  }
}
message ExtensionRequest { string containing_type = 1; int32 extension_number = 2; }
message ServerReflectionResponse {
  string valid_host = 1;
  ServerReflectionRequest original_request = 2;
  oneof message_response {
    FileDescriptorResponse file_descriptor_response = 4;
    ExtensionNumberResponse all_extension_numbers_response = 5;
    ListServiceResponse list_services_response = 6;
    ErrorResponse error_response = 7;
  }
}
message FileDescriptorResponse { repeated bytes file_descriptor_proto = 1; }
message ExtensionNumberResponse { string base_type_name = 1; repeated int32 extension_number = 2; }
message ListServiceResponse { repeated ServiceResponse service = 1; }
message ServiceResponse { string name = 1; }
message ErrorResponse { int32 error_code = 1; string error_message = 2; }
"#;

/// grpcurl with `args`; returns (exit code, stdout, stderr).
fn grpcurl(args: &[&str]) -> (i32, String, String) {
    let out = run_bounded(30, "grpcurl", args);
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The gRPC checks against one target; `conn` are grpcurl's connection flags.
fn grpc_checks(conn: &[&str], target: &str, protos: &str, what: &str) {
    fn with<'a>(
        conn: &[&'a str],
        protos: &'a str,
        file: &'a str,
        rest: &[&'a str],
    ) -> Vec<&'a str> {
        let mut v = conn.to_vec();
        v.extend(["-import-path", protos, "-proto", file]);
        v.extend_from_slice(rest);
        v
    }

    // Reflection: a bidirectional stream with two requests in, two responses out.
    let (code, out, err) = grpcurl(&with(
        conn,
        protos,
        "reflection.proto",
        &[
            "-d",
            r#"{"list_services":""} {"file_containing_symbol":"grpc.health.v1.Health"}"#,
            target,
            "grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        ],
    ));
    assert_eq!(code, 0, "{what} reflection: {err}");
    assert!(
        out.contains("\"name\": \"grpc.health.v1.Health\""),
        "{what}: {out}"
    );
    assert!(out.contains("fileDescriptorProto"), "{what}: {out}");

    // Unary; grpcurl exits 0 only if the OK status arrived in the trailers.
    let (code, out, err) = grpcurl(&with(
        conn,
        protos,
        "health.proto",
        &[
            "-d",
            r#"{"service":"nexus.demo"}"#,
            target,
            "grpc.health.v1.Health/Check",
        ],
    ));
    assert_eq!(code, 0, "{what} Check: {err}");
    assert!(out.contains("\"status\": \"SERVING\""), "{what}: {out}");

    // A non-OK status travels back too (a trailers-only response).
    let (code, _, err) = grpcurl(&with(
        conn,
        protos,
        "health.proto",
        &[
            "-d",
            r#"{"service":"no.such.service"}"#,
            target,
            "grpc.health.v1.Health/Check",
        ],
    ));
    assert_ne!(code, 0, "{what}: unknown service must fail");
    assert!(err.contains("NotFound"), "{what}: {err}");

    // Server stream: stays open until -max-time (DeadlineExceeded), one message first.
    let (_, out, err) = grpcurl(&with(
        conn,
        protos,
        "health.proto",
        &[
            "-max-time",
            "2",
            "-d",
            r#"{"service":"nexus.demo"}"#,
            target,
            "grpc.health.v1.Health/Watch",
        ],
    ));
    assert!(
        out.contains("\"status\": \"SERVING\""),
        "{what} Watch: {out} {err}"
    );
}

#[test]
fn grpc_crosses_both_hops() {
    let dir = temp_dir("grpc");
    let protos = dir.path().join("protos");
    std::fs::create_dir_all(&protos).expect("protos dir");
    std::fs::write(protos.join("health.proto"), HEALTH_PROTO).expect("write proto");
    std::fs::write(protos.join("reflection.proto"), REFLECTION_V1_PROTO).expect("write proto");
    let protos = protos.to_string_lossy().into_owned();
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            grpc_app: true,
            ..TwoHopOptions::default()
        },
    );

    let outbound = hop.plugin.outbound("hazard");
    grpc_checks(&["-plaintext"], &outbound, &protos, "via the outbound");

    // grpcurl cannot check a SPIFFE ID, so it skips server verification (-insecure);
    // the sidecar still verifies grpcurl's client certificate.
    let c = cert("nexus.local/flood-model.pem")
        .to_string_lossy()
        .into_owned();
    let k = cert("nexus.local/flood-model.key")
        .to_string_lossy()
        .into_owned();
    let inbound = hop.data.inbound();
    grpc_checks(
        &["-insecure", "-cert", &c, "-key", &k],
        &inbound,
        &protos,
        "on the inbound",
    );

    // Every one of those calls was HTTP/2 POST through the inbound (all reached the app).
    let posts = hop
        .data
        .metric_sum(r#"nexus_requests_total{direction="inbound",method="POST",status="200"}"#);
    assert!(posts >= 8.0, "inbound POSTs: {posts}");
}

#[test]
fn grpcurl_reflection_lists_services_via_both_hops() {
    let dir = temp_dir("grpc-list");
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            grpc_app: true,
            ..TwoHopOptions::default()
        },
    );
    let outbound = hop.plugin.outbound("hazard");
    let (code, out, err) = grpcurl(&["-plaintext", &outbound, "list"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.lines().any(|l| l == "grpc.health.v1.Health"), "{out}");
    let (code, out, err) = grpcurl(&[
        "-plaintext",
        "-d",
        r#"{"service":"nexus.demo"}"#,
        &outbound,
        "grpc.health.v1.Health/Check",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("SERVING"), "{out}");
}

// 7 ------------------------------------------------------------------------------------

#[test]
fn a_100_mib_upload_streams_through_both_hops_in_bounded_memory() {
    let dir = temp_dir("upload");
    let hop = two_hop(dir.path(), &TwoHopOptions::default());
    let file = dir.path().join("body.bin");
    let made = Command::new("head")
        .args(["-c", &(100 * 1024 * 1024).to_string(), "/dev/urandom"])
        .stdout(std::fs::File::create(&file).expect("create body file"))
        .status()
        .expect("head");
    assert!(made.success());
    let sum = run_bounded(60, "sha256sum", &[&file.to_string_lossy()]);
    let sha256 = String::from_utf8_lossy(&sum.stdout)
        .split_whitespace()
        .next()
        .unwrap_or_default()
        .to_string();
    assert_eq!(sha256.len(), 64);

    // Warm both sidecars up, then take the high-water marks.
    let (status, _) = get_outbound(&hop, &[], "/headers");
    assert_eq!(status, 200);
    let (_, data_hwm) = hop.data.proc.rss_kib();
    let (_, plugin_hwm) = hop.plugin.proc.rss_kib();

    let data_arg = format!("@{}", file.display());
    let started = Instant::now();
    let out = curl(&[
        "--max-time",
        "120",
        "-X",
        "POST",
        "--data-binary",
        &data_arg,
        "-H",
        "content-type: application/octet-stream",
        "-w",
        "\n%{http_code}",
        &hop.outbound_url("/upload"),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    assert_eq!(
        status.trim(),
        "200",
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let body: Value = serde_json::from_str(body).expect("JSON");
    assert_eq!(body["bytes"], 100 * 1024 * 1024, "{body}");
    assert_eq!(body["sha256"], sha256.as_str(), "{body}");
    eprintln!("100 MiB through both hops in {:?}", started.elapsed());

    for (name, sidecar, before) in [
        ("data", &hop.data, data_hwm),
        ("plugin", &hop.plugin, plugin_hwm),
    ] {
        let (_, after) = sidecar.proc.rss_kib();
        assert!(before > 0 && after > 0);
        let grown = after.saturating_sub(before);
        eprintln!("{name} sidecar VmHWM {before} -> {after} KiB");
        assert!(
            grown < 30 * 1024,
            "{name} sidecar VmHWM grew by {grown} KiB ({before} -> {after})"
        );
    }
}

// 8 ------------------------------------------------------------------------------------

#[test]
fn a_spoofed_client_cert_header_never_reaches_the_app() {
    let dir = temp_dir("xfcc");
    let hop = two_hop(dir.path(), &TwoHopOptions::default());
    let spoof = [
        "-H",
        "x-forwarded-client-cert: By=spiffe://evil/x;URI=spiffe://nexus.local/ns/ops/sa/operator",
        "-H",
        "X-Forwarded-Client-Cert: URI=spiffe://nexus.local/ns/admin/sa/root",
    ];
    let my_hash = cert_fingerprint(&cert("nexus.local/flood-model.pem")).expect("fingerprint");

    for version in ["--http1.1", "--http2"] {
        let mut extra = spoof.to_vec();
        extra.push(version);
        let (status, body) = get_inbound(&hop, FLOOD, &extra, "/headers");
        assert_eq!(status, 200, "{body}");
        assert_caller(&body, PLUGIN_ID, DATA_API_ID);
        assert_eq!(only_xfcc(&body).get("Hash"), Some(&my_hash));
        assert!(!body.to_string().contains("evil"), "{body}");
        assert!(!body.to_string().contains("operator"), "{body}");
    }
    for version in ["--http1.1", "--http2-prior-knowledge"] {
        let mut extra = spoof.to_vec();
        extra.push(version);
        let (status, body) = get_outbound(&hop, &extra, "/headers");
        assert_eq!(status, 200, "{body}");
        assert_caller(&body, PLUGIN_ID, DATA_API_ID);
        assert!(!body.to_string().contains("evil"), "{body}");
        assert!(!body.to_string().contains("root"), "{body}");
    }
}

// 9 ------------------------------------------------------------------------------------

#[test]
fn not_ready_and_refusing_until_the_svid_arrives() {
    let dir = temp_dir("late-svid");
    let d = dir.path();
    let app = stack::data_api(d);
    let socket = d.join("data-workload-api.sock");
    let sidecar = stack::sidecar(
        d,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
            format!("unix://{}", socket.display()),
            app.http
        ),
        false,
    );
    let args = inbound_curl_args(sidecar.inbound_port(), Some(FLOOD));
    let url = format!("https://localhost:{}/headers", sidecar.inbound_port());
    let mut call = s(&args);
    call.push(&url);

    assert_eq!(sidecar.ready_status(), 503);
    assert_eq!(curl_status(&call), 0, "no SVID: no TLS");
    assert_eq!(sidecar.metric_sum(INBOUND_REQUESTS), 0.0);
    assert_eq!(sidecar.ready_status(), 503, "still not ready");

    let _wl = stack::workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost"],
    );
    eventually(WAIT, "/ready 200", || {
        (sidecar.ready_status() == 200).then_some(())
    });
    let (status, body) = curl_json(&call);
    assert_eq!(status, 200, "{body}");
    assert_caller(&body, PLUGIN_ID, DATA_API_ID);
}

// 10 -----------------------------------------------------------------------------------

#[test]
fn bad_input_gets_4xx_or_a_closed_connection_and_the_sidecar_keeps_serving() {
    let dir = temp_dir("bad-input");
    let mut hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            plugin_toml: "[limits]\nheader_read_timeout = \"1s\"\n".into(),
            data_toml: "[tls]\nhandshake_timeout = \"1s\"\n".into(),
            ..TwoHopOptions::default()
        },
    );
    let out_port = stack::port_of(&hop.plugin.outbound("hazard"));
    let in_port = hop.data.inbound_port();

    // Not HTTP at all.
    let garbage = raw_tcp(out_port, b"GARBAGE\r\n\r\n", Duration::from_secs(5));
    assert!(garbage.received.starts_with("HTTP/1.1 400"), "{garbage:?}");
    assert_eq!(garbage.end, "eof", "{garbage:?}");
    hop.plugin.wait_metric(
        &connection_errors("outbound", "malformed_request"),
        1.0,
        WAIT,
    );

    // A 20 KB header against the 16 KiB default: 431 on both listeners, both versions.
    let big = format!("x-big: {}", "a".repeat(20_000));
    let status = curl_status(&["-H", &big, &hop.outbound_url("/headers")]);
    assert_eq!(status, 431);
    hop.plugin.wait_metric(
        &connection_errors("outbound", "headers_too_large"),
        1.0,
        WAIT,
    );
    let status = curl_status(&[
        "--http2-prior-knowledge",
        "-H",
        &big,
        &hop.outbound_url("/headers"),
    ]);
    assert_eq!(status, 431, "HTTP/2 outbound");
    let args = hop.inbound_args(Some(FLOOD));
    let url = hop.inbound_url("/headers");
    let mut call = s(&args);
    call.extend(["--http1.1", "-H", &big, &url]);
    assert_eq!(curl_status(&call), 431, "HTTP/1.1 inbound");
    hop.data.wait_metric(
        &connection_errors("inbound", "headers_too_large"),
        1.0,
        WAIT,
    );

    // A request head that never ends: closed after header_read_timeout (1s).
    let slow = raw_tcp(
        out_port,
        b"GET /headers HTTP/1.1\r\nHost: localhost\r\nx-slow: 1\r\n",
        Duration::from_secs(10),
    );
    assert_ne!(slow.end, "timeout", "{slow:?}");
    assert!(
        slow.elapsed > 0.5 && slow.elapsed < 5.0,
        "closed after {}s",
        slow.elapsed
    );
    hop.plugin
        .wait_metric(&connection_errors("outbound", "header_timeout"), 1.0, WAIT);

    // TLS garbage on the inbound: closed, counted as a failed handshake.
    let tls = raw_tcp(
        in_port,
        b"\x16\x03\x01\x00\x05hello, this is not TLS\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_ne!(tls.end, "timeout", "{tls:?}");
    hop.data
        .wait_metric(&handshake_failures("protocol_error"), 1.0, WAIT);

    // Plain HTTP on the mTLS port: refused the same way.
    let plain = raw_tcp(
        in_port,
        b"GET /headers HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(5),
    );
    assert_ne!(plain.end, "timeout", "{plain:?}");
    assert!(!plain.received.contains("HTTP/1.1"), "{plain:?}");
    hop.data
        .wait_metric(&handshake_failures("protocol_error"), 2.0, WAIT);

    // A TCP client that never starts the handshake: dropped after handshake_timeout (1s).
    let silent = raw_tcp(in_port, b"", Duration::from_secs(10));
    assert_ne!(silent.end, "timeout", "{silent:?}");
    assert!(silent.elapsed < 5.0, "{silent:?}");
    hop.data
        .wait_metric(&handshake_failures("timeout"), 1.0, WAIT);

    // A TLS 1.2-only client against the default minimum of 1.3.
    let mut call = s(&args);
    call.extend(["--tls-max", "1.2", &url]);
    assert_eq!(curl_status(&call), 0, "TLS 1.2 is refused");
    hop.data
        .wait_metric(&handshake_failures("incompatible"), 1.0, WAIT);

    assert_eq!(hop.data.metric_sum(INBOUND_REQUESTS), 0.0);
    assert!(hop.plugin.proc.is_running() && hop.data.proc.is_running());
    let (status, body) = get_outbound(&hop, &[], "/clauses/c-flood-17/rainfall");
    assert_eq!(status, 200, "{body}");
    let (status, body) = get_inbound(&hop, FLOOD, &[], "/clauses/c-flood-17/rainfall");
    assert_eq!(status, 200, "{body}");
}

// 11 -----------------------------------------------------------------------------------

/// Runs `nexus-sidecar ARGS` with no identity-related environment; (code, stdout, stderr).
fn sidecar_cli(args: &[&str]) -> (i32, String, String) {
    let mut command = Command::new("timeout");
    command
        .args(["--kill-after=5", "20"])
        .arg(bin("nexus-sidecar"))
        .args(args);
    for (key, _) in std::env::vars() {
        if key == "SPIFFE_ENDPOINT_SOCKET" || key.starts_with("NEXUS_") {
            command.env_remove(key);
        }
    }
    let out = command.output().expect("nexus-sidecar");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn config_errors_exit_64_and_name_the_problem() {
    let dir = temp_dir("config");
    let write = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write config");
        path.to_string_lossy().into_owned()
    };
    let socket = format!("unix://{}/agent.sock", dir.path().display());

    let unknown = write(
        "unknown.toml",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\napp = \"127.0.0.1:8080\"\nalowed_ids = []\n"
        ),
    );
    let (code, _, err) = sidecar_cli(&["--config", &unknown]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains(&unknown), "names the file: {err}");
    assert!(err.contains("line 6"), "names the line: {err}");
    assert!(err.contains("alowed_ids"), "names the field: {err}");

    let open = write(
        "open.toml",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[[outbound]]\nname = \"hazard\"\nlisten = \"0.0.0.0:0\"\nupstream = \"127.0.0.1:15006\"\nexpected_id = {DATA_API_ID:?}\n"
        ),
    );
    let (code, _, err) = sidecar_cli(&["--config", &open]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("outbound[0].listen"), "{err}");
    assert!(err.contains("loopback"), "{err}");

    let bad_id = write(
        "bad-id.toml",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\napp = \"127.0.0.1:8080\"\nallowed_ids = [\"spiffe://nexus.local/ns/*/sa/x\"]\n"
        ),
    );
    let (code, _, err) = sidecar_cli(&["--config", &bad_id]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("inbound.allowed_ids"), "{err}");

    let no_identity = write(
        "no-identity.toml",
        "[inbound]\napp = \"127.0.0.1:8080\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
    );
    let (code, _, err) = sidecar_cli(&["--config", &no_identity]);
    assert_eq!(code, 64, "{err}");
    assert!(err.contains("SPIFFE_ENDPOINT_SOCKET"), "{err}");

    let good = write(
        "good.toml",
        &format!(
            "[identity]\nworkload_api_socket = {socket:?}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = \"127.0.0.1:8080\"\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n\n[[outbound]]\nname = \"hazard\"\nlisten = \"127.0.0.1:0\"\nupstream = \"127.0.0.1:15006\"\nexpected_id = {DATA_API_ID:?}\n\n[limits]\nheader_read_timeout = \"1s\"\n"
        ),
    );
    let (code, out, err) = sidecar_cli(&["--config", &good, "--check"]);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("config OK"), "{out}");
}

// 12 -----------------------------------------------------------------------------------

#[test]
fn file_identity_reloads_and_keeps_the_last_good_one() {
    let dir = temp_dir("files");
    let d = dir.path();
    let svid = d.join("svid.pem");
    let key = d.join("svid.key");
    let bundle = d.join("bundle.pem");
    let copy = |from: &str, to: &Path| {
        std::fs::copy(cert(from), to).expect("copy cert");
    };
    copy("nexus.local/hazard-api.pem", &svid);
    copy("nexus.local/hazard-api.key", &key);
    copy("nexus.local/ca.pem", &bundle);
    let app = stack::data_api(d);
    let sidecar = stack::sidecar(
        d,
        "files-sidecar",
        &format!(
            "[identity]\nsource = \"files\"\nfile_reload_interval = \"200ms\"\nfiles = {{ cert = {:?}, key = {:?}, bundle = {:?} }}\n\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
            svid.display().to_string(),
            key.display().to_string(),
            bundle.display().to_string(),
            app.http
        ),
        true,
    );
    let port = sidecar.inbound_port();
    let presented = || {
        presented_leaf(
            port,
            &cert("nexus.local/flood-model.pem"),
            &cert("nexus.local/flood-model.key"),
        )
        .and_then(|pem| cert_fingerprint_pem(&pem))
    };
    // certs-dev leaves carry no DNS name, so curl cannot verify the hostname (-k); which
    // certificate was presented is checked with openssl above.
    let mut call = vec!["-k".to_string()];
    call.extend(stack::client_cert_args(FLOOD));
    let url = format!("https://127.0.0.1:{port}/headers");
    call.push(url);
    let call = s(&call);

    let hazard = cert_fingerprint(&cert("nexus.local/hazard-api.pem"));
    let operator_id = "spiffe://nexus.local/ns/ops/sa/operator";
    let operator = cert_fingerprint(&cert("nexus.local/operator.pem"));
    assert!(hazard.is_some() && operator.is_some() && hazard != operator);

    assert_eq!(presented(), hazard);
    let (status, body) = curl_json(&call);
    assert_eq!(status, 200, "{body}");
    assert_caller(&body, PLUGIN_ID, DATA_API_ID);

    // Another valid leaf of the trust domain replaces the files.
    copy("nexus.local/operator.pem", &svid);
    copy("nexus.local/operator.key", &key);
    sidecar.wait_metric("nexus_svid_rotations_total", 1.0, WAIT);
    eventually(WAIT, "the new leaf on the wire", || {
        (presented() == operator).then_some(())
    });
    let (status, body) = curl_json(&call);
    assert_eq!(status, 200, "{body}");
    assert_caller(&body, PLUGIN_ID, operator_id);
    let rotations = sidecar.metric_sum("nexus_svid_rotations_total");

    // A broken certificate file is refused; the last good identity keeps serving.
    let refusals = || sidecar.proc.log_text().matches("identity files").count();
    let before = refusals();
    std::fs::write(&svid, "-----BEGIN CERTIFICATE-----\nnot base64\n").expect("write");
    eventually(WAIT, "the broken file to be read and refused", || {
        (refusals() > before).then_some(())
    });
    assert_eq!(presented(), operator);
    let (status, body) = curl_json(&call);
    assert_eq!(status, 200, "{body}");
    assert_caller(&body, PLUGIN_ID, operator_id);
    assert_eq!(sidecar.ready_status(), 200);
    assert_eq!(sidecar.metric_sum("nexus_svid_rotations_total"), rotations);
}

// Found while writing the above ------------------------------------------------------

#[test]
fn an_idle_keep_alive_connection_is_not_a_header_timeout() {
    let dir = temp_dir("idle-keepalive");
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            plugin_toml: "[limits]\nheader_read_timeout = \"1s\"\n".into(),
            ..TwoHopOptions::default()
        },
    );
    let port = stack::port_of(&hop.plugin.outbound("hazard"));
    // One complete request; the client then keeps the connection open, idle, until the
    // sidecar closes it (a keep-alive, not a slow request head).
    let exchange = raw_tcp(
        port,
        b"GET /headers HTTP/1.1\r\nHost: localhost\r\n\r\n",
        Duration::from_secs(5),
    );
    assert!(
        exchange.received.starts_with("HTTP/1.1 200"),
        "{exchange:?}"
    );
    hop.plugin.wait_metric(
        r#"nexus_requests_total{direction="outbound",method="GET",status="200"}"#,
        1.0,
        WAIT,
    );
    // Bounded: the close was seen (or 5 s passed); give the counter 1 s to (wrongly) move.
    let deadline = Instant::now() + Duration::from_secs(1);
    while Instant::now() < deadline {
        assert_eq!(
            hop.plugin
                .metric_sum(&connection_errors("outbound", "header_timeout")),
            0.0,
            "an idle keep-alive connection counted as a header timeout ({exchange:?})"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn ready_turns_503_once_the_svid_expires_unrenewed() {
    let dir = temp_dir("expired-svid");
    let d = dir.path();
    let app = stack::data_api(d);
    let mut wl = stack::workload_api(
        d,
        "data-workload-api",
        DATA_API_ID,
        &["--dns-name", "localhost", "--ttl", "4s"],
    );
    let sidecar = stack::sidecar(
        d,
        "data-sidecar",
        &format!(
            "[identity]\nworkload_api_socket = {:?}\n[inbound]\nlisten = \"127.0.0.1:0\"\napp = {:?}\nallowed_ids = [\"spiffe://nexus.local/ns/plugins/*\"]\n",
            wl.url(),
            app.http
        ),
        true,
    );
    // The agent goes away: no renewal; the SVID it handed out expires within 4 s.
    wl.proc.signal("TERM");
    eventually(WAIT, "the Workload API to stop", || {
        (!wl.proc.is_running()).then_some(())
    });
    eventually(WAIT, "/ready to report the expired SVID", || {
        (sidecar.ready_status() == 503).then_some(())
    });
}
