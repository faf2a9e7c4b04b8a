//! The usage sync (the guide's 02:00 job; `apexctl stripe sync`): reports each customer's
//! usage per metric per complete UTC day from the Postgres rollups (`usage_records`) as
//! Stripe Billing Meter Events, and keeps what was reported in `stripe_usage_sync`.
//!
//! Counting nothing twice rests on three things:
//! - each event has a deterministic identifier (customer, metric, day, revision) that is also
//!   its idempotency key, so a retry or a re-run is deduplicated by Stripe;
//! - the event about to be sent is written to Postgres first (`pending_quantity`), so a run
//!   that dies after Stripe accepted it resends exactly that event, never a recomputed one;
//! - only what Stripe accepted moves `quantity_reported`; the next revision carries only the
//!   difference (a late record), see [`super::reporting`].
//!
//! Requests go through the client's token bucket and retries (429 `Retry-After`, 5xx and
//! timeouts with the same key). A customer whose requests fail is recorded and skipped; the
//! others go on. After three customers in a row fail because Stripe cannot be reached, the
//! run stops early instead of spending each remaining customer's retries on an outage.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apex_pipeline::model::Metric;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;

use super::StripeWorkError;
use super::catalog::Failure;
use super::client::{StripeClient, StripeError};
use super::reporting::{self, DayReport};

/// Customers in a row failing on an unreachable Stripe before the run stops.
const UNAVAILABLE_CUSTOMERS_BEFORE_STOP: usize = 3;

/// What to sync.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// Only this customer (`--customer`).
    pub customer: Option<String>,
    /// Only this day (`--date`); it must be complete and inside Stripe's window.
    pub day: Option<NaiveDate>,
    /// The time the run treats as now (which days are complete).
    pub now: DateTime<Utc>,
}

/// What a run sent, per customer and metric.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncSummary {
    /// The days considered, oldest first.
    pub days: Vec<NaiveDate>,
    /// Customers looked at.
    pub customers: usize,
    /// Meter events Stripe accepted in this run.
    pub events_sent: usize,
    /// Of those, corrections of days reported before (late records).
    pub corrections: usize,
    /// Quantity sent per metric, in storage units (data transfer in bytes).
    pub quantity_sent: BTreeMap<String, u64>,
    /// Customers without a Stripe customer yet (`apexctl stripe customers`), not synced.
    pub unmapped_customers: Vec<String>,
    /// Days whose total fell below what was reported: not sendable, for a person to check.
    pub shrunk: Vec<ShrunkDay>,
    /// Customers whose sync failed; the others went on.
    pub failed: Vec<Failure>,
    /// True when the run stopped early because Stripe could not be reached.
    pub stopped_early: bool,
}

/// A day whose usage total is below what Stripe already has.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ShrunkDay {
    /// Our customer id.
    pub customer_id: String,
    /// The metric.
    pub metric_type: String,
    /// The UTC day.
    pub usage_date: NaiveDate,
    /// Reported to Stripe before.
    pub reported: u64,
    /// The total now.
    pub total: u64,
}

/// Runs the sync.
pub async fn sync_usage(
    pool: &PgPool,
    stripe: &StripeClient,
    request: &SyncRequest,
) -> Result<SyncSummary, StripeWorkError> {
    let event_names: HashMap<String, String> =
        sqlx::query_as::<_, (String, String)>("SELECT metric_type, event_name FROM stripe_meters")
            .fetch_all(pool)
            .await?
            .into_iter()
            .collect();
    if event_names.len() < Metric::ALL.len() {
        return Err(StripeWorkError::Invalid(
            "the metrics have no Stripe meters yet: run `apexctl stripe catalog` first".into(),
        ));
    }
    let reportable = reporting::reportable_days(request.now);
    let days = match request.day {
        Some(day) if reportable.contains(&day) => vec![day],
        Some(day) => {
            return Err(StripeWorkError::Invalid(format!(
                "{day} is not reportable now: only complete UTC days of the last {} days are",
                reporting::MAX_AGE_DAYS
            )));
        }
        None => reportable,
    };
    let customers: Vec<(String, Option<String>)> = sqlx::query_as(
        "SELECT id, stripe_customer_id FROM customers
         WHERE $1::text IS NULL OR id = $1 ORDER BY id",
    )
    .bind(request.customer.as_deref())
    .fetch_all(pool)
    .await?;
    if let Some(id) = &request.customer
        && customers.is_empty()
    {
        return Err(StripeWorkError::Invalid(format!("customer {id} not found")));
    }

    let mut summary = SyncSummary {
        days: days.clone(),
        ..SyncSummary::default()
    };
    let mut unavailable_in_a_row = 0;
    for (customer_id, stripe_customer_id) in customers {
        summary.customers += 1;
        let Some(stripe_customer_id) = stripe_customer_id else {
            summary.unmapped_customers.push(customer_id);
            continue;
        };
        let customer = CustomerSync {
            pool,
            stripe,
            event_names: &event_names,
            customer_id: &customer_id,
            stripe_customer_id: &stripe_customer_id,
        };
        match customer.run(&days, &mut summary).await {
            Ok(()) => unavailable_in_a_row = 0,
            Err(error) => {
                tracing::warn!(customer_id, %error, "usage sync failed for a customer");
                let unreachable = matches!(&error, StripeWorkError::Stripe(e) if e.is_retryable());
                summary.failed.push(Failure {
                    customer_id,
                    error: error.to_string(),
                });
                unavailable_in_a_row = if unreachable {
                    unavailable_in_a_row + 1
                } else {
                    0
                };
                if unavailable_in_a_row >= UNAVAILABLE_CUSTOMERS_BEFORE_STOP {
                    summary.stopped_early = true;
                    break;
                }
            }
        }
    }
    metrics::counter!("apex_stripe_sync_runs_total", "outcome" => if summary.failed.is_empty() { "ok" } else { "partial" })
        .increment(1);
    Ok(summary)
}

