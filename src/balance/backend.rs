//! One backend as the balancer sees it: its pooled connection, its weight and registry
//! metadata, and the per-call signals (calls in flight, latency, how calls end), all in
//! atomics so that the per-call path takes no lock.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use super::{BalanceSettings, Balancer, SharedSettings};
use crate::clock::now_ns;
use crate::endpoint::{BackendAddr, Endpoint, Weight};
use crate::health::{CallResult, Change, EndpointHealth, Member, ServiceHealth};
use crate::upstream::Upstream;

/// Share of its weight an endpoint starts slow start with (Envoy's and HAProxy's 10 %).
const SLOW_START_FLOOR: f64 = 0.1;

/// Latency a failed call counts as, at least, in the latency estimate: a node that
/// fails fast must not look fast.
const FAILURE_PENALTY: Duration = Duration::from_millis(250);

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
    /// Peak-EWMA latency estimate in nanoseconds (f64 bits), as of `latency_at`.
    latency_ns: AtomicU64,
    latency_at: AtomicU64,
    /// When the endpoint last joined or came back (slow start's origin), from [`now_ns`].
    since: AtomicU64,
    /// The service's health accounting (the cap on ejections spans its endpoints).
    service_health: Arc<ServiceHealth>,
}

impl Backend {
    /// The backend `endpoint` describes, reached through `upstream`, one of the
    /// endpoints `balancer` picks from.
    pub fn new(upstream: Arc<Upstream>, endpoint: &Endpoint, balancer: &Balancer) -> Arc<Self> {
        let settings = Arc::clone(balancer.shared_settings());
        let now = now_ns();
        let initial = settings.load().default_rtt.as_nanos() as f64;
        Arc::new(Self {
            health: EndpointHealth::default(),
            addr: upstream.addr().clone(),
            upstream,
            weight: AtomicU32::new(endpoint.weight),
            endpoint: ArcSwap::from_pointee(endpoint.clone()),
            in_flight: AtomicU32::new(0),
            settings,
            latency_ns: AtomicU64::new(initial.to_bits()),
            latency_at: AtomicU64::new(now),
            since: AtomicU64::new(now),
            service_health: Arc::clone(balancer.health()),
        })
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
        self.since.store(now_ns(), Ordering::Relaxed);
    }

    /// The share of its weight the endpoint gets at `now` (from [`now_ns`]): 1 unless it
    /// is within its slow-start window, where it ramps from 10 % to 100 %.
    pub fn ramp(&self, now: u64) -> f64 {
        self.ramp_with(&self.settings.load(), now)
    }

    /// [`Backend::ramp`] with the service's settings as the pick read them.
    #[inline]
    pub(super) fn ramp_with(&self, settings: &BalanceSettings, now: u64) -> f64 {
        let Some(window) = settings.slow_start else {
            return 1.0;
        };
        let since = self
            .since
            .load(Ordering::Relaxed)
            .max(self.upstream.recovered_at());
        let elapsed = now.saturating_sub(since) as f64;
        let window = window.as_nanos() as f64;
        if elapsed >= window {
            return 1.0;
        }
        SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * elapsed / window
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
        let estimate = f64::from_bits(self.latency_ns.load(Ordering::Relaxed));
        let at = self.latency_at.load(Ordering::Relaxed);
        estimate * decay(settings, now.saturating_sub(at))
    }

    /// Folds one call's latency into the estimate: a slower answer raises it at once
    /// (the peak), a faster one pulls it down by how old the estimate is.
    fn observe_latency(&self, settings: &BalanceSettings, rtt: Duration) {
        let now = now_ns();
        let rtt = rtt.as_nanos() as f64;
        let estimate = f64::from_bits(self.latency_ns.load(Ordering::Relaxed));
        let at = self.latency_at.load(Ordering::Relaxed);
        let next = if rtt > estimate {
            rtt
        } else {
            let w = decay(settings, now.saturating_sub(at));
            estimate * w + rtt * (1.0 - w)
        };
        // Racing updates may lose one sample: an estimate needs no more.
        self.latency_ns.store(next.to_bits(), Ordering::Relaxed);
        self.latency_at.store(now, Ordering::Relaxed);
    }

