//! Shared test harness: a real etcd, real echo backends, a real proxy on loopback.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard::config::{EtcdArgs, ListenSpec, ProxyArgs};
use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::EchoRequest;
use switchyard::proxy::BoundListener;
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub use switchyard::demo::EchoBackend;
pub use switchyard::testkit::{EtcdCluster, EtcdProcess};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it returns true or `within` passes; panics with `what`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy served in-process on a free loopback port; stopped (drained) when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Addresses of the listeners bound to services, in the order given.
    pub bound: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), switchyard::proxy::ProxyError>>>,
}

impl Proxy {
    /// A proxy with default settings against these etcd endpoints.
    pub async fn start(etcd: &[String]) -> Proxy {
        Self::start_with(etcd, &[], |_| {}).await
    }

    /// A proxy with an unbound listener, one bound listener per entry of `bound_services`,
    /// and settings adjusted by `tweak`.
    pub async fn start_with(
        etcd: &[String],
        bound_services: &[&str],
        tweak: impl FnOnce(&mut ProxyArgs),
    ) -> Proxy {
        let mut etcd_args = EtcdArgs::local(etcd[0].clone());
        etcd_args.etcd_endpoints = etcd.to_vec();
        let mut listeners = vec![BoundListener {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            service: None,
        }];
        for s in bound_services {
            listeners.push(BoundListener {
                listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                service: Some(s.parse().unwrap()),
            });
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.listener.local_addr().unwrap())
            .collect();
        let specs = addrs
            .iter()
            .map(|a| ListenSpec {
                addr: *a,
                service: None,
            })
            .collect();
        let mut args = ProxyArgs::new(specs, etcd_args);
        tweak(&mut args);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(switchyard::proxy::serve(args, listeners, async move {
            let _ = stopped.await;
        }));
        Proxy {
            addr: addrs[0],
            bound: addrs[1..].to_vec(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The listener URL for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the proxy and waits until it has drained.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An Echo client over one HTTP/2 connection to `addr`.
pub async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A unary request with `message`.
pub fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..Default::default()
    }
}

/// Registers `addr` under `services/<service>/<addr>` with a plain value and a lease of
/// `ttl` seconds kept alive by a background task (aborted when the returned handle drops).
pub struct TestRegistration {
    pub key: String,
    pub lease: i64,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for TestRegistration {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// Puts `services/<service>/<addr>` = `addr` (plain) under a kept-alive lease of `ttl` s.
pub async fn register(etcd: &str, service: &str, addr: SocketAddr, ttl: i64) -> TestRegistration {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    let lease = c.lease_grant(ttl, None).await.unwrap().id();
    let key = format!("services/{service}/{addr}");
    c.put(
        key.as_str(),
        addr.to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let keepalive = tokio::spawn(async move {
        let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
            return;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            let _ = stream.message().await;
            tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000) / 3)).await;
        }
    });
    TestRegistration {
        key,
        lease,
        keepalive,
    }
}

/// Puts a raw key/value (no lease).
pub async fn put(etcd: &str, key: &str, value: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.put(key, value, None).await.unwrap();
}

/// Deletes a key.
pub async fn delete(etcd: &str, key: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.delete(key, None).await.unwrap();
}

/// Calls Unary through `client` and returns the serving backend's name.
pub async fn served_by(client: &mut EchoClient<Channel>) -> Result<String, tonic::Status> {
    Ok(client.unary(req("hi")).await?.into_inner().server)
}

/// What a raw HTTP/2 call got back: status, headers, body bytes and trailers.
#[derive(Debug)]
pub struct RawResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    /// The `grpc-status`, from trailers or (trailers-only) headers.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// The `grpc-message`, from trailers or headers.
    pub fn grpc_message(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// Frames a protobuf message as one gRPC message (uncompressed).
pub fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// Sends one request over a fresh HTTP/2 (h2c) connection with hyper, no gRPC client
/// logic (no client-side deadline), and collects the whole response.
pub async fn raw_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
) -> RawResponse {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send
        .send_request(b.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}
