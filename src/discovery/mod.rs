//! Discovery: one watched endpoint set per service, read from an endpoint source (etcd).
//!
//! Services are watched on demand: the first call for a service starts its watch, the
//! source's stream of updates ([`EndpointSource`]; etcd's is [`EtcdSource`]), which the
//! [`Service`] reconciles into backends (`balance::Reconciler`) and publishes as
//! snapshots; later calls read the service's current [`crate::balance::EndpointSet`],
//! with no etcd round trip and no lock shared by all calls.
//!
//! The table of watched services is kept by use, so that names nobody serves (made up by
//! a client, by mistake or on purpose) cannot take the room of real services: when the
//! table is full, an entry no call holds is dropped to make room (one without endpoints,
//! least recently used first; else one with endpoints unused for the idle time), and a
//! sweep drops entries without endpoints unused for the idle time. A name dropped to
//! make room while etcd listed nothing for it is answered "no endpoints" for a few
//! seconds without a look-up, so a burst of made-up names costs one look-up per name.

mod etcd;
mod keys;
mod negative;
mod service;
mod source;
#[cfg(test)]
mod source_tests;

pub use etcd::EtcdSource;
pub use negative::NEGATIVE_TTL;
pub use service::Service;
pub use source::{EndpointSource, StaticSource, Update, Updates};

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::task::AbortHandle;

use negative::NegativeCache;

use crate::balance::{BalanceSettings, Balancer, Reconciler, Steering, TrafficRules, UpstreamFor};
use crate::health::HealthSettings;
use crate::metrics::Metrics;
use crate::route::{ServiceName, ServiceNameError};
use crate::upstream::{UpstreamConfig, UpstreamPool};

/// Longest a service's first snapshot waits for its endpoints' first connect attempts
/// (at most the connect timeout), so that its first calls are spread over connected
/// endpoints rather than sent to the first one up.
const FIRST_SNAPSHOT_SETTLE: Duration = Duration::from_secs(1);

/// Strong references to a [`Service`] that nobody is using: the table's and its watch
/// task's. Every call holds one more from lookup to end, a bound listener one for good.
const TABLE_AND_WATCH: usize = 2;

/// Why a service could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The service name is not valid.
    #[error(transparent)]
    BadName(#[from] ServiceNameError),
    /// Every watched service is in use, and the limit on watched services is reached.
    #[error("too many services watched (limit {0}); not watching {1:?}")]
    TooManyServices(usize, String),
    /// etcd listed no endpoints for the service moments ago (it is not looked up again
    /// until [`NEGATIVE_TTL`] has passed).
    #[error("no endpoints registered for service '{0}'")]
    NoEndpoints(ServiceName),
}

/// Settings of discovery.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// The settings at start that a reload may change ([`Discovery::reconfigure`]).
    pub live: LiveConfig,
    /// A service without endpoints and without calls for this long is dropped from the
    /// table (its watch stopped); one with endpoints may be dropped after this long
    /// without calls when the table is full.
    pub service_idle: Duration,
    /// Settings for the backend connections of discovered endpoints.
    pub upstream: UpstreamConfig,
    /// Where calls and endpoints are counted.
    pub metrics: Arc<Metrics>,
}

/// The settings of discovery that a reload changes on the running services.
#[derive(Debug, Clone, PartialEq)]
pub struct LiveConfig {
    /// Key prefixes under which services register, in order: a service's endpoints are
    /// those found under any of them (`<prefix>/<service>/`), each prefix watched on its own.
    pub prefixes: Vec<String>,
    /// Limit on the number of services watched at once (a lower one drops no service:
    /// it refuses new ones until the table is under it).
    pub max_services: usize,
    /// How services' calls are balanced unless overridden below.
    pub balance: BalanceSettings,
    /// Per-service balancing, by service name.
    pub service_balance: HashMap<ServiceName, BalanceSettings>,
    /// Outlier ejection and active health checks.
    pub health: HealthSettings,
    /// The proxy's zone and where endpoints' zones are read; no service's rules here.
    pub steering: Steering,
    /// Traffic rules, by service name.
    pub traffic: HashMap<ServiceName, Arc<TrafficRules>>,
}

