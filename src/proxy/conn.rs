//! One client connection: its first bytes say HTTP/2 (served by the h2 crate, every
//! stream driven inside the connection's own task) or HTTP/1 (told that HTTP/2 is
//! required); drained on shutdown, and closed when idle (no stream open for
//! `idle_timeout`, or no first request within `first_request_timeout`), so idle or slow
//! clients cannot hold the proxy's sockets.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::{FuturesUnordered, StreamExt};
use http_body_util::Full;
use hyper::service::service_fn;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;

use super::forward::Forwarder;
use crate::status::http_error;

/// After an idle connection has been told to go away, how long it has to close
/// before it is dropped outright: a client that never answers the GOAWAY's PING cannot
/// hold the socket.
const IDLE_CLOSE_GRACE: Duration = Duration::from_secs(1);

/// The HTTP/2 client connection preface.
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Time limits of client connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// A connection with no open stream for this long is closed (GOAWAY).
    pub idle_timeout: Duration,
    /// A connection that has not sent its first request after this long is closed.
    pub first_request_timeout: Duration,
    /// Interval of HTTP/2 keep-alive pings to the client.
    pub keepalive_interval: Duration,
}

/// How client connections are served: the HTTP/2 settings and time limits.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    /// HTTP/2 settings offered to clients.
    pub h2: h2::server::Builder,
    /// Time limits.
    pub limits: ConnLimits,
}

/// Serves one client connection until it ends, is idle too long, or `stop` turns true
/// (then it is shut down gracefully: GOAWAY, open streams finish).
pub async fn serve<I>(
    mut io: I,
    settings: Arc<ServerSettings>,
    forwarder: Arc<Forwarder>,
    stop: watch::Receiver<bool>,
    peer: std::net::SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limits = settings.limits;
    let started = Instant::now();
    let first_deadline = started + limits.first_request_timeout;
    let mut head = [0u8; PREFACE.len()];
    let sniffed = tokio::time::timeout_at(first_deadline, sniff(&mut io, &mut head)).await;
    let (len, is_h2) = match sniffed {
        Ok(Ok(Some(s))) => s,
        Ok(Ok(None)) => return,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "client connection failed before its first request");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "no HTTP/2 preface in time; closing");
            return;
        }
    };
    let io = Prefixed {
        head,
        pos: 0,
        len,
        io,
    };
    if !is_h2 {
        serve_http1(io, first_deadline, peer).await;
        return;
    }
    let handshake = settings.h2.handshake::<_, Bytes>(io);
    let conn = match tokio::time::timeout_at(first_deadline, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(e)) => {
            tracing::debug!(%peer, error = %e, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => {
            tracing::debug!(%peer, "HTTP/2 handshake timed out");
            return;
        }
    };
    serve_h2(conn, forwarder, stop, limits, started, peer).await;
}

/// Reads the connection's first bytes: as much of the HTTP/2 preface as it takes to
/// tell. Returns how many bytes were read into `head` and whether they are the
/// preface, or `None` if the peer sent nothing at all or something that is neither
/// HTTP/2 nor HTTP/1.
async fn sniff<I: AsyncRead + Unpin>(
    io: &mut I,
    head: &mut [u8; PREFACE.len()],
) -> std::io::Result<Option<(usize, bool)>> {
    let mut len = 0;
    while len < head.len() {
        let n = io.read(&mut head[len..]).await?;
        if n == 0 {
            return Ok(None);
        }
        len += n;
        if head[..len] != PREFACE[..len] {
            // An HTTP/1 request starts with a method token (upper-case letters).
            let http1 = head[0].is_ascii_uppercase();
            return Ok(http1.then_some((len, false)));
        }
    }
    Ok(Some((len, true)))
}

/// Answers an HTTP/1 client that HTTP/2 is required (one response, then close), all
/// within the first-request deadline.
async fn serve_http1<I>(io: I, deadline: Instant, peer: std::net::SocketAddr)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let service = service_fn(|_req| async {
        let resp = http_error(
            http::StatusCode::HTTP_VERSION_NOT_SUPPORTED,
            "switchyard serves gRPC over HTTP/2 only (h2c with prior knowledge)\n",
        );
        Ok::<_, std::convert::Infallible>(resp.map(Full::new))
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(Duration::from_secs(5))
        .keep_alive(false)
        .serve_connection(TokioIo::new(io), service);
    match tokio::time::timeout_at(deadline, conn).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTP/1 client connection failed"),
        Err(_) => tracing::debug!(%peer, "HTTP/1 client too slow; closing"),
    }
}

