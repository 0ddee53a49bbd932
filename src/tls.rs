//! TLS with rustls: optional TLS on the listeners, optional TLS or mTLS to backends,
//! and the files etcd's client TLS is built from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// TLS set-up errors; each names the file or setting at fault.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A file could not be read or holds no PEM item of the wanted kind.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },
    /// rustls refused the configuration.
    #[error("TLS configuration: {0}")]
    Config(#[from] rustls::Error),
    /// The SNI name is not a valid DNS name or IP address.
    #[error("--upstream-sni {0:?} is not a valid server name")]
    BadServerName(String),
}

fn file_err(path: &Path, reason: impl ToString) -> TlsError {
    TlsError::File {
        path: path.to_owned(),
        reason: reason.to_string(),
    }
}

/// Reads a PEM certificate chain.
pub fn load_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| file_err(path, e))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| file_err(path, e))?;
    if certs.is_empty() {
        return Err(file_err(path, "no PEM certificate found"));
    }
    Ok(certs)
}

/// Reads a PEM private key (PKCS#8, PKCS#1 or SEC1).
pub fn load_key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| file_err(path, format!("no usable private key: {e}")))
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The listeners' server configuration, offering HTTP/2 only (ALPN `h2`).
pub fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, TlsError> {
    let mut cfg = ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(load_certs(cert)?, load_key(key)?)?;
    cfg.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(cfg))
}

/// TLS settings for backend connections.
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The rustls client configuration (CA, optional client certificate, ALPN `h2`).
    pub config: Arc<ClientConfig>,
    /// A fixed server name to verify, instead of each backend's host.
    pub sni: Option<ServerName<'static>>,
}

impl UpstreamTls {
    /// Backend TLS trusting the CA bundle `ca`, presenting `client` (certificate, key) if
    /// given (mTLS), and verifying `sni` instead of each backend's host if given.
    pub fn new(
        ca: &Path,
        client: Option<(&Path, &Path)>,
        sni: Option<&str>,
    ) -> Result<Self, TlsError> {
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| file_err(ca, e))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => {
                builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let sni = sni
            .map(|s| {
                ServerName::try_from(s.to_owned())
                    .map_err(|_| TlsError::BadServerName(s.to_owned()))
            })
            .transpose()?;
        Ok(Self {
            config: Arc::new(config),
            sni,
        })
    }

    /// The server name to verify for a backend whose host is `host`.
    pub fn server_name(&self, host: &str) -> Option<ServerName<'static>> {
        match &self.sni {
            Some(s) => Some(s.clone()),
            None => ServerName::try_from(host.to_owned()).ok(),
        }
    }
}

/// etcd client TLS from CA / client certificate files.
pub fn etcd_tls(
    ca: Option<&Path>,
    cert: Option<&Path>,
    key: Option<&Path>,
) -> Result<Option<etcd_client::TlsOptions>, TlsError> {
    if ca.is_none() && cert.is_none() && key.is_none() {
        return Ok(None);
    }
    match (cert, key) {
        (Some(_), None) => return Err(file_err(Path::new("--etcd-cert"), "needs --etcd-key too")),
        (None, Some(_)) => return Err(file_err(Path::new("--etcd-key"), "needs --etcd-cert too")),
        _ => {}
    }
    let read = |p: &Path| std::fs::read(p).map_err(|e| file_err(p, e));
    let mut opts = etcd_client::TlsOptions::new();
    if let Some(ca) = ca {
        opts = opts.ca_certificate(etcd_client::Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (cert, key) {
        opts = opts.identity(etcd_client::Identity::from_pem(read(cert)?, read(key)?));
    }
    Ok(Some(opts))
}
