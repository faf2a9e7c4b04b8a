//! Crashes of the real `apex-server` binary under load, then restarts on the same write-ahead
//! log: `kill -9` at two moments of a 240,000-record load, and an abort at each named crash
//! point (`APEX_FAILPOINT`): mid-append, after the fsync but before the answers, between the
//! two stores, and inside a ClickHouse batch (after its start marker, half-way through
//! streaming its rows, after its rows). Each time, once the server is back: every acknowledged record is in
//! Postgres, ClickHouse `usage_events` and the daily rollup (0 lost), nothing is counted
//! twice, and after the client retries every unanswered request with the same event ids,
//! each store holds exactly what was sent.

mod common;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apex_core::testing::TestStores;
use common::{JWT_SECRET, customer_in, try_post};
use tokio::sync::Mutex;

const RECORDS_PER_REQUEST: u64 = 100;
const WORKERS: u64 = 8;

/// The server process; killed when dropped, so a failing test leaves no server behind.
struct Server(Child);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

async fn spawn_server(
    stores: &TestStores,
    addr: SocketAddr,
    wal: &Path,
    failpoint: Option<&str>,
) -> Server {
    let mut command = Command::new(env!("CARGO_BIN_EXE_apex-server"));
    command
        .env("DATABASE_URL", &stores.config.database_url)
        .env("CLICKHOUSE_URL", &stores.config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &stores.config.clickhouse_database)
        .env("APEX_JWT_SECRET", JWT_SECRET)
        .env("APEX_WAL_DIR", wal)
        .env("APEX_LISTEN", addr.to_string())
        .env("APEX_LOG", "warn")
        .env_remove(apex_pipeline::failpoint::VARIABLE)
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    if let Some(point) = failpoint {
        command.env(apex_pipeline::failpoint::VARIABLE, point);
    }
    let mut server = Server(command.spawn().expect("apex-server starts"));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if ready(addr).await {
            return server;
        }
        if let Ok(Some(status)) = server.0.try_wait() {
            panic!("apex-server exited before it was ready: {status}");
        }
        assert!(
            Instant::now() < deadline,
            "apex-server did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn ready(addr: SocketAddr) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let Ok(mut stream) = tokio::net::TcpStream::connect(addr).await else {
        return false;
    };
    if stream
        .write_all(b"GET /readyz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
        .await
        .is_err()
    {
        return false;
    }
    let mut bytes = Vec::new();
    let _ = stream.read_to_end(&mut bytes).await;
    bytes.starts_with(b"HTTP/1.1 200")
}

/// The body of request number `request`: 100 records with event ids unique to it. With
/// `two_months`, half of them are dated in the previous calendar month, so a batch spans two
/// ClickHouse partitions (and two monthly parts to settle after a crash).
fn batch_body(key: &str, request: u64, two_months: bool) -> Vec<u8> {
    let last_month = {
        use chrono::Datelike;
        let today = chrono::Utc::now().date_naive();
        let first = today.with_day(1).unwrap_or(today);
        // An hour before the month began: always within the 35 days accepted.
        first.and_hms_opt(0, 0, 0).unwrap().and_utc().timestamp() - 3_600
    };
    let records: Vec<String> = (0..RECORDS_PER_REQUEST)
        .map(|i| {
            let timestamp = if two_months && i % 2 == 0 {
                format!(r#","timestamp":{last_month}"#)
            } else {
                String::new()
            };
            format!(
                r#"{{"metric_type":"impressions","quantity":1,"event_id":"r{request}-{i}"{timestamp}}}"#
            )
        })
        .collect();
    format!(r#"{{"api_key":"{key}","records":[{}]}}"#, records.join(",")).into_bytes()
}

/// Sums in each store: Postgres rollups, ClickHouse raw rows and their sum, the daily rollup.
async fn totals(stores: &TestStores, customer: &str) -> (u64, (u64, u64), u64) {
    (
        stores.postgres_total(customer).await,
        stores.clickhouse_events(customer).await,
        stores.clickhouse_daily_total(customer).await,
    )
}

/// Waits until every store's totals stop moving (the appliers caught up) and returns them.
async fn settled(stores: &TestStores, customer: &str) -> (u64, (u64, u64), u64) {
    let mut last = totals(stores, customer).await;
    let mut stable_since = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(90);
    while stable_since.elapsed() < Duration::from_millis(2_000) {
        assert!(Instant::now() < deadline, "totals never settled");
        tokio::time::sleep(Duration::from_millis(100)).await;
        let now = totals(stores, customer).await;
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    last
}

/// How a load phase ends.
#[derive(Clone, Copy)]
enum Crash {
    /// `kill -9` once this many records are acknowledged.
    KillAfter(u64),
    /// The server aborts by itself at its failpoint.
    Failpoint,
}

struct Load {
    addr: SocketAddr,
    key: String,
    two_months: bool,
    max_requests: u64,
    next_request: AtomicU64,
    acknowledged: AtomicU64,
    unanswered: Mutex<Vec<u64>>,
}

impl Load {
    /// Sends requests from `WORKERS` clients until `server` is gone or the requests run out.
    async fn phase(self: &Arc<Self>, server: &mut Server, crash: Option<Crash>) {
        let server_gone = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let workers: Vec<_> = (0..WORKERS)
            .map(|_| {
                let (load, gone) = (self.clone(), server_gone.clone());
                tokio::spawn(async move {
                    while !gone.load(Ordering::SeqCst) {
                        let request = load.next_request.fetch_add(1, Ordering::SeqCst);
                        if request >= load.max_requests {
                            return;
                        }
                        let body = batch_body(&load.key, request, load.two_months);
                        let answer = try_post(
                            load.addr,
                            "/api/usage/batch",
                            &["Content-Type: application/json"],
                            &body,
                        )
                        .await;
                        match answer {
                            Some(a) if a.status == 200 => {
                                assert_eq!(a.json()["accepted"], RECORDS_PER_REQUEST, "{}", a.body);
                                load.acknowledged
                                    .fetch_add(RECORDS_PER_REQUEST, Ordering::SeqCst);
                            }
                            Some(_) => load.unanswered.lock().await.push(request),
                            None => {
                                // The server is gone: this client stops until the restart.
                                load.unanswered.lock().await.push(request);
                                return;
                            }
                        }
                    }
                })
            })
            .collect();
        let deadline = Instant::now() + Duration::from_secs(120);
        match crash {
            Some(Crash::KillAfter(acks)) => {
                while self.acknowledged.load(Ordering::SeqCst) < acks {
                    assert!(Instant::now() < deadline, "the load stalled");
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                server.0.kill().expect("SIGKILL");
                let _ = server.0.wait();
            }
            Some(Crash::Failpoint) => loop {
                if let Ok(Some(status)) = server.0.try_wait() {
                    assert!(!status.success(), "the server must abort at its failpoint");
                    break;
                }
                assert!(
                    self.next_request.load(Ordering::SeqCst) < self.max_requests,
                    "the failpoint never fired"
                );
                assert!(Instant::now() < deadline, "the failpoint never fired");
                tokio::time::sleep(Duration::from_millis(5)).await;
            },
            None => {}
        }
        server_gone.store(crash.is_some(), Ordering::SeqCst);
        for worker in workers {
            worker.await.unwrap();
        }
    }
}

async fn crash_and_recover(
    crashes: &[Crash],
    failpoint: Option<&str>,
    two_months: bool,
    max_requests: u64,
) {
    let stores = TestStores::migrated().await;
    let (customer, key) = customer_in(&stores, "scale").await;
    let wal: PathBuf = std::env::temp_dir().join(format!("{}_crash_wal", stores.name));
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let load = Arc::new(Load {
        addr,
        key,
        two_months,
        max_requests,
        next_request: AtomicU64::new(0),
        acknowledged: AtomicU64::new(0),
        unanswered: Mutex::new(Vec::new()),
    });

    for &crash in crashes {
        let armed = matches!(crash, Crash::Failpoint)
            .then_some(failpoint)
            .flatten();
        let mut server = spawn_server(&stores, addr, &wal, armed).await;
        load.phase(&mut server, Some(crash)).await;
    }
    let mut server = spawn_server(&stores, addr, &wal, None).await;

    // Right after recovery, before any retry: nothing acknowledged is missing anywhere, and
    // nothing is counted twice.
    let acked = load.acknowledged.load(Ordering::SeqCst);
    let (pg, (ch_rows, ch_sum), daily) = settled(&stores, &customer).await;
    let issued = load.next_request.load(Ordering::SeqCst).min(max_requests) * RECORDS_PER_REQUEST;
    for (store, stored) in [
        ("Postgres", pg),
        ("ClickHouse", ch_sum),
        ("ClickHouse daily", daily),
    ] {
        assert!(
            stored >= acked,
            "{store} lost acknowledged records: {stored} stored, {acked} acknowledged"
        );
        assert!(
            stored <= issued,
            "{store} counted twice: {stored} stored, {issued} sent"
        );
    }
    assert_eq!(ch_rows, ch_sum, "one ClickHouse row per record");

    // The rest of the load, then the client retries every unanswered request.
    load.phase(&mut server, None).await;
    let retries = load.unanswered.lock().await.clone();
    assert!(
        !retries.is_empty(),
        "the crash left no request unanswered: the test proves nothing"
    );
    for request in retries {
        let answer = try_post(
            addr,
            "/api/usage/batch",
            &["Content-Type: application/json"],
            &batch_body(&load.key, request, two_months),
        )
        .await
        .expect("the restarted server answers");
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let sent = max_requests * RECORDS_PER_REQUEST;
    assert_eq!(
        settled(&stores, &customer).await,
        (sent, (sent, sent), sent),
        "after retries, every store holds exactly what was sent"
    );
    drop(server);
    let _ = std::fs::remove_dir_all(&wal);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_twice_under_a_240_000_record_load_loses_and_duplicates_nothing() {
    crash_and_recover(
        &[Crash::KillAfter(40_000), Crash::KillAfter(120_000)],
        None,
        false,
        2_400,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_mid_append_before_the_fsync() {
    crash_and_recover(&[Crash::Failpoint], Some("wal_before_fsync:40"), false, 600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_the_fsync_before_the_answers() {
    // The unanswered requests are in the log: their retries must be found as duplicates.
    crash_and_recover(&[Crash::Failpoint], Some("wal_after_fsync:40"), false, 600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_between_the_two_stores() {
    crash_and_recover(&[Crash::Failpoint], Some("pg_after_commit:1"), false, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_a_clickhouse_batch_began() {
    crash_and_recover(
        &[Crash::Failpoint],
        Some("ch_after_started:1"),
        false,
        3_000,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_in_the_middle_of_a_clickhouse_insert() {
    crash_and_recover(&[Crash::Failpoint], Some("ch_mid_insert:1"), true, 3_000).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn crash_after_a_clickhouse_batch_was_written() {
    crash_and_recover(&[Crash::Failpoint], Some("ch_after_data:1"), true, 3_000).await;
}
