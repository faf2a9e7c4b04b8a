//! Migrations against the real Postgres and ClickHouse of the local stack: they apply to
//! empty databases, a second run changes nothing, and the ClickHouse rollup is fed by its view.

use apex_core::migrate::{
    CLICKHOUSE_MIGRATIONS, PostgresStatus, migrate_clickhouse, migrate_postgres, postgres_status,
};
use apex_core::testing::TestStores;

const POSTGRES_TABLES: &[&str] = &[
    "api_keys",
    "cron_runs",
    "customer_addons",
    "customers",
    "dunning_attempts",
    "email_log",
    "email_opt_outs",
    "email_suppressions",
    "events",
    "invoice_lines",
    "invoice_reviews",
    "invoices",
    "mediated_revenue",
    "pipeline_batches",
    "plan_limits",
    "plans",
    "resend_events",
    "stripe_events",
    "stripe_meters",
    "stripe_plans",
    "stripe_usage_sync",
    "subscriptions",
    "usage_alerts",
    "usage_records",
];

async fn postgres_tables(stores: &TestStores) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' AND table_name <> '_sqlx_migrations' ORDER BY 1",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn postgres_migrations_apply_once() {
    let stores = TestStores::empty().await;
    assert!(postgres_tables(&stores).await.is_empty());

    let files = apex_core::testing::migration_file_versions("postgres");
    let status = postgres_status(&stores.pool).await.unwrap();
    assert_eq!(
        status,
        PostgresStatus {
            known: files.clone(),
            pending: files.clone(),
            ..PostgresStatus::default()
        }
    );
    assert!(
        postgres_tables(&stores).await.is_empty(),
        "reading the status creates nothing"
    );

    assert_eq!(migrate_postgres(&stores.pool).await.unwrap(), files);
    assert_eq!(postgres_tables(&stores).await, POSTGRES_TABLES);
    let status = postgres_status(&stores.pool).await.unwrap();
    assert!(status.is_current(), "{status:?}");
    assert_eq!(status.known, files);
    let applied: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    let plans: i64 = sqlx::query_scalar("SELECT count(*) FROM plans")
        .fetch_one(&stores.pool)
        .await
        .unwrap();

    assert_eq!(
        migrate_postgres(&stores.pool).await.unwrap(),
        Vec::<i64>::new()
    );
    let again: Vec<(i64, Vec<u8>)> =
        sqlx::query_as("SELECT version, checksum FROM _sqlx_migrations ORDER BY version")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    assert_eq!(applied, again, "a second run must not apply anything");
    let plans_again: i64 = sqlx::query_scalar("SELECT count(*) FROM plans")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!((plans, plans_again), (4, 4), "seed data is inserted once");
}

/// The status tells the four ways a schema differs from the build: a migration not applied,
/// one edited after it was applied, one that failed part-way, one this build does not know.
#[tokio::test]
async fn postgres_status_names_pending_changed_dirty_and_unknown_migrations() {
    let stores = TestStores::migrated().await;
    let files = apex_core::testing::migration_file_versions("postgres");
    let (first, last) = (files[0], *files.last().unwrap());
    for sql in [
        format!("DELETE FROM _sqlx_migrations WHERE version = {last}"),
        format!("UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = {first}"),
        "UPDATE _sqlx_migrations SET success = false WHERE version = 2".to_owned(),
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         VALUES (9999, 'from a newer build', true, '\\x00', 1)"
            .to_owned(),
    ] {
        sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
            .execute(&stores.pool)
            .await
            .unwrap();
    }
    let status = postgres_status(&stores.pool).await.unwrap();
    assert_eq!(
        status,
        PostgresStatus {
            known: files.clone(),
            pending: vec![last],
            unknown: vec![9999],
            dirty: vec![2],
            changed: vec![first],
        }
    );
    assert!(!status.is_current());
}

