//! One etcd watch stream for every watched key prefix of the process. etcd multiplexes
//! watches on a stream by watch id; a stream per service would cost, per service, a
//! gRPC stream with its own 8 KiB encode buffer, request channel and HTTP/2 stream state
//! (about 14 KiB of the 59 KiB a watched service cost with one).
//!
//! The hub's task owns the stream. A prefix's watcher, once it has listed its keys,
//! hands the hub a [`Subscription`]: the service's [`WatchState`] and the prefix's
//! index in it. The hub creates the watch on the stream (opening the stream first if
//! there is none), applies the watch's events to the state itself (the same updates the
//! watcher would make), and ends the subscription with why when etcd cancels or compacts
//! the watch, or the stream breaks: the watcher then backs off, re-lists and subscribes
//! again. Dropping a [`Watching`] cancels its watch.
//!
//! etcd answers the create requests of a stream in the order it got them (each with
//! `created` set and the watch id it assigned), so pending creates are matched in order.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use etcd_client::{EventType, WatchClient, WatchOptions, WatchResponse, WatchStream};
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot};

use super::{lock, SyncError, WatchState, ETCD_REQUEST_TIMEOUT};
use crate::etcd::timed;

/// A prefix's watch as the hub serves it: where its events go, and who to tell when it
/// ends.
pub(super) struct Subscription {
    /// The service's watch state.
    pub(super) state: Arc<Mutex<WatchState>>,
    /// The prefix's index in it.
    pub(super) index: usize,
    /// Told why the watch ended.
    pub(super) ended: oneshot::Sender<SyncError>,
}

/// What the hub's task is asked to do.
enum Command {
    /// Watch `prefix` from `start_revision` for subscription `key`.
    Create {
        key: u64,
        prefix: String,
        start_revision: i64,
        sub: Subscription,
    },
    /// Subscription `key` is gone: cancel its watch.
    Cancel { key: u64 },
}

/// The process's shared etcd watch stream; cheap to clone.
#[derive(Clone)]
pub(super) struct WatchHub {
    commands: mpsc::UnboundedSender<Command>,
    next_key: Arc<AtomicU64>,
}

impl WatchHub {
    /// A hub watching through `client`; its task runs until every clone is dropped.
    pub(super) fn start(client: WatchClient) -> Self {
        let (commands, rx) = mpsc::unbounded_channel();
        tokio::spawn(run(client, rx));
        Self {
            commands,
            next_key: Arc::default(),
        }
    }

    /// Watches `prefix` from `start_revision` into `sub`; the watch is cancelled when the
    /// returned [`Watching`] is dropped.
    pub(super) fn watch(&self, prefix: &str, start_revision: i64, sub: Subscription) -> Watching {
        let key = self.next_key.fetch_add(1, Ordering::Relaxed);
        let create = Command::Create {
            key,
            prefix: prefix.to_owned(),
            start_revision,
            sub,
        };
        // A hub whose task is gone drops the subscription, which ends it.
        let _ = self.commands.send(create);
        Watching {
            key,
            commands: self.commands.clone(),
        }
    }
}

/// A subscription's handle: dropping it cancels the watch.
pub(super) struct Watching {
    key: u64,
    commands: mpsc::UnboundedSender<Command>,
}

impl Drop for Watching {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Cancel { key: self.key });
    }
}

/// The stream and the subscriptions on it.
#[derive(Default)]
struct Hub {
    stream: Option<WatchStream>,
    /// Subscriptions by key.
    subs: HashMap<u64, Subscription>,
    /// Keys whose create was sent and not yet answered, in the order sent.
    pending: VecDeque<u64>,
    /// Subscription keys by etcd watch id, and back.
    by_id: HashMap<i64, u64>,
    ids: HashMap<u64, i64>,
}

/// The hub's task: serves commands and the stream's responses until every handle is gone.
async fn run(mut client: WatchClient, mut commands: mpsc::UnboundedReceiver<Command>) {
    let mut hub = Hub::default();
    loop {
        tokio::select! {
            command = commands.recv() => match command {
                Some(Command::Create { key, prefix, start_revision, sub }) => {
                    hub.create(&mut client, key, prefix, start_revision, sub).await;
                }
                Some(Command::Cancel { key }) => hub.cancel(key).await,
                None => return,
            },
            r = next(hub.stream.as_mut()) => match r {
                Ok(Some(resp)) => hub.answer(resp).await,
                Ok(None) => hub.lost(|| SyncError::Ended),
                Err(e) => {
                    let e = e.to_string();
                    hub.lost(|| SyncError::Stream(e.clone()));
                }
            },
        }
    }
}

