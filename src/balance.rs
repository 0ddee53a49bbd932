//! How a backend is picked: round-robin, per call, over a service's usable endpoints.
//!
//! The discovery task publishes an immutable [`EndpointSet`] whenever the set changes;
//! calls read it without locks and advance an atomic cursor.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use crate::upstream::Upstream;

/// An immutable snapshot of a service's endpoints, sorted by address.
#[derive(Debug, Default)]
pub struct EndpointSet {
    endpoints: Box<[Arc<Upstream>]>,
}

impl EndpointSet {
    /// A snapshot of these endpoints (sorted by address for a stable order).
    pub fn new(mut endpoints: Vec<Arc<Upstream>>) -> Self {
        endpoints.sort_by(|a, b| a.addr().as_str().cmp(b.addr().as_str()));
        Self {
            endpoints: endpoints.into_boxed_slice(),
        }
    }

    /// Number of endpoints, usable or not.
    pub fn len(&self) -> usize {
        self.endpoints.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.endpoints.is_empty()
    }

    /// All endpoints.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Upstream>> {
        self.endpoints.iter()
    }

    /// The first usable endpoint at or after position `from` (wrapping), with the
    /// position after it, so that retries move on to the next one.
    #[inline]
    pub fn next_usable(&self, from: usize) -> Option<(usize, &Arc<Upstream>)> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        (0..n).find_map(|i| {
            let pos = from.wrapping_add(i);
            let ep = &self.endpoints[pos % n];
            ep.is_usable().then_some((pos.wrapping_add(1), ep))
        })
    }
}

/// A round-robin cursor shared by all calls of one service.
#[derive(Debug, Default)]
pub struct RoundRobin {
    cursor: AtomicUsize,
}

impl RoundRobin {
    /// The starting position for the next call.
    #[inline]
    pub fn next(&self) -> usize {
        self.cursor.fetch_add(1, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::UpstreamConfig;

    fn set(n: usize) -> EndpointSet {
        let cfg = UpstreamConfig::default();
        EndpointSet::new(
            (0..n)
                .map(|i| Upstream::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap(), &cfg))
                .collect(),
        )
    }

    #[test]
    fn round_robin_is_even() {
        let s = set(3);
        let rr = RoundRobin::default();
        let mut counts = [0usize; 3];
        for _ in 0..300 {
            let (_, ep) = s.next_usable(rr.next()).unwrap();
            counts[(ep.addr().port() - 1000) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert!(set(0).next_usable(7).is_none());
    }

    #[test]
    fn retries_move_on() {
        let s = set(3);
        let (next, a) = s.next_usable(5).unwrap();
        let (_, b) = s.next_usable(next).unwrap();
        assert_ne!(a.addr(), b.addr());
    }
}
