//! How log lines look (`--log-format`, a global flag; `log_format` at the file's top),
//! and which are written (`--log-level`, `log.level`).

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Format of log lines.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line (fields flattened), for log collectors.
    Json,
}

/// Logging settings (global: accepted by every subcommand; its keys are at the top of
/// the config file).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogSettings {
    /// Log line format; which lines are logged is set by `--log-level` (or `RUST_LOG`).
    #[arg(
        id = "log_format",
        long = "log-format",
        global = true,
        env = "SWITCHYARD_LOG_FORMAT",
        value_name = "FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    pub log_format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        super::defaults()
    }
}

/// Which log lines are written: an `EnvFilter` directive string such as `info` or
/// `info,switchyard=debug`, checked when read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogLevel(String);

/// A log filter that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a log filter ({0}); give a level (error, warn, info, debug, trace) or directives such as \"info,switchyard=debug\"")]
pub struct BadLogLevel(String);

impl LogLevel {
    /// The filter these directives make.
    pub fn filter(&self) -> tracing_subscriber::EnvFilter {
        // Checked when read: the parse succeeds (lossy would only drop a bad directive).
        tracing_subscriber::EnvFilter::builder().parse_lossy(&self.0)
    }

    /// The directives as written.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for LogLevel {
    type Err = BadLogLevel;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.is_empty() {
            return Err(BadLogLevel("empty".to_owned()));
        }
        tracing_subscriber::EnvFilter::builder()
            .parse(s)
            .map(|_| Self(s.to_owned()))
            .map_err(|e| BadLogLevel(e.to_string()))
    }
}

impl fmt::Display for LogLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Which log lines the proxy writes (`[log]`; applied again on reload).
#[derive(clap::Args, Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LogSection {
    /// Which log lines are written: a level or EnvFilter directives (e.g.
    /// `info,switchyard::call=debug`); `RUST_LOG`, when set, wins at start.
    #[arg(
        id = "log.level",
        long = "log-level",
        env = "SWITCHYARD_LOG_LEVEL",
        value_name = "FILTER",
        default_value = "info"
    )]
    #[serde(with = "super::text")]
    pub level: LogLevel,
}
