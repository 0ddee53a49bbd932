//! The upstream scenarios (`--upstream`): what backend connections and watched services
//! cost, and a stream-limited backend under concurrent callers, each on a fresh proxy.
//!
//! - Start-up: N services × M endpoints in etcd, a fresh proxy, one call per service
//!   (8 client connections); then, once the allocator has returned what the burst freed,
//!   the proxy's RSS and its backend connections (`switchyard_upstream_connections`).
//!   Four layouts: no service (the idle proxy), 1,000 services × 1 endpoint on one
//!   address (the fixed cost of a watched service), 1,000 × 10 on 10 shared addresses
//!   (services that share their backends' ports, the case), and 1,000 × 10 on
//!   10,000 distinct addresses (one connection each: the cost of a connection).
//! - Stream-limited: two backends that allow 4 streams per connection, 32 callers each
//!   on its own client connection, 4 calls of 100 ms each, through the proxy: failed
//!   calls, wall time against the 0.4 s that 32 streams at once would take, connections
//!   opened and streams refused.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{anyhow, Context as _, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use switchyard::testkit::free_addr;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::backend::spawn_backend_with;
use crate::extras::first_call;
use crate::load::{channel, unary_request};
use crate::procs::{cpu_secs, status_kib, wait_listening, Proc};
use crate::targets::spawn_switchyard;
use crate::{SERVICE, UNARY_PATH};

/// Time a proxy gets to exit on SIGTERM (a heap profiler's proxy writes its profile then).
const STOP_WITHIN: Duration = Duration::from_secs(120);

/// The scenarios `--upstream` runs, by the names `--cases` takes.
pub const CASES: [&str; 6] = ["idle", "one", "shared", "distinct", "burst", "limited"];

/// Endpoints of the burst case, each on its own address, and the size of the one reply
/// each connection carries.
const BURST_ENDPOINTS: usize = 1000;
const BURST_REPLY: u32 = 256 * 1024;

/// Where the scenarios' report goes in RESULTS.md.
pub const MARKERS: (&str, &str) = (
    "<!-- e2e upstream: begin (written by `cargo bench --bench e2e -- run --upstream`) -->",
    "<!-- e2e upstream: end -->",
);

/// Listeners per backend process in the distinct-address layout (each process also holds
/// one accepted connection per listener: under a 20,000 file descriptor limit).
const LISTENERS_PER_BACKEND: usize = 2_500;

/// How backend addresses are laid out under the services.
#[derive(Debug, Clone, Copy)]
pub enum Layout {
    /// Every service lists the same `n` addresses.
    Shared(usize),
    /// Every endpoint of every service has its own address.
    Distinct,
}

/// What one start-up measurement found.
pub struct Footprint {
    /// From spawning the proxy to its listener accepting.
    pub listening: Duration,
    /// From spawning the proxy to every service having answered one call.
    pub ready: Duration,
    pub rss_kib: u64,
    pub connections: u64,
    pub cpu_secs: f64,
}

/// The admin listener's `/metrics` value of `name` (no labels), if it answers.
async fn scrape(admin: SocketAddr, name: &str) -> Result<f64> {
    let mut s = tokio::net::TcpStream::connect(admin).await?;
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
        .await?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body)).await??;
    body.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .ok_or_else(|| anyhow!("{name} not in /metrics"))
}

/// A proxy on the `bench` prefix with an admin listener of its own.
fn proxy(listen: SocketAddr, admin: SocketAddr, etcd: &str, extra: &[&str]) -> Result<Proc> {
    let admin = admin.to_string();
    let mut args = vec![
        "--prefix",
        "bench",
        "--max-services",
        "2000",
        "--admin-listen",
        &admin,
    ];
    args.extend_from_slice(extra);
    spawn_switchyard(&[listen.to_string()], etcd, &args, None)
}

/// Lists of addresses: one per backend process, or one per service.
type AddrLists = Vec<Vec<SocketAddr>>;

