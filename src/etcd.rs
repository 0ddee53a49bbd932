//! The etcd connection shared by discovery and registration.

use std::time::Duration;

use etcd_client::{Client, ConnectOptions};

use crate::settings::EtcdSettings;

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
/// succeeds while etcd is still down; requests fail until it is reachable. With a user,
/// credentials that etcd rejects are an error; if etcd is unreachable, authentication is
/// retried in the background until it succeeds (expired tokens are refreshed after that).
pub async fn connect(args: &EtcdSettings) -> Result<Client, EtcdError> {
    if args.endpoints.is_empty() {
        return Err(EtcdError::NoEndpoints);
    }
    let mut opts = ConnectOptions::new()
        .with_connect_timeout(args.connect_timeout)
        .with_keep_alive(Duration::from_secs(2), Duration::from_secs(2))
        .with_keep_alive_while_idle(true)
        .with_auto_token_refresh(true);
    let creds = match (&args.user, &args.password) {
        (Some(user), Some(password)) => Some((user.clone(), password.clone())),
        (None, None) => None,
        _ => return Err(EtcdError::IncompleteAuth),
    };
    if let Some(tls) = args.tls()? {
        opts = opts.with_tls(tls);
    }
    let client_err = |source| EtcdError::Client {
        endpoints: args.endpoints.clone(),
        source,
    };
    let mut client = Client::connect(&args.endpoints, Some(opts))
        .await
        .map_err(client_err)?;
    if let Some(creds) = creds {
        let first = tokio::time::timeout(
            args.connect_timeout + Duration::from_secs(3),
            client.update_user(Some(creds.clone())),
        )
        .await;
        match first {
            Ok(Ok(())) => {}
            Ok(Err(e)) if credentials_rejected(&e) => return Err(client_err(e)),
            _ => {
                tracing::warn!(
                    user = %creds.0,
                    "etcd unreachable; will authenticate once it answers"
                );
                tokio::spawn(authenticate_later(client.clone(), creds));
            }
        }
    }
    Ok(client)
}

/// Whether etcd answered that the user or password is wrong.
fn credentials_rejected(e: &etcd_client::Error) -> bool {
    matches!(e, etcd_client::Error::GRpcStatus(s) if matches!(
        s.code(),
        tonic::Code::InvalidArgument | tonic::Code::PermissionDenied | tonic::Code::Unauthenticated
    ))
}

/// Retries authentication with backoff until etcd accepts it (or rejects the credentials).
async fn authenticate_later(mut client: Client, creds: (String, String)) {
    let mut pause = Duration::from_millis(500);
    loop {
        tokio::time::sleep(pause).await;
        match client.update_user(Some(creds.clone())).await {
            Ok(()) => {
                tracing::info!(user = %creds.0, "authenticated to etcd");
                return;
            }
            Err(e) if credentials_rejected(&e) => {
                tracing::error!(user = %creds.0, error = %e, "etcd rejects the credentials");
                return;
            }
            Err(e) => tracing::debug!(error = %e, "etcd authentication failed; retrying"),
        }
        pause = (pause * 2).min(Duration::from_secs(10));
    }
}
