//! `apexctl dunning ...`: the guide's manual dunning operations. `status` (the guide's "check
//! dunning status" and "dunning history"), `process` (its `processDunningRetries()`: the
//! `dunning_retries` job's work now, same rules), `reactivate` (its `reactivateSubscription`,
//! recording who and why), `pending` (the guide's "check pending retries" under "Dunning not
//! processing retries"), and ours: `exempt` a customer, `close` a case by hand.

use std::process::ExitCode;

use anyhow::Context;
use apex_billing::BillingError;
use apex_billing::customers::{self, MatchedBy};
use apex_billing::dunning::{self, DunningRow, Policy};
use apex_billing::statement::dollars;
use apex_stripe::client::ClientSettings;
use apex_stripe::config::StripeConfig;
use apex_stripe::dunning::{RunRequest, process};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum DunningCommand {
    /// A customer's dunning: its status, exemption and every case with its attempts, newest
    /// first (the guide's "check dunning status" and "dunning history").
    Status {
        /// Our customer id or its Stripe customer id (both `cus_...`); the answer says which
        /// matched.
        #[arg(long)]
        customer: String,
        /// At most this many rows.
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Retries due now that no run has made yet, soonest due first (the guide's "check
    /// pending retries": `pending` or `retrying`, `next_retry_at` passed). Retries fall due
    /// at 00:00 UTC of their day and the 03:00 `dunning_retries` run makes them, so a few
    /// hours in this list is normal; `apexctl doctor` says when one is late.
    Pending {
        /// At most this many rows (1 to 10000).
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON: `now`, `total` (every due retry, beyond `--limit` too) and `retries`
        /// (times in UTC).
        #[arg(long)]
        json: bool,
    },
    /// Make every due payment retry now, as the 03:00 `dunning_retries` job does (the guide's
    /// `processDunningRetries()`; safe to run again: each attempt is made once). Exits 1 when
    /// a retry was put off because Stripe could not be reached or refused us (never skipped).
    Process {
        /// Stripe requests per second at most.
        #[arg(long, env = "APEX_STRIPE_RATE", default_value_t = 50.0)]
        rate: f64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Restore service to a customer dunning suspended (the guide's
    /// `reactivateSubscription`): its suspending cases close as `reactivated`, its keys work
    /// again within a second. The invoices stay unpaid in Stripe.
    Reactivate {
        /// Our customer id or its Stripe customer id.
        #[arg(long)]
        customer: String,
        /// Its live subscription: our id or Stripe's `sub_...`.
        #[arg(long)]
        subscription: String,
        /// Why (recorded with who: `--by`, else $SUDO_USER or $USER).
        #[arg(long)]
        reason: Option<String>,
        /// Who (default $SUDO_USER, else $USER).
        #[arg(long)]
        by: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Exempt a customer from dunning (no retries, no dunning email, never suspended by it),
    /// closing its open cases; `--off` ends the exemption.
    Exempt {
        /// Our customer id or its Stripe customer id.
        #[arg(long)]
        customer: String,
        /// End the exemption.
        #[arg(long)]
        off: bool,
        /// Why (recorded with who).
        #[arg(long)]
        reason: Option<String>,
        /// Who (default $SUDO_USER, else $USER).
        #[arg(long)]
        by: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Close one invoice's open case by hand: no more retries; the customer is reactivated
    /// if this case alone suspended it.
    Close {
        /// Stripe's invoice id (`in_...`).
        #[arg(long)]
        invoice: String,
        /// Why (recorded with who).
        #[arg(long)]
        reason: Option<String>,
        /// Who (default $SUDO_USER, else $USER).
        #[arg(long)]
        by: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// Who runs the command: `--by`, else `$SUDO_USER`, else `$USER`, else "operator".
fn operator(by: Option<String>) -> String {
    [
        by,
        std::env::var("SUDO_USER").ok(),
        std::env::var("USER").ok(),
    ]
    .into_iter()
    .flatten()
    .map(|s| s.trim().to_owned())
    .find(|s| !s.is_empty())
    .unwrap_or_else(|| "operator".into())
}

/// The customer an operator named, by either id, or a clear error.
async fn customer(
    pool: &PgPool,
    id: &str,
) -> anyhow::Result<(customers::DunningContact, MatchedBy)> {
    customers::dunning_contact(pool, id)
        .await?
        .with_context(|| format!("no customer has the id or the Stripe customer id {id:?}"))
}

fn matched(by: MatchedBy) -> &'static str {
    match by {
        MatchedBy::CustomerId => "our customer id",
        MatchedBy::StripeCustomerId => "its Stripe customer id",
    }
}

pub(crate) async fn run(
    command: DunningCommand,
    pool: &PgPool,
    stripe: &StripeConfig,
    policy: &Policy,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        DunningCommand::Status {
            customer: id,
            limit,
            json,
        } => {
            anyhow::ensure!(limit >= 1, "--limit must be at least 1");
            let (contact, by) = customer(pool, &id).await?;
            let rows = dunning::history(pool, &contact.id, limit).await?;
            let subscription = apex_billing::subscriptions::live(pool, &contact.id).await?;
            if json {
                println!(
                    "{}",
                    json!({
                        "matched": by,
                        "customer": contact,
                        "subscription": subscription.as_ref().map(|s| json!({
                            "id": s.0, "status": s.1, "stripe_subscription_id": s.2})),
                        "rows": rows,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "customer {} ({}) matched by {}: status {}{}; subscription {}",
                contact.id,
                contact.name,
                matched(by),
                contact.status,
                if contact.dunning_exempt {
                    format!(
                        ", exempt from dunning ({})",
                        contact.dunning_exempt_note.as_deref().unwrap_or("")
                    )
                } else {
                    String::new()
                },
                subscription
                    .map(|s| format!("{} {}", s.0, s.1))
                    .unwrap_or_else(|| "none".into()),
            );
            if rows.is_empty() {
                println!("no dunning case");
            } else {
                print_rows(&rows);
            }
        }
        DunningCommand::Pending { limit, json } => {
            anyhow::ensure!(
                (1..=10_000).contains(&limit),
                "--limit must be 1 to 10000, not {limit}"
            );
            let rows = dunning::due_retries(pool, now, limit).await?;
            let (total, _) = dunning::due_retries_count(pool, now).await?;
            if json {
                println!("{}", json!({"now": now, "total": total, "retries": rows}));
            } else if rows.is_empty() {
                println!("no retry is due");
            } else {
                println!(
                    "{:<8} {:<24} {:<24} {:>7} {:<10} {:<20}",
                    "id", "customer", "invoice", "attempt", "status", "next_retry_at (UTC)"
                );
                for r in &rows {
                    println!(
                        "{:<8} {:<24} {:<24} {:>7} {:<10} {:<20}",
                        r.id,
                        r.customer_id,
                        r.invoice_id,
                        r.attempt_number,
                        r.status,
                        minute_or_dash(r.next_retry_at),
                    );
                }
                if total > rows.len() as i64 {
                    println!("... {} more (--limit)", total - rows.len() as i64);
                }
            }
        }
        DunningCommand::Process { rate, json } => {
            let settings = ClientSettings {
                requests_per_second: rate,
                ..ClientSettings::default()
            };
            let client = apex_stripe::client_from_config(stripe, settings)?;
            let summary = process(
                pool,
                &client,
                policy,
                RunRequest {
                    now,
                    only_postponed: false,
                },
            )
            .await?;
            if json {
                println!("{}", serde_json::to_string(&summary)?);
            } else {
                for a in &summary.attempts {
                    println!(
                        "{} {} attempt {}: {}{}",
                        a.customer_id,
                        a.invoice_id,
                        a.attempt,
                        serde_json::to_value(a.recorded)?["outcome"]
                            .as_str()
                            .unwrap_or("?"),
                        a.detail
                            .as_deref()
                            .map(|d| format!(" ({d})"))
                            .unwrap_or_default()
                    );
                }
                println!(
                    "{} retries made ({} put off), {} retry emails enqueued, {} exempt cases \
                     closed; open cases: {} retrying, {} suspended",
                    summary.attempts.len(),
                    summary.postponed(),
                    summary.notices,
                    summary.exempt_closed,
                    summary.open_cases.0,
                    summary.open_cases.1
                );
            }
            if let Some(failure) = summary.failure() {
                eprintln!("apexctl: {failure}");
                return Ok(ExitCode::FAILURE);
            }
        }
        DunningCommand::Reactivate {
            customer: id,
            subscription,
            reason,
            by,
            json,
        } => {
            let (contact, matched_by) = customer(pool, &id).await?;
            let who = operator(by);
            let done = dunning::reactivate_by_operator(
                &mut *pool.acquire().await?,
                &contact.id,
                &subscription,
                &who,
                reason.as_deref(),
                now,
            )
            .await
            .map_err(plain)?;
            if json {
                println!(
                    "{}",
                    json!({"customer_id": contact.id, "matched": matched_by, "by": who,
                           "reason": reason, "result": done})
                );
            } else if !done.customer_reactivated && done.cases_closed.is_empty() {
                println!(
                    "{} was not suspended (status {}); nothing to reactivate; subscription {}",
                    contact.id,
                    contact.status,
                    done.subscription_status.as_deref().unwrap_or("none")
                );
            } else {
                println!(
                    "{} reactivated by {who}: {} suspending case(s) closed{}; subscription {}",
                    contact.id,
                    done.cases_closed.len(),
                    if done.cases_closed.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", done.cases_closed.join(", "))
                    },
                    done.subscription_status.as_deref().unwrap_or("none")
                );
            }
        }
        DunningCommand::Exempt {
            customer: id,
            off,
            reason,
            by,
            json,
        } => {
            let (contact, matched_by) = customer(pool, &id).await?;
            let who = operator(by);
            let closed = dunning::set_exempt(
                &mut *pool.acquire().await?,
                &contact.id,
                !off,
                &who,
                reason.as_deref(),
                now,
            )
            .await
            .map_err(plain)?;
            if json {
                println!(
                    "{}",
                    json!({"customer_id": contact.id, "matched": matched_by, "exempt": !off,
                           "by": who, "cases_closed": closed})
                );
            } else if off {
                println!("{} is dunned again", contact.id);
            } else {
                println!(
                    "{} is exempt from dunning ({} open case(s) closed)",
                    contact.id,
                    closed.len()
                );
            }
        }
        DunningCommand::Close {
            invoice,
            reason,
            by,
            json,
        } => {
            let who = operator(by);
            let settled = dunning::close_by_operator(
                &mut *pool.acquire().await?,
                &invoice,
                &who,
                reason.as_deref(),
                now,
            )
            .await
            .map_err(plain)?;
            if json {
                println!(
                    "{}",
                    json!({"invoice_id": invoice, "closed": true, "by": who,
                           "customer_reactivated": settled.customer_reactivated})
                );
            } else {
                println!(
                    "the dunning case of {invoice} is closed{}",
                    if settled.customer_reactivated {
                        "; the customer is reactivated"
                    } else {
                        ""
                    }
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// A billing refusal as the operator's message, without a "database error" wrapper for the
/// ones that are the operator's input.
fn plain(e: BillingError) -> anyhow::Error {
    match e {
        BillingError::Invalid(message) => anyhow::anyhow!(message),
        other => other.into(),
    }
}

/// A time in the tables, to the minute (UTC); `-` for none.
fn minute_or_dash(at: Option<DateTime<Utc>>) -> String {
    at.map(|t| t.format("%Y-%m-%d %H:%M").to_string())
        .unwrap_or_else(|| "-".into())
}

fn print_rows(rows: &[DunningRow]) {
    println!(
        "{:<8} {:<24} {:>7} {:<10} {:<20} {:>10}  detail",
        "id", "invoice", "attempt", "status", "next_retry_at", "amount"
    );
    for r in rows {
        let detail = if r.attempt_number == 0 {
            let failed = r
                .failed_at
                .map(|t| format!("failed {}", t.format("%Y-%m-%d %H:%M")))
                .unwrap_or_default();
            match (&r.resolution, r.suspended_at) {
                (Some(resolution), _) => format!(
                    "{failed}; closed {} ({resolution}{})",
                    r.resolved_at
                        .map(|t| t.format("%Y-%m-%d %H:%M").to_string())
                        .unwrap_or_default(),
                    r.resolved_by
                        .as_deref()
                        .map(|b| format!(
                            " by {b}{}",
                            r.resolution_note
                                .as_deref()
                                .map(|n| format!(": {n}"))
                                .unwrap_or_default()
                        ))
                        .unwrap_or_default()
                ),
                (None, Some(at)) => format!("{failed}; suspended {}", at.format("%Y-%m-%d %H:%M")),
                (None, None) => format!("{failed}; open"),
            }
        } else {
            [
                r.failure_code.clone(),
                r.last_error.clone(),
                (r.postponements > 0).then(|| format!("put off {} time(s)", r.postponements)),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join("; ")
        };
        println!(
            "{:<8} {:<24} {:>7} {:<10} {:<20} {:>10}  {}",
            r.id,
            r.invoice_id,
            r.attempt_number,
            r.status,
            minute_or_dash(r.next_retry_at),
            dollars(r.amount_due_cents.max(0).unsigned_abs()),
            detail
        );
    }
}
