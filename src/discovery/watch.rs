//! The per-service watch: for each key prefix the service is looked up under, range get,
//! then watch from the get's revision + 1; on cancel, compaction or a lost connection:
//! back off, re-list, re-watch. While etcd is unreachable the last published endpoints
//! keep serving.
//!
//! A service's endpoints are the union of what its prefixes list (a fleet moving from one
//! registry to another is served from both), published once every prefix has been listed
//! at least once. Values are decoded by [`crate::registry`]: a key may list several
//! endpoints, and an address listed under several keys (or prefixes) gets one upstream.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use super::Service;
use crate::backoff::Backoff;
use crate::balance::Backend;
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

/// One prefix's keys as last seen, and the endpoints their values list.
#[derive(Debug, Default)]
struct Keys {
    /// etcd key → endpoints, for keys whose value lists some. In key order, so that when
    /// two keys list one address, the first key's endpoint is the one used.
    decoded: BTreeMap<Vec<u8>, Vec<Endpoint>>,
    /// Key → mod revision of its value that lists nothing to serve (malformed, or e.g. a
    /// Kratos instance with only HTTP endpoints), once logged: one line per value.
    logged_bad: HashMap<Vec<u8>, i64>,
}

impl Keys {
    /// Applies a PUT: a value that lists endpoints sets the key's endpoints, another
    /// removes them (logged once per value). Returns whether the endpoints changed.
    fn put(&mut self, service: &ServiceName, key: &[u8], value: &[u8], mod_revision: i64) -> bool {
        let why = match crate::registry::decode(key, value) {
            Ok(d) if !d.endpoints.is_empty() => {
                self.logged_bad.remove(key);
                if !d.skipped.is_empty() {
                    tracing::debug!(
                        service = %service,
                        key = %String::from_utf8_lossy(key),
                        format = %d.format,
                        skipped = ?d.skipped.iter().map(ToString::to_string).collect::<Vec<_>>(),
                        "value lists endpoints that are not served"
                    );
                }
                return self.decoded.insert(key.to_vec(), d.endpoints.clone()) != Some(d.endpoints);
            }
            Ok(d) => (
                d.why_nothing_to_serve(),
                "skipping endpoint value: nothing to serve",
            ),
            Err(e) => (e.to_string(), "skipping malformed endpoint value"),
        };
        if self.logged_bad.insert(key.to_vec(), mod_revision) != Some(mod_revision) {
            let (reason, message) = why;
            tracing::warn!(
                service = %service,
                key = %String::from_utf8_lossy(key),
                %reason,
                "{message}"
            );
        }
        self.decoded.remove(key).is_some()
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
            // A bad value logged before the re-list is not logged again.
            if let Some(&r) = logged.get(key) {
                self.logged_bad.insert(key.to_vec(), r);
            }
            self.put(service, key, value, rev);
        }
    }

    /// The endpoints, in key order (an address may appear more than once).
    fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.decoded.values().flatten()
    }
}

/// One key prefix of the service: its keys, and where its watch stands.
#[derive(Debug, Default)]
struct PrefixState {
    keys: Keys,
    /// Listed from etcd at least once.
    listed: bool,
    /// Its watch is up.
    reachable: bool,
}

/// The watch's state, shared by the service's prefix watches: their keys, and the
/// backends built for their endpoints.
struct WatchState {
    service: Arc<Service>,
    /// Which of the service's watches this is (a reload starts a new one).
    generation: u64,
    /// A snapshot was published from this state.
    published: bool,
    upstream_config: UpstreamConfig,
    /// One per key prefix, in the order the prefixes are given.
    prefixes: Vec<PrefixState>,
    /// One backend per distinct address, kept across snapshots.
    backends: HashMap<BackendAddr, Arc<Backend>>,
    /// Endpoints left out because they ask for TLS and TLS to backends is off, once logged.
    tls_refused: HashSet<BackendAddr>,
}

