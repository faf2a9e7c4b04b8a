//! Dunning, the operations guide's "smart payment retry logic": a failed invoice payment opens
//! a case, our retries run on the guide's timeline, the last failed retry suspends the
//! customer, and a payment at any time reactivates it. This module is the state machine over
//! `dunning_attempts`; Stripe's webhooks ([`apply_invoice_event`]) and the `dunning_retries`
//! job (`apex_stripe::dunning`, which makes the `/pay` calls and records them with
//! [`record_attempt`]) both drive it, each step in one transaction with the emails it causes
//! (the `events` outbox).
//!
//! # The timeline (the guide's, exactly)
//! - **Day 0**: `invoice.payment_failed` for an open invoice with money due opens a case (one
//!   per invoice): the subscription goes `past_due` and the "Payment failed" email goes, with
//!   the retry dates. Day 0 is the failure time Stripe reports (the event's `created`), not
//!   when we processed it. Days are calendar days in UTC.
//! - **Days 3, 4 and 7** ([`Policy`], `APEX_DUNNING_RETRY_DAYS=3,4,7`): attempt 1, 2 and 3 are
//!   due at the start (00:00 UTC) of their day, so the 03:00 run of that day makes them. An
//!   attempt is never made on the same calendar day as the one before it (a case opened
//!   late does not charge a card twice in one run).
//! - **Before each attempt**, the "Payment retry X of 3" email, as soon as a run (or the
//!   opening webhook) sees the attempt due within 24 hours: with the 03:00 run, on the day
//!   before the attempt (Day 2, Day 3 right after attempt 1 failed, Day 6).
//! - **The last attempt fails**: the case, the subscription and the customer are
//!   `suspended` and the "Service suspended" email goes, in one transaction; the edge refuses
//!   the customer's keys within a second (403 `account_suspended`), none is revoked.
//! - **A payment at any time** (our retry, `invoice.paid` / `invoice.payment_succeeded`) or a
//!   void closes the case at once: the customer is reactivated when no other case of it is
//!   still suspending it, the subscription is `active` when no case of it is open, and
//!   "Payment successful" goes (not for a void). `invoice.marked_uncollectible` changes
//!   nothing: Stripe still takes payment of an uncollectible invoice, and so do our retries.
//!
//! # Rows
//! `attempt_number` 0 is the case (its status is the case's: `failed`, `suspended`,
//! `succeeded`, `canceled`); 1..N are the retries (`pending`, `retrying`, `succeeded`,
//! `failed`, `canceled`). See migration 0010.
//!
//! # Order and repetition
//! Stripe does not promise order nor single delivery. A case is found by its invoice and its
//! row locked first (`FOR UPDATE`) by every step, so steps on one case run one after another.
//! A `payment_failed` for an invoice that has a case (open or closed: our own retry failing,
//! a redelivery, a late event) changes nothing; one that arrives after the invoice's
//! `invoice.paid` or `invoice.voided` (read from the mirror and the stored events) opens
//! nothing. A second `invoice.paid` finds the case closed. Only dunning leaves `suspended`.

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::{Value, json};
use sqlx::{PgConnection, PgExecutor};

use apex_core::env::{ConfigError, EnvSource};

use crate::error::BillingError;
use crate::invoices::mirror;
use crate::subscriptions::{self, DunningStatus};
use crate::{customers, events, names, webhooks};

/// The variable of the retry schedule: days after Day 0, comma-separated.
pub const RETRY_DAYS_VAR: &str = "APEX_DUNNING_RETRY_DAYS";
/// The variable of how long an attempt Stripe could not take is put off, seconds.
pub const POSTPONE_VAR: &str = "APEX_DUNNING_POSTPONE_SECS";
/// The guide's timeline: retries on Days 3, 4 and 7 after the failure.
pub const DEFAULT_RETRY_DAYS: [u32; 3] = [3, 4, 7];
/// The most retries: the guide's emails are "Payment retry X of 3", one kind per attempt.
pub const MAX_ATTEMPTS: usize = 3;
/// An attempt Stripe could not take (5xx, timeout, 429) is put off by this much by default.
pub const DEFAULT_POSTPONE: Duration = Duration::hours(1);
/// A retry's email goes once the retry is due within this long.
pub const NOTICE_WINDOW: Duration = Duration::hours(24);
/// A `retrying` attempt older than this was left by a process that died; another run takes
/// it up again with the same idempotency key. Longer than a retry can take: the read and the
/// `/pay`, each with the client's six tries of up to 30 s, its backoff and Stripe's
/// `Retry-After` pauses (about 16 minutes at worst).
pub const RETRY_LEASE: Duration = Duration::minutes(30);
/// Where the emails send the customer when Stripe gave no hosted invoice page.
pub const DEFAULT_UPDATE_PAYMENT_URL: &str = "https://dashboard.apexmediation.com/billing";

/// The retry schedule: days after Day 0 of each attempt, strictly increasing, 1 to 3 of
/// them (the number of attempts follows), and how long an attempt Stripe could not take is
/// put off.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    retry_days: Vec<u32>,
    postpone: Duration,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            retry_days: DEFAULT_RETRY_DAYS.to_vec(),
            postpone: DEFAULT_POSTPONE,
        }
    }
}

impl Policy {
    /// A schedule of `retry_days` (e.g. `[3, 4, 7]`); an attempt Stripe could not take waits
    /// `postpone`. Errors say what is wrong: no day, more than [`MAX_ATTEMPTS`], a day outside
    /// 1 to 60, days not strictly increasing, a postponement outside a minute to a day.
    pub fn new(retry_days: Vec<u32>, postpone: Duration) -> Result<Self, String> {
        if retry_days.is_empty() {
            return Err("needs at least one retry day".into());
        }
        if retry_days.len() > MAX_ATTEMPTS {
            return Err(format!(
                "at most {MAX_ATTEMPTS} retries (the guide's emails are \"Payment retry X of 3\")"
            ));
        }
        if retry_days.iter().any(|d| !(1..=60).contains(d)) {
            return Err("each retry day must be 1 to 60 days after the failure".into());
        }
        if retry_days.windows(2).any(|w| w[0] >= w[1]) {
            return Err(
                "retry days must be strictly increasing (one attempt a day at most)".into(),
            );
        }
        if postpone < Duration::minutes(1) || postpone > Duration::days(1) {
            return Err("the postponement must be 60 to 86400 seconds".into());
        }
        Ok(Self {
            retry_days,
            postpone,
        })
    }

