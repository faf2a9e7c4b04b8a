//! Monthly summaries: the guide's Monthly Summaries on the 1st at 10:00, one email per active
//! customer and month. The `monthly_summaries` cron job (`0 10 1 * *`) calls
//! [`send_monthly_summaries`]; [`send_monthly_summaries_for`] summarises a given ended month
//! (a backfill), [`monthly_summary`] computes one customer's summary without enqueuing it.
//!
//! # Which month
//! The calendar month in UTC before the one containing `now` ([`previous_month`]): the run on
//! the 1st summarises the month that just ended, and a run caught up late (on the 3rd, on the
//! 20th) summarises that same month, not the one before it.
//!
//! # Who gets one
//! Every customer whose `customers.status` is `active` when the run reads it, who existed
//! before the month ended (`created_at` before its end: a customer who signed up later has no
//! month to summarise; one who signed up during the month gets the part it had), and who has
//! not opted out of `monthly_summary` ([`crate::email_log::opt_outs_among`]; the email queue
//! would drop the email anyway, but none is enqueued). The subscription's status does not
//! matter: a `trialing` customer gets one (it used the product, and learns what the month
//! would cost), so does a `past_due` one (its customer row is still `active`). A
//! `suspended` or `canceled` customer gets none.
//!
//! # Once per customer and month
//! Each summary is an `events` row of type `email.monthly_summary` with the dedup key
//! [`dedup_key`] (`monthly_summary:<customer>:<YYYY-MM>`), enqueued with
//! [`events::enqueue_once`]: the job run twice, or caught up late after a run that did go,
//! enqueues nothing new. Customers are taken in batches of [`BATCH_SIZE`] by id, each batch in
//! one transaction that first takes a lock of the month's summaries (two runs at once take
//! turns, so each counts only what it enqueued), then reads which of the batch's summaries
//! exist, the batch's opt-outs, accounts, invoices, revenue and usage in a few set queries (no
//! query per customer), and enqueues the rest. A failed run leaves the batches it committed;
//! the next run goes on with the others. Each summary enqueued counts in
//! `apex_billing_monthly_summaries_total` ([`names::MONTHLY_SUMMARIES_TOTAL`]).
//!
//! # The figures
//! - **Usage** per metric in the month, from the hourly rollups (an hour counts in the month
//!   its start falls in, as [`crate::statement::usage_in`] counts it); data transfer in GB.
//! - **Prices**: the month's invoice keeps the prices and terms it was issued on
//!   (`invoices.pricing`); when the month has an invoice, the summary is priced on them, so it
//!   agrees with the invoice. Without one (not issued yet: the close waits for the month's
//!   revenue), on the customer's current plan, terms and add-ons, as the invoice preview
//!   prices it ([`crate::statement::compose_invoice`]).
//! - **Allowance** per metric: the plan's `included_quantity`, `null` for unlimited.
//!   **Overage** and its **cost** from [`crate::pricing::overage`] (`null` for an unlimited
//!   metric); `overage_cost_cents` is their sum.
//! - **Platform fee** on the month's mediated revenue as reported now
//!   ([`crate::pricing::platform_fee`]); `null` (with the revenue) when none was reported.
//! - **Total**: the invoice's total when the month has an invoice (any status but `void`),
//!   with its hosted page when Stripe gave one; otherwise the total the invoice would have
//!   now (the preview's), which the email calls an estimate.
//! - **Change** against the month before, per metric: that month's usage
//!   (`<metric>_previous`) and `<metric>_change_percent`, `(used − previous) × 100 ÷
//!   previous` rounded half away from zero to a whole percent; `null` when the month before
//!   had no usage of the metric (no percentage of nothing).
//!
//! A customer whose month cannot be priced (a plan not in the catalogue, a negotiated rate
//! out of range) is left out of the run and listed in [`SummaryRunSummary::failed`]; the
//! others go.

use std::collections::{BTreeMap, HashMap, HashSet};

