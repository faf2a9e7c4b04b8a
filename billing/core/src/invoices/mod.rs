//! Monthly invoices: what the `invoice_close` job decides for a customer's ended month, and the
//! local mirror of the Stripe invoice that carries it (the `invoices`, `invoice_lines` and
//! `invoice_reviews` tables; every query on them is here or in [`mirror`]).
//!
//! Rules (the README repeats them):
//! - **One invoice per customer per billing period**, the calendar month in UTC (what the
//!   preview prices): `UNIQUE (customer_id, period_start)`. Its lines are exactly the
//!   preview's ([`crate::statement::compose_invoice`]), written in one transaction before
//!   anything reaches Stripe and never changed afterwards, so a run that dies at any point
//!   resumes with the same lines and the same idempotency keys.
//! - **Revenue not yet reported** when the month closes: the invoice waits up to the
//!   configured number of days after the month's end, then is issued without a platform-fee
//!   line and a `revenue_missing` review is opened for a person.
//! - **Late revenue or usage** for a month already invoiced goes on the next invoice as an
//!   adjustment line naming the month it corrects: that month is priced again, on the plan it
//!   was invoiced on, and the difference from what was billed for it (its own lines and every
//!   adjustment for it since) is the line. Months up to [`ADJUSTMENT_LOOKBACK_MONTHS`] back
//!   are checked. A difference below zero (a credit) is never sent without a person's say: it
//!   opens a `negative_adjustment` review; once approved (`apexctl invoices review ID
//!   --approve --amount CENTS`) the credit goes on the next invoice (once), once dismissed
//!   nothing is sent. A month is priced again on the prices and terms kept with its invoice
//!   (`invoices.pricing`), so only its revenue and usage can move an adjustment.
//! - A month with no line gets a `nothing_due` row and no Stripe invoice.

pub mod mirror;

use chrono::{DateTime, Datelike, Duration, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::pricing::{Period, month_period};
use crate::statement::{
    PricingTerms, compose_invoice, dollars, month_inputs, month_inputs_priced_as,
};

/// How many months before the one being closed are priced again for adjustments.
pub const ADJUSTMENT_LOOKBACK_MONTHS: i32 = 12;

/// Statuses of an invoice row: ours before Stripe has it (`pending`, `nothing_due`), then
/// Stripe's invoice statuses.
pub const STATUSES: [&str; 7] = [
    "pending",
    "nothing_due",
    "draft",
    "open",
    "paid",
    "void",
    "uncollectible",
];

/// Line kinds, in invoice order; the `kind` label of the invoiced-amount counter.
pub const LINE_KINDS: [&str; 5] = ["plan", "platform_fee", "overage", "addon", "adjustment"];

/// One customer's invoice for one month, as mirrored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Invoice {
    /// Our id (Stripe metadata `apex_invoice_id`).
    pub id: i64,
    /// Our customer id.
    pub customer_id: String,
    /// First instant of the month (UTC).
    pub period_start: DateTime<Utc>,
    /// First instant after it.
    pub period_end: DateTime<Utc>,
    /// The plan the month was priced on.
    pub plan_id: String,
    /// One of [`STATUSES`].
    pub status: String,
    /// `usd`.
    pub currency: String,
    /// Sum of the lines, cents: Stripe's invoice total equals it.
    pub total_cents: i64,
    /// Mediated revenue the platform fee was computed on, cents; `None` when none was reported.
    pub revenue_cents: Option<i64>,
    /// The prices and terms the month was invoiced on ([`PricingTerms`] as JSON).
    #[serde(skip)]
    pub pricing: serde_json::Value,
    /// Stripe's invoice id, once created.
    pub stripe_invoice_id: Option<String>,
    /// What Stripe asks the customer to pay, cents (after any credit balance).
    pub amount_due_cents: Option<i64>,
    /// What has been paid, cents.
    pub amount_paid_cents: Option<i64>,
    /// Stripe's hosted page of the invoice.
    pub hosted_invoice_url: Option<String>,
    /// Payment attempts Stripe made.
    pub attempt_count: i32,
    /// When Stripe finalized it.
    pub finalized_at: Option<DateTime<Utc>>,
    /// When it was paid.
    pub paid_at: Option<DateTime<Utc>>,
    /// When it was voided.
    pub voided_at: Option<DateTime<Utc>>,
    /// The latest failed payment.
    pub payment_failed_at: Option<DateTime<Utc>>,
    /// Stripe's next payment attempt.
    pub next_payment_attempt: Option<DateTime<Utc>>,
    /// When the row was written.
    pub created_at: DateTime<Utc>,
    /// Last change.
    pub updated_at: DateTime<Utc>,
}

