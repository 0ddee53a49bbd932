//! A tonic client transport over an upstream's pooled connections, so that the proxy's
//! own requests to a backend (active health checks, reflection) use the same
//! connections, TLS and settings as forwarded calls, and count as streams on them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use http::uri::{Scheme, Uri};
use http::{Request, Response};
use http_body::Body;
use http_body_util::BodyExt;

use super::{Connection, Upstream, UpstreamError};
use crate::stream::H2Body;

/// Streams on one backend's pooled connections, for tonic's generated clients.
#[derive(Debug, Clone)]
pub struct BackendChannel {
    upstream: Arc<Upstream>,
}

impl BackendChannel {
    /// Calls to `upstream`'s backend.
    pub fn new(upstream: Arc<Upstream>) -> Self {
        Self { upstream }
    }
}

/// Why a stream to the backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    /// No connection could be had in time.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// HTTP/2 refused the stream or the connection broke.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The request head could not be pointed at the backend.
    #[error(transparent)]
    Uri(#[from] http::uri::InvalidUriParts),
}

/// A backend's response body, holding its connection (a stream on it) until it ends.
#[derive(Debug)]
pub struct LeasedBody {
    body: H2Body,
    _conn: Arc<Connection>,
}

impl Body for LeasedBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, h2::Error>>> {
        Pin::new(&mut self.get_mut().body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
}

type ResponseFuture =
    Pin<Box<dyn Future<Output = Result<Response<LeasedBody>, ChannelError>> + Send>>;

impl tonic::codegen::Service<Request<tonic::body::Body>> for BackendChannel {
    type Response = Response<LeasedBody>;
    type Error = ChannelError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ChannelError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> ResponseFuture {
        let upstream = Arc::clone(&self.upstream);
        Box::pin(async move {
            let conn = upstream.connection().await?;
            let (parts, body) = req.into_parts();
            let mut head = Request::from_parts(parts, ());
            let mut uri = std::mem::take(head.uri_mut()).into_parts();
            uri.scheme = Some(Scheme::HTTP);
            uri.authority = Some(upstream.addr().authority().clone());
            *head.uri_mut() = Uri::from_parts(uri)?;
            let (response, tx) = match conn.send.clone().send_request(head, false) {
                Ok(r) => r,
                Err(e) => {
                    upstream.report_closed(&conn);
                    return Err(e.into());
                }
            };
            // The request body goes out on its own task while the response is awaited
            // (a streaming call may need both at once).
            tokio::spawn(send_body(body, tx));
            let response = response.await?;
            Ok(response.map(|recv| LeasedBody {
                body: H2Body::new(recv),
                _conn: conn,
            }))
        })
    }
}

/// Sends a request body (the proxy's own small messages) on `tx`, then its end.
async fn send_body(mut body: tonic::body::Body, mut tx: h2::SendStream<Bytes>) {
    while let Some(frame) = body.frame().await {
        let sent = match frame {
            Ok(frame) => match frame.into_data() {
                Ok(mut data) => tx.send_data(data.copy_to_bytes(data.remaining()), false),
                Err(frame) => match frame.into_trailers() {
                    Ok(trailers) => return drop(tx.send_trailers(trailers)),
                    Err(_) => Ok(()),
                },
            },
            Err(_) => {
                tx.send_reset(h2::Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
    let _ = tx.send_data(Bytes::new(), true);
}
