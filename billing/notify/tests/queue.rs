//! The email queue against the real Postgres of the stack, with a recording provider (a
//! marked test double of a provider; the real providers have their own tests): the guide's
//! emit / process / check / reset flow, priorities, the 24-hour rule, caps on a simulated
//! clock, opt-outs and suppressions, transient, rate-limited and permanent failures, a poison
//! event among good ones, and two workers draining 10,000 events, each sent once.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::time::Duration as StdDuration;

use apex_core::testing::TestStores;
use apex_notify::message::{Accepted, EmailProvider, OutgoingEmail, SendError, SendFuture};
use apex_notify::queue::{ProcessReport, QueueSettings, Worker};
use chrono::{DateTime, Duration, Utc};
use serde_json::json;
use sqlx::PgPool;

/// TEST DOUBLE of a provider: records every email; answers from a script of failures first.
#[derive(Default)]
struct Recorder {
    sent: Mutex<Vec<OutgoingEmail>>,
    script: Mutex<Vec<SendError>>,
}

impl Recorder {
    fn failing(errors: Vec<SendError>) -> Self {
        Self {
            sent: Mutex::default(),
            script: Mutex::new(errors),
        }
    }

    fn sent(&self) -> Vec<OutgoingEmail> {
        self.sent.lock().unwrap().clone()
    }
}

impl EmailProvider for Recorder {
    fn name(&self) -> &'static str {
        "test"
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> SendFuture<'a> {
        Box::pin(async move {
            let scripted = {
                let mut script = self.script.lock().unwrap();
                (!script.is_empty()).then(|| script.remove(0))
            };
            if let Some(error) = scripted {
                return Err(error);
            }
            self.sent.lock().unwrap().push(email.clone());
            Ok(Accepted {
                provider_message_id: format!("msg-{}", email.idempotency_key),
            })
        })
    }
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

async fn drain_at(
    pool: &PgPool,
    provider: &Recorder,
    settings: &QueueSettings,
    now: DateTime<Utc>,
) -> ProcessReport {
    let clock = move || now;
    Worker {
        pool,
        provider,
        settings,
        name: "test-worker".into(),
        now: &clock,
    }
    .drain(None)
    .await
    .unwrap()
}

/// The guide's emit: `INSERT INTO events (event_type, data, created_at) VALUES ($1, $2, NOW())`.
async fn emit(pool: &PgPool, event_type: &str, data: serde_json::Value) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at) VALUES ($1, $2, NOW()) RETURNING id",
    )
    .bind(event_type)
    .bind(data)
    .fetch_one(pool)
    .await
    .unwrap()
}

async fn emit_at(
    pool: &PgPool,
    event_type: &str,
    data: serde_json::Value,
    when: DateTime<Utc>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at) VALUES ($1, $2, $3) RETURNING id",
    )
    .bind(event_type)
    .bind(data)
    .bind(when)
    .fetch_one(pool)
    .await
    .unwrap()
}

fn welcome(to: &str, customer: &str) -> serde_json::Value {
    json!({"to": to, "customer_id": customer, "plan_type": "starter", "api_key_prefix": "rsk_AbC12345"})
}

