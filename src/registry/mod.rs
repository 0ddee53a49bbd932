//! Registry formats: what an etcd key and its value say about a service's backends.
//!
//! A value is turned into a list of [`Endpoint`]s (address, weight, TLS, metadata) by the
//! codec of its format, recognised from the value's shape ([`decode`]); the same codecs
//! write values ([`ValueFormat::encode`]). Discovery's watch, `switchyard endpoints` and
//! `switchyard register` all go through here, so a format is known everywhere at once.
//!
//! One file per format, each a [`Codec`]:
//! - [`plain`]: `host:port`, the seed pattern's value;
//! - [`etcd_naming`]: etcd's Go naming JSON (`{"Op":0,"Addr":…,"Metadata":…}`), read by
//!   grpc-go's `etcd:///` resolver.
//!
//! **Adding a format** is one new file here with a unit struct implementing [`Codec`]
//! (its name, how its values look, how to read and write them), its `mod` line, and one
//! line in the `formats!` list below: `--format`, `switchyard endpoints`' FORMAT column
//! and the watch pick it up from there. Shapes are tried in the list's order, so a
//! format whose shape is a special case of another's goes first.
//!
//! The key layout ([`service_prefix`], [`endpoint_key`]) lives here too.

pub mod etcd_naming;
pub mod plain;

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::endpoint::{AddrError, BackendAddr, Endpoint, Weight, DEFAULT_WEIGHT, MAX_WEIGHT};

