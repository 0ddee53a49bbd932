//! One backend as the balancer sees it: its pooled connection, its weight and registry
//! metadata, and the per-call signals (in flight, how calls end), all in atomics so that
//! the per-call path takes no lock.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;

use crate::endpoint::{BackendAddr, Endpoint, Weight};
use crate::upstream::Upstream;

/// One endpoint of a service, kept across snapshots for as long as it is registered.
#[derive(Debug)]
pub struct Backend {
    upstream: Arc<Upstream>,
    /// What the registry says of it (weight, metadata), as last read.
    endpoint: ArcSwap<Endpoint>,
    weight: AtomicU32,
    in_flight: AtomicU32,
}

impl Backend {
    /// The backend `endpoint` describes, reached through `upstream`.
    pub fn new(upstream: Arc<Upstream>, endpoint: &Endpoint) -> Arc<Self> {
        Arc::new(Self {
            upstream,
            weight: AtomicU32::new(endpoint.weight),
            endpoint: ArcSwap::from_pointee(endpoint.clone()),
            in_flight: AtomicU32::new(0),
        })
    }

    /// Takes what the registry now says of this endpoint; returns whether its weight changed.
    pub fn update(&self, endpoint: &Endpoint) -> bool {
        if **self.endpoint.load() == *endpoint {
            return false;
        }
        self.endpoint.store(Arc::new(endpoint.clone()));
        self.weight.swap(endpoint.weight, Ordering::Relaxed) != endpoint.weight
    }

    /// The backend's address.
    #[inline]
    pub fn addr(&self) -> &BackendAddr {
        self.upstream.addr()
    }

    /// The backend's pooled connection.
    #[inline]
    pub fn upstream(&self) -> &Arc<Upstream> {
        &self.upstream
    }

    /// What the registry says of this endpoint.
    pub fn endpoint(&self) -> Arc<Endpoint> {
        self.endpoint.load_full()
    }

    /// The registry's weight.
    #[inline]
    pub fn weight(&self) -> Weight {
        self.weight.load(Ordering::Relaxed)
    }

    /// Calls sent to this backend and not ended yet.
    #[inline]
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// How well this backend fits a call now: preferred when connected and trusted,
    /// usable while connecting or suspect, not at all while its connection fails.
    #[inline]
    pub fn fit(&self) -> Fit {
        if self.upstream.is_healthy() {
            Fit::Preferred
        } else if self.upstream.is_usable() {
            Fit::Usable
        } else {
            Fit::No
        }
    }

    /// Counts a call on this backend from now (it is being sent) until the returned
    /// guard is dropped, which reports how the call ended.
    #[inline]
    pub fn start_call(self: &Arc<Self>) -> CallGuard {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        CallGuard {
            backend: Arc::clone(self),
            to_headers_us: NOT_ANSWERED,
            outcome: Outcome::Abandoned,
        }
    }

    /// The one place a call's end is reported: the signal for load-aware policies and
    /// failure accounting.
    #[inline]
    fn call_ended(&self, _to_headers: Option<Duration>, _outcome: Outcome) {
        // Nothing reads the end yet but the in-flight count.
        self.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// How well an endpoint fits a call (worst first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Fit {
    /// Not to be offered the call.
    No,
    /// To be offered the call only if no preferred endpoint is left.
    Usable,
    /// Connected and trusted.
    Preferred,
}

/// How a call sent to a backend ended, as far as that backend is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The backend answered with this `grpc-status` (17: none or unreadable).
    Status(u8),
    /// The backend's stream or connection failed before the call ended.
    StreamFailed,
    /// The backend did not take the call (refused it, or its connection was closed), so
    /// it was offered elsewhere.
    NotTaken,
    /// The client cancelled or its deadline passed first: says nothing of the backend.
    Abandoned,
}

/// `CallGuard::to_headers_us` of a call not answered (yet).
const NOT_ANSWERED: u32 = u32::MAX;

/// A call in flight on one backend; reports the call's end when dropped. Small: every
/// open stream holds one.
#[derive(Debug)]
pub struct CallGuard {
    backend: Arc<Backend>,
    /// Time from sending to the response headers, in microseconds.
    to_headers_us: u32,
    outcome: Outcome,
}

impl CallGuard {
    /// The backend's response headers arrived, for a call sent at `sent`.
    #[inline]
    pub fn answered(&mut self, sent: Instant) {
        let us = sent.elapsed().as_micros();
        self.to_headers_us = u32::try_from(us).unwrap_or(NOT_ANSWERED - 1);
    }

    /// Notes how the call ended (the last note counts; none means abandoned).
    #[inline]
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }

    /// The backend the call went to.
    #[inline]
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }
}

impl Drop for CallGuard {
    #[inline]
    fn drop(&mut self) {
        let to_headers = (self.to_headers_us != NOT_ANSWERED)
            .then(|| Duration::from_micros(u64::from(self.to_headers_us)));
        self.backend.call_ended(to_headers, self.outcome);
    }
}
