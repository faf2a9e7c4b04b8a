//! A log writer that stops, through the real server: a group commit whose fsync fails and
//! whose cut back fails too (the disk faults injected, the rest real) stops the log writer;
//! its requests and every later one are answered 503 at once, `/readyz` answers 503
//! `log_stopped` so a load balancer sends traffic elsewhere, `apex_pipeline_wal_writer_up`
//! reads 0; after a restart the edge is ready again and nothing acknowledged is lost.

mod common;

use std::time::Duration;

use apex_pipeline::wal::faults::{self, Fault};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_log_writer_makes_the_edge_unready_until_a_restart() {
    let mut server = common::start().await;
    let (customer, key) = common::customer(&server).await;
    let track = |quantity: u64| {
        json!({"api_key": key, "metric_type": "impressions", "quantity": quantity,
               "event_id": format!("evt-{quantity}")})
    };
    let answer = common::post_json(server.addr, "/api/usage/track", &track(10)).await;
    assert_eq!(answer.status, 200, "{}", answer.body);

    faults::inject(&server.wal, Fault::Sync, 1);
    faults::inject(&server.wal, Fault::Rollback, 1);
    let answer = common::post_json(server.addr, "/api/usage/track", &track(20)).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.error_code(), "unavailable", "{}", answer.body);
    assert!(answer.header("retry-after").is_some());

    // Every later request is refused, answered at once rather than left waiting.
    for quantity in [30, 40, 50] {
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            common::post_json(server.addr, "/api/usage/track", &track(quantity)),
        )
        .await
        .expect("answered at once");
        assert_eq!(answer.status, 503, "{}", answer.body);
        assert_eq!(answer.error_code(), "unavailable", "{}", answer.body);
    }
    let ready = common::get(server.addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.body);
    assert_eq!(ready.error_code(), "log_stopped", "{}", ready.body);
    assert!(ready.body.contains("restart the server"), "{}", ready.body);
    let metrics = common::get(server.addr, "/metrics").await.body;
    assert!(
        metrics.contains("\napex_pipeline_wal_writer_up 0\n"),
        "{metrics}"
    );

    // A restart recovers the log from the disk; the edge is ready and takes records again.
    server.restart().await;
    let ready = common::get(server.addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.body);
    let metrics = common::get(server.addr, "/metrics").await.body;
    assert!(
        metrics.contains("\napex_pipeline_wal_writer_up 1\n"),
        "{metrics}"
    );
    // The refused request's client retries it with the same event id.
    for quantity in [20, 30] {
        let answer = common::post_json(server.addr, "/api/usage/track", &track(quantity)).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    // What was acknowledged is kept; the refused group (it reached the file, and the cut
    // that failed would have removed it) is read back at the restart, so its retry is a
    // duplicate (the same event id) and counted once: 10 + 20 + 30.
    common::assert_total(&server, &customer, "impressions", 60).await;
}
