//! The `events` outbox: billing decisions record what must happen next (an email to send, as
//! `email.<type>` with its data) in the same transaction as the decision itself, and the
//! workers that carry them out (the email queue) read them from here. Nothing in this crate
//! sends anything.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::error::BillingError;

/// Records an event of `event_type` (the guide's names, e.g. `email.welcome`) with `data`,
/// created at `now`. Returns its id.
pub async fn enqueue(
    db: impl PgExecutor<'_>,
    event_type: &str,
    data: &serde_json::Value,
    now: DateTime<Utc>,
) -> Result<i64, BillingError> {
    Ok(sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(event_type)
    .bind(data)
    .bind(now)
    .fetch_one(db)
    .await?)
}

/// An `email.<type>` event claimed by a queue worker.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct ClaimedEvent {
    /// Its id.
    pub id: i64,
    /// `email.<type>`.
    pub event_type: String,
    /// Its data (`to`, `customer_id`, and what the template needs).
    pub data: serde_json::Value,
    /// Attempts made before this one.
    pub attempts: i32,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// The queue's order (0 payment and suspension, 1 welcome and trial, 2 the rest).
    pub priority: i16,
    /// The key the deciding job enqueued it under (`usage_alert:<customer>:<metric>:...`),
    /// if any: such an event was deduplicated by its decision, so the queue's 24-hour rule
    /// (one email of a type per customer a day) does not apply to it.
    pub dedup_key: Option<String>,
}

/// Claims up to `limit` due email events for `worker` until `lease_until`: not processed,
/// not deferred past `now`, not leased to a live worker; payment and suspension emails
/// first, then welcome and trial emails, then the rest, oldest first within each. Rows
/// another worker is claiming at the same moment are skipped (`FOR UPDATE SKIP LOCKED`), so
/// no event is handed to two workers; a worker that dies leaves its events to be claimed again
/// once the lease has passed. Returned in the queue's order.
pub async fn claim_email_batch(
    db: impl PgExecutor<'_>,
    worker: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
    limit: i64,
) -> Result<Vec<ClaimedEvent>, BillingError> {
    Ok(sqlx::query_as(
        "UPDATE events SET lease_until = $3, leased_by = $1 \
         WHERE id IN ( \
             SELECT id FROM events \
             WHERE processed_at IS NULL AND event_type LIKE 'email.%' \
               AND (next_attempt_at IS NULL OR next_attempt_at <= $2) \
               AND (lease_until IS NULL OR lease_until < $2) \
             ORDER BY priority, created_at, id \
             LIMIT $4 \
             FOR UPDATE SKIP LOCKED) \
         RETURNING id, event_type, data, attempts, created_at, priority, dedup_key",
    )
    .bind(worker)
    .bind(now)
    .bind(lease_until)
    .bind(limit)
    .fetch_all(db)
    .await
    .map(|mut batch: Vec<ClaimedEvent>| {
        // UPDATE ... RETURNING keeps no order: the batch is sorted as it was chosen.
        batch.sort_by_key(|e| (e.priority, e.created_at, e.id));
        batch
    })?)
}

/// Claims email event `id` alone for `worker` until `lease_until`, if it is due and nobody
/// holds it (`apexctl email send-test` sends its own event, not the queue).
pub async fn claim_email_event(
    db: impl PgExecutor<'_>,
    id: i64,
    worker: &str,
    now: DateTime<Utc>,
    lease_until: DateTime<Utc>,
) -> Result<Vec<ClaimedEvent>, BillingError> {
    Ok(sqlx::query_as(
        "UPDATE events SET lease_until = $4, leased_by = $2 \
         WHERE id = $1 AND processed_at IS NULL AND event_type LIKE 'email.%' \
           AND (next_attempt_at IS NULL OR next_attempt_at <= $3) \
           AND (lease_until IS NULL OR lease_until < $3) \
         RETURNING id, event_type, data, attempts, created_at, priority, dedup_key",
    )
    .bind(id)
    .bind(worker)
    .bind(now)
    .bind(lease_until)
    .fetch_all(db)
    .await?)
}

