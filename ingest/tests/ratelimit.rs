//! Per-customer rate limits at the edge (issue 19, "Fairness"): a customer flooding the edge
//! gets 429s with `Retry-After`, the RateLimit headers and the API's error body, while another
//! customer in the same period is served; only accepted records reach the stores. Everything
//! but the hold of a 429 (a lower bound) is asserted by counts, never by time: with a rate of 1 record/s, however slow the machine,
//! a flood of N requests in T seconds can pass at most burst + T of them; and a refusal that
//! must happen is forced by a refill debt no slow machine can outwait (rate 1, burst 1,000:
//! after a batch of 1,000, another needs 1,000 s). "Nothing refused is stored" is asserted
//! after [`barrier`]: waiting for a count to reach the accepted number would return before a
//! wrongly stored refused record landed.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{
    Answer, TestServer, assert_total, customer, customer_in, get, post, start_with, stored_total,
};
use serde_json::json;

/// A server where every customer may send 1 record/s with a burst of 5.
async fn small_limit() -> TestServer {
    limited(5).await
}

/// A server where every customer may send 1 record/s with a burst of `burst` records.
async fn limited(burst: u32) -> TestServer {
    let burst = burst.to_string();
    start_with(
        &[
            ("APEX_CUSTOMER_RATE_LIMIT", "1"),
            ("APEX_CUSTOMER_RATE_BURST", &burst),
        ],
        None,
    )
    .await
}

/// A fresh customer's record (within any burst), waited for in both stores: each store applies
/// the log in order, so once it is there every record logged before it is there too, and the
/// totals of the other customers are final.
async fn barrier(server: &TestServer) {
    let (id, key) = customer(server).await;
    let answer = track(server, &key).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_total(server, &id, "impressions", 1).await;
    assert_clickhouse_count(server, &id, 1).await;
}

/// The customer's records in both stores, now (after [`barrier`]).
async fn assert_stored_exactly(server: &TestServer, customer_id: &str, metric: &str, n: u64) {
    assert_eq!(
        stored_total(server, customer_id, metric).await,
        n as i64,
        "Postgres"
    );
    let (count, _) = server.stores.clickhouse_events(customer_id).await;
    assert_eq!(count, n, "ClickHouse");
}

async fn track(server: &TestServer, key: &str) -> Answer {
    post(
        server.addr,
        "/api/usage/track",
        &[
            "Content-Type: application/json",
            &format!("Authorization: Bearer {key}"),
        ],
        br#"{"metric_type":"impressions","quantity":1}"#,
    )
    .await
}

async fn batch(server: &TestServer, key: &str, records: usize) -> Answer {
    let records: Vec<_> = (0..records)
        .map(|_| json!({"metric_type": "api_calls", "quantity": 1}))
        .collect();
    post(
        server.addr,
        "/api/usage/batch",
        &[
            "Content-Type: application/json",
            &format!("Authorization: Bearer {key}"),
        ],
        json!({ "records": records }).to_string().as_bytes(),
    )
    .await
}

/// The 429 of the rate limit: the error body, `Retry-After` of at least 1 s, and the draft's
/// fields with the configured burst.
fn assert_rate_limited(answer: &Answer, burst: u32) {
    assert_eq!(answer.status, 429, "{}", answer.body);
    assert_eq!(answer.error_code(), "rate_limited");
    let retry_after: u64 = answer
        .header("Retry-After")
        .expect("Retry-After")
        .parse()
        .expect("whole seconds");
    assert!(retry_after >= 1, "{retry_after}");
    assert_eq!(
        answer.header("RateLimit-Policy").as_deref(),
        Some(format!("\"customer\";q={burst};w={burst}").as_str()),
        "at 1 record/s the burst refills in `burst` seconds"
    );
    let current = answer.header("RateLimit").expect("RateLimit");
    let (r, t) = current
        .strip_prefix("\"customer\";r=")
        .and_then(|rest| rest.split_once(";t="))
        .unwrap_or_else(|| panic!("RateLimit: {current}"));
    assert!(r.parse::<u32>().is_ok_and(|r| r < burst), "{current}");
    assert_eq!(t.parse::<u64>().ok(), Some(retry_after), "{current}");
}

