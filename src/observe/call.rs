//! What the proxy sees of one call, from its request headers to the end of its response:
//! [`CallObs`], made by the process's [`Observer`] and finished once (access-log record
//! queued, span ended).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Uri};
use http_body::Frame;
use opentelemetry::trace::{Span as _, TraceId};
use opentelemetry_sdk::trace::Span;
use prometheus::{IntCounter, Registry};
use serde::Serialize;

use super::access_log::{AccessLog, Line};
use super::error::ObserveError;
use super::trace::{self, Tracing};
use crate::endpoint::BackendAddr;
use crate::route::ServiceName;
use crate::settings::observe::ObserveSection;

/// The status slot of a call that ended without a `grpc-status`.
const NO_STATUS: u8 = 17;
/// The `grpc-message` is cut to this many bytes in the log.
const MAX_MESSAGE: usize = 256;
/// The `grpc-message` header's name.
static GRPC_MESSAGE: http::HeaderName = http::HeaderName::from_static("grpc-message");

/// The process's access log and tracer, shared by every listener.
#[derive(Debug)]
pub struct Observer {
    log: Option<AccessLog<CallObs>>,
    tracing: Option<Tracing>,
}

impl Observer {
    /// The access log and tracer `settings` ask for, their counters registered in
    /// `registry`; `None` when both are off (calls then carry nothing). Tracing must be
    /// set up inside a tokio runtime.
    pub fn new(
        settings: &ObserveSection,
        registry: &Registry,
    ) -> Result<Option<Arc<Self>>, ObserveError> {
        let dropped = counter(
            registry,
            "switchyard_access_log_dropped_total",
            "Access-log lines dropped because the writer fell behind (its queue was full).",
        );
        let log = AccessLog::open(&settings.access_log, dropped)?;
        let tracing = match &settings.otlp_endpoint {
            Some(endpoint) => {
                let failed = counter(
                    registry,
                    "switchyard_trace_spans_failed_total",
                    "Spans the OTLP exporter could not deliver to the collector.",
                );
                Some(Tracing::new(endpoint, settings.trace_sample_rate, failed)?)
            }
            None => None,
        };
        if log.is_none() && tracing.is_none() {
            return Ok(None);
        }
        Ok(Some(Arc::new(Self { log, tracing })))
    }

    /// Starts watching a call that arrived from `peer` on `listener` with this request
    /// head.
    pub fn start(
        self: &Arc<Self>,
        headers: &HeaderMap,
        uri: &Uri,
        peer: SocketAddr,
        listener: SocketAddr,
    ) -> Box<CallObs> {
        let mut trace_id = None;
        let mut span = None;
        if let Some(t) = &self.tracing {
            (span, trace_id) = t.start(headers, uri.path(), peer.ip());
        } else if self.log.is_some() && headers.contains_key(&trace::TRACEPARENT) {
            trace_id = trace::trace_id(&trace::parent_only(headers));
        }
        Box::new(CallObs {
            observer: Arc::clone(self),
            start: SystemTime::now(),
            began: Instant::now(),
            duration: Duration::ZERO,
            peer,
            listener,
            uri: uri.clone(),
            service: None,
            routed: false,
            backend: None,
            attempts: 0,
            status: NO_STATUS,
            http_status: 200,
            message: None,
            request_bytes: self.log.as_ref().map(|_| Arc::default()),
            response_bytes: 0,
            trace_id,
            span,
        })
    }

    /// Reopens the access log's file before its next line (SIGHUP, after logrotate).
    pub fn reopen(&self) {
        if let Some(log) = &self.log {
            log.reopen();
        }
    }

    /// Sends the spans still queued and stops the exporter.
    pub async fn shutdown(self: Arc<Self>) {
        if self.tracing.is_some() {
            // The SDK's shutdown blocks until its export thread is done.
            let _ = tokio::task::spawn_blocking(move || {
                if let Some(t) = &self.tracing {
                    t.shutdown();
                }
            })
            .await;
        }
    }
}

/// A counter registered in `registry` (names are static: registration cannot fail but
/// for a second proxy in the process, which then counts in its own copy).
fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let Ok(c) = IntCounter::new(name, help) else {
        unreachable!("static metric definitions are valid")
    };
    if let Err(e) = registry.register(Box::new(c.clone())) {
        tracing::debug!(error = %e, "metric registration failed");
    }
    c
}

/// One call as the access log and the tracer see it; finished by [`CallObs::finish`]
/// (the response ended or was dropped) or [`CallObs::own`] (the proxy answered).
#[derive(Debug)]
pub struct CallObs {
    observer: Arc<Observer>,
    start: SystemTime,
    began: Instant,
    duration: Duration,
    peer: SocketAddr,
    listener: SocketAddr,
    uri: Uri,
    service: Option<ServiceName>,
    /// The service was chosen by a route from the one the path names.
    routed: bool,
    backend: Option<BackendAddr>,
    attempts: u8,
    status: u8,
    http_status: u16,
    message: Option<HeaderValue>,
    /// Request DATA bytes, counted by the request body (access log only).
    request_bytes: Option<Arc<AtomicU64>>,
    response_bytes: u64,
    trace_id: Option<TraceId>,
    span: Option<Span>,
}

impl CallObs {
    /// The service the call was routed to; `routed`: by a route, from another name.
    pub fn service(&mut self, service: &ServiceName, routed: bool) {
        self.service = Some(service.clone());
        self.routed = routed;
    }

