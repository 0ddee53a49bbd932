//! The proxy's settings: command-line flags, their environment variables
//! (`SWITCHYARD_<FLAG>`) and the optional TOML config file (`--config FILE`).
//!
//! Precedence is flag > environment > file > built-in default: [`load`] takes the flags
//! clap parsed, and lets the file fill in every setting whose value is clap's default
//! (found with [`ArgMatches::value_source`]). Errors in the file name the file, the line
//! and the field; unknown fields are errors. [`check`] is `switchyard check-config`.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use clap::parser::ValueSource;
use clap::{ArgMatches, Args, FromArgMatches};
use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::route::{RouteSpec, Routes, ServiceName, ServiceNameError};

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
    /// Key prefix under which services register (`<prefix>/<service>/...`), kept as
    /// written (empty for go-zero, `/microservices` for Kratos); repeatable: a service's
    /// endpoints are those under any of them. Default: `services` (for `register`: the
    /// --format's own).
    #[arg(long, env = "SWITCHYARD_PREFIX", value_name = "PREFIX")]
    pub prefix: Vec<String>,
    /// Time allowed to open a connection to an etcd endpoint.
    #[arg(long, env = "SWITCHYARD_ETCD_CONNECT_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub etcd_connect_timeout: Duration,
    /// etcd user name (auth enabled clusters).
    #[arg(long, env = "SWITCHYARD_ETCD_USER")]
    pub etcd_user: Option<String>,
    /// etcd password (prefer the environment variable to the flag or the file).
    #[arg(long, env = "SWITCHYARD_ETCD_PASSWORD", hide_env_values = true)]
    pub etcd_password: Option<String>,
    /// PEM CA bundle for etcd's server certificates (enables TLS to etcd; use https:// endpoints).
    #[arg(long, env = "SWITCHYARD_ETCD_CA")]
    pub etcd_ca: Option<PathBuf>,
    /// PEM client certificate for etcd (mTLS; needs --etcd-key).
    #[arg(long, env = "SWITCHYARD_ETCD_CERT")]
    pub etcd_cert: Option<PathBuf>,
    /// PEM private key for --etcd-cert.
    #[arg(long, env = "SWITCHYARD_ETCD_KEY")]
    pub etcd_key: Option<PathBuf>,
}

impl EtcdArgs {
    /// Settings for a local etcd at `endpoint` with the default prefix (for tests and tools).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self {
            etcd_endpoints: vec![endpoint.into()],
            prefix: Vec::new(),
            etcd_connect_timeout: Duration::from_secs(2),
            etcd_user: None,
            etcd_password: None,
            etcd_ca: None,
            etcd_cert: None,
            etcd_key: None,
        }
    }
}

/// The key prefix used when none is given.
pub const DEFAULT_PREFIX: &str = "services";

impl EtcdArgs {
    /// The key prefixes given, or the default one.
    pub fn prefixes(&self) -> Vec<String> {
        if self.prefix.is_empty() {
            vec![DEFAULT_PREFIX.to_owned()]
        } else {
            self.prefix.clone()
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
    /// TOML config file; flags and environment variables override what it sets.
    #[arg(long, env = "SWITCHYARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
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
    /// Route `GRPC_SERVICE=REGISTERED_NAME`, repeatable: calls whose path names
    /// GRPC_SERVICE go to the instances registered as REGISTERED_NAME (e.g.
    /// `helloworld.v1.Greeter=helloworld`). Bound listeners are not routed.
    #[arg(
        long,
        env = "SWITCHYARD_ROUTE",
        value_delimiter = ',',
        value_name = "GRPC_SERVICE=REGISTERED_NAME"
    )]
    pub route: Vec<RouteSpec>,
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
    /// Threads serving calls (1 costs the least CPU per call; raise it when one core is
    /// not enough for the host's traffic).
    #[arg(long, env = "SWITCHYARD_WORKER_THREADS", default_value_t = 1)]
    pub worker_threads: usize,
}

impl ProxyArgs {
    /// Defaults for a proxy on `listen` against the etcd at `etcd` (for tests and tools).
    pub fn new(listen: Vec<ListenSpec>, etcd: EtcdArgs) -> Self {
        Self {
            config: None,
            listen,
            etcd,
            route: Vec::new(),
            connect_timeout: Duration::from_secs(1),
            discovery_timeout: Duration::from_secs(3),
            max_services: 1024,
            max_concurrent_streams: 1024,
            max_header_list_size: 16 * 1024,
            drain_timeout: Duration::from_secs(10),
            max_connections: 10_000,
            idle_timeout: Duration::from_secs(300),
            first_request_timeout: Duration::from_secs(10),
            worker_threads: 1,
            admin_listen: AdminListen(None),
            tls: crate::tls::TlsArgs::default(),
        }
    }
}

