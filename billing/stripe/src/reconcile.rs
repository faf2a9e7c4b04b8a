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
//! or `unsynced` (a difference the system is still expected to close by itself, and only
//! until it is due to: every `unsynced` rule has a deadline, after which it is drift). `left`
//! is the first figure a check names, `right` the second (`raw_events/postgres_hourly`: the
//! raw total, then the rollups'). A customer, metric and day with nothing on either side is
//! not listed. The rules, check by check (`note` says which applied):
//!
//! - [`RAW_VS_DAILY`]: raw events against the daily rollup. Unsynced only on a day a
//!   ClickHouse pipeline batch is still being written (a `started` marker without `done`):
//!   its rollup part follows its rows.
//! - [`RAW_VS_POSTGRES`]: raw events against the hourly rollups summed per day. The two
//!   appliers move independently, so unsynced on a day a ClickHouse batch not yet applied by
//!   Postgres touches (from the ClickHouse markers, read before and after the totals), and,
//!   when the ClickHouse applier is behind the Postgres one, for raw totals *below* the
//!   rollups (the direction a missing ClickHouse batch explains). Either only while the batch
//!   is younger than [`PIPELINE_LAG_MINUTES`]: a store stuck longer is drift, and
//!   [`Report::pipeline`] gives each log's position in both stores.
//! - [`POSTGRES_VS_REPORTED`]: the hourly rollups against `stripe_usage_sync.
//!   quantity_reported`, with the sync's rules ([`crate::reporting`], [`crate::sync`]). Not
//!   compared for customers without a Stripe customer (listed in
//!   [`Report::unmapped_customers`]). More reported than we hold is drift at any time (the
//!   sync never sends it). Less is unsynced while the sync can still close it: the day is not
//!   complete; an event is pending (or failed and is retried), for at most
//!   [`SYNC_DUE_HOURS`] after it was written (`pending_since`, the run's clock); or the day
//!   ended less than [`SYNC_DUE_HOURS`] ago (the run's clock) or its rollups changed less than
//!   [`SYNC_DUE_HOURS`] ago (`usage_records.updated_at` against the database's own `now()`).
//!   A day the sync holds for a person (a pending event Stripe disagrees with,
//!   [`crate::sync::NEEDS_A_PERSON`]) and a day out of Stripe's window are drift.
//! - [`REPORTED_VS_STRIPE`] (`--stripe`): what Stripe accepted by our records against the
//!   day's meter event summary. With an event pending, Stripe may hold what was accepted or
//!   that plus the pending quantity (unsynced), nothing else; an event confirmed less than
//!   [`STRIPE_SUMMARY_LAG_MINUTES`] ago (database clock) may not be in Stripe's summaries yet
//!   (unsynced); otherwise drift.
//! - [`INVOICE_VS_LINES`]: an invoice's total against the sum of its lines; any difference is
//!   drift.
//! - [`INVOICE_VS_PREVIEW`]: what was billed for the period (the invoice's own lines, and every
//!   adjustment correcting it on a later invoice) against the period priced now, on the terms
//!   kept with the invoice (the preview's code; it is the usage API's preview whenever the
//!   plan and contract have not changed since). Without an invoice: unsynced until the close
//!   is due to have written it ([`invoice_due`]: a day after the month's end, plus the
//!   longest revenue wait when its revenue is missing), then drift. With one, a difference is
//!   unsynced when the month's usage or revenue changed after the newest invoice that could
//!   carry its adjustment was written (both on the database's clock), or a `revenue_missing`
//!   review of it is open, or a credit of exactly the difference was approved and not yet
//!   applied, each only until the next close is due ([`next_close_due`]) and only if it will
//!   run for the month (the customer is not canceled, the month within
//!   [`invoices::ADJUSTMENT_LOOKBACK_MONTHS`]); a credit of exactly the difference awaiting a
//!   person's approval is unsynced; one a person dismissed is ok (noted); otherwise drift.
//! - [`INVOICE_VS_STRIPE`] and [`LINE_VS_STRIPE`] (`--stripe`): our invoice's total and each
//!   line (by its `apex_line` metadata) against Stripe's invoice. Drift whenever a
//!   `total_mismatch` review of the month is open (the close refused to finalize). Unsynced
//!   while ours is `pending` or `draft`, or has no Stripe invoice yet, for
//!   [`INVOICE_BUILD_HOURS`] after it was written (`invoices.created_at`, the run's clock);
//!   otherwise drift. A `voided` invoice is compared like any other: Stripe keeps its lines,
//!   and so do we.
//!
//! Two clocks: the run's time (`now`, possibly simulated) is compared only with times written
//! on it (days' ends, `pending_since`, `invoices.created_at`), and the database's change times
//! only with the database's (`now()`, `invoices.recorded_at`).
//!
//! A settled run ([`Request::settled`]) drops the allowances measured on the database's clock
//! against its `now()` (rollups changed less than [`SYNC_DUE_HOURS`] ago, an event accepted
//! less than [`STRIPE_SUMMARY_LAG_MINUTES`] ago): for a caller that has waited for the
//! pipeline and Stripe itself and runs its own clock (`apexctl simulate`, whose rows are all
//! written within the last wall-clock minutes), those differences are drift.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apex_billing::invoices::{self, Invoice, Review};
use apex_billing::pricing::Period;
use apex_billing::statement::{self, PricingTerms};
use apex_core::model::Metric;
use apex_pipeline::rollups::{self, DayTotals, InFlight, LogPosition, PostgresDay, RollupError};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Utc};
use serde::{Deserialize, Serialize};
use sqlx::PgPool;
use stripe_billing::billing_meter_event_summary::{
    ListIdBillingMeterEventSummary, ListIdBillingMeterEventSummaryValueGroupingWindow,
};
use stripe_billing::invoice::RetrieveInvoice;
use stripe_billing::invoice_line_item::ListInvoiceInvoiceLineItem;

