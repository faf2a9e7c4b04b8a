//! The durable pipeline against the stack's real Postgres: acknowledged records reach the
//! rollups exactly once, including after a restart with the log not yet applied, after a
//! replay of a log already applied, and with Postgres unreachable until the log fills.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apex_pipeline::durable::{DurableConfig, DurableSink};
use apex_pipeline::model::{Metric, UsageRecord};
use apex_pipeline::sink::{RecordSink, SinkError};
use apex_pipeline::testing::TestStores;

fn wal_dir(stores: &TestStores, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("{}_{name}", stores.name));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn records(customer: &str, n: usize, quantity: u64) -> Vec<UsageRecord> {
    let now = chrono::Utc::now().timestamp_millis();
    (0..n)
        .map(|i| UsageRecord {
            customer_id: customer.into(),
            metric: Metric::Impressions,
            quantity,
            event_id: Some(format!("e{i}").into()),
            timestamp_ms: now,
            received_ms: now,
            metadata: None,
        })
        .collect()
}

async fn submit_all(
    sink: &Arc<DurableSink>,
    customer: &str,
    requests: usize,
    per_request: usize,
) -> u64 {
    let mut acks = Vec::new();
    for _ in 0..requests {
        acks.push(
            sink.submit(records(customer, per_request, 3))
                .expect("queue has room"),
        );
    }
    let mut acknowledged = 0;
    for ack in acks {
        ack.await.unwrap().unwrap();
        acknowledged += (per_request * 3) as u64;
    }
    acknowledged
}

async fn total(stores: &TestStores, customer: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(quantity)::bigint FROM usage_records WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
    .unwrap_or(0)
}

async fn wait_applied(sink: &DurableSink) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while sink.applied_position() < sink.durable_position() {
        assert!(Instant::now() < deadline, "the applier did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn unreachable_postgres() -> &'static str {
    "postgres://postgres@127.0.0.1:1/none"
}

#[tokio::test]
async fn acknowledged_records_reach_postgres_exactly_once() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "once");
    let sink = DurableSink::start(&DurableConfig::new(&dir, &stores.config.database_url)).unwrap();
    let acknowledged = submit_all(&sink, "cus_once", 200, 50).await;
    wait_applied(&sink).await;
    assert_eq!(total(&stores, "cus_once").await, acknowledged as i64);
    let log_id = sink.log_id().to_owned();
    tokio::task::spawn_blocking({
        let sink = sink.clone();
        move || sink.shutdown()
    })
    .await
    .unwrap();

    // Opening the same log again replays nothing: Postgres' watermark covers it all.
    let again = DurableSink::start(&DurableConfig::new(&dir, &stores.config.database_url)).unwrap();
    assert_eq!(again.log_id(), log_id);
    wait_applied(&again).await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(total(&stores, "cus_once").await, acknowledged as i64);
    tokio::task::spawn_blocking(move || again.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_log_left_unapplied_is_replayed_at_the_next_start() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "replay");
    // Postgres unreachable: everything is acknowledged from the log alone.
    let mut config = DurableConfig::new(&dir, unreachable_postgres());
    config.shutdown_apply_budget = Duration::from_millis(200);
    let offline = DurableSink::start(&config).unwrap();
    let acknowledged = submit_all(&offline, "cus_replay", 100, 20).await;
    tokio::task::spawn_blocking(move || offline.shutdown())
        .await
        .unwrap();
    assert_eq!(total(&stores, "cus_replay").await, 0);

    let online =
        DurableSink::start(&DurableConfig::new(&dir, &stores.config.database_url)).unwrap();
    wait_applied(&online).await;
    assert_eq!(total(&stores, "cus_replay").await, acknowledged as i64);
    tokio::task::spawn_blocking(move || online.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_log_refuses_then_recovers_when_postgres_is_back() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "full");
    let mut config = DurableConfig::new(&dir, unreachable_postgres());
    config.segment_bytes = 64 * 1024;
    config.max_log_bytes = 256 * 1024;
    config.shutdown_apply_budget = Duration::from_millis(200);
    let offline = DurableSink::start(&config).unwrap();
    let mut acknowledged = 0u64;
    let mut refused = false;
    for _ in 0..1_000 {
        match offline.submit(records("cus_full", 100, 1)) {
            Ok(ack) => {
                ack.await.unwrap().unwrap();
                acknowledged += 100;
            }
            Err(SinkError::Full) => {
                refused = true;
                break;
            }
            Err(other) => panic!("{other}"),
        }
    }
    assert!(refused, "the log never filled");
    tokio::task::spawn_blocking(move || offline.shutdown())
        .await
        .unwrap();

    config.database_url = stores.config.database_url.clone();
    let online = DurableSink::start(&config).unwrap();
    wait_applied(&online).await;
    assert_eq!(total(&stores, "cus_full").await, acknowledged as i64);
    // Applied segments are deleted, so the log takes records again.
    let ack = online
        .submit(records("cus_full", 10, 1))
        .expect("room again");
    ack.await.unwrap().unwrap();
    wait_applied(&online).await;
    assert_eq!(total(&stores, "cus_full").await, acknowledged as i64 + 10);
    tokio::task::spawn_blocking(move || online.shutdown())
        .await
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
