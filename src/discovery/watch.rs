//! The per-service watch task: range get, then watch from the get's revision + 1;
//! on cancel, compaction or a lost connection: back off, re-list, re-watch.
//! While etcd is unreachable the last published endpoints keep serving.
//!
//! Values are decoded by [`crate::registry`]: a key may list several endpoints, and an
//! address listed under several keys gets one upstream.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use super::Service;
use crate::backoff::Backoff;
use crate::balance::{Backend, EndpointSet};
use crate::endpoint::{BackendAddr, Endpoint};
use crate::etcd::{timed, RequestError};
use crate::route::ServiceName;
use crate::upstream::{Upstream, UpstreamConfig};

/// Time allowed for one etcd request (range get, watch creation).
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before re-listing after the watch ended.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts while etcd is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(2);

/// Why a list-and-watch round ended.
#[derive(Debug, thiserror::Error)]
enum SyncError {
    #[error(transparent)]
    Request(#[from] RequestError),
    #[error("etcd watch: {0}")]
    Watch(#[from] etcd_client::Error),
    #[error("watch cancelled by etcd: {0}")]
    Cancelled(String),
    #[error("watch compacted at revision {0}; re-listing")]
    Compacted(i64),
    #[error("watch stream ended")]
    Ended,
}

/// The service's keys as last seen, and the endpoints their values list.
#[derive(Debug, Default)]
struct Keys {
    /// etcd key → endpoints, for keys whose value decoded. In key order, so that when
    /// two keys list one address, the first key's endpoint is the one used.
    decoded: BTreeMap<Vec<u8>, Vec<Endpoint>>,
    /// Key → mod revision of its malformed value, once logged (one line per value).
    logged_bad: HashMap<Vec<u8>, i64>,
}

impl Keys {
    /// Applies a PUT: a value that decodes sets the key's endpoints, another removes
    /// them (logged once per value). Returns whether the endpoints changed.
    fn put(&mut self, service: &ServiceName, key: &[u8], value: &[u8], mod_revision: i64) -> bool {
        match crate::registry::decode(key, value) {
            Ok(d) => {
                self.logged_bad.remove(key);
                self.decoded.insert(key.to_vec(), d.endpoints.clone()) != Some(d.endpoints)
            }
            Err(e) => {
                if self.logged_bad.insert(key.to_vec(), mod_revision) != Some(mod_revision) {
                    tracing::warn!(
                        service = %service,
                        key = %String::from_utf8_lossy(key),
                        reason = %e,
                        "skipping malformed endpoint value"
                    );
                }
                self.decoded.remove(key).is_some()
            }
        }
    }

    /// Applies a DELETE; returns whether the endpoints changed.
    fn delete(&mut self, key: &[u8]) -> bool {
        self.logged_bad.remove(key);
        self.decoded.remove(key).is_some()
    }

    /// Replaces every key with a fresh listing of (key, value, mod revision).
    fn replace<'a>(
        &mut self,
        service: &ServiceName,
        listing: impl IntoIterator<Item = (&'a [u8], &'a [u8], i64)>,
    ) {
        self.decoded.clear();
        let logged = std::mem::take(&mut self.logged_bad);
        for (key, value, rev) in listing {
            // A malformed value logged before the re-list is not logged again.
            if let Some(&r) = logged.get(key) {
                self.logged_bad.insert(key.to_vec(), r);
            }
            self.put(service, key, value, rev);
        }
    }

    /// One endpoint per distinct address.
    fn endpoints(&self) -> HashMap<&BackendAddr, &Endpoint> {
        let mut out = HashMap::new();
        for ep in self.decoded.values().flatten() {
            out.entry(&ep.addr).or_insert(ep);
        }
        out
    }
}

/// The watch's state: the keys, and the backends built for their endpoints.
struct WatchState {
    service: Arc<Service>,
    upstream_config: UpstreamConfig,
    keys: Keys,
    /// One backend per distinct address, kept across snapshots.
    backends: HashMap<BackendAddr, Arc<Backend>>,
}

impl WatchState {
    fn new(service: Arc<Service>, upstream_config: UpstreamConfig) -> Self {
        Self {
            service,
            upstream_config,
            keys: Keys::default(),
            backends: HashMap::new(),
        }
    }

