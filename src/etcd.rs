//! The etcd connection shared by discovery and registration, and the requests they
//! share: any request with a time limit ([`timed`]), and "delete this key only while it
//! is still under this lease" ([`delete_if_under_lease`]).

use std::future::Future;
use std::time::Duration;

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp};

use crate::backoff::Backoff;
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
        let first = timed(
            "authenticate",
            args.connect_timeout + Duration::from_secs(3),
            client.update_user(Some(creds.clone())),
        )
        .await;
        match first {
            Ok(()) => {}
            Err(RequestError::Failed { source, .. }) if credentials_rejected(&source) => {
                return Err(client_err(source))
            }
            Err(_) => {
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
    let mut backoff = Backoff::new(Duration::from_millis(500), Duration::from_secs(10));
    loop {
        backoff.sleep().await;
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
    }
}

/// Why an etcd request made with [`timed`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    /// etcd (or the connection to it) answered with an error.
    #[error("etcd {op}: {source}")]
    Failed {
        /// The request (`get`, `watch`, `lease grant`, ...).
        op: &'static str,
        /// What etcd-client said.
        #[source]
        source: etcd_client::Error,
    },
    /// No answer within the time limit.
    #[error("etcd {op}: no answer within {after:?}")]
    TimedOut {
        /// The request.
        op: &'static str,
        /// How long it waited.
        after: Duration,
    },
}

impl RequestError {
    /// The request that failed.
    pub fn op(&self) -> &'static str {
        match self {
            Self::Failed { op, .. } | Self::TimedOut { op, .. } => op,
        }
    }
}

/// Runs one etcd request (`op` names it in the error) with the time limit `limit`: etcd
/// requests otherwise wait as long as the connection takes to fail over or give up.
pub async fn timed<T>(
    op: &'static str,
    limit: Duration,
    request: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, RequestError> {
    match tokio::time::timeout(limit, request).await {
        Ok(r) => r.map_err(|source| RequestError::Failed { op, source }),
        Err(_) => Err(RequestError::TimedOut { op, after: limit }),
    }
}

/// Deletes `key` only if it is still attached to `lease`, in one transaction: a key that
/// was since put again under another lease (a new registration of the same address)
/// stays. Returns whether the key was deleted.
pub async fn delete_if_under_lease(
    client: &mut Client,
    key: &str,
    lease: i64,
    limit: Duration,
) -> Result<bool, RequestError> {
    let txn = Txn::new()
        .when([Compare::lease(key, CompareOp::Equal, lease)])
        .and_then([TxnOp::delete(key, None)]);
    let resp = timed("delete", limit, client.txn(txn)).await?;
    Ok(resp.succeeded())
}
