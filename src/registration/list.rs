//! `switchyard endpoints`: lists what is registered under the prefixes, decoded, with
//! each value's format, for operators. Malformed keys and values are listed as such;
//! under the empty prefix (go-zero's keys have no common prefix) only keys shaped
//! `<service>/<name>` whose value is a registry value and that are not under another
//! listed prefix are taken, since the whole keyspace is under it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use etcd_client::{Client, GetOptions};
use serde::Serialize;

use crate::etcd::{timed, RequestError};
use crate::registry::layout::{KeyError, KeyPrefix};
use crate::registry::ValueFormat;
use crate::route::ServiceName;
use crate::settings::{duration, EtcdSettings};

/// Flags of `switchyard endpoints`.
#[derive(clap::Args, Debug, Clone)]
pub struct EndpointsArgs {
    /// Only this service (default: all services under the prefix).
    pub service: Option<ServiceName>,
    /// Print JSON (an array of objects) instead of a table.
    #[arg(long)]
    pub json: bool,
    /// Time allowed for each etcd request.
    #[arg(long, default_value = "5s", value_parser = duration::parse)]
    pub timeout: Duration,
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: EtcdSettings,
}

/// One endpoint listed under a key (a key may list several), or a key that lists none
/// (malformed), decoded as far as it goes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ListedEndpoint {
    /// The etcd key.
    pub key: String,
    /// The prefix it was listed under.
    pub prefix: String,
    /// The service part of the key (empty if the key has none).
    pub service: String,
    /// The backend address from the value (absent if malformed).
    pub addr: Option<String>,
    /// The endpoint's weight (absent if malformed).
    pub weight: Option<u32>,
    /// Whether the registry says to speak TLS to it (absent if malformed).
    pub tls: Option<bool>,
    /// The value format (absent if malformed).
    pub format: Option<ValueFormat>,
    /// The value's metadata, if any.
    pub metadata: Option<serde_json::Value>,
    /// The lease the key is attached to (absent: no lease, the key stays until deleted).
    pub lease: Option<i64>,
    /// Seconds left on the lease (absent without a lease; negative: the lease is gone).
    pub ttl_left: Option<i64>,
    /// Why the key or value is malformed (absent when it is usable).
    pub error: Option<String>,
}

/// Why listing failed.
#[derive(Debug, thiserror::Error)]
pub enum ListError {
    /// The etcd client could not be set up.
    #[error(transparent)]
    Connect(#[from] crate::etcd::EtcdError),
    /// An etcd request failed or got no answer in time.
    #[error(transparent)]
    Etcd(#[from] RequestError),
}

/// Lists the keys under each of `prefixes` (or under `<prefix>/<service>/`), decoded, in
/// the prefixes' order and then key order.
pub async fn list(
    client: &mut Client,
    prefixes: &[String],
    service: Option<&ServiceName>,
    timeout: Duration,
) -> Result<Vec<ListedEndpoint>, ListError> {
    let roots: Vec<KeyPrefix> = prefixes.iter().map(|p| KeyPrefix::new(p)).collect();
    let mut seen = std::collections::HashSet::new();
    let mut listing = Listing {
        client,
        timeout,
        ttls: HashMap::new(),
        out: Vec::new(),
    };
    for (prefix, root) in prefixes.iter().zip(&roots) {
        let range = match service {
            Some(s) => root.service(s.as_str()),
            None => root.root().to_owned(),
        };
        let resp = timed(
            "get",
            timeout,
            listing
                .client
                .get(range.as_str(), Some(GetOptions::new().with_prefix())),
        )
        .await?;
        for kv in resp.kvs() {
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            if root.is_whole_keyspace() {
                // The whole keyspace: only what looks like `<service>/<name>` holding
                // a registry value, and is not another prefix's.
                let elsewhere = roots
                    .iter()
                    .any(|r| !r.is_whole_keyspace() && key.starts_with(r.root()));
                if elsewhere
                    || !matches!(root.split(&key), Some(Ok(_)))
                    || crate::registry::decode(kv.key(), kv.value()).is_err()
                {
                    continue;
                }
            }
            if seen.insert(key.clone()) {
                listing.key(prefix, root, kv, key).await?;
            }
        }
    }
    Ok(listing.out)
}

/// The entries listed so far, and what listing them needs.
struct Listing<'a> {
    client: &'a mut Client,
    timeout: Duration,
    /// Seconds left on each lease asked about.
    ttls: HashMap<i64, i64>,
    out: Vec<ListedEndpoint>,
}

impl Listing<'_> {
    /// Lists one key under `prefix`: one entry per endpoint its value lists, or one
    /// saying why none.
    async fn key(
        &mut self,
        prefix: &str,
        root: &KeyPrefix,
        kv: &etcd_client::KeyValue,
        key: String,
    ) -> Result<(), ListError> {
        let lease = (kv.lease() != 0).then_some(kv.lease());
        let ttl_left = match lease {
            None => None,
            Some(id) => match self.ttls.get(&id) {
                Some(t) => Some(*t),
                None => {
                    let t = timed(
                        "lease time-to-live",
                        self.timeout,
                        self.client.lease_time_to_live(id, None),
                    )
                    .await?
                    .ttl();
                    self.ttls.insert(id, t);
                    Some(t)
                }
            },
        };
        // Listed by a range under the prefix, so the key is under it.
        let split = root.split(&key).unwrap_or_else(|| {
            Err(KeyError {
                service: "",
                why: "key outside its prefix".to_owned(),
            })
        });
        let (service, decoded) = match split {
            Err(KeyError { service, why }) => (service, Err(why)),
            Ok((service, _)) => (
                service,
                crate::registry::decode(kv.key(), kv.value()).map_err(|e| e.to_string()),
            ),
        };
        let entry = ListedEndpoint {
            key: key.clone(),
            prefix: prefix.to_owned(),
            service: service.to_owned(),
            addr: None,
            weight: None,
            tls: None,
            format: None,
            metadata: None,
            lease,
            ttl_left,
            error: None,
        };
        match decoded {
            Err(why) => self.out.push(ListedEndpoint {
                error: Some(why),
                ..entry
            }),
            Ok(d) if d.endpoints.is_empty() => self.out.push(ListedEndpoint {
                format: Some(d.format),
                error: Some(d.why_nothing_to_serve()),
                ..entry
            }),
            Ok(d) => {
                for ep in d.endpoints {
                    self.out.push(ListedEndpoint {
                        addr: Some(ep.addr.to_string()),
                        weight: Some(ep.weight),
                        tls: Some(ep.tls),
                        format: Some(d.format),
                        metadata: ep.metadata,
                        ..entry.clone()
                    });
                }
            }
        }
        Ok(())
    }
}

