//! Made-up service names do not lock real services out: the table of watched services is
//! kept by use (an unused entry without endpoints makes room, idle empty entries are
//! swept, a name just found empty is answered without a look-up), services in use keep
//! serving, and memory stays bounded over thousands of names. Against a real etcd, real
//! Echo backends and gRPC clients on loopback.

use crate::common::*;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use switchyard::demo::EchoService;
use switchyard::echo::echo_server::EchoServer;
use switchyard::echo::EchoReply;
use switchyard::settings::AdminListen;
use tokio::net::TcpListener;
use tonic::transport::Channel;
use tonic::Code;

const WAIT: Duration = Duration::from_secs(20);
/// Made-up names' calls in flight at once during a burst.
const BURST_CONCURRENCY: usize = 16;
/// Longest a burst of thousands of calls may take (a bound, not a claim).
const BURST_LIMIT: Duration = Duration::from_secs(300);
/// How the proxy answers a call for a name nobody registered (UNIMPLEMENTED).
const NOT_REGISTERED: &str = "is not registered";

/// An Echo backend that serves Echo's methods under any service name (`/<any>/Unary` is
/// Echo's Unary), so that one backend kind stands for many services.
struct AnyNameBackend {
    addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl AnyNameBackend {
    /// A backend whose replies name it `name`, on a free loopback port.
    async fn start(name: &str) -> AnyNameBackend {
        use hyper_util::rt::{TokioExecutor, TokioIo};
        use tonic::codegen::Service;
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let echo = EchoServer::new(EchoService::new(name));
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let echo = echo.clone();
                let serve = hyper::service::service_fn(
                    move |mut req: http::Request<hyper::body::Incoming>| {
                        let method = req.uri().path().rsplit('/').next().unwrap_or("");
                        *req.uri_mut() = format!("/switchyard.echo.v1.Echo/{method}")
                            .parse()
                            .unwrap();
                        let mut echo = echo.clone();
                        async move { echo.call(req).await }
                    },
                );
                tokio::spawn(
                    hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), serve),
                );
            }
        });
        AnyNameBackend { addr, task }
    }
}

