//! The queue through the real providers: a real SMTP server (aiosmtpd, installed by
//! `scripts/stack.sh`) receives the guide's emails with their subjects decoded, both parts,
//! the deterministic `Message-ID` and `List-Unsubscribe` only where due; the Resend stand-in
//! (a marked test double) sees the path, key, idempotency key and JSON, and its 429, 500 and
//! 422 become a deferral, a retry and a give-up.

use std::time::Duration as StdDuration;

use apex_core::testing::TestStores;
use apex_notify::kinds::{EmailKind, UsageThreshold};
use apex_notify::message::EmailProvider;
use apex_notify::provider::resend::ResendProvider;
use apex_notify::provider::smtp::SmtpProvider;
use apex_notify::queue::{ProcessReport, QueueSettings, Worker};
use apex_notify::templates::sample_data;
use apex_notify::testing::{Fault, ResendStandIn, SmtpStandIn, TEST_RESEND_KEY};
use chrono::{DateTime, Duration, SubsecRound, Utc};
use serde_json::json;
use sqlx::PgPool;

async fn emit(pool: &PgPool, kind: EmailKind, to: &str, customer: &str) -> i64 {
    let mut data = sample_data(kind);
    data["to"] = json!(to);
    data["customer_id"] = json!(customer);
    sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at) VALUES ($1, $2, NOW()) RETURNING id",
    )
    .bind(format!("email.{}", kind.email_type()))
    .bind(data)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn drain(pool: &PgPool, provider: &dyn EmailProvider, now: DateTime<Utc>) -> ProcessReport {
    let settings = QueueSettings::default();
    let clock = move || now;
    Worker {
        pool,
        provider,
        settings: &settings,
        name: "delivery-test".into(),
        now: &clock,
    }
    .drain(None)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_real_smtp_server_gets_the_guides_emails_as_written() {
    let stores = TestStores::migrated().await;
    let smtp = SmtpStandIn::start();
    let provider = SmtpProvider::new(&smtp.settings()).unwrap();
    let failed = emit(
        &stores.pool,
        EmailKind::PaymentFailed,
        "owner@studio.example",
        "cus_smtp",
    )
    .await;
    let alert = emit(
        &stores.pool,
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Percent90,
        },
        "owner@studio.example",
        "cus_smtp",
    )
    .await;
    let report = drain(&stores.pool, &provider, Utc::now()).await;
    assert_eq!(report.sent, 2, "{report:?}");
    let mut messages = Vec::new();
    for _ in 0..50 {
        messages = smtp.messages();
        if messages.len() == 2 {
            break;
        }
        tokio::time::sleep(StdDuration::from_millis(100)).await;
    }
    assert_eq!(messages.len(), 2);
    let payment = messages
        .iter()
        .find(|m| m.email_type.as_deref() == Some("payment_failed"))
        .unwrap();
    assert_eq!(
        payment.subject.as_deref(),
        Some("⚠️ Payment failed - action required")
    );
    assert_eq!(payment.from.as_deref(), Some("noreply@apexmediation.com"));
    assert_eq!(payment.to, ["owner@studio.example"]);
    assert_eq!(
        payment.message_id.as_deref(),
        Some(format!("<apex-email-{failed}@apexmediation.com>").as_str())
    );
    assert!(
        payment.text.as_deref().unwrap().contains("$"),
        "{payment:?}"
    );
    assert!(
        payment.html.as_deref().unwrap().contains("<html"),
        "{payment:?}"
    );
    assert_eq!(
        payment.list_unsubscribe, None,
        "transactional: no unsubscribe"
    );
    let usage = messages
        .iter()
        .find(|m| m.email_type.as_deref() == Some("usage_alert_90"))
        .unwrap();
    let unsubscribe = usage.list_unsubscribe.as_deref().unwrap();
    assert!(
        unsubscribe.starts_with("<https://") && unsubscribe.contains("cus_smtp"),
        "{unsubscribe}"
    );
    assert_eq!(
        usage.message_id.as_deref(),
        Some(format!("<apex-email-{alert}@apexmediation.com>").as_str())
    );
    // email_log has each, with the Message-ID as the provider's id.
    let logged: Vec<(String, Option<String>)> =
        sqlx::query_as("SELECT email_type, provider_message_id FROM email_log ORDER BY event_id")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    assert_eq!(logged.len(), 2);
    assert_eq!(
        logged[0].1.as_deref(),
        Some(format!("<apex-email-{failed}@apexmediation.com>").as_str())
    );
}

#[tokio::test]
async fn resends_rate_limit_server_errors_and_refusals_are_handled_as_they_mean() {
    let stores = TestStores::migrated().await;
    let resend = ResendStandIn::start();
    let provider = ResendProvider::new(&resend.settings()).unwrap();
    // Postgres keeps microseconds.
    let now = Utc::now().trunc_subsecs(6);
    let id = emit(
        &stores.pool,
        EmailKind::PaymentSucceeded,
        "paid@studio.example",
        "cus_resend",
    )
    .await;

    // 429 with Retry-After: deferred by that long, not an attempt.
    resend.fail_next(1, Fault::RateLimited { retry_after: 7 });
    let report = drain(&stores.pool, &provider, now).await;
    assert_eq!(report.rate_limited, 1, "{report:?}");
    let (attempts, next): (i32, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT attempts, next_attempt_at FROM events WHERE id = $1")
            .bind(id)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(attempts, 0);
    assert_eq!(next, Some(now + Duration::seconds(7)));
    // 500: a retry later, counted.
    resend.fail_next(1, Fault::ServerError);
    let report = drain(&stores.pool, &provider, now + Duration::seconds(7)).await;
    assert_eq!(report.failed, 1, "{report:?}");
    // Then it goes.
    let report = drain(&stores.pool, &provider, now + Duration::minutes(2)).await;
    assert_eq!(report.sent, 1, "{report:?}");
    let requests = resend.requests();
    assert_eq!(requests.len(), 3);
    for request in &requests {
        assert_eq!(request.path, "/emails");
        assert_eq!(
            request.authorization.as_deref(),
            Some(format!("Bearer {TEST_RESEND_KEY}").as_str())
        );
        assert_eq!(
            request.idempotency_key.as_deref(),
            Some(format!("apex-email-{id}").as_str())
        );
    }
    let body = &requests[2].body;
    assert_eq!(body["from"], "noreply@apexmediation.com");
    assert_eq!(body["to"], json!(["paid@studio.example"]));
    assert_eq!(body["subject"], "✅ Payment successful - service restored");
    assert!(body["html"].as_str().unwrap().contains("<html"));
    assert!(!body["text"].as_str().unwrap().is_empty());
    assert_eq!(resend.emails().len(), 1);

    // 422: given up at once, with Resend's reason.
    let refused = emit(
        &stores.pool,
        EmailKind::Welcome,
        "bad@studio.example",
        "cus_refused",
    )
    .await;
    resend.fail_next(1, Fault::Invalid("The to address is invalid".into()));
    let report = drain(&stores.pool, &provider, now + Duration::minutes(3)).await;
    assert_eq!(report.given_up, 1, "{report:?}");
    let error: Option<String> =
        sqlx::query_scalar("SELECT error_message FROM events WHERE id = $1")
            .bind(refused)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert!(error.unwrap().contains("The to address is invalid"));
}
