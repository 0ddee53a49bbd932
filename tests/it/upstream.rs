//! Backend connections: one pool per backend address shared by every service (and one
//! etcd watch stream for all their watches), more connections when a backend limits its
//! streams (tonic's and grpcio's), and idle connections closed and reopened by the next
//! call.

use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use switchyard::demo::EchoService;
use switchyard::echo::echo_server::EchoServer;
use switchyard::settings::AdminListen;

use crate::common::*;

const SVC: &str = "switchyard.echo.v1.Echo";

/// `switchyard_upstream_connections` as the admin listener at `admin` shows it.
async fn connections(admin: SocketAddr) -> f64 {
    let body = admin_get(admin, "/metrics")
        .await
        .expect("admin answers")
        .body;
    metric(&body, "switchyard_upstream_connections", &[]).unwrap_or(-1.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_sharing_an_address_share_its_connection() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("shared").await.unwrap();
    let _ra = register(etcd.endpoint(), "a.Svc", b.addr(), 10).await;
    let _rb = register(etcd.endpoint(), "b.Svc", b.addr(), 10).await;
    let _rc = register(etcd.endpoint(), SVC, b.addr(), 10).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["a.Svc", "b.Svc"], |a| {
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    for addr in [proxy.bound[0], proxy.bound[1], proxy.addr] {
        assert_eq!(served_by(&mut client(addr).await).await.unwrap(), "shared");
    }
    // Three services, one address: one connection (the first snapshot of each waited
    // for it, so none is still connecting).
    assert_eq!(connections(admin).await, 1.0);
    let eps = admin_get(admin, "/endpoints").await.unwrap().body;
    let json: serde_json::Value = serde_json::from_str(&eps).unwrap();
    let listed: Vec<u64> = json
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|s| s["endpoints"].as_array().unwrap().clone())
        .map(|e| e["connections"].as_u64().unwrap())
        .collect();
    assert_eq!(listed, [1, 1, 1], "{eps}");
    // Their etcd watches share one watch stream (a stream per service cost about 14 KiB
    // each in the proxy).
    assert_eq!(watches(&etcd).await, (3.0, 1.0));
    proxy.shutdown().await;
}

/// etcd's count of watchers and of watch streams.
async fn watches(etcd: &EtcdProcess) -> (f64, f64) {
    let text = crate::faults::http_get(etcd.endpoint().trim_start_matches("http://"), "/metrics")
        .await
        .unwrap();
    let gauge = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
            .unwrap_or(-1.0)
    };
    (
        gauge("etcd_debugging_mvcc_watcher_total"),
        gauge("etcd_debugging_mvcc_watch_stream_total"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_no_longer_watched_cancels_its_watch_on_the_shared_stream() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("b").await.unwrap();
    let r = register(etcd.endpoint(), SVC, b.addr(), 10).await;
    let _ra = register(etcd.endpoint(), "a.Svc", b.addr(), 10).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["a.Svc"], |a| {
        a.timeouts.service_idle = Duration::from_secs(1);
    })
    .await;
    let mut c = client(proxy.addr).await;
    let mut bound = client(proxy.bound[0]).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "b");
    assert_eq!(served_by(&mut bound).await.unwrap(), "b");
    assert_eq!(watches(&etcd).await, (2.0, 1.0));
    // Deregistered and unused: the service is dropped, and its watch cancelled; the
    // other's goes on, on the same stream.
    delete(etcd.endpoint(), &r.key).await;
    drop(r);
    eventually(
        Duration::from_secs(20),
        "the dropped service's watch cancelled",
        || async { watches(&etcd).await == (1.0, 1.0) },
    )
    .await;
    assert_eq!(served_by(&mut bound).await.unwrap(), "b");
    // Registered again: watched again.
    let _r = register(etcd.endpoint(), SVC, b.addr(), 10).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "b");
    assert_eq!(watches(&etcd).await, (2.0, 1.0));
    proxy.shutdown().await;
}

