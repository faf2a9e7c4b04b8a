//! The billing domain over Postgres, with no network I/O of its own: customers and their API
//! keys, plans and pricing, what a customer sees of its account, subscriptions and the Stripe
//! webhook rules that move them, dashboard tokens, and the `events` outbox where decisions
//! record what must happen next. The Stripe client (`apex-stripe`) and the email sender
//! carry those intents out; this crate never depends on them.
//!
//! Every query lives in the module that owns its table. A single statement takes any
//! executor (`impl PgExecutor`: a pool, a connection, a transaction); several statements take
//! `&mut PgConnection` (a pooled connection, or `&mut *tx` inside a caller's transaction,
//! where their own transaction becomes a savepoint), so a job composes them in one
//! transaction. Not `impl Acquire`: its impl for `&Pool` leaves the lifetime unconstrained,
//! and a future holding one cannot be proved `Send` for the edge's spawned connections.
//!
//! - [`customers`]: sign-up (customer, subscription, first key, welcome event in one
//!   transaction), listing, the Stripe customer mapping.
//! - [`keys`]: API key issue, hashing, lookup and revocation; only SHA-256 hashes are stored.
//! - [`status`]: whether a customer is served (`active`, `suspended`, `canceled`).
//! - [`subscriptions`]: a customer's plan and its status, moved by Stripe's events.
//! - [`plans`]: the plan catalogue with per-metric limits and platform-fee bands.
//! - [`pricing`]: overages, the platform fee, billing periods and projections, as pure functions.
//! - [`statement`]: a customer's period usage, limits and invoice preview; mediated revenue.
//! - [`invoices`]: monthly invoices (lines, adjustments, reviews) and their Stripe mirror.
//! - [`alerts`]: usage alerts at 80, 90, 100 and 110 % of a plan's limits.
//! - [`trials`]: trial-ending reminders.
//! - [`summaries`]: monthly usage summaries.
//! - [`sdk_notices`]: SDK update notices.
//! - [`dunning`]: failed payments retried on the guide's timeline, suspension, reactivation.
//! - [`names`]: the metric names of the billing rules.
//! - [`email_log`]: what was emailed, opt-outs, suppressed addresses, send counts.
//! - [`email_webhooks`]: Resend's delivery webhooks (Svix signatures), applied to `email_log`.
//! - [`events`]: the outbox of events (emails) decisions enqueue.
//! - [`webhooks`]: Stripe webhook signatures and the events billing acts on.
//! - [`tokens`]: dashboard JWTs (HS256), minted by `apexctl token`, checked by the edge.
//! - [`ids`]: random identifiers (`cus_...`, `key_...`, `rsk_...`) and the customer id shape.
//! - [`error`]: the crate's error type, retryable and permanent cases apart.

pub mod alerts;
pub mod customers;
pub mod dunning;
pub mod email_log;
pub mod email_webhooks;
pub mod error;
pub mod events;
pub mod ids;
pub mod invoices;
pub mod keys;
pub mod names;
pub mod plans;
pub mod pricing;
pub mod sdk_notices;
pub mod statement;
pub mod status;
pub mod subscriptions;
pub mod summaries;
pub mod tokens;
pub mod trials;
pub mod webhooks;

pub use error::BillingError;
