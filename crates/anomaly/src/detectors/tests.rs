use std::time::Duration;

use super::*;

const PLUGIN: &str = "spiffe://nexus.local/ns/plugins/sa/flood-model";
const T0: u64 = 1_764_150_000_000;

/// splitmix64: a seeded PRNG, so a run is reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

fn event(workload: &str) -> RequestEvent<'_> {
    RequestEvent {
        workload,
        observed_as: Observed::Peer,
        allowed: true,
        clause: Some("c-flood-17"),
        clause_bound: Some(true),
        bytes_out: 0,
        bytes_in: 512,
    }
}

/// `rps` evenly spaced requests per second from `from` (inclusive) to `to` (exclusive).
fn drive(d: &Detectors, ev: &RequestEvent<'_>, from: u64, to: u64, rps: u64) -> Vec<Signal> {
    let mut out = Vec::new();
    let n = (to - from) * rps / 1000;
    for i in 0..n {
        out.extend(d.on_request(ev, None, from + i * 1000 / rps));
    }
    out
}

/// Detectors whose prior is the workload's usual traffic (as if the fleet knew it).
fn usual(rps: f64, bytes_per_s: f64) -> Detectors {
    let mut c = DetectorConfig::default();
    c.baseline.prior_rate_per_s = rps;
    c.baseline.prior_bytes_per_s = bytes_per_s;
    Detectors::new(c)
}

fn of(signals: &[Signal], kind: SignalKind) -> Vec<&Signal> {
    signals.iter().filter(|s| s.kind == kind).collect()
}

fn num(s: &Signal, key: &str) -> f64 {
    s.evidence[key]
        .as_f64()
        .unwrap_or_else(|| panic!("{key} in {:?}", s.evidence))
}

// --- rate spike ------------------------------------------------------------------------

#[test]
fn a_tenfold_spike_signals_within_300ms_and_escalates_to_its_full_score() {
    let d = usual(100.0, 65536.0);
    let ev = event(PLUGIN);
    let onset = T0 + 30_000;
    assert!(drive(&d, &ev, T0, onset, 100).is_empty());
    let spike = drive(&d, &ev, onset, onset + 1000, 1000);
    let rate = of(&spike, SignalKind::RateSpike);
    assert!(!rate.is_empty(), "no rate signal: {spike:?}");
    let first = rate[0];
    assert!(
        first.time_ms - onset <= 300,
        "first after {} ms",
        first.time_ms - onset
    );
    assert!(first.score >= 4.0);
    assert_eq!(first.observed_as, Observed::Peer);
    assert!(
        (num(first, "baseline_per_s") - 100.0).abs() < 5.0,
        "{first:?}"
    );
    // Escalation past the cooldown: the full 10× is reported within the window's length.
    let full = rate
        .iter()
        .find(|s| s.score >= 8.0)
        .expect("a signal at score >= 8");
    assert!(
        full.time_ms - onset <= 300,
        "score 8 after {} ms",
        full.time_ms - onset
    );
    assert!(rate.len() <= 3, "escalations only: {rate:?}");
}

#[test]
fn a_workload_hostile_from_its_first_request_is_judged_against_the_prior() {
    // No warm-up and no self-learning: 2000/s from the first request against the
    // default prior (25/s).
    let d = Detectors::new(DetectorConfig::default());
    let ev = event(PLUGIN);
    let spike = drive(&d, &ev, T0, T0 + 1000, 2000);
    let rate = of(&spike, SignalKind::RateSpike);
    assert!(!rate.is_empty(), "{spike:?}");
    assert!(rate[0].time_ms - T0 <= 100, "{:?}", rate[0]);
    assert!(rate.iter().any(|s| s.score >= 8.0), "{rate:?}");
}