/// Format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields flattened), for log collectors.
    Json,
}

/// Logging flags (global: accepted by every subcommand).
#[derive(clap::Args, Debug, Clone)]
pub struct LogArgs {
    /// Log line format; which lines are logged is set by `RUST_LOG` (default `info`).
    #[arg(
        long,
        global = true,
        env = "SWITCHYARD_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

/// Each setting: its clap id (the field name, also the flag `--id-with-dashes`) and its
/// key in the config file. Every flag of `switchyard proxy` but `--config` is here.
const FILE_KEYS: &[(&str, &str)] = &[
    ("log_format", "log_format"),
    ("listen", "listener"),
    ("admin_listen", "admin.listen"),
    ("etcd_endpoints", "etcd.endpoints"),
    ("prefix", "etcd.prefix"),
    ("route", "route"),
    ("etcd_connect_timeout", "etcd.connect_timeout"),
    ("etcd_user", "etcd.user"),
    ("etcd_password", "etcd.password"),
    ("etcd_ca", "etcd.ca"),
    ("etcd_cert", "etcd.cert"),
    ("etcd_key", "etcd.key"),
    ("connect_timeout", "timeouts.connect"),
    ("discovery_timeout", "timeouts.discovery"),
    ("idle_timeout", "timeouts.idle"),
    ("first_request_timeout", "timeouts.first_request"),
    ("drain_timeout", "timeouts.drain"),
    ("max_services", "limits.max_services"),
    ("max_concurrent_streams", "limits.max_concurrent_streams"),
    ("max_header_list_size", "limits.max_header_list_size"),
    ("max_connections", "limits.max_connections"),
    ("worker_threads", "limits.worker_threads"),
    ("tls_cert", "tls.cert"),
    ("tls_key", "tls.key"),
    ("upstream_tls", "upstream_tls.enabled"),
    ("upstream_ca", "upstream_tls.ca"),
    ("upstream_cert", "upstream_tls.cert"),
    ("upstream_key", "upstream_tls.key"),
    ("upstream_sni", "upstream_tls.sni"),
];

/// Most threads `--worker-threads` may ask for.
pub const MAX_WORKER_THREADS: usize = 1024;

/// The config file key of the setting with clap id `id`.
pub fn file_key(id: &str) -> Option<&'static str> {
    FILE_KEYS.iter().find(|(i, _)| *i == id).map(|(_, k)| *k)
}

/// The contents of a config file (`switchyard.toml`). Every field is optional; relative
/// paths are relative to the file's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    /// `--log-format`.
    pub log_format: Option<LogFormat>,
    /// `--listen`, one `[[listener]]` table each.
    pub listener: Option<Vec<FileListener>>,
    /// `--route`, one `[[route]]` table each (`grpc_service`, `registered`).
    pub route: Option<Vec<RouteSpec>>,
    /// The admin listener.
    #[serde(default)]
    pub admin: FileAdmin,
    /// Where etcd is and how to reach it.
    #[serde(default)]
    pub etcd: FileEtcd,
    /// Timeouts of the proxy.
    #[serde(default)]
    pub timeouts: FileTimeouts,
    /// Limits of the proxy.
    #[serde(default)]
    pub limits: FileLimits,
    /// TLS on the listeners.
    #[serde(default)]
    pub tls: FileTls,
    /// TLS to the backends.
    #[serde(default)]
    pub upstream_tls: FileUpstreamTls,
}

/// `[[listener]]`: one listener.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileListener {
    /// `ip:port` to listen on.
    #[serde(deserialize_with = "de_parse")]
    pub addr: SocketAddr,
    /// If set, every call on this listener goes to this service.
    #[serde(default, deserialize_with = "de_parse_opt")]
    pub service: Option<ServiceName>,
}

/// `[admin]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileAdmin {
    /// `--admin-listen`: `ip:port` or `off`.
    #[serde(default, deserialize_with = "de_parse_opt")]
    pub listen: Option<AdminListen>,
}

