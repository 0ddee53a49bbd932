//! Reload on SIGHUP: the settings are read again (the config file as it is now; flags and
//! environment as at start) and applied to the running proxy without cutting a call.
//!
//! Applied live:
//! - listeners added, removed, or bound to another service (a listener bound to another
//!   service tells its open connections to go away: GOAWAY, their calls finish, the
//!   clients reconnect); TLS on the listeners; `limits.max_connections`,
//!   `limits.max_concurrent_streams`, `limits.max_header_list_size`; the `idle`,
//!   `first_request` and `drain` timeouts. New connections get the new settings, open
//!   ones keep theirs.
//! - routes, the prefixes reflection lists and the `discovery` timeout: for every call from
//!   the reload on, on open connections too, and in the proxy's own health and reflection
//!   answers ([`super::routing::LiveRouting`]).
//! - `etcd.prefix`: each watched service starts a watch under the new prefixes and serves
//!   its current endpoints until that watch has listed them all, then swaps
//!   ([`Discovery::reconfigure`]).
//! - `[balance]`, `[ejection]`, `[health_check]`: swapped in every service (read without a
//!   lock per call); endpoints keep their calls in flight, latency and ejections; active
//!   checks are started, stopped or re-timed.
//! - `limits.max_services`: a lower limit drops no service in use, it refuses new ones
//!   while the table is over it.
//! - `log.level`, through the binary's [`LogControl`] (`tracing_subscriber::reload`).
//! - The access log's file is reopened (for logrotate); the `[observe]` settings
//!   themselves are read at start only.
//!
//! Settings read at start only are declared so beside their fields (`RESTART_ONLY`, see
//! [`crate::settings::restart_only_keys`]): a change to them is logged, by file key, as
//! needing a restart, and the running values stay. A file with an error is
//! refused with the error (file, line, key) in the log; the running settings stay. Each
//! reload counts in `switchyard_config_reloads_total{result}`.

use std::sync::Arc;

use super::listeners::{Listeners, Serving};
use super::runtime::{forwarder, Built};
use super::sockets::Sockets;
use crate::discovery::Discovery;
use crate::metrics::Metrics;
use crate::settings::{ConfigError, Loaded, LogFormat, LogLevel, ProxySettings};

/// Reads the settings again: flags and environment as at start, the config file as it
/// is now (`settings::load` with the start's command line).
pub type Reload = Box<dyn FnMut() -> Result<Loaded, ConfigError> + Send>;

/// Puts a new log filter in force (the binary's `tracing_subscriber::reload` handle);
/// the error says why not.
pub type LogControl = Arc<dyn Fn(&LogLevel) -> Result<(), String> + Send + Sync>;

/// The settings the proxy runs with.
#[derive(Clone)]
pub struct Running {
    /// The proxy's settings.
    pub settings: ProxySettings,
    /// The log format the process started with (changing it needs a restart), if known.
    pub log_format: Option<LogFormat>,
    /// Applies `log.level` on reload; without it (an embedded proxy, whose embedder
    /// owns logging) a change of `log.level` is named as needing a restart.
    pub log_control: Option<LogControl>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running")
            .field("settings", &self.settings)
            .field("log_format", &self.log_format)
            .field("log_control", &self.log_control.is_some())
            .finish()
    }
}

impl Running {
    /// Settings without a known log format (an embedded proxy).
    pub fn new(settings: ProxySettings) -> Self {
        Self {
            settings,
            log_format: None,
            log_control: None,
        }
    }

    /// The same, with `log.level` applied on reload by `control`.
    pub fn with_log_control(mut self, control: LogControl) -> Self {
        self.log_control = Some(control);
        self
    }
}

impl From<Loaded> for Running {
    fn from(l: Loaded) -> Self {
        Self {
            settings: l.proxy,
            log_format: Some(l.log_format),
            log_control: None,
        }
    }
}

/// Keeps the running values of the settings read only at start in `new` (each section
/// declares its own: [`crate::settings::restart_only_keys`]); returns those that differed
/// (their file keys). The log's format, and its level where the proxy does not own
/// logging, are the process's, not the proxy settings'.
fn keep_restart_only(
    running: &Running,
    new: &mut Running,
) -> Result<Vec<&'static str>, ConfigError> {
    let mut changed = crate::settings::keep_restart_only(&running.settings, &mut new.settings)?;
    if running.log_format.is_some() && running.log_format != new.log_format {
        changed.push("log_format");
    }
    new.log_format = running.log_format;
    if running.log_control.is_none() && running.settings.log != new.settings.log {
        changed.push("log.level");
        new.settings.log = running.settings.log.clone();
    }
    Ok(changed)
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
    /// The access log and tracer, if either is on.
    pub observer: Option<Arc<crate::observe::Observer>>,
    /// The service configs in force (the files' are replaced on reload).
    pub policies: Arc<crate::service_config::LivePolicies>,
}

