//! The example `Echo` service and an in-process backend serving it.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::{Stream, StreamExt};
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::metadata::{MetadataMap, MetadataValue};
use tonic::{Request, Response, Status, Streaming};

use crate::echo::echo_server::{Echo, EchoServer};
use crate::echo::{EchoReply, EchoRequest};

/// What one backend saw, shared between its service and whoever started it.
#[derive(Debug, Default)]
pub struct EchoStats {
    /// Calls that reached the backend (any kind).
    pub calls: AtomicU64,
    /// Calls whose client went away (cancel, deadline, reset) before the backend finished.
    pub cancelled: AtomicU64,
    /// Stream replies handed to the transport (server-streaming and bidi).
    pub sent: AtomicU64,
    /// The `grpc-timeout` header of the last call that carried one.
    pub last_grpc_timeout: Mutex<Option<String>>,
    /// The highest `grpc-previous-rpc-attempts` seen (retries and hedges of the proxy).
    pub max_previous_attempts: AtomicU64,
}

impl EchoStats {
    /// Calls seen so far.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::SeqCst)
    }

    /// Calls cancelled by their client so far.
    pub fn cancelled(&self) -> u64 {
        self.cancelled.load(Ordering::SeqCst)
    }
}

/// Counts a call as cancelled if it is dropped before [`CallCount::done`].
struct CallCount {
    stats: Arc<EchoStats>,
    done: bool,
}

impl CallCount {
    fn new(stats: &Arc<EchoStats>) -> Self {
        stats.calls.fetch_add(1, Ordering::SeqCst);
        Self {
            stats: Arc::clone(stats),
            done: false,
        }
    }

    fn done(mut self) {
        self.done = true;
    }
}