/// `[etcd]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileEtcd {
    /// `--etcd-endpoints`.
    pub endpoints: Option<Vec<String>>,
    /// `--prefix`: one prefix, or a list of them.
    #[serde(default, deserialize_with = "de_one_or_many")]
    pub prefix: Option<Vec<String>>,
    /// `--etcd-connect-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub connect_timeout: Option<Duration>,
    /// `--etcd-user`.
    pub user: Option<String>,
    /// `--etcd-password` (better in the environment: `SWITCHYARD_ETCD_PASSWORD`).
    pub password: Option<String>,
    /// `--etcd-ca`.
    pub ca: Option<PathBuf>,
    /// `--etcd-cert`.
    pub cert: Option<PathBuf>,
    /// `--etcd-key`.
    pub key: Option<PathBuf>,
}

/// `[timeouts]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTimeouts {
    /// `--connect-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub connect: Option<Duration>,
    /// `--discovery-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub discovery: Option<Duration>,
    /// `--idle-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub idle: Option<Duration>,
    /// `--first-request-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub first_request: Option<Duration>,
    /// `--drain-timeout`.
    #[serde(default, deserialize_with = "de_duration")]
    pub drain: Option<Duration>,
}

/// `[limits]`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileLimits {
    /// `--max-services`.
    pub max_services: Option<usize>,
    /// `--max-concurrent-streams`.
    pub max_concurrent_streams: Option<u32>,
    /// `--max-header-list-size`.
    pub max_header_list_size: Option<u32>,
    /// `--max-connections`.
    pub max_connections: Option<usize>,
    /// `--worker-threads`.
    pub worker_threads: Option<usize>,
}

/// `[tls]`: TLS on the listeners.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileTls {
    /// `--tls-cert`.
    pub cert: Option<PathBuf>,
    /// `--tls-key`.
    pub key: Option<PathBuf>,
}

/// `[upstream_tls]`: TLS to the backends.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileUpstreamTls {
    /// `--upstream-tls`.
    pub enabled: Option<bool>,
    /// `--upstream-ca`.
    pub ca: Option<PathBuf>,
    /// `--upstream-cert`.
    pub cert: Option<PathBuf>,
    /// `--upstream-key`.
    pub key: Option<PathBuf>,
    /// `--upstream-sni`.
    pub sni: Option<String>,
}

/// A string, or a list of strings.
fn de_one_or_many<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Vec<String>>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(Some(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    }))
}

fn de_parse<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| de::Error::custom(format!("{s:?}: {e}")))
}

fn de_parse_opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: FromStr,
    T::Err: fmt::Display,
{
    de_parse(d).map(Some)
}

fn de_duration<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
    struct DurationVisitor;
    impl Visitor<'_> for DurationVisitor {
        type Value = Duration;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a duration such as \"500ms\", \"10s\" or \"2m\" (or whole seconds)")
        }
        fn visit_str<E: de::Error>(self, s: &str) -> Result<Duration, E> {
            parse_duration(s).map_err(E::custom)
        }
        fn visit_u64<E: de::Error>(self, n: u64) -> Result<Duration, E> {
            Ok(Duration::from_secs(n))
        }
        fn visit_i64<E: de::Error>(self, n: i64) -> Result<Duration, E> {
            u64::try_from(n)
                .map(Duration::from_secs)
                .map_err(|_| E::custom(format!("{n}: a duration cannot be negative")))
        }
    }
    d.deserialize_any(DurationVisitor).map(Some)
}

