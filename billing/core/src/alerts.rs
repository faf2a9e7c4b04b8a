//! Usage alerts: the guide's hourly Usage Limits check. One set-based pass over the hourly
//! rollups compares every active customer's usage in its current billing period (the same
//! figures as `GET /api/usage/limits`: [`crate::statement::limits`]) with its plan's limit of
//! each limited metric, records each threshold crossed once per customer, metric and billing
//! period (`usage_alerts`, its unique key), and enqueues one email for the highest threshold
//! newly crossed, in the same transaction.
//!
//! - Thresholds 80, 90 and 100 % of the limit, and the overage alert at 110 %
//!   ([`Thresholds`], `APEX_USAGE_ALERT_THRESHOLDS`): the guide's emails are
//!   `usage_alert_80`, `_90`, `_100` and `_overage`, the last with what the overage costs so
//!   far ([`crate::pricing::overage`]).
//! - Usage that jumps past several thresholds within one run records them all and sends one
//!   email, for the highest. A new billing period starts fresh (its `period_start` is part of
//!   the key). A metric without a limit never alerts. A limit of 0 counts as 100 % used once
//!   anything is used, as the limits endpoint says.
//! - Only active customers (not suspended, not canceled) are checked.

use std::collections::BTreeMap;

use apex_core::env::{ConfigError, EnvSource};
use apex_core::model::{BYTES_PER_GB, Metric};
use chrono::{DateTime, Duration, Utc};
use serde::Serialize;
use serde_json::json;
use sqlx::{Connection, PgConnection, PgExecutor};

use crate::error::BillingError;
use crate::pricing::{self, MetricPrice};
use crate::{events, names};

/// The variable of the thresholds: whole percents, comma-separated.
pub const THRESHOLDS_VAR: &str = "APEX_USAGE_ALERT_THRESHOLDS";

/// The thresholds checked, whole percents of a limit: any of the guide's 80, 90 and 100,
/// and at most one above 100, the overage alert (110 by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Thresholds(Vec<i32>);

impl Default for Thresholds {
    fn default() -> Self {
        Self(vec![80, 90, 100, 110])
    }
}

impl Thresholds {
    /// Thresholds from `percents`; errors say what is wrong.
    pub fn new(mut percents: Vec<i32>) -> Result<Self, String> {
        percents.sort_unstable();
        percents.dedup();
        if percents.is_empty() {
            return Err("needs at least one threshold".into());
        }
        if percents.iter().filter(|p| **p > 100).count() > 1 {
            return Err("at most one threshold above 100 (the overage alert)".into());
        }
        if let Some(bad) = percents
            .iter()
            .find(|p| **p <= 100 && ![80, 90, 100].contains(*p))
        {
            return Err(format!(
                "{bad}: the thresholds up to 100 are the guide's emails, 80, 90 and 100"
            ));
        }
        if percents.iter().any(|p| *p > 1_000) {
            return Err("the overage threshold must be at most 1000".into());
        }
        Ok(Self(percents))
    }

    /// Reads [`THRESHOLDS_VAR`] (default `80,90,100,110`).
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let Some(raw) = env.optional(THRESHOLDS_VAR) else {
            return Ok(Self::default());
        };
        let percents = raw
            .split(',')
            .map(|p| p.trim().parse::<i32>())
            .collect::<Result<Vec<_>, _>>()
            .map_err(|_| ConfigError::Invalid {
                name: THRESHOLDS_VAR,
                reason: format!(
                    "{raw:?} is not comma-separated whole percents, e.g. 80,90,100,110"
                ),
            })?;
        Self::new(percents).map_err(|reason| ConfigError::Invalid {
            name: THRESHOLDS_VAR,
            reason,
        })
    }

    /// The thresholds, ascending.
    pub fn percents(&self) -> &[i32] {
        &self.0
    }

    /// The email of a threshold: `usage_alert_80|90|100|overage`.
    pub fn email_type(threshold: i32) -> &'static str {
        match threshold {
            80 => "usage_alert_80",
            90 => "usage_alert_90",
            100 => "usage_alert_100",
            _ => "usage_alert_overage",
        }
    }
}

