//! gRPC server reflection through the proxy (`grpc.reflection.v1` and `v1alpha`), on
//! listeners that route by path.
//!
//! - `list_services`: the services registered under the proxy's prefixes (one keys-only
//!   etcd range get per prefix; a name that routes lead to is listed as the gRPC services
//!   routed to it), plus `grpc.health.v1.Health`, which the proxy serves itself.
//! - A request about a symbol (`file_containing_symbol`, `file_containing_extension`,
//!   `all_extension_numbers_of_type`) goes to a backend of the service the symbol names:
//!   the longest dotted prefix of the symbol that is a registered service
//!   (`pkg.Svc.Method` → `pkg.Svc`); a symbol that names none (a message type) goes to the
//!   backend that answered this stream before, or, first thing on a stream, to a backend
//!   of a service in the symbol's package (`pkg.Request` → `pkg.Svc`).
//! - `file_by_filename` goes to the backend that answered this stream before (a client
//!   asks for a file after a symbol's answer named it as a dependency).
//! - `grpc.health.v1` symbols and its file are answered from tonic-health's descriptors.
//!
//! A backend is asked over its pooled connection, `v1` first and `v1alpha` if it does not
//! serve `v1` (the messages are the same on the wire); one that serves neither gets the
//! client an UNIMPLEMENTED error response naming the service and backend. Errors are
//! reflection error responses, so the stream stays usable for other services.

use std::collections::BTreeSet;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use etcd_client::GetOptions;
use futures_util::Stream;
use prost::Message;
use tonic::{Code, Request, Response, Status, Streaming};
use tonic_reflection::pb::{v1, v1alpha};
use v1::server_reflection_request::MessageRequest;
use v1::server_reflection_response::MessageResponse;

use super::LocalContext;
use crate::balance::Fit;
use crate::route::Routes;
use crate::upstream::{BackendChannel, Upstream};

/// Time allowed for a backend's answer to one reflection request.
pub const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

/// Time allowed for listing the registered services in etcd.
pub const ETCD_TIMEOUT: Duration = Duration::from_secs(5);

/// The health service, which the proxy serves itself.
const HEALTH_SERVICE: &str = "grpc.health.v1.Health";

/// The package of the health service's messages.
const HEALTH_PACKAGE: &str = "grpc.health.v1";

/// `grpc.reflection.v1.ServerReflection` through the proxy.
#[derive(Debug)]
pub struct ReflectionV1 {
    ctx: Arc<LocalContext>,
}

/// `grpc.reflection.v1alpha.ServerReflection` through the proxy (answered as `v1`).
#[derive(Debug)]
pub struct ReflectionV1Alpha {
    ctx: Arc<LocalContext>,
}

impl ReflectionV1 {
    /// Reflection over the services of `ctx`.
    pub fn new(ctx: Arc<LocalContext>) -> Self {
        Self { ctx }
    }
}

impl ReflectionV1Alpha {
    /// Reflection over the services of `ctx`.
    pub fn new(ctx: Arc<LocalContext>) -> Self {
        Self { ctx }
    }
}

/// The answers of one reflection stream.
type Answers<R> = Pin<Box<dyn Stream<Item = Result<R, Status>> + Send>>;

#[tonic::async_trait]
impl v1::server_reflection_server::ServerReflection for ReflectionV1 {
    type ServerReflectionInfoStream = Answers<v1::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(
            Arc::clone(&self.ctx),
            request.into_inner(),
        )))
    }
}

#[tonic::async_trait]
impl v1alpha::server_reflection_server::ServerReflection for ReflectionV1Alpha {
    type ServerReflectionInfoStream = Answers<v1alpha::ServerReflectionResponse>;

    async fn server_reflection_info(
        &self,
        request: Request<Streaming<v1alpha::ServerReflectionRequest>>,
    ) -> Result<Response<Self::ServerReflectionInfoStream>, Status> {
        Ok(Response::new(answers(
            Arc::clone(&self.ctx),
            request.into_inner(),
        )))
    }
}

