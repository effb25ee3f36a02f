//! The fixed-size pieces every detector is built from: a sliding-window counter over a
//! ring of slots, an EWMA baseline, and the cooldown gate that turns a flood into one
//! signal.

use std::time::Duration;

/// Slots per sliding window: the window moves in steps of a tenth of its length.
pub(crate) const SLOTS: usize = 10;

/// A sliding window of `SLOTS` slots of `slot_ms` each.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Span {
    slot_ms: u64,
}

impl Span {
    pub(crate) fn new(window: Duration) -> Self {
        let ms = u64::try_from(window.as_millis()).unwrap_or(u64::MAX);
        Self {
            slot_ms: (ms / SLOTS as u64).max(1),
        }
    }

    pub(crate) fn slot_ms(self) -> u64 {
        self.slot_ms
    }

    pub(crate) fn slot(self, now_ms: u64) -> u64 {
        now_ms / self.slot_ms
    }

    /// The window's length as counted (a multiple of the slot).
    pub(crate) fn window_ms(self) -> u64 {
        self.slot_ms * SLOTS as u64
    }

    /// The time a sum at `now_ms` actually covers: the full earlier slots and the part
    /// of the current one that has elapsed, so a rate is exact mid-slot.
    pub(crate) fn covered_ms(self, now_ms: u64) -> u64 {
        (SLOTS as u64 - 1) * self.slot_ms + now_ms % self.slot_ms + 1
    }
}

#[derive(Clone, Copy, Debug, Default)]
struct Bucket {
    slot: u64,
    n: u64,
}

/// Counts (events or bytes) per slot; what is older than the window is overwritten.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ring {
    buckets: [Bucket; SLOTS],
}

impl Ring {
    pub(crate) fn add(&mut self, slot: u64, n: u64) {
        let b = &mut self.buckets[(slot % SLOTS as u64) as usize];
        if b.slot != slot {
            *b = Bucket { slot, n: 0 };
        }
        b.n = b.n.saturating_add(n);
    }

    /// The total over the window ending in `slot`.
    pub(crate) fn sum(&self, slot: u64) -> u64 {
        self.buckets
            .iter()
            .filter(|b| b.slot <= slot && b.slot + SLOTS as u64 > slot)
            .fold(0u64, |acc, b| acc.saturating_add(b.n))
    }
}

/// Escalation: within a cooldown a signal still goes out when its score is at least
/// this multiple of the last one's (so 4 → 8 → 16 ..., a handful per cooldown at most).
const ESCALATION: f64 = 2.0;

/// Per-(workload, kind) cooldown.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Gate {
    last_ms: Option<u64>,
    last_score: f64,
    suppressed: u64,
}

impl Gate {
    /// `Some(suppressed since the last signal)` when a signal with `score` may go out
    /// now; otherwise counts it as suppressed.
    pub(crate) fn admit(&mut self, now_ms: u64, score: f64, cooldown_ms: u64) -> Option<u64> {
        let open = match self.last_ms {
            None => true,
            Some(last) => {
                now_ms.saturating_sub(last) >= cooldown_ms || score >= self.last_score * ESCALATION
            }
        };
        if open {
            let suppressed = std::mem::take(&mut self.suppressed);
            self.last_ms = Some(now_ms);
            self.last_score = score;
            Some(suppressed)
        } else {
            self.suppressed = self.suppressed.saturating_add(1);
            None
        }
    }
}

/// An anomalous tick is folded in as at most this multiple of the baseline, at a tenth
/// of the normal weight: a flood moves the baseline by 0.5% a tick (at alpha 0.05)
/// instead of becoming the new normal within seconds.
const ANOMALOUS_CLAMP: f64 = 2.0;
const ANOMALOUS_WEIGHT: f64 = 0.1;

/// An EWMA of a per-tick quantity.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ewma {
    value: f64,
    samples: u32,
}

impl Ewma {
    /// Starts at `value` (a prior or the fleet's baseline), as if already sampled.
    pub(crate) fn seeded(value: f64) -> Self {
        Self { value, samples: 1 }
    }

