//! One hash-chained execution record per proxied request (see `nexus-audit`).
//!
//! The layer sits right inside the metrics (and trace) layers, so it sees every answer,
//! the sidecar's own 400s, 403s and 503s included. Per request it puts an
//! [`AuditFacts`] in the request extensions for the normalize and policy layers to fill,
//! hashes the request body as the forward step streams it out and the response body as
//! it streams back (never buffering either), and hands the record to the [`Recorder`]
//! when the response body ends, or is dropped (client gone: what was sent is recorded).
//! A request cancelled before its response head is recorded with status 499.
//!
//! The recorder needs the sidecar's SPIFFE ID, which arrives with the first SVID, not
//! with the configuration: [`Audit::run`] starts it then (no request can be served
//! before: both directions need the SVID for TLS). Until it runs, and whenever its sink
//! fails, best-effort requests pass (their records are dropped and counted) and strict
//! requests get 503.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use nexus_audit::{AuditConfig, AuditMode, AuditStats, BodyDigest, RecordDraft, Recorder};
use nexus_identity::IdentityStore;
use time::OffsetDateTime;

use super::authorize::Parties;
use super::observe::TappedBody;
use super::trace::TraceFacts;
use super::{ProxyBody, json_response};
use crate::metrics::Metrics;

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Longest path kept in a record (a refused target can be anything).
const MAX_PATH_BYTES: usize = 2048;
/// How often a sink that could not be opened is retried.
const START_RETRY: Duration = Duration::from_secs(1);

/// The sidecar's recorder, once it runs, shared by every listener.
pub struct Audit {
    mode: AuditMode,
    recorder: OnceLock<Recorder>,
    metrics: Arc<Metrics>,
    /// Records dropped because the recorder was not running yet.
    dropped_early: AtomicU64,
}

impl std::fmt::Debug for Audit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Audit")
            .field("mode", &self.mode)
            .field("recorder", &self.recorder.get())
            .finish()
    }
}

impl Audit {
    /// Not recording yet: see [`Audit::run`]. Its counters show in `metrics`.
    pub fn new(mode: AuditMode, metrics: Arc<Metrics>) -> Arc<Self> {
        let audit = Arc::new(Self {
            mode,
            recorder: OnceLock::new(),
            metrics: metrics.clone(),
            dropped_early: AtomicU64::new(0),
        });
        let weak = Arc::downgrade(&audit);
        metrics.watch_audit(Box::new(move || weak.upgrade().map(|audit| audit.stats())));
        audit
    }

    /// Waits for the first SVID, then starts the recorder with its SPIFFE ID as the
    /// records' `sidecar`; a sink that cannot be opened is retried every second.
    pub async fn run(self: Arc<Self>, store: Arc<IdentityStore>, config: AuditConfig) {
        let mut updates = store.subscribe();
        let sidecar = loop {
            if let Some(identity) = store.current() {
                break identity.spiffe_id().to_string();
            }
            if updates.changed().await.is_err() {
                return;
            }
        };
        let mut failures = 0u32;
        loop {
            let (sidecar, config) = (sidecar.clone(), config.clone());
            // Opening reads the end of the record file back: blocking I/O.
            let started =
                tokio::task::spawn_blocking(move || Recorder::start(sidecar, &config)).await;
            match started {
                Ok(Ok(recorder)) => {
                    tracing::info!(mode = ?self.mode, "execution records on");
                    let _ = self.recorder.set(recorder);
                    return;
                }
                Ok(Err(error)) => {
                    if failures == 0 {
                        tracing::error!(%error, strict = self.mode == AuditMode::Strict, "cannot open the execution record sink; retrying every second (strict mode refuses requests meanwhile)");
                    } else {
                        tracing::debug!(%error, "execution record sink still unavailable");
                    }
                    failures = failures.saturating_add(1);
                }
                Err(error) => {
                    tracing::error!(%error, "execution recorder start panicked");
                    return;
                }
            }
            tokio::time::sleep(START_RETRY).await;
        }
    }

