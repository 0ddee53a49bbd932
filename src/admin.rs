//! The admin listener: `/metrics` (Prometheus text), `/endpoints` (JSON), `/healthz`
//! (alive) and `/readyz` (etcd reached at least once and listeners bound).
//!
//! The HTTP part ([`serve_routes`]) is shared with the `register` sidecar's admin
//! listener, which has its own routes.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::CONTENT_TYPE;
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::backoff::Backoff;
use crate::balance::Backend;
use crate::discovery::Discovery;
use crate::etcd::timed;

/// What the admin endpoints report on.
#[derive(Debug)]
pub struct AdminState {
    /// The services and their endpoints.
    pub discovery: Arc<Discovery>,
    /// Set once etcd has answered.
    pub etcd_reached: AtomicBool,
    /// Set once all listeners are bound and serving.
    pub listening: AtomicBool,
}

impl AdminState {
    /// State for a proxy using `discovery`.
    pub fn new(discovery: Arc<Discovery>) -> Arc<Self> {
        Arc::new(Self {
            discovery,
            etcd_reached: AtomicBool::new(false),
            listening: AtomicBool::new(false),
        })
    }

    fn ready(&self) -> bool {
        self.etcd_reached.load(Ordering::Relaxed) && self.listening.load(Ordering::Relaxed)
    }

    /// Updates the gauges that are computed from discovery state.
    fn refresh_gauges(&self) {
        let m = self.discovery.metrics();
        m.upstream.update(self.discovery.pool().stats());
        m.endpoints.reset();
        m.watch_up.reset();
        // Reset so that endpoints gone from the registry leave the exposition.
        m.endpoint_weight.reset();
        m.endpoint_latency.reset();
        for svc in self.discovery.services() {
            let name = svc.name().as_str();
            let now = crate::clock::now_ns();
            let tracks_latency = svc.balancer().policy() == crate::balance::Policy::PeakEwma;
            let mut counts = [0i64; Backend::STATE_NAMES.len()];
            for ep in svc.endpoints().iter() {
                let addr = ep.addr().as_str();
                m.endpoint_weight
                    .with_label_values(&[name, addr])
                    .set(ep.effective_weight(now));
                if tracks_latency {
                    m.endpoint_latency
                        .with_label_values(&[name, addr])
                        .set(ep.latency_estimate(now) / 1e9);
                }
                let state = ep.state_name(now);
                if let Some(i) = Backend::STATE_NAMES.iter().position(|s| *s == state) {
                    counts[i] += 1;
                }
            }
            for (state, count) in Backend::STATE_NAMES.iter().zip(counts) {
                m.endpoints.with_label_values(&[name, state]).set(count);
            }
            m.watch_up
                .with_label_values(&[name])
                .set(i64::from(svc.etcd_reachable()));
        }
    }
}

#[derive(Serialize)]
struct EndpointJson<'a> {
    address: &'a str,
    state: &'static str,
    inflight: i64,
    /// HTTP/2 connections open to its address (shared with every service at it).
    connections: usize,
    /// Streams open on them (every service's).
    streams: u32,
    /// The registry's weight.
    weight: u32,
    /// The weight the policies use now (lower during slow start).
    effective_weight: f64,
    /// The peak-EWMA latency estimate (tracked with `peak-ewma` only).
    latency_estimate_ms: Option<f64>,
    /// How much longer the endpoint stays ejected.
    ejected_for_ms: Option<u64>,
    /// Calls failed in a row (towards ejection).
    failures_in_a_row: u32,
    /// How long ago it was last ejected or found unhealthy.
    last_failure_ago_ms: Option<u64>,
    /// Its zone (its metadata's value under the zone key), if labelled.
    zone: Option<String>,
    /// Whether it is in the proxy's zone (with a zone set only).
    in_zone: Option<bool>,
    /// The registry's own version field (Kratos, go-micro), if any.
    version: Option<String>,
    /// The registry's metadata, as read.
    metadata: Option<serde_json::Value>,
}

#[derive(Serialize)]
struct ServiceJson<'a> {
    service: &'a str,
    balance: &'static str,
    etcd_watch_up: bool,
    loaded: bool,
    /// The proxy's zone, if set.
    zone: Option<String>,
    /// The service's traffic rules, and which subsets fall back now.
    traffic: Option<serde_json::Value>,
    endpoints: Vec<EndpointJson<'a>>,
}

/// A service's traffic rules as `/endpoints` shows them.
fn traffic_json(t: &crate::balance::Traffic) -> serde_json::Value {
    let r = t.rules();
    serde_json::json!({
        "strict": r.strict,
        "match": r.matches.iter().map(|m| serde_json::json!({
            "header": m.header.as_str(),
            "value": m.value.to_str().unwrap_or_default(),
            "subset": m.subset.pairs(),
        })).collect::<Vec<_>>(),
        "split": r.splits.iter().map(|(s, w)| serde_json::json!({
            "subset": s.pairs(),
            "weight": w,
        })).collect::<Vec<_>>(),
        "falling_back": t.falling_back().iter().map(|s| s.to_string()).collect::<Vec<_>>(),
    })
}

