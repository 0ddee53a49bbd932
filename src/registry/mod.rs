//! Registry formats: what an etcd key and its value say about a service's backends.
//!
//! A value is turned into a list of [`Endpoint`]s (address, weight, TLS, metadata) by the
//! codec of its format, recognised from the value's shape ([`decode`]); the same codecs
//! write values and name keys ([`ValueFormat::encode`], [`ValueFormat::key_name`]).
//! Discovery's watch, `switchyard endpoints` and `switchyard register` all go through
//! here, so a format is known everywhere at once.
//!
//! One file per format, each a [`Codec`]:
//! - [`plain`]: `host:port`, the seed pattern's value;
//! - [`etcd_naming`]: etcd's Go naming JSON (`{"Op":0,"Addr":…,"Metadata":…}`), read by
//!   grpc-go's `etcd:///` resolver;
//! - [`go_zero`]: go-zero's `core/discov` (a `host:port` value under `<key>/<lease id>`);
//! - [`kratos`]: Kratos's `contrib/registry/etcd` (a JSON `ServiceInstance` listing URLs);
//! - [`kitex`]: Kitex's `registry-etcd` (JSON with `address` and `weight`);
//! - [`go_micro`]: go-micro's `registry/etcd` (a JSON service with `nodes[].address`).
//!
//! **Telling formats apart.** Each codec recognises its own values by their outline (a
//! text value, or which fields a JSON object has), and the outlines do not overlap: a
//! value is decoded only when exactly one codec recognises it ([`ValueError::Ambiguous`]
//! otherwise). The address always comes from the value, never from the key.
//!
//! **Adding a format** is one new file here with a unit struct implementing [`Codec`]
//! (its name, key layout, how its values look, how to read and write them), its `mod`
//! line, and one line in the `formats!` list below: `--format`, `switchyard endpoints`'
//! FORMAT column and the watch pick it up from there.
//!
//! The key layout ([`service_prefix`], [`instance_key`]) lives here too.

pub mod etcd_naming;
pub mod go_micro;
pub mod go_zero;
pub mod kitex;
pub mod kratos;
pub mod plain;

mod json;
pub mod layout;

pub(crate) use json::{read_json, string_map, to_go_json, weight};
pub use layout::{instance_key, service_prefix, KeyPrefix};

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::endpoint::{AddrError, Endpoint, Weight, DEFAULT_WEIGHT};

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

impl Shape<'_> {
    /// Whether the value is a JSON object with a field named `field`.
    pub fn has(&self, field: &str) -> bool {
        matches!(self, Shape::Json(map) if map.contains_key(field))
    }
}

/// An endpoint a value lists that is not served (e.g. Kratos's `http://`), and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Skipped {
    /// The endpoint as the value lists it.
    pub endpoint: String,
    /// Why it is not served.
    pub why: String,
}

impl fmt::Display for Skipped {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.endpoint, self.why)
    }
}

/// How a format names one instance's key under `<prefix>/<service>/`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyName {
    /// The endpoint's `host:port` (the seed pattern, etcd naming, Kitex).
    Addr,
    /// The registration's lease ID in decimal (go-zero).
    Lease,
    /// A random UUID, also the value's `id` (Kratos).
    Uuid,
    /// `<service>-<random UUID>`, also the node's `id` (go-micro).
    ServiceUuid,
}

/// What a registration writes besides its endpoint: the names some formats carry.
#[derive(Debug, Clone, Copy)]
pub struct Instance<'a> {
    /// The registered service name.
    pub service: &'a str,
    /// The instance's id (Kratos's `id`, go-micro's node `id`; see [`KeyName`]).
    pub id: &'a str,
    /// The service's version (Kratos, go-micro).
    pub version: &'a str,
}

/// One registry value format: its key layout, how its values look, and how they are read
/// and written.
pub trait Codec: Sync {
    /// The format's name, as given to `--format` and shown by `switchyard endpoints`.
    fn name(&self) -> &'static str;

