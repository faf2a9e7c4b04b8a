//! The Stripe side of dunning: the guide's `processDunningRetries()` (the `dunning_retries`
//! job at 03:00, its hourly follow-up of retries Stripe could not take, `apexctl dunning
//! process`). Each due retry is claimed (`FOR UPDATE SKIP LOCKED`, so two runs at once make
//! each attempt once), its invoice read from Stripe (paid already means succeeded: a
//! retry whose answer was lost is never sent twice; voided closes the case), then paid with
//! `POST /v1/invoices/{id}/pay` under an idempotency key per invoice and attempt, and the
//! answer recorded by [`apex_billing::dunning::record_attempt`] with everything it decides.
//!
//! Stripe's answers: 200 with the invoice paid is a success; 402 (`card_error`: a declined
//! card) a failed attempt; anything the client cannot get through after its own retries
//! (5xx, timeouts, 429, no connection) or an answer we cannot act on (another 4xx, a 200
//! that is not paid yet) puts the attempt off by the policy's postponement, never skips it
//! and never counts as a decline: a customer is never suspended for our or Stripe's
//! trouble. After three retries in a row could not reach Stripe, the run stops calling it
//! and puts off the rest.

use apex_billing::dunning::{self, AttemptResult, Claim, Policy, Recorded};
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stripe_billing::invoice::{PayInvoice, RetrieveInvoice};

use crate::client::{StripeClient, StripeError};
use crate::{Outage, StripeWorkError};

/// What a run should take.
#[derive(Debug, Clone, Copy)]
pub struct RunRequest {
    /// The run's time (the cron process's clock).
    pub now: DateTime<Utc>,
    /// Only retries put off before (the hourly follow-up); else every due retry.
    pub only_postponed: bool,
}

/// What a run did, for `cron_runs.details` and the CLI.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RunSummary {
    /// Retries made, one entry each.
    pub attempts: Vec<AttemptSummary>,
    /// "Payment retry X of 3" emails enqueued.
    pub notices: u64,
    /// Cases closed because their customer was exempted.
    pub exempt_closed: u64,
    /// The run stopped calling Stripe after it could not be reached.
    pub stripe_unreachable: bool,
    /// Open cases after the run: retrying, suspended.
    pub open_cases: (i64, i64),
}

impl RunSummary {
    /// Retries put off.
    pub fn postponed(&self) -> usize {
        self.attempts
            .iter()
            .filter(|a| matches!(a.recorded, Recorded::Postponed { .. }))
            .count()
    }
}

