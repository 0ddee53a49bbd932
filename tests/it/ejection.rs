//! Outlier ejection, active health checks and truthful call accounting, end to end: real
//! etcd, real gRPC backends (in-process, over loopback sockets) and the proxy.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use switchyard::echo::EchoRequest;
use switchyard::health::ActiveCheck;
use switchyard::settings::{AdminListen, ProxySettings};
use tonic::Code;

/// A proxy with an admin listener, settings adjusted by `tweak`.
async fn proxy(etcd: &EtcdProcess, tweak: impl FnOnce(&mut ProxySettings)) -> (Proxy, SocketAddr) {
    let admin = switchyard::testkit::free_addr().unwrap();
    let p = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |s| {
        s.admin.listen = AdminListen(Some(admin));
        tweak(s);
    })
    .await;
    (p, admin)
}

/// `n` sequential calls: who answered each (or the status of a failed call).
async fn calls(addr: SocketAddr, n: usize) -> Vec<Result<String, tonic::Status>> {
    let mut c = client(addr).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(served_by(&mut c).await);
    }
    out
}

fn tally(results: &[Result<String, tonic::Status>]) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for r in results {
        let k = match r {
            Ok(n) => n.clone(),
            Err(s) => format!("{:?}", s.code()),
        };
        *m.entry(k).or_default() += 1;
    }
    m
}

