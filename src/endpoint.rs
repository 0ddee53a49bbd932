//! What a backend is: its address, plus what its registry says of it (weight, metadata).
//!
//! A ground module: discovery, upstream connections, metrics, selection and registration
//! all name backends by these types, and it imports none of them.

use std::fmt;
use std::str::FromStr;

use http::uri::Authority;

/// A backend's address: `host:port`, where host is an IPv4 address, a bracketed IPv6
/// address or a DNS name.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct BackendAddr {
    authority: Authority,
}

/// Why a string is not a `host:port` address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddrError {
    /// Not of the form host:port.
    #[error("{0:?} is not host:port")]
    NotHostPort(String),
    /// The port is missing, zero or not a number.
    #[error("{0:?} has no valid port (1-65535)")]
    BadPort(String),
}

impl BackendAddr {
    /// The address as an HTTP authority, for the upstream request's `:authority`.
    pub fn authority(&self) -> &Authority {
        &self.authority
    }

    /// The host part (without IPv6 brackets), for connecting.
    pub fn host(&self) -> &str {
        let h = self.authority.host();
        h.strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(h)
    }

    /// The port.
    pub fn port(&self) -> u16 {
        // Checked in `from_str`.
        self.authority.port_u16().unwrap_or(0)
    }

    /// The address as `host:port` text.
    pub fn as_str(&self) -> &str {
        self.authority.as_str()
    }
}

impl FromStr for BackendAddr {
    type Err = AddrError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let bad = || AddrError::NotHostPort(s.to_owned());
        if s.is_empty() || s.contains('@') || s.contains('/') {
            return Err(bad());
        }
        let authority: Authority = s.parse().map_err(|_| bad())?;
        if authority.host().is_empty() {
            return Err(bad());
        }
        match authority.port_u16() {
            Some(p) if p != 0 => {}
            _ => return Err(AddrError::BadPort(s.to_owned())),
        }
        let host = authority.host();
        if host.starts_with('[') {
            let inner = &host[1..host.len().saturating_sub(1)];
            if inner.parse::<std::net::Ipv6Addr>().is_err() {
                return Err(bad());
            }
        } else if !host
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        {
            return Err(bad());
        }
        Ok(Self { authority })
    }
}

impl fmt::Display for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl fmt::Debug for BackendAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

/// A backend's share of calls relative to its service's other endpoints.
pub type Weight = u32;

/// The weight of an endpoint whose registry says none.
pub const DEFAULT_WEIGHT: Weight = 1;

/// The largest weight accepted; larger values are clamped (keeps weight sums in range).
pub const MAX_WEIGHT: Weight = 10_000;

/// One backend as its registry describes it: where it listens, its share of calls, and
/// the registry's metadata, carried through untouched for whoever wants it.
#[derive(Debug, Clone, PartialEq)]
pub struct Endpoint {
    /// Where the backend listens.
    pub addr: BackendAddr,
    /// Its relative share of calls (at least 1).
    pub weight: Weight,
    /// Whether the registry says to speak TLS to it (e.g. Kratos `grpcs://`).
    pub tls: bool,
    /// Free-form metadata from the registry, if any.
    pub metadata: Option<serde_json::Value>,
    /// The version the registry's own field gives (Kratos' `version`, go-micro's service
    /// `version`), if any: a label like the metadata's, under the key `version`.
    pub version: Option<String>,
}

impl Endpoint {
    /// An endpoint at `addr` with the default weight, plaintext, and no metadata.
    pub fn new(addr: BackendAddr) -> Self {
        Self {
            addr,
            weight: DEFAULT_WEIGHT,
            tls: false,
            metadata: None,
            version: None,
        }
    }

    /// The endpoint's label `key`: the metadata's value under it (a string, or a number
    /// or boolean as written), and for `version` the registry's own version field first.
    /// Read when snapshots are made (zones, subsets), never per call.
    pub fn label(&self, key: &str) -> Option<std::borrow::Cow<'_, str>> {
        use std::borrow::Cow;
        if key == "version" {
            if let Some(v) = self.version.as_deref().filter(|v| !v.is_empty()) {
                return Some(Cow::Borrowed(v));
            }
        }
        match self.metadata.as_ref()?.get(key)? {
            serde_json::Value::String(s) => Some(Cow::Borrowed(s)),
            v @ (serde_json::Value::Number(_) | serde_json::Value::Bool(_)) => {
                Some(Cow::Owned(v.to_string()))
            }
            _ => None,
        }
    }

    /// The same endpoint with `weight`, clamped to `1..=MAX_WEIGHT`.
    pub fn with_weight(mut self, weight: Weight) -> Self {
        self.weight = weight.clamp(1, MAX_WEIGHT);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_come_from_metadata_and_the_registry_s_version() {
        let mut ep = Endpoint::new("127.0.0.1:1".parse().unwrap());
        assert_eq!(ep.label("zone"), None);
        ep.metadata = Some(serde_json::json!({"zone": "a", "gen": 2, "version": "m", "x": {}}));
        assert_eq!(ep.label("zone").as_deref(), Some("a"));
        assert_eq!(ep.label("gen").as_deref(), Some("2"));
        assert_eq!(ep.label("x"), None);
        assert_eq!(ep.label("version").as_deref(), Some("m"));
        ep.version = Some("v2".into());
        assert_eq!(ep.label("version").as_deref(), Some("v2"));
        ep.version = Some(String::new());
        assert_eq!(
            ep.label("version").as_deref(),
            Some("m"),
            "an empty version is none"
        );
    }
}
