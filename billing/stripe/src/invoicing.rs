//! The monthly invoice in Stripe (the `invoice_close` job; `apexctl invoices close`): for each
//! customer with a Stripe customer and each ended month, the lines `apex_billing::invoices`
//! decided (the preview's, plus adjustments) become a Stripe invoice, one invoice item per
//! line, finalized so Stripe collects it.
//!
//! Why invoice items on an invoice of our own rather than metered prices on the subscription:
//! the platform fee is a rate on the month's total revenue chosen by its band, with negotiated
//! rates and minimums, and overage is priced per block with one rounding per line; Stripe's
//! prices cannot express the first and would round the second differently. With one invoice
//! item per line, every amount comes from `apex_billing::pricing` (the preview's code), and
//! Stripe's total equals the preview's `total_cents` by construction; the job checks it on the
//! draft before it finalizes. The Stripe subscription stays on a $0 plan (see
//! [`crate::catalog`]), so Stripe's own subscription invoices never carry money.
//!
//! Idempotent at every step, like the usage sync:
//! - the row and its lines are written in Postgres before any Stripe call, and never change;
//! - each POST has a key derived from customer, month and line
//!   (`apex_invoice_<customer>_<YYYY-MM>[_<line>|_finalize]`), so a retry after a lost answer
//!   (429, 5xx, timeouts are retried by the client with the same key) gets the same object;
//! - each Stripe id is recorded as soon as Stripe answers; a run that died before recording
//!   one finds the object by its metadata (`apex_invoice_id` on the invoice, `apex_line` on
//!   each line) before creating anything, which also covers Stripe forgetting keys after 24
//!   hours;
//! - a finalized invoice is never finalized again: the draft's status is read first.
//!
//! One run per invoice at a time: a Postgres advisory lock per invoice, on a session that
//! closes with the run, so a stopped run never leaves it held.

use std::collections::HashMap;

