//! The balancing settings of a service: its policy (by name in settings) and the
//! policies' tuning, and how a reload swaps them under running picks.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

/// The balancing policies, as named in settings.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    Default,
    strum::Display,
    strum::EnumString,
    strum::IntoStaticStr,
    strum::VariantNames,
    strum::EnumIter,
)]
#[strum(
    serialize_all = "kebab-case",
    parse_err_ty = UnknownPolicy,
    parse_err_fn = UnknownPolicy::new
)]
pub enum Policy {
    /// Smooth weighted round-robin, per call (weights equal: plain rotation).
    #[default]
    RoundRobin,
    /// Power of two choices over calls in flight per unit of weight.
    LeastRequest,
    /// Power of two choices over latency estimate × (calls in flight + 1) per unit of weight.
    PeakEwma,
    /// Latency first: power of two choices over recent latency, with calls in flight
    /// counting past a knee of 8, per unit of weight.
    Latency,
}

impl Policy {
    /// The policy's settings name.
    pub fn name(self) -> &'static str {
        self.into()
    }
}

/// A policy name that is not one of the policies' names.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown balancing policy {given:?} (choose one of: {})", <Policy as strum::VariantNames>::VARIANTS.join(", "))]
pub struct UnknownPolicy {
    given: String,
}

impl UnknownPolicy {
    fn new(given: &str) -> Self {
        Self {
            given: given.to_owned(),
        }
    }
}

/// How a service's calls are balanced: its policy and the policies' tuning.
#[derive(Debug, Clone, PartialEq)]
pub struct BalanceSettings {
    /// The policy.
    pub policy: Policy,
    /// Ramp a new or recovered endpoint's weight from 10 % to 100 % over this window.
    pub slow_start: Option<Duration>,
    /// How fast the latency estimate forgets (peak-EWMA's decay window; Linkerd: 10 s).
    pub ewma_decay: Duration,
    /// The latency estimate of an endpoint with no call yet (Linkerd: 30 ms).
    pub default_rtt: Duration,
}

impl Default for BalanceSettings {
    fn default() -> Self {
        Self {
            policy: Policy::default(),
            slow_start: None,
            ewma_decay: Duration::from_secs(10),
            default_rtt: Duration::from_millis(30),
        }
    }
}

impl BalanceSettings {
    /// Round-robin without slow start: the pick reads no settings.
    pub(super) fn is_plain_round_robin(&self) -> bool {
        self.policy == Policy::RoundRobin && self.slow_start.is_none()
    }

    /// Whether calls' latencies are measured (only the latency-aware policy reads them).
    #[inline]
    pub fn track_latency(&self) -> bool {
        matches!(self.policy, Policy::PeakEwma | Policy::Latency)
    }
}

/// A service's balancing settings, swapped whole when a reload changes them and read
/// without a lock by the picks and the service's backends. Whether latency is tracked,
/// which every call's end asks, is kept in a flag beside them, so that the default
/// policy's calls load no settings at all.
#[derive(Debug)]
pub struct SharedSettings {
    current: ArcSwap<BalanceSettings>,
    track_latency: AtomicBool,
}

impl SharedSettings {
    pub(super) fn new(settings: Arc<BalanceSettings>) -> Self {
        Self {
            track_latency: AtomicBool::new(settings.track_latency()),
            current: ArcSwap::new(settings),
        }
    }

    /// The settings in force.
    pub fn load(&self) -> Guard<Arc<BalanceSettings>> {
        self.current.load()
    }

    pub(super) fn store(&self, settings: BalanceSettings) {
        let track = settings.track_latency();
        self.current.store(Arc::new(settings));
        self.track_latency.store(track, Ordering::Release);
    }

    /// Whether calls' latencies are measured (peak-ewma only).
    #[inline]
    pub(super) fn track_latency(&self) -> bool {
        self.track_latency.load(Ordering::Acquire)
    }
}
