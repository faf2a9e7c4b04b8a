//! The durable pipeline against the stack's real Postgres and ClickHouse: acknowledged records
//! reach both stores exactly once, including after a restart with the log not yet applied,
//! after a replay of a log already applied, with either store cut off for 30 s under load
//! (through a proxy, so other tests keep the shared servers), and with the stores unreachable
//! until the log fills.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use apex_core::model::{Metric, UsageRecord};
use apex_core::testing::{Proxy, TestStores, address_of, with_address};
use apex_pipeline::durable::{DurableConfig, DurableSink};
use apex_pipeline::sink::{RecordSink, SinkError};

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

/// Waits until the sink reports `store` stuck, and returns what it says.
async fn wait_stuck(sink: &DurableSink, store: &str) -> apex_pipeline::sink::StuckStore {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(stuck) = sink.stuck_stores().into_iter().find(|s| s.store == store) {
            return stuck;
        }
        assert!(
            Instant::now() < deadline,
            "{store} was never reported stuck"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A schema fault in one store (`break_sql` run on it) is permanent: that store's batch is
/// parked, not retried in a loop, while the other store receives every record; the log keeps
/// the batch; after `fix_sql` and a restart, the parked batch and everything after it land
/// exactly once.
async fn a_permanent_error_parks_until_fixed_and_restarted(
    store: &str,
    break_sql: &str,
    fix_sql: &str,
) {
    let stores = TestStores::migrated().await;
    let dir = wal_dir(&stores, &format!("parked_{store}"));
    let run = |sql: String| {
        let stores = &stores;
        async move {
            if store == "postgres" {
                sqlx::raw_sql(sqlx::AssertSqlSafe(sql))
                    .execute(&stores.pool)
                    .await
                    .unwrap();
            } else {
                stores
                    .config
                    .clickhouse()
                    .query(&sql)
                    .execute()
                    .await
                    .unwrap();
            }
        }
    };
    let customer = format!("cus_parked_{store}");
    let sink = DurableSink::start(&DurableConfig::new(&dir, &stores.config)).unwrap();
    let before = submit_all(&sink, &customer, 5, 10).await;
    wait_applied(&sink).await;
    run(break_sql.to_owned()).await;

    let during = submit_all(&sink, &customer, 5, 10).await;
    let stuck = wait_stuck(&sink, store).await;
    assert!(stuck.batch_id.is_some_and(|b| b > 0), "{stuck:?}");
    let (stuck_position, other_position) = if store == "postgres" {
        (sink.postgres_position(), sink.clickhouse_position())
    } else {
        (sink.clickhouse_position(), sink.postgres_position())
    };
    assert_eq!(
        Some(stuck_position),
        stuck.batch_id,
        "parked where it stopped"
    );
    // The other store is not held back.
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut other = other_position;
    while other < sink.durable_position() {
        assert!(Instant::now() < deadline, "the other store fell behind");
        tokio::time::sleep(Duration::from_millis(20)).await;
        other = if store == "postgres" {
            sink.clickhouse_position()
        } else {
            sink.postgres_position()
        };
    }
    if store == "postgres" {
        assert_eq!(
            stores.clickhouse_events(&customer).await.1,
            before + during,
            "ClickHouse has everything"
        );
    } else {
        assert_eq!(
            stores.postgres_total(&customer).await,
            before + during,
            "Postgres has everything"
        );
    }
    // Parked: it stays where it stopped, and the log keeps the batch.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        sink.stuck_stores().len(),
        1,
        "only {store} is stuck: {:?}",
        sink.stuck_stores()
    );
    shut(sink).await;

    run(fix_sql.to_owned()).await;
    let again = DurableSink::start(&DurableConfig::new(&dir, &stores.config)).unwrap();
    let after = submit_all(&again, &customer, 2, 10).await;
    wait_applied(&again).await;
    assert!(again.stuck_stores().is_empty());
    assert_exact(&stores, &customer, before + during + after, 3).await;
    shut(again).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_schema_fault_parks_its_batch_until_fixed_and_restarted() {
    a_permanent_error_parks_until_fixed_and_restarted(
        "postgres",
        "ALTER TABLE usage_records RENAME COLUMN quantity TO quantity_moved",
        "ALTER TABLE usage_records RENAME COLUMN quantity_moved TO quantity",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_clickhouse_schema_fault_parks_its_batch_until_fixed_and_restarted() {
    a_permanent_error_parks_until_fixed_and_restarted(
        "clickhouse",
        "ALTER TABLE usage_events DROP COLUMN batch_seq",
        "ALTER TABLE usage_events ADD COLUMN batch_seq UInt32",
    )
    .await;
}

/// An hour's total that would pass `i64::MAX` (only absurd input gets there) saturates: the
/// batch is applied, never refused by Postgres as out of range (which would park the store
/// for every customer).
#[tokio::test]
async fn an_hours_total_saturates_instead_of_refusing_the_batch() {
    use apex_pipeline::postgres_sink::apply_batch;
    use apex_pipeline::store::Batch;
    let stores = TestStores::migrated().await;
    let now = chrono::Utc::now().timestamp_millis();
    let record = |quantity| UsageRecord {
        customer_id: "cus_saturated".into(),
        metric: Metric::DataTransfer,
        quantity,
        event_id: None,
        timestamp_ms: now,
        received_ms: now,
        metadata: None,
    };
    let mut conn = stores.pool.acquire().await.unwrap();
    let huge = [record(u64::MAX / 2), record(u64::MAX / 2)];
    for (start, records) in [(0, &huge[..]), (10, &[record(5)][..])] {
        let batch = Batch {
            log_id: "saturation",
            start,
            end: start + 10,
            records,
        };
        apply_batch(&mut conn, &batch).await.unwrap();
    }
    assert_eq!(
        stores.postgres_total("cus_saturated").await,
        i64::MAX as u64
    );
}
