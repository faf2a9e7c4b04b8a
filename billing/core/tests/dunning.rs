//! The dunning state machine against the real Postgres, driven as production drives it:
//! Stripe's events through `webhooks::handle`, the retries through `claim_next` and
//! `record_attempt` with what Stripe answered (the Stripe calls themselves are tested end to
//! end in `ingest/tests/dunning.rs`). Covered here: one case per invoice whatever the
//! delivery order or repetition; several unpaid invoices; only dunning leaves `suspended`;
//! exemption, a case closed by hand, a manual reactivation; two claims at once; a retry put
//! off and one whose run died; the guide's four dunning queries on the rows it leaves.

use apex_billing::customers::{self, NewCustomer, create_customer};
use apex_billing::dunning::{self, AttemptResult, Policy, Recorded};
use apex_billing::subscriptions;
use apex_billing::webhooks::{self, Handled};
use apex_core::testing::TestStores;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};
use sqlx::AssertSqlSafe;

/// A customer whose Stripe customer is `cus_D<n>` and subscription `sub_D<n>` (active).
/// Returns our id.
async fn subscribed(stores: &TestStores, n: u32) -> String {
    let mut conn = stores.pool.acquire().await.unwrap();
    let created = create_customer(
        &mut conn,
        &NewCustomer {
            name: "Acme Games".into(),
            email: "billing@acme.example".into(),
            plan_id: "starter".into(),
            trial_days: Some(0),
        },
        Utc::now(),
    )
    .await
    .unwrap();
    let (cus, sub) = (format!("cus_D{n}"), format!("sub_D{n}"));
    customers::set_stripe_customer_id(&mut *conn, &created.customer.id, &cus)
        .await
        .unwrap();
    subscriptions::set_stripe_ids(&mut *conn, created.subscription_id, &sub, &cus)
        .await
        .unwrap();
    created.customer.id
}

fn event(id: &str, kind: &str, created: DateTime<Utc>, object: Value) -> String {
    let mut event = json!({"id": id, "type": kind, "created": created.timestamp(), "data": {}});
    event["data"]["object"] = object;
    event.to_string()
}

/// One of our one-off invoices of customer `cus_D<n>` as Stripe sends it (current shape).
fn invoice(id: &str, n: u32) -> Value {
    json!({"id": id, "object": "invoice", "customer": format!("cus_D{n}"), "amount_due": 4900,
           "amount_paid": 0, "currency": "usd", "status": "open", "parent": null,
           "hosted_invoice_url": format!("https://invoice.stripe.com/i/{id}")})
}

fn paid(id: &str, n: u32) -> Value {
    let mut object = invoice(id, n);
    object["amount_paid"] = json!(4900);
    object["status"] = json!("paid");
    object
}

async fn deliver(stores: &TestStores, body: &str) -> Handled {
    let event = webhooks::parse_event(body.as_bytes()).expect("a Stripe event");
    webhooks::handle(
        &mut stores.pool.acquire().await.unwrap(),
        &Policy::default(),
        &event,
        chrono::Utc::now(),
    )
    .await
    .unwrap()
}