impl Invoice {
    /// The month as `YYYY-MM`.
    pub fn month(&self) -> String {
        month_text(self.period_start)
    }

    /// The billing period.
    pub fn period(&self) -> Period {
        Period {
            start: self.period_start,
            end: self.period_end,
        }
    }

    /// True once Stripe's invoice is finalized (or there is nothing to issue): nothing is left
    /// for the job to do.
    pub fn is_issued(&self) -> bool {
        !matches!(self.status.as_str(), "pending" | "draft")
    }
}

/// One line of an invoice.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Line {
    /// The line's name in its invoice (`platform_fee`, `overage:impressions`, ...).
    pub line_key: String,
    /// Its place on the invoice, from 0.
    pub position: i32,
    /// One of [`LINE_KINDS`].
    pub kind: String,
    /// What the customer reads.
    pub description: String,
    /// The metric of an overage line (the API's name: `data_transfer_gb`).
    pub metric_type: Option<String>,
    /// The billed quantity, as the preview shows it.
    pub quantity: Option<serde_json::Value>,
    /// Amount, cents (negative only for an approved credit).
    pub amount_cents: i64,
    /// The month an adjustment corrects.
    pub corrects_period_start: Option<DateTime<Utc>>,
    /// Stripe's invoice item, once created.
    pub stripe_invoice_item_id: Option<String>,
}

/// An invoice with its lines (`GET /api/billing/invoices`, `apexctl invoices show`).
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceWithLines {
    /// The invoice.
    #[serde(flatten)]
    pub invoice: Invoice,
    /// `YYYY-MM`.
    pub month: String,
    /// Its lines, in order.
    pub lines: Vec<Line>,
}

/// Something the invoicing left for a person.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Review {
    /// Its id (`apexctl invoices review ID`).
    pub id: i64,
    /// Our customer id.
    pub customer_id: String,
    /// The month concerned.
    pub period_start: DateTime<Utc>,
    /// `revenue_missing`, `negative_adjustment` or `total_mismatch`.
    pub kind: String,
    /// The credit of a negative adjustment (below zero), or the difference of a mismatch.
    pub amount_cents: i64,
    /// What happened, for a person.
    pub details: String,
    /// When it was opened.
    pub created_at: DateTime<Utc>,
    /// When a person resolved it (or a later close superseded it).
    pub resolved_at: Option<DateTime<Utc>>,
    /// `approved`, `dismissed` or `superseded`.
    pub resolution: Option<String>,
    /// The invoice that carried an approved credit.
    pub applied_invoice_id: Option<i64>,
}

/// `YYYY-MM` of an instant.
pub fn month_text(at: DateTime<Utc>) -> String {
    format!("{:04}-{:02}", at.year(), at.month())
}

/// The calendar month before the one containing `at`.
pub fn previous_month(at: DateTime<Utc>) -> Period {
    let (year, month) = if at.month() == 1 {
        (at.year() - 1, 12)
    } else {
        (at.year(), at.month() - 1)
    };
    month_period(year, month).expect("a month before a valid date")
}

/// How the close treats a month.
#[derive(Debug, Clone, Copy)]
pub struct CloseSettings {
    /// How long after the month's end an invoice waits for the month's mediated revenue
    /// (`APEX_INVOICE_REVENUE_WAIT_DAYS`, default 5 days).
    pub revenue_wait: Duration,
}

impl Default for CloseSettings {
    fn default() -> Self {
        Self {
            revenue_wait: Duration::days(5),
        }
    }
}

/// The longest revenue wait, in days: a month still waiting is closed by the next month's
/// runs, which look two months back.
pub const MAX_REVENUE_WAIT_DAYS: i64 = 28;