/// One customer's part of a run.
struct CustomerSync<'a> {
    pool: &'a PgPool,
    stripe: &'a StripeClient,
    event_names: &'a HashMap<String, String>,
    customer_id: &'a str,
    stripe_customer_id: &'a str,
}

/// A row of `stripe_usage_sync`.
#[derive(sqlx::FromRow)]
struct SyncRow {
    usage_date: NaiveDate,
    metric_type: String,
    quantity_reported: i64,
    revisions: i32,
    pending_quantity: Option<i64>,
    stripe_identifier: Option<String>,
}

impl CustomerSync<'_> {
    async fn run(
        &self,
        days: &[NaiveDate],
        summary: &mut SyncSummary,
    ) -> Result<(), StripeWorkError> {
        let (first, last) = match (days.first(), days.last()) {
            (Some(first), Some(last)) => (*first, *last),
            _ => return Ok(()),
        };
        let rows: Vec<SyncRow> = sqlx::query_as(
            "SELECT usage_date, metric_type, quantity_reported, revisions, pending_quantity,
                    stripe_identifier
             FROM stripe_usage_sync
             WHERE customer_id = $1 AND usage_date BETWEEN $2 AND $3",
        )
        .bind(self.customer_id)
        .bind(first)
        .bind(last)
        .fetch_all(self.pool)
        .await?;
        let wanted: BTreeSet<NaiveDate> = days.iter().copied().collect();
        let mut state: BTreeMap<(NaiveDate, String), (u64, u32)> = BTreeMap::new();
        for row in rows.into_iter().filter(|r| wanted.contains(&r.usage_date)) {
            let mut reported = non_negative(row.quantity_reported);
            let mut revisions = u32::try_from(row.revisions).unwrap_or(0);
            // An event a previous run wrote down but never saw accepted goes first, exactly
            // as it was: Stripe may have it, and the same identifier and key keep it single.
            if let (Some(pending), Some(identifier)) =
                (row.pending_quantity, &row.stripe_identifier)
            {
                let metric = parse_metric(&row.metric_type)?;
                let pending = non_negative(pending);
                self.send(metric, row.usage_date, pending, identifier)
                    .await?;
                self.confirm(row.usage_date, metric, pending).await?;
                record_sent(summary, metric, pending, revisions > 0);
                reported += pending;
                revisions += 1;
            }
            state.insert((row.usage_date, row.metric_type), (reported, revisions));
        }

        let totals: Vec<(NaiveDate, String, i64)> = sqlx::query_as(
            "SELECT (recorded_at AT TIME ZONE 'UTC')::date AS day, metric_type,
                    sum(quantity)::bigint
             FROM usage_records
             WHERE customer_id = $1 AND recorded_at >= $2 AND recorded_at < $3
             GROUP BY 1, 2",
        )
        .bind(self.customer_id)
        .bind(day_start(first))
        .bind(day_start(last + chrono::Duration::days(1)))
        .fetch_all(self.pool)
        .await?;
        let mut totals: BTreeMap<(NaiveDate, String), u64> = totals
            .into_iter()
            .filter(|(day, _, _)| wanted.contains(day))
            .map(|(day, metric, total)| ((day, metric), non_negative(total)))
            .collect();
        for key in state.keys() {
            totals.entry(key.clone()).or_insert(0);
        }

        for ((day, metric_name), total) in totals {
            let metric = parse_metric(&metric_name)?;
            let (reported, revisions) = state
                .get(&(day, metric_name.clone()))
                .copied()
                .unwrap_or((0, 0));
            match reporting::plan_day(self.customer_id, metric, day, total, reported, revisions) {
                DayReport::UpToDate => {}
                DayReport::Shrunk { reported, total } => {
                    self.flag_shrunk(day, metric, reported, total).await?;
                    summary.shrunk.push(ShrunkDay {
                        customer_id: self.customer_id.to_owned(),
                        metric_type: metric_name,
                        usage_date: day,
                        reported,
                        total,
                    });
                }
                DayReport::Send {
                    quantity,
                    identifier,
                    revision,
                } => {
                    self.write_pending(day, metric, quantity, &identifier)
                        .await?;
                    if let Err(error) = self.send(metric, day, quantity, &identifier).await {
                        self.record_failure(day, metric, &error).await?;
                        return Err(error.into());
                    }
                    self.confirm(day, metric, quantity).await?;
                    record_sent(summary, metric, quantity, revision > 0);
                }
            }
        }
        Ok(())
    }

    /// Sends one meter event. An identifier Stripe already has (its idempotency key expired
    /// after 24 hours, the identifier did not) means the event is counted: success.
    async fn send(
        &self,
        metric: Metric,
        day: NaiveDate,
        quantity: u64,
        identifier: &str,
    ) -> Result<(), StripeError> {
        let event_name = self
            .event_names
            .get(metric.as_str())
            .expect("every metric has a meter (checked at the start)");
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                self.stripe_customer_id.to_owned(),
            ),
            ("value".to_owned(), quantity.to_string()),
        ]);
        let event = CreateBillingMeterEvent::new(event_name.clone(), payload)
            .identifier(identifier)
            .timestamp(reporting::event_timestamp(day));
        match self
            .stripe
            .send::<serde_json::Value>(&event, Some(identifier))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("resource_already_exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    async fn write_pending(
        &self,
        day: NaiveDate,
        metric: Metric,
        quantity: u64,
        identifier: &str,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "INSERT INTO stripe_usage_sync (customer_id, usage_date, metric_type, status,
                 stripe_identifier, pending_quantity, attempts)
             VALUES ($1, $2, $3, 'pending', $4, $5, 1)
             ON CONFLICT (customer_id, usage_date, metric_type) DO UPDATE
             SET status = 'pending', stripe_identifier = $4, pending_quantity = $5,
                 attempts = stripe_usage_sync.attempts + 1, updated_at = now()",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(identifier)
        .bind(i64::try_from(quantity).unwrap_or(i64::MAX))
        .execute(self.pool)
        .await?;
        Ok(())
    }

    async fn confirm(
        &self,
        day: NaiveDate,
        metric: Metric,
        quantity: u64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE stripe_usage_sync
             SET quantity_reported = quantity_reported + $4, revisions = revisions + 1,
                 pending_quantity = NULL, status = 'sent', last_error = NULL,
                 synced_at = now(), updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(i64::try_from(quantity).unwrap_or(i64::MAX))
        .execute(self.pool)
        .await?;
        Ok(())
    }

    async fn record_failure(
        &self,
        day: NaiveDate,
        metric: Metric,
        error: &StripeError,
    ) -> Result<(), sqlx::Error> {
        // The pending event stays: the next run sends exactly it again.
        sqlx::query(
            "UPDATE stripe_usage_sync SET status = 'failed', last_error = $4, updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(error.to_string())
        .execute(self.pool)
        .await?;
        Ok(())
    }

    async fn flag_shrunk(
        &self,
        day: NaiveDate,
        metric: Metric,
        reported: u64,
        total: u64,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE stripe_usage_sync SET status = 'failed', last_error = $4, updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(format!(
            "usage total {total} is below the {reported} already reported: not sent, needs a person"
        ))
        .execute(self.pool)
        .await?;
        Ok(())
    }
}

fn record_sent(summary: &mut SyncSummary, metric: Metric, quantity: u64, correction: bool) {
    summary.events_sent += 1;
    if correction {
        summary.corrections += 1;
    }
    *summary
        .quantity_sent
        .entry(metric.as_str().to_owned())
        .or_insert(0) += quantity;
    metrics::counter!("apex_stripe_meter_events_total", "metric" => metric.as_str()).increment(1);
}

fn parse_metric(name: &str) -> Result<Metric, StripeWorkError> {
    Metric::ALL
        .into_iter()
        .find(|m| m.as_str() == name)
        .ok_or_else(|| StripeWorkError::Invalid(format!("unknown metric {name} in the database")))
}

fn non_negative(value: i64) -> u64 {
    u64::try_from(value).unwrap_or(0)
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}
