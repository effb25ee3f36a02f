//! The sidecar's side of the control stream (DESIGN.md): connect to the gateway over
//! mTLS (the gateway's SPIFFE ID checked in the handshake), say hello with the last
//! revision applied, apply the snapshot or deltas, keep the last snapshot on disk,
//! enforce it (revoked set, policy data), acknowledge each revision; send heartbeats,
//! anomaly signals and execution records; reconnect with jittered exponential backoff
//! and resume from the last revision.

pub mod enforce;
pub mod records;
pub mod signals;
pub mod state;
#[cfg(test)]
mod state_props;

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::FutureExt;
use nexus_identity::tls::grpc_channel;
use nexus_identity::{AllowList, IdentityStore};
use nexus_proto::control::control_client::ControlClient;
use nexus_proto::control::{
    Ack, GatewayMessage, Heartbeat, Hello, RecordBatch, SidecarMessage, SignalBatch,
    gateway_message, sidecar_message,
};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

pub use enforce::{Enforcement, Hold, LinkState, Refused};
pub use signals::SignalQueue;
pub use state::{Restored, Synced};

use crate::config::GatewayConfig;
use crate::metrics::Metrics;
use crate::policy::PolicyRuntime;
use records::Tailer;

/// Everything the client needs.
pub struct Control {
    /// `[gateway]`.
    pub config: GatewayConfig,
    /// Where the snapshot is kept.
    pub snapshot_file: std::path::PathBuf,
    /// The sidecar's identity.
    pub store: Arc<IdentityStore>,
    /// What requests are checked against.
    pub enforcement: Arc<Enforcement>,
    /// The policy runtime to push data into, if any.
    pub policy: Option<Arc<PolicyRuntime>>,
    /// Metrics.
    pub metrics: Arc<Metrics>,
    /// Signals waiting for the gateway.
    pub signals: Arc<SignalQueue>,
    /// The anomaly watch, if on: it reports its workload's baseline and takes the
    /// fleet's.
    pub watch: Option<Arc<crate::proxy::watch::AnomalyWatch>>,
    /// The audit file set to ship, if any.
    pub records: Option<std::path::PathBuf>,
    /// The last revision applied in full (acknowledged).
    pub applied: std::sync::atomic::AtomicU64,
}

/// Now, in unix milliseconds.
pub(crate) fn unix_ms() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis(),
    )
    .unwrap_or(u64::MAX)
}

/// Full jitter: a random delay in [base/2, base].
fn jittered(base: Duration) -> Duration {
    let mut b = [0u8; 2];
    let _ = ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b);
    let frac = f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX);
    base.mul_f64(0.5 + frac / 2.0)
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("cannot connect: {0}")]
    Connect(String),
    #[error("the gateway refused the stream: {0}")]
    Refused(tonic::Status),
    #[error("stream error: {0}")]
    Stream(tonic::Status),
    #[error("the gateway closed the stream")]
    Closed,
    #[error("no message from the gateway within idle_timeout")]
    Idle,
    #[error("{0}")]
    Protocol(String),
}

impl Control {
    /// Loads the newest verified snapshot kept on disk into enforcement (and the policy,
    /// before its first load), so a sidecar restarted while the gateway is down enforces
    /// it. Without one it refuses every request until the gateway answers (fail closed).
    pub fn restore(&self) -> Synced {
        let (synced, rejected) = match Synced::restore(&self.snapshot_file) {
            Restored::Verified {
                synced,
                file,
                rejected,
            } => {
                self.enforcement.set_revoked(synced.revoked_set());
                self.applied
                    .store(synced.revision(), std::sync::atomic::Ordering::SeqCst);
                tracing::info!(revision = synced.revision(), revoked = self.enforcement.revoked_count(), file = %file.display(), "restored the last gateway snapshot");
                (synced, rejected)
            }
            Restored::Unverified { reason, rejected } => {
                let why = format!(
                    "no verified gateway state ({reason}); refusing every request until the gateway answers"
                );
                tracing::error!(file = %self.snapshot_file.display(), %reason, "no verified gateway snapshot: refusing every request until the gateway answers");
                self.enforcement.hold(Hold::NoValidSnapshot, why);
                self.metrics
                    .enforcement_hold(Hold::NoValidSnapshot.as_str(), true);
                (Synced::default(), rejected)
            }
        };
        for (file, why) in rejected {
            self.metrics.snapshot_rejected();
            tracing::error!(file = %file.display(), %why, "kept gateway snapshot refused");
        }
        if let Some(policy) = &self.policy {
            policy.use_external(synced.data().clone());
        }
        synced
    }

