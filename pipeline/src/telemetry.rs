//! Metric names of the pipeline, `apex_pipeline_<noun>_<unit>[_total]`, with bounded labels.

/// Bytes appended to the write-ahead log.
pub const WAL_BYTES_TOTAL: &str = "apex_pipeline_wal_bytes_total";
/// Time of one group commit (append and fsync).
pub const WAL_FSYNC_SECONDS: &str = "apex_pipeline_wal_fsync_seconds";
/// Log bytes not yet applied to Postgres.
pub const WAL_BACKLOG_BYTES: &str = "apex_pipeline_wal_backlog_bytes";
/// Submissions refused because the log was at its cap.
pub const WAL_FULL_TOTAL: &str = "apex_pipeline_wal_full_total";
/// Bytes cut from a torn log tail at start-up.
pub const WAL_TRUNCATED_BYTES_TOTAL: &str = "apex_pipeline_wal_truncated_bytes_total";
/// Corrupt log bytes skipped while applying.
pub const WAL_CORRUPT_BYTES_TOTAL: &str = "apex_pipeline_wal_corrupt_bytes_total";
/// Time of one Postgres batch transaction.
pub const PG_APPLY_SECONDS: &str = "apex_pipeline_pg_apply_seconds";
/// Records added to the Postgres rollups.
pub const PG_RECORDS_TOTAL: &str = "apex_pipeline_pg_records_total";

/// Every name above, for dashboards and their tests.
pub const ALL: &[&str] = &[
    WAL_BYTES_TOTAL,
    WAL_FSYNC_SECONDS,
    WAL_BACKLOG_BYTES,
    WAL_FULL_TOTAL,
    WAL_TRUNCATED_BYTES_TOTAL,
    WAL_CORRUPT_BYTES_TOTAL,
    PG_APPLY_SECONDS,
    PG_RECORDS_TOTAL,
];
