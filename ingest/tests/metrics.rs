//! `apex-server`'s `/metrics` passes `promtool check metrics` (Debian's prometheus 2.42,
//! installed by `scripts/stack.sh up`): every series has HELP and TYPE, counters end in
//! `_total`, names are Prometheus-clean. The server is exercised first, so the edge's and
//! the pipeline's metrics are all on the page.

mod common;

use std::time::Duration;

use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_pass_promtool_with_help_for_every_series() {
    let server = common::start().await;
    let (customer, key) = common::customer(&server).await;
    let record =
        json!({"api_key": key, "metric_type": "impressions", "quantity": 5, "event_id": "m1"});
    for _ in 0..2 {
        // The second is a duplicate.
        common::post_json(server.addr, "/api/usage/track", &record).await;
    }
    common::post_json(
        server.addr,
        "/api/usage/track",
        &json!({"api_key": key, "metric_type": "clicks", "quantity": 1}),
    )
    .await;
    common::post_json(
        server.addr,
        "/api/usage/batch",
        &json!({"api_key": key, "records": [{"metric_type": "api_calls", "quantity": 2}]}),
    )
    .await;
    common::get(server.addr, "/api/usage/current").await;
    common::assert_total(&server, &customer, "api_calls", 2).await;
    // Let the appliers record their flushes and gauges.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let page = common::get(server.addr, "/metrics").await.body;
    for name in [
        "apex_ingest_requests_total",
        "apex_ingest_records_total",
        "apex_ingest_request_duration_seconds",
        "apex_ingest_dedup_ids",
        "apex_ingest_dedup_bytes",
        "apex_ingest_dedup_window_seconds",
        "apex_pipeline_rows_written_total",
        "apex_pipeline_wal_fsync_seconds",
        "apex_pipeline_wal_backlog_bytes",
    ] {
        assert!(
            page.contains(&format!("# HELP {name} ")),
            "no HELP for {name}:\n{page}"
        );
    }

    // What moves only on trouble is there from the start, at 0, for alerts to read.
    for series in [
        "apex_pipeline_parked_batches{store=\"postgres\"} 0",
        "apex_pipeline_parked_batches{store=\"clickhouse\"} 0",
        "apex_pipeline_permanent_errors_total{store=\"postgres\"} 0",
        "apex_pipeline_wal_full_total 0",
        "apex_ingest_queue_full_total 0",
        "apex_ingest_dedup_evictions_total 0",
        "apex_ingest_dedup_full_total 0",
        // Nothing dropped: the effective window is the configured one.
        "apex_ingest_dedup_window_seconds 86400",
    ] {
        assert!(page.contains(series), "no {series}:\n{page}");
    }

    if let Err(said) = apex_core::testing::promtool_check(&page) {
        panic!("promtool check metrics: {said}\n{page}");
    }
}
