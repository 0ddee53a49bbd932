//! Endpoint changes into backends: a service's listing, as discovery reports it (a full
//! listing, endpoints added, addresses removed), kept as one [`Backend`] per address.
//! A backend lives as long as its address is listed, with its connection and its state
//! (calls in flight, latency, ejection), whatever else changes; a reload's new watch takes
//! over the backends it still lists. Backends get their connection through one seam,
//! [`UpstreamFor`].

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use super::{Backend, Balancer};
use crate::endpoint::{BackendAddr, Endpoint};
use crate::route::ServiceName;
use crate::upstream::Upstream;

/// The connection of a new backend at an address (started, or shared with others).
pub(crate) type UpstreamFor = Arc<dyn Fn(&BackendAddr) -> Arc<Upstream> + Send + Sync>;

/// One watch's backends of one service, kept in step with its listing.
pub(crate) struct Reconciler {
    service: ServiceName,
    /// TLS to backends is on: endpoints that ask for TLS can be served.
    tls_on: bool,
    upstream_for: UpstreamFor,
    /// One backend per listed address that can be served.
    backends: HashMap<BackendAddr, Arc<Backend>>,
    /// Listed addresses left out because they ask for TLS and TLS to backends is off,
    /// each logged once (again if it leaves and comes back).
    tls_refused: HashSet<BackendAddr>,
}

impl std::fmt::Debug for Reconciler {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reconciler")
            .field("service", &self.service)
            .field("tls_on", &self.tls_on)
            .field("backends", &self.backends.len())
            .field("tls_refused", &self.tls_refused)
            .finish()
    }
}

impl Reconciler {
    /// The backends of `service`, none yet; new ones connect through `upstream_for`, and
    /// endpoints asking for TLS are served only if `tls_on`.
    pub(crate) fn new(service: ServiceName, tls_on: bool, upstream_for: UpstreamFor) -> Self {
        Self {
            service,
            tls_on,
            upstream_for,
            backends: HashMap::new(),
            tls_refused: HashSet::new(),
        }
    }

