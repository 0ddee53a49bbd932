//! Fault-injection helpers for the resilience and bad-input tests: backend processes
//! that can be killed, a bounded load loop that records every call, and raw HTTP/1 and
//! HTTP/2 clients for sending what a well-behaved client never would.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use prost::Message;
use switchyard::echo::EchoRequest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

pub use crate::common::wait_listening;
pub use switchyard::testkit::free_addr;

/// The gRPC path of the Echo service's unary method.
pub const UNARY: &str = "/switchyard.echo.v1.Echo/Unary";
/// The Echo service's name.
pub const ECHO: &str = "switchyard.echo.v1.Echo";

/// Sends `signal` (e.g. `"KILL"`, `"TERM"`, `"STOP"`) to process `pid` with `kill(1)`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    assert!(status.success(), "kill -{signal} {pid} failed");
}

/// A `switchyard demo-backend` process (a real Echo backend that can be killed with -9).
pub struct DemoProcess {
    /// Where it listens.
    pub addr: SocketAddr,
    child: Option<Child>,
}

impl DemoProcess {
    /// Starts a backend named `name` on a free loopback port and waits until it accepts.
    pub async fn start(name: &str) -> DemoProcess {
        let addr = free_addr().unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .args([
                "demo-backend",
                "--listen",
                &addr.to_string(),
                "--name",
                name,
            ])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn demo-backend");
        wait_listening(addr, Duration::from_secs(20)).await;
        DemoProcess {
            addr,
            child: Some(child),
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// Kills the process with SIGKILL and reaps it (its sockets are closed on return).
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }
}

impl Drop for DemoProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A TCP listener that accepts connections and never answers (reads and discards).
pub struct BlackHole {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connections accepted so far.
    pub accepted: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl BlackHole {
    /// Starts a black hole on a free loopback port.
    pub async fn start() -> BlackHole {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let accepted = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&accepted);
        let task = tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
                });
            }
        });
        BlackHole {
            addr,
            accepted,
            task,
        }
    }
}

