//! `switchyard register`: a sidecar that holds a leased key for a backend written in any
//! language.
//!
//! It registers the backend (once it is healthy, if a health check is set), keeps the
//! lease alive, deletes the key while the backend is unhealthy and puts it back on
//! recovery. On SIGTERM/SIGINT it deregisters (the key goes at once) and exits 0; if it
//! is killed, the key goes when the lease expires.
//!
//! With `--admin-listen ADDR` it serves `/metrics` (the registration metrics, whether the
//! backend passes its health check, process metrics), `/healthz` (alive) and `/readyz`
//! (200 while the key is held, 503 with the reason otherwise).

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use http::StatusCode;
use prometheus::{IntGauge, Opts, Registry};
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::admin::{reply, AdminResponse, METRICS, TEXT};
use crate::backoff::Backoff;
use crate::endpoint::{BackendAddr, Endpoint};
use crate::health::ActiveCheck;
use crate::metrics::RegistrationMetrics;
use crate::registry::{metadata_formats, Instance, ValueFormat};
use crate::route::ServiceName;
use crate::settings::{duration, AdminListen, EtcdSettings};

use super::health::{HealthGate, HealthGateConfig, HealthGateError};
use super::{check_ttl, Registration, RegistrationError, RegistrationSpec, RegistrationState};

/// Flags of `switchyard register`.
#[derive(clap::Args, Debug, Clone)]
pub struct RegisterArgs {
    /// Service name: the `S` in `<prefix>/S/<addr>` (for gRPC, the full service name,
    /// e.g. `pkg.Svc`).
    #[arg(long, env = "SWITCHYARD_SERVICE")]
    pub service: ServiceName,
    /// The backend's address as clients reach it, `host:port`.
    #[arg(long, env = "SWITCHYARD_ADDR", value_parser = parse_register_addr)]
    pub addr: BackendAddr,
    /// Lease TTL, whole seconds, at least 2s: the key disappears this long after the
    /// sidecar dies.
    #[arg(long, env = "SWITCHYARD_TTL", default_value = "10s", value_parser = parse_ttl)]
    pub ttl: Duration,
    /// Metadata `KEY=VALUE` written with the value (formats that carry metadata), repeatable.
    #[arg(long = "metadata", value_name = "KEY=VALUE", value_parser = parse_metadata)]
    pub metadata: Vec<(String, String)>,
    /// Key layout and value written, as that framework writes them (the default is read
    /// by switchyard and grpc-go's etcd resolver alike). With a framework's format and no
    /// --prefix, the key goes under that framework's own prefix.
    #[arg(long, env = "SWITCHYARD_FORMAT", default_value_t = ValueFormat::default(), value_parser = parse_format())]
    pub format: ValueFormat,
    /// Weight written, for formats that carry one (default: the format's own; Kitex's is 10).
    #[arg(long, env = "SWITCHYARD_WEIGHT", value_parser = clap::value_parser!(u32).range(1..=i64::from(crate::endpoint::MAX_WEIGHT)))]
    pub weight: Option<u32>,
    /// Service version written by the kratos and go-micro formats (default: theirs,
    /// empty and `latest`).
    #[arg(long, env = "SWITCHYARD_SERVICE_VERSION", value_name = "VERSION")]
    pub service_version: Option<String>,
    /// Health check that gates the registration: the key is held only while it passes.
    #[arg(long, env = "SWITCHYARD_HEALTH_CHECK", value_enum, default_value_t = ActiveCheck::None)]
    pub health_check: ActiveCheck,
    /// Service name asked about by the gRPC health check (empty: the whole server).
    #[arg(long, env = "SWITCHYARD_HEALTH_SERVICE", default_value = "")]
    pub health_service: String,
    /// Time between health probes.
    #[arg(long, env = "SWITCHYARD_HEALTH_INTERVAL", default_value = "1s", value_parser = parse_positive_duration)]
    pub health_interval: Duration,
    /// Time allowed for one health probe.
    #[arg(long, env = "SWITCHYARD_HEALTH_TIMEOUT", default_value = "1s", value_parser = parse_positive_duration)]
    pub health_timeout: Duration,
    /// Consecutive failed probes before the key is deleted.
    #[arg(long, env = "SWITCHYARD_UNHEALTHY_AFTER", default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..))]
    pub unhealthy_after: u32,
    /// Consecutive passed probes before the key is put back.
    #[arg(long, env = "SWITCHYARD_HEALTHY_AFTER", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    pub healthy_after: u32,
    /// Admin listener (`/metrics`, `/healthz`, `/readyz`), `ip:port`; `off` (the
    /// default) disables it.
    #[arg(
        long,
        env = "SWITCHYARD_REGISTER_ADMIN_LISTEN",
        value_name = "ADDR|off",
        default_value = "off"
    )]
    pub admin_listen: AdminListen,
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: EtcdSettings,
}

