//! Other registries' layouts against a real etcd: values byte for byte as go-zero, Kratos,
//! Kitex, go-micro and etcd's naming package write them (tests/it/fixtures/registries.toml,
//! each citing the framework's source) served through the proxy; several prefixes at
//! once; routes from gRPC service names to registered names; the register sidecar's
//! keys and values in each format, read back by our codecs and shaped as the framework's
//! own decoder expects; bad values skipped while the rest of their service serves.
use crate::common::*;

use std::collections::BTreeSet;
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;
use switchyard::registration::list::list;
use switchyard::registration::sidecar::{run_until, RegisterArgs};
use switchyard::registry::{decode, ValueFormat};

/// The Echo service's gRPC name, as in calls' paths.
const ECHO: &str = "switchyard.echo.v1.Echo";

#[derive(Debug, Deserialize)]
struct Fixtures {
    fixture: Vec<Fixture>,
}

/// One value as a framework writes it (see the fixtures file for the fields).
#[derive(Debug, Clone, Deserialize)]
#[allow(dead_code)]
struct Fixture {
    name: String,
    source: String,
    service: String,
    key: String,
    value: String,
    format: String,
    served: Vec<String>,
    #[serde(default = "one")]
    weight: u32,
    #[serde(default)]
    tls: bool,
    #[serde(default)]
    skipped: usize,
}

fn one() -> u32 {
    1
}

fn fixtures() -> Vec<Fixture> {
    let all: Fixtures = toml::from_str(include_str!("fixtures/registries.toml")).unwrap();
    assert!(all.fixture.len() >= 8);
    all.fixture
}

impl Fixture {
    /// The key and value with `{addr}` filled in.
    fn at(&self, addr: &str) -> (String, String) {
        (
            self.key.replace("{addr}", addr),
            self.value.replace("{addr}", addr),
        )
    }
}

/// Every prefix the fixtures are under, as each framework's default.
fn framework_prefixes() -> Vec<String> {
    [
        "services",
        "",
        "/microservices",
        "kitex/registry-etcd",
        "/micro/registry",
    ]
    .map(String::from)
    .to_vec()
}