impl CloseSettings {
    /// Reads `APEX_INVOICE_REVENUE_WAIT_DAYS` (0 to 28, default 5); the cron process and
    /// `apexctl invoices close` both use it, so they decide alike.
    pub fn from_env(env: &apex_core::env::EnvSource) -> Result<Self, apex_core::env::ConfigError> {
        let name = "APEX_INVOICE_REVENUE_WAIT_DAYS";
        let days: i64 = env.parse_or(name, 5)?;
        if !(0..=MAX_REVENUE_WAIT_DAYS).contains(&days) {
            return Err(apex_core::env::ConfigError::Invalid {
                name,
                reason: format!("must be 0 to {MAX_REVENUE_WAIT_DAYS} days"),
            });
        }
        Ok(Self {
            revenue_wait: Duration::days(days),
        })
    }
}

/// What [`prepare`] found or did.
#[derive(Debug, Clone)]
pub enum Prepared {
    /// The month has an invoice row already (written by an earlier run).
    Existing(Invoice),
    /// No revenue reported yet: the invoice waits until this time.
    Waiting {
        /// When it is issued without a fee line if revenue is still missing.
        until: DateTime<Utc>,
    },
    /// The invoice row and its lines were written now.
    Written {
        /// The new row.
        invoice: Invoice,
        /// Reviews this opened.
        reviews_opened: Vec<Review>,
    },
}