#[test]
fn one_to_ten_requests_per_second_is_below_the_floor() {
    let d = Detectors::new(DetectorConfig::default());
    let ev = event(PLUGIN);
    assert!(drive(&d, &ev, T0, T0 + 60_000, 1).is_empty());
    assert!(drive(&d, &ev, T0 + 60_000, T0 + 70_000, 10).is_empty());
    // ... unless the floor is lowered.
    let mut c = DetectorConfig::default();
    c.rate_spike.min_rate_per_s = 0.0;
    c.rate_spike.window = Duration::from_secs(2);
    let d = Detectors::new(c);
    drive(&d, &ev, T0, T0 + 60_000, 1);
    let s = drive(&d, &ev, T0 + 60_000, T0 + 70_000, 10);
    assert!(!of(&s, SignalKind::RateSpike).is_empty());
}

/// Arrival times for `secs` seconds at `rps` ± 30% per second, uniformly at random
/// within each second.
fn jittered(rng: &mut Rng, from: u64, secs: u64, rps: f64) -> Vec<u64> {
    let mut times = Vec::new();
    for sec in 0..secs {
        let n = (rps * (0.7 + 0.6 * rng.unit())).round() as u64;
        let start = times.len();
        for _ in 0..n {
            times.push(from + sec * 1000 + rng.next() % 1000);
        }
        times[start..].sort_unstable();
    }
    times
}

#[test]
fn ten_minutes_of_jittered_steady_load_never_signals() {
    // The default factor 4, and a far lower one that still never trips: the window's
    // rate stays well under the factor (counting noise is larger at low rates).
    for (seed, rps, low) in [(1, 30.0, 3.0), (2, 100.0, 2.2), (3, 400.0, 1.8)] {
        let times = jittered(&mut Rng(seed), T0, 600, rps);
        for factor in [4.0, low] {
            let mut c = DetectorConfig::default();
            c.rate_spike.factor = factor;
            c.baseline.prior_rate_per_s = rps;
            let d = Detectors::new(c);
            let ev = event(PLUGIN);
            let signals: Vec<Signal> = times
                .iter()
                .flat_map(|&t| d.on_request(&ev, None, t))
                .collect();
            assert!(
                signals.is_empty(),
                "{rps} rps, factor {factor}: {signals:?}"
            );
        }
    }
}

#[test]
fn a_flood_does_not_poison_the_baseline() {
    let d = usual(100.0, 65536.0);
    let ev = event(PLUGIN);
    drive(&d, &ev, T0, T0 + 30_000, 100);
    // 20 s at 10×, back to normal past the cooldown, then a second spike.
    drive(&d, &ev, T0 + 30_000, T0 + 50_000, 1000);
    assert!(drive(&d, &ev, T0 + 50_000, T0 + 90_000, 100).is_empty());
    let again = drive(&d, &ev, T0 + 90_000, T0 + 91_000, 1000);
    let rate = of(&again, SignalKind::RateSpike);
    let base = num(rate[0], "baseline_per_s");
    assert!(base < 150.0, "baseline {base} after a 20 s flood");
}

#[test]
fn idle_ticks_do_not_lower_the_baseline() {
    let d = usual(200.0, 65536.0);
    let ev = event(PLUGIN);
    drive(&d, &ev, T0, T0 + 30_000, 200);
    // Ten idle minutes, then the usual rate again: not a spike.
    assert!(drive(&d, &ev, T0 + 630_000, T0 + 660_000, 200).is_empty());
}

// --- cooldown --------------------------------------------------------------------------

#[test]
fn a_flood_yields_one_signal_per_cooldown_with_the_suppressed_count() {
    let d = Detectors::new(DetectorConfig {
        cooldown: std::time::Duration::from_secs(30),
        ..DetectorConfig::default()
    });
    let mut ev = event(PLUGIN);
    ev.allowed = false;
    // 100 denials a second for 70 s: signals as the count in the first window doubles
    // (20, 40, ... 640 at 6.4 s), then one per 30 s cooldown (36.4 s, 66.4 s): 8 of 7000.
    let signals = drive(&d, &ev, T0, T0 + 70_000, 100);
    let denials = of(&signals, SignalKind::DenialBurst);
    assert_eq!(denials.len(), 8, "{denials:?}");
    let late: Vec<_> = denials.iter().filter(|s| s.time_ms > T0 + 20_000).collect();
    assert_eq!(late.len(), 2, "{late:?}");
    assert!(num(late[0], "suppressed") > 2000.0, "{:?}", late[0]);
}

