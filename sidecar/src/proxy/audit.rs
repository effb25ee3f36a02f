//! One hash-chained execution record per proxied request (see `nexus-audit`).
//!
//! The step sits right inside the trace step, so it sees every answer, the sidecar's own
//! refusals included (it hashes the body the rescue will render for them). Per request it
//! reads the path and the decision from the request's [`Exchange`], hashes the request
//! body as the forward step streams it out and the response body as
//! it streams back (never buffering either), and hands the record to the [`Recorder`]
//! when the response body ends, or is dropped (client gone: what was sent is recorded).
//! A request cancelled before its response head is recorded with status 499.
//!
//! The recorder needs the sidecar's SPIFFE ID, which arrives with the first SVID, not
//! with the configuration: [`Audit::run`] starts it then (no request can be served
//! before: both directions need the SVID for TLS). Until it runs, and whenever its sink
//! fails, best-effort requests pass (their records are dropped and counted) and strict
//! requests are refused ([`Refusal::Unrecorded`], 503).

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

use super::authorize::Parties;
use super::observe::TappedBody;
use super::outcome::{Exchange, Refusal};
use super::{AnswerFuture, Next, ProxyBody, Step};
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

impl<S: Next<HashedBody<B>>, B> Step<S, B> for AuditLayer {
    type Body = HashedBody<B>;

    fn call(&self, req: Request<B>, next: &mut S) -> AnswerFuture {
        let start = Instant::now();
        let audit = &self.audit;
        if audit.mode == AuditMode::Strict && !audit.healthy() {
            return Box::pin(async move { Err(Refusal::Unrecorded) });
        }
        let request_digest = Arc::new(Mutex::new(BodyDigest::new()));
        let (mut parts, body) = req.into_parts();
        let exchange = Exchange::attach(&mut parts.extensions);
        let mut pending = Pending {
            audit: audit.clone(),
            draft: Some(RecordDraft {
                time: nexus_audit::rfc3339_ms(nexus_identity::clock::now()),
                direction: self.parties.direction.to_owned(),
                source: self.parties.source.to_string(),
                destination: self.parties.destination.to_string(),
                method: parts.method.as_str().to_owned(),
                path: bounded(parts.uri.path()),
                trace_id: exchange.trace_id().map(str::to_owned),
                ..RecordDraft::default()
            }),
            exchange,
            request_digest: request_digest.clone(),
            response_digest: BodyDigest::new(),
            start,
            status: None,
        };
        let req = Request::from_parts(parts, TappedBody::new(body, request_digest));
        let future = next.call(req);
        Box::pin(async move {
            match future.await {
                Ok(response) => {
                    pending.status = Some(response.status());
                    let (parts, body) = response.into_parts();
                    let body = RecordedBody {
                        inner: body,
                        pending: Some(pending),
                        writing: None,
                    };
                    Ok(Response::from_parts(parts, body.boxed()))
                }
                Err(refusal) => {
                    // The rescue answers with exactly this body: record it now.
                    pending.status = Some(refusal.status());
                    pending.response_digest.update(&refusal.body());
                    if let Some(writing) = pending.end() {
                        writing.await;
                    }
                    Err(refusal)
                }
            }
        })
    }
}

/// A request body, hashed as the forward step streams it out.
pub type HashedBody<B> = TappedBody<B, Arc<Mutex<BodyDigest>>>;

/// A request whose record is not made yet. Dropping it makes the record (best effort).
struct Pending {
    audit: Arc<Audit>,
    draft: Option<RecordDraft>,
    exchange: Arc<Exchange>,
    request_digest: Arc<Mutex<BodyDigest>>,
    response_digest: BodyDigest,
    start: Instant,
    status: Option<StatusCode>,
}

impl Pending {
    /// The finished draft; `None` once taken.
    fn finish(&mut self) -> Option<RecordDraft> {
        let mut draft = self.draft.take()?;
        let exchange = &*self.exchange;
        let request = self
            .request_digest
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let (request_sha256, request_bytes) = request.finish();
        let (response_sha256, response_bytes) = std::mem::take(&mut self.response_digest).finish();
        // The span ends after the record is made, and reads these.
        exchange.set_digests(&request_sha256, &response_sha256);
        if let Some(path) = exchange.path() {
            draft.path = bounded(path);
        }
        match exchange.decision() {
            Some(decision) => {
                draft.decision = decision.verdict.record().to_owned();
                draft.decision_id.clone_from(&decision.id);
                draft.reasons = decision.reasons.clone();
                draft.policy_revision =
                    Some(decision.revision.clone()).filter(|revision| !revision.is_empty());
                draft.cached = decision.cached;
                draft.clause.clone_from(&decision.clause);
                draft.execution_id.clone_from(&decision.execution_id);
                if let Some([uid, version, digest]) = &decision.plugin {
                    draft.plugin_uid = Some(uid.clone());
                    draft.plugin_version = Some(version.clone());
                    draft.image_digest = Some(digest.clone());
                }
            }
            None => draft.decision = "none".to_owned(),
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

impl Pending {
    /// Makes the record; returns the write to wait for in strict mode.
    fn end(mut self) -> Option<BoxFuture<()>> {
        let recorder = match self.audit.recorder() {
            Some(recorder) if self.audit.mode == AuditMode::Strict => recorder.clone(),
            _ => {
                self.record();
                return None;
            }
        };
        let draft = self.finish()?;
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
                Poll::Ready(None) => match this.pending.take().and_then(Pending::end) {
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
