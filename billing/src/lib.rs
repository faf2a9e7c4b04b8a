//! Billing: plans, customers and their API keys, and (as later work lands) pricing, the
//! Stripe sync, dunning, email and the cron jobs. The `apexctl` binary is its admin CLI.
//!
//! - [`config`]: Stripe and email settings from the environment.
//! - [`ids`]: random identifiers (`cus_...`, `key_...`, `rsk_...`).
//! - [`keys`]: API key issue, hashing, lookup and revocation; only SHA-256 hashes are stored.
//! - [`customers`]: customer sign-up (customer, subscription, first key, welcome email event).
//! - [`plans`]: the plan catalogue with per-metric limits and platform-fee bands.
//! - [`pricing`]: overages, the platform fee, billing periods and projections, as pure functions.
//! - [`statement`]: a customer's period usage, limits and invoice preview; mediated revenue.
//! - [`stripe`]: the Stripe client, catalogue mapping (`apexctl stripe ...`) and the usage sync.
//! - [`tokens`]: dashboard JWTs (HS256) for `apexctl token`.
//! - [`webhooks`]: Stripe webhook signatures and the events billing acts on.
//! - [`error`]: the crate's error type, retryable and permanent cases apart.

pub mod config;
pub mod customers;
pub mod error;
pub mod ids;
pub mod keys;
pub mod plans;
pub mod pricing;
pub mod statement;
pub mod stripe;
pub mod tokens;
pub mod webhooks;

pub use error::BillingError;
