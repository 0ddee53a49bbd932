//! One watched service: its current endpoint snapshot, its balancer, whether its first
//! listing has arrived, and its watch tasks (the one publishing, and a newer one a
//! reload started, until that one's first snapshot).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use crate::balance::{Backend, Balancer, EndpointSet};
use crate::metrics::ServiceMetrics;
use crate::route::ServiceName;
use crate::upstream::UpstreamConfig;

/// A service's last use is written at most this often (nanoseconds): calls of a busy
/// service then read its timestamp's cache line without writing it.
const TOUCH_EVERY_NS: u64 = 1_000_000_000;

/// One watched service: its current endpoints and its balancer.
#[derive(Debug)]
pub struct Service {
    pub(super) name: ServiceName,
    pub(super) endpoints: ArcSwap<EndpointSet>,
    pub(super) balancer: Balancer,
    pub(super) loaded: AtomicBool,
    /// A published snapshot had an endpoint: the name is a service, even while it has none.
    served: AtomicBool,
    pub(super) loaded_notify: Notify,
    pub(super) etcd_reachable: AtomicBool,
    /// Its watch tasks: the one publishing, and one started by a reload, if any.
    watching: Mutex<Watching>,
    pub(super) metrics: Arc<ServiceMetrics>,
    /// Counts published snapshots, so health watchers wake on each change.
    pub(super) changes: tokio::sync::watch::Sender<u64>,
    /// When a call last looked it up ([`crate::clock::now_ns`], to within a second).
    pub(super) last_used: AtomicU64,
}

impl Service {
    pub(super) fn new(name: ServiceName, metrics: Arc<ServiceMetrics>, balancer: Balancer) -> Self {
        Self {
            name,
            endpoints: ArcSwap::from_pointee(EndpointSet::default()),
            balancer,
            loaded: AtomicBool::new(false),
            served: AtomicBool::new(false),
            loaded_notify: Notify::new(),
            etcd_reachable: AtomicBool::new(false),
            watching: Mutex::new(Watching::default()),
            metrics,
            changes: tokio::sync::watch::Sender::new(0),
            last_used: AtomicU64::new(crate::clock::now_ns()),
        }
    }

    /// Notes a use at `now`; written only when the last one noted is a second old.
    #[inline]
    pub(super) fn touch(&self, now: u64) {
        if now.saturating_sub(self.last_used.load(Ordering::Relaxed)) >= TOUCH_EVERY_NS {
            self.last_used.store(now, Ordering::Relaxed);
        }
    }

    /// When a call last looked it up (to within a second).
    pub(super) fn last_used(&self) -> u64 {
        self.last_used.load(Ordering::Relaxed)
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

    /// Whether this service ever had an endpoint since it was first looked up (a name
    /// never served is not a service: its calls are UNIMPLEMENTED, its health unknown).
    #[inline]
    pub fn ever_served(&self) -> bool {
        self.served.load(Ordering::Relaxed)
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

    pub(super) fn watching(&self) -> std::sync::MutexGuard<'_, Watching> {
        self.watching.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts a watch of the service under `key_prefixes`. The watch running now, if
    /// any, keeps publishing until the new one publishes its first snapshot (every
    /// prefix listed), then stops: calls are served throughout.
    pub(super) fn watch(
        self: &Arc<Self>,
        etcd: etcd_client::Client,
        key_prefixes: Vec<String>,
        upstream: UpstreamConfig,
    ) {
        let mut w = self.watching();
        w.started += 1;
        let generation = w.started;
        let task = tokio::spawn(super::watch::run(
            Arc::clone(self),
            etcd,
            key_prefixes,
            upstream,
            generation,
        ));
        // A watch started by an earlier reload that never published is not wanted now.
        if let Some((_, older)) = w.next.replace((generation, task.abort_handle())) {
            older.abort();
        }
    }

    /// Whether the watch of `generation` is the one publishing.
    pub(super) fn is_current(&self, generation: u64) -> bool {
        self.watching().current == generation
    }

    /// Publishes a snapshot of `backends` made by the watch of `generation`: the newest
    /// watch takes over with its first snapshot (the one it replaces is stopped); a
    /// replaced watch publishes nothing (nor tells the health accounting of its
    /// backends). Returns whether it was published.
    pub(super) fn publish_from(&self, generation: u64, backends: Vec<Arc<Backend>>) -> bool {
        let mut w = self.watching();
        if generation != w.current {
            match w.next.take() {
                Some((next, task)) if next == generation => {
                    if let Some(old) = w.task.replace(task) {
                        old.abort();
                    }
                    w.current = generation;
                }
                other => {
                    w.next = other;
                    return false;
                }
            }
        }
        // Under the lock: a replaced watch cannot publish after its successor.
        self.publish(self.balancer.snapshot(backends));
        true
    }

    pub(super) fn publish(&self, set: EndpointSet) {
        if !set.is_empty() {
            self.served.store(true, Ordering::Relaxed);
        }
        self.endpoints.store(Arc::new(set));
        if !self.loaded.swap(true, Ordering::AcqRel) {
            self.loaded_notify.notify_waiters();
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// Wakes on every published snapshot (for health watchers; not the call path).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    pub(super) fn stop(&self) {
        let mut w = self.watching();
        if let Some(h) = w.task.take() {
            h.abort();
        }
        if let Some((_, h)) = w.next.take() {
            h.abort();
        }
    }
}

/// A service's watch tasks, by generation (each watch started gets the next one).
#[derive(Debug, Default)]
pub(super) struct Watching {
    /// Watches started so far.
    pub(super) started: u64,
    /// The generation of the watch whose snapshots are published (0: none yet).
    pub(super) current: u64,
    /// The task of the watch publishing.
    pub(super) task: Option<AbortHandle>,
    /// A newer watch, until its first snapshot.
    pub(super) next: Option<(u64, AbortHandle)>,
}
