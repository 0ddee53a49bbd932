//! Routing: which service a call is for.
//!
//! A listener bound to a service sends every call there; otherwise the service is the
//! gRPC service part of the request path (`/pkg.Svc/Method` → `pkg.Svc`).

use std::fmt;
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
    match s
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        Some(c) => Err(ServiceNameError::BadChar(c)),
        None => Ok(()),
    }
}

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
    let rest = path.strip_prefix('/').ok_or(PathError::NotServiceMethod)?;
    let (service, method) = rest.split_once('/').ok_or(PathError::NotServiceMethod)?;
    if method.is_empty() || method.contains('/') {
        return Err(PathError::NotServiceMethod);
    }
    validate_service_name(service)?;
    Ok(service)
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
    fn service_names_validate() {
        assert!(ServiceName::new("a.b-c_d9").is_ok());
        assert_eq!(ServiceName::new(""), Err(ServiceNameError::Empty));
        assert_eq!(ServiceName::new("a/b"), Err(ServiceNameError::BadChar('/')));
    }
}
