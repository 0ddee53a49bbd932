//! Fuzzes the decoding of etcd values (plain `host:port` or etcd naming JSON).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::discovery::EndpointValue;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = EndpointValue::decode(data) {
        // Whatever decodes must encode and decode back to the same endpoint.
        let again = EndpointValue::decode(v.encode().as_bytes()).expect("re-decode");
        assert_eq!(again.addr, v.addr);
        assert!(v.addr.port() != 0);
    }
});
