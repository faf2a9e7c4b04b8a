//! The HTTP edge of the system, served by `apex-server`: a bare hyper 1.x server for SDK
//! telemetry, the dashboard's usage API and Stripe's and Resend's webhooks, with health,
//! readiness and Prometheus endpoints. It links the pipeline and the billing domain only:
//! no Stripe SDK, email, template or scheduler crate (a test checks its dependency tree).
//!
//! - [`config`]: the server's typed environment configuration.
//! - [`auth`]: the bearer credential of `Authorization`, dashboard JWTs (checked by
//!   `apex_billing::tokens`) and the admin token.
//! - [`dashboard`]: the usage API (current period, analytics, limits), the invoice preview and
//!   the admin revenue endpoint.
//! - [`usage`]: the ingest endpoints (track, batch), reading decode → key → validate → send.
//! - [`records`]: parsing and validating records: exact quantities, timestamps, limits.
//! - [`body`]: reading bodies within size and time limits, gzip and zstd.
//! - [`keycache`]: API keys in memory, kept current by LISTEN/NOTIFY.
//! - [`dedup`]: duplicate event ids within a window, exactly (byte for byte) and in a byte budget.
//! - [`error`]: every refusal and its one status mapping.
//! - [`server`]: `run_with_sink(config, listener, sink, shutdown)`, the accept loop, limits
//!   and graceful shutdown (`main` starts the durable sink and passes it in).
//! - [`conn`]: one connection: its first bytes within the header timeout, an HTTP/2 idle
//!   timeout, and its graceful end.
//! - [`state`]: what every handler can reach.
//! - [`routes`]: the router; every response is built here or in [`response`].
//! - [`response`]: JSON bodies, including the one error shape of the API.
//! - [`names`]: the edge's metric names.
//! - [`telemetry`]: the Prometheus recorder and cached metric handles.
//! - [`webhook`]: `POST /webhooks/stripe`, signed Stripe events handed to billing.
//! - [`resend_webhook`]: `POST /webhooks/resend`, Svix-signed Resend delivery events handed
//!   to billing.

pub mod auth;
pub mod body;
pub mod config;
pub mod conn;
pub mod dashboard;
pub mod dedup;
pub mod error;
pub mod keycache;
pub mod names;
pub mod ratelimit;
pub mod records;
pub mod resend_webhook;
pub mod response;
pub mod routes;
pub mod server;
pub mod state;
pub mod telemetry;
pub mod usage;
pub mod webhook;

pub use config::ServerConfig;
pub use server::{ServerError, run_with_sink};
pub use state::AppState;
