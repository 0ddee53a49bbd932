//! Server reflection through the proxy with tonic's reflection client: list from etcd,
//! symbols and files from a backend of the service named, v1 and v1alpha.

use std::net::SocketAddr;
use std::time::Duration;

use prost::Message;
use switchyard::demo::EchoService;
use switchyard::echo::echo_server::EchoServer;
use tonic::transport::Channel;
use tonic::Code;
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

use crate::common::*;

const SVC: &str = "switchyard.echo.v1.Echo";
const WAIT: Duration = Duration::from_secs(20);

/// A reflection stream through the proxy: one request in, one answer out, in turn.
struct Reflection {
    tx: tokio::sync::mpsc::Sender<v1::ServerReflectionRequest>,
    rx: tonic::Streaming<v1::ServerReflectionResponse>,
}

impl Reflection {
    async fn open(addr: SocketAddr) -> Reflection {
        let ch = Channel::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut c = v1::server_reflection_client::ServerReflectionClient::new(ch);
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let rx = c
            .server_reflection_info(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .unwrap()
            .into_inner();
        Reflection { tx, rx }
    }

    async fn ask(&mut self, request: MessageRequest) -> MessageResponse {
        let req = v1::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(request.clone()),
        };
        self.tx.send(req).await.unwrap();
        let answer = tokio::time::timeout(WAIT, self.rx.message())
            .await
            .expect("an answer in time")
            .expect("no stream error")
            .expect("an answer");
        assert_eq!(
            answer.original_request.and_then(|r| r.message_request),
            Some(request),
            "the answer names its request"
        );
        answer.message_response.expect("a response")
    }
}

fn services(r: MessageResponse) -> Vec<String> {
    match r {
        MessageResponse::ListServicesResponse(l) => l.service.into_iter().map(|s| s.name).collect(),
        other => panic!("not a service list: {other:?}"),
    }
}

/// The files of a file descriptor response.
fn files(r: MessageResponse) -> Vec<prost_types::FileDescriptorProto> {
    match r {
        MessageResponse::FileDescriptorResponse(f) => f
            .file_descriptor_proto
            .iter()
            .map(|b| prost_types::FileDescriptorProto::decode(b.as_slice()).unwrap())
            .collect(),
        other => panic!("not a file descriptor response: {other:?}"),
    }
}

fn error(r: MessageResponse) -> (Code, String) {
    match r {
        MessageResponse::ErrorResponse(e) => (Code::from_i32(e.error_code), e.error_message),
        other => panic!("not an error response: {other:?}"),
    }
}

fn symbol(s: &str) -> MessageRequest {
    MessageRequest::FileContainingSymbol(s.to_owned())
}

/// An Echo backend without any reflection service.
async fn plain_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new("plain")))
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, task)
}