/// One customer's use of one limited metric, as the check saw it.
#[derive(Debug, Clone, sqlx::FromRow)]
struct Candidate {
    customer_id: String,
    name: String,
    email: String,
    metric_type: String,
    period_start: DateTime<Utc>,
    period_end: DateTime<Utc>,
    used: i64,
    included: i64,
    unit_quantity: i64,
    cents_per_unit: i64,
    percent: i64,
}

/// What a check did.
#[derive(Debug, Clone, Default, Serialize)]
pub struct CheckSummary {
    /// Customer and metric pairs at or above the lowest threshold (or 80 %, if lower).
    pub at_or_above_lowest: usize,
    /// `usage_alerts` rows recorded, by threshold.
    pub alerts_recorded: BTreeMap<i32, u64>,
    /// Emails enqueued (one per customer and metric with new alerts).
    pub emails_enqueued: u64,
    /// Customers at or above 80 % of a limit, by metric (the dashboard's gauge).
    pub customers_above_80: BTreeMap<String, u64>,
}

/// The guide's hourly check at `now`: records every threshold crossed in the current period
/// and enqueues one email per customer and metric for the highest new one, in one
/// transaction. Running it twice changes nothing the second time.
pub async fn check_usage_limits(
    conn: &mut PgConnection,
    thresholds: &Thresholds,
    now: DateTime<Utc>,
) -> Result<CheckSummary, BillingError> {
    // Rows from 80 % (the dashboard's gauge) or the lowest threshold, if lower.
    let lowest = thresholds.percents()[0].min(80);
    let month = pricing::calendar_month(now);
    let mut tx = conn.begin().await?;
    // The period is the subscription's when it holds `now`, else the calendar month; a
    // customer without a live subscription is priced as Starter (as `statement::account`).
    let candidates: Vec<Candidate> = sqlx::query_as(
        "WITH accounts AS ( \
             SELECT c.id AS customer_id, c.name, c.email, coalesce(s.plan_id, 'starter') AS plan_id, \
                    CASE WHEN s.current_period_start <= $1 AND $1 < s.current_period_end \
                         THEN s.current_period_start ELSE $2 END AS period_start, \
                    CASE WHEN s.current_period_start <= $1 AND $1 < s.current_period_end \
                         THEN s.current_period_end ELSE $3 END AS period_end \
             FROM customers c \
             LEFT JOIN subscriptions s ON s.customer_id = c.id AND s.status <> 'canceled' \
             WHERE c.status = 'active'), \
         limited AS ( \
             SELECT a.*, l.metric_type, l.included_quantity AS included, \
                    l.overage_unit_quantity AS unit_quantity, \
                    l.overage_cents_per_unit AS cents_per_unit \
             FROM accounts a JOIN plan_limits l ON l.plan_id = a.plan_id \
             WHERE l.included_quantity IS NOT NULL), \
         used AS ( \
             SELECT l.*, coalesce(( \
                 SELECT sum(u.quantity) FROM usage_records u \
                 WHERE u.customer_id = l.customer_id AND u.metric_type = l.metric_type \
                   AND u.recorded_at >= l.period_start AND u.recorded_at < l.period_end), 0)::bigint AS used \
             FROM limited l) \
         SELECT customer_id, name, email, metric_type, period_start, period_end, used, included, \
                unit_quantity, cents_per_unit, \
                CASE WHEN included = 0 THEN CASE WHEN used > 0 THEN 100 ELSE 0 END \
                     ELSE floor(used::numeric * 100 / included)::bigint END AS percent \
         FROM used \
         WHERE CASE WHEN included = 0 THEN CASE WHEN used > 0 THEN 100 ELSE 0 END \
                    ELSE floor(used::numeric * 100 / included) END >= $4 \
         ORDER BY customer_id, metric_type",
    )
    .bind(now)
    .bind(month.start)
    .bind(month.end)
    .bind(lowest)
    .fetch_all(&mut *tx)
    .await?;
    let mut summary = CheckSummary {
        at_or_above_lowest: candidates.len(),
        ..CheckSummary::default()
    };
    for c in &candidates {
        if c.percent >= 80 {
            *summary
                .customers_above_80
                .entry(c.metric_type.clone())
                .or_default() += 1;
        }
    }
    // Every threshold each candidate has reached, recorded at once; the unique key keeps
    // what was recorded before, and RETURNING names what is new.
    let (mut customers, mut metrics, mut crossed, mut starts, mut used, mut limits) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for c in &candidates {
        for t in thresholds.percents() {
            if floor_percent(c.used, c.included) >= i64::from(*t) {
                customers.push(c.customer_id.clone());
                metrics.push(c.metric_type.clone());
                crossed.push(*t);
                starts.push(c.period_start);
                used.push(c.used);
                limits.push(c.included);
            }
        }
    }
    let new: Vec<(String, String, i32)> = sqlx::query_as(
        "INSERT INTO usage_alerts (customer_id, metric_type, threshold_percent, period_start, \
             usage_quantity, limit_quantity, created_at) \
         SELECT * , $7::timestamptz FROM unnest($1::text[], $2::text[], $3::int[], \
             $4::timestamptz[], $5::bigint[], $6::bigint[]) \
         ON CONFLICT (customer_id, metric_type, threshold_percent, period_start) DO NOTHING \
         RETURNING customer_id, metric_type, threshold_percent",
    )
    .bind(&customers)
    .bind(&metrics)
    .bind(&crossed)
    .bind(&starts)
    .bind(&used)
    .bind(&limits)
    .bind(now)
    .fetch_all(&mut *tx)
    .await?;
    // The highest new threshold of each customer and metric gets the email.
    let mut highest: BTreeMap<(String, String), i32> = BTreeMap::new();
    for (customer, metric, threshold) in new {
        *summary.alerts_recorded.entry(threshold).or_default() += 1;
        let entry = highest.entry((customer, metric)).or_insert(threshold);
        *entry = (*entry).max(threshold);
    }
    let by_key: std::collections::HashMap<(&str, &str), &Candidate> = candidates
        .iter()
        .map(|c| ((c.customer_id.as_str(), c.metric_type.as_str()), c))
        .collect();
    for ((customer, metric), threshold) in &highest {
        let threshold = *threshold;
        let Some(c) = by_key.get(&(customer.as_str(), metric.as_str())) else {
            continue;
        };
        let data = email_data(c, threshold)?;
        events::enqueue_once(
            &mut *tx,
            &format!("email.{}", Thresholds::email_type(threshold)),
            &data,
            &format!(
                "usage_alert:{customer}:{metric}:{}:{threshold}",
                c.period_start.format("%Y-%m-%dT%H:%M:%SZ")
            ),
            now,
        )
        .await?;
        summary.emails_enqueued += 1;
    }
    tx.commit().await?;
    // Counted once committed: a rolled-back check recorded nothing.
    for (threshold, n) in &summary.alerts_recorded {
        metrics::counter!(names::USAGE_ALERTS_TOTAL, "threshold" => threshold_label(*threshold))
            .increment(*n);
    }
    for metric in Metric::ALL {
        let above = summary
            .customers_above_80
            .get(metric.as_str())
            .copied()
            .unwrap_or(0);
        metrics::gauge!(names::USAGE_CUSTOMERS_ABOVE_80, "metric" => metric.as_str())
            .set(above as f64);
    }
    Ok(summary)
}

