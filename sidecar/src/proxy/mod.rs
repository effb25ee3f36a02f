//! What happens to a request: `inbound` (mTLS from a peer to the local app) and
//! `outbound` (plain HTTP from the local app to an upstream over mTLS). Both run the
//! same stack of steps over [`forward::Forward`], composed in one function
//! ([`stack::stack`]): the [`rescue`] on top maps every typed [`outcome::Refusal`] to its
//! response, and the steps share one [`outcome::Exchange`] per request.

pub mod audit;
pub mod authorize;
pub mod forward;
pub mod headers;
pub mod inbound;
pub mod layers;
pub mod normalize;
#[cfg(test)]
mod normalize_props;
pub mod observe;
pub mod outbound;
pub mod outcome;
pub mod overload;
pub mod rescue;
pub mod revocation;
pub mod serve;
pub mod stack;
pub mod trace;
pub mod watch;

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::BodyExt;
use http_body_util::combinators::BoxBody;

use outcome::Refusal;

/// The body every proxied response carries: streamed from the other side, or a small
/// error document made here.
pub type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// What every step below the rescue answers: the response, or why the sidecar refuses.
pub type Answer = Result<Response<ProxyBody>, Refusal>;

/// An [`Answer`] to come.
pub type AnswerFuture = Pin<Box<dyn Future<Output = Answer> + Send>>;

/// One step of the request path (revocation, normalize, policy, audit, ...), in front
/// of `S`, the rest of the stack. A step sees the request, then calls the next step or
/// refuses with a [`Refusal`]; it never builds an error response (the rescue does).
/// `Body` is the request body the next step gets (the audit and watch steps wrap it to
/// see its bytes).
pub trait Step<S, B>: Clone + Send + Sync + 'static {
    /// The request body handed to the next step.
    type Body;

    /// Handles `req`, calling `next` unless it refuses.
    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture;
}

/// The rest of the stack, as a step sees it.
pub trait Next<B>:
    tower::Service<Request<B>, Response = Response<ProxyBody>, Error = Refusal, Future: Send + 'static>
{
}

impl<S, B> Next<B> for S where
    S: tower::Service<
            Request<B>,
            Response = Response<ProxyBody>,
            Error = Refusal,
            Future: Send + 'static,
        >
{
}

/// Makes a [`Step`] a `tower::Layer`.
#[derive(Clone, Debug)]
pub struct StepLayer<T>(T);

/// `step` as a layer of the stack.
pub fn step<T: Clone>(step: T) -> StepLayer<T> {
    StepLayer(step)
}

impl<T: Clone, S> tower::Layer<S> for StepLayer<T> {
    type Service = Stepped<T, S>;

    fn layer(&self, inner: S) -> Stepped<T, S> {
        Stepped {
            step: self.0.clone(),
            inner,
        }
    }
}

/// A [`Step`] in front of the rest of the stack.
#[derive(Clone, Debug)]
pub struct Stepped<T, S> {
    step: T,
    inner: S,
}

impl<T, S, B> tower::Service<Request<B>> for Stepped<T, S>
where
    T: Step<S, B>,
    S: tower::Service<Request<T::Body>, Response = Response<ProxyBody>, Error = Refusal>,
{
    type Response = Response<ProxyBody>;
    type Error = Refusal;
    type Future = AnswerFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Refusal>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> AnswerFuture {
        self.step.call(req, &mut self.inner)
    }
}

/// A JSON response made by the sidecar itself (see [`Refusal::response`]).
pub fn json_response(status: http::StatusCode, bytes: Bytes) -> http::Response<ProxyBody> {
    let mut response = http::Response::new(
        http_body_util::Full::new(bytes)
            .map_err(|never| match never {})
            .boxed(),
    );
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    response
}

/// What every listener's request path shares, set up once in `app`: the identity, the
/// counters, the policy, and the optional steps (execution records, the gateway's
/// revocations, the anomaly watch, traces).
#[derive(Clone, Debug)]
pub struct Steps {
    /// This workload's SVID and trust bundles.
    pub store: std::sync::Arc<nexus_identity::IdentityStore>,
    /// Counters.
    pub metrics: std::sync::Arc<crate::metrics::Metrics>,
    /// Evaluates the policy on every request when configured.
    pub policy: Option<std::sync::Arc<crate::policy::PolicyRuntime>>,
    /// Makes an execution record of every request when on.
    pub audit: Option<std::sync::Arc<audit::Audit>>,
    /// Enforces the gateway's revocations (and gateway loss) on every request and
    /// connection.
    pub enforcement: std::sync::Arc<crate::control::Enforcement>,
    /// Feeds every request to the anomaly detectors when on.
    pub watch: Option<std::sync::Arc<watch::AnomalyWatch>>,
    /// Traces every request when `[telemetry]` is on.
    pub telemetry: Option<crate::telemetry::Telemetry>,
}
