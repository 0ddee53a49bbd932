//! Routing: which service a call is for.
//!
//! A listener bound to a service sends every call there; otherwise the service is the
//! gRPC service part of the request path (`/pkg.Svc/Method` → `pkg.Svc`), or the name a
//! route gives it ([`Routes`]: `helloworld.v1.Greeter` → the Kratos app `helloworld`).

use std::collections::HashMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Longest service name accepted, in bytes.
pub const MAX_SERVICE_NAME_LEN: usize = 255;

/// A validated service name: the `S` in `<prefix>/S/`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceName(Arc<str>);

/// Why a string is not a usable service name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ServiceNameError {
    /// The name is empty.
    #[error("service name is empty")]
    Empty,
    /// The name is longer than [`MAX_SERVICE_NAME_LEN`].
    #[error("service name is longer than {MAX_SERVICE_NAME_LEN} bytes")]
    TooLong,
    /// The name holds a byte outside `[A-Za-z0-9._-]`.
    #[error("service name holds {0:?}; allowed are letters, digits, '.', '_' and '-'")]
    BadChar(char),
}

/// Checks `s` as a service name without allocating.
pub fn validate_service_name(s: &str) -> Result<(), ServiceNameError> {
    if s.is_empty() {
        return Err(ServiceNameError::Empty);
    }
    if s.len() > MAX_SERVICE_NAME_LEN {
        return Err(ServiceNameError::TooLong);
    }
    // Byte by byte: every call's path is checked, and a table lookup per byte is a
    // fraction of decoding chars. A non-ASCII byte is never allowed, so the offending
    // char starts where the first bad byte is.
    match s.bytes().position(|b| !NAME_BYTE[usize::from(b)]) {
        Some(i) => Err(ServiceNameError::BadChar(
            s[i..].chars().next().unwrap_or(char::REPLACEMENT_CHARACTER),
        )),
        None => Ok(()),
    }
}

/// Which bytes a service name may hold: `[A-Za-z0-9._-]`.
static NAME_BYTE: [bool; 256] = {
    let mut t = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        t[b] = c.is_ascii_alphanumeric() || c == b'.' || c == b'_' || c == b'-';
        b += 1;
    }
    t
};

impl ServiceName {
    /// Parses and validates a service name.
    pub fn new(s: &str) -> Result<Self, ServiceNameError> {
        validate_service_name(s)?;
        Ok(Self(Arc::from(s)))
    }

    /// The name as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::str::FromStr for ServiceName {
    type Err = ServiceNameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl fmt::Display for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl fmt::Debug for ServiceName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl std::borrow::Borrow<str> for ServiceName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

/// Why a request path names no service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// The path is not of the form `/service/method`.
    #[error("path is not of the form /service/method")]
    NotServiceMethod,
    /// The service part is not a valid service name.
    #[error("bad service name in path: {0}")]
    BadService(#[from] ServiceNameError),
}

/// Splits a gRPC path `/pkg.Svc/Method` into its service part, borrowed from `path`.
pub fn service_from_path(path: &str) -> Result<&str, PathError> {
    // Every call's path comes through here: one pass over the bytes for a well-formed
    // path; anything else is sorted out by the full checks below.
    let b = path.as_bytes();
    let mut end = 1;
    while end < b.len() && NAME_BYTE[usize::from(b[end])] {
        end += 1;
    }
    if b.first() == Some(&b'/')
        && (2..=MAX_SERVICE_NAME_LEN + 1).contains(&end)
        && b.get(end) == Some(&b'/')
        && end + 1 < b.len()
        && !b[end + 1..].contains(&b'/')
    {
        return Ok(&path[1..end]);
    }
    service_from_path_checked(path)
}

#[cold]
fn service_from_path_checked(path: &str) -> Result<&str, PathError> {
    let rest = path.strip_prefix('/').ok_or(PathError::NotServiceMethod)?;
    let (service, method) = rest.split_once('/').ok_or(PathError::NotServiceMethod)?;
    if method.is_empty() || method.contains('/') {
        return Err(PathError::NotServiceMethod);
    }
    validate_service_name(service)?;
    Ok(service)
}

/// `GRPC_SERVICE=REGISTERED_NAME`: calls for a gRPC service go to the instances
/// registered under another name (`[[route]]` in the config file).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// The gRPC service named in calls' paths (`helloworld.v1.Greeter`).
    #[serde(with = "as_text")]
    pub grpc_service: ServiceName,
    /// The name its instances are registered under (`helloworld`, `user.rpc`).
    #[serde(with = "as_text")]
    pub registered: ServiceName,
}

/// Why a route is malformed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RouteError {
    /// Not `GRPC_SERVICE=REGISTERED_NAME`.
    #[error("route {0:?} is not GRPC_SERVICE=REGISTERED_NAME")]
    NotPair(String),
    /// One side is not a valid service name.
    #[error("route {0:?}: {1}")]
    BadName(String, ServiceNameError),
    /// One gRPC service routed to two names.
    #[error("{0} is routed twice (to {1} and to {2})")]
    Twice(ServiceName, ServiceName, ServiceName),
}

impl FromStr for RouteSpec {
    type Err = RouteError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (from, to) = s
            .split_once('=')
            .ok_or_else(|| RouteError::NotPair(s.to_owned()))?;
        let name =
            |n: &str| ServiceName::new(n.trim()).map_err(|e| RouteError::BadName(s.to_owned(), e));
        Ok(Self {
            grpc_service: name(from)?,
            registered: name(to)?,
        })
    }
}