use apex_billing::customers;
use apex_billing::invoices::{self, CloseSettings, Invoice, Prepared, Review, StripeState};
use apex_billing::pricing::Period;
use chrono::{DateTime, Duration, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stripe_billing::invoice::{
    CreateInvoice, CreateInvoicePendingInvoiceItemsBehavior, FinalizeInvoiceInvoice, ListInvoice,
    RetrieveInvoice,
};
use stripe_billing::invoice_item::{CreateInvoiceItem, Period as ItemPeriod};
use stripe_billing::invoice_line_item::ListInvoiceInvoiceLineItem;

use super::StripeWorkError;
use super::catalog::Failure;
use super::client::StripeClient;
use super::names;

/// What to close.
#[derive(Debug, Clone)]
pub struct CloseRequest {
    /// Only this customer (`--customer`).
    pub customer: Option<String>,
    /// Only this month (`--period`); it must have ended. Without it, the month before `now`
    /// and the one before that (a month still waiting for revenue, or missed while the job
    /// was down, is closed by a later run). Unless one customer is named, a month is closed
    /// only for customers who signed up before it ended and were not canceled before it
    /// began: a month outside a customer's life is never invoiced unasked.
    pub period: Option<Period>,
    /// The time the run treats as now (which months have ended, how long revenue is awaited).
    pub now: DateTime<Utc>,
    /// Waiting for revenue.
    pub settings: CloseSettings,
}

/// What a run did.
#[derive(Debug, Default, Clone, Serialize)]
pub struct CloseSummary {
    /// The months considered (`YYYY-MM`), oldest first.
    pub periods: Vec<String>,
    /// Customers looked at.
    pub customers: usize,
    /// Invoices finalized in Stripe by this run.
    pub issued: Vec<IssuedInvoice>,
    /// Months with nothing to charge (no Stripe invoice) decided in this run.
    pub nothing_due: usize,
    /// Months found already invoiced.
    pub already_issued: usize,
    /// Months waiting for their mediated revenue.
    pub waiting: Vec<WaitingInvoice>,
    /// Reviews opened for a person in this run.
    pub reviews_opened: Vec<Review>,
    /// Invoices another run was issuing at the same moment (left to it).
    pub busy: usize,
    /// Customers without a Stripe customer yet (`apexctl stripe customers`), not invoiced.
    pub unmapped_customers: Vec<String>,
    /// Customers whose invoicing failed; the others went on.
    pub failed: Vec<Failure>,
    /// True when the run stopped early because Stripe could not be reached.
    pub stopped_early: bool,
}

/// An invoice this run finalized.
#[derive(Debug, Clone, Serialize)]
pub struct IssuedInvoice {
    /// Our customer id.
    pub customer_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// Our invoice id.
    pub invoice_id: i64,
    /// Stripe's.
    pub stripe_invoice_id: String,
    /// Stripe's status after finalizing (`open`, or `paid` for a zero total).
    pub status: String,
    /// The total, cents.
    pub total_cents: i64,
}

/// A month waiting for revenue.
#[derive(Debug, Clone, Serialize)]
pub struct WaitingInvoice {
    /// Our customer id.
    pub customer_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// When it is issued without a fee line if revenue is still missing.
    pub until: DateTime<Utc>,
}

/// Closes the ended months of every mapped customer (or only the request's).
pub async fn close_invoices(
    pool: &PgPool,
    stripe: &StripeClient,
    request: &CloseRequest,
) -> Result<CloseSummary, StripeWorkError> {
    let periods = match request.period {
        Some(period) if period.end <= request.now => vec![period],
        Some(period) => {
            return Err(StripeWorkError::Invalid(format!(
                "the month {} has not ended yet: a month is invoiced once it is over",
                invoices::month_text(period.start)
            )));
        }
        None => {
            let last = invoices::previous_month(request.now);
            vec![invoices::previous_month(last.start), last]
        }
    };
    let mappings = customers::stripe_mappings(pool, request.customer.as_deref(), true).await?;
    if let Some(id) = &request.customer
        && mappings.is_empty()
    {
        return Err(StripeWorkError::Invalid(format!("customer {id} not found")));
    }
    let mut summary = CloseSummary {
        periods: periods
            .iter()
            .map(|p| invoices::month_text(p.start))
            .collect(),
        ..CloseSummary::default()
    };
    let mut outage = super::Outage::default();
    for customers::StripeMapping {
        id: customer_id,
        stripe_customer_id,
        created_at,
        canceled_at,
        ..
    } in mappings
    {
        summary.customers += 1;
        let periods: Vec<Period> = periods
            .iter()
            .filter(|p| {
                request.customer.is_some()
                    || (p.end > created_at && canceled_at.is_none_or(|c| p.start < c))
            })
            .copied()
            .collect();
        let Some(stripe_customer_id) = stripe_customer_id else {
            summary.unmapped_customers.push(customer_id);
            continue;
        };
        let customer = CustomerClose {
            pool,
            stripe,
            customer_id: &customer_id,
            stripe_customer_id: &stripe_customer_id,
            now: request.now,
        };
        match customer
            .run(&periods, &request.settings, &mut summary)
            .await
        {
            Ok(()) => outage.record(None),
            Err(error) => {
                tracing::warn!(customer_id, %error, "invoice close failed for a customer");
                metrics::counter!(names::INVOICE_FAILURES_TOTAL).increment(1);
                outage.record(Some(&error));
                summary.failed.push(Failure {
                    customer_id,
                    error: error.to_string(),
                });
                if outage.is_on() {
                    summary.stopped_early = true;
                    break;
                }
            }
        }
    }
    Ok(summary)
}

/// Sets `apex_stripe_invoices{status}` from the mirror (every status, zeros included).
pub async fn record_invoice_gauge(pool: &PgPool) -> Result<(), StripeWorkError> {
    for (status, count) in invoices::status_counts(pool).await? {
        metrics::gauge!(names::INVOICES, "status" => status).set(count as f64);
    }
    Ok(())
}

/// One customer's part of a run.
struct CustomerClose<'a> {
    pool: &'a PgPool,
    stripe: &'a StripeClient,
    customer_id: &'a str,
    stripe_customer_id: &'a str,
    now: DateTime<Utc>,
}

