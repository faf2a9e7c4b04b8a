//! The usage sync (the guide's 02:00 job; `apexctl stripe sync`): reports each customer's
//! usage per metric per complete UTC day from the Postgres rollups (`usage_records`) as
//! Stripe Billing Meter Events, and keeps what was reported in `stripe_usage_sync`.
//!
//! Counting nothing twice rests on four things:
//! - one run at a time (a Postgres advisory lock), so two runs never plan the same event;
//! - each event has a deterministic identifier (customer, metric, day, revision); its
//!   idempotency key is that identifier plus an attempt number that moves on only when
//!   Stripe refused the event outright, so a retry whose outcome is unknown reuses the key
//!   and is deduplicated by Stripe;
//! - the event about to be sent is written to Postgres first (`pending_quantity`), so a run
//!   that dies after Stripe accepted it resends exactly that event, never a recomputed one.
//!   Stripe keeps keys (and promises unique identifiers) for 24 hours only, so a pending
//!   event older than 20 hours is first checked against Stripe's own total for the day
//!   (meter event summaries): already there, it is confirmed without sending; missing, it is
//!   sent again; anything else is left for a person;
//! - only what Stripe accepted moves `quantity_reported`, and only for the event the row
//!   still holds; the next revision carries only the difference (a late record), see
//!   [`super::reporting`].
//!
//! Requests go through the client's token bucket and retries (429 `Retry-After`, 5xx and
//! timeouts with the same key). A customer whose requests fail is recorded and skipped; the
//! others go on. After three customers in a row fail because Stripe cannot be reached, the
//! run stops early instead of spending each remaining customer's retries on an outage.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apex_billing::{customers, statement};
use apex_core::model::Metric;
use chrono::{DateTime, NaiveDate, Utc};
use sqlx::PgPool;
use stripe_billing::billing_meter_event::CreateBillingMeterEvent;
use stripe_billing::billing_meter_event_summary::ListIdBillingMeterEventSummary;

use super::StripeWorkError;
use super::catalog::Failure;
use super::client::{StripeClient, StripeError};
use super::reporting::{self, DayReport};

/// The end of the reason (`stripe_usage_sync.last_error`) of a day the sync holds for a person
/// rather than retries: an old pending event Stripe's total disagrees with, or a day whose
/// usage shrank below what was reported. Reconciliation (`crate::reconcile`) tells such days
/// from retried failures by it.
pub const NEEDS_A_PERSON: &str = "needs a person";

/// The advisory lock that keeps runs one at a time ("apexsync").
const SYNC_LOCK: i64 = 0x6170_6578_7379_6e63;

/// A pending event younger than this is resent under its own key, which Stripe still knows
/// (it keeps keys 24 hours); an older one is checked against Stripe's totals first.
const PENDING_KEY_TRUSTED_HOURS: i64 = 20;

/// What to sync.
#[derive(Debug, Clone)]
pub struct SyncRequest {
    /// Only this customer (`--customer`).
    pub customer: Option<String>,
    /// Only this day (`--date`); it must be complete and inside Stripe's window.
    pub day: Option<NaiveDate>,
    /// The time the run treats as now (which days are complete, how old a pending event is).
    pub now: DateTime<Utc>,
}

/// What a run sent, per customer and metric.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct SyncSummary {
    /// The days considered, oldest first.
    pub days: Vec<NaiveDate>,
    /// Customers looked at.
    pub customers: usize,
    /// Meter events recorded as accepted in this run (sent, or found in Stripe).
    pub events_sent: usize,
    /// Of those, corrections of days reported before (late records).
    pub corrections: usize,
    /// Quantity sent per metric, in storage units (data transfer in bytes).
    pub quantity_sent: BTreeMap<String, u64>,
    /// Customers without a Stripe customer yet (`apexctl stripe customers`), not synced.
    pub unmapped_customers: Vec<String>,
    /// Days whose total fell below what was reported: not sendable, for a person to check.
    pub shrunk: Vec<ShrunkDay>,
    /// Old pending events that Stripe's total for the day neither includes nor excludes
    /// cleanly: not sent again, for a person to check.
    pub unconfirmed: Vec<UnconfirmedEvent>,
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

