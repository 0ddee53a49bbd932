//! The body of a received HTTP/2 stream, as an `http_body::Body`: a client's request
//! (forwarded by the proxy) or a backend's response (relayed, or read by the proxy's own
//! calls to backends: reflection, health checks).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body::{Body, Frame};

/// An HTTP/2 stream's incoming body (a client's request or a backend's response):
/// DATA frames, then trailers. Window capacity is given back as each frame is taken, so
/// the peer may send more; empty DATA frames carry nothing and are dropped (passed on,
/// they would spend the next peer's small-frame budget: h2 answers a flood of them with
/// ENHANCE_YOUR_CALM).
#[derive(Debug)]
pub struct H2Body {
    inner: h2::RecvStream,
    data_done: bool,
}

impl H2Body {
    /// The body of a received stream.
    pub fn new(inner: h2::RecvStream) -> Self {
        Self {
            inner,
            data_done: false,
        }
    }
}

impl Body for H2Body {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = self.get_mut();
        while !this.data_done {
            match this.inner.poll_data(cx) {
                Poll::Ready(Some(Ok(data))) => {
                    let _ = this.inner.flow_control().release_capacity(data.len());
                    if !data.is_empty() {
                        return Poll::Ready(Some(Ok(Frame::data(data))));
                    }
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Some(Err(e))),
                Poll::Ready(None) => this.data_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        match this.inner.poll_trailers(cx) {
            Poll::Ready(Ok(Some(t))) => Poll::Ready(Some(Ok(Frame::trailers(t)))),
            Poll::Ready(Ok(None)) => Poll::Ready(None),
            Poll::Ready(Err(e)) => Poll::Ready(Some(Err(e))),
            Poll::Pending => Poll::Pending,
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }
}
