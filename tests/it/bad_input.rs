//! Bad input gets a clear answer and harms no one else: each case sends what a
//! well-behaved gRPC client never would, checks the answer, and then checks that the
//! proxy still serves a good client.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::faults::*;
use bytes::Bytes;
use switchyard::echo::EchoRequest;
use switchyard::settings::ProxySettings;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

/// etcd, one registered Echo backend named "good", and a proxy set up by `tweak`.
struct Setup {
    _etcd: EtcdProcess,
    backend: EchoBackend,
    _reg: TestRegistration,
    proxy: Proxy,
}

async fn setup(tweak: impl FnOnce(&mut ProxySettings)) -> Setup {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("good").await.unwrap();
    let reg = register(etcd.endpoint(), ECHO, backend.addr(), 30).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], tweak).await;
    assert_serves(proxy.addr).await;
    Setup {
        _etcd: etcd,
        backend,
        _reg: reg,
        proxy,
    }
}

/// A good client, on a new connection, gets its call served.
async fn assert_serves(addr: SocketAddr) {
    let mut c = client(addr).await;
    let name = tokio::time::timeout(Duration::from_secs(10), served_by(&mut c))
        .await
        .expect("good call hung")
        .expect("good call failed");
    assert_eq!(name, "good");
}

fn unary_body(delay_ms: u32) -> Bytes {
    grpc_message(&EchoRequest {
        message: "raw".into(),
        delay_ms,
        ..Default::default()
    })
}

