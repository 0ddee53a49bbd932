//! Peak-EWMA: power of two choices over latency estimate × (calls in flight + 1),
//! divided by weight (Linkerd's balancer). Each endpoint's [`LatencyEstimate`] is fed
//! with every call's time to response headers: it jumps up at once on a slow answer,
//! decays over time, and counts a failed call as slow.
//!
//! Latency-first (`latency`): the same two choices and the same estimate's atomics, but
//! the estimate follows recent answers (a moving average per answer, not a time-weighted
//! peak, so that one hiccup on a fast node does not make it look slow for seconds), and
//! calls in flight count only past a knee ([`LATENCY_KNEE`]): backends that serve calls
//! concurrently do not slow down with a few more in flight, so a node much slower than
//! its peers gets almost no call until the others are loaded well past the knee. An idle
//! node's estimate still decays over the decay window, so a slow node gets a probe now
//! and then, and is found again once it recovers.
//!
//! The estimate is part of the backend ([`super::Backend`] holds one), so this file
//! depends on no other of the module: the pick ([`super::Balancer::select_with`])
//! draws two endpoints and compares their [`cost`].

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Latency a failed call counts as, at least: a node that fails fast must not look fast.
const FAILURE_PENALTY: Duration = Duration::from_millis(250);

/// What a call costs an endpoint whose latency estimate is `estimate_ns`, with
/// `in_flight` calls on it and `weight` (effective): the two random choices take the
/// cheaper.
#[inline]
pub(super) fn cost(estimate_ns: f64, in_flight: u32, weight: f64) -> f64 {
    // +1 ns: an estimate decayed to zero still ranks by load.
    (estimate_ns + 1.0) * f64::from(in_flight + 1) / weight.max(f64::MIN_POSITIVE)
}

/// Calls in flight at which latency-first starts to weigh load as much as latency: below
/// it, an endpoint's cost is mostly its latency.
pub(super) const LATENCY_KNEE: f64 = 8.0;

/// Share of each answer in latency-first's moving average (1/8: a sample's weight has
/// halved after about 5 more answers).
const RECENT_SHARE: f64 = 0.125;

/// Latency-first's cost of an endpoint: its recent latency, grown by the calls in flight
/// past [`LATENCY_KNEE`], per unit of weight.
#[inline]
pub(super) fn latency_first_cost(estimate_ns: f64, in_flight: u32, weight: f64) -> f64 {
    (estimate_ns + 1.0) * (1.0 + f64::from(in_flight) / LATENCY_KNEE)
        / weight.max(f64::MIN_POSITIVE)
}

/// One endpoint's estimate of its time to response headers: an exponentially weighted
/// moving average that takes a slower answer at once (the peak) and forgets over the
/// decay window while no call ends. Two atomics, so that a call's end takes no lock;
/// times are nanoseconds of [`crate::clock::now_ns`], given by the caller.
#[derive(Debug)]
pub(super) struct LatencyEstimate {
    /// The estimate in nanoseconds (f64 bits), as of `at`.
    ns: AtomicU64,
    at: AtomicU64,
}

impl LatencyEstimate {
    /// An estimate of `initial` at `now` (an endpoint with no call yet).
    pub(super) fn new(initial: Duration, now: u64) -> Self {
        Self {
            ns: AtomicU64::new((initial.as_nanos() as f64).to_bits()),
            at: AtomicU64::new(now),
        }
    }

    /// The estimate at `now`, in nanoseconds, decayed over `decay` since the last call.
    #[inline]
    pub(super) fn get(&self, decay: Duration, now: u64) -> f64 {
        let estimate = f64::from_bits(self.ns.load(Ordering::Relaxed));
        let at = self.at.load(Ordering::Relaxed);
        estimate * weight(decay, now.saturating_sub(at))
    }

