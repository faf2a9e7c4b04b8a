//! Metric names of the pipeline, `apex_pipeline_<noun>_<unit>[_total]`, with bounded labels
//! (`store` is `postgres` or `clickhouse`).

/// Bytes appended to the write-ahead log.
pub const WAL_BYTES_TOTAL: &str = "apex_pipeline_wal_bytes_total";
/// Time of one group commit (append and fsync).
pub const WAL_FSYNC_SECONDS: &str = "apex_pipeline_wal_fsync_seconds";
/// Log bytes kept on disk (segments not yet applied to every store).
pub const WAL_DISK_BYTES: &str = "apex_pipeline_wal_disk_bytes";
/// Segment files on disk.
pub const WAL_SEGMENTS: &str = "apex_pipeline_wal_segments";
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
/// Records replayed from the log after a start (written by the previous process's
/// acknowledgements, not yet in the store), by `store`.
pub const REPLAYED_RECORDS_TOTAL: &str = "apex_pipeline_replayed_records_total";
/// Age of the oldest acknowledged record not yet in a store, by `store`.
pub const LAG_SECONDS: &str = "apex_pipeline_lag_seconds";

/// Every name above, for dashboards and their tests.
pub const ALL: &[&str] = &[
    WAL_BYTES_TOTAL,
    WAL_FSYNC_SECONDS,
    WAL_DISK_BYTES,
    WAL_SEGMENTS,
    WAL_BACKLOG_BYTES,
    WAL_FULL_TOTAL,
    WAL_TRUNCATED_BYTES_TOTAL,
    WAL_CORRUPT_BYTES_TOTAL,
    BATCH_ROWS,
    FLUSH_SECONDS,
    ROWS_WRITTEN_TOTAL,
    WRITE_ERRORS_TOTAL,
    REPLAYED_RECORDS_TOTAL,
    LAG_SECONDS,
];

#[cfg(test)]
mod tests {
    use super::ALL;

    /// Grafana charts every pipeline metric, and only names the code records.
    #[test]
    fn dashboards_chart_exactly_the_recorded_names() {
        let dashboard = include_str!("../../grafana/dashboards/apex-overview.json");
        let mut used = std::collections::HashSet::new();
        for (start, _) in dashboard.match_indices("apex_pipeline_") {
            let name: String = dashboard[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                ALL.contains(&name.as_str()),
                "dashboard uses unknown metric {name}"
            );
            used.insert(name);
        }
        for name in ALL {
            assert!(used.contains(*name), "dashboard does not chart {name}");
        }
    }
}
