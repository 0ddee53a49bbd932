//! Registration against a real etcd: the library, the `switchyard register` sidecar
//! (the real binary where a test must signal or kill it), and `switchyard endpoints`.
use crate::common::*;

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;
use switchyard::registration::sidecar::{run_until, RegisterArgs};
use switchyard::registration::{Registration, RegistrationSpec, RegistrationState};
use switchyard::registry::ValueFormat;
use switchyard::settings::EtcdSettings;

const ECHO: &str = "switchyard.echo.v1.Echo";

/// The value and lease of `key`, if present.
async fn get(etcd: &str, key: &str) -> Option<(String, i64)> {
    let mut c = etcd_client::Client::connect([etcd], None).await.ok()?;
    let resp = c.get(key, None).await.ok()?;
    resp.kvs()
        .first()
        .map(|kv| (String::from_utf8_lossy(kv.value()).into_owned(), kv.lease()))
}

/// Remaining TTL of `lease` as etcd reports it (-1: no such lease).
async fn lease_ttl(etcd: &str, lease: i64) -> i64 {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.lease_time_to_live(lease, None).await.unwrap().ttl()
}

/// A client built the way the proxy and sidecar build theirs.
async fn switchyard_client(etcd: &str) -> etcd_client::Client {
    switchyard::etcd::connect(&EtcdSettings::local(etcd))
        .await
        .unwrap()
}

/// A sidecar process, killed when dropped.
struct Sidecar(Child);

