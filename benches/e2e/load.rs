//! The load: gRPC clients, h2load runs of unary calls and server-streaming runs, and
//! what one run gave.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use prost::Message as _;
use tokio::process::Command;
use tonic::transport::{Channel, Endpoint};

use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::{EchoReply, EchoRequest};

use crate::procs::Usage;
use crate::{BACKEND_NAMES, MESSAGE, MIB, UNARY_PATH};

pub async fn channel(addr: SocketAddr) -> Result<Channel> {
    Ok(Endpoint::from_shared(format!("http://{addr}"))?
        .tcp_nodelay(true)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await?)
}

pub fn echo_client(ch: Channel) -> EchoClient<Channel> {
    EchoClient::new(ch)
        .max_decoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
        .max_encoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
}

pub fn unary_request() -> EchoRequest {
    EchoRequest {
        message: MESSAGE.into(),
        ..Default::default()
    }
}

/// Bytes of DATA a backend sends for one successful unary call (frame header + reply).
pub fn unary_reply_len() -> u64 {
    let reply = EchoReply {
        message: MESSAGE.into(),
        server: BACKEND_NAMES[0].into(),
        ..Default::default()
    };
    5 + reply.encoded_len() as u64
}

/// Makes one unary call through `addr`, checking that a backend answered it.
pub async fn check_unary(addr: SocketAddr) -> Result<()> {
    let mut c = echo_client(channel(addr).await?);
    let mut req = tonic::Request::new(unary_request());
    req.set_timeout(Duration::from_secs(2));
    let reply = c.unary(req).await?.into_inner();
    if !BACKEND_NAMES.contains(&reply.server.as_str()) {
        bail!("unexpected reply {reply:?}");
    }
    Ok(())
}

/// Writes the unary request h2load sends (a gRPC frame) to `dir`; returns its path.
pub fn write_unary_body(dir: &Path) -> Result<PathBuf> {
    let body = dir.join("unary.bin");
    let msg = unary_request().encode_to_vec();
    let mut frame = vec![0u8];
    frame.extend_from_slice(&(msg.len() as u32).to_be_bytes());
    frame.extend_from_slice(&msg);
    std::fs::write(&body, &frame)?;
    Ok(body)
}

/// What one load run gave.
#[derive(Debug, Clone, Default)]
pub struct Run {
    pub calls_per_sec: f64,
    /// Calls that completed with grpc-status 0 / were sent.
    pub ok: u64,
    pub failed: u64,
    /// Latencies in microseconds (per call; per message for streaming).
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    /// MB/s for streaming runs.
    pub mb_per_sec: Option<f64>,
    /// Bytes received by streaming runs.
    pub bytes: u64,
    pub usage: Option<Usage>,
    pub note: Option<String>,
}

pub fn percentile(sorted: &[u64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[idx] as f64
}

pub fn with_percentiles(mut run: Run, mut lat: Vec<u64>) -> Run {
    lat.sort_unstable();
    run.p50_us = percentile(&lat, 0.50);
    run.p99_us = percentile(&lat, 0.99);
    run.p999_us = percentile(&lat, 0.999);
    run
}

/// One unary load shape.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    pub label: &'static str,
    pub clients: u32,
    pub streams_per_client: u32,
    pub calls: u64,
    /// Offered load in calls/s in all, if fixed.
    pub rate: Option<u64>,
}

/// Runs h2load against `addr` and parses its summary and per-request log.
pub async fn h2load(addr: SocketAddr, shape: Shape, body: &Path, dir: &Path) -> Result<Run> {
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

pub fn parse_h2load(text: &str, log: &Path) -> Result<Run> {
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
pub async fn stream_load(addr: SocketAddr, streams: u32, per_stream: u32) -> Result<Run> {
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