use apex_core::model::Metric;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{Connection, PgConnection};

use crate::email_log;
use crate::error::BillingError;
use crate::events;
use crate::invoices::{month_text, previous_month};
use crate::names;
use crate::plans::{Plan, list_plans};
use crate::pricing::{self, FeeBand, FeeTerms, Period, PlatformFee};
use crate::statement::{
    Account, Addon, MonthInputs, PricingTerms, api_name, compose_invoice, fee_bands, gb_text,
};

/// The email event a summary is.
pub const EVENT_TYPE: &str = "email.monthly_summary";
/// The opt-out category (and email type) of summaries.
pub const CATEGORY: &str = "monthly_summary";
/// Customers per transaction.
pub const BATCH_SIZE: usize = 500;

/// The dedup key of `customer_id`'s summary of `month` (`YYYY-MM`):
/// `monthly_summary:<customer>:<YYYY-MM>`.
pub fn dedup_key(customer_id: &str, month: &str) -> String {
    format!("{CATEGORY}:{customer_id}:{month}")
}

/// `(used − previous) × 100 ÷ previous`, rounded half away from zero; `None` when `previous`
/// is 0.
pub fn change_percent(used: u64, previous: u64) -> Option<i64> {
    if previous == 0 {
        return None;
    }
    let diff = i128::from(used) - i128::from(previous);
    let previous = i128::from(previous);
    let rounded = (diff.abs() * 200 + previous) / (2 * previous);
    let signed = if diff < 0 { -rounded } else { rounded };
    Some(signed.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64)
}

/// One metric of a summary; quantities in storage units (bytes for data transfer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricSummary {
    /// The metric.
    pub metric: Metric,
    /// Used in the month.
    pub used: u64,
    /// The plan's allowance; `None` is unlimited.
    pub included: Option<u64>,
    /// Used above the allowance (0 for an unlimited metric).
    pub overage: u64,
    /// What the overage costs, cents.
    pub overage_cost_cents: u64,
    /// Used in the month before.
    pub previous: u64,
    /// Change against the month before, whole percent; `None` when it had no usage.
    pub change_percent: Option<i64>,
}

/// The month's invoice, as the summary shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceSummary {
    /// Its status (not `void`: a void invoice is not shown).
    pub status: String,
    /// Its total, cents.
    pub total_cents: i64,
    /// Stripe's hosted page, once there is one.
    pub url: Option<String>,
}

/// One customer's summary of one month.
#[derive(Debug, Clone, Serialize)]
pub struct MonthlySummary {
    /// The customer.
    pub customer_id: String,
    /// Its name.
    pub name: String,
    /// Its billing contact.
    pub email: String,
    /// The month, `YYYY-MM`.
    pub month: String,
    /// The month before, `YYYY-MM`.
    pub previous_month: String,
    /// The plan the month is priced on (id).
    pub plan_type: String,
    /// Its display name.
    pub plan_name: String,
    /// Every metric, in [`Metric::ALL`] order.
    pub metrics: Vec<MetricSummary>,
    /// Sum of the overage costs, cents.
    pub overage_cost_cents: u64,
    /// Mediated revenue reported for the month, cents; `None` when none was.
    pub mediated_revenue_cents: Option<u64>,
    /// The platform fee on it; `None` when no revenue was reported.
    pub platform_fee: Option<PlatformFee>,
    /// The invoice's total when the month has an invoice, else the preview's.
    pub total_cents: i64,
    /// The month's invoice, when it has one.
    pub invoice: Option<InvoiceSummary>,
}

/// A JSON number holding `bytes` in GB (the email's unit of data transfer).
fn gb(bytes: u64) -> Value {
    gb_text(bytes)
        .parse::<f64>()
        .map(|n| json!(n))
        .unwrap_or(Value::Null)
}