    /// Reads [`RETRY_DAYS_VAR`] (default `3,4,7`) and [`POSTPONE_VAR`] (default 3600).
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let days = match env.optional(RETRY_DAYS_VAR) {
            None => DEFAULT_RETRY_DAYS.to_vec(),
            Some(raw) => raw
                .split(',')
                .map(|d| d.trim().parse::<u32>())
                .collect::<Result<Vec<_>, _>>()
                .map_err(|_| ConfigError::Invalid {
                    name: RETRY_DAYS_VAR,
                    reason: format!("{raw:?} is not comma-separated whole days, e.g. 3,4,7"),
                })?,
        };
        let postpone = env.parse_or(POSTPONE_VAR, DEFAULT_POSTPONE.num_seconds())?;
        Policy::new(days, Duration::seconds(postpone)).map_err(|reason| ConfigError::Invalid {
            name: if reason.contains("postpone") {
                POSTPONE_VAR
            } else {
                RETRY_DAYS_VAR
            },
            reason,
        })
    }

    /// How many retries a case gets.
    pub fn attempts(&self) -> i32 {
        self.retry_days.len() as i32
    }

    /// The days after Day 0 of each retry.
    pub fn retry_days(&self) -> &[u32] {
        &self.retry_days
    }

    /// How long an attempt Stripe could not take waits.
    pub fn postpone(&self) -> Duration {
        self.postpone
    }

    /// When retry `attempt` (1-based) of a case whose payment failed at `failed_at` is due:
    /// 00:00 UTC of its day. `None` past the last attempt.
    pub fn due_at(&self, failed_at: DateTime<Utc>, attempt: i32) -> Option<DateTime<Utc>> {
        let days = *self.retry_days.get(usize::try_from(attempt - 1).ok()?)?;
        Some(start_of_day(
            failed_at.date_naive() + Duration::days(days.into()),
        ))
    }

    /// The dates of every retry of a case that failed at `failed_at`, for the first email.
    pub fn retry_dates(&self, failed_at: DateTime<Utc>) -> Vec<NaiveDate> {
        (1..=self.attempts())
            .filter_map(|k| self.due_at(failed_at, k))
            .map(|t| t.date_naive())
            .collect()
    }
}

fn start_of_day(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// How a case closed (`dunning_attempts.resolution`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Resolution {
    /// Our retry collected the payment.
    RetrySucceeded,
    /// Paid otherwise (by hand on the hosted page, by Stripe).
    Paid,
    /// The invoice was voided.
    Voided,
    /// An operator closed it (`apexctl dunning close`).
    Closed,
    /// The customer is exempt from dunning.
    Exempt,
    /// An operator restored service (`apexctl dunning reactivate`).
    Reactivated,
}

impl Resolution {
    /// The column's value; also the `cause` label of the reactivation metric.
    pub const fn as_str(self) -> &'static str {
        match self {
            Resolution::RetrySucceeded => "retry_succeeded",
            Resolution::Paid => "paid",
            Resolution::Voided => "voided",
            Resolution::Closed => "closed",
            Resolution::Exempt => "exempt",
            Resolution::Reactivated => "reactivated",
        }
    }

    /// Whether money came in (the case row becomes `succeeded`, "Payment successful" goes).
    pub const fn is_payment(self) -> bool {
        matches!(self, Resolution::RetrySucceeded | Resolution::Paid)
    }
}

/// A `dunning_attempts` row: the case (attempt 0) or one retry.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct DunningRow {
    /// Row id.
    pub id: i64,
    /// Our customer id.
    pub customer_id: String,
    /// Our subscription id when the case opened.
    pub subscription_id: Option<i64>,
    /// Stripe's invoice id (`in_...`).
    pub invoice_id: String,
    /// What the invoice asked for when the case opened, cents.
    pub amount_due_cents: i64,
    /// 0 for the case, 1..N for the retries.
    pub attempt_number: i32,
    /// See the module docs.
    pub status: String,
    /// When a pending retry is due.
    pub next_retry_at: Option<DateTime<Utc>>,
    /// The last failure's message (a decline, or why the attempt was put off).
    pub last_error: Option<String>,
    /// Case: Day 0 as Stripe reported it. Retry: when it failed.
    pub failed_at: Option<DateTime<Utc>>,
    /// Stripe's decline or error code.
    pub failure_code: Option<String>,
    /// When the retry was last sent to Stripe.
    pub attempted_at: Option<DateTime<Utc>>,
    /// Times the retry was put off because Stripe could not take it.
    pub postponements: i32,
    /// Case: when it suspended the customer.
    pub suspended_at: Option<DateTime<Utc>>,
    /// Case: how it closed (see [`Resolution`]); `None` while open.
    pub resolution: Option<String>,
    /// Case: when it closed.
    pub resolved_at: Option<DateTime<Utc>>,
    /// Case: who closed it by hand.
    pub resolved_by: Option<String>,
    /// Case: why.
    pub resolution_note: Option<String>,
    /// Case: the invoice's currency.
    pub currency: String,
    /// Case: the hosted invoice page.
    pub update_payment_url: Option<String>,
    /// Created.
    pub created_at: DateTime<Utc>,
    /// Last changed.
    pub updated_at: DateTime<Utc>,
}

const ROW_COLUMNS: &str = "id, customer_id, subscription_id, invoice_id, amount_due_cents, \
    attempt_number, status, next_retry_at, last_error, failed_at, failure_code, attempted_at, \
    postponements, suspended_at, resolution, resolved_at, resolved_by, resolution_note, \
    currency, update_payment_url, created_at, updated_at";

/// What an invoice event did to dunning.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EventEffect {
    /// A case opened (Day 0).
    pub case_opened: bool,
    /// The case it closed, and how.
    pub case_closed: Option<Resolution>,
    /// The customer's subscription changed status.
    pub subscription_moved: bool,
    /// The customer left `suspended`.
    pub customer_reactivated: bool,
}

/// A Stripe invoice event, as dunning reads it.
#[derive(Debug, Clone, Copy)]
pub struct InvoiceEvent<'a> {
    /// `invoice.payment_failed`, `invoice.paid`, ...
    pub event_type: &'a str,
    /// The event's `data.object`: the invoice.
    pub invoice: &'a Value,
    /// The event's `created` (Day 0 for a failure); `None` when it has none (now is used).
    pub created: Option<DateTime<Utc>>,
    /// The event's `request.idempotency_key`: the key of the API request that caused it
    /// (ours for a payment our retry made, `apex-dunning-<invoice>-<attempt>`).
    pub request_key: Option<&'a str>,
}

