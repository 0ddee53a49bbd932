//! The bodies of a proxied stream: the client's request body as it arrives, and a
//! backend's response body passed back frame by frame.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame};

use crate::call::{BackendCall, Outcome};
use crate::metrics::status_slot;
use crate::observe::CallObs;
use crate::status::{code_header, encode_message, Code, GRPC_STATUS};
pub use crate::stream::H2Body;

/// A backend's response body, streamed back unchanged; its call's end is reported
/// (through [`BackendCall`]) when it ends or is dropped. A backend stream that breaks
/// mid-way ends with UNAVAILABLE trailers of the proxy's own.
#[derive(Debug)]
pub struct ResponseBody {
    /// The backend's stream; `None` once the body has ended.
    inner: Option<H2Body>,
    /// The call, in flight on the backend that answered until the body ends.
    call: BackendCall,
    /// The call's access-log record and span, when either is on.
    obs: Option<Box<CallObs>>,
}

impl ResponseBody {
    /// A backend's response stream, passed through; `call` is the call on the backend
    /// that answered, carrying the call's arrival; `obs` sees it to its end.
    pub fn new(inner: h2::RecvStream, call: BackendCall, obs: Option<Box<CallObs>>) -> Self {
        Self {
            inner: Some(H2Body::new(inner)),
            call,
            obs,
        }
    }

    /// Reads the status of a trailers-only answer from its response headers.
    pub fn headers(&mut self, headers: &HeaderMap) {
        if let Some(v) = headers.get(&GRPC_STATUS) {
            self.status(Some(v));
            if let Some(o) = self.obs.as_mut() {
                o.headers(headers);
            }
        }
    }

    /// Notes the call's `grpc-status` (none: the stream ended without one).
    fn status(&mut self, v: Option<&http::HeaderValue>) {
        let slot = status_slot(v);
        if let Some(o) = self.obs.as_mut() {
            o.status(slot);
        }
        self.call.set_outcome(Outcome::Status(slot as u8));
    }
}

/// Whether a backend stream's error is the reset the proxy sent for a client that
/// cancelled its call (the request relay passes the client's CANCEL on).
fn cancelled_by_client(err: &h2::Error) -> bool {
    err.reason() == Some(h2::Reason::CANCEL) && !err.is_remote()
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        if self.inner.as_ref().is_some_and(|b| !b.is_end_stream()) {
            // Dropped before its end: the client went away (reset its stream).
            self.call.set_outcome(Outcome::Abandoned);
            if let Some(o) = self.obs.as_mut() {
                o.status(usize::from(Code::Cancelled as u8));
            }
        }
        if let Some(o) = self.obs.take() {
            o.finish();
        }
    }
}

/// Trailers that end a response whose backend stream broke mid-way.
fn broken_stream_trailers(err: &h2::Error) -> HeaderMap {
    let mut t = HeaderMap::with_capacity(2);
    t.insert(GRPC_STATUS.clone(), code_header(Code::Unavailable));
    let msg = format!("switchyard: backend stream failed: {err}");
    t.insert("grpc-message", encode_message(&msg));
    t
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        let Some(inner) = this.inner.as_mut() else {
            return Poll::Ready(None);
        };
        let frame = match Pin::new(inner).poll_frame(cx) {
            Poll::Pending => return Poll::Pending,
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(None) => {
                this.inner = None;
                this.status(None);
                return Poll::Ready(None);
            }
            Poll::Ready(Some(Err(e))) => {
                this.inner = None;
                if cancelled_by_client(&e) {
                    // The proxy reset the backend stream because the client cancelled
                    // its request: what the client got is a cancel, not a failure.
                    this.call.set_outcome(Outcome::Abandoned);
                    if let Some(o) = this.obs.as_mut() {
                        o.status(usize::from(Code::Cancelled as u8));
                    }
                    return Poll::Ready(None);
                }
                tracing::debug!(error = %e, "backend response stream failed");
                let trailers = broken_stream_trailers(&e);
                if let Some(o) = this.obs.as_mut() {
                    o.headers(&trailers);
                }
                // Counted as the UNAVAILABLE the client gets.
                this.call.set_outcome(Outcome::StreamFailed);
                return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
            }
        };
        if let Some(o) = this.obs.as_mut() {
            o.frame(&frame);
        }
        if let Some(trailers) = frame.trailers_ref() {
            let status = trailers.get(&GRPC_STATUS);
            this.status(status);
            this.inner = None;
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.as_ref().is_none_or(Body::is_end_stream)
    }
}
