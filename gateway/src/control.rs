//! The control stream (DESIGN.md): a sidecar is known by its certificate's SPIFFE ID;
//! its hello must claim that same ID. It gets a snapshot or the deltas since its last
//! revision, then every delta as it happens; it acknowledges each. Heartbeats both
//! ways; a silent stream is cut. Signals and execution records are stored, and
//! acknowledged only once stored.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use futures::Stream;
use nexus_identity::AllowList;
use nexus_proto::control::control_server::Control;
use nexus_proto::control::{
    BatchAck, Delta, Execution, GatewayMessage, Heartbeat, PolicyStatus, RegistryEvent,
    Reinstatement, Revocation, SidecarInfo, SidecarMessage, Snapshot, delta::Change as DeltaChange,
    gateway_message, sidecar_message,
};
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::baselines::Fleet;
use crate::changes::{Changes, unix_ms};
use crate::hub::Start;
use crate::server::PeerInfo;
use crate::signals::Signals;

/// The Control service.
pub struct ControlService {
    changes: Arc<Changes>,
    signals: Arc<Signals>,
    fleet: Arc<Fleet>,
    sidecars: AllowList,
    data_sidecars: AllowList,
    drain: Option<nexus_serve::Watch>,
}

impl ControlService {
    /// Only the identities listed in `sidecars` get a stream (empty: nobody).
    pub fn new(changes: Arc<Changes>, signals: Arc<Signals>) -> Result<Self, String> {
        let sidecars = AllowList::parse(&changes.config.sidecars).map_err(|e| e.to_string())?;
        let data_sidecars =
            AllowList::parse(&changes.config.data_sidecars).map_err(|e| e.to_string())?;
        Ok(Self {
            fleet: Arc::new(Fleet::new(changes.clone())),
            changes,
            signals,
            sidecars,
            data_sidecars,
            drain: None,
        })
    }

    /// Ends every control stream with UNAVAILABLE when the drain starts, so sidecars
    /// reconnect to another replica instead of holding this one open.
    pub fn with_drain(mut self, drain: nexus_serve::Watch) -> Self {
        self.drain = Some(drain);
        self
    }
}

type Out = Result<GatewayMessage, Status>;

/// Boxed in the per-stream queue: a queue slot is then a pointer, not a whole message
/// (tokio allocates slots 32 at a time; this keeps an idle stream's queue small).
type Queued = Box<Out>;

fn message(msg: gateway_message::Msg) -> Queued {
    Box::new(Ok(GatewayMessage { msg: Some(msg) }))
}

#[tonic::async_trait]
impl Control for ControlService {
    type StreamStream = Pin<Box<dyn Stream<Item = Out> + Send + 'static>>;

