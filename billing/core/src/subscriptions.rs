//! Subscriptions: a customer's plan and where it stands (`trialing`, `active`, `past_due`,
//! `suspended`, `canceled`), one live subscription per customer. Sign-up creates it, Stripe's
//! webhooks move its status, and the Stripe mapping records its Stripe ids. Every query on
//! the `subscriptions` table is here and takes an executor, so a job composes them.

use chrono::{DateTime, Utc};
use sqlx::PgExecutor;

use crate::error::BillingError;

/// Creates `customer_id`'s subscription to `plan_id` at `now`: `trialing` until `trial_end`
/// when there is one, else `active`. Returns its id and the trial end as stored (Postgres
/// keeps microseconds; callers must see what is stored).
pub async fn create(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    plan_id: &str,
    trial_end: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
) -> Result<(i64, Option<DateTime<Utc>>), BillingError> {
    Ok(sqlx::query_as(
        "INSERT INTO subscriptions (customer_id, plan_id, status, trial_end, created_at, updated_at) \
         VALUES ($1, $2, $3, $4, $5, $5) RETURNING id, trial_end",
    )
    .bind(customer_id)
    .bind(plan_id)
    .bind(if trial_end.is_some() { "trialing" } else { "active" })
    .bind(trial_end)
    .bind(now)
    .fetch_one(db)
    .await?)
}

/// Moves the subscription Stripe knows as `stripe_subscription_id` to `status` (one of the
/// table's statuses), as a Stripe event says. A canceled subscription stays canceled, and a
/// suspended one is not set back to `past_due` (dunning lifts a suspension on payment).
/// Returns how many subscriptions changed (0 or 1).
pub async fn apply_stripe_status(
    db: impl PgExecutor<'_>,
    stripe_subscription_id: &str,
    status: &str,
) -> Result<u64, BillingError> {
    Ok(sqlx::query(
        "UPDATE subscriptions SET status = $2, updated_at = now(), \
             canceled_at = CASE WHEN $2 = 'canceled' THEN coalesce(canceled_at, now()) ELSE canceled_at END \
         WHERE stripe_subscription_id = $1 AND status <> 'canceled' \
           AND NOT (status = 'suspended' AND $2 = 'past_due')",
    )
    .bind(stripe_subscription_id)
    .bind(status)
    .execute(db)
    .await?
    .rows_affected())
}

/// Records the Stripe subscription and customer of subscription `id`.
pub async fn set_stripe_ids(
    db: impl PgExecutor<'_>,
    id: i64,
    stripe_subscription_id: &str,
    stripe_customer_id: &str,
) -> Result<(), BillingError> {
    sqlx::query(
        "UPDATE subscriptions SET stripe_subscription_id = $2, stripe_customer_id = $3, \
             updated_at = now() \
         WHERE id = $1",
    )
    .bind(id)
    .bind(stripe_subscription_id)
    .bind(stripe_customer_id)
    .execute(db)
    .await?;
    Ok(())
}
