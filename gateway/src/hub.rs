//! The gateway's in-memory view: the state at the latest revision, a bounded log of
//! recent deltas (for resuming sidecars), the broadcast that pushes each delta to every
//! stream, the connected sidecars with the revision each acknowledged, and the
//! propagation measurement of each revocation (call to last acknowledgement).
//!
//! The store is the source of truth: the hub only ingests changes read back from it in
//! revision order (`catch_up`), whether this replica or another one wrote them.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use nexus_proto::control::{
    Baseline, Delta, Execution, PluginVersion, PolicyStatus, Reinstatement, RequestRate,
    Revocation, SidecarEvent, SidecarInfo, Snapshot, StoredSignal, WatchEvent,
    delta::Change as DeltaChange, watch_event,
};
use tokio::sync::{Mutex as AsyncMutex, broadcast, watch};

use crate::changes::unix_ms;
use crate::metrics::Metrics;
use crate::rates::RequestRates;
use crate::store::{Change, Store, StoreError};

/// What a new stream starts from.
pub enum Start {
    /// The deltas after the sidecar's last revision, from the log.
    Resume(Vec<Arc<Delta>>),
    /// The whole state.
    Snapshot(Snapshot),
}

#[derive(Debug, Default)]
struct State {
    revision: u64,
    revoked: BTreeMap<String, Revocation>,
    executions: BTreeMap<String, Execution>,
    /// The certified plugin versions by (plugin UID, version), as sidecars see them
    /// ([`crate::registry::for_sidecars`]): their bindings are `data.nexus.bindings`.
    certified: BTreeMap<(String, String), PluginVersion>,
    /// Whether this gateway runs a registry: snapshots then carry the bindings.
    registry: bool,
    /// Each subject's latest reinstatement by an operator (not by expiry): signals
    /// observed before it do not count toward a new revocation (crate::signals).
    reinstated: HashMap<String, Reinstatement>,
    log: VecDeque<Arc<Delta>>,
}

impl State {
    fn apply(&mut self, delta: &Delta) {
        match &delta.change {
            Some(DeltaChange::Revoke(r)) => {
                self.revoked.insert(r.subject.clone(), r.clone());
            }
            Some(DeltaChange::Reinstate(r)) => {
                self.revoked.remove(&r.subject);
                self.note_reinstatement(r);
            }
            Some(DeltaChange::Open(e)) => {
                self.executions.insert(e.id.clone(), e.clone());
            }
            Some(DeltaChange::Close(c)) => {
                self.executions.remove(&c.id);
            }
            // The rest of the registry is read from the store (crate::registry).
            Some(DeltaChange::Registry(r)) => {
                for v in &r.versions {
                    self.certify(v);
                }
            }
            None => {}
        }
        self.revision = delta.revision;
    }

    /// Keeps `v` among the bound versions when it is certified, drops it otherwise.
    fn certify(&mut self, v: &PluginVersion) {
        let key = (v.plugin_uid.clone(), v.version.clone());
        if v.state == crate::registry::CERTIFIED {
            self.certified.insert(key, crate::registry::for_sidecars(v));
        } else {
            self.certified.remove(&key);
        }
    }

    fn note_reinstatement(&mut self, r: &Reinstatement) {
        if crate::changes::by_operator(r) {
            self.reinstated.insert(r.subject.clone(), r.clone());
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            revision: self.revision,
            revoked: self.revoked.values().cloned().collect(),
            executions: self.executions.values().cloned().collect(),
            registry: self.registry,
            certified: if self.registry {
                self.certified.values().cloned().collect()
            } else {
                Vec::new()
            },
        }
    }
}

/// A connected sidecar stream.
#[derive(Clone, Debug)]
pub struct StreamEntry {
    /// Status view.
    pub info: SidecarInfo,
}

/// One change's propagation to the sidecars connected when it was ingested.
#[derive(Clone, Debug)]
pub struct Propagation {
    /// Its revision.
    pub revision: u64,
    /// What changed (the revoked subject, the execution id).
    pub subject: String,
    /// Whether it is a revocation.
    pub revocation: bool,
    /// When the call that made it arrived (or when this replica saw it).
    pub started: Instant,
    /// The same, in unix ms.
    pub started_unix_ms: u64,
    /// Streams connected then.
    pub sidecars: u32,
    /// Of those, how many acknowledged.
    pub acknowledged: u32,
    /// Set once every one acknowledged (or left).
    pub done_after: Option<Duration>,
    waiting: HashSet<u64>,
}

