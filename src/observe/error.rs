//! Why the access log or tracing cannot start.

use std::path::PathBuf;

/// The access log or the trace exporter could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    /// The access log's file cannot be opened for appending.
    #[error("--access-log (config key `observe.access_log`): cannot open {}: {source}", .path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The writer thread could not be started.
    #[error("cannot start the access log's writer thread: {0}")]
    Thread(#[source] std::io::Error),
    /// The OTLP exporter refused its settings.
    #[error("--otlp-endpoint (config key `observe.otlp_endpoint`) {0:?}: {1}")]
    Exporter(String, String),
}
