//! Resilience: the proxy keeps serving through faults of etcd, of backends and of
//! itself, losing no call that could be saved. Every fault is injected for real
//! (processes killed, listeners that never answer or reset, endpoints churned in etcd).

mod common;
mod faults;

use std::time::{Duration, Instant};

use common::*;
use faults::*;

/// A proxy against `etcd` whose calls for the Echo service have warmed up on every
/// backend named in `names` (each served at least one call).
async fn warm_proxy(etcd: &[String], names: &[&str]) -> Proxy {
    let proxy = Proxy::start(etcd).await;
    let mut c = client(proxy.addr).await;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(15);
    while !names.iter().all(|n| seen.contains(*n)) {
        assert!(
            Instant::now() < deadline,
            "not every backend of {names:?} serves; seen {seen:?}"
        );
        match served_by(&mut c).await {
            Ok(name) => {
                seen.insert(name);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_with_sigkill_fails_only_its_calls_in_flight() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let mut procs = Vec::new();
    let mut regs = Vec::new();
    for name in ["k1", "k2", "k3"] {
        let p = DemoProcess::start(name).await;
        regs.push(register(etcd.endpoint(), ECHO, p.addr, 30).await);
        procs.push(p);
    }
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], &["k1", "k2", "k3"]).await;

    let load = Load::start(
        proxy.addr,
        LoadSpec {
            delay_ms: 40,
            ..LoadSpec::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // k2 dies at once; it stays registered (its lease is kept alive by the test).
    procs[1].kill9();
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1800)).await;
    let calls = load.finish().await;

    let failed = failures(&calls);
    eprintln!(
        "{} calls, {} failed:\n{}",
        calls.len(),
        failed.len(),
        describe(&failed, killed_at)
    );
    assert!(calls
        .iter()
        .any(|c| c.start < killed_at && c.server() == Some("k2")));
    for f in &failed {
        let status = f.result.as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            f.start < killed_at && f.end >= killed_at,
            "failed call was not in flight at the kill: {}",
            describe(&[f], killed_at)
        );
    }
    assert!(failed.len() <= 4, "more calls failed than were in flight");
    let after: Vec<_> = calls.iter().filter(|c| c.start >= killed_at).collect();
    assert!(
        after.len() >= 20,
        "too few calls after the kill: {}",
        after.len()
    );
    assert!(after.iter().all(|c| c.result.is_ok()));
    assert!(after.iter().all(|c| c.server() != Some("k2")));
    drop(regs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_shutting_down_gracefully_fails_no_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let mut backends = Vec::new();
    let mut regs = Vec::new();
    for name in ["g1", "g2", "g3"] {
        let b = EchoBackend::start(name).await.unwrap();
        regs.push(Some(register(etcd.endpoint(), ECHO, b.addr(), 30).await));
        backends.push(Some(b));
    }
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], &["g1", "g2", "g3"]).await;

    let load = Load::start(
        proxy.addr,
        LoadSpec {
            delay_ms: 40,
            ..LoadSpec::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(800)).await;
    // g2 stops the way a well-behaved server does: GOAWAY, in-flight calls finish, the
    // listener closes; only then is it deregistered.
    let g2 = backends[1].take().unwrap();
    let stopping_at = Instant::now();
    g2.shutdown().await;
    let reg = regs[1].take().unwrap();
    delete(etcd.endpoint(), &reg.key).await;
    drop(reg);
    let deregistered_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let calls = load.finish().await;

    let failed = failures(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed:\n{}",
        failed.len(),
        calls.len(),
        describe(&failed, stopping_at)
    );
    assert!(calls
        .iter()
        .any(|c| c.start < stopping_at && c.server() == Some("g2")));
    let after: Vec<_> = calls
        .iter()
        .filter(|c| c.start >= deregistered_at)
        .collect();
    assert!(
        after.len() >= 20,
        "too few calls after the shutdown: {}",
        after.len()
    );
    assert!(after.iter().all(|c| c.server() != Some("g2")));
    let slowest = calls.iter().map(|c| c.took()).max().unwrap();
    eprintln!("{} calls, slowest took {slowest:?}", calls.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_accepts_tcp_but_never_answers_http2_gets_no_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let good1 = EchoBackend::start("good1").await.unwrap();
    let good2 = EchoBackend::start("good2").await.unwrap();
    let _r1 = register(etcd.endpoint(), ECHO, good1.addr(), 30).await;
    let _r2 = register(etcd.endpoint(), ECHO, good2.addr(), 30).await;
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], &["good1", "good2"]).await;

    // A backend joins that accepts connections and never says a word of HTTP/2.
    let hole = BlackHole::start().await;
    let _r3 = register(etcd.endpoint(), ECHO, hole.addr, 30).await;
    let deadline = Duration::from_millis(500);
    let load = Load::start(
        proxy.addr,
        LoadSpec {
            deadline,
            ..LoadSpec::default()
        },
    )
    .await;
    let calls = load.finish_after(Duration::from_millis(2500)).await;
    let failed = failures(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed:\n{}",
        failed.len(),
        calls.len(),
        describe(&failed, calls[0].start)
    );
    assert!(calls.len() >= 50, "too few calls: {}", calls.len());
    let accepted = hole.accepted.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        accepted >= 1,
        "the proxy never connected to the new backend"
    );
    assert!(
        accepted <= 10,
        "the silent backend was hammered: {accepted} connections"
    );
    eprintln!(
        "{} calls; the black hole accepted {accepted} connections",
        calls.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_freezes_costs_calls_their_deadline_then_calls_go_elsewhere() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let mut procs = Vec::new();
    let mut regs = Vec::new();
    for name in ["f1", "f2", "f3"] {
        let p = DemoProcess::start(name).await;
        regs.push(register(etcd.endpoint(), ECHO, p.addr, 30).await);
        procs.push(p);
    }
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], &["f1", "f2", "f3"]).await;

    let deadline = Duration::from_millis(500);
    let load = Load::start(
        proxy.addr,
        LoadSpec {
            deadline,
            delay_ms: 20,
            ..LoadSpec::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    // f2 freezes: its sockets stay open and the kernel still accepts connections, but
    // nothing answers HTTP/2 any more.
    signal(procs[1].pid(), "STOP");
    let frozen_at = Instant::now();
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let calls = load.finish().await;

    let failed = failures(&calls);
    eprintln!(
        "{} calls, {} failed:\n{}",
        calls.len(),
        failed.len(),
        describe(&failed, frozen_at)
    );
    assert!(!failed.is_empty(), "no call was caught by the freeze");
    for f in &failed {
        let status = f.result.as_ref().unwrap_err();
        // The client's own timer or the proxy's DEADLINE_EXCEEDED, whichever is first.
        assert!(
            matches!(
                status.code(),
                tonic::Code::DeadlineExceeded | tonic::Code::Cancelled
            ),
            "{status:?}"
        );
        assert!(
            f.took() >= deadline - Duration::from_millis(50)
                && f.took() < deadline + Duration::from_millis(500),
            "failed call did not end at its deadline: {}",
            describe(&[f], frozen_at)
        );
        // Only calls sent before the first one timed out (and the proxy found out).
        assert!(
            f.start < frozen_at + deadline + Duration::from_millis(200),
            "a call failed after the freeze was known: {}",
            describe(&[f], frozen_at)
        );
    }
    assert!(failed.len() <= 8, "{} calls failed", failed.len());
    let settled = frozen_at + deadline + Duration::from_millis(200);
    let after: Vec<_> = calls.iter().filter(|c| c.start >= settled).collect();
    assert!(
        after.len() >= 20,
        "too few calls after the freeze: {}",
        after.len()
    );
    assert!(after
        .iter()
        .all(|c| c.result.is_ok() && c.server() != Some("f2")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_backends_refusing_connections_fail_no_call_and_are_not_hammered() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("r1").await.unwrap();
    let b2 = EchoBackend::start("r2").await.unwrap();
    // A registered address where nothing listens (connection refused) ...
    let closed = free_addr().unwrap();
    // ... and one that accepts and resets at once, counting the attempts.
    let refuser = Refuser::start().await;
    let _regs = [
        register(etcd.endpoint(), ECHO, b1.addr(), 30).await,
        register(etcd.endpoint(), ECHO, b2.addr(), 30).await,
        register(etcd.endpoint(), ECHO, closed, 30).await,
        register(etcd.endpoint(), ECHO, refuser.addr, 30).await,
    ];
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;

    let load = Load::start(proxy.addr, LoadSpec::default()).await;
    let calls = load.finish_after(Duration::from_secs(3)).await;
    let elapsed = calls.last().unwrap().end - calls[0].start;
    let failed = failures(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed:\n{}",
        failed.len(),
        calls.len(),
        describe(&failed, calls[0].start)
    );
    assert!(calls.len() >= 100, "too few calls: {}", calls.len());
    let counts = served_counts(&calls);
    assert_eq!(
        counts.keys().collect::<Vec<_>>(),
        ["r1", "r2"],
        "{counts:?}"
    );
    // Reconnects back off exponentially (from 100 ms): a handful of attempts in ~3 s,
    // not one per call.
    let attempts = refuser.attempts.load(std::sync::atomic::Ordering::SeqCst);
    eprintln!(
        "{} calls in {elapsed:?}; refuser saw {attempts} connection attempts",
        calls.len()
    );
    assert!(attempts >= 1, "the refusing backend was never tried");
    assert!(
        attempts <= 10,
        "refusing backend hammered: {attempts} attempts in {elapsed:?}"
    );
}
