//! The per-service watch task: range get, then watch from the get's revision + 1;
//! on cancel, compaction or a lost connection: back off, re-list, re-watch.
//! While etcd is unreachable the last published endpoints keep serving.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, KeyValue, WatchOptions};

use super::value::{BackendAddr, EndpointValue};
use super::Service;
use crate::balance::{Backend, EndpointSet};
use crate::endpoint::Endpoint;
use crate::upstream::{Upstream, UpstreamConfig};

/// Time allowed for one etcd request (range get, watch creation).
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a list-and-watch round ended.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error("etcd: {0}")]
    Etcd(#[from] etcd_client::Error),
    #[error("etcd request timed out after {0:?}")]
    Timeout(Duration),
    #[error("watch cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("watch compacted at revision {0}; re-listing")]
    Compacted(i64),
    #[error("watch stream ended")]
    Ended,
}

/// The endpoint keys of one service as last seen, and the backends built for them.
struct WatchState {
    service: Arc<Service>,
    upstream_config: UpstreamConfig,
    /// etcd key → endpoint, for keys whose value decoded.
    keys: HashMap<Vec<u8>, Endpoint>,
    /// One backend per distinct address, kept across snapshots.
    backends: HashMap<BackendAddr, Arc<Backend>>,
    /// (key, mod revision) of malformed values already logged.
    logged_bad: HashSet<(Vec<u8>, i64)>,
}

impl WatchState {
    /// Applies a PUT: a decodable value adds or moves the endpoint, another removes it.
    fn put(&mut self, kv: &KeyValue) -> bool {
        match EndpointValue::decode(kv.value()) {
            Ok(v) => {
                let mut ep = Endpoint::new(v.addr);
                ep.metadata = v.metadata;
                self.keys.insert(kv.key().to_vec(), ep.clone()) != Some(ep)
            }
            Err(e) => {
                if self
                    .logged_bad
                    .insert((kv.key().to_vec(), kv.mod_revision()))
                {
                    tracing::warn!(
                        service = %self.service.name(),
                        key = %String::from_utf8_lossy(kv.key()),
                        reason = %e,
                        "skipping malformed endpoint value"
                    );
                }
                self.keys.remove(kv.key()).is_some()
            }
        }
    }

    fn delete(&mut self, key: &[u8]) -> bool {
        self.keys.remove(key).is_some()
    }

    /// Replaces the whole key set with a fresh listing.
    fn replace(&mut self, kvs: &[KeyValue]) {
        self.keys.clear();
        for kv in kvs {
            self.put(kv);
        }
    }

    /// Builds and publishes a snapshot of the current endpoints, reusing backends (and
    /// their connections) by address.
    fn publish(&mut self) {
        let wanted: HashMap<&BackendAddr, &Endpoint> =
            self.keys.values().map(|ep| (&ep.addr, ep)).collect();
        let name = self.service.name();
        self.backends.retain(|addr, _| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(service = %name, backend = %addr, "endpoint removed");
            }
            keep
        });
        for (addr, ep) in wanted {
            match self.backends.get(addr) {
                Some(b) => {
                    b.update(ep);
                }
                None => {
                    tracing::info!(service = %name, backend = %addr, weight = ep.weight, "endpoint added");
                    let up = Upstream::new(addr.clone(), &self.upstream_config);
                    up.start(self.upstream_config.clone());
                    self.backends.insert(
                        addr.clone(),
                        Backend::new(up, ep, Arc::clone(self.service.balancer().settings())),
                    );
                }
            }
        }
        let set = EndpointSet::new(self.backends.values().cloned().collect());
        self.service.publish(set);
    }
}

/// Runs the watch of one service forever (until aborted).
pub(super) async fn run(
    service: Arc<Service>,
    mut client: Client,
    key_prefix: String,
    upstream_config: UpstreamConfig,
) {
    let mut state = WatchState {
        service,
        upstream_config,
        keys: HashMap::new(),
        backends: HashMap::new(),
        logged_bad: HashSet::new(),
    };
    let mut backoff = BACKOFF_MIN;
    loop {
        let err = sync(&mut client, &key_prefix, &mut state, &mut backoff).await;
        let svc = &state.service;
        if svc.etcd_reachable.swap(false, Ordering::Relaxed) {
            tracing::warn!(
                service = %svc.name(),
                error = %err,
                endpoints = state.backends.len(),
                "etcd watch lost; keeping last known endpoints"
            );
        } else {
            tracing::debug!(service = %svc.name(), error = %err, "etcd still unreachable");
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(BACKOFF_MAX);
    }
}

async fn with_timeout<T>(
    fut: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, SyncError> {
    match tokio::time::timeout(ETCD_REQUEST_TIMEOUT, fut).await {
        Ok(r) => Ok(r?),
        Err(_) => Err(SyncError::Timeout(ETCD_REQUEST_TIMEOUT)),
    }
}

/// One round: list, publish, then watch until something ends the watch.
async fn sync(
    client: &mut Client,
    key_prefix: &str,
    state: &mut WatchState,
    backoff: &mut Duration,
) -> SyncError {
    let listing =
        match with_timeout(client.get(key_prefix, Some(GetOptions::new().with_prefix()))).await {
            Ok(l) => l,
            Err(e) => return e,
        };
    let revision = listing.header().map_or(0, |h| h.revision());
    state.replace(listing.kvs());
    state.publish();
    *backoff = BACKOFF_MIN;
    let svc = Arc::clone(&state.service);
    if !svc.etcd_reachable.swap(true, Ordering::Relaxed) {
        tracing::info!(
            service = %svc.name(),
            prefix = key_prefix,
            revision,
            endpoints = state.backends.len(),
            "endpoints listed from etcd; watching"
        );
    }

    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = match with_timeout(client.watch(key_prefix, Some(options))).await {
        Ok(s) => s,
        Err(e) => return e,
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return SyncError::Ended,
            Err(e) => return SyncError::Etcd(e),
        };
        if resp.compact_revision() > 0 {
            return SyncError::Compacted(resp.compact_revision());
        }
        if resp.canceled() {
            return SyncError::Cancelled(resp.cancel_reason().to_owned());
        }
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            changed |= match event.event_type() {
                EventType::Put => state.put(kv),
                EventType::Delete => state.delete(kv.key()),
            };
        }
        if changed {
            state.publish();
        }
    }
}
