//! Stripe for apex: the HTTP client, the mapping of our catalogue and customers to Stripe
//! objects, the nightly usage sync to Billing Meter Events and the monthly invoices. It owns the `stripe_*` tables;
//! it changes the billing domain's tables only through `apex-billing`'s queries (its
//! catalogue reads plans and subscriptions joined with its own `stripe_plans`). Its jobs take
//! the pool rather than a transaction: they commit step by step around Stripe's answers (an
//! event is recorded as pending before it is sent), which no caller's transaction may hold
//! open. Stripe's webhooks are domain rules (`apex_billing::webhooks`), served by the edge,
//! which never links this crate.
//!
//! - [`config`]: `STRIPE_SECRET_KEY` and `STRIPE_API_BASE`.
//! - [`client`]: sends async-stripe's typed requests, with idempotency keys, retries
//!   (`backon`), `Retry-After` and a shared rate limit ([`rate`]).
//! - [`rate`]: the requests-per-second limit of a client (`governor`), with Stripe's pauses.
//! - [`catalog`]: meters, products and plans, customers and subscriptions, ids in Postgres.
//! - [`reporting`]: the pure rules of the sync (reportable days, identifiers).
//! - [`sync`]: the sync job over Postgres and Stripe.
//! - [`invoicing`]: the monthly invoice close: our lines as a finalized Stripe invoice.
//! - [`dunning`]: the payment retries of dunning (`POST /v1/invoices/{id}/pay`).
//! - [`reconcile`]: one period compared across the stores and Stripe.
//! - [`names`]: the crate's metric names.
//! - `testing` (feature `test-support`): the Stripe stand-in for integration tests.

pub mod catalog;
pub mod client;
pub mod config;
pub mod dunning;
pub mod invoicing;
pub mod names;
pub mod rate;
pub mod reconcile;
pub mod reporting;
pub mod sync;
#[cfg(feature = "test-support")]
pub mod testing;

use apex_billing::BillingError;

use crate::config::StripeConfig;

/// A Stripe job failed as a whole (per-customer failures are in its report instead).
#[derive(Debug, thiserror::Error)]
pub enum StripeWorkError {
    /// Stripe refused or could not be reached.
    #[error(transparent)]
    Stripe(#[from] client::StripeError),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    /// A billing query failed.
    #[error(transparent)]
    Billing(#[from] BillingError),
    /// The request cannot be carried out as asked.
    #[error("{0}")]
    Invalid(String),
}

/// Customers in a row failing on an unreachable Stripe before a run stops.
const UNAVAILABLE_CUSTOMERS_BEFORE_STOP: usize = 3;

/// Tells a per-customer run (the usage sync, the invoice close) when Stripe is down rather
/// than one customer failing: after [`UNAVAILABLE_CUSTOMERS_BEFORE_STOP`] customers in a row
/// fail on an unreachable Stripe, the run stops instead of spending each remaining customer's
/// retries on the outage.
#[derive(Debug, Default)]
pub(crate) struct Outage {
    in_a_row: usize,
}

impl Outage {
    /// Records one customer's outcome: `None` for success.
    pub(crate) fn record(&mut self, error: Option<&StripeWorkError>) {
        let unreachable = matches!(error, Some(StripeWorkError::Stripe(e)) if e.is_retryable());
        self.in_a_row = if unreachable { self.in_a_row + 1 } else { 0 };
    }

    /// Whether the run should stop now.
    pub(crate) fn is_on(&self) -> bool {
        self.in_a_row >= UNAVAILABLE_CUSTOMERS_BEFORE_STOP
    }
}

/// The client for the configured Stripe account, or why there is none.
pub fn client_from_config(
    config: &StripeConfig,
    settings: client::ClientSettings,
) -> Result<client::StripeClient, StripeWorkError> {
    let key = config.secret_key.as_deref().ok_or_else(|| {
        StripeWorkError::Invalid("STRIPE_SECRET_KEY is not set: Stripe work cannot run".into())
    })?;
    Ok(client::StripeClient::new(&config.api_base, key, settings)?)
}
