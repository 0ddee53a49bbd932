//! switchyard-only measurements: put to first routed call, 10,000 open streams, and
//! start-up with 1,000 services × 10 endpoints.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Result};
use futures_util::stream::{FuturesUnordered, StreamExt};
use switchyard::testkit::free_addr;
use tonic::transport::Channel;

use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::{EchoReply, EchoRequest};

use crate::load::{channel, check_unary, echo_client, percentile, unary_request};
use crate::procs::{status_kib, wait_listening, Meter};
use crate::report::fmt_us;
use crate::targets::spawn_switchyard;
use crate::{FRESH_SERVICE, MESSAGE};

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

/// Calls `/<service>/Unary` until a backend (not the proxy) answers it.
pub async fn first_call(ch: Channel, service: String) -> Result<()> {
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

/// Put to first routed call and 10,000 open streams, on a proxy of its own (so that what
/// the load runs left in memory does not count); their lines are added to `extras`.
pub async fn with_a_fresh_proxy(
    extras: &mut String,
    etcd: &mut etcd_client::Client,
    etcd_endpoint: &str,
    backend_addrs: &[SocketAddr],
    tck: f64,
) -> Result<()> {
    let fresh_addr = free_addr()?;
    let extra_addr = free_addr()?;
    let sy = spawn_switchyard(
        &[
            extra_addr.to_string(),
            format!("{fresh_addr}={FRESH_SERVICE}"),
        ],
        etcd_endpoint,
        &[],
        None,
    )?;
    wait_listening(extra_addr, Duration::from_secs(10)).await?;
    check_unary(extra_addr).await?;
    println!("e2e: etcd put → first routed call (100 puts)");
    match put_to_first_call(etcd, fresh_addr, backend_addrs, 100).await {
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
    Ok(())
}

/// Start-up with 1,000 services × 10 endpoints on 10 shared addresses (with the other
/// targets stopped); its line is added to `extras`.
pub async fn startup(
    extras: &mut String,
    etcd_endpoint: &str,
    etcd: &mut etcd_client::Client,
    tck: f64,
) -> Result<()> {
    println!("e2e: start-up with 1,000 services x 10 endpoints");
    let shared = crate::upstream::Layout::Shared(10);
    match crate::upstream::footprint(etcd_endpoint, etcd, 1000, 10, shared, tck).await {
        Ok(s) => writeln!(
            extras,
            "- start-up with 1,000 services × 10 endpoints in etcd (10 backend addresses): \
             listening after {:.0} ms, every service answered (1,000 calls) after {:.2} s; \
             {} backend connections, RSS then {:.1} MiB, CPU {:.2} s",
            s.listening.as_secs_f64() * 1000.0,
            s.ready.as_secs_f64(),
            s.connections,
            s.rss_kib as f64 / 1024.0,
            s.cpu_secs,
        )?,
        Err(e) => writeln!(extras, "- start-up with 1,000 × 10: failed: {e:#}")?,
    }
    Ok(())
}
