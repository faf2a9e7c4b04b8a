//! Metric names of the cron process, `apex_cron_<noun>_<unit>[_total]`, with bounded labels
//! (`job` is a configured job name, `status` one of `succeeded`, `failed`, `skipped`), and
//! [`ALL`], their descriptions.

use apex_core::telemetry::MetricSpec;

/// Runs of a job's slots, by `job` and `status` (`succeeded`, `failed`, `skipped`).
pub const RUNS_TOTAL: &str = "apex_cron_runs_total";
/// How long a run took, by `job`, in seconds of the process's clock.
pub const RUN_DURATION_SECONDS: &str = "apex_cron_run_duration_seconds";
/// When a job last succeeded, by `job`: unix seconds of the process's clock.
pub const LAST_SUCCESS_TIMESTAMP_SECONDS: &str = "apex_cron_last_success_timestamp_seconds";

/// Every metric of the cron process, with its HELP text.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(
        RUNS_TOTAL,
        "Runs of a cron job's scheduled slots, by job and status (succeeded, failed, skipped).",
    ),
    MetricSpec::histogram(
        RUN_DURATION_SECONDS,
        "Seconds a cron job's run took, by job (skipped slots are not timed).",
    ),
    MetricSpec::gauge(
        LAST_SUCCESS_TIMESTAMP_SECONDS,
        "Unix time of a cron job's last successful run, by job (from the history at start).",
    ),
];

/// Bucket bounds of [`RUN_DURATION_SECONDS`]: from a quick queue pass to an hour-long sync.
pub const RUN_DURATION_BUCKETS: &[f64] = &[
    0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3_600.0,
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("cron", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
