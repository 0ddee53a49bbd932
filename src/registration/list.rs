//! `switchyard endpoints`: lists what is registered under the prefix.

/// Flags of `switchyard endpoints`.
#[derive(clap::Args, Debug, Clone)]
pub struct EndpointsArgs {
    /// etcd location and key prefix.
    #[command(flatten)]
    pub etcd: crate::config::EtcdArgs,
}

/// Prints the registered endpoints.
pub async fn run(_args: EndpointsArgs) -> anyhow::Result<()> {
    anyhow::bail!("not implemented yet")
}
