//! Where a call leaves: pooled, multiplexed HTTP/2 connections to each backend address.
//!
//! One [`Upstream`] per backend address, shared by every service, prefix and registry
//! format whose endpoints name that address ([`UpstreamPool`]): a process serving a
//! hundred gRPC services on one port gets one connection from the proxy, not a hundred.
//! What is per service (weight, health, latency estimate, calls in flight) stays with the
//! service's [`crate::balance::Backend`].
//!
//! An upstream usually holds one connection. When every connection is at the backend's
//! `SETTINGS_MAX_CONCURRENT_STREAMS` (or refused a stream below it), another is opened,
//! up to `max_connections`, as Envoy's HTTP/2 pool does; an extra connection without a
//! stream for a while is closed again. A connection with no stream for the idle timeout
//! is closed, and the next call that picks the endpoint reopens it, waiting for it within
//! the connect timeout.
//!
//! Each upstream owns a background task that connects, keeps the connection, and
//! reconnects with exponential backoff when it dies. The call path only loads the
//! current connections (lock-free), and takes one with room (an `Arc` clone: a call holds
//! it for as long as its stream lives, which is what counts the connection's streams).
//!
//! Backend connections use the `h2` crate directly rather than hyper's client: a call's
//! HEADERS and its first DATA frame are then queued together and leave in one write, and
//! a unary call needs no task besides its own (hyper spawns two per request), which
//! measurably lowers the proxy's CPU per call (see `benches/RESULTS.md`).

mod channel;
mod connect;
mod pool;
mod task;

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use bytes::Bytes;
use h2::client::SendRequest;
use tokio::sync::Notify;

use crate::endpoint::BackendAddr;
use crate::tls::UpstreamTls;

pub use channel::{BackendChannel, ChannelError};
pub(crate) use connect::keepalive;
pub use pool::{PoolStats, UpstreamPool};

/// One established HTTP/2 connection to a backend: clone `send` to start a call. A call
/// holds the `Arc` for as long as its stream lives.
#[derive(Debug)]
pub struct Connection {
    /// Opens streams on the connection.
    pub send: SendRequest<Bytes>,
    /// Set once the connection is known to be closed.
    closed: AtomicBool,
    /// Streams the peer allows at once (`SETTINGS_MAX_CONCURRENT_STREAMS`), as last read,
    /// lowered to the streams open when the peer refused one below its limit.
    room: AtomicU32,
}

impl Connection {
    fn new(send: SendRequest<Bytes>) -> Arc<Self> {
        let room = peer_limit(&send);
        Arc::new(Self {
            send,
            closed: AtomicBool::new(false),
            room: AtomicU32::new(room),
        })
    }

    /// Whether the connection is known to be closed.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Streams open on it now (each call holds one reference; the upstream one).
    #[inline]
    fn streams(self: &Arc<Self>) -> u32 {
        u32::try_from(Arc::strong_count(self).saturating_sub(1)).unwrap_or(u32::MAX)
    }

    /// Whether a new stream fits under the peer's limit.
    #[inline]
    fn has_room(self: &Arc<Self>) -> bool {
        !self.is_closed() && self.streams() < self.room.load(Ordering::Relaxed)
    }

    /// Re-reads the peer's limit (its SETTINGS may have changed, and a refusal's lower
    /// mark is forgotten).
    fn refresh_room(&self) {
        self.room.store(peer_limit(&self.send), Ordering::Relaxed);
    }
}

/// The peer's stream limit on `send`.
fn peer_limit(send: &SendRequest<Bytes>) -> u32 {
    u32::try_from(send.current_max_send_streams())
        .unwrap_or(u32::MAX)
        .max(1)
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
    /// TLS to backends, if enabled.
    pub tls: Option<UpstreamTls>,
    /// Most connections kept to one backend address at once (at least 1).
    pub max_connections: usize,
    /// A connection without a stream for this long is closed (`None`: kept).
    pub idle_timeout: Option<Duration>,
}

/// Default of [`UpstreamConfig::max_connections`].
pub const DEFAULT_MAX_CONNECTIONS: usize = 4;

/// Default of [`UpstreamConfig::idle_timeout`].
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(600);

impl Default for UpstreamConfig {
    fn default() -> Self {
        Self {
            connect_timeout: Duration::from_secs(1),
            backoff_min: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            keepalive_interval: Duration::from_secs(10),
            tls: None,
            max_connections: DEFAULT_MAX_CONNECTIONS,
            idle_timeout: Some(DEFAULT_IDLE_TIMEOUT),
        }
    }
}

/// Connection state of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr, strum::FromRepr)]
#[strum(serialize_all = "lowercase")]
#[repr(u8)]
pub enum State {
    /// Connecting (first time, or right after a connection ended).
    Connecting = 0,
    /// Connected; calls go out on the pooled connections.
    Ready = 1,
    /// The last connect failed; skipped by the balancer until a reconnect succeeds.
    Failed = 2,
    /// Closed for want of calls; the next call reconnects it.
    Idle = 3,
}

impl State {
    fn from_u8(v: u8) -> Self {
        Self::from_repr(v).unwrap_or(State::Connecting)
    }

