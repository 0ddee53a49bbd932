//! Prometheus metrics of the proxy and of the sidecar: the calls' ([`calls`]: per
//! service and endpoint, resolved once so that a call only touches atomics), the
//! registrations' ([`registration`]), and the process-wide gauges set at scrape time.
//!
//! Each finished call is also logged at debug level under the target `switchyard::call`
//! (`RUST_LOG=switchyard::call=debug`); the line is skipped without cost otherwise.

mod calls;
mod export;
mod registration;
mod upstream;

use std::sync::Arc;

use prometheus::{GaugeVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

pub use calls::{status_slot, AttemptKind, EndpointMetrics, ServiceMetrics, STATUS_SLOTS};
pub use export::{process_registry, render};
pub use registration::{RegistrationEvent, RegistrationMetrics};
pub use upstream::UpstreamMetrics;

use calls::CallFamilies;
use export::register;

/// All metrics of one proxy process, and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    /// The backend connection pool's (set at scrape time).
    pub upstream: UpstreamMetrics,
    calls: Arc<CallFamilies>,
    /// Endpoints per service and state (set at scrape time).
    pub endpoints: IntGaugeVec,
    /// 1 while a service's etcd watch is connected (set at scrape time).
    pub watch_up: IntGaugeVec,
    /// Each endpoint's weight as the policies use it now (set at scrape time).
    pub endpoint_weight: GaugeVec,
    /// Each endpoint's peak-EWMA latency estimate, under `peak-ewma` (set at scrape time).
    pub endpoint_latency: GaugeVec,
    /// 1 while etcd answers the proxy's health probe.
    pub etcd_up: IntGauge,
    /// Config reloads (SIGHUP), by result.
    config_reloads: IntCounterVec,
    services_dropped: IntCounterVec,
    refused_services_full: IntCounter,
}

impl Metrics {
    /// Creates and registers all metrics (plus process CPU/memory metrics on Linux).
    pub fn new() -> Arc<Self> {
        let registry = process_registry();
        let calls = Arc::new(CallFamilies::new(&registry));
        let endpoints = IntGaugeVec::new(
            Opts::new(
                "switchyard_endpoints",
                "Known endpoints by service and state (connecting, ready, failed; ejected, unhealthy).",
            ),
            &["service", "state"],
        );
        let watch_up = IntGaugeVec::new(
            Opts::new(
                "switchyard_etcd_watch_up",
                "1 while the service's etcd watch is established, 0 while serving last known endpoints.",
            ),
            &["service"],
        );
        let endpoint_weight = GaugeVec::new(
            Opts::new(
                "switchyard_endpoint_effective_weight",
                "Each endpoint's weight as the balancing policy uses it now: the registry's weight, lower during slow start.",
            ),
            &["service", "endpoint"],
        );
        let endpoint_latency = GaugeVec::new(
            Opts::new(
                "switchyard_endpoint_latency_estimate_seconds",
                "Each endpoint's peak-EWMA estimate of the time to response headers (services balanced by peak-ewma only).",
            ),
            &["service", "endpoint"],
        );
        let etcd_up = IntGauge::new("switchyard_etcd_up", "1 while etcd answers the proxy.");
        let config_reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_config_reloads_total",
                "Config reloads on SIGHUP, by result (applied, or refused: the running settings stay).",
            ),
            &["result"],
        );
        let services_dropped = IntCounterVec::new(
            Opts::new(
                "switchyard_services_dropped_total",
                "Services dropped from the table of watched services, by reason (idle: no endpoints and no calls for the idle time; room: to make room for another).",
            ),
            &["reason"],
        );
        let refused = IntCounterVec::new(
            Opts::new(
                "switchyard_calls_refused_total",
                "Calls refused before reaching a service, by reason (services_full: every watched service in use).",
            ),
            &["reason"],
        );
        // The options above are all valid (static names, distinct labels).
        let (
            Ok(endpoints),
            Ok(watch_up),
            Ok(endpoint_weight),
            Ok(endpoint_latency),
            Ok(etcd_up),
            Ok(config_reloads),
            Ok(services_dropped),
            Ok(refused),
        ) = (
            endpoints,
            watch_up,
            endpoint_weight,
            endpoint_latency,
            etcd_up,
            config_reloads,
            services_dropped,
            refused,
        )
        else {
            unreachable!("static metric definitions are valid")
        };
        // Both reasons show from the start, at 0.
        for reason in ["idle", "room"] {
            services_dropped.with_label_values(&[reason]);
        }
        let metrics = Arc::new(Self {
            upstream: UpstreamMetrics::new(&registry),
            calls,
            endpoints: register(&registry, endpoints),
            watch_up: register(&registry, watch_up),
            endpoint_weight: register(&registry, endpoint_weight),
            endpoint_latency: register(&registry, endpoint_latency),
            etcd_up: register(&registry, etcd_up),
            config_reloads: register(&registry, config_reloads),
            services_dropped: register(&registry, services_dropped),
            refused_services_full: register(&registry, refused)
                .with_label_values(&["services_full"]),
            registry,
        });
        // Both results exported from the start, at 0.
        for applied in [true, false] {
            metrics
                .config_reloads
                .with_label_values(&[reload_result(applied)]);
        }
        metrics
    }

    /// The registry the metrics are in (for other concerns' own counters).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// The Prometheus text exposition of all metrics.
    pub fn render(&self) -> Vec<u8> {
        render(&self.registry)
    }

    /// Counts a config reload: `applied` or `refused`.
    pub fn config_reloaded(&self, applied: bool) {
        self.config_reloads
            .with_label_values(&[reload_result(applied)])
            .inc();
    }

    /// Counts a service dropped from the table for `reason`.
    pub fn service_dropped(&self, reason: &str) {
        self.services_dropped.with_label_values(&[reason]).inc();
    }

    /// Counts a call refused because every watched service is in use.
    pub fn refused_services_full(&self) {
        self.refused_services_full.inc();
    }

    /// Handles for one service.
    pub fn service(&self, service: &str) -> Arc<ServiceMetrics> {
        Arc::new(ServiceMetrics::new(&self.calls, service))
    }
}

/// The `result` label of `switchyard_config_reloads_total`.
fn reload_result(applied: bool) -> &'static str {
    if applied {
        "applied"
    } else {
        "refused"
    }
}
