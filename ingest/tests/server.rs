//! The server over real HTTP on port 0 with the stack's Postgres and ClickHouse: health,
//! readiness, metrics, JSON errors for unknown routes, HTTP/2 prior knowledge, connections
//! that send nothing or idle, an HTTP/2 rapid-reset flood, and shutdown.

mod common;

use std::process::Command;
use std::time::Duration;

use common::{exchange, get, start};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[tokio::test]
async fn health_readiness_and_metrics_answer() {
    let server = start().await;
    let health = get(server.addr, "/healthz").await;
    assert_eq!(
        (health.status, health.body.as_str()),
        (200, r#"{"status":"ok"}"#)
    );
    let ready = get(server.addr, "/readyz").await;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["status"], "ready");
    let metrics = get(server.addr, "/metrics").await;
    assert_eq!(metrics.status, 200);
    assert!(
        metrics.body.contains("apex_ingest_requests_total"),
        "{}",
        metrics.body
    );
    assert!(
        metrics
            .body
            .contains("apex_ingest_request_duration_seconds_bucket"),
        "{}",
        metrics.body
    );
}

#[tokio::test]
async fn unknown_routes_and_methods_get_json_errors() {
    let server = start().await;
    let missing = get(server.addr, "/nope").await;
    assert_eq!(missing.status, 404);
    assert_eq!(missing.error_code(), "not_found");

    for raw in [
        "DELETE /healthz HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        "GET /api/usage/track HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
    ] {
        let answer = exchange(server.addr, raw.as_bytes()).await;
        assert_eq!(answer.status, 405, "{raw}");
        assert_eq!(answer.error_code(), "method_not_allowed");
    }
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
async fn slow_headers_are_cut_off() {
    let server = common::start_with(&[("APEX_HEADER_READ_TIMEOUT_MS", "300")], None).await;
    let mut stream = TcpStream::connect(server.addr).await.unwrap();
    stream
        .write_all(b"POST /api/usage/track HTTP/1.1\r\nHost: t\r\n")
        .await
        .unwrap();
    let mut rest = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), stream.read_to_end(&mut rest)).await;
    assert!(
        read.is_ok(),
        "a client that never finishes its headers is disconnected"
    );
}

/// Reads `stream` until the server closes it (true), or `within` passes (false).
async fn closed_within(stream: &mut TcpStream, within: Duration) -> bool {
    let mut rest = Vec::new();
    tokio::time::timeout(within, stream.read_to_end(&mut rest))
        .await
        .is_ok()
}

