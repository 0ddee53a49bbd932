//! Issue 2: discovery, routing and forwarding, end to end with a real etcd, real tonic
//! backends and clients over loopback sockets.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::*;
use futures_util::StreamExt;
use switchyard::echo::EchoRequest;
use tonic::metadata::{BinaryMetadataValue, MetadataValue};
use tonic::Code;

const SVC: &str = "switchyard.echo.v1.Echo";

/// etcd + `n` backends registered for the Echo service + a proxy.
struct Setup {
    etcd: EtcdProcess,
    backends: Vec<EchoBackend>,
    _regs: Vec<TestRegistration>,
    proxy: Proxy,
}

async fn setup(n: usize) -> Setup {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let mut backends = Vec::new();
    let mut regs = Vec::new();
    for i in 0..n {
        let b = EchoBackend::start(&format!("b{i}")).await.unwrap();
        regs.push(register(etcd.endpoint(), SVC, b.addr(), 10).await);
        backends.push(b);
    }
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    Setup {
        etcd,
        backends,
        _regs: regs,
        proxy,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn all_four_call_kinds_pass_through() {
    let s = setup(1).await;
    let mut c = client(s.proxy.addr).await;

    let r = c.unary(req("one")).await.unwrap().into_inner();
    assert_eq!((r.message.as_str(), r.server.as_str()), ("one", "b0"));

    let mut stream = c
        .server_stream(EchoRequest {
            message: "s".into(),
            count: 5,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut seqs = Vec::new();
    while let Some(item) = stream.next().await {
        seqs.push(item.unwrap().seq);
    }
    assert_eq!(seqs, vec![0, 1, 2, 3, 4]);

    let reqs = (0..4).map(|i| EchoRequest {
        payload: vec![i as u8; 3],
        message: format!("m{i}"),
        ..Default::default()
    });
    let r = c
        .client_stream(futures_util::stream::iter(reqs))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.seq, 4);
    assert_eq!(r.payload, vec![0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]);
    assert_eq!(r.message, "m3");

    // Bidi: both directions stream at once; each reply comes before the next request.
    let (tx, rx) = tokio::sync::mpsc::channel::<EchoRequest>(1);
    let mut replies = c
        .bidi(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    for i in 0..5u64 {
        tx.send(req(&format!("ping{i}"))).await.unwrap();
        let r = tokio::time::timeout(Duration::from_secs(5), replies.next())
            .await
            .expect("bidi reply streamed before the request stream ended")
            .unwrap()
            .unwrap();
        assert_eq!((r.seq, r.message), (i, format!("ping{i}")));
    }
    drop(tx);
    assert!(replies.next().await.is_none());

    // An impossible reply size is refused by the backend, and that status passes through.
    let err = c
        .unary(EchoRequest {
            reply_size: u32::MAX,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_trailers_and_status_are_preserved() {
    let s = setup(1).await;
    let mut c = client(s.proxy.addr).await;

    let mut r = tonic::Request::new(req("md"));
    r.metadata_mut()
        .insert("x-echo-text", MetadataValue::from_static("hello world"));
    r.metadata_mut().insert_bin(
        "x-echo-blob-bin",
        BinaryMetadataValue::from_bytes(&[0, 1, 2, 255, 254]),
    );
    let resp = c.unary(r).await.unwrap();
    assert_eq!(resp.metadata().get("x-echo-text").unwrap(), "hello world");
    assert_eq!(
        resp.metadata()
            .get_bin("x-echo-blob-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        &[0, 1, 2, 255, 254]
    );
    assert_eq!(resp.metadata().get("x-served-by").unwrap(), "b0");

    // An error status with a message needing percent-encoding and custom trailers.
    let message = "bad thing: 100% ünïcode\ttab \u{1F600}";
    let mut r = tonic::Request::new(EchoRequest {
        message: message.into(),
        fail_code: Code::FailedPrecondition as i32,
        ..Default::default()
    });
    r.metadata_mut()
        .insert("x-echo-trailer", MetadataValue::from_static("t-value"));
    r.metadata_mut().insert_bin(
        "x-echo-detail-bin",
        BinaryMetadataValue::from_bytes(b"\x00\xffdetail"),
    );
    let status = c.unary(r).await.unwrap_err();
    assert_eq!(status.code(), Code::FailedPrecondition);
    assert_eq!(status.message(), message);
    assert_eq!(status.metadata().get("x-echo-trailer").unwrap(), "t-value");
    assert_eq!(
        status
            .metadata()
            .get_bin("x-echo-detail-bin")
            .unwrap()
            .to_bytes()
            .unwrap()
            .as_ref(),
        b"\x00\xffdetail"
    );

    // A status after streamed messages arrives in real trailers.
    let mut stream = c
        .server_stream(EchoRequest {
            count: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut n = 0;
    while let Some(item) = stream.next().await {
        item.unwrap();
        n += 1;
    }
    assert_eq!(n, 2);
    assert!(stream.trailers().await.unwrap().is_some());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn compressed_and_16_mib_messages_pass_both_ways() {
    let s = setup(1).await;
    let mut c = client(s.proxy.addr).await;
    let big: Vec<u8> = (0..16 * 1024 * 1024 + 7).map(|i| (i % 251) as u8).collect();
    let r = c
        .unary(EchoRequest {
            payload: big.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.payload.len(), big.len());
    assert!(r.payload == big, "payload changed in transit");

    // Compressed requests and responses (gzip) pass through untouched.
    let ch = tonic::transport::Channel::from_shared(s.proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut gz = switchyard::echo::echo_client::EchoClient::new(ch)
        .send_compressed(tonic::codec::CompressionEncoding::Gzip)
        .accept_compressed(tonic::codec::CompressionEncoding::Gzip);
    let payload = vec![7u8; 100_000];
    let r = gz
        .unary(EchoRequest {
            payload: payload.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    assert_eq!(r.into_inner().payload, payload);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deadline_and_cancel_reach_the_backend() {
    let s = setup(1).await;
    let b = &s.backends[0];
    let mut c = client(s.proxy.addr).await;

    // The deadline is forwarded as grpc-timeout and enforced by the proxy itself (a raw
    // client with no deadline logic of its own gets DEADLINE_EXCEEDED from the proxy).
    let body = grpc_frame(&EchoRequest {
        delay_ms: 5_000,
        ..Default::default()
    });
    let started = std::time::Instant::now();
    let resp = raw_call(
        s.proxy.addr,
        "/switchyard.echo.v1.Echo/Unary",
        &[("grpc-timeout", "300m")],
        body,
    )
    .await;
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.grpc_status().as_deref(), Some("4"), "{resp:?}");
    let seen = b.stats().last_grpc_timeout.lock().unwrap().clone();
    assert_eq!(seen.as_deref(), Some("300m"));
    // A tonic client's own deadline works through the proxy too.
    let mut r = tonic::Request::new(EchoRequest {
        delay_ms: 5_000,
        ..Default::default()
    });
    r.set_timeout(Duration::from_millis(200));
    let err = c.unary(r).await.unwrap_err();
    assert!(
        matches!(err.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{err:?}"
    );
    eventually(
        Duration::from_secs(3),
        "backend saw the deadline cancel",
        || async { b.stats().cancelled() >= 2 },
    )
    .await;

    // A client cancel (dropping the call → RST_STREAM) cancels the backend's stream.
    let before = b.stats().cancelled();
    let mut c2 = c.clone();
    let call = tokio::spawn(async move {
        c2.server_stream(EchoRequest {
            count: 1_000,
            delay_ms: 50,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .next()
        .await
    });
    let first = call.await.unwrap();
    assert!(first.unwrap().is_ok());
    // The stream was dropped after the first reply: the backend must notice.
    eventually(
        Duration::from_secs(3),
        "backend saw the client's cancel",
        || async { b.stats().cancelled() > before },
    )
    .await;
    // Everything still works afterwards.
    assert_eq!(served_by(&mut c).await.unwrap(), "b0");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_channel_is_spread_evenly_over_three_backends() {
    let s = setup(3).await;
    let mut c = client(s.proxy.addr).await;
    // Let the proxy connect to all three before counting.
    eventually(Duration::from_secs(5), "all three backends served", || {
        let mut c = c.clone();
        async move {
            let mut seen = std::collections::HashSet::new();
            for _ in 0..6 {
                if let Ok(n) = served_by(&mut c).await {
                    seen.insert(n);
                }
            }
            seen.len() == 3
        }
    })
    .await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..300 {
        *counts.entry(served_by(&mut c).await.unwrap()).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    for (b, n) in &counts {
        assert!(
            (95..=105).contains(n),
            "backend {b} got {n} of 300: {counts:?}"
        );
    }
    // Concurrent calls on one channel are spread too.
    let futs = (0..90).map(|_| {
        let mut c = c.clone();
        async move { served_by(&mut c).await.unwrap() }
    });
    let mut counts: HashMap<String, usize> = HashMap::new();
    for n in futures_util::future::join_all(futs).await {
        *counts.entry(n).or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    assert!(counts.values().all(|&n| n >= 20), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_follow_etcd_puts_deletes_and_lease_expiry() {
    let s = setup(1).await;
    let mut c = client(s.proxy.addr).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "b0");

    // A new key gets traffic within 1 s.
    let b1 = EchoBackend::start("new").await.unwrap();
    let key = format!("services/{SVC}/{}", b1.addr());
    put(s.etcd.endpoint(), &key, &b1.addr().to_string()).await;
    let t = std::time::Instant::now();
    let mut got = false;
    while t.elapsed() < Duration::from_secs(1) {
        if served_by(&mut c).await.unwrap() == "new" {
            got = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(got, "new endpoint got no call within 1 s");

    // A deleted key gets no call after the delete is seen.
    delete(s.etcd.endpoint(), &key).await;
    eventually(Duration::from_secs(2), "delete seen", || {
        let mut c = c.clone();
        async move {
            let mut all = true;
            for _ in 0..4 {
                all &= served_by(&mut c).await.unwrap() != "new";
            }
            all
        }
    })
    .await;
    let before = b1.stats().calls();
    for _ in 0..50 {
        assert_eq!(served_by(&mut c).await.unwrap(), "b0");
    }
    assert_eq!(b1.stats().calls(), before);

    // A key whose lease expires (holder died: no keep-alive) gets no call after.
    let b2 = EchoBackend::start("leased").await.unwrap();
    let mut etcd = s.etcd.client().await.unwrap();
    let lease = etcd.lease_grant(2, None).await.unwrap().id();
    etcd.put(
        format!("services/{SVC}/{}", b2.addr()),
        b2.addr().to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    eventually(Duration::from_secs(2), "leased endpoint used", || {
        let mut c = c.clone();
        async move { served_by(&mut c).await.unwrap() == "leased" }
    })
    .await;
    // No keep-alive: etcd expires the lease after its TTL and deletes the key.
    eventually(Duration::from_secs(8), "expired endpoint dropped", || {
        let mut c = c.clone();
        async move {
            let mut all = true;
            for _ in 0..4 {
                all &= served_by(&mut c).await.unwrap() != "leased";
            }
            all
        }
    })
    .await;
    let before = b2.stats().calls();
    for _ in 0..50 {
        assert_eq!(served_by(&mut c).await.unwrap(), "b0");
    }
    assert_eq!(b2.stats().calls(), before);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_are_isolated_by_the_trailing_slash_and_bound_listeners_work() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let a = EchoBackend::start("a-node").await.unwrap();
    let ab = EchoBackend::start("ab-node").await.unwrap();
    // Service names are the gRPC path's service part; bind "a" and "ab" on listeners.
    let _ra = register(etcd.endpoint(), "a", a.addr(), 10).await;
    let _rab = register(etcd.endpoint(), "ab", ab.addr(), 10).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["a", "ab"], |_| {}).await;
    let mut ca = client(proxy.bound[0]).await;
    let mut cab = client(proxy.bound[1]).await;
    for _ in 0..20 {
        assert_eq!(served_by(&mut ca).await.unwrap(), "a-node");
        assert_eq!(served_by(&mut cab).await.unwrap(), "ab-node");
    }
    // On the unbound listener the path's service (switchyard.echo.v1.Echo) has no nodes:
    // it is not a service here.
    let mut c = client(proxy.addr).await;
    let err = served_by(&mut c).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_never_registered_service_is_unimplemented_and_one_whose_nodes_left_unavailable() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let mut c = client(proxy.addr).await;
    // Nothing under any prefix: not a service (retrying cannot help), named with the
    // prefix looked in.
    let err = c.unary(req("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unimplemented, "{err:?}");
    assert!(err.message().contains(SVC), "{:?}", err.message());
    assert!(err.message().contains("services/"), "{:?}", err.message());
    // Once a node registers, the same channel gets served.
    let b = EchoBackend::start("late").await.unwrap();
    let r = register(etcd.endpoint(), SVC, b.addr(), 10).await;
    eventually(Duration::from_secs(2), "late endpoint used", || {
        let mut c = c.clone();
        async move { served_by(&mut c).await.is_ok_and(|n| n == "late") }
    })
    .await;
    // Its last node leaves: the service exists and is down, for now.
    delete(etcd.endpoint(), &r.key).await;
    eventually(
        Duration::from_secs(2),
        "UNAVAILABLE once the node left",
        || {
            let mut c = c.clone();
            async move {
                c.unary(req("x")).await.is_err_and(|e| {
                    e.code() == Code::Unavailable && e.message().contains("no endpoints registered")
                })
            }
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_naming_json_values_are_read_and_bad_values_skipped() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("json").await.unwrap();
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/{}", b.addr()),
        &format!(
            r#"{{"Op":0,"Addr":"{}","Metadata":{{"zone":"z1"}}}}"#,
            b.addr()
        ),
    )
    .await;
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/garbage"),
        "not an address",
    )
    .await;
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/badjson"),
        "{\"Op\":0,",
    )
    .await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let mut c = client(proxy.addr).await;
    for _ in 0..10 {
        assert_eq!(served_by(&mut c).await.unwrap(), "json");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_keeps_last_endpoints_and_etcd_back_picks_up_new_keys() {
    let mut s = setup(2).await;
    let mut c = client(s.proxy.addr).await;
    for _ in 0..10 {
        served_by(&mut c).await.unwrap();
    }
    s.etcd.kill();
    // Calls keep flowing to the last known endpoints while etcd is gone.
    let mut seen = std::collections::HashSet::new();
    for _ in 0..60 {
        seen.insert(served_by(&mut c).await.unwrap());
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert_eq!(seen.len(), 2, "{seen:?}");

    s.etcd.restart().await.unwrap();
    let b = EchoBackend::start("after-restart").await.unwrap();
    put(
        s.etcd.endpoint(),
        &format!("services/{SVC}/{}", b.addr()),
        &b.addr().to_string(),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "new key after etcd restart used",
        || {
            let mut c = c.clone();
            async move { served_by(&mut c).await.is_ok_and(|n| n == "after-restart") }
        },
    )
    .await;
    drop(s.backends);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_but_dead_backend_costs_no_failed_call() {
    let s = setup(2).await;
    // A registered address where nothing listens.
    let dead = switchyard::testkit::free_addr().unwrap();
    put(
        s.etcd.endpoint(),
        &format!("services/{SVC}/{dead}"),
        &dead.to_string(),
    )
    .await;
    let mut c = client(s.proxy.addr).await;
    let mut counts: HashMap<String, usize> = HashMap::new();
    for _ in 0..200 {
        let n = served_by(&mut c).await.expect("no call may fail");
        *counts.entry(n).or_default() += 1;
    }
    assert_eq!(counts.len(), 2, "{counts:?}");
    // Concurrent calls too.
    let futs = (0..100).map(|_| {
        let mut c = c.clone();
        async move { served_by(&mut c).await }
    });
    for r in futures_util::future::join_all(futs).await {
        r.expect("no concurrent call may fail");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flow_control_slows_the_backend_to_a_slow_reader() {
    let s = setup(1).await;
    let b = &s.backends[0];
    let mut c = client(s.proxy.addr).await;
    // 200 replies of 1 MiB: far more than all HTTP/2 windows and buffers on the way.
    let mut stream = c
        .server_stream(EchoRequest {
            count: 200,
            reply_size: 1 << 20,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.next().await.unwrap().unwrap();
    assert_eq!(first.payload.len(), 1 << 20);
    // The client stops reading; the backend must stall well short of 200.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let sent = b.stats().sent.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        sent < 40,
        "backend sent {sent} MiB to a client that stopped reading"
    );
    // Reading again drains the rest in order.
    let mut n = 1;
    while let Some(item) = stream.next().await {
        assert_eq!(item.unwrap().seq, n);
        n += 1;
    }
    assert_eq!(n, 200);
}
