//! Restarts, upgrades and reloads fail no call: two proxy processes on one port
//! (SO_REUSEPORT handover), systemd socket activation (a supervisor holds the socket
//! across stop-then-start restarts), and SIGHUP reloads of the config file. A client
//! calls throughout, fail-fast (a call that finds no proxy fails: no wait-for-ready), on
//! one kept connection and on a new connection per call; like gRPC's own clients it
//! sends a call again once if it never left the client (see `never_sent`).
use crate::common::*;

use std::net::SocketAddr;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub(crate) const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// What the calling client saw.
#[derive(Debug, Default)]
pub(crate) struct Tally {
    pub(crate) ok: usize,
    pub(crate) failed: Vec<String>,
    /// The backend that answered the last call.
    pub(crate) last: String,
}

/// Clients calling through `addr` until dropped.
pub(crate) struct Calling {
    stop: Arc<AtomicBool>,
    pub(crate) tally: Arc<Mutex<Tally>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Calling {
    /// One loop on a kept connection, one on a new connection per call; at most 5,000
    /// calls each, a 5 s deadline per call.
    pub(crate) fn start(addr: SocketAddr) -> Calling {
        let stop = Arc::new(AtomicBool::new(false));
        let tally = Arc::new(Mutex::new(Tally::default()));
        let mut tasks = Vec::new();
        for fresh in [false, true] {
            let (stop, tally) = (Arc::clone(&stop), Arc::clone(&tally));
            tasks.push(tokio::spawn(async move {
                let mut kept = None;
                for _ in 0..5_000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let result = tokio::time::timeout(Duration::from_secs(5), async {
                        let ch = match (&kept, fresh) {
                            (Some(ch), false) => Clone::clone(ch),
                            _ => tonic::transport::Channel::from_shared(format!("http://{addr}"))
                                .unwrap()
                                .connect()
                                .await
                                .map_err(|e| format!("connect: {e:?}"))?,
                        };
                        if !fresh {
                            kept = Some(ch.clone());
                        }
                        let mut c = switchyard::echo::echo_client::EchoClient::new(ch);
                        match served_by(&mut c).await {
                            // Transparent retry, as gRPC's C-core, Java and Go clients do
                            // (gRFC A6) and tonic does not: the call never left the client
                            // (its connection was going away), so it is sent again once.
                            Err(s) if never_sent(&s) => served_by(&mut c).await,
                            r => r,
                        }
                        .map_err(|s| format!("{s:?}"))
                    })
                    .await
                    .unwrap_or_else(|_| Err("no answer within 5 s".into()));
                    {
                        let mut t = tally.lock().unwrap();
                        match result {
                            Ok(server) => {
                                t.ok += 1;
                                t.last = server;
                            }
                            Err(e) => t.failed.push(format!(
                                "{} connection: {e}",
                                if fresh { "new" } else { "kept" }
                            )),
                        }
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }));
        }
        Calling { stop, tally, tasks }
    }

    pub(crate) fn ok(&self) -> usize {
        self.tally.lock().unwrap().ok
    }

    /// Waits until `n` more calls succeeded (up to 20 s).
    pub(crate) async fn more(&self, n: usize) {
        let want = self.ok() + n;
        eventually(Duration::from_secs(20), "calls go on", || async {
            self.ok() >= want
        })
        .await;
    }

    /// Stops calling; returns the tally.
    pub(crate) async fn finish(self) -> Tally {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            t.await.unwrap();
        }
        std::mem::take(&mut *self.tally.lock().unwrap())
    }
}

/// Whether a call failed before it left the client: hyper dropped it because the
/// connection closed, or refused to start it on a connection that got GOAWAY.
fn never_sent(s: &tonic::Status) -> bool {
    let shown = format!("{s:?}");
    shown.contains("GoAway(") || shown.contains("Canceled, \"connection closed\"")
}

/// etcd with one Echo backend (named "b") registered.
async fn echo_service() -> (EtcdProcess, EchoBackend, TestRegistration) {
    let etcd = EtcdProcess::start().await.unwrap();
    let backend = EchoBackend::start("b").await.unwrap();
    let reg = register(
        etcd.endpoint(),
        "switchyard.echo.v1.Echo",
        backend.addr(),
        5,
    )
    .await;
    (etcd, backend, reg)
}

/// Asserts that no call failed.
pub(crate) fn assert_none_failed(tally: &Tally) {
    assert!(
        tally.failed.is_empty(),
        "{} failed of {}: {:?}",
        tally.failed.len(),
        tally.ok,
        &tally.failed[..tally.failed.len().min(5)]
    );
}

/// Sends `sig` (`-TERM`, `-HUP`) to `pid`.
pub(crate) fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill {sig} {pid}");
}

/// A proxy process with `args`, logging at info without colours.
fn proxy(args: &[&str]) -> SwitchyardProcess {
    let mut cmd = Command::new(BIN);
    cmd.arg("proxy")
        .args(args)
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null());
    SwitchyardProcess::launch(cmd, None)
}

