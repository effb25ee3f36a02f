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
/// blocked by a PodDisruptionBudget (429), one already gone (404).
fn answer(method: &str, path: &str) -> (u16, Value) {
    match (method, path) {
        ("GET", "/api/v1/namespaces/plugins/pods") => (
            200,
            json!({"kind": "PodList", "apiVersion": "v1", "metadata": {"resourceVersion": "7"},
                   "items": [pod("flood-a", false), pod("flood-b", false), pod("flood-c", true), pod("flood-d", false)]}),
        ),
        ("POST", "/api/v1/namespaces/plugins/pods/flood-a/eviction") => (201, status(201, "", "")),
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
                        log.lock().expect("log").push(Recorded {
                            method: method.clone(),
                            path: path.clone(),
                            query,
                            authorization,
                            body,
                        });
                        let (code, doc) = answer(&method, &path);
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
    let addr = serve(log.clone()).await;
    let dir = tempfile::tempdir().expect("tempdir");
    let token = dir.path().join("token");
    // As the kubelet writes it: no trailing newline (kube sends the file verbatim).
    std::fs::write(&token, "test-token-123").expect("token");
    let cfg = EvictorConfig {
        api_server: format!("http://{addr}"),
        token_file: token,
        danger_allow_plain_http: true,
        ..Default::default()
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
