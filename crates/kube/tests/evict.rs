//! `PodEvictor` against a recording HTTP endpoint that answers as the API server does
//! (no API server can run here): the exact requests are asserted.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use nexus_kube::{EvictError, EvictorConfig, PodEvictor};
use serde_json::{Value, json};

#[derive(Clone, Debug, PartialEq)]
struct Recorded {
    method: String,
    path: String,
    query: Option<String>,
    authorization: Option<String>,
    body: Option<Value>,
}

type Log = Arc<Mutex<Vec<Recorded>>>;

fn pod(name: &str, deleting: bool) -> Value {
    let mut meta = json!({"name": name, "namespace": "plugins"});
    if deleting {
        meta["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    }
    json!({"metadata": meta, "spec": {"serviceAccountName": "flood-model", "containers": [{"name": "m"}]}})
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
           "status": if code < 300 { "Success" } else { "Failure" },
           "reason": reason, "message": message, "code": code})
}

/// Answers like the API server: the pod list, then one eviction accepted (201), one
/// blocked by a PodDisruptionBudget (429) on its first two tries (`earlier` counts the
/// same request before this one) and accepted on the third, one already gone (404).
fn answer(method: &str, path: &str, earlier: usize) -> (u16, Value) {
    match (method, path) {
        ("GET", "/api/v1/namespaces/plugins/pods") => (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                   "items": [pod("flood-a", false), pod("flood-b", false), pod("flood-c", true), pod("flood-d", false)]}),
        ),
        ("POST", "/api/v1/namespaces/plugins/pods/flood-a/eviction") => (201, status(201, "", "")),
        ("POST", "/api/v1/namespaces/plugins/pods/flood-b/eviction") if earlier >= 2 => {
            (201, status(201, "", ""))
        }
        ("POST", "/api/v1/namespaces/plugins/pods/flood-b/eviction") => (
            429,
            status(
                429,
                "TooManyRequests",
                "Cannot evict pod as it would violate the pod's disruption budget.",
            ),
        ),
        ("POST", "/api/v1/namespaces/plugins/pods/flood-d/eviction") => {
            (404, status(404, "NotFound", "pods \"flood-d\" not found"))
        }
        ("GET", "/api/v1/namespaces/forbidden/pods") => (
            403,
            status(
                403,
                "Forbidden",
                "pods is forbidden: User cannot list resource",
            ),
        ),
        _ => (
            404,
            status(
                404,
                "NotFound",
                "the server could not find the requested resource",
            ),
        ),
    }
}

async fn serve(log: Log) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let log = log.clone();
                    async move {
                        let method = req.method().to_string();
                        let path = req.uri().path().to_string();
                        let query = req.uri().query().map(str::to_string);
                        let authorization = req
                            .headers()
                            .get("authorization")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let bytes = req.into_body().collect().await.expect("body").to_bytes();
                        let body = (!bytes.is_empty())
                            .then(|| serde_json::from_slice(&bytes).expect("JSON body"));
                        let earlier = {
                            let mut log = log.lock().expect("log");
                            let earlier = log
                                .iter()
                                .filter(|r| r.method == method && r.path == path)
                                .count();
                            log.push(Recorded {
                                method: method.clone(),
                                path: path.clone(),
                                query,
                                authorization,
                                body,
                            });
                            earlier
                        };
                        let (code, doc) = answer(&method, &path, earlier);
                        let response = Response::builder()
                            .status(code)
                            .header("content-type", "application/json")
                            .body(Full::new(Bytes::from(
                                serde_json::to_vec(&doc).expect("json"),
                            )))
                            .expect("response");
                        Ok::<_, Infallible>(response)
                    }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

async fn evictor(log: &Log) -> (PodEvictor, tempfile::TempDir) {
    evictor_with(log, EvictorConfig::default()).await
}

