//! The per-call path: check the request, choose its service, pick a backend
//! with the service's balancer, and send the stream there, retrying calls that never reached a backend.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::Either;
use h2::server::SendResponse;

use http::header::CONTENT_TYPE;
use http::request::Parts;
use http::{HeaderMap, Request, Response, StatusCode};

use super::attempt::{try_backend, Attempt, Sent};
use super::body::{H2Body, ResponseBody};
use super::error::ProxyError;
use super::local::{Answer, Local};
use super::relay::Relay;
use super::replay::ReplayBody;
use crate::discovery::{Discovery, Service};
use crate::observe::{CallObs, Observer};
use crate::route::{service_from_path, Routes};
use crate::status::http_error;
use http_body::Body as _;

pub use super::attempt::{set_authority, UNRESPONSIVE_AFTER};

/// A request that passed the checks, bound for `service`.
struct Call {
    service: Arc<Service>,
    parts: Box<Parts>,
    body: H2Body,
    timeout: Option<Duration>,
    /// The call's access-log record and span, when either is on.
    obs: Option<Box<CallObs>>,
}

/// An answer the proxy gives without a backend.
enum Own {
    /// A trailers-only gRPC error.
    Grpc(Response<()>),
    /// A plain HTTP error with a text body.
    Http(Response<Bytes>),
}

/// Most backends one call is offered to before the proxy gives up.
pub const MAX_ATTEMPTS: usize = 5;

/// Where a listener's calls go.
#[derive(Debug, Clone)]
pub enum Target {
    /// Every call goes to this service.
    Bound(Arc<Service>),
    /// The service is the gRPC service named in the call's path.
    ByPath,
}

/// Handles the calls of one listener.
#[derive(Debug)]
pub struct Forwarder {
    discovery: Arc<Discovery>,
    target: Target,
    discovery_timeout: Duration,
    /// Services the proxy answers itself (health, reflection).
    local: Option<Arc<Local>>,
    routes: Arc<Routes>,
    /// The access log and tracer, with this listener's address, when either is on.
    observe: Option<(Arc<Observer>, SocketAddr)>,
}

impl Forwarder {
    /// A forwarder for calls to `target`, found through `discovery`.
    pub fn new(discovery: Arc<Discovery>, target: Target, discovery_timeout: Duration) -> Self {
        Self {
            discovery,
            target,
            discovery_timeout,
            local: None,
            routes: Arc::default(),
            observe: None,
        }
    }

    /// The same forwarder, with its calls seen by `observer` (access log, traces) as
    /// calls of the listener at `listener`.
    pub fn with_observer(mut self, observer: Option<Arc<Observer>>, listener: SocketAddr) -> Self {
        self.observe = observer.map(|o| (o, listener));
        self
    }

    /// Answers health (and reflection) calls with `local` instead of forwarding them.
    pub fn with_local(mut self, local: Arc<Local>) -> Self {
        self.local = Some(local);
        self
    }

    /// The same forwarder, looking the services named in calls' paths up under their
    /// routes' names.
    pub fn with_routes(mut self, routes: Arc<Routes>) -> Self {
        self.routes = routes;
        self
    }