#[tokio::test]
async fn the_guides_emit_process_check_and_reset_flow_works_as_written() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    // The guide's "send test email" payload, plain key and all.
    let id = emit(
        pool,
        "email.welcome",
        json!({"to": "test@example.com", "customer_id": "cus_test", "api_key": "rsk_test123", "plan_type": "starter"}),
    )
    .await;
    // The guide's "emails in queue" shows it.
    let queued: Vec<(String, Option<serde_json::Value>)> = sqlx::query_as(
        "SELECT event_type, data->'to' as recipient FROM events \
         WHERE event_type LIKE 'email.%' AND processed_at IS NULL ORDER BY created_at ASC",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        queued,
        [("email.welcome".to_owned(), Some(json!("test@example.com")))]
    );

    let provider = Recorder::default();
    let report = drain_at(pool, &provider, &QueueSettings::default(), Utc::now()).await;
    assert_eq!(report.sent, 1, "{report:?}");
    let sent = provider.sent();
    assert_eq!(sent[0].to, "test@example.com");
    assert_eq!(sent[0].idempotency_key, format!("apex-email-{id}"));
    assert_eq!(sent[0].from, "noreply@apexmediation.com");
    // The plain key went nowhere: not in the email, not left in events.
    assert!(!sent[0].html.contains("rsk_test123") && !sent[0].text.contains("rsk_test123"));
    let stored: serde_json::Value = sqlx::query_scalar("SELECT data FROM events WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap();
    assert!(stored.get("api_key").is_none(), "{stored}");
    // The guide's "recent emails sent" and duplicate check see it.
    let recent: Vec<(Option<String>, String)> = sqlx::query_as(
        "SELECT customer_id, email_type FROM email_log ORDER BY sent_at DESC LIMIT 20",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(
        recent,
        [(Some("cus_test".to_owned()), "welcome".to_owned())]
    );

    // A permanent refusal is given up with a clear error_message; the guide's "failed"
    // queries both show it; its "reset to retry" revives it and it goes.
    let bad = emit(
        pool,
        "email.welcome",
        welcome("second@example.com", "cus_other"),
    )
    .await;
    let refusing = Recorder::failing(vec![SendError::Permanent {
        reason: "422 invalid recipient".into(),
    }]);
    let report = drain_at(pool, &refusing, &QueueSettings::default(), Utc::now()).await;
    assert_eq!(report.given_up, 1, "{report:?}");
    let failed: Vec<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT id, event_type, error_message FROM events WHERE event_type LIKE 'email.%' \
         AND processed_at IS NOT NULL AND error_message IS NOT NULL ORDER BY created_at DESC",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].0, bad);
    assert!(
        failed[0]
            .2
            .as_deref()
            .unwrap()
            .contains("422 invalid recipient")
    );
    let failed_too: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT * FROM events WHERE event_type LIKE 'email.%' \
         AND error_message IS NOT NULL ORDER BY created_at DESC LIMIT 10) f",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(failed_too, 1, "the guide's two failed queries agree");
    sqlx::query("UPDATE events SET processed_at = NULL, error_message = NULL WHERE id = $1")
        .bind(bad)
        .execute(pool)
        .await
        .unwrap();
    let report = drain_at(pool, &provider, &QueueSettings::default(), Utc::now()).await;
    assert_eq!(report.sent, 1, "{report:?}");
    let attempts: i32 = sqlx::query_scalar("SELECT attempts FROM events WHERE id = $1")
        .bind(bad)
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(attempts, 1, "a revived event counts its attempts anew");
}

#[tokio::test]
async fn payment_emails_go_first_and_the_24_hour_rule_holds_per_type() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = at("2026-03-10T12:00:00Z");
    let summary = json!({"to": "a@example.com", "customer_id": "cus_a", "month": "2026-02",
        "impressions": 1, "api_calls": 1, "data_transfer_gb": 0, "total_cents": 0});
    emit_at(
        pool,
        "email.monthly_summary",
        summary,
        now - Duration::minutes(3),
    )
    .await;
    emit_at(
        pool,
        "email.welcome",
        welcome("a@example.com", "cus_a"),
        now - Duration::minutes(2),
    )
    .await;
    let payment = apex_notify::templates::sample_data(apex_notify::kinds::EmailKind::PaymentFailed);
    let mut payment = payment.as_object().unwrap().clone();
    payment.insert("to".into(), json!("a@example.com"));
    payment.insert("customer_id".into(), json!("cus_a"));
    emit_at(
        pool,
        "email.payment_failed",
        json!(payment),
        now - Duration::minutes(1),
    )
    .await;
    let provider = Recorder::default();
    let report = drain_at(pool, &provider, &QueueSettings::default(), now).await;
    assert_eq!(report.sent, 3, "{report:?}");
    let order: Vec<String> = provider.sent().into_iter().map(|e| e.email_type).collect();
    assert_eq!(order, ["payment_failed", "welcome", "monthly_summary"]);

    // The same type within 24 hours: not sent; after 24 hours: sent.
    emit_at(
        pool,
        "email.welcome",
        welcome("a@example.com", "cus_a"),
        now,
    )
    .await;
    let report = drain_at(
        pool,
        &provider,
        &QueueSettings::default(),
        now + Duration::hours(23),
    )
    .await;
    assert_eq!((report.sent, report.duplicate), (0, 1), "{report:?}");
    emit_at(
        pool,
        "email.welcome",
        welcome("a@example.com", "cus_a"),
        now,
    )
    .await;
    let report = drain_at(
        pool,
        &provider,
        &QueueSettings::default(),
        now + Duration::hours(25),
    )
    .await;
    assert_eq!((report.sent, report.duplicate), (1, 0), "{report:?}");
}

