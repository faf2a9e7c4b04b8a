//! What every apex crate shares, and nothing else: the usage record model, typed configuration
//! from the environment, connections to both stores and their schema migrations (feature
//! `stores`), and the way crates describe their metrics. The edge, the pipeline, billing and
//! the load test depend on it; it depends on none of them, and it holds no write-ahead log,
//! no HTTP server and no Stripe. Without `stores` it links no database client at all.
//!
//! - [`model`]: metrics and their exact integer units; the record the edge accepts.
//! - [`env`]: reading typed configuration from environment variables, one-line errors.
//! - [`failpoint`]: named crash points for the crash tests (`APEX_FAILPOINT`).
//! - `stores` (feature `stores`): building Postgres pools and ClickHouse clients from
//!   configuration.
//! - `migrate` (feature `stores`): Postgres (sqlx) and ClickHouse migrations, each applied
//!   once.
//! - [`telemetry`]: metric descriptions (name, kind, HELP text) that every crate's names
//!   module lists, and their registration with the process's recorder.
//! - `process` (feature `process`): logging, the runtime and the stop signals of a binary.
//! - `testing` (feature `test-support`): fresh, migrated databases for integration tests.

pub mod env;
pub mod failpoint;
#[cfg(feature = "stores")]
pub mod migrate;
pub mod model;
#[cfg(feature = "process")]
pub mod process;
#[cfg(feature = "stores")]
pub mod stores;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
