//! What a customer sees of its account: usage in the billing period with its overages, usage
//! against the plan's limits, and the invoice preview of a month. Reads Postgres (the hourly
//! `usage_records` rollups, plans, subscriptions, revenue, add-ons) and prices with
//! [`crate::pricing`]. Shapes follow the operations guide; data transfer is shown in GB as an
//! exact decimal number (stored in bytes).

use std::collections::BTreeMap;

use apex_core::model::{BYTES_PER_GB, Metric};
use chrono::NaiveDate;
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::value::RawValue;
use sqlx::{PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::plans::{Plan, list_plans};
use crate::pricing::{
    self, FeeBand, FeeTerms, MetricPrice, Overage, Period, PricingError, billing_period,
};

/// `bytes` as decimal GB, exactly: `35.2`, `0.000000001`, `0`.
pub fn gb_text(bytes: u64) -> String {
    let whole = bytes / BYTES_PER_GB;
    let fraction = bytes % BYTES_PER_GB;
    if fraction == 0 {
        return whole.to_string();
    }
    let digits = format!("{fraction:09}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// A JSON number holding `bytes` in GB exactly.
pub fn gb_number(bytes: u64) -> Box<RawValue> {
    RawValue::from_string(gb_text(bytes)).expect("a decimal is a JSON number")
}

/// The name a metric has in the dashboard API: data transfer is shown in GB.
pub fn api_name(metric: Metric) -> &'static str {
    match metric {
        Metric::Impressions => "impressions",
        Metric::ApiCalls => "api_calls",
        Metric::DataTransfer => "data_transfer_gb",
    }
}

/// A quantity of `metric` as a JSON number in the API's unit.
pub fn api_quantity(metric: Metric, units: u64) -> Box<RawValue> {
    match metric {
        Metric::DataTransfer => gb_number(units),
        _ => RawValue::from_string(units.to_string()).expect("an integer is a JSON number"),
    }
}

fn invalid(e: PricingError) -> BillingError {
    BillingError::Invalid(format!("cannot price this account: {e}"))
}

/// Everything about a customer's account that pricing needs.
#[derive(Debug, Clone)]
pub struct Account {
    /// Customer id.
    pub customer_id: String,
    /// Its plan.
    pub plan: Plan,
    /// Every plan's fee band.
    pub bands: Vec<FeeBand>,
    /// Negotiated terms.
    pub terms: FeeTerms,
    /// The live subscription's current period, if it has one.
    pub subscription_period: Option<(DateTime<Utc>, DateTime<Utc>)>,
}

impl Account {
    /// The plan's price of every metric (a metric the plan does not list is unlimited).
    pub fn prices(&self) -> Result<Vec<MetricPrice>, BillingError> {
        Metric::ALL
            .iter()
            .map(|&metric| {
                let limit = self
                    .plan
                    .limits
                    .iter()
                    .find(|l| l.metric_type == metric.as_str());
                Ok(match limit {
                    Some(l) => MetricPrice {
                        metric,
                        included: l.included_quantity.map(|q| q.max(0) as u64),
                        unit_quantity: u64::try_from(l.overage_unit_quantity)
                            .map_err(|_| BillingError::Invalid("negative overage unit".into()))?,
                        cents_per_unit: l.overage_cents_per_unit.max(0) as u64,
                    },
                    None => MetricPrice {
                        metric,
                        included: None,
                        unit_quantity: 1,
                        cents_per_unit: 0,
                    },
                })
            })
            .collect()
    }
}

#[derive(sqlx::FromRow)]
struct AccountRow {
    plan_id: Option<String>,
    current_period_start: Option<DateTime<Utc>>,
    current_period_end: Option<DateTime<Utc>>,
    platform_fee_bps_override: Option<i32>,
    platform_fee_minimum_cents: Option<i64>,
}

/// Every plan's platform-fee band, as pricing reads them from the catalogue.
pub(crate) fn fee_bands(plans: &[Plan]) -> Vec<FeeBand> {
    plans
        .iter()
        .map(|p| FeeBand {
            plan_id: p.id.clone(),
            min_cents: p.revenue_band_min_cents.max(0) as u64,
            max_cents: p.revenue_band_max_cents.map(|m| m.max(0) as u64),
            bps: p.platform_fee_bps.max(0) as u32,
            bps_min: p.platform_fee_bps_min.max(0) as u32,
            bps_max: p.platform_fee_bps_max.max(0) as u32,
        })
        .collect()
}

/// Loads a customer's account; `NotFound` for an unknown customer.
pub async fn account(conn: &mut PgConnection, customer_id: &str) -> Result<Account, BillingError> {
    let row: Option<AccountRow> = sqlx::query_as(
        "SELECT s.plan_id, s.current_period_start, s.current_period_end, \
                c.platform_fee_bps_override, c.platform_fee_minimum_cents \
         FROM customers c \
         LEFT JOIN subscriptions s ON s.customer_id = c.id AND s.status <> 'canceled' \
         WHERE c.id = $1",
    )
    .bind(customer_id)
    .fetch_optional(&mut *conn)
    .await?;
    let row = row.ok_or_else(|| BillingError::NotFound {
        what: format!("customer {customer_id}"),
    })?;
    let plans = list_plans(&mut *conn).await?;
    // A customer without a live subscription is priced as Starter, the free plan.
    let plan_id = row.plan_id.unwrap_or_else(|| "starter".to_owned());
    // A subscription naming a plan that is not in the catalogue is a data fault, not a
    // missing customer.
    let plan = plans
        .iter()
        .find(|p| p.id == plan_id)
        .cloned()
        .ok_or_else(|| BillingError::Invalid(format!("plan {plan_id} is not in the catalogue")))?;
    let bands = fee_bands(&plans);
    Ok(Account {
        customer_id: customer_id.to_owned(),
        plan,
        bands,
        terms: FeeTerms {
            override_bps: row.platform_fee_bps_override.map(|b| b.max(0) as u32),
            minimum_cents: row.platform_fee_minimum_cents.map(|c| c.max(0) as u64),
        },
        subscription_period: row.current_period_start.zip(row.current_period_end),
    })
}

/// Usage of `customer_id` per metric in `[period.start, period.end)`, from the hourly rollups
/// (an hour counts in the period its start falls in).
pub async fn usage_in(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period: &Period,
) -> Result<BTreeMap<Metric, u64>, BillingError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT metric_type, sum(quantity)::bigint FROM usage_records \
         WHERE customer_id = $1 AND recorded_at >= $2 AND recorded_at < $3 GROUP BY metric_type",
    )
    .bind(customer_id)
    .bind(period.start)
    .bind(period.end)
    .fetch_all(db)
    .await?;
    let mut usage: BTreeMap<Metric, u64> = Metric::ALL.iter().map(|&m| (m, 0)).collect();
    for (metric, quantity) in rows {
        if let Ok(metric) = metric.parse::<Metric>() {
            usage.insert(metric, quantity.max(0) as u64);
        }
    }
    Ok(usage)
}