    /// The recorder, once it runs.
    pub fn recorder(&self) -> Option<&Recorder> {
        self.recorder.get()
    }

    /// The recorder's counters (zeros before it runs, plus the records dropped then).
    pub fn stats(&self) -> AuditStats {
        let early = self.dropped_early.load(Ordering::Relaxed);
        match self.recorder.get() {
            Some(recorder) => {
                let mut stats = recorder.stats();
                stats.dropped += early;
                stats
            }
            None => AuditStats {
                written: 0,
                dropped: early,
                write_errors: 0,
                queue_depth: 0,
                queue_capacity: 0,
                healthy: false,
            },
        }
    }

    /// Writes and `fsync`s what is queued and stops the writer: for graceful shutdown.
    pub async fn shutdown(&self) {
        if let Some(recorder) = self.recorder.get()
            && let Err(error) = recorder.shutdown().await
        {
            tracing::warn!(%error, "execution records may be incomplete");
        }
    }

    fn healthy(&self) -> bool {
        self.recorder.get().is_some_and(Recorder::is_healthy)
    }
}

/// What the layers inside the audit layer learned about a request, for its record.
/// Found in the request extensions as `Arc<AuditFacts>` (see [`AuditFacts::get`]) only
/// when records are on; each fact is set once, the first value wins.
///
/// Who fills what: the normalize layer ([`super::authorize::NormalizeLayer`]) sets
/// the normalized path, or a `deny` with its reason when it refuses the target; the
/// policy layer sets the decision and, when the input has them, clause and execution.
#[derive(Debug, Default)]
pub struct AuditFacts {
    path: OnceLock<String>,
    decision: OnceLock<&'static str>,
    decision_id: OnceLock<String>,
    reasons: OnceLock<Vec<String>>,
    policy_revision: OnceLock<String>,
    clause: OnceLock<String>,
    execution_id: OnceLock<String>,
    /// The execution's plugin UUID, version and image digest (with a registry).
    plugin: OnceLock<[String; 3]>,
    cached: std::sync::atomic::AtomicBool,
}

impl AuditFacts {
    /// The facts of the request these extensions belong to, when records are on.
    pub fn get(extensions: &http::Extensions) -> Option<&AuditFacts> {
        extensions.get::<Arc<AuditFacts>>().map(|facts| &**facts)
    }

    /// The normalized path (what the policy saw and what is forwarded).
    pub fn set_path(&self, path: &str) {
        let _ = self.path.set(bounded(path));
    }

    /// The decision: `result` (`allow`, `deny`, `error`, `dry_run_deny`, `no_policy`),
    /// its id (may be empty), the policy revision (empty if none) and the reasons.
    pub fn set_decision(
        &self,
        result: &'static str,
        decision_id: &str,
        revision: &str,
        reasons: &[String],
    ) {
        let _ = self.decision.set(result);
        let _ = self.decision_id.set(decision_id.to_owned());
        if !revision.is_empty() {
            let _ = self.policy_revision.set(revision.to_owned());
        }
        let _ = self.reasons.set(reasons.to_vec());
    }

