//! Where a call leaves: one pooled, multiplexed HTTP/2 connection per backend.
//!
//! Each [`Upstream`] owns a background task that connects, keeps the connection, and
//! reconnects with exponential backoff when it dies. The call path only loads the
//! current sender (lock-free) and clones it.

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http2::{self, SendRequest};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::discovery::BackendAddr;
use crate::metrics::{EndpointMetrics, ServiceMetrics};
use crate::tls::UpstreamTls;
use tokio_util::either::Either;

/// The body type forwarded to backends: the client's request body, streamed as is
/// (and recorded briefly so a refused call can be replayed).
pub type RequestBody = crate::proxy::replay::ReplayBody;

/// Settings for backend connections.
#[derive(Debug, Clone)]
pub struct UpstreamConfig {
    /// Time allowed for TCP connect plus the HTTP/2 handshake.
    pub connect_timeout: Duration,
    /// First reconnect delay after a failure.
    pub backoff_min: Duration,
    /// Longest reconnect delay.
    pub backoff_max: Duration,
    /// HTTP/2 keep-alive ping interval (detects dead peers on idle connections).
    pub keepalive_interval: Duration,
    /// Metrics of the service these backends belong to, if measured.
    pub metrics: Option<Arc<ServiceMetrics>>,
    /// TLS to backends, if enabled.
    pub tls: Option<UpstreamTls>,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            metrics: None,
            tls: None,
        }
    }
}

/// Connection state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum State {
    /// Connecting (first time, or right after a connection ended).
    Connecting = 0,
    /// Connected; calls go out on the pooled connection.
    Ready = 1,
    /// The last connect failed; skipped by the balancer until a reconnect succeeds.
    Failed = 2,
}

impl State {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => State::Ready,
            2 => State::Failed,
            _ => State::Connecting,
        }
    }

    /// Lower-case name, for logs and admin output.
    pub fn as_str(self) -> &'static str {
        match self {
            State::Connecting => "connecting",
            State::Ready => "ready",
            State::Failed => "failed",
        }
    }
}

/// Why no sender could be had for a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum UpstreamError {
    /// The backend could not be connected to.
    #[error("backend unreachable")]
    Unreachable,
    /// Connecting took longer than the connect timeout.
    #[error("backend connect timed out")]
    Timeout,
}

/// One backend and its pooled HTTP/2 connection.
#[derive(Debug)]
pub struct Upstream {
    addr: BackendAddr,
    sender: ArcSwapOption<SendRequest<RequestBody>>,
    state: AtomicU8,
    changed: Notify,
    /// A call gave up waiting for this backend's answer; its connection is being
    /// re-probed, and calls prefer other backends until the probe answers.
    suspect: AtomicBool,
    /// Wakes the connection task to probe the live connection.
    check: Arc<Notify>,
    connect_timeout: Duration,
    metrics: Option<Arc<EndpointMetrics>>,
}

impl Upstream {
    /// A backend at `addr`, not yet connected; call [`Upstream::start`] to connect.
    pub fn new(addr: BackendAddr, config: &UpstreamConfig) -> Arc<Self> {
        Arc::new(Self {
            sender: ArcSwapOption::empty(),
            state: AtomicU8::new(State::Connecting as u8),
            changed: Notify::new(),
            suspect: AtomicBool::new(false),
            check: Arc::new(Notify::new()),
            connect_timeout: config.connect_timeout,
            metrics: config.metrics.as_ref().map(|m| m.endpoint(&addr)),
            addr,
        })
    }

    /// Starts the connection task (connect, keep, reconnect with backoff).
    ///
    /// The task holds only a weak reference: once the last `Arc<Upstream>` is gone (the
    /// endpoint left the set and no call uses it), it stops reconnecting, and the HTTP/2
    /// connection closes after the streams still on it have finished.
    pub fn start(self: &Arc<Self>, config: UpstreamConfig) {
        tokio::spawn(connection_loop(
            Arc::downgrade(self),
            Arc::clone(&self.check),
            config,
        ));
    }

    /// The backend's address.
    pub fn addr(&self) -> &BackendAddr {
        &self.addr
    }

    /// This backend's metric handles, if measured.
    pub fn metrics(&self) -> Option<&Arc<EndpointMetrics>> {
        self.metrics.as_ref()
    }