/// An Echo backend that allows `streams` streams per connection.
async fn limited_backend(streams: u32) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .max_concurrent_streams(streams)
            .add_service(EchoServer::new(EchoService::new("limited")))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_limited_backend_fails_no_call_and_gets_more_connections() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (b1, t1) = limited_backend(4).await;
    let (b2, t2) = limited_backend(4).await;
    let _r1 = register(etcd.endpoint(), SVC, b1, 10).await;
    let _r2 = register(etcd.endpoint(), SVC, b2, 10).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    // 32 callers, each on its own connection, 4 calls of 100 ms each: 32 streams at once
    // on 2 backends that take 4 each per connection.
    let mut clients = Vec::new();
    for _ in 0..32 {
        clients.push(client(proxy.addr).await);
    }
    let results: Vec<Result<(), tonic::Status>> = futures_util::stream::iter(clients)
        .map(|mut c| async move {
            for _ in 0..4 {
                let mut r = req("x");
                r.delay_ms = 100;
                let mut call = tonic::Request::new(r);
                call.set_timeout(Duration::from_secs(10));
                c.unary(call).await?;
            }
            Ok(())
        })
        .buffer_unordered(32)
        .collect()
        .await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    // The limit was met: each backend got more than one connection.
    let open = connections(admin).await;
    assert!(open > 2.0, "{open} connections");
    proxy.shutdown().await;
    t1.abort();
    t2.abort();
}

/// An Echo backend that allows 4 streams per connection and serves only the first
/// connection it accepts: every later one is closed at once.
async fn one_connection_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<tokio::net::TcpStream>>(1);
    let task = tokio::spawn(async move {
        let server = tonic::transport::Server::builder()
            .max_concurrent_streams(4)
            .add_service(EchoServer::new(EchoService::new("single")))
            .serve_with_incoming(tokio_stream::wrappers::ReceiverStream::new(rx));
        let accept = async {
            let mut first = true;
            while let Ok((tcp, _)) = listener.accept().await {
                if std::mem::take(&mut first) {
                    let _ = tx.send(Ok(tcp)).await;
                }
            }
        };
        tokio::select! {
            _ = server => {}
            () = accept => {}
        }
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_queue_on_a_full_connection_when_no_other_can_be_opened() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (b, task) = one_connection_backend().await;
    let _r = register(etcd.endpoint(), SVC, b, 10).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    // 12 calls of 300 ms at once on a backend taking 4 at a time on its one connection:
    // the calls waiting for a second connection, which fails to open, queue on the first.
    let mut clients = Vec::new();
    for _ in 0..12 {
        clients.push(client(proxy.addr).await);
    }
    let results: Vec<Result<tonic::Response<switchyard::echo::EchoReply>, tonic::Status>> =
        futures_util::future::join_all(clients.into_iter().map(|mut c| async move {
            let mut r = req("x");
            r.delay_ms = 300;
            let mut call = tonic::Request::new(r);
            call.set_timeout(Duration::from_secs(10));
            c.unary(call).await
        }))
        .await;
    let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    proxy.shutdown().await;
    task.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_connection_closes_and_the_next_call_reopens_it() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("b").await.unwrap();
    let _r = register(etcd.endpoint(), SVC, b.addr(), 10).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.admin.listen = AdminListen(Some(admin));
        a.upstream.idle_timeout = switchyard::settings::IdleTimeout(Some(Duration::from_secs(2)));
    })
    .await;
    let mut c = client(proxy.addr).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "b");
    assert_eq!(connections(admin).await, 1.0);
    eventually(
        Duration::from_secs(10),
        "the idle connection closes",
        || async { connections(admin).await == 0.0 },
    )
    .await;
    let body = admin_get(admin, "/metrics").await.unwrap().body;
    assert_eq!(
        metric(
            &body,
            "switchyard_upstream_connections_closed_total",
            &[("reason", "idle")]
        ),
        Some(1.0)
    );
    // The next call reopens it, and succeeds.
    assert_eq!(served_by(&mut c).await.unwrap(), "b");
    assert_eq!(connections(admin).await, 1.0);
    proxy.shutdown().await;
}

/// A grpcio Echo/Unary backend named `argv[1]` that allows `argv[2]` streams per
/// connection and answers each call after 100 ms; prints its port, serves until stdin
/// closes. The reply is an `EchoReply` with only `server` set, encoded by hand.
const GRPCIO_BACKEND: &str = r#"
import sys, time, grpc
from concurrent import futures
name, streams = sys.argv[1], int(sys.argv[2])
reply = b"\x1a" + bytes([len(name)]) + name.encode()
def unary(request, context):
    time.sleep(0.1)
    return reply
handler = grpc.method_handlers_generic_handler(
    "switchyard.echo.v1.Echo", {"Unary": grpc.unary_unary_rpc_method_handler(unary)})
