//! Trial reminders: the guide's daily 09:00 Trial Reminders, `trial_ending_7d|3d|1d` once per
//! trial end, and what becomes of a trial that ends without Stripe telling us (issue 17).
//! The `trial_reminders` cron job calls [`send_trial_reminders`]; `apexctl trials upcoming`
//! shows [`upcoming`].
//!
//! # Who gets a reminder
//! A subscription that is `trialing`, has a `trial_end` still ahead, and whose customer is
//! `active`. A converted (`active`), `past_due`, `suspended` or `canceled` subscription gets
//! none, nor does a customer whose own status is `suspended` or `canceled`; a trial without a
//! `trial_end` gets none either.
//!
//! # When (UTC calendar days)
//! The `N`-day reminder (`N` = 7, 3, 1) is due from 00:00 UTC of the day `N` days before the
//! trial end's date ([`window_opens`]) until the trial ends: the 09:00 run of that day sends
//! it, whatever the time of day the trial ends. A run sends, of the reminders whose window
//! holds `now`, the one with the smallest `N` ([`due_reminder`]), unless it went already. So
//! a run that was missed (the process was down) is caught up late rather than never — a run
//! on the 6th day before the end sends the 7-day one, saying "6 days" — but a reminder is
//! never sent once a nearer one is due (no 7-day email after the 3-day one, nor on the same
//! day), and none once the trial has ended. `days_left` in the email is the number of
//! calendar days from the run's date to the trial end's date (0: "today").
//!
//! # Short trials
//! A trial shorter than `N` days (from the subscription's `created_at` to its `trial_end`)
//! skips the `N`-day reminder: a 2-day trial gets only the 1-day one, a 5-day trial the 3-day
//! and 1-day ones. A trial of exactly `N` days gets it (at the first run after sign-up).
//!
//! # Once per trial end
//! Each reminder is an `events` row with the dedup key [`dedup_key`]
//! (`trial:<customer>:<trial end date>:trial_ending_<N>d`), so it is enqueued once however
//! often the job runs. A trial whose end moves to another day (extended) gets the reminders
//! of its new end, by the same rules; an end moved within the same day changes nothing.
//! (The email queue's own rule, the same type to a customer at most once in 24 hours, still
//! holds: an end moved so that a reminder of the new end falls within a day of the same
//! reminder of the old one is not sent twice.)
//!
//! # A trial that ends without Stripe telling us
//! A subscription mapped to Stripe (`stripe_subscription_id` set) is moved by Stripe's
//! `customer.subscription.updated` when its trial ends; this job leaves it alone. One never
//! mapped to Stripe (`stripe_subscription_id IS NULL`) would stay `trialing` forever. The
//! rule: once its `trial_end` has passed, the same run moves it to `active` (of an `active`
//! customer): the plan goes on without a card, as the Starter plan does, and the monthly
//! invoice bills it like any active subscription once the customer is mapped (the Stripe
//! mapping then creates its Stripe subscription without a trial). No email goes with it: the
//! reminders said when the trial ends. The run counts them in [`TrialReminderSummary`].
//!
//! # One transaction
//! A run reads the candidates in one query (locking their subscription rows, so two runs at
//! once take turns and count what each enqueued), reads which reminders of theirs exist in a
//! second, enqueues the due ones and moves the ended trials, and commits it all at once. The
//! reminders enqueued are counted in `apex_billing_trial_reminders_total{days}` after the
//! commit.

use std::collections::{HashMap, HashSet};

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::{events, names};

/// The reminders, days before the trial's end, farthest first.
pub const REMINDER_DAYS: [u8; 3] = [7, 3, 1];
/// Where the emails send the customer to choose a plan and add a card.
pub const UPGRADE_URL: &str = "https://dashboard.apexmediation.com/billing";
/// The most days `upcoming` looks ahead (trials are at most a year: see `customers`).
pub const MAX_UPCOMING_DAYS: i64 = 3660;

/// The email type of the `days`-day reminder: `trial_ending_7d`.
pub fn email_type(days: u8) -> String {
    format!("trial_ending_{days}d")
}

/// The dedup key of `customer_id`'s `days`-day reminder for a trial ending at `trial_end`:
/// `trial:<customer>:<trial end's UTC date>:trial_ending_<days>d`.
pub fn dedup_key(customer_id: &str, days: u8, trial_end: DateTime<Utc>) -> String {
    format!(
        "trial:{customer_id}:{}:{}",
        trial_end.date_naive(),
        email_type(days)
    )
}

