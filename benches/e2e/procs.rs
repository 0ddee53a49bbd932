//! Processes started by the harness (stopped by pid: SIGTERM, then SIGKILL, also when
//! dropped), their CPU and memory from /proc, and small helpers around them.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// A child process of the harness, stopped when dropped.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub pid: u32,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
        let child = cmd
            .stdin(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {name}"))?;
        let pid = child.id().ok_or_else(|| anyhow!("{name} exited at once"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            pid,
        })
    }

    /// The process and its children (nginx workers), for CPU and RSS.
    pub fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid)) {
            pids.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids
    }

    /// Stops the process: SIGTERM, up to 5 s to exit, then SIGKILL.
    pub async fn stop(self) {
        self.stop_within(Duration::from_secs(5)).await;
    }

    /// Stops the process: SIGTERM, up to `within` to exit, then SIGKILL.
    pub async fn stop_within(mut self, within: Duration) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(within, self.child.wait())
            .await
            .is_err()
        {
            eprintln!("e2e: {} did not stop on SIGTERM; killing it", self.name);
            let _ = self.child.kill().await;
        }
    }
}

impl Drop for Proc {
    /// A process not stopped by [`Proc::stop`] (an error cut the run short) still gets
    /// SIGTERM first, so that nginx's master takes its workers down with it.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &self.pid.to_string()])
                .status();
            for _ in 0..100 {
                if !matches!(self.child.try_wait(), Ok(None)) {
                    return;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = self.child.start_kill();
        }
    }
}

/// CPU and memory of a proxy's processes, read from /proc.
#[derive(Debug, Clone, Copy, Default)]
pub struct Usage {
    pub cpu_secs: f64,
    pub peak_rss_kib: u64,
}

pub fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of all threads of `pid` (including ended ones), in seconds.
pub fn cpu_secs(pids: &[u32], tck: f64) -> f64 {
    pids.iter()
        .filter_map(|p| std::fs::read_to_string(format!("/proc/{p}/stat")).ok())
        .filter_map(|s| {
            // Fields after the command name (which may hold spaces) in parentheses.
            let rest = &s[s.rfind(')')? + 2..];
            let f: Vec<&str> = rest.split_whitespace().collect();
            // utime and stime are fields 14 and 15, i.e. 12 and 13 after "pid (comm)".
            Some(f.get(11)?.parse::<f64>().ok()? + f.get(12)?.parse::<f64>().ok()?)
        })
        .sum::<f64>()
        / tck
}

pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A measurement window over some processes: resets their peak RSS at the start.
pub struct Meter {
    pub pids: Vec<u32>,
    pub tck: f64,
    pub cpu0: f64,
}

impl Meter {
    pub fn start(pids: Vec<u32>, tck: f64) -> Self {
        for p in &pids {
            // "5" resets the peak RSS (VmHWM) to the current RSS.
            let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
        }
        let cpu0 = cpu_secs(&pids, tck);
        Self { pids, tck, cpu0 }
    }

    pub fn finish(&self) -> Usage {
        Usage {
            cpu_secs: cpu_secs(&self.pids, self.tck) - self.cpu0,
            peak_rss_kib: self.pids.iter().map(|p| status_kib(*p, "VmHWM:")).sum(),
        }
    }
}

pub async fn wait_listening(addr: SocketAddr, within: Duration) -> Result<Duration> {
    let start = Instant::now();
    loop {
        if TcpStream::connect(addr).await.is_ok() {
            return Ok(start.elapsed());
        }
        if start.elapsed() > within {
            bail!("nothing listens on {addr} after {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

pub fn tool_version(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_owned())
}

pub fn which(cmd: &str) -> Option<PathBuf> {
    if cmd.contains('/') {
        let p = PathBuf::from(cmd);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH")?
        .to_str()?
        .split(':')
        .chain(["/usr/sbin", "/sbin"])
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.is_file())
}
