//! One backend as the balancer sees it: its pooled connection, its weight and registry
//! metadata, and the state its policies keep of it (calls in flight, the peak-EWMA
//! latency estimate, slow start's origin), all in atomics so that the per-call path
//! takes no lock. How a call's end reaches that state is [`crate::call`]'s.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

use super::peak_ewma::LatencyEstimate;
use super::slow_start::SlowStart;
use super::{BalanceSettings, Balancer, SharedSettings};
use crate::clock::now_ns;
use crate::endpoint::{BackendAddr, Endpoint, Weight};
use crate::health::{EndpointHealth, Member, ServiceHealth};
use crate::metrics::EndpointMetrics;
use crate::upstream::Upstream;

/// One endpoint of a service, kept across snapshots for as long as it is registered.
/// In declared order (`repr(C)`): what every pick reads (the connection, then the
/// ejection state) comes first, in the cache line of the reference counts.
#[derive(Debug)]
#[repr(C)]
pub struct Backend {
    upstream: Arc<Upstream>,
    /// Its ejection and active-check state, inline: every pick reads it.
    health: EndpointHealth,
    /// The upstream's address, kept here too so that a call reads it from the backend.
    addr: BackendAddr,
    /// What the registry says of it (weight, metadata), as last read.
    endpoint: ArcSwap<Endpoint>,
    weight: AtomicU32,
    in_flight: AtomicU32,
    /// The service's balancing settings (whether latency is tracked, slow start), as
    /// they are now: a reload may change them.
    settings: Arc<SharedSettings>,
    /// Peak-EWMA's latency estimate.
    latency: LatencyEstimate,
    /// Slow start's origin.
    slow_start: SlowStart,
    /// The service's health accounting (the cap on ejections spans its endpoints).
    service_health: Arc<ServiceHealth>,
    /// This endpoint's metric handles in its service, if measured (the upstream is
    /// shared by every service at the address; these are the service's own).
    metrics: Option<Arc<EndpointMetrics>>,
}

impl Backend {
    /// The backend `endpoint` describes, reached through `upstream`, one of the
    /// endpoints `balancer` picks from.
    pub fn new(upstream: Arc<Upstream>, endpoint: &Endpoint, balancer: &Balancer) -> Arc<Self> {
        let settings = Arc::clone(balancer.shared_settings());
        let now = now_ns();
        let initial = settings.load().default_rtt;
        let addr = upstream.addr().clone();
        Arc::new(Self {
            health: EndpointHealth::default(),
            metrics: balancer.metrics().map(|m| m.endpoint(&addr)),
            addr,
            upstream,
            weight: AtomicU32::new(endpoint.weight),
            endpoint: ArcSwap::from_pointee(endpoint.clone()),
            in_flight: AtomicU32::new(0),
            settings,
            latency: LatencyEstimate::new(initial, now),
            slow_start: SlowStart::new(now),
            service_health: Arc::clone(balancer.health()),
        })
    }

    /// This endpoint's metric handles in its service, if measured.
    #[inline]
    pub fn metrics(&self) -> Option<&Arc<EndpointMetrics>> {
        self.metrics.as_ref()
    }

    /// Its ejection and active-check state.
    #[inline]
    pub fn health(&self) -> &EndpointHealth {
        &self.health
    }

    /// Takes what the registry now says of this endpoint; returns whether its weight changed.
    pub fn update(&self, endpoint: &Endpoint) -> bool {
        if **self.endpoint.load() == *endpoint {
            return false;
        }
        self.endpoint.store(Arc::new(endpoint.clone()));
        self.weight.swap(endpoint.weight, Ordering::Relaxed) != endpoint.weight
    }

    /// The backend's address.
    #[inline]
    pub fn addr(&self) -> &BackendAddr {
        &self.addr
    }

    /// The backend's pooled connection.
    #[inline]
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// What the registry says of this endpoint.
    pub fn endpoint(&self) -> Arc<Endpoint> {
        self.endpoint.load_full()
    }

    /// The registry's weight.
    #[inline]
    pub fn weight(&self) -> Weight {
        self.weight.load(Ordering::Relaxed)
    }