/// When the `days`-day reminder of a trial ending at `trial_end` becomes due: 00:00 UTC of the
/// day `days` days before the end's date.
pub fn window_opens(trial_end: DateTime<Utc>, days: u8) -> DateTime<Utc> {
    start_of_day(trial_end.date_naive() - Duration::days(days.into()))
}

/// Whether a trial from `created_at` to `trial_end` is long enough for the `days`-day
/// reminder (not shorter than `days` days).
pub fn applies(created_at: DateTime<Utc>, trial_end: DateTime<Utc>, days: u8) -> bool {
    trial_end - created_at >= Duration::days(days.into())
}

/// The reminder a run at `now` sends for a trial from `created_at` to `trial_end` unless it
/// went already: of those that apply and whose window (from [`window_opens`] to `trial_end`)
/// holds `now`, the one with the smallest number of days. `None` when none is open or the
/// trial has ended.
pub fn due_reminder(
    created_at: DateTime<Utc>,
    trial_end: DateTime<Utc>,
    now: DateTime<Utc>,
) -> Option<u8> {
    if now >= trial_end {
        return None;
    }
    REMINDER_DAYS
        .into_iter()
        .rev()
        .filter(|&days| applies(created_at, trial_end, days))
        .find(|&days| window_opens(trial_end, days) <= now)
}

/// Calendar days (UTC) from `now`'s date to `trial_end`'s date: 0 when it ends today.
pub fn days_left(trial_end: DateTime<Utc>, now: DateTime<Utc>) -> i64 {
    (trial_end.date_naive() - now.date_naive()).num_days()
}

fn start_of_day(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// What a run of [`send_trial_reminders`] did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct TrialReminderSummary {
    /// `trial_ending_7d` emails enqueued.
    pub trial_ending_7d: u64,
    /// `trial_ending_3d` emails enqueued.
    pub trial_ending_3d: u64,
    /// `trial_ending_1d` emails enqueued.
    pub trial_ending_1d: u64,
    /// Trials never mapped to Stripe that had ended, moved to `active`.
    pub trials_ended: u64,
}

impl TrialReminderSummary {
    /// Reminders enqueued, all kinds.
    pub fn reminders(&self) -> u64 {
        self.trial_ending_7d + self.trial_ending_3d + self.trial_ending_1d
    }

    /// Reminders of `days` (7, 3 or 1) enqueued.
    pub fn of(&self, days: u8) -> u64 {
        match days {
            7 => self.trial_ending_7d,
            3 => self.trial_ending_3d,
            1 => self.trial_ending_1d,
            _ => 0,
        }
    }

    fn count(&mut self, days: u8) {
        match days {
            7 => self.trial_ending_7d += 1,
            3 => self.trial_ending_3d += 1,
            _ => self.trial_ending_1d += 1,
        }
    }
}

/// A trialing subscription with its customer.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Trial {
    subscription_id: i64,
    customer_id: String,
    name: String,
    email: String,
    customer_status: String,
    plan_id: String,
    created_at: DateTime<Utc>,
    trial_end: DateTime<Utc>,
    stripe_mapped: bool,
}

/// Trialing subscriptions (created by `now`: a run sees the world as of its time) whose
/// trial ends after `now` and before `before`, soonest first; of active customers only unless
/// `any_customer`; their rows locked with `lock`.
async fn trials(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    before: DateTime<Utc>,
    any_customer: bool,
    lock: bool,
) -> Result<Vec<Trial>, BillingError> {
    const SELECT: &str = "SELECT s.id AS subscription_id, c.id AS customer_id, c.name, c.email, \
             c.status AS customer_status, s.plan_id, s.created_at, s.trial_end, \
             s.stripe_subscription_id IS NOT NULL AS stripe_mapped \
         FROM subscriptions s JOIN customers c ON c.id = s.customer_id \
         WHERE s.status = 'trialing' AND s.trial_end > $1 AND s.trial_end < $2 \
           AND s.created_at <= $1 AND ($3 OR c.status = 'active') \
         ORDER BY s.trial_end, c.id";
    let sql = if lock {
        format!("{SELECT} FOR NO KEY UPDATE OF s")
    } else {
        SELECT.to_owned()
    };
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(sql))
        .bind(now)
        .bind(before)
        .bind(any_customer)
        .fetch_all(&mut *conn)
        .await?)
}

/// A reminder's event, as `upcoming` shows it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct ReminderRow {
    dedup_key: String,
    event_type: String,
    created_at: DateTime<Utc>,
    processed_at: Option<DateTime<Utc>>,
    error_message: Option<String>,
    last_error: Option<String>,
    log_status: Option<String>,
    sent_at: Option<DateTime<Utc>>,
}

