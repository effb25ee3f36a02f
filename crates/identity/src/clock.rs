//! The time Nexus enforces with: certificate validity, open executions in policy
//! decisions, the end of a connection at its peer's not-after, execution record times.
//!
//! It is the wall clock, except that it never goes back and never runs slower than the
//! monotonic clock. A wall clock stepped back (a bad NTP server, an operator, a VM
//! restored from a snapshot) would otherwise reopen executions that had ended and make
//! expired certificates valid again: fail open. Here a step back is ignored and time
//! goes on at the monotonic clock's pace; a step forward is taken (and kept, since
//! going back is what is refused), which can only end executions and certificates
//! early: fail closed. Revocations are not timed here at all: the gateway lifts them.

use std::sync::LazyLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

/// Readings combined into the enforced time.
#[derive(Debug)]
struct Clock {
    /// The monotonic origin.
    base: Instant,
    /// The largest `wall − monotonic` seen (nanoseconds): enforced time is monotonic
    /// time plus this, so it is at least every wall reading and never decreases.
    offset_ns: AtomicI64,
}

impl Clock {
    /// The enforced time, in unix nanoseconds, from a wall reading and a monotonic one
    /// (nanoseconds since `base`).
    fn read(&self, wall_ns: i64, monotonic_ns: i64) -> i128 {
        let candidate = wall_ns.saturating_sub(monotonic_ns);
        // One read-modify-write: concurrent readers agree on the order of offsets.
        let offset = self
            .offset_ns
            .fetch_max(candidate, Ordering::Relaxed)
            .max(candidate);
        i128::from(monotonic_ns) + i128::from(offset)
    }
}

static CLOCK: LazyLock<Clock> = LazyLock::new(|| Clock {
    base: Instant::now(),
    offset_ns: AtomicI64::new(i64::MIN),
});

/// Now, in unix nanoseconds (see the module docs).
pub fn unix_nanos() -> i128 {
    let clock = &*CLOCK;
    let monotonic = i64::try_from(clock.base.elapsed().as_nanos()).unwrap_or(i64::MAX);
    let wall = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
    clock.read(wall, monotonic)
}

/// Now (see the module docs), in UTC.
pub fn now() -> time::OffsetDateTime {
    time::OffsetDateTime::from_unix_timestamp_nanos(unix_nanos())
        .unwrap_or(time::OffsetDateTime::UNIX_EPOCH)
}

/// Now (see the module docs), as certificate verification takes it.
pub fn unix_time() -> rustls_pki_types::UnixTime {
    let secs = u64::try_from(unix_nanos() / 1_000_000_000).unwrap_or(0);
    rustls_pki_types::UnixTime::since_unix_epoch(std::time::Duration::from_secs(secs))
}

/// [`unix_time`] for rustls: configs built with it hand it to the certificate verifiers.
#[derive(Debug)]
pub struct EnforcedTime;

impl rustls::time_provider::TimeProvider for EnforcedTime {
    fn current_time(&self) -> Option<rustls_pki_types::UnixTime> {
        Some(unix_time())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEC: i64 = 1_000_000_000;

    fn clock() -> Clock {
        Clock {
            base: Instant::now(),
            offset_ns: AtomicI64::new(i64::MIN),
        }
    }

    #[test]
    fn follows_a_steady_wall_clock() {
        let c = clock();
        let start = 1_800_000_000 * SEC;
        assert_eq!(c.read(start, 0), i128::from(start));
        assert_eq!(
            c.read(start + 5 * SEC, 5 * SEC),
            i128::from(start + 5 * SEC)
        );
    }

    /// A step back is ignored: time goes on from where it was, at the monotonic pace.
    #[test]
    fn a_wall_clock_stepped_back_does_not_turn_time_back() {
        let c = clock();
        let start = 1_800_000_000 * SEC;
        assert_eq!(c.read(start, 0), i128::from(start));
        let hour = 3600 * SEC;
        assert_eq!(
            c.read(start + 10 * SEC - hour, 10 * SEC),
            i128::from(start + 10 * SEC)
        );
        assert_eq!(
            c.read(start + 20 * SEC - hour, 20 * SEC),
            i128::from(start + 20 * SEC)
        );
    }

    /// A step forward is taken at once and kept after the wall clock is stepped back.
    #[test]
    fn a_wall_clock_stepped_forward_is_taken_and_kept() {
        let c = clock();
        let start = 1_800_000_000 * SEC;
        c.read(start, 0);
        let ahead = start + 600 * SEC + SEC;
        assert_eq!(c.read(ahead, SEC), i128::from(ahead));
        assert_eq!(c.read(start + 2 * SEC, 2 * SEC), i128::from(ahead + SEC));
    }

    #[test]
    fn the_process_clock_never_decreases() {
        let mut last = unix_nanos();
        for _ in 0..1000 {
            let t = unix_nanos();
            assert!(t >= last);
            last = t;
        }
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .expect("after 1970");
        assert!(unix_nanos() >= i128::try_from(wall.as_nanos()).expect("fits"));
    }
}