/// The hub.
pub struct Hub {
    state: std::sync::Mutex<State>,
    deltas: broadcast::Sender<Arc<Delta>>,
    log_capacity: usize,
    streams: std::sync::Mutex<HashMap<u64, StreamEntry>>,
    next_stream: AtomicU64,
    pending: std::sync::Mutex<Vec<Propagation>>,
    /// Completed or current propagations by revision (bounded), for waiters.
    progress: watch::Sender<u64>,
    last_revocation: std::sync::Mutex<Option<Propagation>>,
    /// The revision of the newest revocation ingested (0: none yet).
    newest_revocation: AtomicU64,
    /// Start instants of this replica's own calls, by revision, so the measurement
    /// starts when the operator's call arrived.
    starts: std::sync::Mutex<HashMap<u64, (Instant, u64)>>,
    catch_up: AsyncMutex<()>,
    /// Finished propagations by revision (the last 1024).
    recent: std::sync::Mutex<BTreeMap<u64, Propagation>>,
    metrics: Arc<Metrics>,
    /// The Admin `Watch` feed: every change, sidecar event, signal and finished
    /// propagation. A watcher that lags gets a fresh state instead (admin.rs).
    events: broadcast::Sender<Arc<WatchEvent>>,
    /// Records per workload and minute, for the console's sparklines.
    rates: RequestRates,
}

/// How many watch events are buffered for a slow watcher before it is resent the state.
const WATCH_BUFFER: usize = 4096;

impl Hub {
    /// A hub holding the store's current state; `registry`: the gateway runs a plugin
    /// registry, so sidecars take their bindings from its certified versions.
    pub async fn load(
        store: &Store,
        log_capacity: usize,
        max_rate_workloads: usize,
        metrics: Arc<Metrics>,
        registry: bool,
    ) -> Result<Arc<Self>, StoreError> {
        let revision = store.revision().await?;
        // Read after the revision (as revocations and executions are): a change committed
        // in between is already here and is ingested again by the first catch-up, which
        // applies idempotently.
        let mut certified = Vec::new();
        for plugin in store.plugins(None).await? {
            certified.extend(plugin.versions);
        }
        let mut state = State {
            revision,
            registry,
            ..State::default()
        };
        for v in &certified {
            state.certify(v);
        }
        for r in store.revocations().await? {
            state.revoked.insert(r.subject.clone(), r);
        }
        for e in store.executions(false).await? {
            state.executions.insert(e.execution.id.clone(), e.execution);
        }
        for r in store.reinstatements().await? {
            state.note_reinstatement(&r);
        }
        let (deltas, _) = broadcast::channel(log_capacity.max(16));
        let (progress, _) = watch::channel(0);
        metrics.set_revision(revision);
        Ok(Arc::new(Self {
            state: std::sync::Mutex::new(state),
            deltas,
            log_capacity: log_capacity.max(16),
            streams: std::sync::Mutex::new(HashMap::new()),
            next_stream: AtomicU64::new(1),
            pending: std::sync::Mutex::new(Vec::new()),
            progress,
            last_revocation: std::sync::Mutex::new(None),
            newest_revocation: AtomicU64::new(0),
            starts: std::sync::Mutex::new(HashMap::new()),
            catch_up: AsyncMutex::new(()),
            recent: std::sync::Mutex::new(BTreeMap::new()),
            metrics,
            events: broadcast::channel(WATCH_BUFFER).0,
            rates: RequestRates::new(max_rate_workloads),
        }))
    }

    /// Subscribes to the watch feed (before reading the state it follows, so nothing is
    /// missed; events already in the state are applied idempotently by the watcher).
    pub fn watch(&self) -> broadcast::Receiver<Arc<WatchEvent>> {
        self.events.subscribe()
    }

    fn emit(&self, event: watch_event::Event) {
        // No watcher is the common case: nothing to build or send then.
        if self.events.receiver_count() > 0 {
            let _ = self
                .events
                .send(Arc::new(WatchEvent { event: Some(event) }));
        }
    }

    fn emit_sidecar(&self, stream: u64, info: Option<SidecarInfo>) {
        if self.events.receiver_count() == 0 {
            return;
        }
        let gone = info.is_none();
        self.emit(watch_event::Event::Sidecar(SidecarEvent {
            stream,
            info,
            gone,
        }));
    }

