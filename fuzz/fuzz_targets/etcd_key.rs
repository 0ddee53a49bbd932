//! Fuzzes how etcd keys are made from a prefix, a service name (taken from a call's
//! path) and an address: a service's keys always fall under its own prefix, and never
//! under another service's (`services/a/` must not match `services/ab/...`).
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::endpoint::BackendAddr;
use switchyard::registry::{instance_key, service_prefix};
use switchyard::route::ServiceName;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut parts = text.splitn(4, '\n');
    let (Some(prefix), Some(a), Some(b), addr) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return;
    };
    let (Ok(a), Ok(b)) = (ServiceName::new(a), ServiceName::new(b)) else {
        return;
    };
    let pa = service_prefix(prefix, a.as_str());
    let pb = service_prefix(prefix, b.as_str());
    assert!(pa.ends_with('/'), "{pa:?}");
    if a != b {
        assert!(!pb.starts_with(&pa), "{pb:?} falls under {pa:?}");
        assert!(!pa.starts_with(&pb), "{pa:?} falls under {pb:?}");
    }
    let addr: BackendAddr = match addr.map(str::parse) {
        Some(Ok(addr)) => addr,
        _ => "127.0.0.1:1".parse().expect("static address"),
    };
    let key = instance_key(prefix, a.as_str(), addr.as_str());
    assert!(key.starts_with(&pa), "{key:?} not under {pa:?}");
    assert_eq!(&key[pa.len()..], addr.as_str());
    // The address part of a key reads back as the same address.
    assert_eq!(key[pa.len()..].parse::<BackendAddr>().ok(), Some(addr));
});