fn floor_percent(used: i64, included: i64) -> i64 {
    if included <= 0 {
        if used > 0 { 100 } else { 0 }
    } else {
        (i128::from(used) * 100 / i128::from(included)).min(i128::from(i64::MAX)) as i64
    }
}

fn threshold_label(threshold: i32) -> &'static str {
    match threshold {
        80 => "80",
        90 => "90",
        100 => "100",
        _ => "overage",
    }
}

/// The `usage_alert_*` email's data: the metric as the limits endpoint names it, usage and
/// limit in its units (GB for data transfer), the percent, the period's last day and, for
/// the overage alert, its cost so far.
fn email_data(c: &Candidate, threshold: i32) -> Result<serde_json::Value, BillingError> {
    let metric: Metric = c
        .metric_type
        .parse()
        .map_err(|e| BillingError::Invalid(format!("{e}")))?;
    let units = |q: i64| -> serde_json::Value {
        match metric {
            Metric::DataTransfer => json!(q as f64 / BYTES_PER_GB as f64),
            _ => json!(q),
        }
    };
    let price = MetricPrice {
        metric,
        included: Some(c.included.max(0) as u64),
        unit_quantity: c.unit_quantity.max(1) as u64,
        cents_per_unit: c.cents_per_unit.max(0) as u64,
    };
    let overage = pricing::overage(&price, c.used.max(0) as u64)
        .map_err(|e| BillingError::Invalid(format!("cannot price the overage: {e}")))?;
    let mut data = json!({
        "to": c.email,
        "customer_id": c.customer_id,
        "name": c.name,
        "metric": match metric {
            Metric::DataTransfer => "data_transfer_gb",
            other => other.as_str(),
        },
        "used": units(c.used),
        "limit": units(c.included),
        "percent": c.percent,
        "threshold": threshold,
        "period_end": (c.period_end - Duration::seconds(1)).date_naive().to_string(),
    });
    if threshold > 100 {
        data["overage_cost_cents"] = json!(overage.cost_cents);
    }
    Ok(data)
}