    fn emit_propagation(&self, p: &Propagation) {
        if self.events.receiver_count() > 0 {
            self.emit(watch_event::Event::Propagation(crate::replicas::to_proto(
                p,
            )));
        }
    }

    /// A signal was stored or judged (for watchers).
    pub fn signal_changed(&self, signal: impl FnOnce() -> StoredSignal) {
        if self.events.receiver_count() > 0 {
            self.emit(watch_event::Event::Signal(signal()));
        }
    }

    /// A workload's fleet baseline moved (for watchers).
    pub fn baseline_changed(&self, baseline: impl FnOnce() -> Baseline) {
        if self.events.receiver_count() > 0 {
            self.emit(watch_event::Event::Baseline(baseline()));
        }
    }

    /// `workload`'s own sidecar stored new records (by minute of their time).
    pub fn requests(&self, workload: &str, by_minute: &BTreeMap<u64, u64>) {
        if by_minute.is_empty() {
            return;
        }
        for rate in self.rates.add(workload, by_minute, unix_ms()) {
            self.emit(watch_event::Event::Rate(rate));
        }
    }

    /// The recent request rates per workload and minute.
    pub fn rates(&self) -> Vec<RequestRate> {
        self.rates.all(unix_ms())
    }

    /// A stream reported its policy status (after its hello); watchers see a change.
    pub fn policy(&self, id: u64, status: PolicyStatus) {
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
            && s.info.policy.as_ref() != Some(&status)
        {
            s.info.policy = Some(status);
            let info = s.info.clone();
            self.emit_sidecar(id, Some(info));
        }
    }