/// The reminder events among `keys` (the `events` outbox, with what the queue logged).
async fn reminder_events(
    conn: &mut PgConnection,
    keys: &[String],
) -> Result<Vec<ReminderRow>, BillingError> {
    if keys.is_empty() {
        return Ok(Vec::new());
    }
    Ok(sqlx::query_as(
        "SELECT e.dedup_key, e.event_type, e.created_at, e.processed_at, e.error_message, \
             e.last_error, l.status AS log_status, l.sent_at \
         FROM events e LEFT JOIN email_log l ON l.event_id = e.id \
         WHERE e.dedup_key = ANY($1) \
         ORDER BY e.created_at, e.id",
    )
    .bind(keys)
    .fetch_all(&mut *conn)
    .await?)
}

fn keys_of(trials: &[Trial]) -> Vec<String> {
    trials
        .iter()
        .flat_map(|t| REMINDER_DAYS.map(|days| dedup_key(&t.customer_id, days, t.trial_end)))
        .collect()
}

/// The guide's Trial Reminders at `now` (the `trial_reminders` job, daily 09:00): enqueues
/// the due `email.trial_ending_7d|3d|1d` of every trial, each once per trial end, and moves
/// the ended trials never mapped to Stripe to `active` (see the module docs for the rules),
/// in one transaction (a savepoint when `conn` is already in one). Safe to run again: a
/// second run the same day enqueues nothing.
pub async fn send_trial_reminders(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
) -> Result<TrialReminderSummary, BillingError> {
    let mut summary = TrialReminderSummary::default();
    let mut tx = conn.begin().await?;
    // A 7-day reminder is due once the end's date is at most 7 days after today's, that is
    // the end is before 00:00 of the 8th day after today.
    let horizon = start_of_day(now.date_naive() + Duration::days(8));
    let candidates = trials(&mut tx, now, horizon, false, true).await?;
    let existing: HashSet<String> = reminder_events(&mut tx, &keys_of(&candidates))
        .await?
        .into_iter()
        .map(|row| row.dedup_key)
        .collect();
    for trial in &candidates {
        let Some(days) = due_reminder(trial.created_at, trial.trial_end, now) else {
            continue;
        };
        let key = dedup_key(&trial.customer_id, days, trial.trial_end);
        if existing.contains(&key) {
            continue;
        }
        events::enqueue_once(
            &mut *tx,
            &format!("email.{}", email_type(days)),
            &json!({
                "to": trial.email,
                "customer_id": trial.customer_id,
                "name": trial.name,
                "plan_type": trial.plan_id,
                "trial_end": trial.trial_end,
                "days_left": days_left(trial.trial_end, now),
                "upgrade_url": UPGRADE_URL,
            }),
            &key,
            now,
        )
        .await?;
        tracing::info!(
            customer = %trial.customer_id,
            trial_end = %trial.trial_end,
            email_type = %email_type(days),
            "trial reminder enqueued"
        );
        summary.count(days);
    }
    summary.trials_ended = end_unmapped_trials(&mut *tx, now).await?;
    tx.commit().await?;
    for (days, label) in [(7, "7"), (3, "3"), (1, "1")] {
        metrics::counter!(names::TRIAL_REMINDERS_TOTAL, "days" => label)
            .increment(summary.of(days));
    }
    Ok(summary)
}

/// Moves the trialing subscriptions of active customers never mapped to Stripe whose trial
/// ended by `now` to `active` (the module docs' rule). Returns how many.
///
/// This touches `subscriptions`, whose queries otherwise all live in
/// [`crate::subscriptions`]: for this rule of the trial job only.
async fn end_unmapped_trials(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<u64, BillingError> {
    let moved: Vec<String> = sqlx::query_scalar(
        "UPDATE subscriptions s SET status = 'active', updated_at = $1 \
         FROM customers c \
         WHERE c.id = s.customer_id AND c.status = 'active' \
           AND s.status = 'trialing' AND s.stripe_subscription_id IS NULL \
           AND s.trial_end IS NOT NULL AND s.trial_end <= $1 \
         RETURNING s.customer_id",
    )
    .bind(now)
    .fetch_all(db)
    .await?;
    for customer in &moved {
        tracing::info!(
            customer = %customer,
            "trial ended without a Stripe subscription: subscription now active"
        );
    }
    Ok(moved.len() as u64)
}

/// A reminder of a trial's current end that the job enqueued.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReminderSent {
    /// `trial_ending_7d`, `_3d`, `_1d`.
    pub email_type: String,
    /// When the job enqueued it.
    pub enqueued_at: DateTime<Utc>,
    /// `queued` (not sent yet), `sent`, `suppressed` (the address bounced or complained),
    /// `failed` (given up) or `not_sent` (the queue dropped it: `note` says why).
    pub status: String,
    /// When the email went (or was logged suppressed).
    pub sent_at: Option<DateTime<Utc>>,
    /// The queue's note or error, if any.
    pub note: Option<String>,
}