/// (customer status, live subscription status).
async fn statuses(stores: &TestStores, customer: &str) -> (String, String) {
    sqlx::query_as(
        "SELECT c.status, s.status FROM customers c JOIN subscriptions s ON s.customer_id = c.id \
         WHERE c.id = $1 AND s.status <> 'canceled'",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// (attempt_number, status) of an invoice's rows.
async fn rows(stores: &TestStores, invoice: &str) -> Vec<(i32, String)> {
    sqlx::query_as(
        "SELECT attempt_number, status FROM dunning_attempts WHERE invoice_id = $1 \
         ORDER BY attempt_number",
    )
    .bind(invoice)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

/// The email events of a customer, oldest first, by type.
async fn emails(stores: &TestStores, customer: &str) -> Vec<String> {
    sqlx::query_scalar(
        "SELECT event_type FROM events WHERE data->>'customer_id' = $1 \
           AND event_type LIKE 'email.%' AND event_type <> 'email.welcome' ORDER BY id",
    )
    .bind(customer)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

/// A dunning run at `now` that answers every due retry with `result`; what it recorded.
async fn run(stores: &TestStores, now: DateTime<Utc>, result: &AttemptResult) -> Vec<Recorded> {
    let policy = Policy::default();
    let mut recorded = Vec::new();
    while let Some(claim) = dunning::claim_next(&stores.pool, now, false).await.unwrap() {
        let mut conn = stores.pool.acquire().await.unwrap();
        recorded.push(
            dunning::record_attempt(&mut conn, &policy, &claim, result, now)
                .await
                .unwrap(),
        );
    }
    let mut conn = stores.pool.acquire().await.unwrap();
    dunning::send_due_notices(&mut conn, &policy, now, None)
        .await
        .unwrap();
    recorded
}

fn declined() -> AttemptResult {
    AttemptResult::Declined {
        code: Some("card_declined".into()),
        message: "Your card was declined.".into(),
    }
}

/// 03:00 of Day `day` after `day0`.
fn day(day0: DateTime<Utc>, day: i64) -> DateTime<Utc> {
    (day0.date_naive() + Duration::days(day))
        .and_hms_opt(3, 0, 0)
        .unwrap()
        .and_utc()
}

/// Runs Days 3, 4 and 7 with declines: the customer's open cases suspend it.
async fn decline_to_suspension(stores: &TestStores, day0: DateTime<Utc>) {
    for d in [3, 4, 7] {
        assert!(
            !run(stores, day(day0, d), &declined()).await.is_empty(),
            "Day {d}"
        );
    }
}

#[tokio::test]
async fn a_failure_delivered_twice_late_or_caused_by_our_retry_opens_one_case() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 1).await;
    // Stripe's failure time, a whole second (as events carry it).
    let t0 = DateTime::from_timestamp(Utc::now().timestamp() - 3_600, 0).unwrap();
    let failed = event("evt_1", "invoice.payment_failed", t0, invoice("in_1", 1));
    assert!(matches!(
        deliver(&stores, &failed).await,
        Handled::Stored { .. }
    ));
    assert_eq!(deliver(&stores, &failed).await, Handled::Duplicate);
    // Day 0 is Stripe's failure time, not ours; attempt 1 is due at 00:00 UTC of Day 3.
    let (failed_at, due): (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT c.failed_at, a.next_retry_at FROM dunning_attempts c \
         JOIN dunning_attempts a ON a.invoice_id = c.invoice_id AND a.attempt_number = 1 \
         WHERE c.invoice_id = 'in_1' AND c.attempt_number = 0",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(failed_at, Some(t0));
    let midnight = |days: i64| {
        (t0.date_naive() + Duration::days(days))
            .and_hms_opt(0, 0, 0)
            .unwrap()
            .and_utc()
    };
    assert_eq!(due, Some(midnight(3)));
    // Our own retry failing sends another event for the same invoice, in the current shape
    // naming the subscription: no second case, no second email.
    let mut current = invoice("in_1", 1);
    current["customer"] = json!("cus_other");
    current["parent"] = json!({"type": "subscription_details",
                               "subscription_details": {"subscription": "sub_D1"}});
    deliver(
        &stores,
        &event(
            "evt_2",
            "invoice.payment_failed",
            t0 + Duration::days(3),
            current,
        ),
    )
    .await;
    assert_eq!(
        rows(&stores, "in_1").await,
        [(0, "failed".to_owned()), (1, "pending".to_owned())]
    );
    assert_eq!(emails(&stores, &customer).await, ["email.payment_failed"]);
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "past_due".into())
    );
    // The email carries what the template needs.
    let data: Value = sqlx::query_scalar(
        "SELECT data FROM events WHERE event_type = 'email.payment_failed' AND data->>'customer_id' = $1",
    )
    .bind(&customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(data["amount_due_cents"], 4900);
    assert_eq!(
        data["update_payment_url"],
        "https://invoice.stripe.com/i/in_1"
    );
    let dates: Vec<String> = [3, 4, 7]
        .iter()
        .map(|d| midnight(*d).date_naive().to_string())
        .collect();
    assert_eq!(data["retry_schedule"], json!(dates));

    // Paid, then the older failure of the same invoice arrives: nothing opens.
    deliver(
        &stores,
        &event("evt_3", "invoice.paid", t0, paid("in_2", 1)),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_4",
            "invoice.payment_failed",
            t0 - Duration::hours(1),
            invoice("in_2", 1),
        ),
    )
    .await;
    assert!(rows(&stores, "in_2").await.is_empty());

    // A void closes a case without a payment: no "Payment successful".
    deliver(
        &stores,
        &event("evt_5", "invoice.voided", t0, invoice("in_1", 1)),
    )
    .await;
    assert_eq!(
        rows(&stores, "in_1").await,
        [(0, "canceled".to_owned()), (1, "canceled".to_owned())]
    );
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "active".into())
    );
    assert_eq!(emails(&stores, &customer).await, ["email.payment_failed"]);
    // And a closed case is never moved again: a late failure, a late payment.
    deliver(
        &stores,
        &event(
            "evt_6",
            "invoice.payment_failed",
            t0 + Duration::days(1),
            invoice("in_1", 1),
        ),
    )
    .await;
    deliver(
        &stores,
        &event("evt_7", "invoice.paid", t0, paid("in_1", 1)),
    )
    .await;
    let resolution: Option<String> = sqlx::query_scalar(
        "SELECT resolution FROM dunning_attempts WHERE invoice_id = 'in_1' AND attempt_number = 0",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(resolution.as_deref(), Some("voided"));
    assert_eq!(emails(&stores, &customer).await, ["email.payment_failed"]);
}

