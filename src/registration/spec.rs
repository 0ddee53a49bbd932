//! What to register ([`RegistrationSpec`]: service, address, prefix, format, TTL,
//! metadata), checked once into the key and value a registration keeps.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use super::{RegistrationError, DEFAULT_REQUEST_TIMEOUT, DEFAULT_TTL, MAX_TTL, MIN_TTL};
use crate::endpoint::{BackendAddr, Endpoint, Weight, MAX_WEIGHT};
use crate::metrics::{RegistrationEvent, RegistrationMetrics};
use crate::registry::{instance_key, service_prefix, Instance, KeyName, ValueFormat};
use crate::route::ServiceName;

/// What to register: built with [`RegistrationSpec::new`] and adjusted with its setters.
#[derive(Debug, Clone)]
pub struct RegistrationSpec {
    service: String,
    addr: String,
    prefix: Option<String>,
    ttl: Duration,
    format: ValueFormat,
    metadata: Option<serde_json::Value>,
    weight: Option<Weight>,
    version: Option<String>,
    request_timeout: Duration,
    metrics: Option<RegistrationMetrics>,
}

impl RegistrationSpec {
    /// Registers `addr` (`host:port`, e.g. a `SocketAddr`) for `service`, with a TTL of
    /// 10 s, in the etcd-naming format under its prefix `services`. Checked by
    /// [`Registration::start`].
    pub fn new(service: impl Into<String>, addr: impl ToString) -> Self {
        Self {
            service: service.into(),
            addr: addr.to_string(),
            prefix: None,
            ttl: DEFAULT_TTL,
            format: ValueFormat::default(),
            metadata: None,
            weight: None,
            version: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            metrics: None,
        }
    }

    /// Sets the key prefix (`<prefix>/<service>/<name>`; default: the format's own, see
    /// [`ValueFormat::default_prefix`]). Kept as written: `""` puts the service at the
    /// root (go-zero), a leading `/` stays (`/microservices`).
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = Some(prefix.into());
        self
    }

    /// Sets the weight written (formats that carry one; default: the format's own,
    /// see [`ValueFormat::default_weight`]).
    pub fn weight(mut self, weight: Weight) -> Self {
        self.weight = Some(weight);
        self
    }

    /// Sets the service version written (Kratos, go-micro; default: the format's own,
    /// see [`ValueFormat::default_version`]).
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = Some(version.into());
        self
    }

    /// Sets the lease TTL (whole seconds, at least [`MIN_TTL`]).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = ttl;
        self
    }

    /// Sets the value format, and with it the key layout and the default prefix.
    pub fn format(mut self, format: ValueFormat) -> Self {
        self.format = format;
        self
    }

    /// Sets the metadata written with the value (formats that carry it only:
    /// [`ValueFormat::carries_metadata`]).
    pub fn metadata(mut self, metadata: serde_json::Value) -> Self {
        self.metadata = Some(metadata);
        self
    }

    /// Sets the time allowed for each etcd request.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// Reports the registration's keys and events to `metrics`.
    pub fn metrics(mut self, metrics: RegistrationMetrics) -> Self {
        self.metrics = Some(metrics);
        self
    }

    /// Checks the spec and works out the key and value.
    pub(super) fn validate(&self) -> Result<Checked, RegistrationError> {
        let service = ServiceName::new(&self.service)?;
        let addr: BackendAddr = self.addr.parse()?;
        let ttl_secs = check_ttl(self.ttl)?;
        let format = self.format;
        let weight = self.weight.unwrap_or_else(|| format.default_weight());
        if weight == 0 || weight > MAX_WEIGHT {
            return Err(RegistrationError::BadWeight(weight));
        }
        let prefix = self.prefix.as_deref().unwrap_or(format.default_prefix());
        let name = service.as_str();
        let id = match format.key_name() {
            KeyName::Addr => addr.to_string(),
            // Known once the lease is granted (see `Keeper::grant`).
            KeyName::Lease => String::new(),
            KeyName::Uuid => uuid::Uuid::new_v4().to_string(),
            KeyName::ServiceUuid => format!("{name}-{}", uuid::Uuid::new_v4()),
        };
        let (key, key_base) = match format.key_name() {
            KeyName::Lease => {
                let base = service_prefix(prefix, name);
                (format!("{base}<lease>"), Some(base))
            }
            _ => (instance_key(prefix, name, &id), None),
        };
        let mut endpoint = Endpoint::new(addr).with_weight(weight);
        endpoint.metadata = self.metadata.clone().filter(|m| !m.is_null());
        let instance = Instance {
            service: name,
            id: &id,
            version: self.version.as_deref().unwrap_or(format.default_version()),
        };
        let value = format.encode(&endpoint, &instance)?;
        Ok(Checked {
            key_base,
            report: self.metrics.clone().map(|metrics| {
                Arc::new(Reporter {
                    metrics,
                    service: service.as_str().into(),
                    held: AtomicBool::new(false),
                })
            }),
            key: key.into(),
            value,
            ttl: self.ttl,
            ttl_secs,
            request_timeout: self.request_timeout,
        })
    }
}

/// Checks a TTL against etcd's limits and returns it in whole seconds.
pub fn check_ttl(ttl: Duration) -> Result<i64, RegistrationError> {
    if ttl.subsec_nanos() != 0 {
        return Err(RegistrationError::TtlNotWholeSeconds(ttl));
    }
    if ttl < MIN_TTL {
        return Err(RegistrationError::TtlTooShort(ttl));
    }
    if ttl > MAX_TTL {
        return Err(RegistrationError::TtlTooLong(ttl));
    }
    i64::try_from(ttl.as_secs()).map_err(|_| RegistrationError::TtlTooLong(ttl))
}

/// A checked spec.
#[derive(Debug, Clone)]
pub(super) struct Checked {
    pub(super) report: Option<Arc<Reporter>>,
    /// The key, or a placeholder until the first lease names it (see `key_base`).
    pub(super) key: Arc<str>,
    /// For keys named by the lease (go-zero): the key without its last segment.
    pub(super) key_base: Option<String>,
    pub(super) value: String,
    pub(super) ttl: Duration,
    pub(super) ttl_secs: i64,
    pub(super) request_timeout: Duration,
}

/// Reports one registration to its metrics: whether its key is held, and its events.
#[derive(Debug)]
pub(super) struct Reporter {
    pub(super) metrics: RegistrationMetrics,
    pub(super) service: Box<str>,
    /// Whether this registration counts in `switchyard_registrations` now.
    pub(super) held: AtomicBool,
}

impl Reporter {
    pub(super) fn held(&self, held: bool) {
        if self.held.swap(held, Ordering::Relaxed) != held {
            self.metrics
                .add_held(&self.service, if held { 1 } else { -1 });
        }
    }

    pub(super) fn event(&self, event: RegistrationEvent) {
        self.metrics.event(&self.service, event);
    }
}

impl Drop for Reporter {
    fn drop(&mut self) {
        // The keep-alive is gone with the last handle: the key is no longer held.
        self.held(false);
    }
}
