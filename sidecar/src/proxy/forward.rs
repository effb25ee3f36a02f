//! The innermost service: sends the request on, keeping the caller's HTTP version
//! (HTTP/1.1 stays HTTP/1.1; HTTP/2, e.g. gRPC, stays HTTP/2 with its trailers), and
//! streams both bodies. Connection failures become a 502/504 with a JSON body saying why.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, StatusCode, Uri, Version};
use http_body::Body;
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::Connect;

use super::{ProxyBody, json_response};

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
    http1: Client<C, ProxyBody>,
    http2: Client<C, ProxyBody>,
    scheme: Scheme,
    authority: Authority,
    versions: VersionPolicy,
}

impl<C> Forward<C>
where
    C: Connect + Clone + Send + Sync + 'static,
{
    /// `http1`/`http2` are clients restricted to one version each.
    pub fn new(
        http1: Client<C, ProxyBody>,
        http2: Client<C, ProxyBody>,
        scheme: Scheme,
        authority: Authority,
        versions: VersionPolicy,
    ) -> Self {
        Self {
            http1,
            http2,
            scheme,
            authority,
            versions,
        }
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
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
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
                let response = json_response(
                    StatusCode::BAD_REQUEST,
                    serde_json::json!({"error": "bad request target", "detail": e.to_string()}),
                );
                return Box::pin(async move { Ok(response) });
            }
        };
        *req.uri_mut() = uri;
        let client = if use_h2 {
            *req.version_mut() = Version::HTTP_2;
            req.headers_mut().remove(http::header::HOST);
            self.http2.clone()
        } else {
            *req.version_mut() = Version::HTTP_11;
            self.http1.clone()
        };
        Box::pin(async move {
            Ok(match client.request(req).await {
                Ok(response) => {
                    let (mut parts, body) = response.into_parts();
                    super::headers::strip_hop_by_hop(&mut parts.headers);
                    Response::from_parts(parts, body.boxed())
                }
                Err(error) => upstream_error(&error),
            })
        })
    }
}

/// The response for a failed forward, with the most specific cause found.
fn upstream_error(error: &hyper_util::client::legacy::Error) -> Response<ProxyBody> {
    if let Some(tls) = find_tls_error(error) {
        let detail = describe_tls_error(tls);
        tracing::warn!(%detail, "upstream TLS handshake failed");
        return json_response(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": "upstream identity rejected", "detail": detail}),
        );
    }
    let detail = error_chain(error);
    let timed_out = detail.contains("timed out") || detail.contains("timeout");
    tracing::warn!(%detail, "forward failed");
    if timed_out {
        json_response(
            StatusCode::GATEWAY_TIMEOUT,
            serde_json::json!({"error": "upstream timed out", "detail": detail}),
        )
    } else {
        json_response(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"error": "upstream unavailable", "detail": detail}),
        )
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
