//! The console's copy of the gateway's state, kept from the Admin `Watch` feed: the
//! first `state` replaces everything, each later event is applied idempotently (an
//! event may repeat what the state already held). A version counter, published on a
//! watch channel, tells the open pages to re-render.

use std::collections::{BTreeMap, HashMap, VecDeque};

use nexus_proto::control::{
    Execution, Propagation, Revocation, SidecarInfo, StoredSignal, WatchEvent,
    delta::Change as DeltaChange, watch_event,
};

/// How many signals the console keeps (the newest).
pub const MAX_SIGNALS: usize = 10_000;
/// How many closed executions (seen live) it keeps.
const MAX_CLOSED: usize = 500;
/// How many propagations it keeps.
const MAX_PROPAGATIONS: usize = 1024;
/// For how many revocations it keeps each sidecar's acknowledgement time.
const MAX_ACK_TRACES: usize = 64;

/// An execution the console saw close.
#[derive(Clone, Debug)]
pub struct Closed {
    /// The execution.
    pub execution: Execution,
    /// "closed by ..." or "expired".
    pub reason: String,
    /// When the console saw it close (unix ms).
    pub at_unix_ms: u64,
}

/// The link to the gateway.
#[derive(Clone, Debug, Default)]
pub enum Link {
    /// Not yet connected.
    #[default]
    Connecting,
    /// The feed is live.
    Live,
    /// The gateway is unreachable or refused; retrying.
    Down(String),
}

/// The console's view.
#[derive(Debug, Default)]
pub struct Model {
    /// The link.
    pub link: Link,
    /// Whether a state was ever received (the data below is stale when the link is down).
    pub loaded: bool,
    /// The gateway's name.
    pub gateway: String,
    /// Its store kind.
    pub store: String,
    /// Who the console talks as.
    pub caller: String,
    /// Whether that identity may act (is on `operators`).
    pub operator: bool,
    /// The latest revision.
    pub revision: u64,
    /// Connected sidecars by stream id.
    pub sidecars: BTreeMap<u64, SidecarInfo>,
    /// Current revocations by subject.
    pub revoked: BTreeMap<String, Revocation>,
    /// Open executions by id.
    pub executions: BTreeMap<String, Execution>,
    /// When the console first saw each open execution (unix ms; 0: open before it
    /// started watching).
    pub opened_at: HashMap<String, u64>,
    /// Executions seen closing, newest last.
    pub closed: VecDeque<Closed>,
    /// Propagations by revision.
    pub propagations: BTreeMap<u64, Propagation>,
    /// For revocations seen live: each sidecar's acknowledgement, (SPIFFE ID, ms after
    /// the revocation started).
    pub acks: BTreeMap<u64, Vec<(String, u64)>>,
    /// Signals, newest first.
    pub signals: VecDeque<StoredSignal>,
}