/// A pending event older than a day whose presence in Stripe could not be settled.
#[derive(Debug, Clone, serde::Serialize)]
pub struct UnconfirmedEvent {
    /// Our customer id.
    pub customer_id: String,
    /// The metric.
    pub metric_type: String,
    /// The UTC day.
    pub usage_date: NaiveDate,
    /// The event's identifier.
    pub identifier: String,
    /// What Stripe's meter holds for the customer and day.
    pub stripe_total: u64,
    /// What we recorded as accepted before it.
    pub reported: u64,
    /// The pending event's quantity.
    pub pending: u64,
}

/// A metric's meter: its event name and Stripe id.
#[derive(Debug, Clone)]
struct MeterRef {
    event_name: String,
    meter_id: String,
}

/// Runs the sync, one run at a time: a second run while one holds the lock is refused.
pub async fn sync_usage(
    pool: &PgPool,
    stripe: &StripeClient,
    request: &SyncRequest,
) -> Result<SyncSummary, StripeWorkError> {
    let mut lock = pool.acquire().await?;
    // The session ends with the sync, so the lock can never go back to the pool with the
    // connection: a sync stopped part-way (its future dropped by a timeout or a shutdown)
    // would otherwise leave the lock held on a pooled connection, refusing every later sync
    // of the process (and taken again unnoticed by one that got the same connection).
    lock.close_on_drop();
    let locked: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(SYNC_LOCK)
        .fetch_one(&mut *lock)
        .await?;
    if !locked {
        return Err(StripeWorkError::Invalid(
            "another Stripe usage sync is running: try again when it has finished".into(),
        ));
    }
    let outcome = sync_locked(pool, stripe, request).await;
    // Released before the session closes, so a sync that starts right after this one finds
    // the lock free rather than waiting on the close; closing would release it anyway.
    let _ = sqlx::query_scalar::<_, bool>("SELECT pg_advisory_unlock($1)")
        .bind(SYNC_LOCK)
        .fetch_one(&mut *lock)
        .await;
    outcome
}

