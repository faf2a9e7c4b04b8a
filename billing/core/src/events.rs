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
