//! Shared support of the server tests: a server on port 0 with its own databases, customers
//! with keys, and a minimal HTTP/1.1 client over raw TCP (what an SDK sends, byte for byte).

#![allow(dead_code, unreachable_pub)]

pub mod openapi;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_core::env::EnvSource;
use apex_core::testing::TestStores;
use apex_ingest::{ServerConfig, run_with_sink};
use apex_pipeline::durable::DurableSink;
use apex_pipeline::sink::RecordSink;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const JWT_SECRET: &str = "test-secret-test-secret-test-secret!";

pub struct TestServer {
    pub addr: SocketAddr,
    pub stores: TestStores,
    pub stop: Option<oneshot::Sender<()>>,
    pub task: JoinHandle<Result<(), apex_ingest::ServerError>>,
    /// The directory of the server's write-ahead log.
    pub wal: std::path::PathBuf,
    extra: Vec<(String, String)>,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.wal);
    }
}

/// A server with the production pipeline.
pub async fn start() -> TestServer {
    start_with(&[], None).await
}

/// A server with extra environment settings and, optionally, a sink of the test's own.
pub async fn start_with(extra: &[(&str, &str)], sink: Option<Arc<dyn RecordSink>>) -> TestServer {
    let stores = TestStores::migrated().await;
    let wal = std::env::temp_dir().join(format!("{}_wal", stores.name));
    let extra: Vec<(String, String)> = extra
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let (addr, stop, task) = serve(&stores, &wal, &extra, sink).await;
    TestServer {
        addr,
        stores,
        stop: Some(stop),
        task,
        wal,
        extra,
    }
}

type ServerTask = JoinHandle<Result<(), apex_ingest::ServerError>>;

