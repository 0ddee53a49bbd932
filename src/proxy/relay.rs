//! One direction of a proxied stream: frames taken from a body and sent on an HTTP/2
//! stream, with flow control (at most one frame waits for the stream's window; the next
//! is taken only once it has gone).

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::Body;

/// How a body's error is passed on: the reason the outgoing stream is reset with.
pub trait ResetReason {
    /// The HTTP/2 reason to reset the outgoing stream with.
    fn reset_reason(&self) -> h2::Reason;
}

impl ResetReason for h2::Error {
    /// The peer's own reason (e.g. CANCEL) when it reset its stream, else INTERNAL_ERROR.
    fn reset_reason(&self) -> h2::Reason {
        self.reason().unwrap_or(h2::Reason::INTERNAL_ERROR)
    }
}

impl ResetReason for Infallible {
    fn reset_reason(&self) -> h2::Reason {
        match *self {}
    }
}

/// Sends `body` on `tx` until the body ends, the stream is reset, or the connection dies.
#[derive(Debug)]
pub struct Relay<B> {
    body: B,
    tx: h2::SendStream<Bytes>,
    /// Nothing sent yet: the first chunk is queued without waiting for window capacity
    /// (h2 holds it until the window allows), so that a small message goes out with its
    /// HEADERS.
    first: bool,
    /// A chunk waiting for window capacity, and whether it ends the stream.
    waiting: Option<(Bytes, bool)>,
}

impl<B> Relay<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: ResetReason + std::fmt::Display,
{
    /// A relay of `body` onto `tx`.
    pub fn new(body: B, tx: h2::SendStream<Bytes>) -> Self {
        Self {
            body,
            tx,
            first: true,
            waiting: None,
        }
    }

    /// Resets the outgoing stream (the call was abandoned).
    pub fn reset(&mut self, reason: h2::Reason) {
        self.tx.send_reset(reason);
    }

    /// About to wait: unless the peer has reset the stream (or the connection died;
    /// then there is nothing more to send), be woken if it does. (Sends after a reset
    /// fail, so a busy relay notices without asking.)
    fn wait(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match self.tx.poll_reset(cx) {
            Poll::Ready(_) => Poll::Ready(()),
            Poll::Pending => Poll::Pending,
        }
    }

    /// Moves frames until the body is done (`Ready`) or must wait (`Pending`).
    pub fn poll_relay(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        loop {
            if let Some((data, eos)) = self.waiting.take() {
                while self.tx.capacity() == 0 {
                    match self.tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(_))) => {}
                        Poll::Ready(Some(Err(_)) | None) => return Poll::Ready(()),
                        Poll::Pending => {
                            self.waiting = Some((data, eos));
                            return self.wait(cx);
                        }
                    }
                }
                if self.tx.send_data(data, eos).is_err() || eos {
                    return Poll::Ready(());
                }
                continue;
            }
            let frame = match Pin::new(&mut self.body).poll_frame(cx) {
                Poll::Pending => return self.wait(cx),
                Poll::Ready(None) => {
                    let _ = self.tx.send_data(Bytes::new(), true);
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Err(e))) => {
                    tracing::debug!(error = %e, "incoming stream failed; resetting the outgoing one");
                    self.tx.send_reset(e.reset_reason());
                    return Poll::Ready(());
                }
                Poll::Ready(Some(Ok(frame))) => frame,
            };
            match frame.into_data() {
                Ok(data) => {
                    let eos = self.body.is_end_stream();
                    if std::mem::take(&mut self.first) {
                        if self.tx.send_data(data, eos).is_err() || eos {
                            return Poll::Ready(());
                        }
                    } else {
                        // Claim a little window first; h2 raises the claim to the chunk's
                        // size when it is sent.
                        self.tx.reserve_capacity(1);
                        self.waiting = Some((data, eos));
                    }
                }
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        self.tx.reserve_capacity(0);
                        let _ = self.tx.send_trailers(trailers);
                        return Poll::Ready(());
                    }
                }
            }
        }
    }
}
