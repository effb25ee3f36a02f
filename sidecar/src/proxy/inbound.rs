//! Inbound: terminate mTLS, authenticate the peer's SPIFFE ID (in the handshake, against
//! the allow list), then forward to the local app on loopback.

use std::sync::Arc;
use std::time::Duration;

use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use nexus_identity::{AllowList, IdentityStore, handshake_failure_reason, spiffe_id_of};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tower::ServiceBuilder;

use super::Steps;
use super::audit::AuditLayer;
use super::authorize::{NormalizeLayer, Parties, PolicyLayer};
use super::forward::{Forward, VersionPolicy};
use super::layers::{CallerIdentityLayer, Peer, RecordLayer};
use super::normalize::NormalizeLimits;
use super::overload::{ShedLayer, TimeoutLayer};
use super::revocation::{RevocationLayer, close_when_revoked};
use super::serve::serve_http;
use super::trace::TraceLayer;
use super::watch::WatchLayer;
use crate::config::{AppProtocol, Config};
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use crate::telemetry::Telemetry;

const DIRECTION: &str = "inbound";

/// The inbound proxy of one sidecar.
pub struct Inbound {
    acceptor: TlsAcceptor,
    forward: Forward<HttpConnector>,
    store: Arc<IdentityStore>,
    metrics: Arc<Metrics>,
    policy: Option<Arc<PolicyRuntime>>,
    server: auto::Builder<TokioExecutor>,
    handshake_timeout: Duration,
    max_connections: usize,
    shed: ShedLayer,
    request_timeout: std::time::Duration,
    telemetry: Option<Telemetry>,
    steps: Steps,
}

impl Inbound {
    /// Builds the inbound proxy; `config.inbound` must be set.
    pub fn new(
        config: &Config,
        store: Arc<IdentityStore>,
        metrics: Arc<Metrics>,
        policy: Option<Arc<PolicyRuntime>>,
    ) -> anyhow::Result<Self> {
        let inbound = config
            .inbound
            .as_ref()
            .ok_or_else(|| anyhow::anyhow!("no [inbound] section"))?;
        let allowed = AllowList::parse(&inbound.allowed_ids)?;
        let tls = nexus_identity::tls::server_config(
            store.clone(),
            allowed,
            config.tls_versions(),
            vec![b"h2".to_vec(), b"http/1.1".to_vec()],
        )?;
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(config.limits.connect_timeout));
        connector.set_nodelay(true);
        let client = |h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(config.limits.pool_idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2)
                .build(connector.clone())
        };
        let versions = match inbound.app_protocol {
            AppProtocol::Auto => VersionPolicy::Preserve,
            AppProtocol::Http1 => VersionPolicy::Http1,
            AppProtocol::Http2 => VersionPolicy::Http2,
        };
        let forward = Forward::new(
            client(false),
            client(true),
            http::uri::Scheme::HTTP,
            inbound.app.parse()?,
            versions,
        );
        let self_metrics = metrics.clone();
        Ok(Self {
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            forward,
            store,
            metrics,
            policy,
            server: nexus_serve::http_server(&config.limits.conn()),
            handshake_timeout: config.tls.handshake_timeout,
            max_connections: config.limits.max_connections,
            shed: ShedLayer::new(config.limits.max_in_flight, self_metrics, DIRECTION),
            request_timeout: config.limits.request_timeout,
            telemetry: None,
            steps: Steps::default(),
        })
    }

    /// Traces every request (a span each, `traceparent` carried on) when `telemetry` is on.
    pub fn with_telemetry(mut self, telemetry: Option<&Telemetry>) -> Self {
        self.telemetry = telemetry.cloned();
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
        let tls = match tokio::time::timeout(self.handshake_timeout, self.acceptor.accept(stream))
            .await
        {
            Ok(Ok(tls)) => tls,
            Ok(Err(error)) => {
                let reason = handshake_failure_reason(&error);
                if let Some(watch) = &self.steps.watch {
                    watch.auth_failure(None, reason);
                }
                tracing::debug!(%error, reason, "inbound handshake failed");
                self.metrics.handshake_failure(DIRECTION, reason);
                return;
            }
            Err(_) => {
                self.metrics.handshake_failure(DIRECTION, "timeout");
                return;
            }
        };
        // The identity the handshake verified is good until its certificate's not-after:
        // the connection ends then (a peer whose agent stopped renewing gets no requests
        // through on an expired SVID).
        let peer_not_after = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| nexus_identity::not_after_of(leaf).ok());
        let Some(peer) = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| {
                let spiffe_id = spiffe_id_of(leaf).ok()?;
                let digest = ring::digest::digest(&ring::digest::SHA256, leaf);
                let cert_hash = data_encoding::HEXLOWER.encode(digest.as_ref());
                Some(Peer {
                    spiffe_id: spiffe_id.into(),
                    cert_hash: cert_hash.into(),
                })
            })
        else {
            // The verifier already required an SVID; this is unreachable in practice.
            self.metrics.handshake_failure(DIRECTION, "no_spiffe_id");
            return;
        };
        let me: Arc<str> = self
            .store
            .current()
            .map(|i| i.spiffe_id().into())
            .unwrap_or_else(|| "".into());
        let parties = Parties {
            direction: DIRECTION,
            source: peer.spiffe_id.clone(),
            destination: me,
        };
        let peer_id = parties.source.clone();
        let me = parties.destination.clone();
        // The request path, top to bottom.
        let service = ServiceBuilder::new()
            .layer(RecordLayer::new(self.metrics.clone(), DIRECTION))
            // Overload is answered first and cheaply: a shed request costs no policy
            // evaluation, record or upstream connection.
            .layer(self.shed.clone())
            .option_layer(
                self.telemetry
                    .as_ref()
                    .map(|t| TraceLayer::inbound(t, DIRECTION, peer.spiffe_id.clone())),
            )
            .option_layer(
                self.steps
                    .audit
                    .clone()
                    .map(|audit| AuditLayer::new(audit, parties.clone())),
            )
            .option_layer(self.steps.watch.clone().map(|watch| {
                WatchLayer::new(watch, parties.source.clone(), nexus_anomaly::Observed::Peer)
            }))
            .layer(TimeoutLayer::new(
                self.request_timeout,
                self.metrics.clone(),
                DIRECTION,
            ))
            .layer(CallerIdentityLayer::new(self.store.clone(), Some(peer)))
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
        if self.steps.enforcement.is_revoked(&peer_id) {
            // Refused before any request: its connection closes now.
            self.metrics.handshake_failure(DIRECTION, "revoked");
            return;
        }
        tokio::select! {
            () = serve_http(&self.server, tls, service, drain, &self.metrics, DIRECTION) => {}
            () = close_when_revoked(self.steps.enforcement.clone(), peer_id.clone(), me) => {
                self.metrics.revoked_connection_closed();
                tracing::info!(peer = %peer_id, "connection closed: revoked");
            }
            () = until_unix(peer_not_after) => {
                self.metrics.connection_error(DIRECTION, "peer_certificate_expired");
                tracing::info!(peer = %peer_id, "connection closed: the peer's certificate expired");
            }
        }
    }
}

/// Completes at `unix_secs` (at once if past); never without one.
async fn until_unix(unix_secs: Option<i64>) {
    let Some(at) = unix_secs else {
        return std::future::pending().await;
    };
    #[allow(clippy::cast_precision_loss)]
    let now = nexus_identity::clock::unix_nanos() as f64 / 1e9;
    #[allow(clippy::cast_precision_loss)]
    let left = (at as f64 - now).max(0.0);
    tokio::time::sleep(Duration::from_secs_f64(left)).await;
}
