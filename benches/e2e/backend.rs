//! The backend role: this binary re-executed as a tonic Echo server on one or more
//! listeners, with one worker thread and a stream limit high enough for the 10,000-stream
//! measurement; and the harness's side, which starts and registers them.

use std::net::SocketAddr;
use std::process::Stdio;
use std::str::FromStr;
use std::time::Duration;

use anyhow::{anyhow, bail, Context as _, Result};
use futures_util::stream::StreamExt;
use tokio::net::TcpListener;
use tokio::process::Command;

use switchyard::echo::echo_server::{Echo, EchoServer};
use switchyard::echo::{EchoReply, EchoRequest};

use crate::procs::{wait_listening, Proc};
use crate::{BACKEND_NAMES, BACKEND_ROLE, SERVICE};

pub type ReplyStream =
    std::pin::Pin<Box<dyn futures_util::Stream<Item = Result<EchoReply, tonic::Status>> + Send>>;

/// The backends' Echo service: the demo's unary and server-streaming behaviour (echo the
/// message; `count` replies of `reply_size` bytes, each after `delay_ms`), kept minimal so
/// that the backends cost the same behind every target. Server streams end after their
/// last message.
pub struct BenchEcho {
    name: String,
    /// Added to every unary call's own delay (`--delay-ms`): the degraded-backend scenario's
    /// slow node.
    delay_ms: u32,
}

#[tonic::async_trait]
impl Echo for BenchEcho {
    async fn unary(
        &self,
        request: tonic::Request<EchoRequest>,
    ) -> Result<tonic::Response<EchoReply>, tonic::Status> {
        let req = request.into_inner();
        let delay = req.delay_ms.saturating_add(self.delay_ms);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(u64::from(delay))).await;
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

pub fn backend_main(args: &[String]) -> Result<()> {
    let mut listen = Vec::new();
    let mut name = "echo".to_owned();
    let mut threads = 1usize;
    let mut delay_ms = 0u32;
    let mut max_streams = 20_000u32;
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let v = it.next().ok_or_else(|| anyhow!("{a} needs a value"))?;
        match a.as_str() {
            "--listen" => listen.push(SocketAddr::from_str(v).context("--listen")?),
            "--name" => name.clone_from(v),
            "--threads" => threads = v.parse().context("--threads")?,
            "--delay-ms" => delay_ms = v.parse().context("--delay-ms")?,
            "--max-streams" => max_streams = v.parse().context("--max-streams")?,
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
        let echo = EchoServer::new(BenchEcho { name, delay_ms })
            .max_decoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE)
            .max_encoding_message_size(switchyard::demo::MAX_MESSAGE_SIZE);
        tonic::transport::Server::builder()
            .tcp_nodelay(true)
            .max_concurrent_streams(max_streams)
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

pub fn spawn_backend(addrs: &[SocketAddr], name: &str, delay_ms: u32) -> Result<Proc> {
    spawn_backend_with(addrs, name, &["--delay-ms", &delay_ms.to_string()])
}

/// Starts a backend listening on `addrs` with more backend arguments (`--delay-ms N`,
/// `--max-streams N`: streams allowed per connection, 20,000 by default).
pub fn spawn_backend_with(addrs: &[SocketAddr], name: &str, extra: &[&str]) -> Result<Proc> {
    let exe = std::env::current_exe()?;
    let mut cmd = Command::new(exe);
    cmd.arg(BACKEND_ROLE).args(["--name", name]).args(extra);
    for a in addrs {
        cmd.arg("--listen").arg(a.to_string());
    }
    cmd.env("RUST_LOG", "warn").stdout(Stdio::null());
    Proc::spawn(&format!("backend {name}"), &mut cmd)
}

/// Starts the three backends and registers each in etcd once it listens; `delays` are
/// each backend's added unary delay in ms.
pub async fn start_registered(
    etcd: &mut etcd_client::Client,
    delays: [u32; 3],
) -> Result<(Vec<SocketAddr>, Vec<Proc>)> {
    let backend_addrs: Vec<SocketAddr> = (0..3)
        .map(|_| switchyard::testkit::free_addr())
        .collect::<Result<_, _>>()?;
    let mut backends = Vec::new();
    for ((addr, name), delay) in backend_addrs.iter().zip(BACKEND_NAMES).zip(delays) {
        backends.push(spawn_backend(&[*addr], name, delay)?);
    }
    for addr in &backend_addrs {
        wait_listening(*addr, Duration::from_secs(10)).await?;
        etcd.put(format!("services/{SERVICE}/{addr}"), addr.to_string(), None)
            .await?;
    }
    Ok((backend_addrs, backends))
}
