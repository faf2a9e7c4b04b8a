//! The server over real HTTP on port 0 with the stack's Postgres and ClickHouse: health,
//! readiness, metrics, JSON errors for unknown routes, HTTP/2 prior knowledge, and shutdown.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use apex_ingest::{ServerConfig, run};
use apex_pipeline::env::EnvSource;
use apex_pipeline::testing::TestStores;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct TestServer {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), apex_ingest::ServerError>>,
    _wal: TempDir,
}

struct TempDir(std::path::PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn start() -> TestServer {
    let stores = TestStores::empty().await;
    let wal = TempDir(std::env::temp_dir().join(format!("{}_wal", stores.name)));
    let env = EnvSource::from_pairs([
        ("DATABASE_URL", stores.config.database_url.as_str()),
        ("CLICKHOUSE_URL", stores.config.clickhouse_url.as_str()),
        (
            "CLICKHOUSE_DATABASE",
            stores.config.clickhouse_database.as_str(),
        ),
        ("APEX_JWT_SECRET", "test-secret-test-secret-test-secret!"),
        ("APEX_WAL_DIR", wal.0.to_str().unwrap()),
    ]);
    let config = ServerConfig::from_env(&env).unwrap();
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = oneshot::channel::<()>();
    let task = tokio::spawn(run(config, listener, async {
        let _ = stopped.await;
    }));
    // The server migrates before it serves; wait until it answers.
    for _ in 0..200 {
        if TcpStream::connect(addr).await.is_ok() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    TestServer {
        addr,
        stop: Some(stop),
        task,
        _wal: wal,
    }
}

/// Sends raw HTTP/1.1 bytes and returns (status, body) of the answer.
async fn exchange(addr: SocketAddr, request: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.unwrap();
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut raw))
        .await
        .expect("the server answers")
        .unwrap();
    let text = String::from_utf8(raw).unwrap();
    let status = text[9..12].parse().unwrap();
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

async fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    exchange(
        addr,
        &format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"),
    )
    .await
}

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let server = start().await;
    let (status, body) = get(server.addr, "/healthz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ok"}"#));
    let (status, body) = get(server.addr, "/readyz").await;
    assert_eq!((status, body.as_str()), (200, r#"{"status":"ready"}"#));
    let (status, body) = get(server.addr, "/metrics").await;
    assert_eq!(status, 200);
    assert!(body.contains("apex_ingest_requests_total"), "{body}");
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let server = start().await;
    let (status, body) = get(server.addr, "/nope").await;
    assert_eq!(status, 404);
    let json: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(json["success"], false);
    assert_eq!(json["error"]["code"], "not_found");
    assert!(json["error"]["message"].is_string());

    let (status, body) = exchange(
        server.addr,
        "DELETE /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    )
    .await;
    assert_eq!(status, 405);
    assert!(body.contains("method_not_allowed"), "{body}");
}

#[tokio::test]
async fn http2_prior_knowledge_is_served_on_the_same_port() {
    let server = start().await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    // The HTTP/2 connection preface, then an empty SETTINGS frame.
    stream
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    stream
        .write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0])
        .await
        .unwrap();
    let mut header = [0u8; 9];
    tokio::time::timeout(Duration::from_secs(5), stream.read_exact(&mut header))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        header[3], 4,
        "the server answers with its own SETTINGS frame"
    );
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.0, 200);
    server.stop.take().unwrap().send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("run returns after shutdown");
    result.unwrap().unwrap();
    assert!(
        TcpStream::connect(server.addr).await.is_err(),
        "listener closed"
    );
}

#[test]
fn bad_configuration_stops_the_binary_with_one_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_apex-server"))
        .env("DATABASE_URL", "postgres://127.0.0.1:1/x")
        .env("CLICKHOUSE_URL", "http://127.0.0.1:1")
        .env_remove("APEX_JWT_SECRET")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("apex-server: APEX_JWT_SECRET is required"),
        "{err}"
    );
}