/// Applies Stripe's invoice event to dunning, in the caller's transaction (the webhook's,
/// after the invoice mirror was updated): `invoice.payment_failed` opens a case,
/// `invoice.paid` / `invoice.payment_succeeded` and `invoice.voided` close it. Other events,
/// invoices of customers we do not know, and failures with nothing due change nothing; a
/// paid invoice that collected nothing closes its case if it has one (a credit note settled
/// it) and is otherwise ignored (Stripe's own $0 subscription renewals).
pub async fn apply_invoice_event(
    conn: &mut PgConnection,
    policy: &Policy,
    event: &InvoiceEvent<'_>,
    now: DateTime<Utc>,
) -> Result<EventEffect, BillingError> {
    let InvoiceEvent {
        event_type,
        invoice,
        created,
        request_key,
    } = *event;
    let Some(invoice_id) = invoice
        .get("id")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
    else {
        return Ok(EventEffect::default());
    };
    match event_type {
        "invoice.payment_failed" => {
            on_payment_failed(
                conn,
                policy,
                invoice_id,
                invoice,
                created.unwrap_or(now),
                now,
            )
            .await
        }
        "invoice.paid" | "invoice.payment_succeeded" => {
            let paid = invoice.get("amount_paid").and_then(Value::as_i64);
            // A paid invoice that collected nothing (Stripe's own $0 subscription renewals:
            // the money is on our monthly invoice) says nothing about whether the customer
            // pays, unless it settles a case (a credit note brought it to zero).
            if paid == Some(0) && case_row(&mut *conn, invoice_id).await?.is_none() {
                return Ok(EventEffect::default());
            }
            if event_type == "invoice.paid" && paid != Some(0) {
                metrics::counter!(names::INVOICE_PAYMENTS_TOTAL, "outcome" => "succeeded")
                    .increment(1);
            }
            // Our retry's payment names our key; a payment by hand or by Stripe does not.
            let by_retry = request_key
                .and_then(|key| key.strip_prefix(&format!("apex-dunning-{invoice_id}-")))
                .and_then(|attempt| attempt.parse::<i32>().ok());
            on_settled(
                conn,
                invoice_id,
                invoice,
                Resolution::Paid,
                paid,
                by_retry,
                now,
            )
            .await
        }
        "invoice.voided" => {
            on_settled(
                conn,
                invoice_id,
                invoice,
                Resolution::Voided,
                None,
                None,
                now,
            )
            .await
        }
        _ => Ok(EventEffect::default()),
    }
}

/// Our customer an invoice event is about: the mirror's row for the invoice, else the
/// customer of the subscription it names, else the customer mapped to its Stripe customer.
async fn customer_of(
    conn: &mut PgConnection,
    invoice_id: &str,
    invoice: &Value,
) -> Result<Option<String>, BillingError> {
    if let Some(customer) = mirror::customer_of(&mut *conn, invoice_id, invoice).await? {
        return Ok(Some(customer));
    }
    match webhooks::invoice_target(invoice) {
        Some(subscriptions::StripeTarget::Subscription(sub)) => {
            subscriptions::customer_of_stripe_subscription(&mut *conn, sub).await
        }
        Some(subscriptions::StripeTarget::Customer(cus)) => {
            customers::id_of_stripe_customer(&mut *conn, cus).await
        }
        None => Ok(None),
    }
}

async fn on_payment_failed(
    conn: &mut PgConnection,
    policy: &Policy,
    invoice_id: &str,
    invoice: &Value,
    failed_at: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<EventEffect, BillingError> {
    let mut effect = EventEffect::default();
    let amount_due = invoice
        .get("amount_due")
        .and_then(Value::as_i64)
        .unwrap_or(0);
    if amount_due <= 0 {
        return Ok(effect);
    }
    metrics::counter!(names::INVOICE_PAYMENTS_TOTAL, "outcome" => "failed").increment(1);
    // Stripe collecting on its own beside us would charge the card on days the customer was
    // not told of, and email it in Stripe's words: the README says which settings turn it off.
    if invoice
        .get("next_payment_attempt")
        .and_then(Value::as_i64)
        .is_some()
    {
        tracing::warn!(
            invoice = invoice_id,
            "Stripe has scheduled its own next payment attempt for this invoice: turn off Smart \
             Retries and the retry schedule in Stripe's Billing settings (see the README), or \
             Stripe retries beside apex's dunning"
        );
        metrics::counter!(names::STRIPE_SCHEDULED_RETRIES_TOTAL).increment(1);
    }
    let Some(customer_id) = customer_of(conn, invoice_id, invoice).await? else {
        tracing::info!(
            invoice = invoice_id,
            "payment failed for an invoice of no customer we know"
        );
        return Ok(effect);
    };
    // Every step on a customer's cases takes its row first (see `customers::lock`).
    customers::lock(&mut *conn, &customer_id).await?;
    if case_for_update(&mut *conn, invoice_id).await?.is_some() {
        // A redelivery, a late event, or our own retry failing: the case already follows it.
        return Ok(effect);
    }
    if mirror::is_settled(&mut *conn, invoice_id).await?
        || webhooks::invoice_settled_by_event(&mut *conn, invoice_id).await?
    {
        // Paid or voided already: this failure came before the payment that settled it.
        return Ok(effect);
    }
    let Some((contact, _)) = customers::dunning_contact(&mut *conn, &customer_id).await? else {
        return Ok(effect);
    };
    let subscription = subscriptions::live(&mut *conn, &customer_id).await?;
    let currency = invoice
        .get("currency")
        .and_then(Value::as_str)
        .unwrap_or("usd")
        .to_ascii_lowercase();
    let url = match invoice.get("hosted_invoice_url").and_then(Value::as_str) {
        Some(url) if !url.is_empty() => Some(url.to_owned()),
        _ => mirror::hosted_invoice_url(&mut *conn, invoice_id).await?,
    };
    let inserted = sqlx::query(
        "INSERT INTO dunning_attempts (customer_id, subscription_id, invoice_id, amount_due_cents, \
             attempt_number, status, failed_at, last_error, currency, update_payment_url, \
             resolution, resolved_at, resolved_by, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, 0, $5, $6, 'payment failed', $7, $8, $9, $10, $11, $12, $12) \
         ON CONFLICT (invoice_id, attempt_number) DO NOTHING",
    )
    .bind(&customer_id)
    .bind(subscription.as_ref().map(|s| s.0))
    .bind(invoice_id)
    .bind(amount_due)
    .bind(if contact.dunning_exempt {
        "canceled"
    } else {
        "failed"
    })
    .bind(failed_at)
    .bind(&currency)
    .bind(&url)
    .bind(
        contact
            .dunning_exempt
            .then_some(Resolution::Exempt.as_str()),
    )
    .bind(contact.dunning_exempt.then_some(now))
    .bind(contact.dunning_exempt.then_some("apex (customer exempt)"))
    .bind(now)
    .execute(&mut *conn)
    .await?
    .rows_affected();
    if inserted == 0 {
        // Another delivery opened it in the meantime.
        return Ok(effect);
    }
    effect.case_opened = true;
    if contact.dunning_exempt {
        metrics::counter!(names::DUNNING_CASES_CLOSED_TOTAL, "resolution" => "exempt").increment(1);
        return Ok(effect);
    }
    metrics::counter!(names::DUNNING_CASES_OPENED_TOTAL).increment(1);
    let first_due = policy
        .due_at(failed_at, 1)
        .expect("a policy has one attempt at least");
    schedule_attempt(&mut *conn, invoice_id, 1, first_due, now).await?;
    effect.subscription_moved = settle_statuses(&mut *conn, &customer_id, false, now)
        .await?
        .subscription_moved;
    let retry_schedule: Vec<String> = policy
        .retry_dates(failed_at)
        .iter()
        .map(|d| d.to_string())
        .collect();
    events::enqueue_once(
        &mut *conn,
        "email.payment_failed",
        &json!({
            "to": contact.email,
            "customer_id": customer_id,
            "name": contact.name,
            "invoice_id": invoice_id,
            "amount_due_cents": amount_due,
            "currency": currency,
            "update_payment_url": url.as_deref().unwrap_or(DEFAULT_UPDATE_PAYMENT_URL),
            "retry_schedule": retry_schedule,
        }),
        &format!("dunning:{invoice_id}:payment_failed"),
        now,
    )
    .await?;
    // A short grace (a first retry on Day 1) is within the notice window already.
    send_due_notices(&mut *conn, policy, now, Some(invoice_id)).await?;
    Ok(effect)
}

#[allow(clippy::too_many_arguments)]
async fn on_settled(
    conn: &mut PgConnection,
    invoice_id: &str,
    invoice: &Value,
    resolution: Resolution,
    amount_paid: Option<i64>,
    by_retry: Option<i32>,
    now: DateTime<Utc>,
) -> Result<EventEffect, BillingError> {
    let mut effect = EventEffect::default();
    // The case is found by its invoice first: it names its customer even if the Stripe
    // mapping has changed since.
    let customer_id = match case_row(&mut *conn, invoice_id).await? {
        Some(case) => case.customer_id,
        None => match customer_of(conn, invoice_id, invoice).await? {
            Some(customer) => customer,
            None => return Ok(effect),
        },
    };
    customers::lock(&mut *conn, &customer_id).await?;
    match case_for_update(&mut *conn, invoice_id).await? {
        Some(case) if case.resolved_at.is_none() => {
            // Our retry paid it (its key is on the event); without a key (an event that
            // names no request), a retry in flight most likely did.
            let attempt = match by_retry {
                Some(attempt) => Some(attempt),
                None if resolution == Resolution::Paid => {
                    retry_in_flight(&mut *conn, invoice_id).await?
                }
                None => None,
            };
            let resolution = match attempt {
                Some(_) if resolution == Resolution::Paid => Resolution::RetrySucceeded,
                _ => resolution,
            };
            let closed = close_case(
                &mut *conn,
                &case,
                resolution,
                amount_paid,
                attempt,
                None,
                now,
            )
            .await?;
            effect.case_closed = Some(resolution);
            effect.subscription_moved = closed.subscription_moved;
            effect.customer_reactivated = closed.customer_reactivated;
        }
        _ => {
            // No open case (paid at the first attempt, or a closed case paid later): the
            // subscription is what the customer's open cases make it.
            effect.subscription_moved = settle_statuses(&mut *conn, &customer_id, false, now)
                .await?
                .subscription_moved;
        }
    }
    Ok(effect)
}

/// The case of `invoice_id`, its row locked until the transaction ends; `None` when the
/// invoice has none.
async fn case_for_update(
    db: impl PgExecutor<'_>,
    invoice_id: &str,
) -> Result<Option<DunningRow>, BillingError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM dunning_attempts \
         WHERE invoice_id = $1 AND attempt_number = 0 FOR UPDATE"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(invoice_id)
        .fetch_optional(db)
        .await?)
}

