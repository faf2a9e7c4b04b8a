//! The HTTP edge of the system, served by `apex-server`: a bare hyper 1.x server for SDK
//! telemetry (and, as later work lands, the usage API and Stripe webhooks), with health,
//! readiness and Prometheus endpoints.
//!
//! - [`config`]: the server's typed environment configuration.
//! - [`server`]: `run(config, listener, shutdown)`, the accept loop, limits and graceful shutdown.
//! - [`routes`]: the router; every response is built here or in [`response`].
//! - [`response`]: JSON bodies, including the one error shape of the API.
//! - [`telemetry`]: the Prometheus recorder and metric names.

pub mod config;
pub mod response;
pub mod routes;
pub mod server;
pub mod telemetry;

pub use config::ServerConfig;
pub use server::{ServerError, run};
