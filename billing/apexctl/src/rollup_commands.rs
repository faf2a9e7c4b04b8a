//! `apexctl rollup rebuild`: a store's rollups rebuilt from the ClickHouse raw events, the
//! source of truth ([`apex_pipeline::rollups`] says how each store stays exact while the
//! pipeline writes), with a dry run that only reports what would change.

use std::process::ExitCode;

use anyhow::Context;
use apex_pipeline::rollups::{self, Change, RollupError};
use chrono::{DateTime, NaiveDate, Utc};
use clap::Subcommand;

use crate::config::CtlConfig;

/// The longest range one rebuild takes, in days (Stripe's window of usage, and a month with
/// margin: a rebuild holds the Postgres applier for its transaction).
const MAX_DAYS: i64 = 35;

/// The advisory lock keys of the rebuilds, one per store ("apexrbch", "apexrbpg"): two
/// ClickHouse rebuilds at once would both insert the same shortfall (the daily rollup sums),
/// two Postgres rebuilds would wait on each other's locks.
const CLICKHOUSE_LOCK: i64 = 0x6170_6578_7262_6368;
const POSTGRES_LOCK: i64 = 0x6170_6578_7262_7067;

/// The exit code of a rebuild to run again: the pipeline was writing the days (nothing was
/// changed), or an excess was deleted and the shortfall not yet put back.
const EXIT_RUN_AGAIN: u8 = 3;

/// `apexctl rollup ...`.
#[derive(Subcommand)]
pub(crate) enum RollupCommand {
    /// Rebuild a store's rollups from the ClickHouse raw events (`usage_events`) for UTC days
    /// FROM to TO (complete days only, at most 35). Running it again changes nothing.
    ///
    /// Exit codes: 0 done (or nothing to do); 1 bad input, a refusal (a Postgres decrease
    /// without --allow-decrease, another rebuild of the store running, a ClickHouse server not
    /// in UTC) or an error; 3 run it again: the pipeline was writing the days (nothing was
    /// changed), or the ClickHouse rollup's excess was deleted and the days are short until
    /// the next run (the message names them).
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
        /// Only say what would change (locks nothing, writes nothing).
        #[arg(long)]
        dry_run: bool,
        /// Postgres: also lower hours above the raw events (refused otherwise: the pipeline
        /// never leaves Postgres above them, so raw rows may be missing instead).
        #[arg(long)]
        allow_decrease: bool,
        /// Print JSON: `store`, `from`, `to`, `dry_run`, `changes` (per customer, metric and
        /// day: `current`, `rebuilt`, and for Postgres the `hours` changed and
        /// `hours_decreased`), `below_reported` (Postgres: days whose rebuilt total is below
        /// what was reported to Stripe: `customer_id`, `metric_type`, `day`, `rebuilt`,
        /// `reported`).
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
        allow_decrease,
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
    // One rebuild per store at a time; the session closes with the command, releasing it.
    let mut lock = pool.acquire().await?;
    lock.close_on_drop();
    let key = if store == "clickhouse" {
        CLICKHOUSE_LOCK
    } else {
        POSTGRES_LOCK
    };
    // A dry run only reads: it never waits for, nor blocks, a rebuild.
    let locked: bool = dry_run
        || sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
            .bind(key)
            .fetch_one(&mut *lock)
            .await?;
    anyhow::ensure!(
        locked,
        "another rollup rebuild of {store} is running: try again when it has finished"
    );
    let outcome = if store == "clickhouse" {
        rollups::rebuild_clickhouse(&client, first, last, dry_run).await
    } else {
        let mut conn = pool.acquire().await?;
        rollups::rebuild_postgres(&client, &mut conn, first, last, dry_run, allow_decrease).await
    };
    if !dry_run {
        let _ = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
            .bind(key)
            .fetch_one(&mut *lock)
            .await;
    }
    let changes = match outcome {
        Ok(changes) => changes,
        Err(e @ (RollupError::Busy(_) | RollupError::Interrupted(_))) => {
            eprintln!("apexctl: {e}");
            return Ok(ExitCode::from(EXIT_RUN_AGAIN));
        }
        Err(e) => return Err(e.into()),
    };
    // A rebuilt day below what Stripe accepted is one the sync cannot take back.
    let mut below_reported = Vec::new();
    if store == "postgres" {
        let reported = apex_stripe::reconcile::reported_totals(pool, first, last, None).await?;
        for change in &changes {
            let key = (change.customer_id.clone(), change.metric_type, change.day);
            if let Some(&sent) = reported.get(&key)
                && change.rebuilt < sent
            {
                eprintln!(
                    "apexctl: warning: {} {} {}: rebuilt to {} but {} was reported to Stripe \
                     (the sync cannot take it back)",
                    change.customer_id,
                    change.metric_type.as_str(),
                    change.day,
                    change.rebuilt,
                    sent
                );
                below_reported.push(serde_json::json!({
                    "customer_id": change.customer_id,
                    "metric_type": change.metric_type,
                    "day": change.day,
                    "rebuilt": change.rebuilt,
                    "reported": sent,
                }));
            }
        }
    }
    if json {
        println!(
            "{}",
            serde_json::json!({
                "store": store,
                "from": first,
                "to": last,
                "dry_run": dry_run,
                "changes": changes,
                "below_reported": below_reported,
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
    // Increases first, then decreases (hours lowered), which need a second look.
    let (lowered, raised): (Vec<&Change>, Vec<&Change>) = changes
        .iter()
        .partition(|c| c.hours_decreased > 0 || c.rebuilt < c.current);
    for (title, group) in [("increases", raised), ("decreases", lowered)] {
        if group.is_empty() {
            continue;
        }
        println!("{title}:");
        println!(
            "{:<24} {:<14} {:<10} {:>16} {:>16}",
            "customer", "metric", "day", "current", "rebuilt"
        );
        for change in group {
            println!(
                "{:<24} {:<14} {:<10} {:>16} {:>16}",
                change.customer_id,
                change.metric_type.as_str(),
                change.day,
                change.current,
                change.rebuilt
            );
        }
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
