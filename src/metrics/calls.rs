//! The metrics of calls: per service (in flight, duration) and per endpoint (in flight,
//! calls by grpc-status, ejections). Handles are resolved once per service and per
//! endpoint, so that a call only touches atomics (no label lookup, no lock, no
//! formatting). What a call's end records, and when, is decided in [`crate::call`].
//!
//! Each finished call is also logged at debug level under the target `switchyard::call`
//! (`RUST_LOG=switchyard::call=debug`); the line is skipped without cost otherwise.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus::{
    Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts,
    Registry,
};

use super::export::register;
use crate::endpoint::BackendAddr;

/// Number of gRPC status codes (0..=16); index 17 counts calls that ended without one.
pub const STATUS_SLOTS: usize = 18;
const STATUS_LABELS: [&str; STATUS_SLOTS] = [
    "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    "none",
];

/// Maps a `grpc-status` value to its slot.
#[inline]
pub fn status_slot(v: Option<&http::HeaderValue>) -> usize {
    match v.map(|v| v.as_bytes()) {
        Some([d]) if d.is_ascii_digit() => usize::from(d - b'0'),
        Some([b'1', d]) if (b'0'..=b'6').contains(d) => 10 + usize::from(d - b'0'),
        _ => STATUS_SLOTS - 1,
    }
}

/// What became of the attempts of calls whose method has a retry or hedging policy (the
/// `outcome` label of `switchyard_call_attempts_total`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::EnumCount)]
#[strum(serialize_all = "snake_case")]
pub enum AttemptKind {
    /// A call's first attempt.
    FirstTry,
    /// A retry sent.
    Retried,
    /// A hedge sent (beyond the first attempt).
    Hedged,
    /// A retry or hedge the service's throttle did not allow.
    Throttled,
    /// A retry or hedge not possible: the request had outgrown the replay buffer.
    Committed,
}

/// The labelled families of the call metrics, registered once per process.
#[derive(Debug)]
pub(super) struct CallFamilies {
    calls: IntCounterVec,
    duration: HistogramVec,
    inflight: IntGaugeVec,
    endpoint_inflight: IntGaugeVec,
    ejections: IntCounterVec,
    attempts: IntCounterVec,
    locality: IntCounterVec,
    subsets: IntCounterVec,
}

/// The `locality` labels of `switchyard_calls_by_locality_total`, by index.
const LOCALITY_LABELS: [&str; 2] = ["same_zone", "other_zone"];

/// The `routed` labels of `switchyard_calls_by_subset_total`, by index.
const SUBSET_LABELS: [&str; 2] = ["subset", "fallback"];

impl CallFamilies {
    /// Creates the families and registers them in `registry`.
    pub(super) fn new(registry: &Registry) -> Self {
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
        let ejections = IntCounterVec::new(
            Opts::new(
                "switchyard_endpoint_ejections_total",
                "Endpoints taken out of rotation for failing calls in a row, by service and endpoint.",
            ),
            &["service", "endpoint"],
        );
        let attempts = IntCounterVec::new(
            Opts::new(
                "switchyard_call_attempts_total",
                "Attempts of calls under a retry or hedging policy, by service and outcome (first_try, retried, hedged, throttled, committed).",
            ),
            &["service", "outcome"],
        );
        let locality = IntCounterVec::new(
            Opts::new(
                "switchyard_calls_by_locality_total",
                "Calls (each attempt) sent to a backend in the proxy's zone or in another, by service and locality (same_zone, other_zone); with a zone set only.",
            ),
            &["service", "locality"],
        );
        let subsets = IntCounterVec::new(
            Opts::new(
                "switchyard_calls_by_subset_total",
                "Calls (each attempt) of a traffic rule's subset, by service, subset and routed (subset: sent within it; fallback: it had no usable endpoint, sent to the whole service).",
            ),
            &["service", "subset", "routed"],
        );
        let (
            Ok(calls),
            Ok(duration),
            Ok(inflight),
            Ok(endpoint_inflight),
            Ok(ejections),
            Ok(attempts),
            Ok(locality),
            Ok(subsets),
        ) = (
            calls,
            duration,
            inflight,
            endpoint_inflight,
            ejections,
            attempts,
            locality,
            subsets,
        )
        else {
            unreachable!("static metric definitions are valid")
        };
        Self {
            calls: register(registry, calls),
            duration: register(registry, duration),
            inflight: register(registry, inflight),
            endpoint_inflight: register(registry, endpoint_inflight),
            ejections: register(registry, ejections),
            attempts: register(registry, attempts),
            locality: register(registry, locality),
            subsets: register(registry, subsets),
        }
    }
}

/// Metric handles of one service.
#[derive(Debug)]
pub struct ServiceMetrics {
    families: Arc<CallFamilies>,
    service: Box<str>,
    duration: Histogram,
    inflight: IntGauge,
    /// Calls answered by the proxy itself, by status.
    own: [OnceLock<IntCounter>; STATUS_SLOTS],
    /// Attempts under a policy, by outcome (resolved on first use).
    attempts: [OnceLock<IntCounter>; <AttemptKind as strum::EnumCount>::COUNT],
    /// Subsets whose series were made, to remove them with the service's.
    subsets: parking_lot::Mutex<Vec<Arc<str>>>,
}

impl ServiceMetrics {
    /// Handles for service `service` in `families`.
    pub(super) fn new(families: &Arc<CallFamilies>, service: &str) -> Self {
        Self {
            families: Arc::clone(families),
            service: service.into(),
            duration: families.duration.with_label_values(&[service]),
            inflight: families.inflight.with_label_values(&[service]),
            own: Default::default(),
            attempts: Default::default(),
            subsets: Default::default(),
        }
    }

