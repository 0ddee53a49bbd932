//! Prometheus metrics. Handles are resolved once per service and per endpoint, so a
//! call only touches atomics (no label lookup, no lock, no formatting).
//!
//! Each finished call is also logged at debug level under the target `switchyard::call`
//! (`RUST_LOG=switchyard::call=debug`); the line is skipped without cost otherwise.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use prometheus::{
    Encoder, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::endpoint::BackendAddr;

/// Number of gRPC status codes (0..=16); index 17 counts calls that ended without one.
const STATUS_SLOTS: usize = 18;
const STATUS_LABELS: [&str; STATUS_SLOTS] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "none",
];

/// All metrics of one proxy process, and the registry that exposes them.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    calls: IntCounterVec,
    duration: HistogramVec,
    inflight: IntGaugeVec,
    endpoint_inflight: IntGaugeVec,
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
    ejections: IntCounterVec,
    /// Config reloads (SIGHUP), by result.
    config_reloads: IntCounterVec,
    services_dropped: IntCounterVec,
    refused_services_full: IntCounter,
}

/// What happened to a registration (the `event` label of `switchyard_registration_events_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationEvent {
    /// The key was put in etcd (at start, under a new lease after one was lost, or back
    /// after a pause).
    Registered,
    /// The lease was lost (expired, or keep-alive failed) while the backend still runs.
    LeaseLost,
    /// The key was deleted and its lease revoked on a clean shutdown.
    Deregistered,
}

impl RegistrationEvent {
    /// The label value.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Registered => "registered",
            Self::LeaseLost => "lease_lost",
            Self::Deregistered => "deregistered",
        }
    }
}

/// Metrics of the leased keys this process holds in etcd for its backends.
#[derive(Debug, Clone)]
pub struct RegistrationMetrics {
    held: IntGaugeVec,
    events: IntCounterVec,
}

impl RegistrationMetrics {
    /// Creates the registration metrics and registers them in `registry`.
    pub fn new(registry: &Registry) -> Self {
        let held = IntGaugeVec::new(
            Opts::new(
                "switchyard_registrations",
                "Keys this process currently holds alive in etcd, by service.",
            ),
            &["service"],
        );
        let events = IntCounterVec::new(
            Opts::new(
                "switchyard_registration_events_total",
                "Registration events by service and event (registered, lease_lost, deregistered).",
            ),
            &["service", "event"],
        );
        let (Ok(held), Ok(events)) = (held, events) else {
            unreachable!("static metric definitions are valid")
        };
        Self {
            held: register(registry, held),
            events: register(registry, events),
        }
    }

    /// Sets how many keys of `service` this process holds alive right now.
    pub fn set_held(&self, service: &str, keys: i64) {
        self.held.with_label_values(&[service]).set(keys);
    }

    /// Adds `delta` (negative to remove) to the keys of `service` held alive.
    pub fn add_held(&self, service: &str, delta: i64) {
        self.held.with_label_values(&[service]).add(delta);
    }

    /// Counts one `event` for `service`.
    pub fn event(&self, service: &str, event: RegistrationEvent) {
        self.events
            .with_label_values(&[service, event.as_str()])
            .inc();
    }
}