impl Drop for BlackHole {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A TCP listener that accepts each connection and resets it at once (a backend that
/// refuses to talk), counting the connection attempts that reach it.
pub struct Refuser {
    /// Where it listens.
    pub addr: SocketAddr,
    /// Connection attempts seen so far.
    pub attempts: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Refuser {
    /// Starts a refuser on a free loopback port.
    pub async fn start() -> Refuser {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let attempts = Arc::new(AtomicU64::new(0));
        let count = Arc::clone(&attempts);
        let task = tokio::spawn(async move {
            while let Ok((s, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                // Close with RST rather than FIN.
                let _ = s.set_zero_linger();
                drop(s);
            }
        });
        Refuser {
            addr,
            attempts,
            task,
        }
    }
}

impl Drop for Refuser {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One call made by the load loop.
#[derive(Debug)]
pub struct CallOutcome {
    /// Which worker made it.
    pub worker: usize,
    /// When it started and ended.
    pub start: Instant,
    /// When it ended.
    pub end: Instant,
    /// The serving backend's name, or the error.
    pub result: Result<String, tonic::Status>,
}

impl CallOutcome {
    /// How long the call took.
    pub fn took(&self) -> Duration {
        self.end - self.start
    }

    /// The serving backend's name, if the call succeeded.
    pub fn server(&self) -> Option<&str> {
        self.result.as_deref().ok()
    }
}

/// What each call of a load loop sends.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// Concurrent workers, each on its own HTTP/2 connection.
    pub workers: usize,
    /// The loop stops after this long at the latest.
    pub max_duration: Duration,
    /// Most calls per worker.
    pub max_calls_per_worker: usize,
    /// Backend delay asked for in each call (keeps calls in flight).
    pub delay_ms: u32,
    /// Deadline of each call (sent as `grpc-timeout`).
    pub deadline: Duration,
}

impl Default for LoadSpec {
    fn default() -> Self {
        Self {
            workers: 4,
            max_duration: Duration::from_secs(3),
            max_calls_per_worker: 2_000,
            delay_ms: 0,
            deadline: Duration::from_secs(5),
        }
    }
}

/// A bounded load loop of unary calls through the proxy, recording every call.
pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<CallOutcome>>>,
    /// When the loop started.
    pub started: Instant,
}

impl Load {
    /// Starts the loop against `addr` (the proxy).
    pub async fn start(addr: SocketAddr, spec: LoadSpec) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let started = Instant::now();
        let mut workers = Vec::with_capacity(spec.workers);
        for w in 0..spec.workers {
            let mut client = load_client(addr).await;
            let stop = Arc::clone(&stop);
            let spec = spec.clone();
            workers.push(tokio::spawn(async move {
                let mut out = Vec::new();
                while !stop.load(Ordering::SeqCst)
                    && started.elapsed() < spec.max_duration
                    && out.len() < spec.max_calls_per_worker
                {
                    let mut req = tonic::Request::new(EchoRequest {
                        message: format!("w{w}"),
                        delay_ms: spec.delay_ms,
                        ..Default::default()
                    });
                    req.set_timeout(spec.deadline);
                    let start = Instant::now();
                    let result = match tokio::time::timeout(
                        spec.deadline + Duration::from_secs(5),
                        client.unary(req),
                    )
                    .await
                    {
                        Ok(Ok(r)) => Ok(r.into_inner().server),
                        Ok(Err(s)) => Err(s),
                        Err(_) => Err(tonic::Status::unknown("test: call hung past its deadline")),
                    };
                    out.push(CallOutcome {
                        worker: w,
                        start,
                        end: Instant::now(),
                        result,
                    });
                }
                out
            }));
        }
        Load {
            stop,
            workers,
            started,
        }
    }

    /// Lets the loop run until `d` after its start, then stops it and returns every call.
    pub async fn finish_after(self, d: Duration) -> Vec<CallOutcome> {
        tokio::time::sleep_until((self.started + d).into()).await;
        self.finish().await
    }

    /// Stops the loop and returns every call, ordered by start time.
    pub async fn finish(self) -> Vec<CallOutcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for w in self.workers {
            all.extend(w.await.unwrap());
        }
        all.sort_by_key(|c| c.start);
        all
    }
}

async fn load_client(
    addr: SocketAddr,
) -> switchyard::echo::echo_client::EchoClient<tonic::transport::Channel> {
    let ch = tonic::transport::Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    switchyard::echo::echo_client::EchoClient::new(ch)
}

/// The failed calls among `calls`.
pub fn failures(calls: &[CallOutcome]) -> Vec<&CallOutcome> {
    calls.iter().filter(|c| c.result.is_err()).collect()
}

/// A short summary of calls (start relative to `since`), for assertion messages.
pub fn describe(calls: &[&CallOutcome], since: Instant) -> String {
    calls
        .iter()
        .take(20)
        .map(|c| {
            let start = if c.start >= since {
                format!("+{:?}", c.start - since)
            } else {
                format!("-{:?}", since - c.start)
            };
            format!(
                "[w{} start {start} took {:?}: {:?}]",
                c.worker,
                c.took(),
                c.result
                    .as_ref()
                    .map_err(|s| format!("{:?} {}", s.code(), s.message()))
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// How many calls each backend served.
pub fn served_counts<'a>(
    calls: impl IntoIterator<Item = &'a CallOutcome>,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for c in calls {
        if let Ok(name) = &c.result {
            *m.entry(name.clone()).or_insert(0) += 1;
        }
    }
    m
}

/// A plain HTTP/1.0 GET over a fresh connection; returns the whole response text.
pub async fn http_get(addr: &str, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut buf))
        .await
        .map_err(|_| std::io::Error::other("timeout"))??;
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// A gRPC message frame (uncompressed) holding an Echo request.
pub fn grpc_message(req: &EchoRequest) -> Bytes {
    let body = req.encode_to_vec();
    let mut b = BytesMut::with_capacity(5 + body.len());
    b.extend_from_slice(&[0]);
    b.extend_from_slice(&(body.len() as u32).to_be_bytes());
    b.extend_from_slice(&body);
    b.freeze()
}

/// An HTTP/2 client connection (the `h2` crate) to `addr`.
pub async fn h2_connect(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(async move {
        let _ = conn.await;
    });
    send
}

/// A whole reply to a raw HTTP/2 request.
pub type H2Reply = crate::common::RawResponse;

/// Sends a POST with these headers and body on `send`; returns the full reply.
pub async fn h2_request(
    send: &h2::client::SendRequest<Bytes>,
    path: &str,
    headers: &[(&str, &str)],
    body: Bytes,
) -> Result<H2Reply, h2::Error> {
    let mut b = http::Request::builder()
        .method("POST")
        .uri(format!("http://switchyard.test{path}"));
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let req = b.body(()).unwrap();
    let mut send = send.clone().ready().await?;
    let (resp, mut stream) = send.send_request(req, false)?;
    // The proxy may answer (and close the stream) before reading the body.
    let _ = stream.send_data(body, true);
    let resp = tokio::time::timeout(Duration::from_secs(10), resp)
        .await
        .expect("no response within 10 s")?;
    let (parts, mut recv) = resp.into_parts();
    let mut body = BytesMut::new();
    while let Some(chunk) = recv.data().await {
        let chunk = chunk?;
        let _ = recv.flow_control().release_capacity(chunk.len());
        body.extend_from_slice(&chunk);
    }
    let trailers = recv.trailers().await?;
    Ok(H2Reply {
        status: parts.status,
        headers: parts.headers,
        body: body.freeze(),
        trailers,
    })
}

/// The HTTP/2 connection preface a client sends first.
pub const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// HTTP/2 frame types used by the raw tests.
pub mod frame_type {
    /// DATA
    pub const DATA: u8 = 0;
    /// HEADERS
    pub const HEADERS: u8 = 1;
    /// RST_STREAM
    pub const RST_STREAM: u8 = 3;
    /// SETTINGS
    pub const SETTINGS: u8 = 4;
    /// PING
    pub const PING: u8 = 6;
    /// GOAWAY
    pub const GOAWAY: u8 = 7;
    /// WINDOW_UPDATE
    pub const WINDOW_UPDATE: u8 = 8;
    /// CONTINUATION
    pub const CONTINUATION: u8 = 9;
}

/// One raw HTTP/2 frame.
#[derive(Debug, Clone)]
pub struct RawFrame {
    /// Frame type.
    pub kind: u8,
    /// Flags.
    pub flags: u8,
    /// Stream id.
    pub stream: u32,
    /// Payload.
    pub payload: Vec<u8>,
}

impl RawFrame {
    /// The error code of a RST_STREAM or GOAWAY frame.
    pub fn error_code(&self) -> Option<u32> {
        let at = match self.kind {
            frame_type::RST_STREAM => 0,
            frame_type::GOAWAY => 4,
            _ => return None,
        };
        let b = self.payload.get(at..at + 4)?;
        Some(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }
}

/// Encodes one frame.
pub fn encode_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let len = payload.len() as u32;
    let mut out = Vec::with_capacity(9 + payload.len());
    out.extend_from_slice(&len.to_be_bytes()[1..]);
    out.push(kind);
    out.push(flags);
    out.extend_from_slice(&(stream & 0x7fff_ffff).to_be_bytes());
    out.extend_from_slice(payload);
    out
}

fn hpack_int(out: &mut Vec<u8>, prefix_bits: u32, first: u8, mut v: usize) {
    let max = (1usize << prefix_bits) - 1;
    if v < max {
        out.push(first | v as u8);
        return;
    }
    out.push(first | max as u8);
    v -= max;
    while v >= 128 {
        out.push((v % 128) as u8 | 0x80);
        v /= 128;
    }
    out.push(v as u8);
}

/// An HPACK header block of literal fields (no indexing, no Huffman).
pub fn hpack_block(headers: &[(&str, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for (k, v) in headers {
        out.push(0x00);
        hpack_int(&mut out, 7, 0, k.len());
        out.extend_from_slice(k.as_bytes());
        hpack_int(&mut out, 7, 0, v.len());
        out.extend_from_slice(v.as_bytes());
    }
    out
}

/// The request headers of a gRPC call to `path`.
pub fn grpc_request_headers(path: &str) -> Vec<(&str, &str)> {
    vec![
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "switchyard.test"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]
}

/// A raw HTTP/2 client: writes frames as given, reads frames as they come.
pub struct RawH2 {
    /// The socket.
    pub tcp: TcpStream,
    buf: Vec<u8>,
    /// Whether SETTINGS and PING frames are acknowledged.
    ack: bool,
}

impl RawH2 {
    /// Like [`RawH2::connect`], but never acknowledges SETTINGS or PING frames.
    pub async fn connect_mute(addr: SocketAddr) -> RawH2 {
        let mut c = Self::connect(addr).await;
        c.ack = false;
        c
    }

    /// Connects and sends the preface and an empty SETTINGS frame.
    pub async fn connect(addr: SocketAddr) -> RawH2 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(H2_PREFACE).await.unwrap();
        tcp.write_all(&encode_frame(frame_type::SETTINGS, 0, 0, &[]))
            .await
            .unwrap();
        RawH2 {
            tcp,
            buf: Vec::new(),
            ack: true,
        }
    }

    /// Writes one frame.
    pub async fn send(&mut self, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
        self.tcp
            .write_all(&encode_frame(kind, flags, stream, payload))
            .await
            .unwrap();
    }

    /// Reads the next frame; `None` when the connection closed (EOF or reset).
    /// SETTINGS and PING frames from the server are acknowledged on the way.
    pub async fn next(&mut self, within: Duration) -> Option<RawFrame> {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            if self.buf.len() >= 9 {
                let len = u32::from_be_bytes([0, self.buf[0], self.buf[1], self.buf[2]]) as usize;
                if self.buf.len() >= 9 + len {
                    let f = RawFrame {
                        kind: self.buf[3],
                        flags: self.buf[4],
                        stream: u32::from_be_bytes([
                            self.buf[5],
                            self.buf[6],
                            self.buf[7],
                            self.buf[8],
                        ]) & 0x7fff_ffff,
                        payload: self.buf[9..9 + len].to_vec(),
                    };
                    self.buf.drain(..9 + len);
                    if self.ack && f.kind == frame_type::SETTINGS && f.flags & 1 == 0 {
                        let _ = self
                            .tcp
                            .write_all(&encode_frame(frame_type::SETTINGS, 1, 0, &[]))
                            .await;
                    }
                    if self.ack && f.kind == frame_type::PING && f.flags & 1 == 0 {
                        let _ = self
                            .tcp
                            .write_all(&encode_frame(frame_type::PING, 1, 0, &f.payload))
                            .await;
                    }
                    return Some(f);
                }
            }
            let mut chunk = [0u8; 16 * 1024];
            match tokio::time::timeout_at(deadline, self.tcp.read(&mut chunk)).await {
                Err(_) => panic!("no frame and no close within {within:?}"),
                Ok(Ok(0)) | Ok(Err(_)) => return None,
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    /// Reads frames until one satisfies `f` (returned) or the connection closes (`None`).
    pub async fn until(
        &mut self,
        within: Duration,
        mut f: impl FnMut(&RawFrame) -> bool,
    ) -> Option<RawFrame> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let frame = self.next(left.max(Duration::from_millis(1))).await?;
            if f(&frame) {
                return Some(frame);
            }
        }
    }
}

/// Reads from `s` until EOF or reset; panics if the peer keeps it open past `within`.
/// Returns what was read.
pub async fn read_until_closed(s: &mut TcpStream, within: Duration) -> Vec<u8> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    let mut chunk = [0u8; 8192];
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut chunk)).await {
            Err(_) => panic!(
                "connection still open after {within:?} (read {} bytes)",
                out.len()
            ),
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&chunk[..n]),
        }
    }
}

/// Puts a key (no lease) through `endpoint`, retrying while the cluster has no leader.
pub async fn put_retrying(endpoint: &str, key: &str, value: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = async {
            let mut c = etcd_client::Client::connect([endpoint], None).await?;
            c.put(key, value, None).await
        }
        .await;
        match r {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "put {key}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Deletes a key through `endpoint`, retrying while the cluster has no leader.
pub async fn delete_retrying(endpoint: &str, key: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = async {
            let mut c = etcd_client::Client::connect([endpoint], None).await?;
            c.delete(key, None).await
        }
        .await;
        match r {
            Ok(_) => return,
            Err(e) => assert!(Instant::now() < deadline, "delete {key}: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
