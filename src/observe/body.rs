//! Bodies of the calls the proxy answers itself (health, reflection), watched for the
//! access log and the span: [`Counted`] adds the request's DATA bytes to the record,
//! [`Observed`] feeds it the response's frames and finishes it when the response ends
//! (or is dropped: the client went away). Forwarded calls have their own bodies in
//! `proxy/body.rs`, which also account the call to its backend.

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use super::CallObs;
use crate::status::{Code, GRPC_STATUS};

/// A request body whose DATA bytes are added to a counter (the access log's
/// `request_bytes`), if there is one.
#[derive(Debug)]
pub struct Counted<B> {
    inner: B,
    counter: Option<Arc<AtomicU64>>,
}

impl<B> Counted<B> {
    /// `inner`, counted in `counter`.
    pub fn new(inner: B, counter: Option<Arc<AtomicU64>>) -> Self {
        Self { inner, counter }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Counted<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let (Poll::Ready(Some(Ok(frame))), Some(c)) = (&polled, &this.counter) {
            if let Some(data) = frame.data_ref() {
                c.fetch_add(data.len() as u64, Ordering::Relaxed);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A response body of the proxy's own, seen by the call's record to its end.
#[derive(Debug)]
pub struct Observed<B> {
    inner: B,
    obs: Option<Box<CallObs>>,
    /// The body has given its last frame (or failed).
    ended: bool,
}

impl<B: Body> Observed<B> {
    /// The response with these `headers` and `inner` as its body, seen by `obs`. A
    /// trailers-only answer's status is in its headers.
    pub fn new(inner: B, headers: &HeaderMap, mut obs: Option<Box<CallObs>>) -> Self {
        if let Some(o) = obs.as_mut() {
            if let Some(v) = headers.get(&GRPC_STATUS) {
                o.status(crate::metrics::status_slot(Some(v)));
                o.headers(headers);
            }
        }
        Self {
            ended: inner.is_end_stream(),
            inner,
            obs,
        }
    }
}

impl<B> Drop for Observed<B> {
    fn drop(&mut self) {
        if let Some(mut o) = self.obs.take() {
            if !self.ended {
                // Dropped before its end: the client went away (a Watch ends this way).
                o.status(usize::from(Code::Cancelled as u8));
            }
            o.finish();
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for Observed<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match (&polled, this.obs.as_mut()) {
            (Poll::Ready(Some(Ok(frame))), Some(o)) => {
                if let Some(t) = frame.trailers_ref() {
                    o.status(crate::metrics::status_slot(t.get(&GRPC_STATUS)));
                    this.ended = true;
                }
                o.frame(frame);
            }
            (Poll::Ready(Some(Err(_))), Some(o)) => {
                // The relay resets the client's stream with INTERNAL_ERROR.
                o.status(usize::from(Code::Internal as u8));
                this.ended = true;
            }
            (Poll::Ready(None), _) => this.ended = true,
            _ => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