    async fn stream(
        &self,
        request: Request<Streaming<SidecarMessage>>,
    ) -> Result<Response<Self::StreamStream>, Status> {
        let metrics = &self.changes.metrics;
        let peer = request
            .extensions()
            .get::<PeerInfo>()
            .cloned()
            .ok_or_else(|| Status::unauthenticated("no client certificate"))?;
        if !self.sidecars.allows(&peer.spiffe_id) {
            metrics.stream_error("not_a_sidecar");
            tracing::warn!(peer = %peer.spiffe_id, addr = %peer.addr, "control stream refused: not in `sidecars`");
            return Err(Status::permission_denied(format!(
                "{} may not open a control stream",
                peer.spiffe_id
            )));
        }
        let mut inbound = request.into_inner();
        let config = &self.changes.config.stream;
        let hello = match tokio::time::timeout(config.hello_timeout, inbound.message()).await {
            Ok(Ok(Some(SidecarMessage {
                msg: Some(sidecar_message::Msg::Hello(hello)),
            }))) => hello,
            Ok(Err(status)) => {
                metrics.stream_error("malformed");
                tracing::warn!(peer = %peer.spiffe_id, addr = %peer.addr, %status, "control stream cut before hello");
                return Err(status);
            }
            Err(_) => {
                metrics.stream_error("hello_timeout");
                return Err(Status::deadline_exceeded(
                    "no hello within stream.hello_timeout",
                ));
            }
            Ok(_) => {
                metrics.stream_error("no_hello");
                return Err(Status::invalid_argument(
                    "the first message must be a hello",
                ));
            }
        };
        if hello.spiffe_id != peer.spiffe_id {
            metrics.stream_error("identity_mismatch");
            tracing::warn!(
                certificate = %peer.spiffe_id,
                claimed = %hello.spiffe_id,
                addr = %peer.addr,
                "control stream refused: the hello claims another identity"
            );
            return Err(Status::permission_denied(format!(
                "hello claims {} but the client certificate is {}",
                hello.spiffe_id, peer.spiffe_id
            )));
        }
        let now = unix_ms();
        let info = SidecarInfo {
            spiffe_id: peer.spiffe_id.clone(),
            remote_addr: peer.addr.to_string(),
            connected_unix_ms: now,
            acknowledged_revision: hello.last_revision,
            last_heard_unix_ms: now,
            version: hello.version.clone(),
            // Filled in by status (replicas::local): no copy of the name per stream.
            gateway: String::new(),
            apply_error: String::new(),
            policy: hello.policy.as_ref().map(policy_status),
        };
        let (id, start, deltas) =
            self.changes
                .hub
                .connect(info, hello.last_revision, hello.registry);
        let scope = Scope::new(&peer.spiffe_id, self.data_sidecars.allows(&peer.spiffe_id));
        tracing::info!(sidecar = %peer.spiffe_id, addr = %peer.addr, last_revision = hello.last_revision, full_state = scope.full, "control stream open");
        let (tx, rx) = mpsc::channel::<Queued>(16);
        let session = Session {
            id,
            peer,
            changes: self.changes.clone(),
            signals: self.signals.clone(),
            fleet: self.fleet.clone(),
            tx,
            sent: hello.last_revision,
            scope,
            drain: self.drain.clone(),
        };
        tokio::spawn(session.run(start, deltas, inbound));
        Ok(Response::new(Box::pin(futures::StreamExt::map(
            ReceiverStream::new(rx),
            |queued| *queued,
        ))))
    }
}

/// What one stream is sent (docs/threat-model.md, "What a sidecar is told"). A sidecar
/// in `data_sidecars` enforces any plugin's executions and bindings, so it gets the
/// whole state. Any other sidecar gets the executions and registry bindings of its own
/// workload only (its outbound policy checks them) and every revoked subject without
/// reason or author (it must refuse a revoked peer, but needs not learn who reported
/// whom). Revisions stay dense: a change a stream may not see is sent as an empty delta
/// of the same revision.
struct Scope {
    full: bool,
    me: String,
}

const REDACTED_REASON: &str = "revoked (details at the gateway)";

impl Scope {
    fn new(me: &str, full: bool) -> Self {
        Self {
            full,
            me: me.to_string(),
        }
    }

    fn redact(&self, r: &Revocation) -> Revocation {
        Revocation {
            subject: r.subject.clone(),
            reason: REDACTED_REASON.into(),
            by: String::new(),
            at_unix_ms: r.at_unix_ms,
            expires_unix_ms: r.expires_unix_ms,
        }
    }

    fn snapshot(&self, mut snapshot: Snapshot) -> Snapshot {
        if !self.full {
            snapshot.executions.retain(|e| e.plugin == self.me);
            for e in &mut snapshot.executions {
                e.opened_by.clear();
            }
            snapshot.revoked = snapshot.revoked.iter().map(|r| self.redact(r)).collect();
            snapshot.certified.retain(|v| v.spiffe_id == self.me);
        }
        snapshot
    }

    fn delta(&self, delta: &Delta) -> Delta {
        if self.full {
            return delta.clone();
        }
        let change = match &delta.change {
            Some(DeltaChange::Open(e)) if e.plugin != self.me => None,
            Some(DeltaChange::Open(e)) => Some(DeltaChange::Open(Execution {
                opened_by: String::new(),
                ..e.clone()
            })),
            // A close from an older gateway has no plugin: sending it is harmless.
            Some(DeltaChange::Close(c)) if !c.plugin.is_empty() && c.plugin != self.me => None,
            Some(DeltaChange::Revoke(r)) => Some(DeltaChange::Revoke(self.redact(r))),
            Some(DeltaChange::Reinstate(r)) => Some(DeltaChange::Reinstate(Reinstatement {
                subject: r.subject.clone(),
                by: String::new(),
                at_unix_ms: r.at_unix_ms,
            })),
            // What enforcement needs of a registry change (identity, clauses, budgets,
            // state), not who registered or certified it, nor the signatures; and only
            // about its own workload.
            Some(DeltaChange::Registry(r)) => {
                let versions: Vec<_> = r
                    .versions
                    .iter()
                    .filter(|v| v.spiffe_id == self.me)
                    .map(crate::registry::for_sidecars)
                    .collect();
                (!versions.is_empty()).then(|| {
                    DeltaChange::Registry(RegistryEvent {
                        action: r.action.clone(),
                        plugins: Vec::new(),
                        versions,
                    })
                })
            }
            other => other.clone(),
        };
        Delta {
            revision: delta.revision,
            change,
        }
    }
}

