//! Stripe: the HTTP client, the mapping of our catalogue and customers to Stripe objects, and
//! the nightly usage sync to Billing Meter Events. Webhooks are in [`crate::webhooks`].
//!
//! - [`client`]: sends async-stripe's typed requests, with idempotency keys, retries,
//!   `Retry-After` and a shared rate limit.
//! - [`catalog`]: meters, products and plans, customers and subscriptions, ids in Postgres.
//! - [`reporting`]: the pure rules of the sync (reportable days, identifiers, token bucket).
//! - [`sync`]: the sync job over Postgres and Stripe.

pub mod catalog;
pub mod client;
pub mod reporting;
pub mod sync;

use crate::config::BillingConfig;

/// A Stripe job failed as a whole (per-customer failures are in its report instead).
#[derive(Debug, thiserror::Error)]
pub enum StripeWorkError {
    /// Stripe refused or could not be reached.
    #[error(transparent)]
    Stripe(#[from] client::StripeError),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
}

/// The client for the configured Stripe account, or why there is none.
pub fn client_from_config(
    config: &BillingConfig,
    settings: client::ClientSettings,
) -> Result<client::StripeClient, StripeWorkError> {
    let key = config.stripe_secret_key.as_deref().ok_or_else(|| {
        StripeWorkError::Invalid("STRIPE_SECRET_KEY is not set: Stripe work cannot run".into())
    })?;
    Ok(client::StripeClient::new(
        &config.stripe_api_base,
        key,
        settings,
    )?)
}
