//! Reconciliation of one billing period across the stores and Stripe (`apexctl reconcile`):
//! per customer, metric and UTC day, the ClickHouse raw events, the ClickHouse daily rollup,
//! the Postgres hourly rollups, the quantity reported to Stripe and (optionally) Stripe's meter
//! event summaries; per customer, our invoice against its own lines, against the preview and
//! (optionally) against Stripe's invoice.
//!
//! Each store is read with one grouped query for the whole period
//! ([`apex_pipeline::rollups`], `stripe_usage_sync`, the invoices); Stripe is asked once per
//! mapped customer and metric (summaries grouped by day) and once or twice per invoice.
//!
//! # Checks and their verdicts
//!
//! Every pair is `ok` (equal), `drift` (a real difference, with `difference = right - left`)
//! or `unsynced` (a difference the system is still expected to close by itself). A pair where
//! both figures are zero is not listed. The rules, check by check (`note` says which applied):
//!
//! - [`RAW_VS_DAILY`]: raw events against the daily rollup. Unsynced only on a day a
//!   ClickHouse pipeline batch is still being written (a `started` marker without `done`):
//!   its rollup part follows its rows.
//! - [`RAW_VS_POSTGRES`]: raw events against the hourly rollups summed per day. The two
//!   appliers move independently, so unsynced on a day a batch applied by one store and not
//!   yet the other touches (from the ClickHouse markers, read before and after the totals);
//!   when the ClickHouse applier is behind the Postgres one, its markers cannot say which
//!   days the missing batches hold, and every difference is unsynced.
//! - [`POSTGRES_VS_REPORTED`]: the hourly rollups against `stripe_usage_sync.
//!   quantity_reported`, with the sync's rules ([`crate::reporting`], [`crate::sync`]). Not
//!   compared for customers without a Stripe customer (listed in
//!   [`Report::unmapped_customers`]). More reported than we hold is drift (the sync never
//!   sends it; it flags the day for a person). Less is unsynced while the sync can still
//!   close it: the day is not complete, an event is pending, or failed and retried next run
//!   (not one held for a person), or the day changed (or ended) less than
//!   [`SYNC_DUE_HOURS`] ago and is still inside Stripe's window; otherwise drift.
//! - [`REPORTED_VS_STRIPE`] (`--stripe`): what Stripe accepted by our records against the
//!   day's meter event summary. Unsynced while the day's event is pending (Stripe may hold
//!   it already); otherwise drift.
//! - [`INVOICE_VS_LINES`]: an invoice's total against the sum of its lines; any difference is
//!   drift.
//! - [`INVOICE_VS_PREVIEW`]: what was billed for the period (the invoice's own lines, and every
//!   adjustment correcting it on a later invoice) against the period priced now, on the terms
//!   kept with the invoice (the preview's code; it is the usage API's preview whenever the
//!   plan and contract have not changed since). Without an invoice: unsynced (the period is
//!   not over, or the close has not issued it yet: it waits for revenue). With one, a
//!   difference is unsynced when a review of the period is open (revenue missing, a credit
//!   awaiting approval) or when the period's usage or revenue changed after the newest
//!   invoice that could carry its adjustment was written (the next close adjusts it);
//!   otherwise drift.
//! - [`INVOICE_VS_STRIPE`] and [`LINE_VS_STRIPE`] (`--stripe`): our invoice's total and each
//!   line (by its `apex_line` metadata) against Stripe's invoice. Unsynced while ours is
//!   `pending` or `draft` (the close is still building it); otherwise drift.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apex_billing::invoices::{self, Invoice};
use apex_billing::pricing::Period;
use apex_billing::statement::{self, PricingTerms};
use apex_core::model::Metric;
use apex_pipeline::rollups::{self, DayTotals, InFlight, PostgresDay, RollupError};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stripe_billing::billing_meter_event_summary::{
    ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
};
use stripe_billing::invoice::RetrieveInvoice;
use stripe_billing::invoice_line_item::ListInvoiceInvoiceLineItem;

use crate::StripeWorkError;
use crate::client::StripeClient;
use crate::reporting;

