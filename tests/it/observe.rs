//! Seeing every call, with real parts: an OTLP receiver (the collector's `TraceService`,
//! served by tonic in the test) gets the proxy's span, child of the client's trace; the
//! backend sees the same trace with the proxy's span as its parent; the access log has a
//! line for a forwarded call, an application error and an answer of the proxy's own
//! (health and reflection included, with their spans); an unsampled client trace is not
//! traced at any rate; a log writer that cannot keep up costs lines, never calls; a
//! relative log path in the config file is relative to the file.
use crate::common::*;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{any_value, KeyValue};
use opentelemetry_proto::tonic::trace::v1::span::SpanKind;
use opentelemetry_proto::tonic::trace::v1::Span;
use switchyard::echo::echo_server::EchoServer;
use switchyard::settings::observe::AccessLogTarget;
use switchyard::settings::AdminListen;
use tokio::net::TcpListener;

const ECHO: &str = "switchyard.echo.v1.Echo";
const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";
const CLIENT_SPAN: &str = "00f067aa0ba902b7";

/// A received span with its resource's attributes.
type Exported = (Vec<KeyValue>, Span);

/// What the test's OTLP receiver got.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<Exported>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut got = self.0.lock().unwrap();
        for rs in request.into_inner().resource_spans {
            let resource = rs.resource.map(|r| r.attributes).unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    got.push((resource.clone(), span));
                }
            }
        }
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

/// An OTLP/gRPC receiver on a free port; its URL and what it receives.
async fn otlp_receiver() -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let received = Received::default();
    let service = TraceServiceServer::new(received.clone());
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (url, received)
}

/// The trace headers one backend call carried.
#[derive(Debug, Default, Clone)]
struct Seen {
    traceparent: Option<String>,
    tracestate: Option<String>,
    b3: Option<String>,
}

/// An Echo backend that records the trace headers of each call it gets.
async fn recording_backend() -> (SocketAddr, Arc<Mutex<Vec<Seen>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    let echo = EchoServer::with_interceptor(
        switchyard::demo::EchoService::new("traced"),
        move |req: tonic::Request<()>| {
            let md = req.metadata();
            let get = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
            record.lock().unwrap().push(Seen {
                traceparent: get("traceparent"),
                tracestate: get("tracestate"),
                b3: get("x-b3-traceid"),
            });
            Ok(req)
        },
    );
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(echo)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener)),
    );
    (addr, seen)
}

fn attr<'a>(attrs: &'a [KeyValue], key: &str) -> Option<&'a any_value::Value> {
    attrs
        .iter()
        .find(|kv| kv.key == key)
        .and_then(|kv| kv.value.as_ref())
        .and_then(|v| v.value.as_ref())
}

fn text_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    match attr(attrs, key) {
        Some(any_value::Value::StringValue(s)) => Some(s.clone()),
        _ => None,
    }
}

