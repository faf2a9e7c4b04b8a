//! `apexctl alerts ...`: the usage alerts recorded, the customers getting too many of them
//! (`frequency`, the guide's "check alert frequency" under "High usage alert spam"), and the
//! hourly `usage_limits` check run now (the guide's "check usage limits").

use std::collections::BTreeMap;
use std::process::ExitCode;

use apex_billing::alerts;
use chrono::{DateTime, Duration, Utc};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

use crate::config::CtlConfig;

#[derive(Subcommand)]
pub(crate) enum AlertsCommand {
    /// Usage alerts recorded in the last days, newest first, with each customer's count (the
    /// guide's alert-frequency check flags more than 10 in 7 days).
    List {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// The last N days (1 or more).
        #[arg(long, default_value_t = 7)]
        days: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Customers with more than --more-than usage alerts in the last --days days, most first
    /// (the guide's "check alert frequency": more than 10 in 7 days is its "alert spam").
    Frequency {
        /// The last N days (1 to 3650), each 24 hours back from the clock's now.
        #[arg(long, default_value_t = 7)]
        days: i64,
        /// Customers with more than this many alerts (0 or more): the guide's `HAVING
        /// COUNT(*) > 10`.
        #[arg(long, default_value_t = 10)]
        more_than: i64,
        /// Print JSON: `days`, `more_than`, `since`, `customers` (each `customer_id`,
        /// `alert_count`).
        #[arg(long)]
        json: bool,
    },
    /// Run the hourly `usage_limits` check now (safe to run again: each threshold is
    /// recorded and emailed once per customer, metric and billing period).
    Check {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    command: AlertsCommand,
    ctl: &CtlConfig,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        AlertsCommand::List {
            customer,
            days,
            json,
        } => {
            anyhow::ensure!(
                (1..=3650).contains(&days),
                "--days must be 1 to 3650, not {days}"
            );
            let list = alerts::list(pool, customer.as_deref(), now - Duration::days(days)).await?;
            let mut per_customer: BTreeMap<&str, usize> = BTreeMap::new();
            for a in &list {
                *per_customer.entry(a.customer_id.as_str()).or_default() += 1;
            }
            if json {
                println!(
                    "{}",
                    json!({"days": days, "alerts": list, "per_customer": per_customer})
                );
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                println!("no usage alert in the last {days} days");
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{:<20} {:<24} {:<14} {:>9} {:>16} {:>16}  period",
                "recorded", "customer", "metric", "threshold", "usage", "limit"
            );
            for a in &list {
                println!(
                    "{:<20} {:<24} {:<14} {:>8}% {:>16} {:>16}  {}",
                    a.created_at.format("%Y-%m-%d %H:%M"),
                    a.customer_id,
                    a.metric_type,
                    a.threshold_percent,
                    a.usage_quantity,
                    a.limit_quantity,
                    a.period_start.format("%Y-%m-%d")
                );
            }
            for (customer, count) in per_customer.iter().filter(|(_, n)| **n > 10) {
                println!(
                    "{customer}: {count} alerts in {days} days (the guide's alert spam check)"
                );
            }
        }
        AlertsCommand::Frequency {
            days,
            more_than,
            json,
        } => {
            anyhow::ensure!(
                (1..=3650).contains(&days),
                "--days must be 1 to 3650, not {days}"
            );
            anyhow::ensure!(
                more_than >= 0,
                "--more-than must be 0 or more, not {more_than}"
            );
            let since = now - Duration::days(days);
            let frequent = alerts::frequency(pool, since, more_than).await?;
            if json {
                println!(
                    "{}",
                    json!({"days": days, "more_than": more_than, "since": since,
                        "customers": frequent})
                );
                return Ok(ExitCode::SUCCESS);
            }
            if frequent.is_empty() {
                println!(
                    "no customer has more than {more_than} usage alerts in the last {days} days"
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!("{:<24} {:>11}", "customer", "alert_count");
            for row in &frequent {
                println!("{:<24} {:>11}", row.customer_id, row.alert_count);
            }
        }
        AlertsCommand::Check { json } => {
            let summary = alerts::check_usage_limits(
                &mut *pool.acquire().await?,
                &ctl.cron.alert_thresholds,
                now,
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                let recorded: u64 = summary.alerts_recorded.values().sum();
                println!(
                    "{} customer limits at or above {}%; {recorded} alerts recorded {:?}, {} emails enqueued",
                    summary.at_or_above_lowest,
                    ctl.cron.alert_thresholds.percents()[0],
                    summary.alerts_recorded,
                    summary.emails_enqueued
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