    /// Runs forever: connect, serve the stream, back off, reconnect.
    pub async fn run(self: Arc<Self>, mut synced: Synced) {
        let mut backoff = self.config.backoff_initial;
        let mut tailer = self.records.as_ref().map(|path| {
            Tailer::new(
                path.clone(),
                self.snapshot_file.with_extension("records-cursor"),
            )
        });
        // Wait for the first SVID: the stream is authenticated with it.
        let mut updates = self.store.subscribe();
        while !self.store.is_ready() {
            if updates.changed().await.is_err() {
                return;
            }
        }
        loop {
            let started = Instant::now();
            let result = self.session(&mut synced, tailer.as_mut()).await;
            self.enforcement.disconnected();
            self.metrics.gateway_link(self.enforcement.link().as_str());
            match &result {
                Err(SessionError::Refused(status)) => {
                    tracing::error!(gateway = %self.config.address, %status, "the gateway refused this sidecar")
                }
                Err(error) => {
                    tracing::warn!(gateway = %self.config.address, %error, "control stream down; enforcing the last snapshot")
                }
                Ok(()) => {}
            }
            if started.elapsed() > Duration::from_secs(10) {
                backoff = self.config.backoff_initial;
            }
            tokio::time::sleep(jittered(backoff)).await;
            backoff = (backoff * 2).min(self.config.backoff_max);
        }
    }

    async fn connect(&self) -> Result<tonic::transport::Channel, SessionError> {
        let expected = AllowList::parse(&[&self.config.identity])
            .map_err(|e| SessionError::Connect(e.to_string()))?;
        grpc_channel(
            self.store.clone(),
            expected,
            &self.config.address,
            self.config.connect_timeout,
        )
        .await
        .map_err(SessionError::Connect)
    }

