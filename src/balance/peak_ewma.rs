//! Peak-EWMA: power of two choices over latency estimate × (calls in flight + 1),
//! divided by weight (Linkerd's balancer). The estimate of each endpoint is kept by
//! [`Backend`] from every call's time to response headers: it jumps up at once on a
//! slow answer, decays over time, and counts a failed call as slow.

use std::sync::Arc;

use super::{p2c, Backend, BalanceSettings, EndpointSet, Fit};

/// Picks the cheaper of two random endpoints at `now`, with the service's `settings`.
#[inline]
pub(super) fn pick<'s>(
    set: &'s EndpointSet,
    fit: impl Fn(usize, &Backend) -> Fit,
    now: u64,
    settings: &BalanceSettings,
) -> Option<(usize, &'s Arc<Backend>)> {
    p2c::pick(set, fit, |b| {
        // +1 ns: an estimate decayed to zero still ranks by load.
        (b.latency_estimate_with(settings, now) + 1.0) * f64::from(b.in_flight() + 1)
            / b.effective_weight_with(settings, now)
                .max(f64::MIN_POSITIVE)
    })
}
