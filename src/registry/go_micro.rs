//! go-micro (`github.com/micro/go-micro`, `registry/etcd`): `registerNode` puts
//! `json.Marshal(registry.Service)` with the one node being registered under
//! `/micro/registry/<service>/<node id>` (node id `<service>-<UUID>`):
//!
//! ```text
//! {"name":"helloworld","version":"latest","metadata":null,"endpoints":[…],
//!  "nodes":[{"id":"helloworld-…","address":"10.0.0.5:9090","metadata":{"protocol":"grpc",…}}]}
//! ```
//!
//! (`registry/etcd/etcd.go` `registerNode`, `nodePath`, `encode`; `registry/registry.go`
//! `Service`, `Node`; the gRPC server's `Register` sets the node's `protocol` to `grpc`.)
//! Recognised by its `nodes` field. Every node's address is served, except nodes whose
//! `protocol` metadata names another protocol (go-micro's own `mucp`), which are listed
//! as skipped. go-micro has no weights. A node's metadata is kept as its metadata.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::{Codec, EncodeError, Instance, KeyName, Shape, Skipped, ValueError, ValueFormat};
use crate::endpoint::{Endpoint, DEFAULT_WEIGHT};

/// The go-micro format's codec.
#[derive(Debug, Clone, Copy)]
pub struct GoMicro;

/// `registry.Service` as read: its version and its nodes.
#[derive(Debug, Deserialize)]
struct ReadService {
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    nodes: Option<Vec<ReadNode>>,
}

/// `registry.Node` as read.
#[derive(Debug, Deserialize)]
struct ReadNode {
    #[serde(default)]
    id: Option<String>,
    address: String,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
}

/// `registry.Service` as go-micro's etcd registry writes it: one node, no endpoints
/// described (a sidecar does not know the handlers), service metadata nil.
#[derive(Debug, Serialize)]
struct WrittenService<'a> {
    name: &'a str,
    version: &'a str,
    metadata: Option<BTreeMap<String, String>>,
    endpoints: [(); 0],
    nodes: [WrittenNode<'a>; 1],
}

/// `registry.Node` as written.
#[derive(Debug, Serialize)]
struct WrittenNode<'a> {
    id: &'a str,
    address: &'a str,
    metadata: BTreeMap<String, String>,
}