/// The retry of `invoice_id` sent to Stripe and not yet recorded, if any.
async fn retry_in_flight(
    db: impl PgExecutor<'_>,
    invoice_id: &str,
) -> Result<Option<i32>, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT attempt_number FROM dunning_attempts WHERE invoice_id = $1 \
             AND attempt_number > 0 AND status = 'retrying'",
    )
    .bind(invoice_id)
    .fetch_optional(db)
    .await?)
}

/// Inserts retry `attempt` of `invoice_id`'s case, pending until `due`.
async fn schedule_attempt(
    conn: &mut PgConnection,
    invoice_id: &str,
    attempt: i32,
    due: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    sqlx::query(
        "INSERT INTO dunning_attempts (customer_id, subscription_id, invoice_id, amount_due_cents, \
             attempt_number, status, next_retry_at, currency, created_at, updated_at) \
         SELECT customer_id, subscription_id, invoice_id, amount_due_cents, $2, 'pending', $3, \
                currency, $4, $4 \
         FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0 \
         ON CONFLICT (invoice_id, attempt_number) DO NOTHING",
    )
    .bind(invoice_id)
    .bind(attempt)
    .bind(due)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// What settling a customer's statuses changed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Settled {
    /// The subscription changed status.
    pub subscription_moved: bool,
    /// The customer left `suspended`.
    pub customer_reactivated: bool,
}

/// Sets `customer_id`'s statuses to what its open cases make them: the subscription
/// `suspended` while a case suspends it, else `past_due` while a case is open, else
/// `active` (from `past_due` or `suspended` only: a trial stays a trial); the customer back
/// to `active` when `closing_suspended` (the case just closed had suspended it) and no other
/// case still suspends it.
async fn settle_statuses(
    conn: &mut PgConnection,
    customer_id: &str,
    closing_suspended: bool,
    now: DateTime<Utc>,
) -> Result<Settled, BillingError> {
    let (open, suspending): (i64, i64) = sqlx::query_as(
        "SELECT count(*), count(*) FILTER (WHERE status = 'suspended') FROM dunning_attempts \
         WHERE customer_id = $1 AND attempt_number = 0 AND resolved_at IS NULL",
    )
    .bind(customer_id)
    .fetch_one(&mut *conn)
    .await?;
    let mut settled = Settled::default();
    if closing_suspended && suspending == 0 {
        settled.customer_reactivated = customers::reactivate(&mut *conn, customer_id, now).await?;
    }
    // A customer still suspended (by a case, or by a person) keeps a suspended
    // subscription: the two leave `suspended` together, never one without the other.
    let customer_suspended = customers::dunning_contact(&mut *conn, customer_id)
        .await?
        .is_some_and(|(c, _)| c.status == "suspended");
    let status = if suspending > 0 {
        DunningStatus::Suspended
    } else if open > 0 {
        DunningStatus::PastDue
    } else {
        DunningStatus::Active
    };
    settled.subscription_moved = subscriptions::apply_dunning_status(
        &mut *conn,
        customer_id,
        status,
        customer_suspended,
        now,
    )
    .await?;
    Ok(settled)
}

