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

    /// Picks the next usable endpoint round-robin, skipping those `skip` rejects (e.g.
    /// already tried by this call). An unusable endpoint's turn is given up by taking
    /// another tick of the cursor, so the usable ones still share calls evenly.
    #[inline]
    pub fn pick(
        &self,
        rr: &RoundRobin,
        skip: impl Fn(usize) -> bool,
    ) -> Option<(usize, &Arc<Upstream>)> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let start = rr.next();
        for i in 0..n {
            // The first tick is the call's own; later ones are taken only when skipping.
            let pos = if i == 0 { start } else { rr.next() };
            let idx = pos % n;
            let ep = &self.endpoints[idx];
            if ep.is_usable() && !skip(idx) {
                return Some((idx, ep));
            }
        }
        // Concurrent calls may have moved the cursor past some; fall back to a scan.
        self.endpoints
            .iter()
            .enumerate()
            .find(|(i, ep)| ep.is_usable() && !skip(*i))
    }
}

impl EndpointSet {
    /// The first endpoint after `idx` (cyclically, `idx` itself excluded) that `want`
    /// accepts: the stand-in when the round-robin pick is not ready for a call.
    #[inline]
    pub fn next_after(
        &self,
        idx: usize,
        want: impl Fn(usize, &Upstream) -> bool,
    ) -> Option<(usize, &Arc<Upstream>)> {
        let n = self.endpoints.len();
        (1..n)
            .map(|k| (idx + k) % n)
            .map(|i| (i, &self.endpoints[i]))
            .find(|(i, ep)| want(*i, ep))
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
            let (_, ep) = s.pick(&rr, |_| false).unwrap();
            counts[(ep.addr().port() - 1000) as usize] += 1;
        }
        assert_eq!(counts, [100, 100, 100]);
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert!(set(0).pick(&RoundRobin::default(), |_| false).is_none());
    }

    #[test]
    fn skipped_endpoints_leave_an_even_share() {
        let s = set(4);
        let rr = RoundRobin::default();
        let mut counts = [0usize; 4];
        for _ in 0..300 {
            let (_, ep) = s.pick(&rr, |i| i == 1).unwrap();
            counts[(ep.addr().port() - 1000) as usize] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
        assert!(s.pick(&rr, |_| true).is_none());
    }

    #[test]
    fn next_after_wraps_and_excludes_the_start() {
        let s = set(4);
        let port = |r: Option<(usize, &Arc<Upstream>)>| r.map(|(_, u)| u.addr().port());
        assert_eq!(port(s.next_after(2, |_, _| true)), Some(1003));
        assert_eq!(port(s.next_after(3, |i, _| i != 0)), Some(1001));
        assert_eq!(port(s.next_after(1, |i, _| i == 1)), None);
    }
}