    /// Lower-case name, for logs and admin output.
    pub fn as_str(self) -> &'static str {
        self.into()
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

/// What wakes an upstream's connection task.
#[derive(Debug, Default)]
struct Signals {
    /// Probe the live connection (a call gave up waiting for an answer).
    check: Notify,
    /// Connect now (a call picked an idle upstream).
    wake: Notify,
    /// Open one more connection.
    more: Notify,
    /// A call found every connection full, and one more is being opened.
    grow: AtomicBool,
    /// When opening one more connection last failed ([`crate::clock::now_ns`]; 0: never).
    grow_failed_at: AtomicU64,
}

/// After one more connection failed to open, calls that find every connection full
/// queue on the least loaded one (instead of waiting for another) for this long.
const GROW_RETRY_NS: u64 = 1_000_000_000;

/// One backend address and its pooled HTTP/2 connections.
/// In declared order (`repr(C)`): the state every pick reads comes first, in the
/// cache line of the reference counts, which each call touches anyway.
#[derive(Debug)]
#[repr(C)]
pub struct Upstream {
    state: AtomicU8,
    /// A call gave up waiting for this backend's answer; its connection is being
    /// re-probed, and calls prefer other backends until the probe answers.
    suspect: AtomicBool,
    /// A call took a connection since the connection task last looked (idle close).
    used: AtomicBool,
    conns: ArcSwap<Vec<Arc<Connection>>>,
    addr: BackendAddr,
    changed: Notify,
    signals: Arc<Signals>,
    /// When a connection last succeeded after failed ones ([`crate::clock::now_ns`]).
    recovered_at: AtomicU64,
    connect_timeout: Duration,
    max_connections: usize,
    stats: Arc<PoolStats>,
}

impl Upstream {
    /// A backend at `addr`, not yet connected; call [`Upstream::start`] to connect.
    /// (Services share upstreams through [`UpstreamPool`]; this is for a lone one.)
    pub fn new(addr: BackendAddr, config: &UpstreamConfig) -> Arc<Self> {
        Self::with_stats(addr, config, Arc::default())
    }

    fn with_stats(addr: BackendAddr, config: &UpstreamConfig, stats: Arc<PoolStats>) -> Arc<Self> {
        Arc::new(Self {
            conns: ArcSwap::from_pointee(Vec::new()),
            state: AtomicU8::new(State::Connecting as u8),
            changed: Notify::new(),
            suspect: AtomicBool::new(false),
            used: AtomicBool::new(false),
            signals: Arc::default(),
            recovered_at: AtomicU64::new(0),
            connect_timeout: config.connect_timeout,
            max_connections: config.max_connections.max(1),
            stats,
            addr,
        })
    }

    /// Starts the connection task (connect, keep, reconnect with backoff, close when idle).
    ///
    /// The task holds only a weak reference: once the last `Arc<Upstream>` is gone (no
    /// service lists the address and no call uses it), it stops reconnecting, and the
    /// HTTP/2 connections close after the streams still on them have finished.
    pub fn start(self: &Arc<Self>, config: UpstreamConfig) {
        let (this, signals) = (Arc::downgrade(self), &self.signals);
        tokio::spawn(task::grow(
            this.clone(),
            Arc::clone(signals),
            config.clone(),
        ));
        tokio::spawn(task::run(this, Arc::clone(signals), config));
    }

