//! Accepting connections and serving HTTP on them, with the limits from `[limits]`:
//! a connection cap per listener, a header-read timeout, a maximum request head.
//! Errors end the connection (hyper answers 400/431 to a malformed HTTP/1 request
//! first) and are counted; nothing here panics on input.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;

use super::ProxyBody;
use crate::config::LimitsConfig;
use crate::metrics::{Direction, Metrics};

/// An HTTP/1.1 + HTTP/2 server builder with the configured limits.
pub fn http_server(limits: &LimitsConfig) -> auto::Builder<TokioExecutor> {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .max_concurrent_streams(limits.max_concurrent_streams);
    builder
}

/// Accepts connections forever, at most `max_connections` at once, handing each to
/// `handle` on its own task.
pub async fn accept_loop<F, Fut>(listener: TcpListener, max_connections: usize, handle: F)
where
    F: Fn(TcpStream, SocketAddr) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let slots = Arc::new(Semaphore::new(max_connections));
    loop {
        let Ok(permit) = slots.clone().acquire_owned().await else {
            return;
        };
        match listener.accept().await {
            Ok((stream, addr)) => {
                let _ = stream.set_nodelay(true);
                let task = handle(stream, addr);
                tokio::spawn(async move {
                    task.await;
                    drop(permit);
                });
            }
            Err(error) => {
                // EMFILE and friends: back off briefly instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(20)).await;
            }
        }
    }
}

/// Serves HTTP on one connection and counts how it ended if it ended badly.
pub async fn serve_http<I, S>(
    server: &auto::Builder<TokioExecutor>,
    io: I,
    service: S,
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
    if let Err(error) = server.serve_connection(TokioIo::new(io), service).await {
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
