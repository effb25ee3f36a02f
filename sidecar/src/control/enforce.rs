//! What the sidecar enforces from the gateway, read on every request without locks:
//! the revoked workloads (exact SPIFFE IDs and `spiffe://td/path/*` prefixes), the
//! link to the gateway (connected, lost within grace, or lost past
//! `fail_closed_after`, when every request is refused), and holds: reasons to refuse
//! every request whatever the link says (no verified gateway state yet, a revision that
//! could not be applied). A change bumps a watch generation so open connections with a
//! now-revoked peer can close themselves.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, AtomicU8, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use tokio::sync::watch;

use crate::config::GatewayLoss;

/// The revoked set.
#[derive(Debug, Default)]
pub struct Revoked {
    exact: HashSet<String>,
    /// Each ends in `/`.
    prefixes: Vec<String>,
}

impl Revoked {
    /// From subjects as the gateway sends them.
    pub fn from_subjects<'a>(subjects: impl IntoIterator<Item = &'a str>) -> Self {
        let mut out = Self::default();
        for s in subjects {
            match s.strip_suffix("/*") {
                Some(base) => out.prefixes.push(format!("{base}/")),
                None => {
                    out.exact.insert(s.to_string());
                }
            }
        }
        out
    }

    /// Whether `id` is revoked.
    pub fn contains(&self, id: &str) -> bool {
        self.exact.contains(id)
            || self
                .prefixes
                .iter()
                .any(|p| id.len() > p.len() && id.starts_with(p.as_str()))
    }

    /// How many entries.
    pub fn len(&self) -> usize {
        self.exact.len() + self.prefixes.len()
    }

    /// Whether none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The link to the gateway as requests see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinkState {
    /// No `[gateway]` configured.
    Standalone,
    /// The control stream is up and in sync.
    Connected,
    /// Lost (or not yet reached); the last snapshot is enforced.
    Disconnected,
    /// Lost for longer than `fail_closed_after`: every request is refused.
    FailClosed,
}

impl LinkState {
    /// The metric/ready label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Standalone => "standalone",
            Self::Connected => "connected",
            Self::Disconnected => "disconnected",
            Self::FailClosed => "fail_closed",
        }
    }
}

/// Why a request is refused; each carries the reason for the body and the record.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Refused {
    /// The source or destination workload is revoked (403).
    Revoked(String),
    /// The gateway's state cannot be enforced: lost past `fail_closed_after`, or a hold
    /// (503).
    Unenforceable(String),
}

/// Why every request is refused, whatever the link says.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Hold {
    /// No gateway state this sidecar can verify (no snapshot kept, or a damaged one that
    /// could hide a newer revision): until the gateway answers.
    NoValidSnapshot,
    /// A revision could not be applied in full: until a retry succeeds.
    ApplyFailed,
}

impl Hold {
    /// The metric label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::NoValidSnapshot => "no_valid_snapshot",
            Self::ApplyFailed => "apply_failed",
        }
    }
}

/// The enforcement state.
#[derive(Debug)]
pub struct Enforcement {
    revoked: ArcSwap<Revoked>,
    /// Set while `holds` is not empty: the request path reads only this.
    held: std::sync::atomic::AtomicBool,
    holds: std::sync::Mutex<std::collections::BTreeMap<Hold, String>>,
    generation: watch::Sender<u64>,
    link: AtomicU8,
    /// Unix ms since the link was lost (0: connected or standalone).
    lost_since_ms: AtomicI64,
    lost_since: std::sync::Mutex<Option<Instant>>,
    loss: GatewayLoss,
    fail_closed_after: Duration,
}

fn unix_ms() -> i64 {
    i64::try_from(super::unix_ms()).unwrap_or(i64::MAX)
}

impl Enforcement {
    /// Standalone: nothing revoked, no gateway.
    pub fn standalone() -> Arc<Self> {
        Self::new(GatewayLoss::KeepLast, Duration::MAX, false)
    }

    /// With a gateway: starts disconnected (lost since now).
    pub fn new(loss: GatewayLoss, fail_closed_after: Duration, gateway: bool) -> Arc<Self> {
        let (generation, _) = watch::channel(0);
        let this = Self {
            revoked: ArcSwap::from_pointee(Revoked::default()),
            held: std::sync::atomic::AtomicBool::new(false),
            holds: std::sync::Mutex::new(std::collections::BTreeMap::new()),
            generation,
            link: AtomicU8::new(if gateway { 2 } else { 0 }),
            lost_since_ms: AtomicI64::new(if gateway { unix_ms() } else { 0 }),
            lost_since: std::sync::Mutex::new(gateway.then(Instant::now)),
            loss,
            fail_closed_after,
        };
        Arc::new(this)
    }