impl Sidecar {
    fn spawn(etcd: &str, args: &[&str]) -> Sidecar {
        let verbose = std::env::var_os("RUST_LOG").is_some();
        let child = Command::new(env!("CARGO_BIN_EXE_switchyard"))
            .arg("register")
            .args(["--etcd-endpoints", etcd])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(if verbose {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .spawn()
            .unwrap();
        Sidecar(child)
    }

    fn signal(&self, sig: &str) {
        let ok = Command::new("kill")
            .args([sig, &self.0.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "kill {sig} failed");
    }

    /// Waits (polling) for the process to exit; returns its exit code.
    async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.0.try_wait().unwrap() {
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "sidecar still running after {within:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for Sidecar {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn key_present(etcd: &str, key: &str) -> bool {
    get(etcd, key).await.is_some()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn library_registers_under_a_lease_and_deregisters() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let reg = Registration::start(
        switchyard_client(etcd.endpoint()).await,
        RegistrationSpec::new("svc-a", "127.0.0.1:5001")
            .ttl(Duration::from_secs(3))
            .metadata(serde_json::json!({"zone": "z1"})),
    )
    .await
    .unwrap();
    assert_eq!(reg.key(), "services/svc-a/127.0.0.1:5001");
    let (value, lease) = get(etcd.endpoint(), reg.key()).await.unwrap();
    assert_eq!(
        value,
        r#"{"Op":0,"Addr":"127.0.0.1:5001","Metadata":{"zone":"z1"}}"#
    );
    assert_ne!(lease, 0, "key has no lease");
    assert_eq!(reg.current_state(), RegistrationState::Registered { lease });
    let ttl = lease_ttl(etcd.endpoint(), lease).await;
    assert!((1..=3).contains(&ttl), "lease ttl {ttl}");

    // Kept alive: still there well after the TTL.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(get(etcd.endpoint(), reg.key()).await.unwrap().1, lease);

    let key = reg.key().to_owned();
    reg.deregister().await.unwrap();
    assert!(
        get(etcd.endpoint(), &key).await.is_none(),
        "key left after deregister"
    );
    assert_eq!(
        lease_ttl(etcd.endpoint(), lease).await,
        -1,
        "lease not revoked"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropped_handle_stops_keepalive_and_key_expires() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let reg = Registration::start(
        switchyard_client(etcd.endpoint()).await,
        RegistrationSpec::new("svc-d", "127.0.0.1:5004")
            .ttl(Duration::from_secs(2))
            .format(ValueFormat::Plain),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();
    assert_eq!(
        get(etcd.endpoint(), &key).await.unwrap().0,
        "127.0.0.1:5004"
    );
    drop(reg);
    eventually(Duration::from_secs(10), "key expired after drop", || {
        let k = key.clone();
        let e = etcd.endpoint().to_owned();
        async move { !key_present(&e, &k).await }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_fails_with_a_typed_transient_error_when_etcd_is_down() {
    init_tracing();
    let port = switchyard::testkit::free_port().unwrap();
    let client = switchyard_client(&format!("http://127.0.0.1:{port}")).await;
    let err = Registration::start(
        client,
        RegistrationSpec::new("svc", "127.0.0.1:1").request_timeout(Duration::from_secs(2)),
    )
    .await
    .unwrap_err();
    assert!(err.is_transient(), "{err:?} not transient");
    assert!(
        err.to_string().contains("services/svc/127.0.0.1:1"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lease_revoked_from_outside_is_registered_again() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let reg = Registration::start(
        switchyard_client(etcd.endpoint()).await,
        RegistrationSpec::new("svc-r", "127.0.0.1:5002").ttl(Duration::from_secs(3)),
    )
    .await
    .unwrap();
    let mut state = reg.state();
    let (_, lease) = get(etcd.endpoint(), reg.key()).await.unwrap();
    let mut c = etcd.client().await.unwrap();
    c.lease_revoke(lease).await.unwrap();
    // Revoking deletes the key; the registration notices and puts it back.
    let key = reg.key().to_owned();
    eventually(
        Duration::from_secs(15),
        "registered again with a new lease",
        || {
            let (k, e) = (key.clone(), etcd.endpoint().to_owned());
            async move { matches!(get(&e, &k).await, Some((_, l)) if l != 0 && l != lease) }
        },
    )
    .await;
    let new = tokio::time::timeout(
        Duration::from_secs(10),
        state.wait_for(|s| matches!(s, RegistrationState::Registered { lease: l } if *l != lease)),
    )
    .await
    .unwrap()
    .unwrap()
    .to_owned();
    let (_, lease_now) = get(etcd.endpoint(), &key).await.unwrap();
    assert_eq!(new, RegistrationState::Registered { lease: lease_now });
    reg.deregister().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_restarted_with_data_wiped_is_registered_again() {
    init_tracing();
    let mut etcd = EtcdProcess::start().await.unwrap();
    let reg = Registration::start(
        switchyard_client(etcd.endpoint()).await,
        RegistrationSpec::new("svc-w", "127.0.0.1:5003").ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();
    assert!(key_present(etcd.endpoint(), &key).await);
    etcd.restart_wiped().await.unwrap();
    eventually(
        Duration::from_secs(30),
        "registered again after wipe",
        || {
            let (k, e) = (key.clone(), etcd.endpoint().to_owned());
            async move { matches!(get(&e, &k).await, Some((_, l)) if l != 0) }
        },
    )
    .await;
    // And kept alive under the new lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let (_, lease) = get(etcd.endpoint(), &key).await.unwrap();
    assert!(lease_ttl(etcd.endpoint(), lease).await > 0);
    assert_eq!(reg.current_state(), RegistrationState::Registered { lease });
    reg.deregister().await.unwrap();
    assert!(!key_present(etcd.endpoint(), &key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_down_past_the_ttl_shows_not_registered_then_recovers() {
    init_tracing();
    let mut etcd = EtcdProcess::start().await.unwrap();
    let reg = Registration::start(
        switchyard_client(etcd.endpoint()).await,
        RegistrationSpec::new("svc-o", "127.0.0.1:5007").ttl(Duration::from_secs(2)),
    )
    .await
    .unwrap();
    let key = reg.key().to_owned();
    let mut state = reg.state();
    etcd.kill();
    // The lease cannot be renewed: once its TTL has passed the handle says so.
    tokio::time::timeout(
        Duration::from_secs(15),
        state.wait_for(|s| *s == RegistrationState::Pending),
    )
    .await
    .expect("state still registered with etcd down past the TTL")
    .unwrap();
    etcd.restart().await.unwrap();
    tokio::time::timeout(
        Duration::from_secs(30),
        state.wait_for(|s| s.is_registered()),
    )
    .await
    .expect("not registered again after etcd came back")
    .unwrap();
    let (_, lease) = get(etcd.endpoint(), &key).await.unwrap();
    assert_eq!(reg.current_state(), RegistrationState::Registered { lease });
    assert!(lease_ttl(etcd.endpoint(), lease).await > 0);
    reg.deregister().await.unwrap();
    assert!(!key_present(etcd.endpoint(), &key).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_killed_with_sigkill_key_expires_within_ttl() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let key = "services/svc-k/127.0.0.1:5005";
    let mut sidecar = Sidecar::spawn(
        etcd.endpoint(),
        &[
            "--service",
            "svc-k",
            "--addr",
            "127.0.0.1:5005",
            "--ttl",
            "3s",
        ],
    );
    eventually(Duration::from_secs(20), "sidecar registered", || {
        key_present(etcd.endpoint(), key)
    })
    .await;
    // Let a few keep-alives pass, so the key outlives the first TTL.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        key_present(etcd.endpoint(), key).await,
        "key not kept alive"
    );
    sidecar.0.kill().unwrap();
    let killed = Instant::now();
    sidecar.0.wait().unwrap();
    eventually(
        Duration::from_secs(10),
        "key gone after kill -9",
        || async { !key_present(etcd.endpoint(), key).await },
    )
    .await;
    let took = killed.elapsed();
    assert!(
        took <= Duration::from_secs(4),
        "key gone {took:?} after kill -9; TTL is 3s"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecar_on_sigterm_deregisters_at_once_and_exits_0() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let key = "services/svc-t/127.0.0.1:5006";
    for sig in ["-TERM", "-INT"] {
        // A long TTL: the key can only be gone quickly if it was deleted.
        let mut sidecar = Sidecar::spawn(
            etcd.endpoint(),
            &[
                "--service",
                "svc-t",
                "--addr",
                "127.0.0.1:5006",
                "--ttl",
                "60s",
            ],
        );
        eventually(Duration::from_secs(20), "sidecar registered", || {
            key_present(etcd.endpoint(), key)
        })
        .await;
        let (_, lease) = get(etcd.endpoint(), key).await.unwrap();
        sidecar.signal(sig);
        assert_eq!(
            sidecar.wait_exit(Duration::from_secs(15)).await,
            Some(0),
            "exit code after {sig}"
        );
        assert!(
            !key_present(etcd.endpoint(), key).await,
            "key left after {sig}"
        );
        assert_eq!(lease_ttl(etcd.endpoint(), lease).await, -1, "lease left");
    }
}

/// Parses `switchyard register` flags as the binary would.
#[derive(Parser)]
struct RegisterCli {
    #[command(flatten)]
    args: RegisterArgs,
}

fn register_args(etcd: &str, extra: &[&str]) -> RegisterArgs {
    let mut argv = vec!["register", "--etcd-endpoints", etcd];
    argv.extend_from_slice(extra);
    RegisterCli::try_parse_from(argv).unwrap().args
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gate_follows_grpc_serving_status() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("h1").await.unwrap();
    let addr = backend.addr();
    let addr_s = addr.to_string();
    let key = format!("services/svc-h/{addr}");
    let args = register_args(
        etcd.endpoint(),
        &[
            "--service",
            "svc-h",
            "--addr",
            &addr_s,
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
        ],
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sidecar = tokio::spawn(run_until(args, async move {
        let _ = stopped.await;
    }));
    let present = |want: bool| {
        let (k, e) = (key.clone(), etcd.endpoint().to_owned());
        move || {
            let (k, e) = (k.clone(), e.clone());
            async move { key_present(&e, &k).await == want }
        }
    };
    eventually(
        Duration::from_secs(20),
        "registered while SERVING",
        present(true),
    )
    .await;
    backend.set_serving(false).await;
    eventually(
        Duration::from_secs(20),
        "key removed on NOT_SERVING",
        present(false),
    )
    .await;
    backend.set_serving(true).await;
    eventually(
        Duration::from_secs(20),
        "key back on SERVING",
        present(true),
    )
    .await;

    // Unreachable counts as unhealthy; a backend back on the same address recovers.
    backend.shutdown().await;
    eventually(
        Duration::from_secs(20),
        "key removed when unreachable",
        present(false),
    )
    .await;
    let backend = EchoBackend::start_on(addr, "h1").await.unwrap();
    eventually(
        Duration::from_secs(20),
        "key back when reachable",
        present(true),
    )
    .await;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), sidecar)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(
        !key_present(etcd.endpoint(), &key).await,
        "key left at shutdown"
    );
    drop(backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_gate_waits_for_the_backend_before_registering() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let addr = switchyard::testkit::free_addr().unwrap();
    let addr_s = addr.to_string();
    let key = format!("services/svc-tcp/{addr}");
    let args = register_args(
        etcd.endpoint(),
        &[
            "--service",
            "svc-tcp",
            "--addr",
            &addr_s,
            "--health-check",
            "tcp",
            "--health-interval",
            "200ms",
        ],
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let sidecar = tokio::spawn(run_until(args, async move {
        let _ = stopped.await;
    }));
    // Nothing listens yet: several probes fail and nothing is registered.
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !key_present(etcd.endpoint(), &key).await,
        "registered a dead backend"
    );
    let backend = EchoBackend::start_on(addr, "t1").await.unwrap();
    eventually(Duration::from_secs(20), "registered once listening", || {
        key_present(etcd.endpoint(), &key)
    })
    .await;
    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(15), sidecar)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    assert!(!key_present(etcd.endpoint(), &key).await);
    drop(backend);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_routes_to_a_sidecar_registered_backend() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("via-sidecar").await.unwrap();
    let addr = backend.addr().to_string();
    let mut sidecar = Sidecar::spawn(
        etcd.endpoint(),
        &[
            "--service",
            ECHO,
            "--addr",
            &addr,
            "--ttl",
            "3s",
            "--health-check",
            "grpc",
        ],
    );
    let key = format!("services/{ECHO}/{addr}");
    eventually(Duration::from_secs(20), "sidecar registered", || {
        key_present(etcd.endpoint(), &key)
    })
    .await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let mut c = client(proxy.addr).await;
    let name = tokio::time::timeout(Duration::from_secs(10), served_by(&mut c))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(name, "via-sidecar");

    // After the sidecar deregisters, the proxy has no endpoint for the service.
    sidecar.signal("-TERM");
    assert_eq!(sidecar.wait_exit(Duration::from_secs(15)).await, Some(0));
    eventually(Duration::from_secs(10), "proxy stops routing", || {
        let mut c = c.clone();
        async move { served_by(&mut c).await.is_err() }
    })
    .await;
    proxy.shutdown().await;
}

/// Runs the binary with `args`; returns (exit code, stdout, stderr).
fn run_binary(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_register_arguments_exit_2_naming_the_argument() {
    let cases: &[(&[&str], &str)] = &[
        (&["register", "--addr", "127.0.0.1:1"], "--service"),
        (
            &["register", "--service", "a b", "--addr", "127.0.0.1:1"],
            "--service",
        ),
        (
            &["register", "--service", "a", "--addr", "localhost"],
            "--addr",
        ),
        (
            &["register", "--service", "a", "--addr", "0.0.0.0:80"],
            "--addr",
        ),
        (
            &["register", "--service", "a", "--addr", "h:1", "--ttl", "1s"],
            "--ttl",
        ),
        (
            &[
                "register",
                "--service",
                "a",
                "--addr",
                "h:1",
                "--ttl",
                "2.5s",
            ],
            "--ttl",
        ),
        (
            &[
                "register",
                "--service",
                "a",
                "--addr",
                "h:1",
                "--metadata",
                "novalue",
            ],
            "--metadata",
        ),
        (
            &[
                "register",
                "--service",
                "a",
                "--addr",
                "h:1",
                "--metadata",
                "k=v",
                "--format",
                "plain",
            ],
            "--metadata",
        ),
        (
            &[
                "register",
                "--service",
                "a",
                "--addr",
                "h:1",
                "--health-check",
                "http",
            ],
            "--health-check",
        ),
    ];
    for (args, names) in cases {
        let (code, _, stderr) = run_binary(args);
        assert_eq!(code, Some(2), "{args:?}: {stderr}");
        assert!(
            stderr.contains(names),
            "{args:?}: {stderr:?} does not name {names}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn endpoints_lists_decoded_entries_and_malformed_values() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let reg = Registration::start(
        switchyard_client(e).await,
        RegistrationSpec::new("svc-l", "127.0.0.1:6001")
            .ttl(Duration::from_secs(30))
            .metadata(serde_json::json!({"zone": "z9"})),
    )
    .await
    .unwrap();
    put(e, "services/svc-l/127.0.0.1:6002", "127.0.0.1:6002").await;
    put(e, "services/svc-l/junk", "not an address").await;
    put(e, "services/other/10.0.0.1:7", "10.0.0.1:7").await;

    let (code, stdout, stderr) = run_binary(&["endpoints", "--json", "--etcd-endpoints", e]);
    assert_eq!(code, Some(0), "{stderr}");
    let list: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(list.len(), 4, "{stdout}");
    let by_key = |k: &str| {
        list.iter()
            .find(|x| x["key"] == k)
            .unwrap_or_else(|| panic!("{k} not listed: {stdout}"))
    };
    let a = by_key("services/svc-l/127.0.0.1:6001");
    assert_eq!(a["service"], "svc-l");
    assert_eq!(a["addr"], "127.0.0.1:6001");
    assert_eq!(a["format"], "etcd-naming");
    assert_eq!(a["metadata"], serde_json::json!({"zone": "z9"}));
    let ttl = a["ttl_left"].as_i64().unwrap();
    assert!((1..=30).contains(&ttl), "ttl_left {ttl}");
    assert!(a["error"].is_null());
    let b = by_key("services/svc-l/127.0.0.1:6002");
    assert_eq!(b["format"], "plain");
    assert!(b["lease"].is_null() && b["ttl_left"].is_null());
    let junk = by_key("services/svc-l/junk");
    assert!(
        junk["error"].as_str().unwrap().contains("not host:port"),
        "{junk}"
    );

    // One service, as a table.
    let (code, stdout, stderr) = run_binary(&["endpoints", "svc-l", "--etcd-endpoints", e]);
    assert_eq!(code, Some(0), "{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 4, "{stdout}");
    assert!(lines[0].starts_with("SERVICE"));
    assert!(stdout.contains("127.0.0.1:6001") && stdout.contains(r#"{"zone":"z9"}"#));
    assert!(stdout.contains("MALFORMED"));
    assert!(
        !stdout.contains("10.0.0.1:7"),
        "other service listed: {stdout}"
    );
    reg.deregister().await.unwrap();
}

/// A loopback relay to `upstream` that holds every chunk coming back for `delay`: etcd
/// applies a request at once, its answer reaches the client late.
async fn slow_answers(upstream: String, delay: Duration) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let upstream = upstream.trim_start_matches("http://").to_owned();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let Ok(server) = tokio::net::TcpStream::connect(&upstream).await else {
                continue;
            };
            let (mut cr, mut cw) = client.into_split();
            let (mut sr, mut sw) = server.into_split();
            tokio::spawn(async move {
                let _ = tokio::io::copy(&mut cr, &mut sw).await;
            });
            tokio::spawn(async move {
                use tokio::io::{AsyncReadExt, AsyncWriteExt};
                let mut buf = vec![0u8; 64 * 1024];
                while let Ok(n @ 1..) = sr.read(&mut buf).await {
                    tokio::time::sleep(delay).await;
                    if cw.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    format!("http://{addr}")
}

/// A shutdown that comes while the registration's put is in flight (the key already in
/// etcd, the sidecar not yet told) must still take the key back: a stopping backend must
/// not stay registered until its lease expires.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shutdown_while_registering_leaves_no_key_behind() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("stopping").await.unwrap();
    let addr = backend.addr().to_string();
    let key = format!("services/svc-stop/{addr}");
    // The sidecar talks to etcd through a relay that delays etcd's answers, so its key is
    // in etcd well before it learns that its put succeeded; it is stopped right then.
    let slow = slow_answers(etcd.endpoint().to_owned(), Duration::from_millis(100)).await;
    let args = register_args(
        &slow,
        &["--service", "svc-stop", "--addr", &addr, "--ttl", "30s"],
    );
    let (e, k) = (etcd.endpoint().to_owned(), key.clone());
    let shutdown = async move {
        let mut c = etcd_client::Client::connect([e.as_str()], None)
            .await
            .unwrap();
        while c.get(k.as_str(), None).await.unwrap().kvs().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    };
    tokio::time::timeout(Duration::from_secs(30), run_until(args, shutdown))
        .await
        .expect("the sidecar stops")
        .expect("the sidecar stops cleanly");
    assert!(
        !key_present(etcd.endpoint(), &key).await,
        "the key outlived the sidecar (its lease would keep it 30 s)"
    );
}