    /// The decision came from the decision cache.
    pub fn set_cached(&self) {
        self.cached
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The clause the request touches.
    pub fn set_clause(&self, clause: &str) {
        let _ = self.clause.set(clause.to_owned());
    }

    /// The execution the request runs under.
    pub fn set_execution_id(&self, id: &str) {
        let _ = self.execution_id.set(id.to_owned());
    }

    /// The plugin version that execution runs: UUID, version, image digest.
    pub fn set_plugin(&self, uid: &str, version: &str, image_digest: &str) {
        let _ = self
            .plugin
            .set([uid.to_owned(), version.to_owned(), image_digest.to_owned()]);
    }
}

/// Records every request (see the module doc).
#[derive(Clone, Debug)]
pub struct AuditLayer {
    audit: Arc<Audit>,
    parties: Parties,
}

impl AuditLayer {
    /// Records requests between `parties` into `audit`.
    pub fn new(audit: Arc<Audit>, parties: Parties) -> Self {
        Self { audit, parties }
    }
}

step_layer!(AuditLayer => Audited);

impl<S, B> tower::Service<Request<B>> for Audited<S>
where
    S: tower::Service<Request<HashedBody<B>>, Response = Response<ProxyBody>, Error = Infallible>,
    S::Future: Send + 'static,
{
    type Response = Response<ProxyBody>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Response<ProxyBody>, Infallible>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let start = Instant::now();
        let audit = &self.layer.audit;
        if audit.mode == AuditMode::Strict && !audit.healthy() {
            audit.metrics.audit_refused();
            tracing::warn!(
                method = %req.method(),
                path = %bounded(req.uri().path()),
                "request refused: execution records cannot be written (strict audit mode)"
            );
            let response = json_response(
                StatusCode::SERVICE_UNAVAILABLE,
                serde_json::json!({"error": "audit records cannot be written"}),
            );
            return Box::pin(async move { Ok(response) });
        }
        let facts = Arc::new(AuditFacts::default());
        let trace = req.extensions().get::<Arc<TraceFacts>>().cloned();
        // The trace layer (outside this one) has rewritten `traceparent` to its span.
        let trace_id = trace.as_ref().and_then(|_| {
            let value = req.headers().get("traceparent")?.to_str().ok()?;
            Some(value.get(3..35)?.to_owned())
        });
        let request_digest = Arc::new(Mutex::new(BodyDigest::new()));
        let mut pending = Pending {
            audit: audit.clone(),
            draft: Some(RecordDraft {
                time: nexus_audit::rfc3339_ms(OffsetDateTime::now_utc()),
                direction: self.layer.parties.direction.to_owned(),
                source: self.layer.parties.source.to_string(),
                destination: self.layer.parties.destination.to_string(),
                method: req.method().as_str().to_owned(),
                path: bounded(req.uri().path()),
                trace_id,
                ..RecordDraft::default()
            }),
            facts: facts.clone(),
            trace,
            request_digest: request_digest.clone(),
            response_digest: BodyDigest::new(),
            start,
            status: None,
        };
        let (mut parts, body) = req.into_parts();
        parts.extensions.insert(facts);
        let req = Request::from_parts(parts, TappedBody::new(body, request_digest));
        let future = self.inner.call(req);
        Box::pin(async move {
            let response = match future.await {
                Ok(response) => response,
                Err(never) => match never {},
            };
            pending.status = Some(response.status());
            let (parts, body) = response.into_parts();
            let body = RecordedBody {
                inner: body,
                pending: Some(pending),
                writing: None,
            };
            Ok(Response::from_parts(parts, body.boxed()))
        })
    }
}

/// A request body, hashed as the forward step streams it out.
pub type HashedBody<B> = TappedBody<B, Arc<Mutex<BodyDigest>>>;

/// A request whose record is not made yet. Dropping it makes the record (best effort).
struct Pending {
    audit: Arc<Audit>,
    draft: Option<RecordDraft>,
    facts: Arc<AuditFacts>,
    trace: Option<Arc<TraceFacts>>,
    request_digest: Arc<Mutex<BodyDigest>>,
    response_digest: BodyDigest,
    start: Instant,
    status: Option<StatusCode>,
}

