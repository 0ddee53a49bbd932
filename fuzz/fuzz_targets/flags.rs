//! Fuzzes the parsers of flag values: `--listen ADDR[=SERVICE]`, durations, addresses.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = s.parse::<switchyard::settings::ListenSpec>();
        let _ = switchyard::settings::duration::parse(s);
        let _ = s.parse::<switchyard::endpoint::BackendAddr>();
        let _ = s.parse::<switchyard::settings::AdminListen>();
    }
});