impl MonthlySummary {
    /// The `email.monthly_summary` event's data (see `apex_notify::templates`): `to`,
    /// `customer_id`, `name`, `month`, `previous_month`, `plan_type`, `plan_name`,
    /// `currency`; per metric (`impressions`, `api_calls`, `data_transfer_gb`, the last in
    /// GB) the usage under the metric's name and `<metric>_included` (`null`: unlimited),
    /// `<metric>_overage` and `<metric>_overage_cost_cents` (`null` when unlimited),
    /// `<metric>_previous`, `<metric>_change_percent` (`null` when the month before had
    /// none); `overage_cost_cents`, `mediated_revenue_cents`, `platform_fee_cents` and
    /// `platform_fee_bps` (`null` when no revenue was reported), `total_cents`, and
    /// `invoice_total_cents` and `invoice_url` (`null` without an invoice, or a hosted page).
    pub fn email_data(&self) -> Value {
        let mut data = json!({
            "to": self.email,
            "customer_id": self.customer_id,
            "name": self.name,
            "month": self.month,
            "previous_month": self.previous_month,
            "plan_type": self.plan_type,
            "plan_name": self.plan_name,
            "currency": "usd",
            "overage_cost_cents": self.overage_cost_cents,
            "mediated_revenue_cents": self.mediated_revenue_cents,
            "platform_fee_cents": self.platform_fee.as_ref().map(|f| f.amount_cents),
            "platform_fee_bps": self.platform_fee.as_ref().map(|f| f.bps),
            "total_cents": self.total_cents,
            "invoice_total_cents": self.invoice.as_ref().map(|i| i.total_cents),
            "invoice_url": self.invoice.as_ref().and_then(|i| i.url.clone()),
        });
        let map = data.as_object_mut().expect("an object");
        for m in &self.metrics {
            let name = api_name(m.metric);
            let quantity = |units: u64| match m.metric {
                Metric::DataTransfer => gb(units),
                _ => json!(units),
            };
            let limited = m.included.is_some();
            map.insert(name.into(), quantity(m.used));
            map.insert(
                format!("{name}_included"),
                m.included.map_or(Value::Null, quantity),
            );
            map.insert(
                format!("{name}_overage"),
                if limited {
                    quantity(m.overage)
                } else {
                    Value::Null
                },
            );
            map.insert(
                format!("{name}_overage_cost_cents"),
                if limited {
                    json!(m.overage_cost_cents)
                } else {
                    Value::Null
                },
            );
            map.insert(format!("{name}_previous"), quantity(m.previous));
            map.insert(format!("{name}_change_percent"), json!(m.change_percent));
        }
        data
    }
}

/// A customer left out of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FailedSummary {
    /// The customer.
    pub customer_id: String,
    /// Why.
    pub error: String,
}

/// What a run did (the cron run's details).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct SummaryRunSummary {
    /// The month summarised, `YYYY-MM`.
    pub month: String,
    /// Active customers who existed before the month ended.
    pub customers: u64,
    /// Summaries enqueued by this run.
    pub enqueued: u64,
    /// Summaries an earlier run had enqueued.
    pub already_enqueued: u64,
    /// Customers who opted out of monthly summaries.
    pub opted_out: u64,
    /// Customers whose month could not be priced.
    pub failed: Vec<FailedSummary>,
}

impl SummaryRunSummary {
    /// Why the run should count as failed: some customer's summary could not be made.
    pub fn failure(&self) -> Option<String> {
        (!self.failed.is_empty()).then(|| {
            format!(
                "{} customers' summaries could not be made (see details)",
                self.failed.len()
            )
        })
    }
}

