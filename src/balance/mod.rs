//! How a backend is picked for each call: the service's policy over its endpoint snapshot.
//!
//! Discovery publishes an immutable [`EndpointSet`] of [`Backend`]s whenever a service's
//! endpoints change. Each call asks the service's [`Balancer`] for one with
//! [`Balancer::select_with`], passing its own rule for endpoints it will not take (those
//! it already tried). The balancer never offers an endpoint that cannot be used, and
//! prefers connected, trusted ones (see [`Backend::is_preferred`]) for every policy.
//! Each call's end is reported once, through the [`CallGuard`] of the backend that took
//! it: the signal load-aware policies and failure accounting read.
//!
//! Adding a policy: one file here with its `pick`, one variant in [`Policy`] (its name in
//! [`Policy::NAMES`]) and one arm in [`Balancer`].

mod backend;
mod round_robin;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

pub use backend::{Backend, CallGuard, Fit, Outcome};

/// The balancing policies, as named in settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Policy {
    /// Smooth weighted round-robin, per call (weights equal: plain rotation).
    #[default]
    RoundRobin,
}

impl Policy {
    /// Every policy with its settings name.
    pub const NAMES: &'static [(&'static str, Policy)] = &[("round-robin", Policy::RoundRobin)];

    /// The policy's settings name.
    pub fn name(self) -> &'static str {
        Self::NAMES
            .iter()
            .find(|(_, p)| *p == self)
            .map_or("?", |(n, _)| n)
    }
}

/// A policy name that is not one of [`Policy::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown balancing policy {given:?} (choose one of: {choices})")]
pub struct UnknownPolicy {
    given: String,
    choices: String,
}

impl FromStr for Policy {
    type Err = UnknownPolicy;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::NAMES
            .iter()
            .find(|(n, _)| *n == s)
            .map(|(_, p)| *p)
            .ok_or_else(|| UnknownPolicy {
                given: s.to_owned(),
                choices: Self::NAMES
                    .iter()
                    .map(|(n, _)| *n)
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }
}

impl fmt::Display for Policy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An immutable snapshot of a service's endpoints, sorted by address, with what the
/// policies precompute from it.
#[derive(Debug, Default)]
pub struct EndpointSet {
    backends: Box<[Arc<Backend>]>,
    /// The weighted rotation, when weights differ.
    schedule: round_robin::Schedule,
}

impl EndpointSet {
    /// A snapshot of these backends (sorted by address for a stable order).
    pub fn new(mut backends: Vec<Arc<Backend>>) -> Self {
        backends.sort_by(|a, b| a.addr().as_str().cmp(b.addr().as_str()));
        let schedule = round_robin::Schedule::new(&backends);
        Self {
            backends: backends.into_boxed_slice(),
            schedule,
        }
    }

    /// Number of endpoints, usable or not.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// All endpoints, in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter()
    }
}

/// A service's balancing policy and its state across snapshots (e.g. the rotation's
/// cursor): one per service, shared by all of its calls.
#[derive(Debug)]
pub enum Balancer {
    /// See [`Policy::RoundRobin`].
    RoundRobin(round_robin::RoundRobin),
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(Policy::default())
    }
}

impl Balancer {
    /// A balancer running `policy`.
    pub fn new(policy: Policy) -> Self {
        match policy {
            Policy::RoundRobin => Self::RoundRobin(round_robin::RoundRobin::default()),
        }
    }

    /// The policy this balancer runs.
    pub fn policy(&self) -> Policy {
        match self {
            Self::RoundRobin(_) => Policy::RoundRobin,
        }
    }

    /// Picks the endpoint for a call among those `accept` takes (by index in `set`).
    ///
    /// Endpoints that cannot be used are never offered. The policy's choice is taken
    /// among the preferred ones (connected, trusted) when any is left, so that a call
    /// does not wait on a connecting backend, or one that may have frozen, while another
    /// can take it; otherwise among the merely usable ones.
    #[inline]
    pub fn select_with<'s>(
        &self,
        set: &'s EndpointSet,
        accept: impl Fn(usize) -> bool,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        let fit = |i: usize, b: &Backend| if accept(i) { b.fit() } else { Fit::No };
        match self {
            Self::RoundRobin(rr) => rr.pick(set, fit),
        }
    }
}

/// The first endpoint of the best fit in index order: a policy's last resort.
fn scan(set: &EndpointSet, fit: impl Fn(usize, &Backend) -> Fit) -> Option<(usize, &Arc<Backend>)> {
    let mut usable = None;
    for (i, b) in set.backends.iter().enumerate() {
        match fit(i, b) {
            Fit::Preferred => return Some((i, b)),
            Fit::Usable => {
                usable.get_or_insert((i, b));
            }
            Fit::No => {}
        }
    }
    usable
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::endpoint::Endpoint;
    use crate::upstream::{Upstream, UpstreamConfig};

    /// `n` backends on ports 1000.., with the given weights (1 where none is given).
    pub(crate) fn set_with(n: usize, weights: &[u32]) -> EndpointSet {
        let cfg = UpstreamConfig::default();
        EndpointSet::new(
            (0..n)
                .map(|i| {
                    let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                    let ep = Endpoint::new(addr).with_weight(weights.get(i).copied().unwrap_or(1));
                    let up = Upstream::new(ep.addr.clone(), &cfg);
                    up.assume_ready();
                    Backend::new(up, &ep)
                })
                .collect(),
        )
    }

    pub(crate) fn port(b: &Backend) -> usize {
        usize::from(b.addr().port()) - 1000
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!("round-robin".parse::<Policy>(), Ok(Policy::RoundRobin));
        let err = "fastest".parse::<Policy>().unwrap_err().to_string();
        assert!(
            err.contains("\"fastest\"") && err.contains("round-robin"),
            "{err}"
        );
        assert_eq!(Policy::RoundRobin.to_string(), "round-robin");
    }

    #[test]
    fn empty_set_picks_nothing() {
        assert!(Balancer::default()
            .select_with(&set_with(0, &[]), |_| true)
            .is_none());
    }

    #[test]
    fn accept_rule_is_obeyed() {
        let s = set_with(4, &[]);
        let b = Balancer::default();
        let mut counts = [0usize; 4];
        for _ in 0..300 {
            let (_, ep) = b.select_with(&s, |i| i != 1).unwrap();
            counts[port(ep)] += 1;
        }
        assert_eq!(counts, [100, 0, 100, 100]);
        assert!(b.select_with(&s, |_| false).is_none());
    }
}
