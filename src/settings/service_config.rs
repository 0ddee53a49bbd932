//! gRPC service configs (`[service_config]`): per-method timeouts, retries, hedging and
//! retry throttling, from files (re-read on SIGHUP) and from etcd (watched).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

impl ServiceConfigSection {
    /// Read at start only: the etcd watch starts once (its documents apply live).
    pub const RESTART_ONLY: &'static [&'static str] = &["service_config.prefix"];
}

/// Where service configs come from (`[service_config]`).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfigSection {
    /// gRPC service config file (the standard JSON: `methodConfig` with `timeout`,
    /// `retryPolicy` or `hedgingPolicy`; `retryThrottling`), repeatable; re-read on SIGHUP.
    #[arg(
        id = "service_config.files",
        long = "service-config",
        env = "SWITCHYARD_SERVICE_CONFIG",
        value_name = "FILE",
        value_delimiter = ','
    )]
    #[serde(default)]
    pub files: Vec<PathBuf>,
    /// Fleet-wide service configs in etcd: the key PREFIX/<service> holds that service's
    /// config (the same JSON), watched and applied live; files win for the services they name.
    #[arg(
        id = "service_config.prefix",
        long = "service-config-prefix",
        env = "SWITCHYARD_SERVICE_CONFIG_PREFIX",
        value_name = "PREFIX"
    )]
    #[serde(default)]
    pub prefix: Option<String>,
}