    /// Folds in a call that ended at `now`, answered after `to_headers` (`None`: never
    /// answered), `failed` or not. A failure counts as at least [`FAILURE_PENALTY`]; a
    /// call abandoned before its answer says nothing of the backend's speed.
    #[inline]
    pub(super) fn observe(
        &self,
        decay: Duration,
        to_headers: Option<Duration>,
        failed: bool,
        now: u64,
    ) {
        let rtt = match (to_headers, failed) {
            (rtt, true) => rtt.unwrap_or_default().max(FAILURE_PENALTY),
            (Some(rtt), false) => rtt,
            (None, false) => return,
        };
        let rtt = rtt.as_nanos() as f64;
        let estimate = f64::from_bits(self.ns.load(Ordering::Relaxed));
        let at = self.at.load(Ordering::Relaxed);
        let next = if rtt > estimate {
            rtt
        } else {
            let w = weight(decay, now.saturating_sub(at));
            estimate * w + rtt * (1.0 - w)
        };
        // Racing updates may lose one sample: an estimate needs no more.
        self.ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

impl LatencyEstimate {
    /// Latency-first's update: folds in a call's answer with a fixed share
    /// ([`RECENT_SHARE`]), from the estimate as decayed while idle; a failure counts as at
    /// least [`FAILURE_PENALTY`]; an abandoned call says nothing.
    #[inline]
    pub(super) fn observe_recent(
        &self,
        decay: Duration,
        to_headers: Option<Duration>,
        failed: bool,
        now: u64,
    ) {
        let rtt = match (to_headers, failed) {
            (rtt, true) => rtt.unwrap_or_default().max(FAILURE_PENALTY),
            (Some(rtt), false) => rtt,
            (None, false) => return,
        };
        let current = self.get(decay, now);
        let next = current + (rtt.as_nanos() as f64 - current) * RECENT_SHARE;
        self.ns.store(next.to_bits(), Ordering::Relaxed);
        self.at.store(now, Ordering::Relaxed);
    }
}

/// The weight of an estimate `elapsed` nanoseconds old, with decay window `decay`.
#[inline]
fn weight(decay: Duration, elapsed: u64) -> f64 {
    let window = decay.as_nanos() as f64;
    (-(elapsed as f64) / window.max(1.0)).exp()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::{advance, pause, Instant};

    const DECAY: Duration = Duration::from_secs(10);

    /// A clock under tokio's paused time: nanoseconds since `origin`.
    fn now(origin: Instant) -> u64 {
        origin.elapsed().as_nanos() as u64
    }

    fn ms(ns: f64) -> f64 {
        ns / 1e6
    }

    #[tokio::test]
    async fn a_slower_answer_is_taken_at_once() {
        pause();
        let t0 = Instant::now();
        let e = LatencyEstimate::new(Duration::from_millis(30), now(t0));
        assert_eq!(ms(e.get(DECAY, now(t0))), 30.0);
        e.observe(DECAY, Some(Duration::from_millis(200)), false, now(t0));
        assert_eq!(ms(e.get(DECAY, now(t0))), 200.0);
    }

    #[tokio::test]
    async fn a_faster_answer_pulls_down_by_the_estimate_s_age() {
        pause();
        let t0 = Instant::now();
        let e = LatencyEstimate::new(Duration::from_millis(100), now(t0));
        // At once: the old estimate keeps all its weight.
        e.observe(DECAY, Some(Duration::from_millis(10)), false, now(t0));
        assert_eq!(ms(e.get(DECAY, now(t0))), 100.0);
        // One decay window later: e^-1 of the old, the rest of the new.
        advance(DECAY).await;
        e.observe(DECAY, Some(Duration::from_millis(10)), false, now(t0));
        let expected = 100.0 * (-1f64).exp() + 10.0 * (1.0 - (-1f64).exp());
        assert!((ms(e.get(DECAY, now(t0))) - expected).abs() < 1e-6);
    }

    #[tokio::test]
    async fn the_estimate_decays_while_no_call_ends() {
        pause();
        let t0 = Instant::now();
        let e = LatencyEstimate::new(Duration::from_millis(200), now(t0));
        advance(DECAY).await;
        let later = ms(e.get(DECAY, now(t0)));
        assert!((later - 200.0 * (-1f64).exp()).abs() < 1e-6, "{later}");
        // A shorter window forgets faster.
        let short = ms(e.get(Duration::from_secs(1), now(t0)));
        assert!(short < 0.01, "{short}");
    }

    #[tokio::test]
    async fn the_recent_estimate_forgets_a_hiccup_within_a_few_answers() {
        pause();
        let t0 = Instant::now();
        let e = LatencyEstimate::new(Duration::from_millis(1), now(t0));
        e.observe_recent(DECAY, Some(Duration::from_millis(20)), false, now(t0));
        let after_hiccup = ms(e.get(DECAY, now(t0)));
        assert!(
            (after_hiccup - (1.0 + 19.0 * RECENT_SHARE)).abs() < 1e-6,
            "{after_hiccup}"
        );
        for _ in 0..20 {
            e.observe_recent(DECAY, Some(Duration::from_millis(1)), false, now(t0));
        }
        assert!(ms(e.get(DECAY, now(t0))) < 1.2);
        // Load counts past the knee only: 4 in flight on a 1 ms node is still far
        // cheaper than an idle 11 ms one.
        let fast = latency_first_cost(1e6, 4, 1.0);
        let slow = latency_first_cost(11e6, 0, 1.0);
        assert!(fast * 5.0 < slow, "{fast} {slow}");
        assert!(latency_first_cost(1e6, 100, 1.0) > slow);
    }

    #[tokio::test]
    async fn a_failure_counts_as_slow_and_an_abandoned_call_not_at_all() {
        pause();
        let t0 = Instant::now();
        let e = LatencyEstimate::new(Duration::from_millis(1), now(t0));
        e.observe(DECAY, Some(Duration::from_micros(50)), true, now(t0));
        assert_eq!(ms(e.get(DECAY, now(t0))), 250.0);
        let fresh = LatencyEstimate::new(Duration::from_millis(1), now(t0));
        fresh.observe(DECAY, None, true, now(t0));
        assert_eq!(ms(fresh.get(DECAY, now(t0))), 250.0);
        advance(Duration::from_secs(1)).await;
        let before = e.get(DECAY, now(t0));
        e.observe(DECAY, None, false, now(t0));
        assert_eq!(e.get(DECAY, now(t0)), before, "abandoned: nothing learnt");
    }
}
