//! The Kubernetes mutating admission webhook (`POST /inject`, HTTPS): the API server
//! sends an AdmissionReview for each pod; nexus-kube answers with the JSONPatch that
//! injects the sidecar (or allows, or denies with a message). Bodies are read up to
//! `inject.max_review_bytes` (413 beyond); nothing here answers 500. The serving
//! certificate is re-read when its files change, without a restart.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use tokio::net::TcpListener;

use rustls::server::ResolvesServerCert;
use rustls::sign::CertifiedKey;

use crate::config::WebhookConfig;

/// The serving certificate, re-read when its files change (cert-manager renews it in
/// place): checked on each handshake by size and modification time; a renewal that
/// does not load is logged and the previous certificate keeps serving.
#[derive(Debug)]
struct ReloadingCert {
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
    current: arc_swap::ArcSwap<(Stamp, Arc<CertifiedKey>)>,
}

/// Size and modification time of the certificate and key files.
type Stamp = Vec<(u64, Option<std::time::SystemTime>)>;

fn stamp(paths: [&std::path::Path; 2]) -> Stamp {
    paths
        .iter()
        .map(|p| {
            std::fs::metadata(p)
                .map(|m| (m.len(), m.modified().ok()))
                .unwrap_or((0, None))
        })
        .collect()
}

fn load_key(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Arc<CertifiedKey>> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut std::io::BufReader::new(
        std::fs::File::open(cert)
            .map_err(|e| anyhow::anyhow!("webhook.cert {}: {e}", cert.display()))?,
    ))
    .collect::<Result<_, _>>()?;
    if certs.is_empty() {
        anyhow::bail!("webhook.cert {}: no certificate", cert.display());
    }
    let key_der = rustls_pemfile::private_key(&mut std::io::BufReader::new(
        std::fs::File::open(key)
            .map_err(|e| anyhow::anyhow!("webhook.key {}: {e}", key.display()))?,
    ))?
    .ok_or_else(|| anyhow::anyhow!("webhook.key {}: no private key", key.display()))?;
    let signing = rustls::crypto::ring::default_provider()
        .key_provider
        .load_private_key(key_der)?;
    Ok(Arc::new(CertifiedKey::new(certs, signing)))
}

