//! The recorder: a cheap handle the proxy clones into every connection, over a bounded
//! queue that one writer thread drains. Recording never waits: a full queue drops the
//! record and counts it. The writer batches what is queued, seals each record into the
//! chain, writes the batch with one call, and only then acknowledges it.
//!
//! The writer is a thread of its own (running a small current-thread runtime for its
//! timers) because file writes and `fsync` block: on the proxy's runtime they would take
//! a worker away from requests.

use std::future::Future;
use std::io;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, oneshot};

use crate::error::{AuditError, RecordError};
use crate::record::{RecordDraft, seal};
use crate::sink::{ChainHead, FileSink, RecordWriter, Sink, StdoutSink};

/// Default queue capacity, in records.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// The default [`AuditConfig::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);
/// The longest [`AuditConfig::linger`] accepted.
pub const MAX_LINGER: Duration = Duration::from_millis(100);
/// The longest a written record waits for its `fsync`.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How often a failed sink is retried while nothing else happens.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Records written per batch (per `write(2)`), at most.
const MAX_BATCH: usize = 1024;
/// The largest queue accepted (the channel's limit is far above; this catches typos).
const MAX_QUEUE_CAPACITY: usize = 1 << 24;
/// Warnings about dropped or lost records: at most one per this interval.
const LOG_INTERVAL: Duration = Duration::from_secs(1);

/// What happens to a request when its record cannot be written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AuditMode {
    /// Requests proceed; records that cannot be written are counted and logged.
    #[default]
    BestEffort,
    /// Requests are refused (503) while records cannot be written: the proxy checks
    /// [`Recorder::is_healthy`] before forwarding and awaits [`Recorder::record_strict`].
    Strict,
}

/// The `[audit]` settings.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AuditConfig {
    /// `best_effort` (default) or `strict`.
    #[serde(default)]
    pub mode: AuditMode,
    /// Where records go.
    pub sink: Sink,
    /// Records queued for the writer at most; beyond, records are dropped (counted).
    #[serde(default = "default_queue_capacity")]
    pub queue_capacity: usize,
    /// Best effort only: how long the writer waits after a record for more to come, so
    /// that one `write(2)` and one wake-up carry many records under load (records
    /// reach the file at most this much later). Strict mode writes at once. 0: off;
    /// at most 100ms. Default 1ms.
    #[serde(default = "default_linger", with = "humantime_serde")]
    pub linger: Duration,
}

impl AuditConfig {
    /// Best-effort recording to `sink` with the default queue.
    pub fn new(sink: Sink) -> Self {
        Self {
            mode: AuditMode::default(),
            sink,
            queue_capacity: DEFAULT_QUEUE_CAPACITY,
            linger: DEFAULT_LINGER,
        }
    }
}

fn default_queue_capacity() -> usize {
    DEFAULT_QUEUE_CAPACITY
}

fn default_linger() -> Duration {
    DEFAULT_LINGER
}

/// The recorder's counters, for metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct AuditStats {
    /// Records written (handed to the sink) since start.
    pub written: u64,
    /// Records dropped because the queue was full or the writer had stopped.
    pub dropped: u64,
    /// Records lost because the sink failed to write them.
    pub write_errors: u64,
    /// Records waiting in the queue.
    pub queue_depth: usize,
    /// The queue's capacity.
    pub queue_capacity: usize,
    /// See [`Recorder::is_healthy`].
    pub healthy: bool,
}

type Ack<T> = oneshot::Sender<Result<T, RecordError>>;

// Nearly every job is a record: boxing it would cost an allocation per record and save
// nothing.
#[allow(clippy::large_enum_variant)]
enum Job {
    Record {
        draft: RecordDraft,
        ack: Option<Ack<u64>>,
    },
    Flush(Ack<()>),
    Shutdown(Ack<()>),
}

/// A handle to the execution-record writer; clone it freely.
///
/// Per request, the proxy builds a [`RecordDraft`] once the response has ended. In
/// best-effort mode it calls [`Recorder::record`] and moves on. In strict mode it checks
/// [`Recorder::is_healthy`] before forwarding (503 when false), and awaits
/// [`Recorder::record_strict`] before completing the exchange, failing it if the record
/// was not written. Either way recording never waits for room in the queue.
#[derive(Clone)]
pub struct Recorder {
    tx: mpsc::Sender<Job>,
    shared: Arc<Shared>,
}

