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
