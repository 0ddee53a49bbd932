//! The service configs in force, merged from their sources (files, and documents in
//! etcd) into one table that a call looks its method up in: one lock-free load, and
//! nothing at all while no config is loaded.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use arc_swap::ArcSwap;
use parking_lot::Mutex;

use super::json::ServiceConfig;
use super::policy::MethodPolicy;
use super::throttle::Throttle;

/// What applies to one call: its method's policy and its service's throttle.
#[derive(Debug, Clone)]
pub struct CallPolicy {
    /// The method's policy.
    pub method: Arc<MethodPolicy>,
    /// The service's retry throttle, when its config has one.
    pub throttle: Option<Arc<Throttle>>,
}

#[derive(Debug, Default)]
struct ServiceEntry {
    methods: HashMap<Box<str>, CallPolicy>,
    whole: Option<CallPolicy>,
}

/// Every method's policy, by gRPC service and method.
#[derive(Debug, Default)]
pub struct PolicyTable {
    services: HashMap<Box<str>, ServiceEntry>,
    /// The nameless entry's policy: every method not named elsewhere.
    default: Option<CallPolicy>,
    /// The buckets, by service ("" for the default's), kept across rebuilds.
    throttles: HashMap<Box<str>, Arc<Throttle>>,
}

impl PolicyTable {
    /// The policy of `method` of gRPC service `service`, if any.
    pub fn lookup(&self, service: &str, method: &str) -> Option<&CallPolicy> {
        match self.services.get(service) {
            Some(e) => e.methods.get(method).or(e.whole.as_ref()),
            None => self.default.as_ref(),
        }
    }

    /// Whether the table has no policy.
    pub fn is_empty(&self) -> bool {
        self.services.is_empty() && self.default.is_none()
    }

    /// The table of `docs` (later documents win for the services they name), keeping
    /// the buckets of `old` whose parameters did not change.
    fn build(docs: &[&ServiceConfig], old: &PolicyTable) -> Self {
        let mut t = PolicyTable::default();
        for doc in docs {
            let mut named: Vec<&str> = doc
                .methods
                .iter()
                .map(|(n, _)| n.service.as_deref().unwrap_or(""))
                .collect();
            named.sort_unstable();
            named.dedup();
            // A document naming a service replaces what earlier ones said of it.
            for s in &named {
                if s.is_empty() {
                    t.default = None;
                } else {
                    t.services.remove(*s);
                }
            }
            for (name, method) in &doc.methods {
                let key = name.service.as_deref().unwrap_or("");
                let throttle = doc.throttling.map(|params| {
                    let kept = old
                        .throttles
                        .get(key)
                        .or_else(|| t.throttles.get(key))
                        .filter(|b| b.same(params));
                    let bucket = kept.map_or_else(|| Arc::new(Throttle::new(params)), Arc::clone);
                    t.throttles.insert(key.into(), Arc::clone(&bucket));
                    bucket
                });
                let policy = CallPolicy {
                    method: Arc::clone(method),
                    throttle,
                };
                match (&name.service, &name.method) {
                    (None, _) => t.default = Some(policy),
                    (Some(s), None) => {
                        t.services.entry(s.as_str().into()).or_default().whole = Some(policy)
                    }
                    (Some(s), Some(m)) => {
                        t.services
                            .entry(s.as_str().into())
                            .or_default()
                            .methods
                            .insert(m.as_str().into(), policy);
                    }
                }
            }
        }
        t
    }
}

/// Where the documents came from.
#[derive(Debug, Default)]
struct Sources {
    /// `--service-config` files, in the order given.
    files: Vec<(PathBuf, ServiceConfig)>,
    /// Documents under `--service-config-prefix`, by key.
    etcd: BTreeMap<String, ServiceConfig>,
}

/// The service configs in force, shared by every forwarder; files are swapped on reload
/// and etcd documents as they change.
#[derive(Debug, Default)]
pub struct LivePolicies {
    table: ArcSwap<PolicyTable>,
    /// Whether any policy is loaded: calls check this first.
    any: AtomicBool,
    sources: Mutex<Sources>,
}

