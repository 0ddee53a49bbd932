//! How a backend is picked for each call: the service's policy over its endpoint snapshot.
//!
//! Discovery publishes an immutable [`EndpointSet`] of [`Backend`]s whenever a service's
//! endpoints change. Each call asks the service's [`Balancer`] for one with
//! [`Balancer::select_with`], passing its own rule for endpoints it will not take (those
//! it already tried). The balancer never offers an endpoint that cannot be used, and
//! prefers connected, trusted ones (see [`Backend::fit`]) for every policy.
//! Each policy keeps its state of an endpoint in its own file (round-robin's cursor,
//! peak-EWMA's [`peak_ewma`] latency estimate, [`slow_start`]'s origin), held by the
//! [`Backend`]; a call's end reaches it once, through [`crate::call`].
//!
//! Adding a policy: one file here with its `pick` (or, like peak-EWMA, whose state the
//! backend holds, its cost for the two random choices of `p2c.rs`), one variant in
//! [`Policy`] (its name derived from the variant) and one arm in [`Balancer::select_with`];
//! `--balance` and the config file take it by that name.

mod backend;
mod least_request;
mod p2c;
mod peak_ewma;
mod reconcile;
mod round_robin;
mod settings;
mod slow_start;
mod steer;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};

use arc_swap::{ArcSwapOption, Guard};
use parking_lot::Mutex;

pub use backend::{Backend, Fit};
pub(crate) use reconcile::{Reconciler, UpstreamFor};
pub use settings::{BalanceSettings, Policy, SharedSettings, UnknownPolicy};
pub use steer::{
    HeaderMatch, Steer, Steering, Subset, SubsetUnavailable, Traffic, TrafficRules,
    DEFAULT_ZONE_KEY,
};

use crate::clock::now_ns;
use crate::health::{HealthSettings, Member, ServiceHealth};
use crate::metrics::ServiceMetrics;

/// An immutable snapshot of a service's endpoints, sorted by address, with what the
/// policies precompute from it.
#[derive(Debug, Default)]
pub struct EndpointSet {
    backends: Box<[Arc<Backend>]>,
    /// The weighted rotation, when weights differ.
    schedule: round_robin::Schedule,
    /// The zone's and the subsets' views, when the service is steered.
    steered: Option<Box<steer::Steered>>,
}

impl EndpointSet {
    /// A snapshot of these backends (sorted by address for a stable order).
    pub fn new(mut backends: Vec<Arc<Backend>>) -> Self {
        backends.sort_by(|a, b| a.addr().as_str().cmp(b.addr().as_str()));
        Self::sorted(backends)
    }

    /// A snapshot of backends already in order.
    fn sorted(backends: Vec<Arc<Backend>>) -> Self {
        let schedule = round_robin::Schedule::new(&backends);
        Self {
            backends: backends.into_boxed_slice(),
            schedule,
            steered: None,
        }
    }

    /// Whether calls are steered (a zone, traffic rules): picks then go through
    /// [`Balancer::select_steered`].
    #[inline]
    pub fn is_steered(&self) -> bool {
        self.steered.is_some()
    }

    /// Whether endpoint `i` is in the proxy's zone (`None`: no zone set).
    pub fn is_local(&self, i: usize) -> Option<bool> {
        self.steered.as_deref().and_then(|s| s.is_local(i))
    }

    /// The compiled traffic rules this snapshot's views were made for.
    pub fn traffic(&self) -> Option<&Arc<Traffic>> {
        self.steered.as_deref().and_then(|s| s.traffic())
    }

    /// Number of endpoints, usable or not.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }

    /// Endpoint `i` (an index the picks give).
    #[inline]
    pub fn get(&self, i: usize) -> Option<&Arc<Backend>> {
        self.backends.get(i)
    }

    /// All endpoints, in address order.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<Backend>> {
        self.backends.iter()
    }
}