/// Where in a config file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// A bad setting: where it is (in the file, when it came from there), which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where the setting is in the config file, if it came from there.
    pub location: Option<Location>,
    /// The setting: its file key (`etcd.prefix`) or its flag (`--prefix`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) if self.field.is_empty() => write!(f, "{l}: {}", self.message),
            Some(l) => write!(f, "{l}: field `{}`: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A setting is malformed or inconsistent.
    #[error("{0}")]
    Field(FieldError),
    /// The flags or environment variables are malformed.
    #[error(transparent)]
    Args(#[from] clap::Error),
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Where the key `dotted` (e.g. `etcd.prefix`) is defined in `text`.
fn key_offset(text: &str, dotted: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    for seg in dotted.split('.') {
        let (k, v) = table.iter().find(|(k, _)| k.get_ref().as_ref() == seg)?;
        found = Some(k.span().start);
        match v.get_ref().as_table() {
            Some(t) => table = t,
            None => break,
        }
    }
    found
}

/// A config file as read, and which settings were taken from it.
#[derive(Debug, Clone)]
struct FileSource {
    path: PathBuf,
    text: String,
    taken: Vec<&'static str>,
}

impl FileSource {
    fn location_of(&self, offset: usize) -> Location {
        let (line, column) = line_col(&self.text, offset);
        Location {
            path: self.path.clone(),
            line,
            column,
        }
    }
}

/// The flag and environment variable of the setting with clap id `id`.
fn flag_name(id: &str) -> String {
    format!(
        "--{} (${})",
        id.replace('_', "-"),
        format!("SWITCHYARD_{id}").to_uppercase()
    )
}

/// The proxy's settings after merging flags, environment and config file.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The proxy's settings.
    pub proxy: ProxyArgs,
    /// The log line format.
    pub log_format: LogFormat,
    file: Option<FileSource>,
}

impl Settings {
    /// An error about the setting with clap id `id`, located in the file if it came from there.
    fn field_error(&self, id: &str, message: String) -> ConfigError {
        let from_file = self
            .file
            .as_ref()
            .filter(|f| f.taken.contains(&id))
            .zip(file_key(id));
        ConfigError::Field(match from_file {
            Some((file, key)) => FieldError {
                location: Some(match key_offset(&file.text, key) {
                    Some(off) => file.location_of(off),
                    None => file.location_of(0),
                }),
                field: key.to_owned(),
                message,
            },
            None => FieldError {
                location: None,
                field: flag_name(id),
                message,
            },
        })
    }

    /// How the setting with clap id `id` is named where it came from.
    fn describe(&self, id: &str) -> String {
        match self.file.as_ref().zip(file_key(id)) {
            Some((f, key)) if f.taken.contains(&id) => format!("`{key}`"),
            Some((_, key)) => format!("`{key}` or {}", flag_name(id)),
            None => flag_name(id),
        }
    }

    /// The config file the settings were read from, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// The settings taken from the config file (by clap id).
    pub fn from_file(&self) -> &[&'static str] {
        self.file.as_ref().map_or(&[], |f| f.taken.as_slice())
    }
}

/// Parses a config file's text; errors carry the file, line, column and field.
pub fn parse_file(path: &Path, text: &str) -> Result<FileConfig, ConfigError> {
    let src = FileSource {
        path: path.to_owned(),
        text: text.to_owned(),
        taken: Vec::new(),
    };
    let located = |span: Option<std::ops::Range<usize>>, field: String, message: &str| {
        ConfigError::Field(FieldError {
            location: Some(src.location_of(span.map_or(0, |s| s.start))),
            field,
            message: message.to_owned(),
        })
    };
    let de = toml::de::Deserializer::parse(text)
        .map_err(|e| located(e.span(), String::new(), e.message()))?;
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = e.path().to_string();
        let field = if field == "." { String::new() } else { field };
        located(e.inner().span(), field, e.inner().message())
    })
}

/// True if the setting with clap id `id` was not given by flag or environment.
fn unset(m: &ArgMatches, id: &str) -> bool {
    matches!(m.value_source(id), None | Some(ValueSource::DefaultValue))
}