impl WatchState {
    fn new(service: Arc<Service>, upstream_config: UpstreamConfig, prefixes: usize) -> Self {
        Self {
            service,
            generation: 0,
            published: false,
            upstream_config,
            prefixes: (0..prefixes).map(|_| PrefixState::default()).collect(),
            backends: HashMap::new(),
            tls_refused: HashSet::new(),
        }
    }

    /// One endpoint per distinct address over all prefixes (the first prefix's, then the
    /// first key's, that lists it), without those that cannot be served: an endpoint
    /// that asks for TLS (Kratos `grpcs://`) is served only with TLS to backends on.
    fn wanted(&mut self) -> HashMap<&BackendAddr, &Endpoint> {
        let tls_on = self.upstream_config.tls.is_some();
        let mut wanted = HashMap::new();
        let mut refused = HashSet::new();
        for ep in self.prefixes.iter().flat_map(|p| p.keys.endpoints()) {
            if ep.tls && !tls_on {
                refused.insert(&ep.addr);
            } else {
                wanted.entry(&ep.addr).or_insert(ep);
            }
        }
        let name = self.service.name();
        for addr in refused.iter().filter(|a| !wanted.contains_key(*a)) {
            if !self.tls_refused.contains(*addr) {
                tracing::warn!(
                    service = %name,
                    backend = %addr,
                    "endpoint not served: its registry says to speak TLS to it (grpcs://), and TLS to backends is off (--upstream-tls with --upstream-ca turns it on)"
                );
            }
        }
        self.tls_refused = refused.into_iter().cloned().collect();
        wanted
    }

    /// Builds and publishes a snapshot of the current endpoints, reusing backends (and
    /// their connections) by address; nothing is published until every prefix has been
    /// listed once (a half-listed service would look smaller than it is).
    fn publish(&mut self) {
        if !self.prefixes.iter().all(|p| p.listed) {
            return;
        }
        let service = Arc::clone(&self.service);
        let upstream_config = self.upstream_config.clone();
        let mut backends = std::mem::take(&mut self.backends);
        if !self.published {
            // A watch replacing another (new prefixes) takes over the backends it still
            // lists, with their connections and state.
            for b in service.endpoints().iter() {
                backends
                    .entry(b.addr().clone())
                    .or_insert_with(|| Arc::clone(b));
            }
        }
        let wanted = self.wanted();
        let name = service.name();
        backends.retain(|addr, _| {
            let keep = wanted.contains_key(addr);
            if !keep {
                tracing::info!(service = %name, backend = %addr, "endpoint removed");
            }
            keep
        });
        for (addr, ep) in wanted {
            match backends.get(addr) {
                Some(b) => {
                    b.update(ep);
                }
                None => {
                    tracing::info!(service = %name, backend = %addr, weight = ep.weight, "endpoint added");
                    let up = Upstream::new(addr.clone(), &upstream_config);
                    up.start(upstream_config.clone());
                    backends.insert(addr.clone(), service.balancer().add_backend(up, ep));
                }
            }
        }
        self.published |=
            service.publish_from(self.generation, backends.values().cloned().collect());
        self.backends = backends;
    }

    /// Notes that prefix `index`'s watch is up (listed at `revision`) or lost (`error`),
    /// logs the change, and sets the service's reachability: up while every prefix's is.
    fn set_reachable(&mut self, index: usize, key_prefix: &str, up: Result<i64, &SyncError>) {
        let name = self.service.name();
        let was = std::mem::replace(&mut self.prefixes[index].reachable, up.is_ok());
        match up {
            Ok(revision) if !was => tracing::info!(
                service = %name,
                prefix = key_prefix,
                revision,
                endpoints = self.backends.len(),
                "endpoints listed from etcd; watching"
            ),
            Err(error) if was => tracing::warn!(
                service = %name,
                prefix = key_prefix,
                error = %error,
                endpoints = self.backends.len(),
                "etcd watch lost; keeping last known endpoints"
            ),
            Err(error) => {
                tracing::debug!(service = %name, prefix = key_prefix, error = %error, "etcd still unreachable")
            }
            Ok(_) => {}
        }
        let all = self.prefixes.iter().all(|p| p.reachable);
        if self.service.is_current(self.generation) {
            self.service.etcd_reachable.store(all, Ordering::Relaxed);
        }
    }
}

