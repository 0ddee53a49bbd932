//! Where a call leaves: one pooled, multiplexed HTTP/2 connection per backend.
//!
//! Each [`Upstream`] owns a background task that connects, keeps the connection, and
//! reconnects with exponential backoff when it dies. The call path only loads the
//! current connection (lock-free) and clones its sender.
//!
//! Backend connections use the `h2` crate directly rather than hyper's client: a call's
//! HEADERS and its first DATA frame are then queued together and leave in one write, and
//! a unary call needs no task besides its own (hyper spawns two per request), which
//! measurably lowers the proxy's CPU per call (see `benches/RESULTS.md`).

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio::sync::Notify;

use crate::backoff::Backoff;
use crate::endpoint::BackendAddr;
use crate::metrics::{EndpointMetrics, ServiceMetrics};
use crate::tls::UpstreamTls;
use tokio_util::either::Either;

/// How long a keep-alive ping may wait for its answer before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// One established HTTP/2 connection to a backend: clone `send` to start a call.
#[derive(Debug)]
pub struct Connection {
    /// Opens streams on the connection.
    pub send: SendRequest<Bytes>,
    /// Set once the connection is known to be closed.
    closed: AtomicBool,
}

impl Connection {
    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }
}

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
/// In declared order (`repr(C)`): the state every pick reads comes first, in the
/// cache line of the reference counts, which each call touches anyway.
#[derive(Debug)]
#[repr(C)]
pub struct Upstream {
    state: AtomicU8,
    /// A call gave up waiting for this backend's answer; its connection is being
    /// re-probed, and calls prefer other backends until the probe answers.
    suspect: AtomicBool,
    conn: ArcSwapOption<Connection>,
    addr: BackendAddr,
    changed: Notify,
    /// Wakes the connection task to probe the live connection.
    check: Arc<Notify>,
    /// When a connection last succeeded after failed ones ([`crate::clock::now_ns`]).
    recovered_at: AtomicU64,
    connect_timeout: Duration,
    metrics: Option<Arc<EndpointMetrics>>,
}

impl Upstream {
    /// A backend at `addr`, not yet connected; call [`Upstream::start`] to connect.
    pub fn new(addr: BackendAddr, config: &UpstreamConfig) -> Arc<Self> {
        Arc::new(Self {
            conn: ArcSwapOption::empty(),
            state: AtomicU8::new(State::Connecting as u8),
            changed: Notify::new(),
            suspect: AtomicBool::new(false),
            check: Arc::new(Notify::new()),
            recovered_at: AtomicU64::new(0),
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

    /// When the backend last connected after failing to ([`crate::clock::now_ns`]; 0 if
    /// it never failed): where slow start begins again.
    #[inline]
    pub fn recovered_at(&self) -> u64 {
        self.recovered_at.load(Ordering::Relaxed)
    }

    /// Marks the backend connected although it has no connection: for benchmarks and
    /// tests of selection, which send no call.
    #[doc(hidden)]
    pub fn assume_ready(&self) {
        self.set_state(State::Ready);
    }

    fn set_state(&self, s: State) {
        let was = self.state.swap(s as u8, Ordering::AcqRel);
        if s == State::Ready && was == State::Failed as u8 {
            self.recovered_at
                .store(crate::clock::now_ns(), Ordering::Relaxed);
        }
        self.changed.notify_waiters();
    }

    /// The pooled connection, waiting (up to the connect timeout) while a connection is
    /// being set up.
    #[inline]
    pub async fn connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(c) = self.ready_connection() {
            return Ok(c);
        }
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(c) = self.ready_connection() {
                    return Ok(c);
                }
                if self.state() == State::Failed {
                    return Err(UpstreamError::Unreachable);
                }
                notified.await;
            }
        };
        // Boxed: the slow path should not weigh on every call's future.
        Box::pin(tokio::time::timeout(self.connect_timeout, wait))
            .await
            .unwrap_or(Err(UpstreamError::Timeout))
    }

    /// Waits until the backend is not connecting: for a new one, until its first
    /// connect attempt has ended (connected or failed). Not for the call path.
    pub async fn wait_settled(&self) {
        loop {
            let notified = self.changed.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            if self.state() != State::Connecting {
                return;
            }
            notified.await;
        }
    }

    /// The pooled connection if it is up.
    #[inline]
    pub fn ready_connection(&self) -> Option<Arc<Connection>> {
        let guard = self.conn.load();
        match guard.as_ref() {
            Some(c) if !c.is_closed() => Some(Arc::clone(c)),
            _ => None,
        }
    }

