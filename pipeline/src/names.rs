//! Metric names of the pipeline, `apex_pipeline_<noun>_<unit>[_total]`, with bounded labels
//! (`store` is `postgres` or `clickhouse`), and [`ALL`], their descriptions.

use apex_core::telemetry::MetricSpec;

/// Bytes appended to the write-ahead log.
pub const WAL_BYTES_TOTAL: &str = "apex_pipeline_wal_bytes_total";
/// Time of one group commit (append and fsync).
pub const WAL_FSYNC_SECONDS: &str = "apex_pipeline_wal_fsync_seconds";
/// Log bytes kept on disk (segments not yet applied to every store).
pub const WAL_DISK_BYTES: &str = "apex_pipeline_wal_disk_bytes";
/// Segment files on disk.
pub const WAL_SEGMENTS: &str = "apex_pipeline_wal_segments";
/// Segments the log writer started, by `segment`: `prepared` (written ahead as zeros) or
/// `created` (an empty file that grows: none was ready, the segment before was written in
/// big groups, or `APEX_WAL_PREALLOCATE=false`).
pub const WAL_ROLLS_TOTAL: &str = "apex_pipeline_wal_rolls_total";
/// 1 while the log writer runs, 0 once it stopped: after a failed cut of a failed group
/// (nothing is acknowledged until a restart; `/readyz` answers 503), a panic, or at shutdown.
pub const WAL_WRITER_UP: &str = "apex_pipeline_wal_writer_up";
/// Log bytes a store has not applied yet, by `store`.
pub const WAL_BACKLOG_BYTES: &str = "apex_pipeline_wal_backlog_bytes";
/// Submissions refused because the log was at its cap.
pub const WAL_FULL_TOTAL: &str = "apex_pipeline_wal_full_total";
/// Bytes cut from a torn log tail at start-up.
pub const WAL_TRUNCATED_BYTES_TOTAL: &str = "apex_pipeline_wal_truncated_bytes_total";
/// Corrupt log bytes skipped while applying, by `store`.
pub const WAL_CORRUPT_BYTES_TOTAL: &str = "apex_pipeline_wal_corrupt_bytes_total";
/// Records in one batch written to a store, by `store`.
pub const BATCH_ROWS: &str = "apex_pipeline_batch_rows";
/// Time to write one batch to a store (retries included), by `store`.
pub const FLUSH_SECONDS: &str = "apex_pipeline_flush_seconds";
/// Records written to a store, by `store`.
pub const ROWS_WRITTEN_TOTAL: &str = "apex_pipeline_rows_written_total";
/// Failed store writes (each retried), by `store`.
pub const WRITE_ERRORS_TOTAL: &str = "apex_pipeline_write_errors_total";
/// Store errors that retrying cannot fix (a schema or type error), by `store`: the batch is
/// parked in the log until the cause is fixed and the server restarted.
pub const PERMANENT_ERRORS_TOTAL: &str = "apex_pipeline_permanent_errors_total";
/// Batches parked now after a permanent error (0 or 1), by `store`.
pub const PARKED_BATCHES: &str = "apex_pipeline_parked_batches";
/// Records replayed from the log after a start (written by the previous process's
/// acknowledgements, not yet in the store), by `store`.
pub const REPLAYED_RECORDS_TOTAL: &str = "apex_pipeline_replayed_records_total";
/// Age of the oldest acknowledged record not yet in a store, by `store`.
pub const LAG_SECONDS: &str = "apex_pipeline_lag_seconds";

/// Every metric of the pipeline, with its HELP text.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(WAL_BYTES_TOTAL, "Bytes appended to the write-ahead log."),
    MetricSpec::histogram(
        WAL_FSYNC_SECONDS,
        "Seconds one group commit of the write-ahead log took (append and fsync).",
    ),
    MetricSpec::gauge(
        WAL_DISK_BYTES,
        "Bytes of write-ahead log on disk (segments not yet applied to every store).",
    ),
    MetricSpec::gauge(WAL_SEGMENTS, "Write-ahead log segment files on disk."),
    MetricSpec::counter(
        WAL_ROLLS_TOTAL,
        "Write-ahead log segments started, by segment: prepared (written ahead as zeros) or created (an empty file: none was ready, big groups, or preparation is off).",
    ),
    MetricSpec::gauge(
        WAL_WRITER_UP,
        "1 while the write-ahead log writer runs; 0 once it stopped (a failed rollback after a failed fsync, a panic, or shutdown): nothing is acknowledged until a restart.",
    ),
    MetricSpec::gauge(
        WAL_BACKLOG_BYTES,
        "Bytes of write-ahead log a store has not applied yet, by store.",
    ),
    MetricSpec::counter(
        WAL_FULL_TOTAL,
        "Submissions refused because the write-ahead log was at its cap (APEX_WAL_MAX_BYTES).",
    ),
    MetricSpec::counter(
        WAL_TRUNCATED_BYTES_TOTAL,
        "Bytes cut from a torn write-ahead log tail at start-up.",
    ),
    MetricSpec::counter(
        WAL_CORRUPT_BYTES_TOTAL,
        "Corrupt write-ahead log bytes skipped while applying, by store.",
    ),
    MetricSpec::histogram(
        BATCH_ROWS,
        "Records in one batch written to a store, by store.",
    ),
    MetricSpec::histogram(
        FLUSH_SECONDS,
        "Seconds to write one batch to a store, retries included, by store.",
    ),
    MetricSpec::counter(ROWS_WRITTEN_TOTAL, "Records written to a store, by store."),
    MetricSpec::counter(
        WRITE_ERRORS_TOTAL,
        "Failed store writes, by store; transient ones are retried with backoff.",
    ),
    MetricSpec::counter(
        PERMANENT_ERRORS_TOTAL,
        "Store errors retrying cannot fix (schema or type), by store; the batch is parked in the log.",
    ),
    MetricSpec::gauge(
        PARKED_BATCHES,
        "Batches parked after a permanent error, by store (1 means the store is stuck until a restart).",
    ),
    MetricSpec::counter(
        REPLAYED_RECORDS_TOTAL,
        "Records replayed from the write-ahead log after a start, by store.",
    ),
    MetricSpec::gauge(
        LAG_SECONDS,
        "Age in seconds of the oldest acknowledged record not yet in a store, by store.",
    ),
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("pipeline", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
