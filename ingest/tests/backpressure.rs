//! Backpressure and shutdown with a sink the test controls: a full queue is answered 503
//! with `Retry-After` and loses nothing already accepted; shutdown answers every request in
//! flight before the server returns.

mod common;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use apex_core::model::UsageRecord;
use apex_pipeline::sink::{Ack, RecordSink, SinkError};
use common::{customer, post_json, start_with};
use serde_json::json;

/// Test double of the pipeline: holds at most `capacity` submissions and acknowledges each
/// after `delay` on its own thread, counting the records it acknowledged.
struct SlowSink {
    capacity: usize,
    delay: Duration,
    waiting: Arc<AtomicUsize>,
    acknowledged: Arc<AtomicUsize>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

impl SlowSink {
    fn new(capacity: usize, delay: Duration) -> Arc<Self> {
        Arc::new(Self {
            capacity,
            delay,
            waiting: Arc::new(AtomicUsize::new(0)),
            acknowledged: Arc::new(AtomicUsize::new(0)),
            threads: Mutex::new(Vec::new()),
        })
    }
}

impl RecordSink for SlowSink {
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError> {
        if self.waiting.fetch_add(1, Ordering::SeqCst) >= self.capacity {
            self.waiting.fetch_sub(1, Ordering::SeqCst);
            return Err(SinkError::Full);
        }
        let (ack, acked) = tokio::sync::oneshot::channel();
        let (delay, waiting, acknowledged) =
            (self.delay, self.waiting.clone(), self.acknowledged.clone());
        let thread = std::thread::spawn(move || {
            std::thread::sleep(delay);
            acknowledged.fetch_add(records.len(), Ordering::SeqCst);
            waiting.fetch_sub(1, Ordering::SeqCst);
            let _ = ack.send(Ok(()));
        });
        self.threads.lock().unwrap().push(thread);
        Ok(acked)
    }

    fn queue_depth(&self) -> usize {
        self.waiting.load(Ordering::SeqCst)
    }