/// One retry of a run.
#[derive(Debug, Clone, Serialize)]
pub struct AttemptSummary {
    /// Our customer.
    pub customer_id: String,
    /// Stripe's invoice.
    pub invoice_id: String,
    /// 1..N.
    pub attempt: i32,
    /// What was recorded.
    #[serde(flatten)]
    pub recorded: Recorded,
    /// The decline or the reason it was put off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

/// The invoice fields a retry reads.
#[derive(Debug, Deserialize)]
struct InvoiceState {
    status: Option<String>,
    amount_paid: Option<i64>,
}

/// Runs dunning once at `request.now`: exempted customers' cases closed, every due retry
/// made and recorded, then the retry emails of attempts due within 24 hours. Errors are the
/// store's; Stripe's trouble is recorded per attempt instead.
pub async fn process(
    pool: &PgPool,
    stripe: &StripeClient,
    policy: &Policy,
    request: RunRequest,
) -> Result<RunSummary, StripeWorkError> {
    let now = request.now;
    let mut summary = RunSummary {
        exempt_closed: dunning::close_exempt_cases(&mut *pool.acquire().await?, now).await?,
        ..RunSummary::default()
    };
    let mut outage = Outage::default();
    while let Some(claim) = dunning::claim_next(pool, now, request.only_postponed).await? {
        let result = if outage.is_on() {
            summary.stripe_unreachable = true;
            AttemptResult::Postponed {
                reason: "Stripe could not be reached by this run".into(),
            }
        } else {
            let (result, error) = attempt(stripe, &claim).await;
            outage.record(error.map(StripeWorkError::Stripe).as_ref());
            result
        };
        let recorded =
            dunning::record_attempt(&mut *pool.acquire().await?, policy, &claim, &result, now)
                .await?;
        let detail = match &result {
            AttemptResult::Declined { code, message } => Some(match code {
                Some(code) => format!("{code}: {message}"),
                None => message.clone(),
            }),
            AttemptResult::Postponed { reason } => Some(reason.clone()),
            _ => None,
        };
        log(&claim, &recorded, detail.as_deref());
        summary.attempts.push(AttemptSummary {
            customer_id: claim.customer_id.clone(),
            invoice_id: claim.invoice_id.clone(),
            attempt: claim.attempt_number,
            recorded,
            detail,
        });
    }
    summary.notices =
        dunning::send_due_notices(&mut *pool.acquire().await?, policy, now, None).await?;
    summary.open_cases = record_open_cases(pool).await?;
    Ok(summary)
}

/// Sets the open-cases gauge from the table; returns (retrying, suspended).
pub async fn record_open_cases(pool: &PgPool) -> Result<(i64, i64), StripeWorkError> {
    let (retrying, suspended) = dunning::open_cases(pool).await?;
    metrics::gauge!(apex_billing::names::DUNNING_OPEN_CASES, "state" => "retrying")
        .set(retrying as f64);
    metrics::gauge!(apex_billing::names::DUNNING_OPEN_CASES, "state" => "suspended")
        .set(suspended as f64);
    Ok((retrying, suspended))
}

fn log(claim: &Claim, recorded: &Recorded, detail: Option<&str>) {
    match recorded {
        Recorded::Postponed { until } => tracing::warn!(
            invoice = %claim.invoice_id,
            attempt = claim.attempt_number,
            %until,
            reason = detail.unwrap_or(""),
            "dunning retry put off"
        ),
        other => tracing::info!(
            invoice = %claim.invoice_id,
            customer = %claim.customer_id,
            attempt = claim.attempt_number,
            outcome = ?other,
            detail = detail.unwrap_or(""),
            "dunning retry"
        ),
    }
}

/// Makes one retry: reads the invoice, pays it if it is still open. Returns the result and,
/// when Stripe could not be reached, the error (for the run's outage rule).
async fn attempt(stripe: &StripeClient, claim: &Claim) -> (AttemptResult, Option<StripeError>) {
    let current: InvoiceState = match stripe
        .send(&RetrieveInvoice::new(claim.invoice_id.as_str()), None)
        .await
    {
        Ok(invoice) => invoice,
        Err(error) => return postponed("reading the invoice", error),
    };
    match current.status.as_deref() {
        Some("paid") => {
            return (
                AttemptResult::Paid {
                    amount_paid_cents: current.amount_paid,
                },
                None,
            );
        }
        Some("void") => return (AttemptResult::Voided, None),
        // Stripe takes payment of an uncollectible invoice too.
        Some("open") | Some("uncollectible") => {}
        other => {
            return (
                AttemptResult::Postponed {
                    reason: format!(
                        "the invoice is {}, not open: nothing to pay",
                        other.unwrap_or("of no status")
                    ),
                },
                None,
            );
        }
    }
    let key = claim.idempotency_key();
    match stripe
        .send::<InvoiceState>(&PayInvoice::new(claim.invoice_id.as_str()), Some(&key))
        .await
    {
        Ok(paid) if paid.status.as_deref() == Some("paid") => (
            AttemptResult::Paid {
                amount_paid_cents: paid.amount_paid,
            },
            None,
        ),
        // Accepted but not settled (a payment still processing): the next try reads it.
        Ok(other) => (
            AttemptResult::Postponed {
                reason: format!(
                    "Stripe took the payment but the invoice is {}",
                    other.status.as_deref().unwrap_or("of no status")
                ),
            },
            None,
        ),
        Err(StripeError::Api {
            status: 402,
            code,
            message,
            decline_code,
            ..
        }) => (
            AttemptResult::Declined {
                code: decline_code.or(code),
                message,
            },
            None,
        ),
        Err(error) => postponed("paying the invoice", error),
    }
}

fn postponed(doing: &str, error: StripeError) -> (AttemptResult, Option<StripeError>) {
    let reason = format!("{doing}: {error}");
    let unreachable = error.is_retryable().then_some(error);
    (AttemptResult::Postponed { reason }, unreachable)
}
