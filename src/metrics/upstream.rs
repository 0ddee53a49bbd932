//! The backend connection pool's metrics, copied from its counts at scrape time (the
//! pool keeps plain atomics, so the call path touches no metric handle for them).

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

use super::export::register;
use crate::upstream::{CloseReason, PoolStats};

/// Metric handles of the pool of backend connections.
#[derive(Debug)]
pub struct UpstreamMetrics {
    open: IntGauge,
    opened: IntCounter,
    closed: IntCounterVec,
    refused: IntCounter,
}

impl UpstreamMetrics {
    /// Creates and registers them in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let (Ok(open), Ok(opened), Ok(closed), Ok(refused)) = (
            IntGauge::new(
                "switchyard_upstream_connections",
                "Backend HTTP/2 connections open (one pool per backend address, shared by every service).",
            ),
            IntCounter::new(
                "switchyard_upstream_connections_opened_total",
                "Backend connections opened.",
            ),
            IntCounterVec::new(
                Opts::new(
                    "switchyard_upstream_connections_closed_total",
                    "Backend connections closed, by reason (idle: no stream for the idle timeout; lost: closed by the backend or broken; unused: no service lists the address).",
                ),
                &["reason"],
            ),
            IntCounter::new(
                "switchyard_upstream_refused_streams_total",
                "Streams a backend refused before processing them (REFUSED_STREAM), each sent again.",
            ),
        ) else {
            unreachable!("static metric definitions are valid")
        };
        for r in CloseReason::ALL {
            closed.with_label_values(&[r.as_str()]);
        }
        Self {
            open: register(registry, open),
            opened: register(registry, opened),
            closed: register(registry, closed),
            refused: register(registry, refused),
        }
    }

    /// Brings the metrics up to the pool's counts.
    pub fn update(&self, stats: &PoolStats) {
        use std::sync::atomic::Ordering::Relaxed;
        self.open
            .set(i64::try_from(stats.open.load(Relaxed)).unwrap_or(i64::MAX));
        let up_to = |c: &IntCounter, now: u64| c.inc_by(now.saturating_sub(c.get()));
        up_to(&self.opened, stats.opened.load(Relaxed));
        up_to(&self.refused, stats.refused.load(Relaxed));
        for r in CloseReason::ALL {
            up_to(
                &self.closed.with_label_values(&[r.as_str()]),
                stats.closed(r),
            );
        }
    }
}
