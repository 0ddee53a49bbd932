//! TLS with rustls: optional TLS on the listeners, optional TLS or mTLS to backends,
//! and the files etcd's client TLS is built from.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::{ClientConfig, RootCertStore, ServerConfig};

/// TLS flags of the proxy (listener side and backend side).
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// PEM certificate chain served on the listeners (enables TLS on them; needs --tls-key).
    #[arg(long, env = "SWITCHYARD_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "SWITCHYARD_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Speak TLS to backends (needs --upstream-ca).
    #[arg(long, env = "SWITCHYARD_UPSTREAM_TLS")]
    pub upstream_tls: bool,
    /// PEM CA bundle that backend certificates must chain to.
    #[arg(long, env = "SWITCHYARD_UPSTREAM_CA")]
    pub upstream_ca: Option<PathBuf>,
    /// PEM client certificate presented to backends (mTLS; needs --upstream-key).
    #[arg(long, env = "SWITCHYARD_UPSTREAM_CERT")]
    pub upstream_cert: Option<PathBuf>,
    /// PEM private key for --upstream-cert.
    #[arg(long, env = "SWITCHYARD_UPSTREAM_KEY")]
    pub upstream_key: Option<PathBuf>,
    /// Server name checked in backend certificates (default: the backend's host).
    #[arg(long, env = "SWITCHYARD_UPSTREAM_SNI")]
    pub upstream_sni: Option<String>,
}

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

/// The listeners' TLS configuration from the flags; `None` when `--tls-cert` is not set.
pub fn listener_config(args: &TlsArgs) -> Result<Option<Arc<ServerConfig>>, TlsError> {
    match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => server_config(cert, key).map(Some),
        (None, None) => Ok(None),
        (Some(_), None) => Err(file_err(Path::new("--tls-cert"), "needs --tls-key too")),
        (None, Some(_)) => Err(file_err(Path::new("--tls-key"), "needs --tls-cert too")),
    }
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
    /// Builds backend TLS from the flags; `None` when `--upstream-tls` is off.
    pub fn from_args(args: &TlsArgs) -> Result<Option<Self>, TlsError> {
        if !args.upstream_tls {
            return Ok(None);
        }
        let Some(ca) = &args.upstream_ca else {
            return Err(TlsError::File {
                path: PathBuf::from("--upstream-ca"),
                reason: "required with --upstream-tls".into(),
            });
        };
        let mut roots = RootCertStore::empty();
        for c in load_certs(ca)? {
            roots.add(c).map_err(|e| file_err(ca, e))?;
        }
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()?
            .with_root_certificates(roots);
        let mut config = match (&args.upstream_cert, &args.upstream_key) {
            (Some(cert), Some(key)) => {
                builder.with_client_auth_cert(load_certs(cert)?, load_key(key)?)?
            }
            (None, None) => builder.with_no_client_auth(),
            (Some(_), None) => {
                return Err(file_err(
                    Path::new("--upstream-cert"),
                    "needs --upstream-key too",
                ))
            }
            (None, Some(_)) => {
                return Err(file_err(
                    Path::new("--upstream-key"),
                    "needs --upstream-cert too",
                ))
            }
        };
        config.alpn_protocols = vec![b"h2".to_vec()];
        let sni = args
            .upstream_sni
            .as_ref()
            .map(|s| {
                ServerName::try_from(s.clone()).map_err(|_| TlsError::BadServerName(s.clone()))
            })
            .transpose()?;
        Ok(Some(Self {
            config: Arc::new(config),
            sni,
        }))
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