// --- denial burst ----------------------------------------------------------------------

#[test]
fn denial_burst_at_the_threshold_in_the_window() {
    let d = Detectors::new(DetectorConfig::default());
    let mut ev = event(PLUGIN);
    ev.allowed = false;
    // 19 denials over 19 s never fill the 10 s window.
    for i in 0..19 {
        assert!(d.on_request(&ev, None, T0 + i * 1000).is_empty());
    }
    for i in 0..19 {
        assert!(d.on_request(&ev, None, T0 + 40_000 + i * 100).is_empty());
    }
    let s = d.on_request(&ev, None, T0 + 42_000);
    assert_eq!(s.len(), 1, "{s:?}");
    assert_eq!(s[0].kind, SignalKind::DenialBurst);
    assert_eq!(s[0].score, 1.0);
    assert_eq!(num(&s[0], "count"), 20.0);
    assert_eq!(num(&s[0], "window_ms"), 10_000.0);
}

// --- egress ----------------------------------------------------------------------------

#[test]
fn egress_over_the_absolute_limit_signals_whatever_the_baseline() {
    // A workload whose usual egress is huge still trips the absolute cap.
    let d = usual(100.0, 1e9);
    let mut ev = event(PLUGIN);
    ev.bytes_out = 64 << 20;
    let mut signals = Vec::new();
    for i in 0..5 {
        signals.extend(d.on_request(&ev, None, T0 + i * 100));
    }
    let e = of(&signals, SignalKind::EgressBytes);
    assert_eq!(e.len(), 1, "{signals:?}");
    assert_eq!(e[0].evidence["trigger"], "absolute");
    assert_eq!(e[0].time_ms, T0 + 400);
}

#[test]
fn a_new_workload_pulling_much_data_is_judged_against_the_prior_from_its_first_request() {
    let d = Detectors::new(DetectorConfig::default());
    let mut ev = event(PLUGIN);
    ev.bytes_out = 16 << 20;
    let s = d.on_request(&ev, None, T0);
    let e = of(&s, SignalKind::EgressBytes);
    assert_eq!(e.len(), 1, "{s:?}");
    assert_eq!(e[0].evidence["trigger"], "baseline");
}

#[test]
fn egress_over_factor_times_the_warm_baseline_signals() {
    let d = usual(100.0, 1e6);
    let mut ev = event(PLUGIN);
    ev.bytes_out = 10_000; // 1 MB/s at 100 rps: 10 MB per 10 s window
    assert!(drive(&d, &ev, T0, T0 + 60_000, 100).is_empty());
    ev.bytes_out = 300_000; // 30×: the window passes 10× the baseline after ~3.1 s
    let s = drive(&d, &ev, T0 + 60_000, T0 + 65_000, 100);
    let e = of(&s, SignalKind::EgressBytes);
    assert!(!e.is_empty(), "{s:?}");
    assert_eq!(e[0].evidence["trigger"], "baseline");
    assert!(e[0].time_ms - (T0 + 60_000) < 3500, "{:?}", e[0]);
    assert!(
        (num(e[0], "baseline_bytes") - 10e6).abs() < 1e6,
        "{:?}",
        e[0]
    );
}

#[test]
fn small_egress_below_the_floor_is_not_relative_anomaly() {
    let d = usual(100.0, 1000.0);
    let mut ev = event(PLUGIN);
    ev.bytes_out = 10;
    drive(&d, &ev, T0, T0 + 60_000, 100);
    ev.bytes_out = 1000; // 100× the baseline, but 1 MB per window < 4 MiB floor
    assert!(drive(&d, &ev, T0 + 60_000, T0 + 80_000, 100).is_empty());
}

// --- unbound clause --------------------------------------------------------------------