impl ReloadingCert {
    fn new(cert: &std::path::Path, key: &std::path::Path) -> anyhow::Result<Self> {
        let stamp = stamp([cert, key]);
        let loaded = load_key(cert, key)?;
        Ok(Self {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: arc_swap::ArcSwap::from_pointee((stamp, loaded)),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: rustls::server::ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let now = stamp([&self.cert, &self.key]);
        let current = self.current.load();
        if current.0 != now {
            match load_key(&self.cert, &self.key) {
                Ok(loaded) => {
                    tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                    self.current.store(Arc::new((now, loaded.clone())));
                    return Some(loaded);
                }
                Err(error) => {
                    // Half-written renewal, most likely: keep serving the last good one.
                    tracing::warn!(%error, "webhook certificate changed but does not load; keeping the previous one");
                }
            }
        }
        Some(current.1.clone())
    }
}

fn load_tls(config: &WebhookConfig) -> anyhow::Result<rustls::ServerConfig> {
    let resolver = ReloadingCert::new(&config.cert, &config.key)?;
    let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_cert_resolver(Arc::new(resolver));
    tls.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(tls)
}

fn json(status: u16, body: Vec<u8>) -> http::Response<Full<Bytes>> {
    let mut response = http::Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = http::StatusCode::from_u16(status).unwrap_or(http::StatusCode::OK);
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// With a registry: a plugin pod (in one of `registry.plugin_namespaces`, or asking for
/// the sandbox) is admitted only when every container image is pinned by digest and that
/// digest is a certified, unretired version whose SPIFFE ID is the pod's
/// (`spiffe://TD/ns/NAMESPACE/sa/SERVICE_ACCOUNT`). `Err(message)`: deny with it;
/// `Ok(Some(version))`: a plugin pod admitted as that version (its first app
/// container's), which injection passes to the sidecar; `Ok(None)`: not a plugin pod.
async fn registry_check(
    body: &[u8],
    changes: &crate::changes::Changes,
) -> Result<Option<nexus_kube::PluginRun>, String> {
    let Some(registry) = changes.config.registry.as_ref() else {
        return Ok(None);
    };
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(body) else {
        return Ok(None);
    };
    let Some(request) = doc.get("request") else {
        return Ok(None);
    };
    let is_pod_create = request.pointer("/kind/kind").and_then(|v| v.as_str()) == Some("Pod")
        && request.get("operation").and_then(|v| v.as_str()) == Some("CREATE");
    if !is_pod_create {
        return Ok(None);
    }
    let Some(pod) = request.get("object") else {
        return Ok(None);
    };
    let namespace = request
        .get("namespace")
        .and_then(|v| v.as_str())
        .filter(|n| !n.is_empty())
        .or_else(|| pod.pointer("/metadata/namespace").and_then(|v| v.as_str()))
        .unwrap_or("default");
    let sandboxed = pod
        .pointer("/metadata/annotations")
        .and_then(|a| a.get(nexus_kube::inject::SANDBOX_ANNOTATION))
        .is_some();
    if !sandboxed && !registry.plugin_namespaces.iter().any(|n| n == namespace) {
        return Ok(None);
    }
    let account = pod
        .pointer("/spec/serviceAccountName")
        .and_then(|v| v.as_str())
        .filter(|n| !n.is_empty())
        .unwrap_or("default");
    let trust_domain = changes
        .config
        .webhook
        .as_ref()
        .map(|w| w.inject.trust_domain.clone())
        .unwrap_or_default();
    let pod_id = format!("spiffe://{trust_domain}/ns/{namespace}/sa/{account}");
    let mut images = Vec::new();
    // App containers first: the first one's version is the one the sidecar is told.
    for list in ["containers", "initContainers"] {
        if let Some(containers) = pod
            .pointer(&format!("/spec/{list}"))
            .and_then(|v| v.as_array())
        {
            for c in containers {
                let name = c.get("name").and_then(|v| v.as_str()).unwrap_or("?");
                let image = c.get("image").and_then(|v| v.as_str()).unwrap_or("");
                images.push((name.to_string(), image.to_string()));
            }
        }
    }
    if images.is_empty() {
        return Err("the plugin pod names no container image".into());
    }
    let mut admitted: Option<nexus_kube::PluginRun> = None;
    for (name, image) in images {
        let (_, digest) = nexus_identity::cosign::split_image(&image);
        let Some(digest) = digest.filter(|d| nexus_identity::cosign::validate_digest(d).is_ok())
        else {
            return Err(format!(
                "container {name}: image `{image}` is not pinned by digest: use REPO@sha256:… of a certified plugin version (`nexusctl plugin list`), registered with `nexusctl plugin register ...`"
            ));
        };
        let found = match changes.store.version_by_digest(digest).await {
            Ok(found) => found,
            Err(error) => {
                tracing::error!(%error, "admission: the registry cannot be read");
                return Err(format!(
                    "the plugin registry cannot be read ({error}); the pod is refused until it can"
                ));
            }
        };
        let Some((plugin, version)) = found else {
            return Err(format!(
                "container {name}: image {digest} is not a registered plugin version: register it with `nexusctl plugin register ...` and have a reviewer certify it"
            ));
        };
        if version.state != crate::registry::CERTIFIED {
            return Err(format!(
                "container {name}: {} v{} ({digest}) is {}, not certified{}",
                plugin.name,
                version.version,
                version.state,
                if version.state == crate::registry::REGISTERED {
                    ": a reviewer certifies it with `nexusctl plugin certify`"
                } else {
                    ": it may not run again"
                }
            ));
        }
        if version.spiffe_id != pod_id {
            return Err(format!(
                "container {name}: {} v{} runs as {}, but this pod would run as {pod_id}: use its namespace and service account",
                plugin.name, version.version, version.spiffe_id
            ));
        }
        admitted.get_or_insert(nexus_kube::PluginRun {
            uid: version.plugin_uid,
            version: version.version,
            image_digest: version.image_digest,
        });
    }
    Ok(admitted)
}

fn denial(body: &[u8], message: &str) -> http::Response<Full<Bytes>> {
    let uid = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|d| {
            d.pointer("/request/uid")
                .and_then(|v| v.as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    json(
        200,
        serde_json::json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "response": {
                "uid": uid,
                "allowed": false,
                "status": {"status": "Failure", "code": 403, "reason": "Forbidden", "message": message},
            }
        })
        .to_string()
        .into_bytes(),
    )
}

/// Answers one request.
pub async fn handle(
    req: http::Request<Incoming>,
    inject: &nexus_kube::InjectConfig,
    changes: Option<&crate::changes::Changes>,
) -> http::Response<Full<Bytes>> {
    if req.uri().path() != "/inject" {
        return json(
            404,
            br#"{"error":"not found: the webhook is POST /inject"}"#.to_vec(),
        );
    }
    if req.method() != http::Method::POST {
        return json(
            405,
            br#"{"error":"POST an AdmissionReview to /inject"}"#.to_vec(),
        );
    }
    let limit = inject.max_review_bytes;
    let body = match Limited::new(req.into_body(), limit).collect().await {
        Ok(body) => body.to_bytes(),
        Err(error) => {
            let (status, message) = if error.is::<http_body_util::LengthLimitError>() {
                (
                    413,
                    format!("the AdmissionReview is larger than {limit} bytes (max_review_bytes)"),
                )
            } else {
                (400, format!("cannot read the request body: {error}"))
            };
            return json(
                status,
                serde_json::json!({"error": message})
                    .to_string()
                    .into_bytes(),
            );
        }
    };
    let plugin = match changes {
        Some(changes) => match registry_check(&body, changes).await {
            Ok(plugin) => plugin,
            Err(message) => {
                tracing::warn!(%message, "admission denied by the plugin registry");
                return denial(&body, &format!("nexus plugin registry: {message}"));
            }
        },
        None => None,
    };
    let (status, body) = nexus_kube::review_plugin(&body, inject, plugin.as_ref());
    json(status, body)
}

/// Serves the webhook until the drain starts, with the admin listener's head limits
/// (header-read timeout, head size) and `webhook.max_connections`.
pub async fn serve(
    listener: TcpListener,
    config: WebhookConfig,
    changes: Arc<crate::changes::Changes>,
    limits: nexus_serve::ConnLimits,
    drain: nexus_serve::Watch,
) -> anyhow::Result<()> {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(load_tls(&config)?));
    let inject = Arc::new(config.inject.clone());
    let server = nexus_serve::http_server(&limits);
    let handshake_timeout = limits.header_read_timeout;
    tokio::spawn(nexus_serve::accept(
        listener,
        config.max_connections,
        drain,
        "webhook",
        move |tcp, _addr, drain| {
            let acceptor = acceptor.clone();
            let inject = inject.clone();
            let server = server.clone();
            let changes = changes.clone();
            async move {
                let Ok(Ok(tls)) =
                    tokio::time::timeout(handshake_timeout, acceptor.accept(tcp)).await
                else {
                    return;
                };
                let service = hyper::service::service_fn(move |req| {
                    let inject = inject.clone();
                    let changes = changes.clone();
                    async move { Ok::<_, Infallible>(handle(req, &inject, Some(&changes)).await) }
                });
                if let Err(error) =
                    nexus_serve::serve_connection(&server, tls, service, drain).await
                {
                    tracing::debug!(%error, "webhook connection ended with an error");
                }
            }
        },
    ));
    Ok(())
}
