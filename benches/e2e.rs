//! End-to-end benchmark: switchyard against direct calls, nginx (`grpc_pass`) and HAProxy
//! (`proto h2`), over the same three tonic Echo backends, on loopback.
//!
//! ```sh
//! cargo bench --bench e2e -- run              # builds target/e2e-proxy/release/switchyard first
//! cargo bench --bench e2e -- run --calls 50000 --targets direct,switchyard,haproxy
//! ```
//!
//! Plain `cargo bench` only prints how to run it (the run takes minutes). The harness
//! installs nothing: h2load (`nghttp2-client`) and etcd are required, nginx and HAProxy
//! are compared when installed and skipped with a note otherwise. It starts etcd, three
//! backends (this binary re-executed as a tonic Echo server, one worker thread each,
//! registered in etcd), `switchyard proxy` as a separate release process, nginx and HAProxy
//! (temp configs and dirs, free loopback ports, foreground, killed afterwards), and drives
//! the same load at each target in turn:
//!
//! - unary, small messages, with h2load: concurrency 1 (latency), 64 and 256 streams over
//!   4 connections (throughput), and a fixed offered load (20,000 calls/s) for CPU per call;
//!   latency percentiles come from h2load's `--log-file`; gRPC-level failures (trailers-only
//!   answers, which h2load counts as HTTP 200) are found from the DATA bytes received;
//! - server-streaming of 1 MiB messages with a tonic client that checks every grpc-status;
//! - for each: calls/s, p50/p99/p999, failed calls, the proxy's CPU (utime+stime of all
//!   its processes, from /proc) per 100k calls and its peak RSS (VmHWM, reset before each
//!   run through /proc/PID/clear_refs).
//!
//! Then, for switchyard only: the time from an etcd put of a new endpoint to the first call
//! routed to it (100 puts), RSS with 10,000 concurrent open streams, and start-up to ready
//! with 1,000 services × 10 endpoints in etcd. Everything is printed and written to
//! `benches/RESULTS.md` (between markers; the text around them is kept).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{ExitCode, Stdio};
use std::str::FromStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message as _;
use tokio::net::{TcpListener, TcpStream};
use tokio::process::{Child, Command};
use tonic::transport::{Channel, Endpoint};

use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::echo_server::{Echo, EchoServer};
use switchyard::echo::{EchoReply, EchoRequest};
use switchyard::testkit::{free_addr, EtcdProcess};

/// First argument that makes this binary an Echo backend instead of the harness.
const BACKEND_ROLE: &str = "__switchyard_bench_backend";
const UNARY_PATH: &str = "/switchyard.echo.v1.Echo/Unary";
const SERVICE: &str = "switchyard.echo.v1.Echo";
/// Service the put-to-first-call measurement adds endpoints to (a bound listener).
const FRESH_SERVICE: &str = "bench.fresh";
/// The unary request's text: 5-byte frame header + 8 bytes of protobuf = 13 bytes.
const MESSAGE: &str = "hello!";
const BACKEND_NAMES: [&str; 3] = ["b1", "b2", "b3"];
/// Everything the load can be driven at; `switchyard-2w` is switchyard with two worker
/// threads (`--worker-threads 2`; the default is one).
const TARGETS: [&str; 5] = ["direct", "switchyard", "switchyard-2w", "nginx", "haproxy"];
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;
const RESULTS_BEGIN: &str =
    "<!-- e2e results: begin (written by `cargo bench --bench e2e -- run`) -->";
const RESULTS_END: &str = "<!-- e2e results: end -->";

const USAGE: &str = "\
switchyard end-to-end benchmark (takes several minutes; not run by plain `cargo bench`).

  cargo bench --bench e2e -- run [options]

options:
  --calls N          unary calls per throughput run (default 200000; concurrency-1 runs use N/10)
  --rate N           offered load of the fixed-rate run, calls/s in all (default 20000)
  --stream-mib N     MiB per server-streaming run (default 256, in 1 MiB messages)
  --targets LIST     comma-separated subset of direct,switchyard,switchyard-2w,nginx,haproxy
                     (default all; switchyard-2w = two worker threads)
  --rounds N         rounds of the unary scenarios (default 3, at most 9): each round drives
                     every target in turn, starting one target later than the round before;
                     the table shows each target's median round, the ratios are per round
  --no-extras        skip put-to-first-call, 10,000 open streams and 1,000x10 start-up
  --extras-only      only those
  --no-build         do not build the proxy first (`cargo build --release` into target/e2e-proxy)
  --out PATH         results file (default benches/RESULTS.md); --no-write to print only
  --hold SECS        set everything up, print the targets' addresses and pids, wait SECS
                     (at most 3600), Ctrl-C or SIGTERM, tear down; for profiling by hand
";

/// Command-line options of the harness.
#[derive(Debug, Clone)]
struct Options {
    run: bool,
    calls: u64,
    rate: u64,
    stream_mib: u64,
    /// Rounds of the unary scenarios (each target once per round, interleaved).
    rounds: u32,
    targets: Vec<String>,
    main_table: bool,
    extras: bool,
    build: bool,
    out: Option<PathBuf>,
    /// Set up, print the targets, and wait this long (for profiling by hand).
    hold: Option<Duration>,
    command: String,
}

