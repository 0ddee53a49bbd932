//! The targets the load is driven at: direct calls, switchyard (built into a target dir
//! of its own), nginx and HAProxy.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use switchyard::testkit::free_addr;
use tokio::process::Command;

use crate::load::check_unary;
use crate::procs::{wait_listening, which, Proc};
use crate::{interrupted, Options, UNARY_PATH};

/// Something the load is driven at.
pub struct Target {
    pub name: &'static str,
    pub addr: SocketAddr,
    /// The proxy's processes (`None` for direct calls).
    pub proc: Option<Proc>,
}

/// Where the proxy under test is built: a target dir of its own. `cargo bench` builds the
/// `switchyard` binary too, with the bench profile, into the same `target/release` as
/// `cargo build --release` and under the same name, so the release build there is not
/// reliably the one found at `target/release/switchyard`.
pub fn proxy_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("e2e-proxy")
}

/// The release build of the proxy under test.
pub fn switchyard_binary() -> PathBuf {
    proxy_target_dir().join("release").join("switchyard")
}

pub fn spawn_switchyard(
    listen: &[String],
    etcd: &str,
    extra: &[&str],
    workers: Option<usize>,
) -> Result<Proc> {
    let mut cmd = Command::new(switchyard_binary());
    if let Some(n) = workers {
        cmd.env("SWITCHYARD_WORKER_THREADS", n.to_string());
    }
    cmd.arg("proxy");
    for l in listen {
        cmd.arg("--listen").arg(l);
    }
    cmd.args(["--etcd-endpoints", etcd]);
    // No admin listener unless asked for (two proxies would collide on its default port).
    if !extra.contains(&"--admin-listen") {
        cmd.args(["--admin-listen", "off"]);
    }
    cmd.args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    Proc::spawn("switchyard", &mut cmd)
}

