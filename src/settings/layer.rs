//! Layering: flag > environment > file > built-in default, for any settings type that
//! derives `clap::Args` (flags, environment, defaults) and serde (the file).
//!
//! clap parses flags and environment, falling back to the defaults. The result is
//! serialized to a tree whose keys are the file's keys; the file's values are laid over
//! it wherever the setting was not given by flag or environment (clap's
//! [`ArgMatches::value_source`]; an argument's id is its file key), and the tree is
//! deserialized back. The file's unknown keys and bad values fail that last step, with
//! the key's path, which is then found in the file's text.

use std::path::Path;

use clap::parser::ValueSource;
use clap::{ArgMatches, Command, ValueHint};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};

use super::error::{ConfigError, FieldError};
use super::file::FileSource;

/// What clap knows about the settings: their flags, and which were given.
pub(crate) struct Flags<'a> {
    /// The command the settings' flags belong to.
    pub cmd: &'a Command,
    /// What was parsed; `None`: nothing was given.
    pub matches: Option<&'a ArgMatches>,
}

impl Flags<'_> {
    /// Whether the setting with id `id` was given by flag or environment variable.
    pub(super) fn given(&self, id: &str) -> bool {
        self.matches.is_some_and(|m| {
            m.try_contains_id(id).is_ok()
                && matches!(
                    m.value_source(id),
                    Some(ValueSource::CommandLine | ValueSource::EnvVariable)
                )
        })
    }

    /// Whether the setting with id `id` is a file path (clap infers the hint for a
    /// `PathBuf`; a path-or-word setting, e.g. `observe.access_log`, declares it).
    fn is_path(&self, id: &str) -> bool {
        self.arg(id)
            .is_some_and(|a| a.get_value_hint() == ValueHint::AnyPath)
    }

    /// The words a path setting takes that are not paths (its possible values, e.g.
    /// `stdout` and `off` for `observe.access_log`).
    fn words(&self, id: &str) -> Vec<String> {
        self.arg(id).map_or_else(Vec::new, |a| {
            a.get_possible_values()
                .iter()
                .map(|v| v.get_name().to_owned())
                .collect()
        })
    }

    fn arg(&self, id: &str) -> Option<&clap::Arg> {
        self.cmd.get_arguments().find(|a| a.get_id() == id)
    }

    /// How the setting `id` is named on the command line: `--flag ($ENV)` (or `id` for a
    /// setting that only the file sets).
    pub(super) fn flag_name(&self, id: &str) -> String {
        let Some(arg) = self.arg(id) else {
            return id.to_owned();
        };
        let flag = arg
            .get_long()
            .map_or_else(|| id.to_owned(), |l| format!("--{l}"));
        match arg.get_env() {
            Some(env) => format!("{flag} (${})", env.to_string_lossy()),
            None => flag,
        }
    }
}

/// The tree of `value`'s settings, keyed like the file.
pub(crate) fn to_tree<T: Serialize>(value: &T) -> Result<Map<String, Value>, ConfigError> {
    match serde_json::to_value(value) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(internal("settings are not a table".into())),
        Err(e) => Err(internal(e.to_string())),
    }
}

pub(crate) fn internal(message: String) -> ConfigError {
    ConfigError::Field(FieldError {
        location: None,
        field: String::new(),
        message,
    })
}

/// Lays the file's `values` over `tree` wherever the setting was not given by flag or
/// environment; records the keys taken in `file.taken`. Relative paths are made relative
/// to the file's directory.
pub(crate) fn overlay(
    tree: &mut Map<String, Value>,
    values: Map<String, Value>,
    flags: &Flags<'_>,
    file: &mut FileSource,
) {
    let dir = file.dir().to_owned();
    overlay_at(tree, values, "", flags, &dir, &mut file.taken);
}

fn overlay_at(
    tree: &mut Map<String, Value>,
    values: Map<String, Value>,
    prefix: &str,
    flags: &Flags<'_>,
    dir: &Path,
    taken: &mut Vec<String>,
) {
    for (key, value) in values {
        let id = format!("{prefix}{key}");
        if flags.given(&id) {
            continue;
        }
        match (tree.get_mut(&key), value) {
            // A section: its settings one by one.
            (Some(Value::Object(section)), Value::Object(values)) if flags.arg(&id).is_none() => {
                overlay_at(section, values, &format!("{id}."), flags, dir, taken);
            }
            (_, mut value) => {
                if flags.is_path(&id) {
                    relative_to(dir, &mut value, &flags.words(&id));
                }
                tree.insert(key, value);
                taken.push(id);
            }
        }
    }
}

/// Makes the relative paths in `value` (a string or array of strings) relative to `dir`;
/// `words` are not paths and stay as they are.
fn relative_to(dir: &Path, value: &mut Value, words: &[String]) {
    match value {
        Value::String(s) if Path::new(s.as_str()).is_relative() && !words.contains(s) => {
            *s = dir.join(s.as_str()).to_string_lossy().into_owned();
        }
        Value::Array(items) => items.iter_mut().for_each(|v| relative_to(dir, v, words)),
        _ => {}
    }
}

/// Reads settings back from the layered tree. An error names the key and, when the
/// file has it, where.
pub(crate) fn from_tree<T: DeserializeOwned>(
    tree: Map<String, Value>,
    flags: &Flags<'_>,
    file: Option<&FileSource>,
) -> Result<T, ConfigError> {
    serde_path_to_error::deserialize(Value::Object(tree)).map_err(|e| {
        let path = e.path().to_string();
        let message = e.inner().to_string();
        // The setting the failing value belongs to (an array's, for one of its elements).
        let id = path.split('[').next().unwrap_or_default();
        ConfigError::Field(match file {
            Some(file) if !flags.given(id) => FieldError {
                location: Some(file.locate(&path)),
                field: if path == "." { String::new() } else { path },
                message,
            },
            _ => FieldError {
                location: None,
                field: flags.flag_name(id),
                message,
            },
        })
    })
}
