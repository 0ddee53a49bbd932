//! Reload on SIGHUP: the settings are read again (the config file as it is now; flags and
//! environment as at start) and applied to the running proxy without cutting a call.
//!
//! Applied live: listeners added, removed, or bound to another service; TLS on the
//! listeners; `limits.max_connections`, `limits.max_concurrent_streams`,
//! `limits.max_header_list_size`; the `discovery`, `idle`, `first_request` and `drain`
//! timeouts. New connections get the new settings, open ones keep theirs (a listener
//! bound to another service tells its open connections to go away: GOAWAY, their calls
//! finish, the clients reconnect). The settings in `keep_restart_only` are read at start
//! only: a change to them is logged as needing a restart and the running values stay.
//! A file with an error is refused with the error (file, line, key) in the log; the
//! running settings stay. Each reload counts in `switchyard_config_reloads_total{result}`.

use std::sync::Arc;

use tokio_rustls::TlsAcceptor;

use super::listeners::{Listeners, Serving};
use super::sockets::Sockets;
use super::{forwarder, server_settings};
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::settings::{ConfigError, Loaded, LogFormat, ProxySettings};

/// Reads the settings again: flags and environment as at start, the config file as it
/// is now (`settings::load` with the start's command line).
pub type Reload = Box<dyn FnMut() -> Result<Loaded, ConfigError> + Send>;

/// The settings the proxy runs with.
#[derive(Debug, Clone)]
pub struct Running {
    /// The proxy's settings.
    pub settings: ProxySettings,
    /// The log format the process started with (changing it needs a restart), if known.
    pub log_format: Option<LogFormat>,
}

impl Running {
    /// Settings without a known log format (an embedded proxy).
    pub fn new(settings: ProxySettings) -> Self {
        Self {
            settings,
            log_format: None,
        }
    }
}

impl From<Loaded> for Running {
    fn from(l: Loaded) -> Self {
        Self {
            settings: l.proxy,
            log_format: Some(l.log_format),
        }
    }
}

/// Copies the settings read only at start from `running` into `new`; returns those that
/// differed (their file keys). A new setting that cannot change live is added here.
fn keep_restart_only(running: &Running, new: &mut Running) -> Vec<&'static str> {
    let (r, n) = (&running.settings, &mut new.settings);
    let mut changed = Vec::new();
    let mut note = |key: &'static str, differs: bool| {
        if differs {
            changed.push(key);
        }
    };
    note("etcd", r.etcd != n.etcd);
    note("upstream_tls", r.upstream_tls != n.upstream_tls);
    note("admin.listen", r.admin != n.admin);
    note("timeouts.connect", r.timeouts.connect != n.timeouts.connect);
    note(
        "timeouts.service_idle",
        r.timeouts.service_idle != n.timeouts.service_idle,
    );
    note(
        "limits.max_services",
        r.limits.max_services != n.limits.max_services,
    );
    note(
        "limits.worker_threads",
        r.limits.worker_threads != n.limits.worker_threads,
    );
    note("balance", r.balance != n.balance);
    note("ejection", r.ejection != n.ejection);
    note("health_check", r.health_check != n.health_check);
    note(
        "log_format",
        running.log_format.is_some() && running.log_format != new.log_format,
    );
    n.etcd = r.etcd.clone();
    n.upstream_tls = r.upstream_tls.clone();
    n.admin = r.admin.clone();
    n.timeouts.connect = r.timeouts.connect;
    n.timeouts.service_idle = r.timeouts.service_idle;
    n.limits.max_services = r.limits.max_services;
    n.limits.worker_threads = r.limits.worker_threads;
    n.balance = r.balance.clone();
    n.ejection = r.ejection.clone();
    n.health_check = r.health_check.clone();
    new.log_format = running.log_format;
    changed
}

/// The parts of the running proxy that a reload changes.
pub(crate) struct Live {
    /// The settings in force.
    pub running: Running,
    /// Where new listeners' sockets come from.
    pub sockets: Sockets,
    /// The services (bound listeners resolve theirs here).
    pub discovery: Arc<Discovery>,
    /// What the services the proxy answers itself read (health, reflection).
    pub local: Arc<super::local::LocalContext>,
    /// Counts reloads.
    pub metrics: Arc<Metrics>,
    /// The running listeners.
    pub listeners: Listeners,
}

