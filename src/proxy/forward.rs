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

use http::request::Parts;
use http::{Request, Response, StatusCode};

use super::attempt::{try_backend, Attempt};
use super::body::{H2Body, ResponseBody};
use super::error::CallError;
use super::local::{Answer, Local};
use super::relay::Relay;
use super::replay::ReplayBody;
use super::resend::{Avoid, Resender, Sent, NO_AVOID};
use super::routing::LiveRouting;
use crate::balance::{Backend, EndpointSet, Steer};
use crate::call::{Arrival, BackendCall};
use crate::discovery::{Discovery, DiscoveryError, Service};
use crate::observe::{CallObs, Observer};
use crate::route::service_from_path;
use crate::status::http_error;
use http_body::Body as _;

pub use super::attempt::UNRESPONSIVE_AFTER;
use super::grpc::{grpc_timeout, is_grpc, timeout_value, GRPC_TIMEOUT};
use crate::service_config::{CallPolicy, LivePolicies};

/// A request that passed the checks, bound for `service`.
struct Call {
    service: Arc<Service>,
    parts: Box<Parts>,
    body: H2Body,
    timeout: Option<Duration>,
    /// Its method's service config, if it has one.
    policy: Option<CallPolicy>,
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
    /// Services the proxy answers itself (health, reflection).
    local: Option<Arc<Local>>,
    /// The routes and prefixes in force (a reload changes them under open connections).
    routing: Arc<LiveRouting>,
    /// The access log and tracer, with this listener's address, when either is on.
    observe: Option<(Arc<Observer>, SocketAddr)>,
    /// The service configs in force (timeouts, retries, hedging).
    policies: Arc<LivePolicies>,
}

impl Forwarder {
    /// A forwarder for calls to `target`, found through `discovery` as `routing` says.
    pub fn new(discovery: Arc<Discovery>, target: Target, routing: Arc<LiveRouting>) -> Self {
        Self {
            discovery,
            target,
            local: None,
            routing,
            observe: None,
            policies: LivePolicies::new(),
        }
    }

