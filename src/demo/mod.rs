//! The example `Echo` backend used by the README demo, the tests and the benchmarks.
//!
//! It answers all four gRPC call kinds, echoes `x-echo-*` request metadata back as
//! response headers and trailers, can fail a call with a chosen status, wait before
//! replying, and counts what it saw (calls, cancelled calls, deadlines) so tests can
//! check what reached the backend.

mod service;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::echo::EchoRequest;

pub use service::*;

/// Flags of `switchyard demo-backend`: one example Echo backend process.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoBackendArgs {
    /// Where to listen (`ip:port`).
    #[arg(long, default_value = "127.0.0.1:50051")]
    pub listen: SocketAddr,
    /// Name reported in every reply (`server` field and `x-served-by` header).
    #[arg(long, default_value = "echo")]
    pub name: String,
    /// Register in etcd under this service (through the registration library) while
    /// serving; deregister on shutdown.
    #[arg(long)]
    pub service: Option<crate::route::ServiceName>,
    /// Lease TTL of the registration.
    #[arg(long, default_value = "5s", value_parser = crate::registration::sidecar::parse_ttl)]
    pub ttl: Duration,
    /// etcd location and key prefix (with --service).
    #[command(flatten)]
    pub etcd: crate::settings::EtcdSettings,
    /// Weight registered with --service (etcd naming `Metadata.weight`).
    #[arg(long, default_value_t = 1)]
    pub weight: u32,
    /// Milliseconds added to every unary call (a slow node, for tests and benchmarks).
    #[arg(long, default_value_t = 0)]
    pub delay_ms: u32,
    /// Fail every unary call with this gRPC status code (a broken node); 0: never.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(i32).range(0..=16))]
    pub fail_code: i32,
}

/// Why the example backend stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum DemoError {
    /// The listener could not be bound or served.
    #[error("echo backend: {0}")]
    Io(#[from] std::io::Error),
    /// The etcd client could not be built.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// Registration failed.
    #[error(transparent)]
    Registration(#[from] crate::registration::RegistrationError),
    /// The gRPC server failed.
    #[error("echo backend: {0}")]
    Serve(#[from] tonic::transport::Error),
    /// A demo client call failed.
    #[error("call {0} failed: {1}")]
    Call(usize, tonic::Status),
}

/// Runs one example backend until SIGTERM/SIGINT, then stops gracefully (and
/// deregisters first, so that no new call is sent its way).
pub async fn run_backend(args: DemoBackendArgs) -> Result<(), DemoError> {
    let listener = TcpListener::bind(args.listen).await?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, name = %args.name, "echo backend listening");
    let registration = match &args.service {
        Some(service) => {
            let client = crate::etcd::connect(&args.etcd).await?;
            let mut spec = crate::registration::RegistrationSpec::new(service.as_str(), addr)
                .prefix(args.etcd.prefixes().swap_remove(0))
                .ttl(args.ttl);
            if args.weight != 1 {
                spec = spec.weight(args.weight);
            }
            let reg = crate::registration::Registration::start(client, spec).await?;
            tracing::info!(key = reg.key(), ttl = ?args.ttl, "registered in etcd");
            Some(reg)
        }
        None => None,
    };
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let service = EchoService::new(args.name.as_str());
    service
        .faults()
        .delay_ms
        .store(args.delay_ms, Ordering::Relaxed);
    service
        .faults()
        .fail_code
        .store(args.fail_code, Ordering::Relaxed);
    let server = tokio::spawn(serve(listener, service, async {
        let _ = stop_rx.await;
    }));
    crate::proxy::shutdown_signal().await;
    if let Some(reg) = registration {
        match reg.deregister().await {
            Ok(()) => tracing::info!("deregistered"),
            Err(e) => {
                tracing::warn!(error = %e, "deregistration failed; the key expires with its lease")
            }
        }
    }
    let _ = stop_tx.send(());
    match server.await {
        Ok(r) => r?,
        Err(e) => return Err(std::io::Error::other(e).into()),
    }
    tracing::info!(%addr, "echo backend stopped");
    Ok(())
}

/// Flags of `switchyard demo-client`: calls Echo/Unary and shows who answered.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoClientArgs {
    /// Where to call (the proxy's listener).
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub target: SocketAddr,
    /// How many calls to make, one after the other on one HTTP/2 connection.
    #[arg(long, default_value_t = 12)]
    pub calls: usize,
    /// Pause between calls.
    #[arg(long, default_value = "0s", value_parser = crate::settings::duration::parse)]
    pub interval: Duration,
}

/// Makes `calls` unary calls on one channel; prints each answer and a tally per backend.
pub async fn run_client(args: DemoClientArgs) -> Result<(), DemoError> {
    use crate::echo::echo_client::EchoClient;
    let channel = tonic::transport::Endpoint::from_shared(format!("http://{}", args.target))
        .map_err(|e| DemoError::Io(std::io::Error::other(e)))?
        .connect()
        .await?;
    let mut client = EchoClient::new(channel);
    let mut tally = std::collections::BTreeMap::<String, usize>::new();
    for i in 0..args.calls {
        let reply = client
            .unary(EchoRequest {
                message: format!("call {i}"),
                ..Default::default()
            })
            .await
            .map_err(|s| DemoError::Call(i, s))?
            .into_inner();
        println!("call {i:>3} -> {}", reply.server);
        *tally.entry(reply.server).or_default() += 1;
        if !args.interval.is_zero() {
            tokio::time::sleep(args.interval).await;
        }
    }
    let summary: Vec<String> = tally.iter().map(|(k, v)| format!("{k}: {v}")).collect();
    println!("{} calls, per backend: {}", args.calls, summary.join(", "));
    Ok(())
}
