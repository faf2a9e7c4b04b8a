//! The pure parts of the nightly Stripe usage sync (the guide's 02:00 job): which customer
//! days are due, what each reports, the deterministic meter-event identifier that makes a
//! re-run count nothing twice. [`super::sync`] runs them against Postgres and Stripe.
//!
//! Rules:
//!
//! - Only complete UTC days are reported (a day is complete once it has ended), and only
//!   those within Stripe's window for meter events: 35 days back.
//! - A day is reported as the difference between its total now and what was already
//!   reported: the first report carries the whole day, and a record that arrives after its
//!   day was reported is sent as a correction carrying only the difference, under the next
//!   revision's identifier. Meter events add up in Stripe, so the sum is always the day's
//!   total. A total below what was reported (which the pipeline never produces) is not sent:
//!   it is returned for a person to look at, since Stripe meter events cannot be negative.
//! - Identifiers are `apex_<customer>_<metric>_<YYYYMMDD>_r<revision>`: one per customer,
//!   metric, day and revision, so sending the same report twice is deduplicated by Stripe.

use apex_core::model::Metric;
use chrono::{DateTime, Duration as Days, NaiveDate, Utc};
use sha2::{Digest, Sha256};

/// Stripe accepts meter events up to this many days old.
pub const MAX_AGE_DAYS: i64 = 35;

/// A day this close to leaving Stripe's window is no longer sent: a run takes a while, and
/// an event stamped just inside the window at the start may be outside it when it goes.
pub const WINDOW_MARGIN_HOURS: i64 = 1;

/// The UTC days to report at `now`: complete, and ending more than [`WINDOW_MARGIN_HOURS`]
/// inside Stripe's [`MAX_AGE_DAYS`] window; oldest first.
pub fn reportable_days(now: DateTime<Utc>) -> Vec<NaiveDate> {
    let today = now.date_naive();
    let limit = Days::days(MAX_AGE_DAYS) - Days::hours(WINDOW_MARGIN_HOURS);
    (1..=MAX_AGE_DAYS)
        .rev()
        .map(|back| today - Days::days(back))
        .filter(|day| now - day_end(*day) < limit)
        .collect()
}

/// The end of `day` in UTC: the next midnight.
pub(crate) fn day_end(day: NaiveDate) -> DateTime<Utc> {
    (day + Days::days(1))
        .and_hms_opt(0, 0, 0)
        .expect("midnight exists")
        .and_utc()
}

/// What to send for one customer, metric and day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DayReport {
    /// Nothing new since the last report.
    UpToDate,
    /// Send this quantity under this identifier.
    Send {
        /// Quantity to add in Stripe (the whole day, or the correction).
        quantity: u64,
        /// The meter event's identifier.
        identifier: String,
        /// The revision it uses (0 for the first report).
        revision: u32,
    },
    /// The day's total fell below what was reported: not sendable, to be looked at.
    Shrunk {
        /// Reported before.
        reported: u64,
        /// The total now.
        total: u64,
    },
}

/// Stripe's longest meter event identifier.
pub const MAX_IDENTIFIER_LEN: usize = 100;

/// The meter event identifier of a customer, metric, day and revision. Our customer ids keep
/// it well under Stripe's 100 characters; a longer one (an imported id) is replaced by a
/// digest of the same parts, still deterministic.
pub fn identifier(customer_id: &str, metric: Metric, day: NaiveDate, revision: u32) -> String {
    let readable = format!(
        "apex_{customer_id}_{}_{}_r{revision}",
        metric.as_str(),
        day.format("%Y%m%d")
    );
    if readable.len() <= MAX_IDENTIFIER_LEN {
        return readable;
    }
    let digest = Sha256::digest(readable.as_bytes());
    format!("apex_{}_r{revision}", hex::encode(&digest[..20]))
}

/// The timestamp of a day's meter events: its last second, so the day's usage falls in the
/// billing period that contains the day, and the window check of [`reportable_days`] (the
/// day's end) is the one Stripe applies.
pub fn event_timestamp(day: NaiveDate) -> i64 {
    day_end(day).timestamp() - 1
}

