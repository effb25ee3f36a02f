//! OpenTelemetry end to end: both sidecars export to a real OTLP/gRPC receiver
//! (`tests/py/otlp_receiver.py`, PyPI opentelemetry-proto + grpcio), and the test reads
//! back what it got:
//!
//! ```text
//! curl (traceparent) ──▶ plugin sidecar ──mTLS──▶ data sidecar ──▶ data API (/headers)
//!                            │ span (client)          │ span (server)
//!                            └──────── OTLP/gRPC ─────┴──▶ receiver ──▶ JSON lines
//! ```
//!
//! Also: an absent collector and a slow one never hold a request, and every span they
//! cost is counted on /metrics; SIGTERM flushes what is queued.
//!
//! Needs `cargo build --workspace --bins` first and `tests/requirements.txt` installed.

use std::io::Read;
use std::time::Duration;

use nexus_tests::stack::{OtlpReceiver, PLUGIN_ID, TwoHop, TwoHopOptions, otlp_receiver, two_hop};
use nexus_tests::{curl, eventually, run_bounded, temp_dir};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);
/// OTLP span kinds.
const SERVER: u64 = 2;
const CLIENT: u64 = 3;

fn random_hex(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut buf))
        .expect("/dev/urandom");
    data_encoding::HEXLOWER.encode(&buf)
}

/// A `[telemetry]` table exporting to `endpoint` quickly.
fn telemetry_toml(endpoint: &str, service: &str, extra: &str) -> String {
    format!(
        "[telemetry]\notlp_endpoint = {endpoint:?}\nservice_name = {service:?}\nbatch_delay = \"100ms\"\nmetrics_interval = \"500ms\"\n{extra}\n"
    )
}

/// GET `path` through the plugin's outbound with extra curl arguments, bounded to
/// `max_secs`; (status, body).
fn get(hop: &TwoHop, path: &str, extra: &[&str], max_secs: u32) -> (u16, Value) {
    let url = hop.outbound_url(path);
    let max = max_secs.to_string();
    let mut args = vec!["--max-time", &max, "-w", "\n%{http_code}"];
    args.extend_from_slice(extra);
    args.push(&url);
    let out = curl(&args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, status) = text.rsplit_once('\n').unwrap_or(("", &text));
    (
        status.trim().parse().unwrap_or(0),
        serde_json::from_str(body).unwrap_or(Value::Null),
    )
}

fn spans_of(receiver: &OtlpReceiver, trace_id: &str) -> Vec<Value> {
    receiver
        .records("span")
        .into_iter()
        .filter(|span| span["trace_id"] == trace_id)
        .collect()
}

fn of_service<'a>(spans: &'a [Value], service: &str) -> &'a Value {
    spans
        .iter()
        .find(|span| span["service"] == service)
        .unwrap_or_else(|| panic!("no span from {service}: {spans:#?}"))
}

