//! TLS end to end, with certificates made at test time: a TLS listener served to a tonic
//! client, TLS with a client certificate (mTLS) and a fixed server name (SNI) to backends,
//! active health checks over the backends' TLS connections, an etcd that requires TLS
//! client certificates, and user/password auth to etcd.
use crate::common::*;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use switchyard::demo::EchoService;
use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::echo_server::EchoServer;
use switchyard::health::ActiveCheck;
use switchyard::settings::AdminListen;
use tokio::net::TcpListener;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Identity, ServerTlsConfig};

const SVC: &str = "switchyard.echo.v1.Echo";
const WAIT: Duration = Duration::from_secs(20);

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap()
}

/// An Echo backend speaking TLS with `cert`/`key`; if `client_ca` is set, it requires
/// client certificates signed by it (mTLS). Stops when the returned sender drops.
async fn tls_backend(
    name: &str,
    cert: &Path,
    key: &Path,
    client_ca: Option<&str>,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let mut tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert), read(key)));
    if let Some(ca) = client_ca {
        tls = tls.client_ca_root(Certificate::from_pem(ca));
    }
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tonic::transport::Server::builder()
        .tls_config(tls)
        .unwrap()
        .add_service(EchoServer::new(EchoService::new(name)));
    tokio::spawn(async move {
        let _ = server
            .serve_with_incoming_shutdown(
                tokio_stream::wrappers::TcpListenerStream::new(listener),
                async {
                    let _ = stopped.await;
                },
            )
            .await;
    });
    (addr, stop)
}

/// A TLS Echo backend that also serves `grpc.health.v1.Health` (SERVING for the Echo
/// service until told otherwise) and counts the TCP connections it accepts.
struct CheckedTlsBackend {
    addr: SocketAddr,
    health: tonic_health::server::HealthReporter,
    accepted: Arc<AtomicU64>,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl CheckedTlsBackend {
    async fn start(name: &str, cert: &Path, key: &Path) -> CheckedTlsBackend {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tls = ServerTlsConfig::new().identity(Identity::from_pem(read(cert), read(key)));
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<EchoService>>().await;
        let accepted = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&accepted);
        let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).inspect(move |c| {
            if c.is_ok() {
                counted.fetch_add(1, Ordering::SeqCst);
            }
        });
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tonic::transport::Server::builder()
            .tls_config(tls)
            .unwrap()
            .add_service(health_service)
            .add_service(EchoServer::new(EchoService::new(name)));
        tokio::spawn(async move {
            let _ = server
                .serve_with_incoming_shutdown(incoming, async {
                    let _ = stopped.await;
                })
                .await;
        });
        CheckedTlsBackend {
            addr,
            health,
            accepted,
            _stop: stop,
        }
    }

    fn accepted(&self) -> u64 {
        self.accepted.load(Ordering::SeqCst)
    }
}

