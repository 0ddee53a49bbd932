//! Slow start: a new or recovered endpoint's weight ramps from 10 % to 100 % over the
//! service's slow-start window (Envoy's and HAProxy's rule), so that a cold node is not
//! handed a full share at once. Every policy reads the ramp through the endpoint's
//! effective weight; round-robin also as the odds of taking its turn.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Share of its weight an endpoint starts slow start with (Envoy's and HAProxy's 10 %).
const FLOOR: f64 = 0.1;

/// When an endpoint last joined or came back from an ejection: the ramp's origin, in
/// nanoseconds of [`crate::clock::now_ns`], given by the caller.
#[derive(Debug)]
pub(super) struct SlowStart {
    since: AtomicU64,
}

impl SlowStart {
    /// An endpoint that joined at `now`.
    pub(super) fn new(now: u64) -> Self {
        Self {
            since: AtomicU64::new(now),
        }
    }

    /// Starts the ramp again at `now` (the endpoint came back from an ejection).
    pub(super) fn restart(&self, now: u64) {
        self.since.store(now, Ordering::Relaxed);
    }

    /// The share of its weight the endpoint gets at `now`, with slow-start `window`
    /// (none: always 1): the ramp runs from the later of its own origin and
    /// `recovered_at` (its connection's last recovery, 0 if none).
    #[inline]
    pub(super) fn ramp(&self, window: Option<Duration>, recovered_at: u64, now: u64) -> f64 {
        let Some(window) = window else {
            return 1.0;
        };
        let since = self.since.load(Ordering::Relaxed).max(recovered_at);
        let elapsed = now.saturating_sub(since) as f64;
        let window = window.as_nanos() as f64;
        if elapsed >= window {
            return 1.0;
        }
        FLOOR + (1.0 - FLOOR) * elapsed / window
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const WINDOW: Option<Duration> = Some(Duration::from_millis(400));

    #[test]
    fn the_ramp_rises_from_the_floor_to_full_over_the_window() {
        let s = SlowStart::new(1_000 * MS);
        assert_eq!(s.ramp(WINDOW, 0, 1_000 * MS), FLOOR);
        assert!((s.ramp(WINDOW, 0, 1_200 * MS) - 0.55).abs() < 1e-9);
        assert_eq!(s.ramp(WINDOW, 0, 1_400 * MS), 1.0);
        assert_eq!(s.ramp(WINDOW, 0, 9_000 * MS), 1.0);
        assert_eq!(s.ramp(None, 0, 1_000 * MS), 1.0, "no slow start");
    }

    #[test]
    fn a_restart_or_a_recovered_connection_starts_the_ramp_again() {
        let s = SlowStart::new(0);
        assert_eq!(s.ramp(WINDOW, 0, 1_000 * MS), 1.0);
        s.restart(1_000 * MS);
        assert!((s.ramp(WINDOW, 0, 1_100 * MS) - 0.325).abs() < 1e-9);
        // The connection came back later than that: the ramp runs from there.
        assert_eq!(s.ramp(WINDOW, 1_100 * MS, 1_100 * MS), FLOOR);
        // A clock that reads before the origin (racing readers) counts as the origin.
        assert_eq!(s.ramp(WINDOW, 0, 900 * MS), FLOOR);
    }
}
