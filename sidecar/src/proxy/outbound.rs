//! Outbound: the local app speaks plain HTTP to a loopback listener; the sidecar
//! originates mTLS with its SVID and accepts the upstream only if it presents the
//! expected SPIFFE ID. On a mismatch the handshake fails before any request byte is
//! sent, and the app gets a 502 saying so.

use std::sync::Arc;

use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use nexus_identity::{AllowList, IdentityStore};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

use super::Steps;
use super::audit::AuditLayer;
use super::authorize::{NormalizeLayer, Parties, PolicyLayer};
use super::forward::{Forward, VersionPolicy};
use super::layers::{CallerIdentityLayer, RecordLayer};
use super::normalize::NormalizeLimits;
use super::overload::{ShedLayer, TimeoutLayer};
use super::revocation::{RevocationLayer, close_when_revoked};
use super::serve::serve_http;
use super::trace::TraceLayer;
use super::watch::WatchLayer;
use crate::config::{Config, OutboundConfig};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use crate::telemetry::Telemetry;

const DIRECTION: &str = "outbound";

/// One outbound listener and its upstream.
pub struct Outbound {
    forward: Forward<HttpsConnector<HttpConnector>>,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    policy: Option<Arc<PolicyRuntime>>,
    expected_id: Arc<str>,
    server: auto::Builder<TokioExecutor>,
    max_connections: usize,
    shed: ShedLayer,
    request_timeout: std::time::Duration,
    trace: Option<TraceLayer>,
    steps: Steps,
}

impl Outbound {
    /// Builds the proxy for `out`.
    pub fn new(
        config: &Config,
        out: &OutboundConfig,
        store: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        policy: Option<Arc<PolicyRuntime>>,
    ) -> anyhow::Result<Self> {
        let expected = AllowList::parse(&[&out.expected_id])?;
        let tls = nexus_identity::tls::client_config(
            store.clone(),
            expected,
            config.tls_versions(),
            Vec::new(),
        )?;
        let mut tcp = HttpConnector::new();
        tcp.set_connect_timeout(Some(config.limits.connect_timeout));
        tcp.set_nodelay(true);
        tcp.enforce_http(false);
        let h1 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls.clone())
            .https_only()
            .enable_http1()
            .wrap_connector(tcp.clone());
        let h2 = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_only()
            .enable_http2()
            .wrap_connector(tcp);
        let client = |connector: HttpsConnector<HttpConnector>, h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(config.limits.pool_idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2)
                .build(connector)
        };
        let forward = Forward::new(
            client(h1, false),
            client(h2, true),
            http::uri::Scheme::HTTPS,
            out.upstream.parse()?,
            VersionPolicy::Preserve,
        );
        let self_metrics = metrics.clone();
        Ok(Self {
            forward,
            store,
            metrics,
            policy,
            expected_id: out.expected_id.as_str().into(),
            server: nexus_serve::http_server(&config.limits.conn()),
            max_connections: config.limits.max_connections,
            shed: ShedLayer::new(config.limits.max_in_flight, self_metrics, DIRECTION),
            request_timeout: config.limits.request_timeout,
            trace: None,
            steps: Steps::default(),
        })
    }

    /// Traces every request (a span each, `traceparent` carried on) when `telemetry` is on.
    pub fn with_telemetry(mut self, telemetry: Option<&Telemetry>, out: &OutboundConfig) -> Self {
        self.trace = telemetry
            .zip(out.upstream.parse().ok())
            .map(|(t, upstream)| {
                TraceLayer::outbound(t, DIRECTION, &upstream, self.expected_id.clone())
            });
        self
    }

    /// Execution records, revocation enforcement and the anomaly watch, as configured.
    pub fn with_steps(mut self, steps: &Steps) -> Self {
        self.steps = steps.clone();
        self
    }

    /// Serves connections from `listener` until the drain starts.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, drain: nexus_serve::Watch) {
        let max = self.max_connections;
        nexus_serve::accept(
            listener,
            max,
            drain,
            DIRECTION,
            move |stream, _addr, drain| self.clone().connection(stream, drain),
        )
        .await;
    }

    async fn connection(self: Arc<Self>, stream: TcpStream, drain: nexus_serve::Watch) {
        let me: Arc<str> = self
            .store
            .current()
            .map(|i| i.spiffe_id().into())
            .unwrap_or_else(|| "".into());
        let parties = Parties {
            direction: DIRECTION,
            source: me,
            destination: self.expected_id.clone(),
        };
        let me = parties.source.clone();
        // The request path, top to bottom.
        let service = ServiceBuilder::new()
            .layer(RecordLayer::new(self.metrics.clone(), DIRECTION))
            // Overload is answered first and cheaply: a shed request costs no policy
            // evaluation, record or upstream connection.
            .layer(self.shed.clone())
            .option_layer(self.trace.clone())
            .option_layer(
                self.steps
                    .audit
                    .clone()
                    .map(|audit| AuditLayer::new(audit, parties.clone())),
            )
            .option_layer(self.steps.watch.clone().map(|watch| {
                WatchLayer::new(watch, parties.source.clone(), nexus_anomaly::Observed::Own)
            }))
            .layer(TimeoutLayer::new(
                self.request_timeout,
                self.metrics.clone(),
                DIRECTION,
            ))
            .layer(CallerIdentityLayer::new(self.store.clone(), None))
            .layer(RevocationLayer::new(
                self.steps.enforcement.clone(),
                self.metrics.clone(),
                parties.clone(),
            ))
            .layer(NormalizeLayer::new(
                NormalizeLimits::default(),
                self.metrics.clone(),
                DIRECTION,
            ))
            .option_layer(
                self.policy
                    .clone()
                    .map(|p| PolicyLayer::new(p, self.metrics.clone(), parties)),
            )
            .service(self.forward.clone());
        tokio::select! {
            () = serve_http(&self.server, stream, service, drain, &self.metrics, DIRECTION) => {}
            () = close_when_revoked(self.steps.enforcement.clone(), self.expected_id.clone(), me) => {
                self.metrics.revoked_connection_closed();
                tracing::info!(upstream = %self.expected_id, "connection closed: revoked");
            }
        }
    }
}
