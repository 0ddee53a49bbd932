//! Balancing policies, weights from the registry and slow start, end to end: real etcd,
//! real gRPC backends (in-process, over loopback sockets) and the proxy.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use switchyard::balance::Policy;

const SVC: &str = "switchyard.echo.v1.Echo";

/// Registers `b` under the Echo service with etcd-naming JSON carrying `weight`.
async fn put_weighted(etcd: &EtcdProcess, b: &EchoBackend, weight: u32) {
    let value = format!(
        r#"{{"Op":0,"Addr":"{}","Metadata":{{"weight":{weight}}}}}"#,
        b.addr()
    );
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/{}", b.addr()),
        &value,
    )
    .await;
}

/// Which backend answered each of `n` sequential calls.
async fn sequence(addr: std::net::SocketAddr, n: usize) -> Vec<String> {
    let mut c = client(addr).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(served_by(&mut c).await.expect("call through the proxy"));
    }
    out
}

/// Waits until every backend in `names` has answered a call through `addr`.
async fn warm(addr: std::net::SocketAddr, names: &[&str]) {
    let mut c = client(addr).await;
    let mut seen = std::collections::BTreeSet::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while names.iter().any(|n| !seen.contains(*n)) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not every backend of {names:?} serves; seen {seen:?}"
        );
        match served_by(&mut c).await {
            Ok(n) => {
                seen.insert(n);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weights_three_to_one_give_three_quarters_of_the_calls_interleaved() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let heavy = EchoBackend::start("heavy").await.unwrap();
    let light = EchoBackend::start("light").await.unwrap();
    put_weighted(&etcd, &heavy, 3).await;
    put_weighted(&etcd, &light, 1).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    warm(proxy.addr, &["heavy", "light"]).await;
    let calls = sequence(proxy.addr, 400).await;
    let heavy_calls = calls.iter().filter(|n| *n == "heavy").count();
    assert!(
        (280..=320).contains(&heavy_calls),
        "3:1 weights: {heavy_calls} of 400 calls on the heavier backend"
    );
    // Smooth: never two light calls in a row, never more than three heavy ones.
    let longest_heavy = calls
        .split(|n| n == "light")
        .map(<[String]>::len)
        .max()
        .unwrap_or(0);
    assert!(longest_heavy <= 3, "a burst of {longest_heavy} heavy calls");
    assert!(
        !calls.windows(2).any(|w| w[0] == "light" && w[1] == "light"),
        "two light calls in a row"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_alternates_exactly_by_default() {
    let (etcd, _backends, _regs) = echo_backends(3).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    warm(proxy.addr, &["b0", "b1", "b2"]).await;
    let calls = sequence(proxy.addr, 30).await;
    for w in calls.windows(4) {
        assert_eq!(w[0], w[3], "period 3: {calls:?}");
        assert!(w[0] != w[1] && w[1] != w[2] && w[0] != w[2], "{calls:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_policies_keep_a_slow_node_under_twelve_percent() {
    let (etcd, backends, _regs) = echo_backends(3).await;
    backends[0].faults().delay_ms.store(100, Ordering::Relaxed);
    for policy in [Policy::LeastRequest, Policy::PeakEwma] {
        let admin = switchyard::testkit::free_addr().unwrap();
        let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |s| {
            s.balance.policy = policy;
            s.admin.listen = switchyard::settings::AdminListen(Some(admin));
        })
        .await;
        warm(proxy.addr, &["b0", "b1", "b2"]).await;
        // 8 callers, 40 calls each.
        let mut callers = Vec::new();
        for _ in 0..8 {
            let addr = proxy.addr;
            callers.push(tokio::spawn(async move { sequence(addr, 40).await }));
        }
        let mut counts: HashMap<String, usize> = HashMap::new();
        for c in callers {
            for name in c.await.unwrap() {
                *counts.entry(name).or_default() += 1;
            }
        }
        let slow = counts.get("b0").copied().unwrap_or(0);
        assert!(
            slow * 100 <= 12 * 320,
            "{policy}: the 100 ms node got {slow} of 320 calls ({counts:?})"
        );
        // Prometheus shows what the policy sees: every endpoint's weight, and under
        // peak-ewma the slow node's latency estimate above the others'.
        let text = admin_get(admin, "/metrics")
            .await
            .expect("admin answers")
            .body;
        let gauge = |name: &str, addr: &str| -> Option<f64> {
            let prefix = format!("{name}{{endpoint=\"{addr}\",service=\"{SVC}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(prefix.as_str())?.parse().ok())
        };
        for b in &backends {
            let w = gauge(
                "switchyard_endpoint_effective_weight",
                &b.addr().to_string(),
            );
            assert_eq!(w, Some(1.0), "weight gauge of {}:\n{text}", b.addr());
        }
        let latency = |i: usize| {
            gauge(
                "switchyard_endpoint_latency_estimate_seconds",
                &backends[i].addr().to_string(),
            )
        };
        if policy == Policy::PeakEwma {
            let (slow, fast) = (latency(0), latency(1));
            assert!(
                matches!((slow, fast), (Some(s), Some(f)) if s > 0.05 && s > f),
                "latency estimates: slow {slow:?}, fast {fast:?}"
            );
        } else {
            assert_eq!(latency(0), None, "no latency tracked under {policy}");
        }
        proxy.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_start_ramps_a_new_endpoint_up_to_its_share() {
    let (etcd, _backends, mut regs) = echo_backends(2).await;
    let window = Duration::from_secs(4);
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |s| {
        s.balance.slow_start = window
    })
    .await;
    warm(proxy.addr, &["b0", "b1"]).await;
    tokio::time::sleep(window).await;
    let newcomer = EchoBackend::start("new").await.unwrap();
    let started = tokio::time::Instant::now();
    regs.push(register(etcd.endpoint(), SVC, newcomer.addr(), 10).await);
    warm(proxy.addr, &["b0", "b1", "new"]).await;
    let early = sequence(proxy.addr, 150).await;
    let early_new = early.iter().filter(|n| *n == "new").count();
    assert!(
        started.elapsed() < window / 2,
        "the early calls took too long to say anything"
    );
    // Within the first half of the window its share is at most ~55 % of its weight's 1/3.
    assert!(
        early_new <= 30,
        "{early_new} of 150 calls in the ramp's first half"
    );
    tokio::time::sleep_until(started + window + Duration::from_millis(200)).await;
    let late = sequence(proxy.addr, 150).await;
    let late_new = late.iter().filter(|n| *n == "new").count();
    assert!(
        (40..=60).contains(&late_new),
        "{late_new} of 150 calls after the window (a third is 50)"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_balancing_and_ejection_values_name_their_flag() {
    for (args, flag) in [
        (&["--balance", "fastest"][..], "--balance"),
        (&["--slow-start", "soon"][..], "--slow-start"),
        (&["--eject-after", "many"][..], "--eject-after"),
        (
            &["--max-ejected-percent", "101"][..],
            "--max-ejected-percent",
        ),
        (&["--failure-codes", "14,99"][..], "--failure-codes"),
        (&["--health-check", "http"][..], "--health-check"),
    ] {
        let mut full = vec!["proxy", "--etcd-endpoints", "http://127.0.0.1:9"];
        full.extend_from_slice(args);
        let mut p = SwitchyardProcess::spawn(&full, &[]);
        let code = p.wait_exit(Duration::from_secs(10)).await;
        assert_eq!(code, Some(2), "{args:?} should be refused");
        // Output is collected as it comes: wait for the line rather than read it at once.
        let line = p.wait_line(Duration::from_secs(10), flag, |l| l.contains(flag));
        if flag == "--balance" {
            assert!(
                ["round-robin", "least-request", "peak-ewma"]
                    .iter()
                    .all(|c| line.contains(c)),
                "the error lists the policies: {line}"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_service_s_first_calls_go_round_robin() {
    // No warm-up: the service's first call starts its watch, whose first snapshot waits
    // for the three connections, so the rotation is exact from call 0 (the demo's case).
    let (etcd, _backends, _regs) = echo_backends(3).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let calls = sequence(proxy.addr, 12).await;
    let first: std::collections::BTreeSet<_> = calls[..3].iter().collect();
    assert_eq!(first.len(), 3, "calls 0, 1, 2 on three backends: {calls:?}");
    for w in calls.windows(4) {
        assert_eq!(w[0], w[3], "period 3: {calls:?}");
    }
}