/// The `/endpoints` entries of `service`: (address, state, connections).
async fn endpoint_rows(admin: SocketAddr, service: &str) -> Vec<(String, String, u64)> {
    let body = admin_get(admin, "/endpoints")
        .await
        .expect("admin answers")
        .body;
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    json.as_array()
        .unwrap()
        .iter()
        .filter(|s| s["service"] == service)
        .flat_map(|s| s["endpoints"].as_array().unwrap().clone())
        .map(|e| {
            (
                e["address"].as_str().unwrap().to_owned(),
                e["state"].as_str().unwrap().to_owned(),
                e["connections"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_backends_pass_active_checks_on_their_one_connection() {
    init_tracing();
    let pki = TestPki::new();
    let (cert, key) = pki.issue("backend", &["127.0.0.1"]);
    let mut backends = Vec::new();
    for name in ["t0", "t1", "t2"] {
        backends.push(CheckedTlsBackend::start(name, &cert, &key).await);
    }
    let etcd = EtcdProcess::start().await.unwrap();
    let mut regs = Vec::new();
    for b in &backends {
        regs.push(register(etcd.endpoint(), SVC, b.addr, 10).await);
    }
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.upstream_tls.enabled = true;
        a.upstream_tls.ca = Some(pki.ca());
        a.admin.listen = AdminListen(Some(admin));
        a.health_check.kind = ActiveCheck::Grpc;
        a.health_check.interval = Duration::from_millis(500);
    })
    .await;
    let mut c = client(proxy.addr).await;
    // Every backend takes calls once its check has answered (over TLS: a plaintext
    // check gets no answer from these backends, and would take them out).
    let deadline = Instant::now() + WAIT;
    let mut seen = HashSet::new();
    while seen.len() < 3 {
        assert!(Instant::now() < deadline, "calls reached only {seen:?}");
        if let Ok(name) = served_by(&mut c).await {
            seen.insert(name);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Several check intervals later, all still in rotation, each on one connection, and
    // each backend accepted exactly one: calls and checks share it.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let rows = endpoint_rows(admin, SVC).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    for (addr, state, connections) in &rows {
        assert_eq!(state, "ready", "{addr}: {rows:?}");
        assert_eq!(*connections, 1, "{addr}: {rows:?}");
    }
    let mut tally = std::collections::HashMap::new();
    for _ in 0..30 {
        *tally.entry(served_by(&mut c).await.unwrap()).or_insert(0) += 1;
    }
    assert_eq!(tally.len(), 3, "{tally:?}");
    for b in &backends {
        assert_eq!(b.accepted(), 1, "{}: connections accepted", b.addr);
    }
    // The checks really read the backends' answers over TLS: one that says NOT_SERVING
    // is taken out, still on its one connection.
    backends[0]
        .health
        .set_not_serving::<EchoServer<EchoService>>()
        .await;
    let out = backends[0].addr.to_string();
    eventually(WAIT, "the NOT_SERVING backend shown unhealthy", || {
        let out = out.clone();
        async move {
            endpoint_rows(admin, SVC)
                .await
                .iter()
                .any(|(a, s, _)| *a == out && s == "unhealthy")
        }
    })
    .await;
    for _ in 0..10 {
        assert_ne!(served_by(&mut c).await.unwrap(), "t0");
    }
    assert!(backends.iter().all(|b| b.accepted() == 1));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_listener_serves_a_tonic_client_that_trusts_the_ca() {
    init_tracing();
    let pki = TestPki::new();
    let (cert, key) = pki.issue("proxy", &["localhost", "127.0.0.1"]);
    let etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("plain-backend").await.unwrap();
    let _r = register(etcd.endpoint(), SVC, b.addr(), 5).await;
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.tls.cert = Some(cert.clone());
        a.tls.key = Some(key.clone());
    })
    .await;

    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(pki.ca_pem()))
        .domain_name("localhost");
    let ch = Channel::from_shared(format!("https://{}", proxy.addr))
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = EchoClient::new(ch);
    assert_eq!(served_by(&mut c).await.unwrap(), "plain-backend");

    // A client that does not trust the CA cannot connect.
    let other = TestPki::new();
    let untrusting = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(other.ca_pem()))
        .domain_name("localhost");
    let refused = Channel::from_shared(format!("https://{}", proxy.addr))
        .unwrap()
        .tls_config(untrusting)
        .unwrap()
        .connect()
        .await;
    assert!(refused.is_err(), "a client with another CA connected");

    // Plaintext HTTP/2 on the TLS listener gets nowhere.
    let mut plain = EchoClient::new(
        Channel::from_shared(format!("http://{}", proxy.addr))
            .unwrap()
            .connect_timeout(Duration::from_secs(5))
            .timeout(Duration::from_secs(5))
            .connect_lazy(),
    );
    assert!(served_by(&mut plain).await.is_err());
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_that_require_client_certificates_get_them() {
    init_tracing();
    let pki = TestPki::new();
    let (backend_cert, backend_key) = pki.issue("backend", &["127.0.0.1"]);
    let (client_cert, client_key) = pki.issue("proxy-client", &["switchyard"]);
    let (addr, _stop) = tls_backend(
        "mtls-backend",
        &backend_cert,
        &backend_key,
        Some(&pki.ca_pem()),
    )
    .await;
    let etcd = EtcdProcess::start().await.unwrap();
    let _r = register(etcd.endpoint(), SVC, addr, 5).await;

    // With the client certificate: served.
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.upstream_tls.enabled = true;
        a.upstream_tls.ca = Some(pki.ca());
        a.upstream_tls.cert = Some(client_cert.clone());
        a.upstream_tls.key = Some(client_key.clone());
    })
    .await;
    let mut c = client(proxy.addr).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "mtls-backend");
    proxy.shutdown().await;

    // Without it: the backend refuses, and the proxy says the service is unavailable.
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.upstream_tls.enabled = true;
        a.upstream_tls.ca = Some(pki.ca());
        a.timeouts.connect = Duration::from_secs(2);
    })
    .await;
    let mut c = client(proxy.addr).await;
    let err = served_by(&mut c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_sni_names_the_backend_certificate() {
    init_tracing();
    let pki = TestPki::new();
    // The certificate names a host, not the address the backend registered.
    let (cert, key) = pki.issue("backend", &["echo.backend.test"]);
    let (addr, _stop) = tls_backend("sni-backend", &cert, &key, None).await;
    let etcd = EtcdProcess::start().await.unwrap();
    let _r = register(etcd.endpoint(), SVC, addr, 5).await;

    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.upstream_tls.enabled = true;
        a.upstream_tls.ca = Some(pki.ca());
        a.upstream_tls.sni = Some("echo.backend.test".into());
    })
    .await;
    let mut c = client(proxy.addr).await;
    assert_eq!(served_by(&mut c).await.unwrap(), "sni-backend");
    proxy.shutdown().await;

    // Verified against the backend's IP instead, the certificate does not match.
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.upstream_tls.enabled = true;
        a.upstream_tls.ca = Some(pki.ca());
        a.timeouts.connect = Duration::from_secs(2);
    })
    .await;
    let mut c = client(proxy.addr).await;
    let err = served_by(&mut c).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    proxy.shutdown().await;
}

