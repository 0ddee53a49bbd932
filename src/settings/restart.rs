//! Settings read at start only: each section declares its own (`RESTART_ONLY`, beside the
//! fields, by file key), and a reload keeps their running values, generically, on the
//! settings' tree of file keys — so a new restart-only setting is one more key in its
//! section's list, not a field copied by hand.

use serde_json::{Map, Value};

use super::observe::ObserveSection;
use super::{AdminSettings, UpstreamSettings, UpstreamTlsSettings};
use super::{ConfigError, EtcdSettings, LimitSettings, ProxySettings, TimeoutSettings};

/// Every restart-only setting of the proxy, by file key (a key may name a whole section).
pub fn restart_only_keys() -> impl Iterator<Item = &'static str> {
    [
        EtcdSettings::RESTART_ONLY,
        UpstreamTlsSettings::RESTART_ONLY,
        UpstreamSettings::RESTART_ONLY,
        ObserveSection::RESTART_ONLY,
        super::service_config::ServiceConfigSection::RESTART_ONLY,
        AdminSettings::RESTART_ONLY,
        TimeoutSettings::RESTART_ONLY,
        LimitSettings::RESTART_ONLY,
    ]
    .into_iter()
    .flatten()
    .copied()
}

/// Puts the running values of the restart-only settings back into `new`; returns the
/// keys whose values differed (a reload logs them as needing a restart).
pub fn keep_restart_only(
    running: &ProxySettings,
    new: &mut ProxySettings,
) -> Result<Vec<&'static str>, ConfigError> {
    let old = super::layer::to_tree(running)?;
    let mut tree = super::layer::to_tree(new)?;
    let mut changed = Vec::new();
    for key in restart_only_keys() {
        let was = at(&old, key).cloned();
        if at(&tree, key) != was.as_ref() {
            changed.push(key);
            set(&mut tree, key, was);
        }
    }
    if !changed.is_empty() {
        *new = serde_json::from_value(Value::Object(tree))
            .map_err(|e| super::layer::internal(format!("restart-only settings: {e}")))?;
    }
    Ok(changed)
}

/// The value at dotted `key` in `tree`.
fn at<'t>(tree: &'t Map<String, Value>, key: &str) -> Option<&'t Value> {
    let (section, rest) = match key.split_once('.') {
        Some((s, r)) => (s, Some(r)),
        None => (key, None),
    };
    let node = tree.get(section)?;
    match rest {
        None => Some(node),
        Some(rest) => at(node.as_object()?, rest),
    }
}

/// Sets (or, with `None`, removes) the value at dotted `key` in `tree`.
fn set(tree: &mut Map<String, Value>, key: &str, value: Option<Value>) {
    match key.split_once('.') {
        None => {
            match value {
                Some(v) => tree.insert(key.to_owned(), v),
                None => tree.remove(key),
            };
        }
        Some((section, rest)) => {
            let node = tree
                .entry(section.to_owned())
                .or_insert_with(|| Value::Object(Map::new()));
            if let Value::Object(map) = node {
                set(map, rest, value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_restart_only_key_is_a_setting_or_a_section() {
        let tree = super::super::layer::to_tree(&ProxySettings::default()).unwrap();
        for key in restart_only_keys() {
            assert!(at(&tree, key).is_some(), "{key} is not in the settings");
        }
    }

    #[test]
    fn restart_only_values_are_kept_and_named_the_rest_applies() {
        let running = ProxySettings::default();
        let mut new = running.clone();
        new.etcd.prefix = vec!["other".into()];
        new.etcd.endpoints = vec!["http://127.0.0.1:1".into()];
        new.limits.worker_threads = 4;
        new.limits.max_connections = 7;
        new.upstream_tls.sni = Some("x".into());
        let changed = keep_restart_only(&running, &mut new).unwrap();
        assert_eq!(
            changed,
            ["etcd.endpoints", "upstream_tls", "limits.worker_threads"]
        );
        assert_eq!(new.etcd.endpoints, running.etcd.endpoints);
        assert_eq!(new.upstream_tls, running.upstream_tls);
        assert_eq!(new.limits.worker_threads, running.limits.worker_threads);
        assert_eq!(new.etcd.prefix, ["other"]);
        assert_eq!(new.limits.max_connections, 7);
        let mut same = running.clone();
        assert!(keep_restart_only(&running, &mut same).unwrap().is_empty());
    }
}