    /// The same forwarder, applying the service configs in `policies`.
    pub fn with_policies(mut self, policies: Arc<LivePolicies>) -> Self {
        self.policies = policies;
        self
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
        let mut obs = self
            .observe
            .as_ref()
            .map(|(o, listener)| o.start(req.headers(), req.uri(), peer, *listener));
        if let Some(local) = &self.local {
            if let Some(call) = local.claims(req.uri().path(), req.headers()) {
                return Either::Right(local.serve(call, req, respond, obs));
            }
        }
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
        let service = match &self.target {
            Target::Bound(s) => Arc::clone(s),
            Target::ByPath => match self.service_of(req.uri().path()) {
                Ok(s) => s,
                Err(e) => return Err(Own::Grpc(e.response())),
            },
        };
        let mut timeout = grpc_timeout(req.headers());
        let (mut parts, body) = req.into_parts();
        // The call's subset, chosen once for all its attempts (services with rules only).
        if let Some(steer) = service.balancer().steer(&parts.headers) {
            parts.extensions.insert(steer);
        }
        let policy = self.policies.for_path(parts.uri.path());
        if let Some(limit) = policy.as_ref().and_then(|p| p.method.timeout) {
            // The method's timeout bounds the client's deadline; the backend sees the
            // effective one.
            if timeout.is_none_or(|t| limit < t) {
                timeout = Some(limit);
                parts.headers.insert(&GRPC_TIMEOUT, timeout_value(limit));
            }
        }
        if let Some(o) = obs.as_mut() {
            // Routed: the service found is not the one the path names.
            let routed = matches!(self.target, Target::ByPath)
                && service_from_path(parts.uri.path()).is_ok_and(|n| n != service.name().as_str());
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
            policy,
            obs: obs.take(),
        })
    }

    /// The service a call's path names (through the routes in force).
    fn service_of(&self, path: &str) -> Result<Arc<Service>, CallError> {
        let name = service_from_path(path).map_err(|error| CallError::BadPath {
            error,
            path: path.to_owned(),
        })?;
        let routing = self.routing.load();
        match self.discovery.service(routing.routes.resolve(name)) {
            Ok(s) => Ok(s),
            // Looked up moments ago and nothing was registered.
            Err(DiscoveryError::NoEndpoints(name)) => Err(CallError::NotRegistered {
                service: name,
                prefixes: routing.prefixes_text(),
            }),
            Err(e) => Err(e.into()),
        }
    }

    /// Forwards a routed call and relays the backend's response to the client.
    async fn proxy(self: Arc<Self>, call: Call, respond: SendResponse<Bytes>) {
        // Boxed: the header phase's state (request head, retry state, backend choice)
        // is freed once the response starts; a stream then holds only its relay for as
        // long as the response lasts.
        //
        // Boxed in a statement of its own: a future made in the expression that awaits it
        // would keep a slot of its size in this future's state, box or no box.
        let started = Box::pin(self.start_response(call, respond));
        let mut started = started.await;
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
        let arrival = Arrival::new(service.metrics());
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
        let (resp, mut backend_call) = match result {
            Some(Ok(r)) => r,
            Some(Err(e)) => {
                arrival.answered_by_proxy(e.code());
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
        backend_call.carry(arrival);
        let mut body = ResponseBody::new(inner, backend_call, obs);
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
            policy,
            obs: _,
        } = call;
        let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
        let forwarded = self.forward(&service, &parts, body, obs, policy.as_ref(), deadline);
        match deadline {
            Some(deadline) => {
                // Boxed: only calls with a deadline pay for the timer.
                let expiry = Box::pin(tokio::time::sleep_until(deadline));
                tokio::select! {
                    biased;
                    r = forwarded => r,
                    _ = expiry => Err(CallError::DeadlineExceeded(service.name().clone())),
                }
            }
            None => forwarded.await,
        }
    }

    /// Offers the call to the service's backends, as its balancer picks them, until one
    /// takes it (and, under a retry or hedging policy, as that policy says); returns
    /// that backend's response headers.
    async fn forward(
        &self,
        service: &Service,
        parts: &Parts,
        body: H2Body,
        obs: &mut Option<Box<CallObs>>,
        policy: Option<&CallPolicy>,
        deadline: Option<tokio::time::Instant>,
    ) -> Forwarded {
        let name = service.name();
        if !service.is_loaded() {
            let wait = self.routing.load().discovery_timeout;
            let loaded = Box::pin(service.wait_loaded(wait));
            if !loaded.await {
                return Err(CallError::NotLoaded(name.clone()));
            }
        }
        if service.endpoints_full().is_empty() {
            return Err(self.no_endpoints(service));
        }
        let counter = obs.as_ref().and_then(|o| o.request_counter());
        let body = ReplayBody::counted(body, counter);
        if let Some(p) = policy {
            if let Some(resend) = &p.method.resend {
                let how = Resender {
                    forwarder: self,
                    service,
                    parts,
                    throttle: p.throttle.as_deref(),
                    deadline,
                };
                let resent = Box::pin(how.run(resend, body, obs));
                return resent.await;
            }
        }
        match self.send(service, parts, body, &NO_AVOID, obs).await? {
            Sent::Answered(resp, call, replay) => {
                if let Some(b) = replay {
                    b.commit();
                }
                Ok((resp, call))
            }
            Sent::Failed { backend, error, .. } => Err(CallError::BackendFailed {
                service: name.clone(),
                backend,
                error,
            }),
        }
    }

    /// Sends one attempt of the call: offers it to the service's backends (avoiding
    /// those in `avoid` while another is usable) until one takes it. A backend that does
    /// not take it (not connected, closed, refused the stream) never processed it, so the
    /// next one is tried; when all refused, the round starts again after a pause, for as
    /// long as the call's deadline (which bounds this future) allows.
    pub(super) async fn send(
        &self,
        service: &Service,
        parts: &Parts,
        mut body: ReplayBody,
        avoid: &Avoid,
        obs: &mut Option<Box<CallObs>>,
    ) -> Result<Sent, CallError> {
        let name = service.name();
        let set = service.endpoints_full();
        let mut last = None;
        let mut pauses = 0;
        loop {
            let mut tried = [usize::MAX; MAX_ATTEMPTS];
            let mut refused = false;
            for attempt in 0..set.len().min(MAX_ATTEMPTS) {
                let fresh = |i: usize| !tried.contains(&i);
                let picked = match (set.is_steered(), avoid.is_empty()) {
                    (true, _) => steered_pick(service, &set, parts, avoid, fresh)?,
                    (false, true) => service.balancer().select_with(&set, fresh),
                    (false, false) => service
                        .balancer()
                        .select_with(&set, |i| fresh(i) && !avoid.holds(set.get(i)))
                        .or_else(|| service.balancer().select_with(&set, fresh)),
                };
                let Some((idx, backend)) = picked else {
                    break;
                };
                tried[attempt] = idx;
                avoid.add(backend);
                if let Some(o) = obs.as_mut() {
                    o.attempt(backend.addr());
                }
                match try_backend(name, backend, parts, body).await? {
                    Attempt::Answered(resp, call, replay) => {
                        return Ok(Sent::Answered(resp, call, replay))
                    }
                    Attempt::NotTaken {
                        body: b,
                        why,
                        refused: r,
                    } => {
                        body = b;
                        refused |= r;
                        last = Some((backend.addr().clone(), why));
                    }
                    Attempt::Failed(error, replay) => {
                        return Ok(Sent::Failed {
                            backend: backend.addr().clone(),
                            error,
                            replay,
                        })
                    }
                }
            }
            if !refused || pauses >= MAX_REFUSAL_PAUSES {
                break;
            }
            pauses += 1;
            let pause = Box::pin(refusal_pause(pauses));
            pause.await;
        }
        Err(CallError::Unreachable {
            service: name.clone(),
            count: set.len(),
            last,
        })
    }

    /// Why a service without endpoints cannot be served: a name never served on a
    /// listener that routes by path is not a service (UNIMPLEMENTED, as for a path no route
    /// matches: retrying cannot help); a service that had endpoints, or that a listener is
    /// bound to, is only unavailable for now.
    #[cold]
    fn no_endpoints(&self, service: &Service) -> CallError {
        let name = service.name().clone();
        if matches!(self.target, Target::ByPath) && !service.ever_served() {
            CallError::NotRegistered {
                service: name,
                prefixes: self.routing.load().prefixes_text(),
            }
        } else {
            CallError::NoEndpoints(name)
        }
    }
}

