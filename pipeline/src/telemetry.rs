//! Metric names of the pipeline, `apex_pipeline_<noun>_<unit>[_total]`, with bounded labels.

/// Batches the Postgres sink finished, by `outcome` (`committed`, `refused`).
pub const PG_SINK_BATCHES_TOTAL: &str = "apex_pipeline_pg_batches_total";
/// Records the Postgres sink committed.
pub const PG_SINK_RECORDS_TOTAL: &str = "apex_pipeline_pg_records_total";
