//! What was emailed: `email_log` (one row per email sent or suppressed, with the provider's
//! message id and, from Resend's webhooks, what became of it), the opt-outs of
//! non-transactional email (`email_opt_outs`) and the addresses not to write to again
//! (`email_suppressions`); the caps count its rows. Every query on those tables is here; the email queue
//! (`apex-notify`) composes them with the queue's own in [`crate::events`].

use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgExecutor;

use crate::error::BillingError;

/// How long the same email type to the same customer is refused after one was sent (the
/// guide's rule).
pub const DEDUP_WINDOW_HOURS: i64 = 24;

/// A row of `email_log`.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct LoggedEmail {
    /// Its id.
    pub id: i64,
    /// The customer, when the email was about one.
    pub customer_id: Option<String>,
    /// `welcome`, `trial_ending_7d`, ...
    pub email_type: String,
    /// The address.
    pub recipient: String,
    /// The subject.
    pub subject: String,
    /// `resend`, `smtp` or `file`.
    pub provider: String,
    /// The provider's id of the message.
    pub provider_message_id: Option<String>,
    /// The `events` row it came from.
    pub event_id: Option<i64>,
    /// `sent` or `suppressed`.
    pub status: String,
    /// `delivered`, `bounced` or `complained`, once the provider said.
    pub delivery_status: Option<String>,
    /// When it was sent.
    pub sent_at: DateTime<Utc>,
}

/// The guide's duplicate check: was `email_type` sent to `customer_id` in the 24 hours
/// before `now`? (`SELECT id FROM email_log WHERE customer_id = ... AND email_type = ... AND
/// sent_at >= NOW() - INTERVAL '24 hours'`, on the injected clock; suppressed rows do not
/// count, nothing went.)
pub async fn sent_recently(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    email_type: &str,
    now: DateTime<Utc>,
) -> Result<bool, BillingError> {
    let id: Option<i64> = sqlx::query_scalar(
        "SELECT id FROM email_log \
         WHERE customer_id = $1 AND email_type = $2 AND status = 'sent' \
           AND sent_at >= $3 - make_interval(hours => $4) \
         LIMIT 1",
    )
    .bind(customer_id)
    .bind(email_type)
    .bind(now)
    .bind(DEDUP_WINDOW_HOURS as i32)
    .fetch_optional(db)
    .await?;
    Ok(id.is_some())
}

/// What to record of one email.
#[derive(Debug, Clone)]
pub struct NewLogEntry<'a> {
    /// The customer, if any.
    pub customer_id: Option<&'a str>,
    /// The email type.
    pub email_type: &'a str,
    /// The address.
    pub recipient: &'a str,
    /// The subject.
    pub subject: &'a str,
    /// The provider's name.
    pub provider: &'a str,
    /// The provider's id of the message.
    pub provider_message_id: Option<&'a str>,
    /// The event.
    pub event_id: i64,
    /// `sent` or `suppressed`.
    pub status: &'a str,
    /// The key the provider was given.
    pub idempotency_key: &'a str,
    /// When.
    pub at: DateTime<Utc>,
}

/// Records an email; an event is logged once: a second record of it changes nothing, except
/// that a send replaces a `suppressed` row (a revived event that went this time). Returns
/// whether a row was written.
pub async fn record(
    db: impl PgExecutor<'_>,
    entry: &NewLogEntry<'_>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "INSERT INTO email_log (customer_id, email_type, recipient, subject, provider, \
             provider_message_id, event_id, status, idempotency_key, sent_at) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) \
         ON CONFLICT (event_id) WHERE event_id IS NOT NULL DO UPDATE SET \
             customer_id = EXCLUDED.customer_id, email_type = EXCLUDED.email_type, \
             recipient = EXCLUDED.recipient, subject = EXCLUDED.subject, \
             provider = EXCLUDED.provider, provider_message_id = EXCLUDED.provider_message_id, \
             status = EXCLUDED.status, idempotency_key = EXCLUDED.idempotency_key, \
             sent_at = EXCLUDED.sent_at \
         WHERE email_log.status = 'suppressed' AND EXCLUDED.status = 'sent'",
    )
    .bind(entry.customer_id)
    .bind(entry.email_type)
    .bind(entry.recipient)
    .bind(entry.subject)
    .bind(entry.provider)
    .bind(entry.provider_message_id)
    .bind(entry.event_id)
    .bind(entry.status)
    .bind(entry.idempotency_key)
    .bind(entry.at)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The newest `limit` rows, newest first (`apexctl email recent`).
pub async fn recent(db: impl PgExecutor<'_>, limit: i64) -> Result<Vec<LoggedEmail>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, customer_id, email_type, recipient, subject, provider, provider_message_id, \
             event_id, status, delivery_status, sent_at \
         FROM email_log ORDER BY sent_at DESC, id DESC LIMIT $1",
    )
    .bind(limit)
    .fetch_all(db)
    .await?)
}

