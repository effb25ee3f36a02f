//! Anomaly signals waiting for the gateway: a bounded queue. While the gateway is
//! away, the oldest are dropped beyond `gateway.signal_buffer` and the count is sent
//! with the next batch (and exported as `nexus_signals_dropped_total`).

use std::collections::VecDeque;
use std::sync::Mutex;

use nexus_proto::control::Signal;
use tokio::sync::Notify;

/// The queue.
#[derive(Debug)]
pub struct SignalQueue {
    inner: Mutex<(VecDeque<Signal>, u64)>,
    capacity: usize,
    notify: Notify,
}

impl SignalQueue {
    /// Holds at most `capacity` signals.
    pub fn new(capacity: usize) -> Self {
        Self {
            inner: Mutex::new((VecDeque::new(), 0)),
            capacity: capacity.max(1),
            notify: Notify::new(),
        }
    }

    /// Queues a signal; returns false if an older one had to be dropped for it.
    pub fn push(&self, signal: Signal) -> bool {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut kept = true;
        if inner.0.len() >= self.capacity {
            inner.0.pop_front();
            inner.1 += 1;
            kept = false;
        }
        inner.0.push_back(signal);
        drop(inner);
        self.notify.notify_one();
        kept
    }

    /// Puts unacknowledged signals back at the front.
    pub fn requeue(&self, signals: Vec<Signal>) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        for s in signals.into_iter().rev() {
            if inner.0.len() >= self.capacity {
                inner.1 += 1;
                continue;
            }
            inner.0.push_front(s);
        }
        drop(inner);
        self.notify.notify_one();
    }

    /// Takes up to `max` signals and the dropped count since the last take.
    pub fn take(&self, max: usize) -> (Vec<Signal>, u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let n = inner.0.len().min(max);
        let out: Vec<Signal> = inner.0.drain(..n).collect();
        let dropped = std::mem::take(&mut inner.1);
        if !inner.0.is_empty() {
            self.notify.notify_one();
        }
        (out, dropped)
    }

    /// Signals waiting.
    pub fn len(&self) -> usize {
        self.inner.lock().unwrap_or_else(|p| p.into_inner()).0.len()
    }

    /// Whether none wait.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Resolves when signals may be waiting.
    pub async fn ready(&self) {
        if !self.is_empty() {
            return;
        }
        self.notify.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bounded_and_counts_drops() {
        let q = SignalQueue::new(2);
        for i in 0..5 {
            q.push(Signal {
                kind: format!("k{i}"),
                ..Signal::default()
            });
        }
        let (s, dropped) = q.take(10);
        assert_eq!(dropped, 3);
        assert_eq!(
            s.iter().map(|s| s.kind.as_str()).collect::<Vec<_>>(),
            ["k3", "k4"]
        );
        assert_eq!(q.take(10).1, 0);
    }
}
