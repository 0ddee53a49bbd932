//! The response body the proxy hands back to clients: a backend's stream passed through
//! frame by frame, or a small body of the proxy's own.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;

use crate::metrics::CallRecord;
use crate::status::{encode_message, Code};

/// A response body: streamed from a backend, or produced by the proxy.
#[derive(Debug)]
pub enum ProxyBody {
    /// No body (trailers-only responses).
    Empty,
    /// A short fixed body (plain HTTP errors).
    Text(Option<Bytes>),
    /// A backend's response body, streamed through unchanged; its call is counted when
    /// it ends or is dropped.
    Upstream {
        /// The backend's body.
        inner: Incoming,
        /// The call's metrics record, if measured.
        record: Option<CallRecord>,
    },
}

impl ProxyBody {
    /// An empty body.
    pub fn empty() -> Self {
        Self::Empty
    }

    /// A fixed text body.
    pub fn text(text: &'static str) -> Self {
        Self::Text(Some(Bytes::from_static(text.as_bytes())))
    }
}

/// Trailers that end a response whose backend stream broke mid-way.
fn broken_stream_trailers(err: &hyper::Error) -> HeaderMap {
    let mut t = HeaderMap::with_capacity(2);
    t.insert("grpc-status", Code::Unavailable.header_value());
    let msg = format!("switchyard: backend stream failed: {err}");
    t.insert("grpc-message", encode_message(&msg));
    t
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = self.get_mut();
        match this {
            ProxyBody::Empty => Poll::Ready(None),
            ProxyBody::Text(t) => Poll::Ready(t.take().map(|b| Ok(Frame::data(b)))),
            ProxyBody::Upstream { inner, record } => loop {
                match Pin::new(&mut *inner).poll_frame(cx) {
                    Poll::Ready(Some(Err(e))) => {
                        tracing::debug!(error = %e, "backend response stream failed");
                        let trailers = broken_stream_trailers(&e);
                        if let Some(r) = record {
                            r.status(trailers.get("grpc-status"));
                        }
                        *this = ProxyBody::Empty;
                        return Poll::Ready(Some(Ok(Frame::trailers(trailers))));
                    }
                    // Empty DATA frames carry nothing and only spend the client's
                    // small-frame budget: drop them.
                    Poll::Ready(Some(Ok(f))) if f.data_ref().is_some_and(|d| d.is_empty()) => {}
                    Poll::Ready(Some(Ok(f))) => {
                        if let (Some(r), Some(t)) = (record.as_mut(), f.trailers_ref()) {
                            r.status(t.get("grpc-status"));
                        }
                        return Poll::Ready(Some(Ok(f)));
                    }
                    Poll::Ready(None) => return Poll::Ready(None),
                    Poll::Pending => return Poll::Pending,
                }
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ProxyBody::Empty => true,
            ProxyBody::Text(t) => t.is_none(),
            ProxyBody::Upstream { inner, .. } => inner.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ProxyBody::Empty => SizeHint::with_exact(0),
            ProxyBody::Text(t) => SizeHint::with_exact(t.as_ref().map_or(0, |b| b.len() as u64)),
            ProxyBody::Upstream { inner, .. } => inner.size_hint(),
        }
    }
}
