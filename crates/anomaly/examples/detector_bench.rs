//! Cost of one `Detectors::on_request` call: p50/p99 in ns over 1M calls, for 1 and
//! 1000 workloads, from 1 and 2 threads (1M calls per thread), with simulated time
//! advancing 1 ms per 100 calls per thread (steady load: no signals expected).
//!
//! `cargo run --release -p nexus-anomaly --example detector_bench`

use std::sync::Arc;
use std::time::Instant;

use nexus_anomaly::{DetectorConfig, Detectors, Observed, RequestEvent};

const CALLS: u64 = 1_000_000;
const T0: u64 = 1_764_150_000_000;

fn run(workloads: usize, threads: usize) {
    let d = Arc::new(Detectors::new(DetectorConfig::default()));
    let ids: Arc<Vec<String>> = Arc::new(
        (0..workloads)
            .map(|i| format!("spiffe://nexus.local/ns/plugins/sa/model-{i}"))
            .collect(),
    );
    let handles: Vec<_> = (0..threads)
        .map(|t| {
            let (d, ids) = (d.clone(), ids.clone());
            std::thread::spawn(move || {
                let mut ns = Vec::with_capacity(CALLS as usize);
                let mut signals = 0usize;
                // Every call also checks a declared budget (never exceeded here).
                let budget = nexus_anomaly::Budget {
                    requests_per_s: 1e9,
                    egress_bytes: u64::MAX,
                    distinct_clauses: 32,
                    window: std::time::Duration::from_secs(10),
                };
                for i in 0..CALLS {
                    let id = &ids[(i as usize + t * 7919) % ids.len()];
                    let ev = RequestEvent {
                        workload: id,
                        observed_as: Observed::Peer,
                        allowed: i % 50 != 0,
                        clause: Some("c-flood-17"),
                        clause_bound: Some(true),
                        bytes_out: 256,
                        bytes_in: 4096,
                    };
                    let now = T0 + i / 100;
                    let start = Instant::now();
                    let out = d.on_request(&ev, Some(&budget), now);
                    ns.push(start.elapsed().as_nanos() as u64);
                    signals += out.len();
                }
                (ns, signals)
            })
        })
        .collect();
    let mut all = Vec::new();
    let mut signals = 0;
    for h in handles {
        let (ns, s) = h.join().expect("bench thread");
        all.extend(ns);
        signals += s;
    }
    all.sort_unstable();
    let pct = |p: f64| all[((all.len() as f64 * p) as usize).min(all.len() - 1)];
    println!(
        "workloads {workloads:>4}  threads {threads}  calls {:>8}  p50 {:>4} ns  p99 {:>5} ns  p99.9 {:>6} ns  signals {signals}  tracked {}",
        all.len(),
        pct(0.50),
        pct(0.99),
        pct(0.999),
        d.tracked(),
    );
}

fn main() {
    for workloads in [1, 1000] {
        for threads in [1, 2] {
            run(workloads, threads);
        }
    }
}
