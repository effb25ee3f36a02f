//! The console's copy of the gateway's state, kept from the Admin `Watch` feed: the
//! first `state` replaces everything, each later event is applied idempotently (an
//! event may repeat what the state already held). A version counter, published on a
//! watch channel, tells the open pages to re-render.

use std::collections::{BTreeMap, HashMap, VecDeque};

use nexus_proto::control::{
    Baseline, Execution, Plugin, PluginVersion, Propagation, Revocation, SidecarInfo, StoredSignal,
    WatchEvent, delta::Change as DeltaChange, watch_event,
};

/// How many signals the console keeps (the newest).
pub const MAX_SIGNALS: usize = 10_000;
/// How many closed executions (seen live) it keeps.
const MAX_CLOSED: usize = 500;
/// How many propagations it keeps.
const MAX_PROPAGATIONS: usize = 1024;
/// For how many revocations it keeps each sidecar's acknowledgement time.
const MAX_ACK_TRACES: usize = 64;
/// How many minutes of request counts it keeps per workload (the sparkline's width).
pub const RATE_MINUTES: u64 = 30;
/// Most workloads it keeps baselines or request counts for (the gateway bounds them
/// too: baselines.max_workloads).
const MAX_WORKLOADS: usize = 10_000;

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
    /// The registry's plugins by UUID (their versions are in `versions`).
    pub plugins: BTreeMap<String, Plugin>,
    /// The registry's versions by (plugin UUID, version).
    pub versions: BTreeMap<(String, String), PluginVersion>,
    /// Fleet baselines by workload.
    pub baselines: BTreeMap<String, Baseline>,
    /// Execution records per workload and minute (unix ms of the minute's start).
    pub rates: BTreeMap<String, BTreeMap<u64, u64>>,
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
                self.plugins.clear();
                self.versions.clear();
                self.registry(s.plugins, Vec::new());
                self.baselines = s
                    .baselines
                    .into_iter()
                    .take(MAX_WORKLOADS)
                    .map(|b| (b.workload.clone(), b))
                    .collect();
                self.rates.clear();
                for r in s.rates {
                    self.rate(r.workload, r.minute_unix_ms, r.requests, now);
                }
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
                    Some(DeltaChange::Registry(r)) => self.registry(r.plugins, r.versions),
                    None => {}
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
            watch_event::Event::Baseline(b) => {
                if self.baselines.len() < MAX_WORKLOADS || self.baselines.contains_key(&b.workload)
                {
                    self.baselines.insert(b.workload.clone(), b);
                }
            }
            watch_event::Event::Rate(r) => self.rate(r.workload, r.minute_unix_ms, r.requests, now),
        }
    }

    /// Upserts registry plugins (as listed: their versions too) and versions, each as it
    /// stands after a change; a version older than the one held (by its revision) is
    /// ignored, so a repeated event cannot roll it back.
    fn registry(&mut self, plugins: Vec<Plugin>, versions: Vec<PluginVersion>) {
        let mut all = versions;
        for mut p in plugins {
            all.append(&mut p.versions);
            self.plugins.insert(p.uid.clone(), p);
        }
        for v in all {
            let key = (v.plugin_uid.clone(), v.version.clone());
            if self
                .versions
                .get(&key)
                .is_none_or(|held| held.revision <= v.revision)
            {
                self.versions.insert(key, v);
            }
        }
    }

    /// Sets a workload's request count for a minute (totals only grow: a repeated or
    /// older event cannot lower it) and drops minutes older than the sparkline.
    fn rate(&mut self, workload: String, minute: u64, requests: u64, now: u64) {
        let oldest = (now / 60_000).saturating_sub(RATE_MINUTES - 1) * 60_000;
        if minute < oldest
            || (self.rates.len() >= MAX_WORKLOADS && !self.rates.contains_key(&workload))
        {
            return;
        }
        let minutes = self.rates.entry(workload).or_default();
        let total = minutes.entry(minute).or_default();
        *total = (*total).max(requests);
        let keep = minutes.split_off(&oldest);
        *minutes = keep;
    }

    /// The registry versions that run as `workload`.
    pub fn versions_of<'a>(&'a self, workload: &'a str) -> impl Iterator<Item = &'a PluginVersion> {
        self.versions
            .values()
            .filter(move |v| v.spiffe_id == workload)
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
    /// A repeated or older registry event does not roll a version back; request totals
    /// only grow and leave the window after 30 minutes.
    #[test]
    fn registry_versions_and_rates_are_idempotent() {
        use nexus_proto::control::{PluginVersion, RegistryEvent, RequestRate};
        let mut m = Model::default();
        m.apply(ev(watch_event::Event::State(WatchState::default())), 0);
        let v = |state: &str, revision| PluginVersion {
            plugin_uid: "u".into(),
            version: "1.0.0".into(),
            state: state.into(),
            revision,
            ..Default::default()
        };
        for (revision, version) in [(2, v("certified", 2)), (3, v("registered", 1))] {
            m.apply(
                ev(watch_event::Event::Delta(Delta {
                    revision,
                    change: Some(DeltaChange::Registry(RegistryEvent {
                        action: "x".into(),
                        plugins: Vec::new(),
                        versions: vec![version],
                    })),
                })),
                1,
            );
        }
        assert_eq!(m.versions[&("u".into(), "1.0.0".into())].state, "certified");
        let rate = |minute_unix_ms, requests| {
            ev(watch_event::Event::Rate(RequestRate {
                workload: "w".into(),
                minute_unix_ms,
                requests,
            }))
        };
        m.apply(rate(60_000, 5), 60_000);
        m.apply(rate(60_000, 3), 60_000);
        assert_eq!(m.rates["w"][&60_000], 5);
        // 40 minutes on: an event for the old minute is ignored, and a new minute drops it.
        m.apply(rate(60_000, 9), 40 * 60_000);
        m.apply(rate(40 * 60_000, 2), 40 * 60_000);
        assert_eq!(m.rates["w"].len(), 1);
        assert_eq!(m.rates["w"][&(40 * 60_000)], 2);
    }
}
