//! Kratos (`github.com/go-kratos/kratos`, `contrib/registry/etcd`): `Register` puts
//! `json.Marshal(registry.ServiceInstance)` under `<namespace>/<name>/<id>` (namespace
//! `/microservices` by default; the id a UUID made by `kratos.New`):
//!
//! ```text
//! {"id":"…","name":"helloworld","version":"v1","metadata":{"weight":"3"},
//!  "endpoints":["http://10.0.0.5:8000","grpc://10.0.0.5:9000"]}
//! ```
//!
//! (`contrib/registry/etcd/registry.go` `registerKey`, `service.go` `marshal`;
//! `registry/registry.go` `ServiceInstance`; `app.go` `buildInstance`.) Recognised by its
//! `id` and `endpoints` fields. Each gRPC endpoint is served: `grpc://host:port`, and
//! `grpcs://host:port` (or the older `grpc://host:port?isSecure=true`) with TLS; others
//! (`http://`, `https://`) are listed as skipped. The weight is `metadata.weight` (a
//! string, as Kratos's selectors read it); `version` is kept as the endpoint's version.
//! A value whose `name` is not the service in its key is invalid, as Kratos's own
//! watcher skips it.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat};
use crate::endpoint::{BackendAddr, Endpoint, DEFAULT_WEIGHT};

/// The Kratos format's codec.
#[derive(Debug, Clone, Copy)]
pub struct Kratos;

/// `registry.ServiceInstance` as read: lenient where Kratos's own decoder would fail on
/// something we can still use (a metadata value that is not a string).
#[derive(Debug, Deserialize)]
struct ReadInstance {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    #[serde(default)]
    endpoints: Option<Vec<String>>,
}

/// `registry.ServiceInstance` as Kratos writes it: its fields, in its order, with its
/// types (`Metadata map[string]string`, nil written as `null`).
#[derive(Debug, Serialize)]
struct WrittenInstance<'a> {
    id: &'a str,
    name: &'a str,
    version: &'a str,
    metadata: Option<BTreeMap<String, String>>,
    endpoints: [String; 1],
}

impl Codec for Kratos {
    fn name(&self) -> &'static str {
        "kratos"
    }

    fn default_prefix(&self) -> &'static str {
        "/microservices"
    }

    fn key_name(&self) -> KeyName {
        KeyName::Uuid
    }

    fn recognises(&self, _key: &str, value: Shape<'_>) -> bool {
        value.has("id") && value.has("endpoints")
    }

    fn decode(
        &self,
        key: &str,
        value: Shape<'_>,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        let instance: ReadInstance = super::read_json(ValueFormat::Kratos, value)?;
        let name = instance.name.unwrap_or_default();
        if let Some(service) = super::layout::service_segment(key) {
            if name != service {
                return Err(ValueError::invalid(ValueFormat::Kratos, format!(
                    "it names service {name:?}, not {service:?} as its key does (Kratos clients skip it too)"
                )));
            }
        }
        let metadata = instance.metadata.filter(|m| !m.is_null());
        let weight = match metadata.as_ref().and_then(|m| m.get("weight")) {
            None | Some(serde_json::Value::Null) => DEFAULT_WEIGHT,
            Some(w) => super::weight(key, w),
        };
        let mut endpoints = Vec::new();
        for url in instance.endpoints.unwrap_or_default() {
            match grpc_endpoint(&url)? {
                Some((addr, tls)) => {
                    let mut endpoint = Endpoint::new(addr).with_weight(weight);
                    endpoint.tls = tls;
                    endpoint.metadata.clone_from(&metadata);
                    endpoint.version.clone_from(&instance.version);
                    endpoints.push(endpoint);
                }
                None => skipped.push(Skipped {
                    endpoint: url,
                    why: "not a gRPC endpoint (grpc:// or grpcs://)".to_owned(),
                }),
            }
        }
        Ok(endpoints)
    }

    fn encode(&self, endpoint: &Endpoint, instance: &Instance<'_>) -> Result<String, EncodeError> {
        let mut metadata = super::string_map(ValueFormat::Kratos, endpoint.metadata.as_ref())?;
        if endpoint.weight != DEFAULT_WEIGHT {
            metadata
                .get_or_insert_with(BTreeMap::new)
                .insert("weight".to_owned(), endpoint.weight.to_string());
        }
        let scheme = if endpoint.tls { "grpcs" } else { "grpc" };
        Ok(super::to_go_json(&WrittenInstance {
            id: instance.id,
            name: instance.service,
            version: instance.version,
            metadata,
            endpoints: [format!("{scheme}://{}", endpoint.addr)],
        }))
    }

    fn carries_metadata(&self) -> bool {
        true
    }
}

/// The address and TLS of a gRPC endpoint URL; `None` for another protocol. A URL that
/// does not parse makes the whole value invalid, as it does for Kratos's resolver.
fn grpc_endpoint(url: &str) -> Result<Option<(BackendAddr, bool)>, ValueError> {
    let uri: http::Uri = url
        .parse()
        .map_err(|e| ValueError::invalid(ValueFormat::Kratos, format!("endpoint {url:?}: {e}")))?;
    let tls = match uri.scheme_str() {
        Some("grpcs") => true,
        Some("grpc") => uri.query().is_some_and(is_secure),
        _ => return Ok(None),
    };
    let authority = uri.authority().map_or("", |a| a.as_str());
    Ok(Some((authority.parse()?, tls)))
}

