//! The pure parts of the nightly Stripe usage sync (the guide's 02:00 job): which customer
//! days are due, what each reports, the deterministic meter-event identifier that makes a
//! re-run count nothing twice, and the token bucket that keeps requests under Stripe's rate
//! limit. [`super::sync`] runs them against Postgres and Stripe.
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

use std::time::{Duration, Instant};

use apex_pipeline::model::Metric;
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

fn day_end(day: NaiveDate) -> DateTime<Utc> {
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

/// A token bucket: `capacity` requests at once, refilled at `per_second`. Time is passed in,
/// so tests drive it without sleeping.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_second: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket at `now`. `per_second` above zero.
    pub fn new(capacity: u32, per_second: f64, now: Instant) -> Self {
        assert!(per_second > 0.0, "a bucket must refill");
        Self {
            capacity: f64::from(capacity.max(1)),
            per_second,
            tokens: f64::from(capacity.max(1)),
            last: now,
        }
    }

    /// Takes a token at `now`, or says how long until one is there.
    pub fn take(&mut self, now: Instant) -> Result<(), Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.last = self.last.max(now);
        self.tokens = (self.tokens + elapsed * self.per_second).min(self.capacity);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64(
                (1.0 - self.tokens) / self.per_second,
            ))
        }
    }

    /// Empties the bucket until `until` (a 429's `Retry-After`).
    pub fn pause_until(&mut self, until: Instant) {
        self.tokens = 0.0;
        self.last = self.last.max(until);
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

    #[test]
    fn the_bucket_allows_bursts_then_its_rate() {
        let start = Instant::now();
        let mut bucket = TokenBucket::new(5, 80.0, start);
        for _ in 0..5 {
            assert_eq!(bucket.take(start), Ok(()));
        }
        let wait = bucket.take(start).unwrap_err();
        assert!((wait.as_secs_f64() - 1.0 / 80.0).abs() < 1e-9, "{wait:?}");
        // Over one second at most capacity + rate requests pass.
        let mut passed = 5;
        for ms in 1..=1_000u64 {
            if bucket.take(start + Duration::from_millis(ms)).is_ok() {
                passed += 1;
            }
        }
        assert!((84..=86).contains(&passed), "{passed}");
        // A 429 empties it until Retry-After.
        let now = start + Duration::from_secs(2);
        bucket.pause_until(now + Duration::from_secs(3));
        assert!(bucket.take(now + Duration::from_secs(1)).is_err());
        assert!(bucket.take(now + Duration::from_secs(3)).is_err());
        assert_eq!(bucket.take(now + Duration::from_millis(3_013)), Ok(()));
        // Time going backwards changes nothing.
        assert!(bucket.take(start).is_err());
    }
}