/// A service's balancing policy, its settings, and its state across snapshots (e.g.
/// the rotation's cursor): one per service, shared by all of its calls.
#[derive(Debug)]
pub struct Balancer {
    /// Round-robin without slow start: the pick reads no settings. Kept beside the
    /// rotation's cursor, which every pick touches anyway.
    plain_round_robin: AtomicBool,
    /// The service has traffic rules: each call chooses its subset.
    has_traffic: AtomicBool,
    rr: round_robin::RoundRobin,
    settings: Arc<SharedSettings>,
    health: Arc<ServiceHealth>,
    /// Where its endpoints' calls are counted, if measured.
    metrics: Option<Arc<ServiceMetrics>>,
    /// The rules compiled, for the calls' choice of subset.
    traffic: ArcSwapOption<Traffic>,
    /// The zone and rules the snapshots are made for (read when one is made).
    steering: Mutex<Steering>,
    name: Box<str>,
}

impl Default for Balancer {
    fn default() -> Self {
        Self::new(
            "",
            Arc::new(BalanceSettings::default()),
            HealthSettings::default(),
        )
    }
}

impl Balancer {
    /// A balancer of service `name` with `settings`, ejecting failing endpoints as
    /// `health` says.
    pub fn new(name: &str, settings: Arc<BalanceSettings>, health: HealthSettings) -> Self {
        Self {
            plain_round_robin: AtomicBool::new(settings.is_plain_round_robin()),
            has_traffic: AtomicBool::new(false),
            rr: round_robin::RoundRobin::default(),
            settings: Arc::new(SharedSettings::new(settings)),
            health: Arc::new(ServiceHealth::new(name, health)),
            metrics: None,
            traffic: ArcSwapOption::empty(),
            steering: Mutex::new(Steering::default()),
            name: name.into(),
        }
    }

    /// Steers the calls as `steering` says from the next snapshot on (the caller
    /// publishes one when this returns true: it changed).
    pub fn set_steering(&self, steering: Steering) -> bool {
        let mut current = self.steering.lock();
        if *current == steering {
            return false;
        }
        if current.traffic != steering.traffic {
            let compiled = steering.traffic.as_ref().map(|rules| {
                Arc::new(Traffic::new(
                    &self.name,
                    Arc::clone(rules),
                    self.metrics.as_deref(),
                ))
            });
            self.has_traffic
                .store(compiled.is_some(), Ordering::Release);
            self.traffic.store(compiled);
        }
        *current = steering;
        true
    }

    /// The zone and rules the snapshots are made for.
    pub fn steering(&self) -> Steering {
        self.steering.lock().clone()
    }

    /// The subset of a call with `headers`, when the service has traffic rules (one
    /// flag read otherwise).
    #[inline]
    pub fn steer(&self, headers: &http::HeaderMap) -> Option<Steer> {
        if !self.has_traffic.load(Ordering::Acquire) {
            return None;
        }
        self.traffic.load().as_ref()?.choose(headers)
    }

    /// The same balancer, its endpoints' calls counted in `metrics`.
    pub fn with_metrics(mut self, metrics: Arc<ServiceMetrics>) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Where its endpoints' calls are counted, if measured.
    pub fn metrics(&self) -> Option<&Arc<ServiceMetrics>> {
        self.metrics.as_ref()
    }

    /// The settings this balancer runs with now.
    pub fn settings(&self) -> Guard<Arc<BalanceSettings>> {
        self.settings.load()
    }

    /// The settings as shared with the service's backends (they read the one in force).
    pub(crate) fn shared_settings(&self) -> &Arc<SharedSettings> {
        &self.settings
    }

    /// Runs with `settings` from the next pick on (a reload); the endpoints keep their
    /// state (calls in flight, latency estimate, ejection). Returns whether they changed.
    pub fn set_settings(&self, settings: BalanceSettings) -> bool {
        if **self.settings.load() == settings {
            return false;
        }
        let plain = settings.is_plain_round_robin();
        self.settings.store(settings);
        self.plain_round_robin.store(plain, Ordering::Release);
        true
    }