/// One customer's usage since a time, as the guide's "check customer usage" lists it.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct TopUsage {
    /// Customer id.
    pub customer_id: String,
    /// Its name (`None` for usage of a customer no longer in `customers`).
    pub name: Option<String>,
    /// Impressions.
    pub impressions: i64,
    /// API calls.
    pub api_calls: i64,
    /// Data transfer, bytes.
    pub data_transfer_bytes: i64,
}

/// The guide's "check customer usage": the `limit` customers with the most impressions in the
/// hourly rollups since `since` (ties by customer id), with their API calls and data transfer.
pub async fn top_usage(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<TopUsage>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT u.customer_id, c.name, \
             coalesce(sum(u.quantity) FILTER (WHERE u.metric_type = 'impressions'), 0)::bigint \
                 AS impressions, \
             coalesce(sum(u.quantity) FILTER (WHERE u.metric_type = 'api_calls'), 0)::bigint \
                 AS api_calls, \
             coalesce(sum(u.quantity) FILTER (WHERE u.metric_type = 'data_transfer'), 0)::bigint \
                 AS data_transfer_bytes \
         FROM usage_records u LEFT JOIN customers c ON c.id = u.customer_id \
         WHERE u.recorded_at >= $1 \
         GROUP BY u.customer_id, c.name \
         ORDER BY impressions DESC, u.customer_id LIMIT $2",
    )
    .bind(since)
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Usage of `customer_id` per UTC day and metric for the days `first` to `last` (inclusive),
/// from the hourly rollups: the quantities the Stripe usage sync reports. Days and metrics
/// without usage are absent.
pub async fn daily_usage(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    first: NaiveDate,
    last: NaiveDate,
) -> Result<BTreeMap<(NaiveDate, Metric), u64>, BillingError> {
    let start = first
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let end = (last + chrono::Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let rows: Vec<(NaiveDate, String, i64)> = sqlx::query_as(
        "SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, metric_type, \
                sum(quantity)::bigint \
         FROM usage_records \
         WHERE customer_id = $1 AND recorded_at >= $2 AND recorded_at < $3 \
         GROUP BY 1, 2",
    )
    .bind(customer_id)
    .bind(start)
    .bind(end)
    .fetch_all(db)
    .await?;
    rows.into_iter()
        .map(|(day, metric, total)| {
            let metric = metric
                .parse::<Metric>()
                .map_err(|e| BillingError::Invalid(format!("usage_records holds {e}")))?;
            Ok(((day, metric), u64::try_from(total).unwrap_or(0)))
        })
        .collect()
}

/// `GET /api/usage/current`: the guide's `usage` object.
#[derive(Debug, Serialize)]
pub struct PeriodUsage {
    /// Customer id.
    pub customer_id: String,
    /// Impressions this period.
    pub impressions: u64,
    /// API calls this period.
    pub api_calls: u64,
    /// Data transfer this period, GB.
    pub data_transfer_gb: Box<RawValue>,
    /// Period start (RFC 3339, UTC).
    pub period_start: DateTime<Utc>,
    /// Period end.
    pub period_end: DateTime<Utc>,
}

/// `GET /api/usage/current`.
#[derive(Debug, Serialize)]
pub struct CurrentUsage {
    /// Usage in the current billing period.
    pub usage: PeriodUsage,
    /// `<metric>_overage` and `<metric>_overage_cost_cents` for every metric with a limit,
    /// and `total_overage_cost_cents`.
    pub overages: BTreeMap<String, Box<RawValue>>,
}

fn priced(account: &Account, usage: &BTreeMap<Metric, u64>) -> Result<Vec<Overage>, BillingError> {
    account
        .prices()?
        .iter()
        .map(|price| pricing::overage(price, usage.get(&price.metric).copied().unwrap_or(0)))
        .collect::<Result<_, _>>()
        .map_err(invalid)
}

fn integer(value: u64) -> Box<RawValue> {
    RawValue::from_string(value.to_string()).expect("an integer is a JSON number")
}

/// A customer's account, its billing period at `now`, and its usage in that period.
async fn current_period(
    conn: &mut PgConnection,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<(Account, Period, BTreeMap<Metric, u64>), BillingError> {
    let account = account(conn, customer_id).await?;
    let period = billing_period(now, account.subscription_period);
    let usage = usage_in(&mut *conn, customer_id, &period).await?;
    Ok((account, period, usage))
}

/// The current billing period's usage and overages of `customer_id` at `now`.
pub async fn current_usage(
    conn: &mut PgConnection,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<CurrentUsage, BillingError> {
    let (account, period, usage) = current_period(conn, customer_id, now).await?;
    let overages = priced(&account, &usage)?;
    let mut map = BTreeMap::new();
    let mut total = 0u64;
    for o in overages.iter().filter(|o| o.included.is_some()) {
        let name = api_name(o.metric);
        map.insert(format!("{name}_overage"), api_quantity(o.metric, o.overage));
        map.insert(format!("{name}_overage_cost_cents"), integer(o.cost_cents));
        total = total
            .checked_add(o.cost_cents)
            .ok_or_else(|| invalid(PricingError::Overflow))?;
    }
    map.insert("total_overage_cost_cents".into(), integer(total));
    Ok(CurrentUsage {
        usage: PeriodUsage {
            customer_id: customer_id.to_owned(),
            impressions: usage[&Metric::Impressions],
            api_calls: usage[&Metric::ApiCalls],
            data_transfer_gb: gb_number(usage[&Metric::DataTransfer]),
            period_start: period.start,
            period_end: period.end,
        },
        overages: map,
    })
}

/// `GET /api/usage/limits`.
#[derive(Debug, Serialize)]
pub struct Limits {
    /// The plan's id.
    pub plan_type: String,
    /// Included quantity of every limited metric.
    pub limits: BTreeMap<&'static str, Box<RawValue>>,
    /// Used this period, same metrics.
    pub current_usage: BTreeMap<&'static str, Box<RawValue>>,
    /// The highest share of a limit used, whole percent (rounded down; above 100 when over;
    /// 100 for a limit of 0 once anything is used).
    pub percent_used: u64,
    /// The same per metric.
    pub percent_used_by_metric: BTreeMap<&'static str, u64>,
    /// What is left of each limit (0 when over).
    pub remaining: BTreeMap<&'static str, Box<RawValue>>,
    /// True when some metric, at this period's rate so far, ends the period over its limit.
    pub will_exceed: bool,
    /// Projected usage at the end of the period, same metrics.
    pub projected_usage: BTreeMap<&'static str, Box<RawValue>>,
    /// Period start.
    pub period_start: DateTime<Utc>,
    /// Period end.
    pub period_end: DateTime<Utc>,
}

/// Usage of `customer_id` against its plan's limits at `now`.
pub async fn limits(
    conn: &mut PgConnection,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<Limits, BillingError> {
    let (account, period, usage) = current_period(conn, customer_id, now).await?;
    let mut out = Limits {
        plan_type: account.plan.id.clone(),
        limits: BTreeMap::new(),
        current_usage: BTreeMap::new(),
        percent_used: 0,
        percent_used_by_metric: BTreeMap::new(),
        remaining: BTreeMap::new(),
        will_exceed: false,
        projected_usage: BTreeMap::new(),
        period_start: period.start,
        period_end: period.end,
    };
    for price in account.prices()? {
        let Some(included) = price.included else {
            continue;
        };
        let name = api_name(price.metric);
        let used = usage[&price.metric];
        let percent = if included == 0 {
            if used == 0 { 0 } else { 100 }
        } else {
            (u128::from(used) * 100 / u128::from(included)).min(u128::from(u64::MAX)) as u64
        };
        let projection = pricing::projected(used, &period, now);
        out.limits
            .insert(name, api_quantity(price.metric, included));
        out.current_usage
            .insert(name, api_quantity(price.metric, used));
        out.remaining.insert(
            name,
            api_quantity(price.metric, included.saturating_sub(used)),
        );
        out.projected_usage
            .insert(name, api_quantity(price.metric, projection));
        out.percent_used_by_metric.insert(name, percent);
        out.percent_used = out.percent_used.max(percent);
        out.will_exceed |= projection > included;
    }
    Ok(out)
}

/// One line of an invoice preview.
#[derive(Debug, Clone, Serialize)]
pub struct InvoiceLine {
    /// The line's name within its invoice (`plan`, `platform_fee`, `overage:<metric>`,
    /// `addon:<addon>`, `adjustment:<YYYY-MM>`): the monthly invoice's `invoice_lines.line_key`
    /// and the Stripe invoice item's metadata `apex_line`. Not part of the preview's JSON.
    #[serde(skip)]
    pub key: String,
    /// `plan`, `platform_fee`, `overage`, `addon` (or, on an issued invoice, `adjustment`).
    pub kind: &'static str,
    /// What a person reads on the invoice.
    pub description: String,
    /// The metric of an overage line.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metric: Option<&'static str>,
    /// Billed quantity (overage in the API's unit; revenue in cents for the platform fee).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quantity: Option<Box<RawValue>>,
    /// Amount, cents.
    pub amount_cents: u64,
}

/// `GET /api/billing/preview?month=YYYY-MM`.
#[derive(Debug, Serialize)]
pub struct InvoicePreview {
    /// Customer id.
    pub customer_id: String,
    /// `YYYY-MM`.
    pub month: String,
    /// First instant of the month (UTC).
    pub period_start: DateTime<Utc>,
    /// First instant after it.
    pub period_end: DateTime<Utc>,
    /// The plan.
    pub plan_type: String,
    /// Always `usd`.
    pub currency: &'static str,
    /// Mediated revenue reported for the month, cents (`null` if none was reported; the fee
    /// is then 0 until it is).
    pub mediated_revenue_cents: Option<u64>,
    /// The platform fee's computation.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub platform_fee: Option<pricing::PlatformFee>,
    /// Lines with a non-zero amount, in invoice order.
    pub lines: Vec<InvoiceLine>,
    /// Sum of the lines, cents.
    pub total_cents: u64,
}

/// `cents` as `$1,234.56`.
pub fn dollars(cents: u64) -> String {
    let whole = cents / 100;
    let mut grouped = String::new();
    let digits = whole.to_string();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            grouped.push(',');
        }
        grouped.push(c);
    }
    format!("${grouped}.{:02}", cents % 100)
}

/// A monthly add-on a customer buys.
#[derive(Debug, Clone, Serialize, serde::Deserialize, sqlx::FromRow)]
pub struct Addon {
    /// Its name (`white_label`, ...).
    pub addon: String,
    /// What the invoice line says.
    pub description: String,
    /// Price per month, cents.
    pub monthly_cents: i64,
}

/// The prices and terms a month was invoiced on: the plan (base fee, limits, overage prices),
/// every plan's fee band, the customer's negotiated terms and the add-ons. An issued invoice
/// keeps them (`invoices.pricing`), so pricing that month again later (for an adjustment)
/// finds only what changed in its revenue and usage, never a later price or contract change.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct PricingTerms {
    /// The plan.
    pub plan: Plan,
    /// Every plan's fee band.
    pub bands: Vec<FeeBand>,
    /// Negotiated terms.
    pub terms: FeeTerms,
    /// Add-ons bought before the month ended.
    pub addons: Vec<Addon>,
}

/// Everything that prices one month of one customer, read from Postgres.
#[derive(Debug, Clone)]
pub struct MonthInputs {
    /// The account (plan, bands, negotiated terms).
    pub account: Account,
    /// Mediated revenue reported for the month, cents; `None` when none was.
    pub revenue_cents: Option<u64>,
    /// Usage per metric in the month, storage units.
    pub usage: BTreeMap<Metric, u64>,
    /// Add-ons bought before the month ended.
    pub addons: Vec<Addon>,
}

impl MonthInputs {
    /// The prices and terms of these inputs, to keep with an invoice.
    pub fn pricing_terms(&self) -> PricingTerms {
        PricingTerms {
            plan: self.account.plan.clone(),
            bands: self.account.bands.clone(),
            terms: self.account.terms,
            addons: self.addons.clone(),
        }
    }
}

/// Reads what prices `customer_id`'s calendar month `period` today: its current plan, terms
/// and add-ons, and the month's revenue and usage. `NotFound` for an unknown customer.
pub async fn month_inputs(
    conn: &mut PgConnection,
    customer_id: &str,
    period: &Period,
) -> Result<MonthInputs, BillingError> {
    let account = account(&mut *conn, customer_id).await?;
    let addons: Vec<Addon> = sqlx::query_as(
        "SELECT addon, description, monthly_cents FROM customer_addons \
         WHERE customer_id = $1 AND created_at < $2 ORDER BY addon",
    )
    .bind(customer_id)
    .bind(period.end)
    .fetch_all(&mut *conn)
    .await?;
    let (revenue_cents, usage) = revenue_and_usage(conn, customer_id, period).await?;
    Ok(MonthInputs {
        account,
        revenue_cents,
        usage,
        addons,
    })
}

/// The month's revenue and usage as they are now, priced on `pricing` (the terms an invoice
/// of that month was issued on).
pub async fn month_inputs_priced_as(
    conn: &mut PgConnection,
    customer_id: &str,
    period: &Period,
    pricing: &PricingTerms,
) -> Result<MonthInputs, BillingError> {
    let (revenue_cents, usage) = revenue_and_usage(conn, customer_id, period).await?;
    Ok(MonthInputs {
        account: Account {
            customer_id: customer_id.to_owned(),
            plan: pricing.plan.clone(),
            bands: pricing.bands.clone(),
            terms: pricing.terms,
            subscription_period: None,
        },
        revenue_cents,
        usage,
        addons: pricing.addons.clone(),
    })
}

async fn revenue_and_usage(
    conn: &mut PgConnection,
    customer_id: &str,
    period: &Period,
) -> Result<(Option<u64>, BTreeMap<Metric, u64>), BillingError> {
    let revenue: Option<i64> = sqlx::query_scalar(
        "SELECT revenue_cents FROM mediated_revenue WHERE customer_id = $1 AND month = $2",
    )
    .bind(customer_id)
    .bind(period.start.date_naive())
    .fetch_optional(&mut *conn)
    .await?;
    let usage = usage_in(&mut *conn, customer_id, period).await?;
    Ok((revenue.map(|r| r.max(0) as u64), usage))
}

/// The invoice of the calendar month `period` (`month` is its `YYYY-MM`) from its inputs, as
/// pure arithmetic over [`crate::pricing`]: plan base fee, platform fee on the month's revenue,
/// overages of the month's usage, add-ons; lines with a zero amount are left out. The preview
/// and the monthly invoice both come from here, so they cannot drift.
pub fn compose_invoice(
    inputs: &MonthInputs,
    month: &str,
    period: &Period,
) -> Result<InvoicePreview, BillingError> {
    let account = &inputs.account;
    let mut lines = Vec::new();
    if account.plan.monthly_base_cents > 0 {
        lines.push(InvoiceLine {
            key: "plan".into(),
            kind: "plan",
            description: format!("{} plan", account.plan.name),
            metric: None,
            quantity: None,
            amount_cents: account.plan.monthly_base_cents as u64,
        });
    }
    let fee = match inputs.revenue_cents {
        Some(cents) => {
            Some(pricing::platform_fee(cents, &account.bands, &account.terms).map_err(invalid)?)
        }
        None => None,
    };
    if let Some(fee) = fee.as_ref().filter(|f| f.amount_cents > 0) {
        let rate = format!("{}.{:02} %", fee.bps / 100, fee.bps % 100);
        let mut description = format!(
            "Platform fee: {rate} of {} mediated revenue ({} band{})",
            dollars(fee.revenue_cents),
            fee.band,
            if fee.negotiated {
                ", negotiated rate"
            } else {
                ""
            }
        );
        if fee.minimum_applied {
            description.push_str(&format!(", monthly minimum {}", dollars(fee.amount_cents)));
        }
        lines.push(InvoiceLine {
            key: "platform_fee".into(),
            kind: "platform_fee",
            description,
            metric: None,
            quantity: Some(integer(fee.revenue_cents)),
            amount_cents: fee.amount_cents,
        });
    }
    for o in priced(account, &inputs.usage)? {
        if o.cost_cents == 0 {
            continue;
        }
        lines.push(InvoiceLine {
            key: format!("overage:{}", o.metric.as_str()),
            kind: "overage",
            description: format!("{} over the plan's included quantity", api_name(o.metric)),
            metric: Some(api_name(o.metric)),
            quantity: Some(api_quantity(o.metric, o.overage)),
            amount_cents: o.cost_cents,
        });
    }
    for addon in &inputs.addons {
        if addon.monthly_cents > 0 {
            lines.push(InvoiceLine {
                key: format!("addon:{}", addon.addon),
                kind: "addon",
                description: addon.description.clone(),
                metric: None,
                quantity: None,
                amount_cents: addon.monthly_cents as u64,
            });
        }
    }
    let total = lines
        .iter()
        .try_fold(0u64, |sum, l| sum.checked_add(l.amount_cents))
        .ok_or_else(|| invalid(PricingError::Overflow))?;
    Ok(InvoicePreview {
        customer_id: account.customer_id.clone(),
        month: month.to_owned(),
        period_start: period.start,
        period_end: period.end,
        plan_type: account.plan.id.clone(),
        currency: "usd",
        mediated_revenue_cents: inputs.revenue_cents,
        platform_fee: fee,
        lines,
        total_cents: total,
    })
}

/// The invoice the monthly billing would issue for the calendar month `period`
/// (`month` is its `YYYY-MM`), on the customer's current plan.
pub async fn invoice_preview(
    conn: &mut PgConnection,
    customer_id: &str,
    month: &str,
    period: &Period,
) -> Result<InvoicePreview, BillingError> {
    let inputs = month_inputs(conn, customer_id, period).await?;
    compose_invoice(&inputs, month, period)
}

/// Records `customer_id`'s mediated revenue for the month starting `period.start`
/// (replacing an earlier figure).
pub async fn set_revenue(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    period: &Period,
    cents: u64,
) -> Result<(), BillingError> {
    let cents =
        i64::try_from(cents).map_err(|_| BillingError::Invalid("revenue is too large".into()))?;
    let result = sqlx::query(
        "INSERT INTO mediated_revenue (customer_id, month, revenue_cents) \
         SELECT id, $2, $3 FROM customers WHERE id = $1 \
         ON CONFLICT (customer_id, month) DO UPDATE \
         SET revenue_cents = EXCLUDED.revenue_cents, updated_at = now()",
    )
    .bind(customer_id)
    .bind(period.start.date_naive())
    .bind(cents)
    .execute(db)
    .await?;
    if result.rows_affected() == 0 {
        return Err(BillingError::NotFound {
            what: format!("customer {customer_id}"),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gigabytes_are_exact_decimals() {
        assert_eq!(gb_text(0), "0");
        assert_eq!(gb_text(35_200_000_000), "35.2");
        assert_eq!(gb_text(1), "0.000000001");
        assert_eq!(gb_text(1_000_000_000), "1");
        assert_eq!(gb_text(12_345_678_901), "12.345678901");
        assert_eq!(gb_text(u64::MAX), "18446744073.709551615");
        let n: serde_json::Value = serde_json::from_str(gb_number(35_200_000_000).get()).unwrap();
        assert_eq!(n, serde_json::json!(35.2));
    }

    #[test]
    fn dollars_are_grouped() {
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(5_000_000), "$50,000.00");
        assert_eq!(dollars(123_456_789), "$1,234,567.89");
        assert_eq!(dollars(99), "$0.99");
    }
}