    /// Counts a call on this backend from now (it is being sent) until the returned
    /// guard is dropped, which reports how the call ended.
    #[inline]
    pub fn start_call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            backend: Arc::clone(self),
            to_headers_us: NOT_ANSWERED,
            outcome: Outcome::Abandoned,
        }
    }

    /// The one place a call's end is reported: the signal for load-aware policies and
    /// failure accounting.
    #[inline]
    fn call_ended(&self, to_headers: Option<Duration>, outcome: Outcome) {
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
        let result = match outcome {
            Outcome::Status(s) => self.service_health.classify_status(s),
            Outcome::StreamFailed | Outcome::NotTaken => CallResult::Failure,
            Outcome::Abandoned => CallResult::Ignored,
        };
        if self.settings.track_latency() {
            let settings = self.settings.load();
            match (to_headers, result) {
                (_, CallResult::Failure) => self.observe_latency(
                    &settings,
                    to_headers.unwrap_or_default().max(FAILURE_PENALTY),
                ),
                (Some(rtt), _) => self.observe_latency(&settings, rtt),
                // Abandoned before an answer: says nothing of the backend's speed.
                (None, _) => {}
            }
        }
        match self.service_health.report(&self.health, result) {
            Change::None => {}
            Change::Ejected(length) => {
                tracing::info!(
                    service = %self.service_health.name(),
                    backend = %self.addr(),
                    ejected_for = ?length,
                    last_failure = ?outcome,
                    "endpoint ejected: it failed calls in a row"
                );
                if let Some(m) = self.upstream.metrics() {
                    m.ejected();
                }
            }
            Change::Capped => tracing::debug!(
                service = %self.service_health.name(),
                backend = %self.addr(),
                "endpoint fails calls, but the ejection cap keeps it in rotation"
            ),
            Change::Returned => {
                self.restart_slow_start();
                tracing::info!(
                    service = %self.service_health.name(),
                    backend = %self.addr(),
                    "ejected endpoint back in rotation"
                );
            }
        }
    }
}

impl Member for Backend {
    fn health(&self) -> &EndpointHealth {
        &self.health
    }
}

/// The weight of a latency estimate `elapsed` nanoseconds old.
#[inline]
fn decay(settings: &BalanceSettings, elapsed: u64) -> f64 {
    let window = settings.ewma_decay.as_nanos() as f64;
    (-(elapsed as f64) / window.max(1.0)).exp()
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

/// How a call sent to a backend ended, as far as that backend is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this `grpc-status` (17: none or unreadable).
    Status(u8),
    /// The backend's stream or connection failed before the call ended.
    StreamFailed,
    /// The backend did not take the call (refused it, or its connection was closed), so
    /// it was offered elsewhere.
    NotTaken,
    /// The client cancelled or its deadline passed first: says nothing of the backend.
    Abandoned,
}

/// `CallGuard::to_headers_us` of a call not answered (yet).
const NOT_ANSWERED: u32 = u32::MAX;

/// A call in flight on one backend; reports the call's end when dropped. Small: every
/// open stream holds one.
#[derive(Debug)]
pub struct CallGuard {
    backend: Arc<Backend>,
    /// Time from sending to the response headers, in microseconds.
    to_headers_us: u32,
    outcome: Outcome,
}

impl CallGuard {
    /// The backend's response headers arrived, for a call sent at `sent`.
    #[inline]
    pub fn answered(&mut self, sent: Instant) {
        let us = sent.elapsed().as_micros();
        self.to_headers_us = u32::try_from(us).unwrap_or(NOT_ANSWERED - 1);
    }

    /// Notes how the call ended (the last note counts; none means abandoned).
    #[inline]
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// The backend the call went to.
    #[inline]
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for CallGuard {
    #[inline]
    fn drop(&mut self) {
        let to_headers = (self.to_headers_us != NOT_ANSWERED)
            .then(|| Duration::from_micros(u64::from(self.to_headers_us)));
        self.backend.call_ended(to_headers, self.outcome);
    }
}
