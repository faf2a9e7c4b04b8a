//! The hourly usage check against the real Postgres, on a simulated clock: each threshold
//! fires once as usage grows through a month, a jump past several sends one email for the
//! highest (with the overage's cost), the next period starts fresh, an unlimited metric and a
//! suspended customer never alert, the figures are the limits endpoint's, and the guide's
//! "alert spam" query stays empty for heavy usage across a whole month.

use apex_billing::alerts::{self, Thresholds};
use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::statement;
use apex_core::testing::TestStores;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::Value;
use sqlx::{AssertSqlSafe, Row};

async fn customer(stores: &TestStores, plan: &str) -> String {
    create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: "Acme Games".into(),
            email: "billing@acme.example".into(),
            plan_id: plan.into(),
            trial_days: Some(0),
        },
        Utc::now(),
    )
    .await
    .unwrap()
    .customer
    .id
}

/// Adds `quantity` of `metric` to the customer's rollup of the hour starting at `hour`.
async fn usage(
    stores: &TestStores,
    customer: &str,
    metric: &str,
    hour: DateTime<Utc>,
    quantity: i64,
) {
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         VALUES ($1, $2, date_trunc('hour', $3), $4) \
         ON CONFLICT (customer_id, metric_type, recorded_at) \
         DO UPDATE SET quantity = usage_records.quantity + EXCLUDED.quantity",
    )
    .bind(customer)
    .bind(metric)
    .bind(hour)
    .bind(quantity)
    .execute(&stores.pool)
    .await
    .unwrap();
}

async fn check(stores: &TestStores, now: DateTime<Utc>) -> alerts::CheckSummary {
    alerts::check_usage_limits(
        &mut stores.pool.acquire().await.unwrap(),
        &Thresholds::default(),
        now,
    )
    .await
    .unwrap()
}

/// (metric, threshold, period start day) of a customer's alerts, oldest first.
async fn recorded(stores: &TestStores, customer: &str) -> Vec<(String, i32, NaiveDate)> {
    sqlx::query_as::<_, (String, i32, DateTime<Utc>)>(
        "SELECT metric_type, threshold_percent, period_start FROM usage_alerts \
         WHERE customer_id = $1 ORDER BY created_at, threshold_percent",
    )
    .bind(customer)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
    .into_iter()
    .map(|(m, t, p)| (m, t, p.date_naive()))
    .collect()
}