    /// Replaces the revoked set and wakes connection watchers.
    pub fn set_revoked(&self, revoked: Revoked) {
        self.revoked.store(Arc::new(revoked));
        self.generation.send_modify(|g| *g += 1);
    }

    /// Refuses every request for `hold` (with `why` in each refusal) until released.
    pub fn hold(&self, hold: Hold, why: String) {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        holds.insert(hold, why);
        self.held.store(true, Ordering::SeqCst);
    }

    /// Lifts `hold`; returns whether it was set.
    pub fn release(&self, hold: Hold) -> bool {
        let mut holds = self.holds.lock().unwrap_or_else(|p| p.into_inner());
        let was = holds.remove(&hold).is_some();
        self.held.store(!holds.is_empty(), Ordering::SeqCst);
        was
    }

    /// The holds in force, with why.
    pub fn holds(&self) -> Vec<(Hold, String)> {
        self.holds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|(h, w)| (*h, w.clone()))
            .collect()
    }

    /// Whether `id` is revoked.
    pub fn is_revoked(&self, id: &str) -> bool {
        self.revoked.load().contains(id)
    }

    /// Number of revoked entries.
    pub fn revoked_count(&self) -> usize {
        self.revoked.load().len()
    }

    /// Subscribes to changes of the revoked set.
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.generation.subscribe()
    }

    /// The link is up.
    pub fn connected(&self) {
        self.link.store(1, Ordering::Relaxed);
        self.lost_since_ms.store(0, Ordering::Relaxed);
        *self.lost_since.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.generation.send_modify(|g| *g += 1);
    }

    /// The link is down (keeps the earliest loss time).
    pub fn disconnected(&self) {
        if self.link.swap(2, Ordering::Relaxed) == 1 {
            self.lost_since_ms.store(unix_ms(), Ordering::Relaxed);
            *self.lost_since.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now());
        }
    }

    /// The link's state now.
    pub fn link(&self) -> LinkState {
        match self.link.load(Ordering::Relaxed) {
            0 => LinkState::Standalone,
            1 => LinkState::Connected,
            _ => {
                let lost = *self.lost_since.lock().unwrap_or_else(|p| p.into_inner());
                match (self.loss, lost) {
                    (GatewayLoss::FailClosed, Some(t)) if t.elapsed() >= self.fail_closed_after => {
                        LinkState::FailClosed
                    }
                    _ => LinkState::Disconnected,
                }
            }
        }
    }

    /// Unix ms when the link was lost (0 if it is not).
    pub fn lost_since_ms(&self) -> i64 {
        self.lost_since_ms.load(Ordering::Relaxed)
    }

    /// Whether a request between `source` and `destination` must be refused, and why.
    pub fn refusal(&self, source: &str, destination: &str) -> Option<Refused> {
        if self.held.load(Ordering::SeqCst)
            && let Some((_, why)) = self.holds().into_iter().next()
        {
            return Some(Refused::Unenforceable(why));
        }
        if self.link.load(Ordering::Relaxed) == 2 && self.link() == LinkState::FailClosed {
            return Some(Refused::Unenforceable(format!(
                "the gateway has been unreachable for longer than fail_closed_after ({}); refusing every request",
                humantime_serde::re::humantime::format_duration(self.fail_closed_after)
            )));
        }
        let revoked = self.revoked.load();
        if revoked.is_empty() {
            return None;
        }
        for id in [source, destination] {
            if revoked.contains(id) {
                return Some(Refused::Revoked(format!("workload {id} is revoked")));
            }
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exact_and_prefix_revocations() {
        let r = Revoked::from_subjects(["spiffe://td/a", "spiffe://td/ns/x/*"]);
        assert!(r.contains("spiffe://td/a"));
        assert!(!r.contains("spiffe://td/ab"));
        assert!(r.contains("spiffe://td/ns/x/sa/p"));
        assert!(!r.contains("spiffe://td/ns/x"));
        assert!(!r.contains("spiffe://td/ns/xy/sa/p"));
    }

    #[test]
    fn fail_closed_only_after_the_grace_period() {
        let e = Enforcement::new(GatewayLoss::FailClosed, Duration::from_millis(30), true);
        assert_eq!(e.link(), LinkState::Disconnected);
        assert!(e.refusal("spiffe://td/a", "spiffe://td/b").is_none());
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(e.link(), LinkState::FailClosed);
        assert!(matches!(
            e.refusal("spiffe://td/a", "spiffe://td/b"),
            Some(Refused::Unenforceable(_))
        ));
        e.connected();
        assert!(e.refusal("spiffe://td/a", "spiffe://td/b").is_none());
        let keep = Enforcement::new(GatewayLoss::KeepLast, Duration::from_millis(1), true);
        std::thread::sleep(Duration::from_millis(5));
        assert_eq!(keep.link(), LinkState::Disconnected);
    }
}