    /// The current connection state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Acquire))
    }

    /// Whether the balancer should pick this backend now.
    #[inline]
    pub fn is_usable(&self) -> bool {
        self.state.load(Ordering::Relaxed) != State::Failed as u8
    }

    /// Whether calls should prefer this backend: connected, and not suspected of
    /// having stopped answering.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        self.state.load(Ordering::Relaxed) == State::Ready as u8
            && !self.suspect.load(Ordering::Relaxed)
    }

    /// Tells the upstream that a call gave up waiting for its response (deadline or
    /// cancel): calls prefer other backends until a probe on its connection is
    /// answered, so a backend that froze gets no more calls while others can take them.
    pub fn report_unresponsive(&self) {
        if self.state() == State::Ready && !self.suspect.swap(true, Ordering::Relaxed) {
            tracing::debug!(backend = %self.addr, "call abandoned waiting for backend; probing its connection");
            self.check.notify_one();
        }
    }

    fn set_state(&self, s: State) {
        self.state.store(s as u8, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// A sender on the pooled connection, waiting (up to the connect timeout) while a
    /// connection is being set up.
    pub async fn sender(&self) -> Result<SendRequest<RequestBody>, UpstreamError> {
        if let Some(s) = self.ready_sender() {
            return Ok(s);
        }
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(s) = self.ready_sender() {
                    return Ok(s);
                }
                if self.state() == State::Failed {
                    return Err(UpstreamError::Unreachable);
                }
                notified.await;
            }
        };
        tokio::time::timeout(self.connect_timeout, wait)
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
    }

    #[inline]
    fn ready_sender(&self) -> Option<SendRequest<RequestBody>> {
        let guard = self.sender.load();
        match guard.as_ref() {
            Some(s) if !s.is_closed() => Some(SendRequest::clone(s)),
            _ => None,
        }
    }

    /// Tells the upstream that its connection was found closed by a call, so the next
    /// calls do not pick it until it has reconnected.
    pub fn report_closed(&self) {
        let guard = self.sender.load();
        if guard.as_ref().is_some_and(|s| s.is_closed()) && self.state() == State::Ready {
            self.set_state(State::Connecting);
        }
    }
}

/// A backend connection's transport: plain TCP or TLS over TCP.
type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// Opens a TCP connection (with TLS if configured) and performs the HTTP/2 handshake.
async fn connect(
    addr: &BackendAddr,
    config: &UpstreamConfig,
) -> std::io::Result<(
    SendRequest<RequestBody>,
    http2::Connection<TokioIo<UpstreamIo>, RequestBody, TokioExecutor>,
)> {
    let tcp = TcpStream::connect((addr.host(), addr.port())).await?;
    tcp.set_nodelay(true)?;
    let io = match &config.tls {
        None => Either::Left(tcp),
        Some(tls) => {
            let name = tls.server_name(addr.host()).ok_or_else(|| {
                std::io::Error::other(format!("{addr}: host is not a valid TLS server name"))
            })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
            Either::Right(connector.connect(name, tcp).await?)
        }
    };
    http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(64 * 1024)
        .keep_alive_interval(config.keepalive_interval)
        .keep_alive_timeout(Duration::from_secs(5))
        .max_concurrent_reset_streams(1024)
        .handshake(TokioIo::new(io))
        .await
        .map_err(std::io::Error::other)
}

/// Sends one gRPC health check (empty request) and waits for any response headers:
/// proof that the peer speaks HTTP/2. Its answer (even UNIMPLEMENTED) is not judged.
async fn probe(sender: &mut SendRequest<RequestBody>) -> Result<(), hyper::Error> {
    let body = RequestBody::fixed(bytes::Bytes::from_static(&[0, 0, 0, 0, 0]));
    let mut req = http::Request::new(body);
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://switchyard.probe/grpc.health.v1.Health/Check");
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    sender.send_request(req).await.map(drop)
}

/// Doubles a delay, capped.
fn next_backoff(current: Duration, config: &UpstreamConfig) -> Duration {
    (current * 2).min(config.backoff_max)
}

