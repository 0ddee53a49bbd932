//! Fuzzes the whole `switchyard proxy` command line (the config): arbitrary arguments,
//! NUL-separated, must parse or fail with an error, never panic.
#![no_main]
use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: switchyard::settings::ProxySettings,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv = std::iter::once("switchyard-proxy").chain(text.split('\0'));
    if let Ok(cli) = Cli::try_parse_from(argv) {
        let a = cli.args;
        assert!(!a.listeners.is_empty());
        for l in &a.listeners {
            // A listen spec prints and parses back to itself.
            let text = l.to_string();
            assert_eq!(text.parse::<switchyard::settings::ListenSpec>().ok().as_ref(), Some(l));
        }
    }
});
