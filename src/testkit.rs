//! Local etcd processes for the demo, the tests and the benchmarks: each runs the real
//! `etcd` binary on free loopback ports with a temporary data dir, and is killed when
//! dropped. And HTTP/2 connections in memory ([`h2_pair`]) for unit tests and benchmarks.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub mod h2_pair;

/// Why a local etcd could not be started.
#[derive(Debug, thiserror::Error)]
pub enum EtcdProcessError {
    /// The `etcd` binary could not be run (not installed?).
    #[error("cannot run {binary:?} (install etcd-server): {source}")]
    Spawn {
        /// The binary that was tried.
        binary: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// An I/O error (temp dir, free port).
    #[error("etcd setup: {0}")]
    Io(#[from] std::io::Error),
    /// etcd did not answer in time.
    #[error("etcd on {0} did not become ready within {1:?}")]
    NotReady(String, Duration),
}

/// Ports handed out by [`free_port`]: below Linux's ephemeral range (32768–60999), so
/// that an outgoing connection cannot take a port between its pick and its use.
const PORT_RANGE: std::ops::Range<u16> = 20_000..32_000;

/// A free TCP port on 127.0.0.1 (checked by binding it, then released), picked below the
/// ephemeral range; successive calls (in any process) walk through different ports.
pub fn free_port() -> std::io::Result<u16> {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(PORT_RANGE.end - PORT_RANGE.start);
    if NEXT.load(Ordering::Relaxed) == u32::MAX {
        // Start somewhere that depends on the process, so parallel test binaries differ.
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let seed = (std::process::id().wrapping_mul(7919) ^ nanos) % span;
        let _ = NEXT.compare_exchange(u32::MAX, seed, Ordering::Relaxed, Ordering::Relaxed);
    }
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = PORT_RANGE.start + u16::try_from(offset).unwrap_or(0);
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A free `127.0.0.1:port` address.
pub fn free_addr() -> std::io::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port()?)))
}

/// One member's fixed settings (kept across restarts).
#[derive(Debug, Clone)]
struct MemberSpec {
    name: String,
    client_url: String,
    peer_url: String,
    data_dir: PathBuf,
}

/// One running (or stopped) etcd member.
#[derive(Debug)]
pub struct EtcdProcess {
    spec: MemberSpec,
    initial_cluster: String,
    child: Option<Child>,
    _dir: Option<tempfile::TempDir>,
}

/// The etcd binary to run: `$SWITCHYARD_ETCD_BIN` or `etcd` on the `PATH`.
fn etcd_binary() -> String {
    std::env::var("SWITCHYARD_ETCD_BIN").unwrap_or_else(|_| "etcd".to_owned())
}

impl EtcdProcess {
    /// Starts a single-member etcd on free loopback ports and waits until it answers.
    pub async fn start() -> Result<Self, EtcdProcessError> {
        let mut cluster = EtcdCluster::start(1).await?;
        Ok(cluster.members.remove(0))
    }

    /// The client URL (`http://127.0.0.1:PORT`).
    pub fn endpoint(&self) -> &str {
        &self.spec.client_url
    }

    /// The data directory.
    pub fn data_dir(&self) -> &Path {
        &self.spec.data_dir
    }