/// The state, whoever panicked while holding it (its data stays consistent: every
/// update is applied whole before the next).
fn lock(state: &Mutex<WatchState>) -> MutexGuard<'_, WatchState> {
    state.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Runs the watches of one service, one per key prefix, forever (until aborted); its
/// snapshots are published as those of the service's watch `generation`.
pub(super) async fn run(
    service: Arc<Service>,
    client: Client,
    key_prefixes: Vec<String>,
    upstream_config: UpstreamConfig,
    generation: u64,
) {
    let mut state = WatchState::new(service, upstream_config, key_prefixes.len());
    state.generation = generation;
    let state = Mutex::new(state);
    let watches = key_prefixes
        .iter()
        .enumerate()
        .map(|(index, prefix)| watch_prefix(&state, index, client.clone(), prefix));
    futures_util::future::join_all(watches).await;
}

/// Keeps prefix `index` of the service listed and watched.
async fn watch_prefix(
    state: &Mutex<WatchState>,
    index: usize,
    mut client: Client,
    key_prefix: &str,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let err = sync(&mut client, key_prefix, state, index, &mut backoff).await;
        lock(state).set_reachable(index, key_prefix, Err(&err));
        backoff.sleep().await;
    }
}

/// One round for one prefix: list, publish, then watch until something ends the watch.
async fn sync(
    client: &mut Client,
    key_prefix: &str,
    state: &Mutex<WatchState>,
    index: usize,
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
    {
        let mut st = lock(state);
        let service = Arc::clone(&st.service);
        let prefix = &mut st.prefixes[index];
        prefix.keys.replace(
            service.name(),
            listing
                .kvs()
                .iter()
                .map(|kv| (kv.key(), kv.value(), kv.mod_revision())),
        );
        prefix.listed = true;
        st.publish();
        st.set_reachable(index, key_prefix, Ok(revision));
    }
    backoff.reset();

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
        let mut st = lock(state);
        let service = Arc::clone(&st.service);
        let keys = &mut st.prefixes[index].keys;
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            changed |= match event.event_type() {
                EventType::Put => keys.put(service.name(), kv.key(), kv.value(), kv.mod_revision()),
                EventType::Delete => keys.delete(kv.key()),
            };
        }
        if changed {
            st.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::balance::Balancer;
    use crate::metrics::Metrics;

    fn name() -> ServiceName {
        ServiceName::new("svc").unwrap()
    }

    /// (address, weight) of each endpoint, one per address (the first key's), by address.
    fn endpoints(keys: &Keys) -> Vec<(&str, u32)> {
        let mut seen = HashSet::new();
        let mut v: Vec<_> = keys
            .endpoints()
            .filter(|e| seen.insert(&e.addr))
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
        let service = Arc::new(Service::new(name(), metrics, Balancer::default()));
        assert!(!service.is_loaded());
        let mut w = WatchState::new(Arc::clone(&service), UpstreamConfig::default(), 1);
        w.prefixes[0].listed = true;
        // Nothing listens on these loopback ports: the upstreams' connects fail at once.
        let s = name();
        w.prefixes[0].keys.replace(
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

        let keys = &mut w.prefixes[0].keys;
        keys.delete(b"p/svc/a");
        keys.delete(b"p/svc/b");
        keys.put(
            &s,
            b"p/svc/b2",
            br#"{"Addr":"127.0.0.1:2","Metadata":{"weight":"4"}}"#,
            2,
        );
        keys.put(&s, b"p/svc/c", b"127.0.0.1:3", 2);
        w.publish();
        assert_eq!(snapshot(&service), ["127.0.0.1:2", "127.0.0.1:3"]);
        // The address still listed (under b2) keeps its backend and connection, and
        // takes its new weight.
        let still = backend_of(&service, &addr2);
        assert!(still.is_some_and(|b| Arc::ptr_eq(&b, &kept)));
        assert_eq!(kept.weight(), 4);
        assert_eq!(w.backends.len(), 2);

        // An empty listing publishes an empty set (the service stays loaded).
        w.prefixes[0].keys.replace(&s, []);
        w.publish();
        assert!(snapshot(&service).is_empty());
        assert!(w.backends.is_empty());
        assert!(service.is_loaded());
    }

    #[test]
    fn values_listing_nothing_to_serve_are_skipped_and_logged_once() {
        let (s, mut k) = (name(), Keys::default());
        let http_only = br#"{"id":"i","name":"svc","version":"","metadata":null,"endpoints":["http://127.0.0.1:8000"]}"#;
        assert!(k.put(&s, b"p/svc/a", b"127.0.0.1:1", 2));
        assert!(k.put(&s, b"p/svc/a", http_only, 3));
        assert!(addrs(&k).is_empty());
        assert_eq!(k.logged_bad.get(&b"p/svc/a"[..]), Some(&3));
        // A Kratos instance with a gRPC endpoint beside its HTTP one is served.
        let both = br#"{"id":"i","name":"svc","version":"","metadata":null,"endpoints":["http://127.0.0.1:8000","grpc://127.0.0.1:9000"]}"#;
        assert!(k.put(&s, b"p/svc/a", both, 4));
        assert_eq!(addrs(&k), ["127.0.0.1:9000"]);
        assert!(k.logged_bad.is_empty());
    }

    fn watched(prefixes: usize, config: UpstreamConfig) -> (Arc<Service>, WatchState) {
        let service = Arc::new(Service::new(
            name(),
            Metrics::new().service("svc"),
            Balancer::default(),
        ));
        let w = WatchState::new(Arc::clone(&service), config, prefixes);
        (service, w)
    }

    #[tokio::test]
    async fn prefixes_are_published_together_as_one_union() {
        let (service, mut w) = watched(2, UpstreamConfig::default());
        let s = name();
        w.prefixes[0].keys.replace(
            &s,
            [
                (&b"services/svc/127.0.0.1:1"[..], &b"127.0.0.1:1"[..], 1),
                (b"services/svc/127.0.0.1:2", b"127.0.0.1:2", 1),
            ],
        );
        w.prefixes[0].listed = true;
        w.publish();
        // The second prefix is not listed yet: nothing is published.
        assert!(!service.is_loaded());
        w.prefixes[1].keys.replace(
            &s,
            [
                (&b"svc/7587869470812345"[..], &b"127.0.0.1:2"[..], 1),
                (b"svc/7587869470812346", b"127.0.0.1:3", 1),
            ],
        );
        w.prefixes[1].listed = true;
        w.publish();
        assert!(service.is_loaded());
        assert_eq!(
            snapshot(&service),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
        // A key gone from one prefix leaves what the other still lists.
        w.prefixes[0].keys.delete(b"services/svc/127.0.0.1:2");
        w.publish();
        assert_eq!(
            snapshot(&service),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
        w.prefixes[1].keys.delete(b"svc/7587869470812345");
        w.publish();
        assert_eq!(snapshot(&service), ["127.0.0.1:1", "127.0.0.1:3"]);
    }

    /// The backend of `service` at `addr` in its published snapshot.
    fn backend_of(service: &Service, addr: &BackendAddr) -> Option<Arc<Backend>> {
        service
            .endpoints()
            .iter()
            .find(|b| b.addr() == addr)
            .cloned()
    }

    /// A watch of `service` started as generation `generation` (a parked task stands
    /// for it), and its state.
    fn started(
        service: &Arc<Service>,
        generation: u64,
    ) -> (tokio::task::JoinHandle<()>, WatchState) {
        let task = tokio::spawn(std::future::pending::<()>());
        let mut w = service.watching();
        w.started = generation;
        w.next = Some((generation, task.abort_handle()));
        let mut state = WatchState::new(Arc::clone(service), UpstreamConfig::default(), 1);
        state.generation = generation;
        (task, state)
    }

    /// Lists `addrs` (as keys `<prefix>/svc/<addr>`) as the watch's one prefix, and
    /// publishes.
    fn list(w: &mut WatchState, prefix: &str, addrs: &[&str]) {
        let keys: Vec<(String, &str)> = addrs
            .iter()
            .map(|a| (format!("{prefix}/svc/{a}"), *a))
            .collect();
        w.prefixes[0].keys.replace(
            &name(),
            keys.iter().map(|(k, a)| (k.as_bytes(), a.as_bytes(), 1)),
        );
        w.prefixes[0].listed = true;
        w.publish();
    }

    #[tokio::test]
    async fn a_new_watch_takes_over_with_its_first_snapshot() {
        let (service, _) = watched(1, UpstreamConfig::default());
        // The first watch, as a service's first call starts it.
        let (first, mut old) = started(&service, 1);
        list(&mut old, "a", &["127.0.0.1:1", "127.0.0.1:2"]);
        assert_eq!(snapshot(&service), ["127.0.0.1:1", "127.0.0.1:2"]);
        assert!(service.is_current(1));
        let addr2: BackendAddr = "127.0.0.1:2".parse().unwrap();
        let kept = Arc::clone(&old.backends[&addr2]);

        // A reload: new prefixes, a second watch. Until it has listed them, the first
        // one still publishes.
        let (second, mut new) = started(&service, 2);
        new.publish();
        list(
            &mut old,
            "a",
            &["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"],
        );
        assert_eq!(
            snapshot(&service),
            ["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"]
        );
        list(&mut new, "b", &["127.0.0.1:2", "127.0.0.1:4"]);
        assert_eq!(snapshot(&service), ["127.0.0.1:2", "127.0.0.1:4"]);
        assert!(service.is_current(2));
        // An address listed under both keeps its backend (connection, state).
        let still = backend_of(&service, &addr2);
        assert!(still.is_some_and(|b| Arc::ptr_eq(&b, &kept)));
        // The first watch is stopped, and what it still sends is not published.
        assert!(first.await.unwrap_err().is_cancelled());
        list(&mut old, "a", &["127.0.0.1:1"]);
        assert_eq!(snapshot(&service), ["127.0.0.1:2", "127.0.0.1:4"]);
        service.stop();
        assert!(second.await.unwrap_err().is_cancelled());
    }

    #[tokio::test]
    async fn tls_endpoints_need_tls_to_backends() {
        let grpcs = br#"{"id":"i","name":"svc","version":"","metadata":null,"endpoints":["grpcs://127.0.0.1:4"]}"#;
        let listing = [
            (&b"/microservices/svc/a"[..], &grpcs[..], 1),
            (b"/microservices/svc/b", b"127.0.0.1:5", 1),
        ];
        let (service, mut w) = watched(1, UpstreamConfig::default());
        w.prefixes[0].keys.replace(&name(), listing);
        w.prefixes[0].listed = true;
        w.publish();
        assert_eq!(snapshot(&service), ["127.0.0.1:5"]);
        assert_eq!(w.tls_refused.len(), 1);
        // Gone from the registry, it is forgotten (and logged again if it comes back).
        w.prefixes[0].keys.delete(b"/microservices/svc/a");
        w.publish();
        assert!(w.tls_refused.is_empty());

        let tls = crate::tls::UpstreamTls {
            config: Arc::new(
                rustls::ClientConfig::builder_with_provider(Arc::new(
                    rustls::crypto::ring::default_provider(),
                ))
                .with_safe_default_protocol_versions()
                .unwrap()
                .with_root_certificates(rustls::RootCertStore::empty())
                .with_no_client_auth(),
            ),
            sni: None,
        };
        let config = UpstreamConfig {
            tls: Some(tls),
            ..UpstreamConfig::default()
        };
        let (service, mut w) = watched(1, config);
        w.prefixes[0].keys.replace(&name(), listing);
        w.prefixes[0].listed = true;
        w.publish();
        assert_eq!(snapshot(&service), ["127.0.0.1:4", "127.0.0.1:5"]);
        assert!(w.tls_refused.is_empty());
    }
}
