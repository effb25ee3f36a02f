//! Serving HTTP on the proxy's connections through [`nexus_serve`] (the accept loop,
//! connection caps, head limits and graceful drain every listener shares), counting how
//! connections ended. Errors end the connection (hyper answers 400/431 to a malformed HTTP/1 request
//! first) and are counted; nothing here panics on input.

use std::convert::Infallible;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::TokioExecutor;
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};

use super::ProxyBody;
use crate::metrics::{Direction, Metrics};

/// Serves HTTP on one connection until it ends or drains, and counts how it ended if it
/// ended badly.
pub async fn serve_http<I, S>(
    server: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
    drain: nexus_serve::Watch,
    metrics: &Metrics,
    direction: Direction,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    S: tower::Service<Request<Incoming>, Response = Response<ProxyBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
{
    let served = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = served.clone();
    let service = tower::ServiceBuilder::new()
        .map_request(move |req: Request<Incoming>| {
            counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            req
        })
        .service(service);
    let service = TowerToHyperService::new(service);
    if let Err(error) = nexus_serve::serve_connection(server, io, service, drain).await {
        let reason = classify(error.as_ref());
        // hyper's header timer also runs while a keep-alive connection waits for its next
        // request: closing an idle connection after a served request is not an error.
        if reason == "header_timeout" && served.load(std::sync::atomic::Ordering::Relaxed) > 0 {
            tracing::trace!(direction, "idle keep-alive connection closed");
            return;
        }
        tracing::debug!(%error, reason, direction, "connection ended with an error");
        metrics.connection_error(direction, reason);
    }
}

fn classify(error: &(dyn std::error::Error + 'static)) -> &'static str {
    if let Some(e) = error.downcast_ref::<hyper::Error>() {
        if e.is_parse_too_large() {
            "headers_too_large"
        } else if e.is_parse() || e.is_parse_status() {
            "malformed_request"
        } else if e.is_timeout() {
            "header_timeout"
        } else if e.is_incomplete_message() {
            "incomplete_request"
        } else if e.is_user() {
            "protocol_violation"
        } else {
            "http_error"
        }
    } else if error.downcast_ref::<std::io::Error>().is_some() {
        "io"
    } else {
        "protocol_error"
    }
}
