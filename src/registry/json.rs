//! JSON as the registries write it: reading a format's fields, weights (numbers or
//! strings), string-only metadata, and writing byte for byte what Go's `encoding/json`
//! writes.

use serde::{Deserialize, Serialize};

use super::{EncodeError, Shape, ValueError, ValueFormat};
use crate::endpoint::{Weight, DEFAULT_WEIGHT, MAX_WEIGHT};

/// A registry's weight (a JSON number, or a string holding one, as Kratos writes it):
/// a whole number from 1 up, clamped to [`MAX_WEIGHT`]. Anything else counts as the
/// default weight, with a log line naming the key, since one bad field should not take
/// the endpoint out.
pub(crate) fn weight(key: &str, value: &serde_json::Value) -> Weight {
    let parsed = match value {
        serde_json::Value::Number(n) => n.as_u64(),
        serde_json::Value::String(s) => s.trim().parse::<u64>().ok(),
        _ => None,
    };
    match parsed {
        Some(w) if w >= 1 => {
            let clamped = Weight::try_from(w).unwrap_or(MAX_WEIGHT).min(MAX_WEIGHT);
            if u64::from(clamped) != w {
                tracing::warn!(
                    key,
                    weight = w,
                    max = MAX_WEIGHT,
                    "endpoint weight above the maximum; clamped"
                );
            }
            clamped
        }
        _ => {
            tracing::warn!(key, weight = %value, "endpoint weight is not a whole number from 1 up; using {DEFAULT_WEIGHT}");
            DEFAULT_WEIGHT
        }
    }
}

/// A JSON value of `format` read into `T` (the format's fields).
pub(crate) fn read_json<'a, T: Deserialize<'a>>(
    format: ValueFormat,
    value: Shape<'a>,
) -> Result<T, ValueError> {
    match value {
        Shape::Json(map) => T::deserialize(map).map_err(|e| ValueError::invalid(format, e)),
        Shape::Text(_) => Err(ValueError::invalid(format, "not a JSON object")),
    }
}

/// Metadata as a map of strings, for the formats whose Go types are `map[string]string`
/// (their decoders reject anything else). Sorted, as Go writes maps.
pub(crate) fn string_map(
    format: ValueFormat,
    metadata: Option<&serde_json::Value>,
) -> Result<Option<std::collections::BTreeMap<String, String>>, EncodeError> {
    let Some(metadata) = metadata.filter(|m| !m.is_null()) else {
        return Ok(None);
    };
    let not_strings = EncodeError::not_carried(format, "metadata other than string values");
    let object = metadata.as_object().ok_or_else(|| not_strings.clone())?;
    object
        .iter()
        .map(|(k, v)| match v {
            serde_json::Value::String(s) => Ok((k.clone(), s.clone())),
            _ => Err(not_strings.clone()),
        })
        .collect::<Result<_, _>>()
        .map(Some)
}

/// Serializes `value` as Go's `encoding/json` does for the same struct, so that what we
/// write is byte for byte what the framework writes: fields in declaration order (the
/// structs here follow the Go structs), maps sorted (they are `BTreeMap`s), and `<`, `>`,
/// `&`, U+2028 and U+2029 in strings escaped as `\u00xx` (Go's HTML-safe default).
pub(crate) fn to_go_json<T: Serialize>(value: &T) -> String {
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut out, GoFormatter);
    // Writing strings, numbers and maps of strings into a Vec cannot fail.
    if value.serialize(&mut ser).is_err() {
        return String::new();
    }
    String::from_utf8(out).unwrap_or_default()
}

/// serde_json's compact output with Go's extra string escapes.
struct GoFormatter;

impl serde_json::ser::Formatter for GoFormatter {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some(i) = rest.find(['<', '>', '&', '\u{2028}', '\u{2029}']) {
            writer.write_all(&rest.as_bytes()[..i])?;
            let c = rest[i..].chars().next().unwrap_or_default();
            write!(writer, "\\u{:04x}", u32::from(c))?;
            rest = &rest[i + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn weights_are_whole_numbers_from_one() {
        let w = |v: serde_json::Value| weight("k", &v);
        assert_eq!(w(json!(5)), 5);
        assert_eq!(w(json!("7")), 7);
        assert_eq!(w(json!(" 8 ")), 8);
        assert_eq!(w(json!(MAX_WEIGHT as u64 + 1)), MAX_WEIGHT);
        assert_eq!(w(json!(u64::MAX)), MAX_WEIGHT);
        for bad in [
            json!(0),
            json!(-3),
            json!(2.5),
            json!("x"),
            json!("0"),
            json!(null),
            json!([1]),
            json!({}),
        ] {
            assert_eq!(w(bad.clone()), DEFAULT_WEIGHT, "{bad}");
        }
    }

    #[test]
    fn json_is_written_as_go_writes_it() {
        let mut m = std::collections::BTreeMap::new();
        m.insert("z", "<a href=\"x\">&\u{2028}</a>");
        m.insert("a", "é\n");
        assert_eq!(
            to_go_json(&m),
            r#"{"a":"é\n","z":"\u003ca href=\"x\"\u003e\u0026\u2028\u003c/a\u003e"}"#
        );
        let ok = string_map(ValueFormat::Kratos, Some(&json!({"b": "1", "a": "2"}))).unwrap();
        assert_eq!(to_go_json(&ok), r#"{"a":"2","b":"1"}"#);
        assert_eq!(
            string_map(ValueFormat::Kratos, Some(&json!(null))),
            Ok(None)
        );
        assert!(string_map(ValueFormat::Kratos, Some(&json!({"n": 1}))).is_err());
        assert!(string_map(ValueFormat::Kratos, Some(&json!([1]))).is_err());
    }
}
