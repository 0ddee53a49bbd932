//! Traces: one span per sampled call, exported over OTLP/gRPC by the OpenTelemetry SDK's
//! batch processor (its own thread, a bounded queue that drops when full: a call never
//! waits for the collector).
//!
//! Sampling is parent-based on the client's W3C `traceparent` (OpenTelemetry's
//! `ParentBased` sampler with its defaults): a sampled parent (flags `01`) is always
//! followed and an unsampled one (`00`) never, since the client, or a hop before it, has
//! made the trace's decision and a span of the proxy's alone would hang from a parent
//! nobody exported; a call without a `traceparent` (or with one that does not parse) is
//! sampled at `observe.trace_sample_rate`.
//! Both decisions are made before the SDK is asked for anything: a call that is not
//! sampled costs a header lookup (and, with a `traceparent`, its parse) and no span, and
//! its headers go to the backend untouched. The SDK's own root sampler then always says
//! yes, since the ratio has been applied already.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::propagation::{Extractor, TextMapPropagator};
use opentelemetry::trace::{
    Span as _, SpanContext, SpanKind, Status, TraceContextExt, TraceId, Tracer as _,
    TracerProvider as _,
};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::WithExportConfig;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{
    BatchConfigBuilder, BatchSpanProcessor, Sampler, SdkTracer, SdkTracerProvider, Span, SpanData,
    SpanExporter,
};
use opentelemetry_sdk::Resource;
use prometheus::IntCounter;

use super::error::ObserveError;

/// The `traceparent` header's name.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");

/// Spans waiting for export at most; more are dropped (and the SDK logs the count).
const MAX_QUEUED_SPANS: usize = 8192;
/// How often queued spans are sent, and how long one export may take.
const EXPORT_INTERVAL: Duration = Duration::from_secs(1);
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);
/// Export failures are logged at most once per this interval (all are counted).
const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The tracer of the process: spans, their sampler and their export.
#[derive(Debug)]
pub struct Tracing {
    /// Root calls sampled when a uniform `u64` draw is below this (`u64::MAX`: all).
    root_threshold: u64,
    provider: SdkTracerProvider,
    tracer: SdkTracer,
    propagator: TraceContextPropagator,
}

impl Tracing {
    /// Starts exporting to the OTLP/gRPC collector at `endpoint`; must be called inside a
    /// tokio runtime (the exporter's connection runs on it). `failures` counts spans
    /// that could not be exported.
    pub fn new(endpoint: &str, rate: f64, failures: IntCounter) -> Result<Self, ObserveError> {
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            .build()
            .map_err(|e| ObserveError::Exporter(endpoint.to_owned(), e.to_string()))?;
        let exporter = Counted {
            inner: exporter,
            failures,
            since: Instant::now(),
            last_logged: AtomicU64::new(u64::MAX),
        };
        let batch = BatchConfigBuilder::default()
            .with_max_queue_size(MAX_QUEUED_SPANS)
            .with_scheduled_delay(EXPORT_INTERVAL)
            .build();
        let processor = BatchSpanProcessor::builder(exporter)
            .with_batch_config(batch)
            .build();
        // Roots are sampled in `start`, before a span is built.
        let sampler = Sampler::parent_based(Sampler::AlwaysOn);
        let resource = Resource::builder_empty()
            .with_service_name("switchyard")
            .with_attribute(KeyValue::new("host.name", host_name()))
            .build();
        let provider = SdkTracerProvider::builder()
            .with_span_processor(processor)
            .with_sampler(sampler)
            .with_resource(resource)
            .build();
        let tracer = provider.tracer("switchyard");
        Ok(Self {
            root_threshold: root_threshold(rate),
            provider,
            tracer,
            propagator: TraceContextPropagator::new(),
        })
    }

    /// The call's span, if sampled, child of the client's `traceparent` (and
    /// `tracestate`) when it sent one, and the call's trace id if it has one; `path` is
    /// the call's `/package.Service/Method`.
    pub fn start(
        &self,
        headers: &HeaderMap,
        path: &str,
        peer: std::net::IpAddr,
    ) -> (Option<Span>, Option<TraceId>) {
        let parent = if headers.contains_key(&TRACEPARENT) {
            self.propagator.extract(&Headers(headers))
        } else {
            Context::new()
        };
        let client = parent.span();
        let sc = client.span_context();
        if sc.is_valid() {
            if !sc.is_sampled() {
                // The client's trace is not sampled: no span, the trace id for the log.
                return (None, Some(sc.trace_id()));
            }
        } else if self.root_threshold != u64::MAX && fastrand::u64(..) >= self.root_threshold {
            // A root call (no `traceparent`, or one that does not parse) not drawn.
            return (None, None);
        }
        // A placeholder name: the real one is built only for a sampled span.
        let mut span = self
            .tracer
            .span_builder("grpc")
            .with_kind(SpanKind::Server)
            .start_with_context(&self.tracer, &parent);
        if !span.span_context().is_sampled() {
            return (None, trace_id(&parent));
        }
        let id = span.span_context().trace_id();
        let name = path.strip_prefix('/').unwrap_or(path);
        let (service, method) = name.split_once('/').unwrap_or((name, ""));
        span.set_attributes([
            KeyValue::new("rpc.system", "grpc"),
            KeyValue::new("rpc.service", service.to_owned()),
            KeyValue::new("rpc.method", method.to_owned()),
            KeyValue::new("network.peer.address", peer.to_string()),
        ]);
        span.update_name(name.to_owned());
        (Some(span), Some(id))
    }