    /// Serves one stream of a client connection from its request to the end of its
    /// response; never fails: errors become responses.
    ///
    /// The checks and the routing run at once (a request that cannot be forwarded is
    /// answered here); the returned future keeps only what the call needs across its
    /// awaits, so that each open stream's state stays small.
    pub fn serve_stream(
        self: &Arc<Self>,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        peer: SocketAddr,
    ) -> Either<impl Future<Output = ()> + Send + 'static, Answer> {
        if let Some(local) = &self.local {
            if let Some(call) = local.claims(req.uri().path(), req.headers()) {
                return Either::Right(local.serve(call, req, respond));
            }
        }
        let mut obs = self
            .observe
            .as_ref()
            .map(|(o, listener)| o.start(req.headers(), req.uri(), peer, *listener));
        match self.route(req, &mut obs) {
            Ok(call) => Either::Left(Arc::clone(self).proxy(call, respond)),
            Err(own) => {
                send_own(&mut respond, own, obs);
                Either::Right(Answer::done())
            }
        }
    }

    /// Checks the request and chooses its service; a request that cannot be forwarded
    /// gets its answer at once.
    // The error is the answer itself, sent at once: no point boxing it.
    #[allow(clippy::result_large_err)]
    fn route(
        &self,
        req: Request<h2::RecvStream>,
        obs: &mut Option<Box<CallObs>>,
    ) -> Result<Call, Own> {
        if !is_grpc(req.headers()) {
            return Err(Own::Http(http_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "switchyard forwards gRPC only: content-type must be application/grpc\n",
            )));
        }
        let mut routed = false;
        let service = match &self.target {
            Target::Bound(s) => Arc::clone(s),
            Target::ByPath => {
                let found = service_from_path(req.uri().path())
                    .map_err(|error| ProxyError::BadPath {
                        error,
                        path: req.uri().path().to_owned(),
                    })
                    .and_then(|name| {
                        let registered = self.routes.resolve(name);
                        routed = obs.is_some() && registered != name;
                        Ok(self.discovery.service(registered)?)
                    });
                match found {
                    Ok(s) => s,
                    Err(e) => return Err(Own::Grpc(e.response())),
                }
            }
        };
        let timeout = grpc_timeout(req.headers());
        let (mut parts, body) = req.into_parts();
        if let Some(o) = obs.as_mut() {
            o.service(service.name(), routed);
            if let Some(tp) = o.traceparent() {
                parts
                    .headers
                    .insert(&crate::observe::trace::TRACEPARENT, tp);
            }
        }
        Ok(Call {
            service,
            parts: Box::new(parts),
            body: H2Body::new(body),
            timeout,
            obs: obs.take(),
        })
    }

    /// Forwards a routed call and relays the backend's response to the client.
    async fn proxy(self: Arc<Self>, call: Call, respond: SendResponse<Bytes>) {
        // Boxed: the header phase's state (request head, retry state, backend choice)
        // is freed once the response starts; a stream then holds only its relay for as
        // long as the response lasts.
        let mut started = Box::pin(self.start_response(call, respond)).await;
        // Relayed in place (moving it out would give the state a second copy).
        if let Some(relay) = started.as_mut() {
            poll_fn(|cx| relay.poll_relay(cx)).await;
        }
    }

    /// Forwards the call until the backend's response headers arrive and sends them to
    /// the client; returns the relay of the rest of the response, if any. A client that
    /// resets its stream meanwhile abandons the call (and the backend's stream).
    async fn start_response(
        &self,
        mut call: Call,
        mut respond: SendResponse<Bytes>,
    ) -> Option<Relay<ResponseBody>> {
        let service = Arc::clone(&call.service);
        let timer = service.metrics().start();
        let mut obs = call.obs.take();
        let result = {
            let mut answer = std::pin::pin!(self.call(call, &mut obs));
            poll_fn(|cx| {
                if let Poll::Ready(r) = answer.as_mut().poll(cx) {
                    return Poll::Ready(Some(r));
                }
                match respond.poll_reset(cx) {
                    Poll::Ready(_) => Poll::Ready(None),
                    Poll::Pending => Poll::Pending,
                }
            })
            .await
        };
        let (resp, sent) = match result {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                timer.own(e.code() as u8);
                send_own(&mut respond, Own::Grpc(e.response()), obs);
                return None;
            }
            None => {
                tracing::debug!(service = %service.name(), "client reset the stream before the response");
                if let Some(mut o) = obs {
                    o.status(usize::from(crate::status::Code::Cancelled as u8));
                    o.finish();
                }
                return None;
            }
        };
        let (parts, inner) = resp.into_parts();
        let mut body = ResponseBody::new(inner, timer, sent, obs);
        body.headers(&parts.headers);
        // A trailers-only answer ends with its headers.
        let eos = body.is_end_stream();
        match respond.send_response(Response::from_parts(parts, ()), eos) {
            Ok(_) if eos => None,
            Ok(tx) => Some(Relay::new(body, tx)),
            Err(e) => {
                tracing::debug!(error = %e, "cannot send the response to the client");
                None
            }
        }
    }

    /// Forwards the call within its deadline; returns the backend's response, or the
    /// proxy's error.
    async fn call(&self, call: Call, obs: &mut Option<Box<CallObs>>) -> Forwarded {
        let Call {
            service,
            parts,
            body,
            timeout,
            obs: _,
        } = call;
        let forwarded = self.forward(&service, &parts, body, obs);
        match timeout {
            Some(timeout) => {
                // Boxed: only calls with a deadline pay for the timer.
                let deadline = Box::pin(tokio::time::sleep(timeout));
                tokio::select! {
                    biased;
                    r = forwarded => r,
                    _ = deadline => Err(ProxyError::DeadlineExceeded(service.name().clone())),
                }
            }
            None => forwarded.await,
        }
    }

    /// Offers the call to the service's backends, as its balancer picks them, until one
    /// takes it; returns that backend's response headers.
    async fn forward(
        &self,
        service: &Service,
        parts: &Parts,
        body: H2Body,
        obs: &mut Option<Box<CallObs>>,
    ) -> Forwarded {
        let name = service.name();
        if !service.is_loaded() && !Box::pin(service.wait_loaded(self.discovery_timeout)).await {
            return Err(ProxyError::NotLoaded(name.clone()));
        }
        let set = service.endpoints_full();
        if set.is_empty() {
            return Err(ProxyError::NoEndpoints(name.clone()));
        }
        let counter = obs.as_ref().and_then(|o| o.request_counter());
        let mut body = ReplayBody::counted(body, counter);
        let mut tried = [usize::MAX; MAX_ATTEMPTS];
        let mut last = None;
        for attempt in 0..set.len().min(MAX_ATTEMPTS) {
            let Some((idx, backend)) = service
                .balancer()
                .select_with(&set, |i| !tried.contains(&i))
            else {
                break;
            };
            tried[attempt] = idx;
            if let Some(o) = obs.as_mut() {
                o.attempt(backend.addr());
            }
            match try_backend(name, backend, parts, body).await? {
                Attempt::Answered(resp, sent) => return Ok((resp, sent)),
                Attempt::NotTaken { body: b, why } => {
                    body = b;
                    last = Some((backend.addr().clone(), why));
                }
                Attempt::Failed(error) => {
                    return Err(ProxyError::BackendFailed {
                        service: name.clone(),
                        backend: backend.addr().clone(),
                        error,
                    })
                }
            }
        }
        Err(ProxyError::Unreachable {
            service: name.clone(),
            count: set.len(),
            last,
        })
    }
}

