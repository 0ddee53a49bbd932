//! The admin listener: `/metrics`, `/endpoints`, `/healthz`, `/readyz`, against a real
//! etcd, real backends and calls through the proxy.
use crate::common::*;

use std::net::SocketAddr;
use std::time::Duration;

use switchyard::echo::EchoRequest;
use switchyard::settings::AdminListen;

const SVC: &str = "switchyard.echo.v1.Echo";
const WAIT: Duration = Duration::from_secs(20);

async fn start_proxy(etcd: &[String]) -> (Proxy, SocketAddr) {
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(etcd, &[], |a| a.admin.listen = AdminListen(Some(admin))).await;
    (proxy, admin)
}

async fn get(admin: SocketAddr, path: &str) -> AdminReply {
    admin_get(admin, path)
        .await
        .unwrap_or_else(|| panic!("admin {path} did not answer"))
}

async fn metrics(admin: SocketAddr) -> String {
    let r = get(admin, "/metrics").await;
    assert_eq!(r.status, 200);
    r.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_reports_calls_latency_inflight_endpoints_and_etcd_state() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let b2 = EchoBackend::start("b2").await.unwrap();
    let _r1 = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let _r2 = register(etcd.endpoint(), SVC, b2.addr(), 5).await;
    let (proxy, admin) = start_proxy(&[etcd.endpoint().to_owned()]).await;

    // Alive; ready once etcd answered and the listeners are bound.
    eventually(WAIT, "/healthz answers", || async {
        admin_get(admin, "/healthz").await.is_some()
    })
    .await;
    let health = get(admin, "/healthz").await;
    assert_eq!((health.status, health.body.trim()), (200, "ok"));
    eventually(WAIT, "/readyz answers 200", || async {
        admin_get(admin, "/readyz")
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;

    let mut c = client(proxy.addr).await;
    for _ in 0..10 {
        served_by(&mut c).await.unwrap();
    }
    let failing = EchoRequest {
        fail_code: 5,
        ..req("fail")
    };
    assert_eq!(
        c.unary(failing).await.unwrap_err().code(),
        tonic::Code::NotFound
    );

    // A slow call stays in flight while we look.
    let mut slow_client = c.clone();
    let slow = tokio::spawn(async move {
        slow_client
            .unary(EchoRequest {
                delay_ms: 3_000,
                ..req("slow")
            })
            .await
    });
    eventually(WAIT, "one call in flight", || async {
        metric(
            &metrics(admin).await,
            "switchyard_inflight_streams",
            &[("service", SVC)],
        ) == Some(1.0)
    })
    .await;
    let eps: serde_json::Value =
        serde_json::from_str(&get(admin, "/endpoints").await.body).unwrap();
    let svc = eps
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["service"] == SVC)
        .expect("service listed in /endpoints");
    assert_eq!(svc["etcd_watch_up"], true);
    let listed = svc["endpoints"].as_array().unwrap();
    assert_eq!(listed.len(), 2, "{svc}");
    assert!(listed.iter().all(|e| e["state"] == "ready"), "{svc}");
    let inflight: i64 = listed.iter().map(|e| e["inflight"].as_i64().unwrap()).sum();
    assert_eq!(inflight, 1, "{svc}");
    let mut addrs: Vec<&str> = listed
        .iter()
        .map(|e| e["address"].as_str().unwrap())
        .collect();
    addrs.sort();
    let mut want = vec![b1.addr().to_string(), b2.addr().to_string()];
    want.sort();
    assert_eq!(addrs, want);
    slow.await.unwrap().unwrap();

    // A call is counted when the proxy has finished its response, which may be just
    // after the client saw the end of it.
    eventually(WAIT, "all 12 calls counted", || async {
        let text = get(admin, "/metrics").await.body;
        metric(
            &text,
            "switchyard_call_duration_seconds_count",
            &[("service", SVC)],
        ) == Some(12.0)
            && metric(&text, "switchyard_inflight_streams", &[("service", SVC)]) == Some(0.0)
    })
    .await;
    let r = get(admin, "/metrics").await;
    assert!(
        r.content_type.starts_with("text/plain; version=0.0.4"),
        "{}",
        r.content_type
    );
    let text = r.body;
    let ok_calls: f64 = [b1.addr(), b2.addr()]
        .iter()
        .map(|a| {
            metric(
                &text,
                "switchyard_calls_total",
                &[
                    ("service", SVC),
                    ("endpoint", &a.to_string()),
                    ("grpc_status", "0"),
                ],
            )
            .unwrap_or(0.0)
        })
        .sum();
    assert_eq!(ok_calls, 11.0, "{text}");
    let failed: f64 = [b1.addr(), b2.addr()]
        .iter()
        .filter_map(|a| {
            metric(
                &text,
                "switchyard_calls_total",
                &[("endpoint", &a.to_string()), ("grpc_status", "5")],
            )
        })
        .sum();
    assert_eq!(failed, 1.0, "{text}");
    assert_eq!(
        metric(
            &text,
            "switchyard_call_duration_seconds_count",
            &[("service", SVC)]
        ),
        Some(12.0)
    );
    // The slow call lands in a bucket of at least 2.5 s, the others do not.
    assert_eq!(
        metric(
            &text,
            "switchyard_call_duration_seconds_bucket",
            &[("service", SVC), ("le", "2.5")]
        ),
        Some(11.0),
        "{text}"
    );
    assert_eq!(
        metric(&text, "switchyard_inflight_streams", &[("service", SVC)]),
        Some(0.0)
    );
    assert_eq!(
        metric(
            &text,
            "switchyard_endpoints",
            &[("service", SVC), ("state", "ready")]
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &text,
            "switchyard_endpoints",
            &[("service", SVC), ("state", "failed")]
        ),
        Some(0.0)
    );
    assert_eq!(metric(&text, "switchyard_etcd_up", &[]), Some(1.0));
    assert_eq!(
        metric(&text, "switchyard_etcd_watch_up", &[("service", SVC)]),
        Some(1.0)
    );

    // Unknown paths and methods get clear answers.
    assert_eq!(get(admin, "/nope").await.status, 404);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_etcd_state_follow_etcd() {
    init_tracing();
    let mut etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    // A key without lease: it survives etcd restarts.
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/{}", b1.addr()),
        &b1.addr().to_string(),
    )
    .await;
    etcd.kill();

    // etcd never reached: alive, not ready.
    let (proxy, admin) = start_proxy(&[etcd.endpoint().to_owned()]).await;
    eventually(WAIT, "/healthz answers", || async {
        admin_get(admin, "/healthz")
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    let r = get(admin, "/readyz").await;
    assert_eq!(r.status, 503);
    assert!(r.body.contains("etcd"), "{}", r.body);
    assert_eq!(
        metric(&metrics(admin).await, "switchyard_etcd_up", &[]),
        Some(0.0)
    );

    // etcd comes: ready, and calls are served.
    etcd.restart().await.unwrap();
    eventually(WAIT, "/readyz answers 200 once etcd is up", || async {
        admin_get(admin, "/readyz")
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    let mut c = client(proxy.addr).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "b1");
    eventually(WAIT, "etcd and watch up", || async {
        let m = metrics(admin).await;
        metric(&m, "switchyard_etcd_up", &[]) == Some(1.0)
            && metric(&m, "switchyard_etcd_watch_up", &[("service", SVC)]) == Some(1.0)
    })
    .await;

    // etcd goes: the metrics say so, readiness stays (last known endpoints keep serving).
    etcd.kill();
    eventually(WAIT, "etcd and watch down", || async {
        let m = metrics(admin).await;
        metric(&m, "switchyard_etcd_up", &[]) == Some(0.0)
            && metric(&m, "switchyard_etcd_watch_up", &[("service", SVC)]) == Some(0.0)
    })
    .await;
    assert_eq!(get(admin, "/readyz").await.status, 200);
    assert_eq!(served_by(&mut c).await.unwrap(), "b1");

    etcd.restart().await.unwrap();
    eventually(WAIT, "etcd and watch up again", || async {
        let m = metrics(admin).await;
        metric(&m, "switchyard_etcd_up", &[]) == Some(1.0)
            && metric(&m, "switchyard_etcd_watch_up", &[("service", SVC)]) == Some(1.0)
    })
    .await;
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_have_a_line_per_endpoint_added_and_per_call_at_debug() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let listen = switchyard::testkit::free_addr().unwrap();
    let p = SwitchyardProcess::spawn(
        &[
            "proxy",
            "--listen",
            &listen.to_string(),
            "--admin-listen",
            "off",
            "--etcd-endpoints",
            etcd.endpoint(),
            "--log-format",
            "json",
        ],
        &[("RUST_LOG", "info,switchyard::call=debug")],
    );
    let json = |line: &str| serde_json::from_str::<serde_json::Value>(line).ok();
    p.wait_line(WAIT, "listening", |l| {
        json(l).is_some_and(|j| j["message"] == "listening")
    });
    let _r = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let c = client(listen).await;
    eventually(WAIT, "a call through the proxy process", || {
        let mut c = c.clone();
        async move { served_by(&mut c).await.is_ok() }
    })
    .await;
    let backend = b1.addr().to_string();
    let added = p.wait_line(WAIT, "endpoint added", |l| {
        json(l).is_some_and(|j| j["message"] == "endpoint added")
    });
    let added = json(&added).unwrap();
    assert_eq!(added["service"], SVC, "{added}");
    assert_eq!(added["backend"], backend.as_str(), "{added}");
    let call = p.wait_line(WAIT, "a per-call line", |l| {
        json(l).is_some_and(|j| j["target"] == "switchyard::call")
    });
    let call = json(&call).unwrap();
    assert_eq!(call["level"], "DEBUG", "{call}");
    assert_eq!(call["service"], SVC, "{call}");
    assert_eq!(call["endpoint"], backend.as_str(), "{call}");
    assert_eq!(call["grpc_status"], "0", "{call}");
    assert!(call["elapsed_us"].is_u64(), "{call}");
}