    fn spawn(&mut self, state: &str) -> Result<(), EtcdProcessError> {
        let binary = etcd_binary();
        let s = &self.spec;
        let child = Command::new(&binary)
            .arg("--name")
            .arg(&s.name)
            .arg("--data-dir")
            .arg(&s.data_dir)
            .arg("--listen-client-urls")
            .arg(&s.client_url)
            .arg("--advertise-client-urls")
            .arg(&s.client_url)
            .arg("--listen-peer-urls")
            .arg(&s.peer_url)
            .arg("--initial-advertise-peer-urls")
            .arg(&s.peer_url)
            .arg("--initial-cluster")
            .arg(&self.initial_cluster)
            .arg("--initial-cluster-state")
            .arg(state)
            .arg("--initial-cluster-token")
            .arg("switchyard-test")
            .args(["--logger", "zap", "--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|source| EtcdProcessError::Spawn { binary, source })?;
        self.child = Some(child);
        Ok(())
    }

    /// Waits until this member answers a status request.
    pub async fn wait_ready(&self, within: Duration) -> Result<(), EtcdProcessError> {
        let deadline = Instant::now() + within;
        loop {
            let ok = async {
                let mut c = etcd_client::Client::connect(
                    [self.endpoint()],
                    Some(
                        etcd_client::ConnectOptions::new()
                            .with_connect_timeout(Duration::from_millis(500))
                            .with_timeout(Duration::from_secs(1)),
                    ),
                )
                .await?;
                c.get("switchyard-readiness", None).await
            }
            .await
            .is_ok();
            if ok {
                return Ok(());
            }
            if Instant::now() >= deadline {
                return Err(EtcdProcessError::NotReady(
                    self.endpoint().to_owned(),
                    within,
                ));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the process at once (SIGKILL), keeping its data dir.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the process again on the same ports and data dir, and waits until it answers.
    pub async fn restart(&mut self) -> Result<(), EtcdProcessError> {
        self.kill();
        self.spawn("existing")?;
        self.wait_ready(Duration::from_secs(20)).await
    }

    /// Starts the process again on the same ports and data dir without waiting for it to
    /// answer (for an etcd with auth enabled, which an anonymous readiness probe cannot see).
    pub fn respawn(&mut self) -> Result<(), EtcdProcessError> {
        self.kill();
        self.spawn("existing")
    }

    /// Kills the process, wipes its data dir and starts a fresh single-member etcd on the
    /// same ports (all keys and leases lost).
    pub async fn restart_wiped(&mut self) -> Result<(), EtcdProcessError> {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.spec.data_dir);
        self.spawn("new")?;
        self.wait_ready(Duration::from_secs(20)).await
    }

    /// A client connected to this member only.
    pub async fn client(&self) -> Result<etcd_client::Client, etcd_client::Error> {
        etcd_client::Client::connect([self.endpoint()], None).await
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A local etcd cluster of one or more members.
#[derive(Debug)]
pub struct EtcdCluster {
    /// The members, in start order.
    pub members: Vec<EtcdProcess>,
}

impl EtcdCluster {
    /// Starts `n` members on free loopback ports and waits until all answer.
    pub async fn start(n: usize) -> Result<Self, EtcdProcessError> {
        let mut specs = Vec::with_capacity(n);
        let mut dirs = Vec::with_capacity(n);
        for i in 0..n {
            let dir = tempfile::Builder::new()
                .prefix("switchyard-etcd-")
                .tempdir()?;
            specs.push(MemberSpec {
                name: format!("m{i}"),
                client_url: format!("http://127.0.0.1:{}", free_port()?),
                peer_url: format!("http://127.0.0.1:{}", free_port()?),
                data_dir: dir.path().join("data"),
            });
            dirs.push(dir);
        }
        let initial_cluster = specs
            .iter()
            .map(|s| format!("{}={}", s.name, s.peer_url))
            .collect::<Vec<_>>()
            .join(",");
        let mut members = Vec::with_capacity(n);
        for (spec, dir) in specs.into_iter().zip(dirs) {
            let mut m = EtcdProcess {
                spec,
                initial_cluster: initial_cluster.clone(),
                child: None,
                _dir: Some(dir),
            };
            m.spawn("new")?;
            members.push(m);
        }
        for m in &members {
            m.wait_ready(Duration::from_secs(30)).await?;
        }
        Ok(Self { members })
    }

    /// All client URLs.
    pub fn endpoints(&self) -> Vec<String> {
        self.members
            .iter()
            .map(|m| m.endpoint().to_owned())
            .collect()
    }
}