/// The stream's next response; never, without a stream.
async fn next(
    stream: Option<&mut WatchStream>,
) -> Result<Option<WatchResponse>, etcd_client::Error> {
    match stream {
        Some(s) => s.message().await,
        None => std::future::pending().await,
    }
}

impl Hub {
    /// Sends the create request of subscription `key` (opening the stream with it if
    /// there is none).
    async fn create(
        &mut self,
        client: &mut WatchClient,
        key: u64,
        prefix: String,
        start_revision: i64,
        sub: Subscription,
    ) {
        let options = WatchOptions::new()
            .with_prefix()
            .with_start_revision(start_revision);
        let sent = match self.stream.as_mut() {
            Some(stream) => stream
                .watch(prefix, Some(options))
                .await
                .map_err(SyncError::Watch),
            None => {
                let opened = Box::pin(timed(
                    "watch",
                    ETCD_REQUEST_TIMEOUT,
                    client.watch(prefix, Some(options)),
                ))
                .await;
                opened
                    .map(|s| self.stream = Some(s))
                    .map_err(SyncError::from)
            }
        };
        match sent {
            Ok(()) => {
                self.subs.insert(key, sub);
                self.pending.push_back(key);
            }
            Err(e) => {
                let _ = sub.ended.send(e);
            }
        }
    }

    /// Subscription `key` is gone: its watch is cancelled (once created, if not yet).
    async fn cancel(&mut self, key: u64) {
        self.subs.remove(&key);
        if let Some(id) = self.ids.remove(&key) {
            self.by_id.remove(&id);
            if let Some(stream) = self.stream.as_mut() {
                // A failed send means a broken stream: its end is seen next.
                let _ = stream.cancel(id).await;
            }
        }
    }

    /// Handles one response of the stream.
    async fn answer(&mut self, resp: WatchResponse) {
        let id = resp.watch_id();
        if resp.created() {
            let Some(key) = self.pending.pop_front() else {
                return;
            };
            if resp.canceled() {
                self.end(key, SyncError::Cancelled(resp.cancel_reason().to_owned()));
                return;
            }
            if self.subs.contains_key(&key) {
                self.by_id.insert(id, key);
                self.ids.insert(key, id);
            } else if let Some(stream) = self.stream.as_mut() {
                // Dropped while its create was on the way.
                let _ = stream.cancel(id).await;
            }
            return;
        }
        let Some(&key) = self.by_id.get(&id) else {
            return;
        };
        if resp.compact_revision() > 0 {
            self.forget(key);
            self.end(key, SyncError::Compacted(resp.compact_revision()));
            return;
        }
        if resp.canceled() {
            self.forget(key);
            self.end(key, SyncError::Cancelled(resp.cancel_reason().to_owned()));
            return;
        }
        let Some(sub) = self.subs.get(&key) else {
            return;
        };
        let mut st = lock(&sub.state);
        let st = &mut *st;
        let keys = &mut st.prefixes[sub.index].keys;
        let mut changed = false;
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            changed |= match event.event_type() {
                EventType::Put => keys.put(&st.service, kv.key(), kv.value(), kv.mod_revision()),
                EventType::Delete => keys.delete(kv.key()),
            };
        }
        if changed {
            st.send_changes();
        }
    }

    /// Forgets subscription `key`'s watch id (etcd has ended the watch).
    fn forget(&mut self, key: u64) {
        if let Some(id) = self.ids.remove(&key) {
            self.by_id.remove(&id);
        }
    }

    /// Ends subscription `key` with `why`.
    fn end(&mut self, key: u64, why: SyncError) {
        if let Some(sub) = self.subs.remove(&key) {
            let _ = sub.ended.send(why);
        }
    }

    /// The stream broke or ended: every subscription ends (their watchers re-list), and
    /// the next create opens a new stream.
    fn lost(&mut self, why: impl Fn() -> SyncError) {
        self.stream = None;
        self.pending.clear();
        self.by_id.clear();
        self.ids.clear();
        for (_, sub) in self.subs.drain() {
            let _ = sub.ended.send(why());
        }
    }
}
