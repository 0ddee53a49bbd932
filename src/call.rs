//! A call's end, reported once. A call is timed from its arrival ([`Arrival`]); each
//! attempt a backend took is a [`BackendCall`], in flight from its sending to the end of
//! its response. When it ends, it makes one [`CallEnd`] and hands it, in one function,
//! to everything that learns from calls: the backend's policy state (calls in flight,
//! the latency estimate), its health (success, failure or ignored; ejection) and the
//! metrics (in-flight gauges, per-status counter, duration, the `switchyard::call` debug
//! line). The proxy's own answers, which no backend took, end through [`Arrival`] too.
//!
//! A module of its own, not a part of `balance`, `health` or `metrics`: it joins all
//! three, which only read what it hands them, so that each depends on none of the others
//! for it (and retries or hedging add attempts here, not a fourth account).
//!
//! Per call: no allocation, no lock, no formatting (unless the debug line is on); the
//! guard is small, since every open stream holds one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::balance::Backend;
use crate::health::{CallResult, Change};
use crate::metrics::{ServiceMetrics, STATUS_SLOTS};
use crate::status::Code;
use crate::upstream::Connection;

/// How a call sent to a backend ended, as far as that backend is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this `grpc-status` slot (17: none or unreadable).
    Status(u8),
    /// The backend's stream or connection failed before the call ended.
    StreamFailed,
    /// The backend did not take the call (refused it, or its connection was closed), so
    /// it was offered elsewhere.
    NotTaken,
    /// The client cancelled or its deadline passed first: says nothing of the backend.
    Abandoned,
}

impl Outcome {
    /// The status slot the client got (see [`crate::metrics::status_slot`]): the
    /// backend's, UNAVAILABLE for a stream that broke (the proxy's trailers), CANCELLED
    /// for a call the client gave up.
    #[inline]
    pub fn status_slot(self) -> usize {
        match self {
            Self::Status(s) => usize::from(s).min(STATUS_SLOTS - 1),
            Self::StreamFailed => Code::Unavailable as usize,
            Self::Abandoned => Code::Cancelled as usize,
            Self::NotTaken => STATUS_SLOTS - 1,
        }
    }
}

/// What one attempt on a backend came to, as its end reports it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CallEnd {
    /// Time from sending to the response headers (`None`: never answered).
    pub to_headers: Option<Duration>,
    /// How it ended.
    pub outcome: Outcome,
    /// Time since the call arrived, when the call ended with this attempt (`None`: the
    /// call went on elsewhere, or was answered by the proxy).
    pub elapsed: Option<Duration>,
}

/// A call of a service, timed from its arrival (counted in flight there until it ends).
#[derive(Debug)]
pub struct Arrival(Option<Timed>);

/// The service's metrics, and when the call arrived.
#[derive(Debug)]
struct Timed {
    service: Arc<ServiceMetrics>,
    at: Instant,
}

impl Timed {
    /// The call is over: its time since arrival.
    #[inline]
    fn leave(self) -> Duration {
        let elapsed = self.at.elapsed();
        self.service.left(elapsed);
        elapsed
    }
}

impl Arrival {
    /// A call of the service measured by `service` arrived now.
    #[inline]
    pub fn new(service: &Arc<ServiceMetrics>) -> Self {
        service.arrived();
        Self(Some(Timed {
            service: Arc::clone(service),
            at: Instant::now(),
        }))
    }

    /// The proxy answered the call itself with `code` (no backend took it).
    pub fn answered_by_proxy(mut self, code: Code) {
        if let Some(t) = self.0.take() {
            let elapsed = t.at.elapsed();
            t.service.answered_by_proxy(code as usize, elapsed);
            t.service.left(elapsed);
        }
    }
}

impl Drop for Arrival {
    /// Ends a call that got no answer (its client went away first).
    fn drop(&mut self) {
        if let Some(t) = self.0.take() {
            t.leave();
        }
    }
}

/// `BackendCall::to_headers_us` of a call not answered (yet).
const NOT_ANSWERED: u32 = u32::MAX;

/// One attempt of a call on one backend, in flight from its sending until dropped, which
/// reports its end. Once the backend's response starts, the call's [`Arrival`] goes
/// with it ([`BackendCall::carry`]): the call ends with the response.
#[derive(Debug)]
pub struct BackendCall {
    backend: Arc<Backend>,
    /// The call, once its end is this attempt's.
    arrival: Arrival,
    /// Time from sending to the response headers, in microseconds.
    to_headers_us: u32,
    outcome: Outcome,
    /// The connection its stream is on, once answered: held until the stream ends,
    /// which is how the connection counts its streams.
    conn: Option<Arc<Connection>>,
}