    /// Calls sent to this backend and not ended yet.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// How well this backend fits a call now: preferred when connected and trusted,
    /// usable while connecting or suspect, not at all while its connection fails.
    #[inline]
    pub fn fit(&self) -> Fit {
        if self.health.is_out(now_ns) {
            Fit::No
        } else if self.upstream.is_healthy() {
            Fit::Preferred
        } else if self.upstream.is_usable() {
            Fit::Usable
        } else {
            Fit::No
        }
    }

    /// The endpoint's state as operators see it: `ejected`, `unhealthy` (by its active
    /// check), or its connection's state.
    pub fn state_name(&self, now: u64) -> &'static str {
        if self.health.ejected_until(now).is_some() {
            "ejected"
        } else if self.health.is_unhealthy() {
            "unhealthy"
        } else {
            self.upstream.state().as_str()
        }
    }

    /// Every state [`Backend::state_name`] names.
    pub const STATE_NAMES: [&'static str; 5] =
        ["connecting", "ready", "failed", "ejected", "unhealthy"];

    /// Restarts slow start: the endpoint came back from failure.
    pub fn restart_slow_start(&self) {
        self.slow_start.restart(now_ns());
    }

    /// The share of its weight the endpoint gets at `now` (from [`now_ns`]): 1 unless it
    /// is within its slow-start window, where it ramps from 10 % to 100 %.
    #[cfg(test)]
    pub fn ramp(&self, now: u64) -> f64 {
        self.ramp_with(&self.settings.load(), now)
    }

    /// The endpoint's slow-start ramp at `now` with the service's settings as the pick
    /// read them.
    #[inline]
    pub(super) fn ramp_with(&self, settings: &BalanceSettings, now: u64) -> f64 {
        self.slow_start
            .ramp(settings.slow_start, self.upstream.recovered_at(), now)
    }

    /// The weight the policies use at `now`: the registry's, scaled by slow start.
    pub fn effective_weight(&self, now: u64) -> f64 {
        self.effective_weight_with(&self.settings.load(), now)
    }

    /// [`Backend::effective_weight`] with the settings as the pick read them.
    #[inline]
    pub(super) fn effective_weight_with(&self, settings: &BalanceSettings, now: u64) -> f64 {
        f64::from(self.weight()) * self.ramp_with(settings, now)
    }

    /// The latency estimate at `now`, in nanoseconds: the peak-EWMA of time to response
    /// headers, decaying towards zero while no call ends (so that an endpoint once slow
    /// is tried again after a while).
    pub fn latency_estimate(&self, now: u64) -> f64 {
        self.latency_estimate_with(&self.settings.load(), now)
    }

    /// [`Backend::latency_estimate`] with the settings as the pick read them.
    #[inline]
    pub(super) fn latency_estimate_with(&self, settings: &BalanceSettings, now: u64) -> f64 {
        self.latency.get(settings.ewma_decay, now)
    }

    /// The service's health accounting, which the cap on ejections spans.
    #[inline]
    pub fn service_health(&self) -> &ServiceHealth {
        &self.service_health
    }

    /// A call is being sent to this backend: in flight until [`Backend::call_ended`].
    #[inline]
    pub fn call_started(&self) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
    }

    /// A call sent here ended, answered after `to_headers` (`None`: never answered),
    /// `failed` by the backend or not: what the policies keep of it.
    #[inline]
    pub fn call_ended(&self, to_headers: Option<Duration>, failed: bool) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.settings.track_latency() {
            let s = self.settings.load();
            if s.policy == super::Policy::Latency {
                self.latency
                    .observe_recent(s.ewma_decay, to_headers, failed, now_ns());
            } else {
                self.latency
                    .observe(s.ewma_decay, to_headers, failed, now_ns());
            }
        }
    }
}

impl Member for Backend {
    fn health(&self) -> &EndpointHealth {
        &self.health
    }

    fn upstream(&self) -> Option<Arc<Upstream>> {
        Some(Arc::clone(&self.upstream))
    }
}

/// How well an endpoint fits a call (worst first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Not to be offered the call.
    No,
    /// To be offered the call only if no preferred endpoint is left.
    Usable,
    /// Connected and trusted.
    Preferred,
}
