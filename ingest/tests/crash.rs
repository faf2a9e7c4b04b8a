//! `kill -9` of the real `apex-server` binary under load, twice, with restarts on the same
//! write-ahead log: every acknowledged record reaches Postgres (0 lost), nothing is counted
//! twice, and once the client has retried every unanswered request with the same event ids,
//! the totals equal exactly what was sent.

mod common;

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apex_pipeline::testing::TestStores;
use common::{JWT_SECRET, try_post};
use tokio::sync::Mutex;

const RECORDS_PER_REQUEST: u64 = 100;
const REQUESTS: u64 = 2_400;
const WORKERS: u64 = 8;

struct Server {
    child: Child,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn spawn_server(stores: &TestStores, addr: SocketAddr, wal: &std::path::Path) -> Server {
    let child = Command::new(env!("CARGO_BIN_EXE_apex-server"))
        .env("DATABASE_URL", &stores.config.database_url)
        .env("CLICKHOUSE_URL", &stores.config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &stores.config.clickhouse_database)
        .env("APEX_JWT_SECRET", JWT_SECRET)
        .env("APEX_WAL_DIR", wal)
        .env("APEX_LISTEN", addr.to_string())
        .env("APEX_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .expect("apex-server starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(answer) = try_get_ready(addr).await {
            if answer {
                return Server { child };
            }
        }
        assert!(Instant::now() < deadline, "apex-server did not become ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn try_get_ready(addr: SocketAddr) -> Option<bool> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .ok()?;
    let mut bytes = Vec::new();
    stream.read_to_end(&mut bytes).await.ok()?;
    Some(bytes.starts_with(b"HTTP/1.1 200"))
}

fn batch_body(key: &str, request: u64) -> Vec<u8> {
    let records: Vec<String> = (0..RECORDS_PER_REQUEST)
        .map(|i| format!(r#"{{"metric_type":"impressions","quantity":1,"event_id":"r{request}-{i}"}}"#))
        .collect();
    format!(r#"{{"api_key":"{key}","records":[{}]}}"#, records.join(",")).into_bytes()
}

async fn total(stores: &TestStores, customer: &str) -> u64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(quantity)::bigint FROM usage_records WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
    .unwrap_or(0) as u64
}

/// Waits until the total stops moving (the applier caught up) and returns it.
async fn settled_total(stores: &TestStores, customer: &str) -> u64 {
    let mut last = total(stores, customer).await;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(60);
    while stable_since.elapsed() < Duration::from_millis(1500) {
        assert!(Instant::now() < deadline, "totals never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = total(stores, customer).await;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_under_load_loses_and_duplicates_nothing() {
    let stores = TestStores::migrated().await;
    let created = apex_billing::customers::create_customer(
        &stores.pool,
        &apex_billing::customers::NewCustomer {
            name: "Crash".into(),
            email: "crash@example.com".into(),
            plan_id: "scale".into(),
            trial_days: None,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let customer = created.customer.id.clone();
    let key = created.api_key.expose().to_owned();
    let wal = std::env::temp_dir().join(format!("{}_crash_wal", stores.name));
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();

    let next_request = Arc::new(AtomicU64::new(0));
    let acknowledged = Arc::new(AtomicU64::new(0));
    let unanswered = Arc::new(Mutex::new(Vec::<u64>::new()));
    let mut server = spawn_server(&stores, addr, &wal).await;

    // Two kills at different points of the load, then a last run to the end.
    for kill_after_acks in [40_000u64, 120_000, u64::MAX] {
        let killed = Arc::new(AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (next, acked, lost, killed, key) = (
                    next_request.clone(),
                    acknowledged.clone(),
                    unanswered.clone(),
                    killed.clone(),
                    key.clone(),
                );
                tokio::spawn(async move {
                    while !killed.load(Ordering::SeqCst) {
                        let request = next.fetch_add(1, Ordering::SeqCst);
                        if request >= REQUESTS {
                            return;
                        }
                        let answer = try_post(addr, "/api/usage/batch", &["Content-Type: application/json"], &batch_body(&key, request)).await;
                        match answer {
                            Some(a) if a.status == 200 => {
                                assert_eq!(a.json()["accepted"], RECORDS_PER_REQUEST, "{}", a.body);
                                acked.fetch_add(RECORDS_PER_REQUEST, Ordering::SeqCst);
                            }
                            _ => lost.lock().await.push(request),
                        }
                    }
                })
            })
            .collect();
        if kill_after_acks != u64::MAX {
            while acknowledged.load(Ordering::SeqCst) < kill_after_acks {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            server.child.kill().unwrap(); // SIGKILL
            let _ = server.child.wait();
            killed.store(true, Ordering::SeqCst);
        }
        for worker in workers {
            worker.await.unwrap();
        }
        if kill_after_acks != u64::MAX {
            server = spawn_server(&stores, addr, &wal).await;
        }
    }

    let acked = acknowledged.load(Ordering::SeqCst);
    let sent = REQUESTS * RECORDS_PER_REQUEST;
    let stored = settled_total(&stores, &customer).await;
    assert!(stored >= acked, "lost acknowledged records: {stored} stored, {acked} acknowledged");
    assert!(stored <= sent, "counted twice: {stored} stored, {sent} sent");
    let retries = unanswered.lock().await.clone();
    assert!(!retries.is_empty(), "the kills left no request unanswered: the test proves nothing");

    // The client retries every unanswered request with the same event ids.
    for request in retries {
        let answer = try_post(addr, "/api/usage/batch", &["Content-Type: application/json"], &batch_body(&key, request))
            .await
            .expect("the restarted server answers");
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    assert_eq!(settled_total(&stores, &customer).await, sent, "after retries, exactly what was sent");
    assert!(sent >= 200_000);

    server.child.kill().unwrap();
    let _ = server.child.wait();
    let _ = std::fs::remove_dir_all(&wal);
}
