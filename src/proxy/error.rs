//! Why the proxy answered a call itself, and the gRPC status each reason maps to (in
//! this one place).

use http::Response;

use crate::discovery::DiscoveryError;
use crate::endpoint::BackendAddr;
use crate::route::{PathError, ServiceName};
use crate::status::{error_response, Code};

/// A call the proxy could not forward, or that failed on its way.
#[derive(Debug, thiserror::Error)]
pub enum CallError {
    /// The path does not name a gRPC method.
    #[error("switchyard: {error}: {path:?}")]
    BadPath {
        /// What is wrong with it.
        error: PathError,
        /// The request's path.
        path: String,
    },
    /// The service could not be looked up (bad name, table full, nothing registered).
    #[error("switchyard: {0}")]
    Discovery(#[from] DiscoveryError),
    /// The first endpoint list of the service has not arrived in time.
    #[error("switchyard: endpoints of service '{0}' not known yet (etcd unreachable?)")]
    NotLoaded(ServiceName),
    /// The service had endpoints, or a listener is bound to it, and has none now.
    #[error("switchyard: no endpoints registered for service '{0}'")]
    NoEndpoints(ServiceName),
    /// No key names the service under any prefix, and it was never served: not a service.
    #[error(
        "switchyard: service '{service}' is not registered (no key under {prefixes}, nor a route to one)"
    )]
    NotRegistered {
        /// The service looked up.
        service: ServiceName,
        /// The prefixes looked in.
        prefixes: String,
    },
    /// Every endpoint offered the call failed to take it.
    #[error(
        "switchyard: all {count} endpoints of service '{service}' are unreachable{}",
        last.as_ref().map(|(a, e)| format!(" (last: {a}: {e})")).unwrap_or_default()
    )]
    Unreachable {
        /// The service.
        service: ServiceName,
        /// How many endpoints it has.
        count: usize,
        /// The last endpoint tried and why it did not take the call.
        last: Option<(BackendAddr, String)>,
    },
    /// A backend took the call and its stream failed before response headers.
    #[error("switchyard: service '{service}': backend {backend} failed the call: {error}")]
    BackendFailed {
        /// The service.
        service: ServiceName,
        /// The backend that failed.
        backend: BackendAddr,
        /// What failed.
        error: h2::Error,
    },
    /// The call's subset has no usable endpoint, and its rules are strict.
    #[error("switchyard: service '{service}': no usable endpoint in subset {subset} (strict traffic rule)")]
    SubsetUnavailable {
        /// The service.
        service: ServiceName,
        /// The subset, as `key=value` pairs.
        subset: std::sync::Arc<str>,
    },
    /// The call's deadline passed before a backend answered.
    #[error("switchyard: deadline exceeded before a backend of service '{0}' answered")]
    DeadlineExceeded(ServiceName),
    /// The request head cannot be pointed at the backend.
    #[error("switchyard: {0}")]
    BadRequest(#[from] http::Error),
}

impl CallError {
    /// The gRPC status the client gets for this error.
    pub fn code(&self) -> Code {
        match self {
            Self::BadPath { .. } | Self::NotRegistered { .. } => Code::Unimplemented,
            Self::Discovery(DiscoveryError::NoEndpoints(_)) => Code::Unavailable,
            Self::Discovery(_) => Code::ResourceExhausted,
            Self::NotLoaded(_)
            | Self::NoEndpoints(_)
            | Self::Unreachable { .. }
            | Self::BackendFailed { .. }
            | Self::SubsetUnavailable { .. } => Code::Unavailable,
            Self::DeadlineExceeded(_) => Code::DeadlineExceeded,
            Self::BadRequest(_) => Code::Internal,
        }
    }

    /// The trailers-only response that tells the client.
    pub fn response(&self) -> Response<()> {
        error_response(self.code(), &self.to_string())
    }
}