    /// Tells the upstream that `conn` was found closed by a call, so the next calls do
    /// not pick it until it has reconnected.
    pub fn report_closed(&self, conn: &Connection) {
        conn.closed.store(true, Ordering::Release);
        let current = self.conn.load();
        let is_current = current.as_deref().is_some_and(|c| std::ptr::eq(c, conn));
        if is_current && self.state() == State::Ready {
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
    SendRequest<Bytes>,
    h2::client::Connection<UpstreamIo, Bytes>,
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
    h2::client::Builder::new()
        .enable_push(false)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(64 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(1 << 20)
        .max_concurrent_reset_streams(1024)
        .handshake(io)
        .await
        .map_err(std::io::Error::other)
}

/// Sends one gRPC health check (empty request) and waits for any response headers:
/// proof that the peer speaks HTTP/2. Its answer (even UNIMPLEMENTED) is not judged.
async fn probe(sender: &SendRequest<Bytes>) -> Result<(), h2::Error> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://switchyard.probe/grpc.health.v1.Health/Check");
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let (response, mut body) = sender.clone().send_request(req, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    response.await.map(drop)
}

/// Pings the backend every `interval`; returns why the connection is dead once a ping
/// fails or goes unanswered for [`KEEPALIVE_TIMEOUT`].
pub(crate) async fn keepalive(ping: Option<h2::PingPong>, interval: Duration) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => return format!("keep-alive ping unanswered for {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}

/// Serves the connection until it ends or stops answering keep-alive pings. Whenever a
/// call reports the backend unresponsive, probes it on this connection until it answers
/// (calls prefer other backends meanwhile). The connection is not dropped for an
/// unanswered probe: a backend busy with long streams up to its stream limit would lose
/// them all; a dead peer is found by the keep-alive pings.
async fn serve_connection(
    this: &std::sync::Weak<Upstream>,
    check: &Notify,
    mut conn: std::pin::Pin<&mut h2::client::Connection<UpstreamIo, Bytes>>,
    ping: Option<h2::PingPong>,
    config: &UpstreamConfig,
) -> Result<(), String> {
    let keepalive = keepalive(ping, config.keepalive_interval);
    tokio::pin!(keepalive);
    loop {
        tokio::select! {
            r = conn.as_mut() => return r.map_err(|e| e.to_string()),
            e = &mut keepalive => return Err(e),
            _ = check.notified() => {}
        }
        let mut warned = false;
        loop {
            // Take a sender for the probe only (holding one for good would keep the
            // connection open after the upstream is gone). Once the upstream is gone,
            // only wait for the streams still on the connection.
            let Some(sender) = this
                .upgrade()
                .and_then(|up| up.conn.load().as_ref().map(|c| c.send.clone()))
            else {
                return tokio::select! {
                    r = conn.as_mut() => r.map_err(|e| e.to_string()),
                    e = &mut keepalive => Err(e),
                };
            };
            let probed = tokio::select! {
                r = tokio::time::timeout(config.connect_timeout, probe(&sender)) => r,
                r = conn.as_mut() => return r.map_err(|e| e.to_string()),
                e = &mut keepalive => return Err(e),
            };
            drop(sender);
            let Some(up) = this.upgrade() else {
                continue;
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
                r = conn.as_mut() => return r.map_err(|e| e.to_string()),
                e = &mut keepalive => return Err(e),
            }
        }
    }
}

async fn connection_loop(
    this: std::sync::Weak<Upstream>,
    check: Arc<Notify>,
    config: UpstreamConfig,
) {
    let mut backoff = Backoff::new(config.backoff_min, config.backoff_max);
    loop {
        let Some(up) = this.upgrade() else { return };
        let addr = up.addr.clone();
        drop(up);
        let attempt = tokio::time::timeout(config.connect_timeout, connect(&addr, &config)).await;
        let Some(up) = this.upgrade() else { return };
        match attempt {
            Ok(Ok((sender, mut conn))) => {
                let ping = conn.ping_pong();
                // The HTTP/2 handshake only sends our preface; make sure the peer really
                // answers HTTP/2 before calls are sent its way.
                tokio::pin!(conn);
                let probed = tokio::select! {
                    r = tokio::time::timeout(config.connect_timeout, probe(&sender)) => match r {
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
                    backoff.sleep().await;
                    continue;
                }
                let connection = Arc::new(Connection {
                    send: sender,
                    closed: AtomicBool::new(false),
                });
                // Only the upstream holds the connection's sender: once it is gone and the
                // streams on it have ended, the connection closes.
                let weak_connection = Arc::downgrade(&connection);
                up.conn.store(Some(connection));
                up.suspect.store(false, Ordering::Relaxed);
                if up.state() != State::Ready {
                    tracing::info!(backend = %addr, "backend connected");
                }
                up.set_state(State::Ready);
                drop(up);
                let connected_at = tokio::time::Instant::now();
                let result = serve_connection(&this, &check, conn.as_mut(), ping, &config).await;
                if let Some(c) = weak_connection.upgrade() {
                    c.closed.store(true, Ordering::Release);
                }
                let Some(up) = this.upgrade() else { return };
                up.conn.store(None);
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
                    backoff.reset();
                } else {
                    drop(up);
                    backoff.sleep().await;
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
        backoff.sleep().await;
    }
}