#[tokio::test]
async fn a_flooding_customer_is_refused_while_another_is_served() {
    let server = small_limit().await;
    let (flooder_id, flooder) = customer(&server).await;
    let (other_id, other) = customer(&server).await;
    let started = Instant::now();
    let flood: Vec<_> = (0..30)
        .map(|_| {
            let (addr, key) = (server.addr, flooder.clone());
            tokio::spawn(async move {
                post(
                    addr,
                    "/api/usage/track",
                    &[
                        "Content-Type: application/json",
                        &format!("Authorization: Bearer {key}"),
                    ],
                    br#"{"metric_type":"impressions","quantity":1}"#,
                )
                .await
            })
        })
        .collect();
    // The other customer's requests in the same period, within its own burst: all served.
    for _ in 0..5 {
        let answer = track(&server, &other).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    let mut accepted = 0;
    let mut refused = 0;
    for request in flood {
        let answer = request.await.unwrap();
        match answer.status {
            200 => accepted += 1,
            _ => {
                assert_rate_limited(&answer, 5);
                refused += 1;
            }
        }
    }
    // At most the burst plus one record per elapsed second passes.
    let ceiling = 5 + started.elapsed().as_secs() as usize + 1;
    assert!(
        accepted >= 5 && accepted <= ceiling,
        "{accepted} of 30 accepted"
    );
    assert_eq!(accepted + refused, 30);
    // Only the accepted records were logged and stored, in both stores. (Whether any was
    // refused depends on speed; the refusal that must happen, and its metric, are the batch
    // test's.)
    barrier(&server).await;
    assert_stored_exactly(&server, &flooder_id, "impressions", accepted as u64).await;
    assert_stored_exactly(&server, &other_id, "impressions", 5).await;
}

/// Backpressure: a refusal is held before it is answered, so a connection of a flooding client
/// (HTTP/1.1 reads its next request only after the answer) sends at most one request per hold.
/// Asserted by a lower bound only, timed around the two requests alone: a slow machine makes
/// it longer, never shorter. (Which answers are held, the cap and the draining are unit tests
/// of `routes` and `ratelimit`.)
#[tokio::test]
async fn a_refused_request_is_held_before_its_answer() {
    let server = start_with(
        &[
            ("APEX_CUSTOMER_RATE_LIMIT", "1"),
            ("APEX_CUSTOMER_RATE_BURST", "1000"),
            ("APEX_RATE_LIMITED_DELAY_MS", "400"),
        ],
        None,
    )
    .await;
    let (_, key) = customer(&server).await;
    let full = batch(&server, &key, 1000).await;
    assert_eq!(full.status, 200, "{}", full.body);
    // 1,000 s of refill debt: these are refused however slow the machine, each after the hold.
    let started = Instant::now();
    let first = track(&server, &key).await;
    let second = track(&server, &key).await;
    let took = started.elapsed();
    assert_rate_limited(&first, 1000);
    assert_rate_limited(&second, 1000);
    assert!(
        took >= Duration::from_millis(800),
        "two refusals in a row take two holds: {took:?}"
    );
}

/// `apex_ingest_rate_limited_records_total` of a plan in a Prometheus exposition, 0 if absent.
fn rate_limited_records(metrics: &str, plan: &str) -> u64 {
    let series = format!("apex_ingest_rate_limited_records_total{{plan=\"{plan}\"}} ");
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(series.as_str()))
        .map_or(0, |value| value.trim().parse::<f64>().unwrap() as u64)
}

