//! Discovery: one watched endpoint set per service, read from etcd.
//!
//! Services are watched on demand: the first call for a service starts its watch task
//! ([`watch`]); later calls read the service's current [`EndpointSet`] snapshot, with no
//! etcd round trip and no lock shared by all calls.

mod watch;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::balance::{Balancer, EndpointSet};
use crate::metrics::{Metrics, ServiceMetrics};
use crate::route::{ServiceName, ServiceNameError};
use crate::upstream::UpstreamConfig;

/// Why a service could not be looked up.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    /// The service name is not valid.
    #[error(transparent)]
    BadName(#[from] ServiceNameError),
    /// The limit on watched services was reached.
    #[error("too many services watched (limit {0}); not watching {1:?}")]
    TooManyServices(usize, String),
}

/// Settings of discovery.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// Key prefixes under which services register: a service's endpoints are those
    /// found under any of them (`<prefix>/<service>/`), each prefix watched on its own.
    pub prefixes: Vec<String>,
    /// Limit on the number of services watched at once.
    pub max_services: usize,
    /// Settings for the backend connections of discovered endpoints.
    pub upstream: UpstreamConfig,
    /// Where calls and endpoints are counted.
    pub metrics: Arc<Metrics>,
}

/// Map from service name to its state; replaced whole (copy on write) when a service is added.
type ServiceMap = HashMap<ServiceName, Arc<Service>>;

/// The registry of watched services.
pub struct Discovery {
    etcd: etcd_client::Client,
    config: DiscoveryConfig,
    services: ArcSwap<ServiceMap>,
    /// Serialises additions to `services` (cold path only).
    adding: Mutex<()>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("config", &self.config)
            .field("services", &self.services.load().len())
            .finish()
    }
}

impl Discovery {
    /// A registry that watches services under `config.prefixes` in `etcd`.
    pub fn new(etcd: etcd_client::Client, config: DiscoveryConfig) -> Arc<Self> {
        Arc::new(Self {
            etcd,
            config,
            services: ArcSwap::from_pointee(HashMap::new()),
            adding: Mutex::new(()),
        })
    }

    /// The service named `name`, starting its watch if this is the first call for it.
    #[inline]
    pub fn service(&self, name: &str) -> Result<Arc<Service>, DiscoveryError> {
        if let Some(s) = self.services.load().get(name) {
            return Ok(Arc::clone(s));
        }
        self.add_service(name)
    }

    #[cold]
    fn add_service(&self, name: &str) -> Result<Arc<Service>, DiscoveryError> {
        let name = ServiceName::new(name)?;
        let _guard = self.adding.lock().unwrap_or_else(|p| p.into_inner());
        let current = self.services.load_full();
        if let Some(s) = current.get(name.as_str()) {
            return Ok(Arc::clone(s));
        }
        if current.len() >= self.config.max_services {
            return Err(DiscoveryError::TooManyServices(
                self.config.max_services,
                name.to_string(),
            ));
        }
        let metrics = self.config.metrics.service(name.as_str());
        let service = Arc::new(Service::new(name.clone(), Arc::clone(&metrics)));
        let upstream_config = UpstreamConfig {
            metrics: Some(metrics),
            ..self.config.upstream.clone()
        };
        let task = tokio::spawn(watch::run(
            Arc::clone(&service),
            self.etcd.clone(),
            self.config
                .prefixes
                .iter()
                .map(|p| crate::registry::service_prefix(p, name.as_str()))
                .collect(),
            upstream_config,
        ));
        if let Ok(mut t) = service.task.lock() {
            *t = Some(task.abort_handle());
        }
        let mut next = ServiceMap::clone(&current);
        next.insert(name.clone(), Arc::clone(&service));
        self.services.store(Arc::new(next));
        tracing::info!(service = %name, "watching service");
        Ok(service)
    }

    /// The metrics registry calls are counted in.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.config.metrics
    }

    /// All services watched so far.
    pub fn services(&self) -> Vec<Arc<Service>> {
        let mut v: Vec<_> = self.services.load().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }
}

impl Drop for Discovery {
    fn drop(&mut self) {
        for s in self.services.load().values() {
            s.stop();
        }
    }
}

/// One watched service: its current endpoints and its balancer.
#[derive(Debug)]
pub struct Service {
    name: ServiceName,
    endpoints: ArcSwap<EndpointSet>,
    balancer: Balancer,
    loaded: AtomicBool,
    loaded_notify: Notify,
    etcd_reachable: AtomicBool,
    task: Mutex<Option<AbortHandle>>,
    metrics: Arc<ServiceMetrics>,
}

impl Service {
    fn new(name: ServiceName, metrics: Arc<ServiceMetrics>) -> Self {
        Self {
            name,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            balancer: Balancer::default(),
            loaded: AtomicBool::new(false),
            loaded_notify: Notify::new(),
            etcd_reachable: AtomicBool::new(false),
            task: Mutex::new(None),
            metrics,
        }
    }

    /// The service's metric handles.
    #[inline]
    pub fn metrics(&self) -> &Arc<ServiceMetrics> {
        &self.metrics
    }

    /// The service's name.
    pub fn name(&self) -> &ServiceName {
        &self.name
    }

    /// The current endpoint snapshot.
    #[inline]
    pub fn endpoints(&self) -> Guard<Arc<EndpointSet>> {
        self.endpoints.load()
    }

    /// The current endpoint snapshot, as an owned `Arc` (to hold across awaits).
    #[inline]
    pub fn endpoints_full(&self) -> Arc<EndpointSet> {
        self.endpoints.load_full()
    }

    /// The service's balancer, which picks a backend for each call.
    #[inline]
    pub fn balancer(&self) -> &Balancer {
        &self.balancer
    }

    /// Whether the endpoint list was loaded from etcd at least once.
    #[inline]
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Whether the watch is currently connected to etcd.
    pub fn etcd_reachable(&self) -> bool {
        self.etcd_reachable.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the first endpoint list; returns whether it arrived.
    pub async fn wait_loaded(&self, timeout: Duration) -> bool {
        let wait = async {
            loop {
                let notified = self.loaded_notify.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if self.is_loaded() {
                    return;
                }
                notified.await;
            }
        };
        tokio::time::timeout(timeout, wait).await.is_ok()
    }

    fn publish(&self, set: EndpointSet) {
        self.endpoints.store(Arc::new(set));
        if !self.loaded.swap(true, Ordering::AcqRel) {
            self.loaded_notify.notify_waiters();
        }
    }

    fn stop(&self) {
        if let Ok(mut t) = self.task.lock() {
            if let Some(h) = t.take() {
                h.abort();
            }
        }
    }
}
