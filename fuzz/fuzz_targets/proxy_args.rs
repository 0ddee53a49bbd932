//! Fuzzes the whole `switchyard proxy` command line (the config): arbitrary arguments,
//! NUL-separated, must parse or fail with an error, never panic.
#![no_main]
use clap::Parser;
use libfuzzer_sys::fuzz_target;

#[derive(Parser, Debug)]
struct Cli {
    #[command(flatten)]
    args: switchyard::config::ProxyArgs,
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let argv = std::iter::once("switchyard-proxy").chain(text.split('\0'));
    if let Ok(cli) = Cli::try_parse_from(argv) {
        let a = cli.args;
        assert!(!a.listen.is_empty());
        for l in &a.listen {
            // A listen spec prints and parses back to itself.
            let text = match &l.service {
                Some(s) => format!("{}={s}", l.addr),
                None => l.addr.to_string(),
            };
            assert_eq!(text.parse::<switchyard::config::ListenSpec>().ok().as_ref(), Some(l));
        }
    }
});
