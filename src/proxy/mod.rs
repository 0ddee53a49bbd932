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
pub mod grpc;
mod listeners;
pub mod local;
pub mod relay;
pub mod reload;
pub mod replay;
pub mod resend;
pub mod routing;
pub mod runtime;
pub mod sockets;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{watch, Semaphore};
use tokio_util::task::TaskTracker;

use crate::admin::AdminState;
use crate::discovery::{Discovery, DiscoveryConfig, DiscoveryError, EtcdSource};
use crate::etcd::EtcdError;
use crate::metrics::Metrics;
use crate::route::ServiceName;
use crate::settings::ProxySettings;

use listeners::{ClientConnections, Listeners, Serving};
use local::LocalContext;
pub use reload::{LogControl, Reload, Running};
use routing::LiveRouting;
use runtime::Built;
pub use sockets::Sockets;

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
    #[error("cannot listen on {addr} (set by {}){}", .setting.names(), bind_advice(*.setting, .source))]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The setting that gave the address.
        setting: ListenSetting,
        /// Why (printed once, as the error's source).
        #[source]
        source: std::io::Error,
    },
    /// A listener given already bound has no address.
    #[error("listener without an address: {0}")]
    Socket(#[source] std::io::Error),
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
    /// The access log or the trace exporter cannot start.
    #[error(transparent)]
    Observe(#[from] crate::observe::ObserveError),
    /// The settings could not be applied.
    #[error(transparent)]
    Settings(#[from] crate::settings::ConfigError),
    /// A service config file is unreadable or invalid (`--service-config`).
    #[error("--service-config: {0}")]
    ServiceConfig(#[from] crate::service_config::source::FileError),
}

/// Which setting gave a listener its address (named when it cannot be bound).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenSetting {
    /// `--listen` / `[[listener]] addr`.
    Listen,
    /// `--admin-listen` / `admin.listen`.
    Admin,
}

impl ListenSetting {
    /// The flag and the config file key.
    pub fn names(self) -> &'static str {
        match self {
            Self::Listen => "--listen, config key `[[listener]] addr`",
            Self::Admin => "--admin-listen, config key `admin.listen`",
        }
    }
}

/// What to do about a bind error, if there is something to say.
fn bind_advice(setting: ListenSetting, error: &std::io::Error) -> &'static str {
    match (error.kind(), setting) {
        (std::io::ErrorKind::AddrInUse, ListenSetting::Admin) => {
            ": another process holds the port; a second switchyard on this host needs its own \
             --admin-listen (or --admin-listen off)"
        }
        (std::io::ErrorKind::AddrInUse, ListenSetting::Listen) => {
            ": another process holds the port; choose another address with --listen"
        }
        _ => "",
    }
}

/// Opens the configured listeners and serves until `shutdown` completes.
pub async fn run(
    args: ProxySettings,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    run_reloading(Running::new(args), None, shutdown).await
}

