//! The one backoff: the delays between retries of every loop that waits for something
//! outside to come back (a backend's connection, etcd's watch, its status, a lease, a
//! registration, the first authentication).
//!
//! Delays grow exponentially (doubling) from a first delay to a cap, with "equal jitter":
//! each delay is half its step plus a random share of the other half, so that many tasks
//! that failed together (every upstream of a restarted host, every watch after an etcd
//! outage) do not retry in step, and no delay exceeds the cap. The steps and randomness
//! come from `backon`'s exponential builder; this type adds only the jitter's placement
//! below the cap and `reset`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

/// Exponential, jittered delays between retries; [`reset`](Self::reset) after a success.
#[derive(Debug)]
pub struct Backoff {
    builder: ExponentialBuilder,
    delays: <ExponentialBuilder as BackoffBuilder>::Backoff,
    max: Duration,
}

impl Backoff {
    /// Delays of about `first` at first (between `first / 2` and `first`), doubling up to
    /// `max` (between `max / 2` and `max`). A `max` below `first` is raised to `first`.
    pub fn new(first: Duration, max: Duration) -> Self {
        let max = max.max(first);
        // backon's jitter adds a random share of up to 100 % to each step: halving the
        // steps puts every delay in [step / 2, step), whose top is the cap asked for.
        let builder = ExponentialBuilder::new()
            .with_min_delay(first / 2)
            .with_max_delay(max / 2)
            .with_factor(2.0)
            .with_jitter()
            .without_max_times();
        Self {
            builder,
            delays: builder.build(),
            max,
        }
    }

    /// The delay before the next attempt; the one after is twice as long (up to the cap).
    pub fn next_delay(&mut self) -> Duration {
        // Built without a limit on attempts, the iterator never ends; the cap stands in
        // should it ever do.
        self.delays.next().unwrap_or(self.max).min(self.max)
    }

    /// Starts again from the first delay (after an attempt succeeded).
    pub fn reset(&mut self) {
        self.delays = self.builder.build();
    }

    /// Sleeps for [`next_delay`](Self::next_delay).
    pub async fn sleep(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    /// Whether `d` lies in [`step / 2`, `step`], allowing for backon's f32 arithmetic.
    fn within(d: Duration, step: Duration) -> bool {
        d + MS >= step / 2 && d <= step + MS
    }

    #[test]
    fn delays_double_up_to_the_cap_and_reset() {
        for _ in 0..50 {
            let mut b = Backoff::new(100 * MS, 500 * MS);
            for step in [100, 200, 400, 500, 500, 500] {
                let d = b.next_delay();
                assert!(
                    within(d, step * MS),
                    "{d:?} not within [{step}/2, {step}] ms"
                );
            }
            b.reset();
            let d = b.next_delay();
            assert!(within(d, 100 * MS), "{d:?} after reset");
        }
    }

    #[test]
    fn delays_are_spread() {
        let mut seen = std::collections::HashSet::new();
        for _ in 0..20 {
            seen.insert(Backoff::new(Duration::from_secs(1), Duration::from_secs(1)).next_delay());
        }
        assert!(seen.len() > 1, "20 first delays all equal: {seen:?}");
    }

    #[test]
    fn cap_below_first_is_raised() {
        let mut b = Backoff::new(200 * MS, 10 * MS);
        for _ in 0..5 {
            assert!(within(b.next_delay(), 200 * MS));
        }
    }
}