/// Backend addresses for `layout`: the listeners to start (grouped per process) and each
/// service's endpoints.
fn addresses(
    layout: Layout,
    services: usize,
    per_service: usize,
) -> Result<(AddrLists, AddrLists)> {
    match layout {
        Layout::Shared(n) => {
            let ports: Vec<SocketAddr> = (0..n).map(|_| free_addr()).collect::<Result<_, _>>()?;
            let per = (0..services)
                .map(|_| ports.iter().cycle().take(per_service).copied().collect())
                .collect();
            Ok((vec![ports], per))
        }
        Layout::Distinct => {
            // One port on many loopback addresses (127.1.x.y): no two draws of free ports
            // can collide, and the proxy's own ports are not used up.
            let port = free_addr()?.port();
            let all: Vec<SocketAddr> = (0..services * per_service)
                .map(|i| {
                    let ip = Ipv4Addr::new(127, 1, (i / 250) as u8, (i % 250 + 1) as u8);
                    SocketAddr::from((ip, port))
                })
                .collect();
            let per = all.chunks(per_service).map(<[_]>::to_vec).collect();
            Ok((
                all.chunks(LISTENERS_PER_BACKEND)
                    .map(<[_]>::to_vec)
                    .collect(),
                per,
            ))
        }
    }
}

/// Registers `services` × `per_service` endpoints laid out as `layout`, starts a proxy,
/// calls every service once, and reads what the proxy holds then.
pub async fn footprint(
    etcd_endpoint: &str,
    etcd: &mut etcd_client::Client,
    services: usize,
    per_service: usize,
    layout: Layout,
    tck: f64,
) -> Result<Footprint> {
    let (groups, endpoints) = addresses(layout, services, per_service)?;
    let mut backends = Vec::new();
    for (i, group) in groups.iter().enumerate().filter(|_| services > 0) {
        backends.push(spawn_backend_with(group, &format!("wide{i}"), &[])?);
    }
    for group in groups.iter().filter(|_| services > 0) {
        for a in [group[0], group[group.len() - 1]] {
            wait_listening(a, Duration::from_secs(60)).await?;
        }
    }
    let names: Vec<String> = (0..services).map(|i| format!("bench.s{i}")).collect();
    for (chunk, eps) in names.chunks(10).zip(endpoints.chunks(10)) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .zip(eps)
            .flat_map(|(s, eps)| {
                eps.iter().map(move |p| {
                    etcd_client::TxnOp::put(format!("bench/{s}/{p}"), p.to_string(), None)
                })
            })
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let (listen, admin) = (free_addr()?, free_addr()?);
    let t0 = Instant::now();
    let sy = proxy(listen, admin, etcd_endpoint, &[])?;
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
        tokio::time::timeout(Duration::from_secs(300), all)
            .await
            .map_err(|_| anyhow!("not all {services} services answered within 300 s"))??;
        let ready = t0.elapsed();
        drop(channels);
        // What the burst of start-up freed goes back to the system after a delay
        // (mimalloc): the RSS that stays is read after it.
        tokio::time::sleep(Duration::from_secs(3)).await;
        Ok::<_, anyhow::Error>(Footprint {
            listening,
            ready,
            rss_kib: status_kib(sy.pid, "VmRSS:"),
            connections: scrape(admin, "switchyard_upstream_connections").await? as u64,
            cpu_secs: cpu_secs(&[sy.pid], tck),
        })
    }
    .await;
    teardown(sy, backends, etcd).await?;
    result
}

/// Stops the proxy and the backends, and deletes what was registered.
async fn teardown(sy: Proc, backends: Vec<Proc>, etcd: &mut etcd_client::Client) -> Result<()> {
    sy.stop_within(STOP_WITHIN).await;
    for b in backends {
        b.stop().await;
    }
    etcd.delete(
        "bench/",
        Some(etcd_client::DeleteOptions::new().with_prefix()),
    )
    .await?;
    Ok(())
}

