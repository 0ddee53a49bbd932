//! Round-robin, per call: a rotation over the snapshot, smooth and weighted when the
//! endpoints' weights differ (nginx's algorithm: weights 3:1 give `a a b a`, not bursts).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use super::{scan, Backend, EndpointSet, Fit};

/// Longest rotation kept per snapshot; larger weight sums are scaled down to it.
const MAX_PERIOD: u64 = 1 << 16;

/// Ticks of the cursor tried before falling back to a scan, beyond one per endpoint.
const EXTRA_TICKS: usize = 8;

/// A snapshot's weighted rotation: endpoint indices in smooth weighted order, one
/// period long; empty when all weights are equal (the rotation is then index order).
#[derive(Debug, Default)]
pub(super) struct Schedule(Box<[u32]>);

impl Schedule {
    /// The rotation of `backends` by their weights.
    pub(super) fn new(backends: &[Arc<Backend>]) -> Self {
        let weights: Vec<u64> = backends.iter().map(|b| u64::from(b.weight())).collect();
        if weights.windows(2).all(|w| w[0] == w[1]) {
            return Self::default();
        }
        Self(smooth_order(&weights).into_boxed_slice())
    }
}

/// One period of the smooth weighted order of `weights` (nginx's algorithm: 3:1 gives
/// `0 0 1 0`): indices, each as often as its weight (reduced by their common divisor,
/// and scaled down to [`MAX_PERIOD`] in all). A zero weight never appears; all zero
/// gives an empty order.
pub(super) fn smooth_order(weights: &[u64]) -> Vec<u32> {
    let g = weights.iter().fold(0, |a, &w| gcd(a, w)).max(1);
    let mut weights: Vec<u64> = weights.iter().map(|w| w / g).collect();
    let total: u64 = weights.iter().sum();
    if total > MAX_PERIOD {
        for w in weights.iter_mut().filter(|w| **w > 0) {
            *w = (*w * MAX_PERIOD / total).max(1);
        }
    }
    let total: u64 = weights.iter().sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(total as usize);
    for _ in 0..total {
        let mut best = 0;
        for (i, w) in weights.iter().enumerate() {
            current[i] += *w as i64;
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total as i64;
        order.push(best as u32);
    }
    order
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// The rotation's cursor, shared by all calls of one service.
#[derive(Debug, Default)]
pub(super) struct RoundRobin {
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// A rotation starting at a random turn (a subset's or zone's own, made anew with
    /// each snapshot: not always the first endpoint first).
    pub(super) fn starting_anywhere() -> Self {
        Self {
            cursor: AtomicUsize::new(fastrand::usize(..1 << 16)),
        }
    }

    /// The next preferred endpoint in the rotation (else the first usable one it met).
    /// An endpoint passed over gives up its turn by taking another tick, so the others
    /// still share calls in proportion to their weights.
    #[inline(always)]
    pub(super) fn pick<'s>(
        &self,
        set: &'s EndpointSet,
        fit: impl Fn(usize, &Backend) -> Fit,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        if set.backends.is_empty() {
            return None;
        }
        // The call's own turn, which nearly every call takes: kept small so that it
        // inlines into the caller.
        let (idx, b) = self.tick(set);
        let first = fit(idx, b);
        if first == Fit::Preferred {
            return Some((idx, b));
        }
        self.pass_over(set, fit, (first == Fit::Usable).then_some((idx, b)))
    }

    /// The endpoint at the cursor's next tick.
    #[inline(always)]
    fn tick<'s>(&self, set: &'s EndpointSet) -> (usize, &'s Arc<Backend>) {
        let schedule = &set.schedule.0;
        let pos = self.cursor.fetch_add(1, Ordering::Relaxed);
        let idx = if schedule.is_empty() {
            pos % set.backends.len()
        } else {
            schedule[pos % schedule.len()] as usize
        };
        (idx, &set.backends[idx])
    }

    /// The rest of [`RoundRobin::pick`], when the call's own turn fell on an endpoint
    /// not preferred: further ticks, then a scan.
    #[cold]
    #[inline(never)]
    fn pass_over<'s>(
        &self,
        set: &'s EndpointSet,
        fit: impl Fn(usize, &Backend) -> Fit,
        mut usable: Option<(usize, &'s Arc<Backend>)>,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        let n = set.backends.len();
        let period = if set.schedule.0.is_empty() {
            n
        } else {
            set.schedule.0.len()
        };
        for _ in 1..period.min(n + EXTRA_TICKS) {
            let (idx, b) = self.tick(set);
            match fit(idx, b) {
                Fit::Preferred => return Some((idx, b)),
                Fit::Usable => {
                    usable.get_or_insert((idx, b));
                }
                Fit::No => {}
            }
        }
        // Concurrent calls may have moved the cursor past some; fall back to a scan.
        usable.or_else(|| scan(set, fit))
    }
}

#[cfg(test)]
mod tests {
    use super::super::tests::{port, set_with};
    use super::super::Balancer;

    fn sequence(weights: &[u32], calls: usize) -> Vec<usize> {
        let s = set_with(weights.len(), weights);
        let b = Balancer::default();
        (0..calls)
            .map(|_| port(b.select_with(&s, |_| true).unwrap().1))
            .collect()
    }

    #[test]
    fn equal_weights_alternate_exactly() {
        assert_eq!(sequence(&[1, 1, 1], 7), [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(sequence(&[5, 5], 4), [0, 1, 0, 1]);
    }

    #[test]
    fn weights_interleave_smoothly() {
        assert_eq!(sequence(&[3, 1], 8), [0, 0, 1, 0, 0, 0, 1, 0]);
        assert_eq!(sequence(&[5, 1, 1], 7), [0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(sequence(&[30, 10], 4), [0, 0, 1, 0]);
    }

    #[test]
    fn skipped_endpoints_leave_a_fair_share() {
        let s = set_with(3, &[2, 1, 1]);
        let b = Balancer::default();
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            counts[port(b.select_with(&s, |i| i != 1).unwrap().1)] += 1;
        }
        assert_eq!(counts[1], 0);
        assert!((190..=210).contains(&counts[0]), "{counts:?}");
    }

    #[test]
    fn huge_weight_sums_are_bounded() {
        let mut weights = [10_000; 10];
        weights[9] = 1;
        let s = set_with(10, &weights);
        let period = s.schedule.0.len() as u64;
        assert!((super::MAX_PERIOD - 10..=super::MAX_PERIOD + 10).contains(&period));
        let b = Balancer::default();
        assert_eq!(b.select_with(&s, |i| i == 9).map(|(i, _)| i), Some(9));
    }
}
