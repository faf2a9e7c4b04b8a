//! `apexctl usage ...`: the guide's "check customer usage" (its top-10 query over the hourly
//! rollups) as a command.

use std::process::ExitCode;

use apex_billing::statement::{self, gb_text};
use chrono::{DateTime, Duration, Utc};
use clap::Subcommand;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum UsageCommand {
    /// The customers with the most impressions over the last days, with their API calls and
    /// data transfer (the guide's "check customer usage").
    Top {
        /// The last N days (1 to 3650).
        #[arg(long, default_value_t = 30)]
        days: i64,
        /// How many customers (1 to 10000).
        #[arg(long, default_value_t = 10)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    command: UsageCommand,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        UsageCommand::Top { days, limit, json } => {
            anyhow::ensure!(
                (1..=3650).contains(&days),
                "--days must be 1 to 3650, not {days}"
            );
            anyhow::ensure!(
                (1..=10_000).contains(&limit),
                "--limit must be 1 to 10000, not {limit}"
            );
            let top = statement::top_usage(pool, now - Duration::days(days), limit).await?;
            if json {
                println!("{}", serde_json::json!({"days": days, "customers": top}));
                return Ok(ExitCode::SUCCESS);
            }
            if top.is_empty() {
                println!("no usage in the last {days} days");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<24} {:<24} {:>16} {:>14} {:>16}",
                "customer", "name", "impressions", "api_calls", "data_transfer"
            );
            for row in top {
                println!(
                    "{:<24} {:<24} {:>16} {:>14} {:>16}",
                    row.customer_id,
                    row.name.as_deref().unwrap_or("-"),
                    row.impressions,
                    row.api_calls,
                    format!(
                        "{} GB",
                        gb_text(row.data_transfer_bytes.max(0).unsigned_abs())
                    )
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
