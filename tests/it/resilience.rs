//! Resilience: the proxy keeps serving through faults of etcd, of backends and of
//! itself, losing no call that could be saved. Every fault is injected for real
//! (processes killed, listeners that never answer or reset, endpoints churned in etcd).

use std::time::{Duration, Instant};

use crate::common::*;
use crate::faults::*;

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

/// One `demo-backend` process per name, each registered for the Echo service, and a
/// proxy that has already reached all of them.
async fn registered_processes(
    etcd: &EtcdProcess,
    names: &[&str],
) -> (Vec<DemoProcess>, Vec<TestRegistration>, Proxy) {
    let mut procs = Vec::new();
    let mut regs = Vec::new();
    for name in names {
        let p = DemoProcess::start(name).await;
        regs.push(register(etcd.endpoint(), ECHO, p.addr, 30).await);
        procs.push(p);
    }
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], names).await;
    (procs, regs, proxy)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_killed_with_sigkill_fails_only_its_calls_in_flight() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (mut procs, regs, proxy) = registered_processes(&etcd, &["k1", "k2", "k3"]).await;

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
    let kill_sent = Instant::now();
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
    // The kernel closes k2's sockets at the kill; the proxy reads the close a moment
    // later. A call sent on the dead connection in between was in flight on k2 too.
    let noticed = killed_at + Duration::from_millis(100);
    for f in &failed {
        let status = f.result.as_ref().unwrap_err();
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status:?}");
        assert!(
            f.start < noticed && f.end >= kill_sent,
            "failed call was not in flight at the kill: {}",
            describe(&[f], killed_at)
        );
    }
    // At most one call per worker is in flight at a time.
    assert!(failed.len() <= 4, "more calls failed than were in flight");
    let after: Vec<_> = calls.iter().filter(|c| c.start >= noticed).collect();
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

    // Six backends join that accept connections and never say a word of HTTP/2 (more
    // than the attempts one call is allowed).
    let mut holes = Vec::new();
    let mut hole_regs = Vec::new();
    for _ in 0..6 {
        let hole = BlackHole::start().await;
        hole_regs.push(register(etcd.endpoint(), ECHO, hole.addr, 30).await);
        holes.push(hole);
    }
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
    let accepted: Vec<u64> = holes
        .iter()
        .map(|h| h.accepted.load(std::sync::atomic::Ordering::SeqCst))
        .collect();
    assert!(
        accepted.iter().all(|a| *a >= 1),
        "the proxy never connected to a new backend: {accepted:?}"
    );
    assert!(
        accepted.iter().all(|a| *a <= 10),
        "silent backends hammered: {accepted:?}"
    );
    eprintln!(
        "{} calls; the black holes accepted {accepted:?} connections",
        calls.len()
    );
    drop(hole_regs);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backend_that_freezes_costs_calls_their_deadline_then_calls_go_elsewhere() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (procs, _regs, proxy) = registered_processes(&etcd, &["f1", "f2", "f3"]).await;

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
            f.start < frozen_at + deadline + Duration::from_millis(500),
            "a call failed after the freeze was known: {}",
            describe(&[f], frozen_at)
        );
    }
    assert!(failed.len() <= 8, "{} calls failed", failed.len());
    let settled = frozen_at + deadline + Duration::from_millis(500);
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoint_churn_every_100ms_fails_no_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let names = ["c1", "c2", "c3"];
    let mut backends = Vec::new();
    for n in names {
        backends.push(EchoBackend::start(n).await.unwrap());
    }
    let keys: Vec<String> = backends
        .iter()
        .map(|b| format!("services/{ECHO}/{}", b.addr()))
        .collect();
    let mut kv = etcd.client().await.unwrap();
    for (k, b) in keys.iter().zip(&backends) {
        kv.put(k.as_str(), b.addr().to_string(), None)
            .await
            .unwrap();
    }
    let proxy = warm_proxy(&[etcd.endpoint().to_owned()], &names).await;

    let load = Load::start(proxy.addr, LoadSpec::default()).await;
    // Every 100 ms one backend is deregistered or registered again, never leaving the
    // service without a registered (and live) backend.
    let mut registered = [true; 3];
    let mut changes = 0;
    for tick in 0..28 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let i = tick % 3;
        let count = registered.iter().filter(|r| **r).count();
        if registered[i] && count > 1 {
            kv.delete(keys[i].as_str(), None).await.unwrap();
            registered[i] = false;
            changes += 1;
        } else if !registered[i] {
            kv.put(keys[i].as_str(), backends[i].addr().to_string(), None)
                .await
                .unwrap();
            registered[i] = true;
            changes += 1;
        }
    }
    let calls = load.finish().await;
    let failed = failures(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed during churn:\n{}",
        failed.len(),
        calls.len(),
        describe(&failed, calls[0].start)
    );
    let counts = served_counts(&calls);
    eprintln!("{} calls over {changes} changes: {counts:?}", calls.len());
    assert!(changes >= 15);
    assert_eq!(
        counts.len(),
        3,
        "every backend should have served: {counts:?}"
    );
}

