//! gRPC service config in the proxy (gRFC A6), end to end: real etcd, real Echo backends
//! over loopback, the proxy in-process; policies from files and from etcd.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::common::*;
use switchyard::echo::EchoRequest;
use switchyard::settings::{AdminListen, ProxySettings};
use tonic::Code;

const ECHO: &str = "switchyard.echo.v1.Echo";

/// A service config file with `json` in `dir`.
fn config_file(dir: &tempfile::TempDir, name: &str, json: &str) -> PathBuf {
    let path = dir.path().join(name);
    std::fs::write(&path, json).unwrap();
    path
}

/// A retry policy for every Echo method: up to `attempts` on UNAVAILABLE, short backoff.
fn retry_config(attempts: u32, throttling: &str) -> String {
    format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}],
            "retryPolicy": {{"maxAttempts": {attempts}, "initialBackoff": "0.001s",
              "maxBackoff": "0.005s", "backoffMultiplier": 2,
              "retryableStatusCodes": ["UNAVAILABLE"]}}}}]{throttling}}}"#
    )
}

async fn proxy(etcd: &EtcdProcess, tweak: impl FnOnce(&mut ProxySettings)) -> (Proxy, SocketAddr) {
    let admin = switchyard::testkit::free_addr().unwrap();
    let p = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |s| {
        s.admin.listen = AdminListen(Some(admin));
        tweak(s);
    })
    .await;
    (p, admin)
}

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