impl LiveConfig {
    /// The balancing settings of service `name`.
    fn balance_of(&self, name: &str) -> &BalanceSettings {
        self.service_balance.get(name).unwrap_or(&self.balance)
    }

    /// How the calls of service `name` are steered: the zone, and its traffic rules.
    fn steering_of(&self, name: &str) -> Steering {
        Steering {
            traffic: self.traffic.get(name).cloned(),
            ..self.steering.clone()
        }
    }
}

/// Map from service name to its state; replaced whole (copy on write) when a service is
/// added or dropped. Every call looks its service up here: hashed with foldhash (seeded
/// per process), a fraction of SipHash's cost on short names.
type ServiceMap = HashMap<ServiceName, Arc<Service>, foldhash::fast::RandomState>;

/// Why a service left the table (the `reason` label of its metric).
#[derive(Debug, Clone, Copy, strum::IntoStaticStr)]
#[strum(serialize_all = "lowercase")]
enum DropReason {
    /// Without endpoints and calls for the idle time.
    Idle,
    /// Dropped to make room for another service.
    Room,
}

impl DropReason {
    fn as_str(self) -> &'static str {
        self.into()
    }
}

/// The registry of watched services.
pub struct Discovery {
    source: Arc<dyn EndpointSource>,
    service_idle: Duration,
    /// The backend connections, one pool per address shared by every service.
    pool: Arc<UpstreamPool>,
    metrics: Arc<Metrics>,
    services: ArcSwap<ServiceMap>,
    /// Serialises changes of `services`, and holds what only they use (cold path only).
    changing: Mutex<Changing>,
    /// This registry, for the sweep task (which must not keep it alive).
    me: Weak<Discovery>,
}

/// What changes of the service table use, under [`Discovery::changing`].
#[derive(Debug)]
struct Changing {
    negative: NegativeCache,
    /// The task dropping idle services, started with the first service.
    sweep: Option<AbortHandle>,
    /// The settings in force that a reload may change.
    live: LiveConfig,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("source", &self.source)
            .field("service_idle", &self.service_idle)
            .field("services", &self.services.load().len())
            .finish()
    }
}

impl Discovery {
    /// A registry that watches services in `source`, under `config.live.prefixes`.
    pub fn new(source: Arc<dyn EndpointSource>, config: DiscoveryConfig) -> Arc<Self> {
        let DiscoveryConfig {
            live,
            service_idle,
            upstream,
            metrics,
        } = config;
        Arc::new_cyclic(|me| Self {
            source,
            service_idle,
            pool: UpstreamPool::new(upstream),
            metrics,
            services: ArcSwap::from_pointee(ServiceMap::default()),
            changing: Mutex::new(Changing {
                negative: NegativeCache::default(),
                sweep: None,
                live,
            }),
            me: me.clone(),
        })
    }

