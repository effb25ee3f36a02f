//! The request path of both directions, built by one function ([`Proxy::stack`]), and
//! what each listener shares: the accept loop, the connection's HTTP server and the
//! reasons a connection is closed early. `inbound` and `outbound` only add how a
//! connection arrives (TLS or plain) and where requests go.

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use nexus_anomaly::Observed;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tower::ServiceBuilder;

use super::audit::AuditLayer;
use super::authorize::{NormalizeLayer, Parties, PolicyLayer};
use super::forward::{Bare, Forward};
use super::layers::{CallerIdentityLayer, Peer};
use super::normalize::NormalizeLimits;
use super::overload::{ShedLayer, TimeoutLayer};
use super::rescue::RescueLayer;
use super::revocation::{RevocationLayer, close_when_revoked};
use super::serve::serve_http;
use super::trace::TraceLayer;
use super::watch::WatchLayer;
use super::{ProxyBody, Steps, step};
use crate::config::Config;
use crate::metrics::Direction;

/// Who is on the other end of one connection, and how its requests are observed.
#[derive(Clone, Debug)]
pub struct Site {
    /// Source and destination SPIFFE IDs.
    pub parties: Parties,
    /// Inbound: the authenticated caller, told to the app in XFCC. Outbound: none (any
    /// XFCC from the app is removed).
    pub caller: Option<Peer>,
    /// The trace step, when telemetry is on.
    pub trace: Option<TraceLayer>,
    /// Whose requests the anomaly watch sees: the peer (inbound) or this workload
    /// (outbound).
    pub observed: Observed,
}

/// What every connection of one listener shares.
#[derive(Debug)]
pub struct Proxy {
    direction: Direction,
    steps: Steps,
    /// One limit for the whole listener.
    shed: ShedLayer,
    request_timeout: Duration,
    server: auto::Builder<TokioExecutor>,
    max_connections: usize,
}

impl Proxy {
    /// A listener's parts: `steps`, and its own limits from `config.limits`.
    pub fn new(config: &Config, direction: Direction, steps: Steps) -> Self {
        Self {
            direction,
            shed: ShedLayer::new(
                config.limits.max_in_flight,
                steps.metrics.clone(),
                direction,
            ),
            steps,
            request_timeout: config.limits.request_timeout,
            server: nexus_serve::http_server(&config.limits.conn()),
            max_connections: config.limits.max_connections,
        }
    }

    /// What every listener shares.
    pub fn steps(&self) -> &Steps {
        &self.steps
    }

    /// This workload's SPIFFE ID (empty before the first SVID).
    pub fn me(&self) -> Arc<str> {
        self.steps
            .store
            .current()
            .map(|i| i.spiffe_id().into())
            .unwrap_or_else(|| "".into())
    }

    /// The request path, top to bottom. Every step below the rescue answers a response
    /// or a typed refusal; the rescue turns refusals into responses.
    pub fn stack<C>(
        &self,
        site: &Site,
        forward: Forward<C>,
    ) -> impl tower::Service<
        Request<Incoming>,
        Response = Response<ProxyBody>,
        Error = Infallible,
        Future: Send + 'static,
    > + Clone
    + Send
    + 'static
    where
        C: Clone + Send + Sync + 'static,
        Bare<C>: Connect,
    {
        let parties = &site.parties;
        ServiceBuilder::new()
            .layer(RescueLayer::new(self.steps.metrics.clone(), self.direction))
            // Overload is answered first and cheaply: a shed request costs no span,
            // policy evaluation, record or upstream connection.
            .layer(step(self.shed.clone()))
            .option_layer(site.trace.clone().map(step))
            .option_layer(
                self.steps
                    .audit
                    .clone()
                    .map(|audit| step(AuditLayer::new(audit, parties.clone()))),
            )
            .option_layer(self.steps.watch.clone().map(|watch| {
                step(WatchLayer::new(
                    watch,
                    parties.source.clone(),
                    site.observed,
                ))
            }))
            .layer(step(TimeoutLayer::new(self.request_timeout)))
            .layer(step(CallerIdentityLayer::new(
                self.steps.store.clone(),
                site.caller.clone(),
            )))
            .layer(step(RevocationLayer::new(
                self.steps.enforcement.clone(),
                parties.clone(),
            )))
            .layer(step(NormalizeLayer::new(NormalizeLimits::default())))
            .option_layer(self.steps.policy.clone().map(|policy| {
                step(PolicyLayer::new(
                    policy,
                    self.steps.metrics.clone(),
                    parties.clone(),
                ))
            }))
            .service(forward)
    }

    /// Serves `io` with the stack for `site` until the connection ends or drains. It is
    /// closed early when either party is revoked, or at `peer_not_after` (unix seconds:
    /// the peer's certificate expires, and with it what the handshake proved).
    pub async fn serve<I, C>(
        &self,
        io: I,
        site: Site,
        forward: Forward<C>,
        peer_not_after: Option<i64>,
        drain: nexus_serve::Watch,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        C: Clone + Send + Sync + 'static,
        Bare<C>: Connect,
    {
        let service = self.stack(&site, forward);
        let Parties {
            direction,
            source,
            destination,
        } = site.parties;
        let (enforcement, metrics) = (self.steps.enforcement.clone(), &self.steps.metrics);
        tokio::select! {
            () = serve_http(&self.server, io, service, drain, metrics, direction) => {}
            () = close_when_revoked(enforcement, source.clone(), destination.clone()) => {
                metrics.revoked_connection_closed();
                tracing::info!(direction, %source, %destination, "connection closed: revoked");
            }
            () = until_unix(peer_not_after) => {
                metrics.connection_error(direction, "peer_certificate_expired");
                tracing::info!(direction, %source, "connection closed: the peer's certificate expired");
            }
        }
    }
}

/// One direction's listener: how a connection arrives (TLS or plain) and where its
/// requests go.
pub trait Listener: Send + Sync + 'static {
    /// What every connection shares.
    fn proxy(&self) -> &Proxy;

    /// Serves one accepted connection until it ends or drains.
    fn connection(
        self: Arc<Self>,
        stream: TcpStream,
        drain: nexus_serve::Watch,
    ) -> impl Future<Output = ()> + Send + 'static;
}

/// Accepts connections from `listener` until the drain starts, at most
/// `limits.max_connections` at once, and serves each (see [`nexus_serve::accept`]): on
/// one of `workers` when given (`limits.runtime = "workers"`), where the whole
/// connection then runs, or else as a task of this runtime.
pub async fn serve<L: Listener>(
    side: Arc<L>,
    listener: TcpListener,
    drain: nexus_serve::Watch,
    workers: Option<Arc<nexus_serve::Workers>>,
) {
    let proxy = side.proxy();
    let (max_connections, direction) = (proxy.max_connections, proxy.direction);
    match workers {
        None => {
            nexus_serve::accept(
                listener,
                max_connections,
                drain,
                direction,
                |stream, _addr, drain| side.clone().connection(stream, drain),
            )
            .await;
        }
        Some(workers) => {
            // Handed to a worker from the accepting task: no task of this runtime per
            // connection.
            nexus_serve::accept_into(
                listener,
                max_connections,
                drain,
                direction,
                |stream, _addr, drain, slot| {
                    let side = side.clone();
                    workers.serve(stream, move |stream| async move {
                        side.connection(stream, drain).await;
                        drop(slot);
                    });
                },
            )
            .await;
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