pub(crate) fn wait_logged(p: &SwitchyardProcess, parts: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.logged(parts) {
        assert!(
            Instant::now() < deadline,
            "no log line with {parts:?}:\n{}",
            p.log_text()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_proxy_on_the_same_port_takes_over_without_a_failed_call() {
    let (etcd, _backend, _reg) = echo_service().await;
    let listen = switchyard::testkit::free_addr().unwrap().to_string();
    let admin = |a: SocketAddr| a.to_string();
    let (admin1, admin2) = (
        admin(switchyard::testkit::free_addr().unwrap()),
        admin(switchyard::testkit::free_addr().unwrap()),
    );
    let args = |admin: &str| {
        vec![
            "--listen".to_owned(),
            listen.clone(),
            "--etcd-endpoints".to_owned(),
            etcd.endpoint().to_owned(),
            "--admin-listen".to_owned(),
            admin.to_owned(),
        ]
    };
    let strs = |v: &[String]| {
        v.iter()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join("\u{0}")
    };
    let a1 = strs(&args(&admin1));
    let mut first = proxy(&a1.split('\u{0}').collect::<Vec<_>>());
    wait_listening(listen.parse().unwrap(), Duration::from_secs(20)).await;
    let calling = Calling::start(listen.parse().unwrap());
    calling.more(50).await;

    // The new process binds the same port while the old one serves.
    let a2 = strs(&args(&admin2));
    let second = proxy(&a2.split('\u{0}').collect::<Vec<_>>());
    wait_logged(&second, &["listening", &listen]);
    calling.more(50).await;
    signal(first.pid(), "-TERM");
    assert_eq!(first.wait_exit(Duration::from_secs(20)).await, Some(0));
    calling.more(200).await;
    let tally = calling.finish().await;
    assert_none_failed(&tally);
    assert!(second.logged(&["listening"]), "{}", second.log_text());
    // A third process without SO_REUSEPORT (any other program) cannot take the port.
    assert!(std::net::TcpListener::bind(&listen).is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn socket_activated_restarts_fail_no_call() {
    use command_fds::{CommandFdExt, FdMapping};
    let (etcd, _backend, _reg) = echo_service().await;
    // The supervisor (systemd's part): it holds the socket across the proxy's restarts.
    let socket = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = socket.local_addr().unwrap();
    let start = || {
        let fd = std::os::fd::OwnedFd::from(socket.try_clone().unwrap());
        // LISTEN_PID must be the proxy's pid: the shell's, which exec keeps.
        let mut cmd = Command::new("sh");
        cmd.args(["-c", "LISTEN_PID=$$ exec \"$0\" \"$@\"", BIN, "proxy"])
            .args(["--listen", &listen.to_string()])
            .args(["--etcd-endpoints", etcd.endpoint()])
            .args(["--admin-listen", "off", "--drain-timeout", "5s"])
            .env("LISTEN_FDS", "1")
            .env("LISTEN_FDNAMES", "grpc")
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::null());
        cmd.fd_mappings(vec![FdMapping {
            parent_fd: fd,
            child_fd: 3,
        }])
        .unwrap();
        SwitchyardProcess::launch(cmd, None)
    };
    let mut p = start();
    wait_logged(&p, &["socket passed by the service manager", "grpc"]);
    let calling = Calling::start(listen);
    calling.more(50).await;
    for _ in 0..2 {
        // `systemctl restart`: stop, wait for the exit, start.
        signal(p.pid(), "-TERM");
        assert_eq!(p.wait_exit(Duration::from_secs(20)).await, Some(0));
        p = start();
        calling.more(100).await;
    }
    let tally = calling.finish().await;
    assert_none_failed(&tally);
    assert!(!p.logged(&["cannot listen"]), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_applies_the_file_and_refuses_a_broken_one() {
    let etcd = EtcdProcess::start().await.unwrap();
    let (a, b) = (
        EchoBackend::start("a").await.unwrap(),
        EchoBackend::start("b").await.unwrap(),
    );
    let _ra = register(etcd.endpoint(), "svc.A", a.addr(), 5).await;
    let _rb = register(etcd.endpoint(), "svc.B", b.addr(), 5).await;
    let (bound, admin) = (
        switchyard::testkit::free_addr().unwrap(),
        switchyard::testkit::free_addr().unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    let file = |service: &str| {
        format!(
            "[[listener]]\naddr = \"{bound}\"\nservice = \"{service}\"\n\n[admin]\nlisten = \"{admin}\"\n\n[etcd]\nendpoints = [\"{}\"]\n",
            etcd.endpoint()
        )
    };
    std::fs::write(&path, file("svc.A")).unwrap();
    let p = proxy(&["--config", path.to_str().unwrap()]);
    wait_listening(bound, Duration::from_secs(20)).await;
    let calling = Calling::start(bound);
    calling.more(50).await;
    assert_eq!(calling.tally.lock().unwrap().last, "a");

    // The bound listener now goes to svc.B: within a second, every call does.
    std::fs::write(&path, file("svc.B")).unwrap();
    signal(p.pid(), "-HUP");
    let hup = Instant::now();
    eventually(Duration::from_secs(1), "calls routed to svc.B", || async {
        calling.tally.lock().unwrap().last == "b"
    })
    .await;
    tracing::info!(after = ?hup.elapsed(), "routed to svc.B");
    calling.more(100).await;
    assert_eq!(calling.tally.lock().unwrap().last, "b");

    // A broken file is refused, naming the file and the key; the proxy serves on.
    std::fs::write(
        &path,
        file("svc.B") + "\n[limits]\nmax_connections = \"many\"\n",
    )
    .unwrap();
    signal(p.pid(), "-HUP");
    wait_logged(
        &p,
        &["refused", "switchyard.toml", "limits.max_connections"],
    );
    calling.more(100).await;
    let tally = calling.finish().await;
    assert_none_failed(&tally);
    assert_eq!(tally.last, "b");
    let m = admin_get(admin, "/metrics").await.unwrap().body;
    let reloads = |result| metric(&m, "switchyard_config_reloads_total", &[("result", result)]);
    assert_eq!(
        (reloads("applied"), reloads("refused")),
        (Some(1.0), Some(1.0)),
        "{m}"
    );

    // A setting read at start only is named as needing a restart.
    std::fs::write(&path, file("svc.B") + "\n[limits]\nworker_threads = 2\n").unwrap();
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["limits.worker_threads", "restart"]);
}