/// Decides `customer_id`'s invoice for the ended month `period` at `now`, in one transaction
/// (a savepoint inside a caller's): an existing row is returned as is; otherwise the lines of
/// the month (the preview's, plus adjustments of earlier months) are written with the row,
/// unless the month's revenue is still awaited. Concurrent calls for one customer are
/// serialized by a lock on its `customers` row. `Invalid` when the month has not ended;
/// `NotFound` for an unknown customer.
pub async fn prepare(
    conn: &mut PgConnection,
    customer_id: &str,
    period: &Period,
    now: DateTime<Utc>,
    settings: &CloseSettings,
) -> Result<Prepared, BillingError> {
    if period.end > now {
        return Err(BillingError::Invalid(format!(
            "the month {} has not ended yet",
            month_text(period.start)
        )));
    }
    let mut tx = conn.begin().await?;
    let locked: Option<String> =
        sqlx::query_scalar("SELECT id FROM customers WHERE id = $1 FOR UPDATE")
            .bind(customer_id)
            .fetch_optional(&mut *tx)
            .await?;
    if locked.is_none() {
        return Err(BillingError::NotFound {
            what: format!("customer {customer_id}"),
        });
    }
    if let Some(existing) = for_period(&mut *tx, customer_id, period.start).await? {
        return Ok(Prepared::Existing(existing));
    }
    let month = month_text(period.start);
    let inputs = month_inputs(&mut tx, customer_id, period).await?;
    let until = period.end + settings.revenue_wait;
    if inputs.revenue_cents.is_none() && now < until {
        return Ok(Prepared::Waiting { until });
    }
    let preview = compose_invoice(&inputs, &month, period)?;
    let mut lines: Vec<NewLine> = preview
        .lines
        .iter()
        .map(|l| {
            Ok(NewLine {
                key: l.key.clone(),
                kind: l.kind,
                description: l.description.clone(),
                metric: l.metric,
                quantity: l
                    .quantity
                    .as_ref()
                    .and_then(|q| serde_json::from_str(q.get()).ok()),
                amount_cents: cents(l.amount_cents)?,
                corrects: None,
            })
        })
        .collect::<Result<_, BillingError>>()?;
    let mut reviews_opened = Vec::new();
    let mut credits_used = Vec::new();
    for earlier in earlier_invoices(&mut *tx, customer_id, period.start).await? {
        let earlier_month = earlier.month();
        let pricing: PricingTerms =
            serde_json::from_value(earlier.pricing.clone()).map_err(|e| {
                BillingError::Invalid(format!(
                    "the pricing kept with invoice {} is unreadable: {e}",
                    earlier.id
                ))
            })?;
        let repriced =
            month_inputs_priced_as(&mut tx, customer_id, &earlier.period(), &pricing).await?;
        let expected =
            cents(compose_invoice(&repriced, &earlier_month, &earlier.period())?.total_cents)?;
        let billed = billed_for(&mut *tx, customer_id, earlier.period_start).await?;
        let difference = expected
            .checked_sub(billed)
            .ok_or_else(|| BillingError::Invalid("an adjustment overflows".into()))?;
        let line = |amount_cents: i64| NewLine {
            key: format!("adjustment:{earlier_month}"),
            kind: "adjustment",
            description: format!(
                "Adjustment for {earlier_month}: revenue or usage reported after it was invoiced \
                 ({} billed, {} now due)",
                signed_dollars(billed),
                signed_dollars(expected)
            ),
            metric: None,
            quantity: None,
            amount_cents,
            corrects: Some(earlier.period_start),
        };
        if difference >= 0 {
            // A credit awaiting approval is no longer owed.
            supersede_credits(&mut *tx, customer_id, earlier.period_start, now).await?;
            if difference > 0 {
                lines.push(line(difference));
            }
            continue;
        }
        match latest_credit_decision(&mut *tx, customer_id, earlier.period_start).await? {
            // Approved for exactly this amount and not used yet: the credit goes out, once.
            Some(decision)
                if decision.resolution == "approved"
                    && decision.amount_cents == difference
                    && decision.applied_invoice_id.is_none() =>
            {
                lines.push(line(difference));
                credits_used.push(decision.id);
            }
            // Dismissed at exactly this amount: nothing has changed since the decision.
            Some(decision)
                if decision.resolution == "dismissed" && decision.amount_cents == difference => {}
            _ => {
                let details = format!(
                    "{earlier_month} was invoiced {} but now prices at {}: a credit of {} \
                     needs a person's approval",
                    signed_dollars(billed),
                    signed_dollars(expected),
                    signed_dollars(-difference)
                );
                if let Some(review) = open_review(
                    &mut *tx,
                    customer_id,
                    earlier.period_start,
                    "negative_adjustment",
                    difference,
                    &details,
                    now,
                )
                .await?
                {
                    reviews_opened.push(review);
                }
            }
        }
    }
    let total = lines
        .iter()
        .try_fold(0i64, |sum, l| sum.checked_add(l.amount_cents))
        .ok_or_else(|| BillingError::Invalid("the invoice total overflows".into()))?;
    let status = if lines.is_empty() {
        "nothing_due"
    } else {
        "pending"
    };
    let invoice: Invoice = sqlx::query_as(
        "INSERT INTO invoices (customer_id, period_start, period_end, plan_id, status, \
             total_cents, revenue_cents, pricing, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $9, $8, $8) RETURNING *",
    )
    .bind(customer_id)
    .bind(period.start)
    .bind(period.end)
    .bind(&preview.plan_type)
    .bind(status)
    .bind(total)
    .bind(inputs.revenue_cents.map(cents).transpose()?)
    .bind(now)
    .bind(
        serde_json::to_value(inputs.pricing_terms())
            .map_err(|e| BillingError::Invalid(format!("cannot keep the pricing: {e}")))?,
    )
    .fetch_one(&mut *tx)
    .await?;
    for review in credits_used {
        sqlx::query("UPDATE invoice_reviews SET applied_invoice_id = $2 WHERE id = $1")
            .bind(review)
            .bind(invoice.id)
            .execute(&mut *tx)
            .await?;
    }
    for (position, line) in lines.iter().enumerate() {
        sqlx::query(
            "INSERT INTO invoice_lines (invoice_id, line_key, position, kind, description, \
                 metric_type, quantity, amount_cents, corrects_period_start) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(invoice.id)
        .bind(&line.key)
        .bind(position as i32)
        .bind(line.kind)
        .bind(&line.description)
        .bind(line.metric)
        .bind(&line.quantity)
        .bind(line.amount_cents)
        .bind(line.corrects)
        .execute(&mut *tx)
        .await?;
    }
    if inputs.revenue_cents.is_none() {
        let details = format!(
            "no mediated revenue was reported for {month} within {} days of its end: invoiced \
             without a platform fee; revenue reported later is charged as an adjustment on the \
             next invoice",
            settings.revenue_wait.num_days()
        );
        if let Some(review) = open_review(
            &mut *tx,
            customer_id,
            period.start,
            "revenue_missing",
            0,
            &details,
            now,
        )
        .await?
        {
            reviews_opened.push(review);
        }
    }
    tx.commit().await?;
    Ok(Prepared::Written {
        invoice,
        reviews_opened,
    })
}

struct NewLine {
    key: String,
    kind: &'static str,
    description: String,
    metric: Option<&'static str>,
    quantity: Option<serde_json::Value>,
    amount_cents: i64,
    corrects: Option<DateTime<Utc>>,
}

fn cents(value: u64) -> Result<i64, BillingError> {
    i64::try_from(value).map_err(|_| BillingError::Invalid("an amount is too large".into()))
}

fn signed_dollars(cents: i64) -> String {
    if cents < 0 {
        format!("-{}", dollars(cents.unsigned_abs()))
    } else {
        dollars(cents as u64)
    }
}

/// Invoices of `customer_id` for the months before `before`, back to
/// [`ADJUSTMENT_LOOKBACK_MONTHS`], oldest first.
async fn earlier_invoices(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    before: DateTime<Utc>,
) -> Result<Vec<Invoice>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT * FROM invoices WHERE customer_id = $1 AND period_start < $2 \
             AND period_start >= $2 - make_interval(months => $3) \
         ORDER BY period_start",
    )
    .bind(customer_id)
    .bind(before)
    .bind(ADJUSTMENT_LOOKBACK_MONTHS)
    .fetch_all(db)
    .await?)
}

