//! Discovery through the in-memory source: what a service publishes as its source's
//! updates come, and a reload's second watch taking over, without etcd.

use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::balance::Backend;
use crate::endpoint::{BackendAddr, Endpoint};
use crate::upstream::State;

/// How long a test waits for a watch task to act on an update.
const PATIENCE: Duration = Duration::from_secs(5);

fn live(prefixes: &[&str]) -> LiveConfig {
    LiveConfig {
        prefixes: prefixes.iter().map(|p| (*p).to_owned()).collect(),
        max_services: 16,
        balance: BalanceSettings::default(),
        service_balance: HashMap::new(),
        health: HealthSettings::default(),
        steering: Default::default(),
        traffic: HashMap::new(),
    }
}

fn discovery_with(source: &Arc<StaticSource>, upstream: UpstreamConfig) -> Arc<Discovery> {
    Discovery::new(
        Arc::clone(source) as Arc<dyn EndpointSource>,
        DiscoveryConfig {
            live: live(&["a"]),
            service_idle: Duration::from_secs(60),
            upstream,
            metrics: Metrics::new(),
        },
    )
}

fn discovery(source: &Arc<StaticSource>) -> Arc<Discovery> {
    discovery_with(source, UpstreamConfig::default())
}

fn ep(addr: &str) -> Endpoint {
    Endpoint::new(addr.parse().unwrap())
}

fn eps(addrs: &[&str]) -> Vec<Endpoint> {
    addrs.iter().map(|a| ep(a)).collect()
}

fn addr(a: &str) -> BackendAddr {
    a.parse().unwrap()
}

fn snapshot(service: &Service) -> Vec<String> {
    let mut v: Vec<_> = service
        .endpoints()
        .iter()
        .map(|b| b.addr().to_string())
        .collect();
    v.sort();
    v
}

fn backend_of(service: &Service, a: &str) -> Option<Arc<Backend>> {
    let a = addr(a);
    service.endpoints().iter().find(|b| *b.addr() == a).cloned()
}

/// Waits until `service`'s snapshot lists exactly `want` (sorted), or fails the test.
async fn until_snapshot(service: &Service, want: &[&str]) {
    let mut changes = service.subscribe();
    let wait = async {
        while snapshot(service) != want {
            changes.changed().await.expect("service alive");
        }
    };
    if tokio::time::timeout(PATIENCE, wait).await.is_err() {
        panic!("snapshot {:?}, want {want:?}", snapshot(service));
    }
}

/// Waits until `cond` holds, or fails the test with `what`.
async fn until(what: &str, cond: impl Fn() -> bool) {
    let wait = async {
        while !cond() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    assert!(
        tokio::time::timeout(PATIENCE, wait).await.is_ok(),
        "timed out waiting for {what}"
    );
}

#[tokio::test]
async fn a_service_s_snapshot_follows_its_source() {
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    assert_eq!(source.live_watches("svc"), 1);
    assert!(!s.is_loaded());
    // Nothing listening on these loopback ports: connects fail at once.
    source.push("svc", Update::Reset(eps(&["127.0.0.1:1", "127.0.0.1:2"])));
    assert!(s.wait_loaded(PATIENCE).await);
    assert_eq!(snapshot(&s), ["127.0.0.1:1", "127.0.0.1:2"]);
    let kept = backend_of(&s, "127.0.0.1:2").unwrap();

    source.push("svc", Update::Add(eps(&["127.0.0.1:3"])));
    until_snapshot(&s, &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]).await;
    source.push("svc", Update::Remove(vec![addr("127.0.0.1:1")]));
    until_snapshot(&s, &["127.0.0.1:2", "127.0.0.1:3"]).await;
    // A weight change is published (the rotation follows weights), same backend.
    source.push("svc", Update::Add(vec![ep("127.0.0.1:2").with_weight(5)]));
    until("the new weight", || kept.weight() == 5).await;
    assert!(backend_of(&s, "127.0.0.1:2").is_some_and(|b| Arc::ptr_eq(&b, &kept)));
    // A re-listing keeps what it still lists.
    source.push("svc", Update::Reset(eps(&["127.0.0.1:2", "127.0.0.1:4"])));
    until_snapshot(&s, &["127.0.0.1:2", "127.0.0.1:4"]).await;
    assert!(backend_of(&s, "127.0.0.1:2").is_some_and(|b| Arc::ptr_eq(&b, &kept)));

    assert!(!s.etcd_reachable());
    source.push("svc", Update::Reachable(true));
    until("reachable", || s.etcd_reachable()).await;
    source.push("svc", Update::Reachable(false));
    until("unreachable", || !s.etcd_reachable()).await;
    // The last listing stands while the source cannot see its registry.
    assert_eq!(snapshot(&s), ["127.0.0.1:2", "127.0.0.1:4"]);
}

#[tokio::test]
async fn a_service_is_loaded_by_its_first_full_listing_only() {
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    source.push("svc", Update::Reachable(true));
    source.push("svc", Update::Add(eps(&["127.0.0.1:1"])));
    assert!(!s.wait_loaded(Duration::from_millis(100)).await);
    assert!(
        !s.etcd_reachable(),
        "nothing published: not this watch's to say"
    );
    // An empty listing loads the service, which has never been served.
    source.push("svc", Update::Reset(Vec::new()));
    assert!(s.wait_loaded(PATIENCE).await);
    until("reachable", || s.etcd_reachable()).await;
    assert!(snapshot(&s).is_empty());
    assert!(!s.ever_served());
}

