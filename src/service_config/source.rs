//! Where service configs come from: `--service-config` files (read at start and on
//! reload: a bad file refuses the whole set) and the documents under
//! `--service-config-prefix` in etcd (listed, then watched; a bad value is logged and the
//! key's last good document stays).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{Client, EventType, GetOptions, WatchOptions};

use super::json::{parse, ConfigError, ServiceConfig};
use super::table::LivePolicies;
use crate::backoff::Backoff;
use crate::etcd::timed;

/// Why a service config file was refused.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    /// The file cannot be read.
    #[error("service config {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// What the system said.
        #[source]
        source: std::io::Error,
    },
    /// The file is not a valid service config.
    #[error("service config {path}: {source}")]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The field and what is wrong with it.
        #[source]
        source: ConfigError,
    },
}

/// Reads and checks every file, in order; the first bad one is the error.
pub fn load_files(paths: &[PathBuf]) -> Result<Vec<(PathBuf, ServiceConfig)>, FileError> {
    paths.iter().map(|p| load_file(p)).collect()
}

fn load_file(path: &Path) -> Result<(PathBuf, ServiceConfig), FileError> {
    let text = std::fs::read_to_string(path).map_err(|source| FileError::Read {
        path: path.to_owned(),
        source,
    })?;
    let doc = parse(&text).map_err(|source| FileError::Invalid {
        path: path.to_owned(),
        source,
    })?;
    Ok((path.to_owned(), doc))
}

/// Time allowed for one etcd request of the watch.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// Keeps the documents under `prefix` (a key `prefix/<service>` each) in force in `live`
/// until the task is aborted: listed, then watched from the listing's revision; listed
/// again when the watch ends (etcd restarted, history compacted).
pub async fn watch_etcd(mut client: Client, prefix: String, live: Arc<LivePolicies>) {
    let key_prefix = if prefix.ends_with('/') {
        prefix
    } else {
        format!("{prefix}/")
    };
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let why = sync(&mut client, &key_prefix, &live, &mut backoff).await;
        tracing::warn!(prefix = %key_prefix, error = %why, "service config watch ended; listing again");
        backoff.sleep().await;
    }
}

/// One round: list, put the documents in force, then follow the watch.
async fn sync(
    client: &mut Client,
    key_prefix: &str,
    live: &LivePolicies,
    backoff: &mut Backoff,
) -> String {
    let listing = match timed(
        "get",
        REQUEST_TIMEOUT,
        client.get(key_prefix, Some(GetOptions::new().with_prefix())),
    )
    .await
    {
        Ok(l) => l,
        Err(e) => return e.to_string(),
    };
    let revision = listing.header().map_or(0, |h| h.revision());
    let mut docs = BTreeMap::new();
    for kv in listing.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        match read_value(&key, kv.value()) {
            Some(doc) => {
                docs.insert(key, doc);
            }
            // The key's last good document, if this process saw one, stays.
            None => {
                if let Some(old) = live.etcd_doc(&key) {
                    docs.insert(key, old);
                }
            }
        }
    }
    tracing::info!(prefix = %key_prefix, documents = docs.len(), "service configs listed from etcd");
    live.reset_etcd(docs);
    backoff.reset();
    let options = WatchOptions::new()
        .with_prefix()
        .with_start_revision(revision + 1);
    let mut stream = match timed(
        "watch",
        REQUEST_TIMEOUT,
        client.watch(key_prefix, Some(options)),
    )
    .await
    {
        Ok(s) => s,
        Err(e) => return e.to_string(),
    };
    loop {
        let resp = match stream.message().await {
            Ok(Some(r)) => r,
            Ok(None) => return "the watch ended".to_owned(),
            Err(e) => return e.to_string(),
        };
        if resp.compact_revision() > 0 || resp.canceled() {
            return "the watch was cancelled or compacted".to_owned();
        }
        for event in resp.events() {
            let Some(kv) = event.kv() else { continue };
            let key = String::from_utf8_lossy(kv.key()).into_owned();
            match event.event_type() {
                EventType::Put => {
                    if let Some(doc) = read_value(&key, kv.value()) {
                        tracing::info!(key = %key, "service config applied");
                        live.set_etcd(&key, Some(doc));
                    }
                }
                EventType::Delete => {
                    tracing::info!(key = %key, "service config removed");
                    live.set_etcd(&key, None);
                }
            }
        }
    }
}

/// The document in a key's value; a bad one is logged, naming the key and the field.
fn read_value(key: &str, value: &[u8]) -> Option<ServiceConfig> {
    let text = match std::str::from_utf8(value) {
        Ok(t) => t,
        Err(_) => {
            tracing::warn!(
                key,
                "service config in etcd is not UTF-8; the last good one stays"
            );
            return None;
        }
    };
    match parse(text) {
        Ok(doc) => Some(doc),
        Err(e) => {
            tracing::warn!(key, field = %e.field, problem = %e.problem, "bad service config in etcd; the last good one stays");
            None
        }
    }
}