/// Longest policy revision and reload error kept from a sidecar's report.
const MAX_POLICY_REVISION: usize = 128;
const MAX_POLICY_ERROR: usize = 1024;

/// A sidecar's policy status as the gateway keeps it: bounded, and with control
/// characters replaced (it is shown in terminals and pages; a sidecar's claim).
fn policy_status(p: &PolicyStatus) -> PolicyStatus {
    fn clean(s: &str, max: usize) -> String {
        let mut out: String = s
            .chars()
            .map(|c| if c.is_control() { ' ' } else { c })
            .collect();
        if out.len() > max {
            let mut end = max;
            while !out.is_char_boundary(end) {
                end -= 1;
            }
            out.truncate(end);
            out.push('…');
        }
        out
    }
    PolicyStatus {
        revision: clean(&p.revision, MAX_POLICY_REVISION),
        reload_error: clean(&p.reload_error, MAX_POLICY_ERROR),
        loaded_unix_ms: p.loaded_unix_ms,
        failed_unix_ms: p.failed_unix_ms,
    }
}

struct Session {
    id: u64,
    peer: PeerInfo,
    changes: Arc<Changes>,
    signals: Arc<Signals>,
    fleet: Arc<Fleet>,
    tx: mpsc::Sender<Queued>,
    /// The highest revision sent.
    sent: u64,
    scope: Scope,
    /// Held while the stream runs: the gateway's drain waits for it to end.
    drain: Option<nexus_serve::Watch>,
}

enum End {
    Closed,
    Draining,
    Idle,
    Error(&'static str, String),
}

impl Session {
    async fn send(&mut self, out: Queued) -> Result<(), End> {
        self.tx.send(out).await.map_err(|_| End::Closed)
    }

    /// Sends the fleet's baselines; a store error leaves the sidecar on what it had.
    async fn send_baselines(&mut self) -> Result<(), End> {
        match self.fleet.all().await {
            Ok(all) => {
                self.send(message(gateway_message::Msg::Baselines(all)))
                    .await
            }
            Err(error) => {
                tracing::warn!(%error, "cannot read fleet baselines");
                Ok(())
            }
        }
    }

    async fn run(
        mut self,
        start: Start,
        mut deltas: broadcast::Receiver<Arc<nexus_proto::control::Delta>>,
        mut inbound: Streaming<SidecarMessage>,
    ) {
        let result = self.drive(start, &mut deltas, &mut inbound).await;
        self.changes.hub.disconnect(self.id);
        let metrics = &self.changes.metrics;
        match result {
            Err(End::Closed) | Ok(()) => {
                tracing::info!(sidecar = %self.peer.spiffe_id, "control stream closed")
            }
            Err(End::Draining) => {
                tracing::info!(sidecar = %self.peer.spiffe_id, "control stream ended: the gateway is draining");
                let _ = self
                    .tx
                    .send(Box::new(Err(Status::unavailable(
                        "the gateway is shutting down: reconnect (to another replica)",
                    ))))
                    .await;
            }
            Err(End::Idle) => {
                metrics.stream_error("idle");
                tracing::warn!(sidecar = %self.peer.spiffe_id, "control stream cut: silent past stream.idle_timeout");
                let _ = self
                    .tx
                    .send(Box::new(Err(Status::deadline_exceeded(
                        "no message within stream.idle_timeout",
                    ))))
                    .await;
            }
            Err(End::Error(reason, detail)) => {
                metrics.stream_error(reason);
                tracing::warn!(sidecar = %self.peer.spiffe_id, addr = %self.peer.addr, reason, %detail, "control stream cut");
                let _ = self
                    .tx
                    .send(Box::new(Err(Status::invalid_argument(detail))))
                    .await;
            }
        }
    }

