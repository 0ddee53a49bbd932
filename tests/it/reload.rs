//! SIGHUP applies what can change live to the running proxy process: the etcd prefixes
//! (services watched again, serving their current endpoints until the new watch has
//! listed them), balancing, ejection and the log level; with a client calling throughout
//! (fail-fast, see `restart.rs`) where no call may fail.
use crate::common::*;
use crate::restart::{assert_none_failed, signal, wait_logged, Calling, BIN};

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The Echo service's name, as registered (calls name it in their path).
const ECHO: &str = "switchyard.echo.v1.Echo";

/// A config file for one listener, the admin listener and etcd; `extra` is appended.
pub(crate) struct ConfigFile {
    _dir: tempfile::TempDir,
    path: PathBuf,
    pub(crate) listen: SocketAddr,
    pub(crate) admin: SocketAddr,
    etcd: String,
}

impl ConfigFile {
    pub(crate) fn new(etcd: &EtcdProcess) -> ConfigFile {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("switchyard.toml");
        ConfigFile {
            _dir: dir,
            path,
            listen: switchyard::testkit::free_addr().unwrap(),
            admin: switchyard::testkit::free_addr().unwrap(),
            etcd: etcd.endpoint().to_owned(),
        }
    }

    /// Writes the file with `etcd_extra` in its `[etcd]` section and `extra` after it.
    pub(crate) fn write(&self, etcd_extra: &str, extra: &str) {
        let text = format!(
            "[[listener]]\naddr = \"{}\"\n\n[admin]\nlisten = \"{}\"\n\n[etcd]\nendpoints = [\"{}\"]\n{etcd_extra}\n{extra}",
            self.listen, self.admin, self.etcd
        );
        std::fs::write(&self.path, text).unwrap();
    }

    fn path(&self) -> &Path {
        &self.path
    }
}

/// A proxy process reading `file`, with `RUST_LOG` as given (unset: `None`).
pub(crate) async fn proxy(file: &ConfigFile, rust_log: Option<&str>) -> SwitchyardProcess {
    let mut cmd = Command::new(BIN);
    cmd.arg("proxy")
        .arg("--config")
        .arg(file.path())
        .env_remove("RUST_LOG")
        .env("NO_COLOR", "1")
        .stdout(std::process::Stdio::null());
    if let Some(filter) = rust_log {
        cmd.env("RUST_LOG", filter);
    }
    let p = SwitchyardProcess::launch(cmd, None);
    wait_listening(file.listen, Duration::from_secs(20)).await;
    p
}

/// The admin's `/endpoints` body.
async fn endpoints(admin: SocketAddr) -> String {
    admin_get(admin, "/endpoints")
        .await
        .expect("admin answers")
        .body
}

/// The Echo service's entry in `/endpoints`.
pub(crate) async fn echo_entry(admin: SocketAddr) -> serde_json::Value {
    let body = endpoints(admin).await;
    let all: Vec<serde_json::Value> = serde_json::from_str(&body).unwrap();
    all.into_iter()
        .find(|s| s["service"] == ECHO)
        .unwrap_or_else(|| panic!("no {ECHO} in {body}"))
}