    /// The connected sidecars with their stream ids.
    pub fn sidecar_streams(&self) -> Vec<SidecarEvent> {
        let mut list: Vec<SidecarEvent> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(id, s)| SidecarEvent {
                stream: *id,
                info: Some(s.info.clone()),
                gone: false,
            })
            .collect();
        list.sort_by_key(|s| s.stream);
        list
    }

    /// The recent propagations (pending and finished), oldest first.
    pub fn propagations(&self) -> Vec<Propagation> {
        let mut list: Vec<Propagation> = self.recent().values().cloned().collect();
        list.extend(
            self.pending
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .cloned(),
        );
        list.sort_by_key(|p| p.revision);
        list
    }

    /// The latest ingested revision.
    pub fn revision(&self) -> u64 {
        self.lock_state().revision
    }

    fn lock_state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Current revocations.
    pub fn revoked(&self) -> Vec<Revocation> {
        self.lock_state().revoked.values().cloned().collect()
    }

    /// Whether this gateway's sidecars take their bindings from its registry.
    pub fn registry(&self) -> bool {
        self.lock_state().registry
    }

    /// Open executions.
    pub fn executions(&self) -> Vec<Execution> {
        self.lock_state().executions.values().cloned().collect()
    }

    /// Whether `subject` is revoked right now.
    pub fn is_revoked(&self, subject: &str) -> bool {
        self.lock_state().revoked.contains_key(subject)
    }

    /// The latest reinstatement of exactly `subject` by an operator, if any (a lifted
    /// pattern, or a revocation that expired, is not one).
    pub fn reinstated(&self, subject: &str) -> Option<Reinstatement> {
        self.lock_state().reinstated.get(subject).cloned()
    }

    /// Notes when the call that committed `revision` arrived, so its propagation is
    /// measured from there.
    fn note_start(&self, revision: u64, started: Instant, started_unix_ms: u64) {
        self.starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(revision, (started, started_unix_ms));
    }

    /// Reads every change after the hub's revision from the store and pushes each.
    pub async fn catch_up(&self, store: &Store) -> Result<u64, StoreError> {
        let _one = self.catch_up.lock().await;
        self.catch_up_locked(store).await
    }

    /// Commits `change` and ingests it (with anything other replicas wrote before it),
    /// measuring its propagation from `started`.
    pub async fn commit(
        &self,
        store: &Store,
        change: Change,
        actor: &str,
        started: Instant,
        started_unix_ms: u64,
    ) -> Result<Arc<Delta>, StoreError> {
        let _one = self.catch_up.lock().await;
        let delta = store.commit(change, actor).await?;
        self.note_start(delta.revision, started, started_unix_ms);
        self.catch_up_locked(store).await?;
        Ok(Arc::new(delta))
    }

    async fn catch_up_locked(&self, store: &Store) -> Result<u64, StoreError> {
        loop {
            let from = self.revision();
            let changes = store.changes_after(from).await?;
            if changes.is_empty() {
                return Ok(from);
            }
            let full = changes.len() as i64 >= crate::store::CATCH_UP_BATCH;
            for delta in changes {
                self.ingest(delta);
            }
            if !full {
                return Ok(self.revision());
            }
        }
    }

    fn ingest(&self, delta: Delta) {
        let delta = Arc::new(delta);
        let (started, started_unix_ms) = self
            .starts
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&delta.revision)
            .unwrap_or_else(|| (Instant::now(), unix_ms()));
        let waiting: HashSet<u64> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .keys()
            .copied()
            .collect();
        let (subject, revocation) = match &delta.change {
            Some(DeltaChange::Revoke(r)) => (r.subject.clone(), true),
            Some(DeltaChange::Reinstate(r)) => (r.subject.clone(), false),
            Some(DeltaChange::Open(e)) => (e.id.clone(), false),
            Some(DeltaChange::Close(c)) => (c.id.clone(), false),
            Some(DeltaChange::Registry(r)) => (r.action.clone(), false),
            None => (String::new(), false),
        };
        if revocation {
            self.newest_revocation
                .fetch_max(delta.revision, Ordering::Relaxed);
        }
        let mut propagation = Propagation {
            revision: delta.revision,
            subject,
            revocation,
            started,
            started_unix_ms,
            sidecars: u32::try_from(waiting.len()).unwrap_or(u32::MAX),
            acknowledged: 0,
            done_after: None,
            waiting,
        };
        if propagation.waiting.is_empty() {
            propagation.done_after = Some(started.elapsed());
        }
        {
            // State, log and broadcast under one lock: a stream that subscribes under
            // the same lock sees either the snapshot with this delta or the delta.
            let mut state = self.lock_state();
            state.apply(&delta);
            state.log.push_back(delta.clone());
            while state.log.len() > self.log_capacity {
                state.log.pop_front();
            }
            {
                let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
                if propagation.done_after.is_some() {
                    self.finish(&propagation);
                    self.recent().insert(propagation.revision, propagation);
                } else {
                    pending.push(propagation);
                }
            }
            let _ = self.deltas.send(delta.clone());
            self.metrics.set_revision(state.revision);
            // Under the state lock, as the sidecars' broadcast: a watcher's state and
            // its events agree on the order.
            self.emit(watch_event::Event::Delta((*delta).clone()));
        }
        if let Some(p) = self.propagation(delta.revision) {
            self.emit_propagation(&p);
        }
        self.progress.send_replace(delta.revision);
    }

    fn finish(&self, propagation: &Propagation) {
        if let Some(after) = propagation.done_after {
            self.metrics.propagation(propagation.revocation, after);
        }
        if propagation.revocation {
            *self
                .last_revocation
                .lock()
                .unwrap_or_else(|p| p.into_inner()) = Some(propagation.clone());
        }
    }

    /// Registers a stream and decides where it starts; returns its id, the start, and
    /// the delta receiver (subscribed atomically with the start). `registry`: the
    /// sidecar's state carries registry bindings (its hello says so).
    pub fn connect(
        &self,
        info: SidecarInfo,
        last_revision: u64,
        registry: bool,
    ) -> (u64, Start, broadcast::Receiver<Arc<Delta>>) {
        let id = self.next_stream.fetch_add(1, Ordering::Relaxed);
        let state = self.lock_state();
        let receiver = self.deltas.subscribe();
        // A sidecar at revision 0 holds nothing it can enforce (a first start, or a kept
        // snapshot it could not verify): it refuses every request until it is sent the
        // state, so it always gets a snapshot, even of an empty store. One whose
        // bindings come from elsewhere than this gateway says (its folder, or a
        // registry this gateway no longer runs) gets the whole state too.
        let start = if registry != state.registry {
            Start::Snapshot(state.snapshot())
        } else if last_revision == state.revision && last_revision != 0 {
            Start::Resume(Vec::new())
        } else if last_revision < state.revision
            && state
                .log
                .front()
                .is_some_and(|first| first.revision <= last_revision + 1)
        {
            Start::Resume(
                state
                    .log
                    .iter()
                    .filter(|d| d.revision > last_revision)
                    .cloned()
                    .collect(),
            )
        } else {
            Start::Snapshot(state.snapshot())
        };
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, StreamEntry { info: info.clone() });
        drop(state);
        self.emit_sidecar(id, Some(info));
        self.metrics.set_streams(self.stream_count());
        (id, start, receiver)
    }

    /// A snapshot of the current state (for a stream that lagged behind the broadcast).
    pub fn snapshot(&self) -> Snapshot {
        self.lock_state().snapshot()
    }

    /// Number of connected streams.
    pub fn stream_count(&self) -> usize {
        self.streams.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// The connected sidecars.
    pub fn sidecars(&self) -> Vec<SidecarInfo> {
        let mut list: Vec<SidecarInfo> = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| s.info.clone())
            .collect();
        list.sort_by(|a, b| a.spiffe_id.cmp(&b.spiffe_id));
        list
    }

    /// Notes that a stream was heard from.
    pub fn heard(&self, id: u64) {
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            s.info.last_heard_unix_ms = unix_ms();
        }
    }

    /// A stream reported (`Some`) or cleared (`None`) a revision it could not apply.
    pub fn apply_error(&self, id: u64, error: Option<String>) {
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            s.info.apply_error = error.unwrap_or_default();
            let info = s.info.clone();
            self.emit_sidecar(id, Some(info));
        }
    }

    /// A stream acknowledged `revision`.
    pub fn ack(&self, id: u64, revision: u64) {
        if let Some(s) = self
            .streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_mut(&id)
        {
            let before = s.info.acknowledged_revision;
            s.info.acknowledged_revision = s.info.acknowledged_revision.max(revision);
            s.info.last_heard_unix_ms = unix_ms();
            if s.info.acknowledged_revision != before {
                let info = s.info.clone();
                self.emit_sidecar(id, Some(info));
            }
        }
        self.settle(id, Some(revision));
    }

    /// A stream ended.
    pub fn disconnect(&self, id: u64) {
        self.streams
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        self.metrics.set_streams(self.stream_count());
        self.emit_sidecar(id, None);
        // A sidecar that left no longer holds anything up; it gets a snapshot or the
        // deltas when it comes back.
        self.settle(id, None);
    }

    fn settle(&self, id: u64, acked: Option<u64>) {
        let mut finished = false;
        {
            let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
            for p in pending.iter_mut() {
                if acked.is_none_or(|r| r >= p.revision) && p.waiting.remove(&id) {
                    if acked.is_some() {
                        p.acknowledged += 1;
                    }
                    if p.waiting.is_empty() {
                        p.done_after = Some(p.started.elapsed());
                        finished = true;
                    }
                }
            }
            if finished {
                let done: Vec<Propagation> = pending
                    .iter()
                    .filter(|p| p.done_after.is_some())
                    .cloned()
                    .collect();
                pending.retain(|p| p.done_after.is_none());
                for p in &done {
                    self.finish(p);
                    self.emit_propagation(p);
                }
                let mut recent = self.recent();
                for p in done {
                    recent.insert(p.revision, p);
                }
                while recent.len() > 1024 {
                    recent.pop_first();
                }
            }
        }
        if finished {
            self.progress.send_modify(|_| {});
        }
    }

    fn recent(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Propagation>> {
        self.recent.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The propagation of `revision`: finished, pending, or unknown.
    pub fn propagation(&self, revision: u64) -> Option<Propagation> {
        if let Some(p) = self
            .pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|p| p.revision == revision)
        {
            return Some(p.clone());
        }
        self.recent().get(&revision).cloned()
    }

    /// Waits until every stream connected when `revision` was ingested acknowledged it
    /// (or left), at most `timeout`; returns the propagation as it stands.
    pub async fn wait(&self, revision: u64, timeout: Duration) -> Option<Propagation> {
        let mut progress = self.progress.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let current = self.propagation(revision);
            let ingested = *progress.borrow_and_update() >= revision;
            if current.as_ref().is_some_and(|p| p.done_after.is_some())
                || (ingested && current.is_none())
            {
                return current;
            }
            if tokio::time::timeout_at(deadline, progress.changed())
                .await
                .is_err()
            {
                return self.propagation(revision);
            }
        }
    }

    /// The last revocation's propagation, for status.
    pub fn last_revocation(&self) -> Option<Propagation> {
        self.last_revocation
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// The newest revocation's propagation, finished or still going (what this replica
    /// reports for status across replicas).
    pub fn newest_revocation(&self) -> Option<Propagation> {
        match self.newest_revocation.load(Ordering::Relaxed) {
            0 => None,
            revision => self
                .propagation(revision)
                .or_else(|| self.last_revocation()),
        }
    }
}