    /// The calls-by-locality handles (same zone, other zone), for a snapshot to keep.
    pub fn locality_counters(&self) -> [IntCounter; 2] {
        LOCALITY_LABELS.map(|l| {
            self.families
                .locality
                .with_label_values(&[&*self.service, l])
        })
    }

    /// The calls-by-subset handles of `subset` (sent within it, fallen back), for
    /// compiled traffic rules to keep.
    pub fn subset_counters(&self, subset: &Arc<str>) -> [IntCounter; 2] {
        let mut made = self.subsets.lock();
        if !made.contains(subset) {
            made.push(Arc::clone(subset));
        }
        SUBSET_LABELS.map(|r| {
            self.families
                .subsets
                .with_label_values(&[&*self.service, subset, r])
        })
    }

    /// Counts one attempt of a call under a retry or hedging policy.
    pub fn attempt(&self, kind: AttemptKind) {
        self.attempts[kind as usize]
            .get_or_init(|| {
                self.families
                    .attempts
                    .with_label_values(&[&*self.service, kind.into()])
            })
            .inc();
    }

    /// Handles for one endpoint of this service.
    pub fn endpoint(self: &Arc<Self>, addr: &BackendAddr) -> Arc<EndpointMetrics> {
        Arc::new(EndpointMetrics {
            service: Arc::clone(self),
            endpoint: addr.as_str().into(),
            inflight_gauge: OnceLock::new(),
            by_status: Default::default(),
            ejections: OnceLock::new(),
        })
    }

    /// Removes the service's own series (it is no longer watched), so that names that
    /// come and go leave none behind; its endpoints' series stay (real addresses only).
    pub fn forget(&self) {
        let f = &self.families;
        let _ = f.duration.remove_label_values(&[&self.service]);
        let _ = f.inflight.remove_label_values(&[&self.service]);
        for l in LOCALITY_LABELS {
            let _ = f.locality.remove_label_values(&[&*self.service, l]);
        }
        for subset in self.subsets.lock().iter() {
            for r in SUBSET_LABELS {
                let _ = f
                    .subsets
                    .remove_label_values(&[&*self.service, &**subset, r]);
            }
        }
        for (slot, cell) in self.own.iter().enumerate() {
            if cell.get().is_some() {
                let _ = f
                    .calls
                    .remove_label_values(&[&self.service, "", STATUS_LABELS[slot]]);
            }
        }
    }

    /// A call of this service arrived: in flight until [`ServiceMetrics::left`].
    #[inline]
    pub fn arrived(&self) {
        self.inflight.inc();
    }

    /// A call is over, `elapsed` after it arrived.
    #[inline]
    pub fn left(&self, elapsed: Duration) {
        self.inflight.dec();
        self.duration.observe(elapsed.as_secs_f64());
    }

    /// Counts a call answered by the proxy itself with status `slot`, `elapsed` after it
    /// arrived.
    pub fn answered_by_proxy(&self, slot: usize, elapsed: Duration) {
        let slot = slot.min(STATUS_SLOTS - 1);
        self.counter("", slot, &self.own[slot]).inc();
        tracing::debug!(
            target: "switchyard::call",
            service = &*self.service,
            endpoint = "",
            grpc_status = STATUS_LABELS[slot],
            elapsed_us = elapsed.as_micros() as u64,
            "call answered by the proxy"
        );
    }

    /// The calls counter of (`endpoint`, status `slot`), resolved once into `cell`.
    fn counter<'a>(
        &self,
        endpoint: &str,
        slot: usize,
        cell: &'a OnceLock<IntCounter>,
    ) -> &'a IntCounter {
        cell.get_or_init(|| {
            self.families
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
    /// Calls in flight on this endpoint. Like the counters, a series is made with its
    /// first use: an endpoint no call went to costs no series (thousands of services
    /// listing the same backends would otherwise hold two series per endpoint each).
    inflight_gauge: OnceLock<IntGauge>,
    by_status: [OnceLock<IntCounter>; STATUS_SLOTS],
    ejections: OnceLock<IntCounter>,
}

impl EndpointMetrics {
    /// Counts one ejection of this endpoint.
    pub fn ejected(&self) {
        self.ejections
            .get_or_init(|| self.series(&self.service.families.ejections))
            .inc();
    }

    /// A call was sent to this endpoint: in flight there until [`EndpointMetrics::ended`].
    #[inline]
    pub fn sent(&self) {
        self.inflight().inc();
    }

    /// A call sent to this endpoint ended.
    #[inline]
    pub fn ended(&self) {
        self.inflight().dec();
    }

    #[inline]
    fn inflight(&self) -> &IntGauge {
        self.inflight_gauge
            .get_or_init(|| self.series(&self.service.families.endpoint_inflight))
    }

    /// The series of this endpoint in `family` (labelled by service and endpoint).
    #[cold]
    fn series<M: prometheus::core::Metric + Clone, B: prometheus::core::MetricVecBuilder<M = M>>(
        &self,
        family: &prometheus::core::MetricVec<B>,
    ) -> M {
        family.with_label_values(&[&self.service.service, &self.endpoint])
    }

    /// Counts a call this endpoint answered, by the status `slot` its client got,
    /// `elapsed` after the call arrived.
    #[inline]
    pub fn answered(&self, slot: usize, elapsed: Duration) {
        let slot = slot.min(STATUS_SLOTS - 1);
        let s = &self.service;
        s.counter(&self.endpoint, slot, &self.by_status[slot]).inc();
        tracing::debug!(
            target: "switchyard::call",
            service = &*s.service,
            endpoint = &*self.endpoint,
            grpc_status = STATUS_LABELS[slot],
            elapsed_us = elapsed.as_micros() as u64,
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
}