/// Raw events (`usage_events`) against the ClickHouse daily rollup (`usage_daily`).
pub const RAW_VS_DAILY: &str = "raw_events/clickhouse_daily";
/// Raw events against the Postgres hourly rollups (`usage_records`) summed per day.
pub const RAW_VS_POSTGRES: &str = "raw_events/postgres_hourly";
/// The Postgres rollups against what Stripe accepted (`stripe_usage_sync`).
pub const POSTGRES_VS_REPORTED: &str = "postgres_hourly/stripe_reported";
/// What Stripe accepted by our records against Stripe's meter event summaries.
pub const REPORTED_VS_STRIPE: &str = "stripe_reported/stripe_meter";
/// An invoice's total (`invoices.total_cents`) against the sum of its `invoice_lines`.
pub const INVOICE_VS_LINES: &str = "invoice/invoice_lines";
/// What was billed for the period against the period priced now.
pub const INVOICE_VS_PREVIEW: &str = "invoice/preview";
/// Our invoice's total against Stripe's invoice's total.
pub const INVOICE_VS_STRIPE: &str = "invoice/stripe_invoice";
/// One line of our invoice against Stripe's line of the same `apex_line`.
pub const LINE_VS_STRIPE: &str = "invoice_line/stripe_invoice_line";

/// Every check, in report order.
pub const CHECKS: [&str; 8] = [
    RAW_VS_DAILY,
    RAW_VS_POSTGRES,
    POSTGRES_VS_REPORTED,
    REPORTED_VS_STRIPE,
    INVOICE_VS_LINES,
    INVOICE_VS_PREVIEW,
    INVOICE_VS_STRIPE,
    LINE_VS_STRIPE,
];

/// The checks that ask Stripe itself (`--stripe`).
pub const STRIPE_CHECKS: [&str; 3] = [REPORTED_VS_STRIPE, INVOICE_VS_STRIPE, LINE_VS_STRIPE];

/// How long after a day's end (or its last change) the usage sync has to report it before a
/// shortfall is drift: the sync runs daily (the guide's 02:00), so one day and the run's own
/// length.
pub const SYNC_DUE_HOURS: i64 = 26;

/// The sync's reason for a day it holds for a person rather than retries (see
/// [`crate::sync`]: a shrunk day, an old pending event Stripe disagrees with).
const HELD_FOR_A_PERSON: &str = "needs a person";

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request {
    /// The billing period (a calendar month in UTC).
    pub period: Period,
    /// Only this customer (our id, `cus_...`).
    pub customer: Option<String>,
    /// The time of the run: days after it, or not yet due for the sync, are `unsynced`.
    pub now: DateTime<Utc>,
}

/// Which checks a run makes ([`reconcile_with`]); [`reconcile`] makes them all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// The ClickHouse raw events against both rollups ([`RAW_VS_DAILY`], [`RAW_VS_POSTGRES`]).
    /// Off only for tests that write the Postgres rollups directly, with no raw events.
    pub raw_events: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Self { raw_events: true }
    }
}

/// The verdict on one pair of figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both sides agree.
    Ok,
    /// They differ by `difference`.
    Drift,
    /// The later side is not due yet, or still pending: not drift.
    Unsynced,
}

/// One compared pair.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// Customer id.
    pub customer_id: String,
    /// The metric, or `None` for an invoice comparison.
    pub metric_type: Option<String>,
    /// The UTC day (`YYYY-MM-DD`), or `None` for a per-period comparison.
    pub day: Option<String>,
    /// Which two figures, one of [`CHECKS`], e.g. `raw_events/clickhouse_daily`.
    pub check: String,
    /// The invoice line (`line_key`, Stripe's `apex_line`) of a [`LINE_VS_STRIPE`] pair.
    pub line: Option<String>,
    /// The first figure (units, data transfer in bytes; cents for invoices).
    pub left: i128,
    /// The second figure.
    pub right: i128,
    /// `right - left`.
    pub difference: i128,
    /// The verdict.
    pub verdict: Verdict,
    /// Why a difference is unsynced or drift (`None` when ok).
    pub note: Option<String>,
}

/// Pairs of one check by verdict.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Equal pairs.
    pub ok: usize,
    /// Real differences.
    pub drift: usize,
    /// Differences not due yet.
    pub unsynced: usize,
}

/// The whole comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// The period, `YYYY-MM`.
    pub period: String,
    /// Whether Stripe itself was asked ([`REPORTED_VS_STRIPE`], [`INVOICE_VS_STRIPE`],
    /// [`LINE_VS_STRIPE`]).
    pub stripe: bool,
    /// Customers without a Stripe customer: nothing of theirs is compared with what was
    /// reported to Stripe or invoiced (they have neither).
    pub unmapped_customers: Vec<String>,
    /// Every pair compared, by check, customer, metric, day and line.
    pub pairs: Vec<Pair>,
}

impl Report {
    /// The pairs that drifted.
    pub fn drifts(&self) -> impl Iterator<Item = &Pair> {
        self.pairs.iter().filter(|p| p.verdict == Verdict::Drift)
    }

    /// True when nothing drifted.
    pub fn is_clean(&self) -> bool {
        self.drifts().next().is_none()
    }

