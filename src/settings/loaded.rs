//! The `switchyard proxy` command's flags, and the proxy's settings as loaded, with where
//! each came from (a file key or a flag), so that errors about them name the setting as
//! the operator gave it.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::{Args, Command};

use super::error::{ConfigError, FieldError};
use super::file::FileSource;
use super::layer::Flags;
use super::{LogFormat, LogSettings, ProxySettings};

/// Flags of `switchyard proxy`: the config file, and every setting.
#[derive(clap::Args, Debug, Clone)]
pub struct ProxyCommand {
    /// TOML config file; flags and environment variables override what it sets.
    #[arg(long, env = "SWITCHYARD_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// The proxy's settings.
    #[command(flatten)]
    pub settings: ProxySettings,
}

/// The `switchyard proxy` command (with the global logging flags), as the binary has it.
pub fn proxy_command() -> Command {
    LogSettings::augment_args(ProxyCommand::augment_args(Command::new("proxy")))
}

/// The proxy's settings after layering flags, environment, config file and defaults.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The proxy's settings.
    pub proxy: ProxySettings,
    /// The log line format.
    pub log_format: LogFormat,
    pub(super) file: Option<FileSource>,
}

impl Loaded {
    /// An error about the setting `id`, located in the file if it came from there.
    pub(crate) fn field_error(&self, id: &str, message: String) -> ConfigError {
        ConfigError::Field(
            match self
                .file
                .as_ref()
                .filter(|f| f.taken.iter().any(|t| t == id))
            {
                Some(file) => FieldError {
                    location: Some(file.locate(id)),
                    field: id.to_owned(),
                    message,
                },
                None => FieldError {
                    location: None,
                    field: flag_name(id),
                    message,
                },
            },
        )
    }

    /// An error about the part `path` (`traffic[1].split[0].weight`) of the file-only
    /// setting `id`, located in the file.
    pub(crate) fn element_error(&self, id: &str, path: &str, message: String) -> ConfigError {
        ConfigError::Field(FieldError {
            location: self
                .file
                .as_ref()
                .filter(|f| f.taken.iter().any(|t| t == id))
                .map(|f| f.locate(path)),
            field: path.to_owned(),
            message,
        })
    }

    /// How the setting `id` is named where it came from (or could have come from).
    pub(crate) fn describe(&self, id: &str) -> String {
        match &self.file {
            Some(f) if f.taken.iter().any(|t| t == id) => format!("`{id}`"),
            Some(_) => format!("`{id}` or {}", flag_name(id)),
            None => flag_name(id),
        }
    }

    /// The config file the settings were read from, if any.
    pub fn config_file(&self) -> Option<&Path> {
        self.file.as_ref().map(|f| f.path.as_path())
    }

    /// The settings taken from the config file, by key (`etcd.prefix`).
    pub fn from_file(&self) -> Vec<&str> {
        self.file
            .as_ref()
            .map_or_else(Vec::new, |f| f.taken.iter().map(String::as_str).collect())
    }
}

/// `--flag ($ENV)` of the proxy's setting `id`.
fn flag_name(id: &str) -> String {
    let cmd = proxy_command();
    Flags {
        cmd: &cmd,
        matches: None,
    }
    .flag_name(id)
}

impl fmt::Display for Loaded {
    /// A summary for `check-config` (the password is not shown).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let a = &self.proxy;
        for l in &a.listeners {
            match &l.service {
                Some(s) => writeln!(f, "listener {} -> service {s}", l.addr)?,
                None => writeln!(f, "listener {} -> service from the call's path", l.addr)?,
            }
        }
        for r in &a.route {
            writeln!(f, "route {} -> service {}", r.grpc_service, r.registered)?;
        }
        writeln!(f, "admin {}", a.admin.listen)?;
        let e = &a.etcd;
        writeln!(
            f,
            "etcd {} prefix {} (tls {}, auth {})",
            e.endpoints.join(","),
            e.prefixes()
                .iter()
                .map(|p| format!("{p:?}"))
                .collect::<Vec<_>>()
                .join(", "),
            match (&e.ca, &e.cert) {
                (_, Some(_)) => "mtls",
                (Some(_), None) => "on",
                _ => "off",
            },
            e.user
                .as_deref()
                .map_or("off".to_owned(), |u| format!("user {u:?}")),
        )?;
        writeln!(
            f,
            "tls listeners {}, backends {}",
            if a.tls.cert.is_some() { "on" } else { "off" },
            match (a.upstream_tls.enabled, &a.upstream_tls.cert) {
                (false, _) => "off",
                (true, None) => "on",
                (true, Some(_)) => "mtls",
            }
        )?;
        let t = &a.timeouts;
        writeln!(
            f,
            "timeouts connect {:?}, discovery {:?}, etcd connect {:?}, idle {:?}, first request {:?}, drain {:?}",
            t.connect, t.discovery, e.connect_timeout, t.idle, t.first_request, t.drain
        )?;
        let l = &a.limits;
        writeln!(
            f,
            "limits services {}, connections {}, streams per connection {}, header list {} bytes, worker threads {}",
            l.max_services,
            l.max_connections,
            l.max_concurrent_streams,
            l.max_header_list_size,
            l.worker_threads
        )?;
        let b = &a.balance;
        match &b.zone {
            Some(z) => writeln!(f, "zone {z} (metadata key {:?})", b.zone_key)?,
            None => writeln!(f, "zone off")?,
        }
        for t in &a.traffic {
            let splits: Vec<String> = t
                .split
                .iter()
                .map(|s| format!("{:?}={}", s.subset, s.weight))
                .collect();
            writeln!(
                f,
                "traffic {}: {} header match(es), split [{}]{}",
                t.service,
                t.matches.len(),
                splits.join(", "),
                if t.strict { ", strict" } else { "" }
            )?;
        }
        write!(f, "log format {:?}, level {}", self.log_format, a.log.level)
    }
}
