//! Where etcd is, how to reach it, and where services live in it (`[etcd]`); shared by
//! `proxy`, `register`, `endpoints` and the demo backend.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::duration;

impl EtcdSettings {
    /// Read at start only (the client is made once); the prefixes apply live.
    pub const RESTART_ONLY: &'static [&'static str] = &[
        "etcd.endpoints",
        "etcd.connect_timeout",
        "etcd.user",
        "etcd.password",
        "etcd.ca",
        "etcd.cert",
        "etcd.key",
    ];
}

/// Where etcd is and where services live in it (`[etcd]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct EtcdSettings {
    /// etcd endpoints, comma-separated.
    #[arg(
        id = "etcd.endpoints",
        long = "etcd-endpoints",
        env = "SWITCHYARD_ETCD_ENDPOINTS",
        value_name = "URL,...",
        value_delimiter = ',',
        default_value = "http://127.0.0.1:2379"
    )]
    pub endpoints: Vec<String>,
    /// Key prefix under which services register (`<prefix>/<service>/...`), kept as
    /// written (empty for go-zero, `/microservices` for Kratos); repeatable (a list in
    /// the file): a service's endpoints are those under any of them. Default: `services`
    /// (for `register`: the --format's own).
    #[arg(
        id = "etcd.prefix",
        long = "prefix",
        env = "SWITCHYARD_PREFIX",
        value_name = "PREFIX"
    )]
    #[serde(default, deserialize_with = "one_or_many")]
    pub prefix: Vec<String>,
    /// Time allowed to open a connection to an etcd endpoint.
    #[arg(
        id = "etcd.connect_timeout",
        long = "etcd-connect-timeout",
        env = "SWITCHYARD_ETCD_CONNECT_TIMEOUT",
        value_name = "DURATION",
        default_value = "2s",
        value_parser = duration::parse
    )]
    #[serde(with = "duration")]
    pub connect_timeout: Duration,
    /// etcd user name (auth enabled clusters).
    #[arg(
        id = "etcd.user",
        long = "etcd-user",
        env = "SWITCHYARD_ETCD_USER",
        value_name = "USER"
    )]
    pub user: Option<String>,
    /// etcd password (prefer the environment variable to the flag or the file).
    #[arg(
        id = "etcd.password",
        long = "etcd-password",
        env = "SWITCHYARD_ETCD_PASSWORD",
        value_name = "PASSWORD",
        hide_env_values = true
    )]
    pub password: Option<String>,
    /// PEM CA bundle for etcd's server certificates (enables TLS to etcd; use https:// endpoints).
    #[arg(
        id = "etcd.ca",
        long = "etcd-ca",
        env = "SWITCHYARD_ETCD_CA",
        value_name = "FILE"
    )]
    pub ca: Option<PathBuf>,
    /// PEM client certificate for etcd (mTLS; needs --etcd-key).
    #[arg(
        id = "etcd.cert",
        long = "etcd-cert",
        env = "SWITCHYARD_ETCD_CERT",
        value_name = "FILE"
    )]
    pub cert: Option<PathBuf>,
    /// PEM private key for --etcd-cert.
    #[arg(
        id = "etcd.key",
        long = "etcd-key",
        env = "SWITCHYARD_ETCD_KEY",
        value_name = "FILE"
    )]
    pub key: Option<PathBuf>,
}

impl Default for EtcdSettings {
    fn default() -> Self {
        super::defaults()
    }
}

/// The key prefix used when none is given.
pub(super) const DEFAULT_PREFIX: &str = "services";

/// One prefix (`prefix = "services"`) or a list of them.
fn one_or_many<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrMany {
        One(String),
        Many(Vec<String>),
    }
    Ok(match OneOrMany::deserialize(d)? {
        OneOrMany::One(s) => vec![s],
        OneOrMany::Many(v) => v,
    })
}

impl EtcdSettings {
    /// The key prefixes given, or the default one.
    pub fn prefixes(&self) -> Vec<String> {
        if self.prefix.is_empty() {
            vec![DEFAULT_PREFIX.to_owned()]
        } else {
            self.prefix.clone()
        }
    }

    /// Settings for a local etcd at `endpoint` with the default prefix (for tests and tools).
    pub fn local(endpoint: impl Into<String>) -> Self {
        Self {
            endpoints: vec![endpoint.into()],
            ..Self::default()
        }
    }

    /// etcd client TLS from the CA / client certificate files; `None` without them.
    pub fn tls(&self) -> Result<Option<etcd_client::TlsOptions>, crate::tls::TlsError> {
        crate::tls::etcd_tls(
            self.ca.as_deref(),
            self.cert.as_deref(),
            self.key.as_deref(),
        )
    }
}
