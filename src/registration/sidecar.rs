//! `switchyard register`: a sidecar that holds a leased key for a backend.

/// Flags of `switchyard register`.
#[derive(clap::Args, Debug, Clone)]
pub struct RegisterArgs {
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: crate::config::EtcdArgs,
}

/// Runs the sidecar until SIGTERM/SIGINT.
pub async fn run(_args: RegisterArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
