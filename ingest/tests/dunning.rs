//! Dunning end to end on a simulated clock: a running `apex-server` (the real server code, in
//! process) receives the Stripe stand-in's signed webhooks, `apex_stripe::dunning::process`
//! makes the retries (the `dunning_retries` job's work) at 03:00 of each simulated day, and
//! the real email queue sends to the SMTP test server (aiosmtpd). Each test has its own
//! databases, stand-ins and customers.
//!
//! - the whole timeline: attempts on Days 3, 4 and 7 exactly, the four kinds of email in the
//!   guide's order and subjects, suspension on Day 7 with the key refused within 1 s; then a
//!   payment by hand reactivates within 1 s;
//! - recovery at attempt 2 (the card changed before Day 4);
//! - a payment by hand during the grace period: no `/pay` is ever sent;
//! - Stripe answering 500, then not answering in time, during an attempt: put off, one charge,
//!   one idempotency key;
//! - two dunning runs at once make each attempt once.

mod common;

use std::time::{Duration as StdDuration, Instant};

use apex_billing::dunning::Policy;
use apex_notify::provider::smtp::SmtpProvider;
use apex_notify::queue::{QueueSettings, Worker};
use apex_notify::testing::SmtpStandIn;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, RetryPolicy, StripeClient};
use apex_stripe::dunning::{RunRequest, RunSummary, process};
use apex_stripe::testing::{CardOutcome, StripeStandIn, TEST_KEY};
use chrono::{DateTime, Duration, Utc};
use common::{TestServer, post_json};
use serde_json::{Value, json};

const SECRET: &str = "whsec_dunning_test_secret_0123";

/// Everything one test runs against.
struct World {
    server: TestServer,
    standin: StripeStandIn,
    stripe: StripeClient,
    smtp: SmtpStandIn,
    policy: Policy,
}

/// Fast client retries, a short timeout: a fault test takes seconds, not minutes.
fn client(standin: &StripeStandIn) -> StripeClient {
    let settings = ClientSettings {
        requests_per_second: 100.0,
        burst: 20,
        timeout: StdDuration::from_millis(1_500),
        retry: RetryPolicy {
            max_attempts: 2,
            first_backoff: StdDuration::from_millis(10),
            max_backoff: StdDuration::from_millis(20),
        },
    };
    StripeClient::new(&standin.base_url(), TEST_KEY, settings).unwrap()
}

async fn world() -> World {
    let server = common::start_with(&[("STRIPE_WEBHOOK_SECRET", SECRET)], None).await;
    let standin = StripeStandIn::start();
    let stripe = client(&standin);
    sync_catalog(&server.stores.pool, &stripe).await.unwrap();
    standin.deliver_webhooks_to(&format!("http://{}/webhooks/stripe", server.addr), SECRET);
    World {
        server,
        standin,
        stripe,
        smtp: SmtpStandIn::start(),
        policy: Policy::default(),
    }
}

/// A customer of its own, mapped to Stripe; (our id, its key, its Stripe customer id).
async fn customer(w: &World) -> (String, String, String) {
    let (id, key) = common::customer(&w.server).await;
    let report = sync_customers(&w.server.stores.pool, &w.stripe, Some(&id))
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    let stripe_id: String =
        sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
            .bind(&id)
            .fetch_one(&w.server.stores.pool)
            .await
            .unwrap();
    (id, key, stripe_id)
}

/// A finalized invoice of $49.00 in Stripe for `stripe_customer`, charged automatically;
/// its id.
fn open_invoice(w: &World, stripe_customer: &str) -> String {
    w.standin.post_json(
        "/v1/invoices",
        &json!({"customer": stripe_customer, "metadata": {"test": "dunning"}}),
    );
    let id = w
        .standin
        .invoices()
        .iter()
        .rev()
        .find(|i| i["customer"] == stripe_customer && i["status"] == "draft")
        .map(|i| i["id"].as_str().unwrap().to_owned())
        .expect("the draft");
    w.standin.post_json(
        "/v1/invoiceitems",
        &json!({"customer": stripe_customer, "invoice": id, "amount": 4900, "currency": "usd",
                "description": "Growth plan"}),
    );
    w.standin
        .post_json(&format!("/v1/invoices/{id}/finalize"), &json!({}));
    id
}

