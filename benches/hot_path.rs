//! Micro benchmarks of the per-call hot path (criterion): choosing the service from a
//! request, picking an endpoint from a snapshot of 3 and of 1,000 endpoints, building the
//! upstream request, and a call's end (policy state, health, metrics); and, off the call
//! path, how long one endpoint's change takes to reach a new snapshot of a service of
//! 1,000 endpoints (through the in-memory endpoint source, as etcd's watch would send it).
//!
//! `cargo bench --bench hot_path` (a few seconds per benchmark). The end-to-end
//! comparison with direct calls, nginx and HAProxy is `benches/e2e/`.

use std::hint::black_box;
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use http::{HeaderValue, Method, Request};

use strum::IntoEnumIterator as _;
use switchyard::balance::{
    Backend, BalanceSettings, Balancer, EndpointSet, Policy, Steering, Subset, TrafficRules,
};
use switchyard::call::{Arrival, BackendCall, Outcome};
use switchyard::discovery::{Discovery, DiscoveryConfig, LiveConfig, StaticSource, Update};
use switchyard::endpoint::{BackendAddr, Endpoint};
use switchyard::health::HealthSettings;
use switchyard::metrics::{status_slot, Metrics};
use switchyard::proxy::body::H2Body;
use switchyard::proxy::forward::MAX_ATTEMPTS;
use switchyard::proxy::grpc::{grpc_timeout, is_grpc, set_authority};
use switchyard::proxy::replay::ReplayBody;
use switchyard::route::service_from_path;
use switchyard::testkit::h2_pair::{H2Pair, H2Stream};
use switchyard::upstream::{Upstream, UpstreamConfig};

const PATH: &str = "/switchyard.echo.v1.Echo/Unary";

/// The headers a typical gRPC client (tonic, grpc-go) sends with a unary call.
fn grpc_request() -> Request<()> {
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(PATH)
        .version(http::Version::HTTP_2)
        .body(())
        .expect("static request");
    let h = req.headers_mut();
    h.insert("content-type", HeaderValue::from_static("application/grpc"));
    h.insert("te", HeaderValue::from_static("trailers"));
    h.insert("grpc-timeout", HeaderValue::from_static("998m"));
    h.insert(
        "user-agent",
        HeaderValue::from_static("grpc-go/1.64.0 switchyard-bench"),
    );
    h.insert("grpc-accept-encoding", HeaderValue::from_static("gzip"));
    req
}

fn endpoint_set(n: usize, balancer: &Balancer) -> EndpointSet {
    labelled_set(n, balancer, |_| None)
}

/// `n` endpoints as [`endpoint_set`], endpoint `i` with the metadata `meta(i)`.
fn labelled_set(
    n: usize,
    balancer: &Balancer,
    meta: impl Fn(usize) -> Option<serde_json::Value>,
) -> EndpointSet {
    let cfg = UpstreamConfig::default();
    balancer.snapshot(
        (0..n)
            .map(|i| {
                let addr: BackendAddr = format!("10.0.{}.{}:50051", i / 250, i % 250 + 1)
                    .parse()
                    .expect("valid address");
                let up = Upstream::new(addr.clone(), &cfg);
                // As in production once connected: the preferred endpoints.
                up.assume_ready();
                let mut ep = Endpoint::new(addr);
                ep.metadata = meta(i);
                Backend::new(up, &ep, balancer)
            })
            .collect(),
    )
}

/// Route: content-type check, service from the path, lookup of the watched service.
fn bench_route(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    // An in-memory source: the lookups below never reach a registry.
    let discovery = Discovery::new(
        Arc::new(StaticSource::new()),
        DiscoveryConfig {
            live: LiveConfig {
                prefixes: vec!["services".into()],
                max_services: 1024,
                balance: Default::default(),
                service_balance: Default::default(),
                health: Default::default(),
                steering: Default::default(),
                traffic: Default::default(),
            },
            service_idle: std::time::Duration::from_secs(60),
            upstream: UpstreamConfig::default(),
            metrics: Metrics::new(),
        },
    );
    // 100 watched services, as on a busy host.
    for i in 0..99 {
        discovery
            .service(&format!("pkg.v1.Service{i}"))
            .expect("service");
    }
    discovery
        .service("switchyard.echo.v1.Echo")
        .expect("service");
    let req = grpc_request();
    c.bench_function("route/service_from_path", |b| {
        b.iter(|| service_from_path(black_box(req.uri().path())))
    });
    c.bench_function("route/checks+lookup (100 services)", |b| {
        b.iter(|| {
            let req = black_box(&req);
            assert!(is_grpc(req.headers()));
            let timeout = grpc_timeout(req.headers());
            let name = service_from_path(req.uri().path()).expect("valid path");
            (discovery.service(name).expect("watched"), timeout)
        })
    });
}

