//! Stripe webhook events against the real Postgres: invoices name their subscription in the
//! current API shape, the old one, or only through their customer; an older event delivered
//! late never undoes a newer one; the invoice mirror follows our invoices through Stripe's
//! states; and an event carrying `\u0000` (which Postgres refuses) is stored and applied.

use apex_billing::customers::{self, NewCustomer, create_customer};
use apex_billing::subscriptions;
use apex_billing::webhooks::{self, Handled};
use apex_core::testing::TestStores;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// A fixed event time, unix seconds; tests step from it.
const T: i64 = 1_790_000_000;

fn at(t: i64) -> DateTime<Utc> {
    DateTime::from_timestamp(t, 0).unwrap()
}

/// A customer whose Stripe customer is `cus_S<n>` and whose subscription is `sub_S<n>` (the
/// subscription `active`). Returns our customer id.
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
    let (stripe_customer, stripe_subscription) = (format!("cus_S{n}"), format!("sub_S{n}"));
    customers::set_stripe_customer_id(&mut *conn, &created.customer.id, &stripe_customer)
        .await
        .unwrap();
    subscriptions::set_stripe_ids(
        &mut *conn,
        created.subscription_id,
        &stripe_subscription,
        &stripe_customer,
    )
    .await
    .unwrap();
    created.customer.id
}

/// Parses and handles one event body as the edge does.
async fn deliver(stores: &TestStores, body: &str) -> Handled {
    let event = webhooks::parse_event(body.as_bytes()).expect("a Stripe event");
    webhooks::handle(
        &mut stores.pool.acquire().await.unwrap(),
        &Default::default(),
        &event,
        chrono::Utc::now(),
    )
    .await
    .unwrap()
}

fn event(id: &str, kind: &str, created: Option<i64>, object: Value) -> String {
    let mut event = json!({"id": id, "type": kind, "data": {}});
    event["data"]["object"] = object;
    if let Some(created) = created {
        event["created"] = json!(created);
    }
    event.to_string()
}

/// An invoice in the current API shape: its subscription only under `parent`.
fn current_invoice(subscription: &str) -> Value {
    json!({
        "id": "in_sub_1", "object": "invoice", "customer": "cus_other", "status": "open",
        "parent": {"type": "subscription_details",
                   "subscription_details": {"subscription": subscription, "metadata": {}}},
    })
}

