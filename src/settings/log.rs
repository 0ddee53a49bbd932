//! How log lines look (`--log-format`, a global flag; `log_format` at the file's top).

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
    /// Log line format; which lines are logged is set by `RUST_LOG` (default `info`).
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