    async fn drive(
        &mut self,
        start: Start,
        deltas: &mut broadcast::Receiver<Arc<nexus_proto::control::Delta>>,
        inbound: &mut Streaming<SidecarMessage>,
    ) -> Result<(), End> {
        match start {
            Start::Snapshot(snapshot) => {
                self.sent = snapshot.revision;
                let snapshot = self.scope.snapshot(snapshot);
                self.send(message(gateway_message::Msg::Snapshot(snapshot)))
                    .await?;
            }
            Start::Resume(list) => {
                for delta in list {
                    self.sent = delta.revision;
                    let delta = self.scope.delta(&delta);
                    self.send(message(gateway_message::Msg::Delta(delta)))
                        .await?;
                }
            }
        }
        // The fleet's baselines, so a new pod starts from its workload's, not from zero.
        self.send_baselines().await?;
        let config = self.changes.config.stream.clone();
        let mut heartbeat = tokio::time::interval(config.heartbeat_interval);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_heard = Instant::now();
        let mut drain = self.drain.clone();
        let draining = async move {
            match drain.as_mut() {
                Some(drain) => drain.signaled().await,
                None => std::future::pending().await,
            }
        };
        tokio::pin!(draining);
        loop {
            let idle_at = tokio::time::Instant::from_std(last_heard + config.idle_timeout);
            tokio::select! {
                delta = deltas.recv() => match delta {
                    Ok(delta) => {
                        if delta.revision > self.sent {
                            self.sent = delta.revision;
                            let delta = self.scope.delta(&delta);
                            self.send(message(gateway_message::Msg::Delta(delta))).await?;
                        }
                    }
                    Err(broadcast::error::RecvError::Lagged(missed)) => {
                        // Fell behind the broadcast: the whole state replaces the gap.
                        tracing::info!(sidecar = %self.peer.spiffe_id, missed, "stream lagged; sending a snapshot");
                        let snapshot = self.changes.hub.snapshot();
                        self.sent = snapshot.revision;
                        let snapshot = self.scope.snapshot(snapshot);
                        self.send(message(gateway_message::Msg::Snapshot(snapshot))).await?;
                    }
                    Err(broadcast::error::RecvError::Closed) => return Ok(()),
                },
                msg = inbound.message() => match msg {
                    Ok(Some(msg)) => {
                        last_heard = Instant::now();
                        self.handle(msg).await?;
                    }
                    Ok(None) => return Ok(()),
                    Err(status) => {
                        let reason = if status.message().contains("message length too large") {
                            "oversized"
                        } else {
                            "malformed"
                        };
                        return Err(End::Error(reason, status.message().to_string()));
                    }
                },
                _ = heartbeat.tick() => {
                    self.send(message(gateway_message::Msg::Heartbeat(Heartbeat { sent_unix_ms: unix_ms(), policy: None }))).await?;
                }
                _ = tokio::time::sleep_until(idle_at) => return Err(End::Idle),
                () = &mut draining => return Err(End::Draining),
            }
        }
    }