fn int_attr(attrs: &[KeyValue], key: &str) -> Option<i64> {
    match attr(attrs, key) {
        Some(any_value::Value::IntValue(i)) => Some(*i),
        _ => None,
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A unary Echo call with these request headers.
fn traced(
    message: &str,
    headers: &[(&'static str, &str)],
) -> tonic::Request<switchyard::echo::EchoRequest> {
    let mut r = tonic::Request::new(req(message));
    for (k, v) in headers {
        r.metadata_mut().insert(*k, v.parse().unwrap());
    }
    r
}

/// A traced setup: etcd, a recording Echo backend registered in it, an OTLP receiver,
/// and a proxy exporting its spans there, sampling root calls at `rate`. Bind `_reg` and
/// `_etcd` when taking it apart: dropped, they end the registration and etcd.
struct Traced {
    proxy: Proxy,
    backend: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
    received: Received,
    _reg: TestRegistration,
    _etcd: EtcdProcess,
}

async fn traced_proxy(rate: f64) -> Traced {
    let etcd = EtcdProcess::start().await.unwrap();
    let (backend, seen) = recording_backend().await;
    let reg = register(etcd.endpoint(), ECHO, backend, 10).await;
    let (otlp, received) = otlp_receiver().await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.observe.otlp_endpoint = Some(otlp.clone());
        a.observe.trace_sample_rate = rate;
    })
    .await;
    Traced {
        proxy,
        backend,
        seen,
        received,
        _reg: reg,
        _etcd: etcd,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clients_trace_continues_through_the_proxy_to_the_backend() {
    init_tracing();
    // Rate 0: only a client's sampled trace is followed.
    let Traced {
        proxy,
        backend,
        seen,
        received,
        _reg,
        _etcd,
        ..
    } = traced_proxy(0.0).await;
    let mut c = client(proxy.addr).await;
    let parent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    c.unary(traced(
        "traced",
        &[
            ("traceparent", &parent),
            ("tracestate", "vendor=opaque"),
            ("x-b3-traceid", "80f198ee56343ba864fe8b2a57d3eff7"),
        ],
    ))
    .await
    .unwrap();
    // Not sampled (rate 0): no span, and the backend gets no traceparent of the proxy's.
    c.unary(traced("untraced", &[])).await.unwrap();
    // A traceparent that does not parse is no parent: a root call, drawn at the rate too.
    c.unary(traced("garbled", &[("traceparent", "00-not-a-trace-01")]))
        .await
        .unwrap();

    eventually(
        Duration::from_secs(15),
        "the proxy's span is exported",
        || {
            let got = !received.0.lock().unwrap().is_empty();
            async move { got }
        },
    )
    .await;
    let (resource, span) = received.0.lock().unwrap()[0].clone();
    assert_eq!(hex(&span.trace_id), TRACE_ID, "the client's trace");
    assert_eq!(
        hex(&span.parent_span_id),
        CLIENT_SPAN,
        "child of the client's span"
    );
    assert_eq!(span.kind, SpanKind::Server as i32);
    assert_eq!(span.name, "switchyard.echo.v1.Echo/Unary");
    let a = &span.attributes;
    assert_eq!(text_attr(a, "rpc.system").as_deref(), Some("grpc"));
    assert_eq!(text_attr(a, "rpc.service").as_deref(), Some(ECHO));
    assert_eq!(text_attr(a, "rpc.method").as_deref(), Some("Unary"));
    assert_eq!(int_attr(a, "rpc.grpc.status_code"), Some(0));
    assert_eq!(text_attr(a, "server.address").as_deref(), Some("127.0.0.1"));
    assert_eq!(int_attr(a, "server.port"), Some(i64::from(backend.port())));
    assert_eq!(
        text_attr(a, "network.peer.address").as_deref(),
        Some("127.0.0.1")
    );
    assert_eq!(
        text_attr(&resource, "service.name").as_deref(),
        Some("switchyard")
    );
    assert!(text_attr(&resource, "host.name").is_some_and(|h| !h.is_empty()));

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let to_backend = seen[0].traceparent.clone().expect("a traceparent");
    assert_eq!(
        to_backend,
        format!("00-{TRACE_ID}-{}-01", hex(&span.span_id)),
        "the backend's parent is the proxy's span"
    );
    assert_eq!(seen[0].tracestate.as_deref(), Some("vendor=opaque"));
    assert_eq!(
        seen[0].b3.as_deref(),
        Some("80f198ee56343ba864fe8b2a57d3eff7"),
        "other trace headers pass through"
    );
    assert_eq!(seen[1].traceparent, None, "an unsampled call gets no span");
    assert_eq!(
        seen[2].traceparent.as_deref(),
        Some("00-not-a-trace-01"),
        "a garbled traceparent is not sampled at rate 0 and passes through untouched"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        received.0.lock().unwrap().len(),
        1,
        "one span per sampled call"
    );
    proxy.shutdown().await;
}

/// The access log's lines so far, parsed.
fn lines(path: &std::path::Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_call_has_its_access_log_line() {
    let (etcd, backends, _regs) = echo_backends(1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let file = path.clone();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.observe.access_log = AccessLogTarget::File(file);
    })
    .await;
    let mut c = client(proxy.addr).await;
    let parent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    c.unary(traced("hello", &[("traceparent", &parent)]))
        .await
        .unwrap();
    let failing = switchyard::echo::EchoRequest {
        message: "out of stock".into(),
        fail_code: tonic::Code::FailedPrecondition as i32,
        ..Default::default()
    };
    let e = c.unary(failing).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition);
    // A service nobody registered: the proxy answers itself.
    let own = raw_call(
        proxy.addr,
        "/nobody.Registered/Call",
        &[],
        grpc_frame(&req("x")),
    )
    .await;
    assert_eq!(own.grpc_status().as_deref(), Some("12"));

    eventually(Duration::from_secs(10), "three access-log lines", || {
        let n = lines(&path).len();
        async move { n >= 3 }
    })
    .await;
    let l = lines(&path);
    assert_eq!(l.len(), 3, "{l:#?}");
    let backend = backends[0].addr().to_string();
    let listener = proxy.addr.to_string();
    let ok = &l[0];
    assert_eq!(ok["service"], ECHO);
    assert_eq!(ok["method"], "/switchyard.echo.v1.Echo/Unary");
    assert_eq!(ok["grpc_status"], 0);
    assert_eq!(ok["backend"], backend.as_str());
    assert_eq!(ok["listener"], listener.as_str());
    assert!(
        ok["peer"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{ok}"
    );
    assert_eq!(ok["attempts"], 1);
    assert!(ok["request_bytes"].as_u64().unwrap() > 5, "{ok}");
    assert!(ok["response_bytes"].as_u64().unwrap() > 5, "{ok}");
    assert_eq!(ok["trace_id"], TRACE_ID, "the client's trace id");
    assert!(ok["start"].as_str().unwrap().ends_with('Z'), "{ok}");
    assert!(ok["duration_us"].as_u64().is_some(), "{ok}");
    assert!(ok.get("grpc_message").is_none(), "{ok}");

    let app = &l[1];
    assert_eq!(app["grpc_status"], tonic::Code::FailedPrecondition as i32);
    assert_eq!(app["grpc_message"], "out of stock");
    assert_eq!(app["backend"], backend.as_str());
    assert!(app.get("trace_id").is_none(), "{app}");

    let mine = &l[2];
    assert_eq!(mine["grpc_status"], 12);
    assert_eq!(mine["service"], "nobody.Registered");
    assert!(mine["backend"].is_null(), "{mine}");
    assert_eq!(mine["attempts"], 0);
    assert!(
        mine["grpc_message"]
            .as_str()
            .is_some_and(|m| m.contains("nobody.Registered")),
        "{mine}"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_that_cannot_keep_up_costs_lines_not_calls() {
    let (etcd, _backends, _regs) = echo_backends(1).await;
    let dir = tempfile::tempdir().unwrap();
    // A pipe nobody reads from: once its buffer is full, every write blocks.
    let fifo = dir.path().join("access.fifo");
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::File::open(fifo).unwrap())
    };
    let admin = switchyard::testkit::free_addr().unwrap();
    let target = fifo.clone();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.observe.access_log = AccessLogTarget::File(target);
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    let _held = reader.join().unwrap();
    let calls = 2 * switchyard::observe::access_log::QUEUE_LINES;
    let tasks: Vec<_> = (0..16)
        .map(|_| {
            let addr = proxy.addr;
            tokio::spawn(async move {
                let mut c = client(addr).await;
                for _ in 0..calls / 16 {
                    c.unary(req("x")).await.unwrap();
                }
            })
        })
        .collect();
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(120), t)
            .await
            .expect("calls go on while the log is stuck")
            .unwrap();
    }
    let text = admin_get(admin, "/metrics")
        .await
        .expect("admin answers")
        .body;
    let dropped = metric(&text, "switchyard_access_log_dropped_total", &[]).unwrap();
    assert!(dropped > 0.0, "{dropped}");
    assert!(dropped <= calls as f64, "{dropped}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reopens_the_access_log_for_logrotate() {
    let (etcd, _backends, _regs) = echo_backends(1).await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let p = SwitchyardProcess::proxy(
        &[etcd.endpoint().to_owned()],
        "info",
        &["--access-log", path.to_str().unwrap()],
    )
    .await;
    let mut c = client(p.addr()).await;
    c.unary(req("before")).await.unwrap();
    eventually(Duration::from_secs(10), "the first line", || {
        let n = lines(&path).len();
        async move { n == 1 }
    })
    .await;
    // What logrotate does: move the file, then tell the process.
    let rotated = dir.path().join("access.log.1");
    std::fs::rename(&path, &rotated).unwrap();
    crate::restart::signal(p.pid(), "-HUP");
    crate::restart::wait_logged(&p, &["settings reloaded"]);
    c.unary(req("after")).await.unwrap();
    eventually(Duration::from_secs(10), "a line in the new file", || {
        let n = lines(&path).len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(lines(&rotated).len(), 1, "the old file keeps its line");
    // The process's log is read by another thread: wait for the line rather than race it.
    crate::restart::wait_logged(&p, &["access log reopened"]);
}

/// A request with a sampled `traceparent` of the test's trace.
fn in_trace<T>(message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    let parent = format!("00-{TRACE_ID}-{CLIENT_SPAN}-01");
    r.metadata_mut()
        .insert("traceparent", parent.parse().unwrap());
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxys_own_answers_have_their_line_and_span() {
    use tonic_health::pb::health_client::HealthClient;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_reflection::pb::v1;

    let (etcd, _backends, _regs) = echo_backends(1).await;
    let (otlp, received) = otlp_receiver().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let file = path.clone();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.observe.access_log = AccessLogTarget::File(file);
        a.observe.otlp_endpoint = Some(otlp.clone());
        a.observe.trace_sample_rate = 0.0;
    })
    .await;
    let ch = tonic::transport::Channel::from_shared(proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = HealthClient::new(ch.clone());
    let ask = |service: &str| HealthCheckRequest {
        service: service.to_owned(),
    };
    // The proxy itself, in the client's trace.
    let own = health.check(in_trace(ask(""))).await.unwrap().into_inner();
    assert_eq!(own.status, 1, "SERVING");
    // A name nobody registered: NOT_FOUND, answered by the proxy.
    let e = health.check(ask("no.such.Service")).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
    // Reflection: one request and its answer, then the client ends its stream.
    let mut reflection = v1::server_reflection_client::ServerReflectionClient::new(ch.clone());
    let list = v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(v1::server_reflection_request::MessageRequest::ListServices(
            String::new(),
        )),
    };
    let mut answers = reflection
        .server_reflection_info(tokio_stream::iter([list]))
        .await
        .unwrap()
        .into_inner();
    assert!(answers.message().await.unwrap().is_some(), "a listing");
    assert!(answers.message().await.unwrap().is_none(), "then the end");
    // A Watch the client gives up after its first update.
    let mut watch = health.watch(ask(ECHO)).await.unwrap().into_inner();
    assert!(watch.message().await.unwrap().is_some(), "an update");
    drop(watch);

    eventually(Duration::from_secs(10), "four access-log lines", || {
        let n = lines(&path).len();
        async move { n >= 4 }
    })
    .await;
    let l = lines(&path);
    assert_eq!(l.len(), 4, "{l:#?}");
    let line = |method: &str, status: i32| {
        l.iter()
            .find(|x| x["method"] == method && x["grpc_status"] == status)
            .unwrap_or_else(|| panic!("no line for {method} with status {status}: {l:#?}"))
    };
    let check = line("/grpc.health.v1.Health/Check", 0);
    let not_found = line("/grpc.health.v1.Health/Check", 5);
    let listed = line(
        "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
        0,
    );
    let watched = line("/grpc.health.v1.Health/Watch", 1);
    for x in [check, not_found, listed, watched] {
        assert!(x["backend"].is_null(), "answered by the proxy: {x}");
        assert_eq!(x["attempts"], 0, "{x}");
        assert_eq!(x["listener"], proxy.addr.to_string().as_str(), "{x}");
        assert!(x["response_bytes"].as_u64().is_some(), "{x}");
    }
    assert_eq!(check["service"], "grpc.health.v1.Health");
    assert_eq!(check["trace_id"], TRACE_ID, "the client's trace id");
    assert!(check["response_bytes"].as_u64().unwrap() > 0, "{check}");
    assert!(not_found["grpc_message"]
        .as_str()
        .is_some_and(|m| m.contains("no.such.Service")));
    assert_eq!(listed["service"], "grpc.reflection.v1.ServerReflection");
    assert!(listed["request_bytes"].as_u64().unwrap() > 0, "{listed}");
    assert!(listed["response_bytes"].as_u64().unwrap() > 0, "{listed}");

    // The sampled Check has its span, child of the client's, with no backend.
    eventually(Duration::from_secs(15), "the Check's span", || {
        let got = !received.0.lock().unwrap().is_empty();
        async move { got }
    })
    .await;
    let (_, span) = received.0.lock().unwrap()[0].clone();
    assert_eq!(span.name, "grpc.health.v1.Health/Check");
    assert_eq!(hex(&span.trace_id), TRACE_ID);
    assert_eq!(hex(&span.parent_span_id), CLIENT_SPAN);
    assert_eq!(int_attr(&span.attributes, "rpc.grpc.status_code"), Some(0));
    assert_eq!(text_attr(&span.attributes, "server.address"), None);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unsampled_parent_is_followed_whatever_the_rate() {
    // Rate 1: every call without a traceparent is traced.
    let Traced {
        proxy,
        seen,
        received,
        _reg,
        _etcd,
        ..
    } = traced_proxy(1.0).await;
    let mut c = client(proxy.addr).await;
    let unsampled = format!("00-{TRACE_ID}-{CLIENT_SPAN}-00");
    c.unary(traced("decided against", &[("traceparent", &unsampled)]))
        .await
        .unwrap();
    c.unary(traced("no parent", &[])).await.unwrap();

    // Spans are queued as calls end and exported in that order: once the second call's
    // span has arrived, a span of the first would have too.
    eventually(Duration::from_secs(15), "a span exported", || {
        let got = !received.0.lock().unwrap().is_empty();
        async move { got }
    })
    .await;
    let spans: Vec<Span> = received
        .0
        .lock()
        .unwrap()
        .iter()
        .map(|(_, s)| s.clone())
        .collect();
    assert_eq!(spans.len(), 1, "only the call without a parent: {spans:?}");
    assert_ne!(hex(&spans[0].trace_id), TRACE_ID, "a trace of its own");
    assert!(spans[0].parent_span_id.is_empty(), "a root span");

    let seen = seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(
        seen[0].traceparent.as_deref(),
        Some(unsampled.as_str()),
        "the client's unsampled traceparent passes through untouched"
    );
    assert_eq!(
        seen[1].traceparent,
        Some(format!(
            "00-{}-{}-01",
            hex(&spans[0].trace_id),
            hex(&spans[0].span_id)
        )),
        "the traced call's backend has the proxy's span as parent"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fractional_rate_samples_that_share_of_root_calls() {
    let Traced {
        proxy,
        seen,
        received,
        _reg,
        _etcd,
        ..
    } = traced_proxy(0.25).await;
    let mut c = client(proxy.addr).await;
    const CALLS: usize = 400;
    for _ in 0..CALLS {
        c.unary(traced("root", &[])).await.unwrap();
    }
    // The backend saw a proxy traceparent exactly on the sampled calls.
    let sampled = seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| s.traceparent.is_some())
        .count();
    // 100 expected; the bounds are more than 5 standard deviations (8.7) away.
    assert!(
        (55..=145).contains(&sampled),
        "{sampled} of {CALLS} sampled"
    );
    eventually(
        Duration::from_secs(15),
        "every sampled span exported",
        || {
            let got = received.0.lock().unwrap().len();
            async move { got == sampled }
        },
    )
    .await;
    proxy.shutdown().await;
}

/// The settings `switchyard proxy ARGS..` loads (without environment variables unless
/// the test process has them).
fn loaded(args: &[&str]) -> switchyard::settings::Loaded {
    let m = switchyard::settings::proxy_command()
        .try_get_matches_from(std::iter::once("proxy").chain(args.iter().copied()))
        .unwrap();
    switchyard::settings::load(&m).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relative_access_log_in_the_config_file_is_relative_to_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("switchyard.toml");
    let with = |access_log: &str| {
        std::fs::write(&config, format!("[observe]\naccess_log = {access_log:?}\n")).unwrap();
        let c = config.to_str().unwrap().to_owned();
        loaded(&["--config", &c]).proxy.observe.access_log
    };
    assert_eq!(
        with("logs/access.log"),
        AccessLogTarget::File(dir.path().join("logs/access.log")),
        "as the TLS and etcd files are"
    );
    assert_eq!(
        with("/var/log/sy.log"),
        AccessLogTarget::File("/var/log/sy.log".into())
    );
    assert_eq!(
        with("stdout"),
        AccessLogTarget::Stdout,
        "a word, not a path"
    );
    assert_eq!(with("-"), AccessLogTarget::Stdout);
    assert_eq!(with("off"), AccessLogTarget::Off);
    assert_eq!(
        with("./off"),
        AccessLogTarget::File(dir.path().join("./off")),
        "a file named off"
    );
    // A flag's relative path is the shell's: relative to the working directory.
    let c = config.to_str().unwrap().to_owned();
    let flagged = loaded(&["--config", &c, "--access-log", "here.log"]);
    assert_eq!(
        flagged.proxy.observe.access_log,
        AccessLogTarget::File("here.log".into())
    );

    // The binary, started elsewhere, writes its lines beside its config file.
    std::fs::write(&config, "[observe]\naccess_log = \"access.log\"\n").unwrap();
    let (etcd, _backends, _regs) = echo_backends(1).await;
    let p =
        SwitchyardProcess::proxy(&[etcd.endpoint().to_owned()], "info", &["--config", &c]).await;
    assert_ne!(std::env::current_dir().unwrap(), dir.path());
    let mut client = client(p.addr()).await;
    client.unary(req("beside its config")).await.unwrap();
    let path = dir.path().join("access.log");
    eventually(Duration::from_secs(10), "a line beside the config", || {
        let n = lines(&path).len();
        async move { n == 1 }
    })
    .await;
    assert_eq!(lines(&path)[0]["grpc_status"], 0);
}
