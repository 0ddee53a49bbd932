//! One attempt of a call on one backend: take its pooled connection, open the stream,
//! send the body, wait for the response headers, and say what came of it.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use tokio::sync::oneshot;

use super::grpc::set_authority;
use super::relay::Relay;
use super::replay::ReplayBody;
use crate::balance::Backend;
use crate::call::{BackendCall, Outcome};
use crate::endpoint::BackendAddr;
use crate::route::ServiceName;
use crate::upstream::{Connection, Upstream};

/// A call abandoned (deadline or cancel) after waiting this long for a backend's
/// response headers makes the proxy probe that backend's connection.
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_millis(250);

/// What one attempt on one backend came to.
pub(super) enum Attempt {
    /// The backend answered with response headers: the call is its, in flight there
    /// until its response ends (unless a retry policy sends it again). The body comes
    /// back too while it is still replayable; whoever keeps the answer commits it.
    Answered(Response<h2::RecvStream>, BackendCall, Option<ReplayBody>),
    /// The backend never got the call (connection not to be had or closed, stream
    /// refused): the body comes back, to be offered to another backend.
    NotTaken {
        /// The request body, replayable from its start.
        body: ReplayBody,
        /// Why, for the error if no backend takes the call.
        why: String,
        /// The backend refused the stream (REFUSED_STREAM, or a GOAWAY that did not
        /// cover it): sent again, after a pause if every endpoint refused, for as long
        /// as the call's deadline allows.
        refused: bool,
    },
    /// The backend may have processed the call before its stream failed: not safe to
    /// send elsewhere unless a retry policy says the method may be (the body, if still
    /// replayable, comes back for that).
    Failed(h2::Error, Option<ReplayBody>),
}

/// Sends the call (`parts` and `body`) to `backend` and waits for its response headers.
pub(super) async fn try_backend(
    service: &ServiceName,
    backend: &Arc<Backend>,
    parts: &Parts,
    body: ReplayBody,
) -> Result<Attempt, http::Error> {
    let mut call = BackendCall::start(backend);
    let sent_at = Instant::now();
    let upstream = backend.upstream();
    let conn = match upstream.ready_connection() {
        Some(c) => c,
        None => match upstream.connection().await {
            Ok(c) => c,
            Err(e) => {
                tracing::debug!(service = %service, backend = %upstream.addr(), error = %e, "backend not usable; trying next");
                call.set_outcome(Outcome::NotTaken);
                let why = e.to_string();
                return Ok(Attempt::NotTaken {
                    body,
                    why,
                    refused: false,
                });
            }
        },
    };
    let (response, send_body) = match open_stream(&conn, parts, upstream.addr())? {
        Ok(r) => r,
        Err(e) => {
            // The request never left: offer it to the next backend as it is.
            upstream.report_closed(&conn);
            tracing::debug!(service = %service, backend = %upstream.addr(), error = %e, "backend connection closed; trying next");
            call.set_outcome(Outcome::NotTaken);
            let why = e.to_string();
            return Ok(Attempt::NotTaken {
                body,
                why,
                refused: false,
            });
        }
    };
    let retry_body = body.try_clone();
    let pump = Pump::start(body, send_body);
    let waiting = HeaderWait::new(upstream);
    let result = response.await;
    waiting.disarm();
    match result {
        Ok(resp) => {
            pump.disarm();
            call.answered(sent_at);
            // The stream is on this connection until the response ends.
            call.hold(conn);
            Ok(Attempt::Answered(resp, call, retry_body))
        }
        // Refused before the backend processed it: replay elsewhere.
        Err(err) => match retry_body {
            Some(body) if never_processed(&err) => {
                tracing::debug!(service = %service, backend = %upstream.addr(), error = %err, "call not taken by backend; retrying on next");
                if err.reason() == Some(h2::Reason::REFUSED_STREAM) {
                    upstream.report_refused(&conn);
                }
                call.set_outcome(Outcome::NotTaken);
                let why = err.to_string();
                Ok(Attempt::NotTaken {
                    body,
                    why,
                    refused: true,
                })
            }
            retry_body => {
                call.set_outcome(Outcome::StreamFailed);
                Ok(Attempt::Failed(err, retry_body))
            }
        },
    }
}

