//! `apexctl reconcile`: one period compared across the stores and Stripe
//! ([`apex_stripe::reconcile`]), printed as a table of what is not ok with a summary, or as
//! JSON. Exit codes: 0 no drift, 1 drift (or bad input), 3 the comparison could not be
//! made (a store or Stripe failed: a partial comparison could hide drift).

use std::process::ExitCode;

use anyhow::Context;
use apex_billing::pricing;
use apex_stripe::client::ClientSettings;
use apex_stripe::reconcile::{self, Report, Request, Verdict};
use clap::Args;

use crate::config::CtlConfig;

/// The exit code of a run that could not compare (a store or Stripe failed).
const EXIT_NOT_CHECKED: u8 = 3;

/// `apexctl reconcile --period YYYY-MM [--customer C] [--stripe] [--json]`.
///
/// Exit codes: 0 no drift; 1 drift, or bad input (a bad `--period`, an unknown customer);
/// 3 the comparison could not be made (a store or Stripe failed).
#[derive(Args)]
#[command(
    after_help = "Exit codes: 0 no drift (unsynced differences are not drift); 1 drift, or bad \
                  input (a bad --period, an unknown customer); 3 the comparison could not be \
                  made (a store or Stripe failed)."
)]
pub(crate) struct ReconcileArgs {
    /// The billing period, `YYYY-MM` (UTC).
    #[arg(long)]
    pub(crate) period: String,
    /// Only this customer (`cus_...`).
    #[arg(long)]
    pub(crate) customer: Option<String>,
    /// Also compare with Stripe's own meter event summaries and invoices (needs
    /// `STRIPE_SECRET_KEY`).
    #[arg(long)]
    pub(crate) stripe: bool,
    /// Print JSON: the report (`period`, `stripe`, `unmapped_customers`,
    /// `unknown_customers`, `pipeline` (per log: `postgres_end`, `clickhouse_end`,
    /// `lag_seconds`), `warnings`, `pairs`), its `summary` (per check: ok, drift, unsynced)
    /// and `clean`.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn run(
    args: ReconcileArgs,
    ctl: &CtlConfig,
    pool: &sqlx::PgPool,
    now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    let period = pricing::parse_month(&args.period).with_context(|| {
        format!(
            "--period {:?}: expected a month YYYY-MM (0000-01 to 9998-12)",
            args.period
        )
    })?;
    anyhow::ensure!(
        period.start.timestamp() >= 0,
        "--period {}: usage is stored from 1970 on",
        args.period
    );
    // ClickHouse's `Date` ends in 2105 (days since 1970 in 16 bits).
    anyhow::ensure!(
        period.end <= chrono::DateTime::from_timestamp(4_291_747_200, 0).expect("2106-01-01"),
        "--period {}: usage is stored up to 2105",
        args.period
    );
    let client = if args.stripe {
        Some(apex_stripe::client_from_config(
            &ctl.cron.stripe,
            ClientSettings {
                requests_per_second: ctl.cron.stripe_rate,
                ..ClientSettings::default()
            },
        )?)
    } else {
        None
    };
    let request = Request {
        period,
        customer: args.customer,
        now,
        settled: false,
    };
    let report = match reconcile::reconcile(pool, &ctl.cron.stores, client.as_ref(), &request).await
    {
        Ok(report) => report,
        // Bad input is exit 1 like every apexctl error; a failing store or Stripe is not
        // drift, and says so by its own code.
        Err(e @ apex_stripe::StripeWorkError::Invalid(_)) if is_bad_input(&e) => {
            return Err(e.into());
        }
        Err(e) => {
            eprintln!("apexctl: reconcile could not compare the stores: {e}");
            return Ok(ExitCode::from(EXIT_NOT_CHECKED));
        }
    };
    if args.json {
        let mut value = serde_json::to_value(&report)?;
        value["summary"] = serde_json::to_value(report.summary())?;
        value["clean"] = report.is_clean().into();
        println!("{value}");
    } else {
        print_text(&report);
    }
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// An unknown customer (the one error of the request itself).
fn is_bad_input(error: &apex_stripe::StripeWorkError) -> bool {
    matches!(error, apex_stripe::StripeWorkError::Invalid(m) if m.starts_with("customer ") && m.ends_with(" not found"))
}

fn print_text(report: &Report) {
    let open: Vec<_> = report
        .pairs
        .iter()
        .filter(|p| p.verdict != Verdict::Ok)
        .collect();
    if !open.is_empty() {
        println!(
            "{:<8} {:<34} {:<24} {:<14} {:<24} {:>16} {:>16} {:>14}  note",
            "verdict", "check", "customer", "metric", "day/line", "left", "right", "difference"
        );
        for pair in open {
            let verdict = match pair.verdict {
                Verdict::Drift => "DRIFT",
                Verdict::Unsynced => "unsynced",
                Verdict::Ok => "ok",
            };
            println!(
                "{:<8} {:<34} {:<24} {:<14} {:<24} {:>16} {:>16} {:>+14}  {}",
                verdict,
                pair.check,
                pair.customer_id,
                pair.metric_type.as_deref().unwrap_or("-"),
                pair.day.as_deref().or(pair.line.as_deref()).unwrap_or("-"),
                pair.left,
                pair.right,
                pair.difference,
                pair.note.as_deref().unwrap_or("")
            );
        }
    }
    for warning in &report.warnings {
        println!("warning: {warning}");
    }
    for log in report.pipeline.iter().filter(|l| l.lag_seconds > 0) {
        println!(
            "pipeline log {}: Postgres at {}, ClickHouse at {}, {} s behind",
            log.log_id, log.postgres_end, log.clickhouse_end, log.lag_seconds
        );
    }
    if !report.unknown_customers.is_empty() {
        println!(
            "usage of customers with no customers row (only the raw events and rollups \
             compared): {}",
            report.unknown_customers.join(", ")
        );
    }
    if !report.unmapped_customers.is_empty() {
        println!(
            "not mapped to Stripe (nothing reported or invoiced to compare): {}",
            report.unmapped_customers.join(", ")
        );
    }
    let counts = report.summary();
    // In the checks' order; those that ask Stripe only when it was asked.
    let summary: Vec<String> = reconcile::CHECKS
        .iter()
        .filter(|check| report.stripe || !reconcile::STRIPE_CHECKS.contains(check))
        .map(|check| {
            let c = counts.get(check).copied().unwrap_or_default();
            format!(
                "{check} {} ok, {} drift, {} unsynced",
                c.ok, c.drift, c.unsynced
            )
        })
        .collect();
    println!(
        "reconcile {}{}: {} — {}",
        report.period,
        if report.stripe { " (with Stripe)" } else { "" },
        if report.is_clean() {
            "no drift"
        } else {
            "DRIFT"
        },
        summary.join("; ")
    );
}