use crate::StripeWorkError;
use crate::client::StripeClient;
use crate::reporting::{self, day_end};
use crate::sync::NEEDS_A_PERSON;

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

/// How long after a day's end (or its last change, or an event's writing) the usage sync has
/// to report it before a shortfall is drift: the `stripe_sync` job runs daily at 02:00 UTC
/// (`apex_cron`'s jobs), so one day and two hours for the slot and the run's own length.
pub const SYNC_DUE_HOURS: i64 = 26;

/// How long Stripe's meter event summaries may lag an event it accepted, in minutes (its
/// summaries are aggregated asynchronously).
pub const STRIPE_SUMMARY_LAG_MINUTES: i64 = 5;

/// How long an invoice may stay `pending`, `draft` or without a Stripe invoice after it was
/// written, in hours: the close runs daily and finishes what an earlier run left.
pub const INVOICE_BUILD_HOURS: i64 = 24;

/// How long one store's applier may be behind the other's on a batch, in minutes, before the
/// difference it makes is drift (a stuck applier) rather than a batch in flight.
pub const PIPELINE_LAG_MINUTES: i64 = 10;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request {
    /// The billing period (a calendar month in UTC).
    pub period: Period,
    /// Only this customer (our id, `cus_...`).
    pub customer: Option<String>,
    /// The time of the run: days after it, or not yet due for the sync, are `unsynced`.
    pub now: DateTime<Utc>,
    /// Everything written is settled (the caller waited for both appliers, the sync's runs
    /// and Stripe's webhooks): no allowance on the database's clock (a day whose rollups
    /// changed less than [`SYNC_DUE_HOURS`] ago, an event Stripe accepted less than
    /// [`STRIPE_SUMMARY_LAG_MINUTES`] ago); the run's clock (`now`) still gives its own.
    /// `false` for an operator's run against a live system; `true` for `apexctl simulate`.
    pub settled: bool,
}

/// Which checks a run makes ([`reconcile_with`]); [`reconcile`] makes them all. For tests
/// that write some stores directly.
#[doc(hidden)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Checks {
    /// The ClickHouse raw events against both rollups ([`RAW_VS_DAILY`], [`RAW_VS_POSTGRES`]).
    /// Off only for tests that write the Postgres rollups directly, with no raw events.
    pub raw_events: bool,
    /// The usage sync's figures ([`POSTGRES_VS_REPORTED`], [`REPORTED_VS_STRIPE`]). Off only
    /// for tests of the invoicing alone, whose usage was never synced.
    pub usage_sync: bool,
}

impl Default for Checks {
    fn default() -> Self {
        Self {
            raw_events: true,
            usage_sync: true,
        }
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
    /// Customers with usage or sync rows in the period but no `customers` row: nothing of
    /// theirs beyond the raw events and rollups can be compared.
    pub unknown_customers: Vec<String>,
    /// Each pipeline log's position in Postgres and ClickHouse after the reads, with its lag
    /// (empty when the raw events were not compared).
    pub pipeline: Vec<LogPosition>,
    /// What limits the comparison (e.g. a ClickHouse server not in UTC).
    pub warnings: Vec<String>,
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
            RollupError::ClickHouse(e) => Self::Invalid(format!("clickhouse: {e}")),
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

/// [`reconcile`], making only the checks `checks` selects (for tests).
#[doc(hidden)]
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
        let before = rollups::in_flight(&client, &mut conn, None).await?;
        let raw = rollups::raw_daily(&client, first, last, customer).await?;
        let daily = rollups::clickhouse_daily(&client, first, last, customer).await?;
        let postgres = rollups::postgres_daily(&mut *conn, first, last, customer).await?;
        let after = rollups::in_flight(&client, &mut conn, Some(&before)).await?;
        let flight = before.union(after);
        let zone = rollups::server_timezone(&client).await?;
        if zone != "UTC" && zone != "Etc/UTC" {
            report.warnings.push(format!(
                "the ClickHouse server runs in {zone}: the daily rollup's days are its days, \
                 not UTC days, so {RAW_VS_DAILY} differences may be the zone's"
            ));
        }
        compare_raw(&mut report, &raw, &daily, &postgres, &flight);
        report.pipeline = flight.positions;
        postgres
    } else {
        rollups::postgres_daily(pool, first, last, customer).await?
    };

