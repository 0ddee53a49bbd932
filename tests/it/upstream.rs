//! Backend connections: one pool per backend address shared by every service, more
//! connections when a backend limits its streams, and idle connections closed and
//! reopened by the next call.

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
