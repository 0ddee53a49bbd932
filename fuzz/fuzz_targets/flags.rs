//! Fuzzes the parsers of flag values: `--listen ADDR[=SERVICE]`, durations, addresses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<switchyard::config::ListenSpec>();
        let _ = switchyard::config::parse_duration(s);
        let _ = s.parse::<switchyard::endpoint::BackendAddr>();
        let _ = s.parse::<switchyard::config::AdminListen>();
    }
});