#[tokio::test]
async fn over_a_cap_events_wait_for_the_next_day_never_failed_never_dropped() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let day = at("2026-03-10T09:00:00Z");
    for n in 0..5 {
        emit_at(
            pool,
            "email.welcome",
            welcome(&format!("c{n}@example.com"), &format!("cus_{n}")),
            day,
        )
        .await;
    }
    let settings = QueueSettings {
        daily_cap: Some(2),
        ..QueueSettings::default()
    };
    let provider = Recorder::default();
    let report = drain_at(pool, &provider, &settings, day).await;
    assert_eq!((report.sent, report.deferred), (2, 3), "{report:?}");
    // Later the same day: nothing more goes, nothing is due.
    let report = drain_at(pool, &provider, &settings, day + Duration::hours(10)).await;
    assert_eq!((report.claimed, report.sent), (0, 0), "{report:?}");
    // The next (simulated) day: two more.
    let report = drain_at(pool, &provider, &settings, day + Duration::hours(16)).await;
    assert_eq!(report.sent, 2, "{report:?}");
    let report = drain_at(pool, &provider, &settings, day + Duration::hours(40)).await;
    assert_eq!(report.sent, 1, "{report:?}");
    assert_eq!(provider.sent().len(), 5);
    let given_up: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE error_message IS NOT NULL")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(given_up, 0);
}

#[tokio::test]
async fn transient_failures_retry_with_backoff_and_rate_limits_are_not_attempts() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = at("2026-03-10T09:00:00Z");
    let id = emit_at(
        pool,
        "email.welcome",
        welcome("r@example.com", "cus_r"),
        now,
    )
    .await;
    let provider = Recorder::failing(vec![
        SendError::Transient {
            reason: "429 rate limited".into(),
            retry_after: Some(StdDuration::from_secs(2)),
            rate_limited: true,
        },
        SendError::Transient {
            reason: "500 server error".into(),
            retry_after: None,
            rate_limited: false,
        },
    ]);
    let settings = QueueSettings::default();
    let report = drain_at(pool, &provider, &settings, now).await;
    assert_eq!(report.rate_limited, 1, "{report:?}");
    let (attempts, next): (i32, Option<DateTime<Utc>>) =
        sqlx::query_as("SELECT attempts, next_attempt_at FROM events WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!((attempts, next), (0, Some(now + Duration::seconds(2))));
    let report = drain_at(pool, &provider, &settings, now + Duration::seconds(2)).await;
    assert_eq!(report.failed, 1, "{report:?}");
    let (attempts, next, last_error, error_message): (
        i32,
        Option<DateTime<Utc>>,
        Option<String>,
        Option<String>,
    ) = sqlx::query_as(
        "SELECT attempts, next_attempt_at, last_error, error_message FROM events WHERE id = $1",
    )
    .bind(id)
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!(attempts, 1);
    assert_eq!(
        next,
        Some(now + Duration::seconds(2) + Duration::minutes(1))
    );
    assert_eq!(last_error.as_deref(), Some("500 server error"));
    assert_eq!(
        error_message, None,
        "a transient failure is not a failed email"
    );
    let report = drain_at(pool, &provider, &settings, now + Duration::minutes(2)).await;
    assert_eq!(report.sent, 1, "{report:?}");

    // Transient every time: given up after max_attempts.
    let id = emit_at(
        pool,
        "email.welcome",
        welcome("s@example.com", "cus_s"),
        now,
    )
    .await;
    let always = Recorder::failing(
        (0..3)
            .map(|_| SendError::Transient {
                reason: "503".into(),
                retry_after: None,
                rate_limited: false,
            })
            .collect(),
    );
    let settings = QueueSettings {
        max_attempts: 3,
        ..QueueSettings::default()
    };
    for hours in [0, 1, 2] {
        drain_at(pool, &always, &settings, now + Duration::hours(hours)).await;
    }
    let error: Option<String> =
        sqlx::query_scalar("SELECT error_message FROM events WHERE id = $1")
            .bind(id)
            .fetch_one(pool)
            .await
            .unwrap();
    assert!(error.unwrap().contains("given up after 3 attempts"));
}

