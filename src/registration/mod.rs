//! Registration: backends announce themselves in etcd under a lease kept alive.
//!
//! [`Registration::start`] grants a lease, puts `<prefix>/<service>/<name>` under it and
//! keeps the lease alive from a background task (a renewal every TTL/3). The value, the
//! default prefix and the key's last segment are the chosen format's
//! ([`RegistrationSpec::format`]): a backend in any language can join a go-zero, Kratos,
//! Kitex or go-micro fleet and be found by that fleet's own clients. If the lease is
//! lost (it expired while etcd was unreachable, it was revoked, or etcd's data was wiped)
//! the task grants a new lease and puts the key again, and logs it. [`Registration::deregister`]
//! deletes the key and revokes the lease; dropping the handle only stops the keep-alive,
//! so the key goes when the lease expires.
//!
//! ```no_run
//! # async fn demo(etcd: etcd_client::Client) -> Result<(), switchyard::registration::RegistrationError> {
//! use std::time::Duration;
//! use switchyard::registration::{Registration, RegistrationSpec};
//!
//! let reg = Registration::start(
//!     etcd,
//!     RegistrationSpec::new("switchyard.echo.v1.Echo", "127.0.0.1:50051").ttl(Duration::from_secs(5)),
//! )
//! .await?;
//! // ... serve ...
//! reg.deregister().await?;
//! # Ok(()) }
//! ```
//!
//! Given [`RegistrationMetrics`] ([`RegistrationSpec::metrics`]), a registration reports
//! the keys it holds (`switchyard_registrations`) and what happens to them
//! (`switchyard_registration_events_total`); without, it reports nothing.
//!
//! - [`sidecar`]: `switchyard register`, the same for backends in any language, with an
//!   optional health gate ([`health`]).
//! - [`list`]: `switchyard endpoints`, what is registered, for operators.

pub mod health;
mod keeper;
pub mod list;
pub mod sidecar;
mod spec;

pub use spec::{check_ttl, RegistrationSpec};
use spec::{Checked, Reporter};

use std::sync::Arc;
use std::time::Duration;

use etcd_client::Client;
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::backoff::Backoff;
use crate::endpoint::{AddrError, Weight, MAX_WEIGHT};
use crate::etcd::{delete_if_under_lease, timed, RequestError};
use crate::metrics::RegistrationEvent;
use crate::registry::EncodeError;
use crate::route::ServiceNameError;

/// Shortest lease TTL accepted: 2 s. etcd (3.4, default timing: 100 ms heartbeat, 1 s
/// election timeout) grants at least ⌈1.5 × election timeout⌉ = 2 s whatever is asked,
/// so a shorter TTL would not mean what it says.
pub const MIN_TTL: Duration = Duration::from_secs(2);

/// Longest lease TTL etcd accepts (its `MaxLeaseTTL`, 9,000,000,000 s).
pub const MAX_TTL: Duration = Duration::from_secs(9_000_000_000);

/// TTL used when none is given.
pub const DEFAULT_TTL: Duration = Duration::from_secs(10);