    /// Pairs per check (every check of [`CHECKS`], zeros included) and verdict.
    pub fn summary(&self) -> BTreeMap<&'static str, Counts> {
        let mut summary: BTreeMap<&'static str, Counts> =
            CHECKS.iter().map(|c| (*c, Counts::default())).collect();
        for pair in &self.pairs {
            let Some(check) = CHECKS.iter().find(|c| **c == pair.check) else {
                continue;
            };
            let counts = summary.entry(check).or_default();
            match pair.verdict {
                Verdict::Ok => counts.ok += 1,
                Verdict::Drift => counts.drift += 1,
                Verdict::Unsynced => counts.unsynced += 1,
            }
        }
        summary
    }
}

impl From<RollupError> for StripeWorkError {
    fn from(error: RollupError) -> Self {
        match error {
            RollupError::Postgres(e) => Self::Database(e),
            other => Self::Invalid(other.to_string()),
        }
    }
}

/// Compares the stores (and Stripe, when `stripe` is given) over `request`'s period: every
/// check of [`CHECKS`] (see the module documentation for the rules). `Invalid` for an unknown
/// customer; a store or Stripe failing fails the run (a partial comparison could hide drift).
pub async fn reconcile(
    pool: &PgPool,
    stores: &apex_core::stores::StoreConfig,
    stripe: Option<&StripeClient>,
    request: &Request,
) -> Result<Report, StripeWorkError> {
    reconcile_with(pool, stores, stripe, request, Checks::default()).await
}

/// [`reconcile`], making only the checks `checks` selects.
pub async fn reconcile_with(
    pool: &PgPool,
    stores: &apex_core::stores::StoreConfig,
    stripe: Option<&StripeClient>,
    request: &Request,
    checks: Checks,
) -> Result<Report, StripeWorkError> {
    let customer = request.customer.as_deref();
    let mappings = apex_billing::customers::stripe_mappings(pool, customer, true).await?;
    if let Some(id) = customer
        && mappings.is_empty()
    {
        return Err(StripeWorkError::Invalid(format!("customer {id} not found")));
    }
    let period = request.period;
    let first = period.start.date_naive();
    let last = (period.end - Duration::days(1)).date_naive();
    let mut report = Report {
        period: invoices::month_text(period.start),
        stripe: stripe.is_some(),
        ..Report::default()
    };
    let mapped: HashMap<&str, &str> = mappings
        .iter()
        .filter_map(|m| Some((m.id.as_str(), m.stripe_customer_id.as_deref()?)))
        .collect();
    report.unmapped_customers = mappings
        .iter()
        .filter(|m| m.stripe_customer_id.is_none())
        .map(|m| m.id.clone())
        .collect();

    // Each store once for the whole period; the pipeline's position is read before and after
    // the totals, so a batch that moved during the reads is known.
    let postgres = if checks.raw_events {
        let client = stores.clickhouse();
        let mut conn = pool.acquire().await?;
        let before = rollups::in_flight(&client, &mut conn).await?;
        let raw = rollups::raw_daily(&client, first, last, customer).await?;
        let daily = rollups::clickhouse_daily(&client, first, last, customer).await?;
        let postgres = rollups::postgres_daily(&mut *conn, first, last, customer).await?;
        let after = rollups::in_flight(&client, &mut conn).await?;
        compare_raw(&mut report, &raw, &daily, &postgres, &before.union(after));
        postgres
    } else {
        rollups::postgres_daily(pool, first, last, customer).await?
    };

    let synced = sync_rows(pool, first, last, customer).await?;
    compare_reported(&mut report, &postgres, &synced, &mapped, request.now);
    if let Some(stripe) = stripe {
        compare_meters(
            &mut report,
            pool,
            stripe,
            &synced,
            &postgres,
            &mapped,
            request,
        )
        .await?;
    }
    for mapping in &mappings {
        // A month outside the customer's life is never invoiced unasked (as the close).
        let in_life =
            period.end > mapping.created_at && mapping.canceled_at.is_none_or(|c| period.start < c);
        if !mapped.contains_key(mapping.id.as_str()) || !in_life {
            continue;
        }
        compare_invoice(&mut report, pool, stripe, &mapping.id, request).await?;
    }
    report.pairs.sort_by(|a, b| {
        let rank = |p: &Pair| CHECKS.iter().position(|c| *c == p.check);
        (rank(a), &a.customer_id, &a.metric_type, &a.day, &a.line).cmp(&(
            rank(b),
            &b.customer_id,
            &b.metric_type,
            &b.day,
            &b.line,
        ))
    });
    Ok(report)
}