/// What was billed for the month starting `period_start`, cents: its own invoice's lines (not
/// the adjustments of other months it carries) and every adjustment for it since. The close's
/// figure for adjustments; reconciliation (`apex_stripe::reconcile`) compares it too.
pub async fn billed_for(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<i64, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(l.amount_cents), 0)::bigint FROM invoice_lines l \
         JOIN invoices i ON i.id = l.invoice_id \
         WHERE i.customer_id = $1 \
           AND ((i.period_start = $2 AND l.kind <> 'adjustment') OR l.corrects_period_start = $2)",
    )
    .bind(customer_id)
    .bind(period_start)
    .fetch_one(db)
    .await?)
}

/// The latest decision a person made on a credit for the month.
#[derive(sqlx::FromRow)]
struct CreditDecision {
    id: i64,
    resolution: String,
    amount_cents: i64,
    applied_invoice_id: Option<i64>,
}

async fn latest_credit_decision(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<Option<CreditDecision>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, resolution, amount_cents, applied_invoice_id FROM invoice_reviews \
         WHERE customer_id = $1 AND period_start = $2 AND kind = 'negative_adjustment' \
           AND resolution IN ('approved', 'dismissed') \
         ORDER BY resolved_at DESC, id DESC LIMIT 1",
    )
    .bind(customer_id)
    .bind(period_start)
    .fetch_optional(db)
    .await?)
}

/// Closes the open credit review of the month as `superseded`: it is no longer owed.
async fn supersede_credits(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE invoice_reviews SET resolved_at = $3, resolution = 'superseded' \
         WHERE customer_id = $1 AND period_start = $2 AND kind = 'negative_adjustment' \
           AND resolved_at IS NULL",
    )
    .bind(customer_id)
    .bind(period_start)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// Opens a review, or updates the open one of the same customer, month and kind (its amount
/// and details follow the latest finding). Returns the review when it is new.
pub async fn open_review(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
    kind: &str,
    amount_cents: i64,
    details: &str,
    now: DateTime<Utc>,
) -> Result<Option<Review>, BillingError> {
    let (review, inserted): (Review, bool) = {
        let row: ReviewUpsert = sqlx::query_as(
            "INSERT INTO invoice_reviews (customer_id, period_start, kind, amount_cents, details, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (customer_id, period_start, kind) WHERE resolved_at IS NULL \
             DO UPDATE SET amount_cents = EXCLUDED.amount_cents, details = EXCLUDED.details \
             RETURNING *, (xmax = 0) AS inserted",
        )
        .bind(customer_id)
        .bind(period_start)
        .bind(kind)
        .bind(amount_cents)
        .bind(details)
        .bind(now)
        .fetch_one(db)
        .await?;
        (row.review, row.inserted)
    };
    Ok(inserted.then_some(review))
}

