//! Command-line flags (each also settable by an environment variable `SWITCHYARD_<FLAG>`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use crate::route::{ServiceName, ServiceNameError};

/// Flags that say where etcd is and where services live in it.
#[derive(clap::Args, Debug, Clone)]
pub struct EtcdArgs {
    /// etcd endpoints, comma-separated.
    #[arg(
        long,
        env = "SWITCHYARD_ETCD_ENDPOINTS",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub etcd_endpoints: Vec<String>,
    /// Key prefix under which services register (`<prefix>/<service>/<addr>`).
    #[arg(long, env = "SWITCHYARD_PREFIX", default_value = "services")]
    pub prefix: String,
    /// Time allowed to open a connection to an etcd endpoint.
    #[arg(long, env = "SWITCHYARD_ETCD_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub etcd_connect_timeout: Duration,
    /// etcd user name (auth enabled clusters).
    #[arg(long, env = "SWITCHYARD_ETCD_USER", requires = "etcd_password")]
    pub etcd_user: Option<String>,
    /// etcd password.
    #[arg(
        long,
        env = "SWITCHYARD_ETCD_PASSWORD",
        requires = "etcd_user",
        hide_env_values = true
    )]
    pub etcd_password: Option<String>,
    /// PEM CA bundle for etcd's server certificates (enables TLS to etcd; use https:// endpoints).
    #[arg(long, env = "SWITCHYARD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (mTLS; needs --etcd-key).
    #[arg(long, env = "SWITCHYARD_ETCD_CERT", requires = "etcd_key")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key for --etcd-cert.
    #[arg(long, env = "SWITCHYARD_ETCD_KEY", requires = "etcd_cert")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Settings for a local etcd at `endpoint` with the default prefix (for tests and tools).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self {
            etcd_endpoints: vec![endpoint.into()],
            prefix: "services".into(),
            etcd_connect_timeout: Duration::from_secs(2),
            etcd_user: None,
            etcd_password: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

/// `ADDR[=SERVICE]`: a listener address, optionally bound to one service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenSpec {
    /// Where to listen.
    pub addr: SocketAddr,
    /// If set, every call on this listener goes to this service.
    pub service: Option<ServiceName>,
}

/// Why a `--listen` value is malformed.
#[derive(Debug, thiserror::Error)]
pub enum ListenSpecError {
    /// The address part is not `ip:port`.
    #[error("--listen {0:?}: address is not ip:port")]
    Addr(String),
    /// The service part is not a valid service name.
    #[error("--listen {0:?}: {1}")]
    Service(String, ServiceNameError),
}

impl FromStr for ListenSpec {
    type Err = ListenSpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (addr, service) = match s.split_once('=') {
            Some((a, svc)) => (a, Some(svc)),
            None => (s, None),
        };
        let addr = addr
            .trim()
            .parse()
            .map_err(|_| ListenSpecError::Addr(s.to_owned()))?;
        let service = service
            .map(|svc| ServiceName::new(svc.trim()))
            .transpose()
            .map_err(|e| ListenSpecError::Service(s.to_owned(), e))?;
        Ok(Self { addr, service })
    }
}

/// Parses a duration such as `250ms`, `10s`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration (e.g. 500ms, 10s, 2m)"))?;
    let secs = match unit {
        "" | "s" => n,
        "ms" => n / 1000.0,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (use ms, s, m or h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("{s:?}: {e}"))
}

/// `--admin-listen`: an `ip:port`, or `off` to disable the admin listener.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AdminListen(pub Option<SocketAddr>);

impl FromStr for AdminListen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            "off" | "none" | "" => Ok(Self(None)),
            a => a
                .parse()
                .map(|a| Self(Some(a)))
                .map_err(|_| format!("{a:?} is not ip:port (or off)")),
        }
    }
}

