//! Fuzzes the decoding of etcd values (every registry format, recognised by shape).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::registry::{decode, Instance};

fuzz_target!(|data: &[u8]| {
    if let Ok(d) = decode(b"fuzz/key", data) {
        let instance = Instance {
            service: "fuzz",
            id: "key",
            version: "",
        };
        for ep in &d.endpoints {
            assert!(ep.addr.port() != 0);
            assert!(ep.weight >= 1);
            // Whatever decodes encodes in its format (but metadata that the framework's
            // Go type cannot hold, e.g. numbers in Kratos's map of strings) and decodes
            // back to the same endpoint.
            let value = match d.format.encode(ep, &instance) {
                Ok(value) => value,
                Err(e) => {
                    assert!(ep.metadata.is_some(), "{e}");
                    continue;
                }
            };
            let again = decode(b"fuzz/key", value.as_bytes()).expect("re-decode");
            assert_eq!(again.format, d.format);
            assert_eq!(again.endpoints.len(), 1);
            assert_eq!(again.endpoints[0].addr, ep.addr);
            assert_eq!(again.endpoints[0].weight, ep.weight);
            assert_eq!(again.endpoints[0].tls, ep.tls);
        }
    }
});