#[tokio::test]
async fn a_customer_with_two_unpaid_invoices_is_reactivated_when_neither_suspends_it() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 2).await;
    let t0 = Utc::now() - Duration::days(10);
    for id in ["in_a", "in_b"] {
        deliver(
            &stores,
            &event(
                &format!("evt_{id}"),
                "invoice.payment_failed",
                t0,
                invoice(id, 2),
            ),
        )
        .await;
    }
    decline_to_suspension(&stores, t0).await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("suspended".into(), "suspended".into())
    );
    // One suspension email per case.
    let suspended: Vec<String> = emails(&stores, &customer)
        .await
        .into_iter()
        .filter(|e| e == "email.subscription_suspended")
        .collect();
    assert_eq!(suspended.len(), 2);
    deliver(
        &stores,
        &event("evt_pa", "invoice.paid", Utc::now(), paid("in_a", 2)),
    )
    .await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("suspended".into(), "suspended".into()),
        "in_b still suspends it"
    );
    deliver(
        &stores,
        &event("evt_pb", "invoice.paid", Utc::now(), paid("in_b", 2)),
    )
    .await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "active".into())
    );
    let succeeded: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'email.payment_succeeded' \
           AND data->>'customer_id' = $1",
    )
    .bind(&customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(succeeded, 2);
}

#[tokio::test]
async fn only_dunning_leaves_suspended() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 3).await;
    let t0 = Utc::now() - Duration::days(10);
    deliver(
        &stores,
        &event("evt_f", "invoice.payment_failed", t0, invoice("in_s", 3)),
    )
    .await;
    decline_to_suspension(&stores, t0).await;
    // Stripe's $0 subscription calls itself active; another invoice of the customer is paid.
    deliver(
        &stores,
        &event(
            "evt_u",
            "customer.subscription.updated",
            Utc::now(),
            json!({"id": "sub_D3", "status": "active"}),
        ),
    )
    .await;
    assert_eq!(statuses(&stores, &customer).await.1, "suspended");
    deliver(
        &stores,
        &event("evt_o", "invoice.paid", Utc::now(), paid("in_other", 3)),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_o2",
            "invoice.payment_succeeded",
            Utc::now(),
            paid("in_other", 3),
        ),
    )
    .await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("suspended".into(), "suspended".into()),
        "the customer and its subscription move together, and only by dunning"
    );
    // Suspended without a case (by a person, before dunning existed): a payment of some
    // invoice moves neither row, where it once set the subscription alone back to active.
    let by_hand = subscribed(&stores, 12).await;
    sqlx::query(
        "WITH c AS (UPDATE customers SET status = 'suspended' WHERE id = $1) \
         UPDATE subscriptions SET status = 'suspended' WHERE customer_id = $1",
    )
    .bind(&by_hand)
    .execute(&stores.pool)
    .await
    .unwrap();
    deliver(
        &stores,
        &event("evt_h", "invoice.paid", Utc::now(), paid("in_h12", 12)),
    )
    .await;
    assert_eq!(
        statuses(&stores, &by_hand).await,
        ("suspended".into(), "suspended".into())
    );
    // While a case is open Stripe's `active` does not replace our `past_due` either.
    let other = subscribed(&stores, 4).await;
    deliver(
        &stores,
        &event("evt_f4", "invoice.payment_failed", t0, invoice("in_4", 4)),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_u4",
            "customer.subscription.updated",
            Utc::now(),
            json!({"id": "sub_D4", "status": "active"}),
        ),
    )
    .await;
    assert_eq!(statuses(&stores, &other).await.1, "past_due");
    // The payment of the suspending invoice moves both rows back.
    deliver(
        &stores,
        &event("evt_p", "invoice.paid", Utc::now(), paid("in_s", 3)),
    )
    .await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "active".into())
    );
}

