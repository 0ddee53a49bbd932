//! One watched service: its current endpoint snapshot, its balancer, whether its first
//! listing has arrived, and its watch tasks (the one publishing, and a newer one a
//! reload started, until that one's first snapshot). Each watch task follows one stream
//! of [`Update`]s from the endpoint source, reconciles them into backends and publishes
//! the snapshots.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, MutexGuard};
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};
use tokio::sync::Notify;
use tokio::task::AbortHandle;

use super::source::{Update, Updates};
use crate::balance::{Backend, Balancer, EndpointSet, Reconciler};
use crate::metrics::ServiceMetrics;
use crate::route::ServiceName;

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
    pub(super) loaded_notify: Notify,
    pub(super) etcd_reachable: AtomicBool,
    /// A published snapshot had an endpoint.
    ever_served: AtomicBool,
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
            loaded_notify: Notify::new(),
            etcd_reachable: AtomicBool::new(false),
            ever_served: AtomicBool::new(false),
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

    /// Whether the service's first snapshot (its source's first full listing) is out.
    #[inline]
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Whether the watch currently sees its registry (for etcd: its watches are up).
    pub fn etcd_reachable(&self) -> bool {
        self.etcd_reachable.load(Ordering::Relaxed)
    }

    /// Whether a snapshot of this service with an endpoint was published at some point
    /// (a service that was served, as opposed to a name nobody registered).
    #[inline]
    pub fn ever_served(&self) -> bool {
        self.ever_served.load(Ordering::Relaxed)
    }

    /// Waits up to `timeout` for the first snapshot, which itself waits a moment for its
    /// endpoints' first connect attempts; returns whether it came.
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

    pub(super) fn watching(&self) -> MutexGuard<'_, Watching> {
        self.watching.lock()
    }

    /// Starts a watch of the service that follows `updates`, reconciled by
    /// `reconciler`. The watch running now, if any, keeps publishing until the new one
    /// publishes its first snapshot (its first full listing), then stops: calls are
    /// served throughout. The service's first snapshot waits up to `settle` for its
    /// endpoints' first connect attempts, so that its first calls find them connected.
    pub(super) fn watch(
        self: &Arc<Self>,
        updates: Updates,
        reconciler: Reconciler,
        settle: Duration,
    ) {
        let mut w = self.watching();
        w.started += 1;
        let generation = w.started;
        let follow = Follow {
            service: Arc::clone(self),
            generation,
            reconciler,
            settle,
        };
        let task = tokio::spawn(follow.run(updates));
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

    /// Publishes the current backends again, in a snapshot made with the balancer's
    /// steering as it is now (a reload changed the zone or the rules). A service not
    /// loaded yet gets its first snapshot from its watch.
    pub(super) fn republish(&self) {
        let _w = self.watching();
        if !self.is_loaded() {
            return;
        }
        let backends = self.endpoints().iter().cloned().collect();
        self.publish(self.balancer.snapshot(backends));
    }

    pub(super) fn publish(&self, set: EndpointSet) {
        if !set.is_empty() && !self.ever_served.load(Ordering::Relaxed) {
            self.ever_served.store(true, Ordering::Relaxed);
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

/// One watch of a service: follows its source's updates and publishes what they make.
struct Follow {
    service: Arc<Service>,
    /// Which of the service's watches this is (a reload starts a new one).
    generation: u64,
    reconciler: Reconciler,
    /// How long the service's first snapshot may wait for its endpoints' connections.
    settle: Duration,
}

impl Follow {
    /// Applies `updates` until they end (or the task is aborted); publishes a snapshot
    /// after each change from the first full listing on, and sets the service's
    /// reachability while this watch is the one publishing.
    async fn run(mut self, mut updates: Updates) {
        let (mut listed, mut published, mut reachable) = (false, false, false);
        while let Some(update) = updates.recv().await {
            let balancer = &self.service.balancer;
            let changed = !matches!(update, Update::Reachable(_));
            match update {
                Update::Reset(endpoints) => {
                    if !published {
                        // A watch replacing another takes over the backends it still
                        // lists, with their connections and state.
                        self.reconciler.adopt(self.service.endpoints().iter());
                    }
                    self.reconciler.reset(balancer, &endpoints);
                    listed = true;
                }
                Update::Add(endpoints) => self.reconciler.add(balancer, &endpoints),
                Update::Remove(addrs) => self.reconciler.remove(&addrs),
                Update::Reachable(r) => reachable = r,
            }
            if listed && changed {
                let backends = self.reconciler.backends();
                if !self.service.is_loaded() {
                    settle(&backends, self.settle).await;
                }
                published |= self.service.publish_from(self.generation, backends);
            }
            if published && self.service.is_current(self.generation) {
                self.service
                    .etcd_reachable
                    .store(reachable, Ordering::Relaxed);
            }
        }
    }
}

/// Waits until every backend's connect attempt has ended, or `bound`, whichever first.
async fn settle(backends: &[Arc<Backend>], bound: Duration) {
    let all = futures_util::future::join_all(backends.iter().map(|b| b.upstream().wait_settled()));
    let _ = tokio::time::timeout(bound, all).await;
}
