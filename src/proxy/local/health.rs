//! `grpc.health.v1.Health` answered by the proxy.
//!
//! On a listener that routes by path, service `""` is the proxy itself (SERVING, or
//! NOT_SERVING while it drains); any other name is the service registered in etcd under
//! that name (or under its route's name):
//! - SERVING while it has at least one usable endpoint;
//! - NOT_SERVING while it has endpoints but none usable (unreachable, ejected, failing
//!   their active checks), and while it has none left after having had some (the last
//!   node left: the service exists, it is down);
//! - unknown (Check: NOT_FOUND; Watch: SERVICE_UNKNOWN, then updates) while no endpoint of
//!   that name was ever registered since the proxy looked it up, as the gRPC health spec
//!   keeps SERVICE_UNKNOWN for names the server does not know.
//!
//! On a listener bound to a service, every name is that service (a client that dialed the
//! listener dialed it), and no endpoint means NOT_SERVING (with `--forward-health`, a bound
//! listener passes health calls to the service's backends instead). While the proxy
//! drains, every name is NOT_SERVING, and watches end after saying so, so that they do not
//! hold the drain up.
//!
//! `Watch` wakes on each endpoint snapshot discovery publishes, and re-checks every
//! [`RECHECK`] for connection state changes (a backend becoming unreachable), which are
//! not published.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::watch;
use tonic::{Request, Response, Status};
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_server::Health;
use tonic_health::pb::{HealthCheckRequest, HealthCheckResponse};

use super::LocalContext;
use crate::balance::Fit;
use crate::discovery::{DiscoveryError, Service};
use crate::route::validate_service_name;

/// How often a `Watch` re-checks its service's endpoints between published changes.
pub const RECHECK: Duration = Duration::from_secs(1);

