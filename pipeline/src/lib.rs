//! The durable path of usage records: the record model shared by every crate, the schema
//! of both stores and its migrations, typed environment configuration helpers, and the
//! store connections.
//!
//! - [`model`]: metrics and their exact integer units.
//! - [`env`]: reading typed configuration from environment variables, one-line errors.
//! - [`sink`]: the trait the edge submits records through, with durable acknowledgements.
//! - [`durable`]: the production sink: group-committed log, batched into both stores
//!   exactly once.
//! - [`postgres_sink`]: hourly rollups in Postgres, one transaction per log range.
//! - [`clickhouse_sink`]: raw events in ClickHouse, with the argument why replay never
//!   inserts a batch twice.
//! - [`failpoint`]: named crash points for the crash tests (`APEX_FAILPOINT`).
//! - [`wal`]: the write-ahead log: framed, checksummed segments, recovery.
//! - [`telemetry`]: metric names.
//! - [`migrate`]: Postgres (sqlx) and ClickHouse migrations, each applied once.
//! - [`stores`]: building Postgres pools and ClickHouse clients from configuration.
//! - `testing` (feature `test-support`): fresh, migrated databases for integration tests.
//!
//! This crate knows neither the HTTP edge nor billing: they depend on it, never the reverse.

pub mod clickhouse_sink;
pub mod durable;
pub mod env;
pub mod failpoint;
pub mod migrate;
pub mod model;
pub mod postgres_sink;
pub mod sink;
pub mod stores;
pub mod telemetry;
#[cfg(feature = "test-support")]
pub mod testing;
pub mod wal;