#[derive(sqlx::FromRow)]
struct ReviewUpsert {
    #[sqlx(flatten)]
    review: Review,
    inserted: bool,
}

/// Reviews, newest first: the open ones only unless `all`, of one customer if given.
pub async fn reviews(
    db: impl PgExecutor<'_>,
    customer_id: Option<&str>,
    all: bool,
) -> Result<Vec<Review>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT * FROM invoice_reviews \
         WHERE ($1::text IS NULL OR customer_id = $1) AND ($2 OR resolved_at IS NULL) \
         ORDER BY created_at DESC, id DESC",
    )
    .bind(customer_id)
    .bind(all)
    .fetch_all(db)
    .await?)
}

/// Resolves open review `id` as `approved` or `dismissed` at `now`. Approving needs the
/// amount the person saw (`expected_cents`): an open credit's amount follows the latest close,
/// so an approval never covers an amount nobody looked at. `NotFound` when no open review has
/// that id; `Invalid` for another resolution, a stale amount, or approving a review that is
/// not a credit (only a credit waits for approval; the others are dismissed once handled).
pub async fn resolve_review(
    db: impl PgExecutor<'_>,
    id: i64,
    resolution: &str,
    expected_cents: Option<i64>,
    now: DateTime<Utc>,
) -> Result<Review, BillingError> {
    if resolution == "approved" && expected_cents.is_none() {
        return Err(BillingError::Invalid(
            "approving a credit needs the amount you approve".into(),
        ));
    }
    if resolution != "approved" && resolution != "dismissed" {
        return Err(BillingError::Invalid(format!(
            "a review is approved or dismissed, not {resolution:?}"
        )));
    }
    let review: Option<Review> = sqlx::query_as(
        "UPDATE invoice_reviews SET resolved_at = $3, resolution = $2 \
         WHERE id = $1 AND resolved_at IS NULL \
           AND ($2 = 'dismissed' OR kind = 'negative_adjustment') \
           AND ($4::bigint IS NULL OR amount_cents = $4) \
         RETURNING *",
    )
    .bind(id)
    .bind(resolution)
    .bind(now)
    .bind(expected_cents)
    .fetch_optional(db)
    .await?;
    review.ok_or_else(|| {
        if resolution == "approved" {
            BillingError::Invalid(format!(
                "review {id} is not an open credit of that amount: only a negative adjustment \
                 is approved, for the amount pending-review shows now; dismiss the others once \
                 handled"
            ))
        } else {
            BillingError::NotFound {
                what: format!("open review {id}"),
            }
        }
    })
}

/// Every review of `customer_id`'s month starting `period_start`, open or resolved, newest
/// first (reconciliation reads which of its differences a person or the next close settles).
pub async fn period_reviews(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<Vec<Review>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT * FROM invoice_reviews WHERE customer_id = $1 AND period_start = $2 \
         ORDER BY created_at DESC, id DESC",
    )
    .bind(customer_id)
    .bind(period_start)
    .fetch_all(db)
    .await?)
}

/// The newest invoice that could carry an adjustment of a month, against the month's latest
/// change (see [`newest_invoice_since`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, sqlx::FromRow)]
pub struct NewestInvoice {
    /// The latest month invoiced from the month on (its `period_start`).
    pub latest_period_start: DateTime<Utc>,
    /// When the last of those invoices was written (`invoices.recorded_at`, the database's
    /// clock).
    pub written_at: DateTime<Utc>,
    /// The month's latest usage or revenue change (`usage_records.updated_at`,
    /// `mediated_revenue.updated_at`, the database's clock), if any.
    pub changed_at: Option<DateTime<Utc>>,
}

impl NewestInvoice {
    /// True when the month's usage or revenue changed after the newest invoice that could
    /// carry its adjustment was written: only a later close adjusts it. Both times are the
    /// database's, so a simulated clock cannot make it true or false.
    pub fn changed_after(&self) -> bool {
        self.changed_at.is_some_and(|c| c > self.written_at)
    }
}

