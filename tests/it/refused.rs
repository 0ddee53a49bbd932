//! Calls that a backend refuses before processing them are replayed on another backend,
//! and the client never sees them fail: RST_STREAM(REFUSED_STREAM), and a GOAWAY(NO_ERROR)
//! whose last-stream-id is below the call's stream. The refusing backends are real
//! HTTP/2 servers on loopback (the `h2` crate's server, or raw frames where `h2` cannot
//! send the GOAWAY wanted), registered in a real etcd next to real Echo backends.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use crate::faults::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// The path of the health probe the proxy sends first on each new backend connection
/// (a backend must answer it before the proxy sends it calls).
const PROBE: &str = "/grpc.health.v1.Health/Check";

/// Unary calls sent through the proxy in each case.
const WORKERS: usize = 4;
const CALLS_PER_WORKER: usize = 75;

/// A misbehaving HTTP/2 backend on loopback, with what it saw.
struct RefusingBackend {
    addr: SocketAddr,
    /// Connections accepted.
    connections: Arc<AtomicU64>,
    /// Probe streams answered (200, grpc-status 0).
    probes: Arc<AtomicU64>,
    /// Call streams refused.
    refused: Arc<AtomicU64>,
    /// Call streams covered by a GOAWAY, then cut off by the connection's close.
    covered: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl RefusingBackend {
    fn connections(&self) -> u64 {
        self.connections.load(Ordering::SeqCst)
    }

    fn probes(&self) -> u64 {
        self.probes.load(Ordering::SeqCst)
    }

    fn refused(&self) -> u64 {
        self.refused.load(Ordering::SeqCst)
    }

    fn covered(&self) -> u64 {
        self.covered.load(Ordering::SeqCst)
    }

    /// Binds a loopback port and serves each connection with `serve`.
    async fn start<F, Fut>(serve: F) -> RefusingBackend
    where
        F: Fn(TcpStream, Counters) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let counters = Counters::default();
        let connections = Arc::clone(&counters.connections);
        let probes = Arc::clone(&counters.probes);
        let refused = Arc::clone(&counters.refused);
        let covered = Arc::clone(&counters.covered);
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counters.connections.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(serve(tcp, counters.clone()));
            }
        });
        RefusingBackend {
            addr,
            connections,
            probes,
            refused,
            covered,
            task,
        }
    }
}

impl Drop for RefusingBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// The counters a refusing backend's connections update.
#[derive(Clone, Default)]
struct Counters {
    connections: Arc<AtomicU64>,
    probes: Arc<AtomicU64>,
    refused: Arc<AtomicU64>,
    covered: Arc<AtomicU64>,
}

/// The answer to a probe: trailers-only, grpc-status 0.
fn probe_answer() -> http::Response<()> {
    http::Response::builder()
        .status(200)
        .header("content-type", "application/grpc")
        .header("grpc-status", "0")
        .body(())
        .unwrap()
}

/// An HTTP/2 server (the `h2` crate) that answers probes and resets every other stream
/// with REFUSED_STREAM, as a server at its concurrency limit does.
async fn serve_refusing_streams(tcp: TcpStream, counters: Counters) {
    let Ok(mut conn) = h2::server::handshake(tcp).await else {
        return;
    };
    while let Some(Ok((req, mut respond))) = conn.accept().await {
        if req.uri().path() == PROBE {
            counters.probes.fetch_add(1, Ordering::SeqCst);
            let _ = respond.send_response(probe_answer(), true);
        } else {
            counters.refused.fetch_add(1, Ordering::SeqCst);
            respond.send_reset(h2::Reason::REFUSED_STREAM);
        }
    }
}

/// A raw HTTP/2 server that answers the first stream of each connection (the proxy's
/// probe) and, as soon as another stream arrives, sends GOAWAY(NO_ERROR) with the probe's
/// stream as last-stream-id, so that no call stream is covered, and closes the connection.
/// (The `h2` server's GOAWAYs always cover every stream it has received.)
async fn serve_goaway_below_calls(tcp: TcpStream, counters: Counters) {
    serve_goaway(tcp, counters, false).await
}

