//! Where a call enters: the h2c listeners, their connections, and graceful shutdown.
//!
//! Each accepted connection is served by [`conn::serve`] (the h2 crate's server, every
//! stream polled inside the connection's task); each stream on it is handed to the
//! listener's [`forward::Forwarder`], which relays it to a backend ([`relay`]).

mod attempt;
pub mod body;
pub mod conn;
pub mod error;
pub mod forward;
pub mod relay;
pub mod replay;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::discovery::{Discovery, DiscoveryConfig, DiscoveryError};
use crate::etcd::EtcdError;
use crate::metrics::Metrics;
use crate::route::ServiceName;
use crate::settings::ProxySettings;
use crate::upstream::UpstreamConfig;
use tokio_rustls::TlsAcceptor;

/// Time allowed for a client's TLS handshake.
const TLS_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
use conn::{ConnLimits, ServerSettings};
use forward::{Forwarder, Target};

/// A listener already bound, with the service it is bound to (if any).
#[derive(Debug)]
pub struct BoundListener {
    /// The bound socket.
    pub listener: TcpListener,
    /// If set, every call on this listener goes to this service.
    pub service: Option<ServiceName>,
}

/// Errors that stop the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The etcd client could not be set up.
    #[error(transparent)]
    Etcd(#[from] EtcdError),
    /// The TLS files are unusable.
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsError),
    /// A bound service could not be set up.
    #[error(transparent)]
    Discovery(#[from] DiscoveryError),
    /// The routes do not fit together.
    #[error("--route: {0}")]
    Route(#[from] crate::route::RouteError),
}

/// Binds the configured listeners and serves until `shutdown` completes.
pub async fn run(
    args: ProxySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let mut listeners = Vec::with_capacity(args.listeners.len());
    for spec in &args.listeners {
        let listener = TcpListener::bind(spec.addr)
            .await
            .map_err(|source| ProxyError::Bind {
                addr: spec.addr,
                source,
            })?;
        listeners.push(BoundListener {
            listener,
            service: spec.service.clone(),
        });
    }
    serve(args, listeners, shutdown).await
}

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = tokio::signal::ctrl_c() => {}
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGTERM; only Ctrl-C stops the proxy");
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// How client connections are served: HTTP/2 settings and time limits.
fn server_settings(args: &ProxySettings) -> ServerSettings {
    let mut h2 = h2::server::Builder::new();
    h2.max_concurrent_streams(args.limits.max_concurrent_streams)
        .max_header_list_size(args.limits.max_header_list_size)
        .initial_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .max_frame_size(64 * 1024)
        .max_pending_accept_reset_streams(256)
        .max_local_error_reset_streams(Some(1024));
    ServerSettings {
        h2,
        limits: ConnLimits {
            idle_timeout: args.timeouts.idle,
            first_request_timeout: args.timeouts.first_request,
            keepalive_interval: CLIENT_KEEPALIVE_INTERVAL,
        },
    }
}

/// Interval of HTTP/2 keep-alive pings to clients (finds dead peers).
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// Serves calls on already-bound listeners until `shutdown` completes, then drains.
pub async fn serve(
    args: ProxySettings,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let acceptor = args.tls.server_config()?.map(TlsAcceptor::from);
    let etcd = crate::etcd::connect(&args.etcd).await?;
    let discovery = Discovery::new(
        etcd.clone(),
        DiscoveryConfig {
            prefixes: args.etcd.prefixes(),
            max_services: args.limits.max_services,
            service_idle: args.timeouts.service_idle,
            upstream: UpstreamConfig {
                connect_timeout: args.timeouts.connect,
                tls: args.upstream_tls.client_config()?,
                ..UpstreamConfig::default()
            },
            metrics: Metrics::new(),
        },
    );
    let routes = Arc::new(crate::route::Routes::new(&args.route)?);
    let admin = AdminState::new(Arc::clone(&discovery));
    // Resolve and bind everything that can fail before any task is started.
    let mut serving = Vec::with_capacity(listeners.len());
    for bound in listeners {
        let target = match &bound.service {
            Some(name) => Target::Bound(discovery.service(name.as_str())?),
            None => Target::ByPath,
        };
        let forwarder = Arc::new(
            Forwarder::new(Arc::clone(&discovery), target, args.timeouts.discovery)
                .with_routes(Arc::clone(&routes)),
        );
        serving.push((bound, forwarder));
    }
    let admin_listener = match args.admin.listen.0 {
        Some(addr) => Some(
            TcpListener::bind(addr)
                .await
                .map_err(|source| ProxyError::Bind { addr, source })?,
        ),
        None => None,
    };
    let probe = tokio::spawn(crate::admin::probe_etcd(etcd.clone(), Arc::clone(&admin)));
    let tracker = TaskTracker::new();
    let accepting = Accepting {
        acceptor,
        settings: Arc::new(server_settings(&args)),
        tracker: tracker.clone(),
        connections: Arc::new(Semaphore::new(args.limits.max_connections)),
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut accept_tasks = Vec::with_capacity(serving.len() + 1);
    if let Some(listener) = admin_listener {
        tracing::info!(listen = ?listener.local_addr().ok(), "admin listening");
        accept_tasks.push(tokio::spawn(crate::admin::serve(
            listener,
            Arc::clone(&admin),
            stop_rx.clone(),
        )));
    }
    for (bound, forwarder) in serving {
        let addr = bound.listener.local_addr().ok();
        tracing::info!(listen = ?addr, service = ?bound.service, "listening");
        accept_tasks.push(tokio::spawn(accept_loop(
            bound.listener,
            forwarder,
            accepting.clone(),
            stop_rx.clone(),
        )));
    }
    admin
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    shutdown.await;
    probe.abort();
    tracing::info!(drain_timeout = ?args.timeouts.drain, "shutting down: no new connections, draining calls");
    let _ = stop_tx.send(true);
    for t in accept_tasks {
        let _ = t.await;
    }
    // Every connection task saw the stop signal and sent GOAWAY; wait for their streams.
    tracker.close();
    match tokio::time::timeout(args.timeouts.drain, tracker.wait()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            open = tracker.len(),
            "drain timeout reached; closing remaining connections"
        ),
    }
    Ok(())
}

/// What every accept loop shares: how connections are set up, bounded and tracked.
#[derive(Clone)]
struct Accepting {
    acceptor: Option<TlsAcceptor>,
    settings: Arc<ServerSettings>,
    tracker: TaskTracker,
    connections: Arc<Semaphore>,
}

async fn accept_loop(
    listener: TcpListener,
    forwarder: Arc<Forwarder>,
    shared: Accepting,
    mut stop: watch::Receiver<bool>,
) {
    let Accepting {
        acceptor,
        settings,
        tracker,
        connections,
    } = shared;
    loop {
        // Bound the number of client connections: past the limit, new ones wait in the
        // kernel's backlog instead of taking memory and file descriptors here.
        let permit = tokio::select! {
            p = Arc::clone(&connections).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
            _ = stop.changed() => return,
        };
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let _ = stream.set_nodelay(true);
        let fwd = Arc::clone(&forwarder);
        let settings = Arc::clone(&settings);
        let stop = stop.clone();
        match &acceptor {
            None => {
                tracker.spawn(async move {
                    conn::serve(stream, settings, fwd, stop, peer).await;
                    drop(permit);
                });
            }
            Some(acceptor) => {
                // The handshake runs in the connection's own task so a slow client cannot
                // stall the accept loop; it is bounded in time.
                let handshake = acceptor.accept(stream);
                tracker.spawn(async move {
                    match tokio::time::timeout(TLS_HANDSHAKE_TIMEOUT, handshake).await {
                        Ok(Ok(tls)) => conn::serve(tls, settings, fwd, stop, peer).await,
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                    drop(permit);
                });
            }
        }
    }
}