impl Options {
    fn parse(args: &[String]) -> Result<Self> {
        let mut o = Options {
            run: false,
            calls: 200_000,
            rate: 20_000,
            stream_mib: 256,
            rounds: 3,
            targets: ["direct", "switchyard", "switchyard-2w", "nginx", "haproxy"]
                .map(String::from)
                .to_vec(),
            main_table: true,
            extras: true,
            build: true,
            out: Some(PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/benches/RESULTS.md"
            ))),
            hold: None,
            command: String::new(),
        };
        let mut it = args.iter();
        let num = |v: Option<&String>, name: &str| -> Result<u64> {
            v.ok_or_else(|| anyhow!("{name} needs a value"))?
                .parse()
                .with_context(|| format!("{name}: not a number"))
        };
        while let Some(a) = it.next() {
            match a.as_str() {
                "run" => o.run = true,
                "--calls" => o.calls = num(it.next(), "--calls")?.max(1000),
                "--rate" => o.rate = num(it.next(), "--rate")?.max(100),
                "--stream-mib" => o.stream_mib = num(it.next(), "--stream-mib")?.max(4),
                "--rounds" => o.rounds = num(it.next(), "--rounds")?.clamp(1, 9) as u32,
                "--targets" => {
                    let list = it.next().ok_or_else(|| anyhow!("--targets needs a list"))?;
                    o.targets = list.split(',').map(|s| s.trim().to_owned()).collect();
                    for t in &o.targets {
                        if !TARGETS.contains(&t.as_str()) {
                            bail!("--targets: unknown target {t:?}");
                        }
                    }
                }
                "--no-extras" => o.extras = false,
                "--extras-only" => o.main_table = false,
                "--no-build" => o.build = false,
                "--out" => {
                    o.out = Some(PathBuf::from(
                        it.next().ok_or_else(|| anyhow!("--out needs a path"))?,
                    ))
                }
                "--no-write" => o.out = None,
                "--hold" => o.hold = Some(Duration::from_secs(num(it.next(), "--hold")?.min(3600))),
                // `cargo bench` passes --bench (after the user's arguments).
                "--bench" => {}
                // Without `run`, criterion-style arguments of a plain `cargo bench` are ignored.
                _ if !o.run => {}
                other => bail!("unknown argument {other:?}\n\n{USAGE}"),
            }
        }
        o.command = std::iter::once("cargo bench --bench e2e --".to_owned())
            .chain(args.iter().filter(|a| *a != "--bench").cloned())
            .collect::<Vec<_>>()
            .join(" ");
        Ok(o)
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some(BACKEND_ROLE) {
        return match backend_main(&args[1..]) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("bench backend: {e:#}");
                ExitCode::FAILURE
            }
        };
    }
    let opts = match Options::parse(&args) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("e2e: {e:#}");
            return ExitCode::FAILURE;
        }
    };
    if !opts.run {
        println!("e2e: skipped (long). {USAGE}");
        return ExitCode::SUCCESS;
    }
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // Interrupted (Ctrl-C, SIGTERM), the run is dropped: every process it started is
    // stopped on the way out instead of being left running.
    let outcome = rt.block_on(async {
        tokio::select! {
            r = run(opts) => r,
            s = interrupted() => Err(anyhow!("interrupted by {s}; stopped what was started")),
        }
    });
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("e2e: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Waits for SIGINT or SIGTERM; returns which came.
async fn interrupted() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let Ok(mut term) = signal(SignalKind::terminate()) else {
        let _ = tokio::signal::ctrl_c().await;
        return "SIGINT";
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => "SIGINT",
        _ = term.recv() => "SIGTERM",
    }
}

// ---------------------------------------------------------------------------------------
// The backend role: a tonic Echo server on one or more listeners, with one worker thread and a stream limit high enough for
// the 10,000-stream measurement.

type ReplyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

/// The backends' Echo service: the demo's unary and server-streaming behaviour (echo the
/// message; `count` replies of `reply_size` bytes, each after `delay_ms`), kept minimal so
/// that the backends cost the same behind every target. Server streams end after their
/// last message.
struct BenchEcho {
    name: String,
}

#[tonic::async_trait]
impl Echo for BenchEcho {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let req = request.into_inner();
        if req.delay_ms > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(req.delay_ms))).await;
        }
        Ok(tonic::Response::new(EchoReply {
            payload: req.payload,
            message: req.message,
            server: self.name.clone(),
            seq: 0,
        }))
    }

    type ServerStreamStream = ReplyStream;

    async fn server_stream(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        let req = request.into_inner();
        let payload = vec![b'x'; req.reply_size as usize];
        let (server, message, delay) = (self.name.clone(), req.message, req.delay_ms);
        let replies = futures_util::stream::iter(0..u64::from(req.count)).then(move |seq| {
            let reply = EchoReply {
                payload: payload.clone(),
                message: message.clone(),
                server: server.clone(),
                seq,
            };
            async move {
                if delay > 0 {
                    tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
                }
                Ok(reply)
            }
        });
        Ok(tonic::Response::new(Box::pin(replies) as ReplyStream))
    }

    async fn client_stream(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        Err(tonic::Status::unimplemented("not used by the benchmark"))
    }

    type BidiStream = ReplyStream;

    async fn bidi(
        &self,
        _: tonic::Request<tonic::Streaming<EchoRequest>>,
    ) -> Result<tonic::Response<ReplyStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("not used by the benchmark"))
    }
}

fn backend_main(args: &[String]) -> Result<()> {
    let mut listen = Vec::new();
    let mut name = "echo".to_owned();
    let mut threads = 1usize;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--listen" => listen.push(SocketAddr::from_str(v).context("--listen")?),
            "--name" => name.clone_from(v),
            "--threads" => threads = v.parse().context("--threads")?,
            other => bail!("unknown backend argument {other:?}"),
        }
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let mut incoming = Vec::with_capacity(listen.len());
        for addr in &listen {
            let l = TcpListener::bind(addr)
                .await
                .with_context(|| format!("bind {addr}"))?;
            // TCP_NODELAY on accepted connections, as gRPC servers commonly set (tonic's
            // `tcp_nodelay` does not reach streams from a listener we bind ourselves).
            incoming.push(tonic::transport::server::TcpIncoming::from(l).with_nodelay(Some(true)));
        }
        let (health, health_service) = tonic_health::server::health_reporter();
        health.set_serving::<EchoServer<BenchEcho>>().await;
        let echo = EchoServer::new(BenchEcho { name })
            .max_decoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE);
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(20_000)
            .initial_stream_window_size(1 << 20)
            .initial_connection_window_size(4 << 20)
            .add_service(health_service)
            .add_service(echo)
            .serve_with_incoming_shutdown(
                futures_util::stream::select_all(incoming),
                switchyard::proxy::shutdown_signal(),
            )
            .await?;
        Ok(())
    })
}

// ---------------------------------------------------------------------------------------
// Processes: started by the harness, stopped by pid (SIGTERM, then SIGKILL) when dropped.

/// A child process of the harness, stopped when dropped.
struct Proc {
    name: String,
    child: Child,
    pid: u32,
}

impl Proc {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Self> {
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
    fn pids(&self) -> Vec<u32> {
        let mut pids = vec![self.pid];
        if let Ok(s) = std::fs::read_to_string(format!("/proc/{0}/task/{0}/children", self.pid)) {
            pids.extend(s.split_whitespace().filter_map(|p| p.parse::<u32>().ok()));
        }
        pids
    }

    /// Stops the process: SIGTERM, up to 5 s to exit, then SIGKILL.
    async fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid.to_string()])
            .status()
            .await;
        if tokio::time::timeout(Duration::from_secs(5), self.child.wait())
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
struct Usage {
    cpu_secs: f64,
    peak_rss_kib: u64,
}