/// A recorded alert.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Alert {
    /// Row id.
    pub id: i64,
    /// Customer.
    pub customer_id: String,
    /// `impressions`, `api_calls` or `data_transfer`.
    pub metric_type: String,
    /// Whole percent.
    pub threshold_percent: i32,
    /// The billing period it belongs to.
    pub period_start: DateTime<Utc>,
    /// Usage when recorded, storage units.
    pub usage_quantity: i64,
    /// The limit, storage units.
    pub limit_quantity: i64,
    /// When recorded.
    pub created_at: DateTime<Utc>,
}

/// Alerts recorded since `since` (of `customer`, or all), newest first.
pub async fn list(
    db: impl PgExecutor<'_>,
    customer: Option<&str>,
    since: DateTime<Utc>,
) -> Result<Vec<Alert>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT id, customer_id, metric_type, threshold_percent, period_start, usage_quantity, \
             limit_quantity, created_at FROM usage_alerts \
         WHERE created_at >= $1 AND ($2::text IS NULL OR customer_id = $2) \
         ORDER BY created_at DESC, id DESC",
    )
    .bind(since)
    .bind(customer)
    .fetch_all(db)
    .await?)
}

/// A customer's count of alerts over a window (the guide's "check alert frequency").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AlertFrequency {
    /// Customer.
    pub customer_id: String,
    /// Alerts recorded in the window.
    pub alert_count: i64,
}

/// Customers with more than `more_than` alerts recorded since `since`, most first: the
/// guide's "High usage alert spam" query (`created_at >= NOW() - INTERVAL '7 days'`, `HAVING
/// COUNT(*) > 10`), with `since` and `more_than` for its constants. `apexctl` passes `since`
/// as now less 7 × 24 hours; the guide's `INTERVAL '7 days'` counts calendar days in the
/// session's time zone, which differs only across a daylight-saving change (by that hour),
/// and not at all in UTC, which our sessions use.
pub async fn frequency(
    db: impl PgExecutor<'_>,
    since: DateTime<Utc>,
    more_than: i64,
) -> Result<Vec<AlertFrequency>, BillingError> {
    Ok(sqlx::query_as(
        "SELECT customer_id, count(*) AS alert_count FROM usage_alerts \
         WHERE created_at >= $1 GROUP BY customer_id HAVING count(*) > $2 \
         ORDER BY alert_count DESC, customer_id",
    )
    .bind(since)
    .bind(more_than)
    .fetch_all(db)
    .await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn thresholds_are_the_guides_and_one_overage() {
        assert_eq!(Thresholds::default().percents(), [80, 90, 100, 110]);
        assert_eq!(
            Thresholds::new(vec![120, 80, 100]).unwrap().percents(),
            [80, 100, 120]
        );
        for bad in [vec![], vec![75], vec![110, 120], vec![80, 5000]] {
            assert!(Thresholds::new(bad.clone()).is_err(), "{bad:?}");
        }
        let env = EnvSource::from_pairs([(THRESHOLDS_VAR, "80,x")]);
        assert!(
            Thresholds::from_env(&env)
                .unwrap_err()
                .to_string()
                .contains(THRESHOLDS_VAR)
        );
        assert_eq!(Thresholds::email_type(110), "usage_alert_overage");
        assert_eq!(Thresholds::email_type(90), "usage_alert_90");
    }

    #[test]
    fn percents_round_down_and_a_zero_limit_is_full_once_used() {
        assert_eq!(floor_percent(799, 1000), 79);
        assert_eq!(floor_percent(800, 1000), 80);
        assert_eq!(floor_percent(1, 0), 100);
        assert_eq!(floor_percent(0, 0), 0);
        assert_eq!(floor_percent(i64::MAX, 1), i64::MAX);
    }
}
