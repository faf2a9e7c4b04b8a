//! The durable pipeline against the stack's real Postgres and ClickHouse: acknowledged records
//! reach both stores exactly once, including after a restart with the log not yet applied,
//! after a replay of a log already applied, with either store cut off for 30 s under load
//! (through a proxy, so other tests keep the shared servers), and with the stores unreachable
//! until the log fills.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apex_pipeline::durable::{DurableConfig, DurableSink};
use apex_pipeline::model::{Metric, UsageRecord};
use apex_pipeline::sink::{RecordSink, SinkError};
use apex_pipeline::testing::{Proxy, TestStores, address_of, with_address};

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
            metadata: Some(r#"{"sdk":"ios"}"#.into()),
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

async fn wait_applied(sink: &DurableSink) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while sink.applied_position() < sink.durable_position() {
        assert!(Instant::now() < deadline, "the appliers did not catch up");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Both stores hold exactly `expected` (sum of quantity) for `customer`, each record once.
async fn assert_exact(stores: &TestStores, customer: &str, expected: u64, quantity: u64) {
    assert_eq!(stores.postgres_total(customer).await, expected, "Postgres");
    assert_eq!(
        stores.clickhouse_events(customer).await,
        (expected / quantity, expected),
        "ClickHouse usage_events (rows, sum)"
    );
    assert_eq!(
        stores.clickhouse_daily_total(customer).await,
        expected,
        "ClickHouse usage_daily"
    );
}

async fn shut(sink: Arc<DurableSink>) {
    tokio::task::spawn_blocking(move || sink.shutdown())
        .await
        .unwrap();
}

fn offline(stores: &TestStores, dir: &std::path::Path) -> DurableConfig {
    let mut config = DurableConfig::new(dir, &stores.config);
    config.stores.database_url = "postgres://postgres@127.0.0.1:1/none".into();
    config.stores.clickhouse_url = "http://127.0.0.1:1".into();
    config.shutdown_apply_budget = Duration::from_millis(200);
    config
}

#[tokio::test]
async fn acknowledged_records_reach_both_stores_exactly_once() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "once");
    let sink = DurableSink::start(&DurableConfig::new(&dir, &stores.config)).unwrap();
    let acknowledged = submit_all(&sink, "cus_once", 200, 50).await;
    wait_applied(&sink).await;
    assert_exact(&stores, "cus_once", acknowledged, 3).await;
    let log_id = sink.log_id().to_owned();
    shut(sink).await;

    // Opening the same log again replays nothing: both watermarks cover it all.
    let again = DurableSink::start(&DurableConfig::new(&dir, &stores.config)).unwrap();
    assert_eq!(again.log_id(), log_id);
    wait_applied(&again).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_exact(&stores, "cus_once", acknowledged, 3).await;
    shut(again).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_log_left_unapplied_is_replayed_at_the_next_start() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "replay");
    // Both stores unreachable: everything is acknowledged from the log alone.
    let sink = DurableSink::start(&offline(&stores, &dir)).unwrap();
    let acknowledged = submit_all(&sink, "cus_replay", 100, 20).await;
    shut(sink).await;
    assert_exact(&stores, "cus_replay", 0, 3).await;

    let online = DurableSink::start(&DurableConfig::new(&dir, &stores.config)).unwrap();
    let mut logged = 0;
    online.replay_event_ids(&mut |customer, _| {
        assert_eq!(customer, "cus_replay");
        logged += 1;
    });
    assert_eq!(
        logged,
        100 * 20,
        "every logged event id is offered to the dedup"
    );
    wait_applied(&online).await;
    assert_exact(&stores, "cus_replay", acknowledged, 3).await;
    shut(online).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_full_log_refuses_then_recovers_when_the_stores_are_back() {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, "full");
    let mut config = offline(&stores, &dir);
    config.segment_bytes = 64 * 1024;
    config.max_log_bytes = 256 * 1024;
    let sink = DurableSink::start(&config).unwrap();
    let mut acknowledged = 0u64;
    let mut refused = false;
    for _ in 0..1_000 {
        match sink.submit(records("cus_full", 100, 1)) {
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
    shut(sink).await;

    config.stores = stores.config.clone();
    let online = DurableSink::start(&config).unwrap();
    wait_applied(&online).await;
    assert_exact(&stores, "cus_full", acknowledged, 1).await;
    // Applied segments are deleted, so the log takes records again.
    let ack = online
        .submit(records("cus_full", 10, 1))
        .expect("room again");
    ack.await.unwrap().unwrap();
    wait_applied(&online).await;
    assert_exact(&stores, "cus_full", acknowledged + 10, 1).await;
    shut(online).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Submits 100-record requests for 36 s with the `down` store cut off from second 2 to 32:
/// every request is acknowledged throughout, the cut store really falls behind, and after
/// it is back both stores hold exactly what was acknowledged.
async fn load_through_an_outage(down: &str) {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, down);
    let mut config = DurableConfig::new(&dir, &stores.config);
    let proxy = if down == "postgres" {
        let proxy = Proxy::start(address_of(&stores.config.database_url)).await;
        config.stores.database_url = with_address(&stores.config.database_url, proxy.addr);
        proxy
    } else {
        let proxy = Proxy::start(address_of(&stores.config.clickhouse_url)).await;
        config.stores.clickhouse_url = with_address(&stores.config.clickhouse_url, proxy.addr);
        proxy
    };
    let sink = DurableSink::start(&config).unwrap();
    let customer = format!("cus_outage_{down}");
    let started = Instant::now();
    let (outage_from, outage_to, run) = (
        Duration::from_secs(2),
        Duration::from_secs(32),
        Duration::from_secs(36),
    );
    let mut acknowledged = 0u64;
    let mut acknowledged_during_outage = 0u64;
    let mut fell_behind = false;
    while started.elapsed() < run {
        let at = started.elapsed();
        proxy.set_down(at >= outage_from && at < outage_to);
        let ack = sink
            .submit(records(&customer, 100, 2))
            .expect("the log takes records while a store is down");
        ack.await
            .unwrap()
            .expect("acknowledged while a store is down");
        acknowledged += 200;
        if at >= outage_from + Duration::from_secs(1) && at < outage_to {
            acknowledged_during_outage += 200;
        }
        if at >= outage_from + Duration::from_secs(10) && at < outage_to {
            let position = if down == "postgres" {
                sink.postgres_position()
            } else {
                sink.clickhouse_position()
            };
            fell_behind |= position < sink.durable_position();
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        acknowledged_during_outage > 0,
        "nothing was acknowledged during the outage"
    );
    assert!(
        fell_behind,
        "the {down} applier kept up: the outage did not happen"
    );
    proxy.set_down(false);
    wait_applied(&sink).await;
    assert_exact(&stores, &customer, acknowledged, 2).await;
    shut(sink).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clickhouse_down_for_30_s_under_load_loses_nothing() {
    load_through_an_outage("clickhouse").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_down_for_30_s_under_load_loses_nothing() {
    load_through_an_outage("postgres").await;
}
