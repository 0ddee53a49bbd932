//! Registration metrics and the `switchyard register` sidecar's admin listener, against a
//! real etcd, a real Echo backend and the real binary.
use crate::common::*;

use std::net::SocketAddr;
use std::time::Duration;

use switchyard::metrics::{render, RegistrationMetrics};
use switchyard::registration::{Registration, RegistrationSpec};

const WAIT: Duration = Duration::from_secs(20);

/// `/metrics` of the listener at `admin`, as text (empty if nothing answers).
async fn metrics_text(admin: SocketAddr) -> String {
    admin_get(admin, "/metrics")
        .await
        .map(|r| r.body)
        .unwrap_or_default()
}

/// The value of `name{service=...,extra...}` in `/metrics` at `admin`.
async fn sample(admin: SocketAddr, name: &str, service: &str, extra: &[(&str, &str)]) -> f64 {
    let mut labels = vec![("service", service)];
    labels.extend_from_slice(extra);
    metric(&metrics_text(admin).await, name, &labels).unwrap_or(f64::NAN)
}

/// The lease of `key`, if the key is present.
async fn key_lease(etcd: &str, key: &str) -> Option<i64> {
    let mut c = etcd_client::Client::connect([etcd], None).await.ok()?;
    let resp = c.get(key, None).await.ok()?;
    resp.kvs().first().map(|kv| kv.lease())
}

