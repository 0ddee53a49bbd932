//! The config file: read, parsed into a tree of values (laid over the flags' tree by
//! [`super::layer`]), and positions in its text for error messages.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use super::error::{ConfigError, FieldError, Location};

/// A config file as read, and which settings were taken from it.
#[derive(Debug, Clone)]
pub(crate) struct FileSource {
    /// The file.
    pub path: PathBuf,
    /// Its text.
    pub text: String,
    /// The keys (`etcd.prefix`) whose values were taken from the file.
    pub taken: Vec<String>,
}

impl FileSource {
    /// Reads and parses the file at `path`.
    pub(super) fn read(path: &Path) -> Result<(Self, Map<String, Value>), ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        Self::parse(path, text)
    }

    /// Parses `text` (the file at `path`) into its tree of values; a syntax error is
    /// located.
    pub(super) fn parse(
        path: &Path,
        text: String,
    ) -> Result<(Self, Map<String, Value>), ConfigError> {
        let src = Self {
            path: path.to_owned(),
            text,
            taken: Vec::new(),
        };
        let values = match toml::from_str::<toml::Table>(&src.text) {
            Ok(table) => serde_json::to_value(table),
            Err(e) => {
                return Err(ConfigError::Field(FieldError {
                    location: Some(src.location_of(e.span().map_or(0, |s| s.start))),
                    field: String::new(),
                    message: e.message().to_owned(),
                }))
            }
        };
        match values {
            Ok(Value::Object(map)) => Ok((src, map)),
            _ => Err(ConfigError::Field(FieldError {
                location: Some(src.location_of(0)),
                field: String::new(),
                message: "not a table of settings".into(),
            })),
        }
    }

    /// The directory relative paths in the file are relative to.
    pub(super) fn dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new(""))
    }

    /// Where the key `path` (`etcd.prefix`, `listener[0].addr`) is defined (the file's
    /// start if it is not found).
    pub(super) fn locate(&self, path: &str) -> Location {
        self.location_of(key_offset(&self.text, path).unwrap_or(0))
    }

    fn location_of(&self, offset: usize) -> Location {
        let (line, column) = line_col(&self.text, offset);
        Location {
            path: self.path.clone(),
            line,
            column,
        }
    }
}

/// The 1-based line and column of byte `offset` in `text`.
fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(text.len());
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

/// Where the key `path` (dotted, with `[i]` for an element of an array of tables) is
/// defined in `text`: the deepest part of it that is found.
fn key_offset(text: &str, path: &str) -> Option<usize> {
    let root = toml::de::DeTable::parse(text).ok()?;
    let mut table = root.get_ref();
    let mut found = None;
    for seg in path.split('.') {
        let (name, indices) = match seg.split_once('[') {
            Some((name, rest)) => (name, Some(rest)),
            None => (seg, None),
        };
        let Some((k, v)) = table.iter().find(|(k, _)| k.get_ref().as_ref() == name) else {
            break;
        };
        found = Some(k.span().start);
        let mut value = v.get_ref();
        for index in indices.into_iter().flat_map(|r| r.split('[')) {
            let element = index
                .trim_end_matches(']')
                .parse::<usize>()
                .ok()
                .and_then(|i| value.as_array()?.get(i));
            match element {
                Some(e) => value = e.get_ref(),
                None => return found,
            }
        }
        match value.as_table() {
            Some(t) => table = t,
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_of_offsets_and_keys() {
        let text = "a = 1\n\n[etcd]\n  prefix = \"x\"\n";
        assert_eq!(line_col(text, 0), (1, 1));
        assert_eq!(line_col(text, 7), (3, 1));
        assert_eq!(line_col(text, text.len()), (5, 1));
        let off = key_offset(text, "etcd.prefix").unwrap();
        assert_eq!(line_col(text, off), (4, 3));
        assert_eq!(
            line_col(text, key_offset(text, "etcd.user").unwrap()),
            (3, 2)
        );
        assert_eq!(key_offset(text, "nothing"), None);
        assert_eq!(key_offset("[etcd\n", "etcd"), None);
    }

    #[test]
    fn positions_in_arrays_of_tables() {
        let text = "[[listener]]\naddr = \"a\"\n\n[[listener]]\naddr = \"b\"\n";
        let at = |p| line_col(text, key_offset(text, p).unwrap());
        assert_eq!(at("listener[0].addr"), (2, 1));
        assert_eq!(at("listener[1].addr"), (5, 1));
        assert_eq!(at("listener"), (1, 3));
    }
}