impl Model {
    /// Applies one feed event; `now` is the console's clock (unix ms).
    pub fn apply(&mut self, event: WatchEvent, now: u64) {
        let Some(event) = event.event else { return };
        match event {
            watch_event::Event::State(s) => {
                self.loaded = true;
                self.gateway = s.gateway;
                self.store = s.store;
                self.caller = s.caller;
                self.operator = s.operator;
                self.revision = s.revision;
                self.sidecars = s
                    .sidecars
                    .into_iter()
                    .filter_map(|e| Some((e.stream, e.info?)))
                    .collect();
                self.revoked = s
                    .revoked
                    .into_iter()
                    .map(|r| (r.subject.clone(), r))
                    .collect();
                let previous = std::mem::take(&mut self.opened_at);
                self.executions = s
                    .executions
                    .into_iter()
                    .map(|e| (e.id.clone(), e))
                    .collect();
                for id in self.executions.keys() {
                    self.opened_at
                        .insert(id.clone(), previous.get(id).copied().unwrap_or(0));
                }
                self.propagations = s
                    .propagations
                    .into_iter()
                    .map(|p| (p.revision, p))
                    .collect();
                self.signals = s.signals.into_iter().take(MAX_SIGNALS).collect();
            }
            watch_event::Event::Delta(delta) => {
                if delta.revision <= self.revision {
                    return;
                }
                self.revision = delta.revision;
                match delta.change {
                    Some(DeltaChange::Revoke(r)) => {
                        self.revoked.insert(r.subject.clone(), r);
                        self.acks.insert(delta.revision, Vec::new());
                        while self.acks.len() > MAX_ACK_TRACES {
                            self.acks.pop_first();
                        }
                    }
                    Some(DeltaChange::Reinstate(r)) => {
                        self.revoked.remove(&r.subject);
                    }
                    Some(DeltaChange::Open(e)) => {
                        self.opened_at.insert(e.id.clone(), now);
                        self.executions.insert(e.id.clone(), e);
                    }
                    Some(DeltaChange::Close(c)) => {
                        self.opened_at.remove(&c.id);
                        let execution = self.executions.remove(&c.id).unwrap_or(Execution {
                            id: c.id.clone(),
                            plugin: c.plugin.clone(),
                            ..Default::default()
                        });
                        self.closed.push_back(Closed {
                            execution,
                            reason: c.reason,
                            at_unix_ms: now,
                        });
                        while self.closed.len() > MAX_CLOSED {
                            self.closed.pop_front();
                        }
                    }
                    // Registry pages are not built yet (docs/console.md): the revision
                    // still counts, the change is not shown.
                    Some(DeltaChange::Registry(_)) | None => {}
                }
            }
            watch_event::Event::Sidecar(e) => match e.info {
                Some(info) if !e.gone => {
                    let before = self
                        .sidecars
                        .get(&e.stream)
                        .map(|s| s.acknowledged_revision)
                        .unwrap_or(0);
                    // Each sidecar's time to acknowledge the revocations seen live.
                    for (revision, list) in self.acks.range_mut(before + 1..) {
                        if *revision > info.acknowledged_revision {
                            break;
                        }
                        if let Some(p) = self.propagations.get(revision) {
                            let at = if info.last_heard_unix_ms > 0 {
                                info.last_heard_unix_ms
                            } else {
                                now
                            };
                            list.push((
                                info.spiffe_id.clone(),
                                at.saturating_sub(p.started_unix_ms),
                            ));
                        }
                    }
                    self.sidecars.insert(e.stream, info);
                }
                _ => {
                    self.sidecars.remove(&e.stream);
                }
            },
            watch_event::Event::Signal(s) => {
                if let Some(old) = self.signals.iter_mut().find(|o| o.id == s.id) {
                    *old = s;
                } else {
                    self.signals.push_front(s);
                    self.signals.truncate(MAX_SIGNALS);
                }
            }
            watch_event::Event::Propagation(p) => {
                self.propagations.insert(p.revision, p);
                while self.propagations.len() > MAX_PROPAGATIONS {
                    self.propagations.pop_first();
                }
            }
        }
    }

    /// The recent revocations' propagations, newest first.
    pub fn revocation_propagations(&self) -> impl Iterator<Item = &Propagation> {
        self.propagations.values().rev().filter(|p| p.revocation)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nexus_proto::control::{Delta, SidecarEvent, WatchState};

    fn ev(e: watch_event::Event) -> WatchEvent {
        WatchEvent { event: Some(e) }
    }

    #[test]
    fn state_then_repeated_and_new_events() {
        let mut m = Model::default();
        m.apply(
            ev(watch_event::Event::State(WatchState {
                revision: 3,
                revoked: vec![Revocation {
                    subject: "spiffe://td/a".into(),
                    ..Default::default()
                }],
                ..Default::default()
            })),
            1,
        );
        // A delta the state already held is ignored.
        m.apply(
            ev(watch_event::Event::Delta(Delta {
                revision: 3,
                change: Some(DeltaChange::Reinstate(Default::default())),
            })),
            2,
        );
        assert_eq!(m.revoked.len(), 1);
        m.apply(
            ev(watch_event::Event::Propagation(Propagation {
                revision: 4,
                started_unix_ms: 100,
                revocation: true,
                ..Default::default()
            })),
            3,
        );
        m.apply(
            ev(watch_event::Event::Delta(Delta {
                revision: 4,
                change: Some(DeltaChange::Revoke(Revocation {
                    subject: "spiffe://td/b".into(),
                    ..Default::default()
                })),
            })),
            3,
        );
        m.apply(
            ev(watch_event::Event::Sidecar(SidecarEvent {
                stream: 7,
                info: Some(SidecarInfo {
                    spiffe_id: "spiffe://td/s".into(),
                    acknowledged_revision: 4,
                    last_heard_unix_ms: 112,
                    ..Default::default()
                }),
                gone: false,
            })),
            4,
        );
        assert_eq!(m.revoked.len(), 2);
        assert_eq!(m.acks[&4], vec![("spiffe://td/s".to_string(), 12)]);
        m.apply(
            ev(watch_event::Event::Sidecar(SidecarEvent {
                stream: 7,
                info: None,
                gone: true,
            })),
            5,
        );
        assert!(m.sidecars.is_empty());
    }
}
