//! etcd's Go naming JSON (`go.etcd.io/etcd/client/v3/naming/endpoints.Update`):
//! `{"Op":0,"Addr":"10.0.0.5:50051","Metadata":{…}}`, read by grpc-go's `etcd:///`
//! resolver, under `<prefix>/<service>/<host:port>`. Recognised by its `Addr` field. The
//! weight is `Metadata.weight` (a number, or a string holding one); the metadata is
//! carried through whole. Written as etcd's `endpoints.Manager.AddEndpoint` writes it
//! (`json.Marshal` of `endpoints.Update`, in etcd's `client/v3/naming/endpoints`).

use serde::{Deserialize, Serialize};

use super::{Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat};
use crate::endpoint::{Endpoint, DEFAULT_WEIGHT};

/// etcd naming operation: 0 adds an endpoint, 1 deletes it. etcd's own client treats
/// every put as an add; a put saying "delete" is skipped as malformed.
const OP_ADD: u64 = 0;

/// The etcd-naming format's codec.
#[derive(Debug, Clone, Copy)]
pub struct EtcdNaming;

/// The value as etcd's Go naming package writes it (`endpoints.Update`: no JSON tags, so
/// the Go field names; a nil `Metadata` is written as `null`).
#[derive(Debug, Serialize, Deserialize)]
struct Update {
    #[serde(rename = "Op", default)]
    op: u64,
    #[serde(rename = "Addr")]
    addr: String,
    #[serde(rename = "Metadata", default)]
    metadata: Option<serde_json::Value>,
}

impl Codec for EtcdNaming {
    fn name(&self) -> &'static str {
        "etcd-naming"
    }

    fn default_prefix(&self) -> &'static str {
        "services"
    }

    fn key_name(&self) -> KeyName {
        KeyName::Addr
    }

    fn recognises(&self, _key: &str, value: Shape<'_>) -> bool {
        value.has("Addr")
    }

    fn decode(
        &self,
        key: &str,
        value: Shape<'_>,
        _skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        let update: Update = super::read_json(ValueFormat::EtcdNaming, value)?;
        if update.op != OP_ADD {
            return Err(ValueError::NotAdd(update.op));
        }
        let metadata = update.metadata.filter(|m| !m.is_null());
        let weight = match metadata.as_ref().and_then(|m| m.get("weight")) {
            None | Some(serde_json::Value::Null) => DEFAULT_WEIGHT,
            Some(w) => super::weight(key, w),
        };
        let mut endpoint = Endpoint::new(update.addr.parse()?).with_weight(weight);
        endpoint.metadata = metadata;
        Ok(vec![endpoint])
    }

    fn encode(&self, endpoint: &Endpoint, _instance: &Instance<'_>) -> Result<String, EncodeError> {
        if endpoint.tls {
            return Err(EncodeError::not_carried(ValueFormat::EtcdNaming, "TLS"));
        }
        let mut metadata = endpoint.metadata.clone().filter(|m| !m.is_null());
        if endpoint.weight != DEFAULT_WEIGHT {
            // The weight travels in the metadata, where `decode` reads it.
            let map = metadata.get_or_insert_with(|| serde_json::json!({}));
            match map.as_object_mut() {
                Some(m) => {
                    m.insert("weight".to_owned(), endpoint.weight.into());
                }
                None => {
                    return Err(EncodeError::not_carried(
                        ValueFormat::EtcdNaming,
                        "a weight beside metadata that is not a JSON object",
                    ))
                }
            }
        }
        let update = Update {
            op: OP_ADD,
            addr: endpoint.addr.as_str().to_owned(),
            metadata,
        };
        Ok(super::to_go_json(&update))
    }

    fn carries_metadata(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::{decode, TEST_INSTANCE as INSTANCE};
    use serde_json::json;

    fn one(value: &str) -> Result<Endpoint, ValueError> {
        let d = decode(b"services/s/k", value.as_bytes())?;
        assert_eq!(d.format, ValueFormat::EtcdNaming);
        assert_eq!(d.endpoints.len(), 1);
        Ok(d.endpoints.into_iter().next().unwrap())
    }

    #[test]
    fn values_decode() {
        // As etcd's naming package writes it (endpoints.Update, json.Marshal).
        let ep = one(r#"{"Op":0,"Addr":"10.0.0.5:50051","Metadata":{"zone":"a"}}"#).unwrap();
        assert_eq!(ep.addr.as_str(), "10.0.0.5:50051");
        assert_eq!(ep.metadata, Some(json!({"zone": "a"})));
        assert_eq!((ep.weight, ep.tls), (1, false));
        let ep = one(r#"{"Addr":"h:1","Metadata":null}"#).unwrap();
        assert_eq!(ep.metadata, None);
    }

    #[test]
    fn weights_come_from_metadata() {
        let w = |v: &str| one(v).unwrap().weight;
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":5}}"#), 5);
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":"12"}}"#), 12);
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":null}}"#), 1);
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":"heavy"}}"#), 1);
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":0}}"#), 1);
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":{"weight":1e9}}"#), 1);
        assert_eq!(
            w(r#"{"Addr":"h:1","Metadata":{"weight":99999999}}"#),
            10_000
        );
        assert_eq!(w(r#"{"Addr":"h:1","Metadata":"weight"}"#), 1);
        // The metadata is kept whole, weight included.
        let ep = one(r#"{"Addr":"h:1","Metadata":{"weight":"12","zone":"b"}}"#).unwrap();
        assert_eq!(ep.metadata, Some(json!({"weight": "12", "zone": "b"})));
    }

    #[test]
    fn bad_values_are_errors() {
        assert_eq!(one(r#"{"Op":1,"Addr":"h:1"}"#), Err(ValueError::NotAdd(1)));
        assert!(matches!(
            one(r#"{"Op":0,"Addr":5}"#),
            Err(ValueError::Invalid {
                format: ValueFormat::EtcdNaming,
                ..
            })
        ));
        assert!(matches!(
            one(r#"{"Op":"x","Addr":"h:1"}"#),
            Err(ValueError::Invalid { .. })
        ));
        assert!(matches!(
            one(r#"{"Addr":"h"}"#),
            Err(ValueError::BadAddr(_))
        ));
    }

    #[test]
    fn values_round_trip() {
        let ep = Endpoint::new("127.0.0.1:9".parse().unwrap());
        let v = ValueFormat::EtcdNaming.encode(&ep, &INSTANCE).unwrap();
        assert_eq!(v, r#"{"Op":0,"Addr":"127.0.0.1:9","Metadata":null}"#);
        assert_eq!(one(&v).unwrap(), ep);

        let mut ep = Endpoint::new("h:9".parse().unwrap());
        ep.metadata = Some(json!({"k": "v"}));
        let v = ValueFormat::EtcdNaming.encode(&ep, &INSTANCE).unwrap();
        assert_eq!(v, r#"{"Op":0,"Addr":"h:9","Metadata":{"k":"v"}}"#);
        assert_eq!(one(&v).unwrap(), ep);

        // A weight is written into the metadata, and read back from there.
        let ep = Endpoint::new("h:9".parse().unwrap()).with_weight(4);
        let v = ValueFormat::EtcdNaming.encode(&ep, &INSTANCE).unwrap();
        assert_eq!(v, r#"{"Op":0,"Addr":"h:9","Metadata":{"weight":4}}"#);
        assert_eq!(one(&v).unwrap().weight, 4);

        let mut tls = Endpoint::new("h:9".parse().unwrap());
        tls.tls = true;
        assert!(ValueFormat::EtcdNaming.encode(&tls, &INSTANCE).is_err());
    }
}