    /// The backend's address.
    pub fn addr(&self) -> &BackendAddr {
        &self.addr
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

    /// Whether calls should prefer this backend: connected (or closed for idleness,
    /// which the call reopens), and not suspected of having stopped answering.
    #[inline]
    pub fn is_healthy(&self) -> bool {
        let s = self.state.load(Ordering::Relaxed);
        (s == State::Ready as u8 || s == State::Idle as u8) && !self.suspect.load(Ordering::Relaxed)
    }

    /// Open connections, and the streams on them.
    pub fn load(&self) -> (usize, u32) {
        let conns = self.conns.load();
        let streams = conns.iter().map(Connection::streams).sum();
        (conns.len(), streams)
    }

    /// Tells the upstream that a call gave up waiting for its response (deadline or
    /// cancel): calls prefer other backends until a probe on its connection is
    /// answered, so a backend that froze gets no more calls while others can take them.
    pub fn report_unresponsive(&self) {
        if self.state() == State::Ready && !self.suspect.swap(true, Ordering::Relaxed) {
            tracing::debug!(backend = %self.addr, "call abandoned waiting for backend; probing its connection");
            self.signals.check.notify_one();
        }
    }

    /// Tells the upstream that `conn` refused a stream it had room for (the peer was
    /// still freeing streams): it takes no more than it has now until the next look,
    /// and the next call may open another connection. Counted as a refusal.
    pub fn report_refused(&self, conn: &Arc<Connection>) {
        self.stats.refused.fetch_add(1, Ordering::Relaxed);
        let open = conn.streams().max(1);
        conn.room.fetch_min(open, Ordering::Relaxed);
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

    /// A connection with room for a call, waiting (up to the connect timeout) while one
    /// is being set up, or reopened after an idle close.
    #[inline]
    pub async fn connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        if let Some(c) = self.ready_connection() {
            return Ok(c);
        }
        // Boxed: the slow path should not weigh on every call's future.
        Box::pin(self.wait_connection()).await
    }

    async fn wait_connection(&self) -> Result<Arc<Connection>, UpstreamError> {
        let wait = async {
            loop {
                let notified = self.changed.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if let Some(c) = self.ready_connection() {
                    return Ok(c);
                }
                match self.state() {
                    State::Failed => return Err(UpstreamError::Unreachable),
                    State::Idle => self.signals.wake.notify_one(),
                    State::Connecting | State::Ready => {}
                }
                notified.await;
            }
        };
        tokio::time::timeout(self.connect_timeout, wait)
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

    /// A connection with room for one more stream, if one is up: the first one, as a
    /// rule. The caller holds it for as long as its stream lives.
    #[inline]
    pub fn ready_connection(&self) -> Option<Arc<Connection>> {
        let conns = self.conns.load();
        let first = conns.first()?;
        // Written only when the connection task has cleared it (once a second), so a
        // busy upstream's calls do not write its cache line.
        if !self.used.load(Ordering::Relaxed) {
            self.used.store(true, Ordering::Relaxed);
        }
        if first.has_room() {
            return Some(Arc::clone(first));
        }
        self.spill(&conns)
    }

    /// The first connection was full: another with room; or none while one more
    /// connection is being opened (the limit allows it): the call waits for it in
    /// [`Upstream::connection`] rather than queueing behind a full connection's streams,
    /// where it would wait as long as they take; or, at the limit (or just after one
    /// more failed to open), the least loaded, where h2 holds the stream until a slot
    /// frees.
    #[cold]
    fn spill(&self, conns: &[Arc<Connection>]) -> Option<Arc<Connection>> {
        if let Some(c) = conns.iter().find(|c| c.has_room()) {
            return Some(Arc::clone(c));
        }
        let failed_at = self.signals.grow_failed_at.load(Ordering::Relaxed);
        let may_grow = conns.len() < self.max_connections
            && (failed_at == 0
                || crate::clock::now_ns().saturating_sub(failed_at) >= GROW_RETRY_NS);
        if may_grow {
            if !self.signals.grow.swap(true, Ordering::AcqRel) {
                self.signals.more.notify_one();
            }
            return None;
        }
        conns
            .iter()
            .filter(|c| !c.is_closed())
            .min_by_key(|c| c.streams())
            .cloned()
    }

    /// Tells the upstream that `conn` was found closed by a call, so the next calls do
    /// not pick it until it has reconnected.
    pub fn report_closed(&self, conn: &Connection) {
        conn.closed.store(true, Ordering::Release);
        let primary = self
            .conns
            .load()
            .first()
            .is_some_and(|c| std::ptr::eq(&**c, conn));
        if primary && self.state() == State::Ready {
            self.set_state(State::Connecting);
        }
    }

    /// Adds an established connection (the first, or one more), and wakes the calls
    /// waiting for one.
    fn add_connection(&self, conn: Arc<Connection>) {
        self.conns.rcu(|v| {
            let mut v = Vec::clone(v);
            v.push(Arc::clone(&conn));
            v
        });
        self.stats.opened.fetch_add(1, Ordering::Relaxed);
        self.stats.open.fetch_add(1, Ordering::Relaxed);
        // Before the wake-up: a woken call that finds this one full too asks for the next.
        self.signals.grow.store(false, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// One more connection could not be opened: the calls waiting for it queue on the
    /// connections there are, and for a while so do the next.
    fn growth_failed(&self) {
        self.signals
            .grow_failed_at
            .store(crate::clock::now_ns().max(1), Ordering::Relaxed);
        self.signals.grow.store(false, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Takes `conn` out of the pool (it closed, or was closed), counting why.
    fn remove_connection(&self, conn: &Arc<Connection>, why: CloseReason) {
        conn.closed.store(true, Ordering::Release);
        let mut removed = false;
        self.conns.rcu(|v| {
            let kept: Vec<_> = v
                .iter()
                .filter(|c| !Arc::ptr_eq(c, conn))
                .cloned()
                .collect();
            removed = kept.len() != v.len();
            kept
        });
        if removed {
            self.stats.open.fetch_sub(1, Ordering::Relaxed);
            self.stats.closed[why as usize].fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Why a backend connection was closed (the `reason` label of its metric).
#[derive(Debug, Clone, Copy, PartialEq, Eq, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
pub enum CloseReason {
    /// No stream for the idle timeout (or, for an extra connection, a shorter while).
    Idle,
    /// The backend closed it, or it broke (including unanswered keep-alive pings).
    Lost,
    /// No service lists the address any more.
    Unused,
}

impl CloseReason {
    /// Every reason, in the order of [`PoolStats::closed`].
    pub const ALL: [CloseReason; 3] = [Self::Idle, Self::Lost, Self::Unused];

    /// Its label.
    pub fn as_str(self) -> &'static str {
        self.into()
    }
}