#[tokio::test]
async fn a_poison_event_is_given_up_and_the_rest_go() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = Utc::now();
    emit(pool, "email.welcome", welcome("ok1@example.com", "cus_1")).await;
    emit(pool, "email.no_such_kind", json!({"to": "x@example.com"})).await;
    emit(
        pool,
        "email.welcome",
        json!({"customer_id": "cus_2", "plan_type": "starter"}),
    )
    .await;
    emit(
        pool,
        "email.welcome",
        json!({"to": "not an address", "customer_id": "cus_3"}),
    )
    .await;
    emit(
        pool,
        "email.payment_failed",
        json!({"to": "p@example.com", "customer_id": "cus_4"}),
    )
    .await;
    emit(pool, "email.welcome", welcome("ok2@example.com", "cus_5")).await;
    let provider = Recorder::default();
    let report = drain_at(pool, &provider, &QueueSettings::default(), now).await;
    assert_eq!((report.sent, report.given_up), (2, 4), "{report:?}");
    let errors: Vec<String> = sqlx::query_scalar(
        "SELECT error_message FROM events WHERE error_message IS NOT NULL ORDER BY id",
    )
    .fetch_all(pool)
    .await
    .unwrap();
    assert!(errors[0].contains("unknown email type"), "{errors:?}");
    assert!(errors[1].contains("no \"to\""), "{errors:?}");
    assert!(errors[2].contains("invalid recipient"), "{errors:?}");
    assert!(
        errors[3].contains("cannot render payment_failed"),
        "{errors:?}"
    );
}

#[tokio::test]
async fn opted_out_and_suppressed_addresses_get_no_optional_email() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let customer = apex_stripe_free_customer(pool).await;
    apex_billing::email_log::set_opt_out(pool, &customer, "monthly_summary", true)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO email_suppressions (address, reason) VALUES ('gone@example.com', 'bounced')",
    )
    .execute(pool)
    .await
    .unwrap();
    let summary = |to: &str| {
        let mut data =
            apex_notify::templates::sample_data(apex_notify::kinds::EmailKind::MonthlySummary);
        data["to"] = json!(to);
        data["customer_id"] = json!(customer);
        data
    };
    emit(pool, "email.monthly_summary", summary("ok@example.com")).await;
    let mut alert =
        apex_notify::templates::sample_data(apex_notify::kinds::EmailKind::UsageAlert {
            threshold: apex_notify::kinds::UsageThreshold::Percent90,
        });
    alert["to"] = json!("ok@example.com");
    alert["customer_id"] = json!(customer);
    emit(pool, "email.usage_alert_90", alert).await;
    let mut failed =
        apex_notify::templates::sample_data(apex_notify::kinds::EmailKind::PaymentFailed);
    failed["to"] = json!("gone@example.com");
    failed["customer_id"] = json!(customer);
    emit(pool, "email.payment_failed", failed).await;
    let provider = Recorder::default();
    let report = drain_at(pool, &provider, &QueueSettings::default(), Utc::now()).await;
    // Sent: the customer's welcome (from sign-up) and the alert.
    assert_eq!(
        (report.sent, report.opted_out, report.suppressed),
        (2, 1, 1),
        "{report:?}"
    );
    let sent = provider.sent();
    let alert = sent
        .iter()
        .find(|e| e.email_type == "usage_alert_90")
        .unwrap();
    let welcome = sent.iter().find(|e| e.email_type == "welcome").unwrap();
    assert_eq!(
        welcome.list_unsubscribe, None,
        "transactional email has no unsubscribe"
    );
    let unsubscribe = alert.list_unsubscribe.as_deref().unwrap();
    assert!(
        unsubscribe.contains(&customer) && unsubscribe.contains("usage_alert"),
        "{unsubscribe}"
    );
    // The transactional email that could not go is logged for an operator.
    let logged: Vec<(String, String)> =
        sqlx::query_as("SELECT email_type, status FROM email_log ORDER BY id")
            .fetch_all(pool)
            .await
            .unwrap();
    assert!(
        logged.contains(&("payment_failed".to_owned(), "suppressed".to_owned())),
        "{logged:?}"
    );
}