/// Enqueues the summary of the calendar month before the one containing `now` for every
/// customer who gets one (see the module docs), once per customer and month.
pub async fn send_monthly_summaries(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<SummaryRunSummary, BillingError> {
    send_monthly_summaries_for(conn, &previous_month(now), now).await
}

/// Enqueues the summaries of the calendar month `month`, which must have ended by `now`.
pub async fn send_monthly_summaries_for(
    conn: &mut PgConnection,
    month: &Period,
    now: DateTime<Utc>,
) -> Result<SummaryRunSummary, BillingError> {
    check_month(month)?;
    if month.end > now {
        return Err(BillingError::Invalid(format!(
            "{} has not ended yet: only an ended month is summarised",
            month_text(month.start)
        )));
    }
    let month_name = month_text(month.start);
    let candidates: Vec<String> = sqlx::query_scalar(
        "SELECT id FROM customers WHERE status = 'active' AND created_at < $1 ORDER BY id",
    )
    .bind(month.end)
    .fetch_all(&mut *conn)
    .await?;
    let plans = list_plans(&mut *conn).await?;
    let mut summary = SummaryRunSummary {
        month: month_name.clone(),
        customers: candidates.len() as u64,
        ..SummaryRunSummary::default()
    };
    for batch in candidates.chunks(BATCH_SIZE) {
        let mut tx = conn.begin().await?;
        // Two runs at once take turns per batch: the second sees what the first enqueued.
        sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1, 17))")
            .bind(format!("{CATEGORY}:{month_name}"))
            .execute(&mut *tx)
            .await?;
        let keys: Vec<String> = batch.iter().map(|c| dedup_key(c, &month_name)).collect();
        // Read here rather than in `events`: which of this job's keys exist.
        let existing: HashSet<String> = sqlx::query_scalar::<_, String>(
            "SELECT dedup_key FROM events WHERE dedup_key = ANY($1)",
        )
        .bind(&keys)
        .fetch_all(&mut *tx)
        .await?
        .into_iter()
        .collect();
        let opt_outs = email_log::opt_outs_among(&mut *tx, batch).await?;
        let mut todo = Vec::new();
        for (customer, key) in batch.iter().zip(&keys) {
            if existing.contains(key) {
                summary.already_enqueued += 1;
            } else if opt_outs.contains(&(customer.clone(), CATEGORY.to_owned())) {
                summary.opted_out += 1;
            } else {
                todo.push(customer.clone());
            }
        }
        let mut enqueued = 0u64;
        for result in summarise(&mut tx, &plans, &todo, month).await? {
            match result {
                Ok(s) => {
                    events::enqueue_once(
                        &mut *tx,
                        EVENT_TYPE,
                        &s.email_data(),
                        &dedup_key(&s.customer_id, &month_name),
                        now,
                    )
                    .await?;
                    enqueued += 1;
                }
                Err(failed) => {
                    tracing::warn!(
                        customer = %failed.customer_id,
                        month = %month_name,
                        error = %failed.error,
                        "monthly summary not made"
                    );
                    summary.failed.push(failed);
                }
            }
        }
        tx.commit().await?;
        summary.enqueued += enqueued;
        metrics::counter!(names::MONTHLY_SUMMARIES_TOTAL).increment(enqueued);
    }
    tracing::info!(
        month = %month_name,
        enqueued = summary.enqueued,
        already = summary.already_enqueued,
        opted_out = summary.opted_out,
        failed = summary.failed.len(),
        "monthly summaries"
    );
    Ok(summary)
}

/// `customer_id`'s summary of the calendar month `month`, whatever its status and opt-outs
/// (nothing is enqueued). `NotFound` for an unknown customer.
pub async fn monthly_summary(
    conn: &mut PgConnection,
    customer_id: &str,
    month: &Period,
) -> Result<MonthlySummary, BillingError> {
    check_month(month)?;
    let plans = list_plans(&mut *conn).await?;
    let mut results = summarise_any(conn, &plans, &[customer_id.to_owned()], month).await?;
    match results.pop() {
        Some(Ok(summary)) => Ok(summary),
        Some(Err(failed)) => Err(BillingError::Invalid(failed.error)),
        None => Err(BillingError::NotFound {
            what: format!("customer {customer_id}"),
        }),
    }
}

