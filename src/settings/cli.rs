//! `switchyard proxy`'s settings as loaded: its flags and environment, completed by the
//! config file named by `--config`, then checked; and `switchyard check-config`.

use std::path::Path;

use clap::{ArgMatches, FromArgMatches};

use super::error::ConfigError;
use super::file::FileSource;
use super::layer::{self, Flags};
use super::loaded::{proxy_command, Loaded, ProxyCommand};
use super::{LogFormat, LogSettings, ProxySettings};

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
