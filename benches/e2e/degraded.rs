//! The degraded-backend scenario (`--degraded`): one of the three backends answers every
//! call 10 ms late, and each balancing policy (switchyard's three, HAProxy's `roundrobin`
//! and `leastconn`, nginx's `least_conn`) is driven closed loop at 4 connections × 64
//! streams, round by round as the main table's scenarios are.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::Result;
use switchyard::testkit::free_addr;

use crate::load::Shape;
use crate::procs::{wait_listening, which, Proc};
use crate::report::{fmt_us, Row};
use crate::scenarios::unary_rounds;
use crate::targets::{spawn_haproxy_balancing, spawn_nginx_balancing, spawn_switchyard, Target};
use crate::Options;

/// The slow backend's added delay per call, in ms.
pub const SLOW_MS: u32 = 10;

/// The slow backend's delay in the hedging variant, in ms.
pub const HEDGED_SLOW_MS: u32 = 200;

/// Each backend's added delay: the third is the slow one.
pub const DELAYS: [u32; 3] = [0, 0, SLOW_MS];

/// The backends' delays of the scenario (`hedged`: its hedging variant).
pub fn delays(hedged: bool) -> [u32; 3] {
    if hedged {
        [0, 0, HEDGED_SLOW_MS]
    } else {
        DELAYS
    }
}

/// The fixed offered load, in calls/s: under the slowest peer's closed-loop rate (nginx
/// `least_conn`, about 25k here), so every target is measured at the same load; the
/// service-config issue's figure.
pub const RATE: u64 = 8_000;

/// The hedging variant's offered load, in calls/s.
pub const HEDGED_RATE: u64 = 2_000;

/// The hedging variant's target with a service config.
pub const HEDGING: &str = "switchyard round-robin + hedging 20 ms";

/// Where the hedging variant's report goes in RESULTS.md.
pub const HEDGED_MARKERS: (&str, &str) = (
    "<!-- e2e hedged: begin (written by `cargo bench --bench e2e -- run --hedged`) -->",
    "<!-- e2e hedged: end -->",
);

/// The report's place in RESULTS.md.
pub fn markers(hedged: bool) -> (&'static str, &'static str) {
    if hedged {
        HEDGED_MARKERS
    } else {
        MARKERS
    }
}

/// The reference row: HAProxy `leastconn` over the two fast backends only (not a peer:
/// the slow node is not in its pool).
pub const REFERENCE: &str = "reference: haproxy leastconn, fast backends only";

/// Where the scenario's report goes in RESULTS.md.
pub const MARKERS: (&str, &str) = (
    "<!-- e2e degraded: begin (written by `cargo bench --bench e2e -- run --degraded`) -->",
    "<!-- e2e degraded: end -->",
);

/// The scenario's loads: closed loop at 4 connections × 64 streams, then the fixed rate
/// over 4 connections × 64 streams (fewer calls: a run lasts `calls / RATE` seconds).
pub fn shapes(opts: &Options) -> Vec<Shape> {
    if opts.hedged {
        return vec![Shape {
            label: "one backend 200 ms late, 2,000 calls/s offered, 4 conns",
            clients: 4,
            streams_per_client: 64,
            calls: (opts.calls / 10).max(HEDGED_RATE * 5),
            rate: Some(HEDGED_RATE),
        }];
    }
    vec![
        Shape {
            label: "degraded backend, closed loop, 256 streams / 4 conns",
            clients: 4,
            streams_per_client: 64,
            calls: opts.calls,
            rate: None,
        },
        Shape {
            label: "degraded backend, 8,000 calls/s offered, 4 conns",
            clients: 4,
            streams_per_client: 64,
            calls: (opts.calls / 2).max(RATE),
            rate: Some(RATE),
        },
    ]
}

