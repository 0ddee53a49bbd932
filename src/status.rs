//! gRPC errors produced by the proxy itself: trailers-only responses
//! (HTTP 200, `content-type: application/grpc`, `grpc-status`, `grpc-message`).

use bytes::Bytes;
use http::header::{HeaderValue, CONTENT_TYPE};
use http::{Response, StatusCode};
use percent_encoding::{utf8_percent_encode, AsciiSet, CONTROLS};

pub use tonic::Code;

/// `code` as the `grpc-status` header value (no formatting per call).
pub fn code_header(code: Code) -> HeaderValue {
    const VALUES: [&str; 17] = [
        "0", "1", "2", "3", "4", "5", "6", "7", "8", "9", "10", "11", "12", "13", "14", "15", "16",
    ];
    HeaderValue::from_static(VALUES.get(code as usize).copied().unwrap_or("2"))
}

/// Bytes escaped in `grpc-message`: everything outside printable ASCII, plus `%`.
const GRPC_MESSAGE_ESCAPES: &AsciiSet = &CONTROLS.add(b'%');

/// Percent-encodes a status message as the gRPC spec requires.
pub fn encode_message(message: &str) -> HeaderValue {
    let encoded: String = utf8_percent_encode(message, GRPC_MESSAGE_ESCAPES).collect();
    // Percent-encoding leaves only visible ASCII, which is always a valid header value.
    HeaderValue::from_str(&encoded).unwrap_or_else(|_| HeaderValue::from_static("switchyard error"))
}

/// The `grpc-status` header name, parsed once.
pub static GRPC_STATUS: http::HeaderName = http::HeaderName::from_static("grpc-status");

/// The `content-type` of gRPC responses.
pub const GRPC_CONTENT_TYPE: HeaderValue = HeaderValue::from_static("application/grpc");

/// Builds a trailers-only gRPC error response (its headers end the stream).
pub fn error_response(code: Code, message: &str) -> Response<()> {
    let mut resp = Response::new(());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, GRPC_CONTENT_TYPE);
    h.insert("grpc-status", code_header(code));
    h.insert("grpc-message", encode_message(message));
    resp
}

/// Builds a plain HTTP error with a text body (for requests that are not gRPC at all).
pub fn http_error(status: StatusCode, message: &'static str) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::from_static(message.as_bytes()));
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no endpoints"), "no endpoints");
        assert_eq!(
            encode_message("100% ünïcode\n"),
            "100%25 %C3%BCn%C3%AFcode%0A"
        );
    }

    #[test]
    fn error_responses_are_trailers_only() {
        let r = error_response(Code::Unavailable, "no endpoints for service 'a'");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "14");
        assert_eq!(r.headers()["content-type"], "application/grpc");
        assert_eq!(r.headers()["grpc-message"], "no endpoints for service 'a'");
    }
}
