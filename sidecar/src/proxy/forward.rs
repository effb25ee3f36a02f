//! The innermost service: sends the request on, keeping the caller's HTTP version
//! (HTTP/1.1 stays HTTP/1.1; HTTP/2, e.g. gRPC, stays HTTP/2 with its trailers), and
//! streams both bodies. Connection failures are refused (502/504, see [`Refusal`]) with
//! the cause.

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::{Connect, Connected, Connection};
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::outcome::Refusal;
use super::{AnswerFuture, ProxyBody};
use crate::config::{LimitsConfig, RuntimeKind};

/// A connector whose connections tell the client no "extra" about themselves. Tokio's
/// TCP connection reports its addresses (`HttpInfo`), and the client copies them into
/// every response's extensions: an extension map and a box per response (three
/// allocations) that nothing here reads. What the pool does use (HTTP/2 negotiated,
/// proxied) is kept.
#[derive(Clone, Debug)]
pub struct Bare<C>(C);

impl<C> tower::Service<Uri> for Bare<C>
where
    C: tower::Service<Uri>,
{
    type Response = BareIo<C::Response>;
    type Error = C::Error;
    type Future = futures::future::MapOk<C::Future, fn(C::Response) -> BareIo<C::Response>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        futures::TryFutureExt::map_ok(self.0.call(uri), BareIo)
    }
}

/// A connection of [`Bare`]: the connection's bytes as they are.
#[derive(Debug)]
pub struct BareIo<T>(T);

impl<T: Connection> Connection for BareIo<T> {
    fn connected(&self) -> Connected {
        let inner = self.0.connected();
        let connected = Connected::new().proxy(inner.is_proxied());
        if inner.is_negotiated_h2() {
            connected.negotiated_h2()
        } else {
            connected
        }
    }
}

impl<T: hyper::rt::Read + Unpin> hyper::rt::Read for BareIo<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: hyper::rt::ReadBufCursor<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<T: hyper::rt::Write + Unpin> hyper::rt::Write for BareIo<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.0.is_write_vectored()
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write_vectored(cx, bufs)
    }
}

/// Which client a request takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VersionPolicy {
    /// The caller's version.
    Preserve,
    /// Always HTTP/1.1.
    Http1,
    /// Always HTTP/2.
    Http2,
}

/// Forwards to one target (`scheme://authority`).
#[derive(Clone, Debug)]
pub struct Forward<C> {
    /// A pool per connection worker, so that a request and the upstream connection it
    /// takes run on the same thread (index 0: any other thread; `i + 1`: worker `i`).
    http1: Arc<[Client<Bare<C>, ProxyBody>]>,
    http2: Arc<[Client<Bare<C>, ProxyBody>]>,
    scheme: Scheme,
    authority: Authority,
    versions: VersionPolicy,
}

impl<C> Forward<C>
where
    C: Clone + Send + Sync + 'static,
    Bare<C>: Connect,
{
    /// Pooled clients over `http1` and `http2` (connectors restricted to one version
    /// each, or one connector for both), with the pool limits of `limits`.
    pub fn new(
        limits: &LimitsConfig,
        (http1, http2): (C, C),
        scheme: Scheme,
        authority: Authority,
        versions: VersionPolicy,
    ) -> Self {
        let client = |connector: C, h2: bool| {
            Client::builder(TokioExecutor::new())
                .pool_idle_timeout(limits.pool_idle_timeout)
                .pool_timer(TokioTimer::new())
                .timer(TokioTimer::new())
                .http2_only(h2)
                .build(Bare(connector))
        };
        // With `limits.runtime = "workers"`, one pool per worker (and one for any other
        // thread); with `shared`, one pool.
        let pools = match limits.runtime {
            RuntimeKind::Workers => limits.request_threads() + 1,
            RuntimeKind::Shared => 1,
        };
        Self {
            http1: (0..pools).map(|_| client(http1.clone(), false)).collect(),
            http2: (0..pools).map(|_| client(http2.clone(), true)).collect(),
            scheme,
            authority,
            versions,
        }
    }

    /// This thread's pool among `pools`.
    fn pool(pools: &[Client<Bare<C>, ProxyBody>]) -> Client<Bare<C>, ProxyBody> {
        let i = nexus_serve::workers::current().map_or(0, |w| w + 1);
        pools.get(i).unwrap_or(&pools[0]).clone()
    }

    fn target(&self, path: Option<&PathAndQuery>) -> Result<Uri, http::Error> {
        Uri::builder()
            .scheme(self.scheme.clone())
            .authority(self.authority.clone())
            .path_and_query(
                path.cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            )
            .build()
    }
}