/// Like [`serve_goaway_below_calls`], but the GOAWAY's last-stream-id is the first call's
/// stream: that call may have been processed, and is cut off by the close.
async fn serve_goaway_covering_first_call(tcp: TcpStream, counters: Counters) {
    serve_goaway(tcp, counters, true).await
}

/// Answers the first stream (the probe); on the next one, GOAWAY(NO_ERROR) covering the
/// probe's stream, and that one too if `cover`; then closes.
async fn serve_goaway(mut tcp: TcpStream, counters: Counters, cover: bool) {
    let mut preface = [0u8; 24];
    if tcp.read_exact(&mut preface).await.is_err() || preface != H2_PREFACE {
        return;
    }
    if tcp
        .write_all(&encode_frame(frame_type::SETTINGS, 0, 0, &[]))
        .await
        .is_err()
    {
        return;
    }
    let mut buf = Vec::new();
    let mut answered: Option<u32> = None;
    let mut going_away = false;
    let mut chunk = [0u8; 16 * 1024];
    loop {
        // Whole frames first.
        while buf.len() >= 9 {
            let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
            if buf.len() < 9 + len {
                break;
            }
            let (kind, flags) = (buf[3], buf[4]);
            let stream = u32::from_be_bytes([buf[5], buf[6], buf[7], buf[8]]) & 0x7fff_ffff;
            let payload = buf[9..9 + len].to_vec();
            buf.drain(..9 + len);
            if going_away {
                // Our side is closed: only count the streams that still arrive.
                if kind == frame_type::HEADERS {
                    counters.refused.fetch_add(1, Ordering::SeqCst);
                }
                continue;
            }
            let reply = match kind {
                frame_type::SETTINGS if flags & 1 == 0 => {
                    encode_frame(frame_type::SETTINGS, 1, 0, &[])
                }
                frame_type::PING if flags & 1 == 0 => {
                    encode_frame(frame_type::PING, 1, 0, &payload)
                }
                frame_type::HEADERS if answered.is_none() => {
                    counters.probes.fetch_add(1, Ordering::SeqCst);
                    answered = Some(stream);
                    let block = hpack_block(&[
                        (":status", "200"),
                        ("content-type", "application/grpc"),
                        ("grpc-status", "0"),
                    ]);
                    // END_STREAM | END_HEADERS
                    encode_frame(frame_type::HEADERS, 0x5, stream, &block)
                }
                frame_type::HEADERS => {
                    going_away = true;
                    let last = if cover {
                        counters.covered.fetch_add(1, Ordering::SeqCst);
                        stream
                    } else {
                        counters.refused.fetch_add(1, Ordering::SeqCst);
                        answered.unwrap_or(0)
                    };
                    let mut goaway = last.to_be_bytes().to_vec();
                    goaway.extend_from_slice(&0u32.to_be_bytes()); // NO_ERROR
                    encode_frame(frame_type::GOAWAY, 0, 0, &goaway)
                }
                _ => continue,
            };
            if tcp.write_all(&reply).await.is_err() {
                return;
            }
            if going_away {
                // Nothing more to say: close our side, then read until the client closes
                // its own (closing with unread data would reset the GOAWAY away).
                let _ = tcp.shutdown().await;
            }
        }
        let read = tokio::time::timeout(Duration::from_secs(30), tcp.read(&mut chunk)).await;
        match read {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return,
        }
    }
}

