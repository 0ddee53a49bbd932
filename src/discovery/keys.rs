//! One key prefix's keys as last listed and watched, and the endpoints their values
//! list (decoded by [`crate::registry`]): a key may list several endpoints, two keys may
//! list one address, and a value that lists nothing to serve is logged once.

use std::collections::{BTreeMap, HashMap};

use crate::endpoint::Endpoint;
use crate::route::ServiceName;

/// One prefix's keys as last seen, and the endpoints their values list.
#[derive(Debug, Default)]
pub(super) struct Keys {
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
    pub(super) fn put(
        &mut self,
        service: &ServiceName,
        key: &[u8],
        value: &[u8],
        mod_revision: i64,
    ) -> bool {
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
    pub(super) fn delete(&mut self, key: &[u8]) -> bool {
        self.logged_bad.remove(key);
        self.decoded.remove(key).is_some()
    }

    /// Replaces every key with a fresh listing of (key, value, mod revision).
    pub(super) fn replace<'a>(
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
    pub(super) fn endpoints(&self) -> impl Iterator<Item = &Endpoint> {
        self.decoded.values().flatten()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::*;

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
}