/// Renders entries as an aligned text table.
pub fn render_table(entries: &[ListedEndpoint]) -> String {
    let rows: Vec<[String; 5]> = entries
        .iter()
        .map(|e| {
            let ttl = match e.ttl_left {
                None => "-".to_owned(),
                Some(t) if t < 0 => "expired".to_owned(),
                Some(t) => format!("{t}s"),
            };
            let (addr, format, detail) = match &e.error {
                Some(why) => (
                    "-".to_owned(),
                    "MALFORMED".to_owned(),
                    format!("{}: {why}", e.key),
                ),
                None => (
                    match (&e.addr, e.tls) {
                        (Some(addr), Some(true)) => format!("{addr} (TLS)"),
                        (addr, _) => addr.clone().unwrap_or_default(),
                    },
                    e.format.map_or("-", ValueFormat::name).to_owned(),
                    e.metadata
                        .as_ref()
                        .map(|m| m.to_string())
                        .unwrap_or_default(),
                ),
            };
            [e.service.clone(), addr, ttl, format, detail]
        })
        .collect();
    let header = [
        "SERVICE".to_owned(),
        "ADDRESS".to_owned(),
        "TTL".to_owned(),
        "FORMAT".to_owned(),
        "METADATA".to_owned(),
    ];
    let mut widths = [0usize; 5];
    for row in std::iter::once(&header).chain(rows.iter()) {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&header).chain(rows.iter()) {
        let mut line = String::new();
        for (i, (cell, w)) in row.iter().zip(widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<w$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Prints the registered endpoints (a table, or JSON with `--json`).
pub async fn run(args: EndpointsArgs) -> Result<(), ListError> {
    let mut client = crate::etcd::connect(&args.etcd).await?;
    let entries = list(
        &mut client,
        &args.etcd.prefixes(),
        args.service.as_ref(),
        args.timeout,
    )
    .await?;
    if args.json {
        // Serializing strings, numbers and JSON values cannot fail.
        println!(
            "{}",
            serde_json::to_string_pretty(&entries).unwrap_or_default()
        );
    } else {
        print!("{}", render_table(&entries));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_lists_malformed_entries() {
        let ok = ListedEndpoint {
            key: "services/a/h:1".into(),
            prefix: "services".into(),
            service: "a".into(),
            addr: Some("h:1".into()),
            weight: Some(1),
            tls: Some(false),
            format: Some(ValueFormat::EtcdNaming),
            metadata: Some(serde_json::json!({"zone": "z"})),
            lease: Some(7),
            ttl_left: Some(9),
            error: None,
        };
        let bad = ListedEndpoint {
            key: "services/a/x".into(),
            prefix: "services".into(),
            service: "a".into(),
            addr: None,
            weight: None,
            tls: None,
            format: None,
            metadata: None,
            lease: None,
            ttl_left: None,
            error: Some("value is not UTF-8".into()),
        };
        let t = render_table(&[ok, bad]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("SERVICE"));
        assert!(lines[1].contains("h:1") && lines[1].contains("9s"));
        assert!(lines[1].contains("etcd-naming"));
        assert!(lines[1].contains(r#"{"zone":"z"}"#));
        assert!(lines[2].contains("MALFORMED") && lines[2].contains("not UTF-8"));
    }
}