#[test]
fn a_trace_runs_from_the_plugin_through_both_sidecars_to_the_data_api() {
    let dir = temp_dir("otel-trace");
    let receiver = otlp_receiver(dir.path(), "otlp", None);
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml: telemetry_toml(&receiver.endpoint(), "data-sidecar", ""),
            plugin_toml: telemetry_toml(&receiver.endpoint(), "plugin-sidecar", ""),
            ..TwoHopOptions::default()
        },
    );

    for (flag, version) in [("--http1.1", "1.1"), ("--http2-prior-knowledge", "2")] {
        let trace_id = random_hex(16);
        let caller_span = random_hex(8);
        let traceparent = format!("traceparent: 00-{trace_id}-{caller_span}-01");
        let (status, body) = get(&hop, "/headers", &[flag, "-H", &traceparent], 10);
        assert_eq!(status, 200, "{flag}: {body}");

        let spans = eventually(WAIT, "both sidecars' spans at the receiver", || {
            let spans = spans_of(&receiver, &trace_id);
            (spans.len() >= 2).then_some(spans)
        });
        assert_eq!(spans.len(), 2, "one span per hop: {spans:#?}");
        let plugin = of_service(&spans, "plugin-sidecar");
        let data = of_service(&spans, "data-sidecar");

        // plugin (curl) → plugin sidecar → data sidecar → data API: one trace, each the
        // child of the one before.
        assert_eq!(plugin["parent_span_id"], caller_span.as_str(), "{plugin:#}");
        assert_eq!(plugin["kind"], CLIENT, "{plugin:#}");
        assert_eq!(data["parent_span_id"], plugin["span_id"], "{data:#}");
        assert_eq!(data["kind"], SERVER, "{data:#}");
        let data_span = data["span_id"].as_str().unwrap_or_default();
        assert_eq!(
            body["headers"]["traceparent"],
            format!("00-{trace_id}-{data_span}-01"),
            "the data API's parent is the data sidecar's span: {body}"
        );

        for (span, direction) in [(plugin, "outbound"), (data, "inbound")] {
            let attributes = &span["attributes"];
            assert_eq!(attributes["http.request.method"], "GET", "{span:#}");
            assert_eq!(attributes["http.response.status_code"], 200, "{span:#}");
            assert_eq!(attributes["url.path"], "/headers", "{span:#}");
            assert_eq!(attributes["url.scheme"], "https", "{span:#}");
            assert_eq!(attributes["nexus.direction"], direction, "{span:#}");
            assert_eq!(attributes["network.protocol.version"], version, "{span:#}");
            assert!(attributes["error.type"].is_null(), "{span:#}");
            assert_eq!(span["name"], "GET", "{span:#}");
        }
        assert_eq!(
            data["attributes"]["nexus.peer.spiffe_id"], PLUGIN_ID,
            "{data:#}"
        );
        assert_eq!(
            plugin["attributes"]["server.port"],
            u64::from(hop.data.inbound_port()),
            "{plugin:#}"
        );
    }

    // Metrics: request counts from both sidecars after a metrics interval.
    for (service, direction) in [("plugin-sidecar", "outbound"), ("data-sidecar", "inbound")] {
        eventually(WAIT, &format!("nexus.requests from {service}"), || {
            receiver.records("metric").into_iter().find(|point| {
                point["name"] == "nexus.requests"
                    && point["service"] == service
                    && point["attributes"]["nexus.direction"] == direction
                    && point["attributes"]["http.response.status_code"] == 200
                    && point["value"].as_u64().is_some_and(|v| v >= 1)
            })
        });
        eventually(
            WAIT,
            &format!("nexus.request.duration from {service}"),
            || {
                receiver.records("metric").into_iter().find(|point| {
                    point["name"] == "nexus.request.duration"
                        && point["service"] == service
                        && point["unit"] == "s"
                        && point["count"].as_u64().is_some_and(|v| v >= 1)
                })
            },
        );
    }
    hop.plugin
        .wait_metric("nexus_otel_spans_exported_total", 1.0, WAIT);
    assert_eq!(
        hop.plugin.metric_sum("nexus_otel_spans_dropped_total"),
        0.0,
        "{}",
        hop.plugin.metrics()
    );
}

#[test]
fn a_request_without_a_traceparent_starts_a_trace_the_data_api_sees() {
    let dir = temp_dir("otel-root");
    let receiver = otlp_receiver(dir.path(), "otlp", None);
    // Only the data sidecar exports: the plugin sidecar, without [telemetry], passes
    // the caller's traceparent on untouched.
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml: telemetry_toml(&receiver.endpoint(), "data-sidecar", ""),
            ..TwoHopOptions::default()
        },
    );
    let trace_id = random_hex(16);
    let caller_span = random_hex(8);
    let traceparent = format!("traceparent: 00-{trace_id}-{caller_span}-01");
    let (status, body) = get(&hop, "/headers", &["-H", &traceparent], 10);
    assert_eq!(status, 200, "{body}");
    let spans = eventually(WAIT, "the data sidecar's span", || {
        let spans = spans_of(&receiver, &trace_id);
        (!spans.is_empty()).then_some(spans)
    });
    let data = of_service(&spans, "data-sidecar");
    assert_eq!(
        data["parent_span_id"],
        caller_span.as_str(),
        "the plugin sidecar carried the caller's traceparent on unchanged: {data:#}"
    );

    // No traceparent at all: the data sidecar starts a trace and hands it on.
    let (status, body) = get(&hop, "/headers", &[], 10);
    assert_eq!(status, 200, "{body}");
    let forwarded = body["headers"]["traceparent"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let parts: Vec<&str> = forwarded.split('-').collect();
    assert_eq!(parts.len(), 4, "{body}");
    let span = eventually(WAIT, "the new root span", || {
        spans_of(&receiver, parts[1]).into_iter().next()
    });
    assert_eq!(span["span_id"], parts[2], "{span:#}");
    assert_eq!(span["parent_span_id"], "", "a root span: {span:#}");
}