/// `--addr`: `host:port`, and not a wildcard address that clients cannot reach.
pub fn parse_register_addr(s: &str) -> Result<BackendAddr, String> {
    let addr: BackendAddr = s.parse().map_err(|e| format!("{e}"))?;
    if addr
        .host()
        .parse::<std::net::IpAddr>()
        .is_ok_and(|ip| ip.is_unspecified())
    {
        return Err(format!(
            "{s:?} is a wildcard address; give the address clients reach the backend at"
        ));
    }
    Ok(addr)
}

/// `--format`: one of the registry's format names (listed in `--help`).
fn parse_format() -> impl clap::builder::TypedValueParser<Value = ValueFormat> {
    use clap::builder::TypedValueParser as _;
    clap::builder::PossibleValuesParser::new(ValueFormat::names())
        .try_map(|name| name.parse::<ValueFormat>())
}

/// `--ttl`: a duration of whole seconds within etcd's lease limits.
pub fn parse_ttl(s: &str) -> Result<Duration, String> {
    let ttl = duration::parse(s)?;
    check_ttl(ttl).map_err(|e| e.to_string())?;
    Ok(ttl)
}

/// A duration greater than zero.
fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    match duration::parse(s)? {
        d if d.is_zero() => Err(format!("{s:?} must be greater than zero")),
        d => Ok(d),
    }
}

