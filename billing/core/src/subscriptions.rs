//! Subscriptions: a customer's plan and where it stands (`trialing`, `active`, `past_due`,
//! `suspended`, `canceled`), one live subscription per customer. Sign-up creates it, Stripe's
//! webhooks move its status, and the Stripe mapping records its Stripe ids. Every query on
//! the `subscriptions` table is here and takes an executor, so a job composes them.

use chrono::{DateTime, Utc};
use serde::Serialize;
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
/// And: a canceled subscription stays canceled; a suspended one leaves `suspended` only for
/// `canceled` (only dunning's reactivation, which moves the customer too, lifts a
/// suspension: see [`crate::dunning`]); and Stripe's `active` does not replace `past_due`
/// while the customer has an open dunning case (our own invoices are one-off invoices, so
/// Stripe's subscription knows nothing of them and calls itself active).
///
/// Invoice events do not come here: [`crate::dunning`] decides what they do to the status.
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
                   AND NOT (status = 'suspended' AND $2 <> 'canceled') \
                   AND NOT ($2 = 'active' AND status = 'past_due' AND EXISTS ( \
                       SELECT 1 FROM dunning_attempts d WHERE d.customer_id = subscriptions.customer_id \
                         AND d.attempt_number = 0 AND d.resolved_at IS NULL)) \
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

/// Moves `customer_id`'s live subscription to `status` as dunning decides it, at `now`:
/// `past_due` from `active`, `trialing` or `suspended` (a case is open, none suspends it),
/// `suspended` from anything but `canceled` (a case's last retry failed), `active` from
/// `past_due` or `suspended` (no case holds it any more). With `customer_suspended` a
/// suspended subscription stays suspended: the customer and its subscription leave
/// `suspended` together. Returns whether it moved.
pub async fn apply_dunning_status(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    status: DunningStatus,
    customer_suspended: bool,
    now: DateTime<Utc>,
) -> Result<bool, BillingError> {
    let (to, from): (&str, &[&str]) = match (status, customer_suspended) {
        (DunningStatus::PastDue, false) => ("past_due", &["active", "trialing", "suspended"]),
        (DunningStatus::PastDue, true) => ("past_due", &["active", "trialing"]),
        (DunningStatus::Suspended, _) => ("suspended", &["trialing", "active", "past_due"]),
        (DunningStatus::Active, false) => ("active", &["past_due", "suspended"]),
        (DunningStatus::Active, true) => ("active", &["past_due"]),
    };
    Ok(sqlx::query(
        "UPDATE subscriptions SET status = $2, updated_at = $4 \
         WHERE customer_id = $1 AND status <> 'canceled' AND status = ANY($3)",
    )
    .bind(customer_id)
    .bind(to)
    .bind(from)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The statuses dunning sets on a subscription.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DunningStatus {
    /// A case is open: the customer owes.
    PastDue,
    /// A case's last retry failed.
    Suspended,
    /// No case holds it.
    Active,
}

/// The live (not canceled) subscription of `customer_id`: its id, our status and its Stripe
/// id. `None` when it has none.
pub async fn live(
    db: impl PgExecutor<'_>,
    customer_id: &str,
) -> Result<Option<(i64, String, Option<String>)>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, status, stripe_subscription_id FROM subscriptions \
         WHERE customer_id = $1 AND status <> 'canceled'",
    )
    .bind(customer_id)
    .fetch_optional(db)
    .await?)
}

/// How the live subscriptions stand with Stripe (`apexctl doctor`): the guide's "Subscription
/// doesn't have metered price item" is, in our mapping, a subscription without its Stripe
/// subscription or a customer without its Stripe customer (meter events name the customer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct StripeMappingGaps {
    /// Live (not canceled) subscriptions.
    pub live: i64,
    /// Of those, the ones missing their Stripe subscription or their customer's Stripe
    /// customer.
    pub unmapped: i64,
    /// Up to five of their customers, by id.
    pub examples: Vec<String>,
}

/// The live subscriptions not (fully) mapped to Stripe; see [`StripeMappingGaps`].
pub async fn stripe_mapping_gaps(
    db: impl PgExecutor<'_>,
) -> Result<StripeMappingGaps, BillingError> {
    Ok(sqlx::query_as(
        "SELECT count(*) AS live, count(*) FILTER (WHERE unmapped) AS unmapped, \
             coalesce((array_agg(customer_id ORDER BY customer_id) \
                 FILTER (WHERE unmapped))[1:5], '{}') AS examples \
         FROM (SELECT s.customer_id, \
                  (s.stripe_subscription_id IS NULL OR c.stripe_customer_id IS NULL) AS unmapped \
               FROM subscriptions s JOIN customers c ON c.id = s.customer_id \
               WHERE s.status <> 'canceled') AS live",
    )
    .fetch_one(db)
    .await?)
}

/// The customer whose subscription Stripe knows as `stripe_subscription_id`.
pub async fn customer_of_stripe_subscription(
    db: impl PgExecutor<'_>,
    stripe_subscription_id: &str,
) -> Result<Option<String>, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT customer_id FROM subscriptions WHERE stripe_subscription_id = $1",
    )
    .bind(stripe_subscription_id)
    .fetch_optional(db)
    .await?)
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