/// The Echo service's balancing policy, as `/endpoints` shows it.
async fn policy(admin: SocketAddr) -> String {
    echo_entry(admin).await["balance"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

/// The Echo service's endpoints' states, as `/endpoints` shows them.
async fn states(admin: SocketAddr) -> Vec<String> {
    let entry = echo_entry(admin).await;
    entry["endpoints"]
        .as_array()
        .map(|eps| {
            eps.iter()
                .map(|e| e["state"].as_str().unwrap_or_default().to_owned())
                .collect()
        })
        .unwrap_or_default()
}

/// Who answered each of `n` calls on one connection (or the failed call's code).
async fn answers(addr: SocketAddr, n: usize) -> Vec<String> {
    let mut c = client(addr).await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        out.push(match served_by(&mut c).await {
            Ok(b) => b,
            Err(s) => format!("{:?}", s.code()),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_prefix_is_watched_and_swapped_in_without_a_failed_call() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (a, b) = (
        EchoBackend::start("a").await.unwrap(),
        EchoBackend::start("b").await.unwrap(),
    );
    // The fleet moves from registry `a/` to registry `b/`, each with its own backend.
    for (prefix, backend) in [("a", &a), ("b", &b)] {
        let addr = backend.addr().to_string();
        put(etcd.endpoint(), &format!("{prefix}/{ECHO}/{addr}"), &addr).await;
    }
    let file = ConfigFile::new(&etcd);
    file.write("prefix = [\"a\"]", "");
    let p = proxy(&file, Some("info")).await;
    let calling = Calling::start(file.listen);
    calling.more(50).await;
    assert_eq!(calling.tally.lock().unwrap().last, "a");

    file.write("prefix = [\"b\"]", "");
    signal(p.pid(), "-HUP");
    let hup = Instant::now();
    eventually(
        Duration::from_secs(2),
        "calls land on b/'s backend",
        || async { calling.tally.lock().unwrap().last == "b" },
    )
    .await;
    tracing::info!(after = ?hup.elapsed(), "calls on b/");
    calling.more(100).await;
    let tally = calling.finish().await;
    assert_none_failed(&tally);
    assert_eq!(tally.last, "b");
    // Every call now goes to b/'s backend: a/'s is no longer an endpoint.
    let seen = answers(file.listen, 20).await;
    assert!(seen.iter().all(|s| s == "b"), "{seen:?}");
    let eps = endpoints(file.admin).await;
    assert!(
        eps.contains(&b.addr().to_string()) && !eps.contains(&a.addr().to_string()),
        "{eps}"
    );
    // Nothing about the prefixes needs a restart.
    assert!(!p.logged(&["restart to apply"]), "{}", p.log_text());
    wait_logged(&p, &["settings reloaded", "etcd.prefix"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_balancing_policy_applies_to_running_services_without_a_failed_call() {
    let (etcd, _bs, _regs) = echo_backends(2).await;
    let file = ConfigFile::new(&etcd);
    file.write("", "[balance]\npolicy = \"round-robin\"\n");
    let p = proxy(&file, Some("info")).await;
    let calling = Calling::start(file.listen);
    calling.more(50).await;
    assert_eq!(policy(file.admin).await, "round-robin");

    // The default policy, then a service's own: peak-EWMA, which measures latency from
    // then on.
    let least = "[balance]\npolicy = \"least-request\"\n";
    for (text, want) in [
        (least.to_owned(), "least-request"),
        (
            format!("{least}\n[balance.service.\"{ECHO}\"]\npolicy = \"peak-ewma\"\n"),
            "peak-ewma",
        ),
    ] {
        file.write("", &text);
        signal(p.pid(), "-HUP");
        eventually(
            Duration::from_secs(5),
            "the new policy in /endpoints",
            || async { policy(file.admin).await == want },
        )
        .await;
        calling.more(50).await;
    }
    // Measured for every endpoint (round-robin and least-request measure nothing).
    let entry = echo_entry(file.admin).await;
    let eps = entry["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 2, "{entry}");
    assert!(
        eps.iter().all(|e| e["latency_estimate_ms"].is_number()),
        "{entry}"
    );
    let tally = calling.finish().await;
    assert_none_failed(&tally);
    assert!(!p.logged(&["restart to apply"]), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejection_turned_on_by_a_reload_ejects_a_failing_node() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    bs[0].faults().fail_code.store(14, Ordering::Relaxed);
    let file = ConfigFile::new(&etcd);
    file.write("", "[ejection]\nafter = 0\n");
    let p = proxy(&file, Some("info")).await;
    // Ejection off: the failing node keeps its share of the calls.
    let before = answers(file.listen, 90).await;
    let failed = before.iter().filter(|s| *s == "Unavailable").count();
    assert!(failed >= 20, "{failed} of 90 failed: {before:?}");
    let before = states(file.admin).await;
    assert!(!before.iter().any(|s| s == "ejected"), "{before:?}");

    file.write("", "[ejection]\nafter = 3\nduration = \"60s\"\n");
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["settings reloaded", "ejection"]);
    let after = answers(file.listen, 90).await;
    let failed = after.iter().filter(|s| *s == "Unavailable").count();
    assert!(
        failed <= 5,
        "{failed} of 90 failed after the reload: {after:?}"
    );
    let after = states(file.admin).await;
    assert_eq!(
        after.iter().filter(|s| *s == "ejected").count(),
        1,
        "{after:?}"
    );
    assert!(!p.logged(&["restart to apply"]), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_log_level_applies_on_reload() {
    let (etcd, _bs, _regs) = echo_backends(1).await;
    let file = ConfigFile::new(&etcd);
    file.write("", "[log]\nlevel = \"warn\"\n");
    let p = proxy(&file, None).await;
    // Per-call lines are at debug under `switchyard::call`: none at `warn`.
    let calls = answers(file.listen, 5).await;
    assert!(calls.iter().all(|s| s == "b0"), "{calls:?}");
    let text = p.log_text();
    assert!(
        !text.contains(" DEBUG ") && !text.contains(" INFO "),
        "{text}"
    );

    file.write("", "[log]\nlevel = \"warn,switchyard=debug\"\n");
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["settings reloaded", "log.level"]);
    let calls = answers(file.listen, 5).await;
    assert!(calls.iter().all(|s| s == "b0"), "{calls:?}");
    wait_logged(&p, &["DEBUG", "switchyard::call"]);

    // A bad filter is refused, naming the key; the level in force stays.
    file.write("", "[log]\nlevel = \"switchyard=loud\"\n");
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["refused", "switchyard.toml", "log.level"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn active_checks_start_and_stop_on_reload() {
    let (etcd, bs, _regs) = echo_backends(3).await;
    // b0 answers calls but says NOT_SERVING: only an active check takes it out.
    bs[0].set_echo_serving(false).await;
    let file = ConfigFile::new(&etcd);
    file.write("", "[health_check]\nkind = \"none\"\n");
    let p = proxy(&file, Some("info")).await;
    let calling = Calling::start(file.listen);
    calling.more(30).await;
    let served = answers(file.listen, 30).await;
    // Its share (the other client's calls take turns in the same rotation).
    assert!(
        served.iter().filter(|s| *s == "b0").count() >= 5,
        "{served:?}"
    );

    file.write("", "[health_check]\nkind = \"grpc\"\ninterval = \"1s\"\n");
    signal(p.pid(), "-HUP");
    eventually(Duration::from_secs(10), "b0 unhealthy", || async {
        states(file.admin).await.iter().any(|s| s == "unhealthy")
    })
    .await;
    let served = answers(file.listen, 30).await;
    assert!(!served.iter().any(|s| s == "b0"), "{served:?}");

    // Checks off again: what they said is forgotten, b0 is back in rotation.
    file.write("", "[health_check]\nkind = \"none\"\n");
    signal(p.pid(), "-HUP");
    eventually(Duration::from_secs(5), "b0 back", || async {
        !states(file.admin).await.iter().any(|s| s == "unhealthy")
    })
    .await;
    let served = answers(file.listen, 30).await;
    // Its share (the other client's calls take turns in the same rotation).
    assert!(
        served.iter().filter(|s| *s == "b0").count() >= 5,
        "{served:?}"
    );
    calling.more(30).await;
    let tally = calling.finish().await;
    assert_none_failed(&tally);
}

/// The status `grpc.health.v1.Health/Check` gives for `name` on `ch`.
async fn health_of(
    ch: &tonic::transport::Channel,
    name: &str,
) -> Result<tonic_health::pb::health_check_response::ServingStatus, tonic::Code> {
    let mut c = tonic_health::pb::health_client::HealthClient::new(ch.clone());
    c.check(tonic_health::pb::HealthCheckRequest {
        service: name.into(),
    })
    .await
    .map(|r| r.into_inner().status())
    .map_err(|s| s.code())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_route_applies_to_open_connections_and_to_health() {
    use tonic_health::pb::health_check_response::ServingStatus;
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let (old, new) = (
        EchoBackend::start("old").await.unwrap(),
        EchoBackend::start("new").await.unwrap(),
    );
    let old_reg = register(etcd.endpoint(), "old.name", old.addr(), 10).await;
    let _new_reg = register(etcd.endpoint(), "new.name", new.addr(), 10).await;
    let route = |to: &str| format!("[[route]]\ngrpc_service = \"{ECHO}\"\nregistered = \"{to}\"\n");
    let file = ConfigFile::new(&etcd);
    file.write("", &route("old.name"));
    let p = proxy(&file, Some("info")).await;
    // One connection, opened before the reload, kept throughout.
    let ch = tonic::transport::Channel::from_shared(format!("http://{}", file.listen))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut c = switchyard::echo::echo_client::EchoClient::new(ch.clone());
    assert_eq!(served_by(&mut c).await.unwrap(), "old");
    assert_eq!(health_of(&ch, ECHO).await, Ok(ServingStatus::Serving));

    // The old name's node leaves, and the route now leads to the new name.
    delete(etcd.endpoint(), &old_reg.key).await;
    drop(old_reg);
    file.write("", &route("new.name"));
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["settings reloaded"]);
    // The connection opened before the reload follows the new route...
    for _ in 0..10 {
        assert_eq!(served_by(&mut c).await.unwrap(), "new");
    }
    // ...and so does the proxy's own health answer, on the same connection.
    assert_eq!(health_of(&ch, ECHO).await, Ok(ServingStatus::Serving));
    // The old name, asked for directly, was served and has no node left: NOT_SERVING.
    assert_eq!(
        health_of(&ch, "old.name").await,
        Ok(ServingStatus::NotServing)
    );
    assert!(!p.logged(&["restart to apply"]), "{}", p.log_text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn service_config_files_are_read_again_on_reload_and_a_bad_one_is_refused() {
    let (etcd, _bs, _regs) = echo_backends(1).await;
    let file = ConfigFile::new(&etcd);
    // A relative path: from the config file's directory.
    let json = |t: &str| {
        format!(r#"{{"methodConfig": [{{"name": [{{"service": "{ECHO}"}}], "timeout": "{t}"}}]}}"#)
    };
    let dir = file.path().parent().unwrap().to_owned();
    std::fs::write(dir.join("grpc.json"), json("0.2s")).unwrap();
    file.write("", "[service_config]\nfiles = [\"grpc.json\"]\n");
    let p = proxy(&file, None).await;
    let mut c = client(file.listen).await;
    let slow = || switchyard::echo::EchoRequest {
        message: "slow".into(),
        delay_ms: 600,
        ..Default::default()
    };
    let e = c.unary(slow()).await.unwrap_err();
    assert_eq!(e.code(), tonic::Code::DeadlineExceeded, "{e:?}");

    std::fs::write(dir.join("grpc.json"), json("5s")).unwrap();
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["settings reloaded"]);
    c.unary(slow()).await.expect("the new timeout applies");

    std::fs::write(dir.join("grpc.json"), json("later")).unwrap();
    signal(p.pid(), "-HUP");
    wait_logged(&p, &["refused", "grpc.json", "methodConfig[0].timeout"]);
    c.unary(slow()).await.expect("the running config stays");
}
