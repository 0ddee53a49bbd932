//! The report: rows of results, the machine and its conditions, the Markdown text, and
//! where it is written.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use anyhow::{Context as _, Result};

use crate::load::{Run, Shape};
use crate::procs::{tool_version, which};
use crate::{Options, GIB};

/// Where the main run's report goes in RESULTS.md (the text around the markers is kept).
pub const MAIN_MARKERS: (&str, &str) = (
    "<!-- e2e results: begin (written by `cargo bench --bench e2e -- run`) -->",
    "<!-- e2e results: end -->",
);

/// One row of the results.
pub struct Row {
    pub scenario: &'static str,
    pub target: &'static str,
    /// The run shown: the median round (or the error, if every round failed).
    pub run: Result<Run, String>,
    /// Every round in order (`None` for a round that failed).
    pub rounds: Vec<Option<Run>>,
}

impl Row {
    /// The row of one target's rounds of a scenario: the median round by calls/s, or by
    /// CPU per call at a fixed offered load (where every target gets the same calls/s).
    pub fn from_rounds(
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
    pub fn cpu_us_per_call(&self) -> Option<f64> {
        let n = (self.ok + self.failed) as f64;
        self.usage
            .filter(|_| n > 0.0 && self.mb_per_sec.is_none())
            .map(|u| u.cpu_secs / n * 1e6)
    }
}

/// The median of some values (the upper one of the middle two), NaN if there are none.
pub fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

pub fn fmt_us(v: f64) -> String {
    if v.is_nan() {
        "–".into()
    } else if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else {
        format!("{v:.0} µs")
    }
}

pub fn machine() -> String {
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
pub struct Conditions<'a> {
    pub load_before: &'a str,
    pub load_after: &'a str,
    /// The share of CPU time the hypervisor took during the run.
    pub steal: Option<f64>,
}

/// The machine's CPU time so far from /proc/stat: (steal, all), in ticks.
pub fn cpu_times() -> Option<(u64, u64)> {
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
pub fn stolen_share(before: Option<(u64, u64)>, after: Option<(u64, u64)>) -> Option<f64> {
    let ((s0, t0), (s1, t1)) = (before?, after?);
    (t1 > t0).then(|| s1.saturating_sub(s0) as f64 / (t1 - t0) as f64)
}

pub fn status_mem_total() -> u64 {
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

pub fn versions() -> String {
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

pub fn render(
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

pub fn write_results(path: &Path, report: &str, (begin, end): (&str, &str)) -> Result<()> {
    let block = format!("{begin}\n{report}\n{end}");
    let text = match std::fs::read_to_string(path) {
        Ok(old) => match (old.find(begin), old.find(end)) {
            (Some(b), Some(e)) if e > b => {
                format!("{}{block}{}", &old[..b], &old[e + end.len()..])
            }
            _ => format!("{old}\n{block}\n"),
        },
        Err(_) => format!("# Benchmark results\n\n{block}\n"),
    };
    std::fs::write(path, text).with_context(|| format!("write {}", path.display()))
}