impl CustomerClose<'_> {
    async fn run(
        &self,
        periods: &[Period],
        settings: &CloseSettings,
        summary: &mut CloseSummary,
    ) -> Result<(), StripeWorkError> {
        let mut to_issue: Vec<Invoice> = Vec::new();
        let mut conn = self.pool.acquire().await?;
        for period in periods {
            match invoices::prepare(&mut conn, self.customer_id, period, self.now, settings).await?
            {
                Prepared::Existing(invoice) if invoice.is_issued() => summary.already_issued += 1,
                Prepared::Existing(invoice) => to_issue.push(invoice),
                Prepared::Waiting { until } => summary.waiting.push(WaitingInvoice {
                    customer_id: self.customer_id.to_owned(),
                    month: invoices::month_text(period.start),
                    until,
                }),
                Prepared::Written {
                    invoice,
                    reviews_opened,
                } => {
                    summary.reviews_opened.extend(reviews_opened);
                    if invoice.is_issued() {
                        summary.nothing_due += 1;
                    } else {
                        to_issue.push(invoice);
                    }
                }
            }
        }
        drop(conn);
        // Invoices of earlier months an interrupted run left unfinished.
        for invoice in invoices::unfinished(self.pool, Some(self.customer_id)).await? {
            if !to_issue.iter().any(|i| i.id == invoice.id) {
                to_issue.push(invoice);
            }
        }
        to_issue.sort_by_key(|i| i.period_start);
        let mut mismatched = Vec::new();
        for invoice in to_issue {
            match self.issue(invoice.id).await? {
                Issue::Finalized(issued) => summary.issued.push(issued),
                Issue::AlreadyDone => summary.already_issued += 1,
                Issue::Busy => summary.busy += 1,
                // The customer's other invoices still go out.
                Issue::Mismatch(review) => {
                    summary.reviews_opened.extend(review);
                    mismatched.push(invoice.id.to_string());
                }
            }
        }
        if mismatched.is_empty() {
            Ok(())
        } else {
            Err(StripeWorkError::Invalid(format!(
                "invoice {}: Stripe's total is not ours; listed for review (apexctl invoices \
                 pending-review)",
                mismatched.join(", ")
            )))
        }
    }

    /// Creates, fills and finalizes the Stripe invoice of our invoice `id`, resuming wherever
    /// an earlier run stopped.
    async fn issue(&self, id: i64) -> Result<Issue, StripeWorkError> {
        let mut lock = self.pool.acquire().await?;
        lock.close_on_drop();
        let locked: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(format!("apex_invoice:{id}"))
                .fetch_one(&mut *lock)
                .await?;
        if !locked {
            return Ok(Issue::Busy);
        }
        let outcome = self.issue_locked(id).await;
        let _ = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock(hashtextextended($1, 0))")
            .bind(format!("apex_invoice:{id}"))
            .fetch_one(&mut *lock)
            .await;
        outcome
    }

    async fn issue_locked(&self, id: i64) -> Result<Issue, StripeWorkError> {
        let invoice = invoices::by_id(self.pool, id)
            .await?
            .ok_or_else(|| StripeWorkError::Invalid(format!("invoice {id} is gone")))?;
        if invoice.is_issued() {
            return Ok(Issue::AlreadyDone);
        }
        let month = invoice.month();
        let key = format!("apex_invoice_{}_{month}", self.customer_id);
        let (stripe_id, created_now) = match invoice.stripe_invoice_id.clone() {
            Some(stripe_id) => (stripe_id, false),
            None => {
                let adopted = super::catalog::find_by_metadata(
                    self.stripe,
                    &ListInvoice::new()
                        .customer(self.stripe_customer_id)
                        .limit(100),
                    "apex_invoice_id",
                    &id.to_string(),
                )
                .await?;
                let (stripe_id, created_now) = match adopted {
                    Some(stripe_id) => (stripe_id, false),
                    None => {
                        let create = CreateInvoice::new()
                            .customer(self.stripe_customer_id)
                            .currency(stripe_types::Currency::USD)
                            .collection_method(
                                stripe_billing::InvoiceCollectionMethod::ChargeAutomatically,
                            )
                            // Stripe finalizes an auto-advancing draft by itself about an hour
                            // after creating it, lines complete or not: only our finalize
                            // (after the total check) turns collection on.
                            .auto_advance(false)
                            .pending_invoice_items_behavior(
                                CreateInvoicePendingInvoiceItemsBehavior::Exclude,
                            )
                            .description(format!("ApexMediation, {month}"))
                            .metadata(HashMap::from([
                                ("apex_invoice_id".to_owned(), id.to_string()),
                                ("apex_customer_id".to_owned(), self.customer_id.to_owned()),
                                ("apex_period".to_owned(), month.clone()),
                            ]));
                        let created: StripeInvoice = self.stripe.send(&create, Some(&key)).await?;
                        (created.id, true)
                    }
                };
                if !invoices::set_stripe_invoice(self.pool, id, &stripe_id, self.now).await? {
                    return Err(StripeWorkError::Invalid(format!(
                        "invoice {id} is recorded with another Stripe invoice than {stripe_id}"
                    )));
                }
                (stripe_id, created_now)
            }
        };
        let mut lines = invoices::lines(self.pool, id).await?;
        if !created_now && lines.iter().any(|l| l.stripe_invoice_item_id.is_none()) {
            // An earlier run may have created items and stopped before recording them.
            let listed: StripeList<StripeLine> = self
                .stripe
                .send(
                    &ListInvoiceInvoiceLineItem::new(stripe_id.as_str()).limit(100),
                    None,
                )
                .await?;
            for line in listed.data {
                if let (Some(key), Some(item)) = (
                    line.metadata.as_ref().and_then(|m| m.get("apex_line")),
                    line.invoice_item(),
                ) {
                    invoices::set_line_item(self.pool, id, key, &item).await?;
                }
            }
            lines = invoices::lines(self.pool, id).await?;
        }
        // Stripe's invoice item period is inclusive at both ends.
        let period = ItemPeriod::new(
            (invoice.period_end - Duration::seconds(1)).timestamp(),
            invoice.period_start.timestamp(),
        );
        for line in lines.iter().filter(|l| l.stripe_invoice_item_id.is_none()) {
            let item = CreateInvoiceItem::new()
                .customer(self.stripe_customer_id)
                .invoice(stripe_id.as_str())
                .amount(line.amount_cents)
                .currency(stripe_types::Currency::USD)
                .description(line.description.as_str())
                .period(period)
                .metadata(HashMap::from([
                    ("apex_line".to_owned(), line.line_key.clone()),
                    ("apex_invoice_id".to_owned(), id.to_string()),
                ]));
            let created: StripeObjectId = self
                .stripe
                .send(&item, Some(&format!("{key}_{}", line.line_key)))
                .await?;
            invoices::set_line_item(self.pool, id, &line.line_key, &created.id).await?;
        }
        let current: StripeInvoice = self
            .stripe
            .send(&RetrieveInvoice::new(stripe_id.as_str()), None)
            .await?;
        let matches =
            current.total == invoice.total_cents && current.currency.eq_ignore_ascii_case("usd");
        let finalized = if current.status.as_deref() == Some("draft") {
            if !matches {
                let details = format!(
                    "Stripe's draft {stripe_id} totals {} {} but our lines total {} usd: not \
                     finalized",
                    current.total, current.currency, invoice.total_cents
                );
                let review = invoices::open_review(
                    self.pool,
                    self.customer_id,
                    invoice.period_start,
                    "total_mismatch",
                    current.total - invoice.total_cents,
                    &details,
                    self.now,
                )
                .await?;
                return Ok(Issue::Mismatch(review));
            }
            let finalize = FinalizeInvoiceInvoice::new(stripe_id.as_str()).auto_advance(true);
            let finalized: StripeInvoice = self
                .stripe
                .send(&finalize, Some(&format!("{key}_finalize")))
                .await?;
            metrics::counter!(names::INVOICES_ISSUED_TOTAL).increment(1);
            for line in &lines {
                // A credit is not invoiced money; the counter only goes up.
                if let Ok(cents) = u64::try_from(line.amount_cents) {
                    metrics::counter!(names::INVOICED_CENTS_TOTAL, "kind" => kind_label(&line.kind))
                        .increment(cents);
                }
            }
            finalized
        } else {
            // Finalized already (an earlier run whose answer was lost, or a person in
            // Stripe's dashboard): still only recorded as ours if its total is ours.
            if !matches {
                let details = format!(
                    "Stripe's invoice {stripe_id} ({}) totals {} {} but our lines total {} usd",
                    current.status.as_deref().unwrap_or("?"),
                    current.total,
                    current.currency,
                    invoice.total_cents
                );
                let review = invoices::open_review(
                    self.pool,
                    self.customer_id,
                    invoice.period_start,
                    "total_mismatch",
                    current.total - invoice.total_cents,
                    &details,
                    self.now,
                )
                .await?;
                return Ok(Issue::Mismatch(review));
            }
            current
        };
        let state = finalized.state();
        invoices::record_finalized(self.pool, id, &state, self.now).await?;
        Ok(Issue::Finalized(IssuedInvoice {
            customer_id: self.customer_id.to_owned(),
            month,
            invoice_id: id,
            stripe_invoice_id: stripe_id,
            status: state.status,
            total_cents: invoice.total_cents,
        }))
    }
}

