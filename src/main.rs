//! The `switchyard` binary: parses the command line and hands off to the library.
#![forbid(unsafe_code)]

use clap::{CommandFactory, Parser, Subcommand};

/// Per-host gRPC load-balancing proxy with etcd discovery.
#[derive(Parser, Debug)]
#[command(name = "switchyard", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run the proxy: accept gRPC calls and forward them round-robin to etcd-registered backends.
    Proxy(Box<switchyard::config::ProxyArgs>),
    /// Hold a leased registration key in etcd for a backend (sidecar).
    Register(switchyard::registration::sidecar::RegisterArgs),
    /// List the endpoints registered under the prefix.
    Endpoints(switchyard::registration::list::EndpointsArgs),
    /// Run an example Echo backend (for the demo, tests and benchmarks).
    DemoBackend(switchyard::demo::DemoBackendArgs),
    /// Call the example Echo service through the proxy and show which backend answered.
    DemoClient(switchyard::demo::DemoClientArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    if let Command::Register(args) = &cli.command {
        // Checks between flags; like clap's own errors: a message naming them, exit 2.
        if let Err(msg) = args.validate() {
            Cli::command()
                .error(clap::error::ErrorKind::ArgumentConflict, msg)
                .exit();
        }
    }
    init_tracing();
    let result = match cli.command {
        Command::Proxy(args) => switchyard::proxy::run(*args, switchyard::proxy::shutdown_signal())
            .await
            .map_err(anyhow::Error::from),
        Command::Register(args) => switchyard::registration::sidecar::run(args)
            .await
            .map_err(anyhow::Error::from),
        Command::Endpoints(args) => switchyard::registration::list::run(args)
            .await
            .map_err(anyhow::Error::from),
        Command::DemoBackend(args) => switchyard::demo::run_backend(args)
            .await
            .map_err(anyhow::Error::from),
        Command::DemoClient(args) => switchyard::demo::run_client(args)
            .await
            .map_err(anyhow::Error::from),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("switchyard: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