    fn shutdown(&self) {
        for thread in self.threads.lock().unwrap().drain(..) {
            let _ = thread.join();
        }
    }
}

/// Waits (10 s at most) until the first request's records are in the sink.
async fn until_in_sink(sink: &SlowSink) {
    let mut waited = Duration::ZERO;
    while sink.queue_depth() == 0 {
        assert!(
            waited < Duration::from_secs(10),
            "the first batch never reached the sink"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
}

#[tokio::test]
async fn a_full_queue_is_answered_503_with_retry_after() {
    let sink = SlowSink::new(2, Duration::from_millis(800));
    let server = start_with(&[], Some(sink.clone())).await;
    let (_, key) = customer(&server).await;
    let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 1});
    let requests: Vec<_> = (0..6)
        .map(|_| {
            let body = body.clone();
            let addr = server.addr;
            tokio::spawn(async move { post_json(addr, "/api/usage/track", &body).await })
        })
        .collect();
    let mut ok = 0;
    let mut full = 0;
    for request in requests {
        let answer = request.await.unwrap();
        match answer.status {
            200 => ok += 1,
            503 => {
                assert_eq!(answer.error_code(), "queue_full");
                assert_eq!(answer.header("retry-after").as_deref(), Some("1"));
                full += 1;
            }
            other => panic!("unexpected {other}: {}", answer.body),
        }
    }
    assert_eq!((ok, full), (2, 4));
    assert_eq!(
        sink.acknowledged.load(Ordering::SeqCst),
        2,
        "only acknowledged records were answered 200"
    );
    let metrics = common::get(server.addr, "/metrics").await.body;
    assert!(
        metrics.contains("apex_ingest_queue_full_total"),
        "{metrics}"
    );
}

#[tokio::test]
async fn shutdown_answers_every_request_in_flight() {
    let sink = SlowSink::new(1000, Duration::from_millis(500));
    let mut server = start_with(&[], Some(sink.clone())).await;
    let (_, key) = customer(&server).await;
    let body = json!({"api_key": key, "metric_type": "api_calls", "quantity": 2});
    let requests: Vec<_> = (0..20)
        .map(|_| {
            let body = body.clone();
            let addr = server.addr;
            tokio::spawn(async move { post_json(addr, "/api/usage/track", &body).await })
        })
        .collect();
    // Let every request reach the sink, then ask the server to stop.
    for _ in 0..100 {
        if sink.queue_depth() == 20 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(sink.queue_depth(), 20, "all requests in flight");
    server.stop.take().unwrap().send(()).unwrap();
    for request in requests {
        let answer = request.await.unwrap();
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("the server returns")
        .unwrap()
        .unwrap();
    assert_eq!(sink.acknowledged.load(Ordering::SeqCst), 20);
}

#[tokio::test]
async fn a_full_dedup_table_is_answered_503_dedup_full_never_400() {
    // 256 ids of capacity: one entry a generation, so a shard holds 4 pending ids at most.
    // The sink holds the first batch's records for 3 s, pending all that time.
    let sink = SlowSink::new(16, Duration::from_secs(3));
    let server = start_with(&[("APEX_DEDUP_CAPACITY", "256")], Some(sink.clone())).await;
    let (_, key) = customer(&server).await;
    let batch = |prefix: &str, n: usize| {
        let records: Vec<_> = (0..n)
            .map(|i| json!({"metric_type": "impressions", "quantity": 1, "event_id": format!("{prefix}-{i}")}))
            .collect();
        json!({"api_key": key, "records": records})
    };
    let first = {
        let (addr, body) = (server.addr, batch("first", 2_000));
        tokio::spawn(async move { post_json(addr, "/api/usage/batch", &body).await })
    };
    // The first batch's ids are claimed (every shard holds 4) while its records wait.
    until_in_sink(&sink).await;
    // No room for any id: the whole batch is retryable, not a permanent 400.
    let second = post_json(server.addr, "/api/usage/batch", &batch("second", 200)).await;
    assert_eq!(second.status, 503, "{}", second.body);
    assert_eq!(second.error_code(), "dedup_full");
    assert_eq!(second.header("retry-after").as_deref(), Some("1"));
    let track =
        json!({"api_key": key, "metric_type": "impressions", "quantity": 1, "event_id": "track-1"});
    let track = post_json(server.addr, "/api/usage/track", &track).await;
    assert_eq!(track.status, 503, "{}", track.body);
    assert_eq!(track.error_code(), "dedup_full");

    // The first batch: what fitted is accepted, the rest is refused per record, retryably.
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    let answer = first.json();
    let accepted = answer["accepted"].as_u64().unwrap();
    let errors = answer["errors"].as_array().unwrap();
    assert!((1..=256).contains(&accepted), "{accepted} accepted");
    assert_eq!(accepted as usize + errors.len(), 2_000);
    assert!(
        errors.iter().all(|e| e["code"] == "dedup_full"),
        "{errors:?}"
    );
    assert_eq!(sink.acknowledged.load(Ordering::SeqCst), accepted as usize);

    // Acknowledged, the ids free their generations: the refused track goes through now.
    let track =
        json!({"api_key": key, "metric_type": "impressions", "quantity": 1, "event_id": "track-1"});
    assert_eq!(
        post_json(server.addr, "/api/usage/track", &track)
            .await
            .status,
        200
    );
    let metrics = common::get(server.addr, "/metrics").await.body;
    let full: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("apex_ingest_dedup_full_total "))
        .and_then(|v| v.trim().parse().ok())
        .expect("apex_ingest_dedup_full_total on /metrics");
    // The first batch's refused records and the second batch's, and the track besides.
    assert!(full > 2_000 - accepted + 200, "{full}");
}

#[tokio::test]
async fn a_batch_whose_records_are_all_in_flight_is_answered_409_then_counted_as_duplicates() {
    // The sink holds the first batch's records for 3 s: its ids are in flight all that time.
    let sink = SlowSink::new(16, Duration::from_secs(3));
    let server = start_with(&[], Some(sink.clone())).await;
    let (_, key) = customer(&server).await;
    let records: Vec<_> = (0..3)
        .map(|i| json!({"metric_type": "impressions", "quantity": 1, "event_id": format!("e-{i}")}))
        .collect();
    let body = json!({"api_key": key, "records": records});
    let first = {
        let (addr, body) = (server.addr, body.clone());
        tokio::spawn(async move { post_json(addr, "/api/usage/batch", &body).await })
    };
    until_in_sink(&sink).await;
    // Every record is being recorded by the first: nothing taken, and retryable (not 400).
    let again = post_json(server.addr, "/api/usage/batch", &body).await;
    assert_eq!(again.status, 409, "{}", again.body);
    assert_eq!(again.error_code(), "duplicate_in_flight");
    let first = first.await.unwrap();
    assert_eq!(first.status, 200, "{}", first.body);
    assert_eq!(first.json()["accepted"], 3);
    // Once the first is acknowledged, the retry finds them recorded.
    let retry = post_json(server.addr, "/api/usage/batch", &body).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.json()["duplicates"], 3);
    assert_eq!(sink.acknowledged.load(Ordering::SeqCst), 3);
}
