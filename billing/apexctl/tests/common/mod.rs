//! Support shared by the `apexctl` tests: the binary, pointed at a test's own databases, and
//! usage written into them as the pipeline writes it.

use std::process::Command;
use std::sync::Arc;

use apex_core::model::{Metric, UsageRecord};
use apex_core::testing::TestStores;
use apex_pipeline::clickhouse_sink::{self, Progress};
use apex_pipeline::postgres_sink;
use apex_pipeline::store::Batch;
use chrono::{DateTime, NaiveDate, Utc};

/// The `apexctl` binary pointed at the test's own databases, with no other settings from
/// the environment that could change what it does.
pub(crate) fn apexctl_command(stores: &TestStores) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apexctl"));
    command
        .env("DATABASE_URL", &stores.config.database_url)
        .env("CLICKHOUSE_URL", &stores.config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &stores.config.clickhouse_database)
        .env_remove("APEX_JWT_SECRET")
        .env_remove("STRIPE_SECRET_KEY")
        .env_remove("STRIPE_API_BASE")
        .env_remove("APEX_CLOCK_START")
        .env_remove("APEX_CLOCK_SPEED")
        .env_remove("APEX_CLOCK_EPOCH")
        .env_remove("APEX_CRON_TEST_JOBS")
        .env("EMAIL_PROVIDER", "file")
        .env_remove("EMAIL_DAILY_CAP")
        .env_remove("EMAIL_MONTHLY_CAP")
        .env(
            "EMAIL_FILE_DIR",
            std::env::temp_dir().join(format!("{}_mail", stores.name)),
        );
    command
}

/// Writes `records` as one pipeline batch of `log_id` through both store writers (the
/// ClickHouse markers and rows, the Postgres rollups with their batch row), as the appliers
/// do; `position` is the log position, moved past the batch.
#[allow(dead_code)] // Not every test binary that includes this module writes usage.
pub(crate) async fn write_usage(
    stores: &TestStores,
    log_id: &str,
    position: &mut u64,
    records: &[UsageRecord],
) {
    let batch = Batch {
        log_id,
        start: *position,
        end: *position + 100 * records.len() as u64,
        records,
    };
    clickhouse_sink::write_batch(
        &stores.config.clickhouse(),
        &batch,
        &mut Progress::default(),
    )
    .await
    .unwrap();
    postgres_sink::apply_batch(&mut stores.pool.acquire().await.unwrap(), &batch)
        .await
        .unwrap();
    *position = batch.end;
}

/// A usage record of `quantity` at `at`, received then.
#[allow(dead_code)]
pub(crate) fn record(
    customer: &str,
    metric: Metric,
    quantity: u64,
    at: DateTime<Utc>,
) -> UsageRecord {
    UsageRecord {
        customer_id: Arc::from(customer),
        metric,
        quantity,
        event_id: None,
        timestamp_ms: at.timestamp_millis(),
        received_ms: at.timestamp_millis(),
        metadata: None,
    }
}

/// `hour`:00 UTC of `day`.
#[allow(dead_code)]
pub(crate) fn at(day: NaiveDate, hour: u32) -> DateTime<Utc> {
    day.and_hms_opt(hour, 0, 0).unwrap().and_utc()
}
