//! The cross-cutting steps of the request path, each a tower layer.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};
use nexus_identity::IdentityStore;

use super::ProxyBody;
use super::headers::{set_xfcc, strip_hop_by_hop};
use crate::metrics::{Direction, Metrics};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Counts each request by direction, method and final status.
#[derive(Clone, Debug)]
pub struct RecordLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl RecordLayer {
    /// A layer recording into `metrics` under `direction`.
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }
}

step_layer!(RecordLayer => Record);

impl<S, B> tower::Service<Request<B>> for Record<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let method = req.method().clone();
        let layer = self.layer.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            layer
                .metrics
                .request(layer.direction, &method, response.status());
            Ok(response)
        })
    }
}

/// The peer as the TLS handshake authenticated it.
#[derive(Clone, Debug)]
pub struct Peer {
    /// Its SPIFFE ID.
    pub spiffe_id: Arc<str>,
    /// SHA-256 of its leaf certificate, hex.
    pub cert_hash: Arc<str>,
}

/// Strips hop-by-hop headers and, inbound, tells the app who called through
/// `x-forwarded-client-cert`, replacing whatever the client sent under that name.
#[derive(Clone, Debug)]
pub struct CallerIdentityLayer {
    store: Arc<IdentityStore>,
    peer: Option<Peer>,
}

impl CallerIdentityLayer {
    /// Inbound: sets XFCC for `peer`. Outbound (`peer = None`): removes any XFCC.
    pub fn new(store: Arc<IdentityStore>, peer: Option<Peer>) -> Self {
        Self { store, peer }
    }
}

step_layer!(CallerIdentityLayer => CallerIdentity);

impl<S, B> tower::Service<Request<B>> for CallerIdentity<S>
where
    S: tower::Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: Request<B>) -> S::Future {
        let headers = req.headers_mut();
        strip_hop_by_hop(headers);
        headers.remove(super::headers::XFCC);
        if let (Some(peer), Some(me)) = (&self.layer.peer, self.layer.store.current()) {
            set_xfcc(headers, me.spiffe_id(), &peer.cert_hash, &peer.spiffe_id);
        }
        self.inner.call(req)
    }
}