    let known: BTreeSet<&str> = mappings.iter().map(|m| m.id.as_str()).collect();
    let mut unknown: BTreeSet<String> = postgres
        .keys()
        .map(|(c, _, _)| c)
        .filter(|c| !known.contains(c.as_str()))
        .cloned()
        .collect();
    if checks.usage_sync {
        let synced = sync_rows(pool, first, last, customer).await?;
        unknown.extend(
            synced
                .keys()
                .map(|(c, _, _)| c)
                .filter(|c| !known.contains(c.as_str()))
                .cloned(),
        );
        let db_now: DateTime<Utc> = sqlx::query_scalar("SELECT now()").fetch_one(pool).await?;
        let clocks = Clocks {
            now: request.now,
            db_now,
            settled: request.settled,
        };
        compare_reported(&mut report, &postgres, &synced, &mapped, clocks);
        if let Some(stripe) = stripe {
            compare_meters(
                &mut report,
                pool,
                stripe,
                &synced,
                &postgres,
                &mapped,
                request,
                db_now,
            )
            .await?;
        }
    }
    report.unknown_customers = unknown.into_iter().collect();
    for mapping in &mappings {
        // A month outside the customer's life is never invoiced unasked (as the close).
        let in_life =
            period.end > mapping.created_at && mapping.canceled_at.is_none_or(|c| period.start < c);
        if !mapped.contains_key(mapping.id.as_str()) || !in_life {
            continue;
        }
        compare_invoice(&mut report, pool, stripe, mapping, request).await?;
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

/// A pair's verdict when its figures differ: `unsynced` (in flight), with `note`.
fn unsynced(note: String) -> (Verdict, String) {
    (Verdict::Unsynced, note)
}

/// A pair's verdict when its figures differ: `drift`, with `note`.
fn drift(note: String) -> (Verdict, String) {
    (Verdict::Drift, note)
}

/// A [`pair`] of one customer's, metric's and day's quantities.
fn day_pair(
    check: &str,
    customer: &str,
    metric: Metric,
    day: NaiveDate,
    left: u64,
    right: u64,
    otherwise: (Verdict, String),
) -> Pair {
    pair(
        check,
        customer,
        Some(metric),
        Some(day),
        i128::from(left),
        i128::from(right),
        otherwise,
    )
}

/// A [`pair`] of a customer's figures for the whole period (no metric, no day).
fn customer_pair(
    check: &str,
    customer: &str,
    left: i128,
    right: i128,
    otherwise: (Verdict, String),
) -> Pair {
    pair(check, customer, None, None, left, right, otherwise)
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
        report.pairs.push(day_pair(
            RAW_VS_DAILY,
            customer,
            *metric,
            *day,
            raw.get(key).copied().unwrap_or(0),
            daily.get(key).copied().unwrap_or(0),
            if open {
                unsynced("a ClickHouse batch touching the day is being written".into())
            } else {
                drift(
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
        let left = raw.get(key).copied().unwrap_or(0);
        let right = postgres.get(key).map_or(0, |d| d.quantity);
        report.pairs.push(day_pair(
            RAW_VS_POSTGRES,
            customer,
            *metric,
            *day,
            left,
            right,
            if flight.explains(*day, left, right) {
                unsynced(format!(
                    "a pipeline batch touching the day is applied by one store and not yet \
                         the other (for less than {} s)",
                    rollups::IN_FLIGHT_LIMIT_SECONDS
                ))
            } else {
                drift(
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
    pending_since: Option<DateTime<Utc>>,
    last_error: Option<String>,
    synced_at: Option<DateTime<Utc>>,
}

/// What Stripe accepted for the row's day by our records (none without a row).
fn reported_quantity(row: Option<&SyncRow>) -> u64 {
    row.map_or(0, |r| u64::try_from(r.quantity_reported).unwrap_or(0))
}

/// The run's time and the database's: each compared only with times written on it.
#[derive(Debug, Clone, Copy)]
struct Clocks {
    /// The run's (possibly simulated) time.
    now: DateTime<Utc>,
    /// The database's `now()`.
    db_now: DateTime<Utc>,
    /// No allowance on the database's clock ([`Request::settled`]).
    settled: bool,
}

/// What was reported to Stripe (`stripe_usage_sync.quantity_reported`, accepted events only)
/// per customer, metric and UTC day of `first..=last`, of one customer if given (one query);
/// `apexctl rollup rebuild` warns when a rebuilt day falls below it.
pub async fn reported_totals(
    pool: &PgPool,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<BTreeMap<rollups::DayKey, u64>, StripeWorkError> {
    Ok(sync_rows(pool, first, last, customer)
        .await?
        .into_iter()
        .map(|(key, row)| (key, u64::try_from(row.quantity_reported).unwrap_or(0)))
        .collect())
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
                pending_quantity, pending_since, last_error, synced_at \
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

/// Why a day whose rollup differs from what was reported is or is not drift (see the module
/// documentation). `changed_at` is the day's latest rollup change, on the database's clock.
fn reported_verdict(
    day: NaiveDate,
    total: u64,
    reported: u64,
    row: Option<&SyncRow>,
    changed_at: Option<DateTime<Utc>>,
    clocks: Clocks,
) -> (Verdict, String) {
    let now = clocks.now;
    // Before anything else: the sync never reports more than the day holds, complete or not.
    if reported > total {
        return drift(
            "more was reported to Stripe than the rollups hold (the sync cannot take it back)"
                .into(),
        );
    }
    if day_end(day) > now {
        return unsynced("the day is not complete".into());
    }
    let reportable = reporting::reportable_days(now).contains(&day);
    if !reportable {
        return drift(format!(
            "the day is outside Stripe's {}-day window: the sync can no longer report it",
            reporting::MAX_AGE_DAYS
        ));
    }
    let due = Duration::hours(SYNC_DUE_HOURS);
    if let Some(row) = row
        && row.pending_quantity.is_some()
    {
        let error = row.last_error.as_deref().unwrap_or("");
        // Held: the sync sends nothing more for the day until a person looks.
        if row.status == "failed" && error.ends_with(NEEDS_A_PERSON) {
            return drift(format!("the sync holds it: {error}"));
        }
        // `pending_since` is written with the sync run's time: the run's clock.
        if let Some(since) = row.pending_since
            && now - since >= due
        {
            return drift(format!(
                "an event of the day has been pending since {since} ({}), more than \
                     {SYNC_DUE_HOURS} h: the sync does not settle it",
                if error.is_empty() { &row.status } else { error }
            ));
        }
        return unsynced(if row.status == "failed" {
            format!("the last send failed and is retried by the next sync: {error}")
        } else {
            "an event is pending: the next sync sends it again".into()
        });
    }
    // Nothing pending (a day flagged as shrunk whose total has grown back is sent again like
    // any other): due a sync after the day's end on the run's clock, and after its last
    // change on the database's.
    if now < day_end(day) + due {
        return unsynced("not yet due: the next daily sync reports it".into());
    }
    if let Some(changed) = changed_at
        && !clocks.settled
        && clocks.db_now < changed + due
    {
        return unsynced(format!(
            "the day's rollups changed at {changed} (database clock), less than \
                 {SYNC_DUE_HOURS} h ago: the next daily sync reports it"
        ));
    }
    drift(format!(
        "the usage was not reported although the sync was due {SYNC_DUE_HOURS} h after the \
             day (and its last change)"
    ))
}

fn compare_reported(
    report: &mut Report,
    postgres: &BTreeMap<rollups::DayKey, PostgresDay>,
    synced: &BTreeMap<rollups::DayKey, SyncRow>,
    mapped: &HashMap<&str, &str>,
    clocks: Clocks,
) {
    let keys: BTreeSet<&rollups::DayKey> = postgres.keys().chain(synced.keys()).collect();
    for key in keys {
        let (customer, metric, day) = key;
        if !mapped.contains_key(customer.as_str()) {
            continue;
        }
        let total = postgres.get(key).map_or(0, |d| d.quantity);
        let row = synced.get(key);
        let reported = reported_quantity(row);
        let otherwise = reported_verdict(
            *day,
            total,
            reported,
            row,
            postgres.get(key).map(|d| d.changed_at),
            clocks,
        );
        report.pairs.push(day_pair(
            POSTGRES_VS_REPORTED,
            customer,
            *metric,
            *day,
            total,
            reported,
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

// The figures read once for the whole period, handed down rather than read again.
#[allow(clippy::too_many_arguments)]
async fn compare_meters(
    report: &mut Report,
    pool: &PgPool,
    stripe: &StripeClient,
    synced: &BTreeMap<rollups::DayKey, SyncRow>,
    postgres: &BTreeMap<rollups::DayKey, PostgresDay>,
    mapped: &HashMap<&str, &str>,
    request: &Request,
    db_now: DateTime<Utc>,
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
            let reported = reported_quantity(row);
            let stripe_total = theirs.get(&day).copied().unwrap_or(0);
            report.pairs.push(day_pair(
                REPORTED_VS_STRIPE,
                customer,
                metric,
                day,
                reported,
                stripe_total,
                meter_verdict(
                    row,
                    reported,
                    stripe_total,
                    (!request.settled).then_some(db_now),
                ),
            ));
        }
    }
    Ok(())
}

/// Why Stripe's meter total of a day differing from what it accepted by our records is or is
/// not drift (see the module documentation). `db_now` is the database's `now()`, `None` for a
/// settled run (no summary lag allowed).
fn meter_verdict(
    row: Option<&SyncRow>,
    reported: u64,
    stripe_total: u64,
    db_now: Option<DateTime<Utc>>,
) -> (Verdict, String) {
    if let Some(pending) = row.and_then(|r| r.pending_quantity) {
        let pending = u64::try_from(pending).unwrap_or(0);
        if stripe_total == reported.saturating_add(pending) {
            return unsynced(format!(
                "Stripe holds the pending event of {pending} already; the next sync records it"
            ));
        }
        return drift(format!(
            "Stripe's meter holds neither what it accepted by our records nor that plus the \
                 pending {pending}"
        ));
    }
    if let Some(synced) = row.and_then(|r| r.synced_at)
        && let Some(db_now) = db_now
        && db_now - synced < Duration::minutes(STRIPE_SUMMARY_LAG_MINUTES)
    {
        return unsynced(format!(
            "an event was accepted at {synced}, less than {STRIPE_SUMMARY_LAG_MINUTES} min ago: \
                 Stripe's summaries may not show it yet"
        ));
    }
    drift("Stripe's meter differs from what it accepted by our records".into())
}

/// When the close is due to have written a month's invoice, on the run's clock: it runs daily
/// and closes a month the day after it ends, or, while its revenue is missing, once the
/// revenue wait is over (at most [`invoices::MAX_REVENUE_WAIT_DAYS`]; the configured wait is
/// the close's setting, not known here).
pub fn invoice_due(period: &Period, revenue_known: bool) -> DateTime<Utc> {
    let wait = if revenue_known {
        Duration::zero()
    } else {
        Duration::days(invoices::MAX_REVENUE_WAIT_DAYS)
    };
    period.end + wait + Duration::days(1)
}

/// When the next close that can adjust a month is due, on the run's clock: the month after
/// the latest invoiced one (`latest_period_start`), as [`invoice_due`] (its revenue unknown).
/// `None` when no such close will run: the customer is canceled before that month begins, or
/// the month is beyond [`invoices::ADJUSTMENT_LOOKBACK_MONTHS`] from it.
pub fn next_close_due(
    period: &Period,
    latest_period_start: DateTime<Utc>,
    canceled_at: Option<DateTime<Utc>>,
) -> Option<DateTime<Utc>> {
    let next = apex_billing::pricing::month_period(
        latest_period_start.year() + i32::from(latest_period_start.month() == 12),
        latest_period_start.month() % 12 + 1,
    )?;
    let months = (next.start.year() - period.start.year()) * 12 + next.start.month() as i32
        - period.start.month() as i32;
    if months > invoices::ADJUSTMENT_LOOKBACK_MONTHS || canceled_at.is_some_and(|c| c <= next.start)
    {
        return None;
    }
    Some(invoice_due(&next, false))
}

/// What the invoicing is still expected to settle of a difference between what was billed for
/// a month and what it prices at now (see the module documentation).
struct PreviewFacts<'a> {
    /// `priced - billed`, cents.
    difference: i64,
    /// The month's reviews, newest first.
    reviews: &'a [Review],
    /// The newest invoice that could adjust it, with the month's latest change.
    newest: Option<invoices::NewestInvoice>,
    /// When the customer was canceled.
    canceled_at: Option<DateTime<Utc>>,
}

fn preview_verdict(
    period: &Period,
    facts: &PreviewFacts<'_>,
    now: DateTime<Utc>,
) -> (Verdict, String) {
    let next_due = facts
        .newest
        .and_then(|n| next_close_due(period, n.latest_period_start, facts.canceled_at));
    let before_next_close = |why: String| match next_due {
        Some(due) if now < due => {
            unsynced(format!("{why}: the next close (due by {due}) adjusts it"))
        }
        Some(due) => drift(format!(
            "{why}, but the close due by {due} has not adjusted it"
        )),
        None => drift(format!(
            "{why}, but no later close adjusts the month (customer canceled, or beyond the adjustment lookback)"
        )),
    };
    let credit = facts
        .reviews
        .iter()
        .find(|r| r.kind == "negative_adjustment" && r.resolution.as_deref() != Some("superseded"));
    if let Some(review) = credit
        && review.amount_cents == facts.difference
    {
        match (review.resolved_at, review.resolution.as_deref()) {
            (None, _) => {
                return unsynced(format!(
                    "a credit of {} cents awaits a person's approval (review {})",
                    -review.amount_cents, review.id
                ));
            }
            (Some(_), Some("dismissed")) => {
                return (
                    Verdict::Ok,
                    format!(
                        "a person dismissed this credit (review {}): nothing is sent",
                        review.id
                    ),
                );
            }
            (Some(_), Some("approved")) if review.applied_invoice_id.is_none() => {
                return before_next_close(format!(
                    "a credit approved in review {} is not on an invoice yet",
                    review.id
                ));
            }
            _ => {}
        }
    }
    if facts.newest.is_some_and(|n| n.changed_after()) {
        return before_next_close(
            "the month's usage or revenue changed after its newest invoice was written".into(),
        );
    }
    if let Some(review) = facts
        .reviews
        .iter()
        .find(|r| r.kind == "revenue_missing" && r.resolved_at.is_none())
    {
        return before_next_close(format!(
            "the month was invoiced without its revenue (review {} open)",
            review.id
        ));
    }
    drift("what was billed for the period differs from what it prices at now".into())
}

async fn compare_invoice(
    report: &mut Report,
    pool: &PgPool,
    stripe: Option<&StripeClient>,
    mapping: &apex_billing::customers::StripeMapping,
    request: &Request,
) -> Result<(), StripeWorkError> {
    let customer = mapping.id.as_str();
    let period = request.period;
    let month = invoices::month_text(period.start);
    let Some(invoice) = invoices::for_period(pool, customer, period.start).await? else {
        let preview = {
            let mut conn = pool.acquire().await?;
            statement::invoice_preview(&mut conn, customer, &month, &period).await?
        };
        let due = invoice_due(&period, preview.mediated_revenue_cents.is_some());
        let verdict = if period.end > request.now {
            unsynced("the period is not over: no invoice yet".into())
        } else if request.now < due {
            unsynced(format!(
                "no invoice issued yet: the close is due to issue it by {due} (it waits for \
                     the month's revenue)"
            ))
        } else {
            drift(format!(
                "no invoice although the close was due to issue it by {due}"
            ))
        };
        report.pairs.push(customer_pair(
            INVOICE_VS_PREVIEW,
            customer,
            0,
            i128::from(preview.total_cents),
            verdict,
        ));
        return Ok(());
    };
    let lines = invoices::lines(pool, invoice.id).await?;
    let line_sum: i128 = lines.iter().map(|l| i128::from(l.amount_cents)).sum();
    report.pairs.push(customer_pair(
        INVOICE_VS_LINES,
        customer,
        i128::from(invoice.total_cents),
        line_sum,
        drift("the invoice's total is not the sum of its lines".into()),
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
    let billed = invoices::billed_for(pool, customer, period.start).await?;
    let priced_cents = i64::try_from(priced.total_cents)
        .map_err(|_| StripeWorkError::Invalid("a priced total is too large".into()))?;
    let reviews = invoices::period_reviews(pool, customer, period.start).await?;
    let verdict = if priced_cents == billed {
        (Verdict::Ok, String::new())
    } else {
        let facts = PreviewFacts {
            difference: priced_cents - billed,
            reviews: &reviews,
            newest: invoices::newest_invoice_since(pool, customer, &period).await?,
            canceled_at: mapping.canceled_at,
        };
        preview_verdict(&period, &facts, request.now)
    };
    report.pairs.push(customer_pair(
        INVOICE_VS_PREVIEW,
        customer,
        i128::from(billed),
        i128::from(priced_cents),
        verdict,
    ));

    if let Some(stripe) = stripe {
        let mismatch = reviews
            .iter()
            .find(|r| r.kind == "total_mismatch" && r.resolved_at.is_none());
        compare_stripe_invoice(
            report,
            stripe,
            customer,
            &invoice,
            &lines,
            mismatch,
            request.now,
        )
        .await?;
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
    mismatch: Option<&Review>,
    now: DateTime<Utc>,
) -> Result<(), StripeWorkError> {
    if invoice.status == "nothing_due" {
        return Ok(());
    }
    // Still being built, for a day at most (`created_at` is the close's time, the run's clock).
    // A total_mismatch review means the close gave up on it: drift, whatever its status.
    let building = mismatch.is_none()
        && (matches!(invoice.status.as_str(), "pending" | "draft")
            || invoice.stripe_invoice_id.is_none())
        && now - invoice.created_at < Duration::hours(INVOICE_BUILD_HOURS);
    let stuck = |what: &str| match mismatch {
        Some(review) => format!(
            "{what}: the close refused to finalize it (total_mismatch review {} open: {})",
            review.id, review.details
        ),
        None => format!(
            "{what}: the close has not finished it {INVOICE_BUILD_HOURS} h after writing it ({})",
            invoice.status
        ),
    };
    let Some(stripe_id) = invoice.stripe_invoice_id.as_deref() else {
        report.pairs.push(customer_pair(
            INVOICE_VS_STRIPE,
            customer,
            i128::from(invoice.total_cents),
            0,
            if building {
                unsynced("the close has not created the Stripe invoice yet".into())
            } else {
                drift(stuck("no Stripe invoice"))
            },
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
            unsynced(format!(
                "the close is still building Stripe's invoice ({})",
                invoice.status
            ))
        } else if mismatch.is_some() || matches!(invoice.status.as_str(), "pending" | "draft") {
            drift(stuck(&format!(
                "{what} differs from Stripe's invoice {stripe_id}"
            )))
        } else {
            drift(format!("{what} differs from Stripe's invoice {stripe_id}"))
        }
    };
    report.pairs.push(customer_pair(
        INVOICE_VS_STRIPE,
        customer,
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
        let mut line = customer_pair(
            LINE_VS_STRIPE,
            customer,
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
            pending_since: pending.map(|_| at("2026-11-11T02:00:00Z")),
            last_error: error.map(str::to_owned),
            synced_at: None,
        }
    }

    /// The run's clock `now`; the database's far away (as in a simulation) unless given.
    fn clocks(now: &str, db_now: Option<&str>) -> Clocks {
        Clocks {
            now: at(now),
            db_now: db_now.map_or(at("2031-01-01T00:00:00Z"), at),
            settled: false,
        }
    }

    #[test]
    fn a_settled_run_allows_nothing_on_the_database_s_clock() {
        let day: NaiveDate = "2026-11-10".parse().unwrap();
        // Rolled up a minute ago by the database's clock, the run's clock days past the day.
        let changed = Some(at("2031-01-01T00:00:00Z") - Duration::minutes(1));
        let mut live = clocks("2026-11-14T00:00:00Z", None);
        assert_eq!(
            reported_verdict(day, 5, 0, None, changed, live).0,
            Verdict::Unsynced
        );
        live.settled = true;
        assert_eq!(
            reported_verdict(day, 5, 0, None, changed, live).0,
            Verdict::Drift
        );
        // The run's own clock still gives its allowance.
        let soon = Clocks {
            settled: true,
            ..clocks("2026-11-11T01:00:00Z", None)
        };
        assert_eq!(
            reported_verdict(day, 5, 0, None, changed, soon).0,
            Verdict::Unsynced
        );
    }

    #[test]
    fn a_shortfall_of_what_was_reported_is_unsynced_only_while_the_sync_can_close_it() {
        let day: NaiveDate = "2026-11-10".parse().unwrap();
        let verdict = |total, reported, row: Option<&SyncRow>, changed, now| {
            reported_verdict(day, total, reported, row, changed, clocks(now, None)).0
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
        // A late record changed the day an hour ago on the database's clock: the next sync
        // corrects it, whatever the run's clock says.
        let sent = row("sent", None, None);
        let changed = at("2030-12-31T23:00:00Z");
        assert_eq!(
            verdict(150, 100, Some(&sent), Some(changed), "2026-11-21T01:00:00Z"),
            Verdict::Unsynced
        );
        // Changed two days ago on the database's clock: drift.
        assert_eq!(
            verdict(
                150,
                100,
                Some(&sent),
                Some(at("2030-12-29T00:00:00Z")),
                "2026-11-21T01:00:00Z"
            ),
            Verdict::Drift
        );
        // Pending and retryable failures are unsynced for a day after the event was written
        // (`pending_since`, the run's clock), then drift.
        let pending = row("pending", Some(50), None);
        assert_eq!(
            verdict(150, 100, Some(&pending), None, "2026-11-11T20:00:00Z"),
            Verdict::Unsynced
        );
        assert_eq!(
            verdict(150, 100, Some(&pending), None, "2026-11-12T05:00:00Z"),
            Verdict::Drift
        );
        let failed = row("failed", Some(50), Some("stripe: 500"));
        assert_eq!(
            verdict(150, 100, Some(&failed), None, "2026-11-11T20:00:00Z"),
            Verdict::Unsynced
        );
        // Held for a person (the sync's own marker, a pending event kept): drift at once.
        let held = row(
            "failed",
            Some(50),
            Some(&format!(
                "Stripe holds 7 for the day; ...: not sent again, {NEEDS_A_PERSON}"
            )),
        );
        assert_eq!(
            verdict(150, 100, Some(&held), None, "2026-11-11T20:00:00Z"),
            Verdict::Drift
        );
        // A day flagged as shrunk (nothing pending) whose total grew back is sent by the next
        // sync like any other day: unsynced while the change is young.
        let shrunk = row(
            "failed",
            None,
            Some(&format!(
                "usage total 90 is below the 100 already reported: not sent, {NEEDS_A_PERSON}"
            )),
        );
        assert_eq!(
            verdict(
                150,
                100,
                Some(&shrunk),
                Some(changed),
                "2026-11-21T01:00:00Z"
            ),
            Verdict::Unsynced
        );
        // More reported than held: drift at any time, even on a day not complete yet.
        assert_eq!(
            verdict(90, 100, Some(&sent), None, "2026-11-10T12:00:00Z"),
            Verdict::Drift
        );
        // A day out of Stripe's window: drift.
        assert_eq!(
            verdict(150, 100, Some(&pending), None, "2026-12-30T01:00:00Z"),
            Verdict::Drift
        );
    }

    #[test]
    fn stripe_s_meter_may_hold_a_pending_event_or_not_nothing_else() {
        let pending = row("pending", Some(50), None);
        let db_now = at("2026-11-20T00:00:00Z");
        assert_eq!(
            meter_verdict(Some(&pending), 100, 150, Some(db_now)).0,
            Verdict::Unsynced
        );
        assert_eq!(
            meter_verdict(Some(&pending), 100, 120, Some(db_now)).0,
            Verdict::Drift
        );
        assert_eq!(
            meter_verdict(Some(&pending), 100, 160, Some(db_now)).0,
            Verdict::Drift
        );
        // Just accepted: Stripe's summaries may lag a few minutes.
        let mut sent = row("sent", None, None);
        sent.synced_at = Some(db_now - Duration::minutes(1));
        assert_eq!(
            meter_verdict(Some(&sent), 100, 60, Some(db_now)).0,
            Verdict::Unsynced
        );
        // Not in a settled run (`Request::settled`): it waited for Stripe.
        assert_eq!(meter_verdict(Some(&sent), 100, 60, None).0, Verdict::Drift);
        sent.synced_at = Some(db_now - Duration::minutes(30));
        assert_eq!(
            meter_verdict(Some(&sent), 100, 60, Some(db_now)).0,
            Verdict::Drift
        );
    }

    fn review(id: i64, kind: &str, amount: i64, resolution: Option<&str>) -> Review {
        Review {
            id,
            customer_id: "cus_a".into(),
            period_start: at("2026-09-01T00:00:00Z"),
            kind: kind.into(),
            amount_cents: amount,
            details: String::new(),
            created_at: at("2026-10-02T00:00:00Z"),
            resolved_at: resolution.map(|_| at("2026-10-03T00:00:00Z")),
            resolution: resolution.map(str::to_owned),
            applied_invoice_id: None,
        }
    }

    #[test]
    fn a_billed_month_differing_from_its_price_now_waits_only_for_the_next_close() {
        let period = apex_billing::pricing::month_period(2026, 9).unwrap();
        let september = at("2026-09-01T00:00:00Z");
        // Changed after the newest invoice (database clock, far from the run's).
        let changed = invoices::NewestInvoice {
            latest_period_start: september,
            written_at: at("2031-01-01T00:00:00Z"),
            changed_at: Some(at("2031-01-01T00:05:00Z")),
        };
        let facts = |newest, reviews: &'static [Review], canceled_at| PreviewFacts {
            difference: 500,
            reviews,
            newest: Some(newest),
            canceled_at,
        };
        let verdict = |f: &PreviewFacts<'_>, now| preview_verdict(&period, f, at(now)).0;
        // October's close is due by 2026-11-30 (a day after the month, plus the longest wait).
        assert_eq!(
            next_close_due(&period, september, None),
            Some(at("2026-11-30T00:00:00Z"))
        );
        assert_eq!(
            verdict(&facts(changed, &[], None), "2026-10-20T00:00:00Z"),
            Verdict::Unsynced
        );
        assert_eq!(
            verdict(&facts(changed, &[], None), "2026-11-30T00:00:00Z"),
            Verdict::Drift
        );
        // Canceled before October: no close will adjust September.
        assert_eq!(
            verdict(
                &facts(changed, &[], Some(at("2026-09-20T00:00:00Z"))),
                "2026-10-20T00:00:00Z"
            ),
            Verdict::Drift
        );
        // Beyond the lookback: no close will adjust it.
        assert_eq!(
            next_close_due(&period, at("2027-09-01T00:00:00Z"), None),
            None
        );
        // Nothing changed after the invoice: drift, unless a review explains it.
        let unchanged = invoices::NewestInvoice {
            changed_at: Some(at("2030-12-31T00:00:00Z")),
            ..changed
        };
        assert_eq!(
            verdict(&facts(unchanged, &[], None), "2026-10-20T00:00:00Z"),
            Verdict::Drift
        );
        static OPEN_REVENUE: std::sync::LazyLock<Vec<Review>> =
            std::sync::LazyLock::new(|| vec![review(1, "revenue_missing", 0, None)]);
        let open_revenue: &'static [Review] = &OPEN_REVENUE;
        assert_eq!(
            verdict(
                &facts(unchanged, open_revenue, None),
                "2026-10-20T00:00:00Z"
            ),
            Verdict::Unsynced
        );
        assert_eq!(
            verdict(
                &facts(unchanged, open_revenue, None),
                "2026-12-20T00:00:00Z"
            ),
            Verdict::Drift
        );
        // A credit of exactly the difference: awaiting approval (unsynced), dismissed (ok,
        // noted), approved and not applied (until the next close).
        let credit = |resolution| {
            let reviews: &'static [Review] = Box::leak(
                vec![review(2, "negative_adjustment", -500, resolution)].into_boxed_slice(),
            );
            let mut f = facts(unchanged, reviews, None);
            f.difference = -500;
            f
        };
        assert_eq!(
            verdict(&credit(None), "2027-05-01T00:00:00Z"),
            Verdict::Unsynced
        );
        let (dismissed, note) = preview_verdict(
            &period,
            &credit(Some("dismissed")),
            at("2027-05-01T00:00:00Z"),
        );
        assert_eq!(dismissed, Verdict::Ok);
        assert!(note.contains("dismissed"), "{note}");
        assert_eq!(
            verdict(&credit(Some("approved")), "2026-10-20T00:00:00Z"),
            Verdict::Unsynced
        );
        assert_eq!(
            verdict(&credit(Some("approved")), "2026-12-20T00:00:00Z"),
            Verdict::Drift
        );
    }

    #[test]
    fn a_missing_invoice_is_due_a_day_after_the_month_or_after_the_revenue_wait() {
        let period = apex_billing::pricing::month_period(2026, 9).unwrap();
        assert_eq!(invoice_due(&period, true), at("2026-10-02T00:00:00Z"));
        assert_eq!(invoice_due(&period, false), at("2026-10-30T00:00:00Z"));
    }

    #[test]
    fn the_summary_counts_every_check() {
        let pairs = [
            (RAW_VS_DAILY, 1, 1, Verdict::Drift),
            (RAW_VS_DAILY, 1, 2, Verdict::Drift),
            (INVOICE_VS_PREVIEW, 1, 2, Verdict::Unsynced),
        ];
        let report = Report {
            pairs: pairs
                .into_iter()
                .map(|(check, left, right, verdict)| {
                    customer_pair(check, "cus_a", left, right, (verdict, String::new()))
                })
                .collect(),
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