/// Renews `worker`'s claim on event `id` until `until`, just before a send, if it still holds
/// it (its lease has not run out, or has and nobody else took it). False: another worker has
/// the event, and this one must not send it. Inside the send's transaction it also holds the
/// event's row until the outcome is recorded.
pub async fn renew_email_lease(
    db: impl PgExecutor<'_>,
    id: i64,
    worker: &str,
    until: DateTime<Utc>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE events SET lease_until = $3 \
         WHERE id = $1 AND leased_by = $2 AND processed_at IS NULL",
    )
    .bind(id)
    .bind(worker)
    .bind(until)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Ends `worker`'s remaining claims: due again at `until` (a provider's `Retry-After`), or at
/// once.
pub async fn release_email_claims(
    db: impl PgExecutor<'_>,
    worker: &str,
    until: Option<DateTime<Utc>>,
) -> Result<u64, BillingError> {
    Ok(sqlx::query(
        "UPDATE events SET lease_until = NULL, leased_by = NULL, \
             next_attempt_at = coalesce($2, next_attempt_at) \
         WHERE leased_by = $1 AND processed_at IS NULL",
    )
    .bind(worker)
    .bind(until)
    .execute(db)
    .await?
    .rows_affected())
}

/// How a claimed event ends (or waits).
#[derive(Debug, Clone)]
pub enum Outcome<'a> {
    /// Done: sent, a duplicate, opted out or suppressed (`note` says which, in `last_error`
    /// for anything but a send).
    Done {
        /// Why it was not sent, when it was not.
        note: Option<&'a str>,
    },
    /// Not yet: due again at `at`; `error` is the transient failure, if any; `counted` says
    /// whether this was an attempt (a rate limit or a cap is not).
    Later {
        /// When to try again.
        at: DateTime<Utc>,
        /// The transient error.
        error: Option<&'a str>,
        /// Whether the attempt counts.
        counted: bool,
    },
    /// Given up: `processed_at` and `error_message` set.
    GivenUp {
        /// Why.
        error: &'a str,
    },
}

/// Ends worker `worker`'s claim on event `id` at `now` as `outcome`. Returns false when the
/// claim was lost (another worker took the event after the lease passed): nothing changes.
pub async fn finish_email(
    db: impl PgExecutor<'_>,
    id: i64,
    worker: &str,
    now: DateTime<Utc>,
    outcome: &Outcome<'_>,
) -> Result<bool, BillingError> {
    let (processed, next_at, last_error, error_message, counted) = match outcome {
        Outcome::Done { note } => (Some(now), None, *note, None, true),
        Outcome::Later { at, error, counted } => (None, Some(*at), *error, None, *counted),
        Outcome::GivenUp { error } => (Some(now), None, Some(*error), Some(*error), true),
    };
    Ok(sqlx::query(
        "UPDATE events SET processed_at = $3, next_attempt_at = $4, last_error = $5, \
             error_message = $6, attempts = attempts + CASE WHEN $7 THEN 1 ELSE 0 END, \
             lease_until = NULL, leased_by = NULL \
         WHERE id = $1 AND leased_by = $2 AND processed_at IS NULL",
    )
    .bind(id)
    .bind(worker)
    .bind(processed)
    .bind(next_at)
    .bind(last_error)
    .bind(error_message)
    .bind(counted)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Replaces event `id`'s data (the queue scrubs a plain API key a payload carried, keeping its
/// prefix only: the plain key must never be stored).
pub async fn set_data(
    db: impl PgExecutor<'_>,
    id: i64,
    data: &serde_json::Value,
) -> Result<(), BillingError> {
    sqlx::query("UPDATE events SET data = $2 WHERE id = $1")
        .bind(id)
        .bind(data)
        .execute(db)
        .await?;
    Ok(())
}

/// Records an event of `event_type` with `data` unless one with `dedup_key` exists (the same
/// decision enqueued twice is one row). Returns the event's id, new or existing.
pub async fn enqueue_once(
    db: impl PgExecutor<'_>,
    event_type: &str,
    data: &serde_json::Value,
    dedup_key: &str,
    now: DateTime<Utc>,
) -> Result<i64, BillingError> {
    // DO UPDATE (of nothing) rather than DO NOTHING: it returns the existing row's id even
    // when another session inserted it concurrently (a DO NOTHING plus a SELECT would not
    // see that row in this statement's snapshot).
    Ok(sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at, dedup_key) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (dedup_key) WHERE dedup_key IS NOT NULL \
         DO UPDATE SET dedup_key = EXCLUDED.dedup_key RETURNING id",
    )
    .bind(event_type)
    .bind(data)
    .bind(now)
    .bind(dedup_key)
    .fetch_one(db)
    .await?)
}