/// A month must be a whole calendar month (one `month_period` gives).
fn check_month(month: &Period) -> Result<(), BillingError> {
    let whole = pricing::calendar_month(month.start);
    if whole != *month {
        return Err(BillingError::Invalid(
            "a summary covers one whole calendar month".into(),
        ));
    }
    Ok(())
}

#[derive(sqlx::FromRow)]
struct SummaryRow {
    id: String,
    name: String,
    email: String,
    platform_fee_bps_override: Option<i32>,
    platform_fee_minimum_cents: Option<i64>,
    plan_id: Option<String>,
    invoice_status: Option<String>,
    invoice_total_cents: Option<i64>,
    invoice_url: Option<String>,
    invoice_pricing: Option<Value>,
    revenue_cents: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct AddonRow {
    customer_id: String,
    #[sqlx(flatten)]
    addon: Addon,
}

/// The summaries of the active customers among `customers` (others are left out).
async fn summarise(
    conn: &mut PgConnection,
    plans: &[Plan],
    customers: &[String],
    month: &Period,
) -> Result<Vec<Result<MonthlySummary, FailedSummary>>, BillingError> {
    summarise_where(conn, plans, customers, month, true).await
}

/// The summaries of `customers`, whatever their status.
async fn summarise_any(
    conn: &mut PgConnection,
    plans: &[Plan],
    customers: &[String],
    month: &Period,
) -> Result<Vec<Result<MonthlySummary, FailedSummary>>, BillingError> {
    summarise_where(conn, plans, customers, month, false).await
}

/// The summaries of `customers` (only the active ones with `only_active`), in id order: four
/// set queries for the whole list, then pure arithmetic per customer.
async fn summarise_where(
    conn: &mut PgConnection,
    plans: &[Plan],
    customers: &[String],
    month: &Period,
    only_active: bool,
) -> Result<Vec<Result<MonthlySummary, FailedSummary>>, BillingError> {
    if customers.is_empty() {
        return Ok(Vec::new());
    }
    let before = previous_month(month.start);
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "SELECT c.id, c.name, c.email, c.platform_fee_bps_override, \
                c.platform_fee_minimum_cents, s.plan_id, \
                i.status AS invoice_status, i.total_cents AS invoice_total_cents, \
                i.hosted_invoice_url AS invoice_url, i.pricing AS invoice_pricing, \
                r.revenue_cents \
         FROM customers c \
         LEFT JOIN subscriptions s ON s.customer_id = c.id AND s.status <> 'canceled' \
         LEFT JOIN invoices i ON i.customer_id = c.id AND i.period_start = $2 \
              AND i.status <> 'void' \
         LEFT JOIN mediated_revenue r ON r.customer_id = c.id AND r.month = $3 \
         WHERE c.id = ANY($1) AND (NOT $4 OR c.status = 'active') \
         ORDER BY c.id",
    )
    .bind(customers)
    .bind(month.start)
    .bind(month.start.date_naive())
    .bind(only_active)
    .fetch_all(&mut *conn)
    .await?;
    let addon_rows: Vec<AddonRow> = sqlx::query_as(
        "SELECT customer_id, addon, description, monthly_cents FROM customer_addons \
         WHERE customer_id = ANY($1) AND created_at < $2 ORDER BY customer_id, addon",
    )
    .bind(customers)
    .bind(month.end)
    .fetch_all(&mut *conn)
    .await?;
    let mut addons: HashMap<String, Vec<Addon>> = HashMap::new();
    for row in addon_rows {
        addons.entry(row.customer_id).or_default().push(row.addon);
    }
    // The month and the one before in one pass over the rollups.
    let usage_rows: Vec<(String, String, i64, i64)> = sqlx::query_as(
        "SELECT customer_id, metric_type, \
                coalesce(sum(quantity) FILTER (WHERE recorded_at >= $2), 0)::bigint, \
                coalesce(sum(quantity) FILTER (WHERE recorded_at < $2), 0)::bigint \
         FROM usage_records \
         WHERE customer_id = ANY($1) AND recorded_at >= $3 AND recorded_at < $4 \
         GROUP BY customer_id, metric_type",
    )
    .bind(customers)
    .bind(month.start)
    .bind(before.start)
    .bind(month.end)
    .fetch_all(&mut *conn)
    .await?;
    let mut usage: HashMap<String, BTreeMap<Metric, (u64, u64)>> = HashMap::new();
    for (customer, metric, this, last) in usage_rows {
        if let Ok(metric) = metric.parse::<Metric>() {
            usage
                .entry(customer)
                .or_default()
                .insert(metric, (this.max(0) as u64, last.max(0) as u64));
        }
    }
    let bands = fee_bands(plans);
    let context = Context {
        plans,
        bands: &bands,
        month,
        month_name: month_text(month.start),
        previous_name: month_text(before.start),
    };
    Ok(rows
        .into_iter()
        .map(|row| {
            let customer_id = row.id.clone();
            let usage = usage.remove(&row.id).unwrap_or_default();
            let addons = addons.remove(&row.id).unwrap_or_default();
            context
                .compose(row, &usage, addons)
                .map_err(|e| FailedSummary {
                    customer_id,
                    error: e.to_string(),
                })
        })
        .collect())
}