/// Starts one target per policy in front of `backends` (the hedging variant: switchyard
/// with and without hedging, HAProxy `leastconn`); notes say which were skipped.
pub async fn start(
    dir: &Path,
    etcd: &str,
    backends: &[SocketAddr],
    hedged: bool,
) -> Result<(Vec<Target>, Vec<String>)> {
    if hedged {
        return start_hedged(dir, etcd, backends).await;
    }
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    for (name, policy) in [
        ("switchyard round-robin", "round-robin"),
        ("switchyard least-request", "least-request"),
        ("switchyard peak-ewma", "peak-ewma"),
        ("switchyard latency", "latency"),
    ] {
        let addr = free_addr()?;
        let p = spawn_switchyard(&[addr.to_string()], etcd, &["--balance", policy], None)?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name,
            addr,
            proc: Some(p),
        });
    }
    type Spawn = fn(&Path, SocketAddr, &[SocketAddr], &str) -> Result<Proc>;
    let peers: [(&'static str, &str, &str, Spawn); 3] = [
        (
            "haproxy roundrobin",
            "haproxy",
            "roundrobin",
            spawn_haproxy_balancing,
        ),
        (
            "haproxy leastconn",
            "haproxy",
            "leastconn",
            spawn_haproxy_balancing,
        ),
        (
            "nginx least_conn",
            "nginx",
            "least_conn;",
            spawn_nginx_balancing,
        ),
    ];
    for (name, program, balance, spawn) in peers {
        if which(program).is_none() {
            notes.push(format!("{name}: {program} not installed, skipped"));
            continue;
        }
        let d = dir.join(name.replace(' ', "-"));
        std::fs::create_dir_all(&d)?;
        let addr = free_addr()?;
        let p = spawn(&d, addr, backends, balance)?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name,
            addr,
            proc: Some(p),
        });
    }
    // The floor on this machine: what a policy that never sent the slow node a call
    // could reach, with the same processes sharing the same cores.
    if which("haproxy").is_some() {
        let fast: Vec<SocketAddr> = backends
            .iter()
            .zip(DELAYS)
            .filter(|(_, d)| *d == 0)
            .map(|(b, _)| *b)
            .collect();
        let d = dir.join("reference");
        std::fs::create_dir_all(&d)?;
        let addr = free_addr()?;
        let p = spawn_haproxy_balancing(&d, addr, &fast, "leastconn")?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name: REFERENCE,
            addr,
            proc: Some(p),
        });
    }
    Ok((targets, notes))
}

/// The hedging variant's targets.
async fn start_hedged(
    dir: &Path,
    etcd: &str,
    backends: &[SocketAddr],
) -> Result<(Vec<Target>, Vec<String>)> {
    let config = dir.join("hedging.json");
    std::fs::write(
        &config,
        r#"{"methodConfig": [{"name": [{"service": "switchyard.echo.v1.Echo"}],
            "hedgingPolicy": {"maxAttempts": 3, "hedgingDelay": "0.02s"}}]}"#,
    )?;
    let config = config.to_string_lossy().into_owned();
    let mut targets = Vec::new();
    let mut notes = Vec::new();
    let plain: &[&str] = &[];
    let with: &[&str] = &["--service-config", &config];
    for (name, extra) in [("switchyard round-robin", plain), (HEDGING, with)] {
        let addr = free_addr()?;
        let p = spawn_switchyard(&[addr.to_string()], etcd, extra, None)?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name,
            addr,
            proc: Some(p),
        });
    }
    if which("haproxy").is_some() {
        let d = dir.join("haproxy-leastconn");
        std::fs::create_dir_all(&d)?;
        let addr = free_addr()?;
        let p = spawn_haproxy_balancing(&d, addr, backends, "leastconn")?;
        wait_listening(addr, Duration::from_secs(10)).await?;
        targets.push(Target {
            name: "haproxy leastconn",
            addr,
            proc: Some(p),
        });
    } else {
        notes.push("haproxy leastconn: haproxy not installed, skipped".to_owned());
    }
    Ok((targets, notes))
}

