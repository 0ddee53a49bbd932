//! What an etcd key under the prefix says: the backend address, in either of the two
//! formats found in fleets (plain `host:port`, or etcd's Go naming JSON).

use serde::{Deserialize, Serialize};

pub use crate::endpoint::{AddrError, BackendAddr};

/// Longest value accepted, in bytes; anything longer is skipped as malformed.
pub const MAX_VALUE_LEN: usize = 64 * 1024;

/// How a registration writes its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ValueFormat {
    /// The seed pattern's value: `host:port`.
    Plain,
    /// etcd's Go naming JSON (`{"Op":0,"Addr":...,"Metadata":...}`), read by grpc-go's
    /// `etcd:///` resolver as well as switchyard.
    #[default]
    EtcdNaming,
}

/// etcd naming operation: 0 adds an endpoint, 1 deletes it.
const NAMING_OP_ADD: u8 = 0;

/// etcd's Go naming package value (`go.etcd.io/etcd/client/v3/naming/endpoints.Update`).
#[derive(Debug, Serialize, Deserialize)]
struct NamingValue {
    #[serde(rename = "Op", default)]
    op: u8,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default, skip_serializing_if = "Option::is_none")]
    metadata: Option<serde_json::Value>,
}

/// A decoded endpoint value.
#[derive(Debug, Clone, PartialEq)]
pub struct EndpointValue {
    /// Where the backend listens.
    pub addr: BackendAddr,
    /// Free-form metadata (JSON format only).
    pub metadata: Option<serde_json::Value>,
    /// Which format the value was written in.
    pub format: ValueFormat,
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
    /// Looks like JSON but does not parse as etcd naming JSON.
    #[error("value is not etcd naming JSON: {0}")]
    BadJson(String),
    /// The etcd naming operation is not `0` (add).
    #[error("etcd naming value has Op {0}, not 0 (add)")]
    NotAdd(u8),
    /// The address is not host:port.
    #[error(transparent)]
    BadAddr(#[from] AddrError),
}

impl EndpointValue {
    /// Decodes a value, detecting its format.
    pub fn decode(value: &[u8]) -> Result<Self, ValueError> {
        if value.len() > MAX_VALUE_LEN {
            return Err(ValueError::TooLong(value.len()));
        }
        let text = std::str::from_utf8(value).map_err(|_| ValueError::NotUtf8)?;
        let text = text.trim();
        if text.starts_with('{') {
            let v: NamingValue =
                serde_json::from_str(text).map_err(|e| ValueError::BadJson(e.to_string()))?;
            if v.op != NAMING_OP_ADD {
                return Err(ValueError::NotAdd(v.op));
            }
            Ok(Self {
                addr: v.addr.parse()?,
                metadata: v.metadata.filter(|m| !m.is_null()),
                format: ValueFormat::EtcdNaming,
            })
        } else {
            Ok(Self {
                addr: text.parse()?,
                metadata: None,
                format: ValueFormat::Plain,
            })
        }
    }

    /// Encodes the value in `self.format`.
    pub fn encode(&self) -> String {
        match self.format {
            ValueFormat::Plain => self.addr.as_str().to_owned(),
            ValueFormat::EtcdNaming => {
                let v = NamingValue {
                    op: NAMING_OP_ADD,
                    addr: self.addr.as_str().to_owned(),
                    metadata: self.metadata.clone(),
                };
                // Serializing a struct of strings and JSON values cannot fail.
                serde_json::to_string(&v).unwrap_or_default()
            }
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

    #[test]
    fn plain_values_decode() {
        let v = EndpointValue::decode(b"10.0.0.5:50051").unwrap();
        assert_eq!(v.addr.as_str(), "10.0.0.5:50051");
        assert_eq!(v.addr.host(), "10.0.0.5");
        assert_eq!(v.addr.port(), 50051);
        assert_eq!(v.format, ValueFormat::Plain);
        let v = EndpointValue::decode(b" backend-1.local:80\n").unwrap();
        assert_eq!(v.addr.host(), "backend-1.local");
        let v = EndpointValue::decode(b"[::1]:8080").unwrap();
        assert_eq!(v.addr.host(), "::1");
    }

    #[test]
    fn naming_json_decodes() {
        let v =
            EndpointValue::decode(br#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":{"zone":"a"}}"#)
                .unwrap();
        assert_eq!(v.addr.as_str(), "10.0.0.5:50051");
        assert_eq!(v.metadata, Some(serde_json::json!({"zone":"a"})));
        assert_eq!(v.format, ValueFormat::EtcdNaming);
        let v = EndpointValue::decode(br#"{"Addr":"h:1","Metadata":null}"#).unwrap();
        assert_eq!(v.metadata, None);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            EndpointValue::decode(b"nonsense"),
            Err(ValueError::BadAddr(_))
        ));
        assert!(EndpointValue::decode(b"host:0").is_err());
        assert!(EndpointValue::decode(b"host:99999").is_err());
        assert!(EndpointValue::decode(b"http://h:1").is_err());
        assert!(EndpointValue::decode(b"u@h:1").is_err());
        assert!(EndpointValue::decode(b"[zz]:1").is_err());
        assert!(EndpointValue::decode(b"").is_err());
        assert_eq!(
            EndpointValue::decode(&[0xff, 0xfe]),
            Err(ValueError::NotUtf8)
        );
        assert!(matches!(
            EndpointValue::decode(b"{\"Op\":0"),
            Err(ValueError::BadJson(_))
        ));
        assert_eq!(
            EndpointValue::decode(br#"{"Op":1,"Addr":"h:1"}"#),
            Err(ValueError::NotAdd(1))
        );
        assert!(matches!(
            EndpointValue::decode(&vec![b'a'; MAX_VALUE_LEN + 1]),
            Err(ValueError::TooLong(_))
        ));
    }

    #[test]
    fn values_round_trip() {
        for format in [ValueFormat::Plain, ValueFormat::EtcdNaming] {
            let v = EndpointValue {
                addr: "127.0.0.1:9".parse().unwrap(),
                metadata: None,
                format,
            };
            assert_eq!(EndpointValue::decode(v.encode().as_bytes()).unwrap(), v);
        }
        let v = EndpointValue {
            addr: "h:9".parse().unwrap(),
            metadata: Some(serde_json::json!({"k":"v"})),
            format: ValueFormat::EtcdNaming,
        };
        assert_eq!(v.encode(), r#"{"Op":0,"Addr":"h:9","Metadata":{"k":"v"}}"#);
    }

    #[test]
    fn prefixes_end_in_slash() {
        assert_eq!(service_prefix("services", "a"), "services/a/");
        assert_eq!(service_prefix("services/", "a"), "services/a/");
        let addr = "1.2.3.4:5".parse().unwrap();
        assert_eq!(endpoint_key("services", "a", &addr), "services/a/1.2.3.4:5");
    }
}