/// What every summary of a run shares.
struct Context<'a> {
    plans: &'a [Plan],
    bands: &'a [FeeBand],
    month: &'a Period,
    month_name: String,
    previous_name: String,
}

impl Context<'_> {
    /// One customer's summary from its rows.
    fn compose(
        &self,
        row: SummaryRow,
        usage: &BTreeMap<Metric, (u64, u64)>,
        addons: Vec<Addon>,
    ) -> Result<MonthlySummary, BillingError> {
        let invoice = match (&row.invoice_status, row.invoice_total_cents) {
            (Some(status), Some(total)) => Some(InvoiceSummary {
                status: status.clone(),
                total_cents: total,
                url: row.invoice_url.clone(),
            }),
            _ => None,
        };
        // The invoice's own prices when it has them; else today's, as the preview.
        let kept: Option<PricingTerms> = row
            .invoice_pricing
            .clone()
            .and_then(|p| serde_json::from_value(p).ok());
        let terms = match kept {
            Some(kept) => kept,
            None => {
                // A customer without a live subscription is priced as Starter, the free plan.
                let plan_id = row.plan_id.as_deref().unwrap_or("starter");
                let plan = self
                    .plans
                    .iter()
                    .find(|p| p.id == plan_id)
                    .cloned()
                    .ok_or_else(|| {
                        BillingError::Invalid(format!("plan {plan_id} is not in the catalogue"))
                    })?;
                PricingTerms {
                    plan,
                    bands: self.bands.to_vec(),
                    terms: FeeTerms {
                        override_bps: row.platform_fee_bps_override.map(|b| b.max(0) as u32),
                        minimum_cents: row.platform_fee_minimum_cents.map(|c| c.max(0) as u64),
                    },
                    addons,
                }
            }
        };
        let inputs = MonthInputs {
            account: Account {
                customer_id: row.id.clone(),
                plan: terms.plan,
                bands: terms.bands,
                terms: terms.terms,
                subscription_period: None,
            },
            revenue_cents: row.revenue_cents.map(|r| r.max(0) as u64),
            usage: Metric::ALL
                .iter()
                .map(|&m| (m, usage.get(&m).map_or(0, |u| u.0)))
                .collect(),
            addons: terms.addons,
        };
        let preview = compose_invoice(&inputs, &self.month_name, self.month)?;
        let mut metrics = Vec::with_capacity(Metric::ALL.len());
        let mut overage_total = 0u64;
        for price in inputs.account.prices()? {
            let (used, previous) = usage.get(&price.metric).copied().unwrap_or((0, 0));
            let o = pricing::overage(&price, used)
                .map_err(|e| BillingError::Invalid(format!("cannot price this account: {e}")))?;
            overage_total = overage_total
                .checked_add(o.cost_cents)
                .ok_or_else(|| BillingError::Invalid("the overage overflows".into()))?;
            metrics.push(MetricSummary {
                metric: price.metric,
                used,
                included: price.included,
                overage: o.overage,
                overage_cost_cents: o.cost_cents,
                previous,
                change_percent: change_percent(used, previous),
            });
        }
        let total_cents = match &invoice {
            Some(invoice) => invoice.total_cents,
            None => i64::try_from(preview.total_cents)
                .map_err(|_| BillingError::Invalid("the total overflows".into()))?,
        };
        Ok(MonthlySummary {
            customer_id: row.id,
            name: row.name,
            email: row.email,
            month: self.month_name.clone(),
            previous_month: self.previous_name.clone(),
            plan_type: inputs.account.plan.id.clone(),
            plan_name: inputs.account.plan.name.clone(),
            metrics,
            overage_cost_cents: overage_total,
            mediated_revenue_cents: inputs.revenue_cents,
            platform_fee: preview.platform_fee,
            total_cents,
            invoice,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_are_whole_percents_rounded_half_away_from_zero() {
        assert_eq!(change_percent(5, 0), None);
        assert_eq!(change_percent(0, 0), None);
        assert_eq!(change_percent(100, 100), Some(0));
        assert_eq!(change_percent(150, 100), Some(50));
        assert_eq!(change_percent(0, 100), Some(-100));
        assert_eq!(change_percent(1_125, 1_000), Some(13)); // 12.5 -> 13
        assert_eq!(change_percent(875, 1_000), Some(-13)); // -12.5 -> -13
        assert_eq!(change_percent(1_124, 1_000), Some(12));
        assert_eq!(change_percent(3, 1), Some(200));
        assert_eq!(change_percent(2, 3), Some(-33));
        assert_eq!(change_percent(u64::MAX, 1), Some(i64::MAX));
    }

    #[test]
    fn dedup_keys_name_customer_and_month() {
        assert_eq!(
            dedup_key("cus_abc", "2025-10"),
            "monthly_summary:cus_abc:2025-10"
        );
    }

    #[test]
    fn email_data_has_every_metric_and_nulls_for_what_is_not_there() {
        let summary = MonthlySummary {
            customer_id: "cus_a".into(),
            name: "Acme".into(),
            email: "a@acme.example".into(),
            month: "2025-10".into(),
            previous_month: "2025-09".into(),
            plan_type: "starter".into(),
            plan_name: "Starter".into(),
            metrics: vec![
                MetricSummary {
                    metric: Metric::Impressions,
                    used: 1_500_000,
                    included: Some(1_000_000),
                    overage: 500_000,
                    overage_cost_cents: 5_000,
                    previous: 1_000_000,
                    change_percent: Some(50),
                },
                MetricSummary {
                    metric: Metric::DataTransfer,
                    used: 52_500_000_000,
                    included: None,
                    overage: 0,
                    overage_cost_cents: 0,
                    previous: 0,
                    change_percent: None,
                },
            ],
            overage_cost_cents: 5_000,
            mediated_revenue_cents: None,
            platform_fee: None,
            total_cents: 5_000,
            invoice: None,
        };
        let data = summary.email_data();
        assert_eq!(data["impressions"], json!(1_500_000));
        assert_eq!(data["impressions_included"], json!(1_000_000));
        assert_eq!(data["impressions_overage_cost_cents"], json!(5_000));
        assert_eq!(data["impressions_change_percent"], json!(50));
        assert_eq!(data["data_transfer_gb"], json!(52.5));
        assert_eq!(data["data_transfer_gb_included"], Value::Null);
        assert_eq!(data["data_transfer_gb_overage"], Value::Null);
        assert_eq!(data["data_transfer_gb_change_percent"], Value::Null);
        assert_eq!(data["platform_fee_cents"], Value::Null);
        assert_eq!(data["invoice_total_cents"], Value::Null);
        assert_eq!(data["to"], json!("a@acme.example"));
    }
}