    /// The proxy answers the call itself (health, reflection): its service is the one
    /// its path names, and no backend has it.
    pub fn answered_locally(&mut self) {
        self.service = crate::route::service_from_path(self.uri.path())
            .ok()
            .and_then(|s| ServiceName::new(s).ok());
        self.routed = false;
    }

    /// The counter the request body adds its DATA bytes to, when they are logged.
    pub fn request_counter(&self) -> Option<Arc<AtomicU64>> {
        self.request_bytes.clone()
    }

    /// The `traceparent` to send the backend: the proxy's span as the parent (sampled
    /// calls only; others pass the client's headers on untouched).
    pub fn traceparent(&self) -> Option<HeaderValue> {
        trace::traceparent(self.span.as_ref()?.span_context())
    }

    /// The call is offered to `backend` (one more attempt).
    #[inline]
    pub fn attempt(&mut self, backend: &BackendAddr) {
        self.attempts = self.attempts.saturating_add(1);
        self.backend = Some(backend.clone());
    }

    /// The call's gRPC status slot (0-16; 17: none).
    #[inline]
    pub fn status(&mut self, slot: usize) {
        self.status = u8::try_from(slot).unwrap_or(NO_STATUS).min(NO_STATUS);
    }

    /// Response headers or trailers: their `grpc-message`, if any.
    pub fn headers(&mut self, headers: &HeaderMap) {
        if let Some(m) = headers.get(&GRPC_MESSAGE) {
            self.message = Some(m.clone());
        }
    }

    /// A response frame passed to the client.
    #[inline]
    pub fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.response_bytes += data.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            self.headers(t);
        }
    }

    /// The proxy answered the call itself with this response head (`http_status` 200
    /// for a gRPC error, whose status is in `headers`).
    pub fn own(mut self: Box<Self>, http_status: u16, headers: &HeaderMap) {
        self.http_status = http_status;
        self.backend = None;
        let slot = crate::metrics::status_slot(headers.get(&crate::status::GRPC_STATUS));
        self.status(slot);
        self.headers(headers);
        self.finish();
    }

    /// The call is over: its span ends, its record is queued for the access log.
    pub fn finish(mut self: Box<Self>) {
        self.duration = self.began.elapsed();
        if let Some(mut span) = self.span.take() {
            if let Some(b) = &self.backend {
                trace::backend(&mut span, b);
            }
            let status = (self.status != NO_STATUS).then_some(self.status);
            trace::end(&mut span, status, self.attempts);
        }
        let observer = Arc::clone(&self.observer);
        if let Some(log) = &observer.log {
            log.send(self);
        }
    }
}

/// One access-log line, borrowed from the record.
#[derive(Serialize)]
struct Json<'a> {
    start: String,
    duration_us: u64,
    peer: SocketAddr,
    listener: SocketAddr,
    service: Option<&'a str>,
    route: Option<&'a str>,
    method: &'a str,
    grpc_status: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    grpc_message: Option<String>,
    #[serde(skip_serializing_if = "is_ok")]
    http_status: u16,
    backend: Option<&'a str>,
    attempts: u8,
    request_bytes: u64,
    response_bytes: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    trace_id: Option<String>,
}

fn is_ok(status: &u16) -> bool {
    *status == 200
}

impl Line for CallObs {
    fn write_json(&self, out: &mut Vec<u8>) {
        let path = self.uri.path();
        let named = path
            .strip_prefix('/')
            .and_then(|p| p.split_once('/'))
            .map(|(s, _)| s);
        let line = Json {
            start: humantime::format_rfc3339_micros(self.start).to_string(),
            duration_us: u64::try_from(self.duration.as_micros()).unwrap_or(u64::MAX),
            peer: self.peer,
            listener: self.listener,
            service: self.service.as_ref().map(ServiceName::as_str),
            route: if self.routed { named } else { None },
            method: path,
            grpc_status: (self.status != NO_STATUS).then_some(self.status),
            grpc_message: self.message.as_ref().map(|m| cut(&decode(m))),
            http_status: self.http_status,
            backend: self.backend.as_ref().map(BackendAddr::as_str),
            attempts: self.attempts,
            request_bytes: self
                .request_bytes
                .as_ref()
                .map_or(0, |b| b.load(Ordering::Relaxed)),
            response_bytes: self.response_bytes,
            trace_id: self.trace_id.map(|t| t.to_string()),
        };
        if let Err(e) = serde_json::to_writer(&mut *out, &line) {
            tracing::debug!(error = %e, "cannot format an access-log line");
        }
    }
}

/// A `grpc-message` as sent (percent-encoded), decoded.
fn decode(v: &HeaderValue) -> String {
    percent_encoding::percent_decode(v.as_bytes())
        .decode_utf8_lossy()
        .into_owned()
}

/// `s` cut to [`MAX_MESSAGE`] bytes on a character boundary, marked with `…` if cut.
fn cut(s: &str) -> String {
    if s.len() <= MAX_MESSAGE {
        return s.to_owned();
    }
    let mut end = MAX_MESSAGE;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_decoded_and_cut() {
        let v = HeaderValue::from_static("no%20endpoints");
        assert_eq!(decode(&v), "no endpoints");
        let long = "é".repeat(200);
        let c = cut(&long);
        assert!(c.len() <= MAX_MESSAGE + "…".len(), "{}", c.len());
        assert!(c.ends_with('…'));
        assert_eq!(cut("short"), "short");
    }
}