/// A queued email event, as the operations commands show it.
#[derive(Debug, Clone, serde::Serialize, sqlx::FromRow)]
pub struct QueuedEmail {
    /// Its id.
    pub id: i64,
    /// `email.<type>`.
    pub event_type: String,
    /// `data->>'to'`.
    pub recipient: Option<String>,
    /// When it was enqueued.
    pub created_at: DateTime<Utc>,
    /// Attempts so far.
    pub attempts: i32,
    /// Not before.
    pub next_attempt_at: Option<DateTime<Utc>>,
    /// The last transient error.
    pub last_error: Option<String>,
    /// Why it was given up.
    pub error_message: Option<String>,
    /// When it was processed.
    pub processed_at: Option<DateTime<Utc>>,
}

/// Email events not processed yet, in the order the queue takes them (the guide's "emails in
/// queue"), at most `limit`.
pub async fn pending_emails(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<QueuedEmail>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, data->>'to' AS recipient, created_at, attempts, next_attempt_at, \
             last_error, error_message, processed_at \
         FROM events WHERE event_type LIKE 'email.%' AND processed_at IS NULL \
         ORDER BY priority, created_at, id LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Email events given up, newest first (the guide's "failed emails"), at most `limit`.
pub async fn failed_emails(
    db: impl PgExecutor<'_>,
    limit: i64,
) -> Result<Vec<QueuedEmail>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, event_type, data->>'to' AS recipient, created_at, attempts, next_attempt_at, \
             last_error, error_message, processed_at \
         FROM events WHERE event_type LIKE 'email.%' AND processed_at IS NOT NULL \
           AND error_message IS NOT NULL \
         ORDER BY created_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Revives given-up email events (the guide's "reset to retry": `processed_at` and
/// `error_message` back to NULL; a trigger restarts their count of attempts): event `id`, or
/// every failed one. Returns how many.
pub async fn retry_failed_emails(
    db: impl PgExecutor<'_>,
    id: Option<i64>,
) -> Result<u64, BillingError> {
    Ok(sqlx::query(
        "UPDATE events SET processed_at = NULL, error_message = NULL \
         WHERE event_type LIKE 'email.%' AND processed_at IS NOT NULL \
           AND error_message IS NOT NULL AND ($1::bigint IS NULL OR id = $1)",
    )
    .bind(id)
    .execute(db)
    .await?
    .rows_affected())
}

/// Email events given up (the guide's "failed emails": processed with an `error_message`)
/// whose processing was at or after `since`, and not revived since.
pub async fn given_up_emails_count(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
) -> Result<i64, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type LIKE 'email.%' \
           AND processed_at >= $1 AND error_message IS NOT NULL",
    )
    .bind(since)
    .fetch_one(db)
    .await?)
}

/// How far the email queue is behind at `now` (`apexctl doctor`'s `email.queue`): the email
/// events a run at `now` would take (due, created by `now`, not held by a live worker's
/// lease), and how long, in seconds, the one waiting longest has been due (since its
/// `next_attempt_at` when a backoff, a daily cap or a `Retry-After` put it off, else since
/// it was created; 0 when none). [`email_queue_depth`] (the metrics gauge) counts by age
/// instead.
pub async fn email_queue_lag(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<(i64, f64), BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*), \
             coalesce(extract(epoch FROM $1 - min(coalesce(next_attempt_at, created_at))), 0)::float8 \
         FROM events WHERE processed_at IS NULL AND event_type LIKE 'email.%' \
           AND created_at <= $1 \
           AND (next_attempt_at IS NULL OR next_attempt_at <= $1) \
           AND (lease_until IS NULL OR lease_until < $1)",
    )
    .bind(now)
    .fetch_one(db)
    .await?)
}

/// Depth of the email queue: due events now, and the age in seconds of the oldest due one.
pub async fn email_queue_depth(
    db: impl PgExecutor<'_>,
    now: DateTime<Utc>,
) -> Result<(i64, f64), BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*), coalesce(extract(epoch FROM $1 - min(created_at)), 0)::float8 \
         FROM events WHERE processed_at IS NULL AND event_type LIKE 'email.%' \
           AND (next_attempt_at IS NULL OR next_attempt_at <= $1)",
    )
    .bind(now)
    .fetch_one(db)
    .await?)
}
