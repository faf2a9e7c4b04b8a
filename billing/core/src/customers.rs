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

/// What dunning reads of a customer: where its emails go and whether it is dunned.
#[derive(Debug, Clone, sqlx::FromRow, Serialize)]
pub struct DunningContact {
    /// `cus_...` (ours).
    pub id: String,
    /// Name, for the emails' greeting.
    pub name: String,
    /// Billing contact: where dunning emails go.
    pub email: String,
    /// `customers.status`.
    pub status: String,
    /// Its Stripe customer, once mapped.
    pub stripe_customer_id: Option<String>,
    /// Exempt from dunning by an operator (no retries, no dunning email, never suspended).
    pub dunning_exempt: bool,
    /// Who exempted it and why.
    pub dunning_exempt_note: Option<String>,
    /// When dunning suspended it.
    pub suspended_at: Option<DateTime<Utc>>,
}

/// Which of a customer's ids a lookup matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MatchedBy {
    /// Our `customers.id`.
    CustomerId,
    /// Its Stripe customer id (`customers.stripe_customer_id`).
    StripeCustomerId,
}

/// The customer `id` names: ours first, else the one mapped to Stripe customer `id` (both are
/// `cus_...`, so an operator may paste either). `None` when neither matches.
pub async fn dunning_contact(
    db: impl PgExecutor<'_>,
    id: &str,
) -> Result<Option<(DunningContact, MatchedBy)>, BillingError> {
    let row: Option<(DunningContact, bool)> = sqlx::query_as::<_, DunningContactRow>(
        "SELECT id, name, email, status, stripe_customer_id, dunning_exempt, dunning_exempt_note, \
                suspended_at, id = $1 AS by_id \
         FROM customers WHERE id = $1 OR stripe_customer_id = $1 \
         ORDER BY (id = $1) DESC LIMIT 1",
    )
    .bind(id)
    .fetch_optional(db)
    .await?
    .map(|r| (r.contact, r.by_id));
    Ok(row.map(|(contact, by_id)| {
        let matched = if by_id {
            MatchedBy::CustomerId
        } else {
            MatchedBy::StripeCustomerId
        };
        (contact, matched)
    }))
}

#[derive(sqlx::FromRow)]
struct DunningContactRow {
    #[sqlx(flatten)]
    contact: DunningContact,
    by_id: bool,
}

/// Our customer mapped to Stripe customer `stripe_customer_id`.
pub async fn id_of_stripe_customer(
    db: impl PgExecutor<'_>,
    stripe_customer_id: &str,
) -> Result<Option<String>, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT id FROM customers WHERE stripe_customer_id = $1")
            .bind(stripe_customer_id)
            .fetch_optional(db)
            .await?,
    )
}

/// Locks `customer_id`'s row until the transaction ends (`FOR UPDATE`): dunning takes it
/// first in every step, so two steps on one customer (two invoices paid at once, a payment
/// while a retry suspends) run one after the other and each sees the other's outcome.
/// Returns whether the customer exists.
pub async fn lock(db: impl PgExecutor<'_>, customer_id: &str) -> Result<bool, BillingError> {
    Ok(
        sqlx::query_scalar::<_, i32>("SELECT 1 FROM customers WHERE id = $1 FOR UPDATE")
            .bind(customer_id)
            .fetch_optional(db)
            .await?
            .is_some(),
    )
}

/// Suspends `customer_id` at `now` (dunning's last failed retry): the edge refuses its keys
/// with 403 `account_suspended` within a second (the `customers_notify` trigger). Only an
/// active customer moves; returns whether it did.
pub async fn suspend(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE customers SET status = 'suspended', suspended_at = $2, updated_at = $2 \
         WHERE id = $1 AND status = 'active'",
    )
    .bind(customer_id)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Reactivates a suspended `customer_id` at `now`: its keys are accepted again within a
/// second, with no new key. Returns whether it was suspended.
pub async fn reactivate(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    now: DateTime<Utc>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE customers SET status = 'active', suspended_at = NULL, updated_at = $2 \
         WHERE id = $1 AND status = 'suspended'",
    )
    .bind(customer_id)
    .bind(now)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// Sets or clears `customer_id`'s dunning exemption, with `note` (who and why). Returns
/// whether the customer exists.
pub async fn set_dunning_exempt(
    db: impl PgExecutor<'_>,
    customer_id: &str,
    exempt: bool,
    note: Option<&str>,
) -> Result<bool, BillingError> {
    Ok(sqlx::query(
        "UPDATE customers SET dunning_exempt = $2, dunning_exempt_note = $3, updated_at = now() \
         WHERE id = $1",
    )
    .bind(customer_id)
    .bind(exempt)
    .bind(note)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
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