    /// Builds and publishes a snapshot of the current endpoints, reusing backends (and
    /// their connections) by address.
    fn publish(&mut self) {
        let wanted = self.keys.endpoints();
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
                    self.backends.insert(addr.clone(), Backend::new(up, ep));
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
    let mut state = WatchState::new(service, upstream_config);
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
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
        backoff.sleep().await;
    }
}

/// One round: list, publish, then watch until something ends the watch.
async fn sync(
    client: &mut Client,
    key_prefix: &str,
    state: &mut WatchState,
    backoff: &mut Backoff,
) -> SyncError {
    let listing = match timed(
        "get",
        ETCD_REQUEST_TIMEOUT,
        client.get(key_prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => return e.into(),
    };
    let revision = listing.header().map_or(0, |h| h.revision());
    let svc = Arc::clone(&state.service);
    state.keys.replace(
        svc.name(),
        listing
            .kvs()
            .iter()
            .map(|kv| (kv.key(), kv.value(), kv.mod_revision())),
    );
    state.publish();
    backoff.reset();
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
    let mut stream = match timed(
        "watch",
        ETCD_REQUEST_TIMEOUT,
        client.watch(key_prefix, Some(options)),
    )
    .await
    {
        Ok(stream) => stream,
        Err(e) => return e.into(),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return SyncError::Ended,
            Err(e) => return SyncError::Watch(e),
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
                EventType::Put => {
                    state
                        .keys
                        .put(svc.name(), kv.key(), kv.value(), kv.mod_revision())
                }
                EventType::Delete => state.keys.delete(kv.key()),
            };
        }
        if changed {
            state.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    fn name() -> ServiceName {
        ServiceName::new("svc").unwrap()
    }

    /// (address, weight) of each endpoint, by address.
    fn endpoints(keys: &Keys) -> Vec<(&str, u32)> {
        let mut v: Vec<_> = keys
            .endpoints()
            .values()
            .map(|e| (e.addr.as_str(), e.weight))
            .collect();
        v.sort();
        v
    }

    fn addrs(keys: &Keys) -> Vec<&str> {
        endpoints(keys).into_iter().map(|(a, _)| a).collect()
    }

    #[test]
    fn puts_and_deletes_change_the_endpoints() {
        let (s, mut k) = (name(), Keys::default());
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:1", 2));
        // The same value again changes nothing.
        assert!(!k.put(&s, b"p/svc/a", b"127.0.0.1:1", 3));
        // The same address in another format is still the same endpoint.
        assert!(!k.put(&s, b"p/svc/a", br#"{"Op":0,"Addr":"127.0.0.1:1"}"#, 4));
        assert!(k.put(&s, b"p/svc/b", b"127.0.0.1:2", 5));
        assert_eq!(addrs(&k), ["127.0.0.1:1", "127.0.0.1:2"]);
        // A key moving to another address.
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:3", 6));
        assert_eq!(addrs(&k), ["127.0.0.1:2", "127.0.0.1:3"]);
        // A weight change is a change (the balancer reads weights).
        assert!(k.put(
            &s,
            b"p/svc/b",
            br#"{"Addr":"127.0.0.1:2","Metadata":{"weight":3}}"#,
            7
        ));
        assert_eq!(endpoints(&k), [("127.0.0.1:2", 3), ("127.0.0.1:3", 1)]);
        assert!(k.delete(b"p/svc/a"));
        assert!(!k.delete(b"p/svc/a"));
        assert!(!k.delete(b"p/svc/never"));
        assert_eq!(addrs(&k), ["127.0.0.1:2"]);
    }

    #[test]
    fn malformed_values_remove_the_key_and_are_logged_once() {
        let (s, mut k) = (name(), Keys::default());
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:1", 2));
        assert!(k.put(&s, b"p/svc/a", b"not an address", 3));
        assert!(addrs(&k).is_empty());
        assert_eq!(k.logged_bad.get(&b"p/svc/a"[..]), Some(&3));
        // Still malformed: nothing changes, and the next value is logged at its revision.
        assert!(!k.put(&s, b"p/svc/a", b"{\"Op\":1,\"Addr\":\"127.0.0.1:1\"}", 4));
        assert_eq!(k.logged_bad.get(&b"p/svc/a"[..]), Some(&4));
        // A malformed value beside good ones takes only its own key out.
        assert!(k.put(&s, b"p/svc/b", b"127.0.0.1:2", 5));
        assert!(!k.put(&s, b"p/svc/c", &[0xff], 6));
        assert_eq!(addrs(&k), ["127.0.0.1:2"]);
        // Fixed or deleted, the key is forgotten as malformed.
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:1", 7));
        assert!(!k.delete(b"p/svc/c"));
        assert!(k.logged_bad.is_empty());
    }

    #[test]
    fn one_address_under_two_keys_is_one_endpoint() {
        let (s, mut k) = (name(), Keys::default());
        assert!(k.put(
            &s,
            b"p/svc/b",
            br#"{"Addr":"127.0.0.1:1","Metadata":{"weight":2}}"#,
            2
        ));
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:1", 3));
        // The first key in key order names it.
        assert_eq!(endpoints(&k), [("127.0.0.1:1", 1)]);
        assert!(k.delete(b"p/svc/a"));
        assert_eq!(endpoints(&k), [("127.0.0.1:1", 2)]);
    }

    #[test]
    fn replace_keeps_only_the_listing() {
        let (s, mut k) = (name(), Keys::default());
        k.put(&s, b"p/svc/a", b"127.0.0.1:1", 2);
        k.put(&s, b"p/svc/bad", b"x", 3);
        let listing: [(&[u8], &[u8], i64); 3] = [
            (b"p/svc/b", b"127.0.0.1:2", 9),
            (b"p/svc/c", br#"{"Addr":"127.0.0.1:3"}"#, 9),
            (b"p/svc/bad", b"x", 3),
        ];
        k.replace(&s, listing);
        assert_eq!(addrs(&k), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert_eq!(k.logged_bad.get(&b"p/svc/bad"[..]), Some(&3));
        k.replace(&s, []);
        assert!(addrs(&k).is_empty());
        assert!(k.logged_bad.is_empty());
    }

    fn snapshot(service: &Service) -> Vec<String> {
        let mut v: Vec<_> = service
            .endpoints()
            .iter()
            .map(|u| u.addr().to_string())
            .collect();
        v.sort();
        v
    }

    #[tokio::test]
    async fn publish_builds_one_backend_per_address_and_reuses_them() {
        let metrics = Metrics::new().service("svc");
        let service = Arc::new(Service::new(name(), metrics));
        assert!(!service.is_loaded());
        let mut w = WatchState::new(Arc::clone(&service), UpstreamConfig::default());
        // Nothing listens on these loopback ports: the upstreams' connects fail at once.
        let s = name();
        w.keys.replace(
            &s,
            [
                (&b"p/svc/a"[..], &b"127.0.0.1:1"[..], 1),
                (b"p/svc/b", b"127.0.0.1:2", 1),
                (b"p/svc/b2", b"127.0.0.1:2", 1),
            ],
        );
        w.publish();
        assert!(service.is_loaded());
        assert_eq!(snapshot(&service), ["127.0.0.1:1", "127.0.0.1:2"]);
        let addr2: BackendAddr = "127.0.0.1:2".parse().unwrap();
        let kept = Arc::clone(&w.backends[&addr2]);
        assert_eq!(kept.weight(), 1);

        w.keys.delete(b"p/svc/a");
        w.keys.delete(b"p/svc/b");
        w.keys.put(
            &s,
            b"p/svc/b2",
            br#"{"Addr":"127.0.0.1:2","Metadata":{"weight":"4"}}"#,
            2,
        );
        w.keys.put(&s, b"p/svc/c", b"127.0.0.1:3", 2);
        w.publish();
        assert_eq!(snapshot(&service), ["127.0.0.1:2", "127.0.0.1:3"]);
        // The address still listed (under b2) keeps its backend and connection, and
        // takes its new weight.
        let still = service
            .endpoints()
            .iter()
            .find(|b| b.addr() == &addr2)
            .cloned();
        assert!(still.is_some_and(|b| Arc::ptr_eq(&b, &kept)));
        assert_eq!(kept.weight(), 4);
        assert_eq!(w.backends.len(), 2);

        // An empty listing publishes an empty set (the service stays loaded).
        w.keys.replace(&s, []);
        w.publish();
        assert!(snapshot(&service).is_empty());
        assert!(w.backends.is_empty());
        assert!(service.is_loaded());
    }
}
