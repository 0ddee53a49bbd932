//! The etcd endpoint source: for each key prefix a service is looked up under, range get,
//! then watch from the get's revision + 1; on cancel, compaction or a lost connection:
//! back off, re-list, re-watch. While etcd is unreachable nothing is sent, so the last
//! listing keeps serving.
//!
//! The watches of every service share one etcd watch stream ([`hub`]), and at most
//! [`LISTS_AT_ONCE`] of their listings are in flight.
//!
//! A service's endpoints are the union of what its prefixes list (a fleet moving from one
//! registry to another is served from both), sent as one [`Update::Reset`] once every
//! prefix has been listed at least once, then as changes to that union. An address
//! listed more than once is the first prefix's, then the first key's, listing of it; one
//! without TLS before one with (only that one can be served with TLS to backends off).

mod hub;

use parking_lot::{Mutex, MutexGuard};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, GetOptions, KvClient, WatchClient};
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::sync::{oneshot, Semaphore};

use self::hub::{Subscription, WatchHub};

use super::keys::Keys;
use super::source::{EndpointSource, Update, Updates};
use crate::backoff::Backoff;
use crate::endpoint::{BackendAddr, Endpoint};
use crate::etcd::{timed, RequestError};
use crate::route::ServiceName;

/// Time allowed for one etcd request (range get, watch creation).
const ETCD_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// First pause before re-listing after the watch ended.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Longest pause between attempts while etcd is unreachable.
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// Listings in flight at once, over every service: a thousand services starting (or
/// re-listing after a lost watch stream) at once would otherwise hold a thousand requests'
/// buffers, and grow the etcd connection's stream tables for good, for a few milliseconds
/// sooner.
const LISTS_AT_ONCE: usize = 16;

/// Services' endpoints as the registries in etcd list them.
#[derive(Clone)]
pub struct EtcdSource {
    source: Arc<Source>,
}

impl std::fmt::Debug for EtcdSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("EtcdSource")
    }
}

impl EtcdSource {
    /// A source reading the registries in `client`'s etcd.
    pub fn new(client: Client) -> Self {
        Self {
            source: Arc::new(Source {
                kv: client.kv_client(),
                watch: client.watch_client(),
                hub: std::sync::OnceLock::new(),
                lists: Semaphore::new(LISTS_AT_ONCE),
            }),
        }
    }
}

/// What every service's watches share: where they list, the watch stream (started with
/// the first watch), and the bound on listings in flight.
struct Source {
    kv: KvClient,
    watch: WatchClient,
    hub: std::sync::OnceLock<WatchHub>,
    lists: Semaphore,
}

impl Source {
    fn hub(&self) -> &WatchHub {
        self.hub.get_or_init(|| WatchHub::start(self.watch.clone()))
    }
}

impl EndpointSource for EtcdSource {
    fn watch(&self, service: &ServiceName, prefixes: &[String]) -> Updates {
        let (tx, rx) = mpsc::unbounded_channel();
        let key_prefixes: Vec<String> = prefixes
            .iter()
            .map(|p| crate::registry::service_prefix(p, service.as_str()))
            .collect();
        let state = WatchState::new(service.clone(), key_prefixes.len(), tx.clone());
        let source = Arc::clone(&self.source);
        // Started here, in the runtime the watches run in.
        source.hub();
        tokio::spawn(async move {
            tokio::select! {
                () = tx.closed() => {}
                () = run(state, source, key_prefixes) => {}
            }
        });
        rx
    }
}

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
    #[error("etcd watch stream: {0}")]
    Stream(String),
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

/// One watch of one service, shared by its prefixes' watches: their keys, and what was
/// sent of their union.
#[derive(Debug)]
struct WatchState {
    service: ServiceName,
    /// One per key prefix, in the order the prefixes are given.
    prefixes: Vec<PrefixState>,
    /// The union as last sent (empty until the first [`Update::Reset`]).
    sent: HashMap<BackendAddr, Endpoint>,
    /// The first [`Update::Reset`] was sent.
    reset_sent: bool,
    /// Every prefix's watch up, as last sent.
    reachable: bool,
    tx: UnboundedSender<Update>,
}

impl WatchState {
    fn new(service: ServiceName, prefixes: usize, tx: UnboundedSender<Update>) -> Self {
        Self {
            service,
            prefixes: (0..prefixes).map(|_| PrefixState::default()).collect(),
            sent: HashMap::new(),
            reset_sent: false,
            reachable: false,
            tx,
        }
    }

