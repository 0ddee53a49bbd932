//! The config file: every flag settable there, precedence flag > env > file > default,
//! errors with file, line and field, `check-config`, and the shipped example configs.
use crate::common::*;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use switchyard::settings::{self as config, ConfigError, LogFormat};

const BIN: &str = env!("CARGO_BIN_EXE_switchyard");

/// The `switchyard proxy` command line, parsed like the binary does (without env vars
/// unless the process has them).
fn matches(args: &[&str]) -> clap::ArgMatches {
    let cmd = config::proxy_command();
    cmd.try_get_matches_from(std::iter::once("proxy").chain(args.iter().copied()))
        .unwrap()
}

fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

fn load(args: &[&str]) -> Result<config::Loaded, ConfigError> {
    config::load(&matches(args))
}

fn field_error(e: ConfigError) -> config::FieldError {
    match e {
        ConfigError::Field(f) => f,
        other => panic!("not a field error: {other}"),
    }
}

#[test]
fn every_proxy_flag_has_a_file_key() {
    let cmd = config::proxy_command();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        if id == "config" {
            continue;
        }
        assert!(
            config::file_key(id).is_some(),
            "flag {id} cannot be set in the config file: its id must be its file key"
        );
    }
}

const FULL: &str = r#"
log_format = "json"
forward_health = true

[[listener]]
addr = "127.0.0.1:17070"

[[listener]]
addr = "127.0.0.1:17001"
service = "pkg.A"

[[route]]
grpc_service = "pkg.B"
registered = "b.rpc"

[admin]
listen = "127.0.0.1:17071"

[etcd]
endpoints = ["https://10.0.0.1:2379", "https://10.0.0.2:2379"]
prefix = ["fleet/services", ""]
connect_timeout = "7s"
user = "switchyard"
password = "pw"
ca = "ca.pem"
cert = "etcd.pem"
key = "etcd-key.pem"

[timeouts]
connect = "1500ms"
discovery = "4s"
idle = "2m"
first_request = 20
drain = "45s"
service_idle = "90s"

[limits]
max_services = 17
max_concurrent_streams = 300
max_header_list_size = 32768
max_connections = 999
worker_threads = 3

[tls]
cert = "proxy.pem"
key = "proxy-key.pem"

[upstream_tls]
enabled = true
ca = "ca.pem"
cert = "client.pem"
key = "client-key.pem"
sni = "backend.internal"

[upstream]
max_connections = 2
idle_timeout = "off"

[observe]
access_log = "stdout"
otlp_endpoint = "http://127.0.0.1:4317"
trace_sample_rate = 0.25

[service_config]
files = ["grpc.json", "/etc/switchyard/fleet.json"]
prefix = "config/grpc"

[balance]
policy = "peak-ewma"
slow_start = "3s"
ewma_decay = "2s"
ewma_default_rtt = "5ms"
zone = "eu-1a"
zone_key = "topology.kubernetes.io/zone"

[balance.service."pkg.Slow"]
policy = "least-request"

[ejection]
after = 3
duration = "10s"
max_percent = 30
failure_codes = "13,14"

[health_check]
kind = "grpc"
interval = "2s"

[log]
level = "warn,switchyard=debug"

[[traffic]]
service = "b.rpc"
strict = true
[[traffic.match]]
header = "x-canary"
value = "1"
subset = { version = "v2" }
[[traffic.split]]
subset = { version = "v1" }
weight = 95
[[traffic.split]]
subset = { version = "v2", zone = "eu-1a" }
weight = 5
"#;

/// A directory with the PEM files FULL names (relative to it).
fn full_dir() -> (TestPki, PathBuf) {
    let pki = TestPki::new();
    for (name, names) in [
        ("etcd", &["switchyard"][..]),
        ("proxy", &["localhost"][..]),
        ("client", &["switchyard"][..]),
    ] {
        pki.issue(name, names);
    }
    let path = write(pki.dir.path(), "switchyard.toml", FULL);
    (pki, path)
}

