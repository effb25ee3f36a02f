//! The admin listener: `/live` (the process runs), `/ready` (an SVID is present, a
//! policy revision loaded, the gateway state verified and applied), `/metrics`
//! (Prometheus text), `GET /v1/signals` (recent sandbox violations). It is read-only:
//! reports come over the in-pod socket ([`crate::signals::serve_socket`]).

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use nexus_identity::IdentityStore;
use tokio::net::TcpListener;

use crate::control::{Enforcement, LinkState};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use crate::signals::Signals;

/// State the admin endpoints read.
#[derive(Clone, Debug)]
pub struct Admin {
    /// Identity readiness.
    pub store: Arc<IdentityStore>,
    /// The registry to expose.
    pub metrics: Arc<Metrics>,
    /// Policy readiness, when policy is configured.
    pub policy: Option<Arc<PolicyRuntime>>,
    /// The gateway link.
    pub enforcement: Arc<Enforcement>,
    /// Draining after SIGTERM: `/ready` answers 503 from the first signal on.
    pub draining: nexus_serve::Readiness,
    /// The plugin version the pod was admitted as (`[plugin]`), if any.
    pub plugin: Option<crate::config::PluginConfig>,
}

impl Admin {
    fn respond(&self, req: &Request<Incoming>) -> Response<Full<Bytes>> {
        let (status, content_type, body) = match req.uri().path() {
            "/live" => (StatusCode::OK, "text/plain", "live\n".to_string()),
            "/ready" => self.readiness(),
            "/metrics" => (
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                self.metrics.encode(),
            ),
            _ => (
                StatusCode::NOT_FOUND,
                "text/plain",
                "not found: try /live, /ready, /metrics\n".to_string(),
            ),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = http::HeaderValue::from_str(content_type) {
            response
                .headers_mut()
                .insert(http::header::CONTENT_TYPE, value);
        }
        response
    }

    fn readiness(&self) -> (StatusCode, &'static str, String) {
        if self.draining.is_draining() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: draining (shutting down; limits.drain_delay, then limits.shutdown_grace)\n".into(),
            );
        }
        let Some(identity) = self.store.current() else {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                "not ready: no SVID yet\n".into(),
            );
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        if identity.not_after() <= i64::try_from(now).unwrap_or(i64::MAX) {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!(
                    "not ready: the SVID of {} expired and was not renewed (is the Workload API up?)\n",
                    identity.spiffe_id()
                ),
            );
        }
        let policy = match &self.policy {
            None => "policy: none (authentication only)".to_string(),
            Some(runtime) => match runtime.current() {
                Some(loaded) => format!("policy: {}", loaded.policy.revision()),
                None => {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        "text/plain",
                        "not ready: no policy revision loaded yet (see the log for file:line:col)\n".into(),
                    );
                }
            },
        };
        if let Some((_, why)) = self.enforcement.holds().into_iter().next() {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                format!("not ready: {why}\n"),
            );
        }
        let link = self.enforcement.link();
        self.metrics.gateway_link(link.as_str());
        let gateway = match link {
            LinkState::Standalone => "gateway: none (standalone)".to_string(),
            LinkState::Connected => "gateway: connected".to_string(),
            LinkState::Disconnected => format!(
                "gateway: disconnected since unix ms {}; enforcing the last snapshot",
                self.enforcement.lost_since_ms()
            ),
            LinkState::FailClosed => {
                return (
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    format!(
                        "not ready: gateway: fail_closed (unreachable since unix ms {}); refusing every request\n",
                        self.enforcement.lost_since_ms()
                    ),
                );
            }
        };
        let plugin = self
            .plugin
            .as_ref()
            .map(|p| format!("plugin: {p}\n"))
            .unwrap_or_default();
        (
            StatusCode::OK,
            "text/plain",
            format!(
                "ready: {}\n{policy}\n{gateway}\n{plugin}",
                identity.spiffe_id()
            ),
        )
    }

    /// Serves the admin endpoints until the drain starts, with a store of its own for
    /// sandbox signals.
    pub async fn serve(
        self,
        listener: TcpListener,
        limits: nexus_serve::ConnLimits,
        max_connections: usize,
        drain: nexus_serve::Watch,
    ) {
        let signals = Signals::new(self.metrics.clone(), crate::signals::DEFAULT_CAPACITY);
        self.serve_with_signals(listener, limits, max_connections, drain, signals)
            .await
    }

    /// Serves the admin endpoints until the drain starts (with the same connection cap
    /// and header timeout as the proxy's listeners); `GET /v1/signals` reads `signals`.
    pub async fn serve_with_signals(
        self,
        listener: TcpListener,
        limits: nexus_serve::ConnLimits,
        max_connections: usize,
        drain: nexus_serve::Watch,
        signals: Arc<Signals>,
    ) {
        let server = nexus_serve::http_server(&limits);
        nexus_serve::accept(
            listener,
            max_connections,
            drain,
            "admin",
            move |stream, _addr, drain| {
                let admin = self.clone();
                let server = server.clone();
                let signals = signals.clone();
                async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let admin = admin.clone();
                        let signals = signals.clone();
                        async move {
                            if req.uri().path() == crate::signals::PATH {
                                // The network listener is read-only: reports (writes)
                                // come only over the in-pod socket.
                                if req.method() != http::Method::GET {
                                    return Ok::<_, Infallible>(crate::signals::refuse_on_network(
                                        &admin.metrics,
                                    ));
                                }
                                return Ok::<_, Infallible>(signals.handle(req).await);
                            }
                            Ok::<_, Infallible>(admin.respond(&req))
                        }
                    });
                    if let Err(error) =
                        nexus_serve::serve_connection(&server, stream, service, drain).await
                    {
                        tracing::debug!(%error, "admin connection ended with an error");
                    }
                }
            },
        )
        .await;
    }
}