    /// One endpoint per distinct address over all prefixes (see the module doc).
    fn union(&self) -> HashMap<BackendAddr, Endpoint> {
        let mut union: HashMap<BackendAddr, Endpoint> = HashMap::new();
        for ep in self.prefixes.iter().flat_map(|p| p.keys.endpoints()) {
            match union.get_mut(&ep.addr) {
                None => {
                    union.insert(ep.addr.clone(), ep.clone());
                }
                Some(first) if first.tls && !ep.tls => *first = ep.clone(),
                Some(_) => {}
            }
        }
        union
    }

    /// Sends what changed in the union since it was last sent; nothing until every prefix
    /// has been listed once (a half-listed service would look smaller than it is), then
    /// the whole listing first.
    fn send_changes(&mut self) {
        if !self.prefixes.iter().all(|p| p.listed) {
            return;
        }
        let union = self.union();
        if !self.reset_sent {
            self.reset_sent = true;
            self.send(Update::Reset(union.values().cloned().collect()));
        } else {
            let removed: Vec<BackendAddr> = self
                .sent
                .keys()
                .filter(|a| !union.contains_key(*a))
                .cloned()
                .collect();
            let added: Vec<Endpoint> = union
                .iter()
                .filter(|(a, ep)| self.sent.get(*a) != Some(*ep))
                .map(|(_, ep)| ep.clone())
                .collect();
            if !removed.is_empty() {
                self.send(Update::Remove(removed));
            }
            if !added.is_empty() {
                self.send(Update::Add(added));
            }
        }
        self.sent = union;
    }

    fn send(&self, update: Update) {
        // A closed channel ends the watch task (see `EtcdSource::watch`).
        let _ = self.tx.send(update);
    }

    /// Notes that prefix `index`'s watch is up (listed at `revision`) or lost (`error`),
    /// logs the change, and sends the service's reachability when it changes: up while
    /// every prefix's is.
    fn set_reachable(&mut self, index: usize, key_prefix: &str, up: Result<i64, &SyncError>) {
        let name = &self.service;
        let was = std::mem::replace(&mut self.prefixes[index].reachable, up.is_ok());
        let endpoints = self.sent.len();
        match up {
            Ok(revision) if !was => tracing::info!(
                service = %name,
                prefix = key_prefix,
                revision,
                endpoints,
                "endpoints listed from etcd; watching"
            ),
            Err(error) if was => tracing::warn!(
                service = %name,
                prefix = key_prefix,
                error = %error,
                endpoints,
                "etcd watch lost; keeping last known endpoints"
            ),
            Err(error) => {
                tracing::debug!(service = %name, prefix = key_prefix, error = %error, "etcd still unreachable")
            }
            Ok(_) => {}
        }
        let all = self.prefixes.iter().all(|p| p.reachable);
        if all != self.reachable {
            self.reachable = all;
            self.send(Update::Reachable(all));
        }
    }
}

/// The state, whoever panicked while holding it (its data stays consistent: every
/// update is applied whole before the next).
fn lock(state: &Mutex<WatchState>) -> MutexGuard<'_, WatchState> {
    state.lock()
}

/// Runs the watches of one service, one per key prefix, forever.
async fn run(state: WatchState, source: Arc<Source>, key_prefixes: Vec<String>) {
    let state = Arc::new(Mutex::new(state));
    let watches = key_prefixes
        .iter()
        .enumerate()
        .map(|(index, prefix)| watch_prefix(&state, index, &source, prefix));
    futures_util::future::join_all(watches).await;
}

/// Keeps prefix `index` of the service listed and watched.
async fn watch_prefix(
    state: &Arc<Mutex<WatchState>>,
    index: usize,
    source: &Source,
    key_prefix: &str,
) {
    let mut backoff = Backoff::new(BACKOFF_MIN, BACKOFF_MAX);
    loop {
        let err = sync(source, key_prefix, state, index, &mut backoff).await;
        lock(state).set_reachable(index, key_prefix, Err(&err));
        backoff.sleep().await;
    }
}