/// Drives an HTTP/2 connection and all its streams, in this one task.
async fn serve_h2<I>(
    mut conn: h2::server::Connection<I, Bytes>,
    forwarder: Arc<Forwarder>,
    mut stop: watch::Receiver<bool>,
    limits: ConnLimits,
    started: Instant,
    peer: std::net::SocketAddr,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let keepalive = crate::upstream::keepalive(conn.ping_pong(), limits.keepalive_interval);
    tokio::pin!(keepalive);
    // The connection's streams, each a future polled by this task (no task per stream).
    let mut streams = FuturesUnordered::new();
    let start = |req, respond| forwarder.serve_stream(req, respond, peer);
    // Whether a stream was ever served, and when the last one ended (idle timeout).
    let mut used = false;
    let mut last_end = started;
    let mut draining = *stop.borrow();
    if draining {
        conn.graceful_shutdown();
    }
    let idle_check = tokio::time::sleep(limits.first_request_timeout);
    tokio::pin!(idle_check);
    // Told to go away for being idle; dropped if still open after the grace period.
    let mut idle_closing = false;
    loop {
        let drive = poll_fn(|cx| {
            drive(
                cx,
                &mut conn,
                &mut streams,
                &start,
                &mut used,
                &mut last_end,
            )
        });
        tokio::select! {
            biased;
            result = drive => {
                if let Err(e) = result {
                    tracing::debug!(%peer, error = %e, "client connection ended with error");
                }
                return;
            }
            _ = stop.changed(), if !draining => {
                draining = true;
                conn.graceful_shutdown();
            }
            reason = &mut keepalive => {
                tracing::debug!(%peer, %reason, "client connection dead; closing");
                return;
            }
            _ = &mut idle_check, if !draining || idle_closing => {
                if idle_closing {
                    if streams.is_empty() {
                        tracing::debug!(%peer, "idle client connection still open after GOAWAY; dropping it");
                        return;
                    }
                    // A stream got in before the GOAWAY: it may finish.
                    idle_closing = false;
                    continue;
                }
                if !streams.is_empty() {
                    idle_check.as_mut().reset(Instant::now() + limits.idle_timeout);
                    continue;
                }
                let limit = if used { limits.idle_timeout } else { limits.first_request_timeout };
                let deadline = last_end + limit;
                if deadline <= Instant::now() {
                    tracing::debug!(%peer, "closing idle client connection");
                    draining = true;
                    idle_closing = true;
                    conn.graceful_shutdown();
                    idle_check.as_mut().reset(Instant::now() + IDLE_CLOSE_GRACE);
                } else {
                    idle_check.as_mut().reset(deadline);
                }
            }
        }
    }
}

/// One round of a connection's work: runs the streams that are ready, then lets h2
/// write what they queued and read what came in, taking new streams, until nothing is
/// ready. `Ready` when the connection is over.
fn drive<I, F>(
    cx: &mut Context<'_>,
    conn: &mut h2::server::Connection<I, Bytes>,
    streams: &mut FuturesUnordered<F>,
    start: &impl Fn(http::Request<h2::RecvStream>, h2::server::SendResponse<Bytes>) -> F,
    used: &mut bool,
    last_end: &mut Instant,
) -> Poll<Result<(), h2::Error>>
where
    I: AsyncRead + AsyncWrite + Unpin,
    F: Future<Output = ()>,
{
    loop {
        while let Poll::Ready(Some(())) = streams.poll_next_unpin(cx) {
            if streams.is_empty() {
                *last_end = Instant::now();
            }
        }
        match conn.poll_accept(cx) {
            Poll::Ready(Some(Ok((req, respond)))) => {
                *used = true;
                streams.push(start(req, respond));
            }
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            // Closed (by the client, or after GOAWAY once every stream ended).
            Poll::Ready(None) => return Poll::Ready(Ok(())),
            Poll::Pending => return Poll::Pending,
        }
    }
}

/// A connection's input with the bytes already read to sniff the protocol put back in
/// front.
struct Prefixed<I> {
    head: [u8; PREFACE.len()],
    pos: usize,
    len: usize,
    io: I,
}

impl<I: AsyncRead + Unpin> AsyncRead for Prefixed<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if this.pos < this.len {
            let n = (this.len - this.pos).min(buf.remaining());
            buf.put_slice(&this.head[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Prefixed<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}