/// Longest value accepted, in bytes; anything longer is skipped as malformed.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// A value as the codecs see it: JSON objects are parsed once, before any codec looks.
#[derive(Debug, Clone, Copy)]
pub enum Shape<'a> {
    /// A value that is not a JSON object (trimmed).
    Text(&'a str),
    /// A value that is a JSON object.
    Json(&'a serde_json::Map<String, serde_json::Value>),
}

/// One registry value format: how its values look, and how they are read and written.
pub trait Codec: Sync {
    /// The format's name, as given to `--format` and shown by `switchyard endpoints`.
    fn name(&self) -> &'static str;

    /// Whether a value of this shape belongs to this format (only its outline, e.g.
    /// which JSON fields it has: [`decode`](Self::decode) says whether it is valid).
    fn recognises(&self, value: Shape<'_>) -> bool;

    /// The endpoints a recognised value lists; `key` is the etcd key, for log lines.
    fn decode(&self, key: &str, value: Shape<'_>) -> Result<Vec<Endpoint>, ValueError>;

    /// Writes `endpoint` as a value of this format.
    fn encode(&self, endpoint: &Endpoint) -> Result<String, EncodeError>;

    /// Whether values of this format carry metadata (and so a weight).
    fn carries_metadata(&self) -> bool;
}

/// Declares [`ValueFormat`] from the list of codecs: one line per format.
macro_rules! formats {
    ($($(#[$doc:meta])* $variant:ident => $codec:expr,)+) => {
        /// A registry value format (see the [module](self) for each).
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ValueFormat {
            $($(#[$doc])* $variant,)+
        }

        impl ValueFormat {
            /// Every format, in the order values are matched against their shapes.
            pub const ALL: &'static [ValueFormat] = &[$(ValueFormat::$variant,)+];

            fn codec(self) -> &'static dyn Codec {
                match self {
                    $(ValueFormat::$variant => &$codec,)+
                }
            }
        }
    };
}

formats! {
    /// etcd's Go naming JSON, also read by grpc-go's `etcd:///` resolver.
    EtcdNaming => etcd_naming::EtcdNaming,
    /// `host:port`, the seed pattern's value.
    Plain => plain::Plain,
}

impl Default for ValueFormat {
    /// What `switchyard register` writes unless told otherwise: read by switchyard and
    /// by grpc-go's etcd resolver alike.
    fn default() -> Self {
        Self::EtcdNaming
    }
}

impl ValueFormat {
    /// The format's name (`plain`, `etcd-naming`, ...).
    pub fn name(self) -> &'static str {
        self.codec().name()
    }

    /// Every format's name, in [`ALL`](Self::ALL)'s order.
    pub fn names() -> impl Iterator<Item = &'static str> {
        Self::ALL.iter().map(|f| f.name())
    }

    /// Whether values of this format carry metadata (and so a weight).
    pub fn carries_metadata(self) -> bool {
        self.codec().carries_metadata()
    }

    /// Writes `endpoint` as a value of this format.
    pub fn encode(self, endpoint: &Endpoint) -> Result<String, EncodeError> {
        self.codec().encode(endpoint)
    }
}

impl fmt::Display for ValueFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A format name that no codec has.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown value format {given:?} (one of: {})", ValueFormat::names().collect::<Vec<_>>().join(", "))]
pub struct UnknownFormat {
    /// The name given.
    pub given: String,
}

impl FromStr for ValueFormat {
    type Err = UnknownFormat;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::ALL
            .iter()
            .copied()
            .find(|f| f.name() == s)
            .ok_or_else(|| UnknownFormat {
                given: s.to_owned(),
            })
    }
}

impl Serialize for ValueFormat {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for ValueFormat {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        name.parse().map_err(serde::de::Error::custom)
    }
}

/// Why a value was skipped.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Longer than [`MAX_VALUE_LEN`].
    #[error("value is {0} bytes, more than the {MAX_VALUE_LEN} accepted")]
    TooLong(usize),
    /// Not UTF-8.
    #[error("value is not UTF-8")]
    NotUtf8,
    /// Starts like a JSON object but does not parse as one.
    #[error("value is not a JSON object: {0}")]
    BadJson(String),
    /// A JSON object of no known format.
    #[error("JSON value of no known format (fields: {0})")]
    UnknownJson(String),
    /// Recognised as `format`, but not a valid value of it.
    #[error("value is not valid {format}: {reason}")]
    Invalid {
        /// The format the value looks like.
        format: ValueFormat,
        /// What is wrong.
        reason: String,
    },
    /// An etcd-naming value whose operation is not `0` (add).
    #[error("etcd naming value has Op {0}, not 0 (add)")]
    NotAdd(u64),
    /// The address is not host:port.
    #[error(transparent)]
    BadAddr(#[from] AddrError),
}

/// Why an endpoint cannot be written in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The format has no room for something the endpoint has.
    #[error(
        "{format} values cannot carry {what} (formats that can: {})",
        metadata_formats()
    )]
    NotCarried {
        /// The format asked for.
        format: ValueFormat,
        /// What it cannot carry (`metadata`, `a weight`, `TLS`).
        what: &'static str,
    },
}

/// The names of the formats that carry metadata, for messages.
pub fn metadata_formats() -> String {
    ValueFormat::ALL
        .iter()
        .filter(|f| f.carries_metadata())
        .map(|f| f.name())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A decoded value: its format and the endpoints it lists.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The format the value was recognised as.
    pub format: ValueFormat,
    /// The endpoints it lists (one for most formats).
    pub endpoints: Vec<Endpoint>,
}

/// Decodes the value of etcd key `key`, recognising its format by its shape.
pub fn decode(key: &[u8], value: &[u8]) -> Result<Decoded, ValueError> {
    if value.len() > MAX_VALUE_LEN {
        return Err(ValueError::TooLong(value.len()));
    }
    let text = std::str::from_utf8(value)
        .map_err(|_| ValueError::NotUtf8)?
        .trim();
    let key = String::from_utf8_lossy(key);
    let json;
    let shape = if text.starts_with('{') {
        json = serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(text)
            .map_err(|e| ValueError::BadJson(e.to_string()))?;
        Shape::Json(&json)
    } else {
        Shape::Text(text)
    };
    for &format in ValueFormat::ALL {
        let codec = format.codec();
        if codec.recognises(shape) {
            let endpoints = codec.decode(&key, shape)?;
            return Ok(Decoded { format, endpoints });
        }
    }
    Err(match shape {
        Shape::Json(map) => ValueError::UnknownJson(
            map.keys()
                .map(String::as_str)
                .collect::<Vec<_>>()
                .join(", "),
        ),
        // Plain takes every text; kept for a list without it.
        Shape::Text(t) => ValueError::BadAddr(AddrError::NotHostPort(t.to_owned())),
    })
}

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