/// Runs a server on port 0 over `stores` and the log in `wal` until its stop is sent, and
/// waits until it is ready.
async fn serve(
    stores: &TestStores,
    wal: &std::path::Path,
    extra: &[(String, String)],
    sink: Option<Arc<dyn RecordSink>>,
) -> (SocketAddr, oneshot::Sender<()>, ServerTask) {
    let mut pairs = vec![
        ("DATABASE_URL", stores.config.database_url.clone()),
        ("CLICKHOUSE_URL", stores.config.clickhouse_url.clone()),
        (
            "CLICKHOUSE_DATABASE",
            stores.config.clickhouse_database.clone(),
        ),
        ("APEX_JWT_SECRET", JWT_SECRET.to_owned()),
        ("APEX_WAL_DIR", wal.to_string_lossy().into_owned()),
        ("APEX_SHUTDOWN_GRACE_MS", "10000".to_owned()),
    ];
    for (k, v) in extra {
        pairs.push((k, v.clone()));
    }
    let env = EnvSource::from_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
    let config = ServerConfig::from_env(&env).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async {
        let _ = stopped.await;
    };
    // The production sink, started as `main` starts it (after the recorder), unless the test
    // brings its own.
    apex_ingest::telemetry::prometheus();
    let sink = match sink {
        Some(sink) => sink,
        None => DurableSink::start(&config.durable_config()).unwrap(),
    };
    let task = tokio::spawn(run_with_sink(config, listener, sink, shutdown));
    for _ in 0..400 {
        if get(addr, "/readyz").await.status == 200 {
            return (addr, stop, task);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("the server did not become ready");
}

impl TestServer {
    /// Stops the server (gracefully: its sink makes everything durable) and starts a new one
    /// on the same databases and write-ahead log, as a process restart does.
    pub async fn restart(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        tokio::time::timeout(Duration::from_secs(30), &mut self.task)
            .await
            .expect("the server stops in time")
            .expect("the server task did not panic")
            .expect("the server ran without error");
        let (addr, stop, task) = serve(&self.stores, &self.wal, &self.extra, None).await;
        self.addr = addr;
        self.stop = Some(stop);
        self.task = task;
    }
}

/// A customer on the starter plan and its plain API key.
pub async fn customer(server: &TestServer) -> (String, String) {
    customer_in(&server.stores, "starter").await
}

/// A customer on `plan` in `stores`, and its plain API key.
pub async fn customer_in(stores: &TestStores, plan: &str) -> (String, String) {
    let created = create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: "Test Publisher".into(),
            email: "test@example.com".into(),
            plan_id: plan.into(),
            trial_days: None,
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    (created.customer.id, created.api_key.expose().to_owned())
}

/// Waits (up to 10 s) until the customer's rollup of `metric` in Postgres equals `expected`:
/// a 200 means the record is in the write-ahead log, and the applier adds it moments later.
pub async fn assert_total(server: &TestServer, customer_id: &str, metric: &str, expected: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let total = stored_total(server, customer_id, metric).await;
        if total == expected {
            // Stay a moment to catch a late double count.
            tokio::time::sleep(Duration::from_millis(100)).await;
            assert_eq!(
                stored_total(server, customer_id, metric).await,
                expected,
                "{metric}"
            );
            return;
        }
        assert!(
            total < expected,
            "{metric}: {total} stored, more than the {expected} accepted"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{metric}: {total} stored, {expected} accepted"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Sum of a customer's rollups of one metric in Postgres.
pub async fn stored_total(server: &TestServer, customer_id: &str, metric: &str) -> i64 {
    sqlx::query_scalar::<_, Option<i64>>(
        "SELECT sum(quantity)::bigint FROM usage_records WHERE customer_id = $1 AND metric_type = $2",
    )
    .bind(customer_id)
    .bind(metric)
    .fetch_one(&server.stores.pool)
    .await
    .unwrap()
    .unwrap_or(0)
}

pub struct Answer {
    pub status: u16,
    pub head: String,
    pub body: String,
}

impl Answer {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.head.lines().find_map(|line| {
            let (k, v) = line.split_once(':')?;
            k.eq_ignore_ascii_case(name).then(|| v.trim().to_owned())
        })
    }

    /// Asserts the API's error shape and returns the code.
    pub fn error_code(&self) -> String {
        let json = self.json();
        assert_eq!(json["success"], false, "{}", self.body);
        assert!(json["error"]["message"].is_string(), "{}", self.body);
        json["error"]["code"].as_str().unwrap().to_owned()
    }
}

/// Sends `raw` (a whole HTTP/1.1 request) and reads the answer until the server closes;
/// `None` when the connection is refused or broken, or the answer is not HTTP.
pub async fn try_exchange(addr: SocketAddr, raw: &[u8]) -> Option<Answer> {
    let mut stream = TcpStream::connect(addr).await.ok()?;
    stream.write_all(raw).await.ok()?;
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut bytes))
        .await
        .ok()?
        .ok()?;
    let text = String::from_utf8_lossy(&bytes).into_owned();
    let (head, body) = text.split_once("\r\n\r\n")?;
    let answer = Answer {
        status: head.get(9..12)?.parse().ok()?,
        head: head.to_owned(),
        body: body.to_owned(),
    };
    openapi::check_raw(raw, answer.status, &answer.head, &answer.body);
    Some(answer)
}

/// Like [`try_exchange`], for a server that must answer.
pub async fn exchange(addr: SocketAddr, raw: &[u8]) -> Answer {
    try_exchange(addr, raw)
        .await
        .expect("the server answers in time with HTTP")
}

/// A POST of `body` with the given extra header lines (each `Name: value`).
fn post_request(path: &str, headers: &[&str], body: &[u8]) -> Vec<u8> {
    let mut raw = format!(
        "POST {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for header in headers {
        raw.push_str(header);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    let mut raw = raw.into_bytes();
    raw.extend_from_slice(body);
    raw
}

/// Like [`post`], but a refused or broken connection (a killed server) is `None`.
pub async fn try_post(
    addr: SocketAddr,
    path: &str,
    headers: &[&str],
    body: &[u8],
) -> Option<Answer> {
    try_exchange(addr, &post_request(path, headers, body)).await
}

pub async fn get(addr: SocketAddr, path: &str) -> Answer {
    exchange(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// GETs `path` with the given extra header lines (each `Name: value`).
pub async fn get_with(addr: SocketAddr, path: &str, headers: &[&str]) -> Answer {
    let mut raw = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n");
    for header in headers {
        raw.push_str(header);
        raw.push_str("\r\n");
    }
    raw.push_str("\r\n");
    exchange(addr, raw.as_bytes()).await
}

/// POSTs `body` with the given extra header lines (each `Name: value`).
pub async fn post(addr: SocketAddr, path: &str, headers: &[&str], body: &[u8]) -> Answer {
    exchange(addr, &post_request(path, headers, body)).await
}

pub async fn post_json(addr: SocketAddr, path: &str, body: &serde_json::Value) -> Answer {
    post(
        addr,
        path,
        &["Content-Type: application/json"],
        body.to_string().as_bytes(),
    )
    .await
}
