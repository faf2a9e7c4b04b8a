//! `POST /webhooks/stripe` over real HTTP against the test's own Postgres: signed events are
//! stored once and move the subscription status, whichever API shape names the subscription;
//! an event carrying `\u0000` (which Postgres refuses) is stored all the same, not answered
//! 503 forever; a second delivery is a no-op; forged,
//! stale, unsigned and malformed deliveries get 400 and store nothing; both secrets of a
//! rotation work; without a secret the endpoint does not exist. And end to end: localstripe,
//! which signs its deliveries with its own code, reports the subscription our Stripe mapping
//! created, and its cancellation reaches the subscription here.

mod common;

use std::sync::Mutex;

use apex_billing::webhooks::sign;
use common::{Answer, TestServer};
use serde_json::json;

const SECRET: &str = "whsec_test_secret_0123456789";
const ROTATED: &str = "whsec_rotated_secret_abcdef";

async fn server() -> TestServer {
    common::start_with(
        &[("STRIPE_WEBHOOK_SECRET", &format!("{SECRET},{ROTATED}"))],
        None,
    )
    .await
}

async fn deliver(server: &TestServer, body: &str, signature: Option<String>) -> Answer {
    let header = signature.map(|s| format!("Stripe-Signature: {s}"));
    let mut headers = vec!["Content-Type: application/json"];
    if let Some(h) = &header {
        headers.push(h);
    }
    common::post(server.addr, "/webhooks/stripe", &headers, body.as_bytes()).await
}

fn signed(secret: &str, body: &str, at: i64) -> Option<String> {
    Some(format!("t={at},v1={}", sign(secret, at, body.as_bytes())))
}

fn now() -> i64 {
    chrono::Utc::now().timestamp()
}

/// A customer whose subscription Stripe knows as `sub_<customer>`.
async fn subscribed(server: &TestServer) -> String {
    let (customer, _) = common::customer(server).await;
    let stripe_id = format!("sub_{}", &customer[4..]);
    sqlx::query("UPDATE subscriptions SET stripe_subscription_id = $2, status = 'active' WHERE customer_id = $1")
        .bind(&customer)
        .bind(&stripe_id)
        .execute(&server.stores.pool)
        .await
        .unwrap();
    stripe_id
}

async fn status(server: &TestServer, stripe_id: &str) -> String {
    sqlx::query_scalar("SELECT status FROM subscriptions WHERE stripe_subscription_id = $1")
        .bind(stripe_id)
        .fetch_one(&server.stores.pool)
        .await
        .unwrap()
}

async fn stored_events(server: &TestServer) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM stripe_events")
        .fetch_one(&server.stores.pool)
        .await
        .unwrap()
}

