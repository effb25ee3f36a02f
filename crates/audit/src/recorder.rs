//! The recorder: a cheap handle the proxy clones into every connection, over a bounded
//! queue that one writer thread drains. Recording never waits: a full queue drops the
//! record and counts it. The request's own thread writes the record's body (everything
//! but the chain fields) straight into the queue's buffer, so a record crosses to the
//! writer as bytes: the draft's strings are made and freed on one thread, and no
//! per-record message is allocated, sent or freed across threads (that hand-off, not the
//! sealing, was most of what records cost at full load: docs/benchmarks.md). The writer
//! takes everything queued at once, seals each record into the chain, writes the batch
//! with one call, and only then acknowledges it.
//!
//! The writer is a thread of its own (running a small current-thread runtime for its
//! timers) because file writes and `fsync` block: on the proxy's runtime they would take
//! a worker away from requests. In best-effort mode it runs at a lower priority than
//! the workers (`WRITER_NICE`): when both want a core, the request goes first and the
//! record waits in the queue (at 2,000 requests/s the audited p99 went down by 0.1-0.35
//! ms in two interleaved `bench/run.sh` pairs; at full load every request was still
//! recorded). In strict mode a request waits for its record, so the writer keeps the
//! workers' priority.

use std::future::Future;
use std::io;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, oneshot};

use crate::error::{AuditError, RecordError};
use crate::record::{RecordDraft, rounded_latency, seal_body};
use crate::sink::{ChainHead, FileSink, RecordWriter, Sink, StdoutSink};

/// Default queue capacity, in records.
pub const DEFAULT_QUEUE_CAPACITY: usize = 8192;
/// The default [`AuditConfig::linger`].
pub const DEFAULT_LINGER: Duration = Duration::from_millis(1);
/// The longest [`AuditConfig::linger`] accepted.
pub const MAX_LINGER: Duration = Duration::from_millis(100);
/// How much lower than the process the writer thread runs in best-effort mode (`nice`
/// increment): on a busy machine the request workers get the cores first, and the
/// writer's batches fill the time between (its weight is about a tenth of a worker's;
/// it is never starved).
const WRITER_NICE: i32 = 10;

/// The writer's `nice` increment in `mode`: none in strict mode, where every request
/// waits for its record to be written.
fn writer_nice(mode: AuditMode) -> Option<i32> {
    match mode {
        AuditMode::BestEffort => Some(WRITER_NICE),
        AuditMode::Strict => None,
    }
}

/// The longest a written record waits for its `fsync`.
pub const SYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How often a failed sink is retried while nothing else happens.
const RETRY_INTERVAL: Duration = Duration::from_secs(1);
/// Records written per batch (per `write(2)`), at most.
const MAX_BATCH: usize = 1024;
/// The queue's buffer is given back to the allocator when a burst grew it beyond this
/// (its capacity is otherwise kept from batch to batch).
const KEEP_BUFFER_BYTES: usize = 1 << 20;
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

/// What the requests' threads have handed to the writer and it has not taken yet.
#[derive(Default)]
struct Queue {
    /// The records' bodies ([`RecordDraft::write_body`]), back to back.
    bodies: Vec<u8>,
    /// Per record: where its body ends in `bodies`, and who awaits it (strict mode).
    records: Vec<(usize, Option<Ack<u64>>)>,
    /// Waiters of `flush`: answered once what was queued before them is written.
    flushes: Vec<Ack<()>>,
    /// Waiters of `shutdown`.
    shutdowns: Vec<Ack<()>>,
    /// Records are refused once this is set: by `shutdown`, when the last handle is
    /// dropped, or when the writer stopped.
    closed: bool,
    /// Someone waits (a strict record, a flush, a shutdown): the writer must not linger.
    urgent: bool,
}

/// Closes the queue when the last [`Recorder`] handle is dropped, so that the writer
/// writes what is left and stops.
struct Handles(Arc<Shared>);

impl Drop for Handles {
    fn drop(&mut self) {
        let mut queue = self.0.queue();
        queue.closed = true;
        queue.urgent = true;
        drop(queue);
        self.0.wake.notify_one();
    }
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
    shared: Arc<Shared>,
    _handles: Arc<Handles>,
}