    /// The key prefix the framework uses unless configured otherwise.
    fn default_prefix(&self) -> &'static str;

    /// How the framework names an instance's key under `<prefix>/<service>/`.
    fn key_name(&self) -> KeyName;

    /// Whether this value (under etcd key `key`) belongs to this format: only its
    /// outline, e.g. which JSON fields it has ([`decode`](Self::decode) says whether it
    /// is valid). No two codecs may recognise the same value.
    fn recognises(&self, key: &str, value: Shape<'_>) -> bool;

    /// The endpoints a recognised value lists; endpoints it lists but that are not to be
    /// served go to `skipped`. `key` is the etcd key, for log lines and checks.
    fn decode(
        &self,
        key: &str,
        value: Shape<'_>,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError>;

    /// Writes `endpoint` of `instance` as the framework writes its value.
    fn encode(&self, endpoint: &Endpoint, instance: &Instance<'_>) -> Result<String, EncodeError>;

    /// Whether values of this format carry metadata.
    fn carries_metadata(&self) -> bool;

    /// The weight written when none is given (the framework's own default).
    fn default_weight(&self) -> Weight {
        DEFAULT_WEIGHT
    }

    /// The version written when none is given (the framework's own default).
    fn default_version(&self) -> &'static str {
        ""
    }
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
            /// Every format, in the order they are listed in `--help`.
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
    /// `host:port`, the seed pattern's value.
    Plain => plain::Plain,
    /// etcd's Go naming JSON, also read by grpc-go's `etcd:///` resolver.
    EtcdNaming => etcd_naming::EtcdNaming,
    /// go-zero: `host:port` under `<key>/<lease id>`.
    GoZero => go_zero::GoZero,
    /// Kratos: a JSON `ServiceInstance` listing endpoint URLs.
    Kratos => kratos::Kratos,
    /// Kitex: JSON with `network`, `address`, `weight`, `tags`.
    Kitex => kitex::Kitex,
    /// go-micro: a JSON service whose `nodes` list addresses.
    GoMicro => go_micro::GoMicro,
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

    /// The key prefix the framework uses unless configured otherwise.
    pub fn default_prefix(self) -> &'static str {
        self.codec().default_prefix()
    }

    /// How the framework names an instance's key under `<prefix>/<service>/`.
    pub fn key_name(self) -> KeyName {
        self.codec().key_name()
    }

    /// Whether values of this format carry metadata.
    pub fn carries_metadata(self) -> bool {
        self.codec().carries_metadata()
    }

    /// The weight written when none is given (the framework's own default).
    pub fn default_weight(self) -> Weight {
        self.codec().default_weight()
    }

    /// The version written when none is given (the framework's own default).
    pub fn default_version(self) -> &'static str {
        self.codec().default_version()
    }

    /// Writes `endpoint` of `instance` as the framework writes its value.
    pub fn encode(
        self,
        endpoint: &Endpoint,
        instance: &Instance<'_>,
    ) -> Result<String, EncodeError> {
        self.codec().encode(endpoint, instance)
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
    /// A value that two formats recognise: which one it is cannot be told.
    #[error("value looks like both {0} and {1}; cannot tell which it is")]
    Ambiguous(ValueFormat, ValueFormat),
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

impl ValueError {
    /// A value recognised as `format` that is not valid: `reason` says why.
    pub(crate) fn invalid(format: ValueFormat, reason: impl ToString) -> Self {
        Self::Invalid {
            format,
            reason: reason.to_string(),
        }
    }
}

/// Why an endpoint cannot be written in a format.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EncodeError {
    /// The format has no room for something the endpoint has.
    #[error(
        "{format} values cannot carry {what} (formats that carry metadata: {})",
        metadata_formats()
    )]
    NotCarried {
        /// The format asked for.
        format: ValueFormat,
        /// What it cannot carry (`metadata`, `a weight`, `TLS`).
        what: &'static str,
    },
}