impl fmt::Display for RouteSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}={}", self.grpc_service, self.registered)
    }
}

/// Service names in the config file: their text, checked as on the command line.
mod as_text {
    use super::ServiceName;
    use serde::{Deserialize, Deserializer, Serializer};

    pub(super) fn serialize<S: Serializer>(name: &ServiceName, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(name.as_str())
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<ServiceName, D::Error> {
        let text = String::deserialize(d)?;
        ServiceName::new(&text).map_err(serde::de::Error::custom)
    }
}

/// The proxy's routes, from gRPC service names to registered names; built once, read by
/// every call whose service comes from its path.
#[derive(Debug, Clone, Default)]
pub struct Routes(HashMap<ServiceName, ServiceName>);

impl Routes {
    /// Routes from their specs; a gRPC service given twice with two targets is an error.
    pub fn new<'a>(specs: impl IntoIterator<Item = &'a RouteSpec>) -> Result<Self, RouteError> {
        let mut map: HashMap<ServiceName, ServiceName> = HashMap::new();
        for spec in specs {
            if let Some(to) = map.insert(spec.grpc_service.clone(), spec.registered.clone()) {
                if to != spec.registered {
                    return Err(RouteError::Twice(
                        spec.grpc_service.clone(),
                        to,
                        spec.registered.clone(),
                    ));
                }
            }
        }
        Ok(Self(map))
    }

    /// The name to look `grpc_service` up under: its route's, or its own. Allocates
    /// nothing (and skips the lookup when there are no routes).
    #[inline]
    pub fn resolve<'a>(&'a self, grpc_service: &'a str) -> &'a str {
        if self.0.is_empty() {
            return grpc_service;
        }
        self.0
            .get(grpc_service)
            .map_or(grpc_service, ServiceName::as_str)
    }

    /// Whether there are no routes.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Each route: the gRPC service and the name it is registered under.
    pub fn iter(&self) -> impl Iterator<Item = (&ServiceName, &ServiceName)> {
        self.0.iter()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_gives_service() {
        assert_eq!(service_from_path("/pkg.Svc/Method"), Ok("pkg.Svc"));
        assert_eq!(service_from_path("/a/M"), Ok("a"));
    }

    #[test]
    fn bad_paths_are_rejected() {
        for p in [
            "", "/", "//M", "/a", "/a/", "a/M", "/a/M/x", "/a b/M", "/ä/M",
        ] {
            assert!(service_from_path(p).is_err(), "{p:?} accepted");
        }
        let long = format!("/{}/M", "x".repeat(MAX_SERVICE_NAME_LEN + 1));
        assert_eq!(
            service_from_path(&long),
            Err(PathError::BadService(ServiceNameError::TooLong))
        );
    }

    #[test]
    fn fast_path_agrees_with_full_checks() {
        let max = "x".repeat(MAX_SERVICE_NAME_LEN);
        let over = "x".repeat(MAX_SERVICE_NAME_LEN + 1);
        let mut paths = vec![format!("/{max}/M"), format!("/{over}/M")];
        for p in [
            "",
            "/",
            "//",
            "//M",
            "/a",
            "/a/",
            "a/M",
            "/a/M",
            "/a/M/",
            "/a/M/x",
            "/a b/M",
            "/ä/M",
            "/a.b_c-d/Method",
            "/a/ä",
            "/-/x",
            "x",
            "/a//",
        ] {
            paths.push(p.to_string());
        }
        for p in &paths {
            assert_eq!(service_from_path(p), service_from_path_checked(p), "{p:?}");
        }
    }

    #[test]
    fn bad_names_report_the_first_bad_char() {
        assert_eq!(
            validate_service_name("abä"),
            Err(ServiceNameError::BadChar('ä'))
        );
        assert_eq!(
            validate_service_name("a b"),
            Err(ServiceNameError::BadChar(' '))
        );
    }

    #[test]
    fn service_names_validate() {
        assert!(ServiceName::new("a.b-c_d9").is_ok());
        assert_eq!(ServiceName::new(""), Err(ServiceNameError::Empty));
        assert_eq!(ServiceName::new("a/b"), Err(ServiceNameError::BadChar('/')));
    }

    #[test]
    fn routes_map_grpc_services_to_registered_names() {
        let spec: RouteSpec = "helloworld.v1.Greeter=helloworld".parse().unwrap();
        assert_eq!(spec.to_string(), "helloworld.v1.Greeter=helloworld");
        let other: RouteSpec = " user.User = user.rpc ".parse().unwrap();
        let routes = Routes::new([&spec, &other, &spec]).unwrap();
        assert_eq!(routes.resolve("helloworld.v1.Greeter"), "helloworld");
        assert_eq!(routes.resolve("user.User"), "user.rpc");
        assert_eq!(routes.resolve("other.Svc"), "other.Svc");
        assert_eq!(Routes::default().resolve("a"), "a");
        let twice: RouteSpec = "user.User=b".parse().unwrap();
        assert!(matches!(
            Routes::new([&other, &twice]),
            Err(RouteError::Twice(..))
        ));
        for bad in ["nopair", "a=", "=b", "a/b=c", "a=b=c"] {
            assert!(bad.parse::<RouteSpec>().is_err(), "{bad}");
        }
        let file: RouteSpec =
            toml::from_str("grpc_service = \"helloworld.v1.Greeter\"\nregistered = \"helloworld\"")
                .unwrap();
        assert_eq!(file, spec);
        assert!(toml::from_str::<RouteSpec>("grpc_service = \"a b\"\nregistered = \"c\"").is_err());
    }
}