/// Armed while a call waits for a backend's response headers: if the call is dropped
/// (its deadline passed, or the client cancelled) after waiting at least
/// [`UNRESPONSIVE_AFTER`], the backend is reported as possibly unresponsive.
struct HeaderWait<'a> {
    upstream: &'a Upstream,
    since: tokio::time::Instant,
    armed: bool,
}

impl<'a> HeaderWait<'a> {
    fn new(upstream: &'a Upstream) -> Self {
        Self {
            upstream,
            since: tokio::time::Instant::now(),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for HeaderWait<'_> {
    fn drop(&mut self) {
        if self.armed && self.since.elapsed() >= UNRESPONSIVE_AFTER {
            self.upstream.report_unresponsive();
        }
    }
}

/// Opens the call's stream on `conn`: its request head, pointed at `addr`, is queued.
/// (A function of its own so that the head is not kept in the call's future.)
#[allow(clippy::type_complexity)]
fn open_stream(
    conn: &Connection,
    parts: &Parts,
    addr: &BackendAddr,
) -> Result<Result<(h2::client::ResponseFuture, h2::SendStream<Bytes>), h2::Error>, http::Error> {
    let mut head = Request::from_parts(parts.clone(), ());
    set_authority(&mut head, addr)?;
    Ok(conn.send.clone().send_request(head, false))
}

/// Sends a call's request body to its backend stream, with HTTP/2 flow control.
///
/// [`Pump::start`] runs it inline first: a unary call's whole body is usually there
/// already, and then goes out at once, its first DATA frame queued with the HEADERS. A
/// body still streaming is handed to a task of its own, which resets the backend stream
/// if the call is abandoned before the backend's response headers arrive.
struct Pump {
    relay: Relay<ReplayBody>,
    /// Fires when the call is abandoned before its response headers.
    cancel: Option<oneshot::Receiver<()>>,
}

/// Held by the call while it waits for response headers; dropping it before
/// [`PumpGuard::disarm`] cancels a body pump still running.
struct PumpGuard(Option<oneshot::Sender<()>>);

impl Drop for PumpGuard {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            let _ = tx.send(());
        }
    }
}

impl Pump {
    fn start(body: ReplayBody, tx: h2::SendStream<Bytes>) -> PumpGuard {
        let mut pump = Pump {
            relay: Relay::new(body, tx),
            cancel: None,
        };
        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        if pump.relay.poll_relay(&mut cx).is_ready() {
            return PumpGuard(None);
        }
        let (cancel_tx, cancel_rx) = oneshot::channel();
        pump.cancel = Some(cancel_rx);
        tokio::spawn(pump);
        PumpGuard(Some(cancel_tx))
    }
}

impl PumpGuard {
    /// The backend answered: let the body pump run to its end.
    fn disarm(mut self) {
        drop(self.0.take());
    }
}

impl Future for Pump {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(rx) = this.cancel.as_mut() {
            match Pin::new(rx).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.relay.reset(h2::Reason::CANCEL);
                    return Poll::Ready(());
                }
                // The call got its answer: go on until the body ends.
                Poll::Ready(Err(_)) => this.cancel = None,
                Poll::Pending => {}
            }
        }
        this.relay.poll_relay(cx)
    }
}

/// Whether an error says the backend refused the stream before processing it
/// (REFUSED_STREAM, or a graceful GOAWAY that did not cover the stream).
fn never_processed(err: &h2::Error) -> bool {
    err.reason() == Some(h2::Reason::REFUSED_STREAM)
        || (err.is_go_away() && err.reason() == Some(h2::Reason::NO_ERROR))
}