impl EncodeError {
    fn not_carried(format: ValueFormat, what: &'static str) -> Self {
        Self::NotCarried { format, what }
    }
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

/// A decoded value: its format, the endpoints it lists, and those it lists but that are
/// not served.
#[derive(Debug, Clone, PartialEq)]
pub struct Decoded {
    /// The format the value was recognised as.
    pub format: ValueFormat,
    /// The endpoints to serve (one for most formats).
    pub endpoints: Vec<Endpoint>,
    /// The endpoints listed but not served, with why (e.g. Kratos `http://` ones).
    pub skipped: Vec<Skipped>,
}

impl Decoded {
    /// Why a value that decoded lists nothing to serve (for log lines and listings).
    pub fn why_nothing_to_serve(&self) -> String {
        let mut why = format!("{} value lists no endpoint to serve", self.format);
        for s in &self.skipped {
            why.push_str("; ");
            why.push_str(&s.to_string());
        }
        why
    }
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
    let mut found = ValueFormat::ALL
        .iter()
        .copied()
        .filter(|f| f.codec().recognises(&key, shape));
    let format = match (found.next(), found.next()) {
        (Some(format), None) => format,
        (Some(a), Some(b)) => return Err(ValueError::Ambiguous(a, b)),
        (None, _) => {
            return Err(match shape {
                Shape::Json(map) => ValueError::UnknownJson(
                    map.keys()
                        .map(String::as_str)
                        .collect::<Vec<_>>()
                        .join(", "),
                ),
                // Plain and go-zero take every text between them; kept for a list without.
                Shape::Text(t) => ValueError::BadAddr(AddrError::NotHostPort(t.to_owned())),
            });
        }
    };
    let mut skipped = Vec::new();
    let endpoints = format.codec().decode(&key, shape, &mut skipped)?;
    Ok(Decoded {
        format,
        endpoints,
        skipped,
    })
}

/// An instance for the codecs' unit tests.
#[cfg(test)]
pub(crate) const TEST_INSTANCE: Instance<'static> = Instance {
    service: "s",
    id: "i",
    version: "",
};

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
        assert_eq!(one(br#"{"address":"h:1"}"#).0, ValueFormat::Kitex);
        assert_eq!(
            one(br#"{"id":"i","name":"s","endpoints":["grpc://h:1"]}"#).0,
            ValueFormat::Kratos
        );
        assert_eq!(
            one(br#"{"name":"s","nodes":[{"id":"n","address":"h:1"}]}"#).0,
            ValueFormat::GoMicro
        );
        // Text under a key ending in a lease ID is go-zero's.
        let d = decode(b"user.rpc/7587869470812345", b"h:1").unwrap();
        assert_eq!(d.format, ValueFormat::GoZero);
    }

    #[test]
    fn a_value_two_formats_recognise_is_skipped() {
        assert_eq!(
            decode(b"k", br#"{"Addr":"h:1","address":"h:2"}"#),
            Err(ValueError::Ambiguous(
                ValueFormat::EtcdNaming,
                ValueFormat::Kitex
            ))
        );
        let err = decode(b"k", br#"{"id":"i","endpoints":[],"nodes":[]}"#).unwrap_err();
        assert!(matches!(err, ValueError::Ambiguous(..)), "{err}");
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
            [
                "plain",
                "etcd-naming",
                "go-zero",
                "kratos",
                "kitex",
                "go-micro"
            ]
        );
        let err = "consul".parse::<ValueFormat>().unwrap_err().to_string();
        assert!(
            err.contains("\"consul\"") && err.contains("plain, etcd-naming, go-zero"),
            "{err}"
        );
        assert_eq!(ValueFormat::default(), ValueFormat::EtcdNaming);
        assert_eq!(metadata_formats(), "etcd-naming, kratos, kitex, go-micro");
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
}
