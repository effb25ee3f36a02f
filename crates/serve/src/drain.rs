//! The drain signal: one [`Drain`] per process, a [`Watch`] per listener and per
//! connection. A `Watch` is a receiver of a `tokio::sync::watch` channel, so "every
//! connection has ended" is "every receiver is dropped" (`Sender::closed`), with no
//! counter to keep in step by hand.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tokio::sync::watch;

/// The process's drain: announce it (readiness turns 503), start it (listeners stop
/// accepting, connections close gracefully), wait for it to finish.
#[derive(Debug)]
pub struct Drain {
    tx: watch::Sender<bool>,
    announced: Arc<AtomicBool>,
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A drain not yet announced.
    pub fn new() -> Self {
        let (tx, _) = watch::channel(false);
        Self {
            tx,
            announced: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A handle for a listener or connection; it holds the drain open until dropped.
    pub fn watch(&self) -> Watch {
        Watch {
            rx: self.tx.subscribe(),
        }
    }

    /// What `/ready` reads: true from [`Drain::announce`] on. It does not hold the
    /// drain open.
    pub fn readiness(&self) -> Readiness {
        Readiness(self.announced.clone())
    }

    /// Readiness turns 503; listeners still accept (load balancers need time to see it).
    pub fn announce(&self) {
        self.announced.store(true, Ordering::SeqCst);
    }

    /// Listeners stop accepting and every connection closes after its in-flight work.
    pub fn start(&self) {
        self.announce();
        self.tx.send_replace(true);
    }

    /// Completes when every [`Watch`] is dropped: every listener stopped and every
    /// connection ended.
    pub async fn finished(&self) {
        self.tx.closed().await;
    }

    /// Listeners and connections still open.
    pub fn open(&self) -> usize {
        self.tx.receiver_count()
    }
}

/// One listener's or connection's view of the drain.
#[derive(Clone, Debug)]
pub struct Watch {
    rx: watch::Receiver<bool>,
}

impl Watch {
    /// A watch that never signals: for a listener that stays open until the process
    /// exits (the admin listener, so probes and scrapes see the drain) and is not waited
    /// for.
    pub fn never() -> Self {
        let (_, rx) = watch::channel(false);
        Self { rx }
    }

    /// Completes once the drain has started. If the [`Drain`] is dropped without
    /// starting (a process stopped another way), it never completes.
    pub async fn signaled(&mut self) {
        if self.rx.wait_for(|started| *started).await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// True once the drain has started.
    pub fn is_draining(&self) -> bool {
        *self.rx.borrow()
    }
}

/// Readiness as the drain sees it (see [`Drain::readiness`]).
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// True once the drain is announced: `/ready` must answer 503.
    pub fn is_draining(&self) -> bool {
        self.0.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn finished_waits_for_every_watch() {
        let drain = Drain::new();
        let readiness = drain.readiness();
        let mut watch = drain.watch();
        assert!(!readiness.is_draining());
        drain.announce();
        assert!(readiness.is_draining());
        assert!(!watch.is_draining());
        drain.start();
        watch.signaled().await;
        assert_eq!(drain.open(), 1);
        let waiting = tokio::time::timeout(std::time::Duration::from_millis(50), drain.finished());
        assert!(waiting.await.is_err(), "a watch is still held");
        drop(watch);
        drain.finished().await;
    }

    #[tokio::test]
    async fn a_dropped_drain_never_signals() {
        let drain = Drain::new();
        let mut watch = drain.watch();
        drop(drain);
        let signaled = tokio::time::timeout(std::time::Duration::from_millis(50), watch.signaled());
        assert!(signaled.await.is_err());
    }
}