/// An etcd that serves clients over TLS only and requires client certificates.
struct TlsEtcd {
    child: Child,
    endpoint: String,
    _dir: tempfile::TempDir,
}

impl Drop for TlsEtcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl TlsEtcd {
    async fn start(pki: &TestPki) -> TlsEtcd {
        let (cert, key) = pki.issue("etcd-server", &["localhost", "127.0.0.1"]);
        let dir = tempfile::tempdir().unwrap();
        let client_port = switchyard::testkit::free_port().unwrap();
        let peer = format!(
            "http://127.0.0.1:{}",
            switchyard::testkit::free_port().unwrap()
        );
        let endpoint = format!("https://127.0.0.1:{client_port}");
        let bin = std::env::var("SWITCHYARD_ETCD_BIN").unwrap_or_else(|_| "etcd".into());
        let child = Command::new(bin)
            .args(["--name", "tls"])
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer])
            .args(["--initial-advertise-peer-urls", &peer])
            .args(["--initial-cluster", &format!("tls={peer}")])
            .arg("--cert-file")
            .arg(&cert)
            .arg("--key-file")
            .arg(&key)
            .arg("--trusted-ca-file")
            .arg(pki.ca())
            .arg("--client-cert-auth")
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("etcd runs (install etcd-server)");
        let etcd = TlsEtcd {
            child,
            endpoint,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let (client_cert, client_key) = pki.issue("etcd-client", &["switchyard"]);
        loop {
            let ok = match etcd.client(pki, &client_cert, &client_key).await {
                Ok(mut c) => c.get("ready", None).await.is_ok(),
                Err(_) => false,
            };
            if ok {
                return etcd;
            }
            assert!(Instant::now() < deadline, "TLS etcd did not start");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    async fn client(
        &self,
        pki: &TestPki,
        cert: &Path,
        key: &Path,
    ) -> Result<etcd_client::Client, etcd_client::Error> {
        let tls = etcd_client::TlsOptions::new()
            .ca_certificate(etcd_client::Certificate::from_pem(pki.ca_pem()))
            .identity(etcd_client::Identity::from_pem(read(cert), read(key)));
        etcd_client::Client::connect(
            [self.endpoint.as_str()],
            Some(
                etcd_client::ConnectOptions::new()
                    .with_tls(tls)
                    .with_connect_timeout(Duration::from_secs(2))
                    .with_timeout(Duration::from_secs(5)),
            ),
        )
        .await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_over_mtls() {
    init_tracing();
    let pki = TestPki::new();
    let etcd = TlsEtcd::start(&pki).await;
    let (cert, key) = pki.issue("switchyard-etcd", &["switchyard"]);
    let b = EchoBackend::start("via-tls-etcd").await.unwrap();
    let mut c = etcd.client(&pki, &cert, &key).await.unwrap();
    c.put(
        format!("services/{SVC}/{}", b.addr()),
        b.addr().to_string(),
        None,
    )
    .await
    .unwrap();

    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(std::slice::from_ref(&etcd.endpoint), &[], |a| {
        a.etcd.ca = Some(pki.ca());
        a.etcd.cert = Some(cert.clone());
        a.etcd.key = Some(key.clone());
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    let mut c1 = client(proxy.addr).await;
    assert_eq!(served_by(&mut c1).await.unwrap(), "via-tls-etcd");
    eventually(WAIT, "ready with etcd over TLS", || async {
        admin_get(admin, "/readyz")
            .await
            .is_some_and(|r| r.status == 200)
    })
    .await;
    proxy.shutdown().await;

    // Without a client certificate etcd refuses: never ready, calls fail.
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(std::slice::from_ref(&etcd.endpoint), &[], |a| {
        a.etcd.ca = Some(pki.ca());
        a.admin.listen = AdminListen(Some(admin));
        a.timeouts.discovery = Duration::from_secs(2);
    })
    .await;
    let mut c2 = client(proxy.addr).await;
    let err = served_by(&mut c2).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    let r = admin_get(admin, "/readyz").await.unwrap();
    assert_eq!(r.status, 503, "{}", r.body);
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_with_user_and_password() {
    init_tracing();
    let mut etcd = EtcdProcess::start().await.unwrap();
    let b = EchoBackend::start("via-auth-etcd").await.unwrap();
    put(
        etcd.endpoint(),
        &format!("services/{SVC}/{}", b.addr()),
        &b.addr().to_string(),
    )
    .await;
    let mut c = etcd.client().await.unwrap();
    let _ = c.role_add("root").await;
    c.user_add("root", "rootpw", None).await.unwrap();
    c.user_grant_role("root", "root").await.unwrap();
    c.role_add("reader").await.unwrap();
    c.role_grant_permission(
        "reader",
        etcd_client::Permission::read("services/").with_prefix(),
    )
    .await
    .unwrap();
    c.user_add("switchyard", "s3cret", None).await.unwrap();
    c.user_grant_role("switchyard", "reader").await.unwrap();
    c.auth_enable().await.unwrap();

    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.etcd.user = Some("switchyard".into());
        a.etcd.password = Some("s3cret".into());
    })
    .await;
    let mut c1 = client(proxy.addr).await;
    assert_eq!(served_by(&mut c1).await.unwrap(), "via-auth-etcd");
    proxy.shutdown().await;

    // A wrong password: the proxy does not start (etcd-client authenticates on connect).
    let wrong = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.etcd.user = Some("switchyard".into());
        a.etcd.password = Some("wrong".into());
    })
    .await;
    let mut wrong = wrong;
    let task = wrong.task.take().unwrap();
    let res = tokio::time::timeout(WAIT, task).await.unwrap().unwrap();
    let err = res.unwrap_err().to_string();
    assert!(err.contains("etcd"), "{err}");

    // etcd down at start: the proxy starts anyway and authenticates once etcd is back.
    etcd.kill();
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &[], |a| {
        a.etcd.user = Some("switchyard".into());
        a.etcd.password = Some("s3cret".into());
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    eventually(WAIT, "admin answers while etcd is down", || async {
        admin_get(admin, "/healthz").await.is_some()
    })
    .await;
    etcd.respawn().unwrap();
    let c2 = client(proxy.addr).await;
    eventually(WAIT, "served once etcd is back", || {
        let mut c = c2.clone();
        async move { served_by(&mut c).await.is_ok_and(|n| n == "via-auth-etcd") }
    })
    .await;
    proxy.shutdown().await;
}