#[test]
fn unbound_clause_burst_signals_at_three() {
    let d = Detectors::new(DetectorConfig::default());
    let mut ev = event(PLUGIN);
    ev.clause_bound = None; // the sidecar does not know: never counted
    assert!(drive(&d, &ev, T0, T0 + 1000, 50).is_empty());
    ev.clause_bound = Some(false);
    ev.clause = Some("c-secret-9");
    ev.allowed = false;
    assert!(d.on_request(&ev, None, T0 + 1000).is_empty());
    assert!(d.on_request(&ev, None, T0 + 1100).is_empty());
    let s = d.on_request(&ev, None, T0 + 1200);
    let u = of(&s, SignalKind::UnboundClause);
    assert_eq!(u.len(), 1, "{s:?}");
    assert_eq!(u[0].evidence["clause"], "c-secret-9");
    assert_eq!(u[0].score, 1.0);
}

// --- auth failures ---------------------------------------------------------------------

#[test]
fn auth_failures_per_peer_and_unknown_aggregated() {
    let d = Detectors::new(DetectorConfig::default());
    for i in 0..9 {
        assert!(
            d.on_auth_failure(Some(PLUGIN), "BadSignature", T0 + i)
                .is_empty()
        );
        assert!(d.on_auth_failure(None, "no certificate", T0 + i).is_empty());
    }
    let s = d.on_auth_failure(None, "no certificate", T0 + 10);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].workload, UNKNOWN_PEER);
    assert_eq!(s[0].evidence["identified"], false);
    let s = d.on_auth_failure(Some(PLUGIN), &"x".repeat(10_000), T0 + 10);
    assert_eq!(s[0].workload, PLUGIN);
    assert_eq!(s[0].kind, SignalKind::AuthFailures);
    assert_eq!(s[0].evidence["reason"].as_str().map(str::len), Some(128));
}

// --- sandbox ---------------------------------------------------------------------------

#[test]
fn sandbox_kill_signals_at_once_eperm_over_a_threshold() {
    let d = Detectors::new(DetectorConfig::default());
    let s = d.on_sandbox_violation(PLUGIN, "ptrace", "kill", T0);
    assert_eq!(s.len(), 1);
    assert_eq!(
        (s[0].kind, s[0].observed_as, s[0].score),
        (SignalKind::SandboxViolation, Observed::Own, 100.0)
    );
    assert_eq!(s[0].evidence["action"], "kill");

    let d = Detectors::new(DetectorConfig::default());
    for i in 0..4 {
        assert!(
            d.on_sandbox_violation(PLUGIN, "connect", "eperm", T0 + i * 1000)
                .is_empty()
        );
    }
    let s = d.on_sandbox_violation(PLUGIN, "connect", "log", T0 + 5000);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].score, 1.0);
    // A kill during the cooldown still goes out: its score is far higher.
    let s = d.on_sandbox_violation(PLUGIN, "ptrace", "kill", T0 + 6000);
    assert_eq!(s.len(), 1);
    assert_eq!(s[0].score, 100.0);
}

// --- memory bound ----------------------------------------------------------------------

#[test]
fn at_most_max_workloads_least_recently_seen_evicted_first() {
    let c = DetectorConfig {
        max_workloads: 64, // 56 request workloads + 8 auth sources, one exact LRU
        ..DetectorConfig::default()
    };
    let d = Detectors::new(c);
    let hot = "spiffe://nexus.local/ns/plugins/sa/hot";
    let mut unbound = event(hot);
    unbound.clause_bound = Some(false);
    d.on_request(&unbound, None, T0);
    d.on_request(&unbound, None, T0 + 1);
    for i in 0..200u64 {
        let id = format!("spiffe://nexus.local/ns/p/sa/w{i}");
        d.on_request(&event(&id), None, T0 + 10 + i);
        d.on_request(&event(hot), None, T0 + 10 + i);
    }
    assert_eq!(d.tracked(), 56);
    assert_eq!(d.evicted(), 201 - 56);
    // `hot` was seen throughout: its state (two unbound requests) survived.
    let s = d.on_request(&unbound, None, T0 + 500);
    assert_eq!(of(&s, SignalKind::UnboundClause).len(), 1, "{s:?}");
}

