//! `POST /webhooks/resend` over real HTTP against the test's own Postgres, with requests
//! signed here as Svix signs them: a bounce moves the logged email and suppresses its address
//! once (a redelivery answers `duplicate: true`), either secret of a rotation works, and the
//! metric counts it; forged, stale, unsigned and malformed deliveries get 400 with their codes
//! and store nothing; a store that cannot take the event answers 503 and the retry lands;
//! without a secret the endpoint is off (404).

mod common;

use apex_billing::email_webhooks::sign;
use common::{Answer, TestServer};
use serde_json::json;

/// Svix's published test secret, and a second one for the rotation.
const SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
const ROTATED: &str = "whsec_YXBleC1yb3RhdGVkLXJlc2VuZC1zZWNyZXQtMjAyNg==";

async fn server() -> TestServer {
    common::start_with(
        &[("RESEND_WEBHOOK_SECRET", &format!("{SECRET},{ROTATED}"))],
        None,
    )
    .await
}

/// The Svix headers of a delivery (each `None` is left out).
struct Svix {
    id: Option<String>,
    timestamp: Option<String>,
    signature: Option<String>,
}

/// Headers as Resend sends them: `body` signed with `secret` as message `id` at `at`.
fn signed(secret: &str, id: &str, body: &str, at: i64) -> Svix {
    let signature = sign(secret, id, at, body.as_bytes()).expect("a valid secret");
    Svix {
        id: Some(id.to_owned()),
        timestamp: Some(at.to_string()),
        signature: Some(format!("v1,{signature}")),
    }
}

