//! The etcd connection shared by discovery and registration.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::config::EtcdArgs;

/// Errors from setting up the etcd client.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// No endpoint was given.
    #[error("no etcd endpoints given (--etcd-endpoints)")]
    NoEndpoints,
    /// Only one of user and password is set.
    #[error("--etcd-user and --etcd-password go together; only one is set")]
    IncompleteAuth,
    /// The TLS files are unusable.
    #[error("etcd TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
    /// The client could not be built (bad endpoint URL, TLS setup, auth).
    #[error("etcd client for {endpoints:?}: {source}")]
    Client {
        /// The endpoints that were tried.
        endpoints: Vec<String>,
        /// What etcd-client said.
        #[source]
        source: etcd_client::Error,
    },
}

/// Builds an etcd client over all configured endpoints.
///
/// The underlying channel connects lazily and fails over between endpoints, so this
/// succeeds while etcd is still down; requests fail until it is reachable.
pub async fn connect(args: &EtcdArgs) -> Result<Client, EtcdError> {
    if args.etcd_endpoints.is_empty() {
        return Err(EtcdError::NoEndpoints);
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(args.etcd_connect_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true);
    match (&args.etcd_user, &args.etcd_password) {
        (Some(user), Some(password)) => opts = opts.with_user(user.clone(), password.clone()),
        (None, None) => {}
        _ => return Err(EtcdError::IncompleteAuth),
    }
    if let Some(tls) = crate::tls::etcd_tls(
        args.etcd_ca.as_deref(),
        args.etcd_cert.as_deref(),
        args.etcd_key.as_deref(),
    )? {
        opts = opts.with_tls(tls);
    }
    Client::connect(&args.etcd_endpoints, Some(opts))
        .await
        .map_err(|source| EtcdError::Client {
            endpoints: args.etcd_endpoints.clone(),
            source,
        })
}