#[tokio::test]
async fn connections_that_send_nothing_are_closed_and_give_their_slots_back() {
    // Two slots: one client that connects and sends nothing, one that sends a part of the
    // HTTP/2 preface and stops. Both would hold their slot for ever, and the edge would
    // accept nobody else.
    let server = common::start_with(
        &[
            ("APEX_HEADER_READ_TIMEOUT_MS", "300"),
            ("APEX_MAX_CONNECTIONS", "2"),
        ],
        None,
    )
    .await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    let mut partial = TcpStream::connect(server.addr).await.unwrap();
    partial.write_all(b"PRI * HTTP/2").await.unwrap();
    // A real client gets its answer once their slots are free.
    let answer = tokio::time::timeout(Duration::from_secs(5), get(server.addr, "/healthz"))
        .await
        .expect("a real client is served once the silent ones are cut off");
    assert_eq!(answer.status, 200);
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
    assert!(closed_within(&mut partial, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed_and_a_busy_one_kept() {
    use http_body_util::{BodyExt, Empty};
    use hyper_util::rt::{TokioExecutor, TokioIo};

    let server = common::start_with(
        &[
            ("APEX_IDLE_TIMEOUT_MS", "1000"),
            ("APEX_HEADER_READ_TIMEOUT_MS", "300"),
        ],
        None,
    )
    .await;
    let stream = TcpStream::connect(server.addr).await.unwrap();
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    let driver = tokio::spawn(connection);
    // A request every 100 ms for 2.5 s, two and a half idle timeouts: kept all along.
    for _ in 0..25 {
        let request = hyper::Request::get(format!("http://{}/healthz", server.addr))
            .body(Empty::<bytes::Bytes>::new())
            .unwrap();
        let answer = sender.send_request(request).await.expect("still served");
        assert_eq!(answer.status(), 200);
        answer.into_body().collect().await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!driver.is_finished());
    // Then idle: the server ends it (GOAWAY) within the idle timeout and a little.
    let ended = tokio::time::timeout(Duration::from_secs(5), driver).await;
    assert!(ended.is_ok(), "the idle connection was never closed");

    // A client that sends the preface and nothing after is cut off too, GOAWAY unanswered.
    let mut quiet = TcpStream::connect(server.addr).await.unwrap();
    quiet
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    assert!(closed_within(&mut quiet, Duration::from_secs(5)).await);
}

/// An HTTP/2 frame: its 9-byte header (length, type, flags, stream id) and payload.
fn h2_frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
    let length = u32::try_from(payload.len()).unwrap().to_be_bytes();
    let mut frame = vec![length[1], length[2], length[3], kind, flags];
    frame.extend_from_slice(&stream.to_be_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_rapid_reset_flood_ends_its_connection_and_others_are_served() {
    let server = start().await;
    let mut flood = TcpStream::connect(server.addr).await.unwrap();
    flood
        .write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
        .await
        .unwrap();
    // Our SETTINGS (none), and the acknowledgement of the server's.
    flood.write_all(&h2_frame(4, 0, 0, &[])).await.unwrap();
    flood.write_all(&h2_frame(4, 1, 0, &[])).await.unwrap();
    // Rapid reset (CVE-2023-44487): a request (HPACK static entries: GET, http, /healthz is
    // not static, so /) and its cancellation at once, stream after stream, in big writes.
    let (headers, cancel) = ([0x82u8, 0x86, 0x84], 8u32.to_be_bytes());
    let mut cut_after = None;
    'flood: for chunk in 0..200u32 {
        let mut bytes = Vec::new();
        for i in 0..100 {
            let stream = 2 * (chunk * 100 + i) + 1;
            bytes.extend(h2_frame(1, 0x5, stream, &headers));
            bytes.extend(h2_frame(3, 0, stream, &cancel));
        }
        if flood.write_all(&bytes).await.is_err() {
            cut_after = Some(chunk * 100);
            break 'flood;
        }
    }
    // Meanwhile and after, another client is served as usual.
    for _ in 0..10 {
        let answer = tokio::time::timeout(Duration::from_secs(5), get(server.addr, "/healthz"))
            .await
            .expect("served during the flood");
        assert_eq!(answer.status, 200);
    }
    // The server ends the flooding connection with a GOAWAY saying ENHANCE_YOUR_CALM (0xb),
    // then closes it, rather than start and throw away request after request.
    let mut received = Vec::new();
    let read =
        tokio::time::timeout(Duration::from_secs(10), flood.read_to_end(&mut received)).await;
    assert!(
        read.is_ok(),
        "the flooding connection is still open ({cut_after:?})"
    );
    assert_eq!(goaway_code(&received), Some(0xb), "{cut_after:?}");
}

/// The error code of the first GOAWAY frame in `bytes`, a server's frames from the start.
fn goaway_code(mut bytes: &[u8]) -> Option<u32> {
    while bytes.len() >= 9 {
        let length =
            usize::from(bytes[0]) << 16 | usize::from(bytes[1]) << 8 | usize::from(bytes[2]);
        let payload = bytes.get(9..9 + length)?;
        if bytes[3] == 7 {
            return Some(u32::from_be_bytes(payload.get(4..8)?.try_into().ok()?));
        }
        bytes = &bytes[9 + length..];
    }
    None
}

#[tokio::test]
async fn shutdown_closes_a_connection_that_has_sent_nothing_at_once() {
    // A minute for the first bytes: the shutdown must not wait it out.
    let mut server = common::start_with(&[("APEX_HEADER_READ_TIMEOUT_MS", "60000")], None).await;
    let mut silent = TcpStream::connect(server.addr).await.unwrap();
    // Accepted and waiting for its first bytes.
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.stop.take().unwrap().send(()).unwrap();
    let result = tokio::time::timeout(Duration::from_secs(10), &mut server.task)
        .await
        .expect("run returns without waiting for the silent connection");
    result.unwrap().unwrap();
    assert!(closed_within(&mut silent, Duration::from_secs(5)).await);
}

#[tokio::test]
async fn shutdown_stops_accepting_and_returns() {
    let mut server = start().await;
    assert_eq!(get(server.addr, "/healthz").await.status, 200);
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

#[test]
fn a_bad_dunning_schedule_stops_the_binary_at_start() {
    let out = Command::new(env!("CARGO_BIN_EXE_apex-server"))
        .env("DATABASE_URL", "postgres://127.0.0.1:1/x")
        .env("CLICKHOUSE_URL", "http://127.0.0.1:1")
        .env("APEX_JWT_SECRET", "0123456789abcdef0123456789abcdef")
        .env("APEX_DUNNING_RETRY_DAYS", "3,4,7,9")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(
        err.starts_with("apex-server: APEX_DUNNING_RETRY_DAYS is invalid: at most 3 retries"),
        "{err}"
    );
}