/// A pair of figures: `ok` when equal, else `verdict` with `note`.
fn pair(
    check: &str,
    customer: &str,
    metric: Option<Metric>,
    day: Option<NaiveDate>,
    left: i128,
    right: i128,
    otherwise: (Verdict, String),
) -> Pair {
    let equal = left == right;
    Pair {
        customer_id: customer.to_owned(),
        metric_type: metric.map(|m| m.as_str().to_owned()),
        day: day.map(|d| d.to_string()),
        check: check.to_owned(),
        line: None,
        left,
        right,
        difference: right - left,
        verdict: if equal { Verdict::Ok } else { otherwise.0 },
        note: (!equal).then_some(otherwise.1),
    }
}

fn compare_raw(
    report: &mut Report,
    raw: &DayTotals,
    daily: &DayTotals,
    postgres: &BTreeMap<rollups::DayKey, PostgresDay>,
    flight: &InFlight,
) {
    let keys: BTreeSet<&rollups::DayKey> = raw.keys().chain(daily.keys()).collect();
    for key in keys {
        let (customer, metric, day) = key;
        let open = flight.clickhouse_open.contains(day);
        report.pairs.push(pair(
            RAW_VS_DAILY,
            customer,
            Some(*metric),
            Some(*day),
            i128::from(raw.get(key).copied().unwrap_or(0)),
            i128::from(daily.get(key).copied().unwrap_or(0)),
            if open {
                (
                    Verdict::Unsynced,
                    "a ClickHouse batch touching the day is being written".into(),
                )
            } else {
                (
                    Verdict::Drift,
                    "the daily rollup differs from the raw events: `apexctl rollup rebuild \
                     --store clickhouse` repairs it"
                        .into(),
                )
            },
        ));
    }
    let keys: BTreeSet<&rollups::DayKey> = raw.keys().chain(postgres.keys()).collect();
    for key in keys {
        let (customer, metric, day) = key;
        report.pairs.push(pair(
            RAW_VS_POSTGRES,
            customer,
            Some(*metric),
            Some(*day),
            i128::from(raw.get(key).copied().unwrap_or(0)),
            i128::from(postgres.get(key).map_or(0, |d| d.quantity)),
            if flight.between_stores(*day) {
                (
                    Verdict::Unsynced,
                    "a pipeline batch touching the day is applied by one store and not yet the \
                     other"
                        .into(),
                )
            } else {
                (
                    Verdict::Drift,
                    "the hourly rollups differ from the raw events: `apexctl rollup rebuild \
                     --store postgres` repairs them"
                        .into(),
                )
            },
        ));
    }
}

/// A row of `stripe_usage_sync` as reconciliation reads it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct SyncRow {
    customer_id: String,
    usage_date: NaiveDate,
    metric_type: String,
    quantity_reported: i64,
    status: String,
    pending_quantity: Option<i64>,
    last_error: Option<String>,
}

