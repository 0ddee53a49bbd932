//! `grpc.health.v1.Health` answered by the proxy: Check and Watch follow the endpoint set.

use std::time::Duration;

use tonic::transport::Channel;
use tonic::Code;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

use crate::common::*;

const SVC: &str = "switchyard.echo.v1.Echo";
const WAIT: Duration = Duration::from_secs(20);

async fn health(addr: std::net::SocketAddr) -> HealthClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    HealthClient::new(ch)
}

fn ask(service: &str) -> HealthCheckRequest {
    HealthCheckRequest {
        service: service.to_owned(),
    }
}

/// The status a Check answers, or its error code.
async fn check(c: &HealthClient<Channel>, service: &str) -> Result<ServingStatus, Code> {
    match c.clone().check(ask(service)).await {
        Ok(r) => Ok(r.into_inner().status()),
        Err(s) => Err(s.code()),
    }
}

/// The next status a Watch sends (within `WAIT`).
async fn next(w: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>) -> ServingStatus {
    tokio::time::timeout(WAIT, w.message())
        .await
        .expect("a Watch update in time")
        .expect("the Watch stream stays open")
        .expect("an update, not the end of the stream")
        .status()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_and_watch_follow_keys_coming_and_going() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let c = health(proxy.addr).await;

    assert_eq!(check(&c, "").await, Ok(ServingStatus::Serving), "the proxy");
    assert_eq!(
        check(&c, SVC).await,
        Err(Code::NotFound),
        "nothing registered"
    );
    assert_eq!(check(&c, "not a name").await, Err(Code::NotFound));
    let mut watch = c.clone().watch(ask(SVC)).await.unwrap().into_inner();
    assert_eq!(next(&mut watch).await, ServingStatus::ServiceUnknown);

    let reg = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    assert_eq!(next(&mut watch).await, ServingStatus::Serving, "key added");
    assert_eq!(check(&c, SVC).await, Ok(ServingStatus::Serving));

    // The last endpoint leaves: the service is known, and down.
    delete(etcd.endpoint(), &reg.key).await;
    assert_eq!(
        next(&mut watch).await,
        ServingStatus::NotServing,
        "key deleted"
    );
    assert_eq!(check(&c, SVC).await, Ok(ServingStatus::NotServing));

    let _reg = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    assert_eq!(next(&mut watch).await, ServingStatus::Serving, "key back");

    // The key stays, the backend goes: its endpoint becomes unreachable.
    b1.shutdown().await;
    assert_eq!(
        next(&mut watch).await,
        ServingStatus::NotServing,
        "backend down"
    );
    assert_eq!(check(&c, SVC).await, Ok(ServingStatus::NotServing));
    // And an ordinary call on the same connection still goes through the forwarder.
    let err = client(proxy.addr).await.unary(req("x")).await.unwrap_err();
    assert_eq!(err.code(), Code::Unavailable, "{err:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_on_a_bound_listener_is_the_bound_service() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["bound.Svc"], |_| {}).await;
    let c = health(proxy.bound[0]).await;
    assert_eq!(
        check(&c, "").await,
        Ok(ServingStatus::NotServing),
        "no endpoint"
    );
    let mut watch = c.clone().watch(ask("")).await.unwrap().into_inner();
    assert_eq!(next(&mut watch).await, ServingStatus::NotServing);
    let _reg = register(etcd.endpoint(), "bound.Svc", b1.addr(), 5).await;
    assert_eq!(next(&mut watch).await, ServingStatus::Serving);
    for name in ["", "bound.Svc", SVC] {
        assert_eq!(
            check(&c, name).await,
            Ok(ServingStatus::Serving),
            "{name:?}"
        );
    }
    // Calls on the bound listener still reach the backend.
    assert_eq!(
        served_by(&mut client(proxy.bound[0]).await).await.unwrap(),
        "b1"
    );
    proxy.shutdown().await;

    // Asked to forward health, a bound listener passes it to the backend, which knows
    // only its own names.
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &["bound.Svc"], |a| {
        a.forward_health = true;
    })
    .await;
    let c = health(proxy.bound[0]).await;
    assert_eq!(check(&c, SVC).await, Ok(ServingStatus::Serving));
    assert_eq!(check(&c, "bound.Svc").await, Err(Code::NotFound));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_proxy_says_not_serving_and_ends_its_watches() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let _reg = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.timeouts.drain = Duration::from_secs(120);
    })
    .await;
    let c = health(proxy.addr).await;
    let mut own = c.clone().watch(ask("")).await.unwrap().into_inner();
    let mut svc = c.clone().watch(ask(SVC)).await.unwrap().into_inner();
    assert_eq!(next(&mut own).await, ServingStatus::Serving);
    assert_eq!(next(&mut svc).await, ServingStatus::Serving);
    let stopped = tokio::spawn(proxy.shutdown());
    for w in [&mut own, &mut svc] {
        assert_eq!(next_or_end(w).await, Some(ServingStatus::NotServing));
        assert_eq!(next_or_end(w).await, None, "the watch ends");
    }
    // Open watches do not hold the drain up for its whole timeout.
    tokio::time::timeout(Duration::from_secs(60), stopped)
        .await
        .expect("the proxy drains with watches open")
        .unwrap();
}

/// The next status of a Watch, or `None` when the stream ends (with OK).
async fn next_or_end(
    w: &mut tonic::Streaming<tonic_health::pb::HealthCheckResponse>,
) -> Option<ServingStatus> {
    tokio::time::timeout(WAIT, w.message())
        .await
        .expect("a Watch update in time")
        .expect("no error")
        .map(|r| r.status())
}