/// Waits until the connection ends. Whenever a call reports the backend unresponsive,
/// probes it on this connection until it answers (calls prefer other backends
/// meanwhile). The connection is not dropped for an unanswered probe: a backend busy
/// with long streams up to its stream limit would lose them all; a dead peer is found
/// by HTTP/2 keep-alive.
async fn serve_connection(
    this: &std::sync::Weak<Upstream>,
    check: &Notify,
    mut conn: std::pin::Pin<
        &mut http2::Connection<TokioIo<UpstreamIo>, RequestBody, TokioExecutor>,
    >,
    config: &UpstreamConfig,
) -> Result<(), hyper::Error> {
    loop {
        tokio::select! {
            r = conn.as_mut() => return r,
            _ = check.notified() => {}
        }
        let mut warned = false;
        loop {
            // Take a sender for the probe only (holding one for good would keep the
            // connection open after the upstream is gone). Once the upstream is gone,
            // only wait for the streams still on the connection.
            let Some(mut sender) = this
                .upgrade()
                .and_then(|up| up.sender.load().as_ref().map(|s| SendRequest::clone(s)))
            else {
                return conn.await;
            };
            let probed = tokio::select! {
                r = tokio::time::timeout(config.connect_timeout, probe(&mut sender)) => r,
                r = conn.as_mut() => return r,
            };
            drop(sender);
            let Some(up) = this.upgrade() else {
                return conn.await;
            };
            let error = match probed {
                Ok(Ok(())) => {
                    up.suspect.store(false, Ordering::Relaxed);
                    if warned {
                        tracing::info!(backend = %up.addr, "backend answers again");
                    }
                    break;
                }
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", config.connect_timeout),
            };
            if !warned {
                tracing::warn!(backend = %up.addr, %error, "backend does not answer a probe on its connection; calls prefer other backends");
                warned = true;
            }
            drop(up);
            tokio::select! {
                _ = tokio::time::sleep(config.connect_timeout) => {}
                r = conn.as_mut() => return r,
            }
        }
    }
}

async fn connection_loop(
    this: std::sync::Weak<Upstream>,
    check: Arc<Notify>,
    config: UpstreamConfig,
) {
    let mut backoff = config.backoff_min;
    loop {
        let Some(up) = this.upgrade() else { return };
        let addr = up.addr.clone();
        drop(up);
        let attempt = tokio::time::timeout(config.connect_timeout, connect(&addr, &config)).await;
        let Some(up) = this.upgrade() else { return };
        match attempt {
            Ok(Ok((mut sender, conn))) => {
                // The HTTP/2 handshake only sends our preface; make sure the peer really
                // answers HTTP/2 before calls are sent its way.
                tokio::pin!(conn);
                let probed = tokio::select! {
                    r = tokio::time::timeout(config.connect_timeout, probe(&mut sender)) => match r {
                        Ok(Ok(())) => Ok(()),
                        Ok(Err(e)) => Err(e.to_string()),
                        Err(_) => Err(format!("no HTTP/2 answer within {:?}", config.connect_timeout)),
                    },
                    r = &mut conn => Err(match r {
                        Ok(()) => "connection closed during probe".to_owned(),
                        Err(e) => e.to_string(),
                    }),
                };
                if let Err(e) = probed {
                    if up.state() != State::Failed {
                        tracing::warn!(backend = %addr, error = %e, "backend does not answer HTTP/2; backing off");
                    }
                    up.set_state(State::Failed);
                    drop(up);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = next_backoff(backoff, &config);
                    continue;
                }
                up.sender.store(Some(Arc::new(sender)));
                up.suspect.store(false, Ordering::Relaxed);
                if up.state() != State::Ready {
                    tracing::info!(backend = %addr, "backend connected");
                }
                up.set_state(State::Ready);
                drop(up);
                let connected_at = tokio::time::Instant::now();
                let result = serve_connection(&this, &check, conn, &config).await;
                let Some(up) = this.upgrade() else { return };
                up.sender.store(None);
                up.set_state(State::Connecting);
                match result {
                    Ok(()) => tracing::info!(backend = %addr, "backend connection closed"),
                    Err(e) => {
                        tracing::warn!(backend = %addr, error = %e, "backend connection lost")
                    }
                }
                // A connection that lived a while is re-established at once; one that died
                // young backs off, so a backend that accepts and drops is not hammered.
                if connected_at.elapsed() >= Duration::from_secs(1) {
                    backoff = config.backoff_min;
                } else {
                    drop(up);
                    tokio::time::sleep(jitter(backoff)).await;
                    backoff = next_backoff(backoff, &config);
                }
                continue;
            }
            Ok(Err(e)) => {
                if up.state() != State::Failed {
                    tracing::warn!(backend = %addr, error = %e, "backend unreachable; backing off");
                }
            }
            Err(_) => {
                if up.state() != State::Failed {
                    tracing::warn!(backend = %addr, timeout = ?config.connect_timeout, "backend connect timed out; backing off");
                }
            }
        }
        up.set_state(State::Failed);
        drop(up);
        tokio::time::sleep(jitter(backoff)).await;
        backoff = next_backoff(backoff, &config);
    }
}

/// Spreads reconnects of many upstreams apart (±20%), without a random number crate.
fn jitter(d: Duration) -> Duration {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|t| t.subsec_nanos())
        .unwrap_or(0);
    let factor = 0.8 + f64::from(nanos % 400) / 1000.0;
    d.mul_f64(factor)
}