/// `--metadata`: `KEY=VALUE` with a non-empty key.
pub fn parse_metadata(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.trim().is_empty() => Ok((k.trim().to_owned(), v.to_owned())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

impl RegisterArgs {
    /// Checks the flags that depend on one another; the message names the flags.
    pub fn validate(&self) -> Result<(), String> {
        if !self.metadata.is_empty() && !self.format.carries_metadata() {
            return Err(format!(
                "--metadata needs a --format that carries metadata ({}); {} values do not",
                metadata_formats(),
                self.format
            ));
        }
        if self.etcd.prefix.len() > 1 {
            return Err("--prefix: register writes one key; give one prefix".to_owned());
        }
        if let Some(weight) = self.weight {
            let probe = Endpoint::new(self.addr.clone()).with_weight(weight);
            let instance = Instance {
                service: self.service.as_str(),
                id: "",
                version: "",
            };
            if let Err(e) = self.format.encode(&probe, &instance) {
                return Err(format!("--weight: {e}"));
            }
        }
        Ok(())
    }

    /// The registration these flags describe.
    pub fn spec(&self) -> RegistrationSpec {
        let mut spec = RegistrationSpec::new(self.service.as_str(), &self.addr)
            .ttl(self.ttl)
            .format(self.format);
        // One key is written: under the prefix given, or the format's own.
        if let Some(prefix) = self.etcd.prefix.first() {
            spec = spec.prefix(prefix.clone());
        }
        if let Some(weight) = self.weight {
            spec = spec.weight(weight);
        }
        if let Some(version) = &self.service_version {
            spec = spec.version(version.clone());
        }
        if !self.metadata.is_empty() {
            let map: serde_json::Map<String, serde_json::Value> = self
                .metadata
                .iter()
                .map(|(k, v)| (k.clone(), serde_json::Value::String(v.clone())))
                .collect();
            spec = spec.metadata(serde_json::Value::Object(map));
        }
        spec
    }

    fn health_gate(&self) -> HealthGateConfig {
        HealthGateConfig {
            kind: self.health_check,
            addr: self.addr.clone(),
            service: self.health_service.clone(),
            interval: self.health_interval,
            timeout: self.health_timeout,
            unhealthy_after: self.unhealthy_after,
            healthy_after: self.healthy_after,
        }
    }
}

/// Why the sidecar stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum SidecarError {
    /// The etcd client could not be set up.
    #[error(transparent)]
    Etcd(#[from] crate::etcd::EtcdError),
    /// The health check could not be set up.
    #[error(transparent)]
    Health(#[from] HealthGateError),
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr} (set by --admin-listen)")]
    AdminBind {
        /// The address asked for.
        addr: SocketAddr,
        /// Why binding failed.
        #[source]
        source: std::io::Error,
    },
    /// Registering failed for a reason that retrying will not fix.
    #[error("register: {0}")]
    Register(#[source] RegistrationError),
    /// Deregistering failed; the key goes when its lease expires.
    #[error("deregister: {0} (the key goes when its lease expires)")]
    Deregister(#[source] RegistrationError),
}

/// Where the sidecar stands, for `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Waiting for the backend to pass its first health check.
    WaitingForBackend,
    /// Healthy, trying to register (etcd not answering yet).
    Registering,
    /// Registered once; the registration's state now.
    Registration(RegistrationState),
}

impl Phase {
    /// `Ok` while the key is held; otherwise why not.
    fn ready(self) -> Result<(), &'static str> {
        match self {
            Self::Registration(RegistrationState::Registered { .. }) => Ok(()),
            Self::WaitingForBackend => Err("waiting for the backend to pass its health check"),
            Self::Registering => Err("registering: etcd has not answered yet"),
            Self::Registration(RegistrationState::Pending) => {
                Err("key not held: registering again (lease lost or etcd unreachable)")
            }
            Self::Registration(RegistrationState::Paused) => {
                Err("key withdrawn: the backend fails its health check")
            }
            Self::Registration(RegistrationState::Stopped) => Err("stopped"),
        }
    }
}

/// What the sidecar reports: its metrics and where it stands.
struct Report {
    registry: Registry,
    registrations: RegistrationMetrics,
    healthy: IntGauge,
    phase: watch::Sender<Phase>,
}

impl Report {
    fn new(service: &ServiceName) -> Self {
        let registry = crate::metrics::process_registry();
        let registrations = RegistrationMetrics::new(&registry);
        registrations.set_held(service.as_str(), 0);
        let healthy = IntGauge::with_opts(
            Opts::new(
                "switchyard_backend_healthy",
                "1 while the backend passes the sidecar's health check (always 1 with --health-check none).",
            )
            .const_label("service", service.as_str()),
        );
        let Ok(healthy) = healthy else {
            unreachable!("static metric definition is valid")
        };
        if let Err(e) = registry.register(Box::new(healthy.clone())) {
            tracing::error!(error = %e, "metric registration failed");
        }
        Self {
            registry,
            registrations,
            healthy,
            phase: watch::Sender::new(Phase::WaitingForBackend),
        }
    }

    fn set_phase(&self, phase: Phase) {
        self.phase
            .send_if_modified(|p| std::mem::replace(p, phase) != phase);
    }

    /// The admin routes.
    fn route(&self, path: &str) -> AdminResponse {
        match path {
            "/metrics" => reply(
                StatusCode::OK,
                METRICS,
                crate::metrics::render(&self.registry),
            ),
            "/healthz" => reply(StatusCode::OK, TEXT, "ok\n"),
            "/readyz" => match self.phase.borrow().ready() {
                Ok(()) => reply(StatusCode::OK, TEXT, "ready: key held\n"),
                Err(why) => reply(
                    StatusCode::SERVICE_UNAVAILABLE,
                    TEXT,
                    format!("not ready: {why}\n"),
                ),
            },
            _ => reply(
                StatusCode::NOT_FOUND,
                TEXT,
                "not found; try /metrics, /healthz, /readyz\n",
            ),
        }
    }
}

/// Stops the admin listener when dropped.
struct AdminTask(Option<watch::Sender<bool>>);

impl Drop for AdminTask {
    fn drop(&mut self) {
        if let Some(stop) = self.0.take() {
            let _ = stop.send(true);
        }
    }
}

/// Binds the admin listener (if asked for) and serves it until the returned guard drops.
async fn start_admin(
    listen: AdminListen,
    report: &std::sync::Arc<Report>,
) -> Result<AdminTask, SidecarError> {
    let Some(addr) = listen.0 else {
        return Ok(AdminTask(None));
    };
    let listener = TcpListener::bind(addr)
        .await
        .map_err(|source| SidecarError::AdminBind { addr, source })?;
    tracing::info!(listen = %listener.local_addr().unwrap_or(addr), "admin listening");
    let (stop, stopped) = watch::channel(false);
    let report = std::sync::Arc::clone(report);
    tokio::spawn(crate::admin::serve_routes(
        listener,
        move |path| report.route(path),
        stopped,
    ));
    Ok(AdminTask(Some(stop)))
}

/// Runs the sidecar until SIGTERM/SIGINT.
pub async fn run(args: RegisterArgs) -> Result<(), SidecarError> {
    run_until(args, crate::proxy::shutdown_signal()).await
}

/// Runs the sidecar until `shutdown` completes, then deregisters.
pub async fn run_until(
    args: RegisterArgs,
    shutdown: impl Future<Output = ()>,
) -> Result<(), SidecarError> {
    let report = std::sync::Arc::new(Report::new(&args.service));
    let _admin = start_admin(args.admin_listen, &report).await?;
    let client = crate::etcd::connect(&args.etcd).await?;
    let spec = args.spec().metrics(report.registrations.clone());
    let mut gate = HealthGate::new(args.health_gate())?;
    tokio::pin!(shutdown);

    if args.health_check != ActiveCheck::None {
        tracing::info!(addr = %args.addr, check = ?args.health_check, "waiting for the backend to be healthy before registering");
    }
    let healthy = tokio::select! {
        _ = &mut shutdown => return Ok(()),
        healthy = gate.changed() => healthy,
    };
    debug_assert!(healthy);
    report.healthy.set(1);
    report.set_phase(Phase::Registering);

    // Register, retrying while etcd is unreachable.
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    let registration = loop {
        let attempt = Registration::start(client.clone(), spec.clone());
        tokio::pin!(attempt);
        let attempt = tokio::select! {
            r = &mut attempt => r,
            _ = &mut shutdown => {
                // The put may be applied already, its answer on the way: finish the
                // attempt (its requests are bounded by the request timeout) and take
                // back what it registered, or the key would outlive us by a lease.
                return match attempt.await {
                    Ok(registration) => {
                        tracing::info!(key = %registration.key(), "shut down while registering: deregistering");
                        registration.deregister().await.map_err(SidecarError::Deregister)
                    }
                    Err(_) => Ok(()),
                };
            }
        };
        match attempt {
            Ok(r) => break r,
            Err(e) if e.is_transient() => {
                let delay = backoff.next_delay();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "cannot register yet; retrying");
                tokio::select! {
                    _ = &mut shutdown => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
            }
            Err(e) => return Err(SidecarError::Register(e)),
        }
    };

    let mut states = registration.state();
    report.set_phase(Phase::Registration(*states.borrow_and_update()));
    loop {
        tokio::select! {
            _ = &mut shutdown => break,
            healthy = gate.changed() => {
                report.healthy.set(i64::from(healthy));
                registration.set_active(healthy);
            }
            Ok(()) = states.changed() => {
                report.set_phase(Phase::Registration(*states.borrow_and_update()));
            }
        }
    }
    tracing::info!(key = %registration.key(), "shutting down: deregistering");
    registration
        .deregister()
        .await
        .map_err(SidecarError::Deregister)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flag_values_parse() {
        assert!(parse_register_addr("127.0.0.1:5000").is_ok());
        assert!(parse_register_addr("backend.local:80").is_ok());
        assert!(parse_register_addr("127.0.0.1").is_err());
        assert!(parse_register_addr("0.0.0.0:5000").is_err());
        assert!(parse_register_addr("[::]:5000").is_err());
        assert_eq!(parse_ttl("2s"), Ok(Duration::from_secs(2)));
        assert!(parse_ttl("1s").is_err());
        assert!(parse_ttl("2500ms").is_err());
        assert_eq!(
            parse_metadata("zone=a=b"),
            Ok(("zone".to_owned(), "a=b".to_owned()))
        );
        assert!(parse_metadata("=v").is_err());
        assert!(parse_metadata("novalue").is_err());
    }
}
