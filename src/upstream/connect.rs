//! Opening one backend connection: TCP (with TLS if configured), the HTTP/2 handshake
//! with the settings every backend connection uses, and the checks that keep it honest
//! (a first probe proving the peer speaks HTTP/2, keep-alive pings).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use tokio::net::TcpStream;
use tokio_util::either::Either;

use super::UpstreamConfig;
use crate::endpoint::BackendAddr;

/// How long a keep-alive ping may wait for its answer before the connection counts as dead.
const KEEPALIVE_TIMEOUT: Duration = Duration::from_secs(5);

/// A backend connection's transport: plain TCP or TLS over TCP.
pub(super) type UpstreamIo = Either<TcpStream, tokio_rustls::client::TlsStream<TcpStream>>;

/// The HTTP/2 connection half that must be polled for the connection to make progress.
pub(super) type Driver = h2::client::Connection<UpstreamIo, Bytes>;

/// HTTP/2 settings of backend connections. The windows let one stream move a large
/// message at full speed; they cost memory only while data is in flight. The HPACK
/// table is the default 4 KiB: gRPC's repeated headers compress well in it. Each
/// stream's send buffer is capped at 256 KiB (h2's default is 400 KiB; flow control
/// bounds what a slow backend can make the proxy hold).
fn builder() -> h2::client::Builder {
    let mut b = h2::client::Builder::new();
    b.enable_push(false)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(64 * 1024)
        .max_header_list_size(16 * 1024)
        .max_send_buffer_size(256 * 1024)
        .max_concurrent_reset_streams(1024);
    b
}

/// Opens a TCP connection (with TLS if configured) and performs the HTTP/2 handshake.
pub(super) async fn connect(
    addr: &BackendAddr,
    config: &UpstreamConfig,
) -> std::io::Result<(SendRequest<Bytes>, Driver)> {
    let tcp = TcpStream::connect((addr.host(), addr.port())).await?;
    tcp.set_nodelay(true)?;
    let io = match &config.tls {
        None => Either::Left(tcp),
        Some(tls) => {
            let name = tls.server_name(addr.host()).ok_or_else(|| {
                std::io::Error::other(format!("{addr}: host is not a valid TLS server name"))
            })?;
            let connector = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config));
            Either::Right(connector.connect(name, tcp).await?)
        }
    };
    builder().handshake(io).await.map_err(std::io::Error::other)
}

/// Sends one gRPC health check (empty request) and waits for any response headers:
/// proof that the peer speaks HTTP/2. Its answer (even UNIMPLEMENTED) is not judged.
pub(super) async fn probe(sender: &SendRequest<Bytes>) -> Result<(), h2::Error> {
    let mut req = http::Request::new(());
    *req.method_mut() = http::Method::POST;
    *req.uri_mut() = http::Uri::from_static("http://switchyard.probe/grpc.health.v1.Health/Check");
    let h = req.headers_mut();
    h.insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/grpc"),
    );
    h.insert(http::header::TE, http::HeaderValue::from_static("trailers"));
    let (response, mut body) = sender.clone().send_request(req, false)?;
    body.send_data(Bytes::from_static(&[0, 0, 0, 0, 0]), true)?;
    response.await.map(drop)
}

/// Pings the peer every `interval`; returns why the connection is dead once a ping
/// fails or goes unanswered for [`KEEPALIVE_TIMEOUT`].
pub(crate) async fn keepalive(ping: Option<h2::PingPong>, interval: Duration) -> String {
    let Some(mut ping) = ping else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(interval).await;
        match tokio::time::timeout(KEEPALIVE_TIMEOUT, ping.ping(h2::Ping::opaque())).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => return format!("keep-alive ping failed: {e}"),
            Err(_) => return format!("keep-alive ping unanswered for {KEEPALIVE_TIMEOUT:?}"),
        }
    }
}
