//! What a call's service is looked up by, as in force now: the routes (gRPC service →
//! registered name), the key prefixes services register under, and how long a call waits
//! for a service's first listing.
//!
//! One [`LiveRouting`] is shared by every listener's forwarder and by the services the
//! proxy answers itself (health, reflection); a reload swaps its content whole, so that
//! calls on connections opened before the reload, health answers and reflection's list
//! all follow the new routes at once. A call reads it with one lock-free load.

use std::sync::Arc;
use std::time::Duration;

use arc_swap::{ArcSwap, Guard};

use crate::registry::KeyPrefix;
use crate::route::{RouteError, Routes};
use crate::settings::ProxySettings;

/// The routing settings in force.
#[derive(Debug, Default)]
pub struct Routing {
    /// gRPC service names and the names they are registered under.
    pub routes: Routes,
    /// The key prefixes services register under, in order.
    pub prefixes: Vec<KeyPrefix>,
    /// How long a call waits for its service's first endpoint list.
    pub discovery_timeout: Duration,
}

impl Routing {
    /// The routing `args` give; routes that do not fit together are an error.
    pub fn new(args: &ProxySettings) -> Result<Self, RouteError> {
        Ok(Self {
            routes: Routes::new(&args.route)?,
            prefixes: args
                .etcd
                .prefixes()
                .iter()
                .map(|p| KeyPrefix::new(p))
                .collect(),
            discovery_timeout: args.timeouts.discovery,
        })
    }

    /// The prefixes as a call's error names them: `services/, /microservices/`.
    pub fn prefixes_text(&self) -> String {
        let roots: Vec<String> = self
            .prefixes
            .iter()
            .map(|p| match p.root() {
                "" => "(the whole keyspace)".to_owned(),
                root => root.to_owned(),
            })
            .collect();
        roots.join(", ")
    }
}

/// The routing in force, shared by everything that routes calls; swapped on reload.
#[derive(Debug, Default)]
pub struct LiveRouting(ArcSwap<Routing>);

impl LiveRouting {
    /// Shared routing starting with `routing`.
    pub fn new(routing: Routing) -> Arc<Self> {
        Arc::new(Self(ArcSwap::from_pointee(routing)))
    }

    /// The routing now (lock-free).
    #[inline]
    pub fn load(&self) -> Guard<Arc<Routing>> {
        self.0.load()
    }

    /// The routing now, to hold across awaits.
    pub fn load_full(&self) -> Arc<Routing> {
        self.0.load_full()
    }

    /// Puts `routing` in force for every call from now on.
    pub fn store(&self, routing: Routing) {
        self.0.store(Arc::new(routing));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_settings_give_routes_prefixes_and_the_wait() {
        let mut args = ProxySettings::default();
        args.etcd.prefix = vec!["services".into(), "/".into(), String::new()];
        args.route = vec!["a.A=a".parse().unwrap()];
        let r = Routing::new(&args).unwrap();
        assert_eq!(r.routes.resolve("a.A"), "a");
        assert_eq!(r.prefixes_text(), "services/, /, (the whole keyspace)");
        assert_eq!(r.discovery_timeout, args.timeouts.discovery);
        let live = LiveRouting::new(Routing::default());
        assert_eq!(live.load().routes.resolve("a.A"), "a.A");
        live.store(r);
        assert_eq!(live.load().routes.resolve("a.A"), "a");
    }
}
