//! Request rates per workload for the console (docs/console.md, workloads page): how
//! many execution records each workload's own sidecars shipped to this replica, per
//! minute of the records' own time. Kept in memory only, for the last `MINUTES`
//! minutes and at most `baselines.max_workloads` workloads (the ones heard from least
//! recently are dropped first). A sidecar counts only for its own workload (the SPIFFE
//! ID of its certificate) and only with records the store took as new, so re-sent
//! batches do not count twice and nobody can raise another workload's rate.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use nexus_proto::control::RequestRate;

/// How many minutes of history are kept (and drawn).
pub const MINUTES: u64 = 30;
const MINUTE_MS: u64 = 60_000;

/// The table.
#[derive(Debug)]
pub struct RequestRates {
    max_workloads: usize,
    inner: Mutex<HashMap<String, BTreeMap<u64, u64>>>,
}

impl RequestRates {
    /// Keeps at most `max_workloads` workloads.
    pub fn new(max_workloads: usize) -> Self {
        Self {
            max_workloads: max_workloads.max(1),
            inner: Mutex::new(HashMap::new()),
        }
    }

    /// Adds `workload`'s newly stored records by minute (a minute outside the kept
    /// window around `now_ms`, e.g. from a skewed clock, is ignored); returns the
    /// minutes' new totals.
    pub fn add(
        &self,
        workload: &str,
        by_minute: &BTreeMap<u64, u64>,
        now_ms: u64,
    ) -> Vec<RequestRate> {
        let oldest = (now_ms / MINUTE_MS).saturating_sub(MINUTES - 1) * MINUTE_MS;
        let newest = now_ms / MINUTE_MS * MINUTE_MS + MINUTE_MS;
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out = Vec::new();
        let minutes = inner.entry(workload.to_string()).or_default();
        for (&minute, &n) in by_minute.range(oldest..=newest) {
            let total = minutes.entry(minute).or_default();
            *total = total.saturating_add(n);
            out.push(RequestRate {
                workload: workload.to_string(),
                minute_unix_ms: minute,
                requests: *total,
            });
        }
        // Drop the minutes that left the window.
        let keep = minutes.split_off(&oldest);
        *minutes = keep;
        if minutes.is_empty() {
            inner.remove(workload);
        }
        while inner.len() > self.max_workloads {
            let Some(stalest) = inner
                .iter()
                .min_by_key(|(_, m)| m.keys().next_back().copied().unwrap_or(0))
                .map(|(w, _)| w.clone())
            else {
                break;
            };
            inner.remove(&stalest);
        }
        out
    }

    /// Every kept minute within the window around `now_ms`.
    pub fn all(&self, now_ms: u64) -> Vec<RequestRate> {
        let oldest = (now_ms / MINUTE_MS).saturating_sub(MINUTES - 1) * MINUTE_MS;
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let mut out: Vec<RequestRate> = inner
            .iter()
            .flat_map(|(w, minutes)| {
                minutes.range(oldest..).map(|(&minute, &n)| RequestRate {
                    workload: w.clone(),
                    minute_unix_ms: minute,
                    requests: n,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.workload, a.minute_unix_ms).cmp(&(&b.workload, b.minute_unix_ms)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_by_minute_bounded_in_time_and_workloads() {
        let r = RequestRates::new(2);
        let now = 100 * MINUTE_MS + 5_000;
        let m = |pairs: &[(u64, u64)]| pairs.iter().copied().collect::<BTreeMap<_, _>>();
        // Two batches of the same minute add up; a minute far in the past or the future
        // (a skewed clock) is not kept.
        r.add("spiffe://td/a", &m(&[(100 * MINUTE_MS, 3)]), now);
        let out = r.add(
            "spiffe://td/a",
            &m(&[
                (100 * MINUTE_MS, 2),
                (10 * MINUTE_MS, 9),
                (500 * MINUTE_MS, 9),
            ]),
            now,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].requests, 5);
        // A third workload pushes out the one heard of least recently.
        r.add("spiffe://td/b", &m(&[(99 * MINUTE_MS, 1)]), now);
        r.add("spiffe://td/c", &m(&[(100 * MINUTE_MS, 1)]), now);
        let all = r.all(now);
        let names: Vec<&str> = all.iter().map(|x| x.workload.as_str()).collect();
        assert_eq!(names, ["spiffe://td/a", "spiffe://td/c"]);
        // Half an hour later the old minutes are gone.
        assert!(r.all(now + MINUTES * MINUTE_MS).is_empty());
    }
}