pub fn spawn_nginx(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Result<Proc> {
    spawn_nginx_balancing(dir, listen, backends, "")
}

/// nginx with a balancing directive in its upstream block (`""` = round-robin, or e.g.
/// `"least_conn;"`; nginx wants it before `keepalive`).
pub fn spawn_nginx_balancing(
    dir: &Path,
    listen: SocketAddr,
    backends: &[SocketAddr],
    balance: &str,
) -> Result<Proc> {
    let servers: String = backends
        .iter()
        .map(|b| format!("    server {b};\n"))
        .collect();
    let d = dir.display();
    let conf = format!(
        "worker_processes 2;\n\
         pid {d}/nginx.pid;\n\
         error_log {d}/error.log warn;\n\
         events {{ worker_connections 16384; }}\n\
         http {{\n\
         access_log off;\n\
         client_body_temp_path {d}/client_body;\n\
         proxy_temp_path {d}/proxy;\n\
         fastcgi_temp_path {d}/fastcgi;\n\
         uwsgi_temp_path {d}/uwsgi;\n\
         scgi_temp_path {d}/scgi;\n\
         keepalive_requests 100000000;\n\
         upstream echo {{\n    {balance}\n{servers}    keepalive 512;\n    keepalive_requests 100000000;\n}}\n\
         server {{\n\
           listen {listen} http2;\n\
           http2_max_concurrent_streams 1024;\n\
           location / {{ grpc_pass grpc://echo; }}\n\
         }}\n\
         }}\n"
    );
    let path = dir.join("nginx.conf");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(which("nginx").ok_or_else(|| anyhow!("nginx not found"))?);
    cmd.arg("-p")
        .arg(dir)
        .arg("-e")
        .arg(dir.join("error.log"))
        .arg("-c")
        .arg(&path)
        .args(["-g", "daemon off;"])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn("nginx", &mut cmd)
}

pub fn spawn_haproxy(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Result<Proc> {
    spawn_haproxy_balancing(dir, listen, backends, "roundrobin")
}

/// HAProxy with a `balance` algorithm of its backend section (`roundrobin`, `leastconn`).
pub fn spawn_haproxy_balancing(
    dir: &Path,
    listen: SocketAddr,
    backends: &[SocketAddr],
    balance: &str,
) -> Result<Proc> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{} {b} proto h2\n", i + 1))
        .collect();
    let conf = format!(
        "global\n  nbthread 2\n  maxconn 9000\n  tune.h2.max-concurrent-streams 1024\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend fe\n  bind {listen} proto h2\n  default_backend be\n\
         backend be\n  balance {balance}\n{servers}"
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, conf)?;
    let mut cmd = Command::new(which("haproxy").ok_or_else(|| anyhow!("haproxy not found"))?);
    cmd.arg("-f")
        .arg(&path)
        .arg("-db")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    Proc::spawn("haproxy", &mut cmd)
}

/// Builds the proxy under test: `cargo build --release` into [`proxy_target_dir`].
pub async fn build_proxy() -> Result<()> {
    let target_dir = proxy_target_dir();
    println!(
        "e2e: cargo build --release --bin switchyard --target-dir {}",
        target_dir.display()
    );
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--bin", "switchyard", "--target-dir"])
        .arg(&target_dir)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .status()
        .await?;
    if !status.success() {
        bail!("cargo build --release failed");
    }
    Ok(())
}

/// Starts the targets `opts` asks for, in front of `backends` (a proxy's files under
/// `dir`); notes say which were skipped.
pub async fn start(
    opts: &Options,
    dir: &Path,
    etcd: &str,
    backend_addrs: &[SocketAddr],
) -> Result<(Vec<Target>, Vec<String>)> {
    let mut notes = Vec::new();
    let mut targets: Vec<Target> = Vec::new();
    let want = |t: &str| opts.targets.iter().any(|x| x == t);
    if want("direct") {
        targets.push(Target {
            name: "direct",
            addr: backend_addrs[0],
            proc: None,
        });
    }
    for (name, workers) in [("switchyard", None), ("switchyard-2w", Some(2))] {
        if want(name) {
            let addr = free_addr()?;
            let p = spawn_switchyard(&[addr.to_string()], etcd, &[], workers)?;
            wait_listening(addr, Duration::from_secs(10)).await?;
            targets.push(Target {
                name,
                addr,
                proc: Some(p),
            });
        }
    }
    type Spawn = fn(&Path, SocketAddr, &[SocketAddr]) -> Result<Proc>;
    let peers: [(&'static str, Spawn); 2] = [("nginx", spawn_nginx), ("haproxy", spawn_haproxy)];
    for (name, spawn) in peers {
        if !want(name) {
            continue;
        }
        match which(name) {
            Some(_) => {
                let d = dir.join(name);
                std::fs::create_dir_all(&d)?;
                let addr = free_addr()?;
                let p = spawn(&d, addr, backend_addrs)?;
                wait_listening(addr, Duration::from_secs(10)).await?;
                targets.push(Target {
                    name,
                    addr,
                    proc: Some(p),
                });
            }
            None => notes.push(format!("{name}: not installed, skipped (Debian: {name})")),
        }
    }
    Ok((targets, notes))
}

/// Waits until every target answers a call (and its connections to the backends exist).
pub async fn wait_answering(targets: &[Target]) -> Result<()> {
    for t in targets {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match check_unary(t.addr).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => bail!("{} does not answer: {e:#}", t.name),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
    Ok(())
}

/// `--hold`: prints the targets and an h2load command line, then waits `hold` (or a signal).
pub async fn hold(targets: &[Target], body: &Path, hold: Duration) {
    let body_path = body.display();
    for t in targets {
        println!(
            "e2e: {:<10} {}  pids {:?}",
            t.name,
            t.addr,
            t.proc.as_ref().map(Proc::pids).unwrap_or_default()
        );
    }
    println!(
        "e2e: e.g. h2load -c 4 -m 16 -t 1 -n 200000 -d {body_path} \\\n  \
         -H 'content-type: application/grpc' -H 'te: trailers' http://ADDR{UNARY_PATH}"
    );
    println!("e2e: holding for {hold:?} (Ctrl-C or SIGTERM ends it)");
    tokio::select! {
        _ = tokio::time::sleep(hold) => {}
        _ = interrupted() => {}
    }
}

/// Stops the targets' processes and then the backends.
pub async fn stop(targets: Vec<Target>, backends: Vec<Proc>) {
    let mut stopped = Vec::new();
    for t in targets {
        if let Some(p) = t.proc {
            stopped.push(p.stop());
        }
    }
    futures_util::future::join_all(stopped).await;
    for b in backends {
        b.stop().await;
    }
}
