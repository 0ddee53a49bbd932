mod common;
use common::*;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn smoke_proxy_forwards_a_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("b1").await.unwrap();
    let _r = register(etcd.endpoint(), "switchyard.echo.v1.Echo", b.addr(), 5).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let mut c = client(proxy.addr).await;
    let name = tokio::time::timeout(Duration::from_secs(10), served_by(&mut c))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, "b1");
    proxy.shutdown().await;
}
