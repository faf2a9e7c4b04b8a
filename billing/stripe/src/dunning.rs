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
//! and puts off the rest. A run that put anything off for Stripe's sake (or could not record
//! a retry) fails, for the alert ([`RunSummary::failure`]).

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
    /// Retries put off because Stripe could not be reached or refused us (a 5xx, a timeout,
    /// a 429 after the client's own tries; or a 401, 404 or other 4xx that is not a
    /// decline): the run fails for the alert.
    pub stripe_errors: usize,
    /// The last of those errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_stripe_error: Option<String>,
    /// Retries whose outcome could not be recorded (Postgres failed): each is taken up
    /// again once its lease has passed; the run fails.
    pub record_errors: Vec<String>,
    /// Open cases after the run: retrying, suspended.
    pub open_cases: (i64, i64),
}

impl RunSummary {
    /// Why the run should fail (for the cron job's alert and `apexctl dunning process`'s
    /// exit status), if it should: Stripe trouble or a retry that could not be recorded.
    pub fn failure(&self) -> Option<String> {
        if !self.record_errors.is_empty() {
            return Some(format!(
                "{} retries could not be recorded (they are taken up again): {}",
                self.record_errors.len(),
                self.record_errors.join("; ")
            ));
        }
        (self.stripe_errors > 0 || self.stripe_unreachable).then(|| {
            format!(
                "{} retries were put off: Stripe could not be reached or refused us{}",
                self.stripe_errors.max(1),
                self.last_stripe_error
                    .as_deref()
                    .map(|e| format!(" ({e})"))
                    .unwrap_or_default()
            )
        })
    }

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
            if let Some(error) = &error {
                summary.stripe_errors += 1;
                summary.last_stripe_error = Some(error.to_string());
            }
            outage.record(
                error
                    .filter(StripeError::is_retryable)
                    .map(StripeWorkError::Stripe)
                    .as_ref(),
            );
            result
        };
        let recorded = match dunning::record_attempt(
            &mut *pool.acquire().await?,
            policy,
            &claim,
            &result,
            now,
        )
        .await
        {
            Ok(recorded) => recorded,
            // The claim stays `retrying`: another run takes it up after the lease, with the
            // same key; the other due retries of this run go on.
            Err(e) => {
                tracing::error!(invoice = %claim.invoice_id, error = %e, "cannot record a dunning retry");
                summary.record_errors.push(format!(
                    "{} attempt {}: {e}",
                    claim.invoice_id, claim.attempt_number
                ));
                continue;
            }
        };
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
    // The retry emails go with the daily run (the day before each retry, at 03:00); the
    // hourly follow-up only makes retries that were put off.
    if !request.only_postponed {
        summary.notices =
            dunning::send_due_notices(&mut *pool.acquire().await?, policy, now, None).await?;
    }
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
/// when Stripe could not be reached or refused us (anything but a decline), the error.
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
    (AttemptResult::Postponed { reason }, Some(error))
}