impl<C, B> tower::Service<Request<B>> for Forward<C>
where
    C: Clone + Send + Sync + 'static,
    Bare<C>: Connect,
    B: Body<Data = Bytes, Error = hyper::Error> + Send + Sync + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Refusal;
    type Future = AnswerFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        // One body type for both clients, whatever the layers above wrapped it in.
        let mut req = req.map(BodyExt::boxed);
        let use_h2 = match self.versions {
            VersionPolicy::Preserve => req.version() == Version::HTTP_2,
            VersionPolicy::Http1 => false,
            VersionPolicy::Http2 => true,
        };
        let uri = match self.target(req.uri().path_and_query()) {
            Ok(uri) => uri,
            Err(e) => {
                let refusal = Refusal::BadTarget {
                    detail: e.to_string(),
                };
                return Box::pin(async move { Err(refusal) });
            }
        };
        *req.uri_mut() = uri;
        let client = if use_h2 {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(http::header::HOST);
            Self::pool(&self.http2)
        } else {
            *req.version_mut() = Version::HTTP_11;
            Self::pool(&self.http1)
        };
        Box::pin(async move {
            match client.request(req).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    super::headers::strip_hop_by_hop(&mut parts.headers);
                    Ok(Response::from_parts(parts, body.boxed()))
                }
                Err(error) => Err(upstream_error(&error)),
            }
        })
    }
}

/// The refusal for a failed forward, with the most specific cause found.
fn upstream_error(error: &hyper_util::client::legacy::Error) -> Refusal {
    if let Some(tls) = find_tls_error(error) {
        return Refusal::UpstreamIdentity {
            detail: describe_tls_error(tls),
        };
    }
    let detail = error_chain(error);
    if detail.contains("timed out") || detail.contains("timeout") {
        Refusal::UpstreamTimedOut { detail }
    } else {
        Refusal::UpstreamUnavailable { detail }
    }
}

fn find_tls_error<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a rustls::Error> {
    let mut current: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(e) = current {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls);
        }
        // hyper-rustls wraps tokio-rustls's io::Error in another io::Error, and
        // io::Error::source() skips the inner error: descend through get_ref() too.
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && let Some(inner) = io.get_ref()
            && let Some(tls) = find_tls_error(inner)
        {
            return Some(tls);
        }
        current = e.source();
    }
    None
}

/// A readable account of a TLS error, with the SPIFFE reason in plain words.
fn describe_tls_error(error: &rustls::Error) -> String {
    if let rustls::Error::InvalidCertificate(rustls::CertificateError::Other(other)) = error
        && let Some(spiffe) = other.0.downcast_ref::<nexus_identity::SpiffeVerifyError>()
    {
        return spiffe.to_string();
    }
    error.to_string()
}

fn error_chain(error: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![error.to_string()];
    let mut current = error.source();
    while let Some(e) = current {
        parts.push(e.to_string());
        current = e.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connection that says what tokio's TCP stream says (its addresses, as an extra)
    /// and that HTTP/2 was negotiated.
    struct Told;

    impl Connection for Told {
        fn connected(&self) -> Connected {
            Connected::new()
                .extra("addresses")
                .negotiated_h2()
                .proxy(true)
        }
    }

    #[test]
    fn a_bare_connection_keeps_what_the_pool_uses_and_drops_the_extra() {
        let told = BareIo(Told).connected();
        assert!(told.is_negotiated_h2());
        assert!(told.is_proxied());
        let mut extensions = http::Extensions::new();
        told.get_extras(&mut extensions);
        assert!(extensions.is_empty(), "the extra reached the response");
        // The connection itself does tell it.
        Told.connected().get_extras(&mut extensions);
        assert_eq!(extensions.get::<&str>(), Some(&"addresses"));
    }
}