/// Flags of `switchyard proxy`.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyArgs {
    /// Listener `ADDR[=SERVICE]`, repeatable. A listener bound to a service sends every
    /// call to it; otherwise the service is taken from the call's path.
    #[arg(
        long,
        env = "SWITCHYARD_LISTEN",
        value_delimiter = ',',
        default_value = "127.0.0.1:7070"
    )]
    pub listen: Vec<ListenSpec>,
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: EtcdArgs,
    /// Time allowed to connect (TCP + HTTP/2 handshake) to a backend.
    #[arg(long, env = "SWITCHYARD_CONNECT_TIMEOUT", default_value = "1s", value_parser = parse_duration)]
    pub connect_timeout: Duration,
    /// How long a call for a newly seen service waits for its first endpoint list.
    #[arg(long, env = "SWITCHYARD_DISCOVERY_TIMEOUT", default_value = "3s", value_parser = parse_duration)]
    pub discovery_timeout: Duration,
    /// Maximum number of services watched at once (calls for further services fail).
    #[arg(long, env = "SWITCHYARD_MAX_SERVICES", default_value_t = 1024)]
    pub max_services: usize,
    /// Maximum concurrent streams a client may open on one connection.
    #[arg(
        long,
        env = "SWITCHYARD_MAX_CONCURRENT_STREAMS",
        default_value_t = 1024
    )]
    pub max_concurrent_streams: u32,
    /// Maximum size of a request's header list, in bytes.
    #[arg(long, env = "SWITCHYARD_MAX_HEADER_LIST_SIZE", default_value_t = 16 * 1024)]
    pub max_header_list_size: u32,
    /// Admin listener (`/metrics`, `/endpoints`, `/healthz`, `/readyz`); `off` disables it.
    #[arg(
        long,
        env = "SWITCHYARD_ADMIN_LISTEN",
        default_value = "127.0.0.1:7071"
    )]
    pub admin_listen: AdminListen,
    /// TLS on the listeners and to backends.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Maximum number of client connections at once (further ones wait in the backlog).
    #[arg(long, env = "SWITCHYARD_MAX_CONNECTIONS", default_value_t = 10_000)]
    pub max_connections: usize,
    /// A client connection with no open stream for this long is closed.
    #[arg(long, env = "SWITCHYARD_IDLE_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// A client connection that sends no request within this time is closed.
    #[arg(long, env = "SWITCHYARD_FIRST_REQUEST_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub first_request_timeout: Duration,
    /// On SIGTERM, how long in-flight calls may run before the proxy exits.
    #[arg(long, env = "SWITCHYARD_DRAIN_TIMEOUT", default_value = "10s", value_parser = parse_duration)]
    pub drain_timeout: Duration,
}

impl ProxyArgs {
    /// Defaults for a proxy on `listen` against the etcd at `etcd` (for tests and tools).
    pub fn new(listen: Vec<ListenSpec>, etcd: EtcdArgs) -> Self {
        Self {
            listen,
            etcd,
            connect_timeout: Duration::from_secs(1),
            discovery_timeout: Duration::from_secs(3),
            max_services: 1024,
            max_concurrent_streams: 1024,
            max_header_list_size: 16 * 1024,
            drain_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            first_request_timeout: Duration::from_secs(10),
            admin_listen: AdminListen(None),
            tls: crate::tls::TlsArgs::default(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_specs_parse() {
        let l: ListenSpec = "127.0.0.1:7001=a".parse().unwrap();
        assert_eq!(l.addr, "127.0.0.1:7001".parse().unwrap());
        assert_eq!(l.service.unwrap().as_str(), "a");
        let l: ListenSpec = "[::1]:7070".parse().unwrap();
        assert!(l.service.is_none());
        assert!("nohost=a".parse::<ListenSpec>().is_err());
        assert!("127.0.0.1:1=a/b".parse::<ListenSpec>().is_err());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("10s"), Ok(Duration::from_secs(10)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        assert!(parse_duration("10x").is_err());
        assert!(parse_duration("").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