/// What to report for a day whose total is `total`, when `reported` was sent in `revisions`
/// earlier events.
pub fn plan_day(
    customer_id: &str,
    metric: Metric,
    day: NaiveDate,
    total: u64,
    reported: u64,
    revisions: u32,
) -> DayReport {
    match total.cmp(&reported) {
        std::cmp::Ordering::Equal => DayReport::UpToDate,
        std::cmp::Ordering::Less => DayReport::Shrunk { reported, total },
        std::cmp::Ordering::Greater => DayReport::Send {
            quantity: total - reported,
            identifier: identifier(customer_id, metric, day, revisions),
            revision: revisions,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    fn date(text: &str) -> NaiveDate {
        NaiveDate::parse_from_str(text, "%Y-%m-%d").unwrap()
    }

    #[test]
    fn only_complete_days_inside_the_window_are_reported() {
        let days = reportable_days(at("2025-12-10T02:00:00Z"));
        // Yesterday is the newest; today is not complete.
        assert_eq!(*days.last().unwrap(), date("2025-12-09"));
        assert!(!days.contains(&date("2025-12-10")));
        // The oldest day's end is less than 35 days ago.
        assert_eq!(days[0], date("2025-11-05"));
        assert_eq!(days.len(), 35);
        assert!(days.windows(2).all(|w| w[0] < w[1]));
        // Just after midnight, the day that just ended is reportable.
        let days = reportable_days(at("2025-12-10T00:00:01Z"));
        assert_eq!(*days.last().unwrap(), date("2025-12-09"));
        // The day that ended exactly 35 days ago is out.
        let days = reportable_days(at("2025-12-10T00:00:00Z"));
        assert_eq!(days[0], date("2025-11-05"));
        assert!(!days.contains(&date("2025-11-04")));
        // So is one within the last hour of its window (it could cross it mid-run).
        let days = reportable_days(at("2025-12-10T23:30:00Z"));
        assert_eq!(days[0], date("2025-11-06"));
        assert_eq!(days.len(), 34);
        assert_eq!(
            reportable_days(at("2025-12-10T22:59:59Z"))[0],
            date("2025-11-05")
        );
    }

    #[test]
    fn a_day_is_reported_whole_then_corrected_by_its_difference() {
        let day = date("2025-12-09");
        let first = plan_day("cus_a", Metric::Impressions, day, 1_000, 0, 0);
        assert_eq!(
            first,
            DayReport::Send {
                quantity: 1_000,
                identifier: "apex_cus_a_impressions_20251209_r0".into(),
                revision: 0
            }
        );
        // The same inputs give the same identifier: a re-run is deduplicated by Stripe.
        assert_eq!(
            first,
            plan_day("cus_a", Metric::Impressions, day, 1_000, 0, 0)
        );
        assert_eq!(
            plan_day("cus_a", Metric::Impressions, day, 1_000, 1_000, 1),
            DayReport::UpToDate
        );
        // A late record: only the difference, under the next revision.
        assert_eq!(
            plan_day("cus_a", Metric::Impressions, day, 1_250, 1_000, 1),
            DayReport::Send {
                quantity: 250,
                identifier: "apex_cus_a_impressions_20251209_r1".into(),
                revision: 1
            }
        );
        assert_eq!(
            plan_day("cus_a", Metric::DataTransfer, day, 5, 7, 1),
            DayReport::Shrunk {
                reported: 7,
                total: 5
            }
        );
        // Identifiers differ by every part, and fit Stripe's 100 characters for our ids.
        let ids = [
            identifier("cus_a", Metric::Impressions, day, 0),
            identifier("cus_b", Metric::Impressions, day, 0),
            identifier("cus_a", Metric::ApiCalls, day, 0),
            identifier("cus_a", Metric::Impressions, date("2025-12-08"), 0),
            identifier("cus_a", Metric::Impressions, day, 1),
        ];
        let distinct: std::collections::HashSet<_> = ids.iter().collect();
        assert_eq!(distinct.len(), ids.len());
        assert!(identifier("cus_0123456789abcdef", Metric::DataTransfer, day, 999).len() <= 100);
        // A long imported id still gives a deterministic identifier within the limit.
        let long = format!("cus_{}", "x".repeat(120));
        let hashed = identifier(&long, Metric::DataTransfer, day, 3);
        assert!(hashed.len() <= MAX_IDENTIFIER_LEN, "{hashed}");
        assert!(
            hashed.starts_with("apex_") && hashed.ends_with("_r3"),
            "{hashed}"
        );
        assert_eq!(hashed, identifier(&long, Metric::DataTransfer, day, 3));
        assert_ne!(hashed, identifier(&long, Metric::DataTransfer, day, 4));
        assert_ne!(hashed, identifier(&long, Metric::ApiCalls, day, 3));
        // The day's last second.
        assert_eq!(event_timestamp(day), at("2025-12-09T23:59:59Z").timestamp());
    }
}