impl Drop for CallCount {
    fn drop(&mut self) {
        if !self.done {
            self.stats.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

/// Faults a backend injects into every unary call, for tests and benchmarks of how the
/// proxy treats slow and broken nodes; changeable while it serves.
#[derive(Debug, Default)]
pub struct Faults {
    /// Added to every unary call's own delay, in milliseconds.
    pub delay_ms: AtomicU32,
    /// Non-zero: every unary call fails with this gRPC status code.
    pub fail_code: AtomicI32,
}

/// The `Echo` service of one named backend.
#[derive(Debug, Clone)]
pub struct EchoService {
    name: Arc<str>,
    stats: Arc<EchoStats>,
    faults: Arc<Faults>,
}

impl EchoService {
    /// A backend that reports itself as `name` in every reply.
    pub fn new(name: impl Into<Arc<str>>) -> Self {
        Self {
            name: name.into(),
            stats: Arc::default(),
            faults: Arc::default(),
        }
    }

    /// The faults this backend injects.
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// What this backend saw.
    pub fn stats(&self) -> &Arc<EchoStats> {
        &self.stats
    }

    /// The reply to `req`; a `reply_size` above [`MAX_MESSAGE_SIZE`] is refused.
    fn reply(&self, req: &EchoRequest, seq: u64) -> Result<EchoReply, Status> {
        let size = check_reply_size(req)?;
        let payload = if size > 0 {
            vec![b'x'; size]
        } else {
            req.payload.clone()
        };
        Ok(EchoReply {
            payload,
            message: req.message.clone(),
            server: self.name.to_string(),
            seq,
        })
    }

    fn observe(&self, md: &MetadataMap) {
        if let Some(n) = md
            .get("grpc-previous-rpc-attempts")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            self.stats
                .max_previous_attempts
                .fetch_max(n, Ordering::SeqCst);
        }
        if let Some(t) = md.get("grpc-timeout").and_then(|v| v.to_str().ok()) {
            if let Ok(mut last) = self.stats.last_grpc_timeout.lock() {
                *last = Some(t.to_owned());
            }
        }
    }
}

/// The reply size a request asks for, refused above [`MAX_MESSAGE_SIZE`].
fn check_reply_size(req: &EchoRequest) -> Result<usize, Status> {
    let size = req.reply_size as usize;
    if size > MAX_MESSAGE_SIZE {
        return Err(Status::invalid_argument(format!(
            "reply_size {size} is more than {MAX_MESSAGE_SIZE}"
        )));
    }
    Ok(size)
}

/// Copies `x-echo-*` metadata (ASCII and `-bin`) from a request into `out`.
fn echo_metadata(from: &MetadataMap, out: &mut MetadataMap) {
    for kv in from.iter() {
        match kv {
            tonic::metadata::KeyAndValueRef::Ascii(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert(k.clone(), v.clone());
            }
            tonic::metadata::KeyAndValueRef::Binary(k, v) if k.as_str().starts_with("x-echo-") => {
                out.insert_bin(k.clone(), v.clone());
            }
            _ => {}
        }
    }
}

/// The status a request asks to fail with, carrying the request's `x-echo-*` metadata
/// as trailers and `message` as the status message.
fn requested_failure(req: &EchoRequest, md: &MetadataMap) -> Option<Status> {
    if req.fail_code == 0 {
        return None;
    }
    let mut trailers = MetadataMap::new();
    echo_metadata(md, &mut trailers);
    // A request can ask for a server pushback (gRFC A6), to test retrying clients.
    if let Some(v) = md.get("x-echo-pushback-ms") {
        trailers.insert("grpc-retry-pushback-ms", v.clone());
    }
    Some(Status::with_metadata(
        tonic::Code::from_i32(req.fail_code),
        req.message.clone(),
        trailers,
    ))
}

fn with_metadata<T>(body: T, md: &MetadataMap, name: &str) -> Response<T> {
    let mut resp = Response::new(body);
    echo_metadata(md, resp.metadata_mut());
    if let Ok(v) = MetadataValue::try_from(name) {
        resp.metadata_mut().insert("x-served-by", v);
    }
    resp
}

async fn delay(ms: u32) {
    if ms > 0 {
        tokio::time::sleep(Duration::from_millis(u64::from(ms))).await;
    }
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<EchoReply, Status>> + Send>>;

#[tonic::async_trait]
impl Echo for EchoService {
    async fn unary(&self, request: Request<EchoRequest>) -> Result<Response<EchoReply>, Status> {
        let guard = CallCount::new(&self.stats);
        self.observe(request.metadata());
        let (md, _, req) = request.into_parts();
        let extra = self.faults.delay_ms.load(Ordering::Relaxed);
        delay(req.delay_ms.saturating_add(extra)).await;
        guard.done();
        if let Some(status) = requested_failure(&req, &md) {
            return Err(status);
        }
        let code = self.faults.fail_code.load(Ordering::Relaxed);
        if code != 0 {
            let name = self.name.clone();
            return Err(Status::new(
                tonic::Code::from_i32(code),
                format!("{name}: failing every call (fault injected)"),
            ));
        }
        Ok(with_metadata(self.reply(&req, 0)?, &md, &self.name))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: Request<EchoRequest>,
    ) -> Result<Response<Self::ServerStreamStream>, Status> {
        let guard = CallCount::new(&self.stats);
        self.observe(request.metadata());
        let (md, _, req) = request.into_parts();
        if let Some(status) = requested_failure(&req, &md) {
            guard.done();
            return Err(status);
        }
        // A reply the request cannot have fails the call before anything is streamed.
        check_reply_size(&req)?;
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            for seq in 0..u64::from(req.count) {
                delay(req.delay_ms).await;
                if tx.send(this.reply(&req, seq)).await.is_err() {
                    return; // client gone: the guard counts the cancel
                }
                this.stats.sent.fetch_add(1, Ordering::SeqCst);
            }
            guard.done();
        });
        Ok(with_metadata(
            Box::pin(ReceiverStream::new(rx)) as ReplyStream,
            &md,
            &self.name,
        ))
    }

    async fn client_stream(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<EchoReply>, Status> {
        let guard = CallCount::new(&self.stats);
        self.observe(request.metadata());
        let (md, _, mut stream) = request.into_parts();
        let mut count = 0u64;
        let mut payload = Vec::new();
        let mut message = String::new();
        while let Some(req) = stream.next().await {
            let req = req?;
            count += 1;
            payload.extend_from_slice(&req.payload);
            message = req.message;
        }
        guard.done();
        let code = self.faults.fail_code.load(Ordering::Relaxed);
        if code != 0 {
            return Err(Status::new(
                tonic::Code::from_i32(code),
                format!("{} fails every call", self.name),
            ));
        }
        Ok(with_metadata(
            EchoReply {
                payload,
                message,
                server: self.name.to_string(),
                seq: count,
            },
            &md,
            &self.name,
        ))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        request: Request<Streaming<EchoRequest>>,
    ) -> Result<Response<Self::BidiStream>, Status> {
        let guard = CallCount::new(&self.stats);
        self.observe(request.metadata());
        let (md, _, mut stream) = request.into_parts();
        let (tx, rx) = mpsc::channel(4);
        let this = self.clone();
        tokio::spawn(async move {
            let mut seq = 0;
            while let Some(req) = stream.next().await {
                let item = match req {
                    Ok(req) => this.reply(&req, seq),
                    Err(status) => Err(status),
                };
                seq += 1;
                if tx.send(item).await.is_err() {
                    return;
                }
            }
            guard.done();
        });
        Ok(with_metadata(
            Box::pin(ReceiverStream::new(rx)) as ReplyStream,
            &md,
            &self.name,
        ))
    }
}

/// Largest message the example backend accepts or sends.
pub const MAX_MESSAGE_SIZE: usize = 64 * 1024 * 1024;

/// Serves `service` (plus the standard `grpc.health.v1.Health`, reporting SERVING) on
/// an already-bound listener until `shutdown` completes; then finishes open calls.
pub async fn serve(
    listener: TcpListener,
    service: EchoService,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<EchoServer<EchoService>>().await;
    serve_with_health(listener, service, health_service, shutdown).await
}

/// Like [`serve`], with a health service the caller controls (to flip SERVING).
pub async fn serve_with_health(
    listener: TcpListener,
    service: EchoService,
    health: tonic_health::pb::health_server::HealthServer<
        impl tonic_health::pb::health_server::Health,
    >,
    shutdown: impl std::future::Future<Output = ()> + Send,
) -> Result<(), tonic::transport::Error> {
    let echo = EchoServer::new(service)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .max_decoding_message_size(MAX_MESSAGE_SIZE)
        .max_encoding_message_size(MAX_MESSAGE_SIZE);
    // Server reflection (v1), so that grpcurl and the proxy's reflection can describe Echo.
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(crate::echo::FILE_DESCRIPTOR_SET)
        .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .inspect_err(|e| tracing::warn!(error = %e, "echo backend: no reflection service"))
        .ok();
    tonic::transport::Server::builder()
        .tcp_nodelay(true)
        .add_service(health)
        .add_service(echo)
        .add_optional_service(reflection)
        // TCP_NODELAY on accepted connections (`.tcp_nodelay` above only applies to
        // listeners tonic binds itself): without it, Nagle holds a small answer that follows
        // another one until the peer's delayed ACK, ~40 ms (e.g. the proxy's probe of a new
        // connection).
        .serve_with_incoming_shutdown(
            tonic::transport::server::TcpIncoming::from(listener).with_nodelay(Some(true)),
            shutdown,
        )
        .await
}

/// An in-process example backend on a loopback port, stopped gracefully when dropped.
#[derive(Debug)]
pub struct EchoBackend {
    addr: SocketAddr,
    stats: Arc<EchoStats>,
    faults: Arc<Faults>,
    health: tonic_health::server::HealthReporter,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl EchoBackend {
    /// Starts a backend named `name` on a free port of `127.0.0.1`.
    pub async fn start(name: &str) -> std::io::Result<Self> {
        Self::start_on("127.0.0.1:0".parse().expect("static address"), name).await
    }

    /// Starts a backend named `name` on `addr`.
    pub async fn start_on(addr: SocketAddr, name: &str) -> std::io::Result<Self> {
        let listener = TcpListener::bind(addr).await?;
        let addr = listener.local_addr()?;
        let service = EchoService::new(name);
        let stats = Arc::clone(service.stats());
        let faults = Arc::clone(service.faults());
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        health
            .set_service_status("", tonic_health::ServingStatus::Serving)
            .await;
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = serve_with_health(listener, service, health_service, shutdown).await {
                tracing::warn!(error = %e, "echo backend failed");
            }
        });
        Ok(Self {
            addr,
            stats,
            faults,
            health,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// Where the backend listens.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// What the backend saw.
    pub fn stats(&self) -> &Arc<EchoStats> {
        &self.stats
    }

    /// The faults this backend injects (set them to make it slow or failing).
    pub fn faults(&self) -> &Arc<Faults> {
        &self.faults
    }

    /// Sets what the standard health service reports for the whole server (`""`).
    pub async fn set_serving(&self, serving: bool) {
        let status = if serving {
            tonic_health::ServingStatus::Serving
        } else {
            tonic_health::ServingStatus::NotServing
        };
        self.health.set_service_status("", status).await;
    }

    /// Sets what the standard health service reports for the Echo service itself.
    pub async fn set_echo_serving(&self, serving: bool) {
        if serving {
            self.health.set_serving::<EchoServer<EchoService>>().await;
        } else {
            self.health
                .set_not_serving::<EchoServer<EchoService>>()
                .await;
        }
    }

    /// Stops gracefully: GOAWAY to clients, open calls finish, then the listener closes.
    pub async fn shutdown(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for EchoBackend {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