/// The number of watchers an etcd member holds (from its `/metrics`).
async fn watchers_on(member: &str) -> u64 {
    let host = member.trim_start_matches("http://");
    let Ok(text) = http_get(host, "/metrics").await else {
        return 0;
    };
    text.lines()
        .find_map(|l| l.strip_prefix("etcd_debugging_mvcc_watcher_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// A 3-member etcd cluster; a start that fails (a port taken by another process on a
/// busy machine between its pick and its use) is tried again.
async fn start_cluster() -> EtcdCluster {
    for attempt in 1..=3 {
        match EtcdCluster::start(3).await {
            Ok(c) => return c,
            Err(e) => eprintln!("etcd cluster did not start (attempt {attempt}): {e}"),
        }
    }
    panic!("etcd cluster did not start in 3 attempts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_member_the_proxy_watches_on_killed_calls_and_discovery_go_on() {
    init_tracing();
    // A member can fail to start when another process on this busy machine took one
    // of its ports between testkit picking it and etcd binding it: try again.
    let mut cluster = start_cluster().await;
    let endpoints = cluster.endpoints();
    let e1 = EchoBackend::start("e1").await.unwrap();
    // A long lease: the test's own keep-alive may be on the member that is killed.
    let r1 = register(&endpoints[0], ECHO, e1.addr(), 60).await;
    let proxy = warm_proxy(&endpoints, &["e1"]).await;

    // Which member carries the proxy's watch? (The test itself watches nothing.)
    let mut watched = None;
    let deadline = Instant::now() + Duration::from_secs(10);
    while watched.is_none() {
        for (i, m) in endpoints.iter().enumerate() {
            if watchers_on(m).await > 0 {
                watched = Some(i);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no member holds the proxy's watch"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let victim = watched.unwrap();
    let survivor = endpoints[(victim + 1) % 3].clone();

    let load = Load::start(
        proxy.addr,
        LoadSpec {
            max_duration: Duration::from_secs(20),
            delay_ms: 5,
            ..LoadSpec::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    cluster.members[victim].kill();
    let killed_at = Instant::now();

    // A backend registered after the kill is still discovered ...
    let e2 = EchoBackend::start("e2").await.unwrap();
    put_retrying(
        &survivor,
        &format!("services/{ECHO}/{}", e2.addr()),
        &e2.addr().to_string(),
    )
    .await;
    let mut c = client(proxy.addr).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let name = served_by(&mut c)
            .await
            .expect("a call failed after the etcd member died");
        if name == "e2" {
            eprintln!("new key seen {:?} after the kill", killed_at.elapsed());
            break;
        }
        assert!(
            Instant::now() < deadline,
            "new backend not discovered after the member died"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // ... and so is a deregistration.
    delete_retrying(&survivor, &r1.key).await;
    let mut in_a_row = 0;
    let deadline = Instant::now() + Duration::from_secs(20);
    while in_a_row < 10 {
        let name = served_by(&mut c)
            .await
            .expect("a call failed after the etcd member died");
        in_a_row = if name == "e2" { in_a_row + 1 } else { 0 };
        assert!(
            Instant::now() < deadline,
            "deregistration not seen after the member died"
        );
    }
    let calls = load.finish().await;
    let failed = failures(&calls);
    assert!(
        failed.is_empty(),
        "{} of {} calls failed:\n{}",
        failed.len(),
        calls.len(),
        describe(&failed, calls[0].start)
    );
    // The watch now lives on a surviving member.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let mut moved = false;
        for (i, m) in endpoints.iter().enumerate() {
            moved |= i != victim && watchers_on(m).await > 0;
        }
        if moved {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no surviving member holds the proxy's watch"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "watch on a survivor {:?} after the kill",
        killed_at.elapsed()
    );
    eprintln!("{} calls; watch moved off member {victim}", calls.len());
    drop(r1);
}

/// Starts one call of `delay_ms` on its own raw HTTP/2 connection to `addr`; the task
/// returns the reply (or the stream's error).
fn long_call(
    addr: std::net::SocketAddr,
    delay_ms: u32,
) -> tokio::task::JoinHandle<Result<H2Reply, h2::Error>> {
    tokio::spawn(async move {
        let send = h2_connect(addr).await;
        let msg = grpc_message(&switchyard::echo::EchoRequest {
            message: "long".into(),
            delay_ms,
            ..Default::default()
        });
        h2_request(
            &send,
            UNARY,
            &[("content-type", "application/grpc"), ("te", "trailers")],
            msg,
        )
        .await
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_accepting_sends_goaway_drains_calls_and_exits_0() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("b").await.unwrap();
    let _r = register(etcd.endpoint(), ECHO, b.addr(), 30).await;
    let mut proxy = SwitchyardProcess::proxy(&[etcd.endpoint().to_owned()], "info", &[]).await;

    // An idle client connection, and a call that will take 1.5 s, both open at SIGTERM.
    let mut idle = RawH2::connect(proxy.addr()).await;
    let call = long_call(proxy.addr(), 1500);
    eventually(
        Duration::from_secs(10),
        "the long call reached the backend",
        || async { b.stats().calls() >= 1 },
    )
    .await;
    signal(proxy.pid(), "TERM");
    let term_at = Instant::now();

    // GOAWAY (NO_ERROR) to the idle client, then its connection is closed.
    let goaway = idle
        .until(Duration::from_secs(5), |f| f.kind == frame_type::GOAWAY)
        .await
        .expect("connection closed without GOAWAY");
    assert_eq!(goaway.error_code(), Some(0), "GOAWAY error code");
    assert!(idle
        .until(Duration::from_secs(5), |_| false)
        .await
        .is_none());
    // No new connections.
    eventually(Duration::from_secs(5), "the listener is closed", || async {
        tokio::net::TcpStream::connect(proxy.addr()).await.is_err()
    })
    .await;
    // The call in flight finishes normally ...
    let reply = call.await.unwrap().expect("the in-flight call failed");
    assert_eq!(reply.status, 200);
    assert_eq!(reply.grpc_status().as_deref(), Some("0"), "{reply:?}");
    let call_done = Instant::now();
    // ... and then the proxy exits 0.
    let code = proxy.wait_exit(Duration::from_secs(8)).await;
    let exited = Instant::now();
    assert_eq!(code, Some(0), "exit code; output:\n{}", proxy.log_text());
    assert!(exited >= call_done);
    assert!(exited - term_at < Duration::from_secs(8));
    assert_eq!(b.stats().cancelled(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_drain_timeout_bounds_how_long_calls_may_run() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("b").await.unwrap();
    let _r = register(etcd.endpoint(), ECHO, b.addr(), 30).await;
    let mut proxy = SwitchyardProcess::proxy(
        &[etcd.endpoint().to_owned()],
        "info",
        &["--drain-timeout", "1s"],
    )
    .await;
    let call = long_call(proxy.addr(), 30_000);
    eventually(
        Duration::from_secs(10),
        "the long call reached the backend",
        || async { b.stats().calls() >= 1 },
    )
    .await;
    signal(proxy.pid(), "TERM");
    let term_at = Instant::now();
    let code = proxy.wait_exit(Duration::from_secs(10)).await;
    let took = term_at.elapsed();
    assert_eq!(code, Some(0), "exit code; output:\n{}", proxy.log_text());
    assert!(
        took >= Duration::from_millis(900),
        "exited before the drain timeout: {took:?}"
    );
    assert!(
        took < Duration::from_secs(6),
        "drain timeout not enforced: {took:?}"
    );
    assert!(
        proxy.logged(&["drain timeout reached"]),
        "{}",
        proxy.log_text()
    );
    // The call that outlived the drain did not succeed.
    let r = tokio::time::timeout(Duration::from_secs(5), call)
        .await
        .unwrap()
        .unwrap();
    assert!(
        r.as_ref()
            .map_or(true, |reply| reply.grpc_status().as_deref() != Some("0")),
        "{r:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registrar_keeps_its_key_while_etcd_members_die_one_at_a_time() {
    use switchyard::registration::{Registration, RegistrationSpec};
    init_tracing();
    let mut cluster = start_cluster().await;
    let endpoints = cluster.endpoints();
    let mut args = switchyard::settings::EtcdSettings::local(endpoints[0].clone());
    args.endpoints = endpoints.clone();
    let client = switchyard::etcd::connect(&args).await.unwrap();
    let reg = Registration::start(
        client,
        RegistrationSpec::new("reg.Cluster", "127.0.0.1:4242").ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();

    // Each member in turn (one of them carries the keep-alive stream) is killed for
    // longer than the TTL, then brought back; the key must never be seen missing.
    for victim in 0..3 {
        cluster.members[victim].kill();
        let survivor = &endpoints[(victim + 1) % 3];
        let until = Instant::now() + Duration::from_secs(5);
        let mut seen_present = 0;
        while Instant::now() < until {
            let read = async {
                let mut c = etcd_client::Client::connect([survivor.as_str()], None).await?;
                c.get(key.as_str(), None).await
            };
            // Reads can fail while a new leader is elected; only answers count.
            if let Ok(Ok(resp)) = tokio::time::timeout(Duration::from_secs(2), read).await {
                assert_eq!(
                    resp.kvs().len(),
                    1,
                    "key {key} missing while member {victim} was down"
                );
                seen_present += 1;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        assert!(
            seen_present > 0,
            "no read answered while member {victim} was down"
        );
        cluster.members[victim].restart().await.unwrap();
    }
    reg.deregister().await.unwrap();
    let mut c = etcd_client::Client::connect([endpoints[0].as_str()], None)
        .await
        .unwrap();
    assert!(c.get(key.as_str(), None).await.unwrap().kvs().is_empty());
}
