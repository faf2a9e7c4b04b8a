//! The `maintenance` job against the real stores: pipeline batch records (ClickHouse markers,
//! Postgres batch rows) past the replay horizon go, except each log's newest, from which
//! replay resumes; `cron_runs` past its retention goes, except running rows; a second run
//! removes nothing more.

use std::time::{Duration as StdDuration, Instant};

use apex_core::env::EnvSource;
use apex_core::testing::TestStores;
use apex_cron::clock::Clock;
use apex_cron::jobs::{JobContext, Retention, jobs_from_env};
use apex_stripe::config::StripeConfig;
use chrono::{Duration, Utc};

async fn clickhouse_markers(stores: &TestStores) -> Vec<(String, u64)> {
    stores
        .config
        .clickhouse()
        .query("SELECT log_id, batch_id FROM pipeline_batches ORDER BY log_id, batch_id, state")
        .fetch_all()
        .await
        .unwrap()
}

async fn postgres_batches(stores: &TestStores) -> Vec<(String, i64)> {
    sqlx::query_as("SELECT log_id, batch_id FROM pipeline_batches ORDER BY log_id, batch_id")
        .fetch_all(&stores.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn maintenance_removes_what_is_past_its_horizon_and_keeps_each_logs_newest() {
    let stores = TestStores::migrated().await;
    let now = Utc::now();
    let old = (now - Duration::days(30)).timestamp();
    let recent = (now - Duration::days(1)).timestamp();
    // Log A: two old batches and a recent one. Log B: only old ones (its newest stays).
    for (log, batch, written) in [
        ("log_a", 0u64, old),
        ("log_a", 10, old),
        ("log_a", 20, recent),
        ("log_b", 0, old),
        ("log_b", 5, old),
    ] {
        for state in ["started", "done"] {
            stores
                .config
                .clickhouse()
                .query(
                    "INSERT INTO pipeline_batches (log_id, batch_id, end_position, rows, state, \
                         min_ts, max_ts, written_at) \
                     VALUES (?, ?, ?, 1, ?, toDateTime(0), toDateTime(0), toDateTime(?))",
                )
                .bind(log)
                .bind(batch)
                .bind(batch + 5)
                .bind(state)
                .bind(written)
                .execute()
                .await
                .unwrap();
        }
        sqlx::query(
            "INSERT INTO pipeline_batches (log_id, batch_id, end_position, record_count, applied_at) \
             VALUES ($1, $2, $3, 1, to_timestamp($4))",
        )
        .bind(log)
        .bind(batch as i64)
        .bind(batch as i64 + 5)
        .bind(written as f64)
        .execute(&stores.pool)
        .await
        .unwrap();
    }
    // Log C: more old batch rows than one delete removes (they go a chunk at a time).
    sqlx::query(
        "INSERT INTO pipeline_batches (log_id, batch_id, end_position, record_count, applied_at) \
         SELECT 'log_c', n * 10, n * 10 + 5, 1, to_timestamp($1) FROM generate_series(0, 24999) n",
    )
    .bind(old as f64)
    .execute(&stores.pool)
    .await
    .unwrap();
    for (job, days_ago, status) in [
        ("test_monthly", 120, "succeeded"),
        ("test_monthly", 95, "succeeded"),
        ("stripe_sync", 200, "succeeded"),
        ("stripe_sync", 100, "failed"),
        ("stripe_sync", 10, "succeeded"),
        ("maintenance", 150, "running"),
    ] {
        sqlx::query(
            "INSERT INTO cron_runs (job_name, scheduled_for, started_at, status) VALUES ($1, $2, $2, $3)",
        )
        .bind(job)
        .bind(now - Duration::days(days_ago))
        .bind(status)
        .execute(&stores.pool)
        .await
        .unwrap();
    }

    let ctx = JobContext {
        pool: stores.pool.clone(),
        stores: stores.config.clone(),
        stripe: StripeConfig::from_env(&EnvSource::from_pairs([])).unwrap(),
        stripe_rate: 50.0,
        clock: Clock::Wall,
        retention: Retention {
            marker_days: 7,
            history_days: 90,
        },
        invoicing: Default::default(),
        email: apex_notify::config::EmailConfig::from_env(&EnvSource::from_pairs([])).unwrap(),
        dunning: Default::default(),
        alert_thresholds: Default::default(),
        runner: "maintenance-test".into(),
    };
    let jobs = jobs_from_env(&EnvSource::from_pairs([])).unwrap();
    let maintenance = jobs.iter().find(|j| j.name == "maintenance").unwrap();
    let mut removed = Vec::new();
    for _ in 0..2 {
        let outcome = maintenance.run(&ctx).await;
        assert_eq!(outcome.error, None, "{outcome:?}");
        removed.push(outcome.details["postgres_batches_removed"].clone());
    }
    // 2 + 1 + 24,999 the first time, nothing the second.
    assert_eq!(removed, [serde_json::json!(25_002), serde_json::json!(0)]);

    assert_eq!(
        postgres_batches(&stores).await,
        [
            ("log_a".to_owned(), 20),
            ("log_b".to_owned(), 5),
            ("log_c".to_owned(), 249_990)
        ]
    );
    // ClickHouse applies its deletes in the background.
    let want = vec![
        ("log_a".to_owned(), 20),
        ("log_a".to_owned(), 20),
        ("log_b".to_owned(), 5),
        ("log_b".to_owned(), 5),
    ];
    let deadline = Instant::now() + StdDuration::from_secs(30);
    while clickhouse_markers(&stores).await != want {
        assert!(
            Instant::now() < deadline,
            "markers left: {:?}",
            clickhouse_markers(&stores).await
        );
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    let runs: Vec<(String, String)> =
        sqlx::query_as("SELECT job_name, status FROM cron_runs ORDER BY scheduled_for")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    // Past the retention: all but the running row and each job's newest (which tells a
    // monthly job's catch-up that it was scheduled before).
    assert_eq!(
        runs,
        [
            ("maintenance".to_owned(), "running".to_owned()),
            ("test_monthly".to_owned(), "succeeded".to_owned()),
            ("stripe_sync".to_owned(), "succeeded".to_owned()),
        ]
    );
}