/// [`Forwarder::send`]'s pick in a steered snapshot (a zone, traffic rules): in the
/// call's subset, avoiding `avoid` while another is usable.
#[inline(never)]
fn steered_pick<'s>(
    service: &Service,
    set: &'s EndpointSet,
    parts: &Parts,
    avoid: &Avoid,
    fresh: impl Fn(usize) -> bool,
) -> Result<Option<(usize, &'s Arc<Backend>)>, CallError> {
    let balancer = service.balancer();
    let steer = parts.extensions.get::<Steer>().copied();
    let picked = match avoid.is_empty() {
        true => balancer.select_steered(set, steer, &fresh),
        false => {
            match balancer.select_steered(set, steer, |i| fresh(i) && !avoid.holds(set.get(i))) {
                Ok(None) => balancer.select_steered(set, steer, &fresh),
                other => other,
            }
        }
    };
    picked.map_err(|e| CallError::SubsetUnavailable {
        service: service.name().clone(),
        subset: e.subset,
    })
}

/// Most pauses a call makes after every endpoint it was offered to refused it (about 5 s
/// in all; a call's deadline ends it sooner).
const MAX_REFUSAL_PAUSES: u32 = 30;

/// The pause after the `n`th round of refusals: random in [d/2, d), d doubling from
/// 5 ms to 200 ms, so that callers refused together do not come back together.
#[cold]
async fn refusal_pause(n: u32) {
    let d = (5u64 << n.min(6)).min(200);
    let us = fastrand::u64(d * 500..d * 1000);
    tokio::time::sleep(Duration::from_micros(us)).await;
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
pub(super) type Forwarded = Result<(Response<h2::RecvStream>, BackendCall), CallError>;

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