async fn evictor_with(log: &Log, base: EvictorConfig) -> (PodEvictor, tempfile::TempDir) {
    let addr = serve(log.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    // As the kubelet writes it: no trailing newline (kube sends the file verbatim).
    std::fs::write(&token, "test-token-123").expect("token");
    let cfg = EvictorConfig {
        api_server: format!("http://{addr}"),
        token_file: token,
        danger_allow_plain_http: true,
        ..base
    };
    (PodEvictor::new(&cfg).expect("evictor"), dir)
}

#[tokio::test]
async fn evicts_the_service_accounts_pods_through_the_eviction_subresource() {
    let log = Log::default();
    let (evictor, _dir) = evictor(&log).await;
    let report = evictor
        .evict_workload("spiffe://nexus.local/ns/plugins/sa/flood-model")
        .await
        .expect("evict");
    assert_eq!(report.namespace, "plugins");
    assert_eq!(report.service_account, "flood-model");
    assert_eq!(report.evicted, ["flood-a"]);
    assert_eq!(report.blocked, ["flood-b"]);
    assert_eq!(report.gone, ["flood-c", "flood-d"]);
    assert!(report.failed.is_empty(), "{:?}", report.failed);

    let recorded = log.lock().expect("log").clone();
    let eviction = |name: &str| Recorded {
        method: "POST".into(),
        path: format!("/api/v1/namespaces/plugins/pods/{name}/eviction"),
        query: Some(String::new()),
        authorization: Some("Bearer test-token-123".into()),
        body: Some(json!({"apiVersion": "policy/v1", "kind": "Eviction",
                          "metadata": {"name": name, "namespace": "plugins"}})),
    };
    assert_eq!(
        recorded,
        vec![
            Recorded {
                method: "GET".into(),
                path: "/api/v1/namespaces/plugins/pods".into(),
                query: Some("&fieldSelector=spec.serviceAccountName%3Dflood-model".into()),
                authorization: Some("Bearer test-token-123".into()),
                body: None,
            },
            eviction("flood-a"),
            eviction("flood-b"),
            eviction("flood-d"),
        ]
    );
}

#[tokio::test]
async fn ids_of_another_shape_are_refused_before_any_request() {
    let log = Log::default();
    let (evictor, _dir) = evictor(&log).await;
    for id in [
        "spiffe://nexus.local/plugins/flood-model",
        "spiffe://nexus.local/ns/plugins/sa/flood-model/extra",
        "spiffe://nexus.local/ns/plugins/sa/a,b",
    ] {
        let err = evictor.evict_workload(id).await.expect_err(id);
        assert!(
            matches!(err, EvictError::NotAWorkloadId { .. }),
            "{id}: {err}"
        );
    }
    assert!(log.lock().expect("log").is_empty());
}

#[tokio::test]
async fn a_refused_list_is_an_error_naming_namespace_and_account() {
    let log = Log::default();
    let (evictor, _dir) = evictor(&log).await;
    let err = evictor
        .evict_workload("spiffe://nexus.local/ns/forbidden/sa/x")
        .await
        .expect_err("403");
    let message = err.to_string();
    assert!(message.contains("`x` in `forbidden`"), "{message}");
    assert!(message.contains("forbidden"), "{message}");
}

fn posts(log: &Log, pod: &str) -> usize {
    let path = format!("/api/v1/namespaces/plugins/pods/{pod}/eviction");
    log.lock()
        .expect("log")
        .iter()
        .filter(|r| r.method == "POST" && r.path == path)
        .count()
}

const FLOOD: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";

fn retrying(interval_ms: u64, for_ms: u64) -> EvictorConfig {
    EvictorConfig {
        retry_interval: std::time::Duration::from_millis(interval_ms),
        retry_for: std::time::Duration::from_millis(for_ms),
        ..Default::default()
    }
}

#[tokio::test]
async fn a_pod_a_disruption_budget_blocks_is_retried_until_it_is_evicted() {
    let log = Log::default();
    let (evictor, _dir) = evictor_with(&log, retrying(20, 10_000)).await;
    let report = evictor
        .evict_workload_until_done(FLOOD, || true)
        .await
        .expect("evict");
    assert_eq!(report.evicted, ["flood-a", "flood-b"]);
    assert!(report.blocked.is_empty(), "{:?}", report.blocked);
    assert_eq!(report.gone, ["flood-c", "flood-d"]);
    // One list; only the blocked pod is tried again (twice refused, then accepted).
    let lists = log
        .lock()
        .expect("log")
        .iter()
        .filter(|r| r.method == "GET")
        .count();
    assert_eq!(lists, 1);
    assert_eq!(
        (
            posts(&log, "flood-a"),
            posts(&log, "flood-b"),
            posts(&log, "flood-d")
        ),
        (1, 3, 1)
    );
}

/// Evicts FLOOD with retries every `interval_ms` for `for_ms` while `still_revoked`;
/// the pods still blocked and how often flood-b (blocked twice) was tried.
async fn blocked_and_tries(
    interval_ms: u64,
    for_ms: u64,
    still_revoked: bool,
) -> (Vec<String>, usize) {
    let log = Log::default();
    let (evictor, _dir) = evictor_with(&log, retrying(interval_ms, for_ms)).await;
    let report = evictor
        .evict_workload_until_done(FLOOD, || still_revoked)
        .await
        .expect("evict");
    (report.blocked, posts(&log, "flood-b"))
}

#[tokio::test]
async fn retries_stop_at_reinstatement_and_at_retry_for() {
    let blocked = vec!["flood-b".to_string()];
    // Reinstated before the first retry: the blocked pod is left alone.
    assert_eq!(
        blocked_and_tries(20, 10_000, false).await,
        (blocked.clone(), 1)
    );
    // retry_for bounds the retries: 50 ms at 40 ms leaves room for one retry only.
    assert_eq!(blocked_and_tries(40, 50, true).await, (blocked.clone(), 2));
    // retry_for = 0: one pass, as evict_workload.
    assert_eq!(blocked_and_tries(20, 0, true).await, (blocked, 1));
}