/// Sends an answer of the proxy's own on the client's stream (and finishes its
/// access-log record and span).
fn send_own(respond: &mut SendResponse<Bytes>, own: Own, obs: Option<Box<CallObs>>) {
    if let Some(o) = obs {
        match &own {
            Own::Grpc(r) => o.own(r.status().as_u16(), r.headers()),
            Own::Http(r) => o.own(r.status().as_u16(), r.headers()),
        }
    }
    let sent = match own {
        Own::Grpc(resp) => respond.send_response(resp, true).map(drop),
        Own::Http(resp) => {
            let (parts, text) = resp.into_parts();
            respond
                .send_response(Response::from_parts(parts, ()), false)
                .and_then(|mut tx| tx.send_data(text, true))
        }
    };
    if let Err(e) = sent {
        tracing::debug!(error = %e, "cannot send the proxy's answer to the client");
    }
}

/// What forwarding gives: the backend's response and the call's accounting, or why the
/// proxy answers itself.
type Forwarded = Result<(Response<h2::RecvStream>, Sent), ProxyError>;

/// Whether the request's content-type is gRPC (`application/grpc`, `+proto`, `;...`).
#[inline]
pub fn is_grpc(headers: &HeaderMap) -> bool {
    let Some(ct) = headers.get(CONTENT_TYPE) else {
        return false;
    };
    let Some(rest) = ct.as_bytes().strip_prefix(b"application/grpc") else {
        return false;
    };
    matches!(rest.first(), None | Some(b'+') | Some(b';'))
}

/// The `grpc-timeout` header's name, built once (a `&str` name is parsed on every lookup).
static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// Parses `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`); `None` if absent or malformed.
#[inline]
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get(&GRPC_TIMEOUT)?.as_bytes();
    let (unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = digits
        .iter()
        .fold(0u64, |acc, d| acc * 10 + u64::from(d - b'0'));
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(name: &'static str, v: &'static str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_static(v));
        h
    }

    #[test]
    fn grpc_timeouts_parse() {
        assert_eq!(
            grpc_timeout(&headers("grpc-timeout", "100m")),
            Some(Duration::from_millis(100))
        );
        assert_eq!(
            grpc_timeout(&headers("grpc-timeout", "2S")),
            Some(Duration::from_secs(2))
        );
        assert_eq!(
            grpc_timeout(&headers("grpc-timeout", "1H")),
            Some(Duration::from_secs(3600))
        );
        for bad in ["", "m", "123456789m", "10x", "-1S", "1.5S"] {
            let mut h = HeaderMap::new();
            h.insert("grpc-timeout", HeaderValue::from_str(bad).unwrap());
            assert_eq!(grpc_timeout(&h), None, "{bad:?}");
        }
        assert_eq!(grpc_timeout(&HeaderMap::new()), None);
    }

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc(&headers("content-type", "application/grpc")));
        assert!(is_grpc(&headers("content-type", "application/grpc+proto")));
        assert!(!is_grpc(&headers("content-type", "application/grpc-web")));
        assert!(!is_grpc(&headers("content-type", "application/json")));
        assert!(!is_grpc(&HeaderMap::new()));
    }

    #[test]
    fn authority_is_set_and_path_kept() {
        let mut req = Request::get("/pkg.Svc/M").body(()).unwrap();
        set_authority(&mut req, &"127.0.0.1:9".parse().unwrap()).unwrap();
        assert_eq!(req.uri().to_string(), "http://127.0.0.1:9/pkg.Svc/M");
    }
}
#[cfg(test)]
mod state_size {
    use super::*;

    /// The size of what `f` returns, without calling it.
    fn returned_size<F, R>(_f: F) -> usize
    where
        F: Fn(&Arc<Forwarder>, Request<h2::RecvStream>, SendResponse<Bytes>, SocketAddr) -> R,
    {
        std::mem::size_of::<R>()
    }

    /// Every open stream holds its future for as long as the call lasts (10,000 open
    /// streams hold 10,000 of them): the header phase is boxed and freed when the
    /// response starts, so what stays is little more than the response relay.
    #[test]
    fn an_open_stream_holds_little_state() {
        let stream = returned_size(|f, req, respond, peer| f.serve_stream(req, respond, peer));
        let relay = std::mem::size_of::<Relay<ResponseBody>>();
        assert!(relay <= 160, "response relay: {relay} bytes");
        assert!(stream <= 320, "stream future: {stream} bytes");
    }
}
