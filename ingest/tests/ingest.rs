//! The ingest endpoints end to end: real HTTP, the real key cache on the stack's Postgres,
//! and the production pipeline, whose acknowledgement means the rollup is committed, so every
//! 200 is checked against what Postgres holds right after it.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::{assert_total, customer, post, post_json, start};
use serde_json::json;

#[tokio::test]
async fn the_guides_track_request_is_recorded_durably() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let answer = post_json(
        server.addr,
        "/api/usage/track",
        &json!({
            "api_key": key,
            "metric_type": "impressions",
            "quantity": 1000,
            "metadata": {"platform": "iOS", "sdk_version": "1.0.0"}
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"success": true, "recorded": {"customer_id": customer_id, "metric_type": "impressions", "quantity": 1000}})
    );
    // Acknowledged means in the log; the applier adds it to the rollup moments later.
    assert_total(&server, &customer_id, "impressions", 1000).await;

    // The iOS example's path, and the key in the Authorization header.
    let answer = post(
        server.addr,
        "/usage/track",
        &[
            "Content-Type: application/json",
            &format!("Authorization: Bearer {key}"),
        ],
        br#"{"metric_type":"data_transfer","quantity":35.2}"#,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["recorded"]["quantity"], json!(35.2));
    assert_total(&server, &customer_id, "data_transfer", 35_200_000_000).await;

    // Reconciled: the raw events, the daily rollup and the hourly rollups agree per day once
    // the ClickHouse applier has caught up (until then its days are unsynced, never drift).
    // The month of the records themselves (the wall clock may have passed midnight of the
    // 1st since), read from the rollups the total above waited for.
    let recorded: chrono::DateTime<chrono::Utc> =
        sqlx::query_scalar("SELECT min(recorded_at) FROM usage_records WHERE customer_id = $1")
            .bind(&customer_id)
            .fetch_one(&server.stores.pool)
            .await
            .unwrap();
    let request = apex_stripe::reconcile::Request {
        period: apex_billing::pricing::calendar_month(recorded),
        customer: Some(customer_id.clone()),
        now: chrono::Utc::now(),
        settled: false,
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let report = apex_stripe::reconcile::reconcile(
            &server.stores.pool,
            &server.stores.config,
            None,
            &request,
        )
        .await
        .unwrap();
        assert!(report.is_clean(), "{report:#?}");
        let compared = report
            .pairs
            .iter()
            .filter(|p| p.check.starts_with("raw_events/"))
            .collect::<Vec<_>>();
        if compared.len() == 4
            && compared
                .iter()
                .all(|p| p.verdict == apex_stripe::reconcile::Verdict::Ok)
        {
            break;
        }
        assert!(Instant::now() < deadline, "{report:#?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn batches_count_accepted_duplicate_and_rejected_records() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let answer = post_json(
        server.addr,
        "/api/usage/batch",
        &json!({
            "api_key": key,
            "records": [
                {"metric_type": "impressions", "quantity": 10, "event_id": "a"},
                {"metric_type": "impressions", "quantity": 0},
                {"metric_type": "api_calls", "quantity": 5, "timestamp": "2020-01-01T00:00:00Z"},
                {"metric_type": "impressions", "quantity": 10, "event_id": "a"},
                {"metric_type": "api_calls", "quantity": 7},
                "not a record"
            ]
        }),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    let json = answer.json();
    assert_eq!(
        (
            json["accepted"].clone(),
            json["duplicates"].clone(),
            json["rejected"].clone()
        ),
        (json!(2), json!(1), json!(3))
    );
    let errors: Vec<(u64, String)> = json["errors"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["index"].as_u64().unwrap(),
                e["code"].as_str().unwrap().to_owned(),
            )
        })
        .collect();
    assert_eq!(
        errors,
        [
            (1, "invalid_quantity".to_owned()),
            (2, "timestamp_out_of_range".to_owned()),
            (5, "invalid_field".to_owned())
        ]
    );
    assert_total(&server, &customer_id, "impressions", 10).await;
    assert_total(&server, &customer_id, "api_calls", 7).await;

    // NDJSON, key in the header; the event id "a" is already known.
    let ndjson = b"{\"metric_type\":\"impressions\",\"quantity\":3}\r\n\n{\"metric_type\":\"impressions\",\"quantity\":10,\"event_id\":\"a\"}\n";
    let answer = post(
        server.addr,
        "/api/usage/batch",
        &[
            "Content-Type: application/x-ndjson",
            &format!("Authorization: Bearer {key}"),
        ],
        ndjson,
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        (
            answer.json()["accepted"].clone(),
            answer.json()["duplicates"].clone()
        ),
        (json!(1), json!(1))
    );
    assert_total(&server, &customer_id, "impressions", 13).await;

    // Every record bad: 400 with the errors by index, nothing stored.
    let answer = post_json(
        server.addr,
        "/api/usage/batch",
        &json!({"api_key": key, "records": [{"metric_type": "clicks", "quantity": 1}]}),
    )
    .await;
    assert_eq!(answer.status, 400);
    assert_eq!(answer.error_code(), "all_records_rejected");
    assert_eq!(answer.json()["errors"][0]["code"], "invalid_metric");
}

#[tokio::test]
async fn a_duplicate_event_id_is_answered_and_counted_once() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let body =
        json!({"api_key": key, "metric_type": "api_calls", "quantity": 4, "event_id": "evt-1"});
    let first = post_json(server.addr, "/api/usage/track", &body).await;
    assert_eq!(first.status, 200);
    assert!(first.json().get("duplicate").is_none());
    let second = post_json(server.addr, "/api/usage/track", &body).await;
    assert_eq!(second.status, 200);
    assert_eq!(second.json()["duplicate"], true);
    assert_total(&server, &customer_id, "api_calls", 4).await;
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    encoder.write_all(data).unwrap();
    encoder.finish().unwrap()
}