#[test]
fn the_policy_decision_reaches_the_span_and_the_metrics() {
    let dir = temp_dir("otel-policy");
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).expect("policy dir");
    std::fs::write(
        policies.join("authz.rego"),
        "package nexus.authz\n\ndecision := {\"allow\": true, \"reasons\": [\"telemetry test\"]}\n",
    )
    .expect("policy");
    let receiver = otlp_receiver(dir.path(), "otlp", None);
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            data_toml: format!(
                "{}\n[policy]\ndir = {:?}\n",
                telemetry_toml(&receiver.endpoint(), "data-sidecar", ""),
                policies.to_string_lossy()
            ),
            ..TwoHopOptions::default()
        },
    );
    let trace_id = random_hex(16);
    let traceparent = format!("traceparent: 00-{trace_id}-{}-01", random_hex(8));
    let (status, body) = get(
        &hop,
        "/clauses/c-flood-17/rainfall",
        &["-H", &traceparent],
        10,
    );
    assert_eq!(status, 200, "{body}");
    let span = eventually(WAIT, "the data sidecar's span", || {
        spans_of(&receiver, &trace_id).into_iter().next()
    });
    let attributes = &span["attributes"];
    assert_eq!(attributes["nexus.decision"], "allow", "{span:#}");
    assert_eq!(attributes["nexus.clause"], "c-flood-17", "{span:#}");
    assert_eq!(
        attributes["nexus.decision_id"].as_str().map(str::len),
        Some(32),
        "{span:#}"
    );
    assert!(
        attributes["nexus.policy_revision"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{span:#}"
    );
    eventually(WAIT, "nexus.policy.decisions", || {
        receiver.records("metric").into_iter().find(|point| {
            point["name"] == "nexus.policy.decisions"
                && point["attributes"]["nexus.direction"] == "inbound"
                && point["attributes"]["nexus.decision"] == "allow"
        })
    });
    eventually(WAIT, "nexus.policy.evaluation.duration", || {
        receiver.records("metric").into_iter().find(|point| {
            point["name"] == "nexus.policy.evaluation.duration"
                && point["count"].as_u64().is_some_and(|n| n >= 1)
        })
    });
}

#[test]
fn grpc_is_traced_and_its_trailers_still_arrive() {
    let dir = temp_dir("otel-grpc");
    let receiver = otlp_receiver(dir.path(), "otlp", None);
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            grpc_app: true,
            data_toml: telemetry_toml(&receiver.endpoint(), "data-sidecar", ""),
            plugin_toml: telemetry_toml(&receiver.endpoint(), "plugin-sidecar", ""),
            ..TwoHopOptions::default()
        },
    );
    let outbound = hop.plugin.outbound("hazard");
    let trace_id = random_hex(16);
    let traceparent = format!("traceparent: 00-{trace_id}-{}-01", random_hex(8));
    // Reflection, then a unary call: grpcurl exits 0 only if grpc-status 0 arrived in
    // the trailers, through both traced hops.
    let out = run_bounded(30, "grpcurl", &["-plaintext", &outbound, "list"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = run_bounded(
        30,
        "grpcurl",
        &[
            "-plaintext",
            "-rpc-header",
            &traceparent,
            "-d",
            r#"{"service":"nexus.demo"}"#,
            &outbound,
            "grpc.health.v1.Health/Check",
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("SERVING"));
    let spans = eventually(WAIT, "both sidecars' spans of the gRPC call", || {
        let spans = spans_of(&receiver, &trace_id);
        (spans.len() >= 2).then_some(spans)
    });
    let plugin = of_service(&spans, "plugin-sidecar");
    let data = of_service(&spans, "data-sidecar");
    assert_eq!(data["parent_span_id"], plugin["span_id"], "{data:#}");
    for span in [plugin, data] {
        let attributes = &span["attributes"];
        assert_eq!(attributes["http.request.method"], "POST", "{span:#}");
        assert_eq!(
            attributes["url.path"], "/grpc.health.v1.Health/Check",
            "{span:#}"
        );
        assert_eq!(attributes["network.protocol.version"], "2", "{span:#}");
        assert_eq!(attributes["http.response.status_code"], 200, "{span:#}");
    }
}

#[test]
fn an_absent_collector_never_slows_requests_and_every_loss_is_counted() {
    let dir = temp_dir("otel-absent");
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        listener.local_addr().expect("addr").port()
    };
    let endpoint = format!("http://127.0.0.1:{closed}");
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            plugin_toml: telemetry_toml(&endpoint, "plugin-sidecar", "export_timeout = \"1s\""),
            ..TwoHopOptions::default()
        },
    );
    for i in 0..20 {
        let (status, body) = get(&hop, "/headers", &[], 2);
        assert_eq!(status, 200, "request {i} within 2s: {body}");
    }
    let failures = r#"nexus_otel_export_failures_total{signal="traces"}"#;
    hop.plugin.wait_metric(failures, 1.0, WAIT);
    hop.plugin.wait_metric(
        r#"nexus_otel_spans_dropped_total{reason="export_failed"}"#,
        1.0,
        WAIT,
    );
    hop.plugin.wait_metric(
        r#"nexus_otel_export_failures_total{signal="metrics"}"#,
        1.0,
        WAIT,
    );
    let log = hop.plugin.proc.log_text();
    assert!(
        log.contains("span export to the collector failed"),
        "the loss is logged: {log}"
    );
    let (status, _) = get(&hop, "/headers", &[], 2);
    assert_eq!(status, 200, "still serving");
}

