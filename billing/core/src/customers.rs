//! Customers: sign-up creates, in one transaction, the customer, its subscription (trialing
//! when the plan has a trial), its first API key and the welcome email event, so a crash
//! never leaves a customer without a key or a key without its email.

use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::keys::{self, ApiKey, PlainApiKey};
use crate::{events, ids, plans, subscriptions};

/// What sign-up needs.
#[derive(Debug, Clone)]
pub struct NewCustomer {
    /// Company or person name, 1 to 200 characters.
    pub name: String,
    /// Billing contact address.
    pub email: String,
    /// A plan id from the `plans` table.
    pub plan_id: String,
    /// Trial length; `None` takes the plan's default.
    pub trial_days: Option<u32>,
}

/// A customer as stored.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Customer {
    /// `cus_...`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Billing contact.
    pub email: String,
    /// `active`, `suspended` or `canceled`.
    pub status: String,
    /// Sign-up time.
    pub created_at: DateTime<Utc>,
}

/// The result of sign-up. `api_key` is the only copy of the plain key.
#[derive(Debug)]
pub struct CreatedCustomer {
    /// The new customer.
    pub customer: Customer,
    /// Its plan.
    pub plan_id: String,
    /// Its subscription's id.
    pub subscription_id: i64,
    /// End of the trial, if the subscription starts in one.
    pub trial_end: Option<DateTime<Utc>>,
    /// The stored key.
    pub key: ApiKey,
    /// The plain key, to show once.
    pub api_key: PlainApiKey,
}

/// Checks a sign-up before touching the database.
pub fn validate(new: &NewCustomer) -> Result<(), BillingError> {
    let name_len = new.name.trim().chars().count();
    if name_len == 0 || name_len > 200 {
        return Err(BillingError::Invalid(
            "name must be 1 to 200 characters".into(),
        ));
    }
    if !is_plausible_email(&new.email) {
        return Err(BillingError::Invalid(format!(
            "email {:?} is not an address",
            new.email
        )));
    }
    if new.trial_days.is_some_and(|d| d > 365) {
        return Err(BillingError::Invalid(
            "trial_days must be at most 365".into(),
        ));
    }
    Ok(())
}

/// A cheap shape check (local@domain.tld, no spaces): delivery is the real test.
fn is_plausible_email(email: &str) -> bool {
    let Some((local, domain)) = email.rsplit_once('@') else {
        return false;
    };
    email.len() <= 320
        && !local.is_empty()
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && !email.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// Signs a customer up at time `now`: customer, subscription, first key and welcome event,
/// in one transaction (a savepoint when `conn` is already in one).
pub async fn create_customer(
    conn: &mut PgConnection,
    new: &NewCustomer,
    now: DateTime<Utc>,
) -> Result<CreatedCustomer, BillingError> {
    validate(new)?;
    let mut tx = conn.begin().await?;
    let plan_trial_days = plans::trial_days(&mut *tx, &new.plan_id)
        .await?
        .ok_or_else(|| {
            BillingError::Invalid(format!(
                "unknown plan {:?} (see `apexctl plans list`)",
                new.plan_id
            ))
        })?;
    let trial_days = new.trial_days.map_or(i64::from(plan_trial_days), i64::from);
    let trial_end = (trial_days > 0).then(|| now + Duration::days(trial_days));

    let customer: Customer = sqlx::query_as(
        "INSERT INTO customers (id, name, email, created_at, updated_at) VALUES ($1, $2, $3, $4, $4) \
         RETURNING id, name, email, status, created_at",
    )
    .bind(ids::new_customer_id())
    .bind(new.name.trim())
    .bind(new.email.trim())
    .bind(now)
    .fetch_one(&mut *tx)
    .await?;

    let (subscription_id, trial_end) =
        subscriptions::create(&mut *tx, &customer.id, &new.plan_id, trial_end, now).await?;
    let (key, api_key) = keys::create_key(&mut *tx, &customer.id).await?;

    // The guide's welcome event carries the key; we carry only its visible prefix, because
    // the plain key must never be stored, and the events table is storage.
    events::enqueue(
        &mut *tx,
        "email.welcome",
        &serde_json::json!({
            "to": customer.email,
            "customer_id": customer.id,
            "name": customer.name,
            "plan_type": new.plan_id,
            "api_key_prefix": key.prefix,
            "trial_end": trial_end,
        }),
        now,
    )
    .await?;

    tx.commit().await?;
    Ok(CreatedCustomer {
        customer,
        plan_id: new.plan_id.clone(),
        subscription_id,
        trial_end,
        key,
        api_key,
    })
}

/// Every customer, newest first.
pub async fn list_customers(db: impl PgExecutor<'_>) -> Result<Vec<Customer>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, name, email, status, created_at FROM customers ORDER BY created_at DESC, id",
    )
    .fetch_all(db)
    .await?)
}