    async fn handle(&mut self, msg: SidecarMessage) -> Result<(), End> {
        let hub = &self.changes.hub;
        match msg.msg {
            Some(sidecar_message::Msg::Ack(ack)) => {
                if ack.revision > self.sent {
                    return Err(End::Error(
                        "bad_ack",
                        format!(
                            "acknowledged revision {} but only {} was sent",
                            ack.revision, self.sent
                        ),
                    ));
                }
                hub.ack(self.id, ack.revision);
                if ack.failed_revision > 0 {
                    self.changes.metrics.apply_failure();
                    tracing::error!(
                        sidecar = %self.peer.spiffe_id,
                        failed_revision = ack.failed_revision,
                        applied = ack.revision,
                        error = %ack.error,
                        "the sidecar could not apply a revision; it refuses requests and retries"
                    );
                }
                hub.apply_error(
                    self.id,
                    (ack.failed_revision > 0).then(|| {
                        let mut error = ack.error.clone();
                        error.truncate(512);
                        format!("revision {}: {error}", ack.failed_revision)
                    }),
                );
            }
            Some(sidecar_message::Msg::Heartbeat(beat)) => {
                hub.heard(self.id);
                if let Some(policy) = &beat.policy {
                    hub.policy(self.id, policy_status(policy));
                }
            }
            Some(sidecar_message::Msg::Hello(_)) => {
                return Err(End::Error("second_hello", "a stream has one hello".into()));
            }
            Some(sidecar_message::Msg::Records(batch)) => {
                hub.heard(self.id);
                let max = self.changes.config.stream.max_batch;
                let ack = if batch.lines.len() > max {
                    BatchAck {
                        kind: "records".into(),
                        batch: batch.batch,
                        stored: 0,
                        refused: batch.lines.len() as u64,
                        refusal: format!(
                            "{} lines in one batch; the limit is {max} (stream.max_batch)",
                            batch.lines.len()
                        ),
                    }
                } else {
                    match self
                        .changes
                        .store
                        .insert_records(&self.peer.spiffe_id, &batch.lines)
                        .await
                    {
                        Ok(done) => {
                            self.changes.metrics.records(done.stored, done.refused);
                            hub.requests(&self.peer.spiffe_id, &done.new_by_minute);
                            self.signals.records_arrived();
                            if done.refused > 0 {
                                tracing::warn!(sidecar = %self.peer.spiffe_id, refused = done.refused, refusal = %done.refusal, "execution records refused");
                            }
                            BatchAck {
                                kind: "records".into(),
                                batch: batch.batch,
                                stored: done.stored,
                                refused: done.refused,
                                refusal: done.refusal,
                            }
                        }
                        Err(error) => {
                            // Not stored, so not acknowledged: the sidecar sends it again.
                            tracing::error!(%error, "cannot store execution records");
                            return Ok(());
                        }
                    }
                };
                self.send(message(gateway_message::Msg::BatchAck(ack)))
                    .await?;
            }
            Some(sidecar_message::Msg::Signals(batch)) => {
                hub.heard(self.id);
                let max = self.changes.config.stream.max_batch;
                if batch.signals.len() > max {
                    return Err(End::Error(
                        "oversized",
                        format!(
                            "{} signals in one batch; the limit is {max}",
                            batch.signals.len()
                        ),
                    ));
                }
                if batch.dropped > 0 {
                    self.changes.metrics.signals_dropped(batch.dropped);
                }
                let stored = match self
                    .signals
                    .receive(&self.peer.spiffe_id, batch.signals)
                    .await
                {
                    Ok(n) => n,
                    Err(error) => {
                        tracing::error!(%error, "cannot store signals");
                        return Ok(());
                    }
                };
                self.send(message(gateway_message::Msg::BatchAck(BatchAck {
                    kind: "signals".into(),
                    batch: batch.batch,
                    stored,
                    refused: 0,
                    refusal: String::new(),
                })))
                .await?;
            }
            Some(sidecar_message::Msg::Baselines(report)) => {
                hub.heard(self.id);
                let max = self.changes.config.stream.max_batch;
                if report.baselines.len() > max {
                    return Err(End::Error(
                        "oversized",
                        format!(
                            "{} baselines in one report; the limit is {max}",
                            report.baselines.len()
                        ),
                    ));
                }
                if let Err(error) = self
                    .fleet
                    .report(&self.peer.spiffe_id, &report.baselines)
                    .await
                {
                    tracing::error!(%error, "cannot store fleet baselines");
                    return Ok(());
                }
                self.send_baselines().await?;
            }
            None => {
                return Err(End::Error("malformed", "an empty message".into()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A sidecar's policy report is bounded and loses its control characters (it is
    /// shown in terminals by `nexusctl status` and in the console).
    #[test]
    fn a_policy_report_is_bounded_and_printable() {
        let kept = policy_status(&PolicyStatus {
            revision: format!("sha256:\u{1b}[2J{}", "é".repeat(500)),
            reload_error: "x\ny".repeat(10_000),
            loaded_unix_ms: 1,
            failed_unix_ms: 2,
        });
        assert!(kept.revision.len() <= MAX_POLICY_REVISION + '…'.len_utf8());
        assert!(!kept.revision.contains('\u{1b}'));
        assert!(kept.reload_error.len() <= MAX_POLICY_ERROR + '…'.len_utf8());
        assert!(kept.reload_error.starts_with("x y"));
        assert_eq!((kept.loaded_unix_ms, kept.failed_unix_ms), (1, 2));
    }
}
