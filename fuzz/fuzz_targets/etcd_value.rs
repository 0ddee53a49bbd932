//! Fuzzes the decoding of etcd values (every registry format, recognised by shape).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::registry::decode;

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = decode(b"fuzz/key", data) {
        for ep in &d.endpoints {
            assert!(ep.addr.port() != 0);
            assert!(ep.weight >= 1);
            // Whatever decodes must encode in its format and decode back to the same endpoint.
            let value = d.format.encode(ep).expect("a decoded endpoint encodes");
            let again = decode(b"fuzz/key", value.as_bytes()).expect("re-decode");
            assert_eq!(again.format, d.format);
            assert_eq!(again.endpoints.len(), 1);
            assert_eq!(again.endpoints[0].addr, ep.addr);
            assert_eq!(again.endpoints[0].weight, ep.weight);
        }
    }
});