/// The period's `stripe_usage_sync` rows, by customer, metric and day (one query).
async fn sync_rows(
    pool: &PgPool,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<BTreeMap<rollups::DayKey, SyncRow>, StripeWorkError> {
    let rows: Vec<SyncRow> = sqlx::query_as(
        "SELECT customer_id, usage_date, metric_type, quantity_reported, status, \
                pending_quantity, last_error \
         FROM stripe_usage_sync \
         WHERE usage_date BETWEEN $1 AND $2 AND ($3::text IS NULL OR customer_id = $3)",
    )
    .bind(first)
    .bind(last)
    .bind(customer)
    .fetch_all(pool)
    .await?;
    rows.into_iter()
        .map(|row| {
            let metric: Metric = row
                .metric_type
                .parse()
                .map_err(|e| StripeWorkError::Invalid(format!("stripe_usage_sync holds {e}")))?;
            Ok(((row.customer_id.clone(), metric, row.usage_date), row))
        })
        .collect()
}

fn day_end(day: NaiveDate) -> DateTime<Utc> {
    (day + Duration::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

/// Why a day whose rollup differs from what was reported is or is not drift (see the module
/// documentation).
fn reported_verdict(
    day: NaiveDate,
    total: u64,
    reported: u64,
    row: Option<&SyncRow>,
    changed_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> (Verdict, String) {
    if day_end(day) > now {
        return (Verdict::Unsynced, "the day is not complete".into());
    }
    if reported > total {
        return (
            Verdict::Drift,
            "more was reported to Stripe than the rollups hold (the sync cannot take it back)"
                .into(),
        );
    }
    let reportable = reporting::reportable_days(now).contains(&day);
    if !reportable {
        return (
            Verdict::Drift,
            format!(
                "the day is outside Stripe's {}-day window: the sync can no longer report it",
                reporting::MAX_AGE_DAYS
            ),
        );
    }
    if let Some(row) = row {
        let error = row.last_error.as_deref().unwrap_or("");
        if row.status == "failed" && error.contains(HELD_FOR_A_PERSON) {
            return (Verdict::Drift, format!("the sync holds it: {error}"));
        }
        if row.pending_quantity.is_some() || row.status == "pending" {
            return (
                Verdict::Unsynced,
                "an event is pending: the next sync sends it again".into(),
            );
        }
        if row.status == "failed" {
            return (
                Verdict::Unsynced,
                format!("the last send failed and is retried by the next sync: {error}"),
            );
        }
    }
    let since = changed_at.map_or(day_end(day), |c| c.max(day_end(day)));
    if now < since + Duration::hours(SYNC_DUE_HOURS) {
        (
            Verdict::Unsynced,
            "not yet due: the next daily sync reports it".into(),
        )
    } else {
        (
            Verdict::Drift,
            format!(
                "the usage was not reported although the sync was due {SYNC_DUE_HOURS} h after \
                 the day (or its last change)"
            ),
        )
    }
}

fn compare_reported(
    report: &mut Report,
    postgres: &BTreeMap<rollups::DayKey, PostgresDay>,
    synced: &BTreeMap<rollups::DayKey, SyncRow>,
    mapped: &HashMap<&str, &str>,
    now: DateTime<Utc>,
) {
    let keys: BTreeSet<&rollups::DayKey> = postgres.keys().chain(synced.keys()).collect();
    for key in keys {
        let (customer, metric, day) = key;
        if !mapped.contains_key(customer.as_str()) {
            continue;
        }
        let total = postgres.get(key).map_or(0, |d| d.quantity);
        let row = synced.get(key);
        let reported = row.map_or(0, |r| u64::try_from(r.quantity_reported).unwrap_or(0));
        let otherwise = reported_verdict(
            *day,
            total,
            reported,
            row,
            postgres.get(key).map(|d| d.changed_at),
            now,
        );
        report.pairs.push(pair(
            POSTGRES_VS_REPORTED,
            customer,
            Some(*metric),
            Some(*day),
            i128::from(total),
            i128::from(reported),
            otherwise,
        ));
    }
}

#[derive(Deserialize)]
struct Summaries {
    data: Vec<Summary>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct Summary {
    aggregated_value: f64,
    start_time: i64,
}

/// Stripe's meter totals of one customer and metric per UTC day of `[start, end)` (whole
/// days), one request: summaries grouped by day, at most 100 (a month has 31).
async fn stripe_days(
    stripe: &StripeClient,
    meter_id: &str,
    stripe_customer_id: &str,
    start: DateTime<Utc>,
    end: DateTime<Utc>,
) -> Result<BTreeMap<NaiveDate, u64>, StripeWorkError> {
    let list = ListIdBillingMeterEventSummary::new(
        meter_id.to_owned(),
        stripe_customer_id,
        end.timestamp(),
        start.timestamp(),
    )
    .value_grouping_window(ListIdBillingMeterEventSummaryValueGroupingWindow::Day)
    .limit(100);
    let summaries: Summaries = stripe.send(&list, None).await?;
    if summaries.has_more {
        return Err(StripeWorkError::Invalid(
            "Stripe listed more than 100 daily meter summaries for a month".into(),
        ));
    }
    let mut days = BTreeMap::new();
    for summary in summaries.data {
        let value = summary.aggregated_value;
        // Meter values are whole numbers, exact in an f64 below 2^53.
        if !(0.0..9.0e15).contains(&value) || value.fract() != 0.0 {
            return Err(StripeWorkError::Invalid(format!(
                "meter total {value} is not a whole number we can compare"
            )));
        }
        let Some(day) = DateTime::from_timestamp(summary.start_time, 0) else {
            continue;
        };
        *days.entry(day.date_naive()).or_insert(0) += value as u64;
    }
    Ok(days)
}

async fn compare_meters(
    report: &mut Report,
    pool: &PgPool,
    stripe: &StripeClient,
    synced: &BTreeMap<rollups::DayKey, SyncRow>,
    postgres: &BTreeMap<rollups::DayKey, PostgresDay>,
    mapped: &HashMap<&str, &str>,
    request: &Request,
) -> Result<(), StripeWorkError> {
    let meters: HashMap<String, String> = sqlx::query_as::<_, (String, String)>(
        "SELECT metric_type, stripe_meter_id FROM stripe_meters",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .collect();
    // Complete days only: Stripe's windows are whole UTC days in the past.
    let start = request.period.start;
    let today = request
        .now
        .date_naive()
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc();
    let end = request.period.end.min(today);
    if end <= start || meters.is_empty() {
        return Ok(());
    }
    // Customers and metrics with anything reported or used in the period.
    let wanted: BTreeSet<(&str, Metric)> = synced
        .keys()
        .chain(postgres.keys())
        .filter(|(c, _, _)| mapped.contains_key(c.as_str()))
        .map(|(c, m, _)| (c.as_str(), *m))
        .collect();
    for (customer, metric) in wanted {
        let Some(meter) = meters.get(metric.as_str()) else {
            continue;
        };
        let stripe_customer = mapped[customer];
        let theirs = stripe_days(stripe, meter, stripe_customer, start, end).await?;
        let days: BTreeSet<NaiveDate> = synced
            .keys()
            .filter(|(c, m, d)| c == customer && *m == metric && day_end(*d) <= end)
            .map(|(_, _, d)| *d)
            .chain(theirs.iter().filter(|(_, v)| **v > 0).map(|(d, _)| *d))
            .collect();
        for day in days {
            let key = (customer.to_owned(), metric, day);
            let row = synced.get(&key);
            let reported = row.map_or(0, |r| u64::try_from(r.quantity_reported).unwrap_or(0));
            let pending = row.is_some_and(|r| r.pending_quantity.is_some());
            report.pairs.push(pair(
                REPORTED_VS_STRIPE,
                customer,
                Some(metric),
                Some(day),
                i128::from(reported),
                i128::from(theirs.get(&day).copied().unwrap_or(0)),
                if pending {
                    (
                        Verdict::Unsynced,
                        "an event of the day is pending: Stripe may hold it already".into(),
                    )
                } else {
                    (
                        Verdict::Drift,
                        "Stripe's meter differs from what it accepted by our records".into(),
                    )
                },
            ));
        }
    }
    Ok(())
}

/// What was billed for a period, cents: the invoice's own lines and every later adjustment
/// correcting it (the invoice close's own figure for adjustments).
async fn billed_for(
    pool: &PgPool,
    customer: &str,
    period_start: DateTime<Utc>,
) -> Result<i64, StripeWorkError> {
    Ok(sqlx::query_scalar(
        "SELECT coalesce(sum(l.amount_cents), 0)::bigint FROM invoice_lines l \
         JOIN invoices i ON i.id = l.invoice_id \
         WHERE i.customer_id = $1 \
           AND ((i.period_start = $2 AND l.kind <> 'adjustment') OR l.corrects_period_start = $2)",
    )
    .bind(customer)
    .bind(period_start)
    .fetch_one(pool)
    .await?)
}

/// Whether a difference between what was billed for a period and what it prices at now is
/// one the invoicing will settle by itself, and why.
async fn preview_pending(
    pool: &PgPool,
    customer: &str,
    period: &Period,
) -> Result<Option<String>, StripeWorkError> {
    let open_review: Option<String> = sqlx::query_scalar(
        "SELECT kind FROM invoice_reviews WHERE customer_id = $1 AND period_start = $2 \
           AND resolved_at IS NULL AND kind IN ('revenue_missing', 'negative_adjustment') \
         ORDER BY id LIMIT 1",
    )
    .bind(customer)
    .bind(period.start)
    .fetch_optional(pool)
    .await?;
    if let Some(kind) = open_review {
        return Ok(Some(format!(
            "an open {kind} review of the period awaits a person"
        )));
    }
    // The newest invoice that could carry an adjustment of the period, against the period's
    // latest usage or revenue change.
    let (written, changed): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT (SELECT max(created_at) FROM invoices WHERE customer_id = $1 \
                   AND period_start >= $2), \
                GREATEST( \
                  (SELECT max(updated_at) FROM usage_records WHERE customer_id = $1 \
                     AND recorded_at >= $2 AND recorded_at < $3), \
                  (SELECT max(updated_at) FROM mediated_revenue WHERE customer_id = $1 \
                     AND month = $4))",
    )
    .bind(customer)
    .bind(period.start)
    .bind(period.end)
    .bind(period.start.date_naive())
    .fetch_one(pool)
    .await?;
    Ok(match (written, changed) {
        (Some(written), Some(changed)) if changed > written => Some(
            "the period's usage or revenue changed after its newest invoice was written: the \
             next invoice adjusts it"
                .into(),
        ),
        _ => None,
    })
}

async fn compare_invoice(
    report: &mut Report,
    pool: &PgPool,
    stripe: Option<&StripeClient>,
    customer: &str,
    request: &Request,
) -> Result<(), StripeWorkError> {
    let period = request.period;
    let month = invoices::month_text(period.start);
    let Some(invoice) = invoices::for_period(pool, customer, period.start).await? else {
        let preview = {
            let mut conn = pool.acquire().await?;
            statement::invoice_preview(&mut conn, customer, &month, &period).await?
        };
        let why = if period.end > request.now {
            "the period is not over: no invoice yet"
        } else {
            "no invoice issued yet (the close waits for the month's revenue, or has not run)"
        };
        report.pairs.push(pair(
            INVOICE_VS_PREVIEW,
            customer,
            None,
            None,
            0,
            i128::from(preview.total_cents),
            (Verdict::Unsynced, why.into()),
        ));
        return Ok(());
    };
    let lines = invoices::lines(pool, invoice.id).await?;
    let line_sum: i128 = lines.iter().map(|l| i128::from(l.amount_cents)).sum();
    report.pairs.push(pair(
        INVOICE_VS_LINES,
        customer,
        None,
        None,
        i128::from(invoice.total_cents),
        line_sum,
        (
            Verdict::Drift,
            "the invoice's total is not the sum of its lines".into(),
        ),
    ));

    let pricing: PricingTerms = serde_json::from_value(invoice.pricing.clone()).map_err(|e| {
        StripeWorkError::Invalid(format!(
            "the pricing kept with invoice {} is unreadable: {e}",
            invoice.id
        ))
    })?;
    let priced = {
        let mut conn = pool.acquire().await?;
        let inputs =
            statement::month_inputs_priced_as(&mut conn, customer, &period, &pricing).await?;
        statement::compose_invoice(&inputs, &month, &period)?
    };
    let billed = billed_for(pool, customer, period.start).await?;
    let otherwise = match preview_pending(pool, customer, &period).await? {
        Some(why) => (Verdict::Unsynced, why),
        None => (
            Verdict::Drift,
            "what was billed for the period differs from what it prices at now".into(),
        ),
    };
    report.pairs.push(pair(
        INVOICE_VS_PREVIEW,
        customer,
        None,
        None,
        i128::from(billed),
        i128::from(priced.total_cents),
        otherwise,
    ));

    if let Some(stripe) = stripe {
        compare_stripe_invoice(report, stripe, customer, &invoice, &lines).await?;
    }
    Ok(())
}

#[derive(Deserialize)]
struct StripeInvoice {
    #[serde(default)]
    total: i64,
}

#[derive(Deserialize)]
struct StripeLines {
    data: Vec<StripeLine>,
    #[serde(default)]
    has_more: bool,
}

#[derive(Deserialize)]
struct StripeLine {
    #[serde(default)]
    amount: i64,
    metadata: Option<HashMap<String, String>>,
}

async fn compare_stripe_invoice(
    report: &mut Report,
    stripe: &StripeClient,
    customer: &str,
    invoice: &Invoice,
    lines: &[invoices::Line],
) -> Result<(), StripeWorkError> {
    if invoice.status == "nothing_due" {
        return Ok(());
    }
    let building = matches!(invoice.status.as_str(), "pending" | "draft");
    let Some(stripe_id) = invoice.stripe_invoice_id.as_deref() else {
        report.pairs.push(pair(
            INVOICE_VS_STRIPE,
            customer,
            None,
            None,
            i128::from(invoice.total_cents),
            0,
            (
                Verdict::Unsynced,
                "the close has not created the Stripe invoice yet".into(),
            ),
        ));
        return Ok(());
    };
    let theirs: StripeInvoice = stripe.send(&RetrieveInvoice::new(stripe_id), None).await?;
    let listed: StripeLines = stripe
        .send(&ListInvoiceInvoiceLineItem::new(stripe_id).limit(100), None)
        .await?;
    if listed.has_more {
        return Err(StripeWorkError::Invalid(format!(
            "Stripe's invoice {stripe_id} has more than 100 lines; ours never do"
        )));
    }
    let otherwise = |what: &str| {
        if building {
            (
                Verdict::Unsynced,
                format!(
                    "the close is still building Stripe's invoice ({})",
                    invoice.status
                ),
            )
        } else {
            (
                Verdict::Drift,
                format!("{what} differs from Stripe's invoice {stripe_id}"),
            )
        }
    };
    report.pairs.push(pair(
        INVOICE_VS_STRIPE,
        customer,
        None,
        None,
        i128::from(invoice.total_cents),
        i128::from(theirs.total),
        otherwise("our total"),
    ));
    let mut stripe_lines: BTreeMap<String, i128> = BTreeMap::new();
    for line in listed.data {
        let key = line
            .metadata
            .as_ref()
            .and_then(|m| m.get("apex_line").cloned())
            .unwrap_or_else(|| "(no apex_line)".to_owned());
        *stripe_lines.entry(key).or_insert(0) += i128::from(line.amount);
    }
    let ours: BTreeMap<String, i128> = lines
        .iter()
        .map(|l| (l.line_key.clone(), i128::from(l.amount_cents)))
        .collect();
    let keys: BTreeSet<&String> = ours.keys().chain(stripe_lines.keys()).collect();
    for key in keys {
        let mut line = pair(
            LINE_VS_STRIPE,
            customer,
            None,
            None,
            ours.get(key).copied().unwrap_or(0),
            stripe_lines.get(key).copied().unwrap_or(0),
            otherwise("our line"),
        );
        line.line = Some(key.clone());
        report.pairs.push(line);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn row(status: &str, pending: Option<i64>, error: Option<&str>) -> SyncRow {
        SyncRow {
            customer_id: "cus_a".into(),
            usage_date: "2026-11-10".parse().unwrap(),
            metric_type: "impressions".into(),
            quantity_reported: 100,
            status: status.into(),
            pending_quantity: pending,
            last_error: error.map(str::to_owned),
        }
    }

    #[test]
    fn a_shortfall_of_what_was_reported_is_unsynced_only_while_the_sync_can_close_it() {
        let day: NaiveDate = "2026-11-10".parse().unwrap();
        let verdict = |total, reported, row: Option<&SyncRow>, changed, now| {
            reported_verdict(day, total, reported, row, changed, at(now)).0
        };
        // Today is not complete.
        assert_eq!(
            verdict(5, 0, None, None, "2026-11-10T12:00:00Z"),
            Verdict::Unsynced
        );
        // Not reported yet, the night after: the 02:00 sync has not run, or just ran.
        assert_eq!(
            verdict(5, 0, None, None, "2026-11-11T01:00:00Z"),
            Verdict::Unsynced
        );
        // Two days later with nothing reported: drift.
        assert_eq!(
            verdict(5, 0, None, None, "2026-11-12T03:00:00Z"),
            Verdict::Drift
        );
        // A late record changed the day yesterday evening: the next sync corrects it.
        let sent = row("sent", None, None);
        assert_eq!(
            verdict(
                150,
                100,
                Some(&sent),
                Some(at("2026-11-20T20:00:00Z")),
                "2026-11-21T01:00:00Z"
            ),
            Verdict::Unsynced
        );
        // Pending and retryable failures are unsynced; a day held for a person is drift.
        let pending = row("pending", Some(50), None);
        assert_eq!(
            verdict(150, 100, Some(&pending), None, "2026-11-25T01:00:00Z"),
            Verdict::Unsynced
        );
        let failed = row("failed", Some(50), Some("stripe: 500"));
        assert_eq!(
            verdict(150, 100, Some(&failed), None, "2026-11-25T01:00:00Z"),
            Verdict::Unsynced
        );
        let held = row(
            "failed",
            Some(50),
            Some("Stripe holds 7 for the day; ...: not sent again, needs a person"),
        );
        assert_eq!(
            verdict(150, 100, Some(&held), None, "2026-11-25T01:00:00Z"),
            Verdict::Drift
        );
        // More reported than held, or a day out of Stripe's window: drift.
        assert_eq!(
            verdict(90, 100, Some(&sent), None, "2026-11-11T01:00:00Z"),
            Verdict::Drift
        );
        assert_eq!(
            verdict(150, 100, Some(&pending), None, "2026-12-30T01:00:00Z"),
            Verdict::Drift
        );
    }

    #[test]
    fn the_summary_counts_every_check() {
        let report = Report {
            pairs: vec![
                pair(
                    RAW_VS_DAILY,
                    "cus_a",
                    None,
                    None,
                    1,
                    1,
                    (Verdict::Drift, String::new()),
                ),
                pair(
                    RAW_VS_DAILY,
                    "cus_a",
                    None,
                    None,
                    1,
                    2,
                    (Verdict::Drift, String::new()),
                ),
                pair(
                    INVOICE_VS_PREVIEW,
                    "cus_a",
                    None,
                    None,
                    1,
                    2,
                    (Verdict::Unsynced, String::new()),
                ),
            ],
            ..Report::default()
        };
        let summary = report.summary();
        assert_eq!(summary.len(), CHECKS.len());
        assert_eq!(
            summary[RAW_VS_DAILY],
            Counts {
                ok: 1,
                drift: 1,
                unsynced: 0
            }
        );
        assert_eq!(summary[INVOICE_VS_PREVIEW].unsynced, 1);
        assert!(!report.is_clean());
        assert_eq!(report.drifts().count(), 1);
        assert_eq!(report.pairs[1].difference, 1);
    }
}