impl Live {
    /// Reads the settings again and applies them, or logs why not.
    pub async fn reload(&mut self, read: &mut Reload) {
        let applied = match read() {
            Ok(loaded) => match self.apply(loaded.into()).await {
                Ok(()) => true,
                Err(error) => {
                    tracing::error!(%error, "config reload refused; the running settings stay");
                    false
                }
            },
            Err(error) => {
                tracing::error!(%error, "config reload refused; the running settings stay");
                false
            }
        };
        self.metrics.config_reloaded(applied);
    }

    /// Applies `new`: everything that can fail first, then the changes.
    async fn apply(&mut self, mut new: Running) -> Result<(), super::ProxyError> {
        let restart = keep_restart_only(&self.running, &mut new);
        if !restart.is_empty() {
            tracing::warn!(
                settings = restart.join(", "),
                "changed in the settings but read at start only: restart to apply; the running values stay"
            );
        }
        let args = &new.settings;
        let acceptor = args.tls.server_config()?.map(TlsAcceptor::from);
        let server = Arc::new(server_settings(args));
        let mut starting = Vec::new();
        let mut updating = Vec::new();
        for spec in &args.listeners {
            let serving = Serving {
                forwarder: forwarder(&self.discovery, spec.service.as_ref(), args, &self.local)?,
                settings: Arc::clone(&server),
                acceptor: acceptor.clone(),
            };
            if self.listeners.bound().any(|(a, _)| a == spec.addr) {
                updating.push((spec, serving));
            } else {
                let listener =
                    self.sockets
                        .listen(spec.addr)
                        .map_err(|source| super::ProxyError::Bind {
                            setting: super::ListenSetting::Listen,
                            addr: spec.addr,
                            source,
                        })?;
                starting.push((spec, listener, serving));
            }
        }
        let gone: Vec<_> = self
            .listeners
            .bound()
            .map(|(a, _)| a)
            .filter(|a| !args.listeners.iter().any(|l| l.addr == *a))
            .collect();
        for addr in gone {
            self.listeners.remove(addr).await;
        }
        for (spec, serving) in updating {
            self.listeners
                .update(spec.addr, spec.service.clone(), serving);
        }
        for (spec, listener, serving) in starting {
            self.listeners
                .start(spec.addr, listener, spec.service.clone(), serving);
        }
        let (old, now) = (
            self.running.settings.limits.max_connections,
            args.limits.max_connections,
        );
        self.listeners.resize_connections(old, now);
        tracing::info!(listeners = args.listeners.len(), "settings reloaded");
        self.running = new;
        Ok(())
    }
}

/// SIGHUP, when reloading is on (otherwise never).
pub(crate) struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    /// Listens for SIGHUP if `on` (SIGHUP's default, ending the process, is replaced).
    pub fn new(on: bool) -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self(on.then(|| signal(SignalKind::hangup())).and_then(|s| match s {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for SIGHUP; reload by restart only");
                None
            }
        }))
    }

    /// The next SIGHUP.
    pub async fn recv(&mut self) {
        if let Some(s) = &mut self.0 {
            if s.recv().await.is_some() {
                return;
            }
        }
        std::future::pending().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn restart_only_settings_keep_their_running_values() {
        let running = Running {
            settings: ProxySettings::default(),
            log_format: Some(LogFormat::Text),
        };
        let mut new = running.clone();
        new.settings.etcd.prefix = vec!["other".into()];
        new.settings.limits.worker_threads = 4;
        new.settings.limits.max_connections = 7;
        new.log_format = Some(LogFormat::Json);
        let changed = keep_restart_only(&running, &mut new);
        assert_eq!(changed, ["etcd", "limits.worker_threads", "log_format"]);
        assert_eq!(new.settings.etcd.prefix, running.settings.etcd.prefix);
        assert_eq!(new.settings.limits.worker_threads, 1);
        assert_eq!(new.log_format, Some(LogFormat::Text));
        // What can change live does.
        assert_eq!(new.settings.limits.max_connections, 7);
    }
}