#[test]
fn fixtures_decode_as_each_framework_wrote_them() {
    let addr = "10.0.0.5:9000";
    for f in fixtures() {
        let (key, value) = f.at(addr);
        let d =
            decode(key.as_bytes(), value.as_bytes()).unwrap_or_else(|e| panic!("{}: {e}", f.name));
        assert_eq!(d.format.name(), f.format, "{}", f.name);
        let served: Vec<String> = d.endpoints.iter().map(|e| e.addr.to_string()).collect();
        let want: Vec<String> = f.served.iter().map(|s| s.replace("{addr}", addr)).collect();
        assert_eq!(served, want, "{}", f.name);
        for e in &d.endpoints {
            assert_eq!((e.weight, e.tls), (f.weight, f.tls), "{}", f.name);
        }
        assert_eq!(d.skipped.len(), f.skipped, "{}: {:?}", f.name, d.skipped);
        // The key's service segment is the registered name, whatever the layout.
        assert!(
            key.contains(&format!("{}/", f.service)),
            "{}: {key}",
            f.name
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_reach_backends_registered_in_each_layout() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let fixtures = fixtures();
    let mut backends = Vec::new();
    for f in &fixtures {
        let b = EchoBackend::start(&f.name).await.unwrap();
        let (key, value) = f.at(&b.addr().to_string());
        put(etcd.endpoint(), &key, &value).await;
        backends.push(b);
    }
    // An unrelated key at the root, which the empty prefix must not mistake for a service.
    put(etcd.endpoint(), "config/app.yaml", "debug: true").await;
    let services: Vec<&str> = fixtures.iter().map(|f| f.service.as_str()).collect();
    let proxy = Proxy::start_with(&[etcd.endpoint().to_owned()], &services, |a| {
        a.etcd.prefix = framework_prefixes();
    })
    .await;
    for (f, listener) in fixtures.iter().zip(&proxy.bound) {
        let mut c = client(*listener).await;
        let served = !f.served.is_empty() && !f.tls;
        for _ in 0..3 {
            match served_by(&mut c).await {
                Ok(name) if served => assert_eq!(name, f.name),
                Ok(name) => panic!("{}: served by {name}, expected not served", f.name),
                // Not served: a mucp node, or grpcs:// with TLS to backends off.
                Err(status) => assert!(!served, "{}: {status}", f.name),
            }
        }
    }

    // `switchyard endpoints` lists every key under the prefixes, with its format.
    let mut etcd_client = etcd_client::Client::connect([etcd.endpoint()], None)
        .await
        .unwrap();
    let listed = list(
        &mut etcd_client,
        &framework_prefixes(),
        None,
        Duration::from_secs(5),
    )
    .await
    .unwrap();
    for (f, b) in fixtures.iter().zip(&backends) {
        let (key, _) = f.at(&b.addr().to_string());
        let entry = listed
            .iter()
            .find(|e| e.key == key)
            .unwrap_or_else(|| panic!("{key} not listed: {listed:?}"));
        assert_eq!(entry.format.map(ValueFormat::name), Some(f.format.as_str()));
        assert_eq!(entry.service, f.service);
        assert_eq!(entry.error.is_some(), f.served.is_empty(), "{entry:?}");
    }
    assert!(
        !listed.iter().any(|e| e.key.starts_with("config/")),
        "{listed:?}"
    );
    assert_eq!(listed.len(), fixtures.len(), "{listed:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_is_served_from_several_prefixes_at_once() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let seed = EchoBackend::start("seed").await.unwrap();
    let zero = EchoBackend::start("go-zero").await.unwrap();
    let kratos = EchoBackend::start("kratos").await.unwrap();
    put(
        e,
        &format!("services/{ECHO}/{}", seed.addr()),
        &seed.addr().to_string(),
    )
    .await;
    put(
        e,
        &format!("{ECHO}/7587869470812345"),
        &zero.addr().to_string(),
    )
    .await;
    let kratos_key = format!("/microservices/{ECHO}/4c0e5fd0-81f5-11ee-b962-0242ac120002");
    put(
        e,
        &kratos_key,
        &format!(
            r#"{{"id":"4c0e5fd0-81f5-11ee-b962-0242ac120002","name":"{ECHO}","version":"","metadata":null,"endpoints":["grpc://{}"]}}"#,
            kratos.addr()
        ),
    )
    .await;
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["services".into(), "".into(), "/microservices".into()];
    })
    .await;
    let c = client(proxy.addr).await;
    let seen = |want: &'static [&'static str]| {
        let c = c.clone();
        move || {
            let mut c = c.clone();
            async move {
                let mut names = BTreeSet::new();
                for _ in 0..12 {
                    match served_by(&mut c).await {
                        Ok(n) => names.insert(n),
                        Err(_) => return false,
                    };
                }
                names == want.iter().map(|s| s.to_string()).collect()
            }
        }
    };
    eventually(
        Duration::from_secs(10),
        "all three prefixes serve",
        seen(&["go-zero", "kratos", "seed"]),
    )
    .await;
    // Each prefix is kept up to date by its own watch.
    delete(e, &kratos_key).await;
    eventually(
        Duration::from_secs(10),
        "the Kratos instance leaves",
        seen(&["go-zero", "seed"]),
    )
    .await;
    let kitexless = EchoBackend::start("go-zero-2").await.unwrap();
    put(
        e,
        &format!("{ECHO}/7587869470812346"),
        &kitexless.addr().to_string(),
    )
    .await;
    eventually(
        Duration::from_secs(10),
        "a second go-zero node joins",
        seen(&["go-zero", "go-zero-2", "seed"]),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_send_grpc_services_to_their_registered_names() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let b = EchoBackend::start("helloworld").await.unwrap();
    put(
        e,
        "/microservices/helloworld/0b0e",
        &format!(
            r#"{{"id":"0b0e","name":"helloworld","version":"v1","metadata":null,"endpoints":["http://127.0.0.1:1","grpc://{}"]}}"#,
            b.addr()
        ),
    )
    .await;
    // Without a route, the gRPC name finds no instance.
    let unrouted = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/microservices".into()];
    })
    .await;
    let mut c = client(unrouted.addr).await;
    assert!(served_by(&mut c).await.is_err());
    let routed = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/microservices".into()];
        a.route = vec![format!("{ECHO}=helloworld").parse().unwrap()];
    })
    .await;
    let mut c = client(routed.addr).await;
    for _ in 0..5 {
        assert_eq!(served_by(&mut c).await.unwrap(), "helloworld");
    }
}

/// Parses `switchyard register` flags as the binary would.
#[derive(Parser)]
struct RegisterCli {
    #[command(flatten)]
    args: RegisterArgs,
}