/// Pick: each policy over a snapshot, as `forward` does it (with its tried-set check).
fn bench_pick(c: &mut Criterion) {
    for n in [3usize, 1000] {
        for policy in Policy::iter() {
            let name = policy.name();
            let settings = Arc::new(BalanceSettings {
                policy,
                ..BalanceSettings::default()
            });
            let balancer = Balancer::new("bench", settings, HealthSettings::default());
            let set = Arc::new(endpoint_set(n, &balancer));
            // Round-robin keeps its historical name, for comparisons across runs.
            let label = if policy == Policy::RoundRobin {
                "round_robin"
            } else {
                name
            };
            c.bench_function(&format!("pick/{label} of {n}"), |b| {
                b.iter(|| {
                    let tried = black_box([usize::MAX; MAX_ATTEMPTS]);
                    let (idx, up) = balancer
                        .select_with(&set, |i| !tried.contains(&i))
                        .expect("usable endpoint");
                    black_box((idx, up.addr().port()))
                })
            });
            if policy != Policy::RoundRobin {
                continue;
            }
            let shared = arc_swap::ArcSwap::new(Arc::clone(&set));
            c.bench_function(&format!("pick/snapshot load + round_robin of {n}"), |b| {
                b.iter(|| {
                    let set = shared.load_full();
                    let (idx, up) = balancer
                        .select_with(&set, |_| true)
                        .expect("usable endpoint");
                    black_box((idx, Arc::clone(up)))
                })
            });
        }
    }
}

/// Pick, steered: round-robin as `forward` does it with a zone (half of the endpoints in
/// it), and with a 95/5 split between versions (the subset chosen from the request's
/// headers, then the pick within it, with the zone), beside the plain pick it adds to.
fn bench_steered_pick(c: &mut Criterion) {
    let (parts, ()) = grpc_request().into_parts();
    let meta = |i: usize| {
        Some(serde_json::json!({
            "zone": if i.is_multiple_of(2) { "a" } else { "b" },
            "version": if i.is_multiple_of(20) { "v2" } else { "v1" },
        }))
    };
    let subset = |v: &str| Subset::new([("version".to_owned(), v.to_owned())].into());
    let split = Arc::new(TrafficRules {
        matches: Vec::new(),
        splits: vec![(subset("v1"), 95), (subset("v2"), 5)],
        strict: false,
    });
    for n in [3usize, 1000] {
        let cases = [
            ("plain", Steering::default()),
            (
                "zone",
                Steering {
                    zone: Some("a".into()),
                    ..Steering::default()
                },
            ),
            (
                "95/5 split",
                Steering {
                    traffic: Some(Arc::clone(&split)),
                    ..Steering::default()
                },
            ),
            (
                "95/5 split + zone",
                Steering {
                    zone: Some("a".into()),
                    traffic: Some(Arc::clone(&split)),
                    ..Steering::default()
                },
            ),
        ];
        for (label, steering) in cases {
            let balancer = Balancer::new(
                "bench",
                Arc::new(BalanceSettings::default()),
                HealthSettings::default(),
            );
            balancer.set_steering(steering);
            let set = Arc::new(labelled_set(n, &balancer, meta));
            c.bench_function(&format!("pick/steered {label}, round_robin of {n}"), |b| {
                b.iter(|| {
                    let tried = black_box([usize::MAX; MAX_ATTEMPTS]);
                    let steer = balancer.steer(black_box(&parts.headers));
                    let (idx, up) = balancer
                        .select_steered(&set, steer, |i| !tried.contains(&i))
                        .expect("not strict")
                        .expect("usable endpoint");
                    black_box((idx, up.addr().port()))
                })
            });
        }
    }
}

