//! The `switchyard` binary: parses the command line and hands off to the library.
#![forbid(unsafe_code)]

use std::path::PathBuf;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use switchyard::settings::{LogFormat, LogLevel, LogSettings};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Registry};

/// mimalloc: a call allocates and frees many small blocks (HTTP/2 frames, header maps)
/// across threads, where it costs less CPU than the system allocator. The
/// `system-allocator` feature leaves it out, for heap profilers that see only `malloc`
/// (valgrind's dhat).
#[cfg(not(feature = "system-allocator"))]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Per-host gRPC load-balancing proxy with etcd discovery.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(flatten)]
    log: LogSettings,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy: accept gRPC calls and forward them round-robin to etcd-registered backends.
    Proxy(Box<switchyard::settings::ProxyCommand>),
    /// Check a config file (with the current environment) without starting the proxy.
    CheckConfig(CheckConfigArgs),
    /// Hold a leased registration key in etcd for a backend (sidecar).
    Register(switchyard::registration::sidecar::RegisterArgs),
    /// List the endpoints registered under the prefix.
    Endpoints(switchyard::registration::list::EndpointsArgs),
    /// Run an example Echo backend (for the demo, tests and benchmarks).
    #[cfg(feature = "demo")]
    DemoBackend(switchyard::demo::DemoBackendArgs),
    /// Call the example Echo service through the proxy and show which backend answered.
    #[cfg(feature = "demo")]
    DemoClient(switchyard::demo::DemoClientArgs),
}

/// Arguments of `switchyard check-config`.
#[derive(clap::Args, Debug)]
struct CheckConfigArgs {
    /// The TOML config file to check.
    file: PathBuf,
}

/// Starts logging to stderr in `format`, writing what `RUST_LOG` selects, or else
/// `level` (default `info`); returns the handle that changes the filter later (reload).
fn init_tracing(
    format: LogFormat,
    level: Option<&LogLevel>,
) -> reload::Handle<EnvFilter, Registry> {
    let filter = EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| level.map_or_else(|| EnvFilter::new("info"), LogLevel::filter));
    let (filter, handle) = reload::Layer::new(filter);
    let logs = tracing_subscriber::registry().with(filter);
    let lines = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Text => logs.with(lines).init(),
        LogFormat::Json => logs.with(lines.json().flatten_event(true)).init(),
    }
    handle
}

fn fail(e: impl std::fmt::Display) -> std::process::ExitCode {
    eprintln!("switchyard: {e:#}");
    std::process::ExitCode::FAILURE
}

fn main() -> std::process::ExitCode {
    let matches = Cli::command().get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    if let Command::Register(args) = &cli.command {
        // Checks between flags; like clap's own errors: a message naming them, exit 2.
        if let Err(msg) = args.validate() {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit();
        }
    }
    // The proxy's settings (and its log format) may come from a config file: load them
    // before logging starts.
    let settings = match (&cli.command, matches.subcommand_matches("proxy")) {
        (Command::Proxy(_), Some(proxy_matches)) => match switchyard::settings::load(proxy_matches)
        {
            Ok(s) => Some(s),
            Err(e) => return fail(e),
        },
        _ => None,
    };
    let filter = init_tracing(
        settings
            .as_ref()
            .map_or(cli.log.log_format, |s| s.log_format),
        settings.as_ref().map(|s| &s.proxy.log.level),
    );
    // The proxy runs on as many threads as configured (one: a single-threaded runtime,
    // no cross-thread scheduling at all); the other commands on tokio's default (one
    // thread per core).
    let mut runtime = match settings.as_ref().map(|s| s.proxy.limits.worker_threads) {
        Some(1) => tokio::runtime::Builder::new_current_thread(),
        Some(n) => {
            let mut b = tokio::runtime::Builder::new_multi_thread();
            b.worker_threads(n);
            b
        }
        None => tokio::runtime::Builder::new_multi_thread(),
    };
    let runtime = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => return fail(format!("cannot start the runtime: {e}")),
    };
    let proxy_matches = matches.subcommand_matches("proxy").cloned();
    runtime.block_on(run(cli.command, settings, proxy_matches, filter))
}

/// Reads the proxy's settings again on SIGHUP: the same flags and environment, the
/// config file as it is now.
fn reloader(matches: clap::ArgMatches) -> switchyard::proxy::Reload {
    Box::new(move || {
        let loaded = switchyard::settings::load(&matches)?;
        if let Some(file) = loaded.config_file() {
            tracing::info!(config = %file.display(), "config file read again");
        }
        Ok(loaded)
    })
}

/// Runs the chosen command to its end.
async fn run(
    command: Command,
    settings: Option<switchyard::settings::Loaded>,
    proxy_matches: Option<clap::ArgMatches>,
    filter: reload::Handle<EnvFilter, Registry>,
) -> std::process::ExitCode {
    let result = match command {
        Command::Proxy(_) => match settings {
            Some(settings) => {
                if let Some(file) = settings.config_file() {
                    tracing::info!(config = %file.display(), "config file loaded");
                }
                let reload = proxy_matches.map(reloader);
                // A reload puts the file's `log.level` in force (over `RUST_LOG` too).
                let running = switchyard::proxy::Running::from(settings).with_log_control(
                    std::sync::Arc::new(move |level: &LogLevel| {
                        filter.reload(level.filter()).map_err(|e| e.to_string())
                    }),
                );
                switchyard::proxy::run_reloading(
                    running,
                    reload,
                    switchyard::proxy::shutdown_signal(),
                )
                .await
                .map_err(anyhow::Error::from)
            }
            None => Err(anyhow::anyhow!("internal error: no settings for `proxy`")),
        },
        Command::CheckConfig(args) => match switchyard::settings::check(&args.file) {
            Ok(settings) => {
                use std::io::Write;
                // A closed stdout (e.g. `| head -1`) is not an error of the check.
                let _ = writeln!(std::io::stdout(), "{}: ok\n{settings}", args.file.display());
                Ok(())
            }
            Err(e) => Err(e.into()),
        },
        Command::Register(args) => switchyard::registration::sidecar::run(args)
            .await
            .map_err(anyhow::Error::from),
        Command::Endpoints(args) => switchyard::registration::list::run(args)
            .await
            .map_err(anyhow::Error::from),
        #[cfg(feature = "demo")]
        Command::DemoBackend(args) => switchyard::demo::run_backend(args)
            .await
            .map_err(anyhow::Error::from),
        #[cfg(feature = "demo")]
        Command::DemoClient(args) => switchyard::demo::run_client(args)
            .await
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => fail(e),
    }
}