#[tokio::test]
async fn exemption_a_case_closed_by_hand_and_a_manual_reactivation() {
    let stores = TestStores::migrated().await;
    let t0 = Utc::now() - Duration::days(10);
    let mut conn = stores.pool.acquire().await.unwrap();

    // Exempt before the failure: the case is recorded closed, nothing else happens.
    let exempt = subscribed(&stores, 5).await;
    dunning::set_exempt(&mut conn, &exempt, true, "ops", Some("pays by wire"), t0)
        .await
        .unwrap();
    deliver(
        &stores,
        &event("evt_e", "invoice.payment_failed", t0, invoice("in_e", 5)),
    )
    .await;
    assert_eq!(rows(&stores, "in_e").await, [(0, "canceled".to_owned())]);
    assert!(emails(&stores, &exempt).await.is_empty());
    assert_eq!(statuses(&stores, &exempt).await.1, "active");

    // Exempted while a case is open: the case closes at once.
    let later = subscribed(&stores, 6).await;
    deliver(
        &stores,
        &event("evt_l", "invoice.payment_failed", t0, invoice("in_l", 6)),
    )
    .await;
    let closed = dunning::set_exempt(&mut conn, &later, true, "ops", None, t0)
        .await
        .unwrap();
    assert_eq!(closed, ["in_l"]);
    assert_eq!(
        rows(&stores, "in_l").await,
        [(0, "canceled".to_owned()), (1, "canceled".to_owned())]
    );
    assert_eq!(statuses(&stores, &later).await.1, "active");

    // Closed by hand, with who and why; twice is refused.
    let by_hand = subscribed(&stores, 7).await;
    deliver(
        &stores,
        &event("evt_h", "invoice.payment_failed", t0, invoice("in_h", 7)),
    )
    .await;
    dunning::close_by_operator(&mut conn, "in_h", "alice", Some("credited"), t0)
        .await
        .unwrap();
    let (resolution, by, note): (Option<String>, Option<String>, Option<String>) = sqlx::query_as(
        "SELECT resolution, resolved_by, resolution_note FROM dunning_attempts \
             WHERE invoice_id = 'in_h' AND attempt_number = 0",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(
        (resolution.as_deref(), by.as_deref(), note.as_deref()),
        (Some("closed"), Some("alice"), Some("credited"))
    );
    assert_eq!(statuses(&stores, &by_hand).await.1, "active");
    let again = dunning::close_by_operator(&mut conn, "in_h", "alice", None, t0).await;
    assert!(again.unwrap_err().to_string().contains("closed already"));
    assert!(
        dunning::close_by_operator(&mut conn, "in_none", "alice", None, t0)
            .await
            .is_err()
    );

    // Suspended, then reactivated by hand (the guide's reactivateSubscription).
    let suspended = subscribed(&stores, 8).await;
    deliver(
        &stores,
        &event("evt_s", "invoice.payment_failed", t0, invoice("in_s8", 8)),
    )
    .await;
    decline_to_suspension(&stores, t0).await;
    assert_eq!(statuses(&stores, &suspended).await.0, "suspended");
    let wrong = dunning::reactivate_by_operator(&mut conn, &suspended, "sub_D7", "bob", None, t0)
        .await
        .unwrap_err()
        .to_string();
    assert!(wrong.contains("sub_D8"), "{wrong}");
    let done = dunning::reactivate_by_operator(
        &mut conn,
        &suspended,
        "sub_D8",
        "bob",
        Some("suspended in error"),
        Utc::now(),
    )
    .await
    .unwrap();
    assert!(done.customer_reactivated);
    assert_eq!(done.cases_closed, ["in_s8"]);
    assert_eq!(done.subscription_status.as_deref(), Some("active"));
    assert_eq!(
        statuses(&stores, &suspended).await,
        ("active".into(), "active".into())
    );
    let audit: Value = sqlx::query_scalar(
        "SELECT data FROM events WHERE event_type = 'audit.dunning_reactivated' \
           AND data->>'customer_id' = $1",
    )
    .bind(&suspended)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(audit["by"], "bob");
    assert_eq!(audit["reason"], "suspended in error");
}

#[tokio::test]
async fn two_claims_at_once_never_take_the_same_retry() {
    let stores = TestStores::migrated().await;
    let t0 = Utc::now() - Duration::days(5);
    for n in 0..12 {
        subscribed(&stores, 100 + n).await;
        let id = format!("in_c{n}");
        deliver(
            &stores,
            &event(
                &format!("evt_c{n}"),
                "invoice.payment_failed",
                t0,
                invoice(&id, 100 + n),
            ),
        )
        .await;
    }
    let now = day(t0, 3);
    let claim_all = || {
        let pool = stores.pool.clone();
        tokio::spawn(async move {
            let mut mine = Vec::new();
            while let Some(claim) = dunning::claim_next(&pool, now, false).await.unwrap() {
                mine.push(claim.invoice_id);
                tokio::task::yield_now().await;
            }
            mine
        })
    };
    let (a, b) = (claim_all(), claim_all());
    let (mut a, b) = (a.await.unwrap(), b.await.unwrap());
    a.extend(b);
    a.sort();
    let total = a.len();
    a.dedup();
    assert_eq!((total, a.len()), (12, 12), "each retry claimed once");
}

#[tokio::test]
async fn a_retry_put_off_waits_for_the_follow_up_and_a_dead_runs_retry_is_taken_up_again() {
    let stores = TestStores::migrated().await;
    subscribed(&stores, 9).await;
    let t0 = Utc::now() - Duration::days(5);
    deliver(
        &stores,
        &event("evt_p", "invoice.payment_failed", t0, invoice("in_p", 9)),
    )
    .await;
    let policy = Policy::default();
    let now = day(t0, 3);
    let mut conn = stores.pool.acquire().await.unwrap();

    // Stripe could not be reached: put off by an hour, never skipped.
    let claim = dunning::claim_next(&stores.pool, now, false)
        .await
        .unwrap()
        .unwrap();
    let outage = AttemptResult::Postponed {
        reason: "Stripe answered 500".into(),
    };
    assert_eq!(
        dunning::record_attempt(&mut conn, &policy, &claim, &outage, now)
            .await
            .unwrap(),
        Recorded::Postponed {
            until: now + Duration::hours(1)
        }
    );
    assert!(
        dunning::claim_next(&stores.pool, now + Duration::minutes(59), true)
            .await
            .unwrap()
            .is_none()
    );
    // The hourly follow-up takes only retries put off; an hour on, this one.
    let again = dunning::claim_next(&stores.pool, now + Duration::hours(1), true)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(again.idempotency_key(), claim.idempotency_key());
    assert_eq!(again.postponements, 1);

    // The run that claimed it dies: within the lease nobody takes it, after it another run
    // does, with the same idempotency key; the dead run's answer is then stale.
    let later = now + Duration::hours(1);
    assert!(
        dunning::claim_next(
            &stores.pool,
            later + dunning::RETRY_LEASE - Duration::minutes(1),
            false
        )
        .await
        .unwrap()
        .is_none()
    );
    let taken_at = later + dunning::RETRY_LEASE + Duration::minutes(1);
    let taken = dunning::claim_next(&stores.pool, taken_at, false)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(taken.idempotency_key(), claim.idempotency_key());
    assert_eq!(
        dunning::record_attempt(&mut conn, &policy, &again, &declined(), later)
            .await
            .unwrap(),
        Recorded::Stale
    );
    let recorded = dunning::record_attempt(
        &mut conn,
        &policy,
        &taken,
        &AttemptResult::Paid {
            amount_paid_cents: Some(4900),
        },
        taken_at,
    )
    .await
    .unwrap();
    assert_eq!(recorded, Recorded::Succeeded);
    assert_eq!(
        rows(&stores, "in_p").await,
        [(0, "succeeded".to_owned()), (1, "succeeded".to_owned())]
    );
}

/// A guide snippet with the test's customer in place of `cus_xxx`.
fn guide_sql(file: &str, customer: &str) -> String {
    let path = apex_core::testing::package_dir()
        .join("tests/fixtures/ops-guide-sql")
        .join(file);
    std::fs::read_to_string(path)
        .unwrap()
        .replace("'cus_xxx'", &format!("'{customer}'"))
}

#[tokio::test]
async fn the_guides_dunning_queries_return_meaningful_rows() {
    use sqlx::Row;
    let stores = TestStores::migrated().await;
    // One customer suspended after three failed retries, Day 0 ten days ago; another in its
    // grace period with attempt 1 due since midnight.
    let suspended = subscribed(&stores, 10).await;
    let waiting = subscribed(&stores, 11).await;
    let t0 = Utc::now() - Duration::days(10);
    deliver(
        &stores,
        &event("evt_g1", "invoice.payment_failed", t0, invoice("in_g1", 10)),
    )
    .await;
    decline_to_suspension(&stores, t0).await;
    let t1 = Utc::now() - Duration::days(3);
    deliver(
        &stores,
        &event("evt_g2", "invoice.payment_failed", t1, invoice("in_g2", 11)),
    )
    .await;

    let status = sqlx::raw_sql(AssertSqlSafe(guide_sql(
        "02_dunning_status.sql",
        &suspended,
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    let mut seen: Vec<(i32, String)> = status
        .iter()
        .map(|r| (r.get("attempt_number"), r.get("status")))
        .collect();
    // The guide orders by created_at; here the retries ran on a clock set in the past, so
    // compare by attempt.
    seen.sort_by_key(|r| std::cmp::Reverse(r.0));
    assert_eq!(
        seen,
        [
            (3, "failed".to_owned()),
            (2, "failed".to_owned()),
            (1, "failed".to_owned()),
            (0, "suspended".to_owned())
        ]
    );

    let pending = sqlx::raw_sql(AssertSqlSafe(guide_sql(
        "08_pending_dunning_retries.sql",
        "",
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    let due: Vec<(String, i32)> = pending
        .iter()
        .map(|r| (r.get("customer_id"), r.get("attempt_number")))
        .collect();
    assert_eq!(due, [(waiting.clone(), 1)]);

    let history = sqlx::raw_sql(AssertSqlSafe(guide_sql(
        "11_dunning_history.sql",
        &suspended,
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    assert_eq!(history.len(), 4);
    let mut codes: Vec<(i32, Option<String>)> = history
        .iter()
        .map(|r| (r.get("attempt_number"), r.get("failure_code")))
        .collect();
    codes.sort_by_key(|r| std::cmp::Reverse(r.0));
    let declined = || Some("card_declined".to_owned());
    assert_eq!(
        codes,
        [(3, declined()), (2, declined()), (1, declined()), (0, None)]
    );

    // The customer pays: the case row becomes the recovered one of attempt 0.
    deliver(
        &stores,
        &event("evt_g3", "invoice.paid", Utc::now(), paid("in_g1", 10)),
    )
    .await;
    let effectiveness = sqlx::raw_sql(AssertSqlSafe(guide_sql(
        "14_grafana_dunning_effectiveness.sql",
        "",
    )))
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    let table: Vec<(i32, i64, i64)> = effectiveness
        .iter()
        .map(|r| (r.get("attempt_number"), r.get("total"), r.get("recovered")))
        .collect();
    // Attempt 0: both cases, one recovered (by hand, after suspension); retries 1 to 3 of the
    // first case failed; the second's first retry is still pending.
    assert_eq!(table, [(0, 2, 1), (1, 2, 0), (2, 1, 0), (3, 1, 0)]);
}

#[tokio::test]
async fn two_invoices_paid_at_once_reactivate_the_customer() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 20).await;
    let t0 = Utc::now() - Duration::days(10);
    for id in ["in_x", "in_y"] {
        deliver(
            &stores,
            &event(
                &format!("evt_{id}"),
                "invoice.payment_failed",
                t0,
                invoice(id, 20),
            ),
        )
        .await;
    }
    decline_to_suspension(&stores, t0).await;
    assert_eq!(statuses(&stores, &customer).await.0, "suspended");
    // Both payments at the same moment, each on its own connection: each step takes the
    // customer's row first, so the second sees the first's case closed.
    let (x, y) = (
        event("evt_px", "invoice.paid", Utc::now(), paid("in_x", 20)),
        event("evt_py", "invoice.paid", Utc::now(), paid("in_y", 20)),
    );
    tokio::join!(deliver(&stores, &x), deliver(&stores, &y));
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "active".into())
    );
}

#[tokio::test]
async fn a_credit_that_settles_the_invoice_closes_its_case_without_a_payment_email() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 21).await;
    let t0 = Utc::now() - Duration::days(10);
    deliver(
        &stores,
        &event("evt_cf", "invoice.payment_failed", t0, invoice("in_cr", 21)),
    )
    .await;
    decline_to_suspension(&stores, t0).await;
    // A credit note brings the amount due to zero: Stripe marks it paid, collecting nothing.
    let mut settled = paid("in_cr", 21);
    settled["amount_paid"] = json!(0);
    deliver(
        &stores,
        &event("evt_cp", "invoice.paid", Utc::now(), settled),
    )
    .await;
    assert_eq!(
        statuses(&stores, &customer).await,
        ("active".into(), "active".into())
    );
    assert!(
        !emails(&stores, &customer)
            .await
            .contains(&"email.payment_succeeded".to_owned())
    );
    // A $0 paid invoice with no case (Stripe's own renewals) still changes nothing.
    deliver(
        &stores,
        &event("evt_c0", "invoice.paid", Utc::now(), {
            let mut zero = paid("in_zero", 21);
            zero["amount_paid"] = json!(0);
            zero
        }),
    )
    .await;
    assert!(rows(&stores, "in_zero").await.is_empty());
}

#[tokio::test]
async fn a_payment_naming_our_retrys_key_is_that_retrys_success() {
    let stores = TestStores::migrated().await;
    subscribed(&stores, 22).await;
    let t0 = Utc::now() - Duration::days(5);
    deliver(
        &stores,
        &event("evt_kf", "invoice.payment_failed", t0, invoice("in_k", 22)),
    )
    .await;
    // The retry's answer is lost and its run put it off; Stripe's event of that payment names
    // the retry's idempotency key.
    let now = day(t0, 3);
    let claim = dunning::claim_next(&stores.pool, now, false)
        .await
        .unwrap()
        .unwrap();
    let mut conn = stores.pool.acquire().await.unwrap();
    dunning::record_attempt(
        &mut conn,
        &Policy::default(),
        &claim,
        &AttemptResult::Postponed {
            reason: "timeout".into(),
        },
        now,
    )
    .await
    .unwrap();
    let mut body: Value = serde_json::from_str(&event(
        "evt_kp",
        "invoice.paid",
        Utc::now(),
        paid("in_k", 22),
    ))
    .unwrap();
    body["request"] = json!({"id": "req_1", "idempotency_key": claim.idempotency_key()});
    deliver(&stores, &body.to_string()).await;
    let resolution: Option<String> = sqlx::query_scalar(
        "SELECT resolution FROM dunning_attempts WHERE invoice_id = 'in_k' AND attempt_number = 0",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(resolution.as_deref(), Some("retry_succeeded"));
    assert_eq!(
        rows(&stores, "in_k").await,
        [(0, "succeeded".to_owned()), (1, "succeeded".to_owned())]
    );
    // A payment by hand (no key of ours) while nothing is in flight is the customer's.
    subscribed(&stores, 23).await;
    deliver(
        &stores,
        &event(
            "evt_hf",
            "invoice.payment_failed",
            t0,
            invoice("in_hand", 23),
        ),
    )
    .await;
    deliver(
        &stores,
        &event("evt_hp", "invoice.paid", Utc::now(), paid("in_hand", 23)),
    )
    .await;
    assert_eq!(
        rows(&stores, "in_hand").await,
        [(0, "succeeded".to_owned()), (1, "canceled".to_owned())]
    );
}
