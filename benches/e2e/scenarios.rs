//! The scenarios of the main table: unary load shapes driven round by round at every
//! target, and server-streaming of 1 MiB messages.

use std::path::Path;
use std::time::Duration;

use crate::load::{h2load, stream_load, Run, Shape};
use crate::procs::Meter;
use crate::report::Row;
use crate::targets::Target;
use crate::Options;

/// The unary load shapes, in the order they run.
pub fn shapes(opts: &Options) -> [Shape; 4] {
    [
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
    ]
}

/// Runs every shape at every target (after a warm-up), then server-streaming; one row per
/// scenario and target.
pub async fn main_table(
    opts: &Options,
    targets: &[Target],
    shapes: &[Shape],
    body: &Path,
    dir: &Path,
    tck: f64,
) -> Vec<Row> {
    let mut rows: Vec<Row> = Vec::new();
    // Warm-up: every target's connections and caches.
    for t in targets {
        let warm = Shape {
            label: "warm-up",
            clients: 4,
            streams_per_client: 16,
            calls: 20_000,
            rate: None,
        };
        let _ = h2load(t.addr, warm, body, dir).await;
    }
    for shape in shapes {
        unary_rounds(opts, targets, shape, body, dir, tck, &mut rows).await;
    }
    let streams = 4u32;
    let per_stream = (opts.stream_mib / u64::from(streams)).max(1) as u32;
    for t in targets {
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
    rows
}

/// One unary shape, `opts.rounds` rounds over the targets it applies to (a fixed offered
/// load only to proxies); adds a row per target.
pub async fn unary_rounds(
    opts: &Options,
    targets: &[Target],
    shape: &Shape,
    body: &Path,
    dir: &Path,
    tck: f64,
    rows: &mut Vec<Row>,
) {
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
            let run = h2load(t.addr, *shape, body, dir)
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
