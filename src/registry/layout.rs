//! The etcd key layout, in one place: a service's endpoints live under
//! `<prefix>/<service>/<name>`, and everything that reads or writes keys (discovery's
//! watch, `switchyard endpoints`, `switchyard register`, reflection's list of services)
//! asks this module, so that they agree on every prefix, including the odd ones: `/`
//! (keys `/<service>/<name>`), and the empty prefix of go-zero (`<service>/<name>`, the
//! whole keyspace).
//!
//! A prefix is kept as written, with one `/` added where it lacks one: `services` and
//! `services/` are the same prefix, `/microservices` keeps its leading slash.

use crate::route::validate_service_name;

/// A key prefix services register under, as configured (`services`, `/micro/registry/`,
/// `/`, or the empty prefix).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct KeyPrefix {
    /// Every key under the prefix starts with this: `<prefix>/`, `/` for `/`, or `""`.
    root: String,
}

impl KeyPrefix {
    /// The prefix as configured.
    pub fn new(prefix: &str) -> Self {
        let trimmed = prefix.trim_end_matches('/');
        let root = if trimmed.is_empty() && !prefix.starts_with('/') {
            String::new()
        } else {
            format!("{trimmed}/")
        };
        Self { root }
    }

    /// The start of every key under the prefix (the range to list all of them).
    pub fn root(&self) -> &str {
        &self.root
    }

    /// Whether this is the empty prefix, under which the whole keyspace lies.
    pub fn is_whole_keyspace(&self) -> bool {
        self.root.is_empty()
    }

    /// The start of every key of `service`: `<prefix>/<service>/` (the trailing `/` keeps
    /// `services/a` from matching `services/ab/…`).
    pub fn service(&self, service: &str) -> String {
        let mut k = String::with_capacity(self.root.len() + service.len() + 1);
        k.push_str(&self.root);
        k.push_str(service);
        k.push('/');
        k
    }

    /// The key of one instance: `<prefix>/<service>/<name>` (`name` as the format's key
    /// name says: an address, a lease ID, an instance id).
    pub fn instance(&self, service: &str, name: &str) -> String {
        let mut k = self.service(service);
        k.push_str(name);
        k
    }

    /// The part of `key` after the prefix, if `key` is under it.
    pub fn strip<'k>(&self, key: &'k str) -> Option<&'k str> {
        key.strip_prefix(self.root.as_str())
    }

    /// Splits a key under the prefix into (service, rest): `None` if the key is not under
    /// it, `Err` (with the part taken as the service) if it is malformed.
    pub fn split<'k>(&self, key: &'k str) -> Option<Result<(&'k str, &'k str), KeyError<'k>>> {
        self.strip(key).map(split_service)
    }

    /// The service an endpoint key names, if it is a well-formed key under the prefix.
    pub fn service_of<'k>(&self, key: &'k [u8]) -> Option<&'k str> {
        let key = std::str::from_utf8(key).ok()?;
        self.split(key)?.ok().map(|(service, _)| service)
    }
}

impl std::fmt::Display for KeyPrefix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.root)
    }
}

/// A key under a prefix that is not `<service>/<name>`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{why}")]
pub struct KeyError<'k> {
    /// What was taken as the service part.
    pub service: &'k str,
    /// Why the key is malformed.
    pub why: String,
}

/// Splits `<service>/<rest>` (a key with its prefix taken off).
fn split_service(under_prefix: &str) -> Result<(&str, &str), KeyError<'_>> {
    let Some((service, rest)) = under_prefix.split_once('/') else {
        return Err(KeyError {
            service: under_prefix,
            why: "key has nothing after the service (<prefix>/<service>/<addr> expected)"
                .to_owned(),
        });
    };
    if let Err(e) = validate_service_name(service) {
        return Err(KeyError {
            service,
            why: format!("key's service part: {e}"),
        });
    }
    if rest.is_empty() {
        return Err(KeyError {
            service,
            why: "key has nothing after the service".to_owned(),
        });
    }
    Ok((service, rest))
}

/// The key prefix of `service` under `prefix`: `<prefix>/<service>/`.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    KeyPrefix::new(prefix).service(service)
}

/// The key of one instance: `<prefix>/<service>/<name>`.
pub fn instance_key(prefix: &str, service: &str, name: &str) -> String {
    KeyPrefix::new(prefix).instance(service, name)
}

