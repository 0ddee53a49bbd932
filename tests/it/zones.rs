//! Zone-aware balancing and traffic subsets against a real etcd and real Echo backends:
//! etcd-naming values with `Metadata.zone` and `Metadata.version`, Kratos values with
//! `metadata.zone` and their own `version`; calls stay in the proxy's zone and leave it
//! (without a failed call) when its endpoints stop; a 95/5 split, a header match, a
//! subset without endpoints (fallback, strict); bad rules refused at start.
use crate::common::*;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::time::Duration;

use switchyard::settings::{AdminListen, ConfigError};

const ECHO: &str = "switchyard.echo.v1.Echo";

/// Registers `backend` for Echo as etcd's naming package writes it, with `metadata`.
async fn put_naming(etcd: &str, backend: SocketAddr, metadata: &str) {
    put(
        etcd,
        &format!("services/{ECHO}/{backend}"),
        &format!(r#"{{"Op":0,"Addr":"{backend}","Metadata":{metadata}}}"#),
    )
    .await;
}

/// Registers `backend` for Echo as Kratos writes it, with `version` and `metadata`.
async fn put_kratos(etcd: &str, id: &str, backend: SocketAddr, version: &str, metadata: &str) {
    put(
        etcd,
        &format!("/microservices/{ECHO}/{id}"),
        &format!(
            r#"{{"id":"{id}","name":"{ECHO}","version":"{version}","metadata":{metadata},"endpoints":["grpc://{backend}"]}}"#
        ),
    )
    .await;
}

/// Which backends served `n` calls, by name, and how many calls failed.
async fn tally(proxy: SocketAddr, n: usize, canary: bool) -> (BTreeMap<String, usize>, usize) {
    let mut c = client(proxy).await;
    let mut served = BTreeMap::new();
    let mut failed = 0;
    for _ in 0..n {
        let mut r = tonic::Request::new(req("hi"));
        if canary {
            r.metadata_mut().insert("x-canary", "1".parse().unwrap());
        }
        match c.unary(r).await {
            Ok(resp) => *served.entry(resp.into_inner().server).or_insert(0) += 1,
            Err(_) => failed += 1,
        }
    }
    (served, failed)
}

fn names(served: &BTreeMap<String, usize>) -> BTreeSet<&str> {
    served.keys().map(String::as_str).collect()
}

/// Echo backends a0, a1 in zone a and b0, b1 in zone b (etcd-naming values).
async fn two_zones(etcd: &str) -> Vec<EchoBackend> {
    let mut backends = Vec::new();
    for name in ["a0", "a1", "b0", "b1"] {
        let b = EchoBackend::start(name).await.unwrap();
        let zone = &name[..1];
        put_naming(etcd, b.addr(), &format!(r#"{{"zone":"{zone}"}}"#)).await;
        backends.push(b);
    }
    backends
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_stay_in_the_zone_leave_it_when_its_endpoints_stop_and_come_back() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let mut backends = two_zones(e).await;
    let admin = switchyard::testkit::free_addr().unwrap();
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.balance.zone = Some("a".into());
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;

    let (served, failed) = tally(proxy.addr, 200, false).await;
    assert_eq!(failed, 0);
    assert_eq!(names(&served), BTreeSet::from(["a0", "a1"]), "{served:?}");
    assert_eq!(
        served["a0"], 100,
        "the zone's endpoints share its calls: {served:?}"
    );

    // The zone's backends stop (still registered): every call goes to zone b, none fails.
    let a_addrs: Vec<SocketAddr> = backends[..2].iter().map(EchoBackend::addr).collect();
    for b in backends.drain(..2) {
        b.shutdown().await;
    }
    let (served, failed) = tally(proxy.addr, 200, false).await;
    assert_eq!(
        failed, 0,
        "no call fails while the zone empties: {served:?}"
    );
    assert_eq!(names(&served), BTreeSet::from(["b0", "b1"]), "{served:?}");

    // Back on the same addresses: the calls come back to the zone.
    for (addr, name) in a_addrs.iter().zip(["a0", "a1"]) {
        backends.push(EchoBackend::start_on(*addr, name).await.unwrap());
    }
    eventually(Duration::from_secs(15), "calls back in zone a", || async {
        let (served, failed) = tally(proxy.addr, 20, false).await;
        failed == 0 && names(&served) == BTreeSet::from(["a0", "a1"])
    })
    .await;

    let metrics = admin_text(admin, "/metrics").await;
    let same = metric(
        &metrics,
        "switchyard_calls_by_locality_total",
        &[("service", ECHO), ("locality", "same_zone")],
    )
    .unwrap();
    let other = metric(
        &metrics,
        "switchyard_calls_by_locality_total",
        &[("service", ECHO), ("locality", "other_zone")],
    )
    .unwrap();
    assert!(
        same >= 220.0 && other >= 200.0,
        "same {same}, other {other}"
    );
    let endpoints: serde_json::Value =
        serde_json::from_str(&admin_text(admin, "/endpoints").await).unwrap();
    let svc = &endpoints[0];
    assert_eq!(svc["zone"], "a");
    let zones: BTreeSet<(String, bool)> = svc["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|ep| {
            assert_eq!(ep["metadata"]["zone"], ep["zone"]);
            (
                ep["zone"].as_str().unwrap().to_owned(),
                ep["in_zone"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        zones,
        BTreeSet::from([("a".into(), true), ("b".into(), false)])
    );
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_zone_every_zone_is_used() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let _backends = two_zones(e).await;
    let proxy = Proxy::start(&[e.to_owned()]).await;
    let (served, failed) = tally(proxy.addr, 40, false).await;
    assert_eq!(failed, 0);
    assert_eq!(
        served.values().copied().collect::<Vec<_>>(),
        [10; 4],
        "{served:?}"
    );
    proxy.shutdown().await;
}

const CANARY: &str = r#"
[[traffic]]
service = "switchyard.echo.v1.Echo"
[[traffic.match]]
header = "x-canary"
value = "1"
subset = { version = "v2" }
[[traffic.split]]
subset = { version = "v1" }
weight = 95
[[traffic.split]]
subset = { version = "v2" }
weight = 5
"#;

/// The settings of a config file's text (checked as at start).
fn settings_of(text: &str) -> switchyard::settings::ProxySettings {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("switchyard.toml");
    std::fs::write(&path, text).unwrap();
    switchyard::settings::check(&path).unwrap().proxy
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kratos_versions_split_95_5_and_the_header_match_goes_to_v2_in_the_zone() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let mut backends = Vec::new();
    // v1 in zones a and b, v2 in zones a and b: Kratos' own version field.
    for (i, (name, version, zone)) in [
        ("v1-a", "v1", "a"),
        ("v1-b", "v1", "b"),
        ("v2-a", "v2", "a"),
        ("v2-b", "v2", "b"),
    ]
    .into_iter()
    .enumerate()
    {
        let b = EchoBackend::start(name).await.unwrap();
        let id = format!("4c0e5fd0-81f5-11ee-b962-0242ac12000{i}");
        put_kratos(
            e,
            &id,
            b.addr(),
            version,
            &format!(r#"{{"zone":"{zone}"}}"#),
        )
        .await;
        backends.push(b);
    }
    let traffic = settings_of(CANARY).traffic;
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/microservices".into()];
        a.traffic = traffic;
    })
    .await;
    let (served, failed) = tally(proxy.addr, 2000, false).await;
    assert_eq!(failed, 0);
    let v2 = served.get("v2-a").unwrap_or(&0) + served.get("v2-b").unwrap_or(&0);
    assert!(
        (60..=140).contains(&v2),
        "5 % ± 2 % of 2,000 to v2: {served:?}"
    );
    assert_eq!(v2, 100, "the split is exact: {served:?}");
    let (served, failed) = tally(proxy.addr, 50, true).await;
    assert_eq!(failed, 0);
    assert_eq!(
        names(&served),
        BTreeSet::from(["v2-a", "v2-b"]),
        "{served:?}"
    );
    proxy.shutdown().await;

    // With a zone, each subset prefers its zone's endpoints.
    let traffic = settings_of(CANARY).traffic;
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/microservices".into()];
        a.traffic = traffic;
        a.balance.zone = Some("b".into());
    })
    .await;
    let (served, failed) = tally(proxy.addr, 200, false).await;
    assert_eq!(failed, 0);
    assert_eq!(served.get("v1-b"), Some(&190), "{served:?}");
    assert_eq!(served.get("v2-b"), Some(&10), "{served:?}");
    let (served, _) = tally(proxy.addr, 20, true).await;
    assert_eq!(names(&served), BTreeSet::from(["v2-b"]), "{served:?}");
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subset_without_endpoints_falls_back_or_fails_when_strict() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let mut backends = Vec::new();
    for name in ["v1-0", "v1-1"] {
        let b = EchoBackend::start(name).await.unwrap();
        put_naming(e, b.addr(), r#"{"version":"v1"}"#).await;
        backends.push(b);
    }
    let admin = switchyard::testkit::free_addr().unwrap();
    let traffic = settings_of(CANARY).traffic;
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.traffic = traffic;
        a.admin.listen = AdminListen(Some(admin));
    })
    .await;
    // The canary's calls find no v2: the whole service takes them.
    let (served, failed) = tally(proxy.addr, 20, true).await;
    assert_eq!(failed, 0);
    assert_eq!(
        names(&served),
        BTreeSet::from(["v1-0", "v1-1"]),
        "{served:?}"
    );
    let metrics = admin_text(admin, "/metrics").await;
    let fallback = metric(
        &metrics,
        "switchyard_calls_by_subset_total",
        &[
            ("service", ECHO),
            ("subset", "version=v2"),
            ("routed", "fallback"),
        ],
    );
    assert_eq!(fallback, Some(20.0));
    let endpoints: serde_json::Value =
        serde_json::from_str(&admin_text(admin, "/endpoints").await).unwrap();
    let rules = &endpoints[0]["traffic"];
    assert_eq!(rules["falling_back"], serde_json::json!(["version=v2"]));
    assert_eq!(rules["split"][0]["weight"], 95);
    assert_eq!(rules["match"][0]["header"], "x-canary");
    proxy.shutdown().await;

    let traffic = settings_of(&CANARY.replace(
        "service = \"switchyard.echo.v1.Echo\"",
        "service = \"switchyard.echo.v1.Echo\"\nstrict = true",
    ))
    .traffic;
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| a.traffic = traffic).await;
    let mut c = client(proxy.addr).await;
    let mut r = tonic::Request::new(req("hi"));
    r.metadata_mut().insert("x-canary", "1".parse().unwrap());
    let status = c.unary(r).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert!(
        status.message().contains("subset version=v2"),
        "{}",
        status.message()
    );
    // v1 still serves its share of the split.
    assert!(served_by(&mut c).await.unwrap().starts_with("v1-"));
    proxy.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_applies_a_new_zone_and_new_rules_and_refuses_a_bad_rule() {
    use crate::reload::{echo_entry, proxy, ConfigFile};
    use crate::restart::{assert_none_failed, signal, wait_logged, Calling};
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let mut backends = Vec::new();
    for (name, meta) in [
        ("a-v1", r#"{"zone":"a","version":"v1"}"#),
        ("b-v2", r#"{"zone":"b","version":"v2"}"#),
    ] {
        let b = EchoBackend::start(name).await.unwrap();
        put_naming(e, b.addr(), meta).await;
        backends.push(b);
    }
    let file = ConfigFile::new(&etcd);
    file.write("", "[balance]\nzone = \"a\"\n");
    let p = proxy(&file, Some("info")).await;
    wait_logged(&p, &["listening", "zone=a"]);
    let calling = Calling::start(file.listen);
    calling.more(20).await;
    let only = |want: &'static str| async move {
        let (served, failed) = tally(file.listen, 10, false).await;
        failed == 0 && names(&served) == BTreeSet::from([want])
    };
    assert!(only("a-v1").await);
    // Another zone, live.
    file.write("", "[balance]\nzone = \"b\"\n");
    signal(p.pid(), "-HUP");
    eventually(Duration::from_secs(5), "calls in zone b", || only("b-v2")).await;
    // Rules, live: the split sends everything to v1 (which is only in zone a).
    let v1 = "[[traffic]]\nservice = \"switchyard.echo.v1.Echo\"\n[[traffic.split]]\nsubset = { version = \"v1\" }\nweight = 1\n";
    file.write("", &format!("[balance]\nzone = \"b\"\n\n{v1}"));
    signal(p.pid(), "-HUP");
    eventually(Duration::from_secs(5), "calls in subset v1", || {
        only("a-v1")
    })
    .await;
    assert_eq!(
        echo_entry(file.admin).await["traffic"]["split"][0]["weight"],
        1
    );
    // A bad rule is refused, naming the file, the line and the key; the rules stay.
    file.write(
        "",
        &format!(
            "[balance]\nzone = \"b\"\n\n{}",
            v1.replace("weight = 1", "weight = 0")
        ),
    );
    signal(p.pid(), "-HUP");
    wait_logged(
        &p,
        &[
            "refused",
            "switchyard.toml:",
            "traffic[0].split",
            "weights sum to 0",
        ],
    );
    calling.more(20).await;
    assert!(only("a-v1").await);
    assert_none_failed(&calling.finish().await);
}

/// The error of loading `text` as a config file, and the file's path.
fn config_error(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("bad.toml");
    std::fs::write(&path, text).unwrap();
    match switchyard::settings::check(&path) {
        Err(ConfigError::Field(e)) => e.to_string(),
        other => panic!("not refused: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_rule_is_a_start_up_error_naming_file_line_and_key() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.toml");
    let f = file.display();
    let cases = [
        // A semantic error: the weights.
        (
            CANARY.replace("weight = 95", "weight = 0").replace("weight = 5", "weight = 0"),
            "traffic[0].split",
            8,
            "weights sum to 0",
        ),
        // A type error (serde's): located by the settings layer.
        (
            CANARY.replace("weight = 5", "weight = \"five\""),
            "traffic[0].split[1].weight",
            13,
            "invalid type",
        ),
        (
            CANARY.replace("header = \"x-canary\"", "header = \"x canary\""),
            "traffic[0].match[0].header",
            5,
            "not a header name",
        ),
        (
            CANARY.replace("subset = { version = \"v2\" }\n[[traffic.split]]", "subset = {}\n[[traffic.split]]"),
            "traffic[0].match[0].subset",
            7,
            "names no metadata pair",
        ),
        (
            format!("{CANARY}\n[[traffic]]\nservice = \"switchyard.echo.v1.Echo\"\n[[traffic.split]]\nsubset = {{ version = \"v1\" }}\nweight = 1\n"),
            "traffic[1].service",
            16,
            "has rules already",
        ),
    ];
    for (text, key, line, why) in cases {
        let err = config_error(dir.path(), &text);
        assert!(
            err.starts_with(&format!("{f}:{line}:")) && err.contains(key) && err.contains(why),
            "want {f}:{line}: {key}: {why}, got: {err}"
        );
    }
    // The proxy itself refuses to start on it, with the same message.
    let text = CANARY
        .replace("weight = 95", "weight = 0")
        .replace("weight = 5", "weight = 0");
    std::fs::write(&file, text).unwrap();
    let mut p = SwitchyardProcess::spawn(
        &[
            "proxy",
            "--config",
            file.to_str().unwrap(),
            "--admin-listen",
            "off",
        ],
        &[],
    );
    let code = p.wait_exit(Duration::from_secs(20)).await;
    assert!(code.is_some_and(|c| c != 0), "exit {code:?}");
    assert!(
        p.logged(&[&format!("{f}:8:"), "traffic[0].split", "weights sum to 0"]),
        "{}",
        p.log_text()
    );
}

/// The admin answer's body at `path`.
async fn admin_text(admin: SocketAddr, path: &str) -> String {
    admin_get(admin, path).await.expect("admin answers").body
}