impl Drop for AnyNameBackend {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// One HTTP/2 connection to `addr`.
async fn channel(addr: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap()
}

/// Calls `/<service>/Unary`; returns the name of the backend that answered.
async fn call(ch: &Channel, service: &str) -> Result<String, tonic::Status> {
    let mut grpc = tonic::client::Grpc::new(ch.clone());
    grpc.ready()
        .await
        .map_err(|e| tonic::Status::unknown(e.to_string()))?;
    let path = http::uri::PathAndQuery::try_from(format!("/{service}/Unary")).unwrap();
    let codec = tonic_prost::ProstCodec::<_, EchoReply>::default();
    let reply = grpc
        .unary(tonic::Request::new(req("hi")), path, codec)
        .await?;
    Ok(reply.into_inner().server)
}

/// Calls each of `names`, some at once; returns how many calls ended with each answer
/// (the code, and whether the message says no endpoints are registered).
async fn burst(ch: &Channel, names: impl Iterator<Item = String>) -> BTreeMap<String, usize> {
    let calls = futures_util::stream::iter(names)
        .map(|name| async move {
            match call(ch, &name).await {
                Ok(server) => format!("served by {server}"),
                Err(s) if s.message().contains(NOT_REGISTERED) => {
                    format!("{:?}: {NOT_REGISTERED}", s.code())
                }
                Err(s) => format!("{:?}: {}", s.code(), s.message()),
            }
        })
        .buffer_unordered(BURST_CONCURRENCY)
        .fold(BTreeMap::new(), |mut seen, answer| async move {
            *seen.entry(answer).or_insert(0) += 1;
            seen
        });
    tokio::time::timeout(BURST_LIMIT, calls)
        .await
        .expect("the burst ends")
}

/// `n` made-up names from `from` on.
fn junk(from: usize, n: usize) -> impl Iterator<Item = String> {
    (from..from + n).map(|i| format!("junk.S{i}"))
}

fn not_registered(n: usize) -> BTreeMap<String, usize> {
    BTreeMap::from([(format!("Unimplemented: {NOT_REGISTERED}"), n)])
}

async fn metrics(admin: SocketAddr) -> String {
    admin_get(admin, "/metrics")
        .await
        .expect("the admin listener answers")
        .body
}

/// The services `/endpoints` lists.
async fn watched(admin: SocketAddr) -> Vec<String> {
    let body = admin_get(admin, "/endpoints")
        .await
        .expect("the admin listener answers")
        .body;
    let list: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    list.iter()
        .map(|s| s["service"].as_str().unwrap().to_owned())
        .collect()
}

fn dropped(text: &str, reason: &str) -> f64 {
    metric(
        text,
        "switchyard_services_dropped_total",
        &[("reason", reason)],
    )
    .unwrap_or(-1.0)
}

fn refused(text: &str) -> f64 {
    metric(
        text,
        "switchyard_calls_refused_total",
        &[("reason", "services_full")],
    )
    .unwrap_or(-1.0)
}

/// Calls `service` through `ch` until `stop`, at most 100,000 times; returns the calls
/// served by `expect` and every other answer.
fn keep_calling(
    ch: &Channel,
    service: &'static str,
    expect: &'static str,
    stop: &Arc<AtomicBool>,
) -> tokio::task::JoinHandle<(usize, Vec<String>)> {
    let (ch, stop) = (ch.clone(), Arc::clone(stop));
    tokio::spawn(async move {
        let (mut served, mut other) = (0, Vec::new());
        for _ in 0..100_000 {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            match call(&ch, service).await {
                Ok(s) if s == expect => served += 1,
                answer => other.push(format!("{answer:?}")),
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        (served, other)
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_made_up_names_locks_no_service_out() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let used = AnyNameBackend::start("used").await;
    let _used = register(e, "used.Svc", used.addr, 30).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    // The bound listener's service has nothing registered until after the burst.
    let proxy = Proxy::start_with(&[e.to_owned()], &["bound.Svc"], |a| {
        a.admin.listen = AdminListen(Some(admin));
        a.limits.max_services = 64;
    })
    .await;
    let ch = channel(proxy.addr).await;
    assert_eq!(call(&ch, "used.Svc").await.unwrap(), "used");

    let stop = Arc::new(AtomicBool::new(false));
    let user = keep_calling(&ch, "used.Svc", "used", &stop);
    // 2,000 names nobody serves, 30 times the table's room: each is told so.
    assert_eq!(burst(&ch, junk(0, 2000)).await, not_registered(2000));

    // A service registered afterwards is served, on its first call.
    let late = AnyNameBackend::start("late").await;
    let _late = register(e, "late.Svc", late.addr, 30).await;
    assert_eq!(call(&ch, "late.Svc").await.unwrap(), "late");
    // The bound listener's service was kept, watched, through it all.
    let bound = AnyNameBackend::start("bound").await;
    let _bound = register(e, "bound.Svc", bound.addr, 30).await;
    let bound_ch = channel(proxy.bound[0]).await;
    eventually(WAIT, "the bound listener's service is served", || async {
        call(&bound_ch, "any.Name")
            .await
            .is_ok_and(|s| s == "bound")
    })
    .await;

    stop.store(true, Ordering::Relaxed);
    let (served, other) = user.await.unwrap();
    assert!(other.is_empty(), "the service in use failed: {other:?}");
    assert!(served > 0);

    let text = metrics(admin).await;
    assert!(dropped(&text, "room") >= (2000 - 64) as f64, "{text}");
    assert_eq!(refused(&text), 0.0);
    // The table and the series of each service stay within the table's room.
    let services = watched(admin).await;
    assert!(services.len() <= 64, "{services:?}");
    for kept in ["used.Svc", "late.Svc", "bound.Svc"] {
        assert!(services.iter().any(|s| s == kept), "{kept}: {services:?}");
    }
    let junk_series = text
        .lines()
        .filter(|l| l.starts_with("switchyard_call_duration_seconds_count{service=\"junk."))
        .count();
    assert!(junk_series <= 64, "{junk_series} junk series");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_name_found_empty_and_dropped_is_answered_without_a_look_up_for_a_while() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| a.limits.max_services = 1).await;
    let ch = channel(proxy.addr).await;
    assert_eq!(burst(&ch, junk(0, 1)).await, not_registered(1));
    // The next name takes junk.S0's room; junk.S0 is remembered as having no endpoints
    // (from a moment after `before`).
    let before = Instant::now();
    assert_eq!(burst(&ch, junk(1, 1)).await, not_registered(1));
    let backend = AnyNameBackend::start("S0").await;
    let _r = register(e, "junk.S0", backend.addr, 30).await;
    let answer = call(&ch, "junk.S0").await;
    if before.elapsed() < switchyard::discovery::NEGATIVE_TTL {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::Unimplemented);
        assert!(status.message().contains(NOT_REGISTERED), "{status:?}");
    }
    // Then it is looked up again, and served.
    eventually(
        WAIT,
        "junk.S0 is served once remembered no more",
        || async { call(&ch, "junk.S0").await.is_ok_and(|s| s == "S0") },
    )
    .await;
    assert!(before.elapsed() >= switchyard::discovery::NEGATIVE_TTL);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_service_without_endpoints_is_dropped_and_watched_again_on_its_next_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let x1 = AnyNameBackend::start("x1").await;
    let r1 = register(e, "x.Svc", x1.addr, 30).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[e.to_owned()], &["bound.Svc"], |a| {
        a.admin.listen = AdminListen(Some(admin));
        a.timeouts.service_idle = Duration::from_secs(1);
    })
    .await;
    let ch = channel(proxy.addr).await;
    assert_eq!(call(&ch, "x.Svc").await.unwrap(), "x1");

    // Deregistered and unused: dropped from the table after the idle time.
    delete(e, &r1.key).await;
    drop(r1);
    eventually(WAIT, "x.Svc is dropped", || async {
        !watched(admin).await.iter().any(|s| s == "x.Svc")
    })
    .await;
    assert_eq!(dropped(&metrics(admin).await, "idle"), 1.0);
    // The bound listener's service, as idle and empty, is kept.
    assert_eq!(watched(admin).await, ["bound.Svc"]);

    // Registered again elsewhere: its next call watches it again and goes there.
    let x2 = AnyNameBackend::start("x2").await;
    let _r2 = register(e, "x.Svc", x2.addr, 30).await;
    assert_eq!(call(&ch, "x.Svc").await.unwrap(), "x2");
    let bound = AnyNameBackend::start("bound").await;
    let _rb = register(e, "bound.Svc", bound.addr, 30).await;
    let bound_ch = channel(proxy.bound[0]).await;
    eventually(WAIT, "the bound listener's service is served", || async {
        call(&bound_ch, "any.Name")
            .await
            .is_ok_and(|s| s == "bound")
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_table_of_services_in_use_refuses_and_an_idle_one_makes_room() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let idle = Duration::from_secs(3);
    let (a1, b) = (
        AnyNameBackend::start("a1").await,
        AnyNameBackend::start("b").await,
    );
    let ra = register(e, "a.Svc", a1.addr, 30).await;
    let rb = register(e, "b.Svc", b.addr, 30).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.admin.listen = AdminListen(Some(admin));
        a.limits.max_services = 2;
        a.timeouts.service_idle = idle;
    })
    .await;
    let ch = channel(proxy.addr).await;

    // Both services served and just used: a made-up name finds no room.
    let used_at = Instant::now();
    assert_eq!(call(&ch, "a.Svc").await.unwrap(), "a1");
    assert_eq!(call(&ch, "b.Svc").await.unwrap(), "b");
    let answer = call(&ch, "junk.X").await;
    if used_at.elapsed() < idle {
        let status = answer.unwrap_err();
        assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
        assert_eq!(refused(&metrics(admin).await), 1.0);
    }

    // Unused for the idle time, one makes room for the made-up name.
    eventually(WAIT, "junk.X finds room", || async {
        call(&ch, "junk.X")
            .await
            .is_err_and(|s| s.code() == Code::Unimplemented && s.message().contains(NOT_REGISTERED))
    })
    .await;
    assert!(used_at.elapsed() >= idle);
    assert_eq!(dropped(&metrics(admin).await, "room"), 1.0);
    let services = watched(admin).await;
    let gone = match services.iter().any(|s| s == "a.Svc") {
        true => "b.Svc",
        false => "a.Svc",
    };
    assert_eq!(services.len(), 2, "{services:?}");
    assert!(services.iter().any(|s| s == "junk.X"), "{services:?}");

    // The dropped service moves while unwatched; its next call watches it again and
    // goes to where it is now.
    let moved = AnyNameBackend::start("moved").await;
    let old = if gone == "a.Svc" { ra } else { rb };
    delete(e, &old.key).await;
    drop(old);
    let _moved = register(e, gone, moved.addr, 30).await;
    assert_eq!(call(&ch, gone).await.unwrap(), "moved");
    assert!(watched(admin).await.iter().any(|s| s == gone));
    proxy.shutdown().await;
}

/// The resident memory of process `pid`, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_stays_bounded_over_thousands_of_made_up_names() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let used = AnyNameBackend::start("used").await;
    let _used = register(e, "used.Svc", used.addr, 30).await;
    let proxy = SwitchyardProcess::proxy(&[e.to_owned()], "warn", &["--max-services", "64"]).await;
    let ch = channel(proxy.addr()).await;
    assert_eq!(call(&ch, "used.Svc").await.unwrap(), "used");
    // The first burst fills the table, the remembered names and the allocator's pools.
    assert_eq!(burst(&ch, junk(0, 2000)).await, not_registered(2000));
    let before = rss_kib(proxy.pid());
    assert_eq!(burst(&ch, junk(2000, 4000)).await, not_registered(4000));
    let after = rss_kib(proxy.pid());
    eprintln!("proxy RSS after 2,000 made-up names: {before} KiB; after 4,000 more: {after} KiB");
    assert!(
        after <= before + 4 * 1024,
        "RSS grew from {before} KiB to {after} KiB over 4,000 made-up names"
    );
    assert_eq!(call(&ch, "used.Svc").await.unwrap(), "used");
}