struct Shared {
    queue: Mutex<Queue>,
    /// Wakes the writer: for the first record of a batch and for anyone who waits.
    wake: Notify,
    /// The recording sidecar's SPIFFE ID (each record's `sidecar`).
    sidecar: String,
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
        let shared = Arc::new(Shared {
            queue: Mutex::new(Queue::default()),
            wake: Notify::new(),
            sidecar: sidecar.into(),
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
            committed: head.clone(),
            head,
            pending: Vec::new(),
            reopen: false,
            dirty: false,
            last_sync: Instant::now(),
            last_error: None,
            disk_full: false,
            error_log: RateLimit::new(),
            taken: Queue::default(),
            line: Vec::with_capacity(1024),
        };
        std::thread::Builder::new()
            .name("nexus-audit".into())
            .spawn(move || {
                // Below the proxy's workers: a record waits for a core, a request does not.
                // Linux's nice applies to the calling thread only. Refused (e.g. by a
                // seccomp profile), the writer runs at the process's own priority.
                if let Some(nice) = writer_nice(mode)
                    && let Err(e) = rustix::process::nice(nice)
                {
                    tracing::debug!(error = %e, "the audit writer keeps the process's priority");
                }
                runtime.block_on(writer.run())
            })
            .map_err(AuditError::Thread)?;
        let handles = Arc::new(Handles(shared.clone()));
        Ok(Self {
            shared,
            _handles: handles,
        })
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
        let room = {
            let queue = self.shared.queue();
            !queue.closed && queue.records.len() < self.shared.capacity
        };
        room && self.shared.sink_ok.load(Ordering::Acquire)
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
        self.shared.queue().records.len()
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
        self.control(|queue| queue.flushes.push(ack))?;
        done.await.unwrap_or(Err(RecordError::Closed))
    }

    /// Stops accepting records (later ones are dropped and counted), writes and
    /// `fsync`s everything queued, and stops the writer. For graceful shutdown.
    pub async fn shutdown(&self) -> Result<(), RecordError> {
        let (ack, done) = oneshot::channel();
        self.control(|queue| {
            queue.shutdowns.push(ack);
            queue.closed = true;
        })?;
        done.await.unwrap_or(Err(RecordError::Closed))
    }

    /// Queues a request to the writer (`Closed` once the queue is) and wakes it.
    fn control(&self, request: impl FnOnce(&mut Queue)) -> Result<(), RecordError> {
        let mut queue = self.shared.queue();
        if queue.closed {
            return Err(RecordError::Closed);
        }
        request(&mut queue);
        queue.urgent = true;
        drop(queue);
        self.shared.wake.notify_one();
        Ok(())
    }

    fn enqueue(&self, mut draft: RecordDraft, ack: Option<Ack<u64>>) -> Result<(), RecordError> {
        draft.latency_ms = rounded_latency(draft.latency_ms);
        let mut queue = self.shared.queue();
        let error = if queue.closed {
            RecordError::Closed
        } else if queue.records.len() >= self.shared.capacity {
            RecordError::QueueFull {
                capacity: self.shared.capacity,
            }
        } else {
            let start = queue.bodies.len();
            match draft.write_body(&self.shared.sidecar, &mut queue.bodies) {
                Ok(()) => {
                    let end = queue.bodies.len();
                    let wake = queue.records.is_empty() || ack.is_some();
                    queue.urgent |= ack.is_some();
                    queue.records.push((end, ack));
                    drop(queue);
                    // The writer sleeps until the first record of a batch (later ones
                    // find it awake or lingering), or until someone waits.
                    if wake {
                        self.shared.wake.notify_one();
                    }
                    return Ok(());
                }
                Err(e) => {
                    // Writing into memory fails only on a float serde_json refuses.
                    queue.bodies.truncate(start);
                    drop(queue);
                    self.shared.write_errors.fetch_add(1, Ordering::Relaxed);
                    let error = RecordError::Sink(format!("serializing the record: {e}"));
                    if let Some(ack) = ack {
                        let _ = ack.send(Err(error.clone()));
                    }
                    return Err(error);
                }
            }
        };
        drop(queue);
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

impl Shared {
    fn queue(&self) -> MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(PoisonError::into_inner)
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
    /// What it took from the queue last (swapped with the queue's, so that both keep
    /// their capacity).
    taken: Queue,
    /// The line being sealed.
    line: Vec<u8>,
}

/// Whether an I/O error means there is no room to write (ENOSPC, EDQUOT, EFBIG).
fn no_room(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::StorageFull | io::ErrorKind::QuotaExceeded | io::ErrorKind::FileTooLarge
    )
}

impl Writer {
    async fn run(mut self) {
        // However the writer stops, the queue closes and its waiters hear it.
        let _stopped = Stopped(self.shared.clone());
        let mut shutdowns = Vec::new();
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
            let (queued, urgent) = {
                let queue = self.shared.queue();
                (queue.records.len(), queue.urgent)
            };
            if queued == 0 && !urgent {
                // A wake-up that comes between the look and the wait is kept by
                // `Notify` (a permit), so it is not missed.
                let woken = self.shared.wake.notified();
                match wait {
                    None => woken.await,
                    Some(wait) => {
                        if tokio::time::timeout(wait, woken).await.is_err() {
                            self.idle();
                            continue;
                        }
                    }
                }
            }
            // Best effort: linger for more records, so that under load one write and one
            // wake-up of this thread carry many (senders do not wake a writer that has
            // records: it waits on the timer). Not while anyone waits for a record
            // (strict mode), a flush or the shutdown; those cut a linger short.
            let linger = Duration::from_micros(self.shared.linger_us.load(Ordering::Relaxed));
            let lingers = {
                let queue = self.shared.queue();
                !queue.urgent && !queue.records.is_empty() && queue.records.len() < MAX_BATCH
            };
            if lingers && !linger.is_zero() {
                // A wake-up kept from before (see above) is not a reason to stop early.
                let deadline = tokio::time::Instant::now() + linger;
                while tokio::time::timeout_at(deadline, self.shared.wake.notified())
                    .await
                    .is_ok()
                {
                    if self.shared.queue().urgent {
                        break;
                    }
                }
            }
            let closed = self.take();
            self.write_taken();
            for ack in std::mem::take(&mut self.taken.flushes) {
                self.sync();
                let _ = ack.send(self.result());
            }
            shutdowns.append(&mut self.taken.shutdowns);
            if self.dirty && self.last_sync.elapsed() >= SYNC_INTERVAL {
                self.sync();
            }
            if closed {
                break;
            }
        }
        self.sync();
        let result = self.result();
        // Close the sink (and release its file lock) before anyone hears it stopped.
        let Writer { sink, .. } = self;
        drop(sink);
        for ack in shutdowns {
            let _ = ack.send(result.clone());
        }
        tracing::debug!("audit writer stopped");
    }