    pub(crate) fn fold(&mut self, sample: f64, alpha: f64, anomalous: bool) {
        if self.samples == 0 {
            self.value = sample;
        } else {
            let (w, sample) = if anomalous {
                (
                    alpha * ANOMALOUS_WEIGHT,
                    sample.min(self.value * ANOMALOUS_CLAMP),
                )
            } else {
                (alpha, sample)
            };
            self.value += w * (sample - self.value);
        }
        self.samples = self.samples.saturating_add(1);
    }

    pub(crate) fn value(self) -> f64 {
        self.value
    }
}

/// An EWMA whose effective value may grow at most by `up` per sample: it is the EWMA
/// capped by a ceiling that rises at most that fast, and that relaxes slowly (at
/// `relax`) toward the EWMA when it is below. Growth is counted on the ceiling plus
/// `floor` (the prior), so a baseline that fell to zero can still grow back, by at most
/// the prior per growth period. A steady but noisy workload is not
/// biased down (a dip does not drag the ceiling), a ramp cannot teach the value
/// faster than the bound, and a workload that falls quiet is judged by its lower rate
/// at once.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Bounded {
    raw: Ewma,
    ceiling: f64,
}

impl Bounded {
    pub(crate) fn seeded(value: f64) -> Self {
        Self {
            raw: Ewma::seeded(value),
            ceiling: value,
        }
    }

    pub(crate) fn fold(
        &mut self,
        sample: f64,
        alpha: f64,
        anomalous: bool,
        up: f64,
        relax: f64,
        floor: f64,
    ) {
        self.raw.fold(sample, alpha, anomalous);
        let raw = self.raw.value();
        self.ceiling = if raw >= self.ceiling {
            raw.min((self.ceiling + floor) * up - floor)
        } else {
            self.ceiling + relax * (raw - self.ceiling)
        };
    }

    pub(crate) fn value(self) -> f64 {
        self.raw.value().min(self.ceiling)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ring_sums_the_last_window_only() {
        let mut r = Ring::default();
        for slot in 0..25 {
            r.add(slot, 1);
        }
        assert_eq!(r.sum(24), 10);
        assert_eq!(r.sum(30), 4); // slots 21..=24 still inside
        assert_eq!(r.sum(40), 0);
    }

    #[test]
    fn gate_lets_one_through_per_cooldown_unless_the_score_doubles() {
        let mut g = Gate::default();
        assert_eq!(g.admit(0, 4.0, 1000), Some(0));
        assert_eq!(g.admit(10, 5.0, 1000), None);
        assert_eq!(g.admit(20, 5.0, 1000), None);
        assert_eq!(g.admit(30, 8.0, 1000), Some(2));
        assert_eq!(g.admit(1029, 1.0, 1000), None);
        assert_eq!(g.admit(1030, 1.0, 1000), Some(1));
    }

    #[test]
    fn anomalous_samples_move_the_baseline_little() {
        let mut e = Ewma::default();
        e.fold(100.0, 0.1, false);
        e.fold(1000.0, 0.1, true);
        assert!((e.value() - 101.0).abs() < 1e-9, "{}", e.value());
    }

    #[test]
    fn growth_is_bounded_per_sample_and_falls_freely() {
        let mut e = Bounded::seeded(100.0);
        e.fold(300.0, 0.5, false, 1.01, 0.001, 0.0);
        assert!((e.value() - 101.0).abs() < 1e-9, "{}", e.value());
        // Falls with the EWMA at once; the ceiling stays near where it was.
        e.fold(1.0, 0.5, false, 1.01, 0.001, 0.0);
        assert!((e.value() - 100.5).abs() < 1e-9, "{}", e.value());
        e.fold(1.0, 0.5, false, 1.01, 0.001, 0.0);
        assert!((e.value() - 50.75).abs() < 1e-9, "{}", e.value());
        // Back up: the EWMA climbs, and the ceiling (about 101) is not in the way.
        e.fold(100.0, 0.5, false, 1.01, 0.001, 0.0);
        assert!((e.value() - 75.375).abs() < 1e-9, "{}", e.value());
        // From zero, by the floor: (0 + 10) * 2 - 10 = 10 at most.
        let mut z = Bounded::seeded(0.0);
        z.fold(1000.0, 1.0, false, 2.0, 0.001, 10.0);
        assert!((z.value() - 10.0).abs() < 1e-9, "{}", z.value());
    }
}
