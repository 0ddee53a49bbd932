//! Errors in the settings: each names the setting (its file key, or its flag and
//! environment variable) and, when it came from the config file, where it is there.

use std::fmt;
use std::path::PathBuf;

/// Where in a config file something is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// The file.
    pub path: PathBuf,
    /// 1-based line.
    pub line: usize,
    /// 1-based column.
    pub column: usize,
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.path.display(), self.line, self.column)
    }
}

/// A bad setting: where it is (in the file, when it came from there), which field, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldError {
    /// Where the setting is in the config file, if it came from there.
    pub location: Option<Location>,
    /// The setting: its file key (`etcd.prefix`) or its flag (`--prefix`).
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.location {
            Some(l) if self.field.is_empty() => write!(f, "{l}: {}", self.message),
            Some(l) => write!(f, "{l}: field `{}`: {}", self.field, self.message),
            None => write!(f, "{}: {}", self.field, self.message),
        }
    }
}

/// Why the settings are unusable.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {path}: {error}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        error: std::io::Error,
    },
    /// A setting is malformed or inconsistent.
    #[error("{0}")]
    Field(FieldError),
    /// The flags or environment variables are malformed.
    #[error(transparent)]
    Args(#[from] clap::Error),
}
