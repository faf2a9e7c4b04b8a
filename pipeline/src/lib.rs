//! The durable path of usage records, from the edge's acknowledgement to both stores: a
//! group-committed write-ahead log, and one applier per store that batches the log into it
//! exactly once. The record model, store connections and migrations it builds on are in
//! `apex-core`; this crate knows neither the HTTP edge nor billing.
//!
//! - [`sink`]: the trait the edge submits records through, with durable acknowledgements.
//! - [`durable`]: the production sink: the log writer, batching and the appliers.
//! - [`store`]: what a store writer does with a batch, and its transient and permanent errors.
//! - [`postgres_sink`]: hourly rollups in Postgres, one transaction per log range.
//! - [`rollups`]: per-day totals of the usage tables for reconciliation, and the rollups
//!   rebuilt from the raw events.
//! - [`clickhouse_sink`]: raw events in ClickHouse, with the argument why replay never
//!   inserts a batch twice.
//! - [`wal`]: the write-ahead log: framed, checksummed segments, recovery.
//! - `failpoint`: named crash points for the crash tests (`APEX_FAILPOINT`), from `apex-core`.
//! - [`names`]: the pipeline's metric names.

pub mod clickhouse_sink;
pub mod durable;
/// The crash points live in `apex-core` (the email queue has one too); re-exported here for
/// the pipeline's own points and the crash tests.
pub use apex_core::failpoint;
pub mod names;
pub mod postgres_sink;
pub mod rollups;
pub mod sink;
pub mod store;
pub mod wal;
