//! Overload: a per-listener concurrency limit that sheds (503 and `retry-after`, at once,
//! never queued) and a per-request timeout (504 with the reason). A request counts as in
//! flight from its arrival until its response body ends, so a slow streamed download
//! holds its slot as a slow upstream does.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::{ProxyBody, json_response};
use crate::metrics::{Direction, Metrics};

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// What a shed response tells the client to wait before retrying, seconds.
const RETRY_AFTER_SECS: u64 = 1;

/// Sheds requests beyond `max_in_flight` on one listener (shared by its connections).
#[derive(Clone, Debug)]
pub struct ShedLayer {
    slots: Arc<Semaphore>,
    max_in_flight: usize,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl ShedLayer {
    /// A limit of `max_in_flight` requests; one layer per listener.
    pub fn new(max_in_flight: usize, metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self {
            slots: Arc::new(Semaphore::new(max_in_flight.max(1))),
            max_in_flight,
            metrics,
            direction,
        }
    }
}

step_layer!(ShedLayer => Shed);

/// The 503 a shed request gets.
fn shed_response(max_in_flight: usize) -> Response<ProxyBody> {
    let mut response = json_response(
        StatusCode::SERVICE_UNAVAILABLE,
        serde_json::json!({
            "error": "overloaded",
            "reason": format!(
                "{max_in_flight} requests are already in flight on this listener (limits.max_in_flight); retry after {RETRY_AFTER_SECS}s"
            ),
        }),
    );
    response.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from(RETRY_AFTER_SECS),
    );
    response
}

impl<S, B> tower::Service<Request<B>> for Shed<S>
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
        let Ok(permit) = self.layer.slots.clone().try_acquire_owned() else {
            self.layer.metrics.request_shed(self.layer.direction);
            tracing::debug!(
                direction = self.layer.direction,
                "request shed: max_in_flight reached"
            );
            let response = shed_response(self.layer.max_in_flight);
            return Box::pin(async move { Ok(response) });
        };
        let held = InFlight::new(permit, self.layer.metrics.clone(), self.layer.direction);
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| {
                HoldWhileStreaming {
                    inner: body,
                    _held: held,
                }
                .boxed()
            }))
        })
    }
}

/// A slot held by one request, counted in `nexus_requests_in_flight`.
struct InFlight {
    _permit: OwnedSemaphorePermit,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl InFlight {
    fn new(permit: OwnedSemaphorePermit, metrics: Arc<Metrics>, direction: Direction) -> Self {
        metrics.in_flight(direction, 1);
        Self {
            _permit: permit,
            metrics,
            direction,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics.in_flight(self.direction, -1);
    }
}

/// A response body that keeps its request's slot until it ends (or is dropped).
struct HoldWhileStreaming {
    inner: ProxyBody,
    _held: InFlight,
}

impl Body for HoldWhileStreaming {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Answers 504 when the response head does not come within `timeout`.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl TimeoutLayer {
    /// `limits.request_timeout` for one listener.
    pub fn new(timeout: Duration, metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self {
            timeout,
            metrics,
            direction,
        }
    }
}

step_layer!(TimeoutLayer => Timeout);

impl<S, B> tower::Service<Request<B>> for Timeout<S>
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
        let layer = self.layer.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            match tokio::time::timeout(layer.timeout, future).await {
                Ok(response) => response,
                Err(_) => {
                    layer.metrics.request_timed_out(layer.direction);
                    tracing::info!(
                        direction = layer.direction,
                        timeout = ?layer.timeout,
                        "request timed out"
                    );
                    Ok(json_response(
                        StatusCode::GATEWAY_TIMEOUT,
                        serde_json::json!({
                            "error": "request_timeout",
                            "reason": format!(
                                "no response within {:?} (limits.request_timeout)",
                                layer.timeout
                            ),
                        }),
                    ))
                }
            }
        })
    }
}