/// The label of a line kind (bounded: the kinds of `apex_billing::invoices::LINE_KINDS`).
fn kind_label(kind: &str) -> &'static str {
    invoices::LINE_KINDS
        .iter()
        .find(|k| **k == kind)
        .copied()
        .unwrap_or("other")
}

enum Issue {
    Finalized(IssuedInvoice),
    AlreadyDone,
    Busy,
    Mismatch(Option<Review>),
}

/// The parts of a Stripe invoice the job reads.
#[derive(Debug, Clone, Deserialize)]
struct StripeInvoice {
    id: String,
    status: Option<String>,
    #[serde(default)]
    total: i64,
    #[serde(default)]
    currency: String,
    amount_due: Option<i64>,
    amount_paid: Option<i64>,
    hosted_invoice_url: Option<String>,
    status_transitions: Option<Transitions>,
    next_payment_attempt: Option<i64>,
}

#[derive(Debug, Clone, Deserialize)]
struct Transitions {
    finalized_at: Option<i64>,
    paid_at: Option<i64>,
}

fn time(seconds: Option<i64>) -> Option<DateTime<Utc>> {
    seconds.and_then(|s| DateTime::from_timestamp(s, 0))
}

impl StripeInvoice {
    fn state(&self) -> StripeState {
        StripeState {
            status: self.status.clone().unwrap_or_default(),
            amount_due_cents: self.amount_due,
            amount_paid_cents: self.amount_paid,
            hosted_invoice_url: self.hosted_invoice_url.clone(),
            finalized_at: time(
                self.status_transitions
                    .as_ref()
                    .and_then(|t| t.finalized_at),
            ),
            paid_at: time(self.status_transitions.as_ref().and_then(|t| t.paid_at)),
            next_payment_attempt: time(self.next_payment_attempt),
        }
    }
}