async fn sync_locked(
    pool: &PgPool,
    stripe: &StripeClient,
    request: &SyncRequest,
) -> Result<SyncSummary, StripeWorkError> {
    let meters: HashMap<String, MeterRef> = sqlx::query_as::<_, (String, String, String)>(
        "SELECT metric_type, event_name, stripe_meter_id FROM stripe_meters",
    )
    .fetch_all(pool)
    .await?
    .into_iter()
    .map(|(metric, event_name, meter_id)| {
        (
            metric,
            MeterRef {
                event_name,
                meter_id,
            },
        )
    })
    .collect();
    if meters.len() < Metric::ALL.len() {
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
    let customers = customers::stripe_mappings(pool, request.customer.as_deref(), true).await?;
    if let Some(id) = &request.customer
        && customers.is_empty()
    {
        return Err(StripeWorkError::Invalid(format!("customer {id} not found")));
    }

    let mut summary = SyncSummary {
        days: days.clone(),
        ..SyncSummary::default()
    };
    let mut outage = super::Outage::default();
    for customers::StripeMapping {
        id: customer_id,
        stripe_customer_id,
        ..
    } in customers
    {
        summary.customers += 1;
        let Some(stripe_customer_id) = stripe_customer_id else {
            summary.unmapped_customers.push(customer_id);
            continue;
        };
        let customer = CustomerSync {
            pool,
            stripe,
            meters: &meters,
            customer_id: &customer_id,
            stripe_customer_id: &stripe_customer_id,
            now: request.now,
        };
        match customer.run(&days, &mut summary).await {
            Ok(()) => outage.record(None),
            Err(error) => {
                tracing::warn!(customer_id, %error, "usage sync failed for a customer");
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
    let outcome = if summary.failed.is_empty() {
        "ok"
    } else {
        "partial"
    };
    metrics::counter!(crate::names::SYNC_RUNS_TOTAL, "outcome" => outcome).increment(1);
    Ok(summary)
}

/// One customer's part of a run.
struct CustomerSync<'a> {
    pool: &'a PgPool,
    stripe: &'a StripeClient,
    meters: &'a HashMap<String, MeterRef>,
    customer_id: &'a str,
    stripe_customer_id: &'a str,
    now: DateTime<Utc>,
}

/// A row of `stripe_usage_sync`.
#[derive(sqlx::FromRow)]
struct SyncRow {
    usage_date: NaiveDate,
    metric_type: String,
    quantity_reported: i64,
    revisions: i32,
    pending_quantity: Option<i64>,
    pending_since: Option<DateTime<Utc>>,
    stripe_identifier: Option<String>,
    attempts: i32,
}

/// Where a day and metric stand before this run plans anything new.
#[derive(Clone, Copy)]
enum DayState {
    /// Stripe accepted `reported` in `revisions` events.
    Reported { reported: u64, revisions: u32 },
    /// An old pending event waits for a person: nothing more is sent.
    OnHold,
}

/// The idempotency key of an event's `attempts`-th fresh send.
fn idempotency_key(identifier: &str, attempts: i32) -> String {
    format!("{identifier}_a{attempts}")
}

/// What to do with a pending event left by an earlier run.
enum PendingFate {
    /// Send it again under this key.
    Send(String),
    /// Stripe has it already: record it as accepted.
    Confirm,
    /// Stripe's total fits neither case: leave it for a person.
    Check(u64),
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
        let wanted: BTreeSet<NaiveDate> = days.iter().copied().collect();
        let rows: Vec<SyncRow> = sqlx::query_as(
            "SELECT usage_date, metric_type, quantity_reported, revisions, pending_quantity,
                    pending_since, stripe_identifier, attempts
             FROM stripe_usage_sync
             WHERE customer_id = $1 AND usage_date BETWEEN $2 AND $3",
        )
        .bind(self.customer_id)
        .bind(first)
        .bind(last)
        .fetch_all(self.pool)
        .await?;
        let mut state: BTreeMap<(NaiveDate, String), DayState> = BTreeMap::new();
        for row in rows.into_iter().filter(|r| wanted.contains(&r.usage_date)) {
            let day_state = self.settle_pending(&row, summary).await?;
            state.insert((row.usage_date, row.metric_type), day_state);
        }

        let mut totals: BTreeMap<(NaiveDate, String), u64> =
            statement::daily_usage(self.pool, self.customer_id, first, last)
                .await?
                .into_iter()
                .filter(|((day, _), _)| wanted.contains(day))
                .map(|((day, metric), total)| ((day, metric.as_str().to_owned()), total))
                .collect();
        for key in state.keys() {
            totals.entry(key.clone()).or_insert(0);
        }

        for ((day, metric_name), total) in totals {
            let metric = parse_metric(&metric_name)?;
            let (reported, revisions) = match state.get(&(day, metric_name.clone())) {
                Some(DayState::OnHold) => continue,
                Some(DayState::Reported {
                    reported,
                    revisions,
                }) => (*reported, *revisions),
                None => (0, 0),
            };
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
                    let attempts = self
                        .write_pending(day, metric, quantity, &identifier)
                        .await?;
                    let key = idempotency_key(&identifier, attempts);
                    self.send_and_confirm(day, metric, quantity, &identifier, &key)
                        .await?;
                    record_sent(summary, metric, quantity, revision > 0);
                }
            }
        }
        Ok(())
    }

    /// Settles an event an earlier run wrote down but never saw accepted, before anything
    /// new is planned for its day: exactly that event, never a recomputed one.
    async fn settle_pending(
        &self,
        row: &SyncRow,
        summary: &mut SyncSummary,
    ) -> Result<DayState, StripeWorkError> {
        let reported = non_negative(row.quantity_reported);
        let revisions = u32::try_from(row.revisions).unwrap_or(0);
        let (Some(pending), Some(identifier)) = (row.pending_quantity, &row.stripe_identifier)
        else {
            return Ok(DayState::Reported {
                reported,
                revisions,
            });
        };
        let metric = parse_metric(&row.metric_type)?;
        let pending = non_negative(pending);
        match self.pending_fate(row, metric, reported, pending).await? {
            PendingFate::Check(stripe_total) => {
                self.hold_for_a_person(row.usage_date, metric, stripe_total, reported, pending)
                    .await?;
                summary.unconfirmed.push(UnconfirmedEvent {
                    customer_id: self.customer_id.to_owned(),
                    metric_type: row.metric_type.clone(),
                    usage_date: row.usage_date,
                    identifier: identifier.clone(),
                    stripe_total,
                    reported,
                    pending,
                });
                return Ok(DayState::OnHold);
            }
            PendingFate::Confirm => {
                self.confirm(row.usage_date, metric, identifier, pending)
                    .await?;
            }
            PendingFate::Send(key) => {
                self.send_and_confirm(row.usage_date, metric, pending, identifier, &key)
                    .await?;
            }
        }
        record_sent(summary, metric, pending, revisions > 0);
        Ok(DayState::Reported {
            reported: reported + pending,
            revisions: revisions + 1,
        })
    }

    /// A young pending event is resent under its own key; an old one (Stripe may have
    /// forgotten the key) is compared with Stripe's total for the day first.
    async fn pending_fate(
        &self,
        row: &SyncRow,
        metric: Metric,
        reported: u64,
        pending: u64,
    ) -> Result<PendingFate, StripeError> {
        let identifier = row.stripe_identifier.as_deref().unwrap_or_default();
        let young = row.pending_since.is_some_and(|since| {
            self.now - since < chrono::Duration::hours(PENDING_KEY_TRUSTED_HOURS)
        });
        if young {
            return Ok(PendingFate::Send(idempotency_key(identifier, row.attempts)));
        }
        let stripe_total = self.stripe_day_total(metric, row.usage_date).await?;
        Ok(if stripe_total == reported.saturating_add(pending) {
            PendingFate::Confirm
        } else if stripe_total == reported {
            PendingFate::Send(idempotency_key(identifier, row.attempts.saturating_add(1)))
        } else {
            PendingFate::Check(stripe_total)
        })
    }

    /// Stripe's total on a metric's meter for this customer and UTC day.
    async fn stripe_day_total(&self, metric: Metric, day: NaiveDate) -> Result<u64, StripeError> {
        #[derive(serde::Deserialize)]
        struct Summaries {
            data: Vec<Summary>,
        }
        #[derive(serde::Deserialize)]
        struct Summary {
            aggregated_value: f64,
        }
        let start = day_start(day).timestamp();
        let list = ListIdBillingMeterEventSummary::new(
            self.meter(metric).meter_id.clone(),
            self.stripe_customer_id,
            start + 86_400,
            start,
        );
        let summaries: Summaries = self.stripe.send(&list, None).await?;
        let total: f64 = summaries.data.iter().map(|s| s.aggregated_value).sum();
        // Meter values are whole numbers, exact in an f64 below 2^53.
        if !(0.0..9.0e15).contains(&total) || total.fract() != 0.0 {
            return Err(StripeError::Decode(format!(
                "meter total {total} is not a whole number we can compare"
            )));
        }
        Ok(total as u64)
    }

    fn meter(&self, metric: Metric) -> &MeterRef {
        self.meters
            .get(metric.as_str())
            .expect("every metric has a meter (checked at the start)")
    }

    /// Sends the pending event and records it as accepted; a failure is recorded on the row
    /// and ends this customer's run.
    async fn send_and_confirm(
        &self,
        day: NaiveDate,
        metric: Metric,
        quantity: u64,
        identifier: &str,
        key: &str,
    ) -> Result<(), StripeWorkError> {
        if let Err(error) = self.send(metric, day, quantity, identifier, key).await {
            self.record_failure(day, metric, &error).await?;
            return Err(error.into());
        }
        self.confirm(day, metric, identifier, quantity).await
    }

    /// Sends one meter event. An identifier Stripe already has means the event is counted.
    async fn send(
        &self,
        metric: Metric,
        day: NaiveDate,
        quantity: u64,
        identifier: &str,
        key: &str,
    ) -> Result<(), StripeError> {
        let payload = HashMap::from([
            (
                "stripe_customer_id".to_owned(),
                self.stripe_customer_id.to_owned(),
            ),
            ("value".to_owned(), quantity.to_string()),
        ]);
        let event = CreateBillingMeterEvent::new(self.meter(metric).event_name.clone(), payload)
            .identifier(identifier)
            .timestamp(reporting::event_timestamp(day));
        match self
            .stripe
            .send::<serde_json::Value>(&event, Some(key))
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("resource_already_exists") => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Writes the event about to be sent; returns its attempt number (for its key).
    async fn write_pending(
        &self,
        day: NaiveDate,
        metric: Metric,
        quantity: u64,
        identifier: &str,
    ) -> Result<i32, sqlx::Error> {
        sqlx::query_scalar(
            "INSERT INTO stripe_usage_sync (customer_id, usage_date, metric_type, status,
                 stripe_identifier, pending_quantity, pending_since, attempts)
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, 1)
             ON CONFLICT (customer_id, usage_date, metric_type) DO UPDATE
             SET status = 'pending', stripe_identifier = $4, pending_quantity = $5,
                 pending_since = $6, attempts = stripe_usage_sync.attempts + 1,
                 updated_at = now()
             RETURNING attempts",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(identifier)
        .bind(to_db(quantity))
        // The run's time, not the database's: the age test of a pending event compares it
        // with the run's `now`, which a simulated clock may set far from the database's.
        .bind(self.now)
        .fetch_one(self.pool)
        .await
    }

    /// Records the pending event `identifier` as accepted. The row must still hold exactly
    /// that event; anything else means the ledger moved under this run, which the lock
    /// rules out, so the customer's run stops rather than count blindly.
    async fn confirm(
        &self,
        day: NaiveDate,
        metric: Metric,
        identifier: &str,
        quantity: u64,
    ) -> Result<(), StripeWorkError> {
        let updated = sqlx::query(
            "UPDATE stripe_usage_sync
             SET quantity_reported = quantity_reported + pending_quantity,
                 revisions = revisions + 1, pending_quantity = NULL, pending_since = NULL,
                 status = 'sent', last_error = NULL, synced_at = now(), updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3
               AND stripe_identifier = $4 AND pending_quantity = $5",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(identifier)
        .bind(to_db(quantity))
        .execute(self.pool)
        .await?
        .rows_affected();
        if updated == 1 {
            Ok(())
        } else {
            Err(StripeWorkError::Invalid(format!(
                "the pending event {identifier} changed while it was being sent"
            )))
        }
    }

    async fn record_failure(
        &self,
        day: NaiveDate,
        metric: Metric,
        error: &StripeError,
    ) -> Result<(), sqlx::Error> {
        // The pending event stays: the next run sends exactly it again. When Stripe refused
        // it outright (not retryable) it recorded nothing, and since Stripe replays a key's
        // first answer, the next send needs a fresh key: the attempt number moves on.
        sqlx::query(
            "UPDATE stripe_usage_sync SET status = 'failed', last_error = $4,
                 attempts = attempts + CASE WHEN $5 THEN 1 ELSE 0 END, updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(error.to_string())
        .bind(!error.is_retryable())
        .execute(self.pool)
        .await?;
        Ok(())
    }

    async fn hold_for_a_person(
        &self,
        day: NaiveDate,
        metric: Metric,
        stripe_total: u64,
        reported: u64,
        pending: u64,
    ) -> Result<(), sqlx::Error> {
        self.mark_failed(
            day,
            metric,
            format!(
                "Stripe holds {stripe_total} for the day; we recorded {reported} accepted and \
                 {pending} pending: not sent again, {NEEDS_A_PERSON}"
            ),
        )
        .await
    }

    async fn flag_shrunk(
        &self,
        day: NaiveDate,
        metric: Metric,
        reported: u64,
        total: u64,
    ) -> Result<(), sqlx::Error> {
        self.mark_failed(
            day,
            metric,
            format!(
                "usage total {total} is below the {reported} already reported: not sent, {NEEDS_A_PERSON}"
            ),
        )
        .await
    }

    async fn mark_failed(
        &self,
        day: NaiveDate,
        metric: Metric,
        reason: String,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE stripe_usage_sync SET status = 'failed', last_error = $4, updated_at = now()
             WHERE customer_id = $1 AND usage_date = $2 AND metric_type = $3",
        )
        .bind(self.customer_id)
        .bind(day)
        .bind(metric.as_str())
        .bind(reason)
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
    metrics::counter!(crate::names::METER_EVENTS_TOTAL, "metric" => metric.as_str()).increment(1);
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

fn to_db(quantity: u64) -> i64 {
    i64::try_from(quantity).unwrap_or(i64::MAX)
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}