struct Shared {
    mode: AuditMode,
    capacity: usize,
    written: AtomicU64,
    dropped: AtomicU64,
    write_errors: AtomicU64,
    /// The sink's last write (or retry) succeeded.
    sink_ok: AtomicBool,
    drop_log: RateLimit,
    /// [`AuditConfig::linger`] in microseconds (0 until set: off).
    linger_us: AtomicU64,
}

impl Recorder {
    /// Opens the configured sink (resuming its chain), and starts the writer thread.
    /// `sidecar` is the recording sidecar's SPIFFE ID.
    pub fn start(sidecar: impl Into<String>, config: &AuditConfig) -> Result<Self, AuditError> {
        let writer: Box<dyn RecordWriter> = match &config.sink {
            Sink::Stdout => Box::new(StdoutSink::default()),
            Sink::File {
                path,
                max_bytes,
                max_files,
            } => Box::new(FileSink::new(path, *max_bytes, *max_files)?),
        };
        let recorder = Self::with_writer(sidecar, config.mode, config.queue_capacity, writer)?;
        recorder.set_linger(config.linger)?;
        Ok(recorder)
    }

    /// Sets [`AuditConfig::linger`] (best effort only; refused beyond [`MAX_LINGER`]).
    pub fn set_linger(&self, linger: Duration) -> Result<(), AuditError> {
        if linger > MAX_LINGER {
            return Err(AuditError::Config(format!(
                "linger is {linger:?}: use at most {MAX_LINGER:?} (default {DEFAULT_LINGER:?})"
            )));
        }
        let micros = u64::try_from(linger.as_micros()).unwrap_or(u64::MAX);
        self.shared.linger_us.store(micros, Ordering::Relaxed);
        Ok(())
    }

    /// Like [`Recorder::start`], with a destination of the caller's own.
    pub fn with_writer(
        sidecar: impl Into<String>,
        mode: AuditMode,
        queue_capacity: usize,
        mut writer: Box<dyn RecordWriter>,
    ) -> Result<Self, AuditError> {
        if !(1..=MAX_QUEUE_CAPACITY).contains(&queue_capacity) {
            return Err(AuditError::Config(format!(
                "queue_capacity is {queue_capacity}: use 1..={MAX_QUEUE_CAPACITY} (default {DEFAULT_QUEUE_CAPACITY})"
            )));
        }
        let head = writer
            .open()
            .map_err(AuditError::Open)?
            .unwrap_or_else(ChainHead::genesis);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .map_err(AuditError::Thread)?;
        let (tx, rx) = mpsc::channel(queue_capacity);
        let shared = Arc::new(Shared {
            mode,
            capacity: queue_capacity,
            written: AtomicU64::new(0),
            dropped: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            sink_ok: AtomicBool::new(true),
            drop_log: RateLimit::new(),
            linger_us: AtomicU64::new(0),
        });
        let writer = Writer {
            sink: writer,
            shared: shared.clone(),
            sidecar: sidecar.into(),
            committed: head.clone(),
            head,
            pending: Vec::new(),
            reopen: false,
            dirty: false,
            last_sync: Instant::now(),
            last_error: None,
            disk_full: false,
            error_log: RateLimit::new(),
            closing: Vec::new(),
        };
        std::thread::Builder::new()
            .name("nexus-audit".into())
            .spawn(move || runtime.block_on(writer.run(rx)))
            .map_err(AuditError::Thread)?;
        Ok(Self { tx, shared })
    }

    /// Queues a record without waiting. When the queue is full (or the writer has
    /// stopped) the record is dropped, counted in [`Recorder::dropped`] and logged
    /// (rate-limited), and the error says so.
    pub fn record(&self, draft: RecordDraft) -> Result<(), RecordError> {
        self.enqueue(draft, None)
    }

