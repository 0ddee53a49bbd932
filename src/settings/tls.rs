//! TLS on the listeners (`[tls]`) and to the backends (`[upstream_tls]`); etcd's TLS
//! files are in [`super::EtcdSettings`].

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::tls::{TlsError, UpstreamTls};

/// TLS on the listeners (`[tls]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsSettings {
    /// PEM certificate chain served on the listeners (enables TLS on them; needs --tls-key).
    #[arg(
        id = "tls.cert",
        long = "tls-cert",
        env = "SWITCHYARD_TLS_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(
        id = "tls.key",
        long = "tls-key",
        env = "SWITCHYARD_TLS_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
}

impl ListenerTlsSettings {
    /// The listeners' TLS configuration; `None` when no certificate is set.
    pub fn server_config(&self) -> Result<Option<Arc<rustls::ServerConfig>>, TlsError> {
        match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => crate::tls::server_config(cert, key).map(Some),
            (None, None) => Ok(None),
            (Some(_), None) => Err(missing("--tls-cert", "needs --tls-key too")),
            (None, Some(_)) => Err(missing("--tls-key", "needs --tls-cert too")),
        }
    }
}

impl UpstreamTlsSettings {
    /// Read at start only: backend connections are set up with it.
    pub const RESTART_ONLY: &'static [&'static str] = &["upstream_tls"];
}

/// TLS to the backends (`[upstream_tls]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSettings {
    /// Speak TLS to backends (needs --upstream-ca).
    #[arg(
        id = "upstream_tls.enabled",
        long = "upstream-tls",
        env = "SWITCHYARD_UPSTREAM_TLS"
    )]
    pub enabled: bool,
    /// PEM CA bundle that backend certificates must chain to.
    #[arg(
        id = "upstream_tls.ca",
        long = "upstream-ca",
        env = "SWITCHYARD_UPSTREAM_CA",
        value_name = "FILE"
    )]
    pub ca: Option<PathBuf>,
    /// PEM client certificate presented to backends (mTLS; needs --upstream-key).
    #[arg(
        id = "upstream_tls.cert",
        long = "upstream-cert",
        env = "SWITCHYARD_UPSTREAM_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key for --upstream-cert.
    #[arg(
        id = "upstream_tls.key",
        long = "upstream-key",
        env = "SWITCHYARD_UPSTREAM_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
    /// Server name checked in backend certificates (default: the backend's host).
    #[arg(
        id = "upstream_tls.sni",
        long = "upstream-sni",
        env = "SWITCHYARD_UPSTREAM_SNI",
        value_name = "NAME"
    )]
    pub sni: Option<String>,
}

impl UpstreamTlsSettings {
    /// Backend TLS (CA, optional client certificate, SNI); `None` when it is off.
    pub fn client_config(&self) -> Result<Option<UpstreamTls>, TlsError> {
        if !self.enabled {
            return Ok(None);
        }
        let Some(ca) = &self.ca else {
            return Err(missing("--upstream-ca", "required with --upstream-tls"));
        };
        let client = match (&self.cert, &self.key) {
            (Some(cert), Some(key)) => Some((cert.as_path(), key.as_path())),
            (None, None) => None,
            (Some(_), None) => return Err(missing("--upstream-cert", "needs --upstream-key too")),
            (None, Some(_)) => return Err(missing("--upstream-key", "needs --upstream-cert too")),
        };
        UpstreamTls::new(ca, client, self.sni.as_deref()).map(Some)
    }
}

/// An error about a setting that is missing its partner.
fn missing(flag: &str, reason: &str) -> TlsError {
    TlsError::File {
        path: Path::new(flag).to_owned(),
        reason: reason.to_owned(),
    }
}