/// Names the proxy serves itself: their health is the proxy's.
const OWN_SERVICES: [&str; 4] = [
    "",
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The health service of one listener.
#[derive(Debug)]
pub struct HealthService {
    ctx: Arc<LocalContext>,
    /// The service of a bound listener.
    bound: Option<Arc<Service>>,
}

/// Whose health a request asks for.
#[derive(Debug, Clone)]
enum Subject {
    /// The proxy itself.
    Proxy,
    /// A service (`bound`: the listener's own).
    Service { service: Arc<Service>, bound: bool },
    /// A name that cannot be a registered service.
    Unknown,
}

impl Subject {
    /// The subject's status now; `None` while its endpoints are not known yet.
    fn status(&self, draining: bool) -> Option<ServingStatus> {
        if draining {
            return Some(ServingStatus::NotServing);
        }
        match self {
            Subject::Proxy => Some(ServingStatus::Serving),
            Subject::Unknown => Some(ServingStatus::ServiceUnknown),
            Subject::Service { service, bound } => {
                if !service.is_loaded() {
                    return None;
                }
                let set = service.endpoints();
                Some(if set.iter().any(|b| b.fit() != Fit::No) {
                    ServingStatus::Serving
                } else if set.is_empty() && !bound && !service.ever_served() {
                    ServingStatus::ServiceUnknown
                } else {
                    ServingStatus::NotServing
                })
            }
        }
    }
}

impl HealthService {
    /// The health service of a listener (bound to `bound`, if set).
    pub fn new(ctx: Arc<LocalContext>, bound: Option<Arc<Service>>) -> Self {
        Self { ctx, bound }
    }

    fn subject(&self, name: &str) -> Result<Subject, Status> {
        if let Some(service) = &self.bound {
            return Ok(Subject::Service {
                service: Arc::clone(service),
                bound: true,
            });
        }
        if OWN_SERVICES.contains(&name) {
            return Ok(Subject::Proxy);
        }
        if validate_service_name(name).is_err() {
            return Ok(Subject::Unknown);
        }
        let found = {
            let routing = self.ctx.routing.load();
            self.ctx.discovery.service(routing.routes.resolve(name))
        };
        match found {
            Ok(service) => Ok(Subject::Service {
                service,
                bound: false,
            }),
            // Found with no endpoints moments ago (not looked up again for a few seconds).
            Err(DiscoveryError::NoEndpoints(_)) => Ok(Subject::Unknown),
            Err(e) => Err(Status::resource_exhausted(format!("switchyard: {e}"))),
        }
    }

    fn draining(&self) -> bool {
        *self.ctx.draining.borrow()
    }
}

fn answer(status: ServingStatus) -> HealthCheckResponse {
    HealthCheckResponse {
        status: status as i32,
    }
}

/// The stream of a `Watch`.
type WatchStream = Pin<Box<dyn Stream<Item = Result<HealthCheckResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Health for HealthService {
    async fn check(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<HealthCheckResponse>, Status> {
        let name = request.into_inner().service;
        let subject = self.subject(&name)?;
        if let Subject::Service { service, .. } = &subject {
            if !service.is_loaded() {
                let wait = self.ctx.routing.load().discovery_timeout;
                service.wait_loaded(wait).await;
            }
        }
        match subject.status(self.draining()) {
            Some(ServingStatus::ServiceUnknown) => Err(Status::not_found(format!(
                "switchyard: no endpoint of service '{name}' is registered in etcd"
            ))),
            Some(status) => Ok(Response::new(answer(status))),
            None => Err(Status::unavailable(format!(
                "switchyard: endpoints of service '{name}' not known yet (etcd unreachable?)"
            ))),
        }
    }

    type WatchStream = WatchStream;

    async fn watch(
        &self,
        request: Request<HealthCheckRequest>,
    ) -> Result<Response<WatchStream>, Status> {
        let subject = self.subject(&request.into_inner().service)?;
        let changes = match &subject {
            Subject::Service { service, .. } => Some(service.subscribe()),
            _ => None,
        };
        let mut recheck = tokio::time::interval(RECHECK);
        recheck.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let watching = Watching {
            subject,
            changes,
            draining: self.ctx.draining.clone(),
            recheck,
            last: None,
            done: false,
        };
        Ok(Response::new(Box::pin(futures_util::stream::unfold(
            watching,
            Watching::next,
        ))))
    }
}

/// What woke a `Watch` (`false`: that source has gone away).
enum Wake {
    Published(bool),
    Draining(bool),
    Recheck,
}

/// The state of one `Watch`: what was sent last, and what wakes it.
struct Watching {
    subject: Subject,
    /// Published endpoint snapshots of the service (`None`: nothing to follow).
    changes: Option<watch::Receiver<u64>>,
    draining: watch::Receiver<bool>,
    recheck: tokio::time::Interval,
    last: Option<ServingStatus>,
    /// NOT_SERVING was sent while draining: the stream ends.
    done: bool,
}

impl Watching {
    /// The next status to send: at once if it differs from the last one sent, else
    /// when it changes.
    async fn next(mut self) -> Option<(Result<HealthCheckResponse, Status>, Self)> {
        if self.done {
            return None;
        }
        loop {
            if let Some(changes) = self.changes.as_mut() {
                changes.borrow_and_update();
            }
            let draining = *self.draining.borrow_and_update();
            if let Some(now) = self.subject.status(draining) {
                if self.last != Some(now) {
                    self.last = Some(now);
                    self.done = draining;
                    return Some((Ok(answer(now)), self));
                }
            }
            if draining {
                return None;
            }
            let Watching {
                changes,
                draining,
                recheck,
                ..
            } = &mut self;
            let changed = async {
                match changes.as_mut() {
                    Some(c) => c.changed().await.is_ok(),
                    None => std::future::pending().await,
                }
            };
            let woke = tokio::select! {
                ok = changed => Wake::Published(ok),
                r = draining.changed() => Wake::Draining(r.is_ok()),
                _ = recheck.tick() => Wake::Recheck,
            };
            match woke {
                // The service is gone (the proxy is stopping): only the re-check is left.
                Wake::Published(false) => self.changes = None,
                // The proxy has stopped.
                Wake::Draining(false) => return None,
                Wake::Published(true) | Wake::Draining(true) | Wake::Recheck => {}
            }
        }
    }
}
