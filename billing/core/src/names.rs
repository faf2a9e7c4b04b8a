//! Metric names of the billing rules, `apex_billing_<noun>_<unit>[_total]`, with bounded
//! labels (`outcome`, `resolution`, `cause` and `threshold` fixed words, `attempt` a retry
//! number 1 to 3, `metric` one of the three metrics, `days` 7, 3 or 1),
//! and [`ALL`], their descriptions. They are recorded by whichever process applies the rule:
//! `apex-server` for what Stripe's webhooks decide (a case opened, a payment closing one),
//! `apex-cron` for the `dunning_retries` job (attempts, suspensions, the open-cases gauge).
//! Prometheus sums the two.

use apex_core::telemetry::MetricSpec;

/// Invoice payments Stripe reported, by `outcome` (`succeeded`: `invoice.paid` with money;
/// `failed`: `invoice.payment_failed` with money due): the guide's failed-payment rate.
pub const INVOICE_PAYMENTS_TOTAL: &str = "apex_billing_invoice_payments_total";
/// Dunning cases opened (Day 0).
pub const DUNNING_CASES_OPENED_TOTAL: &str = "apex_billing_dunning_cases_opened_total";
/// Dunning cases closed, by `resolution` (`retry_succeeded`, `paid`, `voided`, `closed`,
/// `exempt`, `reactivated`).
pub const DUNNING_CASES_CLOSED_TOTAL: &str = "apex_billing_dunning_cases_closed_total";
/// Our payment retries, by `attempt` (1 to 3) and `outcome` (`succeeded`, `failed`,
/// `postponed`, `canceled`): the guide's Dunning Effectiveness.
pub const DUNNING_ATTEMPTS_TOTAL: &str = "apex_billing_dunning_attempts_total";
/// Customers suspended by dunning.
pub const DUNNING_SUSPENSIONS_TOTAL: &str = "apex_billing_dunning_suspensions_total";
/// Suspended customers reactivated, by `cause` (a [`crate::dunning::Resolution`]).
pub const DUNNING_REACTIVATIONS_TOTAL: &str = "apex_billing_dunning_reactivations_total";
/// Open dunning cases, by `state` (`retrying`, `suspended`).
pub const DUNNING_OPEN_CASES: &str = "apex_billing_dunning_open_cases";
/// Time from a failed payment (Day 0) to the payment that closed its case, seconds
/// (Prometheus's base unit; the dashboard shows days).
pub const DUNNING_RECOVERY_SECONDS: &str = "apex_billing_dunning_recovery_seconds";
/// Histogram buckets of [`DUNNING_RECOVERY_SECONDS`]: six hours to a month, the retry days
/// (3, 4, 7) among them.
pub const DUNNING_RECOVERY_SECONDS_BUCKETS: &[f64] = &[
    21_600.0,
    86_400.0,
    172_800.0,
    259_200.0,
    345_600.0,
    432_000.0,
    604_800.0,
    864_000.0,
    1_209_600.0,
    2_592_000.0,
];
/// Failed-payment events showing Stripe scheduled its own next attempt (Smart Retries on):
/// Stripe would retry beside our dunning.
pub const STRIPE_SCHEDULED_RETRIES_TOTAL: &str = "apex_billing_stripe_scheduled_retries_total";

/// Usage alerts recorded, by `threshold` (`80`, `90`, `100`, `overage`).
pub const USAGE_ALERTS_TOTAL: &str = "apex_billing_usage_alerts_total";
/// Customers at or above 80 % of a limit at the last check, by `metric`.
pub const USAGE_CUSTOMERS_ABOVE_80: &str = "apex_billing_usage_customers_above_80";
/// Trial reminders enqueued, by `days` (`7`, `3`, `1`).
pub const TRIAL_REMINDERS_TOTAL: &str = "apex_billing_trial_reminders_total";
/// Monthly summaries enqueued.
pub const MONTHLY_SUMMARIES_TOTAL: &str = "apex_billing_monthly_summaries_total";

/// Every metric of the billing rules, with its HELP text.
pub const ALL: &[MetricSpec] = &[
    MetricSpec::counter(
        INVOICE_PAYMENTS_TOTAL,
        "Invoice payments Stripe reported, by outcome (succeeded, failed).",
    ),
    MetricSpec::counter(DUNNING_CASES_OPENED_TOTAL, "Dunning cases opened (Day 0)."),
    MetricSpec::counter(
        DUNNING_CASES_CLOSED_TOTAL,
        "Dunning cases closed, by resolution (retry_succeeded, paid, voided, closed, exempt, reactivated).",
    ),
    MetricSpec::counter(
        DUNNING_ATTEMPTS_TOTAL,
        "Dunning payment retries, by attempt (1-3) and outcome (succeeded, failed, postponed, canceled).",
    ),
    MetricSpec::counter(
        DUNNING_SUSPENSIONS_TOTAL,
        "Customers suspended by dunning after the last retry failed.",
    ),
    MetricSpec::counter(
        DUNNING_REACTIVATIONS_TOTAL,
        "Suspended customers reactivated, by cause (retry_succeeded, paid, voided, closed, exempt, reactivated).",
    ),
    MetricSpec::gauge(
        DUNNING_OPEN_CASES,
        "Open dunning cases, by state (retrying, suspended), as of the last dunning run.",
    ),
    MetricSpec::histogram(
        DUNNING_RECOVERY_SECONDS,
        "Seconds from a failed payment to the payment that closed its dunning case.",
    ),
    MetricSpec::counter(
        USAGE_ALERTS_TOTAL,
        "Usage alerts recorded, by threshold (80, 90, 100, overage).",
    ),
    MetricSpec::gauge(
        USAGE_CUSTOMERS_ABOVE_80,
        "Customers at or above 80 % of a plan limit at the last usage check, by metric.",
    ),
    MetricSpec::counter(
        TRIAL_REMINDERS_TOTAL,
        "Trial-ending reminders enqueued, by days before the end (7, 3, 1).",
    ),
    MetricSpec::counter(MONTHLY_SUMMARIES_TOTAL, "Monthly usage summaries enqueued."),
    MetricSpec::counter(
        STRIPE_SCHEDULED_RETRIES_TOTAL,
        "Failed-payment events showing Stripe scheduled its own retry (turn Smart Retries off).",
    ),
];

#[cfg(test)]
mod tests {
    #[test]
    fn names_follow_the_rules() {
        assert_eq!(
            apex_core::telemetry::check_names("billing", super::ALL),
            Ok(())
        );
        assert_eq!(
            apex_core::telemetry::check_listed(include_str!("names.rs"), super::ALL),
            Ok(())
        );
    }
}