#[test]
fn forged_auth_ids_cannot_evict_request_state_and_sharded_tables_stay_bounded() {
    let d = Detectors::new(DetectorConfig::default());
    let mut unbound = event(PLUGIN);
    unbound.clause_bound = Some(false);
    d.on_request(&unbound, None, T0);
    d.on_request(&unbound, None, T0 + 1);
    for i in 0..10_000u64 {
        d.on_auth_failure(
            Some(&format!("spiffe://forged/{i}")),
            "UnknownIssuer",
            T0 + 2,
        );
    }
    assert!(d.tracked() <= 4096);
    assert_eq!(d.tracked() as u64 + d.evicted(), 10_001);
    let s = d.on_request(&unbound, None, T0 + 3);
    assert_eq!(of(&s, SignalKind::UnboundClause).len(), 1);
    for i in 0..10_000u64 {
        d.on_request(&event(&format!("spiffe://nexus.local/w{i}")), None, T0 + 4);
    }
    assert!(d.tracked() <= 4096, "{}", d.tracked());
    assert_eq!(d.tracked() as u64 + d.evicted(), 20_001);
}

// --- shape and threads -----------------------------------------------------------------

#[test]
fn signal_json_shape() {
    let d = Detectors::new(DetectorConfig::default());
    let s = d
        .on_sandbox_violation(PLUGIN, "ptrace", "kill", T0)
        .remove(0);
    let v = serde_json::to_value(&s).unwrap();
    assert_eq!(v["kind"], "sandbox_violation");
    assert_eq!(v["observed_as"], "self");
    assert_eq!(v["workload"], PLUGIN);
    assert_eq!(v["time_ms"], T0);
    assert_eq!(v["evidence"]["suppressed"], 0);
    let back: Signal = serde_json::from_value(v).unwrap();
    assert_eq!(back, s);
    let peer: Observed = serde_json::from_str("\"peer\"").unwrap();
    assert_eq!(peer, Observed::Peer);
}

#[test]
fn shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Detectors>();
    let d = std::sync::Arc::new(usual(100.0, 65536.0));
    let threads: Vec<_> = (0..2)
        .map(|t| {
            let d = d.clone();
            std::thread::spawn(move || {
                let id = format!("spiffe://nexus.local/w{t}");
                drive(&d, &event(&id), T0, T0 + 20_000, 100).len()
            })
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 0);
    }
    assert_eq!(d.tracked(), 2);
}

// --- budgets ---------------------------------------------------------------------------

fn budget(rps: f64) -> Budget {
    Budget {
        requests_per_s: rps,
        egress_bytes: 1 << 20,
        distinct_clauses: 2,
        window: Duration::from_secs(10),
    }
}

#[test]
fn a_budget_overrun_signals_from_the_first_second_and_escalates() {
    // The usual rate is high (the prior says 1000/s), but the binding declares 100/s.
    let d = usual(1000.0, 65536.0);
    let ev = event(PLUGIN);
    let b = budget(100.0);
    let mut out = Vec::new();
    for i in 0..1450u64 {
        out.extend(d.on_request(&ev, Some(&b), T0 + i * 1000 / 1450));
    }
    let over = of(&out, SignalKind::BudgetExceeded);
    assert!(!over.is_empty(), "{out:?}");
    assert_eq!(over[0].evidence["budget"], "requests_per_s");
    assert!(over[0].time_ms - T0 < 100, "{:?}", over[0]);
    let clear = over.iter().find(|s| s.score >= 2.0).expect("a 2x overrun");
    assert!(clear.time_ms - T0 < 200, "{clear:?}");
    assert!(of(&out, SignalKind::RateSpike).is_empty(), "{out:?}");
}

#[test]
fn within_budget_is_silent() {
    let d = usual(50.0, 65536.0);
    let ev = event(PLUGIN);
    let b = budget(100.0);
    let mut out = Vec::new();
    for i in 0..(60 * 50u64) {
        out.extend(d.on_request(&ev, Some(&b), T0 + i * 20));
    }
    assert!(out.is_empty(), "{out:?}");
}

