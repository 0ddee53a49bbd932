//! `switchyard proxy`'s settings as loaded: its flags and environment, completed by the
//! config file named by `--config`, then checked; and `switchyard check-config`.

use std::fmt;
use std::path::{Path, PathBuf};

use clap::{ArgMatches, Args, Command, FromArgMatches};

use super::error::{ConfigError, FieldError};
use super::file::FileSource;
use super::layer::{self, Flags};
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
    file: Option<FileSource>,
}

/// Builds the proxy's settings from `matches` (of `switchyard proxy`): the flags and
/// environment, completed by the config file named by `--config`, then checked (including
/// that the TLS files can be loaded).
pub fn load(matches: &ArgMatches) -> Result<Loaded, ConfigError> {
    let given = ProxyCommand::from_arg_matches(matches)?;
    // `--log-format` is global: present only when the command has it.
    let log = LogSettings {
        log_format: matches
            .try_get_one::<LogFormat>("log_format")
            .ok()
            .flatten()
            .copied()
            .unwrap_or_default(),
    };
    let cmd = proxy_command();
    let flags = Flags {
        cmd: &cmd,
        matches: Some(matches),
    };
    let file = match &given.config {
        Some(path) => Some(FileSource::read(path)?),
        None => None,
    };
    let loaded = layered(given.settings, log, &flags, file)?;
    super::validate::validate(&loaded)?;
    super::validate::verify_tls_files(&loaded)?;
    Ok(loaded)
}

/// `switchyard check-config FILE`: loads `path` as `switchyard proxy --config FILE` would
/// (with the current environment) without starting anything.
pub fn check(path: &Path) -> Result<Loaded, ConfigError> {
    let matches = proxy_command().try_get_matches_from([
        std::ffi::OsStr::new("proxy"),
        std::ffi::OsStr::new("--config"),
        path.as_os_str(),
    ])?;
    load(&matches)
}

/// A config file's text (the file at `path`) over the built-in defaults, without the
/// environment and without the checks between settings; errors are located in the file.
pub fn parse_file(path: &Path, text: &str) -> Result<Loaded, ConfigError> {
    let cmd = proxy_command();
    let flags = Flags {
        cmd: &cmd,
        matches: None,
    };
    let file = FileSource::parse(path, text.to_owned())?;
    layered(
        ProxySettings::default(),
        LogSettings::default(),
        &flags,
        Some(file),
    )
}

/// Lays `file` over the settings clap parsed.
fn layered(
    proxy: ProxySettings,
    log: LogSettings,
    flags: &Flags<'_>,
    file: Option<(FileSource, serde_json::Map<String, serde_json::Value>)>,
) -> Result<Loaded, ConfigError> {
    let Some((mut file, values)) = file else {
        return Ok(Loaded {
            proxy,
            log_format: log.log_format,
            file: None,
        });
    };
    // The logging settings are global flags, kept at the top of the same file.
    let mut tree = layer::to_tree(&proxy)?;
    let log_tree = layer::to_tree(&log)?;
    let log_keys: Vec<String> = log_tree.keys().cloned().collect();
    tree.extend(log_tree);
    layer::overlay(&mut tree, values, flags, &mut file);
    let log_tree = log_keys
        .iter()
        .filter_map(|k| tree.remove_entry(k))
        .collect();
    let log: LogSettings = layer::from_tree(log_tree, flags, Some(&file))?;
    let proxy = layer::from_tree(tree, flags, Some(&file))?;
    Ok(Loaded {
        proxy,
        log_format: log.log_format,
        file: Some(file),
    })
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
        write!(f, "log format {:?}, level {}", self.log_format, a.log.level)
    }
}
