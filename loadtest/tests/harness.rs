//! The harness binary against a real apex-server (in this process, on port 0) with its own
//! Postgres and ClickHouse databases on the test stack: a short bounded load with `--verify`
//! passes; `--verify` fails when a store holds more than was acknowledged; HTTP/2 and the
//! closed loop work; targets off this machine are refused.

#[path = "../../ingest/tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::process::Output;
use std::time::Duration;

use common::TestServer;

const HARNESS: &str = env!("CARGO_BIN_EXE_apex-loadtest");

/// Creates `n` customers and writes their key file, as `apexctl customers create --json` would.
async fn key_file(server: &TestServer, n: usize) -> (PathBuf, Vec<String>) {
    let path = std::env::temp_dir().join(format!("{}_keys.jsonl", server.stores.name));
    let mut lines = String::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let (customer_id, api_key) = common::customer(server).await;
        lines.push_str(
            &serde_json::json!({"api_key": api_key, "customer_id": customer_id}).to_string(),
        );
        lines.push('\n');
        ids.push(customer_id);
    }
    std::fs::write(&path, lines).unwrap();
    (path, ids)
}

fn harness(server: &TestServer, keys: &Path, args: &[&str]) -> tokio::process::Command {
    let config = &server.stores.config;
    let mut command = tokio::process::Command::new(HARNESS);
    command
        .arg("run")
        .args(["--target", &format!("http://{}", server.addr)])
        .args(["--keys-file", &keys.to_string_lossy()])
        .arg("--no-progress")
        .args(args)
        .env("DATABASE_URL", &config.database_url)
        .env("CLICKHOUSE_URL", &config.clickhouse_url)
        .env("CLICKHOUSE_DATABASE", &config.clickhouse_database)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true);
    command
}

fn text(output: &Output) -> String {
    format!(
        "status {:?}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_short_mixed_load_is_verified_in_every_store() {
    let server = common::start().await;
    let (keys, _) = key_file(&server, 4).await;
    let json = keys.with_extension("report.json");
    let html = keys.with_extension("report.html");
    let output = harness(
        &server,
        &keys,
        &[
            "--mode",
            "mixed",
            "--batch-size",
            "20",
            "--batch-share",
            "20",
            "--rate",
            "1000",
            "--duration",
            "3s",
            "--connections",
            "16",
            "--verify",
            "--verify-timeout",
            "60s",
            "--json",
            &json.to_string_lossy(),
            "--html",
            &html.to_string_lossy(),
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("verify     PASSED"), "{stdout}");
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    // Exactly rate x duration requests, every one answered 200.
    assert_eq!(report["requests"], 3000, "{report}");
    assert_eq!(report["successes"], 3000);
    assert_eq!(report["outcomes"]["200"], 3000);
    assert_eq!(report["verify"]["passed"], true);
    assert_eq!(report["verify"]["compared"], 12);
    let accepted = report["records"]["accepted"].as_u64().unwrap();
    assert!(accepted > 3000, "batches carry several records: {accepted}");
    assert_eq!(report["records"]["unknown"], 0);
    assert!(report["latency"]["p99_us"].as_u64().unwrap() > 0);
    assert!(report["timeline"].as_array().unwrap().len() >= 3);
    let page = std::fs::read_to_string(&html).unwrap();
    assert!(page.contains("<svg") && page.contains("<polyline"));
    for file in [keys, json, html] {
        let _ = std::fs::remove_file(file);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn verify_fails_when_a_store_holds_more_than_was_acknowledged() {
    let server = common::start().await;
    let (keys, ids) = key_file(&server, 1).await;
    let customer = &ids[0];
    let run = harness(
        &server,
        &keys,
        &[
            "--mode",
            "track",
            "--mix",
            "impressions=1",
            "--rate",
            "500",
            "--duration",
            "4s",
            "--verify",
            "--verify-timeout",
            "30s",
        ],
    )
    .spawn()
    .unwrap();
    // Once the load is landing, the harness has read its baseline: add usage behind its back.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while common::stored_total(&server, customer, "impressions").await == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the load never landed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         VALUES ($1, 'impressions', date_trunc('hour', now()) - interval '3 hours', 7)",
    )
    .bind(customer)
    .execute(&server.stores.pool)
    .await
    .unwrap();
    let output = run.wait_with_output().await.unwrap();
    assert!(!output.status.success(), "{}", text(&output));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("verify     FAILED: 1 differences"),
        "{stdout}"
    );
    let line = stdout
        .lines()
        .find(|l| l.trim_start().starts_with("postgres"))
        .unwrap_or_else(|| panic!("{stdout}"));
    assert!(line.contains(customer.as_str()) && line.contains("impressions"));
    // Stored is acknowledged plus the 7 added behind the harness's back.
    let numbers: Vec<i128> = line
        .split_whitespace()
        .filter_map(|w| w.parse().ok())
        .collect();
    assert_eq!(numbers.len(), 3, "{line}");
    assert_eq!(numbers[2], numbers[0] + 7, "{line}");
    let _ = std::fs::remove_file(keys);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_closed_loop_over_http2_sends_exactly_its_request_count() {
    let server = common::start().await;
    let (keys, _) = key_file(&server, 2).await;
    let json = keys.with_extension("report.json");
    let output = harness(
        &server,
        &keys,
        &[
            "--closed",
            "--requests",
            "400",
            "--connections",
            "4",
            "--http2",
            "--mode",
            "batch",
            "--batch-size",
            "10",
            "--batch-format",
            "ndjson",
            "--verify",
            "--json",
            &json.to_string_lossy(),
        ],
    )
    .output()
    .await
    .unwrap();
    assert!(output.status.success(), "{}", text(&output));
    let report: serde_json::Value = serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
    assert_eq!(report["requests"], 400);
    assert_eq!(report["outcomes"]["200"], 400);
    assert_eq!(report["records"]["accepted"], 4000);
    assert_eq!(report["pacing"], "closed");
    assert_eq!(report["verify"]["passed"], true);
    let _ = std::fs::remove_file(keys);
    let _ = std::fs::remove_file(json);
}

#[tokio::test]
async fn targets_off_this_machine_and_bad_flags_are_refused() {
    for (args, expected) in [
        (
            vec!["run", "--target", "http://192.0.2.1:80", "--requests", "1"],
            "not a loopback address",
        ),
        (
            vec![
                "run",
                "--target",
                "http://127.0.0.1:9",
                "--keys-file",
                "/nonexistent",
            ],
            "give --duration or --requests",
        ),
        (
            vec![
                "run",
                "--target",
                "http://127.0.0.1:9",
                "--requests",
                "1",
                "--keys-file",
                "/nonexistent/keys",
            ],
            "cannot read key file",
        ),
        (
            vec!["run", "--duration", "1 fortnight"],
            "invalid value '1 fortnight' for '--duration",
        ),
    ] {
        let output = tokio::process::Command::new(HARNESS)
            .args(&args)
            .output()
            .await
            .unwrap();
        assert!(!output.status.success(), "{args:?}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{args:?}: {stderr}");
    }
}