fn clk_tck() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of all threads of `pid` (including ended ones), in seconds.
fn cpu_secs(pids: &[u32], tck: f64) -> f64 {
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

fn status_kib(pid: u32, field: &str) -> u64 {
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
struct Meter {
    pids: Vec<u32>,
    tck: f64,
    cpu0: f64,
}

impl Meter {
    fn start(pids: Vec<u32>, tck: f64) -> Self {
        for p in &pids {
            // "5" resets the peak RSS (VmHWM) to the current RSS.
            let _ = std::fs::write(format!("/proc/{p}/clear_refs"), "5");
        }
        let cpu0 = cpu_secs(&pids, tck);
        Self { pids, tck, cpu0 }
    }

    fn finish(&self) -> Usage {
        Usage {
            cpu_secs: cpu_secs(&self.pids, self.tck) - self.cpu0,
            peak_rss_kib: self.pids.iter().map(|p| status_kib(*p, "VmHWM:")).sum(),
        }
    }
}

async fn wait_listening(addr: SocketAddr, within: Duration) -> Result<Duration> {
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

fn tool_version(cmd: &str, args: &[&str]) -> Option<String> {
    let out = std::process::Command::new(cmd).args(args).output().ok()?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    text.lines().next().map(|l| l.trim().to_owned())
}

fn which(cmd: &str) -> Option<PathBuf> {
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

// ---------------------------------------------------------------------------------------
// The targets.

/// Something the load is driven at.
struct Target {
    name: &'static str,
    addr: SocketAddr,
    /// The proxy's processes (`None` for direct calls).
    proc: Option<Proc>,
}

fn spawn_backend(addrs: &[SocketAddr], name: &str) -> Result<Proc> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(BACKEND_ROLE).args(["--name", name]);
    for a in addrs {
        cmd.arg("--listen").arg(a.to_string());
    }
    cmd.env("RUST_LOG", "warn").stdout(Stdio::null());
    Proc::spawn(&format!("backend {name}"), &mut cmd)
}

/// Where the proxy under test is built: a target dir of its own. `cargo bench` builds the
/// `switchyard` binary too, with the bench profile, into the same `target/release` as
/// `cargo build --release` and under the same name, so the release build there is not
/// reliably the one found at `target/release/switchyard`.
fn proxy_target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("target"))
        .join("e2e-proxy")
}

/// The release build of the proxy under test.
fn switchyard_binary() -> PathBuf {
    proxy_target_dir().join("release").join("switchyard")
}

fn spawn_switchyard(
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
    cmd.args(["--etcd-endpoints", etcd, "--admin-listen", "off"])
        .args(extra)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null());
    Proc::spawn("switchyard", &mut cmd)
}

