//! `apexctl simulate`: the real system run over a simulated month on its own databases.
//! (Being built: issue 18.)

use std::process::ExitCode;

use clap::Args;

use crate::config::CtlConfig;

/// `apexctl simulate --customers N --days D [--seed S] [--start YYYY-MM-DD] [--json]
/// [--report FILE.html] [--keep]`.
#[derive(Args)]
pub(crate) struct SimulateArgs {
    /// Synthetic customers.
    #[arg(long, default_value_t = 20)]
    pub(crate) customers: u32,
    /// Simulated days.
    #[arg(long, default_value_t = 35)]
    pub(crate) days: u32,
    /// The seed of the customer mix and their usage.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// First simulated day, `YYYY-MM-DD`.
    #[arg(long)]
    pub(crate) start: Option<String>,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write an HTML report here.
    #[arg(long)]
    pub(crate) report: Option<std::path::PathBuf>,
    /// Keep the simulation's databases.
    #[arg(long)]
    pub(crate) keep: bool,
}

pub(crate) async fn run(_args: SimulateArgs, _ctl: &CtlConfig) -> anyhow::Result<ExitCode> {
    anyhow::bail!("simulate is not built yet")
}