/// `/readyz` status at `admin` (0 if nothing answers).
async fn readyz(admin: SocketAddr) -> u16 {
    admin_get(admin, "/readyz").await.map_or(0, |r| r.status)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_reports_held_keys_and_events_when_given_metrics() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    // Registration metrics of a library user: in a registry of its own.
    let registry = prometheus::Registry::new();
    let registrations = RegistrationMetrics::new(&registry);
    let reg = Registration::start(
        etcd.client().await.unwrap(),
        RegistrationSpec::new("svc-lib", "127.0.0.1:5000")
            .ttl(Duration::from_secs(3))
            .metrics(registrations.clone()),
    )
    .await
    .unwrap();
    let value = |name: &str, labels: &[(&str, &str)]| {
        metric(&String::from_utf8(render(&registry)).unwrap(), name, labels)
    };
    assert_eq!(
        value("switchyard_registrations", &[("service", "svc-lib")]),
        Some(1.0)
    );
    let registered = [("service", "svc-lib"), ("event", "registered")];
    assert_eq!(
        value("switchyard_registration_events_total", &registered),
        Some(1.0)
    );
    reg.deregister().await.unwrap();
    assert_eq!(
        value("switchyard_registrations", &[("service", "svc-lib")]),
        Some(0.0)
    );
    assert_eq!(
        value(
            "switchyard_registration_events_total",
            &[("service", "svc-lib"), ("event", "deregistered")]
        ),
        Some(1.0)
    );

    // A dropped handle no longer holds its key.
    let reg = Registration::start(
        etcd.client().await.unwrap(),
        RegistrationSpec::new("svc-lib", "127.0.0.1:5001")
            .ttl(Duration::from_secs(3))
            .metrics(registrations.clone()),
    )
    .await
    .unwrap();
    assert_eq!(
        value("switchyard_registrations", &[("service", "svc-lib")]),
        Some(1.0)
    );
    drop(reg);
    eventually(WAIT, "held count back to 0 after drop", || async {
        value("switchyard_registrations", &[("service", "svc-lib")]) == Some(0.0)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_admin_follows_health_and_counts_a_lost_lease() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("adm").await.unwrap();
    let addr = backend.addr().to_string();
    let admin = switchyard::testkit::free_addr().unwrap();
    let admin_s = admin.to_string();
    let svc = "svc-adm";
    let key = format!("services/{svc}/{addr}");
    let _sidecar = SwitchyardProcess::spawn(
        &[
            "register",
            "--etcd-endpoints",
            etcd.endpoint(),
            "--service",
            svc,
            "--addr",
            &addr,
            "--ttl",
            "3s",
            "--health-check",
            "grpc",
            "--health-interval",
            "200ms",
            "--health-timeout",
            "2s",
            "--unhealthy-after",
            "1",
            "--admin-listen",
            &admin_s,
        ],
        &[],
    );

    // Registered: ready, one key held, backend healthy.
    eventually(WAIT, "/readyz 200 once registered", || async {
        readyz(admin).await == 200
    })
    .await;
    assert!(key_lease(etcd.endpoint(), &key).await.is_some());
    assert_eq!(
        sample(admin, "switchyard_registrations", svc, &[]).await,
        1.0
    );
    assert_eq!(
        sample(admin, "switchyard_backend_healthy", svc, &[]).await,
        1.0
    );
    let health = admin_get(admin, "/healthz").await.unwrap();
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let metrics = admin_get(admin, "/metrics").await.unwrap();
    assert!(metrics
        .content_type
        .starts_with("text/plain; version=0.0.4"));
    assert_eq!(admin_get(admin, "/nope").await.unwrap().status, 404);

    // NOT_SERVING: key withdrawn, not ready (with the reason), nothing held.
    backend.set_serving(false).await;
    eventually(WAIT, "key gone and /readyz 503 on NOT_SERVING", || async {
        key_lease(etcd.endpoint(), &key).await.is_none() && readyz(admin).await == 503
    })
    .await;
    let ready = admin_get(admin, "/readyz").await.unwrap();
    assert!(
        ready.body.contains("health check"),
        "reason: {:?}",
        ready.body
    );
    assert_eq!(
        sample(admin, "switchyard_registrations", svc, &[]).await,
        0.0
    );
    assert_eq!(
        sample(admin, "switchyard_backend_healthy", svc, &[]).await,
        0.0
    );

    // SERVING again: back.
    backend.set_serving(true).await;
    eventually(WAIT, "/readyz 200 and 1 held on SERVING", || async {
        readyz(admin).await == 200
            && sample(admin, "switchyard_registrations", svc, &[]).await == 1.0
    })
    .await;
    let lost = [("event", "lease_lost")];
    let lost_before = sample(admin, "switchyard_registration_events_total", svc, &lost).await;
    assert!(
        lost_before.is_nan() || lost_before == 0.0,
        "no lease lost yet: {lost_before}"
    );

    // The lease revoked from outside: counted, and registered again under a new lease.
    let lease = key_lease(etcd.endpoint(), &key).await.unwrap();
    etcd.client()
        .await
        .unwrap()
        .lease_revoke(lease)
        .await
        .unwrap();
    eventually(WAIT, "lease_lost counted", || async {
        sample(admin, "switchyard_registration_events_total", svc, &lost).await >= 1.0
    })
    .await;
    eventually(WAIT, "registered again under a new lease", || async {
        key_lease(etcd.endpoint(), &key)
            .await
            .is_some_and(|l| l != lease)
            && readyz(admin).await == 200
            && sample(admin, "switchyard_registrations", svc, &[]).await == 1.0
    })
    .await;
    // First registration, back after the pause, again after the lost lease (more if a
    // health probe failed by chance on a loaded machine).
    let registered = [("event", "registered")];
    let n = sample(
        admin,
        "switchyard_registration_events_total",
        svc,
        &registered,
    )
    .await;
    assert!(n >= 3.0, "registered events: {n}");
    drop(backend);
}

#[test]
fn sidecar_admin_listen_is_off_by_default_and_checked() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["register", "--service", "a", "--addr", "127.0.0.1:1"])
        .args(["--admin-listen", "localhost"])
        .env_clear()
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--admin-listen"), "{stderr}");
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["register", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("SWITCHYARD_REGISTER_ADMIN_LISTEN") && help.contains("[default: off]"),
        "{help}"
    );
}