/// Closes the open case `case` as `resolution` at `now`: retry `paid_by` (the one whose
/// payment closed it) succeeded, the other pending ones are canceled; settles the customer's
/// statuses; for a payment that collected money (`amount_paid` cents, `None`: the amount
/// due) enqueues "Payment successful". `by` is (who, why) for an operator's close. The
/// caller holds the customer's lock and the case's.
async fn close_case(
    conn: &mut PgConnection,
    case: &DunningRow,
    resolution: Resolution,
    amount_paid: Option<i64>,
    paid_by: Option<i32>,
    by: Option<(&str, Option<&str>)>,
    now: DateTime<Utc>,
) -> Result<Settled, BillingError> {
    sqlx::query(
        "UPDATE dunning_attempts SET updated_at = $3, \
             status = CASE WHEN attempt_number = $2 THEN 'succeeded' ELSE 'canceled' END \
         WHERE invoice_id = $1 AND attempt_number > 0 \
           AND (status IN ('pending', 'retrying') OR attempt_number = $2)",
    )
    .bind(&case.invoice_id)
    .bind(paid_by)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    sqlx::query(
        "UPDATE dunning_attempts SET status = $2, resolution = $3, resolved_at = $4, \
             resolved_by = $5, resolution_note = $6, updated_at = $4 \
         WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(&case.invoice_id)
    .bind(if resolution.is_payment() {
        "succeeded"
    } else {
        "canceled"
    })
    .bind(resolution.as_str())
    .bind(now)
    .bind(by.map(|b| b.0))
    .bind(by.and_then(|b| b.1))
    .execute(&mut *conn)
    .await?;
    let settled = settle_statuses(
        &mut *conn,
        &case.customer_id,
        case.status == "suspended",
        now,
    )
    .await?;
    metrics::counter!(names::DUNNING_CASES_CLOSED_TOTAL, "resolution" => resolution.as_str())
        .increment(1);
    if settled.customer_reactivated {
        metrics::counter!(names::DUNNING_REACTIVATIONS_TOTAL, "cause" => resolution.as_str())
            .increment(1);
    }
    if resolution.is_payment() && amount_paid != Some(0) {
        if let Some(failed_at) = case.failed_at {
            let seconds = (now - failed_at).num_seconds().max(0) as f64;
            metrics::histogram!(names::DUNNING_RECOVERY_SECONDS).record(seconds);
        }
        if let Some((contact, _)) =
            customers::dunning_contact(&mut *conn, &case.customer_id).await?
        {
            events::enqueue_once(
                &mut *conn,
                "email.payment_succeeded",
                &json!({
                    "to": contact.email,
                    "customer_id": case.customer_id,
                    "name": contact.name,
                    "invoice_id": case.invoice_id,
                    "amount_paid_cents": amount_paid.unwrap_or(case.amount_due_cents),
                    "currency": case.currency,
                    "service_status": contact.status,
                }),
                &format!("dunning:{}:payment_succeeded", case.invoice_id),
                now,
            )
            .await?;
        }
    }
    Ok(settled)
}

/// Enqueues the "Payment retry X of 3" email of every pending retry due within
/// [`NOTICE_WINDOW`] of `now` that has not had it (of `only` invoice's case, or all), once
/// per retry. Returns how many it enqueued.
pub async fn send_due_notices(
    conn: &mut PgConnection,
    policy: &Policy,
    now: DateTime<Utc>,
    only: Option<&str>,
) -> Result<u64, BillingError> {
    let due: Vec<(String, i32, DateTime<Utc>)> = sqlx::query_as(
        "SELECT a.invoice_id, a.attempt_number, a.next_retry_at FROM dunning_attempts a \
         WHERE a.attempt_number > 0 AND a.status = 'pending' AND a.next_retry_at <= $1 \
           AND ($2::text IS NULL OR a.invoice_id = $2) \
           AND NOT EXISTS (SELECT 1 FROM events e \
               WHERE e.dedup_key = 'dunning:' || a.invoice_id || ':payment_retry_' || a.attempt_number) \
         ORDER BY a.next_retry_at, a.id",
    )
    .bind(now + NOTICE_WINDOW)
    .bind(only)
    .fetch_all(&mut *conn)
    .await?;
    let mut sent = 0;
    for (invoice_id, attempt, due_at) in due {
        let Some(case) = case_row(&mut *conn, &invoice_id).await? else {
            continue;
        };
        let Some((contact, _)) = customers::dunning_contact(&mut *conn, &case.customer_id).await?
        else {
            continue;
        };
        let days_until = (due_at.date_naive() - now.date_naive()).num_days().max(0);
        events::enqueue_once(
            &mut *conn,
            &format!("email.payment_retry_{attempt}"),
            &json!({
                "to": contact.email,
                "customer_id": case.customer_id,
                "name": contact.name,
                "invoice_id": invoice_id,
                "days_until_retry": days_until,
                "retry_date": due_at.date_naive().to_string(),
                "attempts_remaining": policy.attempts() - attempt + 1,
                "attempts_total": policy.attempts(),
                "amount_due_cents": case.amount_due_cents,
                "currency": case.currency,
                "update_payment_url": case.update_payment_url.as_deref().unwrap_or(DEFAULT_UPDATE_PAYMENT_URL),
            }),
            &format!("dunning:{invoice_id}:payment_retry_{attempt}"),
            now,
        )
        .await?;
        sent += 1;
    }
    Ok(sent)
}

async fn case_row(
    db: impl PgExecutor<'_>,
    invoice_id: &str,
) -> Result<Option<DunningRow>, BillingError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(invoice_id)
        .fetch_optional(db)
        .await?)
}

/// A retry claimed by a run: marked `retrying` at `attempted_at`.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct Claim {
    /// Stripe's invoice id.
    pub invoice_id: String,
    /// 1..N.
    pub attempt_number: i32,
    /// Our customer.
    pub customer_id: String,
    /// The claim's time, as stored: the run that claimed it records its outcome only while
    /// the row still carries it.
    pub attempted_at: DateTime<Utc>,
    /// Times it was put off before.
    pub postponements: i32,
}

impl Claim {
    /// The idempotency key of this retry's `/pay`: one per invoice and attempt, so a retry
    /// sent again after a lost answer or a crash is never a second charge.
    pub fn idempotency_key(&self) -> String {
        format!("apex-dunning-{}-{}", self.invoice_id, self.attempt_number)
    }
}

/// Claims the next due retry for a run at `now`: a `pending` one due by now (only one put
/// off before, with `only_postponed`: the hourly follow-up), or a `retrying` one whose run
/// died ([`RETRY_LEASE`]); of an open case of a customer not exempt. Two runs at once never
/// claim the same row (`FOR UPDATE SKIP LOCKED`). `None` when nothing is due.
pub async fn claim_next(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
    only_postponed: bool,
) -> Result<Option<Claim>, BillingError> {
    Ok(sqlx::query_as(
        "UPDATE dunning_attempts SET status = 'retrying', attempted_at = $1, updated_at = $1 \
         WHERE id = ( \
             SELECT a.id FROM dunning_attempts a \
             JOIN dunning_attempts c ON c.invoice_id = a.invoice_id AND c.attempt_number = 0 \
             JOIN customers cu ON cu.id = a.customer_id \
             WHERE a.attempt_number > 0 AND c.resolved_at IS NULL AND NOT cu.dunning_exempt \
               AND ((a.status = 'pending' AND a.next_retry_at <= $1 \
                     AND (NOT $2 OR a.postponements > 0)) \
                    OR (a.status = 'retrying' AND a.attempted_at < $1 - $3::interval)) \
             ORDER BY a.next_retry_at, a.id LIMIT 1 \
             FOR UPDATE OF a SKIP LOCKED) \
         RETURNING invoice_id, attempt_number, customer_id, attempted_at, postponements",
    )
    .bind(now)
    .bind(only_postponed)
    .bind(format!("{} seconds", RETRY_LEASE.num_seconds()))
    .fetch_optional(db)
    .await?)
}

