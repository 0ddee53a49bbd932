//! The response body the proxy hands back to clients: a backend's stream passed through
//! frame by frame, or a small body of the proxy's own.

use std::convert::Infallible;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};

use crate::metrics::CallRecord;
use crate::status::{encode_message, Code, GRPC_STATUS};

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
        /// The backend's stream.
        inner: h2::RecvStream,
        /// All DATA has been read; trailers (if any) come next.
        data_done: bool,
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

    /// A backend's response stream, passed through.
    pub fn upstream(inner: h2::RecvStream, record: Option<CallRecord>) -> Self {
        Self::Upstream {
            inner,
            data_done: false,
            record,
        }
    }
}

/// Trailers that end a response whose backend stream broke mid-way.
fn broken_stream_trailers(err: &h2::Error) -> HeaderMap {
    let mut t = HeaderMap::with_capacity(2);
    t.insert("grpc-status", Code::Unavailable.header_value());
    let msg = format!("switchyard: backend stream failed: {err}");
    t.insert("grpc-message", encode_message(&msg));
    t
}

impl ProxyBody {
    /// Ends a response whose backend stream broke: UNAVAILABLE trailers.
    fn broken(&mut self, e: &h2::Error) -> Option<Result<Frame<Bytes>, Infallible>> {
        tracing::debug!(error = %e, "backend response stream failed");
        let trailers = broken_stream_trailers(e);
        if let ProxyBody::Upstream {
            record: Some(r), ..
        } = self
        {
            r.status(trailers.get(&GRPC_STATUS));
        }
        *self = ProxyBody::Empty;
        Some(Ok(Frame::trailers(trailers)))
    }
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
            ProxyBody::Upstream {
                inner,
                data_done,
                record,
            } => {
                while !*data_done {
                    match inner.poll_data(cx) {
                        Poll::Ready(Some(Ok(data))) => {
                            // Passed on: the backend may send more (what hyper's body did).
                            let _ = inner.flow_control().release_capacity(data.len());
                            // Empty DATA frames carry nothing and only spend the client's
                            // small-frame budget: drop them.
                            if !data.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(data))));
                            }
                        }
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(this.broken(&e)),
                        Poll::Ready(None) => *data_done = true,
                        Poll::Pending => return Poll::Pending,
                    }
                }
                match inner.poll_trailers(cx) {
                    Poll::Ready(Ok(Some(trailers))) => {
                        if let Some(r) = record.as_mut() {
                            r.status(trailers.get(&GRPC_STATUS));
                        }
                        Poll::Ready(Some(Ok(Frame::trailers(trailers))))
                    }
                    Poll::Ready(Ok(None)) => Poll::Ready(None),
                    Poll::Ready(Err(e)) => Poll::Ready(this.broken(&e)),
                    Poll::Pending => Poll::Pending,
                }
            }
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
            ProxyBody::Upstream { .. } => SizeHint::default(),
        }
    }
}
