//! gRPC's view of an HTTP/2 request head, shared by the per-call path and the services the
//! proxy answers itself: whether a request is gRPC, its `grpc-timeout`, and pointing a
//! head at a backend.

use std::time::Duration;

use http::header::CONTENT_TYPE;
use http::uri::{Scheme, Uri};
use http::{HeaderMap, Request};

use crate::endpoint::BackendAddr;

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
pub static GRPC_TIMEOUT: http::HeaderName = http::HeaderName::from_static("grpc-timeout");

/// The `grpc-previous-rpc-attempts` header (gRFC A6), on the retries and hedges of a call.
pub static PREVIOUS_ATTEMPTS: http::HeaderName =
    http::HeaderName::from_static("grpc-previous-rpc-attempts");

/// The `grpc-retry-pushback-ms` header (gRFC A6), a server's word on when to retry.
pub static RETRY_PUSHBACK: http::HeaderName =
    http::HeaderName::from_static("grpc-retry-pushback-ms");

/// `d` as a `grpc-timeout` value, rounded up to the unit that keeps it within 8 digits
/// (for calls whose deadline the proxy sets or shortens).
pub fn timeout_value(d: Duration) -> http::HeaderValue {
    let us = d.as_micros().max(1);
    let text = if us < 100_000_000 {
        format!("{us}u")
    } else if us / 1000 < 100_000_000 {
        format!("{}m", us.div_ceil(1000))
    } else {
        format!("{}S", us.div_ceil(1_000_000).min(99_999_999))
    };
    // Digits and a unit letter: always a valid header value.
    http::HeaderValue::from_str(&text).unwrap_or(http::HeaderValue::from_static("99999999S"))
}

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

/// Points the request at `addr`, keeping its path.
#[inline]
pub fn set_authority<B>(req: &mut Request<B>, addr: &BackendAddr) -> Result<(), http::Error> {
    let mut parts = std::mem::take(req.uri_mut()).into_parts();
    parts.scheme = Some(Scheme::HTTP);
    parts.authority = Some(addr.authority().clone());
    *req.uri_mut() = Uri::from_parts(parts)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeout_values_read_back_as_at_least_what_was_set() {
        for d in [
            Duration::from_nanos(10),
            Duration::from_millis(250),
            Duration::from_secs(150),
            Duration::from_secs(86_400 * 365),
        ] {
            let mut h = HeaderMap::new();
            h.insert(&GRPC_TIMEOUT, timeout_value(d));
            let back = grpc_timeout(&h).unwrap();
            assert!(
                back >= d.min(Duration::from_secs(99_999_999)),
                "{d:?} -> {back:?}"
            );
            assert!(back <= d + Duration::from_secs(1) || d > Duration::from_secs(99_999_999));
        }
    }
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