#[tokio::test]
async fn a_service_once_served_says_so_after_its_last_endpoint_left() {
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    assert!(!s.ever_served());
    source.push("svc", Update::Reset(eps(&["127.0.0.1:1"])));
    until_snapshot(&s, &["127.0.0.1:1"]).await;
    assert!(s.ever_served());
    source.push("svc", Update::Remove(vec![addr("127.0.0.1:1")]));
    until_snapshot(&s, &[]).await;
    assert!(s.ever_served());
}

#[tokio::test]
async fn a_reload_s_new_watch_takes_over_with_its_first_listing() {
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    source.push_to(
        "svc",
        &["a"],
        Update::Reset(eps(&["127.0.0.1:1", "127.0.0.1:2"])),
    );
    until_snapshot(&s, &["127.0.0.1:1", "127.0.0.1:2"]).await;
    source.push_to("svc", &["a"], Update::Reachable(true));
    until("reachable", || s.etcd_reachable()).await;
    let kept = backend_of(&s, "127.0.0.1:2").unwrap();

    // New prefixes: a second watch. Until it has listed them, the first one publishes.
    assert_eq!(d.reconfigure(live(&["b"])), ["etcd.prefix"]);
    assert_eq!(source.live_watches("svc"), 2);
    source.push_to("svc", &["b"], Update::Add(eps(&["127.0.0.1:9"])));
    source.push_to("svc", &["a"], Update::Add(eps(&["127.0.0.1:3"])));
    until_snapshot(&s, &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]).await;
    source.push_to(
        "svc",
        &["b"],
        Update::Reset(eps(&["127.0.0.1:2", "127.0.0.1:4"])),
    );
    until_snapshot(&s, &["127.0.0.1:2", "127.0.0.1:4"]).await;
    // An address listed by both keeps its backend (connection, state).
    assert!(backend_of(&s, "127.0.0.1:2").is_some_and(|b| Arc::ptr_eq(&b, &kept)));
    // The first watch is stopped; the new one has not said it sees its registry.
    until("the first watch to stop", || {
        source.live_watches("svc") == 1
    })
    .await;
    assert_eq!(source.push_to("svc", &["a"], Update::Reachable(false)), 0);
    assert!(!s.etcd_reachable());
    source.push_to("svc", &["b"], Update::Reachable(true));
    until("reachable", || s.etcd_reachable()).await;
    // A dropped discovery stops its watches.
    drop(s);
    drop(d);
    until("every watch to stop", || source.live_watches("svc") == 0).await;
}

#[tokio::test]
async fn tls_endpoints_are_left_out_without_tls_to_backends() {
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    let mut grpcs = ep("127.0.0.1:4");
    grpcs.tls = true;
    source.push("svc", Update::Reset(vec![grpcs, ep("127.0.0.1:5")]));
    until_snapshot(&s, &["127.0.0.1:5"]).await;
}

/// A listener that accepts connections and never answers (a backend that hangs).
async fn silent_listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let a = l.local_addr().unwrap().to_string();
    (l, a)
}

#[cfg(feature = "demo")]
#[tokio::test]
async fn a_new_service_s_first_snapshot_has_its_endpoints_connected() {
    let mut backends = Vec::new();
    for i in 0..3 {
        backends.push(
            crate::demo::EchoBackend::start(&format!("b{i}"))
                .await
                .unwrap(),
        );
    }
    let source = Arc::new(StaticSource::new());
    let d = discovery(&source);
    let s = d.service("svc").unwrap();
    let listing = backends
        .iter()
        .map(|b| Endpoint::new(b.addr().to_string().parse().unwrap()))
        .collect();
    source.push("svc", Update::Reset(listing));
    assert!(s.wait_loaded(PATIENCE).await);
    let states: Vec<State> = s.endpoints().iter().map(|b| b.upstream().state()).collect();
    assert_eq!(states, [State::Ready; 3]);
    // So the first calls go round the three.
    let set = s.endpoints_full();
    let mut picked: Vec<_> = (0..3)
        .map(|_| s.balancer().select_with(&set, |_| true).unwrap().0)
        .collect();
    picked.sort();
    assert_eq!(picked, [0, 1, 2]);
}

#[tokio::test]
async fn a_hanging_endpoint_holds_the_first_snapshot_only_for_the_bound() {
    let (_silent, silent) = silent_listener().await;
    let source = Arc::new(StaticSource::new());
    let upstream = UpstreamConfig {
        connect_timeout: Duration::from_secs(30),
        ..UpstreamConfig::default()
    };
    let d = discovery_with(&source, upstream);
    let s = d.service("svc").unwrap();
    let started = std::time::Instant::now();
    source.push("svc", Update::Reset(eps(&[&silent, "127.0.0.1:1"])));
    assert!(s.wait_loaded(PATIENCE).await);
    let waited = started.elapsed();
    // It waited for the hanging one's attempt, up to the bound (1 s), not the 30 s
    // connect timeout.
    assert!(
        waited >= FIRST_SNAPSHOT_SETTLE.saturating_sub(Duration::from_millis(50)),
        "{waited:?}"
    );
    assert_eq!(snapshot(&s).len(), 2);
    let hanging = backend_of(&s, &silent).unwrap();
    assert_eq!(hanging.upstream().state(), State::Connecting);
    source.push("svc", Update::Remove(vec![addr("127.0.0.1:1")]));
    until_snapshot(&s, &[&silent]).await;
}