/// Runs the scenario's rounds at every target; one row per target.
pub async fn run(
    opts: &Options,
    targets: &[Target],
    body: &Path,
    dir: &Path,
    tck: f64,
) -> Vec<Row> {
    let mut rows = Vec::new();
    for shape in shapes(opts) {
        unary_rounds(opts, targets, &shape, body, dir, tck, &mut rows).await;
    }
    rows
}

/// The scenario's Markdown: setup, command, conditions and a table per load of the
/// median rounds.
pub fn render(opts: &Options, rows: &[Row], notes: &[String], load: (&str, &str)) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Setup: 3 Echo backends (1 worker thread each), the third answering every call {} ms \
         late; h2load, {} calls per closed-loop run, {} round(s), each target once per round in \
         turn (a row is the target's median round: by calls/s closed loop, by CPU per call at \
         the fixed rate).  \n\
         Command: `{}`  \nLoad average (1/5/15 min, running/total, last pid) before: `{}`, \
         after: `{}` (a 2-core VM shared with other work)\n",
        delays(opts.hedged)[2],
        opts.calls,
        opts.rounds,
        opts.command,
        load.0,
        load.1
    );
    for shape in shapes(opts) {
        let _ = writeln!(
            out,
            "\n**{}** ({} calls per run)\n\n\
             | target | calls/s | p50 | p99 | p99.9 | failed | proxy µs CPU / call |\n\
             |---|---:|---:|---:|---:|---:|---:|",
            shape.label, shape.calls
        );
        for r in rows.iter().filter(|r| r.scenario == shape.label) {
            match &r.run {
                Ok(run) => {
                    let cpu = run
                        .cpu_us_per_call()
                        .map_or_else(String::new, |c| format!("{c:.1}"));
                    let _ = writeln!(
                        out,
                        "| {} | {:.0} | {} | {} | {} | {} | {cpu} |",
                        r.target,
                        run.calls_per_sec,
                        fmt_us(run.p50_us),
                        fmt_us(run.p99_us),
                        fmt_us(run.p999_us),
                        run.failed,
                    );
                }
                Err(e) => {
                    let _ = writeln!(out, "| {} | failed: {e} | | | | | |", r.target);
                }
            }
        }
    }
    if opts.hedged {
        if let Some(text) = hedging_met(rows, shapes(opts)[0].label) {
            let _ = writeln!(out, "\n{text}");
        }
    } else {
        let all = shapes(opts);
        if let Some(text) = targets_met(rows, all[0].label) {
            let _ = writeln!(out, "\n{text}");
        }
        if let Some(text) = latency_first_met(rows, all[0].label, all[1].label) {
            let _ = writeln!(out, "\n{text}");
        }
    }
    for n in notes {
        let _ = writeln!(out, "\n- {n}");
    }
    out
}

/// Issue 12's targets, read off the closed-loop rows: peak-ewma against the best peer
/// (by calls/s), least-request against HAProxy `leastconn`; and the reference's p99, the
/// floor any policy meets on this machine.
fn targets_met(rows: &[Row], scenario: &str) -> Option<String> {
    let run = |target: &str| {
        rows.iter()
            .find(|r| r.scenario == scenario && r.target == target)
            .and_then(|r| r.run.as_ref().ok())
    };
    let (best, best_run) = rows
        .iter()
        .filter(|r| r.scenario == scenario && !r.target.starts_with("switchyard"))
        .filter(|r| r.target != REFERENCE)
        .filter_map(|r| r.run.as_ref().ok().map(|run| (r.target, run)))
        .max_by(|a, b| a.1.calls_per_sec.total_cmp(&b.1.calls_per_sec))?;
    let ewma = run("switchyard peak-ewma")?;
    let mut text = format!(
        "Closed loop, against the best peer ({best}): peak-ewma {:.2}× its calls/s (target \
         ≥ 1.1×) with {:.2}× its p99 (target ≤ 0.5×)",
        ewma.calls_per_sec / best_run.calls_per_sec,
        ewma.p99_us / best_run.p99_us,
    );
    if let (Some(lr), Some(lc)) = (run("switchyard least-request"), run("haproxy leastconn")) {
        let _ = write!(
            text,
            "; least-request {:.2}× HAProxy `leastconn`'s calls/s (target ≥ 1×)",
            lr.calls_per_sec / lc.calls_per_sec
        );
    }
    if let Some(reference) = run(REFERENCE) {
        let _ = write!(
            text,
            ". The reference (no call to the slow node) has {:.2}× the best peer's calls/s \
             and {:.2}× its p99",
            reference.calls_per_sec / best_run.calls_per_sec,
            reference.p99_us / best_run.p99_us
        );
    }
    text.push('.');
    Some(text)
}