server = grpc.server(futures.ThreadPoolExecutor(max_workers=64), handlers=[handler],
                     options=[("grpc.max_concurrent_streams", streams)])
port = server.add_insecure_port("127.0.0.1:0")
server.start()
print(port, flush=True)
sys.stdin.read()
server.stop(0)
"#;

/// `argv[2]` grpcio callers at `argv[1]`, each on its own connection (a local subchannel
/// pool), each making `argv[3]` Echo/Unary calls in turn once every caller's channel is
/// ready; prints `ok <server>` or `error <code> <details>` per call, then `wall <seconds>`
/// from the first call to the last answer.
const GRPCIO_CALLERS: &str = r#"
import sys, threading, time, grpc
target, callers, calls = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
# EchoRequest { message: "x", delay_ms: 100 } (the grpcio backend sleeps anyway).
request = b"\x12\x01x\x30\x64"
channels = [grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
            for _ in range(callers)]
for ch in channels:
    grpc.channel_ready_future(ch).result(timeout=10)
lines, lock, start = [], threading.Lock(), threading.Barrier(callers + 1)
def caller(ch):
    unary = ch.unary_unary("/switchyard.echo.v1.Echo/Unary")
    start.wait()
    for _ in range(calls):
        try:
            r = unary(request, timeout=10)
            line = "ok " + r[2:2 + r[1]].decode()
        except grpc.RpcError as e:
            line = "error %s %s" % (e.code().name, e.details())
        with lock:
            lines.append(line)
threads = [threading.Thread(target=caller, args=(ch,)) for ch in channels]
for t in threads:
    t.start()
start.wait()
t0 = time.monotonic()
for t in threads:
    t.join()
wall = time.monotonic() - t0
for line in lines:
    print(line)
print("wall %.3f" % wall, flush=True)
"#;

/// A grpcio backend process, stopped (stdin closed, then killed) when dropped.
struct GrpcioBackend {
    child: std::process::Child,
    addr: SocketAddr,
}

impl GrpcioBackend {
    fn start(python: &std::path::Path, name: &str, streams: u32) -> GrpcioBackend {
        use std::io::BufRead;
        let mut child = std::process::Command::new(python)
            .args(["-c", GRPCIO_BACKEND, name, &streams.to_string()])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("python runs");
        let stdout = child.stdout.take().expect("piped");
        let mut port = String::new();
        std::io::BufReader::new(stdout)
            .read_line(&mut port)
            .expect("the backend prints its port");
        let port: u16 = port.trim().parse().expect("a port");
        GrpcioBackend {
            child,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
        }
    }
}

impl Drop for GrpcioBackend {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcio_backends_limiting_streams_fail_no_call_of_grpcio_callers() {
    init_tracing();
    let Some(tools) = crate::local::clients::tools() else {
        return;
    };
    let python = tools.join("venv/bin/python");
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = GrpcioBackend::start(&python, "g1", 4);
    let b2 = GrpcioBackend::start(&python, "g2", 4);
    let _r1 = register(etcd.endpoint(), SVC, b1.addr, 10).await;
    let _r2 = register(etcd.endpoint(), SVC, b2.addr, 10).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    // The service's first call waits for its endpoints: make it before the load.
    assert!(served_by(&mut client(proxy.addr).await).await.is_ok());
    let target = proxy.addr.to_string();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(&python)
            .args(["-c", GRPCIO_CALLERS, &target, "32", "4"])
            .output()
            .expect("python runs")
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "grpcio callers failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let wall = lines
        .last()
        .and_then(|l| l.strip_prefix("wall "))
        .unwrap_or("?");
    let failed: Vec<&&str> = lines.iter().filter(|l| l.starts_with("error")).collect();
    let ok = |name: &str| lines.iter().filter(|l| **l == format!("ok {name}")).count();
    // Wall time is reported, not asserted (the issue's target is 1.2 s).
    eprintln!(
        "32 grpcio callers x 4 calls of 100 ms, 2 backends limiting streams to 4: {} failed, g1 {}, g2 {}, wall {wall} s",
        failed.len(),
        ok("g1"),
        ok("g2"),
    );
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(ok("g1") + ok("g2"), 128, "{text}");
    assert!(ok("g1") > 0 && ok("g2") > 0, "{text}");
    proxy.shutdown().await;
}
