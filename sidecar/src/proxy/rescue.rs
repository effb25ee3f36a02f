//! The top of the request path: gives each request its [`Exchange`], turns every
//! [`Refusal`] from the steps below into its response (the one place that does), counts
//! the request by its final status and the refusal by its kind, and logs why.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::{Request, Response};

use super::outcome::{Exchange, Refusal};
use super::{Answer, ProxyBody};
use crate::metrics::{Direction, Metrics};

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct RescueLayer {
    metrics: Arc<Metrics>,
    direction: Direction,
}

impl RescueLayer {
    /// Counts into `metrics` under `direction`.
    pub fn new(metrics: Arc<Metrics>, direction: Direction) -> Self {
        Self { metrics, direction }
    }

    /// Counts and logs a refusal.
    fn refused(&self, refusal: &Refusal) {
        let direction = self.direction;
        let outcome = refusal.outcome().as_str();
        match refusal {
            Refusal::Shed { .. } => self.metrics.request_shed(direction),
            Refusal::TimedOut { .. } => self.metrics.request_timed_out(direction),
            Refusal::Ambiguous(error) => self.metrics.rejected_request(direction, error.reason()),
            Refusal::Revoked { .. } | Refusal::Unenforceable { .. } => {
                self.metrics.revocation_refusal(direction);
            }
            Refusal::Unrecorded => self.metrics.audit_refused(),
            // Policy refusals are counted with every decision, by the policy step.
            _ => {}
        }
        match refusal {
            Refusal::Unrecorded
            | Refusal::UpstreamIdentity { .. }
            | Refusal::UpstreamTimedOut { .. }
            | Refusal::UpstreamUnavailable { .. } => {
                tracing::warn!(direction, outcome, %refusal, "request refused");
            }
            Refusal::TimedOut { .. } => {
                tracing::info!(direction, outcome, %refusal, "request refused");
            }
            _ => tracing::debug!(direction, outcome, %refusal, "request refused"),
        }
    }
}

impl<S> tower::Layer<S> for RescueLayer {
    type Service = Rescue<S>;

    fn layer(&self, inner: S) -> Rescue<S> {
        Rescue {
            inner,
            layer: self.clone(),
        }
    }
}

/// The service of [`RescueLayer`].
#[derive(Clone, Debug)]
pub struct Rescue<S> {
    inner: S,
    layer: RescueLayer,
}

impl<S, B> tower::Service<Request<B>> for Rescue<S>
where
    S: tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Refusal>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, Infallible>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        match self.inner.poll_ready(cx) {
            Poll::Ready(Err(refusal)) => {
                // Every step is ready when the forward step is, and that one always is:
                // this is never reached. Were it, the call that follows answers for itself.
                tracing::debug!(%refusal, "a step was not ready");
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Ok(())) => Poll::Ready(Ok(())),
            Poll::Pending => Poll::Pending,
        }
    }

    fn call(&mut self, mut req: Request<B>) -> Self::Future {
        let exchange = Exchange::attach(req.extensions_mut());
        let method = req.method().clone();
        let layer = self.layer.clone();
        let future = self.inner.call(req);
        Box::pin(async move {
            let answer: Answer = future.await;
            exchange.settle(&answer);
            let response = answer.unwrap_or_else(|refusal| {
                layer.refused(&refusal);
                refusal.response()
            });
            layer
                .metrics
                .request(layer.direction, &method, response.status());
            Ok(response)
        })
    }
}