/// The sum of `switchyard_endpoint_ejections_total` over every endpoint.
async fn ejections(admin: SocketAddr) -> f64 {
    let text = admin_get(admin, "/metrics")
        .await
        .expect("admin answers")
        .body;
    text.lines()
        .filter(|l| l.starts_with("switchyard_endpoint_ejections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_failing_every_call_is_ejected_and_returns_when_healed() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(14, Ordering::Relaxed);
    let (p, admin) = proxy(&etcd, |s| s.ejection.duration = Duration::from_secs(2)).await;
    let results = calls(p.addr, 600).await;
    let failed = results.iter().filter(|r| r.is_err()).count();
    assert!(
        failed <= 15,
        "{failed} of 600 calls failed: {:?}",
        tally(&results)
    );
    assert!(ejections(admin).await >= 1.0);
    let eps = admin_get(admin, "/endpoints").await.unwrap().body;
    assert!(
        eps.contains("ejected"),
        "/endpoints shows the ejection: {eps}"
    );
    // Healed: back in rotation within its ejection time + 1 s.
    bs[0].faults().fail_code.store(0, Ordering::Relaxed);
    let healed = tokio::time::Instant::now();
    let mut c = client(p.addr).await;
    loop {
        if served_by(&mut c).await.ok().as_deref() == Some("b0") {
            break;
        }
        assert!(
            healed.elapsed() < Duration::from_secs(2 * 2 + 1),
            "b0 not back in rotation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_node_fails_calls_still_reach_nodes_and_carry_their_status() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    for b in &bs {
        b.faults().fail_code.store(14, Ordering::Relaxed);
    }
    let (p, _admin) = proxy(&etcd, |_| {}).await;
    for r in calls(p.addr, 60).await {
        let status = r.expect_err("every node fails");
        assert_eq!(status.code(), Code::Unavailable);
        assert!(
            status.message().contains("fault injected"),
            "the node's own status, not the proxy's: {status:?}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn application_errors_and_cancelled_calls_eject_nobody() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(5, Ordering::Relaxed); // NOT_FOUND
    let (p, admin) = proxy(&etcd, |_| {}).await;
    let t = tally(&calls(p.addr, 90).await);
    // About a third (the first calls may land before every connection is up); an
    // ejected b0 would get 5.
    let not_found = t.get("NotFound").copied().unwrap_or(0);
    assert!((25..=35).contains(&not_found), "{t:?}");
    // Calls cancelled by their deadline while b1 is still working.
    bs[0].faults().fail_code.store(0, Ordering::Relaxed);
    bs[1].faults().delay_ms.store(300, Ordering::Relaxed);
    let mut c = client(p.addr).await;
    for _ in 0..30 {
        let mut r = tonic::Request::new(req("x"));
        r.set_timeout(Duration::from_millis(30));
        let _ = c.unary(r).await;
    }
    bs[1].faults().delay_ms.store(0, Ordering::Relaxed);
    let t = tally(&calls(p.addr, 30).await);
    let b1 = t.get("b1").copied().unwrap_or(0);
    assert!((8..=12).contains(&b1), "b1 still in rotation: {t:?}");
    assert_eq!(ejections(admin).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cap_keeps_failing_nodes_in_rotation_beyond_its_share() {
    let (etcd, bs, _regs) = echo_backends(4).await;
    for b in &bs[..3] {
        b.faults().fail_code.store(14, Ordering::Relaxed);
    }
    let (p, admin) = proxy(&etcd, |_| {}).await;
    let _ = calls(p.addr, 200).await;
    // 50 % of 4: two ejected, the third failing node still gets calls.
    assert_eq!(ejections(admin).await, 2.0);
    let t = tally(&calls(p.addr, 40).await);
    assert_eq!(t.get("b3"), Some(&20), "{t:?}");
    assert_eq!(t.get("Unavailable"), Some(&20), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_follow_a_node_flipped_to_not_serving_and_back() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    let (p, _admin) = proxy(&etcd, |s| {
        s.health_check.kind = ActiveCheck::Grpc;
        s.health_check.interval = Duration::from_secs(2);
    })
    .await;
    // Every node in rotation once its check has answered.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let t = tally(&calls(p.addr, 30).await);
        if t.get("b0") == Some(&10) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b0 not in rotation: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bs[0].set_echo_serving(false).await;
    let flipped = tokio::time::Instant::now();
    // Within 1 s of the flip (Watch), b0 gets no more calls.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let t = tally(&calls(p.addr, 30).await);
    assert_eq!(
        t.get("b0"),
        None,
        "b0 still called {:?} after the flip",
        flipped.elapsed()
    );
    bs[0].set_echo_serving(true).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let t = tally(&calls(p.addr, 30).await);
        if t.get("b0") == Some(&10) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "b0 not back after SERVING: {t:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_checks_take_out_a_node_that_accepts_no_connection_before_any_call() {
    let (etcd, _bs, _regs) = echo_backends(2).await;
    // Registered, but nothing listens there.
    let dead = switchyard::testkit::free_addr().unwrap();
    let _dead_reg = register(etcd.endpoint(), "switchyard.echo.v1.Echo", dead, 10).await;
    let (p, admin) = proxy(&etcd, |s| {
        s.health_check.kind = ActiveCheck::Tcp;
        s.health_check.interval = Duration::from_millis(500);
    })
    .await;
    // One call starts the service's watch (and its checks).
    let first = calls(p.addr, 1).await;
    assert!(first[0].is_ok(), "{first:?}");
    let dead_text = dead.to_string();
    eventually(
        Duration::from_secs(10),
        "the dead node shown unhealthy",
        || {
            let dead_text = dead_text.clone();
            async move {
                let Some(eps) = admin_get(admin, "/endpoints").await else {
                    return false;
                };
                let json: serde_json::Value = serde_json::from_str(&eps.body).unwrap_or_default();
                json[0]["endpoints"].as_array().is_some_and(|eps| {
                    eps.iter()
                        .any(|e| e["address"] == dead_text.as_str() && e["state"] == "unhealthy")
                })
            }
        },
    )
    .await;
    let t = tally(&calls(p.addr, 40).await);
    assert_eq!(t.get("b0"), Some(&20), "{t:?}");
    assert_eq!(t.get("b1"), Some(&20), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_cancelling_a_stream_is_counted_cancelled_not_unavailable() {
    let (etcd, bs, _regs) = echo_backends(1).await;
    let _ = &bs;
    let (p, admin) = proxy(&etcd, |_| {}).await;
    let mut c = client(p.addr).await;
    for _ in 0..5 {
        let mut stream = c
            .server_stream(EchoRequest {
                message: "s".into(),
                count: 50,
                delay_ms: 20,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Read what it needs, then go away.
        assert!(stream.next().await.is_some());
        drop(stream);
    }
    let metrics = eventually_metrics(admin, r#"grpc_status="1""#).await;
    assert!(
        !metrics
            .lines()
            .any(|l| l.starts_with("switchyard_calls_total{") && l.contains(r#"grpc_status="14""#)),
        "a cancelled call counted UNAVAILABLE: {metrics}"
    );
    assert_eq!(ejections(admin).await, 0.0);
}

/// The metrics text once a `switchyard_calls_total` line contains `needle`.
async fn eventually_metrics(admin: SocketAddr, needle: &str) -> String {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let text = admin_get(admin, "/metrics").await.expect("admin").body;
        if text
            .lines()
            .any(|l| l.starts_with("switchyard_calls_total{") && l.contains(needle))
        {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no call counted {needle}: {text}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