/// Waits (up to 10 s) until ClickHouse holds exactly `expected` events of the customer.
async fn assert_clickhouse_count(server: &TestServer, customer_id: &str, expected: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (count, _) = server.stores.clickhouse_events(customer_id).await;
        if count == expected {
            return;
        }
        assert!(
            count < expected,
            "{count} events in ClickHouse, {expected} accepted"
        );
        assert!(
            Instant::now() < deadline,
            "{count} of {expected} in ClickHouse"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn a_batch_costs_its_records_and_one_over_the_burst_is_refused_as_too_large() {
    let server = limited(1000).await;
    let (customer_id, key) = customer(&server).await;
    let over = batch(&server, &key, 1001).await;
    assert_eq!(over.status, 413, "{}", over.body);
    assert_eq!(over.error_code(), "batch_over_burst");
    assert!(
        over.header("Retry-After").is_none(),
        "waiting would not help"
    );
    assert_eq!(
        over.header("RateLimit-Policy").as_deref(),
        Some("\"customer\";q=1000;w=1000"),
        "the burst to split to"
    );

    let full = batch(&server, &key, 1000).await;
    assert_eq!(full.status, 200, "{}", full.body);
    assert_eq!(full.json()["accepted"], 1000);
    // The bucket was emptied: 1,000 more records need 1,000 s, longer than any slow machine
    // takes between the two requests.
    let refused = batch(&server, &key, 1000).await;
    assert_rate_limited(&refused, 1000);
    barrier(&server).await;
    assert_stored_exactly(&server, &customer_id, "api_calls", 1000).await;

    // The 413's 1,001 records and the 429's 1,000 (at least: the recorder is the process's,
    // shared with the other tests).
    let metrics = get(server.addr, "/metrics").await;
    assert!(
        rate_limited_records(&metrics.body, "starter") >= 2001,
        "the refused records are counted by plan: {}",
        metrics.body
    );
    assert!(!metrics.body.contains(&customer_id), "never by customer");
}

#[tokio::test]
async fn plan_limits_apply_without_an_override() {
    let server = start_with(&[], None).await;
    // This test's own database: make the growth plan tiny before its customer's key is loaded.
    sqlx::query(
        "UPDATE plans SET rate_limit_records_per_sec = 1, rate_limit_burst = 1000 WHERE id = 'growth'",
    )
    .execute(&server.stores.pool)
    .await
    .unwrap();
    let (limited_id, limited) = customer_in(&server.stores, "growth").await;
    let (starter_id, starter) = customer(&server).await;
    let full = batch(&server, &limited, 1000).await;
    assert_eq!(full.status, 200, "{}", full.body);
    // 1,000 s of refill debt: refused however slow the machine.
    assert_rate_limited(&batch(&server, &limited, 1000).await, 1000);
    // The starter plan's default limit (20,000 records/s, burst 200,000) passes the same.
    for _ in 0..2 {
        let answer = batch(&server, &starter, 1000).await;
        assert_eq!(answer.status, 200, "{}", answer.body);
    }
    barrier(&server).await;
    assert_stored_exactly(&server, &limited_id, "api_calls", 1000).await;
    assert_stored_exactly(&server, &starter_id, "api_calls", 2000).await;
    let metrics = get(server.addr, "/metrics").await;
    assert!(
        rate_limited_records(&metrics.body, "growth") >= 1000,
        "{}",
        metrics.body
    );
}

#[test]
fn a_bad_rate_limit_stops_the_binary_at_start() {
    for (name, value) in [
        ("APEX_CUSTOMER_RATE_LIMIT", "0"),
        ("APEX_CUSTOMER_RATE_LIMIT", "lots"),
        ("APEX_CUSTOMER_RATE_BURST", "-1"),
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_apex-server"))
            .env("DATABASE_URL", "postgres://127.0.0.1:1/x")
            .env("CLICKHOUSE_URL", "http://127.0.0.1:1")
            .env("APEX_JWT_SECRET", "0123456789abcdef0123456789abcdef")
            .env(name, value)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{name}={value}");
        let err = String::from_utf8(out.stderr).unwrap();
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.starts_with(&format!("apex-server: {name} is invalid")),
            "{err}"
        );
    }
}