impl Pending {
    /// The finished draft; `None` once taken.
    fn finish(&mut self) -> Option<RecordDraft> {
        let mut draft = self.draft.take()?;
        let facts = &*self.facts;
        let request = self
            .request_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (request_sha256, request_bytes) = request.finish();
        let (response_sha256, response_bytes) = std::mem::take(&mut self.response_digest).finish();
        if let Some(trace) = &self.trace {
            trace.set_request_sha256(&request_sha256);
            trace.set_response_sha256(&response_sha256);
        }
        if let Some(path) = facts.path.get() {
            draft.path.clone_from(path);
        }
        draft.decision = facts.decision.get().copied().unwrap_or("none").to_owned();
        draft.decision_id = facts.decision_id.get().cloned().unwrap_or_default();
        draft.reasons = facts.reasons.get().cloned().unwrap_or_default();
        draft.policy_revision = facts.policy_revision.get().cloned();
        draft.cached = facts.cached.load(std::sync::atomic::Ordering::Relaxed);
        draft.clause = facts.clause.get().cloned();
        draft.execution_id = facts.execution_id.get().cloned();
        if let Some([uid, version, digest]) = facts.plugin.get() {
            draft.plugin_uid = Some(uid.clone());
            draft.plugin_version = Some(version.clone());
            draft.image_digest = Some(digest.clone());
        }
        // 499: the client went away before the response head (nginx's convention).
        draft.status = self.status.map_or(499, |status| status.as_u16());
        draft.request_sha256 = request_sha256;
        draft.request_bytes = request_bytes;
        draft.response_sha256 = response_sha256;
        draft.response_bytes = response_bytes;
        draft.latency_ms = self.start.elapsed().as_secs_f64() * 1000.0;
        Some(draft)
    }

    /// Queues the record without waiting (failures are counted by the recorder).
    fn record(&mut self) {
        let Some(draft) = self.finish() else { return };
        match self.audit.recorder() {
            Some(recorder) => {
                let _ = recorder.record(draft);
            }
            None => {
                self.audit.dropped_early.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.record();
    }
}

/// The response body, hashed as it streams; its end makes the record. In strict mode
/// the end of the body waits until the record is written.
struct RecordedBody {
    inner: ProxyBody,
    pending: Option<Pending>,
    /// Strict mode: the record's write. (In a mutex only to make the body `Sync`;
    /// `get_mut` never locks.)
    writing: Option<Mutex<BoxFuture<()>>>,
}

impl RecordedBody {
    /// Makes the record; returns the write to wait for in strict mode.
    fn end(&mut self) -> Option<BoxFuture<()>> {
        let mut pending = self.pending.take()?;
        let recorder = match pending.audit.recorder() {
            Some(recorder) if pending.audit.mode == AuditMode::Strict => recorder.clone(),
            _ => {
                pending.record();
                return None;
            }
        };
        let draft = pending.finish()?;
        let written = recorder.record_strict(draft);
        Some(Box::pin(async move {
            if let Err(error) = written.await {
                // The response is already out: all that is left is to say so.
                tracing::error!(%error, "execution record not written (strict mode)");
            }
        }))
    }
}

impl Body for RecordedBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        loop {
            if let Some(writing) = &mut this.writing {
                let writing = writing.get_mut().unwrap_or_else(PoisonError::into_inner);
                return match writing.as_mut().poll(cx) {
                    Poll::Ready(()) => {
                        this.writing = None;
                        Poll::Ready(None)
                    }
                    Poll::Pending => Poll::Pending,
                };
            }
            if this.pending.is_none() {
                return Poll::Ready(None);
            }
            let polled = Pin::new(&mut this.inner).poll_frame(cx);
            match &polled {
                Poll::Ready(Some(Ok(frame))) => {
                    if let (Some(data), Some(pending)) = (frame.data_ref(), &mut this.pending) {
                        pending.response_digest.update(data);
                    }
                }
                Poll::Ready(None) => match this.end() {
                    Some(writing) => {
                        this.writing = Some(Mutex::new(writing));
                        continue;
                    }
                    None => return Poll::Ready(None),
                },
                // The record keeps what was sent before the error (made on drop).
                Poll::Ready(Some(Err(_))) | Poll::Pending => {}
            }
            return polled;
        }
    }

    fn is_end_stream(&self) -> bool {
        // Not ended until the record is made: the last poll makes it.
        self.pending.is_none() && self.writing.is_none()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Cuts `text` to [`MAX_PATH_BYTES`] at a character boundary.
fn bounded(text: &str) -> String {
    if text.len() <= MAX_PATH_BYTES {
        return text.to_owned();
    }
    let mut end = MAX_PATH_BYTES;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    text[..end].to_owned()
}