/// Copies file values into the settings left at their defaults; returns the ids taken.
fn merge(
    args: &mut ProxyArgs,
    log_format: &mut LogFormat,
    m: &ArgMatches,
    file: FileConfig,
    dir: &Path,
) -> Vec<&'static str> {
    let mut taken = Vec::new();
    let mut take = |id: &'static str| {
        if unset(m, id) {
            taken.push(id);
            true
        } else {
            false
        }
    };
    let path = |p: PathBuf| if p.is_relative() { dir.join(p) } else { p };
    macro_rules! set {
        ($id:literal, $value:expr => $dst:expr) => {
            if let Some(v) = $value {
                if take($id) {
                    $dst = v;
                }
            }
        };
    }
    // `log_format` is a global flag: present only when the command defines it.
    if let Some(v) = file.log_format {
        if m.try_get_one::<LogFormat>("log_format")
            .is_ok_and(|v| v.is_some())
            && take("log_format")
        {
            *log_format = v;
        }
    }
    let listen = file.listener.map(|ls| {
        ls.into_iter()
            .map(|l| ListenSpec {
                addr: l.addr,
                service: l.service,
            })
            .collect()
    });
    set!("listen", listen => args.listen);
    set!("route", file.route => args.route);
    set!("admin_listen", file.admin.listen => args.admin_listen);
    let e = file.etcd;
    set!("etcd_endpoints", e.endpoints => args.etcd.etcd_endpoints);
    set!("prefix", e.prefix => args.etcd.prefix);
    set!("etcd_connect_timeout", e.connect_timeout => args.etcd.etcd_connect_timeout);
    set!("etcd_user", e.user.map(Some) => args.etcd.etcd_user);
    set!("etcd_password", e.password.map(Some) => args.etcd.etcd_password);
    set!("etcd_ca", e.ca.map(|p| Some(path(p))) => args.etcd.etcd_ca);
    set!("etcd_cert", e.cert.map(|p| Some(path(p))) => args.etcd.etcd_cert);
    set!("etcd_key", e.key.map(|p| Some(path(p))) => args.etcd.etcd_key);
    let t = file.timeouts;
    set!("connect_timeout", t.connect => args.connect_timeout);
    set!("discovery_timeout", t.discovery => args.discovery_timeout);
    set!("idle_timeout", t.idle => args.idle_timeout);
    set!("first_request_timeout", t.first_request => args.first_request_timeout);
    set!("drain_timeout", t.drain => args.drain_timeout);
    let l = file.limits;
    set!("max_services", l.max_services => args.max_services);
    set!("max_concurrent_streams", l.max_concurrent_streams => args.max_concurrent_streams);
    set!("max_header_list_size", l.max_header_list_size => args.max_header_list_size);
    set!("max_connections", l.max_connections => args.max_connections);
    set!("worker_threads", l.worker_threads => args.worker_threads);
    set!("tls_cert", file.tls.cert.map(|p| Some(path(p))) => args.tls.tls_cert);
    set!("tls_key", file.tls.key.map(|p| Some(path(p))) => args.tls.tls_key);
    let u = file.upstream_tls;
    set!("upstream_tls", u.enabled => args.tls.upstream_tls);
    set!("upstream_ca", u.ca.map(|p| Some(path(p))) => args.tls.upstream_ca);
    set!("upstream_cert", u.cert.map(|p| Some(path(p))) => args.tls.upstream_cert);
    set!("upstream_key", u.key.map(|p| Some(path(p))) => args.tls.upstream_key);
    set!("upstream_sni", u.sni.map(Some) => args.tls.upstream_sni);
    taken
}

/// Builds the proxy's settings from `matches` (of `switchyard proxy`): the flags and
/// environment, completed by the config file named by `--config`, then checked (including
/// that the TLS files can be loaded).
pub fn load(matches: &ArgMatches) -> Result<Settings, ConfigError> {
    let mut proxy = ProxyArgs::from_arg_matches(matches)?;
    let mut log_format = matches
        .try_get_one::<LogFormat>("log_format")
        .ok()
        .flatten()
        .copied()
        .unwrap_or_default();
    let mut file = None;
    if let Some(path) = proxy.config.clone() {
        let text = std::fs::read_to_string(&path).map_err(|error| ConfigError::Read {
            path: path.clone(),
            error,
        })?;
        let parsed = parse_file(&path, &text)?;
        let dir = path.parent().map(Path::to_owned).unwrap_or_default();
        let taken = merge(&mut proxy, &mut log_format, matches, parsed, &dir);
        file = Some(FileSource { path, text, taken });
    }
    let settings = Settings {
        proxy,
        log_format,
        file,
    };
    validate(&settings)?;
    verify_tls_files(&settings)?;
    Ok(settings)
}

/// `switchyard check-config FILE`: loads `path` as `switchyard proxy --config FILE` would
/// (with the current environment) without starting anything.
pub fn check(path: &Path) -> Result<Settings, ConfigError> {
    let cmd = LogArgs::augment_args(ProxyArgs::augment_args(clap::Command::new("proxy")));
    let matches = cmd.try_get_matches_from([
        std::ffi::OsStr::new("proxy"),
        std::ffi::OsStr::new("--config"),
        path.as_os_str(),
    ])?;
    load(&matches)
}

