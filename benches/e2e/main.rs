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
//!
//! `--degraded` runs, alone, the degraded-backend scenario ([`degraded`]: one backend of
//! three 10 ms late, each balancing policy closed loop) and prints its table.
//!
//! Here: the options and the run's order; [`backend`] (the Echo backends), [`targets`]
//! (what the load is driven at), [`load`] (clients, h2load and streaming runs),
//! [`scenarios`] (the main table's rounds), [`extras`] (switchyard-only measurements),
//! [`report`] (rows, conditions, the Markdown written) and [`procs`] (child processes and
//! their CPU and memory).

mod backend;
mod degraded;
mod extras;
mod load;
mod procs;
mod report;
mod scenarios;
mod targets;
mod upstream;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use switchyard::testkit::EtcdProcess;

use crate::backend::backend_main;
use crate::procs::{clk_tck, which};
use crate::report::{cpu_times, render, stolen_share, write_results, Conditions, MAIN_MARKERS};
use crate::targets::switchyard_binary;

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
  --degraded         only the degraded-backend scenario: one backend of three 10 ms late,
                     switchyard --balance round-robin|least-request|peak-ewma, HAProxy
                     roundrobin/leastconn, nginx least_conn; 4 conns x 64 streams closed loop
                     and 8,000 calls/s offered; written to its own part of RESULTS.md
  --hedged           with --degraded: the third backend 200 ms late instead, switchyard
                     round-robin without and with a hedging service config (20 ms), HAProxy
                     leastconn; 2,000 calls/s offered
  --upstream         only the upstream scenarios: start-up RSS and backend connections with
                     no service, 1,000 services x 1 endpoint, 1,000 x 10 on 10 shared and on
                     10,000 distinct addresses; what a connection keeps after a 256 KiB
                     reply; 2 backends limiting streams to 4 under 32
                     callers; written to its own part of RESULTS.md
  --cases LIST       with --upstream: a subset of idle,one,shared,distinct,burst,limited
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
    /// Only the degraded-backend scenario.
    degraded: bool,
    /// The degraded scenario's hedging variant.
    hedged: bool,
    /// Only the upstream scenarios.
    upstream: bool,
    /// Which of them (`--cases`).
    cases: Vec<String>,
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
            degraded: false,
            hedged: false,
            upstream: false,
            cases: upstream::CASES.map(String::from).to_vec(),
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
                "--degraded" => o.degraded = true,
                "--hedged" => {
                    o.degraded = true;
                    o.hedged = true;
                }
                "--upstream" => o.upstream = true,
                "--cases" => {
                    let list = it.next().ok_or_else(|| anyhow!("--cases needs a list"))?;
                    o.cases = list.split(',').map(|s| s.trim().to_owned()).collect();
                    for c in &o.cases {
                        if !upstream::CASES.contains(&c.as_str()) {
                            bail!("--cases: unknown case {c:?}");
                        }
                    }
                }
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
// The run.

async fn run(opts: Options) -> Result<()> {
    let tck = clk_tck();
    let load_before = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let cpu_before = cpu_times();
    if which("h2load").is_none() && !opts.upstream {
        bail!("h2load not found: install Debian's nghttp2-client (the harness installs nothing)");
    }
    if opts.build {
        targets::build_proxy().await?;
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
    let body = load::write_unary_body(dir.path())?;

    println!("e2e: starting etcd and 3 backends");
    let etcd_proc = EtcdProcess::start().await?;
    let mut etcd = etcd_proc.client().await?;
    if opts.upstream {
        let lines = upstream::run(etcd_proc.endpoint(), &mut etcd, tck, &opts.cases).await?;
        let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let text = format!(
            "Versions: {}  \nCommand: `{}`  \nLoad average before: `{}`, after: `{}`\n\n{lines}",
            report::versions(),
            opts.command,
            load_before.trim(),
            load_after.trim(),
        );
        println!("\n{text}");
        if let Some(out) = &opts.out {
            write_results(out, &text, upstream::MARKERS)?;
            println!("e2e: written to {}", out.display());
        }
        return Ok(());
    }
    let delays = if opts.degraded {
        degraded::delays(opts.hedged)
    } else {
        [0; 3]
    };
    let (backend_addrs, backends) = backend::start_registered(&mut etcd, delays).await?;

    let (targets, notes) = if opts.degraded {
        degraded::start(
            dir.path(),
            etcd_proc.endpoint(),
            &backend_addrs,
            opts.hedged,
        )
        .await?
    } else {
        targets::start(&opts, dir.path(), etcd_proc.endpoint(), &backend_addrs).await?
    };
    for n in &notes {
        println!("e2e: {n}");
    }
    // Every target answers before any load (and its connections to the backends exist).
    targets::wait_answering(&targets).await?;

    if let Some(hold) = opts.hold {
        println!("e2e: etcd {}", etcd_proc.endpoint());
        targets::hold(&targets, &body, hold).await;
        return Ok(());
    }
    if opts.degraded {
        let rows = degraded::run(&opts, &targets, &body, dir.path(), tck).await;
        targets::stop(targets, backends).await;
        let load_after = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let text = degraded::render(
            &opts,
            &rows,
            &notes,
            (load_before.trim(), load_after.trim()),
        );
        println!("\n{text}");
        if let Some(out) = &opts.out {
            write_results(out, &text, degraded::markers(opts.hedged))?;
            println!("e2e: written to {}", out.display());
        }
        return Ok(());
    }
    let shapes = scenarios::shapes(&opts);
    let rows = if opts.main_table {
        scenarios::main_table(&opts, &targets, &shapes, &body, dir.path(), tck).await
    } else {
        Vec::new()
    };

    let mut extras = String::new();
    if opts.extras {
        extras::with_a_fresh_proxy(
            &mut extras,
            &mut etcd,
            etcd_proc.endpoint(),
            &backend_addrs,
            tck,
        )
        .await?;
    }

    // The peers are stopped before the start-up measurement, which runs its own proxy.
    targets::stop(targets, backends).await;

    if opts.extras {
        extras::startup(&mut extras, etcd_proc.endpoint(), &mut etcd, tck).await?;
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
        write_results(out, &report, MAIN_MARKERS)?;
        println!("e2e: written to {}", out.display());
    }
    Ok(())
}
