//! The process's upstreams, one per backend address: every service whose endpoints name
//! an address shares its connections. The pool keeps upstreams weakly: the services'
//! backends hold them, and an address no service lists any more is let go (its
//! connections close once their streams end). Looked up when endpoints change, never
//! per call.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use parking_lot::Mutex;

use super::{CloseReason, Upstream, UpstreamConfig};
use crate::endpoint::BackendAddr;

/// Counts of the pool's connections, read at scrape time.
#[derive(Debug, Default)]
pub struct PoolStats {
    /// Connections open now.
    pub open: AtomicU64,
    /// Connections opened, ever.
    pub opened: AtomicU64,
    /// Connections closed, ever, by [`CloseReason`] (in [`CloseReason::ALL`]'s order).
    pub closed: [AtomicU64; CloseReason::ALL.len()],
    /// Streams a backend refused before processing them (each sent again).
    pub refused: AtomicU64,
}

impl PoolStats {
    /// Connections closed for `reason`, ever.
    pub fn closed(&self, reason: CloseReason) -> u64 {
        self.closed[reason as usize].load(Ordering::Relaxed)
    }
}

/// The upstreams of every backend address, shared by all services.
#[derive(Debug)]
pub struct UpstreamPool {
    config: UpstreamConfig,
    by_addr: Mutex<HashMap<BackendAddr, Weak<Upstream>>>,
    stats: Arc<PoolStats>,
}

impl UpstreamPool {
    /// A pool whose connections use `config` (TLS applies to every backend: the key is
    /// the address alone).
    pub fn new(config: UpstreamConfig) -> Arc<Self> {
        Arc::new(Self {
            config,
            by_addr: Mutex::new(HashMap::new()),
            stats: Arc::default(),
        })
    }

    /// The upstream of `addr`: the one services already use, or a new one, connecting.
    pub fn get(&self, addr: &BackendAddr) -> Arc<Upstream> {
        let mut map = self.by_addr.lock();
        if let Some(up) = map.get(addr).and_then(Weak::upgrade) {
            return up;
        }
        // Forget the addresses nobody uses before the table grows.
        if map.len() >= 64 && map.len().is_power_of_two() {
            map.retain(|_, w| w.strong_count() > 0);
        }
        let up = Upstream::with_stats(addr.clone(), &self.config, Arc::clone(&self.stats));
        up.start(self.config.clone());
        map.insert(addr.clone(), Arc::downgrade(&up));
        up
    }

    /// The settings of the pool's connections.
    pub fn config(&self) -> &UpstreamConfig {
        &self.config
    }

    /// The counts of the pool's connections.
    pub fn stats(&self) -> &PoolStats {
        &self.stats
    }

    /// Backend addresses with an upstream in use.
    pub fn len(&self) -> usize {
        let map = self.by_addr.lock();
        map.values().filter(|w| w.strong_count() > 0).count()
    }

    /// Whether no address has an upstream in use.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn one_upstream_per_address_while_anyone_holds_it() {
        let pool = UpstreamPool::new(UpstreamConfig::default());
        let a: BackendAddr = "127.0.0.1:9".parse().unwrap();
        let b: BackendAddr = "127.0.0.1:10".parse().unwrap();
        let a1 = pool.get(&a);
        let a2 = pool.get(&a);
        assert!(Arc::ptr_eq(&a1, &a2));
        let b1 = pool.get(&b);
        assert!(!Arc::ptr_eq(&a1, &b1));
        assert_eq!(pool.len(), 2);
        drop((a1, a2));
        assert_eq!(pool.len(), 1);
        // A new one once nobody held the old.
        let a3 = pool.get(&a);
        assert_eq!(a3.addr(), &a);
        assert_eq!(pool.len(), 2);
    }
}