/// The key prefix of a service's endpoints: `<prefix>/<service>/`, always with the
/// trailing slash so that service `a` never sees service `ab`.
pub fn service_prefix(prefix: &str, service: &str) -> String {
    let prefix = prefix.trim_end_matches('/');
    if prefix.is_empty() {
        format!("{service}/")
    } else {
        format!("{prefix}/{service}/")
    }
}

/// The key of one endpoint: `<prefix>/<service>/<addr>`.
pub fn endpoint_key(prefix: &str, service: &str, addr: &BackendAddr) -> String {
    let mut k = service_prefix(prefix, service);
    k.push_str(addr.as_str());
    k
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(value: &[u8]) -> (ValueFormat, Endpoint) {
        let d = decode(b"services/s/k", value).unwrap();
        assert_eq!(d.endpoints.len(), 1, "{d:?}");
        (d.format, d.endpoints.into_iter().next().unwrap())
    }

    #[test]
    fn formats_are_recognised_by_shape() {
        assert_eq!(one(b"10.0.0.5:50051").0, ValueFormat::Plain);
        assert_eq!(one(br#"{"Op":0,"Addr":"h:1"}"#).0, ValueFormat::EtcdNaming);
        assert_eq!(one(b" \n{\"Addr\":\"h:1\"}\n").0, ValueFormat::EtcdNaming);
    }

    #[test]
    fn names_parse_and_print_in_one_place() {
        for &f in ValueFormat::ALL {
            assert_eq!(f.name().parse::<ValueFormat>(), Ok(f));
            assert_eq!(f.to_string(), f.name());
            assert_eq!(serde_json::to_value(f).unwrap(), json!(f.name()));
            assert_eq!(
                serde_json::from_value::<ValueFormat>(json!(f.name())).unwrap(),
                f
            );
        }
        assert_eq!(
            ValueFormat::names().collect::<Vec<_>>(),
            ["etcd-naming", "plain"]
        );
        let err = "kratos".parse::<ValueFormat>().unwrap_err().to_string();
        assert!(
            err.contains("\"kratos\"") && err.contains("etcd-naming, plain"),
            "{err}"
        );
        assert_eq!(ValueFormat::default(), ValueFormat::EtcdNaming);
        assert_eq!(metadata_formats(), "etcd-naming");
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            decode(b"k", b"nonsense"),
            Err(ValueError::BadAddr(_))
        ));
        assert!(decode(b"k", b"").is_err());
        assert_eq!(decode(b"k", &[0xff, 0xfe]), Err(ValueError::NotUtf8));
        assert!(matches!(
            decode(b"k", b"{\"Op\":0"),
            Err(ValueError::BadJson(_))
        ));
        assert!(
            matches!(decode(b"k", b"{\"x\":1,\"y\":2}"), Err(ValueError::UnknownJson(f)) if f == "x, y")
        );
        assert!(matches!(
            decode(b"k", &vec![b'a'; MAX_VALUE_LEN + 1]),
            Err(ValueError::TooLong(_))
        ));
        // A key that is not UTF-8 still decodes (it is only named in log lines).
        assert!(decode(&[0xff], b"h:1").is_ok());
    }

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
    fn prefixes_end_in_slash() {
        assert_eq!(service_prefix("services", "a"), "services/a/");
        assert_eq!(service_prefix("services/", "a"), "services/a/");
        assert_eq!(service_prefix("", "a"), "a/");
        let addr = "1.2.3.4:5".parse().unwrap();
        assert_eq!(endpoint_key("services", "a", &addr), "services/a/1.2.3.4:5");
    }
}
