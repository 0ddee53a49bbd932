//! Kitex (`github.com/kitex-contrib/registry-etcd`): the registry puts
//! `json.Marshal(instanceInfo)` under `kitex/registry-etcd/<service>/<host:port>`:
//!
//! ```text
//! {"network":"tcp","address":"10.0.0.5:8888","weight":10,"tags":null}
//! ```
//!
//! (`common.go` `serviceKey`, `instanceInfo`; `etcd_registry.go` `register`.) Recognised
//! by its `address` field. The weight is `weight`; Kitex's resolver counts a weight of
//! 0 or less as its default, 10 (`etcd_resolver.go` `defaultWeight`), and so does this
//! codec, so a Kitex fleet keeps the shares Kitex's own clients give it. `tags` are
//! kept as the metadata. Only `tcp` addresses can be reached.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat};
use crate::endpoint::{Endpoint, Weight};

/// Kitex's default weight (`discovery.DefaultWeight`), written and assumed when none is
/// given.
pub const KITEX_DEFAULT_WEIGHT: Weight = 10;

/// The Kitex format's codec.
#[derive(Debug, Clone, Copy)]
pub struct Kitex;

/// `instanceInfo` as read.
#[derive(Debug, Deserialize)]
struct ReadInfo {
    #[serde(default)]
    network: Option<String>,
    address: String,
    #[serde(default)]
    weight: Option<serde_json::Value>,
    #[serde(default)]
    tags: Option<serde_json::Value>,
}

/// `instanceInfo` as Kitex writes it (`Tags map[string]string`, nil written as `null`).
#[derive(Debug, Serialize)]
struct WrittenInfo<'a> {
    network: &'a str,
    address: &'a str,
    weight: Weight,
    tags: Option<BTreeMap<String, String>>,
}

impl Codec for Kitex {
    fn name(&self) -> &'static str {
        "kitex"
    }

    fn default_prefix(&self) -> &'static str {
        "kitex/registry-etcd"
    }

    fn key_name(&self) -> KeyName {
        KeyName::Addr
    }

    fn recognises(&self, _key: &str, value: Shape<'_>) -> bool {
        value.has("address")
    }

    fn decode(
        &self,
        key: &str,
        value: Shape<'_>,
        _skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        let info: ReadInfo = super::read_json(ValueFormat::Kitex, value)?;
        match info.network.as_deref() {
            None | Some("" | "tcp" | "tcp4" | "tcp6") => {}
            Some(other) => {
                return Err(ValueError::invalid(
                    ValueFormat::Kitex,
                    format!("network {other:?} cannot be reached (tcp only)"),
                ))
            }
        }
        let weight = match info.weight {
            None | Some(serde_json::Value::Null) => KITEX_DEFAULT_WEIGHT,
            Some(w) if w.as_i64().is_some_and(|w| w <= 0) => KITEX_DEFAULT_WEIGHT,
            Some(w) => super::weight(key, &w),
        };
        let mut endpoint = Endpoint::new(info.address.parse()?).with_weight(weight);
        endpoint.metadata = info.tags.filter(|t| !t.is_null());
        Ok(vec![endpoint])
    }

    fn encode(&self, endpoint: &Endpoint, _instance: &Instance<'_>) -> Result<String, EncodeError> {
        if endpoint.tls {
            return Err(EncodeError::not_carried(ValueFormat::Kitex, "TLS"));
        }
        Ok(super::to_go_json(&WrittenInfo {
            network: "tcp",
            address: endpoint.addr.as_str(),
            weight: endpoint.weight,
            tags: super::string_map(ValueFormat::Kitex, endpoint.metadata.as_ref())?,
        }))
    }

    fn carries_metadata(&self) -> bool {
        true
    }

    fn default_weight(&self) -> Weight {
        KITEX_DEFAULT_WEIGHT
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{decode, TEST_INSTANCE};
    use serde_json::json;

    fn one(value: &str) -> Result<Endpoint, ValueError> {
        let d = decode(b"kitex/registry-etcd/echo/10.0.0.5:8888", value.as_bytes())?;
        assert_eq!(d.format, ValueFormat::Kitex);
        assert_eq!(d.endpoints.len(), 1);
        Ok(d.endpoints.into_iter().next().unwrap())
    }

    #[test]
    fn values_decode_with_kitex_weights() {
        let ep =
            one(r#"{"network":"tcp","address":"10.0.0.5:8888","weight":10,"tags":null}"#).unwrap();
        assert_eq!(
            (ep.addr.as_str(), ep.weight, ep.tls),
            ("10.0.0.5:8888", 10, false)
        );
        assert_eq!(ep.metadata, None);
        let ep = one(r#"{"network":"tcp","address":"h:1","weight":3,"tags":{"idc":"a"}}"#).unwrap();
        assert_eq!(ep.weight, 3);
        assert_eq!(ep.metadata, Some(json!({"idc": "a"})));
        // Kitex's resolver: 0 or less is its default, 10.
        for w in ["0", "-2", "null"] {
            let v = format!(r#"{{"network":"tcp","address":"h:1","weight":{w},"tags":null}}"#);
            assert_eq!(one(&v).unwrap().weight, 10, "{w}");
        }
        assert_eq!(one(r#"{"address":"h:1"}"#).unwrap().weight, 10);
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            one(r#"{"network":"unix","address":"/tmp/s.sock","weight":10,"tags":null}"#),
            Err(ValueError::Invalid { .. })
        ));
        assert!(matches!(
            one(r#"{"network":"tcp","address":5}"#),
            Err(ValueError::Invalid { .. })
        ));
        assert!(matches!(
            one(r#"{"network":"tcp","address":"h"}"#),
            Err(ValueError::BadAddr(_))
        ));
    }

    #[test]
    fn writes_instance_info() {
        let ep = Endpoint::new("10.0.0.5:8888".parse().unwrap())
            .with_weight(ValueFormat::Kitex.default_weight());
        assert_eq!(
            ValueFormat::Kitex.encode(&ep, &TEST_INSTANCE).unwrap(),
            r#"{"network":"tcp","address":"10.0.0.5:8888","weight":10,"tags":null}"#
        );
        let mut ep = ep.with_weight(3);
        ep.metadata = Some(json!({"idc": "a"}));
        let v = ValueFormat::Kitex.encode(&ep, &TEST_INSTANCE).unwrap();
        assert_eq!(
            v,
            r#"{"network":"tcp","address":"10.0.0.5:8888","weight":3,"tags":{"idc":"a"}}"#
        );
        assert_eq!(one(&v).unwrap(), ep);
        ep.tls = true;
        assert!(ValueFormat::Kitex.encode(&ep, &TEST_INSTANCE).is_err());
    }
}