/// Answers each request of a stream in turn, as `v1` (the other version's messages are
/// re-encoded both ways).
fn answers<Req, Resp>(ctx: Arc<LocalContext>, incoming: Streaming<Req>) -> Answers<Resp>
where
    Req: Message + Default + Send + 'static,
    Resp: Message + Default + Send + 'static,
{
    let session = Session { ctx, earlier: None };
    Box::pin(futures_util::stream::unfold(
        Some((incoming, session)),
        |state| async move {
            let (mut incoming, mut session) = state?;
            match incoming.message().await {
                Ok(Some(req)) => {
                    let answer = session.answer(same_message(&req)).await;
                    Some((Ok(same_message(&answer)), Some((incoming, session))))
                }
                Ok(None) => None,
                Err(status) => Some((Err(status), None)),
            }
        },
    ))
}

/// `v1` and `v1alpha` messages are the same on the wire: one becomes the other by
/// re-encoding.
fn same_message<A: Message, B: Message + Default>(a: &A) -> B {
    B::decode(a.encode_to_vec().as_slice()).unwrap_or_default()
}

/// One client's reflection stream.
struct Session {
    ctx: Arc<LocalContext>,
    /// The backend that answered this stream before.
    earlier: Option<Asked>,
}

/// A backend asked for reflection, and the service it was picked for.
#[derive(Clone)]
struct Asked {
    service: String,
    upstream: Arc<Upstream>,
    /// It serves only `v1alpha`.
    alpha: bool,
}