#[test]
fn the_file_sets_every_setting_and_relative_paths_are_relative_to_it() {
    let (pki, path) = full_dir();
    let s = load(&["--config", path.to_str().unwrap()]).unwrap();
    let dir = pki.dir.path();
    let a = &s.proxy;
    assert_eq!(s.log_format, LogFormat::Json);
    assert_eq!(a.listeners.len(), 2);
    assert_eq!(
        a.listeners[1].addr,
        "127.0.0.1:17001".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(a.listeners[1].service.as_ref().unwrap().as_str(), "pkg.A");
    assert!(a.forward_health);
    assert_eq!(a.admin.listen.0, Some("127.0.0.1:17071".parse().unwrap()));
    assert_eq!(a.etcd.endpoints.len(), 2);
    assert_eq!(a.etcd.prefix, ["fleet/services", ""]);
    assert_eq!(a.route, ["pkg.B=b.rpc".parse().unwrap()]);
    assert_eq!(a.etcd.connect_timeout, Duration::from_secs(7));
    assert_eq!(a.etcd.user.as_deref(), Some("switchyard"));
    assert_eq!(a.etcd.password.as_deref(), Some("pw"));
    assert_eq!(a.etcd.ca.as_deref(), Some(dir.join("ca.pem").as_path()));
    assert_eq!(
        a.etcd.key.as_deref(),
        Some(dir.join("etcd-key.pem").as_path())
    );
    assert_eq!(a.timeouts.connect, Duration::from_millis(1500));
    assert_eq!(a.timeouts.discovery, Duration::from_secs(4));
    assert_eq!(a.timeouts.idle, Duration::from_secs(120));
    assert_eq!(a.timeouts.first_request, Duration::from_secs(20));
    assert_eq!(a.timeouts.drain, Duration::from_secs(45));
    assert_eq!(
        (
            a.limits.max_services,
            a.limits.max_concurrent_streams,
            a.limits.max_header_list_size,
            a.limits.max_connections,
            a.limits.worker_threads
        ),
        (17, 300, 32768, 999, 3)
    );
    assert_eq!(a.tls.cert.as_deref(), Some(dir.join("proxy.pem").as_path()));
    assert!(a.upstream_tls.enabled);
    assert_eq!(
        a.upstream_tls.cert.as_deref(),
        Some(dir.join("client.pem").as_path())
    );
    assert_eq!(a.upstream_tls.sni.as_deref(), Some("backend.internal"));
    assert_eq!(a.upstream.max_connections, 2);
    assert_eq!(
        a.observe.otlp_endpoint.as_deref(),
        Some("http://127.0.0.1:4317")
    );
    assert_eq!(a.observe.trace_sample_rate, 0.25);
    assert_eq!(
        a.service_config.files,
        [dir.join("grpc.json"), "/etc/switchyard/fleet.json".into()]
    );
    assert_eq!(a.service_config.prefix.as_deref(), Some("config/grpc"));
    assert_eq!(
        a.upstream.idle_timeout,
        switchyard::settings::IdleTimeout(None)
    );
    assert_eq!(a.balance.policy, switchyard::balance::Policy::PeakEwma);
    assert_eq!(a.balance.slow_start, Duration::from_secs(3));
    assert_eq!(a.balance.zone.as_deref(), Some("eu-1a"));
    assert_eq!(a.balance.zone_key, "topology.kubernetes.io/zone");
    let tuned = switchyard::proxy::runtime::live_config(a).balance;
    assert_eq!(
        (tuned.ewma_decay, tuned.default_rtt),
        (Duration::from_secs(2), Duration::from_millis(5))
    );
    assert_eq!(
        a.balance.services["pkg.Slow"].policy,
        switchyard::balance::Policy::LeastRequest
    );
    assert_eq!(
        (
            a.ejection.after,
            a.ejection.duration,
            a.ejection.max_percent
        ),
        (3, Duration::from_secs(10), 30)
    );
    assert_eq!(a.ejection.failure_codes.to_string(), "13,14");
    assert_eq!(a.health_check.kind, switchyard::health::ActiveCheck::Grpc);
    assert_eq!(a.health_check.interval, Duration::from_secs(2));
    assert_eq!(a.log.level.as_str(), "warn,switchyard=debug");
    assert_eq!(a.traffic.len(), 1);
    let t = &a.traffic[0];
    assert_eq!((t.service.as_str(), t.strict), ("b.rpc", true));
    assert_eq!(
        (t.matches[0].header.as_str(), t.matches[0].value.as_str()),
        ("x-canary", "1")
    );
    assert_eq!(t.matches[0].subset["version"], "v2");
    let split: Vec<_> = t.split.iter().map(|s| (s.subset.len(), s.weight)).collect();
    assert_eq!(split, [(1, 95), (2, 5)]);
    assert_eq!(t.split[1].subset["zone"], "eu-1a");
    // Every setting came from the file.
    let cmd = config::proxy_command();
    for arg in cmd.get_arguments() {
        let id = arg.get_id().as_str();
        assert!(
            id == "config" || s.from_file().contains(&id),
            "{id} not taken from the file"
        );
    }
}

#[test]
fn flags_win_over_the_file_and_the_file_over_defaults() {
    let (_pki, path) = full_dir();
    let s = load(&[
        "--config",
        path.to_str().unwrap(),
        "--prefix",
        "from-flag",
        "--listen",
        "127.0.0.1:18000",
        "--drain-timeout",
        "3s",
        "--log-format",
        "text",
    ])
    .unwrap();
    assert_eq!(s.proxy.etcd.prefix, ["from-flag"]);
    assert_eq!(s.proxy.listeners.len(), 1);
    assert_eq!(s.proxy.listeners[0].addr.port(), 18000);
    assert_eq!(s.proxy.timeouts.drain, Duration::from_secs(3));
    assert_eq!(s.log_format, LogFormat::Text);
    // The rest still comes from the file.
    assert_eq!(s.proxy.limits.max_services, 17);
    assert!(!s.from_file().contains(&"etcd.prefix"));

    // A file that sets little: the rest keeps its defaults.
    let dir = tempfile::tempdir().unwrap();
    let small = write(dir.path(), "small.toml", "[etcd]\nprefix = \"p\"\n");
    let s = load(&["--config", small.to_str().unwrap()]).unwrap();
    assert_eq!(s.proxy.etcd.prefix, ["p"]);
    assert_eq!(s.proxy.etcd.endpoints, ["http://127.0.0.1:2379"]);
    assert_eq!(s.proxy.listeners[0].addr.port(), 7070);
    assert_eq!(s.proxy.timeouts.drain, Duration::from_secs(10));
}

#[test]
fn errors_name_the_file_the_line_and_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let cases: &[(&str, usize, &str, &str)] = &[
        // (file text, line, field, part of the message)
        (
            "[etcd]\nendpoints = [\"http://a:1\"]\nprefx = \"x\"\n",
            3,
            "etcd.prefx",
            "unknown field",
        ),
        ("bogus = 1\n", 1, "bogus", "unknown field"),
        (
            "[timeouts]\n\nconnect = \"10x\"\n",
            3,
            "timeouts.connect",
            "unit",
        ),
        (
            "[limits]\nmax_connections = \"many\"\n",
            2,
            "limits.max_connections",
            "invalid type",
        ),
        (
            "[[listener]]\naddr = \"1.2.3.4\"\n",
            2,
            "listener[0].addr",
            "socket address",
        ),
        (
            "[[listener]]\naddr = \"127.0.0.1:1\"\nservice = \"a/b\"\n",
            3,
            "listener[0].service",
            "service name",
        ),
        (
            "[admin]\nlisten = \"nowhere\"\n",
            2,
            "admin.listen",
            "ip:port",
        ),
        ("log_format = \"xml\"\n", 1, "log_format", "unknown variant"),
        (
            "[log]\nlevel = \"switchyard=loud\"\n",
            2,
            "log.level",
            "not a log filter",
        ),
        // Settings that are each fine but do not fit together, or files that are missing.
        (
            "[limits]\nmax_services = 1\n\n[tls]\ncert = \"c.pem\"\n",
            5,
            "tls.cert",
            "tls.key",
        ),
        (
            "[tls]\ncert = \"c.pem\"\nkey = \"k.pem\"\n",
            2,
            "tls.cert",
            "c.pem",
        ),
        (
            "[upstream_tls]\nca = \"ca.pem\"\n",
            2,
            "upstream_tls.ca",
            "upstream_tls.enabled",
        ),
        (
            "[etcd]\nendpoints = [\"https://e:2379\"]\n",
            2,
            "etcd.endpoints",
            "etcd.ca",
        ),
        (
            "[timeouts]\nconnect = \"0s\"\n",
            2,
            "timeouts.connect",
            "greater than zero",
        ),
        (
            "[limits]\nworker_threads = 0\n",
            2,
            "limits.worker_threads",
            "greater than zero",
        ),
    ];
    for (i, (text, line, field, part)) in cases.iter().enumerate() {
        let path = write(dir.path(), &format!("case{i}.toml"), text);
        let err = field_error(load(&["--config", path.to_str().unwrap()]).unwrap_err());
        let shown = err.to_string();
        let loc = err
            .location
            .as_ref()
            .unwrap_or_else(|| panic!("no location: {shown}"));
        assert_eq!(loc.path, path, "{shown}");
        assert_eq!(loc.line, *line, "{shown}");
        assert_eq!(err.field, *field, "{shown}");
        assert!(shown.contains(part), "{shown:?} lacks {part:?}");
        assert!(
            shown.starts_with(&format!("{}:{line}:", path.display())),
            "{shown}"
        );
    }
    // A syntax error has a line too.
    let path = write(dir.path(), "syntax.toml", "[etcd]\nprefix = \n");
    let err = field_error(load(&["--config", path.to_str().unwrap()]).unwrap_err());
    assert_eq!(err.location.unwrap().line, 2);
    // A missing file is named.
    let missing = dir.path().join("missing.toml");
    let err = load(&["--config", missing.to_str().unwrap()]).unwrap_err();
    assert!(err.to_string().contains("missing.toml"), "{err}");
    // A flag's error names the flag.
    let err = field_error(load(&["--tls-key", "k.pem"]).unwrap_err());
    assert!(err.location.is_none());
    assert!(err.to_string().starts_with("--tls-key"), "{err}");
    let err = field_error(load(&["--worker-threads", "0"]).unwrap_err());
    assert!(err.to_string().starts_with("--worker-threads"), "{err}");
    assert!(err.to_string().contains("greater than zero"), "{err}");
    let err = field_error(load(&["--worker-threads", "100000"]).unwrap_err());
    assert!(err.to_string().starts_with("--worker-threads"), "{err}");
    assert!(err.to_string().contains("at most 1024"), "{err}");
}