/// An Echo backend whose reflection service is `v1alpha` only (older servers).
async fn v1alpha_backend() -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(switchyard::echo::FILE_DESCRIPTOR_SET)
        .build_v1alpha()
        .unwrap();
    let task = tokio::spawn(async move {
        let _ = tonic::transport::Server::builder()
            .add_service(EchoServer::new(EchoService::new("alpha")))
            .add_service(reflection)
            .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
            .await;
    });
    (addr, task)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_lists_from_etcd_and_describes_from_backends() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let (plain, _plain) = plain_backend().await;
    let _r1 = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let _r2 = register(etcd.endpoint(), "plain.Svc", plain, 5).await;
    put(
        etcd.endpoint(),
        "elsewhere/other.Svc/127.0.0.1:1",
        "127.0.0.1:1",
    )
    .await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let mut r = Reflection::open(proxy.addr).await;

    let listed = services(r.ask(MessageRequest::ListServices(String::new())).await);
    assert_eq!(
        listed,
        ["grpc.health.v1.Health", "plain.Svc", SVC],
        "sorted, from etcd"
    );

    let echo = files(r.ask(symbol(SVC)).await);
    let file = echo
        .iter()
        .find(|f| f.package() == "switchyard.echo.v1")
        .expect("echo.proto");
    let methods: Vec<_> = file.service[0].method.iter().map(|m| m.name()).collect();
    assert_eq!(methods, ["Unary", "ServerStream", "ClientStream", "Bidi"]);
    // A method and a message type: the first names the service, the second goes to the
    // backend that answered before, and so does a file.
    assert_eq!(
        files(r.ask(symbol(&format!("{SVC}.Unary"))).await)[0].name(),
        file.name()
    );
    let by_type = files(r.ask(symbol("switchyard.echo.v1.EchoRequest")).await);
    assert_eq!(by_type[0].name(), file.name());
    let by_name = files(
        r.ask(MessageRequest::FileByFilename(file.name().to_owned()))
            .await,
    );
    assert_eq!(by_name[0].name(), file.name());

    // The proxy's own health service is described by the proxy.
    let health = files(r.ask(symbol("grpc.health.v1.Health")).await);
    assert_eq!(health[0].package(), "grpc.health.v1");
    assert_eq!(health[0].service[0].name(), "Health");

    let (code, msg) = error(r.ask(symbol("plain.Svc")).await);
    assert_eq!(code, Code::Unimplemented, "{msg}");
    assert!(
        msg.contains("'plain.Svc'") && msg.contains(&plain.to_string()),
        "{msg}"
    );
    let (code, msg) = error(r.ask(symbol("nope.Svc")).await);
    assert_eq!(code, Code::NotFound, "{msg}");
    // The stream is still usable after errors.
    assert_eq!(
        services(r.ask(MessageRequest::ListServices(String::new())).await).len(),
        3
    );

    // A call described this way goes through as usual.
    assert_eq!(
        served_by(&mut client(proxy.addr).await).await.unwrap(),
        "b1"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn v1alpha_clients_and_v1alpha_backends_work_too() {
    let etcd = EtcdProcess::start().await.unwrap();
    let (alpha, _alpha) = v1alpha_backend().await;
    let _r = register(etcd.endpoint(), SVC, alpha, 5).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;

    // A v1 client, a backend with v1alpha only.
    let mut r = Reflection::open(proxy.addr).await;
    let echo = files(r.ask(symbol(SVC)).await);
    assert!(echo.iter().any(|f| f.package() == "switchyard.echo.v1"));

    // A v1alpha client.
    let ch = Channel::from_shared(proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = v1alpha::server_reflection_client::ServerReflectionClient::new(ch);
    let req =
        |m: v1alpha::server_reflection_request::MessageRequest| v1alpha::ServerReflectionRequest {
            host: String::new(),
            message_request: Some(m),
        };
    use v1alpha::server_reflection_request::MessageRequest as Alpha;
    let mut answers = c
        .server_reflection_info(tokio_stream::iter([
            req(Alpha::ListServices(String::new())),
            req(Alpha::FileContainingSymbol(SVC.to_owned())),
        ]))
        .await
        .unwrap()
        .into_inner();
    use v1alpha::server_reflection_response::MessageResponse as AlphaAnswer;
    match answers.message().await.unwrap().unwrap().message_response {
        Some(AlphaAnswer::ListServicesResponse(l)) => {
            let names: Vec<_> = l.service.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(names, ["grpc.health.v1.Health", SVC]);
        }
        other => panic!("{other:?}"),
    }
    match answers.message().await.unwrap().unwrap().message_response {
        Some(AlphaAnswer::FileDescriptorResponse(f)) => {
            assert!(!f.file_descriptor_proto.is_empty())
        }
        other => panic!("{other:?}"),
    }
    assert!(
        answers.message().await.unwrap().is_none(),
        "ends with the requests"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_on_a_bound_listener_is_the_bound_service() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let _r = register(etcd.endpoint(), "user.rpc", b1.addr(), 5).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["user.rpc"], |_| {}).await;
    let mut r = Reflection::open(proxy.bound[0]).await;
    // The backend's own list, not etcd's.
    let listed = services(r.ask(MessageRequest::ListServices(String::new())).await);
    assert!(listed.iter().any(|s| s == SVC), "{listed:?}");
    assert!(!listed.iter().any(|s| s == "user.rpc"), "{listed:?}");
    assert!(!files(r.ask(symbol(SVC)).await).is_empty());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reflection_and_health_follow_routes_and_prefixes() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let b2 = EchoBackend::start("b2").await.unwrap();
    // Registered under a second prefix, and under a name that is not its gRPC service.
    let key = format!("fleet/echo-svc/{}", b1.addr());
    put(etcd.endpoint(), &key, &b1.addr().to_string()).await;
    let _r = register(etcd.endpoint(), "plain.Svc", b2.addr(), 5).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.etcd.prefix = vec!["services".into(), "fleet".into()];
        a.route = vec![format!("{SVC}=echo-svc").parse().unwrap()];
    })
    .await;
    let mut r = Reflection::open(proxy.addr).await;
    let listed = services(r.ask(MessageRequest::ListServices(String::new())).await);
    assert_eq!(
        listed,
        ["grpc.health.v1.Health", "plain.Svc", SVC],
        "routed name shown"
    );
    let echo = files(r.ask(symbol(&format!("{SVC}.Unary"))).await);
    assert!(echo.iter().any(|f| f.package() == "switchyard.echo.v1"));

    let ch = Channel::from_shared(proxy.url())
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(ch);
    for name in [SVC, "echo-svc"] {
        let status = health
            .check(tonic_health::pb::HealthCheckRequest {
                service: name.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(
            status,
            tonic_health::pb::health_check_response::ServingStatus::Serving,
            "{name}"
        );
    }
    assert_eq!(
        served_by(&mut client(proxy.addr).await).await.unwrap(),
        "b1"
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_root_prefix_is_listed_too() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    // With `--prefix /` keys are `/<service>/<address>`.
    put(
        etcd.endpoint(),
        &format!("/{SVC}/{}", b1.addr()),
        &b1.addr().to_string(),
    )
    .await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/".into()];
    })
    .await;
    let mut r = Reflection::open(proxy.addr).await;
    let listed = services(r.ask(MessageRequest::ListServices(String::new())).await);
    assert_eq!(listed, ["grpc.health.v1.Health", SVC]);
    // And its calls are served from there.
    assert_eq!(
        served_by(&mut client(proxy.addr).await).await.unwrap(),
        "b1"
    );
    proxy.shutdown().await;
}
