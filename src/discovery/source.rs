//! Where a service's endpoints come from: a source yields, per watched service, a stream
//! of [`Update`]s (linkerd2-proxy's pool updates), and the service reconciles them into
//! backends ([`crate::balance::Reconciler`]). The etcd source reads registries
//! ([`super::EtcdSource`]); [`StaticSource`] is fed by hand, so that discovery and
//! balancing are tested and measured without etcd (pingora's `Static` discovery).

use parking_lot::Mutex;
use std::fmt;

use tokio::sync::mpsc;

use crate::endpoint::{BackendAddr, Endpoint};
use crate::route::ServiceName;

/// A change of a service's endpoints, as its source sees it. Endpoints are named by
/// address: at most one per address in a service.
#[derive(Debug, Clone, PartialEq)]
pub enum Update {
    /// The full listing, replacing everything before: the first update of a listing
    /// stream (a service is loaded once it came), and again whenever the source re-lists.
    Reset(Vec<Endpoint>),
    /// Endpoints new to the service, or listed again with other attributes (weight,
    /// metadata) at an address it had.
    Add(Vec<Endpoint>),
    /// Addresses no longer listed.
    Remove(Vec<BackendAddr>),
    /// Whether the source sees its registry now (for etcd: every prefix's watch is up);
    /// while it does not, the last listing stands.
    Reachable(bool),
}

/// The updates of one watch of one service, in order; the watch stops once this is
/// dropped.
pub type Updates = mpsc::UnboundedReceiver<Update>;

/// Where services' endpoints are found.
pub trait EndpointSource: Send + Sync + fmt::Debug {
    /// Starts watching `service` under the registry key `prefixes` (in order; a service's
    /// endpoints are those listed under any of them). Call within the runtime.
    fn watch(&self, service: &ServiceName, prefixes: &[String]) -> Updates;
}

/// An endpoint source fed by hand: each watch started is kept, and [`StaticSource::push`]
/// sends updates to the watches of a service. For tests and benchmarks.
#[derive(Debug, Default)]
pub struct StaticSource {
    watches: Mutex<Vec<StaticWatch>>,
    /// Sent to every watch as it starts, per service (see [`StaticSource::preset`]).
    presets: Mutex<Vec<(ServiceName, Vec<Endpoint>)>>,
}

/// One watch started on a [`StaticSource`].
#[derive(Debug)]
struct StaticWatch {
    service: ServiceName,
    prefixes: Vec<String>,
    tx: mpsc::UnboundedSender<Update>,
}

impl StaticSource {
    /// A source with no watch yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sends `update` to every live watch of `service`; returns how many it reached.
    pub fn push(&self, service: &str, update: Update) -> usize {
        self.push_where(|w| w.service.as_str() == service, update)
    }

    /// Sends `update` to the live watches of `service` started under exactly `prefixes`
    /// (to tell a reload's new watch from the old one); returns how many it reached.
    pub fn push_to(&self, service: &str, prefixes: &[&str], update: Update) -> usize {
        self.push_where(
            |w| w.service.as_str() == service && w.prefixes.iter().eq(prefixes.iter()),
            update,
        )
    }

    /// Lists `endpoints` for `service` at once in every watch of it started from now on.
    pub fn preset(&self, service: &ServiceName, endpoints: Vec<Endpoint>) {
        let mut presets = self.presets.lock();
        presets.retain(|(s, _)| s != service);
        presets.push((service.clone(), endpoints));
    }

    /// How many watches of `service` are live (their receiver not dropped).
    pub fn live_watches(&self, service: &str) -> usize {
        self.push_where(|w| w.service.as_str() == service && !w.tx.is_closed(), None)
    }

    /// Sends `update` (if any) to the live watches `pick` takes, forgetting dead ones;
    /// returns how many it counted.
    fn push_where(
        &self,
        pick: impl Fn(&StaticWatch) -> bool,
        update: impl Into<Option<Update>>,
    ) -> usize {
        let update = update.into();
        let mut watches = self.watches.lock();
        watches.retain(|w| !w.tx.is_closed());
        let mut reached = 0;
        for w in watches.iter().filter(|w| pick(w)) {
            let sent = match &update {
                Some(u) => w.tx.send(u.clone()).is_ok(),
                None => true,
            };
            reached += usize::from(sent);
        }
        reached
    }
}

impl EndpointSource for StaticSource {
    fn watch(&self, service: &ServiceName, prefixes: &[String]) -> Updates {
        let (tx, rx) = mpsc::unbounded_channel();
        let presets = self.presets.lock();
        if let Some((_, endpoints)) = presets.iter().find(|(s, _)| s == service) {
            // The receiver is right here: the send cannot fail.
            let _ = tx.send(Update::Reset(endpoints.clone()));
        }
        drop(presets);
        self.watches.lock().push(StaticWatch {
            service: service.clone(),
            prefixes: prefixes.to_vec(),
            tx,
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn pushes_reach_the_watches_of_their_service() {
        let source = StaticSource::new();
        let svc = ServiceName::new("svc").unwrap();
        let ep = Endpoint::new("127.0.0.1:1".parse().unwrap());
        source.preset(&svc, vec![ep.clone()]);
        let mut a = source.watch(&svc, &["a".to_owned()]);
        let mut b = source.watch(&svc, &["b".to_owned()]);
        let mut other = source.watch(&ServiceName::new("other").unwrap(), &[]);
        assert_eq!(a.recv().await, Some(Update::Reset(vec![ep.clone()])));
        assert_eq!(source.push("svc", Update::Reachable(true)), 2);
        assert_eq!(
            source.push_to("svc", &["b"], Update::Remove(vec![ep.addr.clone()])),
            1
        );
        assert_eq!(a.recv().await, Some(Update::Reachable(true)));
        assert_eq!(b.recv().await, Some(Update::Reset(vec![ep.clone()])));
        assert_eq!(b.recv().await, Some(Update::Reachable(true)));
        assert_eq!(b.recv().await, Some(Update::Remove(vec![ep.addr])));
        assert!(other.try_recv().is_err());
        drop(a);
        assert_eq!(source.live_watches("svc"), 1);
        assert_eq!(source.push("svc", Update::Reachable(false)), 1);
    }
}