/// The last segment of `key` (after its last `/`).
pub(crate) fn last_segment(key: &str) -> &str {
    key.rsplit('/').next().unwrap_or(key)
}

/// The segment of `key` before its last one: the service, in `<prefix>/<service>/<id>`.
pub(crate) fn service_segment(key: &str) -> Option<&str> {
    let mut segments = key.rsplit('/');
    segments.next();
    segments.next()
}

/// Whether `key` ends in a lease (or go-zero ID) number, `<key>/<positive int64>`: how a
/// go-zero key is told from a plain one with the same value.
pub(crate) fn names_lease(key: &str) -> bool {
    let last = last_segment(key);
    last.len() < key.len()
        && !last.is_empty()
        && last.bytes().all(|b| b.is_ascii_digit())
        && last.parse::<i64>().is_ok_and(|n| n > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_kept_as_written_and_end_in_slash() {
        assert_eq!(service_prefix("services", "a"), "services/a/");
        assert_eq!(service_prefix("services/", "a"), "services/a/");
        assert_eq!(service_prefix("", "user.rpc"), "user.rpc/");
        assert_eq!(service_prefix("/microservices", "a"), "/microservices/a/");
        assert_eq!(
            service_prefix("/micro/registry/", "a"),
            "/micro/registry/a/"
        );
        assert_eq!(service_prefix("/", "a"), "/a/");
        assert_eq!(
            instance_key("services", "a", "1.2.3.4:5"),
            "services/a/1.2.3.4:5"
        );
    }

    #[test]
    fn roots_agree_with_service_prefixes() {
        for (prefix, root) in [
            ("services", "services/"),
            ("services/", "services/"),
            ("/microservices", "/microservices/"),
            ("/", "/"),
            ("//", "/"),
            ("", ""),
        ] {
            let p = KeyPrefix::new(prefix);
            assert_eq!(p.root(), root, "{prefix:?}");
            assert!(p.service("a").starts_with(p.root()), "{prefix:?}");
            assert_eq!(p.is_whole_keyspace(), root.is_empty());
        }
    }

    #[test]
    fn keys_give_their_service() {
        let p = KeyPrefix::new("services/");
        assert_eq!(
            p.service_of(b"services/pkg.Svc/10.0.0.1:80"),
            Some("pkg.Svc")
        );
        assert_eq!(p.service_of(b"services/pkg.Svc/"), None);
        assert_eq!(p.service_of(b"services/bad name/x"), None);
        assert_eq!(p.service_of(b"services/"), None);
        assert_eq!(p.service_of(b"svc"), None);
        // `/` as the prefix: keys are `/<service>/<name>`.
        let slash = KeyPrefix::new("/");
        assert_eq!(slash.service_of(b"/pkg.Svc/10.0.0.1:80"), Some("pkg.Svc"));
        assert_eq!(slash.service_of(b"pkg.Svc/10.0.0.1:80"), None);
        // The empty prefix: the whole keyspace.
        let empty = KeyPrefix::new("");
        assert_eq!(empty.service_of(b"user.rpc/75"), Some("user.rpc"));
    }

    #[test]
    fn keys_split() {
        let p = KeyPrefix::new("s");
        assert_eq!(p.split("s/a/1.2.3.4:5"), Some(Ok(("a", "1.2.3.4:5"))));
        assert_eq!(p.split("s/a/x/y"), Some(Ok(("a", "x/y"))));
        assert_eq!(p.split("t/a/x"), None);
        assert_eq!(p.split("s/a").map(|r| r.is_err()), Some(true));
        assert_eq!(p.split("s/a/").map(|r| r.is_err()), Some(true));
        let bad = p.split("s/bad name/x");
        assert_eq!(
            bad.and_then(Result::err).map(|e| e.service),
            Some("bad name")
        );
    }

    #[test]
    fn segments_and_leases() {
        assert_eq!(last_segment("user.rpc/75"), "75");
        assert_eq!(last_segment("x"), "x");
        assert_eq!(service_segment("/microservices/a/id"), Some("a"));
        assert_eq!(service_segment("id"), None);
        assert!(names_lease("user.rpc/7587869470812345"));
        assert!(!names_lease("user.rpc/0"));
        assert!(!names_lease("75"));
        assert!(!names_lease("services/a/1.2.3.4:5"));
    }
}