/// What Stripe made of a retry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptResult {
    /// The invoice is paid (by this retry, or already: read before paying).
    Paid {
        /// `amount_paid`, cents.
        amount_paid_cents: Option<i64>,
    },
    /// The invoice was voided meanwhile.
    Voided,
    /// The card was declined (Stripe's 402 `card_error`).
    Declined {
        /// Stripe's `decline_code`, else its `code`.
        code: Option<String>,
        /// Stripe's message.
        message: String,
    },
    /// Stripe could not take it (5xx, timeout, 429, unreachable) or answered something we
    /// cannot act on: the retry is put off, never skipped.
    Postponed {
        /// Why.
        reason: String,
    },
}

/// What recording a retry did.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome")]
pub enum Recorded {
    /// Paid: the case closed, the customer is current.
    Succeeded,
    /// Declined; the next retry is due then.
    Failed {
        /// When the next retry is due.
        next_retry_at: DateTime<Utc>,
    },
    /// Declined on the last retry: the customer is suspended.
    Suspended,
    /// Put off until then.
    Postponed {
        /// When it is due again.
        until: DateTime<Utc>,
    },
    /// The invoice was voided: the case closed without a payment.
    Canceled,
    /// Someone else recorded it first (a webhook closed the case, or another run took it
    /// over): nothing changed.
    Stale,
}

/// Records `result` for `claim` at `now`, in one transaction with everything it decides: the
/// retry's outcome, the next retry or the suspension, the case's close, the statuses and the
/// emails. A claim whose row has moved on since (see [`Recorded::Stale`]) changes nothing.
pub async fn record_attempt(
    conn: &mut PgConnection,
    policy: &Policy,
    claim: &Claim,
    result: &AttemptResult,
    now: DateTime<Utc>,
) -> Result<Recorded, BillingError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    customers::lock(&mut *tx, &claim.customer_id).await?;
    let Some(case) = case_for_update(&mut *tx, &claim.invoice_id).await? else {
        return Ok(Recorded::Stale);
    };
    let current: Option<(String, Option<DateTime<Utc>>)> = sqlx::query_as(
        "SELECT status, attempted_at FROM dunning_attempts \
         WHERE invoice_id = $1 AND attempt_number = $2 FOR UPDATE",
    )
    .bind(&claim.invoice_id)
    .bind(claim.attempt_number)
    .fetch_optional(&mut *tx)
    .await?;
    let attempt_label = claim.attempt_number.to_string();
    let outcome = |o: &'static str| {
        metrics::counter!(names::DUNNING_ATTEMPTS_TOTAL, "attempt" => attempt_label.clone(), "outcome" => o)
            .increment(1)
    };
    let ours = matches!(&current, Some((status, at)) if status == "retrying" && *at == Some(claim.attempted_at));
    if case.resolved_at.is_some() || !ours {
        // Stripe's `invoice.paid` for this very payment can reach the edge before this run
        // records it: the webhook then closed the case with this attempt as the one that
        // paid, which is what this run would have written.
        let paid_by_this = matches!(result, AttemptResult::Paid { .. })
            && case.resolution.as_deref() == Some(Resolution::RetrySucceeded.as_str())
            && matches!(&current, Some((status, _)) if status == "succeeded");
        if paid_by_this {
            outcome("succeeded");
            return Ok(Recorded::Succeeded);
        }
        return Ok(Recorded::Stale);
    }
    let recorded = match result {
        AttemptResult::Paid { amount_paid_cents } => {
            set_attempt(&mut tx, claim, "succeeded", None, None, now).await?;
            close_case(
                &mut tx,
                &case,
                Resolution::RetrySucceeded,
                *amount_paid_cents,
                Some(claim.attempt_number),
                None,
                now,
            )
            .await?;
            outcome("succeeded");
            Recorded::Succeeded
        }
        AttemptResult::Voided => {
            set_attempt(&mut tx, claim, "canceled", None, None, now).await?;
            close_case(&mut tx, &case, Resolution::Voided, None, None, None, now).await?;
            outcome("canceled");
            Recorded::Canceled
        }
        AttemptResult::Declined { code, message } => {
            set_attempt(
                &mut tx,
                claim,
                "failed",
                code.as_deref(),
                Some(message.as_str()),
                now,
            )
            .await?;
            outcome("failed");
            let failed_at = case.failed_at.unwrap_or(case.created_at);
            match policy.due_at(failed_at, claim.attempt_number + 1) {
                Some(due) => {
                    // Never two attempts on one calendar day.
                    let due = due.max(start_of_day(now.date_naive() + Duration::days(1)));
                    // Its "Payment retry" email goes with the run's notices, once due.
                    schedule_attempt(
                        &mut tx,
                        &claim.invoice_id,
                        claim.attempt_number + 1,
                        due,
                        now,
                    )
                    .await?;
                    Recorded::Failed { next_retry_at: due }
                }
                None => {
                    suspend(&mut tx, &case, now).await?;
                    Recorded::Suspended
                }
            }
        }
        AttemptResult::Postponed { reason } => {
            let until = now + policy.postpone();
            sqlx::query(
                "UPDATE dunning_attempts SET status = 'pending', next_retry_at = $3, \
                     postponements = postponements + 1, last_error = $4, updated_at = $5 \
                 WHERE invoice_id = $1 AND attempt_number = $2",
            )
            .bind(&claim.invoice_id)
            .bind(claim.attempt_number)
            .bind(until)
            .bind(reason)
            .bind(now)
            .execute(&mut *tx)
            .await?;
            outcome("postponed");
            Recorded::Postponed { until }
        }
    };
    tx.commit().await?;
    Ok(recorded)
}

async fn set_attempt(
    conn: &mut PgConnection,
    claim: &Claim,
    status: &str,
    code: Option<&str>,
    message: Option<&str>,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE dunning_attempts SET status = $3, failure_code = coalesce($4, failure_code), \
             last_error = coalesce($5, last_error), \
             failed_at = CASE WHEN $3 = 'failed' THEN $6 ELSE failed_at END, \
             next_retry_at = CASE WHEN $3 = 'failed' THEN NULL ELSE next_retry_at END, \
             updated_at = $6 \
         WHERE invoice_id = $1 AND attempt_number = $2",
    )
    .bind(&claim.invoice_id)
    .bind(claim.attempt_number)
    .bind(status)
    .bind(code)
    .bind(message)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    Ok(())
}

/// The last retry failed: the case, the customer and its subscription are suspended and
/// "Service suspended" goes, in the caller's transaction.
async fn suspend(
    conn: &mut PgConnection,
    case: &DunningRow,
    now: DateTime<Utc>,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE dunning_attempts SET status = 'suspended', suspended_at = $2, updated_at = $2 \
         WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(&case.invoice_id)
    .bind(now)
    .execute(&mut *conn)
    .await?;
    customers::suspend(&mut *conn, &case.customer_id, now).await?;
    settle_statuses(&mut *conn, &case.customer_id, false, now).await?;
    metrics::counter!(names::DUNNING_SUSPENSIONS_TOTAL).increment(1);
    if let Some((contact, _)) = customers::dunning_contact(&mut *conn, &case.customer_id).await? {
        events::enqueue_once(
            &mut *conn,
            "email.subscription_suspended",
            &json!({
                "to": contact.email,
                "customer_id": case.customer_id,
                "name": contact.name,
                "invoice_id": case.invoice_id,
                "amount_due_cents": case.amount_due_cents,
                "currency": case.currency,
                "update_payment_url": case.update_payment_url.as_deref().unwrap_or(DEFAULT_UPDATE_PAYMENT_URL),
            }),
            &format!("dunning:{}:subscription_suspended", case.invoice_id),
            now,
        )
        .await?;
    }
    Ok(())
}