/// Time allowed for one etcd request when none is given.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a registration could not be made or removed.
#[derive(Debug, thiserror::Error)]
pub enum RegistrationError {
    /// The service name is not valid.
    #[error("service: {0}")]
    Service(#[from] ServiceNameError),
    /// The address is not `host:port`.
    #[error("address: {0}")]
    Addr(#[from] AddrError),
    /// The TTL is shorter than [`MIN_TTL`].
    #[error("ttl {0:?} is below the minimum of {MIN_TTL:?} (etcd grants no shorter lease)")]
    TtlTooShort(Duration),
    /// The TTL is longer than [`MAX_TTL`].
    #[error("ttl {0:?} is above etcd's maximum lease TTL of {MAX_TTL:?}")]
    TtlTooLong(Duration),
    /// The TTL is not a whole number of seconds (etcd leases are in seconds).
    #[error("ttl {0:?} is not a whole number of seconds")]
    TtlNotWholeSeconds(Duration),
    /// The value format cannot carry what the spec has (e.g. metadata in `plain`).
    #[error("value: {0}")]
    Value(#[from] EncodeError),
    /// The weight is 0 or above [`MAX_WEIGHT`].
    #[error("weight {0} is not between 1 and {MAX_WEIGHT}")]
    BadWeight(Weight),
    /// An etcd request failed or got no answer in time.
    #[error("{key}: {source}")]
    Etcd {
        /// The registration's key.
        key: String,
        /// The request and what went wrong.
        #[source]
        source: RequestError,
    },
    /// The keep-alive stream ended (etcd closed it).
    #[error("etcd lease keep-alive for {key}: stream closed")]
    StreamClosed {
        /// The registration's key.
        key: String,
    },
}

impl RegistrationError {
    /// Whether trying again later may succeed (etcd unreachable or slow), as opposed to
    /// a bad spec or a refusal (auth, permissions, invalid request).
    pub fn is_transient(&self) -> bool {
        use tonic::Code;
        match self {
            Self::StreamClosed { .. }
            | Self::Etcd {
                source: RequestError::TimedOut { .. },
                ..
            } => true,
            Self::Etcd {
                source: RequestError::Failed { source, .. },
                ..
            } => match source {
                etcd_client::Error::GRpcStatus(s) => matches!(
                    s.code(),
                    Code::Unavailable
                        | Code::DeadlineExceeded
                        | Code::Unknown
                        | Code::Aborted
                        | Code::Cancelled
                        | Code::Internal
                        | Code::ResourceExhausted
                ),
                etcd_client::Error::TransportError(_)
                | etcd_client::Error::IoError(_)
                | etcd_client::Error::LeaseKeepAliveError(_) => true,
                _ => false,
            },
            _ => false,
        }
    }

    /// Makes an etcd request's error one of the registration of `key`.
    fn etcd(key: &str) -> impl FnOnce(RequestError) -> Self + '_ {
        move |source| Self::Etcd {
            key: key.to_owned(),
            source,
        }
    }
}

/// Where a registration stands, as published by [`Registration::state`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegistrationState {
    /// Not registered right now: getting a lease or putting the key (after the lease
    /// was lost, or while etcd is unreachable past the lease's expiry).
    Pending,
    /// The key is in etcd under this live lease.
    Registered {
        /// The lease ID.
        lease: i64,
    },
    /// Held back by [`Registration::set_active`]`(false)`: the key is deleted, the lease
    /// kept alive.
    Paused,
    /// The keep-alive has stopped (handle dropped or deregistered).
    Stopped,
}

impl RegistrationState {
    /// Whether the key is in etcd.
    pub fn is_registered(&self) -> bool {
        matches!(self, Self::Registered { .. })
    }
}

/// A registered instance; keeps its lease alive until dropped or deregistered.
pub struct Registration {
    key: Arc<str>,
    client: Client,
    request_timeout: Duration,
    active: watch::Sender<bool>,
    state: watch::Sender<RegistrationState>,
    report: Option<Arc<Reporter>>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<Option<i64>>>,
}

impl Registration {
    /// Grants a lease, puts the key under it, and keeps the lease alive in the background.
    ///
    /// Returns once the key is in etcd; fails if the spec is invalid or etcd refuses or
    /// does not answer ([`RegistrationError::is_transient`] tells which).
    ///
    /// Not cancel-safe: dropped while in flight, it may leave the key in etcd (its put
    /// applied, the answer not yet read) until the lease expires. To stop early, await it
    /// and [`deregister`](Self::deregister) what it returns, as the sidecar does.
    pub async fn start(client: Client, spec: RegistrationSpec) -> Result<Self, RegistrationError> {
        let checked = spec.validate()?;
        let (active, active_rx) = watch::channel(true);
        let state = watch::Sender::new(RegistrationState::Pending);
        let mut keeper = keeper::Keeper::new(client.clone(), &checked, active_rx, state.clone());
        keeper.register_first().await?;
        let key = keeper.key();
        let (stop, stopped) = oneshot::channel();
        let task = tokio::spawn(keeper.run(stopped));
        Ok(Self {
            key,
            client,
            request_timeout: checked.request_timeout,
            active,
            state,
            report: checked.report,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The etcd key (`<prefix>/<service>/<name>`).
    pub fn key(&self) -> &str {
        &self.key
    }

    /// Where the registration stands now.
    pub fn current_state(&self) -> RegistrationState {
        *self.state.borrow()
    }

    /// A receiver of state changes.
    pub fn state(&self) -> watch::Receiver<RegistrationState> {
        self.state.subscribe()
    }

    /// Holds the key (`true`, the default) or deletes it while keeping the lease (`false`),
    /// e.g. to follow the backend's health. Applied in the background.
    pub fn set_active(&self, active: bool) {
        self.active
            .send_if_modified(|a| std::mem::replace(a, active) != active);
    }

    /// Stops the keep-alive, deletes the key and revokes the lease.
    pub async fn deregister(mut self) -> Result<(), RegistrationError> {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let lease = match self.task.take() {
            Some(task) => task.await.ok().flatten(),
            None => None,
        };
        let result = match lease {
            Some(lease) => self.remove_retrying(lease).await,
            None => Ok(()),
        };
        self.state.send_replace(RegistrationState::Stopped);
        if result.is_ok() {
            tracing::info!(key = %self.key, "deregistered");
            if let (Some(r), Some(_)) = (&self.report, lease) {
                r.event(RegistrationEvent::Deregistered);
            }
        }
        result
    }

    /// [`Self::remove`], tried again on transient errors (e.g. one etcd member of several
    /// just restarted) until the request timeout has passed.
    async fn remove_retrying(&self, lease: i64) -> Result<(), RegistrationError> {
        let deadline = tokio::time::Instant::now() + self.request_timeout;
        let mut backoff = Backoff::new(Duration::from_millis(50), Duration::from_millis(500));
        loop {
            match self.remove(lease).await {
                Err(e) if e.is_transient() => {
                    let delay = backoff.next_delay();
                    if tokio::time::Instant::now() + delay >= deadline {
                        return Err(e);
                    }
                    tracing::debug!(key = %self.key, error = %e, "deregistration failed; trying again");
                    tokio::time::sleep(delay).await;
                }
                result => return result,
            }
        }
    }

    /// Deletes the key if it is still under `lease`, then revokes the lease.
    async fn remove(&self, lease: i64) -> Result<(), RegistrationError> {
        let mut client = self.client.clone();
        let key: &str = &self.key;
        delete_if_under_lease(&mut client, key, lease, self.request_timeout)
            .await
            .map_err(RegistrationError::etcd(key))?;
        match timed(
            "lease revoke",
            self.request_timeout,
            client.lease_revoke(lease),
        )
        .await
        {
            Ok(_) => Ok(()),
            // Already gone (expired): nothing left to revoke.
            Err(RequestError::Failed {
                source: etcd_client::Error::GRpcStatus(s),
                ..
            }) if s.code() == tonic::Code::NotFound => Ok(()),
            Err(e) => Err(RegistrationError::etcd(key)(e)),
        }
    }
}

impl std::fmt::Debug for Registration {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registration")
            .field("key", &self.key)
            .field("state", &*self.state.borrow())
            .finish()
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(task) = self.task.take() {
            task.abort();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::ValueFormat;

    #[test]
    fn specs_validate() {
        let c = RegistrationSpec::new("a.B-c", "127.0.0.1:5000")
            .ttl(Duration::from_secs(3))
            .validate()
            .unwrap();
        assert_eq!(&*c.key, "services/a.B-c/127.0.0.1:5000");
        assert_eq!(
            c.value,
            r#"{"Op":0,"Addr":"127.0.0.1:5000","Metadata":null}"#
        );
        assert_eq!(c.ttl_secs, 3);
        let c = RegistrationSpec::new("a", std::net::SocketAddr::from(([127, 0, 0, 1], 9)))
            .prefix("p/")
            .format(ValueFormat::Plain)
            .validate()
            .unwrap();
        assert_eq!(&*c.key, "p/a/127.0.0.1:9");
        assert_eq!(c.value, "127.0.0.1:9");
        let c = RegistrationSpec::new("a", "h:1")
            .metadata(serde_json::json!({"zone": "z"}))
            .validate()
            .unwrap();
        assert_eq!(c.value, r#"{"Op":0,"Addr":"h:1","Metadata":{"zone":"z"}}"#);
    }

    #[test]
    fn each_format_has_its_frameworks_key_layout() {
        let spec = |f| RegistrationSpec::new("helloworld", "10.0.0.5:9000").format(f);
        // go-zero: no common prefix, the key named by the first lease.
        let c = spec(ValueFormat::GoZero).validate().unwrap();
        assert_eq!(c.key_base.as_deref(), Some("helloworld/"));
        assert_eq!(c.value, "10.0.0.5:9000");
        // Kratos: a UUID that is the value's id.
        let c = spec(ValueFormat::Kratos).version("v1").validate().unwrap();
        let id = c.key.strip_prefix("/microservices/helloworld/").unwrap();
        assert!(uuid::Uuid::parse_str(id).is_ok(), "{id}");
        assert_eq!(
            c.value,
            format!(
                r#"{{"id":"{id}","name":"helloworld","version":"v1","metadata":null,"endpoints":["grpc://10.0.0.5:9000"]}}"#
            )
        );
        assert_eq!(c.key_base, None);
        // Kitex: the address, and Kitex's default weight.
        let c = spec(ValueFormat::Kitex).validate().unwrap();
        assert_eq!(&*c.key, "kitex/registry-etcd/helloworld/10.0.0.5:9000");
        assert!(c.value.contains(r#""weight":10"#), "{}", c.value);
        let c = spec(ValueFormat::Kitex).weight(3).validate().unwrap();
        assert!(c.value.contains(r#""weight":3"#), "{}", c.value);
        // go-micro: `<service>-<UUID>`, the node's id; version "latest".
        let c = spec(ValueFormat::GoMicro).validate().unwrap();
        let id = c.key.strip_prefix("/micro/registry/helloworld/").unwrap();
        assert!(id.starts_with("helloworld-"), "{id}");
        assert!(c.value.contains(&format!(r#""id":"{id}""#)), "{}", c.value);
        assert!(c.value.contains(r#""version":"latest""#), "{}", c.value);
        // A prefix given is kept as written.
        let c = spec(ValueFormat::Plain).prefix("").validate().unwrap();
        assert_eq!(&*c.key, "helloworld/10.0.0.5:9000");
        let c = spec(ValueFormat::EtcdNaming)
            .prefix("/fleet")
            .weight(2)
            .validate()
            .unwrap();
        assert_eq!(&*c.key, "/fleet/helloworld/10.0.0.5:9000");
        assert!(
            c.value.contains(r#""Metadata":{"weight":2}"#),
            "{}",
            c.value
        );
    }

    #[test]
    fn bad_specs_are_typed_errors() {
        let err = |s: RegistrationSpec| s.validate().unwrap_err();
        assert!(matches!(
            err(RegistrationSpec::new("", "h:1")),
            RegistrationError::Service(_)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a/b", "h:1")),
            RegistrationError::Service(_)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h")),
            RegistrationError::Addr(_)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h:1").ttl(Duration::from_secs(1))),
            RegistrationError::TtlTooShort(_)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h:1").ttl(Duration::from_millis(2500))),
            RegistrationError::TtlNotWholeSeconds(_)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h:1")
                .format(ValueFormat::Plain)
                .metadata(serde_json::json!({"k": "v"}))),
            RegistrationError::Value(EncodeError::NotCarried {
                format: ValueFormat::Plain,
                what: "metadata"
            })
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h:1").weight(0)),
            RegistrationError::BadWeight(0)
        ));
        assert!(matches!(
            err(RegistrationSpec::new("a", "h:1")
                .format(ValueFormat::GoZero)
                .weight(2)),
            RegistrationError::Value(EncodeError::NotCarried { .. })
        ));
        // Null metadata is no metadata.
        assert!(RegistrationSpec::new("a", "h:1")
            .format(ValueFormat::Plain)
            .metadata(serde_json::Value::Null)
            .validate()
            .is_ok());
    }
}
