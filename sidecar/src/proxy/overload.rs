//! Overload: a per-listener concurrency limit that sheds ([`Refusal::Shed`]: 503 and
//! `retry-after`, at once, never queued) and a per-request timeout
//! ([`Refusal::TimedOut`]: 504 with the reason). A request counts as in
//! flight from its arrival until its response body ends, so a slow streamed download
//! holds its slot as a slow upstream does.

use std::sync::Arc;
use std::time::Duration;

use http::Request;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::observe::{EndObserver, ObservedBody};
use super::outcome::Refusal;
use super::{AnswerFuture, Next, Step};
use crate::metrics::{Direction, Metrics};

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

impl<S: Next<B>, B> Step<S, B> for ShedLayer {
    type Body = B;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let Ok(permit) = self.slots.clone().try_acquire_owned() else {
            let refusal = Refusal::Shed {
                max_in_flight: self.max_in_flight,
            };
            return Box::pin(async move { Err(refusal) });
        };
        let held = InFlight::new(permit, self.metrics.clone(), self.direction);
        let future = next.call(req);
        Box::pin(async move {
            let response = future.await?;
            Ok(response.map(|body| ObservedBody::boxed(body, held)))
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

/// The response body keeps its request's slot until it ends (or is dropped).
impl EndObserver for InFlight {
    fn end(self, _complete: bool) {}
}

/// Refuses with [`Refusal::TimedOut`] (504) when the response head does not come within
/// `timeout`.
#[derive(Clone, Debug)]
pub struct TimeoutLayer {
    timeout: Duration,
}

impl TimeoutLayer {
    /// `limits.request_timeout` for one listener.
    pub fn new(timeout: Duration) -> Self {
        Self { timeout }
    }
}

impl<S: Next<B>, B> Step<S, B> for TimeoutLayer {
    type Body = B;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let timeout = self.timeout;
        let future = next.call(req);
        Box::pin(async move {
            tokio::time::timeout(timeout, future)
                .await
                .unwrap_or(Err(Refusal::TimedOut { timeout }))
        })
    }
}