#[tokio::test]
async fn clickhouse_migrations_apply_once_and_feed_the_daily_rollup() {
    let stores = TestStores::empty().await;
    let first = migrate_clickhouse(&stores.config).await.unwrap();
    let all: Vec<u32> = CLICKHOUSE_MIGRATIONS.iter().map(|m| m.version).collect();
    assert_eq!(first, all);
    assert_eq!(
        migrate_clickhouse(&stores.config).await.unwrap(),
        Vec::<u32>::new()
    );

    let ch = stores.config.clickhouse();
    let tables: Vec<String> = ch
        .query("SELECT name FROM system.tables WHERE database = ? ORDER BY name")
        .bind(&stores.name)
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        tables,
        [
            "pipeline_batches",
            "schema_migrations",
            "usage_daily",
            "usage_daily_mv",
            "usage_events"
        ]
    );
    let recorded: u64 = ch
        .query("SELECT count() FROM schema_migrations")
        .fetch_one()
        .await
        .unwrap();
    assert_eq!(recorded, all.len() as u64);

    // Two records on one day and one the next: the view sums them per day.
    ch.query(
        "INSERT INTO usage_events (customer_id, metric_type, quantity, event_id, batch_id, ts, received_at, metadata) VALUES \
         ('cus_a', 'impressions', 5, 'e1', 1, toDateTime('2026-11-01 10:00:00'), now(), ''), \
         ('cus_a', 'impressions', 7, 'e2', 1, toDateTime('2026-11-01 23:59:59'), now(), ''), \
         ('cus_a', 'data_transfer', 1500000000, 'e3', 1, toDateTime('2026-11-02 00:00:00'), now(), '')",
    )
    .execute()
    .await
    .unwrap();
    let daily: Vec<(String, String, u64)> = ch
        .query(
            "SELECT toString(day), toString(metric_type), sum(quantity) FROM usage_daily \
             GROUP BY day, metric_type ORDER BY day, metric_type",
        )
        .fetch_all()
        .await
        .unwrap();
    assert_eq!(
        daily,
        [
            ("2026-11-01".to_owned(), "impressions".to_owned(), 12),
            (
                "2026-11-02".to_owned(),
                "data_transfer".to_owned(),
                1_500_000_000
            ),
        ]
    );
}

#[tokio::test]
async fn schema_refuses_what_billing_must_never_hold() {
    let stores = TestStores::migrated().await;
    let db = &stores.pool;
    sqlx::query("INSERT INTO customers (id, name, email) VALUES ('cus_schema', 'S', 's@x.io')")
        .execute(db)
        .await
        .unwrap();
    for bad in [
        // Quantities are non-negative integers; rollup rows sit on hour boundaries.
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) VALUES ('cus_schema', 'impressions', '2026-11-01 10:00Z', -1)",
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) VALUES ('cus_schema', 'impressions', '2026-11-01 10:30Z', 1)",
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) VALUES ('cus_schema', 'clicks', '2026-11-01 10:00Z', 1)",
        // A key hash is exactly 32 bytes, and a revoked key carries its revocation time.
        "INSERT INTO api_keys (id, customer_id, key_hash, prefix) VALUES ('key_a', 'cus_schema', '\\x00', 'rsk_')",
        "INSERT INTO api_keys (id, customer_id, key_hash, prefix, status) VALUES ('key_b', 'cus_schema', decode(repeat('ab', 32), 'hex'), 'rsk_', 'revoked')",
        // Statuses are closed sets.
        "UPDATE customers SET status = 'paused' WHERE id = 'cus_schema'",
        "INSERT INTO subscriptions (customer_id, plan_id, status) VALUES ('cus_schema', 'starter', 'weird')",
        // A customer has one live subscription at a time.
        "INSERT INTO subscriptions (customer_id, plan_id, status) VALUES ('cus_schema', 'starter', 'active'), ('cus_schema', 'growth', 'active')",
    ] {
        assert!(
            sqlx::raw_sql(sqlx::AssertSqlSafe(bad))
                .execute(db)
                .await
                .is_err(),
            "accepted: {bad}"
        );
    }
}