    /// Queues a record without waiting, and returns a future that resolves to its
    /// `seq` once it is written (handed to the sink in full; see the crate docs for when
    /// it is also `fsync`ed), or to the reason it was not. For strict mode.
    pub fn record_strict(
        &self,
        draft: RecordDraft,
    ) -> impl Future<Output = Result<u64, RecordError>> + Send + 'static {
        let (ack, written) = oneshot::channel();
        let queued = self.enqueue(draft, Some(ack));
        async move {
            queued?;
            written.await.unwrap_or(Err(RecordError::Closed))
        }
    }

    /// Whether a record made now can be written: the writer runs, the queue has room,
    /// and the sink's last write succeeded. In strict mode the proxy refuses requests
    /// (503) while this is false. After a sink failure it turns true again when a write
    /// succeeds or when the writer's retry (every second) reopens the sink.
    pub fn is_healthy(&self) -> bool {
        !self.tx.is_closed()
            && self.tx.capacity() > 0
            && self.shared.sink_ok.load(Ordering::Acquire)
    }

    /// The configured mode.
    pub fn mode(&self) -> AuditMode {
        self.shared.mode
    }

    /// Records written since start.
    pub fn written(&self) -> u64 {
        self.shared.written.load(Ordering::Relaxed)
    }

    /// Records dropped because the queue was full or the writer had stopped.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// Records lost because the sink failed to write them.
    pub fn write_errors(&self) -> u64 {
        self.shared.write_errors.load(Ordering::Relaxed)
    }

    /// Records waiting in the queue.
    pub fn queue_depth(&self) -> usize {
        self.shared.capacity.saturating_sub(self.tx.capacity())
    }

    /// The queue's capacity.
    pub fn queue_capacity(&self) -> usize {
        self.shared.capacity
    }

    /// All counters at once.
    pub fn stats(&self) -> AuditStats {
        AuditStats {
            written: self.written(),
            dropped: self.dropped(),
            write_errors: self.write_errors(),
            queue_depth: self.queue_depth(),
            queue_capacity: self.shared.capacity,
            healthy: self.is_healthy(),
        }
    }

    /// Waits until every record queued before this call is written, then `fsync`s.
    /// Errs when the sink is failing.
    pub async fn flush(&self) -> Result<(), RecordError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job::Flush(ack))
            .await
            .map_err(|_| RecordError::Closed)?;
        done.await.unwrap_or(Err(RecordError::Closed))
    }

    /// Stops accepting records (later ones are dropped and counted), writes and
    /// `fsync`s everything queued, and stops the writer. For graceful shutdown.
    pub async fn shutdown(&self) -> Result<(), RecordError> {
        let (ack, done) = oneshot::channel();
        self.tx
            .send(Job::Shutdown(ack))
            .await
            .map_err(|_| RecordError::Closed)?;
        done.await.unwrap_or(Err(RecordError::Closed))
    }

    fn enqueue(&self, draft: RecordDraft, ack: Option<Ack<u64>>) -> Result<(), RecordError> {
        let error = match self.tx.try_send(Job::Record { draft, ack }) {
            Ok(()) => return Ok(()),
            Err(TrySendError::Full(_)) => RecordError::QueueFull {
                capacity: self.shared.capacity,
            },
            Err(TrySendError::Closed(_)) => RecordError::Closed,
        };
        let dropped = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
        if self.shared.drop_log.ready() {
            tracing::warn!(
                dropped_total = dropped,
                queue_capacity = self.shared.capacity,
                error = %error,
                "execution records are being dropped"
            );
        }
        Err(error)
    }
}

impl std::fmt::Debug for Recorder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Recorder")
            .field("mode", &self.shared.mode)
            .field("stats", &self.stats())
            .finish()
    }
}

/// The writer thread's state.
struct Writer {
    sink: Box<dyn RecordWriter>,
    shared: Arc<Shared>,
    sidecar: String,
    /// Where the next record goes.
    head: ChainHead,
    /// After the last record known to be written.
    committed: ChainHead,
    /// Records handed to the sink since the last flush, with their waiters.
    pending: Vec<(u64, Option<Ack<u64>>)>,
    /// The sink failed and could not be reopened: reopen before the next write.
    reopen: bool,
    /// Written but not yet `fsync`ed.
    dirty: bool,
    last_sync: Instant,
    last_error: Option<String>,
    /// The last sink error was a full disk (or quota): what it loses is counted as
    /// dropped, and said so.
    disk_full: bool,
    error_log: RateLimit,
    /// Waiters of `shutdown`.
    closing: Vec<Ack<()>>,
}