    /// Exports what is queued and stops the export thread (blocks: call off the runtime's
    /// threads).
    pub fn shutdown(&self) {
        if let Err(e) = self.provider.shutdown() {
            tracing::debug!(error = %e, "trace export did not shut down cleanly");
        }
    }
}

/// The draw below which a root call is sampled at `rate` (0 to 1).
fn root_threshold(rate: f64) -> u64 {
    if rate >= 1.0 {
        u64::MAX
    } else {
        // Saturating float-to-int conversion: 0 for 0 (never), about `rate` × 2^64 else.
        (rate.max(0.0) * u64::MAX as f64) as u64
    }
}

/// The `traceparent` that names `span` as the backend's parent.
pub fn traceparent(span: &SpanContext) -> Option<HeaderValue> {
    let text = format!(
        "00-{}-{}-{:02x}",
        span.trace_id(),
        span.span_id(),
        span.trace_flags().to_u8()
    );
    HeaderValue::from_str(&text).ok()
}

/// The client's trace context without a tracer (tracing off, the access log on).
pub fn parent_only(headers: &HeaderMap) -> Context {
    TraceContextPropagator::new().extract(&Headers(headers))
}

/// The trace id the client's context carries, if any.
pub fn trace_id(parent: &Context) -> Option<TraceId> {
    let sc = parent.span().span_context().clone();
    sc.is_valid().then(|| sc.trace_id())
}

/// Notes where the call went (the answering backend) on its span.
pub fn backend(span: &mut Span, addr: &crate::endpoint::BackendAddr) {
    let authority = addr.authority();
    span.set_attribute(KeyValue::new("server.address", authority.host().to_owned()));
    if let Some(port) = authority.port_u16() {
        span.set_attribute(KeyValue::new("server.port", i64::from(port)));
    }
}

/// Ends the call's span with its gRPC status (`None`: it ended without one) and the
/// number of backends it was offered to.
pub fn end(span: &mut Span, status: Option<u8>, attempts: u8) {
    match status {
        Some(code) => {
            span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
            // Server spans: the codes that mean the server failed (OpenTelemetry's gRPC
            // conventions); the client's own errors leave the status unset.
            if matches!(code, 2 | 4 | 12 | 13 | 14 | 15) {
                span.set_status(Status::error(""));
            }
        }
        None => span.set_status(Status::error("ended without a grpc-status")),
    }
    if attempts > 1 {
        span.set_attribute(KeyValue::new("switchyard.attempts", i64::from(attempts)));
    }
    span.end();
}

/// The host's name, for the resource (`host.name`).
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|s| s.trim().to_owned())
        .ok()
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "unknown".to_owned())
}

/// Request headers as the propagator reads them.
struct Headers<'a>(&'a HeaderMap);

impl Extractor for Headers<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0.keys().map(HeaderName::as_str).collect()
    }
}

/// The OTLP exporter, with its failures counted and logged at most once per interval.
#[derive(Debug)]
struct Counted<E> {
    inner: E,
    failures: IntCounter,
    since: Instant,
    /// Seconds after `since` of the last failure logged (`u64::MAX`: none yet).
    last_logged: AtomicU64,
}

impl<E: SpanExporter> SpanExporter for Counted<E> {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let n = batch.len() as u64;
        let result = self.inner.export(batch).await;
        if let Err(e) = &result {
            self.failures.inc_by(n);
            let now = self.since.elapsed().as_secs();
            let last = self.last_logged.load(Ordering::Relaxed);
            if last == u64::MAX || now.saturating_sub(last) >= FAILURE_LOG_INTERVAL.as_secs() {
                self.last_logged.store(now, Ordering::Relaxed);
                tracing::warn!(error = %e, spans = n, "cannot export spans to the OTLP collector; counted in switchyard_trace_spans_failed_total, logged again in a minute at most");
            }
        }
        result
    }

    fn shutdown_with_timeout(&self, timeout: Duration) -> OTelSdkResult {
        self.inner.shutdown_with_timeout(timeout)
    }

    fn force_flush(&self) -> OTelSdkResult {
        self.inner.force_flush()
    }

    fn set_resource(&mut self, resource: &Resource) {
        self.inner.set_resource(resource);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_threshold_spans_the_draws() {
        assert_eq!(root_threshold(0.0), 0);
        assert_eq!(root_threshold(1.0), u64::MAX);
        let half = root_threshold(0.5);
        assert!(half.abs_diff(u64::MAX / 2) < u64::MAX / 1_000_000, "{half}");
        let hundredth = root_threshold(0.01) as f64 / u64::MAX as f64;
        assert!((hundredth - 0.01).abs() < 1e-9, "{hundredth}");
    }
}
