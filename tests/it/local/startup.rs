//! Two proxies on one host, and what a proxy says when its port is taken.

use std::time::Duration;

use crate::common::*;

const WAIT: Duration = Duration::from_secs(20);

/// `switchyard proxy` with these listeners, logging text at info.
fn proxy(etcd: &str, listen: &str, admin: &str) -> SwitchyardProcess {
    SwitchyardProcess::spawn(
        &[
            "proxy",
            "--listen",
            listen,
            "--admin-listen",
            admin,
            "--etcd-endpoints",
            etcd,
        ],
        &[("RUST_LOG", "info"), ("NO_COLOR", "1")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_proxies_on_one_host_with_their_own_admin_ports() {
    let etcd = EtcdProcess::start().await.unwrap();
    let b1 = EchoBackend::start("b1").await.unwrap();
    let _r = register(etcd.endpoint(), "switchyard.echo.v1.Echo", b1.addr(), 5).await;
    let free = || switchyard::testkit::free_addr().unwrap();
    let (listen1, admin1, listen2, admin2) = (free(), free(), free(), free());
    let p1 = proxy(etcd.endpoint(), &listen1.to_string(), &admin1.to_string());
    let p2 = proxy(etcd.endpoint(), &listen2.to_string(), &admin2.to_string());
    for (p, listen, admin) in [(&p1, listen1, admin1), (&p2, listen2, admin2)] {
        // One start-up line with what this proxy serves: addresses, not `Some(..)`.
        let line = p.wait_line(WAIT, "the start-up line", |l| l.contains("listening"));
        assert!(line.contains(&format!("listeners={listen}")), "{line}");
        assert!(line.contains(&format!("admin={admin}")), "{line}");
        assert!(line.contains("prefixes=services"), "{line}");
        assert!(!line.contains("Some("), "{line}");
        wait_listening(listen, WAIT).await;
        let c = client(listen).await;
        eventually(WAIT, "a call through each proxy", || {
            let mut c = c.clone();
            async move { served_by(&mut c).await.is_ok() }
        })
        .await;
        let healthz = admin_get(admin, "/healthz").await.expect("admin answers");
        assert_eq!(healthz.status, 200);
    }

    // An admin port another program holds: an error that names the flag to change. (A
    // second switchyard may share a port on purpose, for handover: SO_REUSEPORT.)
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken_addr = taken.local_addr().unwrap();
    let p3 = proxy(
        etcd.endpoint(),
        &free().to_string(),
        &taken_addr.to_string(),
    );
    fails_naming(p3, taken_addr, &["--admin-listen", "admin.listen"]).await;
    // The first two still serve.
    assert_eq!(admin_get(admin1, "/healthz").await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_listen_port_names_the_flag_and_key() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap();
    let p = proxy("http://127.0.0.1:9", &addr.to_string(), "off");
    fails_naming(p, addr, &["--listen", "[[listener]] addr"]).await;
}

/// The proxy exits 1 saying that `addr` is taken, naming `settings`, the OS error once.
async fn fails_naming(mut p: SwitchyardProcess, addr: std::net::SocketAddr, settings: &[&str]) {
    assert_eq!(p.wait_exit(WAIT).await, Some(1), "{}", p.log_text());
    let out = p.log_text();
    assert!(out.contains(&format!("cannot listen on {addr}")), "{out}");
    assert!(settings.iter().all(|s| out.contains(s)), "{out}");
    let os_error = out.matches("Address already in use").count();
    assert_eq!(os_error, 1, "the OS error once: {out}");
}
