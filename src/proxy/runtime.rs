//! Settings → what the running proxy runs with, in one place, used at start and on every
//! reload: how client connections are served, TLS on the listeners, the routing, what
//! discovery applies to its services (balancing, ejection, active checks), each
//! listener's forwarder, and the backend connections' settings (read at start only).
//!
//! A new setting that changes how the proxy runs is turned into its runtime form here,
//! and nowhere else; whether it can change live is declared beside the setting
//! (`RESTART_ONLY` in its section's file, see [`crate::settings::keep_restart_only`]).

use std::sync::Arc;
use std::time::Duration;

use tokio_rustls::TlsAcceptor;

use super::conn::{ConnLimits, ServerSettings};
use super::forward::{Forwarder, Target};
use super::local::{Local, LocalContext};
use super::routing::{LiveRouting, Routing};
use super::ProxyError;
use crate::balance::{BalanceSettings, HeaderMatch, Steering, Subset, TrafficRules};
use crate::discovery::{Discovery, LiveConfig};
use crate::health::HealthSettings;
use crate::observe::Observer;
use crate::route::ServiceName;
use crate::service_config::LivePolicies;
use crate::settings::traffic::TrafficSection;
use crate::settings::ProxySettings;
use crate::upstream::UpstreamConfig;

/// Interval of HTTP/2 keep-alive pings to clients (finds dead peers).
const CLIENT_KEEPALIVE_INTERVAL: Duration = Duration::from_secs(20);

/// What the settings make of the parts a reload replaces; everything that can fail is
/// built here, before anything running is changed.
pub(crate) struct Built {
    /// TLS on the listeners, if on.
    pub acceptor: Option<TlsAcceptor>,
    /// How new client connections are served.
    pub server: Arc<ServerSettings>,
    /// The routing to put in force.
    pub routing: Routing,
    /// What discovery applies to the services.
    pub live: LiveConfig,
    /// The `--service-config` files, read and checked.
    pub service_configs: Vec<(std::path::PathBuf, crate::service_config::ServiceConfig)>,
}

impl Built {
    /// Builds from `args`; a bad TLS or service config file, or routes that do not fit,
    /// are errors.
    pub(crate) fn new(args: &ProxySettings) -> Result<Self, ProxyError> {
        Ok(Self {
            acceptor: args.tls.server_config()?.map(TlsAcceptor::from),
            server: Arc::new(server_settings(args)),
            routing: Routing::new(args)?,
            live: live_config(args),
            service_configs: crate::service_config::source::load_files(&args.service_config.files)?,
        })
    }
}

/// What discovery applies to its services: prefixes, the service limit, balancing (with
/// each service's own section), ejection and active checks.
pub fn live_config(args: &ProxySettings) -> LiveConfig {
    let b = &args.balance;
    let balance = BalanceSettings {
        policy: b.policy,
        slow_start: (!b.slow_start.is_zero()).then_some(b.slow_start),
        ewma_decay: b.ewma_decay,
        default_rtt: b.ewma_default_rtt,
    };
    let service_balance = b
        .services
        .iter()
        .filter_map(|(name, section)| {
            // Names are checked with the other settings; none is invalid here.
            let name = ServiceName::new(name).ok()?;
            let settings = BalanceSettings {
                policy: section.policy,
                ..balance.clone()
            };
            Some((name, settings))
        })
        .collect();
    let (e, c) = (&args.ejection, &args.health_check);
    let steering = Steering {
        zone: b.zone.as_deref().map(Arc::from),
        zone_key: Arc::from(b.zone_key.as_str()),
        traffic: None,
    };
    let traffic = args
        .traffic
        .iter()
        // Checked with the other settings; none is invalid here.
        .filter_map(|t| {
            Some((
                ServiceName::new(&t.service).ok()?,
                Arc::new(traffic_rules(t)?),
            ))
        })
        .collect();
    LiveConfig {
        prefixes: args.etcd.prefixes(),
        max_services: args.limits.max_services,
        balance,
        service_balance,
        health: HealthSettings {
            eject_after: e.after,
            eject_for: e.duration,
            max_ejected_percent: e.max_percent,
            failure_codes: e.failure_codes,
            check: c.kind,
            check_interval: c.interval,
        },
        steering,
        traffic,
    }
}