/// The (key, value, lease) of the one key under `prefix`, once there is one (within
/// 10 s); the keys under `prefix` are deleted after.
async fn only_key(etcd: &str, prefix: &str) -> (String, String, i64) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let resp = c
            .get(prefix, Some(etcd_client::GetOptions::new().with_prefix()))
            .await
            .unwrap();
        if let [kv] = resp.kvs() {
            return (
                String::from_utf8_lossy(kv.key()).into_owned(),
                String::from_utf8_lossy(kv.value()).into_owned(),
                kv.lease(),
            );
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no single key under {prefix:?}: {:?}",
            resp.kvs()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_writes_each_framework_s_key_and_value() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let b = EchoBackend::start("sidecar").await.unwrap();
    let addr = b.addr().to_string();

    // Registers with `flags`, returns the one key under `prefix`, and deregisters.
    let register = |flags: Vec<String>, prefix: &'static str| {
        let addr = addr.clone();
        async move {
            let mut argv: Vec<String> = ["register", "--etcd-endpoints", e, "--addr", &addr]
                .map(String::from)
                .to_vec();
            argv.extend(flags);
            let args = RegisterCli::try_parse_from(argv).unwrap().args;
            args.validate().unwrap();
            let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
            let sidecar = tokio::spawn(run_until(args, async move {
                let _ = stopped.await;
            }));
            let found = only_key(e, prefix).await;
            let _ = stop.send(());
            sidecar.await.unwrap().unwrap();
            // Deregistered: the key is gone.
            let mut c = etcd_client::Client::connect([e], None).await.unwrap();
            assert!(c
                .get(found.0.as_str(), None)
                .await
                .unwrap()
                .kvs()
                .is_empty());
            found
        }
    };
    let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // go-zero: `<service>/<lease id>` at the root, the bare address.
    let (key, value, lease) = register(
        flags(&["--service", "user.rpc", "--format", "go-zero"]),
        "user.rpc/",
    )
    .await;
    assert_eq!(key, format!("user.rpc/{lease}"));
    assert_eq!(value, addr);

    // Kratos: `/microservices/<name>/<uuid>`, a ServiceInstance with the UUID as its id
    // and string metadata (Kratos's `map[string]string`), the weight as a string.
    let (key, value, _) = register(
        flags(&[
            "--service",
            "helloworld",
            "--format",
            "kratos",
            "--service-version",
            "v2",
            "--weight",
            "5",
            "--metadata",
            "zone=a",
        ]),
        "/microservices/helloworld/",
    )
    .await;
    let id = key.strip_prefix("/microservices/helloworld/").unwrap();
    assert!(uuid_like(id), "{id}");
    assert_eq!(
        value,
        format!(
            r#"{{"id":"{id}","name":"helloworld","version":"v2","metadata":{{"weight":"5","zone":"a"}},"endpoints":["grpc://{addr}"]}}"#
        )
    );

    // Kitex: `kitex/registry-etcd/<service>/<addr>`, instanceInfo with Kitex's weight.
    let (key, value, _) = register(
        flags(&["--service", "echo", "--format", "kitex"]),
        "kitex/registry-etcd/",
    )
    .await;
    assert_eq!(key, format!("kitex/registry-etcd/echo/{addr}"));
    assert_eq!(
        value,
        format!(r#"{{"network":"tcp","address":"{addr}","weight":10,"tags":null}}"#)
    );

    // go-micro: `/micro/registry/<service>/<service>-<uuid>`, one gRPC node.
    let (key, value, _) = register(
        flags(&["--service", "greeter", "--format", "go-micro"]),
        "/micro/registry/",
    )
    .await;
    let id = key.strip_prefix("/micro/registry/greeter/").unwrap();
    assert!(id.strip_prefix("greeter-").is_some_and(uuid_like), "{id}");
    assert_eq!(
        value,
        format!(
            r#"{{"name":"greeter","version":"latest","metadata":null,"endpoints":[],"nodes":[{{"id":"{id}","address":"{addr}","metadata":{{"protocol":"grpc","registry":"etcd","server":"grpc","transport":"grpc"}}}}]}}"#
        )
    );

    // A prefix given is kept as written, leading slash included.
    let (key, _, _) = register(
        flags(&[
            "--service",
            "echo",
            "--format",
            "kitex",
            "--prefix",
            "/fleet",
        ]),
        "/fleet/",
    )
    .await;
    assert_eq!(key, format!("/fleet/echo/{addr}"));
}