impl LivePolicies {
    /// No config yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Self::default())
    }

    /// The policy of the call to `path` (`/pkg.Svc/Method`), if its method has one.
    #[inline]
    pub fn for_path(&self, path: &str) -> Option<CallPolicy> {
        if !self.any.load(Ordering::Relaxed) {
            return None;
        }
        self.lookup_path(path)
    }

    #[cold]
    fn lookup_path(&self, path: &str) -> Option<CallPolicy> {
        let (service, method) = path.strip_prefix('/')?.split_once('/')?;
        self.table.load().lookup(service, method).cloned()
    }

    /// Puts the files' documents in force (start-up and reload), in place of the files'
    /// earlier ones.
    pub fn set_files(&self, files: Vec<(PathBuf, ServiceConfig)>) {
        let mut s = self.sources.lock();
        s.files = files;
        self.rebuild(&s);
    }

    /// Puts the document under etcd key `key` in force (`None`: the key is gone).
    pub fn set_etcd(&self, key: &str, doc: Option<ServiceConfig>) {
        let mut s = self.sources.lock();
        match doc {
            Some(d) => s.etcd.insert(key.to_owned(), d),
            None => s.etcd.remove(key),
        };
        self.rebuild(&s);
    }

    /// The document now in force from etcd key `key`, if any.
    pub fn etcd_doc(&self, key: &str) -> Option<ServiceConfig> {
        self.sources.lock().etcd.get(key).cloned()
    }

    /// Replaces every etcd document (after a fresh listing).
    pub fn reset_etcd(&self, docs: BTreeMap<String, ServiceConfig>) {
        let mut s = self.sources.lock();
        s.etcd = docs;
        self.rebuild(&s);
    }

    /// Files win over etcd for the services they name: a host can override the fleet.
    fn rebuild(&self, s: &Sources) {
        let docs: Vec<&ServiceConfig> = s
            .etcd
            .values()
            .chain(s.files.iter().map(|(_, d)| d))
            .collect();
        let table = PolicyTable::build(&docs, &self.table.load());
        self.any.store(!table.is_empty(), Ordering::Relaxed);
        self.table.store(Arc::new(table));
    }
}

#[cfg(test)]
mod tests {
    use super::super::json::parse;
    use super::*;

    fn doc(text: &str) -> ServiceConfig {
        parse(text).unwrap()
    }

    #[test]
    fn methods_then_services_then_the_default() {
        let live = LivePolicies::new();
        assert!(live.for_path("/pkg.Svc/Get").is_none());
        live.set_files(vec![(
            "a.json".into(),
            doc(r#"{"methodConfig": [
                {"name": [{"service": "pkg.Svc", "method": "Get"}], "timeout": "1s"},
                {"name": [{"service": "pkg.Svc"}], "timeout": "2s"},
                {"name": [{}], "timeout": "3s"}]}"#),
        )]);
        let t = |p: &str| {
            live.for_path(p)
                .and_then(|c| c.method.timeout)
                .map(|d| d.as_secs())
        };
        assert_eq!(t("/pkg.Svc/Get"), Some(1));
        assert_eq!(t("/pkg.Svc/Put"), Some(2));
        assert_eq!(t("/pkg.Other/Put"), Some(3));
        assert_eq!(t("nonsense"), None);
    }

    #[test]
    fn files_override_etcd_for_the_services_they_name_and_buckets_survive_rebuilds() {
        let live = LivePolicies::new();
        live.set_etcd(
            "cfg/pkg.Svc",
            Some(doc(
                r#"{"methodConfig": [{"name": [{"service": "pkg.Svc"}], "timeout": "5s"},
                         {"name": [{"service": "pkg.B"}], "timeout": "6s"}],
                         "retryThrottling": {"maxTokens": 10, "tokenRatio": 0.1}}"#,
            )),
        );
        let bucket = live.for_path("/pkg.Svc/X").unwrap().throttle.unwrap();
        live.set_files(vec![(
            "a.json".into(),
            doc(r#"{"methodConfig": [{"name": [{"service": "pkg.Svc", "method": "Y"}], "timeout": "1s"}]}"#),
        )]);
        let t = |p: &str| {
            live.for_path(p)
                .and_then(|c| c.method.timeout)
                .map(|d| d.as_secs())
        };
        assert_eq!(t("/pkg.Svc/Y"), Some(1));
        assert_eq!(
            t("/pkg.Svc/X"),
            None,
            "the file's service config replaces etcd's"
        );
        assert_eq!(t("/pkg.B/X"), Some(6));
        live.set_files(Vec::new());
        let again = live.for_path("/pkg.Svc/X").unwrap().throttle.unwrap();
        assert!(
            Arc::ptr_eq(&bucket, &again),
            "same parameters keep their bucket"
        );
        live.set_etcd("cfg/pkg.Svc", None);
        assert!(live.for_path("/pkg.B/X").is_none());
    }
}
