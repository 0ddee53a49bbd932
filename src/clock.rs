//! A monotonic clock in nanoseconds that fits an atomic: timestamps kept per endpoint
//! (latency estimates, slow start, ejection) without a lock.

use std::sync::OnceLock;
use std::time::Instant;

/// Nanoseconds since the process's first reading of this clock.
#[inline]
pub fn now_ns() -> u64 {
    static EPOCH: OnceLock<Instant> = OnceLock::new();
    let epoch = *EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_nanos()).unwrap_or(u64::MAX)
}
