//! The per-call path: check the request, choose its service, pick a backend
//! round-robin, and send the stream there, retrying calls that never reached a backend.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::uri::{Scheme, Uri};
use http::{HeaderMap, Request, Response, StatusCode, Version};
use hyper::body::Incoming;

use super::body::ProxyBody;
use super::replay::ReplayBody;
use crate::balance::EndpointSet;
use crate::discovery::{BackendAddr, Discovery, Service};
use crate::metrics::EndpointCall;
use crate::route::service_from_path;
use crate::status::{error_response, http_error, Code};
use crate::upstream::Upstream;

/// Most backends one call is offered to before the proxy gives up.
pub const MAX_ATTEMPTS: usize = 5;

/// A call abandoned (deadline or cancel) after waiting this long for a backend's
/// response headers makes the proxy probe that backend's connection.
pub const UNRESPONSIVE_AFTER: Duration = Duration::from_millis(250);

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
}

impl Forwarder {
    /// A forwarder for calls to `target`, found through `discovery`.
    pub fn new(discovery: Arc<Discovery>, target: Target, discovery_timeout: Duration) -> Self {
        Self {
            discovery,
            target,
            discovery_timeout,
        }
    }

    /// Serves one request (one HTTP/2 stream); never fails: errors become responses.
    pub async fn handle(
        self: Arc<Self>,
        req: Request<Incoming>,
    ) -> Result<Response<ProxyBody>, Infallible> {
        Ok(self.call(req).await)
    }

    async fn call(&self, req: Request<Incoming>) -> Response<ProxyBody> {
        if req.version() != Version::HTTP_2 {
            return http_error(
                StatusCode::HTTP_VERSION_NOT_SUPPORTED,
                "switchyard serves gRPC over HTTP/2 only (h2c with prior knowledge)\n",
            );
        }
        if !is_grpc(req.headers()) {
            return http_error(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "switchyard forwards gRPC only: content-type must be application/grpc\n",
            );
        }
        let service = match &self.target {
            Target::Bound(s) => Arc::clone(s),
            Target::ByPath => {
                let name = match service_from_path(req.uri().path()) {
                    Ok(n) => n,
                    Err(e) => {
                        return error_response(
                            Code::Unimplemented,
                            &format!("switchyard: {e}: {:?}", req.uri().path()),
                        )
                    }
                };
                match self.discovery.service(name) {
                    Ok(s) => s,
                    Err(e) => {
                        return error_response(Code::ResourceExhausted, &format!("switchyard: {e}"))
                    }
                }
            }
        };
        let timer = service.metrics().start();
        let timeout = grpc_timeout(req.headers());
        let forwarded = self.forward(&service, req);
        let result = match timeout {
            Some(timeout) => tokio::time::timeout(timeout, forwarded)
                .await
                .unwrap_or_else(|_| {
                    Err((
                        Code::DeadlineExceeded,
                        format!(
                            "switchyard: deadline exceeded before a backend of service '{}' answered",
                            service.name()
                        ),
                    ))
                }),
            None => forwarded.await,
        };
        match result {
            Ok((resp, endpoint)) => {
                let (parts, inner) = resp.into_parts();
                let record = endpoint.map(|e| {
                    let mut r = timer.upstream(e);
                    r.status(parts.headers.get("grpc-status"));
                    r
                });
                Response::from_parts(parts, ProxyBody::Upstream { inner, record })
            }
            Err((code, message)) => {
                timer.own(code as u8);
                error_response(code, &message)
            }
        }
    }

