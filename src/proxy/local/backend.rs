//! A tonic client transport over a backend's pooled HTTP/2 connection, so that the
//! proxy's own requests to a backend (reflection) use the same connection, TLS and
//! settings as forwarded calls.

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{Request, Response};

use super::super::body::H2Body;
use super::super::grpc::set_authority;
use super::super::relay::Relay;
use crate::endpoint::BackendAddr;

/// Streams on one backend connection, for tonic's generated clients.
#[derive(Debug, Clone)]
pub(super) struct BackendChannel {
    send: h2::client::SendRequest<Bytes>,
    addr: BackendAddr,
}

impl BackendChannel {
    /// Calls on `send`, a connection to `addr`.
    pub(super) fn new(send: h2::client::SendRequest<Bytes>, addr: BackendAddr) -> Self {
        Self { send, addr }
    }
}

/// Why a stream to the backend could not be opened.
#[derive(Debug, thiserror::Error)]
pub(super) enum ChannelError {
    /// HTTP/2 refused the stream or the connection broke.
    #[error(transparent)]
    H2(#[from] h2::Error),
    /// The request head could not be pointed at the backend.
    #[error(transparent)]
    Http(#[from] http::Error),
}

type ResponseFuture = Pin<Box<dyn Future<Output = Result<Response<H2Body>, ChannelError>> + Send>>;

impl tonic::codegen::Service<Request<tonic::body::Body>> for BackendChannel {
    type Response = Response<H2Body>;
    type Error = ChannelError;
    type Future = ResponseFuture;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ChannelError>> {
        self.send.poll_ready(cx).map_err(ChannelError::from)
    }

    fn call(&mut self, req: Request<tonic::body::Body>) -> ResponseFuture {
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        let opened = set_authority(&mut head, &self.addr)
            .map_err(ChannelError::from)
            .and_then(|()| Ok(self.send.send_request(head, false)?));
        Box::pin(async move {
            let (response, tx) = opened?;
            // The request body goes out on its own task while the response is awaited
            // (a streaming call may need both at once).
            tokio::spawn(async move {
                let mut relay = Relay::new(body, tx);
                poll_fn(|cx| relay.poll_relay(cx)).await;
            });
            Ok(response.await?.map(H2Body::new))
        })
    }
}