/// True when `customer_id` exists (whatever its status).
pub async fn exists(db: impl PgExecutor<'_>, customer_id: &str) -> Result<bool, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM customers WHERE id = $1)")
            .bind(customer_id)
            .fetch_one(db)
            .await?,
    )
}

/// A customer as the Stripe mapping sees it.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct StripeMapping {
    /// `cus_...`.
    pub id: String,
    /// Name.
    pub name: String,
    /// Billing contact.
    pub email: String,
    /// Its Stripe customer, once mapped.
    pub stripe_customer_id: Option<String>,
    /// Sign-up time: the invoice close's default months start with the one it falls in.
    pub created_at: DateTime<Utc>,
    /// When a canceled customer's subscription was canceled: its month is the last the
    /// invoice close bills unasked.
    pub canceled_at: Option<DateTime<Utc>>,
}

/// Customers with their Stripe mapping, by id: every one (canceled ones only with
/// `include_canceled`), or only `only` (an empty list when it does not exist).
pub async fn stripe_mappings(
    db: impl PgExecutor<'_>,
    only: Option<&str>,
    include_canceled: bool,
) -> Result<Vec<StripeMapping>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT c.id, c.name, c.email, c.stripe_customer_id, c.created_at, \
                (SELECT max(s.canceled_at) FROM subscriptions s \
                 WHERE s.customer_id = c.id AND c.status = 'canceled') AS canceled_at \
         FROM customers c \
         WHERE ($2 OR c.status <> 'canceled') AND ($1::text IS NULL OR c.id = $1) ORDER BY c.id",
    )
    .bind(only)
    .bind(include_canceled)
    .fetch_all(db)
    .await?)
}

/// Records `customer_id`'s Stripe customer.
pub async fn set_stripe_customer_id(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    stripe_customer_id: &str,
) -> Result<(), BillingError> {
    sqlx::query("UPDATE customers SET stripe_customer_id = $2, updated_at = now() WHERE id = $1")
        .bind(customer_id)
        .bind(stripe_customer_id)
        .execute(db)
        .await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signup(name: &str, email: &str) -> NewCustomer {
        NewCustomer {
            name: name.into(),
            email: email.into(),
            plan_id: "starter".into(),
            trial_days: None,
        }
    }

    #[test]
    fn plausible_emails_pass() {
        for email in ["a@b.co", "first.last+tag@sub.example.com"] {
            assert!(validate(&signup("Acme", email)).is_ok(), "{email}");
        }
    }

    #[test]
    fn bad_signups_are_refused() {
        let long = "x".repeat(201);
        for (name, email) in [
            ("", "a@b.co"),
            ("   ", "a@b.co"),
            (long.as_str(), "a@b.co"),
            ("Acme", "nope"),
            ("Acme", "@b.co"),
            ("Acme", "a@b"),
            ("Acme", "a@.co"),
            ("Acme", "a b@c.co"),
        ] {
            assert!(
                validate(&signup(name, email)).is_err(),
                "{name:?} {email:?}"
            );
        }
    }
}
