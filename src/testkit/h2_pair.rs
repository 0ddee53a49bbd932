//! HTTP/2 connections in memory (over `tokio::io::duplex`): real h2 on both ends and no
//! sockets, for unit tests and benchmarks of the code that moves a stream's frames.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{self, ResponseFuture, SendRequest};
use h2::server::{self, SendResponse};
use h2::{RecvStream, SendStream};
use http::{Method, Request, Uri};
use tokio::sync::mpsc;

/// Bytes buffered in each direction of the in-memory pipe.
const PIPE_BYTES: usize = 1 << 20;

/// A client and a server joined by one in-memory HTTP/2 connection. Both ends are driven
/// by tasks spawned on the current runtime, so flow control, resets and window updates
/// happen as on a socket; each end's settings are in force once the pair is made.
#[derive(Debug)]
pub struct H2Pair {
    client: SendRequest<Bytes>,
    accepted: mpsc::UnboundedReceiver<(Request<RecvStream>, SendResponse<Bytes>)>,
}

/// Both ends of one stream of an [`H2Pair`].
#[derive(Debug)]
pub struct H2Stream {
    /// Client: the response to come.
    pub response: ResponseFuture,
    /// Client: where the request body goes.
    pub send: SendStream<Bytes>,
    /// Server: the request body as received.
    pub recv: RecvStream,
    /// Server: where the response goes.
    pub respond: SendResponse<Bytes>,
}

impl H2Pair {
    /// A pair with h2's default settings on both ends.
    pub async fn start() -> Result<Self, h2::Error> {
        Self::with(&client::Builder::new(), &server::Builder::new()).await
    }

    /// A pair with these settings on each end (e.g. the server's initial window size).
    pub async fn with(
        client: &client::Builder,
        server: &server::Builder,
    ) -> Result<Self, h2::Error> {
        let (client_io, server_io) = tokio::io::duplex(PIPE_BYTES);
        let (client, server) =
            tokio::join!(client.handshake(client_io), server.handshake(server_io));
        let (send_request, mut connection) = client?;
        let mut server = server?;
        let ping = connection.ping_pong();
        tokio::spawn(async move {
            let _ = connection.await;
        });
        let (tx, accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            // Waiting in `accept` also drives the server's connection (reads, window
            // updates, resets) while the streams it handed out are in use.
            while let Some(Ok(stream)) = server.accept().await {
                if tx.send(stream).is_err() {
                    break;
                }
            }
        });
        // The pong comes after the server's SETTINGS, so the client has applied them
        // (e.g. a small window) before the first stream opens.
        if let Some(mut ping) = ping {
            ping.ping(h2::Ping::opaque()).await?;
        }
        Ok(Self {
            client: send_request,
            accepted,
        })
    }

    /// Opens a stream (`POST /test.Echo/Unary`); `end_of_stream`: the request has no body.
    pub async fn stream(&mut self, end_of_stream: bool) -> Result<H2Stream, h2::Error> {
        let mut request = Request::new(());
        *request.method_mut() = Method::POST;
        *request.uri_mut() = Uri::from_static("http://switchyard.test/test.Echo/Unary");
        let mut client = self.client.clone().ready().await?;
        let (response, send) = client.send_request(request, end_of_stream)?;
        // The server's task ends only with the connection, which the send above would
        // have reported; this is the same failure seen from the other end.
        let (request, respond) = self
            .accepted
            .recv()
            .await
            .ok_or(h2::Reason::INTERNAL_ERROR)?;
        Ok(H2Stream {
            response,
            send,
            recv: request.into_body(),
            respond,
        })
    }
}

/// `fut`, or a panic naming `what` after 10 s: in-memory frames move at once, so a test
/// that waits longer has found a bug (and would otherwise hang).
pub async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(Duration::from_secs(10), fut)
        .await
        .unwrap_or_else(|_| panic!("not within 10 s: {what}"))
}