fn backend_calls(bs: &[switchyard::demo::EchoBackend]) -> u64 {
    bs.iter().map(|b| b.stats().calls()).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_policy_saves_every_call_on_a_failing_node_with_ejection_off_and_on() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(14, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, "retry.json", &retry_config(3, ""));
    for eject_after in [0, 5] {
        let f = file.clone();
        let (p, admin) = proxy(&etcd, |s| {
            s.service_config.files = vec![f];
            s.ejection.after = eject_after;
        })
        .await;
        let results = calls(p.addr, 600).await;
        let t = tally(&results);
        assert_eq!(
            results.iter().filter(|r| r.is_err()).count(),
            0,
            "eject_after {eject_after}: {t:?}"
        );
        let m = admin_get(admin, "/metrics").await.unwrap().body;
        let retried = metric(
            &m,
            "switchyard_call_attempts_total",
            &[("service", ECHO), ("outcome", "retried")],
        )
        .unwrap_or(0.0);
        assert!(retried >= 1.0, "no retry counted: {m}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn methods_without_a_policy_are_never_retried_once_sent() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(14, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    // A policy for another method only.
    let json = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}", "method": "ServerStream"}}],
            "retryPolicy": {{"maxAttempts": 5, "initialBackoff": "0.001s", "maxBackoff": "0.001s",
              "backoffMultiplier": 1, "retryableStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
    );
    let file = config_file(&dir, "other.json", &json);
    let (p, _admin) = proxy(&etcd, |s| {
        s.service_config.files = vec![file];
        s.ejection.after = 0;
    })
    .await;
    let before = backend_calls(&bs);
    let results = calls(p.addr, 60).await;
    let t = tally(&results);
    assert_eq!(t.get("Unavailable"), Some(&20), "{t:?}");
    assert_eq!(
        backend_calls(&bs) - before,
        60,
        "a sent call was sent again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_bounds_the_extra_load_when_every_node_fails() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    for b in &bs {
        b.faults().fail_code.store(14, Ordering::Relaxed);
    }
    let dir = tempfile::tempdir().unwrap();
    let json = retry_config(
        5,
        r#", "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}"#,
    );
    let file = config_file(&dir, "throttled.json", &json);
    let (p, admin) = proxy(&etcd, |s| {
        s.service_config.files = vec![file];
        s.ejection.after = 0;
    })
    .await;
    let before = backend_calls(&bs);
    let n = 300;
    let results = calls(p.addr, n).await;
    assert!(results.iter().all(|r| r.is_err()));
    let attempts = backend_calls(&bs) - before;
    assert!(
        attempts as f64 <= 1.3 * n as f64,
        "{attempts} backend attempts for {n} calls"
    );
    let m = admin_get(admin, "/metrics").await.unwrap().body;
    let throttled = metric(
        &m,
        "switchyard_call_attempts_total",
        &[("service", ECHO), ("outcome", "throttled")],
    )
    .unwrap_or(0.0);
    assert!(throttled >= 100.0, "throttled {throttled}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hedging_sends_a_slow_nodes_calls_elsewhere_and_cancels_the_loser() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().delay_ms.store(2_000, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}],
            "hedgingPolicy": {{"maxAttempts": 3, "hedgingDelay": "0.05s"}}}}]}}"#
    );
    let file = config_file(&dir, "hedge.json", &json);
    let (p, admin) = proxy(&etcd, |s| s.service_config.files = vec![file]).await;
    let results = calls(p.addr, 30).await;
    let t = tally(&results);
    assert_eq!(t.get("b0"), None, "the slow node answered: {t:?}");
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 30, "{t:?}");
    // The slow node's hedged-over calls were cancelled, not left to run.
    eventually(
        Duration::from_secs(5),
        "b0 sees its calls cancelled",
        || {
            let c = bs[0].stats().cancelled();
            async move { c >= 5 }
        },
    )
    .await;
    let m = admin_get(admin, "/metrics").await.unwrap().body;
    let hedged = metric(
        &m,
        "switchyard_call_attempts_total",
        &[("service", ECHO), ("outcome", "hedged")],
    )
    .unwrap_or(0.0);
    assert!(hedged >= 5.0, "hedged {hedged}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_timeout_ends_a_call_that_had_no_deadline_and_backends_see_it() {
    let (etcd, bs, _regs) = echo_backends(1).await;
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}], "timeout": "0.3s"}}]}}"#
    );
    let file = config_file(&dir, "timeout.json", &json);
    let (p, _admin) = proxy(&etcd, |s| s.service_config.files = vec![file]).await;
    let mut c = client(p.addr).await;
    let err = c
        .unary(EchoRequest {
            message: "slow".into(),
            delay_ms: 3_000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::DeadlineExceeded, "{err:?}");
    let seen = bs[0].stats().last_grpc_timeout.lock().unwrap().clone();
    let seen = seen.expect("the backend got a grpc-timeout");
    let mut h = http::HeaderMap::new();
    h.insert("grpc-timeout", seen.parse().unwrap());
    let d = switchyard::proxy::grpc::grpc_timeout(&h).unwrap();
    assert!(d <= Duration::from_millis(300), "backend saw {seen}");
    // A client deadline shorter than the config's is kept as it is.
    let mut req = tonic::Request::new(EchoRequest {
        message: "quick".into(),
        ..Default::default()
    });
    req.set_timeout(Duration::from_millis(100));
    c.unary(req).await.unwrap();
    let seen = bs[0]
        .stats()
        .last_grpc_timeout
        .lock()
        .unwrap()
        .clone()
        .unwrap();
    let mut h = http::HeaderMap::new();
    h.insert("grpc-timeout", seen.parse().unwrap());
    assert!(switchyard::proxy::grpc::grpc_timeout(&h).unwrap() <= Duration::from_millis(100));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_config_file_fails_start_up_naming_the_file_and_the_field() {
    let (etcd, _bs, _regs) = echo_backends(1).await;
    let dir = tempfile::tempdir().unwrap();
    let json = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}],
            "retryPolicy": {{"maxAttempts": 1, "initialBackoff": "1s", "maxBackoff": "1s",
              "backoffMultiplier": 2, "retryableStatusCodes": ["UNAVAILABLE"]}}}}]}}"#
    );
    let file = config_file(&dir, "bad.json", &json);
    let mut p = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |s| {
        s.service_config.files = vec![file.clone()];
    })
    .await;
    let result = tokio::time::timeout(Duration::from_secs(10), p.task.take().unwrap())
        .await
        .expect("start-up ends")
        .unwrap();
    let err = result
        .expect_err("a bad service config must fail start-up")
        .to_string();
    assert!(err.contains("bad.json"), "{err}");
    assert!(
        err.contains("methodConfig[0].retryPolicy.maxAttempts"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_etcd_config_change_applies_to_running_services_and_a_bad_one_keeps_the_last_good() {
    let (etcd, _bs, _regs) = echo_backends(1).await;
    let (p, _admin) = proxy(&etcd, |s| {
        s.service_config.prefix = Some("config/grpc".into());
    })
    .await;
    let mut c = client(p.addr).await;
    let slow = || EchoRequest {
        message: "slow".into(),
        delay_ms: 600,
        ..Default::default()
    };
    assert!(
        c.unary(slow()).await.is_ok(),
        "no config: the call takes its time"
    );
    let key = format!("config/grpc/{ECHO}");
    let good = format!(
        r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}], "timeout": "0.2s"}}]}}"#
    );
    put(etcd.endpoint(), &key, &good).await;
    let mut deadline_hit = false;
    for _ in 0..50 {
        if let Err(e) = c.unary(slow()).await {
            assert_eq!(e.code(), Code::DeadlineExceeded, "{e:?}");
            deadline_hit = true;
            break;
        }
    }
    assert!(deadline_hit, "the etcd config's timeout never applied");
    put(
        etcd.endpoint(),
        &key,
        r#"{"methodConfig": [{"name": [{}], "timeout": "forever"}]}"#,
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let e = c.unary(slow()).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::DeadlineExceeded,
        "the last good config stays: {e:?}"
    );
    delete(etcd.endpoint(), &key).await;
    let mut back = false;
    for _ in 0..50 {
        if c.unary(slow()).await.is_ok() {
            back = true;
            break;
        }
    }
    assert!(back, "the deleted config still applies");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retries_carry_previous_attempts_and_honour_the_server_s_pushback() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, "retry.json", &retry_config(3, ""));
    let (p, _admin) = proxy(&etcd, |s| {
        s.service_config.files = vec![file];
        s.ejection.after = 0;
    })
    .await;
    let mut c = client(p.addr).await;
    let failing = |pushback: Option<&str>| {
        let mut r = tonic::Request::new(EchoRequest {
            message: "fail".into(),
            fail_code: 14,
            ..Default::default()
        });
        if let Some(v) = pushback {
            r.metadata_mut()
                .insert("x-echo-pushback-ms", v.parse().unwrap());
        }
        r
    };
    // No pushback: three attempts, the last saying two came before.
    let before = backend_calls(&bs);
    let e = c.unary(failing(None)).await.unwrap_err();
    assert_eq!(e.code(), Code::Unavailable);
    assert_eq!(backend_calls(&bs) - before, 3);
    let most = bs
        .iter()
        .map(|b| b.stats().max_previous_attempts.load(Ordering::SeqCst))
        .max();
    assert_eq!(most, Some(2));
    // Every attempt on a different node: each of the three saw one.
    assert!(
        bs.iter().all(|b| b.stats().calls() == 1),
        "retries went to a node already tried"
    );
    // A negative pushback: the server says not to retry.
    let before = backend_calls(&bs);
    c.unary(failing(Some("-1"))).await.unwrap_err();
    assert_eq!(backend_calls(&bs) - before, 1);
    // A pushback of 50 ms: still retried.
    let before = backend_calls(&bs);
    c.unary(failing(Some("50"))).await.unwrap_err();
    assert_eq!(backend_calls(&bs) - before, 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn short_client_streams_are_retried_whole_and_long_ones_are_committed_to_their_attempt() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(14, Ordering::Relaxed);
    let dir = tempfile::tempdir().unwrap();
    let file = config_file(&dir, "retry.json", &retry_config(3, ""));
    let (p, admin) = proxy(&etcd, |s| {
        s.service_config.files = vec![file];
        s.ejection.after = 0;
    })
    .await;
    let mut c = client(p.addr).await;
    let stream_of = |size: usize| {
        let msgs: Vec<EchoRequest> = (0..3)
            .map(|i| EchoRequest {
                message: format!("m{i}"),
                payload: vec![b'a' + i as u8; size],
                ..Default::default()
            })
            .collect();
        tokio_stream::iter(msgs)
    };
    for _ in 0..15 {
        let reply = c
            .client_stream(stream_of(1024))
            .await
            .expect("retried")
            .into_inner();
        assert_eq!(reply.payload.len(), 3 * 1024);
        assert_eq!(reply.seq, 3, "the retried stream arrived whole");
        assert_ne!(reply.server, "b0");
    }
    // 3 × 40 KiB: past the 64 KiB replay buffer, so a failure is the answer.
    let mut failed = 0;
    for _ in 0..15 {
        match c.client_stream(stream_of(40 * 1024)).await {
            Ok(r) => assert_eq!(r.into_inner().payload.len(), 3 * 40 * 1024),
            Err(e) => {
                assert_eq!(e.code(), Code::Unavailable);
                failed += 1;
            }
        }
    }
    assert!(failed >= 1, "no long stream reached the failing node");
    let m = admin_get(admin, "/metrics").await.unwrap().body;
    let committed = metric(
        &m,
        "switchyard_call_attempts_total",
        &[("service", ECHO), ("outcome", "committed")],
    )
    .unwrap_or(0.0);
    assert_eq!(committed, f64::from(failed), "{m}");
}