/// Whether `customer_id` opted out of `category` (`usage_alert`, `monthly_summary`,
/// `sdk_update`).
pub async fn opted_out(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    category: &str,
) -> Result<bool, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM email_opt_outs WHERE customer_id = $1 AND category = $2)",
    )
    .bind(customer_id)
    .bind(category)
    .fetch_one(db)
    .await?)
}

/// Records (or, with `opt_out` false, removes) `customer_id`'s opt-out of `category`; an
/// unknown customer changes nothing. `Invalid` for a category that cannot be refused.
pub async fn set_opt_out(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    category: &str,
    opt_out: bool,
) -> Result<(), BillingError> {
    if !["usage_alert", "monthly_summary", "sdk_update"].contains(&category) {
        return Err(BillingError::Invalid(format!(
            "{category:?} cannot be refused: only usage_alert, monthly_summary and sdk_update"
        )));
    }
    if opt_out {
        sqlx::query(
            "INSERT INTO email_opt_outs (customer_id, category) SELECT id, $2 FROM customers \
             WHERE id = $1 ON CONFLICT DO NOTHING",
        )
    } else {
        sqlx::query("DELETE FROM email_opt_outs WHERE customer_id = $1 AND category = $2")
    }
    .bind(customer_id)
    .bind(category)
    .execute(db)
    .await?;
    Ok(())
}

/// Why `address` must not receive optional email (`bounced`, `complained`), if it must not.
pub async fn suppression(
    db: impl PgExecutor<'_>,
    address: &str,
) -> Result<Option<String>, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT reason FROM email_suppressions WHERE address = $1")
            .bind(address.to_lowercase())
            .fetch_optional(db)
            .await?,
    )
}

/// Emails sent through `provider` on the UTC day of `now`, and in its UTC month (the caps),
/// counted from `email_log`.
pub async fn sent_counts(
    db: impl PgExecutor<'_>,
    provider: &str,
    now: DateTime<Utc>,
) -> Result<(i64, i64), BillingError> {
    let day = now.date_naive();
    let month_start = day - Duration::days(i64::from(chrono::Datelike::day(&day)) - 1);
    let midnight = |d: NaiveDate| d.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc();
    Ok(sqlx::query_as(
        "SELECT count(*) FILTER (WHERE sent_at >= $3), count(*) FROM email_log \
         WHERE provider = $1 AND status = 'sent' AND sent_at >= $2",
    )
    .bind(provider)
    .bind(midnight(month_start))
    .bind(midnight(day))
    .fetch_one(db)
    .await?)
}

/// Takes a transaction lock on (customer, email type): while the holder sends, no other
/// worker sends that type to that customer (the 24-hour rule, checked again under it, holds
/// across workers). Released at the transaction's end.
pub async fn lock_recipient_type(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    email_type: &str,
) -> Result<(), BillingError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended($1 || '/' || $2, 7))")
        .bind(customer_id)
        .bind(email_type)
        .execute(db)
        .await?;
    Ok(())
}

/// Of `addresses` (lowercased), those suppressed: one query for a whole batch.
pub async fn suppressed_among(
    db: impl PgExecutor<'_>,
    addresses: &[String],
) -> Result<std::collections::HashSet<String>, BillingError> {
    let rows: Vec<String> =
        sqlx::query_scalar("SELECT address FROM email_suppressions WHERE address = ANY($1)")
            .bind(addresses)
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().collect())
}

/// Of `customers`, the (customer, category) opt-outs: one query for a whole batch.
pub async fn opt_outs_among(
    db: impl PgExecutor<'_>,
    customers: &[String],
) -> Result<std::collections::HashSet<(String, String)>, BillingError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT customer_id, category FROM email_opt_outs WHERE customer_id = ANY($1)",
    )
    .bind(customers)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Of `customers`, the (customer, email type) pairs sent in the 24 hours before `now` (the
/// guide's duplicate rule, [`sent_recently`], for a whole batch in one query).
pub async fn sent_recently_among(
    db: impl PgExecutor<'_>,
    customers: &[String],
    now: DateTime<Utc>,
) -> Result<std::collections::HashSet<(String, String)>, BillingError> {
    let rows: Vec<(String, String)> = sqlx::query_as(
        "SELECT DISTINCT customer_id, email_type FROM email_log \
         WHERE customer_id = ANY($1) AND status = 'sent' \
           AND sent_at >= $2 - make_interval(hours => $3)",
    )
    .bind(customers)
    .bind(now)
    .bind(DEDUP_WINDOW_HOURS as i32)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}