/// Sends `WORKERS` × `CALLS_PER_WORKER` unary calls through the proxy at `addr`, each
/// worker on its own connection; returns every call's serving backend or error.
async fn calls_through(addr: SocketAddr) -> Vec<Result<String, tonic::Status>> {
    let mut tasks = Vec::new();
    for _ in 0..WORKERS {
        let mut c = client(addr).await;
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::with_capacity(CALLS_PER_WORKER);
            for _ in 0..CALLS_PER_WORKER {
                let mut r = tonic::Request::new(req("hi"));
                r.set_timeout(Duration::from_secs(10));
                let result = match tokio::time::timeout(Duration::from_secs(20), c.unary(r)).await {
                    Ok(Ok(reply)) => Ok(reply.into_inner().server),
                    Ok(Err(status)) => Err(status),
                    Err(_) => Err(tonic::Status::unknown("test: call hung")),
                };
                out.push(result);
            }
            out
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    all
}

/// What the calls through the proxy got, and how many calls the Echo backends served.
struct Run {
    calls: Vec<Result<String, tonic::Status>>,
    served: u64,
}

impl Run {
    fn failed(&self) -> Vec<&tonic::Status> {
        self.calls.iter().filter_map(|c| c.as_ref().err()).collect()
    }
}

/// Two Echo backends ("e1", "e2") and `bad` registered for the Echo service in a real
/// etcd; once the proxy has probed `bad`, `WORKERS` × `CALLS_PER_WORKER` calls go
/// through the proxy.
async fn calls_next_to(bad: &RefusingBackend) -> Run {
    let etcd = EtcdProcess::start().await.unwrap();
    let e1 = EchoBackend::start("e1").await.unwrap();
    let e2 = EchoBackend::start("e2").await.unwrap();
    let _r1 = register(etcd.endpoint(), ECHO, e1.addr(), 30).await;
    let _r2 = register(etcd.endpoint(), ECHO, e2.addr(), 30).await;
    let _rb = register(etcd.endpoint(), ECHO, bad.addr, 30).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |_| {}).await;
    // The proxy looks a service up on its first call: calls (which count like the
    // others) until it has connected to the refusing backend and probed it.
    let mut calls = Vec::new();
    let mut c = client(proxy.addr).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while bad.probes() == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never probed the refusing backend"
        );
        calls.push(served_by(&mut c).await);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let warmup = calls.len();
    calls.extend(calls_through(proxy.addr).await);
    assert_eq!(calls.len(), warmup + WORKERS * CALLS_PER_WORKER);
    eprintln!(
        "{} calls ({warmup} warming up), {} failed: the bad backend accepted {} connections, \
         answered {} probes, refused {} streams, cut off {} covered streams; \
         e1 served {}, e2 served {}",
        calls.len(),
        calls.iter().filter(|c| c.is_err()).count(),
        bad.connections(),
        bad.probes(),
        bad.refused(),
        bad.covered(),
        e1.stats().calls(),
        e2.stats().calls()
    );
    let served = e1.stats().calls() + e2.stats().calls();
    proxy.shutdown().await;
    Run { calls, served }
}

/// No call failed, `bad` refused some, and the Echo backends served every call once.
fn assert_refused_calls_replayed(bad: &RefusingBackend, run: &Run) {
    let failed = run.failed();
    assert!(
        failed.is_empty(),
        "{} of {} calls failed; first: {:?}",
        failed.len(),
        run.calls.len(),
        failed
            .iter()
            .take(5)
            .map(|s| format!("{:?} {}", s.code(), s.message()))
            .collect::<Vec<_>>()
    );
    assert!(
        bad.refused() > 0,
        "the refusing backend was offered no call"
    );
    assert_eq!(
        run.served,
        run.calls.len() as u64,
        "the Echo backends did not serve each call exactly once"
    );
    assert!(run
        .calls
        .iter()
        .all(|c| matches!(c.as_deref(), Ok("e1") | Ok("e2"))));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_refused_with_refused_stream_are_retried_on_another_backend() {
    init_tracing();
    let bad = RefusingBackend::start(serve_refusing_streams).await;
    let run = calls_next_to(&bad).await;
    assert_refused_calls_replayed(&bad, &run);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_above_a_graceful_goaway_are_retried_on_another_backend() {
    init_tracing();
    let bad = RefusingBackend::start(serve_goaway_below_calls).await;
    let run = calls_next_to(&bad).await;
    assert_refused_calls_replayed(&bad, &run);
}

/// The other side of the rule: a call the backend's GOAWAY covers may have been
/// processed, so when the connection then dies the call fails rather than running twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_covered_by_a_goaway_is_not_replayed_when_its_connection_dies() {
    init_tracing();
    let bad = RefusingBackend::start(serve_goaway_covering_first_call).await;
    let run = calls_next_to(&bad).await;
    let failed = run.failed();
    assert!(bad.covered() > 0, "the bad backend was offered no call");
    assert_eq!(
        failed.len() as u64,
        bad.covered(),
        "each covered call, and only those, fails"
    );
    assert!(
        failed.iter().all(|s| s.code() == tonic::Code::Unavailable),
        "{failed:?}"
    );
    assert_eq!(run.served + failed.len() as u64, run.calls.len() as u64);
}