/// Closes the open cases of customers exempted since they opened (resolution `exempt`),
/// each with its statuses settled. Returns how many closed.
pub async fn close_exempt_cases(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<u64, BillingError> {
    let invoices: Vec<(String, String)> = sqlx::query_as(
        "SELECT d.invoice_id, d.customer_id FROM dunning_attempts d \
         JOIN customers c ON c.id = d.customer_id \
         WHERE d.attempt_number = 0 AND d.resolved_at IS NULL AND c.dunning_exempt",
    )
    .fetch_all(&mut *conn)
    .await?;
    let mut closed = 0;
    for (invoice_id, customer_id) in invoices {
        use sqlx::Connection;
        let mut tx = conn.begin().await?;
        customers::lock(&mut *tx, &customer_id).await?;
        if let Some(case) = case_for_update(&mut *tx, &invoice_id).await?
            && case.resolved_at.is_none()
        {
            close_case(&mut tx, &case, Resolution::Exempt, None, None, None, now).await?;
            closed += 1;
        }
        tx.commit().await?;
    }
    Ok(closed)
}

/// Open cases right now: (retrying, suspended), for the gauge.
pub async fn open_cases(db: impl PgExecutor<'_>) -> Result<(i64, i64), BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE status <> 'suspended'), \
                count(*) FILTER (WHERE status = 'suspended') \
         FROM dunning_attempts WHERE attempt_number = 0 AND resolved_at IS NULL",
    )
    .fetch_one(db)
    .await?)
}

/// Every row of `customer_id`'s cases, newest first (the guide's "check dunning status" and
/// "dunning history" order), at most `limit`.
pub async fn history(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    limit: i64,
) -> Result<Vec<DunningRow>, BillingError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM dunning_attempts WHERE customer_id = $1 \
         ORDER BY created_at DESC, attempt_number DESC, id DESC LIMIT $2"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(customer_id)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// Retries due by `due_by` that no run has made yet, soonest due first, at most `limit`: the
/// guide's "check pending retries" (Troubleshooting, "Dunning not processing retries":
/// `status IN ('pending', 'retrying') AND next_retry_at <= NOW()`), with `due_by` for `NOW()`.
pub async fn due_retries(
    db: impl PgExecutor<'_>,
    due_by: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<DunningRow>, BillingError> {
    let sql = format!(
        "SELECT {ROW_COLUMNS} FROM dunning_attempts \
         WHERE status IN ('pending', 'retrying') AND next_retry_at <= $1 \
         ORDER BY next_retry_at ASC, id LIMIT $2"
    );
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(due_by)
        .bind(limit)
        .fetch_all(db)
        .await?)
}

/// How many retries the guide's pending-retries query finds due by `due_by`, and the
/// earliest due time among them (`None` when there is none).
pub async fn due_retries_count(
    db: impl PgExecutor<'_>,
    due_by: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*), min(next_retry_at) FROM dunning_attempts \
         WHERE status IN ('pending', 'retrying') AND next_retry_at <= $1",
    )
    .bind(due_by)
    .fetch_one(db)
    .await?)
}

/// Retries a `dunning_retries` run should have made by now (`apexctl doctor`'s
/// `dunning.retries`), counted with [`claim_next`]'s conditions (a retry of an open case of a
/// customer not exempt): `pending` ones due by `cutoff` (the job's last slot), and `retrying`
/// ones whose run died ([`RETRY_LEASE`] passed at `now`). Returns how many and the earliest
/// `next_retry_at` among them (`None` when there is none). Unlike the guide's query
/// ([`due_retries_count`]), a retry a live run holds, one of a closed case and one of an
/// exempt customer are not counted: no run would make them.
pub async fn overdue_retries_count(
    db: impl PgExecutor<'_>,
    cutoff: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*), min(a.next_retry_at) FROM dunning_attempts a \
         JOIN dunning_attempts c ON c.invoice_id = a.invoice_id AND c.attempt_number = 0 \
         JOIN customers cu ON cu.id = a.customer_id \
         WHERE a.attempt_number > 0 AND c.resolved_at IS NULL AND NOT cu.dunning_exempt \
           AND ((a.status = 'pending' AND a.next_retry_at <= $1) \
                OR (a.status = 'retrying' AND a.attempted_at < $2 - $3::interval))",
    )
    .bind(cutoff)
    .bind(now)
    .bind(format!("{} seconds", RETRY_LEASE.num_seconds()))
    .fetch_one(db)
    .await?)
}

/// Closes `invoice_id`'s open case by hand (`apexctl dunning close`), as `by` with `note`:
/// pending retries are canceled, and the customer is reactivated if this case alone
/// suspended it. `NotFound` when the invoice has no case; `Invalid` when it is closed.
pub async fn close_by_operator(
    conn: &mut PgConnection,
    invoice_id: &str,
    by: &str,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Settled, BillingError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let not_found = || BillingError::NotFound {
        what: format!("dunning case of invoice {invoice_id}"),
    };
    let customer = case_row(&mut *tx, invoice_id)
        .await?
        .ok_or_else(not_found)?;
    customers::lock(&mut *tx, &customer.customer_id).await?;
    let case = case_for_update(&mut *tx, invoice_id)
        .await?
        .ok_or_else(not_found)?;
    if let Some(resolution) = &case.resolution {
        return Err(BillingError::Invalid(format!(
            "the dunning case of invoice {invoice_id} is closed already ({resolution})"
        )));
    }
    let settled = close_case(
        &mut tx,
        &case,
        Resolution::Closed,
        None,
        None,
        Some((by, note)),
        now,
    )
    .await?;
    tx.commit().await?;
    Ok(settled)
}

/// What a manual reactivation did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Reactivation {
    /// Invoices whose suspending case it closed.
    pub cases_closed: Vec<String>,
    /// The customer left `suspended`.
    pub customer_reactivated: bool,
    /// The subscription's status afterwards.
    pub subscription_status: Option<String>,
}

