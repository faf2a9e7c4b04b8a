//! Metric names of the edge, `apex_ingest_<noun>_<unit>[_total]`, with bounded labels (route
//! templates and status codes, never a customer or a key), and [`ALL`], their descriptions.
//! [`crate::telemetry`] records them.

use apex_core::telemetry::MetricSpec;

/// Requests served, by `route` and `status`.
pub const REQUESTS_TOTAL: &str = "apex_ingest_requests_total";
/// Connections accepted.
pub const CONNECTIONS_TOTAL: &str = "apex_ingest_connections_total";
/// Connections open now.
pub const CONNECTIONS_OPEN: &str = "apex_ingest_connections_open";
/// Request latency, by `route`, from the first byte of the request head to the answer.
pub const REQUEST_DURATION_SECONDS: &str = "apex_ingest_request_duration_seconds";
/// Usage records, by `outcome` (`accepted`, `duplicate`, `rejected`) and `cause` (error code).
pub const RECORDS_TOTAL: &str = "apex_ingest_records_total";
/// Requests refused because the pipeline queue was full.
pub const QUEUE_FULL_TOTAL: &str = "apex_ingest_queue_full_total";
/// Submissions waiting in the pipeline queue.
pub const QUEUE_DEPTH: &str = "apex_ingest_queue_depth";
/// API keys in the cache.
pub const KEY_CACHE_KEYS: &str = "apex_ingest_key_cache_keys";
/// Key cache refreshes, by `kind` (`full`, `customer`).
pub const KEY_CACHE_REFRESHES_TOTAL: &str = "apex_ingest_key_cache_refreshes_total";
/// Event ids remembered for duplicate detection.
pub const DEDUP_IDS: &str = "apex_ingest_dedup_ids";
/// Event ids forgotten early because the dedup table was full.
pub const DEDUP_EVICTIONS_TOTAL: &str = "apex_ingest_dedup_evictions_total";
/// Event ids refused because the dedup table had no room to hold them pending.
pub const DEDUP_FULL_TOTAL: &str = "apex_ingest_dedup_full_total";
/// Bytes the dedup table has allocated.
pub const DEDUP_BYTES: &str = "apex_ingest_dedup_bytes";
/// Seconds back to which every accepted event id is still remembered (the effective window).
pub const DEDUP_WINDOW_SECONDS: &str = "apex_ingest_dedup_window_seconds";
/// Records refused by the per-customer rate limit, by `plan` (a plan id or `none`; never the
/// customer).
pub const RATE_LIMITED_RECORDS_TOTAL: &str = "apex_ingest_rate_limited_records_total";
/// Requests refused by the rate limit whose 429 is being held now (`APEX_RATE_LIMITED_DELAY_MS`).
pub const RATE_LIMITED_HELD_REQUESTS: &str = "apex_ingest_rate_limited_held_requests";
/// Resend delivery events stored, by `type` (`delivered`, `bounced`, `complained`, `other`).
pub const EMAIL_EVENTS_TOTAL: &str = "apex_ingest_email_events_total";

/// Every metric of the edge, with its HELP text.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(
        REQUESTS_TOTAL,
        "HTTP requests answered, by route template and status code.",
    ),
    MetricSpec::counter(CONNECTIONS_TOTAL, "TCP connections accepted."),
    MetricSpec::gauge(CONNECTIONS_OPEN, "TCP connections open now."),
    MetricSpec::histogram(
        REQUEST_DURATION_SECONDS,
        "Seconds from a request's head to its answer, by route template.",
    ),
    MetricSpec::counter(
        RECORDS_TOTAL,
        "Usage records, by outcome (accepted, duplicate, rejected) and cause (an error code, or ok).",
    ),
    MetricSpec::counter(
        QUEUE_FULL_TOTAL,
        "Requests answered 503 because the pipeline queue was full.",
    ),
    MetricSpec::gauge(QUEUE_DEPTH, "Submissions waiting in the pipeline queue."),
    MetricSpec::gauge(KEY_CACHE_KEYS, "Active API keys in the edge's cache."),
    MetricSpec::counter(
        KEY_CACHE_REFRESHES_TOTAL,
        "Key cache refreshes from Postgres, by kind (full, customer).",
    ),
    MetricSpec::gauge(
        DEDUP_IDS,
        "Event ids remembered for duplicate detection (pending, or accepted within the window), every minute.",
    ),
    MetricSpec::counter(
        DEDUP_EVICTIONS_TOTAL,
        "Event ids forgotten before their window ended because the dedup table's byte budget (APEX_DEDUP_MAX_BYTES) or id capacity was reached.",
    ),
    MetricSpec::counter(
        DEDUP_FULL_TOTAL,
        "Event ids refused (503 dedup_full, or a per-record dedup_full in a batch) because every reusable generation of their dedup shard still held an id in flight.",
    ),
    MetricSpec::gauge(
        DEDUP_BYTES,
        "Bytes allocated by the dedup table (fixed at start, plus its customer index), every minute.",
    ),
    MetricSpec::gauge(
        DEDUP_WINDOW_SECONDS,
        "Effective dedup window in seconds: every event id accepted this long ago or less is still remembered (APEX_DEDUP_WINDOW_SECS, or less when the table dropped ids early), every minute.",
    ),
    MetricSpec::counter(
        RATE_LIMITED_RECORDS_TOTAL,
        "Usage records refused (429 or 413) by the per-customer rate limit, by the customer's plan (a plan id, or none).",
    ),
    MetricSpec::gauge(
        RATE_LIMITED_HELD_REQUESTS,
        "Requests refused by the per-customer rate limit whose 429 is being held before it is sent (APEX_RATE_LIMITED_DELAY_MS): the backpressure on flooding connections.",
    ),
    MetricSpec::counter(
        EMAIL_EVENTS_TOTAL,
        "Resend delivery webhook events stored (first deliveries only), by type (delivered, bounced, complained, other).",
    ),
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("ingest", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