/// What a connection keeps after carrying one large reply: one service with
/// [`BURST_ENDPOINTS`] endpoints on as many addresses, unary calls until every endpoint
/// has its connection, then one server-streaming call of one [`BURST_REPLY`]-byte reply
/// per endpoint (round-robin); RSS before and after (each read 3 s after its load).
/// Returns (connections, RSS before, RSS after) in KiB.
async fn burst(etcd_endpoint: &str, etcd: &mut etcd_client::Client) -> Result<(u64, u64, u64)> {
    let (groups, endpoints) = addresses(Layout::Distinct, 1, BURST_ENDPOINTS)?;
    let mut backends = Vec::new();
    for (i, group) in groups.iter().enumerate() {
        backends.push(spawn_backend_with(group, &format!("burst{i}"), &[])?);
    }
    for group in &groups {
        for a in [group[0], group[group.len() - 1]] {
            wait_listening(a, Duration::from_secs(60)).await?;
        }
    }
    for chunk in endpoints[0].chunks(100) {
        let ops: Vec<etcd_client::TxnOp> = chunk
            .iter()
            .map(|a| etcd_client::TxnOp::put(format!("bench/{SERVICE}/{a}"), a.to_string(), None))
            .collect();
        etcd.txn(etcd_client::Txn::new().and_then(ops)).await?;
    }
    let (listen, admin) = (free_addr()?, free_addr()?);
    let sy = proxy(listen, admin, etcd_endpoint, &[])?;
    let result = async {
        wait_listening(listen, Duration::from_secs(30)).await?;
        first_call(channel(listen).await?, SERVICE.into()).await?;
        let mut clients = Vec::new();
        for _ in 0..8 {
            clients.push(crate::load::echo_client(channel(listen).await?));
        }
        // Every endpoint connected (a call whose turn falls on one still connecting goes
        // to the next): unary rounds until the pool holds them all.
        let deadline = Instant::now() + Duration::from_secs(120);
        while (scrape(admin, "switchyard_upstream_connections").await? as usize) < BURST_ENDPOINTS {
            if Instant::now() > deadline {
                return Err(anyhow!("not every burst endpoint connected within 120 s"));
            }
            let calls = (0..BURST_ENDPOINTS).map(|i| {
                let mut c = clients[i % clients.len()].clone();
                async move { c.unary(unary_request()).await.map(drop) }
            });
            futures_util::stream::iter(calls)
                .buffer_unordered(64)
                .collect::<Vec<_>>()
                .await;
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        let before = status_kib(sy.pid, "VmRSS:");
        let calls = (0..BURST_ENDPOINTS).map(|i| {
            let mut c = clients[i % clients.len()].clone();
            async move {
                let mut req = unary_request();
                req.count = 1;
                req.reply_size = BURST_REPLY;
                let mut stream = c.server_stream(req).await?.into_inner();
                while stream.message().await?.is_some() {}
                Ok::<_, tonic::Status>(())
            }
        });
        let replies: Vec<_> = futures_util::stream::iter(calls)
            .buffer_unordered(64)
            .collect()
            .await;
        if let Some(Err(e)) = replies.into_iter().find(Result::is_err) {
            return Err(anyhow!("a large reply failed: {e}"));
        }
        drop(clients);
        tokio::time::sleep(Duration::from_secs(3)).await;
        let connections = scrape(admin, "switchyard_upstream_connections").await? as u64;
        Ok::<_, anyhow::Error>((connections, before, status_kib(sy.pid, "VmRSS:")))
    }
    .await;
    teardown(sy, backends, etcd).await?;
    result
}

/// What one stream-limited run found.
struct Limited {
    failed: usize,
    wall: Duration,
    connections: u64,
    refused: u64,
}

/// Callers, calls per caller and each call's delay of the stream-limited run.
const CALLERS: usize = 32;
const CALLS_EACH: usize = 4;
const DELAY_MS: u32 = 100;
/// Streams the stream-limited backends allow per connection.
const BACKEND_STREAMS: u32 = 4;

/// Two backends that allow 4 streams per connection under 32 callers, through a fresh
/// proxy.
async fn stream_limited(etcd_endpoint: &str, etcd: &mut etcd_client::Client) -> Result<Limited> {
    let addrs = [free_addr()?, free_addr()?];
    let streams = BACKEND_STREAMS.to_string();
    let mut backends = Vec::new();
    for (i, a) in addrs.iter().enumerate() {
        backends.push(spawn_backend_with(
            &[*a],
            &format!("limited{i}"),
            &["--max-streams", &streams],
        )?);
    }
    for a in addrs {
        wait_listening(a, Duration::from_secs(10)).await?;
        etcd.put(format!("bench/{SERVICE}/{a}"), a.to_string(), None)
            .await?;
    }
    let (listen, admin) = (free_addr()?, free_addr()?);
    let sy = proxy(listen, admin, etcd_endpoint, &[])?;
    let result = async {
        wait_listening(listen, Duration::from_secs(30)).await?;
        let path = http::uri::PathAndQuery::from_static(UNARY_PATH);
        let mut clients = Vec::new();
        for _ in 0..CALLERS {
            clients.push(tonic::client::Grpc::new(channel(listen).await?));
        }
        // The service's first call waits for its endpoints: made before the load.
        first_call(channel(listen).await?, SERVICE.into()).await?;
        let t0 = Instant::now();
        let failed: usize = futures_util::future::join_all(clients.into_iter().map(|mut grpc| {
            let path = path.clone();
            async move {
                let mut failed = 0;
                for _ in 0..CALLS_EACH {
                    let mut req = unary_request();
                    req.delay_ms = DELAY_MS;
                    let mut req = tonic::Request::new(req);
                    req.set_timeout(Duration::from_secs(10));
                    let r: Result<tonic::Response<switchyard::echo::EchoReply>, _> = async {
                        grpc.ready()
                            .await
                            .map_err(|e| tonic::Status::unavailable(e.to_string()))?;
                        grpc.unary(req, path.clone(), tonic_prost::ProstCodec::default())
                            .await
                    }
                    .await;
                    if r.is_err() {
                        failed += 1;
                    }
                }
                failed
            }
        }))
        .await
        .into_iter()
        .sum();
        let wall = t0.elapsed();
        Ok::<_, anyhow::Error>(Limited {
            failed,
            wall,
            connections: scrape(admin, "switchyard_upstream_connections").await? as u64,
            refused: scrape(admin, "switchyard_upstream_refused_streams_total").await? as u64,
        })
    }
    .await;
    teardown(sy, backends, etcd).await?;
    result
}

/// Runs the upstream scenarios named in `cases` (see [`CASES`]); returns their report.
pub async fn run(
    etcd_endpoint: &str,
    etcd: &mut etcd_client::Client,
    tck: f64,
    cases: &[String],
) -> Result<String> {
    let mut out = String::new();
    let layouts: [(&str, &str, usize, usize, Layout); 4] = [
        ("idle", "idle proxy, no service", 0, 0, Layout::Shared(1)),
        (
            "one",
            "1,000 services × 1 endpoint, one address",
            1000,
            1,
            Layout::Shared(1),
        ),
        (
            "shared",
            "1,000 services × 10 endpoints, 10 shared addresses",
            1000,
            10,
            Layout::Shared(10),
        ),
        (
            "distinct",
            "1,000 services × 10 endpoints, 10,000 distinct addresses",
            1000,
            10,
            Layout::Distinct,
        ),
    ];
    let mut found = Vec::new();
    writeln!(
        out,
        "| start-up layout | every service answered after | RSS | backend connections | CPU |"
    )?;
    writeln!(out, "|---|---:|---:|---:|---:|")?;
    for (case, label, services, per, layout) in layouts {
        if !cases.iter().any(|c| c == case) {
            continue;
        }
        println!("e2e: upstream: {label}");
        let f = footprint(etcd_endpoint, etcd, services, per, layout, tck)
            .await
            .with_context(|| label.to_owned())?;
        writeln!(
            out,
            "| {label} | {:.2} s | {:.1} MiB | {} | {:.2} s |",
            f.ready.as_secs_f64(),
            f.rss_kib as f64 / 1024.0,
            f.connections,
            f.cpu_secs,
        )?;
        found.push(f);
    }
    if let [idle, one, shared, distinct] = &found[..] {
        derived(&mut out, idle, one, shared, distinct)?;
    }
    if cases.iter().any(|c| c == "burst") {
        println!("e2e: upstream: one large reply per connection");
        let (conns, before, after) = burst(etcd_endpoint, etcd).await?;
        writeln!(
            out,
            "\n- kept per connection after one {} KiB reply on each of {conns} connections: \
             {:.1} KiB (RSS {:.1} MiB before, {:.1} MiB after)",
            BURST_REPLY / 1024,
            after.saturating_sub(before) as f64 / conns.max(1) as f64,
            before as f64 / 1024.0,
            after as f64 / 1024.0,
        )?;
    }
    if cases.iter().any(|c| c == "limited") {
        limited_runs(&mut out, etcd_endpoint, etcd).await?;
    }
    Ok(out)
}

/// The costs derived from the four start-up layouts.
fn derived(
    out: &mut String,
    idle: &Footprint,
    one: &Footprint,
    shared: &Footprint,
    distinct: &Footprint,
) -> Result<()> {
    let kib = |a: &Footprint, b: &Footprint| b.rss_kib.saturating_sub(a.rss_kib) as f64;
    writeln!(out)?;
    writeln!(
        out,
        "- per watched service (with its one endpoint, on a connection shared by all): {:.1} KiB ((1,000 × 1 − idle) / 1,000)",
        kib(idle, one) / 1000.0
    )?;
    writeln!(
        out,
        "- per further endpoint of a service, on a shared address: {:.2} KiB ((1,000 × 10 shared − 1,000 × 1) / 9,000)",
        kib(one, shared) / 9000.0
    )?;
    let extra_conns = distinct
        .connections
        .saturating_sub(shared.connections)
        .max(1);
    writeln!(
        out,
        "- per idle backend connection: {:.1} KiB ((10,000 distinct − 10 shared) / {extra_conns} more connections)",
        kib(shared, distinct) / extra_conns as f64
    )?;
    writeln!(
        out,
        "- connections per address, 10 shared addresses: {:.1}",
        shared.connections as f64 / 10.0
    )?;
    Ok(())
}

/// Three stream-limited runs, one line each.
async fn limited_runs(
    out: &mut String,
    etcd_endpoint: &str,
    etcd: &mut etcd_client::Client,
) -> Result<()> {
    writeln!(out)?;
    for round in 1..=3 {
        println!("e2e: upstream: stream-limited, run {round}/3");
        let l = stream_limited(etcd_endpoint, etcd).await?;
        writeln!(
            out,
            "- stream-limited (2 tonic backends allowing {BACKEND_STREAMS} streams per connection; \
             {CALLERS} callers on their own connections × {CALLS_EACH} calls of {DELAY_MS} ms), run {round}: \
             {} of {} failed, {:.2} s ({:.2}× the {:.1} s of all {CALLERS} at once), \
             {} backend connections, {} streams refused and sent again",
            l.failed,
            CALLERS * CALLS_EACH,
            l.wall.as_secs_f64(),
            l.wall.as_secs_f64() / (CALLS_EACH as f64 * f64::from(DELAY_MS) / 1000.0),
            CALLS_EACH as f64 * f64::from(DELAY_MS) / 1000.0,
            l.connections,
            l.refused,
        )?;
    }
    Ok(())
}