/// One round for one prefix: list, send, then watch (on the shared stream) until
/// something ends the watch.
async fn sync(
    source: &Source,
    key_prefix: &str,
    state: &Arc<Mutex<WatchState>>,
    index: usize,
    backoff: &mut Backoff,
) -> SyncError {
    // The semaphore is never closed; were it, listing unbounded is still correct.
    let permit = source.lists.acquire().await.ok();
    let mut kv = source.kv.clone();
    // Boxed: the request's future is large, and the watch waits far longer than it.
    let listing = Box::pin(timed(
        "get",
        ETCD_REQUEST_TIMEOUT,
        kv.get(key_prefix, Some(GetOptions::new().with_prefix())),
    ))
    .await;
    drop(permit);
    let listing = match listing {
        Ok(l) => l,
        Err(e) => return e.into(),
    };
    let revision = listing.header().map_or(0, |h| h.revision());
    {
        let mut st = lock(state);
        let st = &mut *st;
        let prefix = &mut st.prefixes[index];
        prefix.keys.replace(
            &st.service,
            listing
                .kvs()
                .iter()
                .map(|kv| (kv.key(), kv.value(), kv.mod_revision())),
        );
        prefix.listed = true;
        st.send_changes();
        st.set_reachable(index, key_prefix, Ok(revision));
    }
    drop(listing);
    backoff.reset();

    let (ended, why) = oneshot::channel();
    let sub = Subscription {
        state: Arc::clone(state),
        index,
        ended,
    };
    // Cancelled when dropped: when the service is no longer watched.
    let _watching = source.hub().watch(key_prefix, revision + 1, sub);
    why.await.unwrap_or(SyncError::Ended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> ServiceName {
        ServiceName::new("svc").unwrap()
    }

    fn state(prefixes: usize) -> (WatchState, Updates) {
        let (tx, rx) = mpsc::unbounded_channel();
        (WatchState::new(name(), prefixes, tx), rx)
    }

    /// Lists `(key, value)` as prefix `index`'s keys, and sends the changes.
    fn list(w: &mut WatchState, index: usize, kvs: &[(&str, &str)]) {
        let s = name();
        w.prefixes[index]
            .keys
            .replace(&s, kvs.iter().map(|(k, v)| (k.as_bytes(), v.as_bytes(), 1)));
        w.prefixes[index].listed = true;
        w.send_changes();
    }

    /// An update as its kind and its addresses (sorted).
    fn describe(u: Update) -> (&'static str, Vec<String>) {
        let (kind, mut addrs): (_, Vec<String>) = match u {
            Update::Reset(e) => ("reset", e.iter().map(|e| e.addr.to_string()).collect()),
            Update::Add(e) => ("add", e.iter().map(|e| e.addr.to_string()).collect()),
            Update::Remove(a) => ("remove", a.iter().map(ToString::to_string).collect()),
            Update::Reachable(r) => ("reachable", vec![r.to_string()]),
        };
        addrs.sort();
        (kind, addrs)
    }

    /// The updates sent so far, as `describe` gives them.
    fn sent(rx: &mut Updates) -> Vec<(&'static str, Vec<String>)> {
        std::iter::from_fn(|| rx.try_recv().ok())
            .map(describe)
            .collect()
    }

    fn addrs(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[tokio::test]
    async fn prefixes_are_sent_together_as_one_union() {
        let (mut w, mut rx) = state(2);
        list(
            &mut w,
            0,
            &[
                ("services/svc/127.0.0.1:1", "127.0.0.1:1"),
                ("services/svc/127.0.0.1:2", "127.0.0.1:2"),
            ],
        );
        // The second prefix is not listed yet: nothing is sent.
        assert!(sent(&mut rx).is_empty());
        list(
            &mut w,
            1,
            &[
                ("svc/7587869470812345", "127.0.0.1:2"),
                ("svc/7587869470812346", "127.0.0.1:3"),
            ],
        );
        assert_eq!(
            sent(&mut rx),
            [(
                "reset",
                addrs(&["127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3"])
            )]
        );
        // A key gone from one prefix leaves what the other still lists.
        w.prefixes[0].keys.delete(b"services/svc/127.0.0.1:2");
        w.send_changes();
        assert!(sent(&mut rx).is_empty());
        w.prefixes[1].keys.delete(b"svc/7587869470812345");
        w.send_changes();
        assert_eq!(sent(&mut rx), [("remove", addrs(&["127.0.0.1:2"]))]);
        // A weight change is sent as an add of the address with its new weight.
        let s = name();
        w.prefixes[0].keys.put(
            &s,
            b"services/svc/127.0.0.1:1",
            br#"{"Addr":"127.0.0.1:1","Metadata":{"weight":3}}"#,
            5,
        );
        w.prefixes[0]
            .keys
            .put(&s, b"services/svc/127.0.0.1:4", b"127.0.0.1:4", 5);
        w.send_changes();
        assert_eq!(
            sent(&mut rx),
            [("add", addrs(&["127.0.0.1:1", "127.0.0.1:4"]))]
        );
        assert_eq!(w.sent[&"127.0.0.1:1".parse().unwrap()].weight, 3);
        // A re-list that finds the same keys sends nothing.
        list(&mut w, 1, &[("svc/7587869470812346", "127.0.0.1:3")]);
        assert!(sent(&mut rx).is_empty());
    }

    #[tokio::test]
    async fn an_empty_listing_is_a_reset_to_nothing() {
        let (mut w, mut rx) = state(1);
        list(&mut w, 0, &[]);
        assert_eq!(sent(&mut rx), [("reset", vec![])]);
    }

    #[tokio::test]
    async fn reachability_is_sent_when_every_prefix_agrees() {
        let (mut w, mut rx) = state(2);
        w.set_reachable(0, "a/svc/", Ok(1));
        assert!(sent(&mut rx).is_empty());
        w.set_reachable(1, "b/svc/", Ok(1));
        assert_eq!(sent(&mut rx), [("reachable", addrs(&["true"]))]);
        w.set_reachable(1, "b/svc/", Err(&SyncError::Ended));
        w.set_reachable(0, "a/svc/", Err(&SyncError::Ended));
        assert_eq!(sent(&mut rx), [("reachable", addrs(&["false"]))]);
    }

    #[tokio::test]
    async fn an_address_listed_plain_and_with_tls_is_the_plain_listing() {
        let grpcs = r#"{"id":"i","name":"svc","version":"","metadata":null,"endpoints":["grpcs://127.0.0.1:4"]}"#;
        let (mut w, _rx) = state(1);
        list(
            &mut w,
            0,
            &[
                ("/microservices/svc/a", grpcs),
                ("/microservices/svc/b", "127.0.0.1:4"),
            ],
        );
        let union = w.union();
        assert_eq!(union.len(), 1);
        assert!(union.values().all(|e| !e.tls));
    }

    /// Waits (up to 10 s) for the next change of endpoints and gives it as `describe`
    /// does (reachability updates are skipped).
    async fn next(rx: &mut Updates) -> (&'static str, Vec<String>) {
        loop {
            let u = tokio::time::timeout(Duration::from_secs(10), rx.recv())
                .await
                .expect("an update within 10 s")
                .expect("the source is running");
            if !matches!(u, Update::Reachable(_)) {
                return describe(u);
            }
        }
    }

    #[cfg(feature = "demo")]
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_shared_watch_survives_compaction_and_a_compacted_start_ends_for_a_re_list() {
        let etcd = crate::testkit::EtcdProcess::start().await.unwrap();
        let mut client = Client::connect([etcd.endpoint()], None).await.unwrap();
        client
            .put("services/svc/127.0.0.1:1", "127.0.0.1:1", None)
            .await
            .unwrap();
        let source = EtcdSource::new(client.clone());
        let mut rx = source.watch(&name(), &["services".to_owned()]);
        // Other services' watches share the stream.
        let _other = source.watch(
            &ServiceName::new("other").unwrap(),
            &["services".to_owned()],
        );
        assert_eq!(next(&mut rx).await, ("reset", addrs(&["127.0.0.1:1"])));

        // History moves on, and is compacted away while the watch is live.
        let mut rev = 0;
        for i in 0..20 {
            let r = client
                .put(
                    "services/unrelated/127.0.0.1:9",
                    format!("127.0.0.1:{i}"),
                    None,
                )
                .await
                .unwrap();
            rev = r.header().map_or(0, |h| h.revision());
        }
        client
            .compact(
                rev,
                Some(etcd_client::CompactionOptions::new().with_physical()),
            )
            .await
            .unwrap();
        // The live watch goes on: changes after the compaction still arrive.
        client
            .put("services/svc/127.0.0.1:2", "127.0.0.1:2", None)
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, ("add", addrs(&["127.0.0.1:2"])));
        client
            .delete("services/svc/127.0.0.1:1", None)
            .await
            .unwrap();
        assert_eq!(next(&mut rx).await, ("remove", addrs(&["127.0.0.1:1"])));

        // A watch asked to start before the compacted revision is ended as compacted,
        // so its watcher re-lists instead of missing what was compacted away.
        let hub = WatchHub::start(client.watch_client());
        let (w, _updates) = state(1);
        let (ended, why) = oneshot::channel();
        let sub = Subscription {
            state: Arc::new(Mutex::new(w)),
            index: 0,
            ended,
        };
        let _watching = hub.watch("services/svc/", 2, sub);
        let why = tokio::time::timeout(Duration::from_secs(10), why)
            .await
            .expect("ended within 10 s")
            .expect("told why");
        assert!(
            matches!(why, SyncError::Compacted(r) if r >= rev),
            "{why:?}"
        );
    }
}