#[test]
fn egress_and_distinct_clause_budgets() {
    let d = usual(10.0, 1e9);
    let b = budget(100.0);
    let mut ev = event(PLUGIN);
    ev.bytes_out = 400 << 10;
    let mut out = Vec::new();
    for i in 0..3 {
        out.extend(d.on_request(&ev, Some(&b), T0 + i * 100));
    }
    let e = of(&out, SignalKind::BudgetExceeded);
    assert_eq!(e.len(), 1, "{out:?}");
    assert_eq!(e[0].evidence["budget"], "egress_bytes");
    assert_eq!(e[0].time_ms, T0 + 200);

    let d = usual(10.0, 1e9);
    let mut out = Vec::new();
    for (i, c) in ["c-1", "c-2", "c-1", "c-3"].iter().enumerate() {
        let mut ev = event(PLUGIN);
        ev.clause = Some(c);
        out.extend(d.on_request(&ev, Some(&b), T0 + i as u64 * 100));
    }
    let c = of(&out, SignalKind::BudgetExceeded);
    assert_eq!(c.len(), 1, "{out:?}");
    assert_eq!(c[0].evidence["budget"], "distinct_clauses");
    assert_eq!(c[0].evidence["observed"], 3);
    assert_eq!(c[0].time_ms, T0 + 300);
    // Outside the window, the old clauses no longer count.
    let mut ev = event(PLUGIN);
    ev.clause = Some("c-4");
    assert!(d.on_request(&ev, Some(&b), T0 + 20_000).is_empty());
}

// --- slow ramps, drift bound, long window ----------------------------------------------

/// A linear ramp from `from_rps` to `to_rps` over `secs`, starting at `t0`: the first
/// rate-spike signal's time and the rate at that time.
fn ramp(d: &Detectors, t0: u64, secs: u64, from_rps: f64, to_rps: f64) -> Option<(u64, f64)> {
    let ev = event(PLUGIN);
    let mut t = 0f64;
    while t < secs as f64 * 1000.0 {
        let rate = from_rps + (to_rps - from_rps) * t / (secs as f64 * 1000.0);
        let now = t0 + t as u64;
        if let Some(s) = d
            .on_request(&ev, None, now)
            .into_iter()
            .find(|s| s.kind == SignalKind::RateSpike)
        {
            return Some((s.time_ms, rate));
        }
        t += 1000.0 / rate;
    }
    None
}

#[test]
fn a_slow_ramp_to_20x_is_caught_before_4x_lasts_a_minute() {
    // Known at 20/s (the fleet's baseline), then 20 -> 400/s over 5 minutes.
    let d = usual(20.0, 65536.0);
    let ev = event(PLUGIN);
    assert!(drive(&d, &ev, T0, T0 + 120_000, 20).is_empty());
    let start = T0 + 120_000;
    let (at, rate) = ramp(&d, start, 300, 20.0, 400.0).expect("the ramp was never caught");
    // The ramp passes 4x (80/s) at 300 * 60/380 s = 47.4 s.
    let past_4x_ms = (at - start) as f64 - 47_400.0;
    eprintln!(
        "caught at {rate:.0}/s, {:.1} s into the ramp",
        (at - start) as f64 / 1000.0
    );
    assert!(
        past_4x_ms < 60_000.0,
        "caught {past_4x_ms} ms after passing 4x"
    );
    assert!(rate < 4.0 * 20.0 * 1.3, "caught at {rate}/s");
}

#[test]
fn without_the_drift_bound_the_same_ramp_would_be_learned() {
    // The control: with growth unbounded, the baseline follows the ramp and the
    // short-window detector alone never sees it.
    let mut c = DetectorConfig::default();
    c.baseline.prior_rate_per_s = 20.0;
    c.baseline.max_growth = 1e12;
    c.baseline.long_factor = 1e12;
    let d = Detectors::new(c);
    let ev = event(PLUGIN);
    drive(&d, &ev, T0, T0 + 120_000, 20);
    assert_eq!(ramp(&d, T0 + 120_000, 300, 20.0, 400.0), None);
}