    /// Applies `live` to the running services and to those watched from now on (a
    /// reload): balancing and health settings are swapped in each service (its endpoints
    /// keep their state); new prefixes start a new watch per service, and each service
    /// serves its current endpoints until that watch has listed them all, then swaps.
    /// Returns the keys of what changed, for the log.
    pub fn reconfigure(&self, live: LiveConfig) -> Vec<&'static str> {
        let mut changing = self.changing();
        let mut changed = Vec::new();
        let old = std::mem::replace(&mut changing.live, live);
        let Changing { negative, live, .. } = &mut *changing;
        let services = self.services.load_full();
        if old.prefixes != live.prefixes {
            changed.push("etcd.prefix");
            // A name etcd listed nothing for may be listed under the new prefixes.
            *negative = NegativeCache::default();
            for service in services.values() {
                self.start_watch(service, &live.prefixes);
            }
            tracing::info!(
                prefixes = %live.prefixes.join(" "),
                services = services.len(),
                "watching the services under the new prefixes; each serves its current endpoints until they are listed"
            );
        }
        if old.max_services != live.max_services {
            changed.push("limits.max_services");
        }
        if old.balance != live.balance || old.service_balance != live.service_balance {
            changed.push("balance");
        }
        let (o, n) = (&old.health, &live.health);
        if (
            o.eject_after,
            o.eject_for,
            o.max_ejected_percent,
            o.failure_codes,
        ) != (
            n.eject_after,
            n.eject_for,
            n.max_ejected_percent,
            n.failure_codes,
        ) {
            changed.push("ejection");
        }
        if (o.check, o.check_interval) != (n.check, n.check_interval) {
            changed.push("health_check");
        }
        if old.steering != live.steering {
            changed.push("balance.zone");
        }
        if old.traffic != live.traffic {
            changed.push("traffic");
        }
        for service in services.values() {
            let name = service.name().as_str();
            service
                .balancer()
                .set_settings(live.balance_of(name).clone());
            service
                .balancer()
                .health()
                .set_settings(live.health.clone());
            if service.balancer().set_steering(live.steering_of(name)) {
                // The views of the zone and subsets are made with each snapshot.
                service.republish();
            }
        }
        changed
    }

    /// Starts the watch of `service` under `prefixes` (replacing its current one once
    /// the new one has listed every prefix).
    fn start_watch(&self, service: &Arc<Service>, prefixes: &[String]) {
        let config = self.pool.config();
        let tls_on = config.tls.is_some();
        let settle = config.connect_timeout.min(FIRST_SNAPSHOT_SETTLE);
        let pool = Arc::clone(&self.pool);
        let upstream_for: UpstreamFor = Arc::new(move |addr| pool.get(addr));
        let reconciler = Reconciler::new(service.name().clone(), tls_on, upstream_for);
        let updates = self.source.watch(service.name(), prefixes);
        service.watch(updates, reconciler, settle);
    }

    /// The service named `name`, starting its watch if it is not watched.
    #[inline]
    pub fn service(&self, name: &str) -> Result<Arc<Service>, DiscoveryError> {
        if let Some(s) = self.services.load().get(name) {
            s.touch(crate::clock::now_ns());
            return Ok(Arc::clone(s));
        }
        self.add_service(name)
    }

    fn changing(&self) -> MutexGuard<'_, Changing> {
        self.changing.lock()
    }

    fn idle_ns(&self) -> u64 {
        u64::try_from(self.service_idle.as_nanos()).unwrap_or(u64::MAX)
    }

    #[cold]
    fn add_service(&self, name: &str) -> Result<Arc<Service>, DiscoveryError> {
        let name = ServiceName::new(name)?;
        let mut changing = self.changing();
        let current = self.services.load_full();
        if let Some(s) = current.get(name.as_str()) {
            return Ok(Arc::clone(s));
        }
        let now = crate::clock::now_ns();
        if changing.negative.contains(name.as_str(), now) {
            return Err(DiscoveryError::NoEndpoints(name));
        }
        // Chosen before the map is copied: the copy holds every service once more. A
        // table over a limit lowered by a reload drops services (none in use) until the
        // new one fits, or refuses it.
        let max = changing.live.max_services;
        let need = (current.len() + 1).saturating_sub(max);
        let victims: Vec<Arc<Service>> = victims(&current, now, self.idle_ns(), need)
            .into_iter()
            .cloned()
            .collect();
        if victims.len() < need {
            self.metrics.refused_services_full();
            return Err(DiscoveryError::TooManyServices(max, name.to_string()));
        }
        let mut next = ServiceMap::clone(&current);
        for v in victims {
            next.remove(v.name().as_str());
            if v.is_loaded() && v.endpoints().is_empty() {
                changing
                    .negative
                    .insert(v.name().clone(), now, NEGATIVE_TTL);
            }
            self.dropped(&v, DropReason::Room, now);
        }
        let metrics = self.metrics.service(name.as_str());
        let live = &changing.live;
        let balancer = Balancer::new(
            name.as_str(),
            Arc::new(live.balance_of(name.as_str()).clone()),
            live.health.clone(),
        )
        .with_metrics(Arc::clone(&metrics));
        balancer.set_steering(live.steering_of(name.as_str()));
        let service = Arc::new(Service::new(name.clone(), metrics, balancer));
        self.start_watch(&service, &live.prefixes);
        next.insert(name.clone(), Arc::clone(&service));
        self.services.store(Arc::new(next));
        if changing.sweep.is_none() {
            let every =
                (self.service_idle / 2).clamp(Duration::from_millis(100), Duration::from_secs(10));
            changing.sweep = Some(tokio::spawn(sweep(self.me.clone(), every)).abort_handle());
        }
        tracing::info!(service = %name, "watching service");
        Ok(service)
    }

    /// Drops the services without endpoints that nobody has used for the idle time.
    fn drop_idle(&self) {
        let _changing = self.changing();
        let current = self.services.load_full();
        let (now, idle) = (crate::clock::now_ns(), self.idle_ns());
        let gone: Vec<Arc<Service>> = current
            .values()
            .filter(|s| {
                !in_use(s) && s.endpoints().is_empty() && now.saturating_sub(s.last_used()) >= idle
            })
            .cloned()
            .collect();
        if gone.is_empty() {
            return;
        }
        let mut next = ServiceMap::clone(&current);
        for s in &gone {
            next.remove(s.name().as_str());
            self.dropped(s, DropReason::Idle, now);
        }
        self.services.store(Arc::new(next));
    }

    /// Stops a service taken out of the table, and says so.
    fn dropped(&self, service: &Service, reason: DropReason, now: u64) {
        service.stop();
        service.metrics.forget();
        self.metrics.service_dropped(reason.as_str());
        tracing::info!(
            service = %service.name,
            reason = reason.as_str(),
            endpoints = service.endpoints().len(),
            unused_for_s = now.saturating_sub(service.last_used()) / 1_000_000_000,
            "service dropped from the table; its watch is stopped until its next call"
        );
    }

    /// The backend connections shared by every service.
    pub fn pool(&self) -> &Arc<UpstreamPool> {
        &self.pool
    }

    /// The metrics registry calls are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// All services watched now.
    pub fn services(&self) -> Vec<Arc<Service>> {
        let mut v: Vec<_> = self.services.load().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

/// Whether something besides the table and the watch holds `service`: a call in flight
/// (from its lookup to its end), a bound listener, or a reader of the table right now.
fn in_use(service: &Arc<Service>) -> bool {
    Arc::strong_count(service) > TABLE_AND_WATCH
}

/// Up to `n` services of `map` to drop to make room, best first: none that is in use;
/// those without endpoints, least recently used first; then those with endpoints
/// unused for `idle_ns`.
fn victims(map: &ServiceMap, now: u64, idle_ns: u64, n: usize) -> Vec<&Arc<Service>> {
    if n == 0 {
        return Vec::new();
    }
    let mut ranked: Vec<_> = map
        .values()
        .filter(|s| !in_use(s))
        .filter_map(|s| {
            let last = s.last_used();
            if s.endpoints().is_empty() {
                Some(((0u8, last), s))
            } else if now.saturating_sub(last) >= idle_ns {
                Some(((1, last), s))
            } else {
                None
            }
        })
        .collect();
    ranked.sort_by_key(|(rank, _)| *rank);
    ranked.into_iter().take(n).map(|(_, s)| s).collect()
}

/// Drops idle services every `every`, as long as the registry lives.
async fn sweep(discovery: Weak<Discovery>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tick.tick().await;
    loop {
        tick.tick().await;
        match discovery.upgrade() {
            Some(d) => d.drop_idle(),
            None => return,
        }
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        if let Some(sweep) = self.changing().sweep.take() {
            sweep.abort();
        }
        for s in self.services.load().values() {
            s.stop();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use super::*;
    use crate::endpoint::Endpoint;
    use crate::upstream::Upstream;

    const S: u64 = 1_000_000_000;

    fn name(s: &str) -> ServiceName {
        ServiceName::new(s).unwrap()
    }

    /// A service last used at `last`, with one endpoint if `served`.
    fn service(n: &str, last: u64, served: bool) -> Arc<Service> {
        let s = Arc::new(Service::new(
            name(n),
            Metrics::new().service(n),
            Balancer::default(),
        ));
        s.last_used.store(last, Ordering::Relaxed);
        if served {
            let addr: crate::endpoint::BackendAddr = "127.0.0.1:1".parse().unwrap();
            let up = Upstream::new(addr.clone(), &UpstreamConfig::default());
            let backend = s.balancer().add_backend(up, &Endpoint::new(addr));
            s.publish(s.balancer().snapshot(vec![backend]));
        }
        s
    }

    /// A table of `services`, each also held as its watch task would hold it.
    fn table(services: Vec<Arc<Service>>) -> (ServiceMap, Vec<Arc<Service>>) {
        let map = services
            .iter()
            .map(|s| (s.name().clone(), Arc::clone(s)))
            .collect();
        (map, services)
    }

    fn victim_name(map: &ServiceMap, now: u64) -> Option<&str> {
        victims(map, now, 60 * S, 1)
            .first()
            .map(|s| s.name().as_str())
    }

    #[test]
    fn room_is_made_by_the_least_recently_used_service_without_endpoints() {
        let (map, _watches) = table(vec![
            service("served.old", S, true),
            service("empty.recent", 99 * S, false),
            service("empty.older", 50 * S, false),
            service("served.recent", 99 * S, true),
        ]);
        assert_eq!(victim_name(&map, 100 * S), Some("empty.older"));
        // A call holding it keeps it: the next one goes.
        let call = Arc::clone(&map[&name("empty.older")]);
        assert_eq!(victim_name(&map, 100 * S), Some("empty.recent"));
        drop(call);
        assert_eq!(victim_name(&map, 100 * S), Some("empty.older"));
    }

    #[test]
    fn a_served_service_makes_room_only_once_unused_for_the_idle_time() {
        let (map, _watches) = table(vec![
            service("served.a", 10 * S, true),
            service("served.b", 20 * S, true),
        ]);
        // Both used within the idle time (60 s): every entry is busy.
        assert_eq!(victim_name(&map, 69 * S), None);
        assert_eq!(victim_name(&map, 70 * S), Some("served.a"));
        // In use (a call, or a bound listener, holds it): never.
        let bound = Arc::clone(&map[&name("served.a")]);
        assert_eq!(victim_name(&map, 1000 * S), Some("served.b"));
        let call = Arc::clone(&map[&name("served.b")]);
        assert_eq!(victim_name(&map, 1000 * S), None);
        drop((bound, call));
    }

    #[test]
    fn a_table_over_a_lowered_limit_gives_up_several_unused_services() {
        let (map, _watches) = table(vec![
            service("empty.a", 10 * S, false),
            service("served.b", 99 * S, true),
            service("empty.c", 20 * S, false),
        ]);
        let names = |n| -> Vec<&str> {
            victims(&map, 100 * S, 60 * S, n)
                .into_iter()
                .map(|s| s.name().as_str())
                .collect()
        };
        assert!(names(0).is_empty());
        assert_eq!(names(2), ["empty.a", "empty.c"]);
        // The served one was used within the idle time: never more than these two.
        assert_eq!(names(3), ["empty.a", "empty.c"]);
    }

    #[test]
    fn uses_are_noted_at_most_once_a_second() {
        let s = service("a", 10 * S, false);
        s.touch(10 * S + S / 2);
        assert_eq!(s.last_used(), 10 * S);
        s.touch(11 * S);
        assert_eq!(s.last_used(), 11 * S);
    }
}