    /// Takes everything queued (swapping buffers with the queue); returns whether the
    /// queue is closed, so that this was the last of it.
    fn take(&mut self) -> bool {
        let mut queue = self.shared.queue();
        std::mem::swap(&mut queue.bodies, &mut self.taken.bodies);
        std::mem::swap(&mut queue.records, &mut self.taken.records);
        std::mem::swap(&mut queue.flushes, &mut self.taken.flushes);
        std::mem::swap(&mut queue.shutdowns, &mut self.taken.shutdowns);
        queue.urgent = false;
        queue.closed
    }

    /// Seals and writes what [`Writer::take`] took, committing every [`MAX_BATCH`].
    fn write_taken(&mut self) {
        let mut bodies = std::mem::take(&mut self.taken.bodies);
        let mut records = std::mem::take(&mut self.taken.records);
        let mut start = 0;
        for (n, (end, ack)) in records.drain(..).enumerate() {
            self.write(&bodies[start..end], ack);
            start = end;
            if n % MAX_BATCH == MAX_BATCH - 1 {
                self.commit();
            }
        }
        self.commit();
        bodies.clear();
        if bodies.capacity() > KEEP_BUFFER_BYTES {
            bodies.shrink_to(KEEP_BUFFER_BYTES / 16);
            records.shrink_to(MAX_BATCH);
        }
        self.taken.bodies = bodies;
        self.taken.records = records;
    }

    fn healthy(&self) -> bool {
        self.shared.sink_ok.load(Ordering::Acquire)
    }

    fn write(&mut self, body: &[u8], ack: Option<Ack<u64>>) {
        if self.reopen && !self.reopen_sink() {
            self.lose(ack);
            return;
        }
        let seq = self.head.seq;
        let hash = match seal_body(seq, &self.head.prev_hash, body, &mut self.line) {
            Ok(hash) => hash,
            Err(e) => {
                self.last_error = Some(format!("sealing the record: {e}"));
                self.lose(ack);
                return;
            }
        };
        self.pending.push((seq, ack));
        match self.sink.write_line(&self.line) {
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

/// Closes the queue when the writer stops (a panic included): records are refused from
/// then on, and whoever still waits on the queue hears `Closed`.
struct Stopped(Arc<Shared>);

impl Drop for Stopped {
    fn drop(&mut self) {
        let closed = Queue {
            closed: true,
            ..Queue::default()
        };
        let left = std::mem::replace(&mut *self.0.queue(), closed);
        self.0
            .dropped
            .fetch_add(left.records.len() as u64, Ordering::Relaxed);
        // Dropping the waiters' senders answers them `Closed`.
        drop(left);
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