/// A customer row for the opt-out's foreign key.
async fn apex_stripe_free_customer(pool: &PgPool) -> String {
    let new = apex_billing::customers::NewCustomer {
        name: "Quiet Studio".into(),
        email: "quiet@example.com".into(),
        plan_id: "starter".into(),
        trial_days: None,
    };
    apex_billing::customers::create_customer(&mut pool.acquire().await.unwrap(), &new, Utc::now())
        .await
        .unwrap()
        .customer
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_draining_ten_thousand_events_send_each_once() {
    let stores = TestStores::migrated().await;
    let pool = stores.pool.clone();
    sqlx::query(
        "INSERT INTO events (event_type, data, created_at) \
         SELECT 'email.welcome', jsonb_build_object('to', 'c' || n || '@example.com', \
                'customer_id', 'cus_' || n, 'plan_type', 'starter', 'api_key_prefix', 'rsk_x'), now() \
         FROM generate_series(1, 10000) n",
    )
    .execute(&pool)
    .await
    .unwrap();
    let provider = std::sync::Arc::new(Recorder::default());
    let settings = QueueSettings::default();
    let mut workers = Vec::new();
    for n in 0..2 {
        let (pool, provider, settings) = (pool.clone(), provider.clone(), settings.clone());
        workers.push(tokio::spawn(async move {
            let clock = Utc::now;
            Worker {
                pool: &pool,
                provider: provider.as_ref(),
                settings: &settings,
                name: format!("worker-{n}"),
                now: &clock,
            }
            .drain(None)
            .await
            .unwrap()
        }));
    }
    let mut reports = Vec::new();
    for worker in workers {
        reports.push(worker.await.unwrap());
    }
    let sent: u64 = reports.iter().map(|r| r.sent).sum();
    assert_eq!(sent, 10_000, "{reports:?}");
    assert!(
        reports.iter().all(|r| r.sent > 0),
        "both workers took part: {reports:?}"
    );
    let keys: HashSet<String> = provider
        .sent()
        .into_iter()
        .map(|e| e.idempotency_key)
        .collect();
    assert_eq!(keys.len(), 10_000, "each event sent once");
    assert_eq!(provider.sent().len(), 10_000);
    let logged: i64 = sqlx::query_scalar("SELECT count(DISTINCT event_id) FROM email_log")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(logged, 10_000);
    let left: HashMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "SELECT coalesce(leased_by, '-'), count(*) FROM events WHERE processed_at IS NULL GROUP BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    assert!(left.is_empty(), "{left:?}");
}

#[tokio::test]
async fn the_same_decision_enqueued_twice_is_one_event() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = Utc::now();
    let data = welcome("once@example.com", "cus_once");
    let first =
        apex_billing::events::enqueue_once(pool, "email.welcome", &data, "welcome:cus_once", now)
            .await
            .unwrap();
    let second =
        apex_billing::events::enqueue_once(pool, "email.welcome", &data, "welcome:cus_once", now)
            .await
            .unwrap();
    assert_eq!(first, second);
    let rows: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE dedup_key = 'welcome:cus_once'")
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(rows, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_never_both_send_one_type_to_one_customer() {
    let stores = TestStores::migrated().await;
    let pool = stores.pool.clone();
    // 200 welcome events for one customer: whichever worker gets one first sends it; every
    // other is a duplicate, however the two interleave.
    sqlx::query(
        "INSERT INTO events (event_type, data, created_at) \
         SELECT 'email.welcome', jsonb_build_object('to', 'one@example.com', \
                'customer_id', 'cus_same', 'plan_type', 'starter', 'api_key_prefix', 'rsk_x'), now() \
         FROM generate_series(1, 200)",
    )
    .execute(&pool)
    .await
    .unwrap();
    let provider = std::sync::Arc::new(Recorder::default());
    let settings = QueueSettings {
        batch_size: 10,
        ..QueueSettings::default()
    };
    let mut workers = Vec::new();
    for n in 0..2 {
        let (pool, provider, settings) = (pool.clone(), provider.clone(), settings.clone());
        workers.push(tokio::spawn(async move {
            let clock = Utc::now;
            Worker {
                pool: &pool,
                provider: provider.as_ref(),
                settings: &settings,
                name: apex_notify::queue::worker_name(&format!("w{n}")),
                now: &clock,
            }
            .drain(None)
            .await
            .unwrap()
        }));
    }
    let mut sent = 0;
    let mut duplicate = 0;
    for worker in workers {
        let report = worker.await.unwrap();
        sent += report.sent;
        duplicate += report.duplicate;
    }
    assert_eq!((sent, duplicate), (1, 199));
    assert_eq!(provider.sent().len(), 1);
}

#[tokio::test]
async fn a_worker_whose_lease_ran_out_sends_nothing_and_a_rate_limit_holds_the_batch() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = at("2026-03-10T09:00:00Z");
    let id = emit_at(
        pool,
        "email.welcome",
        welcome("l@example.com", "cus_l"),
        now,
    )
    .await;
    // Worker A claims with a lease that runs out; worker B claims the event after it.
    let claimed = apex_billing::events::claim_email_batch(
        pool,
        "worker-a",
        now,
        now + Duration::seconds(1),
        10,
    )
    .await
    .unwrap();
    assert_eq!(claimed.len(), 1);
    let provider = Recorder::default();
    let b = drain_at(
        pool,
        &provider,
        &QueueSettings::default(),
        now + Duration::seconds(2),
    )
    .await;
    assert_eq!(b.sent, 1, "{b:?}");
    // A comes back: its claim is gone, it may not send nor record anything.
    assert!(
        !apex_billing::events::renew_email_lease(pool, id, "worker-a", now + Duration::minutes(5))
            .await
            .unwrap()
    );
    let outcome = apex_billing::events::Outcome::Done { note: None };
    assert!(
        !apex_billing::events::finish_email(pool, id, "worker-a", now, &outcome)
            .await
            .unwrap()
    );

    // A 429 on the first of three: all three wait for its Retry-After, none charged.
    let ids: Vec<i64> = {
        let mut ids = Vec::new();
        for n in 0..3 {
            ids.push(
                emit_at(
                    pool,
                    "email.welcome",
                    welcome(&format!("r{n}@example.com"), &format!("cus_r{n}")),
                    now,
                )
                .await,
            );
        }
        ids
    };
    let limited = Recorder::failing(vec![SendError::Transient {
        reason: "429".into(),
        retry_after: Some(StdDuration::from_secs(30)),
        rate_limited: true,
    }]);
    // One send at a time, so none was already on its way when the 429 came back.
    let one_at_a_time = QueueSettings {
        concurrency: 1,
        ..QueueSettings::default()
    };
    let report = drain_at(pool, &limited, &one_at_a_time, now).await;
    assert_eq!((report.rate_limited, report.sent), (1, 0), "{report:?}");
    let rows: Vec<(i32, Option<DateTime<Utc>>, Option<String>)> = sqlx::query_as(
        "SELECT attempts, next_attempt_at, leased_by FROM events WHERE id = ANY($1) ORDER BY id",
    )
    .bind(&ids)
    .fetch_all(pool)
    .await
    .unwrap();
    for row in rows {
        assert_eq!(row, (0, Some(now + Duration::seconds(30)), None));
    }
    // A Retry-After of a year is held to the longest backoff.
    let far = Recorder::failing(vec![SendError::Transient {
        reason: "429".into(),
        retry_after: Some(StdDuration::from_secs(365 * 86_400)),
        rate_limited: true,
    }]);
    drain_at(
        pool,
        &far,
        &QueueSettings::default(),
        now + Duration::seconds(30),
    )
    .await;
    let latest: Option<DateTime<Utc>> =
        sqlx::query_scalar("SELECT max(next_attempt_at) FROM events WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_one(pool)
            .await
            .unwrap();
    assert_eq!(
        latest,
        Some(now + Duration::seconds(30) + Duration::hours(6))
    );
}

#[tokio::test]
async fn a_provider_that_refuses_us_stops_the_queue_without_giving_anything_up() {
    let stores = TestStores::migrated().await;
    let pool = &stores.pool;
    let now = at("2026-03-10T09:00:00Z");
    for n in 0..3 {
        emit_at(
            pool,
            "email.welcome",
            welcome(&format!("u{n}@example.com"), &format!("cus_u{n}")),
            now,
        )
        .await;
    }
    let refusing = Recorder::failing(vec![SendError::Unavailable {
        reason: "Resend answered 401: API key is invalid".into(),
    }]);
    // One send at a time, so none was already on its way when the refusal came back.
    let one_at_a_time = QueueSettings {
        concurrency: 1,
        ..QueueSettings::default()
    };
    let report = drain_at(pool, &refusing, &one_at_a_time, now).await;
    assert_eq!(report.sent, 0);
    assert!(
        report
            .provider_unavailable
            .as_deref()
            .unwrap()
            .contains("401"),
        "{report:?}"
    );
    let (attempts, given_up, due_now): (i64, i64, i64) = sqlx::query_as(
        "SELECT sum(attempts)::bigint, count(*) FILTER (WHERE error_message IS NOT NULL), \
                count(*) FILTER (WHERE next_attempt_at IS NULL AND leased_by IS NULL) FROM events",
    )
    .fetch_one(pool)
    .await
    .unwrap();
    assert_eq!((attempts, given_up), (0, 0));
    assert_eq!(due_now, 2, "the batch's other events are free at once");
    // Fixed: everything goes.
    let report = drain_at(
        pool,
        &refusing,
        &QueueSettings::default(),
        now + Duration::minutes(2),
    )
    .await;
    assert_eq!(report.sent, 3, "{report:?}");
}