#[tokio::test]
async fn compressed_bodies_are_read_and_bombs_refused() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 2}).to_string();
    for (encoding, compressed) in [
        ("gzip", gzip(body.as_bytes())),
        ("zstd", zstd::encode_all(body.as_bytes(), 3).unwrap()),
    ] {
        let answer = post(
            server.addr,
            "/api/usage/track",
            &[
                "Content-Type: application/json",
                &format!("Content-Encoding: {encoding}"),
            ],
            &compressed,
        )
        .await;
        assert_eq!(answer.status, 200, "{encoding}: {}", answer.body);
    }
    assert_total(&server, &customer_id, "impressions", 4).await;

    // 64 MiB of spaces compress to about 64 KiB: refused at the decompressed limit.
    let bomb = gzip(&vec![b' '; 64 * 1024 * 1024]);
    let answer = post(
        server.addr,
        "/api/usage/batch",
        &["Content-Type: application/json", "Content-Encoding: gzip"],
        &bomb,
    )
    .await;
    assert_eq!(answer.status, 413);
    assert_eq!(answer.error_code(), "decompressed_too_large");
}

/// Bodies compressed piece by piece (several gzip members, several zstd frames) are read to
/// their end: every record they carry is accepted and stored, none silently dropped.
#[tokio::test]
async fn every_gzip_member_and_zstd_frame_of_a_body_is_read() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let lines: Vec<String> = [1, 2, 4]
        .iter()
        .map(|q| json!({"metric_type": "impressions", "quantity": q}).to_string() + "\n")
        .collect();
    let bearer = format!("Authorization: Bearer {key}");
    for (encoding, compress) in [
        ("gzip", gzip as fn(&[u8]) -> Vec<u8>),
        ("zstd", |data: &[u8]| zstd::encode_all(data, 3).unwrap()),
    ] {
        // An NDJSON batch of three records, each compressed on its own and concatenated.
        let members: Vec<u8> = lines.iter().flat_map(|l| compress(l.as_bytes())).collect();
        let answer = post(
            server.addr,
            "/api/usage/batch",
            &[
                "Content-Type: application/x-ndjson",
                &format!("Content-Encoding: {encoding}"),
                &bearer,
            ],
            &members,
        )
        .await;
        assert_eq!(answer.status, 200, "{encoding}: {}", answer.body);
        assert_eq!(answer.json()["accepted"], 3, "{encoding}: {}", answer.body);
        // One JSON body split across two members.
        let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 8}).to_string();
        let (head, tail) = body.as_bytes().split_at(body.len() / 2);
        let split = [compress(head), compress(tail)].concat();
        let answer = post(
            server.addr,
            "/api/usage/track",
            &[
                "Content-Type: application/json",
                &format!("Content-Encoding: {encoding}"),
            ],
            &split,
        )
        .await;
        assert_eq!(answer.status, 200, "{encoding}: {}", answer.body);
    }
    assert_total(&server, &customer_id, "impressions", 2 * (1 + 2 + 4 + 8)).await;
}

#[tokio::test]
async fn a_key_revoked_elsewhere_is_refused_within_a_second() {
    let server = start().await;
    let (_, key) = customer(&server).await;
    let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 1});
    assert_eq!(
        post_json(server.addr, "/api/usage/track", &body)
            .await
            .status,
        200
    );

    // Revoked from another connection, as apexctl would.
    apex_billing::keys::revoke_key(&server.stores.pool, &key)
        .await
        .unwrap();
    let revoked_at = Instant::now();
    loop {
        let answer = post_json(server.addr, "/api/usage/track", &body).await;
        if answer.status == 401 {
            assert_eq!(answer.error_code(), "invalid_api_key");
            break;
        }
        assert_eq!(answer.status, 200);
        assert!(
            revoked_at.elapsed() < Duration::from_secs(1),
            "still accepted after 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(revoked_at.elapsed() < Duration::from_secs(1));
}

#[tokio::test]
async fn a_suspended_customer_gets_403_and_is_served_again_on_reactivation() {
    let server = start().await;
    let (customer_id, key) = customer(&server).await;
    let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 1});
    let set_status = |status: &'static str| {
        let pool = server.stores.pool.clone();
        let id = customer_id.clone();
        async move {
            sqlx::query("UPDATE customers SET status = $1 WHERE id = $2")
                .bind(status)
                .bind(id)
                .execute(&pool)
                .await
                .unwrap();
        }
    };
    set_status("suspended").await;
    // Until the change is heard (within 1 s) requests are still accepted; count them.
    let mut accepted = 0;
    let mut waited = Duration::ZERO;
    let answer = loop {
        let answer = post_json(server.addr, "/api/usage/track", &body).await;
        if answer.status != 200 || waited > Duration::from_secs(1) {
            break answer;
        }
        accepted += 1;
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    };
    assert_eq!(answer.status, 403);
    assert_eq!(answer.error_code(), "account_suspended");

    set_status("active").await;
    let mut waited = Duration::ZERO;
    loop {
        let answer = post_json(server.addr, "/api/usage/track", &body).await;
        if answer.status == 200 {
            accepted += 1;
            break;
        }
        assert!(
            waited < Duration::from_secs(1),
            "not reactivated within 1 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
        waited += Duration::from_millis(20);
    }
    assert_total(&server, &customer_id, "impressions", accepted).await;
}

#[tokio::test]
async fn a_key_created_after_start_works_at_once() {
    let server = start().await;
    let (_, key) = customer(&server).await;
    let answer = post_json(
        server.addr,
        "/api/usage/track",
        &json!({"api_key": key, "metric_type": "api_calls", "quantity": 1}),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
}
