//! One client connection: served by hyper's HTTP/2 server, drained on shutdown, and
//! closed when idle (no stream open for `idle_timeout`, or no first request within
//! `first_request_timeout`), so idle or slow clients cannot hold the proxy's sockets.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::watch;
use tokio::time::Instant;

use super::body::ProxyBody;
use super::forward::Forwarder;

/// After an idle connection has been told to go away, how long it has to close
/// before it is dropped outright: a client that never answers the GOAWAY's PING, or
/// an HTTP/1 client stuck in the middle of its request head, cannot hold the socket.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Time limits of client connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A connection with no open stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A connection that has not sent its first request after this long is closed.
    pub first_request_timeout: Duration,
}

/// Streams open on one connection and when the last one ended.
#[derive(Debug)]
struct Activity {
    open: AtomicUsize,
    /// Milliseconds since `epoch` at the last stream start or end.
    last_ms: AtomicU64,
    used: std::sync::atomic::AtomicBool,
    epoch: Instant,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection counts as idle, if no stream starts before then.
    fn idle_deadline(&self, limits: &ConnLimits) -> Option<Instant> {
        if self.open.load(Ordering::Relaxed) > 0 {
            return None;
        }
        let limit = if self.used.load(Ordering::Relaxed) {
            limits.idle_timeout
        } else {
            limits.first_request_timeout
        };
        let last = Duration::from_millis(self.last_ms.load(Ordering::Relaxed));
        Some(self.epoch + last + limit)
    }
}

/// Held for as long as a stream's response is being sent.
#[derive(Debug)]
struct StreamGuard(Arc<Activity>);

impl StreamGuard {
    fn begin(a: &Arc<Activity>) -> Self {
        a.open.fetch_add(1, Ordering::Relaxed);
        a.used.store(true, Ordering::Relaxed);
        a.touch();
        Self(Arc::clone(a))
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A response body that keeps its stream counted as open until it is done.
#[derive(Debug)]
pub struct Tracked {
    inner: ProxyBody,
    _guard: StreamGuard,
}

impl Body for Tracked {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Serves one client connection until it ends, is idle too long, or `stop` turns true
/// (then it is shut down gracefully: GOAWAY, open streams finish).
pub async fn serve<I>(
    io: I,
    builder: Arc<auto::Builder<TokioExecutor>>,
    forwarder: Arc<Forwarder>,
    mut stop: watch::Receiver<bool>,
    limits: ConnLimits,
    peer: std::net::SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        open: AtomicUsize::new(0),
        last_ms: AtomicU64::new(0),
        used: std::sync::atomic::AtomicBool::new(false),
        epoch: Instant::now(),
    });
    let act = Arc::clone(&activity);
    let service = service_fn(move |req| {
        let guard = StreamGuard::begin(&act);
        let fwd = Arc::clone(&forwarder);
        // Boxed: hyper spawns a task per stream around this future, and tokio copies a
        // task's future on spawn and on completion; a pointer is cheaper to copy than the
        // ~2 KiB state machine of a call.
        Box::pin(async move {
            let resp = fwd.handle(req).await?;
            Ok::<_, std::convert::Infallible>(resp.map(|inner| Tracked {
                inner,
                _guard: guard,
            }))
        })
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut draining = *stop.borrow();
    if draining {
        conn.as_mut().graceful_shutdown();
    }
    // Checked at the idle deadline; while streams are open, again after the idle timeout.
    let idle_check = tokio::time::sleep(limits.first_request_timeout);
    tokio::pin!(idle_check);
    // Told to go away for being idle; dropped if still open after the grace period.
    let mut idle_closing = false;
    loop {
        tokio::select! {
            result = conn.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with error");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.as_mut().graceful_shutdown();
            }
            _ = &mut idle_check, if !draining || idle_closing => {
                if idle_closing {
                    if activity.open.load(Ordering::Relaxed) == 0 {
                        tracing::debug!(%peer, "idle client connection still open after GOAWAY; dropping it");
                        return;
                    }
                    // A stream got in before the GOAWAY: it may finish.
                    idle_closing = false;
                    continue;
                }
                match activity.idle_deadline(&limits) {
                    Some(deadline) if deadline <= Instant::now() => {
                        tracing::debug!(%peer, "closing idle client connection");
                        draining = true;
                        idle_closing = true;
                        conn.as_mut().graceful_shutdown();
                        idle_check.as_mut().reset(Instant::now() + IDLE_CLOSE_GRACE);
                    }
                    Some(deadline) => idle_check.as_mut().reset(deadline),
                    None => idle_check.as_mut().reset(Instant::now() + limits.idle_timeout),
                }
            }
        }
    }
}