async fn deliver(server: &TestServer, body: &str, svix: &Svix) -> Answer {
    let mut headers = vec!["Content-Type: application/json".to_owned()];
    for (name, value) in [
        ("svix-id", &svix.id),
        ("svix-timestamp", &svix.timestamp),
        ("svix-signature", &svix.signature),
    ] {
        if let Some(value) = value {
            headers.push(format!("{name}: {value}"));
        }
    }
    let headers: Vec<&str> = headers.iter().map(String::as_str).collect();
    common::post(server.addr, "/webhooks/resend", &headers, body.as_bytes()).await
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// Logs an email Resend knows as `message_id`, sent to `recipient`.
async fn logged(server: &TestServer, message_id: &str, recipient: &str) {
    sqlx::query(
        "INSERT INTO email_log (email_type, recipient, subject, provider, provider_message_id) \
         VALUES ('welcome', $2, 'Welcome', 'resend', $1)",
    )
    .bind(message_id)
    .bind(recipient)
    .execute(&server.stores.pool)
    .await
    .unwrap();
}

async fn delivery_status(server: &TestServer, message_id: &str) -> Option<String> {
    sqlx::query_scalar("SELECT delivery_status FROM email_log WHERE provider_message_id = $1")
        .bind(message_id)
        .fetch_one(&server.stores.pool)
        .await
        .unwrap()
}

async fn count(server: &TestServer, table: &str) -> i64 {
    // Literal queries only (sqlx refuses a formatted one): the two tables the tests read.
    let sql = match table {
        "resend_events" => "SELECT count(*) FROM resend_events",
        "email_suppressions" => "SELECT count(*) FROM email_suppressions",
        other => panic!("no count of {other}"),
    };
    sqlx::query_scalar(sql)
        .fetch_one(&server.stores.pool)
        .await
        .unwrap()
}

/// A Resend event of `kind` about `email_id`, sent to `to`.
fn event(kind: &str, email_id: &str, to: &str) -> String {
    json!({
        "type": kind,
        "created_at": "2026-03-01T10:00:05.000Z",
        "data": {
            "created_at": "2026-03-01 10:00:00.000000+00",
            "email_id": email_id,
            "from": "Apex <billing@apex.example>",
            "to": [to],
            "subject": "Welcome",
            "bounce": {"message": "550 5.1.1 user unknown", "subType": "General",
                       "type": "Permanent"}
        }
    })
    .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bounce_is_applied_once_and_a_redelivery_is_a_duplicate() {
    let server = server().await;
    logged(&server, "em_1", "ada@example.com").await;
    let body = event("email.bounced", "em_1", "Ada@Example.com");
    let answer = deliver(&server, &body, &signed(SECRET, "msg_1", &body, now())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"received": true, "event_id": "msg_1", "duplicate": false})
    );
    assert_eq!(
        delivery_status(&server, "em_1").await.as_deref(),
        Some("bounced")
    );
    let suppressed: Vec<(String, String)> =
        sqlx::query_as("SELECT address, reason FROM email_suppressions")
            .fetch_all(&server.stores.pool)
            .await
            .unwrap();
    assert_eq!(suppressed, [("ada@example.com".into(), "bounced".into())]);

    // Svix redelivers under the same id (signed anew): stored already, nothing moves.
    sqlx::query("UPDATE email_log SET delivery_status = NULL")
        .execute(&server.stores.pool)
        .await
        .unwrap();
    let again = deliver(&server, &body, &signed(SECRET, "msg_1", &body, now())).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(
        again.json(),
        json!({"received": true, "event_id": "msg_1", "duplicate": true})
    );
    assert_eq!(delivery_status(&server, "em_1").await, None);
    assert_eq!(count(&server, "resend_events").await, 1);

    // The rotated secret works too, and types we do not act on are stored all the same.
    logged(&server, "em_2", "bob@example.com").await;
    let delivered = event("email.delivered", "em_2", "bob@example.com");
    let answer = deliver(
        &server,
        &delivered,
        &signed(ROTATED, "msg_2", &delivered, now()),
    )
    .await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        delivery_status(&server, "em_2").await.as_deref(),
        Some("delivered")
    );
    let opened = event("email.opened", "em_2", "bob@example.com");
    let answer = deliver(&server, &opened, &signed(SECRET, "msg_3", &opened, now())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(count(&server, "resend_events").await, 3);
    assert_eq!(count(&server, "email_suppressions").await, 1);

    let page = common::get(server.addr, "/metrics").await.body;
    for series in [
        "# HELP apex_ingest_email_events_total ",
        "apex_ingest_email_events_total{type=\"bounced\"}",
        "apex_ingest_email_events_total{type=\"delivered\"}",
        "apex_ingest_email_events_total{type=\"other\"}",
    ] {
        assert!(page.contains(series), "no {series}:\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_unsigned_and_malformed_deliveries_are_refused() {
    let server = server().await;
    logged(&server, "em_x", "x@example.com").await;
    let body = event("email.bounced", "em_x", "x@example.com");
    let other = event("email.delivered", "em_x", "x@example.com");
    let good = || signed(SECRET, "msg_x", &body, now());
    let without = |f: fn(&mut Svix)| {
        let mut svix = good();
        f(&mut svix);
        svix
    };
    let attacker = "whsec_YXR0YWNrZXItc2VjcmV0LTAxMjM0NTY3ODk=";
    let cases = [
        (
            "unsigned",
            without(|s| s.signature = None),
            "missing_signature",
        ),
        ("no svix-id", without(|s| s.id = None), "missing_signature"),
        (
            "no timestamp",
            without(|s| s.timestamp = None),
            "missing_signature",
        ),
        (
            "wrong secret",
            signed(attacker, "msg_x", &body, now()),
            "invalid_signature",
        ),
        (
            "signature of another body",
            signed(SECRET, "msg_x", &other, now()),
            "invalid_signature",
        ),
        (
            "signature of another id",
            Svix {
                id: Some("msg_y".into()),
                ..good()
            },
            "invalid_signature",
        ),
        (
            "stale",
            signed(SECRET, "msg_x", &body, now() - 301),
            "stale_signature",
        ),
        (
            "from the future",
            signed(SECRET, "msg_x", &body, now() + 400),
            "stale_signature",
        ),
        (
            "timestamp i64::MIN",
            signed(SECRET, "msg_x", &body, i64::MIN),
            "stale_signature",
        ),
        (
            "not v1,<base64>",
            without(|s| s.signature = Some("t=1,v1=abc".into())),
            "invalid_signature",
        ),
        (
            "timestamp not a number",
            without(|s| s.timestamp = Some("yesterday".into())),
            "invalid_signature",
        ),
    ];
    for (name, svix, code) in cases {
        let answer = deliver(&server, &body, &svix).await;
        assert_eq!(answer.status, 400, "{name}: {}", answer.body);
        assert_eq!(answer.error_code(), code, "{name}");
    }
    let not_an_event = r#"{"hello":"world"}"#;
    let answer = deliver(
        &server,
        not_an_event,
        &signed(SECRET, "msg_z", not_an_event, now()),
    )
    .await;
    assert_eq!(answer.status, 400, "{}", answer.body);
    assert_eq!(answer.error_code(), "invalid_event");
    assert_eq!(count(&server, "resend_events").await, 0);
    assert_eq!(delivery_status(&server, "em_x").await, None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_store_that_cannot_take_the_event_answers_503_and_the_retry_lands() {
    let server = server().await;
    logged(&server, "em_r", "r@example.com").await;
    let body = event("email.complained", "em_r", "r@example.com");
    sqlx::query("ALTER TABLE resend_events RENAME TO resend_events_away")
        .execute(&server.stores.pool)
        .await
        .unwrap();
    let answer = deliver(&server, &body, &signed(SECRET, "msg_r", &body, now())).await;
    assert_eq!(answer.status, 503, "{}", answer.body);
    assert_eq!(answer.error_code(), "unavailable");
    assert_eq!(answer.header("retry-after").as_deref(), Some("1"));
    assert_eq!(delivery_status(&server, "em_r").await, None);
    sqlx::query("ALTER TABLE resend_events_away RENAME TO resend_events")
        .execute(&server.stores.pool)
        .await
        .unwrap();
    let retry = deliver(&server, &body, &signed(SECRET, "msg_r", &body, now())).await;
    assert_eq!(retry.status, 200, "{}", retry.body);
    assert_eq!(retry.json()["duplicate"], false);
    assert_eq!(
        delivery_status(&server, "em_r").await.as_deref(),
        Some("complained")
    );
}

#[tokio::test]
async fn without_a_secret_the_endpoint_is_off() {
    let server = common::start().await;
    let body = event("email.delivered", "em_1", "a@example.com");
    let answer = deliver(&server, &body, &signed(SECRET, "msg_1", &body, now())).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
    assert_eq!(answer.error_code(), "not_found");
    assert_eq!(count(&server, "resend_events").await, 0);
}