fn endpoints_json(state: &AdminState) -> Vec<u8> {
    let services = state.discovery.services();
    let snaps: Vec<_> = services.iter().map(|s| s.endpoints_full()).collect();
    let now = crate::clock::now_ns();
    let out: Vec<ServiceJson<'_>> = services
        .iter()
        .zip(&snaps)
        .map(|(svc, snap)| {
            let steering = svc.balancer().steering();
            ServiceJson {
                service: svc.name().as_str(),
                balance: svc.balancer().policy().name(),
                etcd_watch_up: svc.etcd_reachable(),
                loaded: svc.is_loaded(),
                zone: steering.zone.as_deref().map(str::to_owned),
                traffic: snap.traffic().map(|t| traffic_json(t)),
                endpoints: snap
                    .iter()
                    .enumerate()
                    .map(|(i, ep)| {
                        let (connections, streams) = ep.upstream().load();
                        let registered = ep.endpoint();
                        EndpointJson {
                            zone: registered.label(&steering.zone_key).map(|z| z.into_owned()),
                            in_zone: snap.is_local(i),
                            version: registered.version.clone(),
                            metadata: registered.metadata.clone(),
                            address: ep.addr().as_str(),
                            connections,
                            streams,
                            state: ep.state_name(now),
                            ejected_for_ms: ep
                                .health()
                                .ejected_until(now)
                                .map(|until| (until - now) / 1_000_000),
                            failures_in_a_row: ep.health().failures(),
                            last_failure_ago_ms: ep
                                .health()
                                .last_failure_at()
                                .map(|at| now.saturating_sub(at) / 1_000_000),
                            inflight: i64::from(ep.in_flight()),
                            weight: ep.weight(),
                            effective_weight: (ep.effective_weight(now) * 100.0).round() / 100.0,
                            latency_estimate_ms: svc
                                .balancer()
                                .settings()
                                .track_latency()
                                .then(|| (ep.latency_estimate(now) / 1e4).round() / 100.0),
                        }
                    })
                    .collect(),
            }
        })
        .collect();
    serde_json::to_vec_pretty(&out).unwrap_or_default()
}

/// An answer of an admin listener.
pub type AdminResponse = Response<Full<Bytes>>;

/// Content type of plain-text answers.
pub const TEXT: &str = "text/plain; charset=utf-8";

/// Content type of the Prometheus text exposition.
pub const METRICS: &str = "text/plain; version=0.0.4; charset=utf-8";

/// An answer with `status`, `content_type` and `body`.
pub fn reply(
    status: StatusCode,
    content_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

/// The proxy's routes.
fn route(state: &AdminState, path: &str) -> AdminResponse {
    match path {
        "/metrics" => {
            state.refresh_gauges();
            reply(StatusCode::OK, METRICS, state.discovery.metrics().render())
        }
        "/endpoints" => reply(StatusCode::OK, "application/json", endpoints_json(state)),
        "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
        "/readyz" => {
            if state.ready() {
                reply(StatusCode::OK, TEXT, "ready\n")
            } else if !state.etcd_reached.load(Ordering::Relaxed) {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: etcd not reached yet\n",
                )
            } else {
                reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    "not ready: listeners not bound yet\n",
                )
            }
        }
        _ => reply(
            StatusCode::NOT_FOUND,
            TEXT,
            "not found; try /metrics, /endpoints, /healthz, /readyz\n",
        ),
    }
}

/// Serves the proxy's admin endpoints on `listener` until `stop` turns true.
pub async fn serve(listener: TcpListener, state: Arc<AdminState>, stop: watch::Receiver<bool>) {
    serve_routes(listener, move |path| route(&state, path), stop).await;
}

/// Serves HTTP/1 on `listener` until `stop` turns true (or its sender is dropped):
/// GET and HEAD requests are answered by `route(path)`, other methods with 405.
pub async fn serve_routes<R>(listener: TcpListener, route: R, mut stop: watch::Receiver<bool>)
where
    R: Fn(&str) -> AdminResponse + Send + Sync + 'static,
{
    let route = Arc::new(route);
    loop {
        let (stream, _) = tokio::select! {
            a = listener.accept() => match a {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let route = Arc::clone(&route);
        tokio::spawn(async move {
            let svc = service_fn(move |req: Request<Incoming>| {
                let resp = if req.method() == Method::GET || req.method() == Method::HEAD {
                    route(req.uri().path())
                } else {
                    reply(StatusCode::METHOD_NOT_ALLOWED, TEXT, "use GET\n")
                };
                std::future::ready(Ok::<_, Infallible>(resp))
            });
            let conn = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(Duration::from_secs(5))
                .serve_connection(TokioIo::new(stream), svc);
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "admin connection error");
            }
        });
    }
}

/// Time between probes while etcd answers.
const PROBE_INTERVAL: Duration = Duration::from_secs(5);

/// Probes etcd every few seconds (every [`PROBE_INTERVAL`] while it answers, backing off
/// from 1 s to that while it does not); records reachability for `/readyz` and
/// `switchyard_etcd_up`.
pub async fn probe_etcd(mut client: etcd_client::Client, state: Arc<AdminState>) {
    let mut was_up: Option<bool> = None;
    let mut backoff = Backoff::new(Duration::from_secs(1), PROBE_INTERVAL);
    loop {
        let up = timed("status", Duration::from_secs(3), client.status())
            .await
            .is_ok();
        state.discovery.metrics().etcd_up.set(i64::from(up));
        if up {
            state.etcd_reached.store(true, Ordering::Relaxed);
        }
        if was_up != Some(up) {
            if up {
                tracing::info!("etcd reachable");
            } else {
                tracing::warn!("etcd unreachable; serving last known endpoints");
            }
            was_up = Some(up);
        }
        if up {
            backoff.reset();
            tokio::time::sleep(PROBE_INTERVAL).await;
        } else {
            backoff.sleep().await;
        }
    }
}
