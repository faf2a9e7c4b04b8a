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

/// How a Stripe event names the subscription it moves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StripeTarget<'a> {
    /// The subscription Stripe knows as this id (`sub_...`).
    Subscription(&'a str),
    /// The live (not canceled) subscription of the customer Stripe knows as this id
    /// (`cus_...`, matched on `customers.stripe_customer_id`): what an invoice that names no
    /// subscription, such as our own monthly one-off invoices, is about.
    Customer(&'a str),
}

/// Moves the subscription `target` names to `status` (one of the table's statuses), as a
/// Stripe event created at `event_at` says.
///
/// Stripe does not deliver events in order, so `stripe_event_at` keeps the `created` time of
/// the latest event applied (the greatest seen) and:
/// - an event strictly older than it changes nothing, except a cancellation: Stripe never
///   revives a canceled subscription, so a late `canceled` is still the truth;
/// - on a tie (the same second) the event applies, except that `past_due` never replaces
///   `active` (a failure and a success in the same second mean the retry succeeded);
/// - an event without a time (`event_at` None) applies and leaves `stripe_event_at` alone.
///
/// And as before: a canceled subscription stays canceled, and a suspended one is not set
/// back to `past_due` (dunning lifts a suspension on payment).
///
/// Returns how many subscriptions the event moved (0 or 1; one with the status it already
/// had counts).
pub async fn apply_stripe_status(
    db: impl PgExecutor<'_>,
    target: StripeTarget<'_>,
    status: &str,
    event_at: Option<DateTime<Utc>>,
) -> Result<u64, BillingError> {
    // The two targets differ only in how the row is found; one macro holds the rules so the
    // two statements cannot drift apart. At most one live subscription per customer (a
    // unique index), so either finds at most one row.
    macro_rules! update_where {
        ($by:literal) => {
            concat!(
                "UPDATE subscriptions SET status = $2, updated_at = now(), \
                     canceled_at = CASE WHEN $2 = 'canceled' THEN coalesce(canceled_at, now()) \
                                   ELSE canceled_at END, \
                     stripe_event_at = greatest(stripe_event_at, $3) \
                 WHERE status <> 'canceled' \
                   AND NOT (status = 'suspended' AND $2 = 'past_due') \
                   AND ($3::timestamptz IS NULL OR stripe_event_at IS NULL \
                        OR stripe_event_at <= $3 OR $2 = 'canceled') \
                   AND NOT coalesce(stripe_event_at = $3 AND status = 'active' AND $2 = 'past_due', false) \
                   AND ",
                $by
            )
        };
    }
    let (sql, id) = match target {
        StripeTarget::Subscription(id) => (update_where!("stripe_subscription_id = $1"), id),
        StripeTarget::Customer(id) => (
            update_where!("customer_id = (SELECT id FROM customers WHERE stripe_customer_id = $1)"),
            id,
        ),
    };
    Ok(sqlx::query(sql)
        .bind(id)
        .bind(status)
        .bind(event_at)
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
