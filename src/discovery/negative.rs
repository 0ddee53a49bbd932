//! Names dropped from the table of services while their source listed nothing for
//! them, each remembered for a while, so that a burst of made-up names costs one look-up
//! per name.

use std::collections::{HashMap, VecDeque};
use std::time::Duration;

use crate::route::ServiceName;

/// Most names remembered as having no endpoints (each at most
/// [`crate::route::MAX_SERVICE_NAME_LEN`] bytes: under 2 MiB in all).
const NEGATIVE_CAPACITY: usize = 4096;
/// How long a name dropped to make room, with nothing registered, is answered "no
/// endpoints" without a look-up (a service registered meanwhile is found after this).
pub const NEGATIVE_TTL: Duration = Duration::from_secs(5);

/// Names dropped to make room while etcd listed nothing for them, each remembered for a
/// while; bounded in count (the oldest are forgotten first).
#[derive(Debug, Default)]
pub(super) struct NegativeCache {
    /// Name → until when (clock nanoseconds).
    until: HashMap<ServiceName, u64>,
    /// The same, in the order added, which is the order they expire in (one TTL for all).
    order: VecDeque<(ServiceName, u64)>,
}

impl NegativeCache {
    /// Whether `name` is remembered as having no endpoints at `now`.
    pub(super) fn contains(&self, name: &str, now: u64) -> bool {
        self.until.get(name).is_some_and(|&until| until > now)
    }

    /// Remembers `name` from `now` for `ttl`, forgetting the expired and, past the
    /// capacity, the oldest.
    pub(super) fn insert(&mut self, name: ServiceName, now: u64, ttl: Duration) {
        while self
            .order
            .front()
            .is_some_and(|(_, until)| *until <= now || self.order.len() >= NEGATIVE_CAPACITY)
        {
            if let Some((old, until)) = self.order.pop_front() {
                if self.until.get(old.as_str()) == Some(&until) {
                    self.until.remove(old.as_str());
                }
            }
        }
        let until = now.saturating_add(u64::try_from(ttl.as_nanos()).unwrap_or(u64::MAX));
        self.until.insert(name.clone(), until);
        self.order.push_back((name, until));
    }

    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.until.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    #[test]
    fn names_without_endpoints_are_remembered_for_the_ttl() {
        let mut n = NegativeCache::default();
        n.insert(name("junk.A"), 10 * S, NEGATIVE_TTL);
        assert!(n.contains("junk.A", 10 * S));
        assert!(n.contains("junk.A", 14 * S));
        assert!(!n.contains("junk.A", 15 * S));
        assert!(!n.contains("junk.B", 10 * S));
        // Expired names are forgotten as others come.
        n.insert(name("junk.B"), 16 * S, NEGATIVE_TTL);
        assert_eq!(n.len(), 1);
        // A name remembered again counts from then.
        n.insert(name("junk.A"), 17 * S, NEGATIVE_TTL);
        n.insert(name("junk.A"), 23 * S, NEGATIVE_TTL);
        assert!(n.contains("junk.A", 27 * S));
    }

    #[test]
    fn names_without_endpoints_are_bounded_in_count() {
        let mut n = NegativeCache::default();
        for i in 0..NEGATIVE_CAPACITY + 100 {
            n.insert(name(&format!("junk.S{i}")), S, NEGATIVE_TTL);
        }
        assert_eq!(n.len(), NEGATIVE_CAPACITY);
        assert_eq!(n.order.len(), NEGATIVE_CAPACITY);
        // The oldest went first.
        assert!(!n.contains("junk.S99", S));
        assert!(n.contains("junk.S100", S));
        assert!(n.contains(&format!("junk.S{}", NEGATIVE_CAPACITY + 99), S));
    }
}
