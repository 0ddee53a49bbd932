//! Services the proxy answers itself instead of forwarding them to a backend:
//! `grpc.health.v1.Health` ([`health`]: the proxy's own health and that of each registered
//! service) and, on listeners that route by path, gRPC server reflection
//! (`grpc.reflection.v1` and `v1alpha`, [`reflection`]: services listed from etcd, symbol
//! and file requests passed to a backend of the service they name).
//!
//! Ordinary calls pay one comparison of their path's first six bytes ([`Local::claims`]).
//! A claimed call is served by tonic's generated server for its service, driven straight
//! from the client's h2 stream (its body read as an [`H2Body`], its response sent back by a
//! [`Relay`]), inside the connection's task like any other stream.

pub mod health;
pub mod reflection;

use std::future::{poll_fn, Future};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::server::SendResponse;
use http::{HeaderMap, Request, Response};
use http_body::Body;
use tokio::sync::watch;
use tonic::codegen::Service as _;
use tonic_health::pb::health_server::HealthServer;
use tonic_reflection::pb::{v1, v1alpha};

use super::body::H2Body;
use super::relay::{Relay, ResetReason};
use super::routing::LiveRouting;
use crate::discovery::{Discovery, Service};
use crate::observe::body::{Counted, Observed};
use crate::observe::CallObs;

/// What the local services read: the services, etcd (to list them), and whether the
/// proxy is draining.
pub struct LocalContext {
    /// The watched services.
    pub discovery: Arc<Discovery>,
    /// The etcd client (reflection lists the registered services with it).
    pub etcd: etcd_client::Client,
    /// The routes, prefixes and discovery wait in force (shared with the forwarders, and
    /// swapped by a reload).
    pub routing: Arc<LiveRouting>,
    /// Turns true when the proxy starts draining.
    pub draining: watch::Receiver<bool>,
}

impl std::fmt::Debug for LocalContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalContext")
            .field("routing", &self.routing)
            .field("draining", &*self.draining.borrow())
            .finish()
    }
}

/// A call the proxy answers itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LocalCall {
    /// `grpc.health.v1.Health/*`.
    Health,
    /// `grpc.reflection.v1.ServerReflection/*`.
    ReflectionV1,
    /// `grpc.reflection.v1alpha.ServerReflection/*`.
    ReflectionV1Alpha,
}

/// The local services of one listener.
pub struct Local {
    health: HealthServer<health::HealthService>,
    /// `None` on a listener bound to a service: its reflection calls go to its backends
    /// like any other call.
    reflection: Option<Reflection>,
}

/// Both versions of the reflection service (the same messages under two package names).
struct Reflection {
    v1: v1::server_reflection_server::ServerReflectionServer<reflection::ReflectionV1>,
    v1alpha:
        v1alpha::server_reflection_server::ServerReflectionServer<reflection::ReflectionV1Alpha>,
}

impl std::fmt::Debug for Local {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("reflection", &self.reflection.is_some())
            .finish()
    }
}

impl Local {
    /// The local services of a listener; `bound` is the service the listener is bound to.
    pub fn new(ctx: Arc<LocalContext>, bound: Option<Arc<Service>>) -> Arc<Self> {
        let reflection = bound.is_none().then(|| Reflection {
            v1: v1::server_reflection_server::ServerReflectionServer::new(
                reflection::ReflectionV1::new(Arc::clone(&ctx)),
            ),
            v1alpha: v1alpha::server_reflection_server::ServerReflectionServer::new(
                reflection::ReflectionV1Alpha::new(Arc::clone(&ctx)),
            ),
        });
        Arc::new(Self {
            health: HealthServer::new(health::HealthService::new(ctx, bound)),
            reflection,
        })
    }

    /// Which local service a gRPC request with this path and headers is for, if any.
    /// Ordinary calls pay one comparison of the path's first bytes.
    #[inline]
    pub fn claims(&self, path: &str, headers: &HeaderMap) -> Option<LocalCall> {
        claim(path, headers, self.reflection.is_some())
    }

    /// Serves a claimed call on the client's stream until its response ends; `obs`, the
    /// call's access-log record and span (when either is on), sees it to its end.
    pub fn serve(
        self: &Arc<Self>,
        call: LocalCall,
        req: Request<h2::RecvStream>,
        respond: SendResponse<Bytes>,
        obs: Option<Box<CallObs>>,
    ) -> Answer {
        Answer(Some(Box::pin(
            Arc::clone(self).answer(call, req, respond, obs),
        )))
    }

