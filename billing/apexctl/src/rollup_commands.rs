//! `apexctl rollup rebuild`: the rollups rebuilt from the raw events. (Being built: issue 18.)

use std::process::ExitCode;

use clap::Subcommand;

use crate::config::CtlConfig;

/// `apexctl rollup ...`.
#[derive(Subcommand)]
pub(crate) enum RollupCommand {
    /// Rebuild a store's rollups from the ClickHouse raw events (`usage_events`).
    Rebuild {
        /// `clickhouse` (the daily rollup `usage_daily`) or `postgres` (the hourly
        /// `usage_records`).
        #[arg(long)]
        store: String,
        /// First UTC day, `YYYY-MM-DD`.
        #[arg(long)]
        from: String,
        /// Last UTC day, `YYYY-MM-DD` (inclusive).
        #[arg(long)]
        to: String,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    _command: RollupCommand,
    _ctl: &CtlConfig,
    _pool: &sqlx::PgPool,
    _now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("rollup rebuild is not built yet")
}