    /// The health accounting of the service's endpoints.
    pub fn health(&self) -> &Arc<ServiceHealth> {
        &self.health
    }

    /// A new endpoint of the service, reached through `upstream`.
    pub fn add_backend(
        &self,
        upstream: Arc<crate::upstream::Upstream>,
        endpoint: &crate::endpoint::Endpoint,
    ) -> Arc<Backend> {
        Backend::new(upstream, endpoint, self)
    }

    /// The snapshot of `backends` to publish; the health accounting learns the
    /// service's members from it (and starts their active checks when configured: call
    /// within the runtime).
    pub fn snapshot(&self, backends: Vec<Arc<Backend>>) -> EndpointSet {
        self.health.set_members(
            backends
                .iter()
                .map(|b| (Arc::downgrade(b) as Weak<dyn Member>, b.addr().clone()))
                .collect(),
        );
        let mut set = EndpointSet::new(backends);
        let steering = self.steering.lock();
        let traffic = self.traffic.load_full();
        set.steered = steer::Steered::build(
            &set.backends,
            &steering,
            traffic.as_ref(),
            self.metrics.as_deref(),
        );
        set
    }

    /// The policy this balancer runs now.
    pub fn policy(&self) -> Policy {
        self.settings.load().policy
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
        self.pick_in(set, &self.rr, accept)
    }