/// Whether a URL query says `isSecure=true` (Kratos's older way of marking TLS, read with
/// Go's `strconv.ParseBool`).
fn is_secure(query: &str) -> bool {
    query.split('&').any(|pair| {
        matches!(
            pair.split_once('='),
            Some(("isSecure", "1" | "t" | "T" | "true" | "TRUE" | "True"))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::decode;
    use serde_json::json;

    const KEY: &[u8] = b"/microservices/helloworld/4c0e5fd0-81f5-11ee-b962-0242ac120002";

    fn decoded(value: &str) -> Result<(Vec<Endpoint>, Vec<Skipped>), ValueError> {
        let d = decode(KEY, value.as_bytes())?;
        assert_eq!(d.format, ValueFormat::Kratos);
        Ok((d.endpoints, d.skipped))
    }

    #[test]
    fn grpc_endpoints_are_served_and_others_skipped() {
        let (eps, skipped) = decoded(
            r#"{"id":"4c0e","name":"helloworld","version":"v1","metadata":{"weight":"3","zone":"a"},"endpoints":["http://10.0.0.5:8000","grpc://10.0.0.5:9000"]}"#,
        )
        .unwrap();
        assert_eq!(eps.len(), 1);
        assert_eq!(eps[0].addr.as_str(), "10.0.0.5:9000");
        assert_eq!((eps[0].weight, eps[0].tls), (3, false));
        assert_eq!(eps[0].metadata, Some(json!({"weight": "3", "zone": "a"})));
        assert_eq!(eps[0].label("version").as_deref(), Some("v1"));
        assert_eq!(eps[0].label("zone").as_deref(), Some("a"));
        assert_eq!(
            skipped,
            [Skipped {
                endpoint: "http://10.0.0.5:8000".into(),
                why: "not a gRPC endpoint (grpc:// or grpcs://)".into()
            }]
        );
    }

    #[test]
    fn tls_endpoints_are_marked() {
        let (eps, _) = decoded(
            r#"{"id":"i","name":"helloworld","version":"","metadata":null,"endpoints":["grpcs://10.0.0.5:9000","grpc://10.0.0.6:9000?isSecure=true","grpc://10.0.0.7:9000?isSecure=false"]}"#,
        )
        .unwrap();
        let tls: Vec<_> = eps.iter().map(|e| (e.addr.as_str(), e.tls)).collect();
        assert_eq!(
            tls,
            [
                ("10.0.0.5:9000", true),
                ("10.0.0.6:9000", true),
                ("10.0.0.7:9000", false)
            ]
        );
        assert!(eps.iter().all(|e| e.metadata.is_none() && e.weight == 1));
    }

    #[test]
    fn an_instance_without_grpc_lists_nothing() {
        let (eps, skipped) = decoded(
            r#"{"id":"i","name":"helloworld","version":"","metadata":null,"endpoints":["http://10.0.0.5:8000"]}"#,
        )
        .unwrap();
        assert!(eps.is_empty());
        assert_eq!(skipped.len(), 1);
        assert!(
            decoded(r#"{"id":"i","name":"helloworld","endpoints":null}"#)
                .unwrap()
                .0
                .is_empty()
        );
    }

    #[test]
    fn bad_values_are_errors() {
        let invalid = |v: &str| {
            matches!(
                decoded(v),
                Err(ValueError::Invalid {
                    format: ValueFormat::Kratos,
                    ..
                })
            )
        };
        // Another service's instance under this key (Kratos's watcher filters by name).
        assert!(invalid(
            r#"{"id":"i","name":"hello","endpoints":["grpc://h:1"]}"#
        ));
        assert!(invalid(
            r#"{"id":"i","name":"helloworld","endpoints":"grpc://h:1"}"#
        ));
        assert!(invalid(
            r#"{"id":"i","name":"helloworld","endpoints":["grpc://h :1"]}"#
        ));
        assert!(matches!(
            decoded(r#"{"id":"i","name":"helloworld","endpoints":["grpc://h"]}"#),
            Err(ValueError::BadAddr(_))
        ));
        assert!(matches!(
            decoded(r#"{"id":"i","name":"helloworld","endpoints":["grpc://u@h:1"]}"#),
            Err(ValueError::BadAddr(_))
        ));
    }

    #[test]
    fn writes_a_service_instance() {
        let instance = Instance {
            service: "helloworld",
            id: "4c0e5fd0-81f5-11ee-b962-0242ac120002",
            version: "v1",
        };
        let ep = Endpoint::new("10.0.0.5:9000".parse().unwrap());
        let v = ValueFormat::Kratos.encode(&ep, &instance).unwrap();
        assert_eq!(
            v,
            r#"{"id":"4c0e5fd0-81f5-11ee-b962-0242ac120002","name":"helloworld","version":"v1","metadata":null,"endpoints":["grpc://10.0.0.5:9000"]}"#
        );
        let mut ep = ep.with_weight(4);
        ep.tls = true;
        ep.metadata = Some(json!({"zone": "a&b"}));
        let v = ValueFormat::Kratos.encode(&ep, &instance).unwrap();
        assert_eq!(
            v,
            r#"{"id":"4c0e5fd0-81f5-11ee-b962-0242ac120002","name":"helloworld","version":"v1","metadata":{"weight":"4","zone":"a\u0026b"},"endpoints":["grpcs://10.0.0.5:9000"]}"#
        );
        // Read back whole.
        let (eps, _) = decoded(&v).unwrap();
        assert_eq!(eps[0].weight, 4);
        assert!(eps[0].tls);
        assert_eq!(eps[0].metadata, Some(json!({"weight": "4", "zone": "a&b"})));
        // Kratos's metadata is map[string]string: nothing else is written.
        ep.metadata = Some(json!({"n": 1}));
        assert!(ValueFormat::Kratos.encode(&ep, &instance).is_err());
    }
}