/// Whether `s` reads as a UUID (8-4-4-4-12 hex digits).
fn uuid_like(s: &str) -> bool {
    let parts: Vec<&str> = s.split('-').collect();
    parts.iter().map(|p| p.len()).eq([8, 4, 4, 4, 12])
        && s.chars().all(|c| c == '-' || c.is_ascii_hexdigit())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_in_each_format_the_backend_is_served_and_read_back() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let formats = [
        ValueFormat::Plain,
        ValueFormat::EtcdNaming,
        ValueFormat::GoZero,
        ValueFormat::Kratos,
        ValueFormat::Kitex,
        ValueFormat::GoMicro,
    ];
    let mut held = Vec::new();
    let mut names = BTreeSet::new();
    for f in formats {
        let b = EchoBackend::start(f.name()).await.unwrap();
        let client = switchyard::etcd::connect(&switchyard::settings::EtcdSettings::local(e))
            .await
            .unwrap();
        let spec = switchyard::registration::RegistrationSpec::new(ECHO, b.addr()).format(f);
        let reg = switchyard::registration::Registration::start(client, spec)
            .await
            .unwrap();
        // Read back by our own codecs: the format it was written in, the address.
        let mut c = etcd_client::Client::connect([e], None).await.unwrap();
        let resp = c.get(reg.key(), None).await.unwrap();
        let kv = &resp.kvs()[0];
        let d = decode(kv.key(), kv.value()).unwrap();
        assert_eq!(d.format, f, "{}", reg.key());
        assert_eq!(d.endpoints[0].addr.to_string(), b.addr().to_string());
        names.insert(f.name().to_owned());
        held.push((b, reg));
    }
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = framework_prefixes();
    })
    .await;
    let c = client(proxy.addr).await;
    eventually(Duration::from_secs(10), "every format serves", || {
        let mut c = c.clone();
        let names = names.clone();
        async move {
            let mut seen = BTreeSet::new();
            for _ in 0..60 {
                if let Ok(n) = served_by(&mut c).await {
                    seen.insert(n);
                }
            }
            seen == names
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_values_are_skipped_while_the_rest_of_the_service_serves() {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let e = etcd.endpoint();
    let good = EchoBackend::start("good").await.unwrap();
    let other = EchoBackend::start("other").await.unwrap();
    let p = format!("/microservices/{ECHO}");
    put(
        e,
        &format!("{p}/good"),
        &format!(
            r#"{{"id":"good","name":"{ECHO}","version":"","metadata":null,"endpoints":["grpc://{}"]}}"#,
            good.addr()
        ),
    )
    .await;
    let bad = [
        // No known format.
        (format!("{p}/unknown"), r#"{"host":"127.0.0.1","port":1}"#.to_owned()),
        // Two formats at once.
        (
            format!("{p}/ambiguous"),
            format!(r#"{{"Addr":"{0}","address":"{0}"}}"#, other.addr()),
        ),
        // Another service's instance under this key.
        (
            format!("{p}/misplaced"),
            format!(
                r#"{{"id":"m","name":"other","version":"","metadata":null,"endpoints":["grpc://{}"]}}"#,
                other.addr()
            ),
        ),
        // Nothing gRPC to serve.
        (
            format!("{p}/http-only"),
            r#"{"id":"h","name":"x","version":"","metadata":null,"endpoints":["http://127.0.0.1:1"]}"#
                .replace("\"x\"", &format!("\"{ECHO}\"")),
        ),
        (format!("{p}/broken"), r#"{"id":"b","endpoints":["#.to_owned()),
    ];
    for (k, v) in &bad {
        put(e, k, v).await;
    }
    let proxy = Proxy::start_with(&[e.to_owned()], &[], |a| {
        a.etcd.prefix = vec!["/microservices".into()];
    })
    .await;
    let mut c = client(proxy.addr).await;
    for _ in 0..10 {
        assert_eq!(served_by(&mut c).await.unwrap(), "good");
    }
    // A bad value written while watched is skipped too; a good one still joins.
    put(e, &format!("{p}/late-bad"), "not json {").await;
    put(
        e,
        &format!("{p}/late-good"),
        &format!(
            r#"{{"id":"late-good","name":"{ECHO}","version":"","metadata":null,"endpoints":["grpc://{}"]}}"#,
            other.addr()
        ),
    )
    .await;
    eventually(Duration::from_secs(10), "both good instances serve", || {
        let mut c = c.clone();
        async move {
            let mut seen = BTreeSet::new();
            for _ in 0..10 {
                match served_by(&mut c).await {
                    Ok(n) => seen.insert(n),
                    Err(_) => return false,
                };
            }
            seen.len() == 2
        }
    })
    .await;
}
