//! The innermost service: sends the request on, keeping the caller's HTTP version
//! (HTTP/1.1 stays HTTP/1.1; HTTP/2, e.g. gRPC, stays HTTP/2 with its trailers), and
//! streams both bodies. Connection failures are refused (502/504, see [`Refusal`]) with
//! the cause.

use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use super::outcome::Refusal;
use super::{AnswerFuture, ProxyBody};
use crate::config::{LimitsConfig, RuntimeKind};

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
    http1: Arc<[Client<C, ProxyBody>]>,
    http2: Arc<[Client<C, ProxyBody>]>,
    scheme: Scheme,
    authority: Authority,
    versions: VersionPolicy,
}

impl<C> Forward<C>
where
    C: Connect + Clone + Send + Sync + 'static,
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
                .build(connector)
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
    fn pool(pools: &[Client<C, ProxyBody>]) -> Client<C, ProxyBody> {
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
    C: Connect + Clone + Send + Sync + 'static,
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