/// Build: the upstream request from the client's (parts kept for a retry, authority set),
/// and the replayable body wrapper.
fn bench_build(c: &mut Criterion) {
    let addr: BackendAddr = "127.0.0.1:50051".parse().expect("valid address");
    let (parts, ()) = grpc_request().into_parts();
    c.bench_function("build/upstream request (clone parts + authority)", |b| {
        b.iter(|| {
            let mut req = Request::from_parts(parts.clone(), ());
            set_authority(&mut req, black_box(&addr)).expect("valid uri");
            req
        })
    });
    // The body wrapped is a real request stream's, received over an in-memory HTTP/2
    // connection (set up outside the timed part; a batch holds 64 streams open at once).
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut pair = rt.block_on(H2Pair::start()).expect("in-memory HTTP/2");
    c.bench_function("build/replayable body (wrap, try_clone, commit)", |b| {
        b.iter_batched(
            || rt.block_on(pair.stream(true)).expect("in-memory stream"),
            |stream| {
                let H2Stream {
                    recv,
                    response,
                    send,
                    respond,
                } = stream;
                let body = ReplayBody::new(H2Body::new(recv));
                let retry = body.try_clone();
                body.commit();
                (body, retry, (response, send, respond))
            },
            BatchSize::NumIterations(64),
        )
    });
}

/// A call's end: what every forwarded call records, through one guard (arrival, the
/// attempt on its backend, status, end: the policy's state, health, metrics).
fn bench_call_end(c: &mut Criterion) {
    let metrics = Metrics::new();
    let service = metrics.service("switchyard.echo.v1.Echo");
    let cfg = UpstreamConfig::default();
    let ok = HeaderValue::from_static("0");
    for policy in Policy::iter() {
        let name = policy.name();
        let settings = Arc::new(BalanceSettings {
            policy,
            ..BalanceSettings::default()
        });
        let balancer = Balancer::new("bench", settings, HealthSettings::default())
            .with_metrics(Arc::clone(&service));
        let addr: BackendAddr = "127.0.0.1:50051".parse().expect("valid address");
        let up = Upstream::new(addr.clone(), &cfg);
        up.assume_ready();
        let backend = Backend::new(up, &Endpoint::new(addr), &balancer);
        let _set = balancer.snapshot(vec![Arc::clone(&backend)]);
        c.bench_function(
            &format!("call/end ({name}: arrive, send, answer, status, end)"),
            |b| {
                b.iter(|| {
                    let arrival = Arrival::new(&service);
                    let mut call = BackendCall::start(black_box(&backend));
                    call.answered(std::time::Instant::now());
                    call.carry(arrival);
                    call.set_outcome(Outcome::Status(status_slot(Some(black_box(&ok))) as u8));
                    drop(call);
                })
            },
        );
    }
}

/// Discovery: one endpoint's new weight, from the source's update to the published
/// snapshot (reconciled into the backends, snapshot and rotation rebuilt), for a service
/// of 1,000 endpoints.
fn bench_update(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let _enter = rt.enter();
    let source = Arc::new(StaticSource::new());
    let discovery = Discovery::new(
        Arc::clone(&source) as _,
        DiscoveryConfig {
            live: LiveConfig {
                prefixes: vec!["services".into()],
                max_services: 16,
                balance: Default::default(),
                service_balance: Default::default(),
                health: Default::default(),
                steering: Default::default(),
                traffic: Default::default(),
            },
            service_idle: std::time::Duration::from_secs(60),
            // Documentation addresses (RFC 5737): connects go nowhere, and the first
            // snapshot's wait for them is kept short.
            upstream: UpstreamConfig {
                connect_timeout: std::time::Duration::from_millis(10),
                ..UpstreamConfig::default()
            },
            metrics: Metrics::new(),
        },
    );
    let name = "bench.v1.Service";
    let service = discovery.service(name).expect("service");
    let endpoint = |i: usize| {
        let addr: BackendAddr = format!("192.0.{}.{}:50051", 2 + i / 250, i % 250 + 1)
            .parse()
            .expect("valid address");
        Endpoint::new(addr)
    };
    source.push(name, Update::Reset((0..1000).map(endpoint).collect()));
    let mut changes = service.subscribe();
    rt.block_on(async {
        while service.endpoints().len() < 1000 {
            changes.changed().await.expect("service alive");
        }
    });
    let mut weight = 1;
    c.bench_function("discovery/one weight change of 1000 endpoints", |b| {
        b.iter(|| {
            weight = 3 - weight;
            source.push(name, Update::Add(vec![endpoint(500).with_weight(weight)]));
            rt.block_on(changes.changed()).expect("service alive");
        })
    });
}
criterion_group!(
    benches,
    bench_route,
    bench_pick,
    bench_steered_pick,
    bench_build,
    bench_call_end,
    bench_update
);
criterion_main!(benches);