#[test]
fn the_long_window_catches_what_the_short_one_learned_within_the_drift_bound() {
    // A ramp just inside the drift bound (x2 per period): the short baseline follows,
    // the long one (horizon 24 periods, as the defaults' 1h and 24h) lags and the
    // comparison trips. Time compressed 60x.
    let mut c = DetectorConfig::default();
    c.baseline.prior_rate_per_s = 20.0;
    c.baseline.growth_period = Duration::from_secs(60);
    c.baseline.long_horizon = Duration::from_secs(1440);
    let d = Detectors::new(c);
    let ev = event(PLUGIN);
    let mut rate = 20.0f64;
    let mut t = T0;
    let mut caught = None;
    while t < T0 + 300_000 && caught.is_none() {
        for s in d.on_request(&ev, None, t) {
            if s.evidence.get("trigger").and_then(|v| v.as_str()) == Some("long_window") {
                caught = Some((t, rate, s));
            }
        }
        // x1.9 per minute: just under the bound.
        rate = 20.0 * 1.9f64.powf((t - T0) as f64 / 60_000.0);
        t += (1000.0 / rate) as u64;
    }
    let (at, rate, s) = caught.expect("the long window never tripped");
    eprintln!(
        "long window tripped at {rate:.0}/s after {} s: {s:?}",
        (at - T0) / 1000
    );
    assert!(rate < 400.0, "{rate}");
    assert!(num(&s, "baseline_per_s") >= 4.0 * num(&s, "long_baseline_per_s"));
}

// --- fleet baselines -------------------------------------------------------------------

#[test]
fn a_new_replica_starts_from_the_fleet_baseline_not_the_prior() {
    let fleet = Baseline {
        rate_per_s: 200.0,
        bytes_per_s: 65536.0,
        long_rate_per_s: 200.0,
        long_bytes_per_s: 65536.0,
    };
    // Against the prior (25/s), 200/s is a spike; against the fleet's 200/s it is not.
    let d = Detectors::new(DetectorConfig::default());
    let ev = event(PLUGIN);
    assert!(!drive(&d, &ev, T0, T0 + 1000, 200).is_empty());
    let d = Detectors::new(DetectorConfig::default());
    d.set_fleet([(PLUGIN.to_string(), fleet)]);
    assert!(drive(&d, &ev, T0, T0 + 60_000, 200).is_empty());
    // A workload first seen on the prior switches to the fleet's once it arrives.
    let d = Detectors::new(DetectorConfig::default());
    assert!(drive(&d, &ev, T0, T0 + 100, 20).is_empty());
    d.set_fleet([(PLUGIN.to_string(), fleet)]);
    assert!(drive(&d, &ev, T0 + 100, T0 + 60_000, 200).is_empty());
    // Unusable values are never taken.
    let d = Detectors::new(DetectorConfig::default());
    let bad = Baseline {
        rate_per_s: f64::INFINITY,
        ..fleet
    };
    d.set_fleet([(PLUGIN.to_string(), bad)]);
    assert!(!drive(&d, &ev, T0, T0 + 1000, 200).is_empty());
}

#[test]
fn the_fleet_report_carries_own_workloads_with_their_ticks() {
    let d = usual(50.0, 1000.0);
    let mut own = event(PLUGIN);
    own.observed_as = Observed::Own;
    drive(&d, &own, T0, T0 + 5_500, 50);
    drive(&d, &event("spiffe://nexus.local/peer"), T0, T0 + 5_500, 50);
    let r = d.fleet_report();
    assert_eq!(r.len(), 1, "{r:?}");
    assert_eq!(r[0].workload, PLUGIN);
    assert_eq!(r[0].ticks, 4);
    assert!((r[0].baseline.rate_per_s - 50.0).abs() < 1.0, "{r:?}");
    assert!(d.fleet_report().is_empty());
}
