//! `apexctl invoices ...`: the monthly invoices of the local mirror, closing a month for one
//! customer now (the `invoice_close` job's work, same rules), and what the invoicing left for
//! a person.

use std::process::ExitCode;

use anyhow::Context;
use apex_billing::invoices::{self, CloseSettings, Invoice, InvoiceWithLines};
use apex_billing::pricing::{self, Period};
use apex_billing::statement::dollars;
use apex_stripe::client::ClientSettings;
use apex_stripe::config::StripeConfig;
use apex_stripe::invoicing::{self, CloseRequest};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum InvoicesCommand {
    /// List invoices, newest month first.
    List {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// Only this month, `YYYY-MM` (UTC).
        #[arg(long)]
        period: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Show one customer's invoice of one month with its lines.
    Show {
        /// Customer id (`cus_...`).
        #[arg(long)]
        customer: String,
        /// Month, `YYYY-MM` (UTC).
        #[arg(long)]
        period: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close ended months now, as the daily `invoice_close` job does (safe to run again: no
    /// invoice or line is ever created twice). Exits 1 when a customer failed or a review was
    /// opened.
    Close {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// Only this month, `YYYY-MM` (it must have ended); default: the last two months.
        #[arg(long)]
        period: Option<String>,
        /// Stripe requests per second at most (Stripe allows 100 live, 25 in test mode).
        #[arg(long, env = "APEX_STRIPE_RATE", default_value_t = 50.0)]
        rate: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// What the invoicing left for a person: revenue that never came, credits awaiting
    /// approval, Stripe totals that did not match ours.
    PendingReview {
        /// Only this customer (`cus_...`).
        #[arg(long)]
        customer: Option<String>,
        /// Resolved ones too.
        #[arg(long)]
        all: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Resolve a review: approve a credit (`--approve --amount CENTS`: it goes on the
    /// customer's next invoice, once) or dismiss a review once handled.
    Review {
        /// The review's id (see `pending-review`).
        id: i64,
        /// Approve the credit of a negative adjustment.
        #[arg(
            long,
            conflicts_with = "dismiss",
            required_unless_present = "dismiss",
            requires = "amount"
        )]
        approve: bool,
        /// The credit you approve, in cents, as `pending-review` shows it (e.g. -9970): an
        /// approval never covers an amount you did not see.
        #[arg(long, allow_negative_numbers = true)]
        amount: Option<i64>,
        /// Dismiss: nothing is sent.
        #[arg(long)]
        dismiss: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn month(text: &str) -> anyhow::Result<Period> {
    pricing::parse_month(text).with_context(|| {
        format!("--period {text:?}: expected a month YYYY-MM (0000-01 to 9998-12)")
    })
}

pub(crate) async fn run(
    command: InvoicesCommand,
    pool: &PgPool,
    stripe: &StripeConfig,
    settings: CloseSettings,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        InvoicesCommand::List {
            customer,
            period,
            limit,
            json,
        } => {
            anyhow::ensure!(limit > 0, "--limit must be at least 1");
            let period = period.as_deref().map(month).transpose()?;
            let list =
                invoices::list(pool, customer.as_deref(), period.map(|p| p.start), limit).await?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no invoices");
            } else {
                for invoice in &list {
                    print_row(invoice);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        InvoicesCommand::Show {
            customer,
            period,
            json,
        } => {
            let period = month(&period)?;
            let invoice = invoices::for_period(pool, &customer, period.start)
                .await?
                .with_context(|| {
                    format!(
                        "{customer} has no invoice for {}",
                        invoices::month_text(period.start)
                    )
                })?;
            let lines = invoices::lines(pool, invoice.id).await?;
            let shown = InvoiceWithLines {
                month: invoice.month(),
                invoice,
                lines,
            };
            if json {
                println!("{}", serde_json::to_string(&shown)?);
            } else {
                print_row(&shown.invoice);
                for line in &shown.lines {
                    println!(
                        "  {:<28} {:>14}  {}",
                        line.line_key,
                        signed(line.amount_cents),
                        line.description
                    );
                }
                if let Some(url) = &shown.invoice.hosted_invoice_url {
                    println!("  {url}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        InvoicesCommand::Close {
            customer,
            period,
            rate,
            json,
        } => {
            anyhow::ensure!(
                rate.is_finite() && rate > 0.0 && rate <= 100.0,
                "--rate must be above 0 and at most 100 (Stripe's limit)"
            );
            let period = period.as_deref().map(month).transpose()?;
            let client = apex_stripe::client_from_config(
                stripe,
                ClientSettings {
                    requests_per_second: rate,
                    ..ClientSettings::default()
                },
            )?;
            let request = CloseRequest {
                customer,
                period,
                now,
                settings,
            };
            let summary = invoicing::close_invoices(pool, &client, &request).await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                print_close(&summary);
            }
            Ok(
                if summary.failed.is_empty()
                    && !summary.stopped_early
                    && summary.reviews_opened.is_empty()
                {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::FAILURE
                },
            )
        }
        InvoicesCommand::PendingReview {
            customer,
            all,
            json,
        } => {
            let list = invoices::reviews(pool, customer.as_deref(), all).await?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("nothing to review");
            } else {
                for review in &list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        review.id,
                        review.customer_id,
                        invoices::month_text(review.period_start),
                        review.kind,
                        signed(review.amount_cents),
                        review.resolution.as_deref().unwrap_or("open"),
                    );
                    println!("  {}", review.details);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        InvoicesCommand::Review {
            id,
            approve,
            amount,
            dismiss: _,
            json,
        } => {
            let resolution = if approve { "approved" } else { "dismissed" };
            let review = invoices::resolve_review(pool, id, resolution, amount, now).await?;
            if json {
                println!("{}", serde_json::to_string(&review)?);
            } else {
                println!(
                    "review {} ({} {} {}) {resolution}",
                    review.id,
                    review.customer_id,
                    invoices::month_text(review.period_start),
                    review.kind
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn signed(cents: i64) -> String {
    if cents < 0 {
        format!("-{}", dollars(cents.unsigned_abs()))
    } else {
        dollars(cents as u64)
    }
}

fn print_row(invoice: &Invoice) {
    println!(
        "{}\t{}\t{}\t{}\t{}",
        invoice.customer_id,
        invoice.month(),
        invoice.status,
        signed(invoice.total_cents),
        invoice.stripe_invoice_id.as_deref().unwrap_or("-"),
    );
}

fn print_close(summary: &invoicing::CloseSummary) {
    println!(
        "invoice close, months {}: {} customers, {} invoices issued, {} with nothing due, {} \
         already issued",
        summary.periods.join(", "),
        summary.customers,
        summary.issued.len(),
        summary.nothing_due,
        summary.already_issued
    );
    for issued in &summary.issued {
        println!(
            "  issued: {} {} {} {} ({})",
            issued.customer_id,
            issued.month,
            issued.stripe_invoice_id,
            signed(issued.total_cents),
            issued.status
        );
    }
    for waiting in &summary.waiting {
        println!(
            "  waiting for revenue: {} {} until {}",
            waiting.customer_id,
            waiting.month,
            waiting.until.format("%Y-%m-%d %H:%M")
        );
    }
    for review in &summary.reviews_opened {
        println!(
            "  to review ({}): {} {}: {}",
            review.id,
            review.customer_id,
            invoices::month_text(review.period_start),
            review.details
        );
    }
    if !summary.unmapped_customers.is_empty() {
        println!(
            "  not in Stripe yet (run `apexctl stripe customers`): {}",
            summary.unmapped_customers.join(", ")
        );
    }
    for failure in &summary.failed {
        println!("  failed: {}: {}", failure.customer_id, failure.error);
    }
    if summary.stopped_early {
        println!("  stopped early: Stripe could not be reached for several customers in a row");
    }
}