#[derive(Debug, Deserialize)]
struct StripeObjectId {
    id: String,
}

#[derive(Debug, Deserialize)]
struct StripeList<T> {
    data: Vec<T>,
}

/// A line of a Stripe invoice: its invoice item is under
/// `parent.invoice_item_details.invoice_item` since API version 2025-03-31, `invoice_item`
/// before.
#[derive(Debug, Deserialize)]
struct StripeLine {
    metadata: Option<HashMap<String, String>>,
    parent: Option<serde_json::Value>,
    invoice_item: Option<serde_json::Value>,
}

impl StripeLine {
    fn invoice_item(&self) -> Option<String> {
        let current = self
            .parent
            .as_ref()
            .and_then(|p| p.pointer("/invoice_item_details/invoice_item"));
        current
            .or(self.invoice_item.as_ref())
            .and_then(|v| v.as_str().or_else(|| v.get("id")?.as_str()))
            .map(str::to_owned)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lines_item_is_read_in_either_shape() {
        let current: StripeLine = serde_json::from_str(
            r#"{"metadata":{"apex_line":"platform_fee"},"parent":{"type":"invoice_item_details","invoice_item_details":{"invoice_item":"ii_1"}}}"#,
        )
        .unwrap();
        assert_eq!(current.invoice_item().as_deref(), Some("ii_1"));
        let old: StripeLine =
            serde_json::from_str(r#"{"metadata":{},"invoice_item":"ii_2"}"#).unwrap();
        assert_eq!(old.invoice_item().as_deref(), Some("ii_2"));
        let expanded: StripeLine =
            serde_json::from_str(r#"{"invoice_item":{"id":"ii_3"}}"#).unwrap();
        assert_eq!(expanded.invoice_item().as_deref(), Some("ii_3"));
        assert_eq!(kind_label("overage"), "overage");
        assert_eq!(kind_label("surprise"), "other");
    }
}
