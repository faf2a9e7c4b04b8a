//! Metric names of the email queue, `apex_notify_<noun>_<unit>[_total]`, with bounded labels
//! (`type` is one of the sixteen email types or `unknown`, `outcome` and `provider` fixed
//! words), and [`ALL`], their descriptions. The process that drains the queue records them
//! (`apex-cron`'s `email_queue` job exposes them on its `/metrics`).

use apex_core::telemetry::MetricSpec;

/// Emails handled, by `type` and `outcome` (`sent`, `failed` (a transient failure, retried),
/// `deferred` (a cap, or a provider's rate limit), `duplicate` (the 24-hour rule),
/// `given_up`, `opted_out`, `suppressed`).
pub const EMAILS_TOTAL: &str = "apex_notify_emails_total";
/// Time a provider took to accept an email, by `provider`.
pub const SEND_DURATION_SECONDS: &str = "apex_notify_send_duration_seconds";
/// Histogram buckets of [`SEND_DURATION_SECONDS`]: a file write to a slow provider's answer.
pub const SEND_DURATION_BUCKETS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];
/// Email events due now and not processed.
pub const QUEUE_DEPTH: &str = "apex_notify_queue_depth";
/// Age of the oldest due email event, seconds (0 when none is due).
pub const OLDEST_DUE_AGE_SECONDS: &str = "apex_notify_oldest_due_age_seconds";

/// Every metric of the email queue, with its HELP text.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(
        EMAILS_TOTAL,
        "Emails handled by the queue, by type and outcome (sent, failed, deferred, duplicate, given_up, opted_out, suppressed).",
    ),
    MetricSpec::histogram(
        SEND_DURATION_SECONDS,
        "Time a provider took to accept an email, by provider.",
    ),
    MetricSpec::gauge(QUEUE_DEPTH, "Email events due now and not processed."),
    MetricSpec::gauge(
        OLDEST_DUE_AGE_SECONDS,
        "Age of the oldest due email event, seconds (0 when none is due).",
    ),
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("notify", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
