//! Shared test harness: a real etcd, real echo backends, a real proxy on loopback.
#![allow(dead_code, unused_imports)]

use std::future::Future;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use switchyard::echo::echo_client::EchoClient;
use switchyard::echo::EchoRequest;
use switchyard::proxy::BoundListener;
use switchyard::settings::{EtcdSettings, ListenSpec, ProxySettings};
use tokio::net::TcpListener;
use tonic::transport::Channel;

pub use switchyard::demo::EchoBackend;
pub use switchyard::testkit::{EtcdCluster, EtcdProcess};

/// Logs to the test output when `RUST_LOG` is set.
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// Polls `check` every 20 ms until it returns true or `within` passes; panics with `what`.
pub async fn eventually<F, Fut>(within: Duration, what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + within;
    loop {
        if check().await {
            return;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A proxy served in-process on a free loopback port; stopped (drained) when dropped.
pub struct Proxy {
    pub addr: SocketAddr,
    /// Addresses of the listeners bound to services, in the order given.
    pub bound: Vec<SocketAddr>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    pub task: Option<tokio::task::JoinHandle<Result<(), switchyard::proxy::ProxyError>>>,
}

impl Proxy {
    /// A proxy with default settings against these etcd endpoints.
    pub async fn start(etcd: &[String]) -> Proxy {
        Self::start_with(etcd, &[], |_| {}).await
    }

    /// A proxy with an unbound listener, one bound listener per entry of `bound_services`,
    /// and settings adjusted by `tweak`.
    pub async fn start_with(
        etcd: &[String],
        bound_services: &[&str],
        tweak: impl FnOnce(&mut ProxySettings),
    ) -> Proxy {
        let mut etcd_args = EtcdSettings::local(etcd[0].clone());
        etcd_args.endpoints = etcd.to_vec();
        let mut listeners = vec![BoundListener {
            listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
            service: None,
        }];
        for s in bound_services {
            listeners.push(BoundListener {
                listener: TcpListener::bind("127.0.0.1:0").await.unwrap(),
                service: Some(s.parse().unwrap()),
            });
        }
        let addrs: Vec<SocketAddr> = listeners
            .iter()
            .map(|l| l.listener.local_addr().unwrap())
            .collect();
        let specs = addrs
            .iter()
            .map(|a| ListenSpec {
                addr: *a,
                service: None,
            })
            .collect();
        let mut args = ProxySettings::new(specs, etcd_args);
        tweak(&mut args);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(switchyard::proxy::serve(args, listeners, async move {
            let _ = stopped.await;
        }));
        Proxy {
            addr: addrs[0],
            bound: addrs[1..].to_vec(),
            stop: Some(stop),
            task: Some(task),
        }
    }

    /// The listener URL for tonic clients.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Stops the proxy and waits until it has drained.
    pub async fn shutdown(mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.task.take() {
            t.await.unwrap().unwrap();
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
    }
}

/// An Echo client over one HTTP/2 connection to `addr`.
pub async fn client(addr: SocketAddr) -> EchoClient<Channel> {
    let ch = Channel::from_shared(format!("http://{addr}"))
        .unwrap()
        .connect()
        .await
        .unwrap();
    EchoClient::new(ch)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20)
}

/// A unary request with `message`.
pub fn req(message: &str) -> EchoRequest {
    EchoRequest {
        message: message.to_owned(),
        ..Default::default()
    }
}

/// Registers `addr` under `services/<service>/<addr>` with a plain value and a lease of
/// `ttl` seconds kept alive by a background task (aborted when the returned handle drops).
pub struct TestRegistration {
    pub key: String,
    pub lease: i64,
    keepalive: tokio::task::JoinHandle<()>,
}

impl Drop for TestRegistration {
    fn drop(&mut self) {
        self.keepalive.abort();
    }
}

/// Puts `services/<service>/<addr>` = `addr` (plain) under a kept-alive lease of `ttl` s.
pub async fn register(etcd: &str, service: &str, addr: SocketAddr, ttl: i64) -> TestRegistration {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    let lease = c.lease_grant(ttl, None).await.unwrap().id();
    let key = format!("services/{service}/{addr}");
    c.put(
        key.as_str(),
        addr.to_string(),
        Some(etcd_client::PutOptions::new().with_lease(lease)),
    )
    .await
    .unwrap();
    let keepalive = tokio::spawn(async move {
        let Ok((mut keeper, mut stream)) = c.lease_keep_alive(lease).await else {
            return;
        };
        loop {
            if keeper.keep_alive().await.is_err() {
                return;
            }
            let _ = stream.message().await;
            tokio::time::sleep(Duration::from_millis((ttl as u64 * 1000) / 3)).await;
        }
    });
    TestRegistration {
        key,
        lease,
        keepalive,
    }
}

/// Puts a raw key/value (no lease).
pub async fn put(etcd: &str, key: &str, value: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.put(key, value, None).await.unwrap();
}

/// Deletes a key.
pub async fn delete(etcd: &str, key: &str) {
    let mut c = etcd_client::Client::connect([etcd], None).await.unwrap();
    c.delete(key, None).await.unwrap();
}

/// Calls Unary through `client` and returns the serving backend's name.
pub async fn served_by(client: &mut EchoClient<Channel>) -> Result<String, tonic::Status> {
    Ok(client.unary(req("hi")).await?.into_inner().server)
}

/// An answer of the admin listener.
#[derive(Debug)]
pub struct AdminReply {
    pub status: u16,
    pub content_type: String,
    pub body: String,
}

/// `GET path` on the admin listener at `addr` (HTTP/1.1); `None` if nothing answers.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Option<AdminReply> {
    use http_body_util::BodyExt;
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .ok()?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .ok()?;
    let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
        .await
        .ok()?
        .ok()?;
    let status = resp.status().as_u16();
    let content_type = resp
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(AdminReply {
        status,
        content_type,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

/// The value of the sample `name` whose labels include all of `labels`, in Prometheus
/// text exposition `text` (the first match).
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (n, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels.iter().all(|(k, v)| {
                label_text
                    .split(',')
                    .any(|kv| kv == format!("{k}=\"{v}\"").as_str())
            });
            if all {
                value.parse().ok()
            } else {
                None
            }
        })
}

/// A test certificate authority: PEM files written to a temp dir, made at test time.
pub struct TestPki {
    pub dir: tempfile::TempDir,
    ca: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestPki {
    /// A new CA; its certificate is written to `ca.pem`.
    pub fn new() -> TestPki {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "switchyard test CA");
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::DigitalSignature,
        ];
        let ca = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().unwrap())
            .unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        TestPki { dir, ca }
    }

    /// The CA certificate file.
    pub fn ca(&self) -> std::path::PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// The CA certificate, PEM.
    pub fn ca_pem(&self) -> String {
        self.ca.pem()
    }

    /// Issues a certificate for `names` (DNS names or IP addresses), usable by servers and
    /// clients; writes `<file>.pem` and `<file>-key.pem` and returns their paths.
    pub fn issue(&self, file: &str, names: &[&str]) -> (std::path::PathBuf, std::path::PathBuf) {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        params.distinguished_name.push(
            rcgen::DnType::CommonName,
            names.first().cloned().unwrap_or_default(),
        );
        params.use_authority_key_identifier_extension = true;
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::DigitalSignature,
            rcgen::KeyUsagePurpose::KeyEncipherment,
        ];
        params.extended_key_usages = vec![
            rcgen::ExtendedKeyUsagePurpose::ServerAuth,
            rcgen::ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.ca).unwrap();
        let cert_path = self.dir.path().join(format!("{file}.pem"));
        let key_path = self.dir.path().join(format!("{file}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        (cert_path, key_path)
    }
}

/// A `switchyard` process (the real binary), killed when dropped. Each line it writes
/// (stderr: the logs; stdout too when started with [`SwitchyardProcess::proxy`]) arrives
/// on `lines` and is kept in `output`.
pub struct SwitchyardProcess {
    child: Option<std::process::Child>,
    /// Lines as they come.
    pub lines: std::sync::mpsc::Receiver<String>,
    /// Every line written so far.
    pub output: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    /// The unbound listener of a proxy started with [`SwitchyardProcess::proxy`].
    listen: Option<SocketAddr>,
}

impl SwitchyardProcess {
    /// Runs `switchyard ARGS..` with a clean environment plus `env`; stdout is discarded.
    pub fn spawn(args: &[&str], env: &[(&str, &str)]) -> SwitchyardProcess {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.args(args)
            .env_clear()
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null());
        Self::launch(cmd, None)
    }

    /// Runs `switchyard proxy --listen ADDR --etcd-endpoints ETCD --admin-listen off
    /// EXTRA..` on a free loopback port, with the test's environment plus `RUST_LOG=log`
    /// and `NO_COLOR=1`, and waits until it accepts connections.
    pub async fn proxy(etcd: &[String], log: &str, extra: &[&str]) -> SwitchyardProcess {
        let addr = switchyard::testkit::free_addr().unwrap();
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_switchyard"));
        cmd.arg("proxy")
            .args(["--listen", &addr.to_string()])
            .args(["--etcd-endpoints", &etcd.join(",")])
            .args(["--admin-listen", "off"])
            .args(extra)
            .env("RUST_LOG", log)
            .env("NO_COLOR", "1")
            .stdout(std::process::Stdio::piped());
        let p = Self::launch(cmd, Some(addr));
        wait_listening(addr, Duration::from_secs(20)).await;
        p
    }

    /// Starts `cmd` (stdin closed, stderr piped) and collects its output lines.
    pub fn launch(mut cmd: std::process::Command, listen: Option<SocketAddr>) -> SwitchyardProcess {
        use std::io::{BufRead, Read};
        let mut child = cmd
            .stdin(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn switchyard");
        let output = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, lines) = std::sync::mpsc::channel();
        let pipes = [
            child
                .stdout
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|p| Box::new(p) as Box<dyn Read + Send>),
        ];
        for pipe in pipes.into_iter().flatten() {
            let (out, tx) = (std::sync::Arc::clone(&output), tx.clone());
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    out.lock().unwrap().push(line.clone());
                    let _ = tx.send(line);
                }
            });
        }
        SwitchyardProcess {
            child: Some(child),
            lines,
            output,
            listen,
        }
    }

    /// The listener of a proxy started with [`SwitchyardProcess::proxy`].
    pub fn addr(&self) -> SocketAddr {
        self.listen
            .expect("a listener address: start the process with SwitchyardProcess::proxy")
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// The next log line (waits up to 20 s).
    pub fn next_line(&self) -> String {
        self.lines
            .recv_timeout(Duration::from_secs(20))
            .expect("switchyard logs a line")
    }

    /// Reads log lines until one satisfies `want` (up to `within`); returns it.
    pub fn wait_line(&self, within: Duration, what: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) if want(&line) => return line,
                Ok(_) => {}
                Err(_) => panic!("no log line within {within:?}: {what}"),
            }
        }
    }

    /// Whether some output line so far contains all of `parts`.
    pub fn logged(&self, parts: &[&str]) -> bool {
        self.output
            .lock()
            .unwrap()
            .iter()
            .any(|l| parts.iter().all(|p| l.contains(p)))
    }

    /// Everything it wrote so far (for failure messages).
    pub fn log_text(&self) -> String {
        self.output.lock().unwrap().join("\n")
    }

    /// Waits up to `within` for the process to exit; returns its exit code.
    pub async fn wait_exit(&mut self, within: Duration) -> Option<i32> {
        let deadline = Instant::now() + within;
        loop {
            let child = self.child.as_mut().expect("running");
            if let Some(status) = child.try_wait().unwrap() {
                self.child = None;
                return status.code();
            }
            assert!(
                Instant::now() < deadline,
                "switchyard did not exit within {within:?}; output:\n{}",
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for SwitchyardProcess {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Waits until something accepts TCP connections on `addr`.
pub async fn wait_listening(addr: SocketAddr, within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "nothing listens on {addr} after {within:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// What a raw HTTP/2 call got back: status, headers, body bytes and trailers.
#[derive(Debug)]
pub struct RawResponse {
    pub status: http::StatusCode,
    pub headers: http::HeaderMap,
    pub body: bytes::Bytes,
    pub trailers: Option<http::HeaderMap>,
}

impl RawResponse {
    /// The `grpc-status`, from trailers or (trailers-only) headers.
    pub fn grpc_status(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-status"))
            .or_else(|| self.headers.get("grpc-status"))
            .map(|v| v.to_str().unwrap().to_owned())
    }

    /// The `grpc-message`, from trailers or headers.
    pub fn grpc_message(&self) -> Option<String> {
        self.trailers
            .as_ref()
            .and_then(|t| t.get("grpc-message"))
            .or_else(|| self.headers.get("grpc-message"))
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

/// Frames a protobuf message as one gRPC message (uncompressed).
pub fn grpc_frame(msg: &impl prost::Message) -> bytes::Bytes {
    let body = msg.encode_to_vec();
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(0);
    out.extend_from_slice(&(body.len() as u32).to_be_bytes());
    out.extend_from_slice(&body);
    out.into()
}

/// Sends one request over a fresh HTTP/2 (h2c) connection with hyper, no gRPC client
/// logic (no client-side deadline), and collects the whole response.
pub async fn raw_call(
    addr: SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
    body: bytes::Bytes,
) -> RawResponse {
    use http_body_util::BodyExt;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) =
        hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .handshake(hyper_util::rt::TokioIo::new(tcp))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut b = http::Request::post(format!("http://{addr}{path}"))
        .header("content-type", "application/grpc")
        .header("te", "trailers");
    for (k, v) in headers {
        b = b.header(*k, *v);
    }
    let resp = send
        .send_request(b.body(http_body_util::Full::new(body)).unwrap())
        .await
        .unwrap();
    let (parts, body) = resp.into_parts();
    let collected = body.collect().await.unwrap();
    let trailers = collected.trailers().cloned();
    RawResponse {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    }
}

/// etcd and `n` Echo backends named b0.. registered for the Echo service (plain values,
/// leases kept alive while the registrations live).
pub async fn echo_backends(n: usize) -> (EtcdProcess, Vec<EchoBackend>, Vec<TestRegistration>) {
    init_tracing();
    let etcd = EtcdProcess::start().await.unwrap();
    let mut bs = Vec::new();
    let mut regs = Vec::new();
    for i in 0..n {
        let b = EchoBackend::start(&format!("b{i}")).await.unwrap();
        regs.push(register(etcd.endpoint(), "switchyard.echo.v1.Echo", b.addr(), 10).await);
        bs.push(b);
    }
    (etcd, bs, regs)
}