/// One `[[traffic]]` section in its runtime form (`None` if a header does not parse,
/// which the settings' checks rule out).
fn traffic_rules(t: &TrafficSection) -> Option<TrafficRules> {
    let matches = t
        .matches
        .iter()
        .map(|m| {
            Some(HeaderMatch {
                header: http::HeaderName::from_bytes(m.header.as_bytes()).ok()?,
                value: http::HeaderValue::from_str(&m.value).ok()?,
                subset: Subset::new(m.subset.clone()),
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(TrafficRules {
        matches,
        splits: t
            .split
            .iter()
            .map(|s| (Subset::new(s.subset.clone()), s.weight))
            .collect(),
        strict: t.strict,
    })
}

/// The backend connections' settings (read at start only).
pub fn upstream_config(args: &ProxySettings) -> Result<UpstreamConfig, ProxyError> {
    Ok(UpstreamConfig {
        connect_timeout: args.timeouts.connect,
        tls: args.upstream_tls.client_config()?,
        max_connections: args.upstream.max_connections,
        idle_timeout: args.upstream.idle_timeout.0,
        ..UpstreamConfig::default()
    })
}

/// How client connections are served: HTTP/2 settings and time limits.
pub(crate) fn server_settings(args: &ProxySettings) -> ServerSettings {
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

/// The forwarder of a listener bound to `service` (or routing by the call's path), with
/// the services the proxy answers itself (health, reflection) unless a bound listener
/// forwards them.
pub(crate) fn forwarder(
    discovery: &Arc<Discovery>,
    service: Option<&ServiceName>,
    args: &ProxySettings,
    local: &Arc<LocalContext>,
    policies: &Arc<LivePolicies>,
    (observer, listener): (Option<Arc<Observer>>, std::net::SocketAddr),
) -> Result<Arc<Forwarder>, ProxyError> {
    let target = match service {
        Some(name) => Target::Bound(discovery.service(name.as_str())?),
        None => Target::ByPath,
    };
    let own = match &target {
        Target::Bound(_) if args.forward_health => None,
        Target::Bound(s) => Some(Local::new(Arc::clone(local), Some(Arc::clone(s)))),
        Target::ByPath => Some(Local::new(Arc::clone(local), None)),
    };
    let routing: Arc<LiveRouting> = Arc::clone(&local.routing);
    let mut forwarder = Forwarder::new(Arc::clone(discovery), target, routing)
        .with_observer(observer, listener)
        .with_policies(Arc::clone(policies));
    if let Some(own) = own {
        forwarder = forwarder.with_local(own);
    }
    Ok(Arc::new(forwarder))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn balancing_sections_become_each_service_s_settings() {
        let mut args = ProxySettings::default();
        args.balance.policy = crate::balance::Policy::PeakEwma;
        args.balance.slow_start = Duration::from_secs(3);
        args.balance.services.insert(
            "pkg.Slow".into(),
            crate::settings::balance::ServiceSection {
                policy: crate::balance::Policy::LeastRequest,
            },
        );
        args.ejection.after = 2;
        let live = live_config(&args);
        assert_eq!(live.balance.policy, crate::balance::Policy::PeakEwma);
        assert_eq!(live.balance.slow_start, Some(Duration::from_secs(3)));
        let slow = &live.service_balance[&ServiceName::new("pkg.Slow").unwrap()];
        assert_eq!(slow.policy, crate::balance::Policy::LeastRequest);
        assert_eq!(slow.slow_start, Some(Duration::from_secs(3)));
        assert_eq!(live.health.eject_after, 2);
        assert_eq!(live.prefixes, args.etcd.prefixes());
    }
}