/// Checks settings that are each valid but do not fit together.
fn validate(s: &Settings) -> Result<(), ConfigError> {
    let a = &s.proxy;
    let pair = |x: bool, y: bool, xid: &str, yid: &str| match (x, y) {
        (true, false) => Err(s.field_error(xid, format!("needs {} too", s.describe(yid)))),
        (false, true) => Err(s.field_error(yid, format!("needs {} too", s.describe(xid)))),
        _ => Ok(()),
    };
    if a.listen.is_empty() {
        return Err(s.field_error("listen", "no listener given".into()));
    }
    for (i, l) in a.listen.iter().enumerate() {
        if a.listen[..i].iter().any(|o| o.addr == l.addr) {
            return Err(s.field_error("listen", format!("{} is given twice", l.addr)));
        }
        if a.admin_listen.0 == Some(l.addr) {
            return Err(s.field_error(
                "admin_listen",
                format!("{} is also a proxy listener", l.addr),
            ));
        }
    }
    let e = &a.etcd;
    if e.etcd_endpoints.is_empty() {
        return Err(s.field_error("etcd_endpoints", "no etcd endpoint given".into()));
    }
    if let Some(ep) = e
        .etcd_endpoints
        .iter()
        .find(|ep| ep.starts_with("https://") && e.etcd_ca.is_none())
    {
        return Err(s.field_error(
            "etcd_endpoints",
            format!(
                "{ep} is https:// but no CA is given ({})",
                s.describe("etcd_ca")
            ),
        ));
    }
    if let Some(ep) = e
        .etcd_endpoints
        .iter()
        .find(|ep| ep.starts_with("http://") && e.etcd_ca.is_some())
    {
        return Err(s.field_error(
            "etcd_endpoints",
            format!(
                "{ep} is http:// but TLS to etcd is on ({}); use https://",
                s.describe("etcd_ca")
            ),
        ));
    }
    for (i, p) in e.prefix.iter().enumerate() {
        if e.prefix[..i].contains(p) {
            return Err(s.field_error("prefix", format!("{p:?} is given twice")));
        }
    }
    if let Err(err) = Routes::new(&a.route) {
        return Err(s.field_error("route", err.to_string()));
    }
    pair(
        e.etcd_user.is_some(),
        e.etcd_password.is_some(),
        "etcd_user",
        "etcd_password",
    )?;
    pair(
        e.etcd_cert.is_some(),
        e.etcd_key.is_some(),
        "etcd_cert",
        "etcd_key",
    )?;
    if e.etcd_cert.is_some() && e.etcd_ca.is_none() {
        return Err(s.field_error("etcd_cert", format!("needs {} too", s.describe("etcd_ca"))));
    }
    let t = &a.tls;
    pair(
        t.tls_cert.is_some(),
        t.tls_key.is_some(),
        "tls_cert",
        "tls_key",
    )?;
    pair(
        t.upstream_cert.is_some(),
        t.upstream_key.is_some(),
        "upstream_cert",
        "upstream_key",
    )?;
    if t.upstream_tls && t.upstream_ca.is_none() {
        return Err(s.field_error(
            "upstream_tls",
            format!("needs {} too", s.describe("upstream_ca")),
        ));
    }
    if !t.upstream_tls {
        for (id, set) in [
            ("upstream_ca", t.upstream_ca.is_some()),
            ("upstream_cert", t.upstream_cert.is_some()),
            ("upstream_sni", t.upstream_sni.is_some()),
        ] {
            if set {
                return Err(s.field_error(
                    id,
                    format!(
                        "has no effect unless TLS to backends is on ({})",
                        s.describe("upstream_tls")
                    ),
                ));
            }
        }
    }
    if a.worker_threads > MAX_WORKER_THREADS {
        return Err(s.field_error(
            "worker_threads",
            format!("must be at most {MAX_WORKER_THREADS}"),
        ));
    }
    for (id, zero) in [
        ("worker_threads", a.worker_threads == 0),
        ("max_services", a.max_services == 0),
        ("max_connections", a.max_connections == 0),
        ("max_concurrent_streams", a.max_concurrent_streams == 0),
        ("max_header_list_size", a.max_header_list_size == 0),
        ("connect_timeout", a.connect_timeout.is_zero()),
        ("discovery_timeout", a.discovery_timeout.is_zero()),
        ("etcd_connect_timeout", e.etcd_connect_timeout.is_zero()),
        ("idle_timeout", a.idle_timeout.is_zero()),
        ("first_request_timeout", a.first_request_timeout.is_zero()),
    ] {
        if zero {
            return Err(s.field_error(id, "must be greater than zero".into()));
        }
    }
    Ok(())
}