/// The best peer (by calls/s closed loop, lowest p99 at a fixed rate) of `scenario`.
fn best_peer<'a>(
    rows: &'a [Row],
    scenario: &str,
    by_p99: bool,
) -> Option<(&'a str, &'a crate::load::Run)> {
    let peers = rows
        .iter()
        .filter(|r| r.scenario == scenario && !r.target.starts_with("switchyard"))
        .filter(|r| r.target != REFERENCE)
        .filter_map(|r| r.run.as_ref().ok().map(|run| (r.target, run)));
    if by_p99 {
        peers.min_by(|a, b| a.1.p99_us.total_cmp(&b.1.p99_us))
    } else {
        peers.max_by(|a, b| a.1.calls_per_sec.total_cmp(&b.1.calls_per_sec))
    }
}

fn row_run<'a>(rows: &'a [Row], scenario: &str, target: &str) -> Option<&'a crate::load::Run> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.target == target)
        .and_then(|r| r.run.as_ref().ok())
}

/// The service-config issue's targets for latency-first: at the fixed rate, p99 ≤ 0.5×
/// the best peer's and ≤ 1.5× the reference's; closed loop ≥ 1.1× the best peer's calls/s.
fn latency_first_met(rows: &[Row], closed: &str, fixed: &str) -> Option<String> {
    let lat_fixed = row_run(rows, fixed, "switchyard latency")?;
    let (peer, peer_run) = best_peer(rows, fixed, true)?;
    let mut text = format!(
        "Latency-first at the fixed rate: p99 {:.2}× the best peer's ({peer}; target ≤ 0.5×)",
        lat_fixed.p99_us / peer_run.p99_us
    );
    if let Some(reference) = row_run(rows, fixed, REFERENCE) {
        let _ = write!(
            text,
            ", {:.2}× the reference's (target ≤ 1.5×)",
            lat_fixed.p99_us / reference.p99_us
        );
    }
    if let (Some(lat), Some((peer, peer_run))) = (
        row_run(rows, closed, "switchyard latency"),
        best_peer(rows, closed, false),
    ) {
        let _ = write!(
            text,
            "; closed loop {:.2}× the best peer's calls/s ({peer}; target ≥ 1.1×)",
            lat.calls_per_sec / peer_run.calls_per_sec
        );
    }
    text.push('.');
    Some(text)
}

/// The hedging target: p99 with hedging ≤ 80 ms (one node of three 200 ms late).
fn hedging_met(rows: &[Row], scenario: &str) -> Option<String> {
    let hedged = row_run(rows, scenario, HEDGING)?;
    let mut text = format!(
        "With hedging (20 ms): p99 {:.1} ms (target ≤ 80 ms)",
        hedged.p99_us / 1000.0
    );
    if let Some(plain) = row_run(rows, scenario, "switchyard round-robin") {
        let _ = write!(
            text,
            ", {:.2}× round-robin's without it ({:.1} ms)",
            hedged.p99_us / plain.p99_us,
            plain.p99_us / 1000.0
        );
    }
    text.push('.');
    Some(text)
}