impl BackendCall {
    /// A call is being sent to `backend` (by default it ends abandoned).
    #[inline]
    pub fn start(backend: &Arc<Backend>) -> Self {
        backend.call_started();
        if let Some(m) = backend.metrics() {
            m.sent();
        }
        Self {
            backend: Arc::clone(backend),
            arrival: Arrival(None),
            to_headers_us: NOT_ANSWERED,
            outcome: Outcome::Abandoned,
            conn: None,
        }
    }

    /// The backend the attempt went to.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The call's stream is on `conn` until it ends.
    #[inline]
    pub fn hold(&mut self, conn: Arc<Connection>) {
        self.conn = Some(conn);
    }

    /// The backend's response headers arrived, for a call sent at `sent`.
    #[inline]
    pub fn answered(&mut self, sent: Instant) {
        let us = sent.elapsed().as_micros();
        self.to_headers_us = u32::try_from(us).unwrap_or(NOT_ANSWERED - 1);
    }

    /// The call is this attempt's from now on: it ends when the attempt does.
    #[inline]
    pub fn carry(&mut self, arrival: Arrival) {
        self.arrival = arrival;
    }

    /// Notes how the call ended (the last note counts; none means abandoned).
    #[inline]
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for BackendCall {
    #[inline]
    fn drop(&mut self) {
        let to_headers = (self.to_headers_us != NOT_ANSWERED)
            .then(|| Duration::from_micros(u64::from(self.to_headers_us)));
        let end = CallEnd {
            to_headers,
            outcome: self.outcome,
            elapsed: self.arrival.0.take().map(Timed::leave),
        };
        ended(&self.backend, &end);
    }
}

/// The one place an attempt's end is reported: to the backend's policy state, its
/// health, and the metrics.
#[inline]
fn ended(backend: &Backend, end: &CallEnd) {
    let health = backend.service_health();
    let result = match end.outcome {
        Outcome::Status(s) => health.classify_status(s),
        Outcome::StreamFailed | Outcome::NotTaken => CallResult::Failure,
        Outcome::Abandoned => CallResult::Ignored,
    };
    backend.call_ended(end.to_headers, result == CallResult::Failure);
    let metrics = backend.metrics();
    if let Some(m) = metrics {
        m.ended();
        if let Some(elapsed) = end.elapsed {
            m.answered(end.outcome.status_slot(), elapsed);
        }
    }
    match health.report(backend.health(), result) {
        Change::None => {}
        Change::Ejected(length) => {
            tracing::info!(
                service = %health.name(),
                backend = %backend.addr(),
                ejected_for = ?length,
                last_failure = ?end.outcome,
                "endpoint ejected: it failed calls in a row"
            );
            if let Some(m) = metrics {
                m.ejected();
            }
        }
        Change::Capped => tracing::debug!(
            service = %health.name(),
            backend = %backend.addr(),
            "endpoint fails calls, but the ejection cap keeps it in rotation"
        ),
        Change::Returned => {
            backend.restart_slow_start();
            tracing::info!(
                service = %health.name(),
                backend = %backend.addr(),
                "ejected endpoint back in rotation"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::{BalanceSettings, Balancer, EndpointSet, Policy};
    use crate::clock::now_ns;
    use crate::endpoint::Endpoint;
    use crate::health::HealthSettings;
    use crate::metrics::Metrics;
    use crate::upstream::{Upstream, UpstreamConfig};

    /// Three measured backends of service "svc" on ports 1000.., balanced by peak-EWMA.
    struct Svc {
        metrics: Arc<Metrics>,
        service: Arc<ServiceMetrics>,
        set: EndpointSet,
        _balancer: Balancer,
    }

    impl Svc {
        fn new() -> Self {
            let metrics = Metrics::new();
            let service = metrics.service("svc");
            let cfg = UpstreamConfig::default();
            let settings = BalanceSettings {
                policy: Policy::PeakEwma,
                ..BalanceSettings::default()
            };
            let balancer = Balancer::new("svc", Arc::new(settings), HealthSettings::default())
                .with_metrics(Arc::clone(&service));
            let set = balancer.snapshot(
                (0..3)
                    .map(|i| {
                        let ep = Endpoint::new(format!("127.0.0.1:{}", 1000 + i).parse().unwrap());
                        let up = Upstream::new(ep.addr.clone(), &cfg);
                        up.assume_ready();
                        balancer.add_backend(up, &ep)
                    })
                    .collect(),
            );
            Self {
                metrics,
                service,
                set,
                _balancer: balancer,
            }
        }

        fn backend(&self, i: usize) -> &Arc<Backend> {
            self.set.iter().nth(i).unwrap()
        }

        /// The value of the metrics line that starts with `series`.
        fn value(&self, series: &str) -> Option<f64> {
            let text = String::from_utf8(self.metrics.render()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        }

        /// Ends one call on backend `i` with `outcome`, the whole call's or not.
        fn call(&self, i: usize, outcome: Outcome, whole: bool) {
            let mut call = BackendCall::start(self.backend(i));
            if whole {
                call.carry(Arrival::new(&self.service));
            }
            call.set_outcome(outcome);
        }
    }

    #[test]
    fn a_call_s_end_reaches_the_policy_health_and_metrics_once() {
        let s = Svc::new();
        let b = s.backend(0);
        let arrival = Arrival::new(&s.service);
        assert_eq!(
            s.value(r#"switchyard_inflight_streams{service="svc"}"#),
            Some(1.0)
        );
        let mut call = BackendCall::start(b);
        assert_eq!(b.in_flight(), 1);
        let gauge =
            r#"switchyard_endpoint_inflight_streams{endpoint="127.0.0.1:1000",service="svc"}"#;
        assert_eq!(s.value(gauge), Some(1.0));
        call.answered(Instant::now() - Duration::from_millis(200));
        call.carry(arrival);
        call.set_outcome(Outcome::Status(0));
        drop(call);
        assert_eq!(b.in_flight(), 0);
        assert_eq!(s.value(gauge), Some(0.0));
        assert_eq!(
            s.value(r#"switchyard_inflight_streams{service="svc"}"#),
            Some(0.0)
        );
        assert_eq!(
            s.value(
                r#"switchyard_calls_total{endpoint="127.0.0.1:1000",grpc_status="0",service="svc"}"#
            ),
            Some(1.0)
        );
        assert_eq!(
            s.value(r#"switchyard_call_duration_seconds_count{service="svc"}"#),
            Some(1.0)
        );
        let estimate = b.latency_estimate(now_ns());
        assert!(
            estimate >= 199e6,
            "the estimate took the answer's time: {estimate}"
        );
    }

    #[test]
    fn an_attempt_that_did_not_end_the_call_counts_no_status() {
        let s = Svc::new();
        s.call(0, Outcome::NotTaken, false);
        assert_eq!(s.backend(0).in_flight(), 0);
        assert_eq!(s.backend(0).health().failures(), 1);
        let text = String::from_utf8(s.metrics.render()).unwrap();
        assert!(!text.contains("switchyard_calls_total"), "{text}");
        assert_eq!(
            s.value(r#"switchyard_call_duration_seconds_count{service="svc"}"#),
            Some(0.0)
        );
    }

    #[test]
    fn failures_count_for_health_and_the_estimate_and_abandoned_calls_do_not() {
        let s = Svc::new();
        // UNAVAILABLE is a failure (by default): five in a row eject.
        for _ in 0..5 {
            s.call(0, Outcome::Status(14), true);
        }
        assert!(s.backend(0).health().is_out(now_ns));
        assert_eq!(
            s.value(
                r#"switchyard_endpoint_ejections_total{endpoint="127.0.0.1:1000",service="svc"}"#
            ),
            Some(1.0)
        );
        // An application error is an answer like any other; a cancel says nothing.
        s.call(1, Outcome::Status(5), true);
        s.call(1, Outcome::Abandoned, true);
        assert_eq!(s.backend(1).health().failures(), 0);
        assert!(s.backend(1).latency_estimate(now_ns()) < 31e6);
        // A broken stream fails the backend and counts as the UNAVAILABLE the client got.
        s.call(2, Outcome::StreamFailed, true);
        assert_eq!(s.backend(2).health().failures(), 1);
        assert!(s.backend(2).latency_estimate(now_ns()) >= 249e6);
        for (endpoint, status, n) in [
            (1000, 14, 5.0),
            (1001, 5, 1.0),
            (1001, 1, 1.0),
            (1002, 14, 1.0),
        ] {
            let series = format!(
                r#"switchyard_calls_total{{endpoint="127.0.0.1:{endpoint}",grpc_status="{status}",service="svc"}}"#
            );
            assert_eq!(s.value(&series), Some(n), "{series}");
        }
    }

    #[test]
    fn the_proxy_s_own_answers_and_unanswered_calls_end_through_the_arrival() {
        let s = Svc::new();
        Arrival::new(&s.service).answered_by_proxy(Code::Unavailable);
        // The client went away before any answer: timed, not counted by status.
        drop(Arrival::new(&s.service));
        assert_eq!(
            s.value(r#"switchyard_calls_total{endpoint="",grpc_status="14",service="svc"}"#),
            Some(1.0)
        );
        assert_eq!(
            s.value(r#"switchyard_inflight_streams{service="svc"}"#),
            Some(0.0)
        );
        assert_eq!(
            s.value(r#"switchyard_call_duration_seconds_count{service="svc"}"#),
            Some(2.0)
        );
    }

    #[test]
    fn outcomes_map_to_the_status_the_client_got() {
        assert_eq!(Outcome::Status(5).status_slot(), 5);
        assert_eq!(Outcome::Status(200).status_slot(), 17);
        assert_eq!(Outcome::StreamFailed.status_slot(), 14);
        assert_eq!(Outcome::Abandoned.status_slot(), 1);
        assert_eq!(Outcome::NotTaken.status_slot(), 17);
    }
}