/// Loads every TLS file, so that a missing or malformed one is reported with its setting.
fn verify_tls_files(s: &Settings) -> Result<(), ConfigError> {
    use crate::tls::TlsError;
    let t = &s.proxy.tls;
    let e = &s.proxy.etcd;
    // Which setting names the file an error is about (or `fallback`).
    let field_of =
        |err: &TlsError, candidates: &[(&'static str, Option<&PathBuf>)], fallback| match err {
            TlsError::File { path, .. } => candidates
                .iter()
                .find(|(_, p)| *p == Some(path))
                .map_or(fallback, |(id, _)| *id),
            TlsError::BadServerName(_) => "upstream_sni",
            TlsError::Config(_) => fallback,
        };
    if let (Some(cert), Some(key)) = (&t.tls_cert, &t.tls_key) {
        crate::tls::server_config(cert, key).map_err(|err| {
            let c = [("tls_cert", Some(cert)), ("tls_key", Some(key))];
            s.field_error(field_of(&err, &c, "tls_cert"), err.to_string())
        })?;
    }
    crate::tls::UpstreamTls::from_args(t).map_err(|err| {
        let c = [
            ("upstream_ca", t.upstream_ca.as_ref()),
            ("upstream_cert", t.upstream_cert.as_ref()),
            ("upstream_key", t.upstream_key.as_ref()),
        ];
        s.field_error(field_of(&err, &c, "upstream_cert"), err.to_string())
    })?;
    crate::tls::etcd_tls(
        e.etcd_ca.as_deref(),
        e.etcd_cert.as_deref(),
        e.etcd_key.as_deref(),
    )
    .map_err(|err| {
        let c = [
            ("etcd_ca", e.etcd_ca.as_ref()),
            ("etcd_cert", e.etcd_cert.as_ref()),
            ("etcd_key", e.etcd_key.as_ref()),
        ];
        s.field_error(field_of(&err, &c, "etcd_cert"), err.to_string())
    })?;
    Ok(())
}

impl fmt::Display for Settings {
    /// A summary for `check-config` (the password is not shown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.proxy;
        for l in &a.listen {
            match &l.service {
                Some(s) => writeln!(f, "listener {} -> service {s}", l.addr)?,
                None => writeln!(f, "listener {} -> service from the call's path", l.addr)?,
            }
        }
        for r in &a.route {
            writeln!(f, "route {} -> service {}", r.grpc_service, r.registered)?;
        }
        match a.admin_listen.0 {
            Some(addr) => writeln!(f, "admin {addr}")?,
            None => writeln!(f, "admin off")?,
        }
        let e = &a.etcd;
        writeln!(
            f,
            "etcd {} prefix {} (tls {}, auth {})",
            e.etcd_endpoints.join(","),
            e.prefixes()
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            match (&e.etcd_ca, &e.etcd_cert) {
                (_, Some(_)) => "mtls",
                (Some(_), None) => "on",
                _ => "off",
            },
            e.etcd_user
                .as_deref()
                .map_or("off".to_owned(), |u| format!("user {u:?}")),
        )?;
        writeln!(
            f,
            "tls listeners {}, backends {}",
            if a.tls.tls_cert.is_some() {
                "on"
            } else {
                "off"
            },
            match (a.tls.upstream_tls, &a.tls.upstream_cert) {
                (false, _) => "off",
                (true, None) => "on",
                (true, Some(_)) => "mtls",
            }
        )?;
        writeln!(
            f,
            "timeouts connect {:?}, discovery {:?}, etcd connect {:?}, idle {:?}, first request {:?}, drain {:?}",
            a.connect_timeout,
            a.discovery_timeout,
            e.etcd_connect_timeout,
            a.idle_timeout,
            a.first_request_timeout,
            a.drain_timeout
        )?;
        writeln!(
            f,
            "limits services {}, connections {}, streams per connection {}, header list {} bytes, worker threads {}",
            a.max_services,
            a.max_connections,
            a.max_concurrent_streams,
            a.max_header_list_size,
            a.worker_threads
        )?;
        write!(f, "log format {:?}", self.log_format)
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

    #[test]
    fn positions_of_offsets_and_keys() {
        let text = "a = 1\n\n[etcd]\n  prefix = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 7), (3, 1));
        assert_eq!(line_col(text, text.len()), (5, 1));
        let off = key_offset(text, "etcd.prefix").unwrap();
        assert_eq!(line_col(text, off), (4, 3));
        assert_eq!(key_offset(text, "etcd.user"), None);
        assert_eq!(key_offset("[etcd\n", "etcd"), None);
    }
}