#[test]
fn a_pair_split_between_file_and_flag_is_complete() {
    // The user in the file, the password from elsewhere (here a flag; usually the env).
    let dir = tempfile::tempdir().unwrap();
    let path = write(dir.path(), "u.toml", "[etcd]\nuser = \"switchyard\"\n");
    let s = load(&["--config", path.to_str().unwrap(), "--etcd-password", "pw"]).unwrap();
    assert_eq!(s.proxy.etcd.user.as_deref(), Some("switchyard"));
    assert_eq!(s.proxy.etcd.password.as_deref(), Some("pw"));
    let err = load(&["--config", path.to_str().unwrap()]).unwrap_err();
    assert!(err.to_string().contains("etcd.password"), "{err}");
}

/// The binary with a clean environment plus `env`.
fn bin(args: &[&str], env: &[(&str, &str)]) -> Command {
    let mut c = Command::new(BIN);
    c.args(args).env_clear().envs(env.iter().copied());
    c
}

#[test]
fn check_config_accepts_good_files_and_reports_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(
        dir.path(),
        "good.toml",
        "[[listener]]\naddr = \"127.0.0.1:7070\"\n\n[etcd]\nprefix = \"from-file\"\n",
    );
    let out = bin(&["check-config", good.to_str().unwrap()], &[])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout.contains("good.toml: ok"), "{stdout}");
    assert!(stdout.contains("prefix \"from-file\""), "{stdout}");

    // The environment wins over the file.
    let out = bin(
        &["check-config", good.to_str().unwrap()],
        &[("SWITCHYARD_PREFIX", "from-env")],
    )
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("prefix \"from-env\""), "{stdout}");

    let bad = write(
        dir.path(),
        "bad.toml",
        "[[listener]]\naddr = \"127.0.0.1:7070\"\n\n[etcd]\nprefx = \"x\"\n",
    );
    let out = bin(&["check-config", bad.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("{}:5:1", bad.display())),
        "{stderr}"
    );
    assert!(stderr.contains("etcd.prefx"), "{stderr}");

    let bad = write(dir.path(), "bad2.toml", "[timeouts]\ndrain = \"soon\"\n");
    let out = bin(&["check-config", bad.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad2.toml:2:"), "{stderr}");
    assert!(stderr.contains("timeouts.drain"), "{stderr}");
}

#[test]
fn shipped_example_configs_pass_check_config() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    for example in [
        "deploy/systemd/switchyard.toml",
        "deploy/kubernetes/switchyard.toml",
    ] {
        let out = bin(&["check-config", root.join(example).to_str().unwrap()], &[])
            .output()
            .unwrap();
        assert!(out.status.success(), "{example}: {out:?}");
    }
}