    /// Sends the call to the service's backends in round-robin order until one takes it;
    /// returns the backend's response and the metrics of the backend that answered.
    async fn forward(&self, service: &Service, req: Request<Incoming>) -> Forwarded {
        if !service.is_loaded() && !service.wait_loaded(self.discovery_timeout).await {
            return Err((
                Code::Unavailable,
                format!(
                    "switchyard: endpoints of service '{}' not known yet (etcd unreachable?)",
                    service.name()
                ),
            ));
        }
        let set = service.endpoints_full();
        if set.is_empty() {
            return Err((
                Code::Unavailable,
                format!(
                    "switchyard: no endpoints registered for service '{}'",
                    service.name()
                ),
            ));
        }
        let (parts, body) = req.into_parts();
        let mut body = ReplayBody::new(body);
        let mut tried = [usize::MAX; MAX_ATTEMPTS];
        let mut last_error: Option<String> = None;
        for attempt in 0..set.len().min(MAX_ATTEMPTS) {
            let Some((idx, upstream)) = set.pick(service.round_robin(), |i| tried.contains(&i))
            else {
                break;
            };
            // A backend still connecting, or suspected of having frozen, gets the call
            // only if no connected one is left to try (waiting on it could cost the
            // call its deadline): the next connected one after it takes its turn.
            let (idx, upstream) = if upstream.is_healthy() {
                (idx, upstream)
            } else {
                next_healthy(&set, idx, &tried).unwrap_or((idx, upstream))
            };
            tried[attempt] = idx;
            let mut sender = match upstream.sender().await {
                Ok(s) => s,
                Err(e) => {
                    tracing::debug!(service = %service.name(), backend = %upstream.addr(), error = %e, "backend not usable; trying next");
                    last_error = Some(format!("{}: {e}", upstream.addr()));
                    continue;
                }
            };
            let retry_body = body.try_clone();
            let mut req = Request::from_parts(parts.clone(), body);
            if let Err(e) = set_authority(&mut req, upstream.addr()) {
                return Err((Code::Internal, format!("switchyard: {e}")));
            }
            // In flight on this endpoint from now until the response ends.
            let sent = upstream.metrics().map(|m| m.send());
            let waiting = HeaderWait::new(upstream);
            let result = sender.try_send_request(req).await;
            waiting.disarm();
            let error = match result {
                Ok(resp) => {
                    if let Some(b) = &retry_body {
                        b.commit();
                    }
                    return Ok((resp, sent));
                }
                Err(mut e) => match e.take_message() {
                    // The request never left: offer it to the next backend as it is.
                    Some(unsent) => {
                        upstream.report_closed();
                        body = unsent.into_body();
                        e.into_error()
                    }
                    None => {
                        let err = e.into_error();
                        match retry_body {
                            // Refused before the backend processed it: replay elsewhere.
                            Some(b) if never_processed(&err) => {
                                body = b;
                                err
                            }
                            _ => {
                                return Err((
                                    Code::Unavailable,
                                    format!(
                                    "switchyard: service '{}': backend {} failed the call: {err}",
                                    service.name(),
                                    upstream.addr(),
                                ),
                                ))
                            }
                        }
                    }
                },
            };
            tracing::debug!(service = %service.name(), backend = %upstream.addr(), %error, "call not taken by backend; retrying on next");
            last_error = Some(format!("{}: {error}", upstream.addr()));
        }
        Err((
            Code::Unavailable,
            format!(
                "switchyard: all {} endpoints of service '{}' are unreachable{}",
                set.len(),
                service.name(),
                last_error
                    .map(|e| format!(" (last: {e})"))
                    .unwrap_or_default()
            ),
        ))
    }
}

/// The first connected, unsuspected endpoint after `idx` (cyclically) not yet tried.
fn next_healthy<'a>(
    set: &'a EndpointSet,
    idx: usize,
    tried: &[usize],
) -> Option<(usize, &'a Arc<Upstream>)> {
    let n = set.len();
    (1..n).map(|k| (idx + k) % n).find_map(|i| {
        set.iter()
            .nth(i)
            .filter(|u| u.is_healthy() && !tried.contains(&i))
            .map(|u| (i, u))
    })
}

/// Armed while a call waits for a backend's response headers: if the call is dropped
/// (its deadline passed, or the client cancelled) after waiting at least
/// [`UNRESPONSIVE_AFTER`], the backend is reported as possibly unresponsive.
struct HeaderWait<'a> {
    upstream: &'a Upstream,
    since: tokio::time::Instant,
    armed: bool,
}

impl<'a> HeaderWait<'a> {
    fn new(upstream: &'a Upstream) -> Self {
        Self {
            upstream,
            since: tokio::time::Instant::now(),
            armed: true,
        }
    }

    fn disarm(mut self) {
        self.armed = false;
    }
}

impl Drop for HeaderWait<'_> {
    fn drop(&mut self) {
        if self.armed && self.since.elapsed() >= UNRESPONSIVE_AFTER {
            self.upstream.report_unresponsive();
        }
    }
}

/// What forwarding gives: the backend's response and the call's count in flight on the
/// backend that answered, or a proxy error.
type Forwarded = Result<(Response<Incoming>, Option<EndpointCall>), (Code, String)>;

/// Whether an error says the backend refused the stream before processing it
/// (REFUSED_STREAM, or a graceful GOAWAY that did not cover the stream).
fn never_processed(err: &hyper::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(e) = source {
        if let Some(h2) = e.downcast_ref::<h2::Error>() {
            return h2.reason() == Some(h2::Reason::REFUSED_STREAM)
                || (h2.is_go_away() && h2.reason() == Some(h2::Reason::NO_ERROR));
        }
        source = e.source();
    }
    false
}

/// Points the request at `addr`, keeping its path.
#[inline]
pub fn set_authority<B>(req: &mut Request<B>, addr: &BackendAddr) -> Result<(), http::Error> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(addr.authority().clone());
    *req.uri_mut() = Uri::from_parts(parts)?;
    Ok(())
}

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

/// Parses `grpc-timeout` (`<up to 8 digits><H|M|S|m|u|n>`); `None` if absent or malformed.
#[inline]
pub fn grpc_timeout(headers: &HeaderMap) -> Option<Duration> {
    let v = headers.get("grpc-timeout")?.as_bytes();
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