    /// The policy's pick in `set` (the snapshot, or a view of it with its own rotation
    /// `rr`).
    #[inline(always)]
    fn pick_in<'s>(
        &self,
        set: &'s EndpointSet,
        rr: &round_robin::RoundRobin,
        accept: impl Fn(usize) -> bool,
    ) -> Option<(usize, &'s Arc<Backend>)> {
        let fit = |i: usize, b: &Backend| if accept(i) { b.fit() } else { Fit::No };
        if self.plain_round_robin.load(Ordering::Acquire) {
            return rr.pick(set, fit);
        }
        // Read once per pick: a reload may swap them meanwhile.
        let settings = self.settings.load();
        match settings.policy {
            Policy::RoundRobin if settings.slow_start.is_none() => rr.pick(set, fit),
            Policy::RoundRobin => {
                // An endpoint in slow start takes its turn only with its ramp's odds.
                let now = now_ns();
                rr.pick(set, |i, b| match fit(i, b) {
                    Fit::Preferred if fastrand::f64() >= b.ramp_with(&settings, now) => Fit::Usable,
                    f => f,
                })
            }
            Policy::LeastRequest => least_request::pick(set, fit, now_ns(), &settings),
            Policy::PeakEwma => {
                let now = now_ns();
                p2c::pick(set, fit, |b| {
                    peak_ewma::cost(
                        b.latency_estimate_with(&settings, now),
                        b.in_flight(),
                        b.effective_weight_with(&settings, now),
                    )
                })
            }
            Policy::Latency => {
                let now = now_ns();
                p2c::pick(set, fit, |b| {
                    peak_ewma::latency_first_cost(
                        b.latency_estimate_with(&settings, now),
                        b.in_flight(),
                        b.effective_weight_with(&settings, now),
                    )
                })
            }
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
    use std::time::Duration;

    /// `n` backends on ports 1000.., with the given weights (1 where none is given).
    pub(crate) fn set_with(n: usize, weights: &[u32]) -> EndpointSet {
        set_for(
            n,
            weights,
            &Arc::new(BalanceSettings::default()),
            HealthSettings::default(),
        )
        .1
    }

    /// As [`set_with`], for backends balanced with `settings` and `health`, and their
    /// balancer.
    pub(crate) fn set_for(
        n: usize,
        weights: &[u32],
        settings: &Arc<BalanceSettings>,
        health: HealthSettings,
    ) -> (Balancer, EndpointSet) {
        let cfg = UpstreamConfig::default();
        let balancer = Balancer::new("t", Arc::clone(settings), health);
        let set = balancer.snapshot(
            (0..n)
                .map(|i| {
                    let addr = format!("127.0.0.1:{}", 1000 + i).parse().unwrap();
                    let ep = Endpoint::new(addr).with_weight(weights.get(i).copied().unwrap_or(1));
                    let up = Upstream::new(ep.addr.clone(), &cfg);
                    up.assume_ready();
                    Backend::new(up, &ep, &balancer)
                })
                .collect(),
        );
        (balancer, set)
    }

    pub(crate) fn port(b: &Backend) -> usize {
        usize::from(b.addr().port()) - 1000
    }

    /// A call held in flight on a backend until dropped (ends unanswered).
    pub(crate) struct Held(Arc<Backend>);

    impl Held {
        pub(crate) fn on(b: &Arc<Backend>) -> Self {
            b.call_started();
            Self(Arc::clone(b))
        }
    }

    impl Drop for Held {
        fn drop(&mut self) {
            self.0.call_ended(None, false);
        }
    }

    /// Ends one call on `b` answered after `latency`, `failed` or not.
    pub(crate) fn finish(b: &Backend, latency: Duration, failed: bool) {
        b.call_started();
        b.call_ended(Some(latency), failed);
    }

    #[test]
    fn a_dropped_endpoint_is_freed_and_leaves_its_service_s_health() {
        let (balancer, set) = set_for(
            3,
            &[],
            &Arc::new(BalanceSettings::default()),
            HealthSettings::default(),
        );
        let weak = Arc::downgrade(&set.backends[0]);
        // Each backend holds its service's health, which knows the backends only weakly.
        assert_eq!(Arc::strong_count(balancer.health()), 4);
        drop(set);
        assert!(weak.upgrade().is_none(), "no cycle keeps a backend alive");
        assert_eq!(Arc::strong_count(balancer.health()), 1);
        // The gone members no longer count towards the ejection cap.
        let (_, fresh) = set_for(
            2,
            &[],
            &Arc::new(BalanceSettings::default()),
            HealthSettings::default(),
        );
        let ep = &fresh.backends[0];
        for _ in 0..5 {
            balancer
                .health()
                .report(ep.health(), crate::health::CallResult::Failure);
        }
        assert!(
            !ep.health().is_out(now_ns),
            "no live member: nothing may be ejected"
        );
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

    #[test]
    fn swapped_settings_change_the_pick_both_ways() {
        let (b, s) = set_for(
            3,
            &[],
            &Arc::new(BalanceSettings::default()),
            HealthSettings::default(),
        );
        // Endpoint 0 is busy: round-robin ignores it, least-request avoids it.
        let busy: Vec<_> = (0..5).map(|_| Held::on(&s.backends[0])).collect();
        let picks = |b: &Balancer| {
            let mut counts = [0usize; 3];
            for _ in 0..60 {
                counts[port(b.select_with(&s, |_| true).unwrap().1)] += 1;
            }
            counts
        };
        assert_eq!(picks(&b), [20, 20, 20]);
        assert!(b.set_settings(BalanceSettings {
            policy: Policy::LeastRequest,
            ..BalanceSettings::default()
        }));
        assert_eq!(picks(&b)[0], 0);
        assert!(b.set_settings(BalanceSettings::default()));
        assert_eq!(picks(&b), [20, 20, 20]);
        drop(busy);

        // Latency is tracked only while the policy reads it: a 200 ms call counts
        // under peak-ewma (the estimate jumps to it), not under round-robin.
        let slow_call = || finish(&s.backends[1], Duration::from_millis(200), false);
        let estimate_ms = || s.backends[1].latency_estimate(now_ns()) / 1e6;
        slow_call();
        assert!(estimate_ms() <= 30.0, "{}", estimate_ms());
        assert!(b.set_settings(BalanceSettings {
            policy: Policy::PeakEwma,
            ..BalanceSettings::default()
        }));
        slow_call();
        assert!(estimate_ms() >= 199.0, "{}", estimate_ms());
    }
}

#[cfg(test)]
mod policy_tests;