impl Codec for GoMicro {
    fn name(&self) -> &'static str {
        "go-micro"
    }

    fn default_prefix(&self) -> &'static str {
        "/micro/registry"
    }

    fn key_name(&self) -> KeyName {
        KeyName::ServiceUuid
    }

    fn recognises(&self, _key: &str, value: Shape<'_>) -> bool {
        value.has("nodes")
    }

    fn decode(
        &self,
        _key: &str,
        value: Shape<'_>,
        skipped: &mut Vec<Skipped>,
    ) -> Result<Vec<Endpoint>, ValueError> {
        let service: ReadService = super::read_json(ValueFormat::GoMicro, value)?;
        let mut endpoints = Vec::new();
        for node in service.nodes.unwrap_or_default() {
            let metadata = node.metadata.filter(|m| !m.is_null());
            let protocol = metadata
                .as_ref()
                .and_then(|m| m.get("protocol"))
                .and_then(|p| p.as_str());
            if let Some(protocol) = protocol.filter(|p| *p != "grpc") {
                skipped.push(Skipped {
                    endpoint: format!("{} ({})", node.address, node.id.unwrap_or_default()),
                    why: format!("node speaks {protocol:?}, not gRPC"),
                });
                continue;
            }
            let mut endpoint = Endpoint::new(node.address.parse()?);
            endpoint.metadata = metadata;
            endpoint.version.clone_from(&service.version);
            endpoints.push(endpoint);
        }
        Ok(endpoints)
    }

    fn encode(&self, endpoint: &Endpoint, instance: &Instance<'_>) -> Result<String, EncodeError> {
        let not_carried = |what| EncodeError::not_carried(ValueFormat::GoMicro, what);
        if endpoint.tls {
            return Err(not_carried("TLS"));
        }
        if endpoint.weight != DEFAULT_WEIGHT {
            return Err(not_carried("a weight"));
        }
        let mut metadata = super::string_map(ValueFormat::GoMicro, endpoint.metadata.as_ref())?
            .unwrap_or_default();
        // What go-micro's gRPC server marks its node with (but the broker, which a
        // sidecar has none of): its clients and ours read `protocol`.
        for (k, v) in [
            ("protocol", "grpc"),
            ("registry", "etcd"),
            ("server", "grpc"),
            ("transport", "grpc"),
        ] {
            metadata.entry(k.to_owned()).or_insert_with(|| v.to_owned());
        }
        Ok(super::to_go_json(&WrittenService {
            name: instance.service,
            version: instance.version,
            metadata: None,
            endpoints: [],
            nodes: [WrittenNode {
                id: instance.id,
                address: endpoint.addr.as_str(),
                metadata,
            }],
        }))
    }

    fn carries_metadata(&self) -> bool {
        true
    }

    fn default_version(&self) -> &'static str {
        "latest"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::registry::decode;
    use serde_json::json;

    fn decoded(value: &str) -> Result<(Vec<Endpoint>, Vec<Skipped>), ValueError> {
        let d = decode(b"/micro/registry/helloworld/helloworld-1", value.as_bytes())?;
        assert_eq!(d.format, ValueFormat::GoMicro);
        Ok((d.endpoints, d.skipped))
    }

    #[test]
    fn grpc_nodes_are_served_and_others_skipped() {
        let (eps, skipped) = decoded(
            r#"{"name":"helloworld","version":"latest","metadata":null,"endpoints":[],"nodes":[{"id":"a","address":"10.0.0.5:9090","metadata":{"protocol":"grpc"}},{"id":"b","address":"10.0.0.6:9090","metadata":{"protocol":"mucp"}},{"id":"c","address":"10.0.0.7:9090","metadata":null}]}"#,
        )
        .unwrap();
        let addrs: Vec<_> = eps.iter().map(|e| e.addr.as_str()).collect();
        assert_eq!(addrs, ["10.0.0.5:9090", "10.0.0.7:9090"]);
        assert_eq!(eps[0].metadata, Some(json!({"protocol": "grpc"})));
        assert!(eps.iter().all(|e| e.weight == 1 && !e.tls));
        assert!(eps
            .iter()
            .all(|e| e.label("version").as_deref() == Some("latest")));
        assert_eq!(skipped.len(), 1);
        assert!(
            skipped[0].to_string().contains("10.0.0.6:9090 (b)"),
            "{}",
            skipped[0]
        );
        assert!(skipped[0].why.contains("mucp"));
        assert!(decoded(r#"{"name":"x","nodes":null}"#)
            .unwrap()
            .0
            .is_empty());
    }

    #[test]
    fn bad_values_are_errors() {
        assert!(matches!(
            decoded(r#"{"nodes":[{"id":"a"}]}"#),
            Err(ValueError::Invalid { .. })
        ));
        assert!(matches!(
            decoded(r#"{"nodes":[{"id":"a","address":"nohost"}]}"#),
            Err(ValueError::BadAddr(_))
        ));
    }

    #[test]
    fn writes_one_node() {
        let instance = Instance {
            service: "helloworld",
            id: "helloworld-0f3a",
            version: "latest",
        };
        let mut ep = Endpoint::new("10.0.0.5:9090".parse().unwrap());
        ep.metadata = Some(json!({"zone": "a"}));
        let v = ValueFormat::GoMicro.encode(&ep, &instance).unwrap();
        assert_eq!(
            v,
            r#"{"name":"helloworld","version":"latest","metadata":null,"endpoints":[],"nodes":[{"id":"helloworld-0f3a","address":"10.0.0.5:9090","metadata":{"protocol":"grpc","registry":"etcd","server":"grpc","transport":"grpc","zone":"a"}}]}"#
        );
        let (eps, _) = decoded(&v).unwrap();
        assert_eq!(eps[0].addr, ep.addr);
        assert!(ValueFormat::GoMicro
            .encode(&ep.with_weight(2), &instance)
            .is_err());
    }
}