/// Of `customer_id`'s invoices for `period`'s month and later ones, the latest month and the
/// last write (`None` without any), with the month's latest usage or revenue change.
pub async fn newest_invoice_since(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period: &Period,
) -> Result<Option<NewestInvoice>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT max(period_start) AS latest_period_start, max(recorded_at) AS written_at, \
             GREATEST( \
               (SELECT max(updated_at) FROM usage_records WHERE customer_id = $1 \
                  AND recorded_at >= $2 AND recorded_at < $3), \
               (SELECT max(updated_at) FROM mediated_revenue WHERE customer_id = $1 \
                  AND month = $4)) AS changed_at \
         FROM invoices WHERE customer_id = $1 AND period_start >= $2 \
         HAVING count(*) > 0",
    )
    .bind(customer_id)
    .bind(period.start)
    .bind(period.end)
    .bind(period.start.date_naive())
    .fetch_optional(db)
    .await?)
}

/// The invoice of `customer_id` for the month starting `period_start`, if written.
pub async fn for_period(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period_start: DateTime<Utc>,
) -> Result<Option<Invoice>, BillingError> {
    Ok(
        sqlx::query_as("SELECT * FROM invoices WHERE customer_id = $1 AND period_start = $2")
            .bind(customer_id)
            .bind(period_start)
            .fetch_optional(db)
            .await?,
    )
}

/// The invoice with our id `id`.
pub async fn by_id(db: impl PgExecutor<'_>, id: i64) -> Result<Option<Invoice>, BillingError> {
    Ok(sqlx::query_as("SELECT * FROM invoices WHERE id = $1")
        .bind(id)
        .fetch_optional(db)
        .await?)
}

/// The lines of invoice `invoice_id`, in order.
pub async fn lines(db: impl PgExecutor<'_>, invoice_id: i64) -> Result<Vec<Line>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT line_key, position, kind, description, metric_type, quantity, amount_cents, \
             corrects_period_start, stripe_invoice_item_id \
         FROM invoice_lines WHERE invoice_id = $1 ORDER BY position",
    )
    .bind(invoice_id)
    .fetch_all(db)
    .await?)
}

/// Invoices, newest month first: of one customer and one month if given, at most `limit`.
pub async fn list(
    db: impl PgExecutor<'_>,
    customer_id: Option<&str>,
    period_start: Option<DateTime<Utc>>,
    limit: i64,
) -> Result<Vec<Invoice>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT * FROM invoices \
         WHERE ($1::text IS NULL OR customer_id = $1) \
           AND ($2::timestamptz IS NULL OR period_start = $2) \
         ORDER BY period_start DESC, customer_id LIMIT $3",
    )
    .bind(customer_id)
    .bind(period_start)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// A customer's invoices with their lines, newest first, at most `limit`
/// (`GET /api/billing/invoices`).
pub async fn list_with_lines(
    conn: &mut PgConnection,
    customer_id: &str,
    limit: i64,
) -> Result<Vec<InvoiceWithLines>, BillingError> {
    let invoices = list(&mut *conn, Some(customer_id), None, limit).await?;
    let mut out = Vec::with_capacity(invoices.len());
    for invoice in invoices {
        let lines = lines(&mut *conn, invoice.id).await?;
        out.push(InvoiceWithLines {
            month: invoice.month(),
            invoice,
            lines,
        });
    }
    Ok(out)
}

/// Invoices the job has yet to finish in Stripe (`pending`, `draft`), oldest first: of one
/// customer if given.
pub async fn unfinished(
    db: impl PgExecutor<'_>,
    customer_id: Option<&str>,
) -> Result<Vec<Invoice>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT * FROM invoices WHERE status IN ('pending', 'draft') \
           AND ($1::text IS NULL OR customer_id = $1) ORDER BY period_start, id",
    )
    .bind(customer_id)
    .fetch_all(db)
    .await?)
}

/// Records the Stripe invoice created for invoice `id` (status `draft`). Returns false when
/// another Stripe id was recorded first (the caller then goes on with that one).
pub async fn set_stripe_invoice(
    db: impl PgExecutor<'_>,
    id: i64,
    stripe_invoice_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE invoices SET stripe_invoice_id = $2, updated_at = $3, \
             status = CASE WHEN status = 'pending' THEN 'draft' ELSE status END \
         WHERE id = $1 AND (stripe_invoice_id IS NULL OR stripe_invoice_id = $2)",
    )
    .bind(id)
    .bind(stripe_invoice_id)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Records the Stripe invoice item created for line `line_key` of invoice `invoice_id`.
