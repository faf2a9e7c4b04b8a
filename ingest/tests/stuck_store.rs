//! A store stuck on a permanent error, through the real server: a schema fault in Postgres
//! parks its applier (logged with the batch id, counted in
//! `apex_pipeline_permanent_errors_total`), ingest goes on acknowledging, ClickHouse receives
//! every record, `/readyz` names the stuck store; after the schema is repaired and the server
//! restarted, Postgres receives the parked batch and everything after it, exactly once.

mod common;

use std::time::{Duration, Instant};

use serde_json::json;

async fn track(server: &common::TestServer, key: &str, quantity: u64) {
    let answer = common::post_json(
        server.addr,
        "/api/usage/track",
        &json!({"api_key": key, "metric_type": "impressions", "quantity": quantity}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stuck_store_is_named_by_readyz_and_catches_up_after_a_fix_and_a_restart() {
    let mut server = common::start().await;
    let (customer, key) = common::customer(&server).await;
    track(&server, &key, 10).await;
    common::assert_total(&server, &customer, "impressions", 10).await;

    sqlx::query("ALTER TABLE usage_records RENAME COLUMN quantity TO quantity_moved")
        .execute(&server.stores.pool)
        .await
        .unwrap();
    for quantity in [20, 30, 40] {
        track(&server, &key, quantity).await;
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let ready = loop {
        let ready = common::get(server.addr, "/readyz").await;
        if ready.json()["status"] == "degraded" {
            break ready;
        }
        assert!(Instant::now() < deadline, "never degraded: {}", ready.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(ready.status, 200, "the edge still takes records");
    let stuck = &ready.json()["stuck_stores"];
    assert_eq!(stuck.as_array().map(Vec::len), Some(1), "{}", ready.body);
    assert_eq!(stuck[0]["store"], "postgres");
    assert!(stuck[0]["batch_id"].as_u64().unwrap() > 0);
    assert!(
        stuck[0]["error"].as_str().unwrap().contains("quantity"),
        "{}",
        ready.body
    );
    let metrics = common::get(server.addr, "/metrics").await.body;
    assert!(
        metrics.contains("apex_pipeline_permanent_errors_total{store=\"postgres\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("apex_pipeline_parked_batches{store=\"postgres\"} 1"),
        "{metrics}"
    );
    // ClickHouse is not held back.
    let deadline = Instant::now() + Duration::from_secs(30);
    while server.stores.clickhouse_events(&customer).await.1 < 100 {
        assert!(Instant::now() < deadline, "ClickHouse fell behind");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(server.stores.clickhouse_events(&customer).await, (4, 100));

    sqlx::query("ALTER TABLE usage_records RENAME COLUMN quantity_moved TO quantity")
        .execute(&server.stores.pool)
        .await
        .unwrap();
    server.restart().await;
    common::assert_total(&server, &customer, "impressions", 100).await;
    let ready = common::get(server.addr, "/readyz").await;
    assert_eq!(ready.json()["status"], "ready", "{}", ready.body);
    assert_eq!(server.stores.clickhouse_events(&customer).await, (4, 100));
}
