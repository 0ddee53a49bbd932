//! Settings whose file form is their flag's text (`FromStr` / `Display`), e.g.
//! `admin.listen = "off"`: use as `#[serde(with = "text")]` (or `text::opt` for an
//! `Option`), so the flag and the file share one parser.

use std::fmt::Display;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serializer};

/// Writes the value as its text.
pub fn serialize<T: Display, S: Serializer>(v: &T, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(v)
}

/// Reads the value from its text; the error quotes the text.
pub fn deserialize<'de, T, D>(d: D) -> Result<T, D::Error>
where
    T: FromStr,
    T::Err: Display,
    D: Deserializer<'de>,
{
    let s = String::deserialize(d)?;
    s.parse()
        .map_err(|e| de::Error::custom(format!("{s:?}: {e}")))
}

/// The same for an optional value (absent when `None`).
pub mod opt {
    use super::*;

    /// Writes the value as its text (`skip_serializing_if = "Option::is_none"` skips `None`).
    pub fn serialize<T: Display, S: Serializer>(v: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
        match v {
            Some(v) => s.collect_str(v),
            None => s.serialize_none(),
        }
    }

    /// Reads the value from its text.
    pub fn deserialize<'de, T, D>(d: D) -> Result<Option<T>, D::Error>
    where
        T: FromStr,
        T::Err: Display,
        D: Deserializer<'de>,
    {
        super::deserialize(d).map(Some)
    }
}