impl Session {
    async fn answer(&mut self, req: v1::ServerReflectionRequest) -> v1::ServerReflectionResponse {
        let symbol = match &req.message_request {
            Some(MessageRequest::ListServices(_)) => {
                let listed = self.list().await;
                return reply(req, listed);
            }
            Some(MessageRequest::FileByFilename(name)) => {
                if let Some(file) = health_file().filter(|f| f.name == *name) {
                    return reply(req, file.response());
                }
                return match self.earlier.clone() {
                    Some(backend) => self.ask(backend, req).await,
                    None => {
                        let msg = format!(
                            "switchyard: file '{name}': ask about a symbol first (a file \
                             request goes to the backend that answered this stream before)"
                        );
                        reply(req, error(Code::NotFound, msg))
                    }
                };
            }
            Some(MessageRequest::FileContainingSymbol(s)) => s.clone(),
            Some(MessageRequest::FileContainingExtension(e)) => e.containing_type.clone(),
            Some(MessageRequest::AllExtensionNumbersOfType(t)) => t.clone(),
            None => {
                let msg = "switchyard: empty reflection request".to_owned();
                return reply(req, error(Code::InvalidArgument, msg));
            }
        };
        let is_health = symbol
            .strip_prefix(HEALTH_PACKAGE)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with('.'));
        if is_health {
            if let (Some(file), Some(MessageRequest::FileContainingSymbol(_))) =
                (health_file(), &req.message_request)
            {
                return reply(req, file.response());
            }
        }
        let registered = match self.registered().await {
            Ok(r) => r,
            Err(msg) => return reply(req, error(Code::Unavailable, msg)),
        };
        let named = service_named_by(&symbol, &registered);
        let backend = match (named, &self.earlier) {
            (Some(service), Some(b)) if b.service == service && b.upstream.is_usable() => b.clone(),
            (None, Some(b)) => b.clone(),
            _ => match named.or_else(|| service_near(&symbol, &registered)) {
                Some(service) => match self.pick(service).await {
                    Ok(b) => b,
                    Err(msg) => return reply(req, error(Code::Unavailable, msg)),
                },
                None => {
                    let msg = format!(
                        "switchyard: symbol '{symbol}' names no service registered under \
                         {} (nor routed to one)",
                        self.ctx.routing.load().prefixes_text()
                    );
                    return reply(req, error(Code::NotFound, msg));
                }
            },
        };
        self.ask(backend, req).await
    }

    /// The registered services, plus the health service.
    async fn list(&self) -> MessageResponse {
        match self.registered().await {
            Ok(mut names) => {
                names.insert(HEALTH_SERVICE.to_owned());
                MessageResponse::ListServicesResponse(v1::ListServiceResponse {
                    service: names
                        .into_iter()
                        .map(|name| v1::ServiceResponse { name })
                        .collect(),
                })
            }
            Err(msg) => error(Code::Unavailable, msg),
        }
    }

    /// The services clients can call: those registered under the prefixes (one keys-only
    /// range get per prefix), each under the gRPC service names routed to it, if any.
    async fn registered(&self) -> Result<BTreeSet<String>, String> {
        let mut registered = BTreeSet::new();
        // Held across the listing: the routes the names are then mapped by are the same.
        let routing = self.ctx.routing.load_full();
        for root in &routing.prefixes {
            let mut etcd = self.ctx.etcd.clone();
            let listing = crate::etcd::timed(
                "list services",
                ETCD_TIMEOUT,
                etcd.get(
                    root.root(),
                    Some(GetOptions::new().with_prefix().with_keys_only()),
                ),
            )
            .await
            .map_err(|e| format!("switchyard: cannot list the registered services: {e}"))?;
            registered.extend(
                listing
                    .kvs()
                    .iter()
                    .filter_map(|kv| root.service_of(kv.key()))
                    .map(str::to_owned),
            );
        }
        Ok(callable(registered, &routing.routes))
    }

    /// A backend of `service`: one that is connected if there is one.
    async fn pick(&self, service: &str) -> Result<Asked, String> {
        let (found, wait) = {
            let routing = self.ctx.routing.load();
            let found = self.ctx.discovery.service(routing.routes.resolve(service));
            (found, routing.discovery_timeout)
        };
        let svc = found.map_err(|e| format!("switchyard: {e}"))?;
        if !svc.is_loaded() && !svc.wait_loaded(wait).await {
            return Err(format!(
                "switchyard: endpoints of service '{service}' not known yet (etcd unreachable?)"
            ));
        }
        let set = svc.endpoints_full();
        let backend = set
            .iter()
            .find(|b| b.fit() == Fit::Preferred)
            .or_else(|| set.iter().find(|b| b.fit() == Fit::Usable))
            .ok_or_else(|| format!("switchyard: no usable endpoint of service '{service}'"))?;
        Ok(Asked {
            service: service.to_owned(),
            upstream: Arc::clone(backend.upstream()),
            alpha: false,
        })
    }

    /// Passes `req` to `backend`; it answers this stream's later file requests.
    async fn ask(
        &mut self,
        mut backend: Asked,
        req: v1::ServerReflectionRequest,
    ) -> v1::ServerReflectionResponse {
        let addr = backend.upstream.addr().clone();
        let service = backend.service.clone();
        if let Err(e) = backend.upstream.connection().await {
            let msg = format!("switchyard: backend {addr} of service '{service}': {e}");
            return reply(req, error(Code::Unavailable, msg));
        }
        // Over the pooled connections, as forwarded calls go.
        let channel = BackendChannel::new(Arc::clone(&backend.upstream));
        let mut answer = Err(Status::unimplemented(""));
        if !backend.alpha {
            answer = ask_backend(channel.clone(), METHOD_V1, req.clone()).await;
        }
        if answer
            .as_ref()
            .is_err_and(|s| s.code() == Code::Unimplemented)
        {
            answer = ask_backend(channel, METHOD_V1ALPHA, req.clone()).await;
            backend.alpha = true;
        }
        match answer {
            Ok(answer) => {
                self.earlier = Some(backend);
                answer
            }
            Err(status) if status.code() == Code::Unimplemented => {
                let msg = format!(
                    "switchyard: backend {addr} of service '{service}' does not serve gRPC \
                     reflection (grpc.reflection.v1 or v1alpha)"
                );
                reply(req, error(Code::Unimplemented, msg))
            }
            Err(status) => {
                let msg = format!(
                    "switchyard: backend {addr} of service '{service}' failed the reflection \
                     request: {}",
                    status.message()
                );
                reply(req, error(status.code(), msg))
            }
        }
    }
}

