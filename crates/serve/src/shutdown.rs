//! The SIGTERM sequence every Nexus binary runs: readiness turns 503 at once; after
//! `drain_delay` (time for load balancers and Kubernetes endpoints to stop sending) the
//! listeners stop accepting and connections close gracefully; in-flight requests and
//! streams get until `grace` (counted from the first signal) to finish. A second
//! SIGTERM/SIGINT, or the grace running out, ends the wait at once.

use std::time::Duration;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::Drain;

/// How long each phase of a shutdown may take.
#[derive(Clone, Copy, Debug)]
pub struct ShutdownTiming {
    /// From the signal until listeners stop accepting.
    pub drain_delay: Duration,
    /// From the signal until the process stops waiting for in-flight work.
    pub grace: Duration,
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Stopped {
    /// Every connection finished within the grace.
    Drained,
    /// The grace ran out with connections still open (their count).
    GraceExpired(usize),
    /// A second signal arrived: stop at once.
    Forced,
}

/// SIGTERM and SIGINT, installed once.
#[derive(Debug)]
pub struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    /// Installs the handlers (do this before serving, so an early SIGTERM is not lost).
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next SIGTERM or SIGINT.
    pub async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// Runs the drain after the first signal has been received (see the module docs).
pub async fn shutdown(drain: &Drain, timing: ShutdownTiming, signals: &mut Signals) -> Stopped {
    let deadline = tokio::time::Instant::now() + timing.grace;
    drain.announce();
    tracing::info!(
        drain_delay = ?timing.drain_delay,
        grace = ?timing.grace,
        "draining: /ready answers 503; listeners close after the drain delay"
    );
    tokio::select! {
        () = tokio::time::sleep(timing.drain_delay.min(timing.grace)) => {}
        () = signals.recv() => {
            tracing::warn!("second signal: stopping at once");
            return Stopped::Forced;
        }
    }
    drain.start();
    tracing::info!(
        open = drain.open(),
        "draining: listeners closed; waiting for in-flight requests"
    );
    tokio::select! {
        () = drain.finished() => {
            tracing::info!("drained: every connection finished");
            Stopped::Drained
        }
        () = tokio::time::sleep_until(deadline) => {
            let open = drain.open();
            tracing::warn!(open, "shutdown_grace ran out with connections still open; closing them");
            Stopped::GraceExpired(open)
        }
        () = signals.recv() => {
            tracing::warn!("second signal: stopping at once");
            Stopped::Forced
        }
    }
}