impl Live {
    /// Reads the settings again and applies them, or logs why not.
    pub(crate) async fn reload(&mut self, read: &mut Reload) {
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
        new.log_control = self.running.log_control.clone();
        let restart = keep_restart_only(&self.running, &mut new)?;
        if !restart.is_empty() {
            tracing::warn!(
                settings = restart.join(", "),
                "changed in the settings but read at start only: restart to apply; the running values stay"
            );
        }
        let args = &new.settings;
        let built = Built::new(args)?;
        let mut starting = Vec::new();
        let mut updating = Vec::new();
        for spec in &args.listeners {
            let serving = Serving {
                forwarder: forwarder(
                    &self.discovery,
                    spec.service.as_ref(),
                    args,
                    &self.local,
                    &self.policies,
                    (self.observer.clone(), spec.addr),
                )?,
                settings: Arc::clone(&built.server),
                acceptor: built.acceptor.clone(),
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
        // Open connections, health and reflection follow the new routes from here on.
        self.local.routing.store(built.routing);
        self.policies.set_files(built.service_configs);
        let mut live = self.discovery.reconfigure(built.live);
        if args.log != self.running.settings.log {
            if let Some(control) = &new.log_control {
                match control(&args.log.level) {
                    Ok(()) => live.push("log.level"),
                    Err(error) => {
                        tracing::warn!(%error, level = %args.log.level, "cannot change the log level; the running one stays")
                    }
                }
            }
        }
        tracing::info!(
            listeners = args.listeners.len(),
            changed = live.join(", "),
            "settings reloaded"
        );
        if let Some(o) = &self.observer {
            o.reopen();
        }
        self.running = new;
        Ok(())
    }
}

/// SIGHUP, when reloading is on (otherwise never).
pub(crate) struct Hangups(Option<tokio::signal::unix::Signal>);

impl Hangups {
    /// Listens for SIGHUP if `on` (SIGHUP's default, ending the process, is replaced).
    pub(crate) fn new(on: bool) -> Self {
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
    pub(crate) async fn recv(&mut self) {
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
            log_control: Some(Arc::new(|_: &LogLevel| Ok(()))),
        };
        let mut new = running.clone();
        let n = &mut new.settings;
        n.etcd.prefix = vec!["other".into()];
        n.etcd.endpoints = vec!["http://127.0.0.1:1".into()];
        n.limits.worker_threads = 4;
        n.limits.max_connections = 7;
        n.limits.max_services = 3;
        n.balance.policy = crate::balance::Policy::LeastRequest;
        n.ejection.after = 2;
        n.health_check.kind = crate::health::ActiveCheck::Grpc;
        n.log.level = "debug".parse().unwrap();
        new.log_format = Some(LogFormat::Json);
        let changed = keep_restart_only(&running, &mut new).unwrap();
        assert_eq!(
            changed,
            ["etcd.endpoints", "limits.worker_threads", "log_format"]
        );
        let (r, n) = (&running.settings, &new.settings);
        assert_eq!(n.etcd.endpoints, r.etcd.endpoints);
        assert_eq!(n.limits.worker_threads, 1);
        assert_eq!(new.log_format, Some(LogFormat::Text));
        // What can change live does.
        assert_eq!(n.etcd.prefix, ["other"]);
        assert_eq!(n.limits.max_connections, 7);
        assert_eq!(n.limits.max_services, 3);
        assert_eq!(n.balance.policy, crate::balance::Policy::LeastRequest);
        assert_eq!(n.ejection.after, 2);
        assert_eq!(n.health_check.kind, crate::health::ActiveCheck::Grpc);
        assert_eq!(n.log.level.as_str(), "debug");
        let live = super::super::runtime::live_config(n);
        assert_eq!(
            (live.prefixes, live.max_services, live.health.eject_after),
            (vec!["other".to_owned()], 3, 2)
        );
    }

    #[test]
    fn the_log_level_needs_a_restart_where_the_proxy_does_not_own_logging() {
        let running = Running::new(ProxySettings::default());
        let mut new = running.clone();
        new.settings.log.level = "warn,switchyard=debug".parse().unwrap();
        assert_eq!(
            keep_restart_only(&running, &mut new).unwrap(),
            ["log.level"]
        );
        assert_eq!(new.settings.log.level.as_str(), "info");
    }

    #[test]
    fn the_observe_settings_need_a_restart() {
        let running = Running::new(ProxySettings::default());
        let mut new = running.clone();
        new.settings.observe.access_log =
            crate::settings::observe::AccessLogTarget::File("/tmp/a.log".into());
        new.settings.observe.trace_sample_rate = 0.5;
        assert_eq!(keep_restart_only(&running, &mut new).unwrap(), ["observe"]);
        assert_eq!(new.settings.observe, running.settings.observe);
    }
}