/// An event created a second after the one before (at least now): billing applies an event
/// older than the latest applied to a subscription not at all, and in the same second a
/// failure never replaces a payment, so a sequence must be stamped as Stripe stamps one.
fn event(id: &str, kind: &str, object: &serde_json::Value) -> String {
    static LAST: Mutex<i64> = Mutex::new(0);
    let created = {
        let mut last = LAST.lock().unwrap();
        *last = now().max(*last + 1);
        *last
    };
    json!({"id": id, "type": kind, "created": created, "data": {"object": object}}).to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_move_the_subscription_status_once() {
    let server = server().await;
    let sub = subscribed(&server).await;

    let failed = event(
        "evt_failed_1",
        "invoice.payment_failed",
        &json!({"id": "in_1", "subscription": sub, "amount_due": 4900}),
    );
    let answer = deliver(&server, &failed, signed(SECRET, &failed, now())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(
        answer.json(),
        json!({"received": true, "event_id": "evt_failed_1", "duplicate": false})
    );
    assert_eq!(status(&server, &sub).await, "past_due");

    // Redelivery is a no-op: set the status by hand, deliver again, nothing moves.
    sqlx::query("UPDATE subscriptions SET status = 'active' WHERE stripe_subscription_id = $1")
        .bind(&sub)
        .execute(&server.stores.pool)
        .await
        .unwrap();
    let again = deliver(&server, &failed, signed(SECRET, &failed, now())).await;
    assert_eq!(again.status, 200);
    assert_eq!(again.json()["duplicate"], true);
    assert_eq!(status(&server, &sub).await, "active");
    assert_eq!(stored_events(&server).await, 1);

    // The rotated secret works too; a failure then a payment leaves it active.
    let failed2 = event(
        "evt_failed_2",
        "invoice.payment_failed",
        &json!({"id": "in_2", "subscription": sub, "amount_due": 4900}),
    );
    deliver(&server, &failed2, signed(ROTATED, &failed2, now())).await;
    assert_eq!(status(&server, &sub).await, "past_due");
    // Paying one of the two unpaid invoices leaves it past due; paying both, active.
    let paid0 = event(
        "evt_paid_0",
        "invoice.paid",
        &json!({"id": "in_1", "subscription": sub, "amount_paid": 4900}),
    );
    deliver(&server, &paid0, signed(SECRET, &paid0, now())).await;
    assert_eq!(status(&server, &sub).await, "past_due");
    let paid = event(
        "evt_paid_1",
        "invoice.payment_succeeded",
        &json!({"id": "in_2", "subscription": sub, "amount_paid": 4900}),
    );
    assert_eq!(
        deliver(&server, &paid, signed(ROTATED, &paid, now()))
            .await
            .status,
        200
    );
    assert_eq!(status(&server, &sub).await, "active");

    let updated = event(
        "evt_upd_1",
        "customer.subscription.updated",
        &json!({"id": sub, "status": "unpaid"}),
    );
    deliver(&server, &updated, signed(SECRET, &updated, now())).await;
    assert_eq!(status(&server, &sub).await, "past_due");
    let deleted = event(
        "evt_del_1",
        "customer.subscription.deleted",
        &json!({"id": sub, "status": "canceled"}),
    );
    deliver(&server, &deleted, signed(SECRET, &deleted, now())).await;
    assert_eq!(status(&server, &sub).await, "canceled");
    // A canceled subscription stays canceled whatever comes later.
    let late = event(
        "evt_paid_2",
        "invoice.paid",
        &json!({"id": "in_3", "subscription": sub, "amount_paid": 100}),
    );
    deliver(&server, &late, signed(SECRET, &late, now())).await;
    assert_eq!(status(&server, &sub).await, "canceled");

    // Events billing does not act on yet are stored all the same.
    let gone = event(
        "evt_cus_del",
        "customer.deleted",
        &json!({"id": "cus_stripe_1"}),
    );
    assert_eq!(
        deliver(&server, &gone, signed(SECRET, &gone, now()))
            .await
            .status,
        200
    );
    assert_eq!(stored_events(&server).await, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_current_shape_invoice_sets_past_due_through_the_edge() {
    let server = server().await;
    let sub = subscribed(&server).await;
    // Since API version 2025-03-31 the invoice names its subscription only under `parent`.
    let failed = event(
        "evt_current_1",
        "invoice.payment_failed",
        &json!({"id": "in_c1", "object": "invoice", "customer": "cus_stripe_x", "amount_due": 4900,
                "parent": {"type": "subscription_details",
                           "subscription_details": {"subscription": sub}}}),
    );
    let answer = deliver(&server, &failed, signed(SECRET, &failed, now())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(status(&server, &sub).await, "past_due");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_signed_event_carrying_nul_is_stored_once() {
    let server = server().await;
    let sub = subscribed(&server).await;
    let body = event(
        "evt_nul_1",
        "invoice.payment_failed",
        &json!({"id": "in_n1", "subscription": sub, "amount_due": 4900, "description": "Acme\u{0}Games",
                "metadata": {"k\u{0}": "\u{0}"}}),
    );
    // The body carries the JSON escape Postgres refuses in jsonb and text.
    assert!(body.contains(r"\u0000"), "{body}");
    let answer = deliver(&server, &body, signed(SECRET, &body, now())).await;
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert_eq!(answer.json()["duplicate"], false);
    assert_eq!(status(&server, &sub).await, "past_due");
    let again = deliver(&server, &body, signed(SECRET, &body, now())).await;
    assert_eq!(again.status, 200, "{}", again.body);
    assert_eq!(again.json()["duplicate"], true);
    let (stored, processed, description): (i64, i64, Option<String>) = sqlx::query_as(
        "SELECT count(*), count(processed_at), \
             max(payload #>> '{data,object,description}') FROM stripe_events",
    )
    .fetch_one(&server.stores.pool)
    .await
    .unwrap();
    assert_eq!((stored, processed), (1, 1));
    assert_eq!(description.as_deref(), Some("Acme\u{FFFD}Games"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forged_stale_unsigned_and_malformed_deliveries_are_refused() {
    let server = server().await;
    let sub = subscribed(&server).await;
    let body = event(
        "evt_x_1",
        "invoice.payment_failed",
        &json!({"subscription": sub}),
    );
    let other = event(
        "evt_x_2",
        "invoice.payment_failed",
        &json!({"subscription": sub}),
    );
    let cases = [
        (
            "unsigned",
            deliver(&server, &body, None).await,
            "missing_signature",
        ),
        (
            "wrong secret",
            deliver(
                &server,
                &body,
                signed("whsec_attacker_secret_000", &body, now()),
            )
            .await,
            "invalid_signature",
        ),
        (
            "signature of another body",
            deliver(&server, &body, signed(SECRET, &other, now())).await,
            "invalid_signature",
        ),
        (
            "stale",
            deliver(&server, &body, signed(SECRET, &body, now() - 301)).await,
            "stale_signature",
        ),
        (
            "from the future",
            deliver(&server, &body, signed(SECRET, &body, now() + 400)).await,
            "stale_signature",
        ),
        (
            "malformed header",
            deliver(&server, &body, Some("v1=abc".into())).await,
            "invalid_signature",
        ),
        (
            // A hostile timestamp must not overflow the tolerance arithmetic.
            "timestamp i64::MIN",
            deliver(&server, &body, signed(SECRET, &body, i64::MIN)).await,
            "stale_signature",
        ),
        (
            "timestamp i64::MAX",
            deliver(&server, &body, signed(SECRET, &body, i64::MAX)).await,
            "stale_signature",
        ),
        (
            "not an event",
            deliver(
                &server,
                r#"{"hello":"world"}"#,
                signed(SECRET, r#"{"hello":"world"}"#, now()),
            )
            .await,
            "invalid_event",
        ),
    ];
    for (name, answer, code) in cases {
        assert_eq!(answer.status, 400, "{name}: {}", answer.body);
        assert_eq!(answer.error_code(), code, "{name}");
    }
    assert_eq!(stored_events(&server).await, 0);
    assert_eq!(status(&server, &sub).await, "active");
}

#[tokio::test]
async fn without_a_secret_the_endpoint_does_not_exist() {
    let server = common::start().await;
    let body = event("evt_y", "invoice.paid", &json!({}));
    let answer = deliver(&server, &body, signed(SECRET, &body, now())).await;
    assert_eq!(answer.status, 404, "{}", answer.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn localstripe_deliveries_reach_billing_through_the_verifier() {
    use apex_stripe::catalog::{sync_catalog, sync_customers};
    use apex_stripe::client::{ClientSettings, StripeClient};
    use apex_stripe::testing::{StripeStandIn, TEST_KEY};

    let server = server().await;
    let (customer, _) = common::customer(&server).await;
    let standin = StripeStandIn::start();
    standin.deliver_webhooks_to(&format!("http://{}/webhooks/stripe", server.addr), ROTATED);
    let stripe =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&server.stores.pool, &stripe).await.unwrap();
    let report = sync_customers(&server.stores.pool, &stripe, Some(&customer))
        .await
        .unwrap();
    assert_eq!(report.subscriptions_created, 1, "{report:?}");
    let sub: String = sqlx::query_scalar(
        "SELECT stripe_subscription_id FROM subscriptions WHERE customer_id = $1",
    )
    .bind(&customer)
    .fetch_one(&server.stores.pool)
    .await
    .unwrap();

    // localstripe delivers about a second after each change; wait for them by polling the
    // store (the deadline only bounds a failure).
    let stored = |kind: &'static str| {
        let pool = server.stores.pool.clone();
        async move {
            for _ in 0..200 {
                let n: i64 =
                    sqlx::query_scalar("SELECT count(*) FROM stripe_events WHERE event_type = $1")
                        .bind(kind)
                        .fetch_one(&pool)
                        .await
                        .unwrap();
                if n > 0 {
                    return n;
                }
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            panic!("no {kind} event arrived within 10 s");
        }
    };
    assert_eq!(stored("customer.subscription.created").await, 1);
    standin.delete(&format!("subscriptions/{sub}"));
    assert_eq!(stored("customer.subscription.deleted").await, 1);
    assert_eq!(status(&server, &sub).await, "canceled");
}