    /// Takes over `backends` (another watch's, which this one replaces): those the next
    /// listing still has are kept, with their connections and state.
    pub(crate) fn adopt<'a>(&mut self, backends: impl IntoIterator<Item = &'a Arc<Backend>>) {
        for b in backends {
            self.backends
                .entry(b.addr().clone())
                .or_insert_with(|| Arc::clone(b));
        }
    }

    /// Replaces the listing with `endpoints` (at most one per address).
    pub(crate) fn reset(&mut self, balancer: &Balancer, endpoints: &[Endpoint]) {
        let listed: HashSet<&BackendAddr> = endpoints.iter().map(|e| &e.addr).collect();
        let gone: Vec<BackendAddr> = self
            .backends
            .keys()
            .chain(self.tls_refused.iter())
            .filter(|a| !listed.contains(a))
            .cloned()
            .collect();
        self.remove(&gone);
        self.add(balancer, endpoints);
    }

    /// Adds `endpoints`, or takes their new attributes (weight, metadata) where their
    /// address is listed already.
    pub(crate) fn add(&mut self, balancer: &Balancer, endpoints: &[Endpoint]) {
        for ep in endpoints {
            self.add_one(balancer, ep);
        }
    }

    /// Removes the endpoints at `addrs`.
    pub(crate) fn remove(&mut self, addrs: &[BackendAddr]) {
        for addr in addrs {
            self.tls_refused.remove(addr);
            if self.backends.remove(addr).is_some() {
                tracing::info!(service = %self.service, backend = %addr, "endpoint removed");
            }
        }
    }

    fn add_one(&mut self, balancer: &Balancer, ep: &Endpoint) {
        let addr = &ep.addr;
        if ep.tls && !self.tls_on {
            if self.backends.remove(addr).is_some() {
                tracing::info!(service = %self.service, backend = %addr, "endpoint removed");
            }
            if self.tls_refused.insert(addr.clone()) {
                tracing::warn!(
                    service = %self.service,
                    backend = %addr,
                    "endpoint not served: its registry says to speak TLS to it (grpcs://), and TLS to backends is off (--upstream-tls with --upstream-ca turns it on)"
                );
            }
            return;
        }
        self.tls_refused.remove(addr);
        match self.backends.get(addr) {
            Some(b) => {
                b.update(ep);
            }
            None => {
                tracing::info!(service = %self.service, backend = %addr, weight = ep.weight, "endpoint added");
                let up = (self.upstream_for)(addr);
                self.backends
                    .insert(addr.clone(), balancer.add_backend(up, ep));
            }
        }
    }

    /// The backends now, one per address served (for the next snapshot).
    pub(crate) fn backends(&self) -> Vec<Arc<Backend>> {
        self.backends.values().cloned().collect()
    }

    /// Listed addresses left out because they ask for TLS and TLS to backends is off.
    #[cfg(test)]
    fn tls_refused(&self) -> usize {
        self.tls_refused.len()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;
    use crate::upstream::UpstreamConfig;

    fn ep(addr: &str) -> Endpoint {
        Endpoint::new(addr.parse().unwrap())
    }

    fn addr(a: &str) -> BackendAddr {
        a.parse().unwrap()
    }

    /// A reconciler whose upstreams are never started (no connection), counting them.
    fn reconciler(tls_on: bool) -> (Reconciler, Arc<AtomicUsize>) {
        let made = Arc::new(AtomicUsize::new(0));
        let count = Arc::clone(&made);
        let upstream_for: UpstreamFor = Arc::new(move |a| {
            count.fetch_add(1, Ordering::Relaxed);
            Upstream::new(a.clone(), &UpstreamConfig::default())
        });
        let name = ServiceName::new("svc").unwrap();
        (Reconciler::new(name, tls_on, upstream_for), made)
    }

    fn addrs(r: &Reconciler) -> Vec<String> {
        let mut v: Vec<_> = r.backends().iter().map(|b| b.addr().to_string()).collect();
        v.sort();
        v
    }

    fn backend(r: &Reconciler, a: &str) -> Arc<Backend> {
        Arc::clone(&r.backends[&addr(a)])
    }

    #[test]
    fn backends_are_kept_by_address_across_changes() {
        let (mut r, made) = reconciler(false);
        let b = Balancer::default();
        r.reset(&b, &[ep("127.0.0.1:1"), ep("127.0.0.1:2")]);
        assert_eq!(addrs(&r), ["127.0.0.1:1", "127.0.0.1:2"]);
        let kept = backend(&r, "127.0.0.1:2");
        r.remove(&[addr("127.0.0.1:1"), addr("127.0.0.1:9")]);
        r.add(&b, &[ep("127.0.0.1:3")]);
        assert_eq!(addrs(&r), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert!(Arc::ptr_eq(&backend(&r, "127.0.0.1:2"), &kept));
        // A full listing keeps what it still lists.
        r.reset(&b, &[ep("127.0.0.1:2"), ep("127.0.0.1:4")]);
        assert_eq!(addrs(&r), ["127.0.0.1:2", "127.0.0.1:4"]);
        assert!(Arc::ptr_eq(&backend(&r, "127.0.0.1:2"), &kept));
        // One connection per address ever listed, none for an address kept.
        assert_eq!(made.load(Ordering::Relaxed), 4);
        r.reset(&b, &[]);
        assert!(r.backends().is_empty());
    }

    #[test]
    fn an_address_listed_again_takes_its_new_weight() {
        let (mut r, made) = reconciler(false);
        let b = Balancer::default();
        r.reset(&b, &[ep("127.0.0.1:1")]);
        let kept = backend(&r, "127.0.0.1:1");
        assert_eq!(kept.weight(), 1);
        r.add(&b, &[ep("127.0.0.1:1").with_weight(4)]);
        assert_eq!(kept.weight(), 4);
        assert!(Arc::ptr_eq(&backend(&r, "127.0.0.1:1"), &kept));
        r.reset(&b, &[ep("127.0.0.1:1").with_weight(2)]);
        assert_eq!(kept.weight(), 2);
        assert_eq!(made.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn adopted_backends_are_kept_only_if_listed() {
        let (mut old, _) = reconciler(false);
        let b = Balancer::default();
        old.reset(&b, &[ep("127.0.0.1:1"), ep("127.0.0.1:2")]);
        let kept = backend(&old, "127.0.0.1:2");
        let (mut new, made) = reconciler(false);
        new.adopt(old.backends().iter());
        new.reset(&b, &[ep("127.0.0.1:2"), ep("127.0.0.1:3")]);
        assert_eq!(addrs(&new), ["127.0.0.1:2", "127.0.0.1:3"]);
        assert!(Arc::ptr_eq(&backend(&new, "127.0.0.1:2"), &kept));
        assert_eq!(made.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn tls_endpoints_need_tls_to_backends() {
        let tls = |a: &str| {
            let mut e = ep(a);
            e.tls = true;
            e
        };
        let b = Balancer::default();
        let (mut r, _) = reconciler(false);
        r.reset(&b, &[tls("127.0.0.1:4"), ep("127.0.0.1:5")]);
        assert_eq!(addrs(&r), ["127.0.0.1:5"]);
        assert_eq!(r.tls_refused(), 1);
        // An address that moves to TLS leaves; gone from the registry, it is forgotten
        // (and logged again if it comes back).
        r.add(&b, &[tls("127.0.0.1:5")]);
        assert!(addrs(&r).is_empty());
        assert_eq!(r.tls_refused(), 2);
        r.remove(&[addr("127.0.0.1:4")]);
        r.reset(&b, &[ep("127.0.0.1:5")]);
        assert_eq!(r.tls_refused(), 0);
        assert_eq!(addrs(&r), ["127.0.0.1:5"]);

        let (mut r, _) = reconciler(true);
        r.reset(&b, &[tls("127.0.0.1:4"), ep("127.0.0.1:5")]);
        assert_eq!(addrs(&r), ["127.0.0.1:4", "127.0.0.1:5"]);
        assert_eq!(r.tls_refused(), 0);
    }
}
