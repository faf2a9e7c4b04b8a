//! Metric names of the Stripe work, `apex_stripe_<noun>_<unit>[_total]`, with bounded labels
//! (`status` is a status class or an invoice status, `outcome`, `metric` and `kind` fixed
//! words), and [`ALL`], their
//! descriptions. They are recorded by whichever process runs the work; the cron process
//! (`apex-cron`, its `stripe_sync` job) exposes them on its `/metrics`; `apexctl` has none.

use apex_core::telemetry::MetricSpec;

/// Stripe API requests answered, by `status` (`2xx`, `4xx`, `429`, `5xx`).
pub const REQUESTS_TOTAL: &str = "apex_stripe_requests_total";
/// Stripe requests retried (5xx, 409, 429, timeouts, refused connections).
pub const RETRIES_TOTAL: &str = "apex_stripe_retries_total";
/// Usage sync runs, by `outcome` (`ok`, `partial`).
pub const SYNC_RUNS_TOTAL: &str = "apex_stripe_sync_runs_total";
/// Meter events recorded as accepted by Stripe, by `metric`.
pub const METER_EVENTS_TOTAL: &str = "apex_stripe_meter_events_total";
/// Monthly invoices finalized in Stripe by the invoice close.
pub const INVOICES_ISSUED_TOTAL: &str = "apex_stripe_invoices_issued_total";
/// Cents put on finalized invoices, by line `kind` (`plan`, `platform_fee`, `overage`,
/// `addon`, `adjustment`; credits are not counted).
pub const INVOICED_CENTS_TOTAL: &str = "apex_stripe_invoiced_cents_total";
/// Monthly invoices in the local mirror, by `status` (the `invoices` table's statuses).
pub const INVOICES: &str = "apex_stripe_invoices";
/// Customers whose invoice close failed (Stripe refused, could not be reached, or a total
/// did not match).
pub const INVOICE_FAILURES_TOTAL: &str = "apex_stripe_invoice_failures_total";

/// Every metric of the Stripe work, with its HELP text; `apex-cron` exposes them.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(
        REQUESTS_TOTAL,
        "Stripe API requests answered, by status class (2xx, 4xx, 429, 5xx).",
    ),
    MetricSpec::counter(
        RETRIES_TOTAL,
        "Stripe requests retried with the same idempotency key (5xx, 409, 429, timeouts).",
    ),
    MetricSpec::counter(
        SYNC_RUNS_TOTAL,
        "Stripe usage sync runs, by outcome (ok, partial).",
    ),
    MetricSpec::counter(
        METER_EVENTS_TOTAL,
        "Meter events Stripe accepted from the usage sync, by metric.",
    ),
    MetricSpec::counter(
        INVOICES_ISSUED_TOTAL,
        "Monthly invoices finalized in Stripe by the invoice close.",
    ),
    MetricSpec::counter(
        INVOICED_CENTS_TOTAL,
        "Cents put on finalized monthly invoices, by line kind.",
    ),
    MetricSpec::gauge(INVOICES, "Monthly invoices in the local mirror, by status."),
    MetricSpec::counter(
        INVOICE_FAILURES_TOTAL,
        "Customers whose monthly invoice close failed.",
    ),
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("stripe", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
