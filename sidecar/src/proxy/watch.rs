//! The anomaly watch on the request path: every request, once its response ends, is
//! fed to the detectors (`nexus-anomaly`) with who it was about, whether it was refused,
//! the clause it named and whether that clause is bound to the plugin, and the bytes
//! each way. Signals go to the bounded queue the control stream drains to the gateway.
//!
//! Inbound, the watched workload is the peer (`observed_as: peer`) and its egress is
//! what it takes out of the app behind this sidecar (the response bytes: a plugin
//! pulling far more clause data than usual). Outbound, it is this sidecar's own
//! workload (`self`), and its egress is what it pushes out (the request bodies).

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use nexus_anomaly::{Detectors, Observed, RequestEvent, Signal};

use super::ProxyBody;
use crate::control::{SignalQueue, unix_ms};
use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Detectors and where their signals go.
pub struct AnomalyWatch {
    detectors: Detectors,
    queue: Arc<SignalQueue>,
    metrics: Arc<Metrics>,
}

impl std::fmt::Debug for AnomalyWatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AnomalyWatch")
    }
}

impl AnomalyWatch {
    /// Detectors with `config`, signals into `queue`.
    pub fn new(
        config: nexus_anomaly::DetectorConfig,
        queue: Arc<SignalQueue>,
        metrics: Arc<Metrics>,
    ) -> Arc<Self> {
        Arc::new(Self {
            detectors: Detectors::new(config),
            queue,
            metrics,
        })
    }

    fn emit(&self, signals: Vec<Signal>) {
        for s in signals {
            self.metrics.anomaly_signal(s.kind.as_str());
            tracing::warn!(kind = s.kind.as_str(), workload = %s.workload, observed_as = s.observed_as.as_str(), score = s.score, "anomaly signal");
            let kept = self.queue.push(nexus_proto::control::Signal {
                kind: s.kind.as_str().to_string(),
                workload: s.workload,
                observed_as: s.observed_as.as_str().to_string(),
                score: s.score,
                evidence_json: serde_json::Value::Object(s.evidence).to_string(),
                time_unix_ms: s.time_ms,
            });
            if !kept {
                self.metrics.signals_dropped(1);
            }
        }
    }

    /// A TLS/authentication failure from a peer (`None`: it presented no usable ID).
    pub fn auth_failure(&self, peer: Option<&str>, reason: &str) {
        self.emit(self.detectors.on_auth_failure(peer, reason, unix_ms()));
    }

    /// A sandbox violation of this sidecar's own workload.
    pub fn sandbox_violation(&self, workload: &str, syscall: &str, action: &str) {
        self.emit(
            self.detectors
                .on_sandbox_violation(workload, syscall, action, unix_ms()),
        );
    }
}

/// What the policy step learns about a request, for the watch.
#[derive(Debug, Default)]
pub struct WatchFacts {
    clause: Mutex<Option<(String, Option<bool>)>>,
}

impl WatchFacts {
    /// The facts of this request, if the watch is on.
    pub fn get(extensions: &http::Extensions) -> Option<&Arc<WatchFacts>> {
        extensions.get::<Arc<WatchFacts>>()
    }

    /// The clause the request named, and whether the plugin is bound to it (`None`:
    /// unknown, e.g. no bindings in the policy data).
    pub fn set_clause(&self, clause: &str, bound: Option<bool>) {
        *self.clause.lock().unwrap_or_else(|p| p.into_inner()) = Some((clause.to_string(), bound));
    }
}

/// See the module documentation.
#[derive(Clone, Debug)]
pub struct WatchLayer {
    watch: Arc<AnomalyWatch>,
    workload: Arc<str>,
    observed: Observed,
}

impl WatchLayer {
    /// (egress, ingress) of the watched workload from (request, response) bytes.
    fn directions(&self, request: u64, response: u64) -> (u64, u64) {
        match self.observed {
            Observed::Peer => (response, request),
            Observed::Own => (request, response),
        }
    }
}

impl WatchLayer {
    /// Watches `workload` (the peer inbound, this workload outbound).
    pub fn new(watch: Arc<AnomalyWatch>, workload: Arc<str>, observed: Observed) -> Self {
        Self {
            watch,
            workload,
            observed,
        }
    }
}

impl<S> tower::Layer<S> for WatchLayer {
    type Service = Watched<S>;
    fn layer(&self, inner: S) -> Watched<S> {
        Watched {
            inner,
            layer: self.clone(),
        }
    }
}

/// See [`WatchLayer`].
#[derive(Clone, Debug)]
pub struct Watched<S> {
    inner: S,
    layer: WatchLayer,
}

impl<S, B> tower::Service<Request<B>> for Watched<S>
where
    S: tower::Service<Request<CountedBody<B>>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let facts = Arc::new(WatchFacts::default());
        let sent = Arc::new(AtomicU64::new(0));
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(facts.clone());
        let req = Request::from_parts(
            parts,
            CountedBody {
                inner: body,
                count: sent.clone(),
            },
        );
        let future = self.inner.call(req);
        let layer = self.layer.clone();
        Box::pin(async move {
            let response = future.await?;
            let report = Report {
                layer,
                facts,
                sent,
                received: 0,
                allowed: response.status() != http::StatusCode::FORBIDDEN,
            };
            Ok(response.map(|body| {
                ReportingBody {
                    inner: body,
                    report: Some(report),
                }
                .boxed()
            }))
        })
    }
}

/// A request body that counts its bytes.
pub struct CountedBody<B> {
    inner: B,
    count: Arc<AtomicU64>,
}

impl<B> Body for CountedBody<B>
where
    B: Body<Data = Bytes> + Unpin,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled
            && let Some(data) = frame.data_ref()
        {
            self.count.fetch_add(data.len() as u64, Ordering::Relaxed);
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

struct Report {
    layer: WatchLayer,
    facts: Arc<WatchFacts>,
    sent: Arc<AtomicU64>,
    received: u64,
    allowed: bool,
}

impl Drop for Report {
    fn drop(&mut self) {
        let clause = self
            .facts
            .clause
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        let (bytes_out, bytes_in) = self
            .layer
            .directions(self.sent.load(Ordering::Relaxed), self.received);
        let event = RequestEvent {
            workload: &self.layer.workload,
            observed_as: self.layer.observed,
            allowed: self.allowed,
            clause: clause.as_ref().map(|(c, _)| c.as_str()),
            clause_bound: clause.as_ref().and_then(|(_, b)| *b),
            bytes_out,
            bytes_in,
        };
        let signals = self.layer.watch.detectors.on_request(&event, unix_ms());
        if !signals.is_empty() {
            self.layer.watch.emit(signals);
        }
    }
}

/// The response body; reports the exchange to the detectors when it ends (or is
/// dropped, e.g. the client went away).
struct ReportingBody {
    inner: ProxyBody,
    report: Option<Report>,
}

impl Body for ReportingBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(report)) = (frame.data_ref(), self.report.as_mut()) {
                    report.received += data.len() as u64;
                }
            }
            Poll::Ready(None) => {
                // End of stream: report now rather than when hyper drops the body.
                self.report.take();
            }
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
