//! Fuzzes what the proxy reads from a request: the path and the `grpc-timeout` header.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = std::str::from_utf8(data) {
        if let Ok(service) = switchyard::route::service_from_path(path) {
            // A service taken from a path is always a valid name and a part of the path.
            assert!(switchyard::route::ServiceName::new(service).is_ok());
            assert!(path.contains(service));
        }
        // The proxy's error message quoting the path is a valid grpc-message that
        // decodes back to the text.
        let text = format!("switchyard: bad path: {path:?}");
        let v = switchyard::status::encode_message(&text);
        let decoded = percent_encoding::percent_decode(v.as_bytes()).decode_utf8();
        assert_eq!(decoded.as_deref().ok(), Some(text.as_str()));
    }
    if let Ok(v) = http::HeaderValue::from_bytes(data) {
        let mut h = http::HeaderMap::new();
        h.insert("grpc-timeout", v);
        let _ = switchyard::proxy::forward::grpc_timeout(&h);
    }
});