/// Stripe's own first charge fails (Day 0): the stand-in sends `invoice.payment_failed` to
/// the edge; waits until the case is open and returns Day 0 as recorded.
async fn first_charge_fails(w: &World, invoice: &str) -> DateTime<Utc> {
    w.standin.fail_invoice_payment(invoice);
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let failed_at: Option<DateTime<Utc>> = sqlx::query_scalar(
            "SELECT failed_at FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0",
        )
        .bind(invoice)
        .fetch_optional(&w.server.stores.pool)
        .await
        .unwrap()
        .flatten();
        if let Some(at) = failed_at {
            return at;
        }
        assert!(Instant::now() < deadline, "no dunning case for {invoice}");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
}

/// 03:00 UTC of Day `day` after `day0`.
fn three_am(day0: DateTime<Utc>, day: i64) -> DateTime<Utc> {
    (day0.date_naive() + Duration::days(day))
        .and_hms_opt(3, 0, 0)
        .unwrap()
        .and_utc()
}

/// The dunning run at `now` (`only_postponed`: the hourly follow-up).
async fn process_at(w: &World, now: DateTime<Utc>, only_postponed: bool) -> RunSummary {
    process(
        &w.server.stores.pool,
        &w.stripe,
        &w.policy,
        RunRequest {
            now,
            only_postponed,
        },
    )
    .await
    .unwrap()
}

/// The 03:00 dunning run of a day, then the email queue at that time.
async fn run_at(w: &World, now: DateTime<Utc>) -> RunSummary {
    let summary = process_at(w, now, false).await;
    drain(w, now).await;
    summary
}

async fn drain(w: &World, now: DateTime<Utc>) {
    let provider = SmtpProvider::new(&w.smtp.settings()).unwrap();
    let settings = QueueSettings::default();
    let clock = move || now;
    Worker {
        pool: &w.server.stores.pool,
        provider: &provider,
        settings: &settings,
        name: "dunning-test".into(),
        now: &clock,
    }
    .drain(None)
    .await
    .unwrap();
}

/// The subjects of the dunning emails `to` received, in order.
fn dunning_subjects(w: &World) -> Vec<String> {
    w.smtp
        .messages()
        .into_iter()
        .filter(|m| {
            m.email_type
                .as_deref()
                .is_some_and(|t| t.starts_with("payment_") || t == "subscription_suspended")
        })
        .filter_map(|m| m.subject)
        .collect()
}

/// `/pay` requests the stand-in received for `invoice`: (idempotency key, status).
fn pay_requests(w: &World, invoice: &str) -> Vec<(String, Option<u64>)> {
    let path = format!("/v1/invoices/{invoice}/pay");
    w.standin
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "POST" && r["path"] == path.as_str())
        .map(|r| {
            (
                r["idempotency_key"].as_str().unwrap_or("").to_owned(),
                r["status"].as_u64(),
            )
        })
        .collect()
}

/// Waits until the edge has stored Stripe's `kind` event about `invoice`; the moment it saw
/// it.
async fn event_stored(w: &World, kind: &str, invoice: &str) -> Instant {
    let deadline = Instant::now() + StdDuration::from_secs(10);
    loop {
        let stored: bool = sqlx::query_scalar(
            "SELECT EXISTS (SELECT 1 FROM stripe_events WHERE event_type = $1 \
                 AND payload -> 'data' -> 'object' ->> 'id' = $2)",
        )
        .bind(kind)
        .bind(invoice)
        .fetch_one(&w.server.stores.pool)
        .await
        .unwrap();
        if stored {
            return Instant::now();
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} for {invoice} reached the edge"
        );
        tokio::time::sleep(StdDuration::from_millis(5)).await;
    }
}

/// Tracks one impression with `key` until the edge answers `want` (within 1 s of `since`).
async fn key_answers_within_a_second(w: &World, key: &str, want: u16, since: Instant) {
    let body = json!({"api_key": key, "metric_type": "impressions", "quantity": 1});
    loop {
        let answer = post_json(w.server.addr, "/api/usage/track", &body).await;
        if answer.status == want {
            if want == 403 {
                assert_eq!(answer.error_code(), "account_suspended");
            }
            break;
        }
        assert!(
            since.elapsed() < StdDuration::from_secs(1),
            "the key still answers {} after 1 s (want {want})",
            answer.status
        );
        tokio::time::sleep(StdDuration::from_millis(10)).await;
    }
}