fn register<C: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: C) -> C {
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

impl Metrics {
    /// Creates and registers all metrics (plus process CPU/memory metrics on Linux).
    pub fn new() -> Arc<Self> {
        let registry = process_registry();
        let calls = IntCounterVec::new(
            Opts::new("switchyard_calls_total", "Calls finished, by service, endpoint and grpc-status (endpoint \"\" = answered by the proxy itself; status \"none\" = ended without one, e.g. cancelled)."),
            &["service", "endpoint", "grpc_status"],
        );
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_call_duration_seconds",
                "Call duration from request headers to the end of the response, by service.",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                1.0, 2.5, 5.0, 10.0, 30.0,
            ]),
            &["service"],
        );
        let inflight = IntGaugeVec::new(
            Opts::new(
                "switchyard_inflight_streams",
                "Calls in flight, by service.",
            ),
            &["service"],
        );
        let endpoint_inflight = IntGaugeVec::new(
            Opts::new(
                "switchyard_endpoint_inflight_streams",
                "Calls in flight on a backend, by service and endpoint.",
            ),
            &["service", "endpoint"],
        );
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
        let ejections = IntCounterVec::new(
            Opts::new(
                "switchyard_endpoint_ejections_total",
                "Endpoints taken out of rotation for failing calls in a row, by service and endpoint.",
            ),
            &["service", "endpoint"],
        );
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
            Ok(calls),
            Ok(duration),
            Ok(inflight),
            Ok(endpoint_inflight),
            Ok(endpoints),
            Ok(watch_up),
            Ok(endpoint_weight),
            Ok(endpoint_latency),
            Ok(etcd_up),
            Ok(ejections),
            Ok(config_reloads),
            Ok(services_dropped),
            Ok(refused),
        ) = (
            calls,
            duration,
            inflight,
            endpoint_inflight,
            endpoints,
            watch_up,
            endpoint_weight,
            endpoint_latency,
            etcd_up,
            ejections,
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
            calls: register(&registry, calls),
            duration: register(&registry, duration),
            inflight: register(&registry, inflight),
            endpoint_inflight: register(&registry, endpoint_inflight),
            endpoints: register(&registry, endpoints),
            watch_up: register(&registry, watch_up),
            endpoint_weight: register(&registry, endpoint_weight),
            endpoint_latency: register(&registry, endpoint_latency),
            etcd_up: register(&registry, etcd_up),
            ejections: register(&registry, ejections),
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
    pub fn service(self: &Arc<Self>, service: &str) -> Arc<ServiceMetrics> {
        Arc::new(ServiceMetrics {
            metrics: Arc::clone(self),
            service: service.into(),
            duration: self.duration.with_label_values(&[service]),
            inflight: self.inflight.with_label_values(&[service]),
            own: Default::default(),
        })
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

/// Metric handles of one service.
#[derive(Debug)]
pub struct ServiceMetrics {
    metrics: Arc<Metrics>,
    service: Box<str>,
    duration: Histogram,
    inflight: IntGauge,
    /// Calls answered by the proxy itself, by status.
    own: [OnceLock<IntCounter>; STATUS_SLOTS],
}

impl ServiceMetrics {
    /// Handles for one endpoint of this service.
    pub fn endpoint(self: &Arc<Self>, addr: &BackendAddr) -> Arc<EndpointMetrics> {
        Arc::new(EndpointMetrics {
            service: Arc::clone(self),
            endpoint: addr.as_str().into(),
            inflight_gauge: self
                .metrics
                .endpoint_inflight
                .with_label_values(&[&self.service, addr.as_str()]),
            by_status: Default::default(),
            ejections: self
                .metrics
                .ejections
                .with_label_values(&[&self.service, addr.as_str()]),
        })
    }

    /// Removes the service's own series (it is no longer watched), so that names that
    /// come and go leave none behind; its endpoints' series stay (real addresses only).
    pub fn forget(&self) {
        let m = &self.metrics;
        let _ = m.duration.remove_label_values(&[&self.service]);
        let _ = m.inflight.remove_label_values(&[&self.service]);
        for (slot, cell) in self.own.iter().enumerate() {
            if cell.get().is_some() {
                let _ = m
                    .calls
                    .remove_label_values(&[&self.service, "", STATUS_LABELS[slot]]);
            }
        }
    }

    /// Starts timing a call of this service.
    #[inline]
    pub fn start(self: &Arc<Self>) -> CallTimer {
        self.inflight.inc();
        CallTimer {
            service: Arc::clone(self),
            start: Instant::now(),
        }
    }

    /// The calls counter of (`endpoint`, status `slot`), resolved once into `cell`.
    fn counter<'a>(
        &self,
        endpoint: &str,
        slot: usize,
        cell: &'a OnceLock<IntCounter>,
    ) -> &'a IntCounter {
        cell.get_or_init(|| {
            self.metrics
                .calls
                .with_label_values(&[&self.service, endpoint, STATUS_LABELS[slot]])
        })
    }
}

/// Metric handles of one endpoint of one service.
#[derive(Debug)]
pub struct EndpointMetrics {
    service: Arc<ServiceMetrics>,
    endpoint: Box<str>,
    /// Calls in flight on this endpoint (read back for `/endpoints`).
    inflight_gauge: IntGauge,
    by_status: [OnceLock<IntCounter>; STATUS_SLOTS],
    ejections: IntCounter,
}

impl EndpointMetrics {
    /// Counts one ejection of this endpoint.
    pub fn ejected(&self) {
        self.ejections.inc();
    }

    /// Calls in flight on this endpoint.
    pub fn inflight(&self) -> i64 {
        self.inflight_gauge.get()
    }

    /// Counts a call in flight on this endpoint from now (it is being sent) until the
    /// returned handle, or the [`CallRecord`] it becomes, is dropped.
    #[inline]
    pub fn send(self: &Arc<Self>) -> EndpointCall {
        self.inflight_gauge.inc();
        EndpointCall {
            endpoint: Arc::clone(self),
        }
    }
}

/// A call sent to one endpoint, counted in flight there while this lives.
#[derive(Debug)]
pub struct EndpointCall {
    endpoint: Arc<EndpointMetrics>,
}

impl Drop for EndpointCall {
    fn drop(&mut self) {
        self.endpoint.inflight_gauge.dec();
    }
}