/// The alert emails of a customer, oldest first: (type, data).
async fn emails(stores: &TestStores, customer: &str) -> Vec<(String, Value)> {
    sqlx::query_as(
        "SELECT event_type, data FROM events WHERE data->>'customer_id' = $1 \
           AND event_type LIKE 'email.usage_alert%' ORDER BY id",
    )
    .bind(customer)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

#[tokio::test]
async fn each_threshold_fires_once_as_usage_grows_through_a_month() {
    let stores = TestStores::migrated().await;
    let growing = customer(&stores, "starter").await;
    // 40,000 impressions a day against Starter's 1,000,000: 80 % on the 20th, 90 % on the
    // 23rd, 100 % on the 25th, 110 % on the 28th. The check runs every hour (and twice at
    // noon: a second run changes nothing).
    let start = at("2026-03-01T00:00:00Z");
    let mut first_seen = Vec::new();
    for day in 0..31 {
        let noon = start + Duration::days(day) + Duration::hours(12);
        usage(&stores, &growing, "impressions", noon, 40_000).await;
        for hour in [0, 12, 12, 23] {
            let now = start + Duration::days(day) + Duration::hours(hour) + Duration::minutes(5);
            let summary = check(&stores, now).await;
            for (threshold, n) in summary.alerts_recorded {
                first_seen.push((day + 1, threshold, n));
            }
        }
    }
    assert_eq!(
        first_seen,
        [(20, 80, 1), (23, 90, 1), (25, 100, 1), (28, 110, 1)]
    );
    let sent: Vec<String> = emails(&stores, &growing)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(
        sent,
        [
            "email.usage_alert_80",
            "email.usage_alert_90",
            "email.usage_alert_100",
            "email.usage_alert_overage"
        ]
    );
    // What was recorded is the usage when each threshold was crossed.
    let (used, limit): (i64, i64) = sqlx::query_as(
        "SELECT usage_quantity, limit_quantity FROM usage_alerts \
         WHERE customer_id = $1 AND threshold_percent = 110",
    )
    .bind(&growing)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!((used, limit), (1_120_000, 1_000_000));
}

#[tokio::test]
async fn a_jump_past_several_thresholds_records_them_all_and_emails_the_highest() {
    let stores = TestStores::migrated().await;
    let jumper = customer(&stores, "starter").await;
    let now = at("2026-05-10T10:05:00Z");
    usage(
        &stores,
        &jumper,
        "impressions",
        now - Duration::days(2),
        500_000,
    )
    .await;
    check(&stores, now - Duration::days(1)).await;
    assert!(
        recorded(&stores, &jumper).await.is_empty(),
        "50 % alerts nothing"
    );
    usage(
        &stores,
        &jumper,
        "impressions",
        now - Duration::minutes(30),
        700_000,
    )
    .await;
    let summary = check(&stores, now).await;
    assert_eq!(summary.emails_enqueued, 1);
    let day = NaiveDate::from_ymd_opt(2026, 5, 1).unwrap();
    assert_eq!(
        recorded(&stores, &jumper).await,
        [80, 90, 100, 110].map(|t| ("impressions".to_owned(), t, day))
    );
    let sent = emails(&stores, &jumper).await;
    assert_eq!(sent.len(), 1);
    let (kind, data) = &sent[0];
    assert_eq!(kind, "email.usage_alert_overage");
    assert_eq!(data["percent"], 120);
    assert_eq!(data["used"], 1_200_000);
    assert_eq!(data["limit"], 1_000_000);
    // 200,000 over, in blocks of 1,000 at 10 cents.
    assert_eq!(data["overage_cost_cents"], 2_000);
    assert_eq!(data["period_end"], "2026-05-31");
    assert_eq!(data["to"], "billing@acme.example");
    // The same figures as the limits endpoint.
    let limits = statement::limits(&mut stores.pool.acquire().await.unwrap(), &jumper, now)
        .await
        .unwrap();
    assert_eq!(limits.percent_used_by_metric["impressions"], 120);

    // The next month starts fresh: 85 % alerts at 80 again, once.
    let june = at("2026-06-20T10:05:00Z");
    usage(
        &stores,
        &jumper,
        "impressions",
        june - Duration::hours(2),
        850_000,
    )
    .await;
    check(&stores, june).await;
    check(&stores, june + Duration::hours(1)).await;
    let june_day = NaiveDate::from_ymd_opt(2026, 6, 1).unwrap();
    let alerts = recorded(&stores, &jumper).await;
    assert_eq!(alerts.len(), 5);
    assert_eq!(alerts[4], ("impressions".to_owned(), 80, june_day));
    assert_eq!(emails(&stores, &jumper).await.len(), 2);
}

#[tokio::test]
async fn unlimited_metrics_and_suspended_customers_never_alert() {
    let stores = TestStores::migrated().await;
    let unlimited = customer(&stores, "enterprise").await;
    let suspended = customer(&stores, "starter").await;
    sqlx::query("UPDATE customers SET status = 'suspended' WHERE id = $1")
        .bind(&suspended)
        .execute(&stores.pool)
        .await
        .unwrap();
    let now = at("2026-07-15T12:00:00Z");
    for c in [&unlimited, &suspended] {
        usage(
            &stores,
            c,
            "impressions",
            now - Duration::hours(3),
            50_000_000_000,
        )
        .await;
        usage(
            &stores,
            c,
            "api_calls",
            now - Duration::hours(3),
            50_000_000_000,
        )
        .await;
    }
    check(&stores, now).await;
    assert!(recorded(&stores, &unlimited).await.is_empty());
    assert!(recorded(&stores, &suspended).await.is_empty());
    // Data transfer is alerted in GB, as the limits endpoint shows it.
    let transfer = customer(&stores, "starter").await;
    usage(
        &stores,
        &transfer,
        "data_transfer",
        now - Duration::hours(3),
        45_500_000_000,
    )
    .await;
    check(&stores, now).await;
    let sent = emails(&stores, &transfer).await;
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].0, "email.usage_alert_90");
    assert_eq!(sent[0].1["metric"], "data_transfer_gb");
    assert_eq!(sent[0].1["used"], 45.5);
    assert_eq!(sent[0].1["limit"], 50.0);
}

#[tokio::test]
async fn the_guides_alert_spam_query_stays_empty_for_a_month_of_heavy_usage() {
    let stores = TestStores::migrated().await;
    let heavy = customer(&stores, "starter").await;
    // March, checked every hour: impressions and API calls grow to 150 % of their limits,
    // data transfer stays low. (A customer heavy on all three limited metrics at once can
    // cross all twelve thresholds within a week: see the README.)
    let start = at("2026-03-01T00:00:00Z");
    let end = at("2026-04-01T00:00:00Z");
    let mut now = start;
    let mut worst = 0;
    while now < end {
        usage(&stores, &heavy, "impressions", now, 2_017).await;
        usage(&stores, &heavy, "api_calls", now, 202).await;
        usage(&stores, &heavy, "data_transfer", now, 1_000_000).await;
        let checked_at = now + Duration::minutes(5);
        check(&stores, checked_at).await;
        // The guide's query, with the simulated time in place of NOW().
        let spam = std::fs::read_to_string(
            apex_core::testing::package_dir()
                .join("tests/fixtures/ops-guide-sql/12_alert_frequency.sql"),
        )
        .unwrap()
        .replace(
            "NOW()",
            &format!("'{}'::timestamptz", checked_at.to_rfc3339()),
        );
        if now.format("%H").to_string() == "23" {
            let rows = sqlx::raw_sql(AssertSqlSafe(spam))
                .fetch_all(&stores.pool)
                .await
                .unwrap();
            let flagged: Vec<String> = rows.iter().map(|r| r.get("customer_id")).collect();
            assert!(flagged.is_empty(), "{now}: {flagged:?}");
            let in_week: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM usage_alerts WHERE customer_id = $1 \
                   AND created_at >= $2 - interval '7 days'",
            )
            .bind(&heavy)
            .bind(checked_at)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
            worst = worst.max(in_week);
        }
        now += Duration::hours(1);
    }
    // Both heavy metrics crossed all four thresholds, within a week of each other.
    let total: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_alerts WHERE customer_id = $1")
        .bind(&heavy)
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(total, 8);
    assert_eq!(worst, 8);
}