/// The reflection method of each version: the same messages under two package names, so
/// a backend that serves only `v1alpha` is asked with the same `v1` messages.
const METHOD_V1: &str = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo";
const METHOD_V1ALPHA: &str = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo";

/// Asks a backend one reflection request on `method`; returns its first answer.
async fn ask_backend(
    channel: BackendChannel,
    method: &'static str,
    req: v1::ServerReflectionRequest,
) -> Result<v1::ServerReflectionResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(channel);
    let ask = async move {
        grpc.ready()
            .await
            .map_err(|e| Status::unavailable(format!("connection not ready: {e}")))?;
        let codec = tonic_prost::ProstCodec::<
            v1::ServerReflectionRequest,
            v1::ServerReflectionResponse,
        >::default();
        let path = http::uri::PathAndQuery::from_static(method);
        let mut answers = grpc
            .streaming(Request::new(tokio_stream::once(req)), path, codec)
            .await?
            .into_inner();
        answers.message().await
    };
    first_answer(tokio::time::timeout(BACKEND_TIMEOUT, ask).await)
}

/// The backend's first answer, or why there is none.
fn first_answer<R>(
    got: Result<Result<Option<R>, Status>, tokio::time::error::Elapsed>,
) -> Result<R, Status> {
    match got {
        Ok(Ok(Some(r))) => Ok(r),
        Ok(Ok(None)) => Err(Status::unknown(
            "the backend ended the stream without an answer",
        )),
        Ok(Err(status)) => Err(status),
        Err(_) => Err(Status::deadline_exceeded(format!(
            "no answer within {BACKEND_TIMEOUT:?}"
        ))),
    }
}

/// The registered service a symbol names: its longest dotted prefix in `registered`.
fn service_named_by<'a>(symbol: &str, registered: &'a BTreeSet<String>) -> Option<&'a str> {
    let mut candidate = symbol;
    loop {
        if let Some(name) = registered.get(candidate) {
            return Some(name);
        }
        candidate = &candidate[..candidate.rfind('.')?];
    }
}

/// A registered service in the symbol's package, or the nearest enclosing one, for a
/// symbol that names none (a message type asked about first thing on a stream).
fn service_near<'a>(symbol: &str, registered: &'a BTreeSet<String>) -> Option<&'a str> {
    let mut package = symbol;
    loop {
        package = &package[..package.rfind('.')?];
        let inside = registered
            .range::<str, _>((
                std::ops::Bound::Excluded(package),
                std::ops::Bound::Unbounded,
            ))
            .take_while(|name| name.starts_with(package))
            .find(|name| name.as_bytes().get(package.len()) == Some(&b'.'));
        if let Some(name) = inside {
            return Some(name);
        }
    }
}

/// The names clients call: each registered name, or instead the gRPC service names that
/// routes send to it.
fn callable(registered: BTreeSet<String>, routes: &Routes) -> BTreeSet<String> {
    let routed: BTreeSet<(&str, &str)> = routes
        .iter()
        .map(|(grpc, to)| (to.as_str(), grpc.as_str()))
        .filter(|(to, _)| registered.contains(*to))
        .collect();
    let mut names: BTreeSet<String> = routed.iter().map(|(_, g)| (*g).to_owned()).collect();
    names.extend(
        registered
            .iter()
            .filter(|r| !routed.iter().any(|(to, _)| to == r))
            .cloned(),
    );
    names
}

/// The answer to `req`.
fn reply(
    req: v1::ServerReflectionRequest,
    message: MessageResponse,
) -> v1::ServerReflectionResponse {
    v1::ServerReflectionResponse {
        valid_host: req.host.clone(),
        original_request: Some(req),
        message_response: Some(message),
    }
}

