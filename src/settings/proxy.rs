//! The proxy's own settings: listeners, timeouts (`[timeouts]`) and limits (`[limits]`),
//! with the sections of the other concerns flattened in.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::balance::{BalanceSection, EjectionSection, HealthCheckSection};
use super::{
    duration, AdminListen, AdminSettings, EtcdSettings, ListenSpec, ListenerTlsSettings,
    LogSection, UpstreamTlsSettings,
};

/// Most threads `--worker-threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// Everything `switchyard proxy` runs with; the file's sections are its fields.
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ProxySettings {
    /// Listener `ADDR[=SERVICE]`, repeatable. A listener bound to a service sends every
    /// call to it; otherwise the service is taken from the call's path.
    #[arg(
        id = "listener",
        long = "listen",
        env = "SWITCHYARD_LISTEN",
        value_name = "ADDR[=SERVICE]",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenSpec>,
    /// On listeners bound to a service, pass `grpc.health.v1.Health` calls to its backends
    /// instead of answering them from the proxy's view of its endpoints.
    #[arg(
        id = "forward_health",
        long = "forward-health",
        env = "SWITCHYARD_FORWARD_HEALTH"
    )]
    pub forward_health: bool,
    /// The admin listener.
    #[command(flatten)]
    pub admin: AdminSettings,
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: EtcdSettings,
    /// Route `GRPC_SERVICE=REGISTERED_NAME`, repeatable (`[[route]]` in the file, with
    /// `grpc_service` and `registered`): calls whose path names GRPC_SERVICE go to the
    /// instances registered as REGISTERED_NAME (e.g. `helloworld.v1.Greeter=helloworld`).
    /// Bound listeners are not routed.
    #[arg(
        id = "route",
        long = "route",
        env = "SWITCHYARD_ROUTE",
        value_name = "GRPC_SERVICE=REGISTERED_NAME",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub route: Vec<crate::route::RouteSpec>,
    /// Timeouts.
    #[command(flatten)]
    pub timeouts: TimeoutSettings,
    /// Limits.
    #[command(flatten)]
    pub limits: LimitSettings,
    /// TLS on the listeners.
    #[command(flatten)]
    pub tls: ListenerTlsSettings,
    /// TLS to the backends.
    #[command(flatten)]
    pub upstream_tls: UpstreamTlsSettings,
    /// Backend connections.
    #[command(flatten)]
    pub upstream: super::UpstreamSettings,
    /// How calls are balanced.
    #[command(flatten)]
    pub balance: BalanceSection,
    /// Passive outlier ejection.
    #[command(flatten)]
    pub ejection: EjectionSection,
    /// Active health checks.
    #[command(flatten)]
    pub health_check: HealthCheckSection,
    /// Which log lines are written.
    #[command(flatten)]
    pub log: LogSection,
    /// The access log and tracing.
    #[command(flatten)]
    pub observe: super::observe::ObserveSection,
    /// gRPC service configs: timeouts, retries, hedging.
    #[command(flatten)]
    #[serde(default)]
    pub service_config: super::service_config::ServiceConfigSection,
    /// Traffic rules per registered service (`[[traffic]]`, config file only).
    #[arg(skip)]
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub traffic: Vec<super::traffic::TrafficSection>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        super::defaults()
    }
}

impl ProxySettings {
    /// Built-in defaults with these listeners and etcd, and no admin listener (for
    /// embedding the proxy: tests and tools).
    pub fn new(listeners: Vec<ListenSpec>, etcd: EtcdSettings) -> Self {
        Self {
            listeners,
            etcd,
            admin: AdminSettings {
                listen: AdminListen(None),
            },
            ..Self::default()
        }
    }
}

impl TimeoutSettings {
    /// Read at start only: backend connections and the service table take them once.
    pub const RESTART_ONLY: &'static [&'static str] =
        &["timeouts.connect", "timeouts.service_idle"];
}

/// Timeouts of the proxy (`[timeouts]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct TimeoutSettings {
    /// Time allowed to connect (TCP + HTTP/2 handshake) to a backend.
    #[arg(
        id = "timeouts.connect",
        long = "connect-timeout",
        env = "SWITCHYARD_CONNECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "1s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub connect: Duration,
    /// How long a call for a newly seen service waits for its first endpoint list.
    #[arg(
        id = "timeouts.discovery",
        long = "discovery-timeout",
        env = "SWITCHYARD_DISCOVERY_TIMEOUT",
        value_name = "DURATION",
        default_value = "3s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub discovery: Duration,
    /// A client connection with no open stream for this long is closed.
    #[arg(
        id = "timeouts.idle",
        long = "idle-timeout",
        env = "SWITCHYARD_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "5m",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub idle: Duration,
    /// A watched service with no endpoints and no calls for this long is dropped from the
    /// service table (its watch stopped until its next call); when the table is full, a
    /// service with endpoints and no calls for this long may make room for another.
    #[arg(
        id = "timeouts.service_idle",
        long = "service-idle-timeout",
        env = "SWITCHYARD_SERVICE_IDLE_TIMEOUT",
        value_name = "DURATION",
        default_value = "60s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub service_idle: Duration,
    /// A client connection that sends no request within this time is closed.
    #[arg(
        id = "timeouts.first_request",
        long = "first-request-timeout",
        env = "SWITCHYARD_FIRST_REQUEST_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub first_request: Duration,
    /// On SIGTERM, how long in-flight calls may run before the proxy exits.
    #[arg(
        id = "timeouts.drain",
        long = "drain-timeout",
        env = "SWITCHYARD_DRAIN_TIMEOUT",
        value_name = "DURATION",
        default_value = "10s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub drain: Duration,
}

impl LimitSettings {
    /// Read at start only: the runtime is built once.
    pub const RESTART_ONLY: &'static [&'static str] = &["limits.worker_threads"];
}

/// Limits of the proxy (`[limits]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LimitSettings {
    /// Maximum number of services watched at once (calls for further services fail).
    #[arg(
        id = "limits.max_services",
        long = "max-services",
        env = "SWITCHYARD_MAX_SERVICES",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_services: usize,
    /// Maximum concurrent streams a client may open on one connection.
    #[arg(
        id = "limits.max_concurrent_streams",
        long = "max-concurrent-streams",
        env = "SWITCHYARD_MAX_CONCURRENT_STREAMS",
        value_name = "N",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,
    /// Maximum size of a request's header list, in bytes.
    #[arg(
        id = "limits.max_header_list_size",
        long = "max-header-list-size",
        env = "SWITCHYARD_MAX_HEADER_LIST_SIZE",
        value_name = "BYTES",
        default_value_t = 16 * 1024
    )]
    pub max_header_list_size: u32,
    /// Maximum number of client connections at once (further ones wait in the backlog).
    #[arg(
        id = "limits.max_connections",
        long = "max-connections",
        env = "SWITCHYARD_MAX_CONNECTIONS",
        value_name = "N",
        default_value_t = 10_000
    )]
    pub max_connections: usize,
    /// Threads serving calls (1 costs the least CPU per call; raise it when one core is
    /// not enough for the host's traffic).
    #[arg(
        id = "limits.worker_threads",
        long = "worker-threads",
        env = "SWITCHYARD_WORKER_THREADS",
        value_name = "N",
        default_value_t = 1
    )]
    pub worker_threads: usize,
}