fn spawn_nginx(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Result<Proc> {
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
         upstream echo {{\n{servers}    keepalive 512;\n    keepalive_requests 100000000;\n}}\n\
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

fn spawn_haproxy(dir: &Path, listen: SocketAddr, backends: &[SocketAddr]) -> Result<Proc> {
    let servers: String = backends
        .iter()
        .enumerate()
        .map(|(i, b)| format!("  server b{} {b} proto h2\n", i + 1))
        .collect();
    let conf = format!(
        "global\n  nbthread 2\n  maxconn 9000\n  tune.h2.max-concurrent-streams 1024\n\
         defaults\n  mode http\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\n\
         frontend fe\n  bind {listen} proto h2\n  default_backend be\n\
         backend be\n  balance roundrobin\n{servers}"
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

// ---------------------------------------------------------------------------------------
// Clients.

async fn channel(addr: SocketAddr) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

fn echo_client(ch: Channel) -> EchoClient<Channel> {
    EchoClient::new(ch)
        .max_decoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
}

fn unary_request() -> EchoRequest {
    EchoRequest {
        message: MESSAGE.into(),
        ..Default::default()
    }
}

/// Bytes of DATA a backend sends for one successful unary call (frame header + reply).
fn unary_reply_len() -> u64 {
    let reply = EchoReply {
        message: MESSAGE.into(),
        server: BACKEND_NAMES[0].into(),
        ..Default::default()
    };
    5 + reply.encoded_len() as u64
}

/// Makes one unary call through `addr`, checking that a backend answered it.
async fn check_unary(addr: SocketAddr) -> Result<()> {
    let mut c = echo_client(channel(addr).await?);
    let mut req = tonic::Request::new(unary_request());
    req.set_timeout(Duration::from_secs(2));
    let reply = c.unary(req).await?.into_inner();
    if !BACKEND_NAMES.contains(&reply.server.as_str()) {
        bail!("unexpected reply {reply:?}");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Measurements.

/// What one load run gave.
#[derive(Debug, Clone, Default)]
struct Run {
    calls_per_sec: f64,
    /// Calls that completed with grpc-status 0 / were sent.
    ok: u64,
    failed: u64,
    /// Latencies in microseconds (per call; per message for streaming).
    p50_us: f64,
    p99_us: f64,
    p999_us: f64,
    /// MB/s for streaming runs.
    mb_per_sec: Option<f64>,
    /// Bytes received by streaming runs.
    bytes: u64,
    usage: Option<Usage>,
    note: Option<String>,
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64
}

fn with_percentiles(mut run: Run, mut lat: Vec<u64>) -> Run {
    lat.sort_unstable();
    run.p50_us = percentile(&lat, 0.50);
    run.p99_us = percentile(&lat, 0.99);
    run.p999_us = percentile(&lat, 0.999);
    run
}

/// One unary load shape.
#[derive(Debug, Clone, Copy)]
struct Shape {
    label: &'static str,
    clients: u32,
    streams_per_client: u32,
    calls: u64,
    /// Offered load in calls/s in all, if fixed.
    rate: Option<u64>,
}

/// Runs h2load against `addr` and parses its summary and per-request log.
async fn h2load(addr: SocketAddr, shape: Shape, body: &Path, dir: &Path) -> Result<Run> {
    let log = dir.join("h2load.log");
    let _ = std::fs::remove_file(&log);
    let mut cmd = Command::new("h2load");
    cmd.arg("-c")
        .arg(shape.clients.to_string())
        .arg("-m")
        .arg(shape.streams_per_client.to_string())
        .args(["-t", "1", "-N", "10s"])
        .arg("-n")
        .arg(shape.calls.to_string())
        .arg("-d")
        .arg(body)
        .arg("--log-file")
        .arg(&log)
        .args(["-H", "content-type: application/grpc", "-H", "te: trailers"]);
    if let Some(rate) = shape.rate {
        cmd.arg(format!("--rps={}", rate / u64::from(shape.clients)));
    }
    cmd.arg(format!("http://{addr}{UNARY_PATH}"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    // Bounded in time: at worst 1,000 calls/s, plus start-up.
    let limit = Duration::from_secs(30 + shape.calls / 1000);
    let out = tokio::time::timeout(limit, cmd.output())
        .await
        .map_err(|_| anyhow!("h2load did not finish within {limit:?}"))?
        .context("cannot run h2load (install nghttp2-client)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    parse_h2load(&text, &log).with_context(|| format!("h2load output:\n{text}"))
}

fn parse_h2load(text: &str, log: &Path) -> Result<Run> {
    let line = |prefix: &str| -> Result<&str> {
        text.lines()
            .find(|l| l.starts_with(prefix))
            .ok_or_else(|| anyhow!("no {prefix:?} line"))
    };
    // "finished in 2.35s, 85012.34 req/s, 3.48MB/s"
    let finished = line("finished in")?;
    let calls_per_sec: f64 = finished
        .split(", ")
        .find(|p| p.ends_with("req/s"))
        .and_then(|p| p.trim_end_matches(" req/s").parse().ok())
        .ok_or_else(|| anyhow!("no req/s"))?;
    // "requests: 200000 total, 200000 started, 200000 done, 200000 succeeded, 0 failed, ..."
    let requests = line("requests:")?;
    let count = |what: &str| -> u64 {
        requests
            .trim_start_matches("requests:")
            .split(',')
            .map(str::trim)
            .find(|p| p.ends_with(what))
            .and_then(|p| p.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0)
    };
    let (total, succeeded) = (count("total"), count("succeeded"));
    // "traffic: 4.39MB (4600142) total, 1.08MB (1128072) headers (...), 2.48MB (2600000) data"
    let traffic = line("traffic:")?;
    let data_bytes: u64 = traffic
        .split(", ")
        .find(|p| p.ends_with(" data"))
        .and_then(|p| p.split('(').nth(1))
        .and_then(|p| p.split(')').next())
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| anyhow!("no data bytes"))?;
    // A call answered with a reply carries exactly one reply's DATA; a trailers-only error
    // (the way proxies and tonic fail calls) carries none.
    let ok = (data_bytes / unary_reply_len()).min(succeeded);
    let lat: Vec<u64> = std::fs::read_to_string(log)
        .with_context(|| format!("h2load log {}", log.display()))?
        .lines()
        .filter_map(|l| l.split('\t').nth(2)?.trim().parse().ok())
        .collect();
    Ok(with_percentiles(
        Run {
            calls_per_sec,
            ok,
            failed: total.saturating_sub(ok),
            ..Run::default()
        },
        lat,
    ))
}

/// Server-streaming of 1 MiB messages: `streams` calls at once, `per_stream` messages each,
/// bounded in time (a run cut short reports what arrived, with a note).
async fn stream_load(addr: SocketAddr, streams: u32, per_stream: u32) -> Result<Run> {
    let client = echo_client(channel(addr).await?);
    let gaps = Arc::new(Mutex::new(Vec::<u64>::new()));
    let start = Instant::now();
    let mut calls = FuturesUnordered::new();
    for _ in 0..streams {
        let mut c = client.clone();
        let gaps = Arc::clone(&gaps);
        calls.push(async move {
            let req = EchoRequest {
                message: MESSAGE.into(),
                count: per_stream,
                reply_size: MIB as u32,
                ..Default::default()
            };
            let mut last = Instant::now();
            let mut got = 0u32;
            let mut stream = c.server_stream(req).await?.into_inner();
            while let Some(msg) = stream.message().await? {
                if msg.payload.len() as u64 != MIB {
                    bail!("message of {} bytes", msg.payload.len());
                }
                gaps.lock()
                    .map_err(|_| anyhow!("poisoned"))?
                    .push(last.elapsed().as_micros() as u64);
                last = Instant::now();
                got += 1;
            }
            if got != per_stream {
                bail!("{got} of {per_stream} messages");
            }
            Ok::<_, anyhow::Error>(())
        });
    }
    let limit = Duration::from_secs(30 + u64::from(streams * per_stream) / 10);
    let (mut ok, mut failed) = (0u64, 0u64);
    let mut note = None;
    let collect = async {
        while let Some(r) = calls.next().await {
            match r {
                Ok(()) => ok += 1,
                Err(e) => {
                    failed += 1;
                    note.get_or_insert_with(|| format!("{e:#}"));
                }
            }
        }
    };
    if tokio::time::timeout(limit, collect).await.is_err() {
        failed = u64::from(streams) - ok;
        note = Some(format!("cut short after {limit:?}"));
    }
    let secs = start.elapsed().as_secs_f64();
    let lat = std::mem::take(&mut *gaps.lock().map_err(|_| anyhow!("poisoned"))?);
    let bytes = lat.len() as u64 * MIB;
    Ok(with_percentiles(
        Run {
            calls_per_sec: lat.len() as f64 / secs,
            ok,
            failed,
            mb_per_sec: Some(bytes as f64 / 1e6 / secs),
            bytes,
            note,
            ..Run::default()
        },
        lat,
    ))
}

/// One row of the results.
struct Row {
    scenario: &'static str,
    target: &'static str,
    /// The run shown: the median round (or the error, if every round failed).
    run: Result<Run, String>,
    /// Every round in order (`None` for a round that failed).
    rounds: Vec<Option<Run>>,
}

impl Row {
    /// The row of one target's rounds of a scenario: the median round by calls/s, or by
    /// CPU per call at a fixed offered load (where every target gets the same calls/s).
    fn from_rounds(
        scenario: &'static str,
        target: &'static str,
        fixed_rate: bool,
        runs: Vec<Result<Run, String>>,
    ) -> Self {
        let rounds: Vec<Option<Run>> = runs.iter().map(|r| r.as_ref().ok().cloned()).collect();
        let mut ok: Vec<&Run> = rounds.iter().flatten().collect();
        let key = |r: &Run| {
            if fixed_rate {
                r.cpu_us_per_call().unwrap_or(f64::NAN)
            } else {
                r.calls_per_sec
            }
        };
        ok.sort_by(|a, b| key(a).total_cmp(&key(b)));
        let run = match ok.get(ok.len() / 2) {
            Some(m) => Ok((*m).clone()),
            None => runs
                .into_iter()
                .find_map(Result::err)
                .map_or_else(|| Err("no run".to_owned()), Err),
        };
        Self {
            scenario,
            target,
            run,
            rounds,
        }
    }
}

impl Run {
    /// The proxy's CPU per call in µs, if it was measured.
    fn cpu_us_per_call(&self) -> Option<f64> {
        let n = (self.ok + self.failed) as f64;
        self.usage
            .filter(|_| n > 0.0 && self.mb_per_sec.is_none())
            .map(|u| u.cpu_secs / n * 1e6)
    }
}

/// The median of some values (the upper one of the middle two), NaN if there are none.
fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

// ---------------------------------------------------------------------------------------
// switchyard-only measurements.

/// Put → first routed call, `rounds` times, on the listener bound to [`FRESH_SERVICE`].
async fn put_to_first_call(
    etcd: &mut etcd_client::Client,
    fresh: SocketAddr,
    backends: &[SocketAddr],
    rounds: usize,
) -> Result<(Vec<u64>, Vec<u64>)> {
    let mut client = echo_client(channel(fresh).await?);
    let call = |c: &mut EchoClient<Channel>| {
        let mut c = c.clone();
        async move {
            let mut req = tonic::Request::new(unary_request());
            req.set_timeout(Duration::from_secs(2));
            c.unary(req).await
        }
    };
    let (mut routed, mut put_rtt) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        let backend = backends[round % backends.len()];
        let key = format!("services/{FRESH_SERVICE}/{backend}");
        // Start from a service with no endpoint: calls fail with UNAVAILABLE.
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            match call(&mut client).await {
                Err(s) if s.code() == tonic::Code::Unavailable => break,
                _ if Instant::now() > deadline => bail!("{FRESH_SERVICE} still has endpoints"),
                _ => tokio::time::sleep(Duration::from_millis(2)).await,
            }
        }
        let t0 = Instant::now();
        etcd.put(key.as_str(), backend.to_string(), None).await?;
        put_rtt.push(t0.elapsed().as_micros() as u64);
        let deadline = t0 + Duration::from_secs(10);
        loop {
            if call(&mut client).await.is_ok() {
                routed.push(t0.elapsed().as_micros() as u64);
                break;
            }
            if Instant::now() > deadline {
                bail!("no call reached the new endpoint {backend} within 10 s");
            }
        }
        etcd.delete(key.as_str(), None).await?;
        client = echo_client(channel(fresh).await?);
    }
    Ok((routed, put_rtt))
}

/// Opens `n` server streams through `addr` that stay open (the backend waits before its
/// first message), over enough connections; returns them once all have their headers.
async fn open_streams(
    addr: SocketAddr,
    n: usize,
    per_conn: usize,
) -> Result<Vec<tonic::Streaming<EchoReply>>> {
    let mut opened = Vec::with_capacity(n);
    let mut pending = FuturesUnordered::new();
    let mut left = n;
    while left > 0 {
        let k = left.min(per_conn);
        left -= k;
        let client = echo_client(channel(addr).await?);
        for _ in 0..k {
            let mut c = client.clone();
            pending.push(async move {
                let req = EchoRequest {
                    message: MESSAGE.into(),
                    count: 1,
                    delay_ms: 120_000,
                    ..Default::default()
                };
                c.server_stream(req).await.map(|r| r.into_inner())
            });
        }
    }
    let collect = async {
        while let Some(r) = pending.next().await {
            opened.push(r?);
        }
        Ok::<_, tonic::Status>(())
    };
    tokio::time::timeout(Duration::from_secs(120), collect)
        .await
        .map_err(|_| anyhow!("{n} streams not open within 120 s"))??;
    Ok(opened)
}

/// Start-up to ready with `services` × `per_service` endpoints in etcd: from spawning the
/// proxy until one call of every service has reached a backend.
struct Startup {
    listening: Duration,
    ready: Duration,
    rss_kib: u64,
    cpu_secs: f64,
}

async fn startup_many(
    etcd_endpoint: &str,
    etcd: &mut etcd_client::Client,
    services: usize,
    per_service: usize,
    tck: f64,
) -> Result<Startup> {
    let ports: Vec<SocketAddr> = (0..per_service)
        .map(|_| free_addr())
        .collect::<std::io::Result<_>>()?;
    let backend = spawn_backend(&ports, "wide")?;
    for p in &ports {
        wait_listening(*p, Duration::from_secs(10)).await?;
    }
    let names: Vec<String> = (0..services).map(|i| format!("bench.s{i}")).collect();
    for chunk in names.chunks(10) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .flat_map(|s| {
                ports.iter().map(move |p| {
                    etcd_client::TxnOp::put(format!("wide/{s}/{p}"), p.to_string(), None)
                })
            })
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let listen = free_addr()?;
    let t0 = Instant::now();
    let proxy = spawn_switchyard(
        &[listen.to_string()],
        etcd_endpoint,
        &["--prefix", "wide", "--max-services", "2000"],
        None,
    )?;
    let result = async {
        wait_listening(listen, Duration::from_secs(30)).await?;
        let listening = t0.elapsed();
        let mut channels = Vec::new();
        for _ in 0..8 {
            channels.push(channel(listen).await?);
        }
        let mut pending: FuturesUnordered<_> = names
            .iter()
            .enumerate()
            .map(|(i, name)| first_call(channels[i % channels.len()].clone(), name.clone()))
            .collect();
        let all = async {
            while let Some(r) = pending.next().await {
                r?;
            }
            Ok::<_, anyhow::Error>(())
        };
        tokio::time::timeout(Duration::from_secs(180), all)
            .await
            .map_err(|_| anyhow!("not all {services} services answered within 180 s"))??;
        Ok::<_, anyhow::Error>(Startup {
            listening,
            ready: t0.elapsed(),
            rss_kib: status_kib(proxy.pid, "VmRSS:"),
            cpu_secs: cpu_secs(&[proxy.pid], tck),
        })
    }
    .await;
    proxy.stop().await;
    backend.stop().await;
    etcd.delete(
        "wide/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    result
}

/// Calls `/<service>/Unary` until a backend (not the proxy) answers it.
async fn first_call(ch: Channel, service: String) -> Result<()> {
    let path = http::uri::PathAndQuery::try_from(format!("/{service}/Unary"))?;
    let deadline = Instant::now() + Duration::from_secs(170);
    loop {
        let mut grpc = tonic::client::Grpc::new(ch.clone());
        grpc.ready().await?;
        let mut req = tonic::Request::new(unary_request());
        req.set_timeout(Duration::from_secs(10));
        let r: Result<tonic::Response<EchoReply>, tonic::Status> = grpc
            .unary(req, path.clone(), tonic_prost::ProstCodec::default())
            .await;
        match r {
            Ok(_) => return Ok(()),
            // The backend does not serve this path: it answered, so the call was routed.
            Err(s)
                if s.code() == tonic::Code::Unimplemented
                    && !s.message().starts_with("switchyard") =>
            {
                return Ok(())
            }
            Err(s) if Instant::now() > deadline => bail!("{service}: {s}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

// ---------------------------------------------------------------------------------------
// The run.

async fn run(opts: Options) -> Result<()> {
    let tck = clk_tck();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpu_before = cpu_times();
    if which("h2load").is_none() {
        bail!("h2load not found: install Debian's nghttp2-client (the harness installs nothing)");
    }
    if opts.build {
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
    }
    if !switchyard_binary().is_file() {
        bail!(
            "{} not found: run without --no-build first",
            switchyard_binary().display()
        );
    }
    let dir = tempfile::Builder::new()
        .prefix("switchyard-e2e-")
        .tempdir()?;
    let body = dir.path().join("unary.bin");
    let msg = unary_request().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    std::fs::write(&body, &frame)?;

    println!("e2e: starting etcd and 3 backends");
    let etcd_proc = EtcdProcess::start().await?;
    let mut etcd = etcd_proc.client().await?;
    let backend_addrs: Vec<SocketAddr> = (0..3).map(|_| free_addr()).collect::<Result<_, _>>()?;
    let mut backends = Vec::new();
    for (addr, name) in backend_addrs.iter().zip(BACKEND_NAMES) {
        backends.push(spawn_backend(&[*addr], name)?);
    }
    for addr in &backend_addrs {
        wait_listening(*addr, Duration::from_secs(10)).await?;
        etcd.put(format!("services/{SERVICE}/{addr}"), addr.to_string(), None)
            .await?;
    }

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
    let sy_addr = free_addr()?;
    let fresh_addr = free_addr()?;
    if want("switchyard") {
        let p = spawn_switchyard(&[sy_addr.to_string()], etcd_proc.endpoint(), &[], None)?;
        wait_listening(sy_addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name: "switchyard",
            addr: sy_addr,
            proc: Some(p),
        });
    }
    if want("switchyard-2w") {
        let addr = free_addr()?;
        let p = spawn_switchyard(&[addr.to_string()], etcd_proc.endpoint(), &[], Some(2))?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name: "switchyard-2w",
            addr,
            proc: Some(p),
        });
    }
    if want("nginx") {
        match which("nginx") {
            Some(_) => {
                let d = dir.path().join("nginx");
                std::fs::create_dir_all(&d)?;
                let addr = free_addr()?;
                let p = spawn_nginx(&d, addr, &backend_addrs)?;
                wait_listening(addr, Duration::from_secs(10)).await?;
                targets.push(Target {
                    name: "nginx",
                    addr,
                    proc: Some(p),
                });
            }
            None => notes.push("nginx: not installed, skipped (Debian: nginx)".to_owned()),
        }
    }
    if want("haproxy") {
        match which("haproxy") {
            Some(_) => {
                let d = dir.path().join("haproxy");
                std::fs::create_dir_all(&d)?;
                let addr = free_addr()?;
                let p = spawn_haproxy(&d, addr, &backend_addrs)?;
                wait_listening(addr, Duration::from_secs(10)).await?;
                targets.push(Target {
                    name: "haproxy",
                    addr,
                    proc: Some(p),
                });
            }
            None => notes.push("haproxy: not installed, skipped (Debian: haproxy)".to_owned()),
        }
    }
    for n in &notes {
        println!("e2e: {n}");
    }
    // Every target answers before any load (and its connections to the backends exist).
    for t in &targets {
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match check_unary(t.addr).await {
                Ok(()) => break,
                Err(e) if Instant::now() > deadline => bail!("{} does not answer: {e:#}", t.name),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }

    if let Some(hold) = opts.hold {
        let body_path = body.display();
        for t in &targets {
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
        return Ok(());
    }
    let shapes = [
        Shape {
            label: "unary, 1 stream (latency)",
            clients: 1,
            streams_per_client: 1,
            calls: opts.calls / 10,
            rate: None,
        },
        Shape {
            label: "unary, 64 streams / 4 conns",
            clients: 4,
            streams_per_client: 16,
            calls: opts.calls,
            rate: None,
        },
        Shape {
            label: "unary, 256 streams / 4 conns",
            clients: 4,
            streams_per_client: 64,
            calls: opts.calls,
            rate: None,
        },
        Shape {
            label: "unary, fixed offered load, 64 streams",
            clients: 4,
            streams_per_client: 16,
            calls: opts.rate * 5,
            rate: Some(opts.rate),
        },
    ];
    let mut rows: Vec<Row> = Vec::new();
    if opts.main_table {
        // Warm-up: every target's connections and caches.
        for t in &targets {
            let warm = Shape {
                label: "warm-up",
                clients: 4,
                streams_per_client: 16,
                calls: 20_000,
                rate: None,
            };
            let _ = h2load(t.addr, warm, &body, dir.path()).await;
        }
        for shape in &shapes {
            // Every target once per round; each round starts one target later, so that
            // no target always runs first (or last) on a machine whose speed drifts.
            let eligible: Vec<&Target> = targets
                .iter()
                .filter(|t| shape.rate.is_none() || t.proc.is_some())
                .collect();
            let mut per_target: Vec<Vec<Result<Run, String>>> = vec![Vec::new(); eligible.len()];
            for round in 0..opts.rounds as usize {
                for k in 0..eligible.len() {
                    let i = (k + round) % eligible.len();
                    let t = eligible[i];
                    // A moment for the last run's connections to close before the next
                    // run's meter starts (a precaution; no effect was measured).
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    println!(
                        "e2e: {} → {} (round {}/{})",
                        shape.label,
                        t.name,
                        round + 1,
                        opts.rounds
                    );
                    let meter = t.proc.as_ref().map(|p| Meter::start(p.pids(), tck));
                    let run = h2load(t.addr, *shape, &body, dir.path())
                        .await
                        .map(|mut r| {
                            r.usage = meter.as_ref().map(Meter::finish);
                            r
                        })
                        .map_err(|e| format!("{e:#}"));
                    if let Err(e) = &run {
                        println!("e2e: {}: {e}", t.name);
                    }
                    per_target[i].push(run);
                }
            }
            for (t, runs) in eligible.iter().zip(per_target) {
                rows.push(Row::from_rounds(
                    shape.label,
                    t.name,
                    shape.rate.is_some(),
                    runs,
                ));
            }
        }
        let streams = 4u32;
        let per_stream = (opts.stream_mib / u64::from(streams)).max(1) as u32;
        for t in &targets {
            println!("e2e: server-streaming 1 MiB messages → {}", t.name);
            let meter = t.proc.as_ref().map(|p| Meter::start(p.pids(), tck));
            let run = stream_load(t.addr, streams, per_stream)
                .await
                .map(|mut r| {
                    r.usage = meter.as_ref().map(Meter::finish);
                    r
                })
                .map_err(|e| format!("{e:#}"));
            rows.push(Row {
                scenario: "server-streaming 1 MiB messages",
                target: t.name,
                rounds: vec![run.as_ref().ok().cloned()],
                run,
            });
        }
    }

    let mut extras = String::new();
    if opts.extras {
        // A proxy of its own, so that what the load runs left in memory does not count.
        let extra_addr = free_addr()?;
        let sy = spawn_switchyard(
            &[
                extra_addr.to_string(),
                format!("{fresh_addr}={FRESH_SERVICE}"),
            ],
            etcd_proc.endpoint(),
            &[],
            None,
        )?;
        wait_listening(extra_addr, Duration::from_secs(10)).await?;
        check_unary(extra_addr).await?;
        println!("e2e: etcd put → first routed call (100 puts)");
        match put_to_first_call(&mut etcd, fresh_addr, &backend_addrs, 100).await {
            Ok((mut routed, mut rtt)) => {
                routed.sort_unstable();
                rtt.sort_unstable();
                writeln!(
                    extras,
                    "- etcd put of a new endpoint → first call routed to it ({} puts): \
                     p50 {}, p99 {}, max {} (of which the put itself: p50 {}, p99 {})",
                    routed.len(),
                    fmt_us(percentile(&routed, 0.5)),
                    fmt_us(percentile(&routed, 0.99)),
                    fmt_us(percentile(&routed, 1.0)),
                    fmt_us(percentile(&rtt, 0.5)),
                    fmt_us(percentile(&rtt, 0.99)),
                )?;
            }
            Err(e) => writeln!(extras, "- etcd put → first routed call: failed: {e:#}")?,
        }
        println!("e2e: 10,000 concurrent open streams");
        let rss0 = status_kib(sy.pid, "VmRSS:");
        let meter = Meter::start(vec![sy.pid], tck);
        match open_streams(extra_addr, 10_000, 500).await {
            Ok(streams) => {
                let at_once = status_kib(sy.pid, "VmRSS:");
                // What the allocator freed after the burst of opening goes back to the
                // system after a delay (mimalloc: 1 s): the RSS that stays while the
                // streams are held is read after it.
                tokio::time::sleep(Duration::from_secs(3)).await;
                let rss = status_kib(sy.pid, "VmRSS:");
                let usage = meter.finish();
                writeln!(
                    extras,
                    "- 10,000 concurrent open streams (20 client connections, 3 backend \
                     connections): RSS {:.1} MiB while they are held ({:.1} MiB when the last \
                     opened, peak {:.1} MiB; {:.1} MiB before), {:.2} KiB per stream",
                    rss as f64 / 1024.0,
                    at_once as f64 / 1024.0,
                    usage.peak_rss_kib as f64 / 1024.0,
                    rss0 as f64 / 1024.0,
                    (rss.saturating_sub(rss0)) as f64 / 10_000.0,
                )?;
                drop(streams);
            }
            Err(e) => writeln!(extras, "- 10,000 open streams: failed: {e:#}")?,
        }
        sy.stop().await;
    }

    // The peers are stopped before the start-up measurement, which runs its own proxy.
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

    if opts.extras {
        println!("e2e: start-up with 1,000 services x 10 endpoints");
        match startup_many(etcd_proc.endpoint(), &mut etcd, 1000, 10, tck).await {
            Ok(s) => writeln!(
                extras,
                "- start-up with 1,000 services × 10 endpoints in etcd: listening after {:.0} ms, \
                 every service answered (1,000 calls, 10,000 backend connections) after {:.2} s; \
                 RSS then {:.1} MiB, CPU {:.2} s",
                s.listening.as_secs_f64() * 1000.0,
                s.ready.as_secs_f64(),
                s.rss_kib as f64 / 1024.0,
                s.cpu_secs,
            )?,
            Err(e) => writeln!(extras, "- start-up with 1,000 × 10: failed: {e:#}")?,
        }
    }
    drop(etcd_proc);
    let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let steal = stolen_share(cpu_before, cpu_times());

    let report = render(
        &opts,
        &rows,
        &shapes,
        &extras,
        &notes,
        &Conditions {
            load_before: load_before.trim(),
            load_after: load_after.trim(),
            steal,
        },
    );
    println!("\n{report}");
    if let Some(out) = &opts.out {
        write_results(out, &report)?;
        println!("e2e: written to {}", out.display());
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------
// Report.

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = status_mem_total();
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!(
        "{cpu}, {cores} cores, {:.0} GiB RAM, Linux {}",
        mem as f64 / 1024.0 / 1024.0,
        kernel.trim()
    )
}

/// What else the machine was doing around the run.
struct Conditions<'a> {
    load_before: &'a str,
    load_after: &'a str,
    /// The share of CPU time the hypervisor took during the run.
    steal: Option<f64>,
}

/// The machine's CPU time so far from /proc/stat: (steal, all), in ticks.
fn cpu_times() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest times are inside user).
    Some((*v.get(7)?, v.iter().take(8).sum()))
}

/// The share of the machine's CPU time the hypervisor took between two readings.
fn stolen_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| s1.saturating_sub(s0) as f64 / (t1 - t0) as f64)
}

fn status_mem_total() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn versions() -> String {
    let git = tool_version(
        "git",
        &[
            "-C",
            env!("CARGO_MANIFEST_DIR"),
            "describe",
            "--always",
            "--dirty",
        ],
    )
    .unwrap_or_else(|| "?".into());
    let list = [
        (
            "switchyard",
            Some(format!("{} (git {git})", env!("CARGO_PKG_VERSION"))),
        ),
        ("rustc", tool_version("rustc", &["--version"])),
        ("h2load", tool_version("h2load", &["--version"])),
        ("etcd", tool_version("etcd", &["--version"])),
        (
            "nginx",
            tool_version(
                &which("nginx")
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                &["-v"],
            ),
        ),
        (
            "haproxy",
            tool_version(
                &which("haproxy")
                    .map(|p| p.display().to_string())
                    .unwrap_or_default(),
                &["-v"],
            ),
        ),
    ];
    list.iter()
        .map(|(k, v)| format!("{k}: {}", v.as_deref().unwrap_or("not installed")))
        .collect::<Vec<_>>()
        .join("; ")
}

fn render(
    opts: &Options,
    rows: &[Row],
    shapes: &[Shape],
    extras: &str,
    notes: &[String],
    conditions: &Conditions<'_>,
) -> String {
    let Conditions {
        load_before,
        load_after,
        steal,
    } = *conditions;
    let mut s = String::new();
    let _ = writeln!(s, "Machine: {}  ", machine());
    let _ = writeln!(s, "Versions: {}  ", versions());
    let _ = writeln!(s, "Command: `{}`  ", opts.command);
    let _ = writeln!(
        s,
        "Load average (1/5/15 min, running/total, last pid) before: `{load_before}`, after: `{load_after}`  "
    );
    if let Some(st) = steal {
        let _ = writeln!(
            s,
            "CPU time taken by the hypervisor from this VM during the run (steal, /proc/stat): {:.1} %  ",
            st * 100.0
        );
    }
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "Setup: 3 tonic Echo backends (1 worker thread each, TCP_NODELAY) registered in etcd; \
         direct = h2load to one of them. switchyard: default flags (1 worker thread), \
         switchyard-2w: the same with `--worker-threads 2`; nginx: 2 workers, `grpc_pass` with \
         upstream keepalive; HAProxy: `nbthread 2`, `proto h2`, roundrobin. Unary load by h2load \
         (`-t 1`), {} calls per throughput run (a tenth at 1 stream), request 13 bytes; the fixed \
         offered load is {} calls/s in all (`--rps`); streaming by a tonic client checking every \
         grpc-status (4 streams at once). CPU = utime+stime of the proxy's processes; RSS = peak \
         (VmHWM, reset before each run). Latency percentiles are per call (per message for \
         streaming), measured by the load generator. Unary scenarios run {} round(s), each \
         driving every target once in turn (each round starting one target later); a row shows \
         the target's median round (by calls/s; at the fixed load, by CPU per call), and the \
         ratios below are taken round by round.\n",
        opts.calls, opts.rate, opts.rounds
    );
    for n in notes {
        let _ = writeln!(s, "Note: {n}  ");
    }
    if !rows.is_empty() {
        let _ = writeln!(
            s,
            "| scenario | target | calls/s | × direct | p50 | p99 | p99.9 | failed | proxy CPU s / 100k calls | µs CPU / call | peak RSS |"
        );
        let _ = writeln!(s, "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        // Each scenario's rows by target.
        let mut by_scenario: BTreeMap<&str, BTreeMap<&str, &Row>> = BTreeMap::new();
        for r in rows {
            by_scenario
                .entry(r.scenario)
                .or_default()
                .insert(r.target, r);
        }
        let empty = BTreeMap::new();
        let rows_of = |label: &str| by_scenario.get(label).unwrap_or(&empty);
        for r in rows {
            let direct = rows_of(r.scenario)
                .get("direct")
                .and_then(|d| d.run.as_ref().ok())
                .map(|d| d.calls_per_sec);
            match &r.run {
                Err(e) => {
                    let _ = writeln!(
                        s,
                        "| {} | {} | failed: {} |||||||||",
                        r.scenario,
                        r.target,
                        e.replace('\n', " ")
                    );
                }
                Ok(run) => {
                    let rate = match run.mb_per_sec {
                        Some(mb) => format!("{:.0} msg/s = {mb:.0} MB/s", run.calls_per_sec),
                        None => format!("{:.0}", run.calls_per_sec),
                    };
                    let ratio = direct
                        .filter(|_| r.target != "direct")
                        .map_or("".into(), |d| format!("{:.2}", run.calls_per_sec / d));
                    // Streaming (MiB messages) gets CPU per GiB instead of per call.
                    let (cpu100k, per_call, rss) = match (run.usage, run.cpu_us_per_call()) {
                        (Some(u), Some(us)) => (
                            format!("{:.2}", us / 10.0),
                            format!("{us:.1}"),
                            format!("{:.1} MiB", u.peak_rss_kib as f64 / 1024.0),
                        ),
                        (Some(u), None) if run.mb_per_sec.is_some() => (
                            format!("{:.2} s/GiB", u.cpu_secs / (run.bytes as f64 / GIB as f64)),
                            "".into(),
                            format!("{:.1} MiB", u.peak_rss_kib as f64 / 1024.0),
                        ),
                        _ => ("".into(), "".into(), "".into()),
                    };
                    let failed = match &run.note {
                        Some(n) => format!("{} ({n})", run.failed),
                        None => run.failed.to_string(),
                    };
                    let _ = writeln!(
                        s,
                        "| {} | {} | {rate} | {ratio} | {} | {} | {} | {failed} | {cpu100k} | {per_call} | {rss} |",
                        r.scenario,
                        r.target,
                        fmt_us(run.p50_us),
                        fmt_us(run.p99_us),
                        fmt_us(run.p999_us),
                    );
                }
            }
        }
        let _ = writeln!(s);
        // Ratios that the targets are stated in, round by round (a round drives every
        // target once, close together in time).
        let list = |v: &[f64], f: &dyn Fn(f64) -> String| {
            v.iter().map(|x| f(*x)).collect::<Vec<_>>().join(" / ")
        };
        let per_round = |a: &Row, b: &Row, f: &dyn Fn(&Run, &Run) -> f64| -> Vec<f64> {
            a.rounds
                .iter()
                .zip(&b.rounds)
                .map(|(x, y)| match (x, y) {
                    (Some(x), Some(y)) => f(x, y),
                    _ => f64::NAN,
                })
                .collect()
        };
        let p99 = |r: &Row| median(r.rounds.iter().flatten().map(|x| x.p99_us).collect());
        for shape in shapes.iter().filter(|sh| sh.rate.is_none()) {
            let m = rows_of(shape.label);
            let spread: Vec<String> = m
                .iter()
                .map(|(t, r)| {
                    let v: Vec<f64> = r
                        .rounds
                        .iter()
                        .map(|x| x.as_ref().map_or(f64::NAN, |x| x.calls_per_sec))
                        .collect();
                    format!("{t} {}", list(&v, &|x| format!("{x:.0}")))
                })
                .collect();
            if opts.rounds > 1 && !spread.is_empty() {
                let _ = writeln!(
                    s,
                    "- {}: calls/s round by round: {}.",
                    shape.label,
                    spread.join("; ")
                );
            }
            if shape.clients == 1 {
                continue;
            }
            for name in ["switchyard", "switchyard-2w"] {
                let Some(sy) = m.get(name) else {
                    continue;
                };
                let mut parts = Vec::new();
                for peer in ["haproxy", "nginx"] {
                    let Some(p) = m.get(peer) else {
                        continue;
                    };
                    let ratios = per_round(sy, p, &|x, y| x.calls_per_sec / y.calls_per_sec);
                    let both = sy
                        .rounds
                        .iter()
                        .zip(&p.rounds)
                        .filter_map(|(x, y)| x.as_ref().zip(y.as_ref()));
                    let below = both.clone().filter(|(x, y)| x.p99_us < y.p99_us).count();
                    parts.push(format!(
                        "{:.2}× {peer}'s calls/s (rounds {}), p99 {} vs {} (medians; below in {} of {} rounds)",
                        median(ratios.clone()),
                        list(&ratios, &|x| format!("{x:.2}")),
                        fmt_us(p99(sy)),
                        fmt_us(p99(p)),
                        below,
                        both.count(),
                    ));
                }
                if !parts.is_empty() {
                    let _ = writeln!(s, "- {}: {name} at {}.", shape.label, parts.join("; "));
                }
            }
        }
        if let Some(shape) = shapes.iter().find(|sh| sh.rate.is_some()) {
            let m = rows_of(shape.label);
            let mut parts = Vec::new();
            for t in ["switchyard", "switchyard-2w", "haproxy", "nginx"] {
                let Some(r) = m.get(t) else {
                    continue;
                };
                let v: Vec<f64> = r
                    .rounds
                    .iter()
                    .map(|x| {
                        x.as_ref()
                            .and_then(Run::cpu_us_per_call)
                            .unwrap_or(f64::NAN)
                    })
                    .collect();
                parts.push(format!(
                    "{t} {:.1} µs (rounds {})",
                    median(v.clone()),
                    list(&v, &|x| format!("{x:.1}"))
                ));
            }
            let _ = writeln!(
                s,
                "- CPU per call at a fixed {} calls/s, median of rounds: {}.",
                opts.rate,
                parts.join(", ")
            );
            if let (Some(sy), Some(h)) = (m.get("switchyard"), m.get("haproxy")) {
                let ratios = per_round(sy, h, &|x, y| {
                    x.cpu_us_per_call().unwrap_or(f64::NAN)
                        / y.cpu_us_per_call().unwrap_or(f64::NAN)
                });
                let _ = writeln!(
                    s,
                    "- switchyard's CPU per call against haproxy's at that load: {:.2}× (rounds {}).",
                    median(ratios.clone()),
                    list(&ratios, &|x| format!("{x:.2}"))
                );
            }
        }
    }
    if !extras.is_empty() {
        let _ = writeln!(
            s,
            "\nswitchyard only (a fresh proxy process, default flags):\n\n{extras}"
        );
    }
    s
}

fn write_results(path: &Path, report: &str) -> Result<()> {
    let block = format!("{RESULTS_BEGIN}\n{report}\n{RESULTS_END}");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(RESULTS_BEGIN), old.find(RESULTS_END)) {
            (Some(b), Some(e)) if e > b => {
                format!("{}{block}{}", &old[..b], &old[e + RESULTS_END.len()..])
            }
            _ => format!("{old}\n{block}\n"),
        },
        Err(_) => format!("# Benchmark results\n\n{block}\n"),
    };
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
