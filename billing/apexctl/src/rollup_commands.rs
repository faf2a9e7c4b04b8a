//! `apexctl rollup rebuild`: a store's rollups rebuilt from the ClickHouse raw events, the
//! source of truth ([`apex_pipeline::rollups`] says how each store stays exact while the
//! pipeline writes), with a dry run that only reports what would change.

use std::process::ExitCode;

use anyhow::Context;
use apex_pipeline::rollups::{self, Change};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

use crate::config::CtlConfig;

/// The longest range one rebuild takes, in days (Stripe's window of usage, and a month with
/// margin: a rebuild holds the Postgres applier for its transaction).
const MAX_DAYS: i64 = 35;

/// `apexctl rollup ...`.
#[derive(Subcommand)]
pub(crate) enum RollupCommand {
    /// Rebuild a store's rollups from the ClickHouse raw events (`usage_events`) for UTC days
    /// FROM to TO (complete days only, at most 35). Running it again changes nothing.
    Rebuild {
        /// `clickhouse` (the daily rollup `usage_daily`) or `postgres` (the hourly
        /// `usage_records`).
        #[arg(long)]
        store: String,
        /// First UTC day, `YYYY-MM-DD`.
        #[arg(long)]
        from: String,
        /// Last UTC day, `YYYY-MM-DD` (inclusive); before today.
        #[arg(long)]
        to: String,
        /// Only say what would change.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON: `store`, `from`, `to`, `dry_run`, `changes` (per customer, metric and
        /// day: `current`, `rebuilt`, and for Postgres the `hours` changed).
        #[arg(long)]
        json: bool,
    },
}

fn day(flag: &str, text: &str) -> anyhow::Result<NaiveDate> {
    NaiveDate::parse_from_str(text, "%Y-%m-%d")
        .ok()
        .filter(|d| d.format("%Y-%m-%d").to_string() == text)
        .with_context(|| format!("--{flag} {text:?}: expected a day YYYY-MM-DD"))
}

pub(crate) async fn run(
    command: RollupCommand,
    ctl: &CtlConfig,
    pool: &sqlx::PgPool,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    let RollupCommand::Rebuild {
        store,
        from,
        to,
        dry_run,
        json,
    } = command;
    anyhow::ensure!(
        store == "clickhouse" || store == "postgres",
        "--store {store:?}: expected clickhouse or postgres"
    );
    let first = day("from", &from)?;
    let last = day("to", &to)?;
    anyhow::ensure!(
        first <= last,
        "--from {first} is after --to {last}: the range is reversed"
    );
    let days = (last - first).num_days() + 1;
    anyhow::ensure!(
        days <= MAX_DAYS,
        "{first}..{last} is {days} days: at most {MAX_DAYS} at a time"
    );
    anyhow::ensure!(
        first >= NaiveDate::from_ymd_opt(1970, 1, 1).expect("a day"),
        "--from {first}: usage is stored from 1970 on"
    );
    let today = now.date_naive();
    anyhow::ensure!(
        last < today,
        "--to {last} is not a complete day yet (today is {today} UTC): only days before today \
         are rebuilt, while the pipeline still writes today's"
    );
    let client = ctl.cron.stores.clickhouse();
    let changes = if store == "clickhouse" {
        rollups::rebuild_clickhouse(&client, first, last, dry_run).await?
    } else {
        let mut conn = pool.acquire().await?;
        rollups::rebuild_postgres(&client, &mut conn, first, last, dry_run).await?
    };
    if json {
        println!(
            "{}",
            serde_json::json!({
                "store": store,
                "from": first,
                "to": last,
                "dry_run": dry_run,
                "changes": changes,
            })
        );
        return Ok(ExitCode::SUCCESS);
    }
    print_text(&store, first, last, dry_run, &changes);
    Ok(ExitCode::SUCCESS)
}

fn print_text(store: &str, first: NaiveDate, last: NaiveDate, dry_run: bool, changes: &[Change]) {
    let verb = if dry_run { "would change" } else { "changed" };
    if changes.is_empty() {
        println!(
            "{store} rollups of {first}..{last}: nothing to change, they match the raw events"
        );
        return;
    }
    println!(
        "{:<24} {:<14} {:<10} {:>16} {:>16}",
        "customer", "metric", "day", "current", "rebuilt"
    );
    for change in changes {
        println!(
            "{:<24} {:<14} {:<10} {:>16} {:>16}",
            change.customer_id,
            change.metric_type.as_str(),
            change.day,
            change.current,
            change.rebuilt
        );
    }
    println!(
        "{store} rollups of {first}..{last}: {verb} {} customer-metric-day total(s){}",
        changes.len(),
        if dry_run {
            " (dry run: nothing written)"
        } else {
            ""
        }
    );
}