async fn statuses(w: &World, customer: &str) -> (String, String) {
    sqlx::query_as(
        "SELECT c.status, s.status FROM customers c JOIN subscriptions s ON s.customer_id = c.id \
         WHERE c.id = $1 AND s.status <> 'canceled'",
    )
    .bind(customer)
    .fetch_one(&w.server.stores.pool)
    .await
    .unwrap()
}

/// The days (after Day 0) whose run made an attempt, with what it recorded.
fn attempt_days(days: &[(i64, RunSummary)]) -> Vec<(i64, i32, String)> {
    days.iter()
        .flat_map(|(day, s)| {
            s.attempts.iter().map(move |a| {
                (
                    *day,
                    a.attempt,
                    serde_json::to_value(a.recorded).unwrap()["outcome"]
                        .as_str()
                        .unwrap()
                        .to_owned(),
                )
            })
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_timeline_suspends_on_day_7_and_a_payment_reactivates() {
    let w = world().await;
    let (customer, key, stripe_customer) = customer(&w).await;
    w.standin
        .set_card(&stripe_customer, CardOutcome::Decline("insufficient_funds"));
    let invoice = open_invoice(&w, &stripe_customer);
    let day0 = first_charge_fails(&w, &invoice).await;
    drain(&w, day0).await;
    assert_eq!(
        statuses(&w, &customer).await,
        ("active".into(), "past_due".into())
    );

    let mut days = Vec::new();
    for day in 1..=6 {
        days.push((day, run_at(&w, three_am(day0, day)).await));
    }
    // Suspension is heard by the running edge within a second of the run that decides it.
    let day7 = process_at(&w, three_am(day0, 7), false).await;
    key_answers_within_a_second(&w, &key, 403, Instant::now()).await;
    drain(&w, three_am(day0, 7)).await;
    days.push((7, day7));
    days.push((8, run_at(&w, three_am(day0, 8)).await));

    assert_eq!(
        attempt_days(&days),
        [
            (3, 1, "failed".to_owned()),
            (4, 2, "failed".to_owned()),
            (7, 3, "suspended".to_owned())
        ]
    );
    assert_eq!(
        statuses(&w, &customer).await,
        ("suspended".into(), "suspended".into())
    );
    assert_eq!(
        dunning_subjects(&w),
        [
            "⚠️ Payment failed - action required",
            "Payment retry 1 of 3",
            "Payment retry 2 of 3",
            "Payment retry 3 of 3",
            "🚫 Service suspended - payment required",
        ]
    );
    // The retry emails went the day before each attempt (Day 2, right after attempt 1 on
    // Day 3, Day 6), each once.
    let notices: Vec<(i64, u64)> = days.iter().map(|(d, s)| (*d, s.notices)).collect();
    assert_eq!(
        notices,
        [
            (1, 0),
            (2, 1),
            (3, 1),
            (4, 0),
            (5, 0),
            (6, 1),
            (7, 0),
            (8, 0)
        ]
    );
    // Three charges, one key each; the declines were Stripe's 402.
    let pays = pay_requests(&w, &invoice);
    assert_eq!(
        pays,
        (1..=3)
            .map(|k| (format!("apex-dunning-{invoice}-{k}"), Some(402)))
            .collect::<Vec<_>>()
    );
    let (code, error): (Option<String>, Option<String>) = sqlx::query_as(
        "SELECT failure_code, last_error FROM dunning_attempts \
         WHERE invoice_id = $1 AND attempt_number = 3",
    )
    .bind(&invoice)
    .fetch_one(&w.server.stores.pool)
    .await
    .unwrap();
    assert_eq!(code.as_deref(), Some("insufficient_funds"));
    assert_eq!(error.as_deref(), Some("Your card has insufficient funds."));

    // The customer pays by hand after the suspension: reactivated within a second of the
    // payment's event reaching the edge (the stand-in delivers it in the background).
    w.standin.pay_invoice(&invoice);
    let received = event_stored(&w, "invoice.paid", &invoice).await;
    key_answers_within_a_second(&w, &key, 200, received).await;
    assert_eq!(
        statuses(&w, &customer).await,
        ("active".into(), "active".into())
    );
    drain(&w, three_am(day0, 8)).await;
    assert_eq!(
        dunning_subjects(&w).last().map(String::as_str),
        Some("✅ Payment successful - service restored")
    );
    let (status, resolution): (String, Option<String>) = sqlx::query_as(
        "SELECT status, resolution FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(&invoice)
    .fetch_one(&w.server.stores.pool)
    .await
    .unwrap();
    assert_eq!(
        (status.as_str(), resolution.as_deref()),
        ("succeeded", Some("paid"))
    );

    // What the edge decided is on its /metrics, in a page promtool accepts. (This test's
    // process also ran the email queue and the Stripe retries, whose metrics are apex-cron's:
    // only the billing families are the edge's to describe.)
    let page: String = common::get(w.server.addr, "/metrics")
        .await
        .body
        .lines()
        .filter(|l| l.contains("apex_billing_"))
        .map(|l| format!("{l}\n"))
        .collect();
    for series in [
        "apex_billing_dunning_cases_opened_total",
        "apex_billing_dunning_reactivations_total{cause=\"paid\"}",
        "apex_billing_dunning_recovery_seconds_bucket",
        "apex_billing_invoice_payments_total{outcome=\"failed\"}",
    ] {
        assert!(page.contains(series), "no {series} on /metrics");
    }
    if let Err(said) = apex_core::testing::promtool_check(&page) {
        panic!("promtool check metrics: {said}\n{page}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_card_before_day_4_recovers_at_attempt_2() {
    let w = world().await;
    let (customer, key, stripe_customer) = customer(&w).await;
    w.standin
        .set_card(&stripe_customer, CardOutcome::Decline("card_declined"));
    let invoice = open_invoice(&w, &stripe_customer);
    let day0 = first_charge_fails(&w, &invoice).await;
    let mut days = Vec::new();
    for day in 1..=3 {
        days.push((day, run_at(&w, three_am(day0, day)).await));
    }
    w.standin.set_card(&stripe_customer, CardOutcome::Succeed);
    for day in 4..=8 {
        days.push((day, run_at(&w, three_am(day0, day)).await));
    }
    assert_eq!(
        attempt_days(&days),
        [(3, 1, "failed".to_owned()), (4, 2, "succeeded".to_owned())]
    );
    assert_eq!(pay_requests(&w, &invoice).len(), 2, "no attempt 3");
    assert_eq!(
        statuses(&w, &customer).await,
        ("active".into(), "active".into())
    );
    key_answers_within_a_second(&w, &key, 200, Instant::now()).await;
    let subjects = dunning_subjects(&w);
    assert_eq!(
        subjects.last().map(String::as_str),
        Some("✅ Payment successful - service restored"),
        "{subjects:?}"
    );
    assert!(
        !subjects.iter().any(|s| s == "Payment retry 3 of 3"),
        "{subjects:?}"
    );
    let resolution: Option<String> = sqlx::query_scalar(
        "SELECT resolution FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0",
    )
    .bind(&invoice)
    .fetch_one(&w.server.stores.pool)
    .await
    .unwrap();
    assert_eq!(resolution.as_deref(), Some("retry_succeeded"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn paying_by_hand_in_the_grace_period_means_no_retry() {
    let w = world().await;
    let (customer, _, stripe_customer) = customer(&w).await;
    w.standin
        .set_card(&stripe_customer, CardOutcome::Decline("card_declined"));
    let invoice = open_invoice(&w, &stripe_customer);
    let day0 = first_charge_fails(&w, &invoice).await;
    run_at(&w, three_am(day0, 1)).await;
    // Day 1: the customer pays on the hosted page.
    w.standin.pay_invoice(&invoice);
    let deadline = Instant::now() + StdDuration::from_secs(5);
    while statuses(&w, &customer).await.1 != "active" {
        assert!(Instant::now() < deadline, "not active after the payment");
        tokio::time::sleep(StdDuration::from_millis(20)).await;
    }
    let mut made = 0;
    for day in 2..=8 {
        made += run_at(&w, three_am(day0, day)).await.attempts.len();
    }
    assert_eq!(made, 0);
    assert!(pay_requests(&w, &invoice).is_empty());
    let rows: Vec<(i32, String)> = sqlx::query_as(
        "SELECT attempt_number, status FROM dunning_attempts WHERE invoice_id = $1 \
         ORDER BY attempt_number",
    )
    .bind(&invoice)
    .fetch_all(&w.server.stores.pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        [(0, "succeeded".to_owned()), (1, "canceled".to_owned())]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_outage_during_an_attempt_puts_it_off_and_charges_once() {
    let w = world().await;
    let (_, _, stripe_customer) = customer(&w).await;
    w.standin.set_card(&stripe_customer, CardOutcome::Succeed);
    let invoice = open_invoice(&w, &stripe_customer);
    // Day 0 fails (the card was then declined; it has been replaced since).
    let day0 = first_charge_fails(&w, &invoice).await;
    let pay = format!("/v1/invoices/{invoice}/pay");

    // Day 3: Stripe answers 500 to every try of the client.
    w.standin.inject_fault_on("POST", &pay, 500, 2, None, false);
    let day3 = three_am(day0, 3);
    let summary = run_at(&w, day3).await;
    assert_eq!(summary.postponed(), 1, "{summary:?}");
    // A run that put a retry off for Stripe's sake fails, for the alert.
    let failure = summary.failure().expect("the run fails");
    assert!(failure.contains("Stripe could not be reached"), "{failure}");
    // The 03:00 run of the next day is not needed: the hourly follow-up makes it once due,
    // and not before.
    let early = process_at(&w, day3 + Duration::minutes(30), true).await;
    assert!(early.attempts.is_empty(), "{early:?}");

    // An hour later Stripe carries the payment out but its answers never come back in time
    // (the client's try and its retry with the same key both time out).
    w.standin.delay_answer(&pay, 3.0);
    w.standin.delay_answer(&pay, 3.0);
    let later = process_at(&w, day3 + Duration::minutes(90), true).await;
    assert_eq!(later.attempts.len(), 1, "{later:?}");
    // The payment's own `invoice.paid` reaches the edge meanwhile and closes the case as
    // this retry's success; else the next run reads the invoice as paid. Never a second
    // charge.
    let deadline = Instant::now() + StdDuration::from_secs(10);
    let resolution = loop {
        let resolution: Option<String> = sqlx::query_scalar(
            "SELECT resolution FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 0",
        )
        .bind(&invoice)
        .fetch_one(&w.server.stores.pool)
        .await
        .unwrap();
        if let Some(resolution) = resolution {
            break resolution;
        }
        assert!(Instant::now() < deadline, "the case never closed");
        process_at(&w, day3 + Duration::minutes(150), true).await;
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    };
    assert_eq!(resolution, "retry_succeeded");
    let attempt: String = sqlx::query_scalar(
        "SELECT status FROM dunning_attempts WHERE invoice_id = $1 AND attempt_number = 1",
    )
    .bind(&invoice)
    .fetch_one(&w.server.stores.pool)
    .await
    .unwrap();
    assert_eq!(attempt, "succeeded");
    let keys: std::collections::BTreeSet<String> = pay_requests(&w, &invoice)
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        keys.into_iter().collect::<Vec<_>>(),
        [format!("apex-dunning-{invoice}-1")],
        "one idempotency key for the attempt"
    );
    let stripe_invoice = w.standin.invoice(&invoice);
    assert_eq!(stripe_invoice["status"], "paid");
    // The first charge (Day 0) and one retry that went through.
    assert_eq!(stripe_invoice["attempt_count"], 2, "{stripe_invoice}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_runs_at_once_make_each_attempt_once() {
    let w = world().await;
    let mut invoices = Vec::new();
    let mut day0 = None;
    for _ in 0..3 {
        let (_, _, stripe_customer) = customer(&w).await;
        w.standin
            .set_card(&stripe_customer, CardOutcome::Decline("card_declined"));
        let invoice = open_invoice(&w, &stripe_customer);
        day0 = Some(first_charge_fails(&w, &invoice).await);
        invoices.push(invoice);
    }
    let now = three_am(day0.unwrap(), 3);
    let request = RunRequest {
        now,
        only_postponed: false,
    };
    let pool = &w.server.stores.pool;
    let (first, second) = tokio::join!(
        process(pool, &w.stripe, &w.policy, request),
        process(pool, &w.stripe, &w.policy, request)
    );
    let made = first.unwrap().attempts.len() + second.unwrap().attempts.len();
    assert_eq!(made, 3);
    for invoice in &invoices {
        assert_eq!(pay_requests(&w, invoice).len(), 1, "{invoice}");
    }
    let value: Value = serde_json::to_value(run_at(&w, now).await.attempts).unwrap();
    assert_eq!(value, json!([]), "a third run finds nothing due");
}
