//! The Prometheus registry's plumbing shared by the proxy's and the sidecar's metrics:
//! registering a metric, the process collector, the text exposition.

use prometheus::{Encoder, Registry, TextEncoder};

/// Registers `c` in `r` and hands it back.
pub(super) fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
    // Names are static and distinct, so registration cannot collide.
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "metric registration failed");
    }
    c
}

/// A registry holding the process CPU/memory metrics (on Linux).
pub fn process_registry() -> Registry {
    let registry = Registry::new();
    #[cfg(target_os = "linux")]
    {
        let pc = prometheus::process_collector::ProcessCollector::for_self();
        if let Err(e) = registry.register(Box::new(pc)) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
    }
    registry
}

/// The Prometheus text exposition of all metrics in `registry`.
pub fn render(registry: &Registry) -> Vec<u8> {
    let mut buf = Vec::with_capacity(8 * 1024);
    if let Err(e) = TextEncoder::new().encode(&registry.gather(), &mut buf) {
        tracing::warn!(error = %e, "encoding metrics failed");
    }
    buf
}