/// An error response.
fn error(code: Code, message: String) -> MessageResponse {
    MessageResponse::ErrorResponse(v1::ErrorResponse {
        error_code: code as i32,
        error_message: message,
    })
}

/// The health service's `.proto` file, from tonic-health's descriptors.
struct HealthFile {
    name: String,
    encoded: Vec<u8>,
}

impl HealthFile {
    fn response(&self) -> MessageResponse {
        MessageResponse::FileDescriptorResponse(v1::FileDescriptorResponse {
            file_descriptor_proto: vec![self.encoded.clone()],
        })
    }
}

fn health_file() -> Option<&'static HealthFile> {
    static FILE: OnceLock<Option<HealthFile>> = OnceLock::new();
    FILE.get_or_init(|| {
        let set =
            prost_types::FileDescriptorSet::decode(tonic_health::pb::FILE_DESCRIPTOR_SET).ok()?;
        let file = set
            .file
            .into_iter()
            .find(|f| f.package() == HEALTH_PACKAGE)?;
        Some(HealthFile {
            name: file.name().to_owned(),
            encoded: file.encode_to_vec(),
        })
    })
    .as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_symbol_names_its_longest_registered_prefix() {
        let registered: BTreeSet<String> = ["pkg", "pkg.Svc", "other.Svc"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(service_named_by("pkg.Svc", &registered), Some("pkg.Svc"));
        assert_eq!(
            service_named_by("pkg.Svc.Method", &registered),
            Some("pkg.Svc")
        );
        assert_eq!(service_named_by("pkg.Request", &registered), Some("pkg"));
        assert_eq!(service_named_by("nope.Svc.M", &registered), None);
        assert_eq!(service_named_by("", &registered), None);
    }

    #[test]
    fn a_message_type_finds_a_service_of_its_package() {
        let registered: BTreeSet<String> = ["a.b.Svc", "a.bc.Other", "x.Y"]
            .into_iter()
            .map(String::from)
            .collect();
        assert_eq!(service_near("a.b.Request", &registered), Some("a.b.Svc"));
        assert_eq!(service_near("a.b.c.Deep", &registered), Some("a.b.Svc"));
        assert_eq!(service_near("a.Top", &registered), Some("a.b.Svc"));
        assert_eq!(service_near("a.bc.M", &registered), Some("a.bc.Other"));
        assert_eq!(service_near("z.M", &registered), None);
        assert_eq!(service_near("M", &registered), None);
    }

    #[test]
    fn routed_names_are_listed_as_their_grpc_services() {
        let routes = Routes::new(&[
            "helloworld.v1.Greeter=helloworld".parse().unwrap(),
            "helloworld.v1.Admin=helloworld".parse().unwrap(),
            "gone.v1.Svc=gone".parse().unwrap(),
        ])
        .unwrap();
        let registered = ["helloworld", "pkg.Svc"]
            .into_iter()
            .map(String::from)
            .collect();
        let names: Vec<String> = callable(registered, &routes).into_iter().collect();
        assert_eq!(
            names,
            ["helloworld.v1.Admin", "helloworld.v1.Greeter", "pkg.Svc"]
        );
    }

    #[test]
    fn the_health_file_is_known_and_v1alpha_reads_v1() {
        let file = health_file().expect("tonic-health ships its descriptors");
        assert!(file.name.ends_with("health.proto"), "{}", file.name);
        let req = v1::ServerReflectionRequest {
            host: "h".into(),
            message_request: Some(MessageRequest::FileContainingSymbol("a.B".into())),
        };
        let alpha: v1alpha::ServerReflectionRequest = same_message(&req);
        assert_eq!(alpha.host, "h");
        let back: v1::ServerReflectionRequest = same_message(&alpha);
        assert_eq!(back, req);
    }
}