    async fn answer(
        self: Arc<Self>,
        call: LocalCall,
        req: Request<h2::RecvStream>,
        mut respond: SendResponse<Bytes>,
        mut obs: Option<Box<CallObs>>,
    ) {
        if let Some(o) = obs.as_mut() {
            o.answered_locally();
        }
        let counter = obs.as_ref().and_then(|o| o.request_counter());
        let req = req.map(|b| Counted::new(H2Body::new(b), counter));
        let response = match (call, &self.reflection) {
            (LocalCall::Health, _) => self.health.clone().call(req).await,
            (LocalCall::ReflectionV1, Some(r)) => r.v1.clone().call(req).await,
            (LocalCall::ReflectionV1Alpha, Some(r)) => r.v1alpha.clone().call(req).await,
            // `claims` gives reflection calls only where reflection is served.
            (_, None) => {
                Ok(tonic::Status::unimplemented("switchyard: no reflection here").into_http())
            }
        };
        let Ok(response) = response;
        let (parts, body) = response.into_parts();
        // Dropped with this future at the latest: the record is finished either way.
        let body = Observed::new(body, &parts.headers, obs);
        let eos = body.is_end_stream();
        match respond.send_response(Response::from_parts(parts, ()), eos) {
            Ok(tx) if !eos => {
                let mut relay = Relay::new(body, tx);
                poll_fn(|cx| relay.poll_relay(cx)).await;
            }
            Ok(_) => {}
            Err(e) => tracing::debug!(error = %e, "cannot send a local answer to the client"),
        }
    }
}

/// Which local service a request is for; reflection only where it is served.
#[inline]
fn claim(path: &str, headers: &HeaderMap, reflection: bool) -> Option<LocalCall> {
    let rest = path.as_bytes().strip_prefix(b"/grpc.")?;
    let call = if rest.starts_with(b"health.v1.Health/") {
        LocalCall::Health
    } else if !reflection {
        return None;
    } else if rest.starts_with(b"reflection.v1.ServerReflection/") {
        LocalCall::ReflectionV1
    } else if rest.starts_with(b"reflection.v1alpha.ServerReflection/") {
        LocalCall::ReflectionV1Alpha
    } else {
        return None;
    };
    // Anything but gRPC gets the proxy's usual answer.
    super::grpc::is_grpc(headers).then_some(call)
}

/// A tonic body that fails (rare: tonic turns a service's errors into trailers) resets the
/// stream it is relayed to.
impl ResetReason for tonic::Status {
    fn reset_reason(&self) -> h2::Reason {
        h2::Reason::INTERNAL_ERROR
    }
}

/// What is left of a stream once the proxy has looked at its request: nothing (it was
/// answered at once) or a call of a local service.
pub struct Answer(Option<Pin<Box<dyn Future<Output = ()> + Send>>>);

impl Answer {
    /// Nothing left to do.
    pub fn done() -> Self {
        Self(None)
    }
}

impl Future for Answer {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        match self.get_mut().0.as_mut() {
            None => Poll::Ready(()),
            Some(call) => call.as_mut().poll(cx),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grpc() -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            "content-type",
            http::HeaderValue::from_static("application/grpc"),
        );
        h
    }

    #[test]
    fn only_health_and_reflection_paths_are_claimed() {
        let h = grpc();
        assert_eq!(
            claim("/grpc.health.v1.Health/Watch", &h, true),
            Some(LocalCall::Health)
        );
        assert_eq!(
            claim(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &h,
                true
            ),
            Some(LocalCall::ReflectionV1)
        );
        assert_eq!(
            claim(
                "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo",
                &h,
                true
            ),
            Some(LocalCall::ReflectionV1Alpha)
        );
        for p in [
            "/pkg.Svc/M",
            "/grpc.health.v2.Health/Check",
            "/grpc.health.v1.HealthX/Check",
            "/grpc.",
            "/grpc",
            "",
        ] {
            assert_eq!(claim(p, &h, true), None, "{p}");
        }
        assert_eq!(
            claim("/grpc.health.v1.Health/Check", &HeaderMap::new(), true),
            None
        );
        // A bound listener: health only.
        assert_eq!(
            claim("/grpc.health.v1.Health/Check", &h, false),
            Some(LocalCall::Health)
        );
        assert_eq!(
            claim(
                "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo",
                &h,
                false
            ),
            None
        );
    }
}