/// Maps a `grpc-status` value to its slot.
#[inline]
pub fn status_slot(v: Option<&http::HeaderValue>) -> usize {
    match v.map(|v| v.as_bytes()) {
        Some([d]) if d.is_ascii_digit() => usize::from(d - b'0'),
        Some([b'1', d]) if (b'0'..=b'6').contains(d) => 10 + usize::from(d - b'0'),
        _ => STATUS_SLOTS - 1,
    }
}

/// Times one call from its arrival; finished by [`CallTimer::own`] or turned into a
/// [`CallRecord`] once a backend answers.
#[derive(Debug)]
pub struct CallTimer {
    service: Arc<ServiceMetrics>,
    start: Instant,
}

impl CallTimer {
    /// The call was answered by the proxy itself with `status`.
    pub fn own(self, status: u8) {
        let slot = usize::from(status).min(STATUS_SLOTS - 1);
        let s = &self.service;
        s.counter("", slot, &s.own[slot]).inc();
        tracing::debug!(
            target: "switchyard::call",
            service = &*s.service,
            endpoint = "",
            grpc_status = STATUS_LABELS[slot],
            elapsed_us = self.start.elapsed().as_micros() as u64,
            "call answered by the proxy"
        );
    }

    /// The call went to a backend, which answered; `sent` has counted it in flight there
    /// since it was sent.
    #[inline]
    pub fn upstream(self, sent: EndpointCall) -> CallRecord {
        CallRecord {
            timer: self,
            sent,
            slot: STATUS_SLOTS - 1,
        }
    }
}

impl Drop for CallTimer {
    fn drop(&mut self) {
        self.service.inflight.dec();
        self.service
            .duration
            .observe(self.start.elapsed().as_secs_f64());
    }
}

/// A call forwarded to a backend; counted with its grpc-status when its response ends
/// (or dropped, e.g. cancelled).
#[derive(Debug)]
pub struct CallRecord {
    /// Dropped with the record, which ends the call's timing.
    timer: CallTimer,
    /// Dropped with the record, which ends the call's count in flight on its endpoint.
    sent: EndpointCall,
    slot: usize,
}

impl CallRecord {
    /// Notes the call's `grpc-status` slot (see [`status_slot`]).
    #[inline]
    pub fn status(&mut self, slot: usize) {
        self.slot = slot.min(STATUS_SLOTS - 1);
    }
}

impl Drop for CallRecord {
    fn drop(&mut self) {
        let e = &self.sent.endpoint;
        e.service
            .counter(&e.endpoint, self.slot, &e.by_status[self.slot])
            .inc();
        tracing::debug!(
            target: "switchyard::call",
            service = &*e.service.service,
            endpoint = &*e.endpoint,
            grpc_status = STATUS_LABELS[self.slot],
            elapsed_us = self.timer.start.elapsed().as_micros() as u64,
            "call finished"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_slots() {
        let v = |s: &'static str| http::HeaderValue::from_static(s);
        assert_eq!(status_slot(Some(&v("0"))), 0);
        assert_eq!(status_slot(Some(&v("14"))), 14);
        assert_eq!(status_slot(Some(&v("16"))), 16);
        assert_eq!(status_slot(Some(&v("17"))), 17);
        assert_eq!(status_slot(Some(&v("x"))), 17);
        assert_eq!(status_slot(None), 17);
    }

    #[test]
    fn calls_are_counted() {
        let m = Metrics::new();
        let s = m.service("a");
        let e = s.endpoint(&"127.0.0.1:1".parse().unwrap());
        {
            let mut rec = s.start().upstream(e.send());
            assert_eq!(e.inflight(), 1);
            rec.status(status_slot(Some(&http::HeaderValue::from_static("0"))));
        }
        s.start().own(14);
        assert_eq!(e.inflight(), 0);
        let text = String::from_utf8(m.render()).unwrap();
        assert!(text.contains(
            r#"switchyard_calls_total{endpoint="127.0.0.1:1",grpc_status="0",service="a"} 1"#
        ));
        assert!(
            text.contains(r#"switchyard_calls_total{endpoint="",grpc_status="14",service="a"} 1"#)
        );
        assert!(text.contains(r#"switchyard_inflight_streams{service="a"} 0"#));
        assert!(text.contains(r#"switchyard_call_duration_seconds_count{service="a"} 2"#));
    }

    #[test]
    fn registrations_are_exposed() {
        let registry = Registry::new();
        let m = RegistrationMetrics::new(&registry);
        m.set_held("a", 2);
        m.event("a", RegistrationEvent::Registered);
        m.event("a", RegistrationEvent::LeaseLost);
        m.event("a", RegistrationEvent::Registered);
        let text = String::from_utf8(render(&registry)).unwrap();
        assert!(text.contains(r#"switchyard_registrations{service="a"} 2"#));
        assert!(text
            .contains(r#"switchyard_registration_events_total{event="registered",service="a"} 2"#));
        assert!(text
            .contains(r#"switchyard_registration_events_total{event="lease_lost",service="a"} 1"#));
    }
}