/// The reminder the job sends next for a trial.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NextReminder {
    /// `trial_ending_7d`, `_3d`, `_1d`.
    pub email_type: String,
    /// Due from (the 09:00 run of this day sends it); in the past: the next run sends it.
    pub due_from: DateTime<Utc>,
}

/// A trial ending soon, as `apexctl trials upcoming` shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UpcomingTrial {
    /// `cus_...`.
    pub customer_id: String,
    /// Customer name.
    pub name: String,
    /// Where the reminders go.
    pub email: String,
    /// `customers.status`: only `active` customers get reminders.
    pub customer_status: String,
    /// The subscription's id.
    pub subscription_id: i64,
    /// Its plan.
    pub plan_id: String,
    /// When the trial ends.
    pub trial_end: DateTime<Utc>,
    /// Calendar days (UTC) from today to the end's date: 0 when it ends today.
    pub days_left: i64,
    /// Whether the subscription is mapped to Stripe (else the job ends it itself).
    pub stripe_mapped: bool,
    /// The reminders of this trial end enqueued so far, oldest first.
    pub reminders: Vec<ReminderSent>,
    /// The reminder the job sends next, if any is left.
    pub next_reminder: Option<NextReminder>,
}

/// Trialing subscriptions whose trial ends after `now` and at most `days` calendar days after
/// today (UTC; 0: today), soonest first, of customers of any status, with the reminders of
/// their current trial end and the next one due. `days` is 0 to [`MAX_UPCOMING_DAYS`].
pub async fn upcoming(
    conn: &mut PgConnection,
    now: DateTime<Utc>,
    days: i64,
) -> Result<Vec<UpcomingTrial>, BillingError> {
    if !(0..=MAX_UPCOMING_DAYS).contains(&days) {
        return Err(BillingError::Invalid(format!(
            "days must be 0 to {MAX_UPCOMING_DAYS}, not {days}"
        )));
    }
    let before = start_of_day(now.date_naive() + Duration::days(days + 1));
    let found = trials(conn, now, before, true, false).await?;
    let mut by_key: HashMap<String, ReminderRow> = reminder_events(conn, &keys_of(&found))
        .await?
        .into_iter()
        .map(|row| (row.dedup_key.clone(), row))
        .collect();
    Ok(found
        .into_iter()
        .map(|t| {
            let mut reminders: Vec<ReminderSent> = REMINDER_DAYS
                .into_iter()
                .filter_map(|d| by_key.remove(&dedup_key(&t.customer_id, d, t.trial_end)))
                .map(|row| ReminderSent {
                    email_type: row
                        .event_type
                        .strip_prefix("email.")
                        .unwrap_or(&row.event_type)
                        .to_owned(),
                    enqueued_at: row.created_at,
                    status: match (&row.log_status, row.processed_at, &row.error_message) {
                        (Some(status), _, _) => status.clone(),
                        (None, None, _) => "queued".into(),
                        (None, Some(_), Some(_)) => "failed".into(),
                        (None, Some(_), None) => "not_sent".into(),
                    },
                    sent_at: row.sent_at,
                    note: row.error_message.or(row.last_error),
                })
                .collect();
            reminders.sort_by_key(|r| r.enqueued_at);
            let sent = |d: u8| reminders.iter().any(|r| r.email_type == email_type(d));
            let next_reminder = (t.customer_status == "active")
                .then(|| {
                    due_reminder(t.created_at, t.trial_end, now)
                        .filter(|&d| !sent(d))
                        .or_else(|| {
                            // The next window to open: the farthest reminder not yet open.
                            REMINDER_DAYS.into_iter().find(|&d| {
                                applies(t.created_at, t.trial_end, d)
                                    && window_opens(t.trial_end, d) > now
                            })
                        })
                })
                .flatten()
                .map(|d| NextReminder {
                    email_type: email_type(d),
                    due_from: window_opens(t.trial_end, d),
                });
            UpcomingTrial {
                days_left: days_left(t.trial_end, now),
                customer_id: t.customer_id,
                name: t.name,
                email: t.email,
                customer_status: t.customer_status,
                subscription_id: t.subscription_id,
                plan_id: t.plan_id,
                trial_end: t.trial_end,
                stripe_mapped: t.stripe_mapped,
                reminders,
                next_reminder,
            }
        })
        .collect())
}