/// Opens the configured listeners (the sockets systemd passed, or new ones bound with
/// `SO_REUSEPORT`: see [`sockets`]) and serves until `shutdown` completes; with `reload`,
/// SIGHUP re-reads the settings and applies them (see [`reload`]).
pub async fn run_reloading(
    running: Running,
    reload: Option<Reload>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let sockets = Sockets::from_env();
    let args = &running.settings;
    let mut listeners = Vec::with_capacity(args.listeners.len());
    for spec in &args.listeners {
        let listener = sockets
            .listen(spec.addr)
            .map_err(|source| ProxyError::Bind {
                addr: spec.addr,
                setting: ListenSetting::Listen,
                source,
            })?;
        listeners.push(BoundListener {
            listener,
            service: spec.service.clone(),
        });
    }
    let addrs: Vec<SocketAddr> = args
        .listeners
        .iter()
        .map(|l| l.addr)
        .chain(args.admin.listen.0)
        .collect();
    sockets.warn_unused(&addrs);
    serve_with(running, listeners, sockets, reload, shutdown).await
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

/// Serves calls on already-bound listeners until `shutdown` completes, then drains.
pub async fn serve(
    args: ProxySettings,
    listeners: Vec<BoundListener>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    serve_with(
        Running::new(args),
        listeners,
        Sockets::none(),
        None,
        shutdown,
    )
    .await
}

async fn serve_with(
    running: Running,
    listeners: Vec<BoundListener>,
    sockets: Sockets,
    mut reload: Option<Reload>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ProxyError> {
    let args = &running.settings;
    let built = Built::new(args)?;
    let etcd = crate::etcd::connect(&args.etcd).await?;
    let metrics = Metrics::new();
    let observer = crate::observe::Observer::new(&args.observe, metrics.registry())?;
    let discovery = Discovery::new(
        Arc::new(EtcdSource::new(etcd.clone())),
        DiscoveryConfig {
            live: built.live,
            service_idle: args.timeouts.service_idle,
            upstream: runtime::upstream_config(args)?,
            metrics: Arc::clone(&metrics),
        },
    );
    let routing = LiveRouting::new(built.routing);
    let policies = crate::service_config::LivePolicies::new();
    policies.set_files(built.service_configs);
    let config_watch = args.service_config.prefix.clone().map(|prefix| {
        tokio::spawn(crate::service_config::source::watch_etcd(
            etcd.clone(),
            prefix,
            Arc::clone(&policies),
        ))
    });
    let admin = AdminState::new(Arc::clone(&discovery));
    let (stop_tx, stop_rx) = watch::channel(false);
    let local = Arc::new(LocalContext {
        discovery: Arc::clone(&discovery),
        etcd: etcd.clone(),
        routing,
        draining: stop_rx.clone(),
    });
    // Resolve and bind everything that can fail before any task is started.
    let (server, acceptor) = (built.server, built.acceptor);
    let mut serving = Vec::with_capacity(listeners.len());
    for bound in listeners {
        let addr = bound.listener.local_addr().map_err(ProxyError::Socket)?;
        let forwarder = runtime::forwarder(
            &discovery,
            bound.service.as_ref(),
            args,
            &local,
            &policies,
            (observer.clone(), addr),
        )?;
        serving.push((addr, bound, forwarder));
    }
    let admin_listener = match args.admin.listen.0 {
        Some(addr) => Some(sockets.listen(addr).map_err(|source| ProxyError::Bind {
            addr,
            setting: ListenSetting::Admin,
            source,
        })?),
        None => None,
    };
    let probe = tokio::spawn(crate::admin::probe_etcd(etcd.clone(), Arc::clone(&admin)));
    let tracker = TaskTracker::new();
    let shared = ClientConnections {
        tracker: tracker.clone(),
        connections: Arc::new(Semaphore::new(args.limits.max_connections)),
    };
    // One line says what this proxy serves, so two proxies on a host are told apart.
    let listening: Vec<String> = serving
        .iter()
        .map(|(_, bound, _)| listener_text(bound))
        .collect();
    let admin_text = match admin_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        Some(addr) => addr.to_string(),
        None => "off".to_owned(),
    };
    tracing::info!(
        listeners = %listening.join(" "),
        prefixes = %args.etcd.prefixes().join(" "),
        admin = %admin_text,
        zone = %args.balance.zone.as_deref().unwrap_or("off"),
        "listening"
    );
    let admin_task = admin_listener.map(|listener| {
        tokio::spawn(crate::admin::serve(
            listener,
            Arc::clone(&admin),
            stop_rx.clone(),
        ))
    });
    let mut open = Listeners::new(shared);
    for (addr, bound, forwarder) in serving {
        let serving = Serving {
            forwarder,
            settings: Arc::clone(&server),
            acceptor: acceptor.clone(),
        };
        open.start(addr, bound.listener, bound.service, serving);
    }
    admin
        .listening
        .store(true, std::sync::atomic::Ordering::Relaxed);
    let mut live = reload::Live {
        running,
        sockets,
        discovery,
        local,
        metrics,
        listeners: open,
        observer,
        policies,
    };
    let mut hangups = reload::Hangups::new(reload.is_some());
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            () = hangups.recv() => {
                if let Some(reload) = reload.as_mut() {
                    live.reload(reload).await;
                }
            }
        }
    }
    probe.abort();
    if let Some(w) = config_watch {
        w.abort();
    }
    let drain_timeout = live.running.settings.timeouts.drain;
    tracing::info!(
        ?drain_timeout,
        "shutting down: no new connections, draining calls"
    );
    let _ = stop_tx.send(true);
    if let Some(t) = admin_task {
        let _ = t.await;
    }
    live.listeners.close_all().await;
    // Every connection task saw the stop signal and sent GOAWAY; wait for their streams.
    tracker.close();
    match tokio::time::timeout(drain_timeout, tracker.wait()).await {
        Ok(()) => tracing::info!("all connections drained"),
        Err(_) => tracing::warn!(
            open = tracker.len(),
            "drain timeout reached; closing remaining connections"
        ),
    }
    if let Some(observer) = live.observer {
        observer.shutdown().await;
    }
    Ok(())
}

/// A listener as `--listen` spells it: `ADDR`, or `ADDR=SERVICE` when bound.
fn listener_text(bound: &BoundListener) -> String {
    let addr = match bound.listener.local_addr() {
        Ok(a) => a.to_string(),
        Err(_) => "?".to_owned(),
    };
    match &bound.service {
        Some(service) => format!("{addr}={service}"),
        None => addr,
    }
}