pub async fn set_line_item(
    db: impl PgExecutor<'_>,
    invoice_id: i64,
    line_key: &str,
    stripe_invoice_item_id: &str,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE invoice_lines SET stripe_invoice_item_id = $3 \
         WHERE invoice_id = $1 AND line_key = $2",
    )
    .bind(invoice_id)
    .bind(line_key)
    .bind(stripe_invoice_item_id)
    .execute(db)
    .await?;
    Ok(())
}

/// Stripe's side of an invoice, as the job read it after finalizing.
#[derive(Debug, Clone, Default)]
pub struct StripeState {
    /// Stripe's status.
    pub status: String,
    /// `amount_due`, cents.
    pub amount_due_cents: Option<i64>,
    /// `amount_paid`, cents.
    pub amount_paid_cents: Option<i64>,
    /// `hosted_invoice_url`.
    pub hosted_invoice_url: Option<String>,
    /// `status_transitions.finalized_at`.
    pub finalized_at: Option<DateTime<Utc>>,
    /// `status_transitions.paid_at`.
    pub paid_at: Option<DateTime<Utc>>,
    /// `next_payment_attempt`.
    pub next_payment_attempt: Option<DateTime<Utc>>,
}

/// Records what Stripe said of invoice `id` when the job finalized it. A webhook may have got
/// there first: a status it set is kept (the job only moves `pending`/`draft` on), and fields
/// it filled are kept.
pub async fn record_finalized(
    db: impl PgExecutor<'_>,
    id: i64,
    state: &StripeState,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    if !STATUSES[2..].contains(&state.status.as_str()) {
        return Err(BillingError::Invalid(format!(
            "Stripe reported invoice status {:?}",
            state.status
        )));
    }
    sqlx::query(
        "UPDATE invoices SET \
             status = CASE WHEN status IN ('pending', 'draft') THEN $2 ELSE status END, \
             amount_due_cents = coalesce(amount_due_cents, $3), \
             amount_paid_cents = coalesce(amount_paid_cents, $4), \
             hosted_invoice_url = coalesce(hosted_invoice_url, $5), \
             finalized_at = coalesce(finalized_at, $6), \
             paid_at = coalesce(paid_at, $7), \
             next_payment_attempt = coalesce(next_payment_attempt, $8), \
             updated_at = $9 \
         WHERE id = $1",
    )
    .bind(id)
    .bind(&state.status)
    .bind(state.amount_due_cents)
    .bind(state.amount_paid_cents)
    .bind(&state.hosted_invoice_url)
    .bind(state.finalized_at)
    .bind(state.paid_at)
    .bind(state.next_payment_attempt)
    .bind(now)
    .execute(db)
    .await?;
    Ok(())
}

/// How many invoices are in each status (every one of [`STATUSES`], zeros included): the
/// `apex_stripe_invoices{status}` gauge.
pub async fn status_counts(
    db: impl PgExecutor<'_>,
) -> Result<Vec<(&'static str, i64)>, BillingError> {
    let rows: Vec<(String, i64)> =
        sqlx::query_as("SELECT status, count(*) FROM invoices GROUP BY status")
            .fetch_all(db)
            .await?;
    Ok(STATUSES
        .iter()
        .map(|&status| {
            let count = rows
                .iter()
                .find(|(s, _)| s == status)
                .map_or(0, |(_, n)| *n);
            (status, count)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_are_named_and_stepped_back() {
        let at: DateTime<Utc> = "2026-01-15T10:00:00Z".parse().unwrap();
        assert_eq!(month_text(at), "2026-01");
        let previous = previous_month(at);
        assert_eq!(month_text(previous.start), "2025-12");
        assert_eq!(
            previous.end,
            "2026-01-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(signed_dollars(-12_345), "-$123.45");
        assert_eq!(signed_dollars(125_000), "$1,250.00");
    }
}