/// The subscription's status and `stripe_event_at` (the live one, else the latest).
async fn subscription(stores: &TestStores, customer: &str) -> (String, Option<DateTime<Utc>>) {
    sqlx::query_as(
        "SELECT status, stripe_event_at FROM subscriptions WHERE customer_id = $1 \
         ORDER BY (status <> 'canceled') DESC, id DESC LIMIT 1",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

fn stored(subscriptions_updated: u64, invoices_updated: u64) -> Handled {
    Handled::Stored {
        subscriptions_updated,
        invoices_updated,
    }
}

#[tokio::test]
async fn a_current_shape_payment_failure_sets_past_due() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 1).await;
    let mut invoice = current_invoice("sub_S1");
    invoice["amount_due"] = json!(4900);
    let failed = event("evt_f1", "invoice.payment_failed", Some(T), invoice);
    assert_eq!(deliver(&stores, &failed).await, stored(1, 0));
    // Dunning decides invoice events: the subscription's Stripe time is its own events'.
    assert_eq!(
        subscription(&stores, &customer).await,
        ("past_due".into(), None)
    );
    // A second delivery is a no-op.
    assert_eq!(deliver(&stores, &failed).await, Handled::Duplicate);

    // The old shape, expanded, still works.
    let paid = event(
        "evt_p1",
        "invoice.paid",
        Some(T + 1),
        json!({"id": "in_sub_1", "amount_paid": 4900,
               "subscription": {"id": "sub_S1", "object": "subscription"}}),
    );
    assert_eq!(deliver(&stores, &paid).await, stored(1, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "active");
}

#[tokio::test]
async fn an_invoice_without_a_subscription_moves_its_customers_live_subscription() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 2).await;
    // An earlier, canceled subscription of the same customer stays as it is.
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan_id, status, canceled_at) \
         VALUES ($1, 'starter', 'canceled', now())",
    )
    .bind(&customer)
    .execute(&stores.pool)
    .await
    .unwrap();
    // Our monthly invoices are one-off: no subscription, no parent.
    let one_off = |customer: Value| {
        json!({"id": "in_own_1", "object": "invoice", "customer": customer, "amount_due": 2900,
               "amount_paid": 2900, "subscription": null, "parent": null, "status": "open"})
    };
    let failed = event(
        "evt_c1",
        "invoice.payment_failed",
        Some(T),
        one_off(json!("cus_S2")),
    );
    assert_eq!(deliver(&stores, &failed).await, stored(1, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "past_due");
    let paid = event(
        "evt_c2",
        "invoice.paid",
        Some(T + 60),
        one_off(json!({"id": "cus_S2", "object": "customer"})),
    );
    assert_eq!(deliver(&stores, &paid).await, stored(1, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "active");
    let canceled: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM subscriptions WHERE customer_id = $1 AND status = 'canceled'",
    )
    .bind(&customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(canceled, 1);

    // A Stripe customer we do not know: stored, nothing moved.
    let mut stranger = one_off(json!("cus_unknown"));
    stranger["id"] = json!("in_own_2");
    let stranger = event("evt_c3", "invoice.payment_failed", Some(T + 120), stranger);
    assert_eq!(deliver(&stores, &stranger).await, stored(0, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "active");
}

#[tokio::test]
async fn an_older_failure_never_undoes_a_newer_payment() {
    let stores = TestStores::migrated().await;
    let invoice = |id: &str, sub: &str| json!({"id": id, "subscription": sub, "amount_due": 4900, "amount_paid": 4900});

    // Newer paid first, then the older failure of the same invoice: stays active, no case.
    let customer = subscribed(&stores, 3).await;
    deliver(
        &stores,
        &event(
            "evt_o1",
            "invoice.paid",
            Some(T + 10),
            invoice("in_o", "sub_S3"),
        ),
    )
    .await;
    let late = event(
        "evt_o2",
        "invoice.payment_failed",
        Some(T),
        invoice("in_o", "sub_S3"),
    );
    assert_eq!(deliver(&stores, &late).await, stored(0, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "active");
    assert_eq!(cases(&stores, &customer).await, 0);
    // Both stored and processed.
    let processed: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM stripe_events WHERE processed_at IS NOT NULL AND id LIKE 'evt_o%'",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(processed, 2);

    // In order: failure then payment ends active too.
    let customer = subscribed(&stores, 4).await;
    deliver(
        &stores,
        &event(
            "evt_r1",
            "invoice.payment_failed",
            Some(T),
            invoice("in_r1", "sub_S4"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "past_due");
    deliver(
        &stores,
        &event(
            "evt_r2",
            "invoice.paid",
            Some(T + 10),
            invoice("in_r1", "sub_S4"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "active");
    // The same invoice failing again later (a late event, our own retry) opens nothing; a
    // newer failure of another invoice opens its own case.
    deliver(
        &stores,
        &event(
            "evt_r3",
            "invoice.payment_failed",
            Some(T + 20),
            invoice("in_r1", "sub_S4"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "active");
    deliver(
        &stores,
        &event(
            "evt_r4",
            "invoice.payment_failed",
            Some(T + 30),
            invoice("in_r2", "sub_S4"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "past_due");
    assert_eq!(cases(&stores, &customer).await, 2);
    // An event without a time applies.
    deliver(
        &stores,
        &event("evt_r5", "invoice.paid", None, invoice("in_r2", "sub_S4")),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "active");

    // Same second, either order: the success wins.
    let customer = subscribed(&stores, 5).await;
    deliver(
        &stores,
        &event(
            "evt_t1",
            "invoice.paid",
            Some(T),
            invoice("in_t1", "sub_S5"),
        ),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_t2",
            "invoice.payment_failed",
            Some(T),
            invoice("in_t1", "sub_S5"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "active");
    let customer = subscribed(&stores, 6).await;
    deliver(
        &stores,
        &event(
            "evt_t3",
            "invoice.payment_failed",
            Some(T),
            invoice("in_t3", "sub_S6"),
        ),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_t4",
            "invoice.paid",
            Some(T),
            invoice("in_t3", "sub_S6"),
        ),
    )
    .await;
    assert_eq!(subscription(&stores, &customer).await.0, "active");

    // A cancellation is final in Stripe: delivered late, it still cancels.
    let customer = subscribed(&stores, 7).await;
    deliver(
        &stores,
        &event(
            "evt_k0",
            "customer.subscription.updated",
            Some(T + 10),
            json!({"id": "sub_S7", "status": "active"}),
        ),
    )
    .await;
    deliver(
        &stores,
        &event(
            "evt_k2",
            "customer.subscription.deleted",
            Some(T),
            json!({"id": "sub_S7", "status": "canceled"}),
        ),
    )
    .await;
    assert_eq!(
        subscription(&stores, &customer).await,
        ("canceled".into(), Some(at(T + 10)))
    );
}

/// The dunning cases of a customer.
async fn cases(stores: &TestStores, customer: &str) -> i64 {
    sqlx::query_scalar(
        "SELECT count(*) FROM dunning_attempts WHERE customer_id = $1 AND attempt_number = 0",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// What the mirror keeps of an invoice row.
#[derive(Debug, PartialEq, sqlx::FromRow)]
struct Mirrored {
    status: String,
    stripe_invoice_id: Option<String>,
    amount_due_cents: Option<i64>,
    amount_paid_cents: Option<i64>,
    hosted_invoice_url: Option<String>,
    attempt_count: i32,
    finalized_at: Option<DateTime<Utc>>,
    paid_at: Option<DateTime<Utc>>,
    voided_at: Option<DateTime<Utc>>,
    payment_failed_at: Option<DateTime<Utc>>,
    next_payment_attempt: Option<DateTime<Utc>>,
    stripe_event_at: Option<DateTime<Utc>>,
}

async fn mirrored(stores: &TestStores, id: i64) -> Mirrored {
    sqlx::query_as(
        "SELECT status, stripe_invoice_id, amount_due_cents, amount_paid_cents, \
             hosted_invoice_url, attempt_count, finalized_at, paid_at, voided_at, \
             payment_failed_at, next_payment_attempt, stripe_event_at \
         FROM invoices WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// An invoice row of `customer` for January 2026 in `status`, with `stripe_id` if given.
async fn invoice_row(
    stores: &TestStores,
    customer: &str,
    status: &str,
    stripe_id: Option<&str>,
) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO invoices (customer_id, period_start, period_end, plan_id, status, \
             total_cents, stripe_invoice_id, pricing) \
         VALUES ($1, '2026-01-01T00:00:00Z', '2026-02-01T00:00:00Z', 'starter', $2, 4900, $3, \
                 '{}') \
         RETURNING id",
    )
    .bind(customer)
    .bind(status)
    .bind(stripe_id)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// Our invoice `id` as Stripe's `in_<id>` says it in an event: one-off, customer `cus_S<n>`.
fn stripe_invoice(id: i64, n: u32, fields: Value) -> Value {
    let mut object = json!({
        "id": format!("in_{id}"), "object": "invoice", "customer": format!("cus_S{n}"),
        "parent": null, "metadata": {"apex_invoice_id": id.to_string()},
        "amount_due": 4900, "amount_paid": 0, "attempt_count": 0,
        "hosted_invoice_url": format!("https://invoice.stripe.com/i/in_{id}"),
        "status_transitions": {"finalized_at": T, "paid_at": null, "voided_at": null},
    });
    let Value::Object(fields) = fields else {
        panic!("fields are an object");
    };
    for (key, value) in fields {
        object[key] = value;
    }
    object
}

#[tokio::test]
async fn the_mirror_follows_an_invoice_from_open_to_paid() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 8).await;
    // The invoicing crashed before recording Stripe's id: the metadata finds the row.
    let id = invoice_row(&stores, &customer, "pending", None).await;
    let finalized = stripe_invoice(
        id,
        8,
        json!({"status": "open", "next_payment_attempt": T + 3600}),
    );
    assert_eq!(
        deliver(
            &stores,
            &event("evt_m1", "invoice.finalized", Some(T), finalized.clone())
        )
        .await,
        stored(0, 1)
    );
    let stripe_id = format!("in_{id}");
    assert_eq!(
        mirrored(&stores, id).await,
        Mirrored {
            status: "open".into(),
            stripe_invoice_id: Some(stripe_id.clone()),
            amount_due_cents: Some(4900),
            amount_paid_cents: Some(0),
            hosted_invoice_url: Some(format!("https://invoice.stripe.com/i/{stripe_id}")),
            attempt_count: 0,
            finalized_at: Some(at(T)),
            paid_at: None,
            voided_at: None,
            payment_failed_at: None,
            next_payment_attempt: Some(at(T + 3600)),
            stripe_event_at: Some(at(T)),
        }
    );

    // In the same second a snapshot of an earlier state (draft) does not undo open.
    let open = mirrored(&stores, id).await;
    let draft = stripe_invoice(id, 8, json!({"status": "draft", "amount_due": 0}));
    assert_eq!(
        deliver(
            &stores,
            &event("evt_m0", "invoice.finalized", Some(T), draft)
        )
        .await,
        stored(0, 0)
    );
    assert_eq!(mirrored(&stores, id).await, open);

    let paid = stripe_invoice(
        id,
        8,
        json!({"status": "paid", "amount_paid": 4900, "attempt_count": 1,
               "next_payment_attempt": null,
               "status_transitions": {"finalized_at": T, "paid_at": T + 5, "voided_at": null}}),
    );
    assert_eq!(
        deliver(&stores, &event("evt_m2", "invoice.paid", Some(T + 5), paid)).await,
        // The subscription was active (no dunning case): nothing to move.
        stored(0, 1)
    );
    let after_paid = mirrored(&stores, id).await;
    assert_eq!(after_paid.status, "paid");
    assert_eq!(after_paid.amount_paid_cents, Some(4900));
    assert_eq!(after_paid.paid_at, Some(at(T + 5)));
    assert_eq!(after_paid.attempt_count, 1);
    assert_eq!(after_paid.next_payment_attempt, None);
    assert_eq!(after_paid.stripe_event_at, Some(at(T + 5)));

    // A late invoice.finalized, older or of the same second, leaves it paid and untouched.
    deliver(
        &stores,
        &event("evt_m3", "invoice.finalized", Some(T), finalized.clone()),
    )
    .await;
    assert_eq!(mirrored(&stores, id).await, after_paid);
    let same_second = event(
        "evt_m4",
        "invoice.finalized",
        Some(T + 5),
        finalized.clone(),
    );
    assert_eq!(deliver(&stores, &same_second).await, stored(0, 0));
    assert_eq!(mirrored(&stores, id).await, after_paid);
    // Paid is final even for a newer event saying otherwise.
    let void = stripe_invoice(id, 8, json!({"status": "void"}));
    deliver(
        &stores,
        &event("evt_m5", "invoice.voided", Some(T + 50), void),
    )
    .await;
    assert_eq!(mirrored(&stores, id).await, after_paid);
}

#[tokio::test]
async fn a_failed_payment_keeps_the_invoice_open_and_records_the_attempt() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 9).await;
    let id = invoice_row(&stores, &customer, "open", None).await;
    let stripe_id = format!("in_{id}");
    sqlx::query("UPDATE invoices SET stripe_invoice_id = $2 WHERE id = $1")
        .bind(id)
        .bind(&stripe_id)
        .execute(&stores.pool)
        .await
        .unwrap();
    // Found by its Stripe id alone (no metadata).
    let mut failed = stripe_invoice(
        id,
        9,
        json!({"status": "open", "attempt_count": 1, "next_payment_attempt": T + 86_400}),
    );
    failed["metadata"] = json!({});
    assert_eq!(
        deliver(
            &stores,
            &event("evt_pf1", "invoice.payment_failed", Some(T + 100), failed)
        )
        .await,
        stored(1, 1)
    );
    let row = mirrored(&stores, id).await;
    assert_eq!(row.status, "open");
    assert_eq!(row.attempt_count, 1);
    assert_eq!(row.payment_failed_at, Some(at(T + 100)));
    assert_eq!(row.next_payment_attempt, Some(at(T + 86_400)));
    assert_eq!(row.finalized_at, Some(at(T)));
    // The one-off invoice moved its customer's subscription.
    assert_eq!(subscription(&stores, &customer).await.0, "past_due");

    // Uncollectible never goes back to open; it may still be paid.
    let marked = stripe_invoice(
        id,
        9,
        json!({"status": "uncollectible", "attempt_count": 4}),
    );
    deliver(
        &stores,
        &event(
            "evt_pf2",
            "invoice.marked_uncollectible",
            Some(T + 200),
            marked,
        ),
    )
    .await;
    assert_eq!(mirrored(&stores, id).await.status, "uncollectible");
    let retry = stripe_invoice(id, 9, json!({"status": "open", "attempt_count": 5}));
    deliver(
        &stores,
        &event("evt_pf3", "invoice.payment_failed", Some(T + 300), retry),
    )
    .await;
    let row = mirrored(&stores, id).await;
    assert_eq!(
        (row.status.as_str(), row.attempt_count),
        ("uncollectible", 4)
    );
    let paid = stripe_invoice(id, 9, json!({"status": "paid", "amount_paid": 4900}));
    deliver(
        &stores,
        &event("evt_pf4", "invoice.payment_succeeded", Some(T + 400), paid),
    )
    .await;
    assert_eq!(mirrored(&stores, id).await.status, "paid");
}

#[tokio::test]
async fn invoices_that_are_not_ours_change_nothing() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 10).await;
    let id = invoice_row(&stores, &customer, "open", Some("in_recorded")).await;
    let before = mirrored(&stores, id).await;
    // Stripe's own $0 subscription invoice: no row, and (collecting nothing) no say on
    // whether the customer pays.
    let own = json!({"id": "in_zero", "status": "paid", "amount_due": 0, "amount_paid": 0,
                     "parent": {"subscription_details": {"subscription": "sub_S10"}}});
    assert_eq!(
        deliver(&stores, &event("evt_n1", "invoice.paid", Some(T), own)).await,
        stored(0, 0)
    );
    // Metadata naming a row that already has another Stripe invoice: not that row.
    let other = stripe_invoice(id, 10, json!({"id": "in_other", "status": "void"}));
    assert_eq!(
        deliver(&stores, &event("evt_n2", "invoice.voided", Some(T), other)).await,
        stored(0, 0)
    );
    assert_eq!(mirrored(&stores, id).await, before);
}

#[tokio::test]
async fn an_event_carrying_nul_is_stored_and_applied() {
    let stores = TestStores::migrated().await;
    let customer = subscribed(&stores, 11).await;
    let mut object = current_invoice("sub_S11");
    object["description"] = json!("Acme\u{0}Games");
    object["metadata"] = json!({"note\u{0}": "\u{0}"});
    object["amount_due"] = json!(4900);
    let body = event("evt_nul1", "invoice.payment_failed", Some(T), object);
    // serde_json writes U+0000 as the escape Postgres refuses in jsonb.
    assert!(body.contains(r"\u0000"), "{body}");
    assert_eq!(deliver(&stores, &body).await, stored(1, 0));
    assert_eq!(subscription(&stores, &customer).await.0, "past_due");
    let (payload, processed): (Value, bool) = sqlx::query_as(
        "SELECT payload, processed_at IS NOT NULL FROM stripe_events WHERE id = 'evt_nul1'",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert!(processed);
    let object = &payload["data"]["object"];
    assert_eq!(object["description"], "Acme\u{FFFD}Games");
    assert_eq!(object["metadata"]["note\u{FFFD}"], "\u{FFFD}");
    assert_eq!(deliver(&stores, &body).await, Handled::Duplicate);
}