    async fn session(
        &self,
        synced: &mut Synced,
        mut tailer: Option<&mut Tailer>,
    ) -> Result<(), SessionError> {
        let channel = tokio::time::timeout(self.config.connect_timeout, self.connect())
            .await
            .map_err(|_| SessionError::Connect("timed out".into()))??;
        let me = self
            .store
            .current()
            .map(|i| i.spiffe_id().to_string())
            .unwrap_or_default();
        let (tx, rx) = mpsc::channel::<SidecarMessage>(64);
        let send = |msg: sidecar_message::Msg| SidecarMessage { msg: Some(msg) };
        // The policy status goes in the hello, then in a heartbeat whenever it changes.
        let mut policy_status = self.policy.as_ref().map(|p| p.status());
        tx.send(send(sidecar_message::Msg::Hello(Hello {
            spiffe_id: me,
            last_revision: synced.revision(),
            version: env!("CARGO_PKG_VERSION").into(),
            policy: policy_status
                .as_mut()
                .map(|s| s.borrow_and_update().clone()),
            registry: synced.registry(),
        })))
        .await
        .map_err(|_| SessionError::Closed)?;
        let mut client =
            ControlClient::new(channel).max_decoding_message_size(self.config.max_message_bytes);
        let mut inbound = client
            .stream(ReceiverStream::new(rx))
            .await
            .map_err(SessionError::Refused)?
            .into_inner();
        self.enforcement.connected();
        self.metrics.gateway_link("connected");
        tracing::info!(gateway = %self.config.address, revision = synced.revision(), "control stream open");

        let mut heartbeat = tokio::time::interval(self.config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ship = tokio::time::interval(self.config.ship_interval);
        ship.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut fleet = tokio::time::interval(
            self.watch
                .as_ref()
                .map(|w| w.report_interval())
                .unwrap_or(Duration::from_secs(3600)),
        );
        fleet.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut next_batch: u64 = 1;
        // A revision that could not be applied in full is retried with backoff; until
        // then requests are refused (Hold::ApplyFailed) and it is not acknowledged.
        let mut retry: Option<(tokio::time::Instant, Duration)> = None;
        if self.applied.load(std::sync::atomic::Ordering::SeqCst) != synced.revision() {
            retry = Some((tokio::time::Instant::now(), RETRY_INITIAL));
        }
        // The record batch in flight: (batch number, cursor after it).
        let mut records_in_flight: Option<(u64, records::Cursor)> = None;
        // The last read filled a batch: more records wait, and the next batch goes as
        // soon as this one is acknowledged rather than at the next tick (otherwise a
        // sidecar writing more than record_batch records per ship_interval falls behind
        // for good, and its oldest records rotate out of the file unshipped).
        let mut records_behind = false;
        // The signal batch in flight: (batch number, signals) — re-queued on loss.
        let mut signals_in_flight: Option<(u64, Vec<nexus_proto::control::Signal>)> = None;
        let result = 'session: loop {
            let idle_at = tokio::time::Instant::from_std(last_heard + self.config.idle_timeout);
            tokio::select! {
                msg = inbound.message() => {
                    let msg = match msg {
                        Ok(Some(msg)) => msg,
                        Ok(None) => break Err(SessionError::Closed),
                        Err(status) => break Err(SessionError::Stream(status)),
                    };
                    last_heard = Instant::now();
                    // Apply everything already received, then enforce and ack once.
                    let mut batch = vec![msg];
                    while batch.len() < 1024 {
                        match inbound.message().now_or_never() {
                            Some(Ok(Some(m))) => batch.push(m),
                            _ => break,
                        }
                    }
                    let mut changed = false;
                    for msg in batch {
                        if let Err(e) = self.handle(msg, synced, &mut changed, &mut records_in_flight, &mut signals_in_flight, tailer.as_deref_mut()) {
                            break 'session Err(e);
                        }
                    }
                    if changed {
                        let ack = self.commit(synced, &mut retry).await;
                        if tx.send(send(sidecar_message::Msg::Ack(ack))).await.is_err() {
                            break Err(SessionError::Closed);
                        }
                    }
                }
                _ = sleep_until_retry(retry) => {
                    let ack = self.commit(synced, &mut retry).await;
                    if tx.send(send(sidecar_message::Msg::Ack(ack))).await.is_err() {
                        break Err(SessionError::Closed);
                    }
                }
                _ = heartbeat.tick() => {
                    if tx.send(send(sidecar_message::Msg::Heartbeat(Heartbeat { sent_unix_ms: unix_ms(), policy: None }))).await.is_err() {
                        break Err(SessionError::Closed);
                    }
                }
                policy = policy_changed(policy_status.as_mut()) => {
                    let heartbeat = Heartbeat { sent_unix_ms: unix_ms(), policy: Some(policy) };
                    if tx.send(send(sidecar_message::Msg::Heartbeat(heartbeat))).await.is_err() {
                        break Err(SessionError::Closed);
                    }
                }
                _ = self.signals.ready(), if signals_in_flight.is_none() => {
                    let (signals, dropped) = self.signals.take(256);
                    if !signals.is_empty() || dropped > 0 {
                        let batch = next_batch;
                        next_batch += 1;
                        signals_in_flight = Some((batch, signals.clone()));
                        if tx.send(send(sidecar_message::Msg::Signals(SignalBatch { batch, signals, dropped }))).await.is_err() {
                            break Err(SessionError::Closed);
                        }
                    }
                }
                _ = next_ship(&mut ship, records_behind), if records_in_flight.is_none() && tailer.is_some() => {
                    let Some(t) = tailer.as_deref() else { continue };
                    records_behind = false;
                    match t.read(self.config.record_batch) {
                        Ok(read) if !read.lines.is_empty() => {
                            records_behind = read.lines.len() >= self.config.record_batch;
                            let batch = next_batch;
                            next_batch += 1;
                            records_in_flight = Some((batch, read.next));
                            if tx.send(send(sidecar_message::Msg::Records(RecordBatch { batch, lines: read.lines }))).await.is_err() {
                                break Err(SessionError::Closed);
                            }
                        }
                        Ok(_) => {}
                        Err(error) => tracing::warn!(%error, "cannot read execution records to ship"),
                    }
                }
                _ = fleet.tick(), if self.watch.is_some() => {
                    if let Some(report) = self.watch.as_ref().and_then(|w| w.fleet_report())
                        && tx.send(send(sidecar_message::Msg::Baselines(report))).await.is_err()
                    {
                        break Err(SessionError::Closed);
                    }
                }
                _ = tokio::time::sleep_until(idle_at) => break Err(SessionError::Idle),
            }
        };
        // Signals sent but not acknowledged go back to the queue.
        if let Some((_, signals)) = signals_in_flight {
            self.signals.requeue(signals);
        }
        result
    }

    fn handle(
        &self,
        msg: GatewayMessage,
        synced: &mut Synced,
        changed: &mut bool,
        records_in_flight: &mut Option<(u64, records::Cursor)>,
        signals_in_flight: &mut Option<(u64, Vec<nexus_proto::control::Signal>)>,
        tailer: Option<&mut Tailer>,
    ) -> Result<(), SessionError> {
        match msg.msg {
            Some(gateway_message::Msg::Snapshot(snapshot)) => {
                synced.replace(snapshot);
                *changed = true;
            }
            Some(gateway_message::Msg::Delta(delta)) => {
                let applied = synced.apply(&delta).map_err(SessionError::Protocol)?;
                *changed |= applied;
            }
            Some(gateway_message::Msg::Heartbeat(_)) => {}
            Some(gateway_message::Msg::Baselines(fleet)) => {
                if let Some(watch) = &self.watch {
                    watch.set_fleet(fleet);
                }
            }
            Some(gateway_message::Msg::BatchAck(ack)) => match ack.kind.as_str() {
                "records" => {
                    if let Some((batch, cursor)) = *records_in_flight
                        && batch == ack.batch
                    {
                        *records_in_flight = None;
                        if ack.refused > 0 {
                            tracing::warn!(refused = ack.refused, refusal = %ack.refusal, "the gateway refused execution records");
                        }
                        if let Some(t) = tailer
                            && let Err(error) = t.acknowledge(cursor)
                        {
                            tracing::warn!(%error, "cannot store the records cursor");
                        }
                        self.metrics.records_shipped(ack.stored);
                    }
                }
                "signals"
                    if signals_in_flight
                        .as_ref()
                        .is_some_and(|(batch, _)| *batch == ack.batch) =>
                {
                    *signals_in_flight = None;
                }
                _ => {}
            },
            None => {}
        }
        Ok(())
    }

