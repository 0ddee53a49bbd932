//! Fuzzes the config file parser (`--config FILE`, TOML): any text parses or fails with
//! an error that points at a line and column inside the file, never a panic.
#![no_main]
use libfuzzer_sys::fuzz_target;
use switchyard::settings::{parse_file, ConfigError};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match parse_file(std::path::Path::new("fuzz.toml"), text) {
        Ok(_) => {}
        Err(ConfigError::Field(e)) => {
            let at = e.location.as_ref().expect("a file error without a location");
            let lines = text.split('\n').count();
            assert!(at.line >= 1 && at.line <= lines, "line {} of {lines}", at.line);
            assert!(at.column >= 1, "column {}", at.column);
            let shown = e.to_string();
            assert!(shown.starts_with("fuzz.toml:"), "{shown}");
        }
        Err(other) => panic!("unexpected kind of error: {other}"),
    }
});
