//! Least-request: power of two choices over each endpoint's calls in flight, divided by
//! its weight (Envoy's `LEAST_REQUEST`). Safe when methods differ widely in cost.

use std::sync::Arc;

use super::{p2c, Backend, BalanceSettings, EndpointSet, Fit};

/// Picks the less loaded of two random endpoints; `now` and `settings` are for slow
/// start's ramp.
#[inline]
pub(super) fn pick<'s>(
    set: &'s EndpointSet,
    fit: impl Fn(usize, &Backend) -> Fit,
    now: u64,
    settings: &BalanceSettings,
) -> Option<(usize, &'s Arc<Backend>)> {
    p2c::pick(set, fit, |b| {
        f64::from(b.in_flight() + 1)
            / b.effective_weight_with(settings, now)
                .max(f64::MIN_POSITIVE)
    })
}