fn run(args: &[&str], env: &[(&str, &str)]) -> SwitchyardProcess {
    SwitchyardProcess::spawn(args, env)
}

async fn healthy(addr: SocketAddr) -> bool {
    admin_get(addr, "/healthz")
        .await
        .is_some_and(|r| r.status == 200)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_running_proxy_applies_flag_over_env_over_file() {
    let free = || switchyard::testkit::free_addr().unwrap();
    let (file_admin, env_admin, flag_admin) = (free(), free(), free());
    let (listen, dead_etcd) = (free(), free());
    let dir = tempfile::tempdir().unwrap();
    let path = write(
        dir.path(),
        "switchyard.toml",
        &format!(
            "log_format = \"json\"\n\n[[listener]]\naddr = \"{listen}\"\n\n[admin]\nlisten = \"{file_admin}\"\n\n[etcd]\nendpoints = [\"http://{dead_etcd}\"]\n"
        ),
    );
    let cfg = path.to_str().unwrap();
    let env_admin_s = env_admin.to_string();

    // File only: admin where the file says, JSON logs, the file's listener.
    let p = run(&["proxy", "--config", cfg], &[]);
    let line = p.next_line();
    let json: serde_json::Value =
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("not a JSON log line ({e}): {line}"));
    assert!(
        json.get("level").is_some() && json.get("message").is_some(),
        "{line}"
    );
    eventually(
        Duration::from_secs(20),
        "admin on the file's address",
        || healthy(file_admin),
    )
    .await;
    assert!(tokio::net::TcpStream::connect(listen).await.is_ok());
    drop(p);

    // The environment beats the file.
    let p = run(
        &["proxy", "--config", cfg],
        &[("SWITCHYARD_ADMIN_LISTEN", &env_admin_s)],
    );
    eventually(
        Duration::from_secs(20),
        "admin on the env's address",
        || healthy(env_admin),
    )
    .await;
    assert!(!healthy(file_admin).await);
    drop(p);

    // A flag beats both; `--log-format text` beats the file's json.
    let p = run(
        &[
            "proxy",
            "--config",
            cfg,
            "--admin-listen",
            &flag_admin.to_string(),
            "--log-format",
            "text",
        ],
        &[("SWITCHYARD_ADMIN_LISTEN", &env_admin_s)],
    );
    let line = p.next_line();
    assert!(
        serde_json::from_str::<serde_json::Value>(&line).is_err(),
        "{line}"
    );
    eventually(
        Duration::from_secs(20),
        "admin on the flag's address",
        || healthy(flag_admin),
    )
    .await;
    assert!(!healthy(env_admin).await);
    drop(p);

    // A bad file stops the proxy before it starts, naming the file and line.
    let bad = write(dir.path(), "bad.toml", "[admin]\nlisten = \"x\"\n");
    let out = bin(&["proxy", "--config", bad.to_str().unwrap()], &[])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("bad.toml:2:") && stderr.contains("admin.listen"),
        "{stderr}"
    );
}