const GRPC: [(&str, &str); 2] = [("content-type", "application/grpc"), ("te", "trailers")];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http1_request_gets_505_saying_http2_is_required() {
    let s = setup(|_| {}).await;
    for request in [
        format!("POST {UNARY} HTTP/1.1\r\nHost: x\r\nContent-Type: application/grpc\r\nContent-Length: 0\r\n\r\n"),
        "GET / HTTP/1.1\r\nHost: x\r\nConnection: keep-alive\r\n\r\n".to_owned(),
        "GET / HTTP/1.0\r\n\r\n".to_owned(),
    ] {
        let mut tcp = TcpStream::connect(s.proxy.addr).await.unwrap();
        tcp.write_all(request.as_bytes()).await.unwrap();
        // Answered and closed: no hang even though the client keeps its side open.
        let answer = read_until_closed(&mut tcp, Duration::from_secs(10)).await;
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1."), "{answer:?}");
        assert!(answer.contains(" 505 "), "{answer:?}");
        assert!(answer.contains("HTTP/2"), "{answer:?}");
    }
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_bytes_close_only_that_connection() {
    let s = setup(|_| {}).await;
    // A call in flight on another connection while the garbage arrives.
    let send = h2_connect(s.proxy.addr).await;
    let in_flight =
        tokio::spawn(async move { h2_request(&send, UNARY, &GRPC, unary_body(1000)).await });
    eventually(
        Duration::from_secs(10),
        "the call reached the backend",
        || async { s.backend.stats().calls() >= 2 },
    )
    .await;

    // Neither HTTP/1 nor HTTP/2.
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut tcp = TcpStream::connect(s.proxy.addr).await.unwrap();
    let _ = tcp.write_all(&noise).await;
    read_until_closed(&mut tcp, Duration::from_secs(10)).await;

    // A valid preface, then a frame header announcing 16 MiB (over the frame size limit).
    let mut raw = RawH2::connect(s.proxy.addr).await;
    raw.tcp
        .write_all(&[0xff, 0xff, 0xff, 0x00, 0x00, 0, 0, 0, 1])
        .await
        .unwrap();
    let goaway = raw
        .until(Duration::from_secs(10), |f| f.kind == frame_type::GOAWAY)
        .await
        .expect("closed without GOAWAY");
    assert_eq!(goaway.error_code(), Some(0x6), "FRAME_SIZE_ERROR expected");
    assert!(raw
        .until(Duration::from_secs(10), |_| false)
        .await
        .is_none());

    // A DATA frame on stream 0 (a protocol error).
    let mut raw = RawH2::connect(s.proxy.addr).await;
    raw.send(frame_type::DATA, 0, 0, b"junk").await;
    let goaway = raw
        .until(Duration::from_secs(10), |f| f.kind == frame_type::GOAWAY)
        .await
        .expect("closed without GOAWAY");
    assert_eq!(goaway.error_code(), Some(0x1), "PROTOCOL_ERROR expected");

    let reply = in_flight
        .await
        .unwrap()
        .expect("the other client's call failed");
    assert_eq!(reply.grpc_status().as_deref(), Some("0"));
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_that_is_not_grpc_gets_415() {
    let s = setup(|_| {}).await;
    let send = h2_connect(s.proxy.addr).await;
    for headers in [
        vec![("content-type", "application/json")],
        vec![("content-type", "application/grpc-web")],
        vec![("content-type", "text/plain")],
        vec![],
    ] {
        let r = h2_request(&send, UNARY, &headers, Bytes::from_static(b"{}"))
            .await
            .unwrap();
        assert_eq!(r.status, 415, "{headers:?}: {r:?}");
        let body = String::from_utf8_lossy(&r.body);
        assert!(body.contains("application/grpc"), "{body:?}");
    }
    // The same connection still carries good calls.
    let r = h2_request(&send, UNARY, &GRPC, unary_body(0))
        .await
        .unwrap();
    assert_eq!(r.grpc_status().as_deref(), Some("0"), "{r:?}");
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_that_is_not_service_method_gets_unimplemented() {
    let s = setup(|_| {}).await;
    let send = h2_connect(s.proxy.addr).await;
    for path in [
        "/",
        "/nomethod",
        "/svc/",
        "//Method",
        "/a/b/c",
        "/bad%20name/M",
        "/%2e%2e/M",
        "/ünïcode/M",
    ] {
        let r = match h2_request(&send, path, &GRPC, unary_body(0)).await {
            Ok(r) => r,
            Err(e) => panic!("{path:?}: {e}"),
        };
        assert_eq!(r.status, 200, "{path:?}");
        assert_eq!(r.grpc_status().as_deref(), Some("12"), "{path:?}: {r:?}");
        let msg = r.headers.get("grpc-message").expect("grpc-message");
        assert!(msg.to_str().unwrap().contains("service"), "{msg:?}");
    }
    // A well-formed path of a service nobody registered is UNIMPLEMENTED too, naming
    // the service as not registered (not a malformed path).
    let r = h2_request(&send, "/nobody.Home/M", &GRPC, unary_body(0))
        .await
        .unwrap();
    assert_eq!(r.grpc_status().as_deref(), Some("12"), "{r:?}");
    let msg = r.grpc_message().unwrap_or_default();
    assert!(msg.contains("'nobody.Home' is not registered"), "{msg}");
    let r = h2_request(&send, UNARY, &GRPC, unary_body(0))
        .await
        .unwrap();
    assert_eq!(r.grpc_status().as_deref(), Some("0"), "{r:?}");
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn header_lists_and_header_sizes_are_bounded() {
    let s = setup(|a| a.limits.max_header_list_size = 8 * 1024).await;
    let send = h2_connect(s.proxy.addr).await;
    let before = s.backend.stats().calls();

    // One header bigger than the whole allowance.
    let big = "x".repeat(16 * 1024);
    let mut headers = GRPC.to_vec();
    headers.push(("x-big", big.as_str()));
    match h2_request(&send, UNARY, &headers, unary_body(0)).await {
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    // Many small headers adding up to more than the allowance.
    let names: Vec<String> = (0..600).map(|i| format!("x-h{i}")).collect();
    let mut headers = GRPC.to_vec();
    headers.extend(names.iter().map(|n| (n.as_str(), "0123456789")));
    match h2_request(&send, UNARY, &headers, unary_body(0)).await {
        Ok(r) => assert_eq!(r.status, 431, "{r:?}"),
        Err(e) => assert_eq!(e.reason(), Some(h2::Reason::REFUSED_STREAM), "{e}"),
    }
    assert_eq!(
        s.backend.stats().calls(),
        before,
        "an oversized request reached the backend"
    );
    // The connection that sent them still works.
    let r = h2_request(&send, UNARY, &GRPC, unary_body(0))
        .await
        .unwrap();
    assert_eq!(r.grpc_status().as_deref(), Some("0"), "{r:?}");

    // A header block that never ends: HEADERS without END_HEADERS, then CONTINUATION
    // frames without end. The connection is closed instead of buffering forever.
    let mut raw = RawH2::connect(s.proxy.addr).await;
    let mut block = hpack_block(&grpc_request_headers(UNARY));
    let filler = hpack_block(&[("x-filler", &"y".repeat(1000))]);
    block.extend_from_slice(&filler);
    raw.send(frame_type::HEADERS, 0, 1, &block).await;
    let mut closed = false;
    for _ in 0..1000 {
        if raw
            .tcp
            .write_all(&encode_frame(frame_type::CONTINUATION, 0, 1, &filler))
            .await
            .is_err()
        {
            closed = true;
            break;
        }
    }
    if !closed {
        let goaway = raw
            .until(Duration::from_secs(10), |f| f.kind == frame_type::GOAWAY)
            .await;
        assert!(
            goaway.as_ref().is_some_and(|g| g.error_code() != Some(0)),
            "{goaway:?}"
        );
    }
    assert!(raw
        .until(Duration::from_secs(10), |_| false)
        .await
        .is_none());
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_streams_per_connection_are_bounded() {
    let s = setup(|a| a.limits.max_concurrent_streams = 4).await;
    let before = s.backend.stats().calls();
    let mut raw = RawH2::connect(s.proxy.addr).await;
    let settings = raw
        .until(Duration::from_secs(5), |f| {
            f.kind == frame_type::SETTINGS && f.flags & 1 == 0
        })
        .await
        .expect("no SETTINGS");
    let advertised = settings
        .payload
        .chunks(6)
        .find(|c| c[..2] == [0, 3])
        .map(|c| u32::from_be_bytes([c[2], c[3], c[4], c[5]]));
    assert_eq!(advertised, Some(4), "SETTINGS_MAX_CONCURRENT_STREAMS");

    // Ignore the limit: open 10 streams of 2 s calls at once.
    let block = hpack_block(&grpc_request_headers(UNARY));
    let body = unary_body(2000);
    for i in 0..10u32 {
        let id = 2 * i + 1;
        raw.send(frame_type::HEADERS, 0x4, id, &block).await;
        raw.send(frame_type::DATA, 0x1, id, &body).await;
    }
    let mut refused = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(5);
    while refused.len() < 6 && Instant::now() < deadline {
        match raw.next(Duration::from_secs(5)).await {
            Some(f) if f.kind == frame_type::RST_STREAM && f.error_code() == Some(0x7) => {
                refused.insert(f.stream);
            }
            Some(_) => {}
            None => panic!("connection closed"),
        }
    }
    assert_eq!(
        refused.len(),
        6,
        "streams over the limit not refused: {refused:?}"
    );
    eventually(
        Duration::from_secs(10),
        "the admitted calls reach the backend",
        || async { s.backend.stats().calls() - before >= 4 },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.backend.stats().calls() - before,
        4,
        "calls that reached the backend"
    );
    assert_serves(s.proxy.addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_and_slowloris_connections_cannot_hold_the_proxy() {
    let s = setup(|a| {
        a.limits.max_connections = 4;
        a.timeouts.first_request = Duration::from_secs(1);
        a.timeouts.idle = Duration::from_secs(1);
    })
    .await;
    let addr = s.proxy.addr;
    // Give the setup's own client connection time to be closed as idle.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    // Four clients take every connection slot and dribble their first bytes, one
    // every 150 ms: two the HTTP/2 preface, two an HTTP/1 request head.
    let started = Instant::now();
    let mut dribblers = Vec::new();
    for i in 0..4 {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        dribblers.push(tokio::spawn(async move {
            let text: &[u8] = if i % 2 == 0 {
                H2_PREFACE
            } else {
                b"POST /switchyard.echo.v1.Echo/Unary HTTP/1.1\r\nHost: x\r\nX-Slow: 1\r\n"
            };
            for b in text {
                if tcp.write_all(&[*b]).await.is_err() {
                    return started.elapsed();
                }
                tokio::time::sleep(Duration::from_millis(150)).await;
            }
            read_until_closed(&mut tcp, Duration::from_secs(10)).await;
            started.elapsed()
        }));
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    // A good client still gets served: it waits in the backlog until the dribblers
    // are cut off by the first-request timeout.
    tokio::time::timeout(Duration::from_secs(8), assert_serves(addr))
        .await
        .expect("good client held off by slow clients");
    let mut held = Vec::new();
    for d in dribblers {
        held.push(d.await.unwrap());
    }
    assert!(
        held.iter().all(|h| *h < Duration::from_secs(4)),
        "slow clients (h2, http/1, h2, http/1) held on for {held:?}"
    );

    // A client that did the HTTP/2 handshake but never sends a request is closed with
    // GOAWAY; so is one that went idle after a call.
    let mut raw = RawH2::connect(addr).await;
    let goaway = raw
        .until(Duration::from_secs(5), |f| f.kind == frame_type::GOAWAY)
        .await
        .expect("idle connection closed without GOAWAY");
    assert_eq!(goaway.error_code(), Some(0));
    assert!(raw.until(Duration::from_secs(5), |_| false).await.is_none());

    // Nor can one that ignores the GOAWAY (never acknowledges its PING).
    let mut mute = RawH2::connect_mute(addr).await;
    let t = Instant::now();
    assert!(mute
        .until(Duration::from_secs(6), |_| false)
        .await
        .is_none());
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "mute client held on for {:?}",
        t.elapsed()
    );

    let tcp = TcpStream::connect(addr).await.unwrap();
    let (send, conn) = h2::client::handshake(tcp).await.unwrap();
    let conn = tokio::spawn(conn);
    let r = h2_request(&send, UNARY, &GRPC, unary_body(0))
        .await
        .unwrap();
    assert_eq!(r.grpc_status().as_deref(), Some("0"));
    let idle_since = Instant::now();
    tokio::time::timeout(Duration::from_secs(5), conn)
        .await
        .expect("idle connection kept open")
        .unwrap()
        .unwrap();
    assert!(idle_since.elapsed() >= Duration::from_millis(800));
    assert_serves(addr).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_etcd_values_are_skipped_with_a_log_line() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let good = EchoBackend::start("good").await.unwrap();
    let other = EchoBackend::start("other").await.unwrap();
    let prefix = format!("services/{ECHO}");
    put(
        etcd.endpoint(),
        &format!("{prefix}/{}", good.addr()),
        &good.addr().to_string(),
    )
    .await;
    // Present when the proxy first lists the service:
    put(
        etcd.endpoint(),
        &format!("{prefix}/bad-plain"),
        "not an address",
    )
    .await;
    put(
        etcd.endpoint(),
        &format!("{prefix}/bad-json"),
        r#"{"Op":0,"Addr":"#,
    )
    .await;
    let proxy = SwitchyardProcess::proxy(&[etcd.endpoint().to_owned()], "info", &[]).await;
    let mut c = client(proxy.addr()).await;
    for _ in 0..10 {
        assert_eq!(served_by(&mut c).await.unwrap(), "good");
    }
    // Arriving through the watch: a bad port, an etcd naming delete op, binary junk,
    // and a good endpoint turned bad.
    let other_key = format!("{prefix}/{}", other.addr());
    put(etcd.endpoint(), &other_key, &other.addr().to_string()).await;
    eventually(Duration::from_secs(10), "the other backend serves", || {
        let mut c = c.clone();
        async move { served_by(&mut c).await.is_ok_and(|n| n == "other") }
    })
    .await;
    put(
        etcd.endpoint(),
        &format!("{prefix}/bad-port"),
        "127.0.0.1:99999",
    )
    .await;
    put(
        etcd.endpoint(),
        &format!("{prefix}/bad-op"),
        r#"{"Op":1,"Addr":"127.0.0.1:1"}"#,
    )
    .await;
    put(
        etcd.endpoint(),
        &format!("{prefix}/bad-bytes"),
        "\u{1}\u{2}\u{7f}",
    )
    .await;
    put(etcd.endpoint(), &other_key, "other:garbage").await;
    for key in ["bad-plain", "bad-json", "bad-port", "bad-op", "bad-bytes"] {
        let key = format!("{prefix}/{key}");
        eventually(
            Duration::from_secs(10),
            &format!("a log line for {key}"),
            || async { proxy.logged(&["skipping malformed endpoint value", &key]) },
        )
        .await;
    }
    eventually(
        Duration::from_secs(10),
        "the corrupted endpoint is dropped",
        || async { proxy.logged(&["skipping malformed endpoint value", &other_key]) },
    )
    .await;
    // Only the good backend serves; nothing failed.
    let mut in_a_row = 0;
    let deadline = Instant::now() + Duration::from_secs(10);
    while in_a_row < 10 {
        assert!(
            Instant::now() < deadline,
            "calls still reach the corrupted endpoint"
        );
        let name = served_by(&mut c).await.expect("a call failed");
        in_a_row = if name == "good" { in_a_row + 1 } else { 0 };
    }
}