    /// Enforces, persists and applies the synced state: the revoked set first (it is
    /// what refuses requests), then the snapshot file, then the policy data. Returns the
    /// acknowledgement to send: the revision when every part applied; otherwise the last
    /// revision fully applied, with the failure, and `retry` set.
    async fn commit(
        &self,
        synced: &Synced,
        retry: &mut Option<(tokio::time::Instant, Duration)>,
    ) -> Ack {
        let started = Instant::now();
        self.enforcement.set_revoked(synced.revoked_set());
        // The gateway answered: whatever was kept on disk no longer matters.
        if self.enforcement.release(Hold::NoValidSnapshot) {
            self.metrics
                .enforcement_hold(Hold::NoValidSnapshot.as_str(), false);
            tracing::info!(
                revision = synced.revision(),
                "gateway state received: requests are served again"
            );
        }
        // File I/O and the policy data rebuild run off the async workers.
        let state = synced.clone();
        let file = self.snapshot_file.clone();
        let policy = self.policy.clone();
        let revision = synced.revision();
        let outcome = tokio::task::spawn_blocking(move || -> Result<(), String> {
            if let Err(error) = state.persist(&file) {
                // A restart must not take an older generation for this one.
                for (left, e) in Synced::invalidate(&file) {
                    tracing::error!(file = %left.display(), error = %e, "cannot remove an outdated gateway snapshot");
                }
                return Err(format!("{error}; the kept generations were removed, so a restart refuses requests until the gateway answers"));
            }
            if let Some(policy) = policy {
                policy
                    .set_external(state.data().clone())
                    .map_err(|e| format!("the policy data could not be applied: {e}"))?;
            }
            Ok(())
        })
        .await
        .unwrap_or_else(|e| Err(format!("the apply task failed: {e}")));
        match outcome {
            Ok(()) => {
                self.applied
                    .store(revision, std::sync::atomic::Ordering::SeqCst);
                *retry = None;
                if self.enforcement.release(Hold::ApplyFailed) {
                    self.metrics
                        .enforcement_hold(Hold::ApplyFailed.as_str(), false);
                    tracing::info!(
                        revision,
                        "gateway revision applied after a failure: requests are served again"
                    );
                }
                self.metrics.gateway_revision(revision);
                tracing::debug!(revision, took = ?started.elapsed(), "gateway revision applied");
                Ack {
                    revision,
                    ..Ack::default()
                }
            }
            Err(error) => {
                self.metrics.apply_failure();
                // Policy data that did not apply may lack a closed execution: nothing is
                // served until it does.
                self.enforcement.hold(
                    Hold::ApplyFailed,
                    format!("gateway revision {revision} could not be applied ({error}); refusing every request until it is"),
                );
                self.metrics
                    .enforcement_hold(Hold::ApplyFailed.as_str(), true);
                let next = retry.map_or(RETRY_INITIAL, |(_, d)| (d * 2).min(RETRY_MAX));
                *retry = Some((tokio::time::Instant::now() + next, next));
                tracing::error!(revision, %error, retry_in = ?next, "cannot apply the gateway revision; not acknowledged, refusing requests, retrying");
                Ack {
                    revision: self.applied.load(std::sync::atomic::Ordering::SeqCst),
                    failed_revision: revision,
                    error,
                }
            }
        }
    }
}

/// First and longest delay between retries of a revision that could not be applied.
const RETRY_INITIAL: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(10);

/// The policy status after its next change (never, without a policy).
async fn policy_changed(
    status: Option<&mut tokio::sync::watch::Receiver<nexus_proto::control::PolicyStatus>>,
) -> nexus_proto::control::PolicyStatus {
    if let Some(status) = status
        && status.changed().await.is_ok()
    {
        return status.borrow_and_update().clone();
    }
    std::future::pending().await
}

/// The next time to ship records: at once when the last batch was full (more wait),
/// otherwise at the next tick of `ship`.
async fn next_ship(ship: &mut tokio::time::Interval, behind: bool) {
    if !behind {
        ship.tick().await;
    }
}

async fn sleep_until_retry(retry: Option<(tokio::time::Instant, Duration)>) {
    match retry {
        Some((at, _)) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}