/// The guide's `reactivateSubscription(customer, subscription)`: restores service to a
/// customer suspended by dunning, as `by` with `note`. Every case that suspends it closes as
/// `reactivated` (recording who and why; the invoices stay unpaid in Stripe), the customer
/// is `active` again (its keys work within a second, no new key), and the subscription is
/// `past_due` while another case is open, else `active`. `subscription` must be the
/// customer's live subscription (our id or Stripe's `sub_...`): `Invalid` otherwise.
pub async fn reactivate_by_operator(
    conn: &mut PgConnection,
    customer_id: &str,
    subscription: &str,
    by: &str,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Reactivation, BillingError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    customers::lock(&mut *tx, customer_id).await?;
    let Some((sub_id, _, stripe_sub)) = subscriptions::live(&mut *tx, customer_id).await? else {
        return Err(BillingError::Invalid(format!(
            "customer {customer_id} has no live subscription"
        )));
    };
    if subscription != sub_id.to_string() && stripe_sub.as_deref() != Some(subscription) {
        return Err(BillingError::Invalid(format!(
            "{subscription} is not the live subscription of {customer_id} (that is {sub_id}{})",
            stripe_sub
                .map(|s| format!(", {s} in Stripe"))
                .unwrap_or_default()
        )));
    }
    let suspending: Vec<String> = sqlx::query_scalar(
        "SELECT invoice_id FROM dunning_attempts WHERE customer_id = $1 AND attempt_number = 0 \
             AND resolved_at IS NULL AND status = 'suspended' ORDER BY id",
    )
    .bind(customer_id)
    .fetch_all(&mut *tx)
    .await?;
    let mut reactivation = Reactivation::default();
    for invoice_id in suspending {
        if let Some(case) = case_for_update(&mut *tx, &invoice_id).await?
            && case.resolved_at.is_none()
        {
            let settled = close_case(
                &mut tx,
                &case,
                Resolution::Reactivated,
                None,
                None,
                Some((by, note)),
                now,
            )
            .await?;
            reactivation.customer_reactivated |= settled.customer_reactivated;
            reactivation.cases_closed.push(invoice_id);
        }
    }
    // A suspension no case explains (an older one) is lifted too: the operator asked.
    if customers::reactivate(&mut *tx, customer_id, now).await? {
        reactivation.customer_reactivated = true;
        metrics::counter!(names::DUNNING_REACTIVATIONS_TOTAL, "cause" => Resolution::Reactivated.as_str())
            .increment(1);
    }
    settle_statuses(&mut tx, customer_id, false, now).await?;
    if !reactivation.customer_reactivated && reactivation.cases_closed.is_empty() {
        // Nothing to restore: no audit record of a reactivation that did not happen.
        reactivation.subscription_status = subscriptions::live(&mut *tx, customer_id)
            .await?
            .map(|s| s.1);
        tx.commit().await?;
        return Ok(reactivation);
    }
    events::enqueue(
        &mut *tx,
        "audit.dunning_reactivated",
        &json!({
            "customer_id": customer_id,
            "subscription_id": sub_id,
            "by": by,
            "reason": note,
            "cases_closed": reactivation.cases_closed,
        }),
        now,
    )
    .await?;
    reactivation.subscription_status = subscriptions::live(&mut *tx, customer_id)
        .await?
        .map(|s| s.1);
    tx.commit().await?;
    Ok(reactivation)
}

/// Exempts `customer_id` from dunning (or ends the exemption), as `by` with `note`; an
/// exemption closes its open cases at once (resolution `exempt`, suspensions lifted).
/// Returns the invoices whose cases closed. `NotFound` for an unknown customer.
pub async fn set_exempt(
    conn: &mut PgConnection,
    customer_id: &str,
    exempt: bool,
    by: &str,
    note: Option<&str>,
    now: DateTime<Utc>,
) -> Result<Vec<String>, BillingError> {
    use sqlx::Connection;
    let mut tx = conn.begin().await?;
    let reason = note.unwrap_or("no reason given");
    let recorded = if exempt {
        format!("{by}: {reason}")
    } else {
        format!("{by} ended the exemption: {reason}")
    };
    if !customers::set_dunning_exempt(&mut *tx, customer_id, exempt, Some(&recorded)).await? {
        return Err(BillingError::NotFound {
            what: format!("customer {customer_id}"),
        });
    }
    let mut closed = Vec::new();
    if exempt {
        let open: Vec<String> = sqlx::query_scalar(
            "SELECT invoice_id FROM dunning_attempts WHERE customer_id = $1 \
                 AND attempt_number = 0 AND resolved_at IS NULL ORDER BY id",
        )
        .bind(customer_id)
        .fetch_all(&mut *tx)
        .await?;
        for invoice_id in open {
            if let Some(case) = case_for_update(&mut *tx, &invoice_id).await?
                && case.resolved_at.is_none()
            {
                close_case(
                    &mut tx,
                    &case,
                    Resolution::Exempt,
                    None,
                    None,
                    Some((by, note)),
                    now,
                )
                .await?;
                closed.push(invoice_id);
            }
        }
    }
    tx.commit().await?;
    Ok(closed)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn the_guides_timeline_is_days_3_4_and_7_at_midnight_utc() {
        let policy = Policy::default();
        assert_eq!(policy.attempts(), 3);
        // A failure late on Day 0 still counts calendar days in UTC.
        let failed = at("2026-03-10T23:59:00Z");
        assert_eq!(policy.due_at(failed, 1), Some(at("2026-03-13T00:00:00Z")));
        assert_eq!(policy.due_at(failed, 2), Some(at("2026-03-14T00:00:00Z")));
        assert_eq!(policy.due_at(failed, 3), Some(at("2026-03-17T00:00:00Z")));
        assert_eq!(policy.due_at(failed, 4), None);
        assert_eq!(policy.due_at(failed, 0), None);
        assert_eq!(
            policy
                .retry_dates(failed)
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>(),
            ["2026-03-13", "2026-03-14", "2026-03-17"]
        );
    }

    #[test]
    fn schedules_are_checked_when_read() {
        let days = |raw: &str| {
            Policy::from_env(&EnvSource::from_pairs([(RETRY_DAYS_VAR, raw)]))
                .map(|p| p.retry_days().to_vec())
        };
        assert_eq!(days("3,4,7").unwrap(), [3, 4, 7]);
        assert_eq!(days(" 1, 2 ").unwrap(), [1, 2]);
        assert_eq!(days("5").unwrap(), [5]);
        for bad in [
            "3,3,7", "7,4", "0,1", "1,2,3,4", "3;4", "x", "61", "-1", ",",
        ] {
            let error = days(bad).unwrap_err().to_string();
            assert!(error.contains(RETRY_DAYS_VAR), "{bad}: {error}");
        }
        let postpone = |secs: &str| {
            Policy::from_env(&EnvSource::from_pairs([(POSTPONE_VAR, secs)])).map(|p| p.postpone())
        };
        assert_eq!(postpone("600").unwrap(), Duration::minutes(10));
        for bad in ["0", "59", "86401", "soon"] {
            assert!(
                postpone(bad)
                    .unwrap_err()
                    .to_string()
                    .contains(POSTPONE_VAR),
                "{bad}"
            );
        }
        assert_eq!(
            Policy::from_env(&EnvSource::from_pairs([])).unwrap(),
            Policy::default()
        );
    }

    #[test]
    fn idempotency_keys_name_the_invoice_and_the_attempt() {
        let claim = Claim {
            invoice_id: "in_1".into(),
            attempt_number: 2,
            customer_id: "cus_x".into(),
            attempted_at: Utc::now(),
            postponements: 1,
        };
        assert_eq!(claim.idempotency_key(), "apex-dunning-in_1-2");
    }
}
