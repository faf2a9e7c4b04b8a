//! `apexctl stripe ...`: map the catalogue and customers to Stripe, and run the usage sync.

use std::process::ExitCode;

use anyhow::Context;
use apex_stripe::client::ClientSettings;
use apex_stripe::config::StripeConfig;
use apex_stripe::{self as stripe, catalog, sync};
use clap::Subcommand;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum StripeCommand {
    /// Create the billing meters (one per metric) and each plan's product and monthly base
    /// fee in Stripe, and keep their ids (safe to run again).
    Catalog {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Create a Stripe customer and subscription for every customer (or one) that has none
    /// yet (safe to run again). Run `catalog` first.
    Customers {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Report usage of complete UTC days to Stripe as meter events (the 02:00 job; safe to
    /// run again: nothing is counted twice; one run at a time). Exits 1 when a customer
    /// failed or something needs a person.
    Sync {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// Only this UTC day, `YYYY-MM-DD` (complete, within the last 35 days).
        #[arg(long)]
        date: Option<String>,
        /// Stripe requests per second at most (Stripe allows 100 live, 25 in test mode).
        #[arg(long, env = "APEX_STRIPE_RATE", default_value_t = 50.0)]
        rate: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    command: StripeCommand,
    pool: &PgPool,
    config: &StripeConfig,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        StripeCommand::Catalog { json } => {
            let client = stripe::client_from_config(config, ClientSettings::default())?;
            let report = catalog::sync_catalog(pool, &client).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "meters mapped now: {}; plans mapped now: {}; already mapped: {}",
                    list_or_none(&report.meters_mapped),
                    list_or_none(&report.plans_mapped),
                    report.unchanged
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        StripeCommand::Customers { customer, json } => {
            let client = stripe::client_from_config(config, ClientSettings::default())?;
            let report = catalog::sync_customers(pool, &client, customer.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "Stripe customers created: {}; subscriptions created: {}; failed: {}",
                    report.customers_created,
                    report.subscriptions_created,
                    report.failed.len()
                );
                for failure in &report.failed {
                    println!("  {}: {}", failure.customer_id, failure.error);
                }
            }
            Ok(exit_code(report.failed.is_empty()))
        }
        StripeCommand::Sync {
            customer,
            date,
            rate,
            json,
        } => {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 100.0,
                "--rate must be above 0 and at most 100 (Stripe's limit)"
            );
            let day = date
                .as_deref()
                .map(|d| {
                    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
                        .with_context(|| format!("--date {d:?}: expected YYYY-MM-DD"))
                })
                .transpose()?;
            let settings = ClientSettings {
                requests_per_second: rate,
                ..ClientSettings::default()
            };
            let client = stripe::client_from_config(config, settings)?;
            let request = sync::SyncRequest { customer, day, now };
            let summary = sync::sync_usage(pool, &client, &request).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_summary(&summary);
            }
            // Anything that needs a person fails the run, so the cron job's alert fires.
            Ok(exit_code(
                summary.failed.is_empty()
                    && !summary.stopped_early
                    && summary.shrunk.is_empty()
                    && summary.unconfirmed.is_empty(),
            ))
        }
    }
}

fn print_summary(summary: &sync::SyncSummary) {
    let days = match (summary.days.first(), summary.days.last()) {
        (Some(first), Some(last)) if first == last => first.to_string(),
        (Some(first), Some(last)) => format!("{first} to {last}"),
        _ => "none".to_owned(),
    };
    println!(
        "Stripe usage sync, days {days}: {} customers, {} meter events sent ({} corrections)",
        summary.customers, summary.events_sent, summary.corrections
    );
    for (metric, quantity) in &summary.quantity_sent {
        println!("  {metric}: {quantity}");
    }
    if !summary.unmapped_customers.is_empty() {
        println!(
            "  not in Stripe yet (run `apexctl stripe customers`): {}",
            summary.unmapped_customers.join(", ")
        );
    }
    for day in &summary.shrunk {
        println!(
            "  to check: {} {} {} total {} is below the {} reported",
            day.customer_id, day.metric_type, day.usage_date, day.total, day.reported
        );
    }
    for event in &summary.unconfirmed {
        println!(
            "  to check: {} {} {} pending event {} of {}: Stripe holds {}, we had {} accepted",
            event.customer_id,
            event.metric_type,
            event.usage_date,
            event.identifier,
            event.pending,
            event.stripe_total,
            event.reported
        );
    }
    for failure in &summary.failed {
        println!("  failed: {}: {}", failure.customer_id, failure.error);
    }
    if summary.stopped_early {
        println!("  stopped early: Stripe could not be reached for several customers in a row");
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".to_owned()
    } else {
        items.join(", ")
    }
}

fn exit_code(ok: bool) -> ExitCode {
    if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