#[test]
fn a_slow_collector_fills_the_bounded_queue_and_drops_are_counted() {
    let dir = temp_dir("otel-slow");
    let receiver = otlp_receiver(dir.path(), "otlp-slow", Some(3.0));
    let hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            plugin_toml: telemetry_toml(
                &receiver.endpoint(),
                "plugin-sidecar",
                "max_queue_size = 2\nexport_timeout = \"10s\"",
            ),
            ..TwoHopOptions::default()
        },
    );
    for i in 0..15 {
        let (status, body) = get(&hop, "/headers", &[], 2);
        assert_eq!(status, 200, "request {i} within 2s: {body}");
    }
    hop.plugin.wait_metric(
        r#"nexus_otel_spans_dropped_total{reason="queue_full"}"#,
        1.0,
        WAIT,
    );
    let log = hop.plugin.proc.log_text();
    assert!(
        log.contains("span export queue full"),
        "the drop is logged: {log}"
    );
    // What was queued still arrives once the collector answers.
    hop.plugin
        .wait_metric("nexus_otel_spans_exported_total", 1.0, WAIT);
    assert!(!receiver.records("span").is_empty());
}

#[test]
fn sigterm_flushes_queued_spans_within_a_bound() {
    let dir = temp_dir("otel-sigterm");
    let receiver = otlp_receiver(dir.path(), "otlp", None);
    // Spans would wait an hour for the timer: only the shutdown flush sends them.
    let mut hop = two_hop(
        dir.path(),
        &TwoHopOptions {
            plugin_toml: format!(
                "[telemetry]\notlp_endpoint = {:?}\nservice_name = \"plugin-sidecar\"\nbatch_delay = \"1h\"\nmetrics_interval = \"1h\"\nexport_timeout = \"2s\"\n",
                receiver.endpoint()
            ),
            ..TwoHopOptions::default()
        },
    );
    let trace_id = random_hex(16);
    let traceparent = format!("traceparent: 00-{trace_id}-{}-01", random_hex(8));
    let (status, body) = get(&hop, "/headers", &["-H", &traceparent], 10);
    assert_eq!(status, 200, "{body}");
    assert!(spans_of(&receiver, &trace_id).is_empty());
    hop.plugin.proc.signal("TERM");
    eventually(Duration::from_secs(10), "the sidecar to exit", || {
        (!hop.plugin.proc.is_running()).then_some(())
    });
    let spans = spans_of(&receiver, &trace_id);
    assert_eq!(spans.len(), 1, "flushed at shutdown: {spans:#?}");
    assert!(
        receiver
            .records("metric")
            .iter()
            .any(|point| point["name"] == "nexus.requests"),
        "a last metrics collection at shutdown"
    );
}