/// Whether an I/O error means there is no room to write (ENOSPC, EDQUOT, EFBIG).
fn no_room(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Job>) {
        loop {
            let wait = match (self.dirty, self.healthy()) {
                (false, true) => None,
                (true, true) => Some(SYNC_INTERVAL.saturating_sub(self.last_sync.elapsed())),
                (false, false) => Some(RETRY_INTERVAL),
                (true, false) => Some(
                    SYNC_INTERVAL
                        .saturating_sub(self.last_sync.elapsed())
                        .min(RETRY_INTERVAL),
                ),
            };
            let job = match wait {
                None => rx.recv().await,
                Some(wait) => match tokio::time::timeout(wait, rx.recv()).await {
                    Ok(job) => job,
                    Err(_) => {
                        self.idle();
                        continue;
                    }
                },
            };
            let Some(job) = job else { break };
            self.handle(job, &mut rx);
            let handled = 1 + self.drain(&mut rx, MAX_BATCH - 1);
            // Best effort: linger for more records, so that under load one write and one
            // wake-up of this thread carry many (senders do not wake a sleeping writer:
            // it waits on a timer, not on the queue). Not while anyone awaits a record
            // (strict mode), a flush or the shutdown.
            let linger = Duration::from_micros(self.shared.linger_us.load(Ordering::Relaxed));
            if !linger.is_zero()
                && handled < MAX_BATCH
                && self.closing.is_empty()
                && self.pending.iter().all(|(_, ack)| ack.is_none())
            {
                tokio::time::sleep(linger).await;
                self.drain(&mut rx, MAX_BATCH - handled);
            }
            self.commit();
            if self.dirty && self.last_sync.elapsed() >= SYNC_INTERVAL {
                self.sync();
            }
        }
        self.commit();
        self.sync();
        let result = self.result();
        // Close the sink (and release its file lock) before anyone hears it stopped.
        let Writer { sink, closing, .. } = self;
        drop(sink);
        for ack in closing {
            let _ = ack.send(result.clone());
        }
        tracing::debug!("audit writer stopped");
    }

    /// Handles up to `max` jobs already queued; returns how many.
    fn drain(&mut self, rx: &mut mpsc::Receiver<Job>, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            match rx.try_recv() {
                Ok(job) => self.handle(job, rx),
                Err(_) => break,
            }
            n += 1;
        }
        n
    }

    fn healthy(&self) -> bool {
        self.shared.sink_ok.load(Ordering::Acquire)
    }

    fn handle(&mut self, job: Job, rx: &mut mpsc::Receiver<Job>) {
        match job {
            Job::Record { draft, ack } => self.write(draft, ack),
            Job::Flush(ack) => {
                self.commit();
                self.sync();
                let _ = ack.send(self.result());
            }
            Job::Shutdown(ack) => {
                // What is queued still gets written; `recv` ends after it.
                rx.close();
                self.closing.push(ack);
            }
        }
    }

    fn write(&mut self, draft: RecordDraft, ack: Option<Ack<u64>>) {
        if self.reopen && !self.reopen_sink() {
            self.lose(ack);
            return;
        }
        let seq = self.head.seq;
        let (hash, line) = match seal(seq, &self.head.prev_hash, &self.sidecar, draft) {
            Ok(sealed) => sealed,
            Err(e) => {
                self.last_error = Some(format!("serializing the record: {e}"));
                self.lose(ack);
                return;
            }
        };
        self.pending.push((seq, ack));
        match self.sink.write_line(&line) {
            Ok(()) => {
                self.head = ChainHead {
                    seq: seq + 1,
                    prev_hash: hash,
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// Flushes the batch and acknowledges it.
    fn commit(&mut self) {
        if self.pending.is_empty() {
            return;
        }
        match self.sink.flush() {
            Ok(()) => {
                // State first: a waiter woken by its ack sees it updated.
                self.shared
                    .written
                    .fetch_add(self.pending.len() as u64, Ordering::Relaxed);
                self.committed = self.head.clone();
                self.dirty = true;
                self.set_ok();
                for (seq, ack) in self.pending.drain(..) {
                    if let Some(ack) = ack {
                        let _ = ack.send(Ok(seq));
                    }
                }
            }
            Err(e) => self.failed(&e),
        }
    }

    /// The sink failed with records pending: reopen it to learn which of them made it
    /// (the file sink reads back its last complete record), acknowledge those, count
    /// the rest as lost, and continue the chain after the last record written.
    fn failed(&mut self, error: &io::Error) {
        let message = error.to_string();
        self.disk_full = no_room(error);
        if self.shared.sink_ok.swap(false, Ordering::AcqRel) {
            if self.disk_full {
                tracing::error!(
                    error = %message,
                    "audit sink full (no space left for execution records): records are dropped and counted until there is room"
                );
            } else {
                tracing::error!(
                    error = %message,
                    "audit sink failed: execution records are not being written"
                );
            }
        }
        self.last_error = Some(message.clone());
        let head = match self.sink.open() {
            Ok(Some(head)) => {
                self.reopen = false;
                head
            }
            Ok(None) => {
                self.reopen = false;
                self.committed.clone()
            }
            Err(e) => {
                self.reopen = true;
                self.disk_full |= no_room(&e);
                self.last_error = Some(format!("{message}; reopening the sink: {e}"));
                self.committed.clone()
            }
        };
        if head.seq < self.committed.seq {
            tracing::warn!(
                resumed_at = head.seq,
                written_up_to = self.committed.seq,
                "the audit record file lost records behind the writer's back; the chain resumes from what is on disk"
            );
        }
        // Counters first: a waiter woken by its ack sees them updated.
        let written = self
            .pending
            .iter()
            .filter(|(seq, _)| *seq < head.seq)
            .count() as u64;
        let lost = self.pending.len() as u64 - written;
        self.shared.written.fetch_add(written, Ordering::Relaxed);
        if self.disk_full {
            let total = self.shared.dropped.fetch_add(lost, Ordering::Relaxed) + lost;
            if lost > 0 {
                tracing::warn!(dropped = lost, dropped_total = total, error = %message, "disk full: execution records dropped");
            }
        } else {
            let total = self.shared.write_errors.fetch_add(lost, Ordering::Relaxed) + lost;
            if lost > 0 {
                tracing::warn!(lost, write_errors_total = total, error = %message, "execution records lost");
            }
        }
        for (seq, ack) in self.pending.drain(..) {
            if let Some(ack) = ack {
                let _ = ack.send(if seq < head.seq {
                    Ok(seq)
                } else {
                    Err(RecordError::Sink(message.clone()))
                });
            }
        }
        self.head = head.clone();
        self.committed = head;
        self.dirty = true;
    }

    fn reopen_sink(&mut self) -> bool {
        match self.sink.open() {
            Ok(head) => {
                self.reopen = false;
                if let Some(head) = head {
                    self.head = head.clone();
                    self.committed = head;
                }
                true
            }
            Err(e) => {
                self.disk_full = no_room(&e);
                self.last_error = Some(format!("reopening the sink: {e}"));
                false
            }
        }
    }

    fn lose(&mut self, ack: Option<Ack<u64>>) {
        let message = self
            .last_error
            .clone()
            .unwrap_or_else(|| "the sink is unavailable".to_owned());
        if self.disk_full {
            let total = self.shared.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if self.error_log.ready() {
                tracing::warn!(dropped_total = total, error = %message, "disk full: execution records dropped");
            }
        } else {
            let total = self.shared.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
            if self.error_log.ready() {
                tracing::warn!(write_errors_total = total, error = %message, "execution records lost");
            }
        }
        if let Some(ack) = ack {
            let _ = ack.send(Err(RecordError::Sink(message)));
        }
    }

    fn sync(&mut self) {
        if !self.dirty {
            return;
        }
        self.last_sync = Instant::now();
        match self.sink.sync() {
            Ok(()) => self.dirty = false,
            Err(e) => {
                if self.shared.sink_ok.swap(false, Ordering::AcqRel) {
                    tracing::error!(error = %e, "audit sink fsync failed: recent execution records may not be durable");
                }
                self.last_error = Some(format!("fsync: {e}"));
            }
        }
    }

    /// Nothing arrived for a while: sync what was written; retry a failed sink.
    fn idle(&mut self) {
        self.sync();
        if self.healthy() || (self.reopen && !self.reopen_sink()) {
            return;
        }
        match self.sink.sync() {
            Ok(()) => self.set_ok(),
            Err(e) => self.last_error = Some(format!("retrying the sink: {e}")),
        }
    }

    fn set_ok(&mut self) {
        if !self.shared.sink_ok.swap(true, Ordering::AcqRel) {
            tracing::info!("audit sink recovered: execution records are being written again");
        }
    }

    fn result(&self) -> Result<(), RecordError> {
        if self.healthy() {
            Ok(())
        } else {
            Err(RecordError::Sink(
                self.last_error
                    .clone()
                    .unwrap_or_else(|| "the sink is failing".to_owned()),
            ))
        }
    }
}

/// Lets one event through per [`LOG_INTERVAL`].
struct RateLimit {
    origin: Instant,
    next_ms: AtomicU64,
}

impl RateLimit {
    fn new() -> Self {
        Self {
            origin: Instant::now(),
            next_ms: AtomicU64::new(0),
        }
    }

    fn ready(&self) -> bool {
        let now = u64::try_from(self.origin.elapsed().as_millis()).unwrap_or(u64::MAX);
        let next = self.next_ms.load(Ordering::Relaxed);
        now >= next
            && self
                .next_ms
                .compare_exchange(
                    next,
                    now.saturating_add(LOG_INTERVAL.as_millis() as u64),
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
    }
}

#[cfg(test)]
mod tests;
