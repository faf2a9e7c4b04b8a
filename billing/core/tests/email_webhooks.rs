//! Resend's delivery events against the real Postgres: delivered, bounced and complained move
//! the `email_log` row found by Resend's email id; a hard bounce and a complaint suppress the
//! recipients, a soft bounce does not; a redelivered `svix-id` changes nothing; a `delivered`
//! arriving after a bounce keeps the bounce; events about emails we did not log, and types we
//! do not act on, are stored and change nothing; an event carrying `\u0000` is stored.

use apex_billing::email_log;
use apex_billing::email_webhooks::{self, Handled};
use apex_core::testing::TestStores;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

/// Logs an email Resend knows as `message_id`, sent to `recipient`; returns its row id.
async fn logged(stores: &TestStores, message_id: &str, recipient: &str) -> i64 {
    sqlx::query_scalar(
        "INSERT INTO email_log (email_type, recipient, subject, provider, provider_message_id, \
             status, idempotency_key) \
         VALUES ('welcome', $2, 'Welcome', 'resend', $1, 'sent', 'apex-email-1') RETURNING id",
    )
    .bind(message_id)
    .bind(recipient)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// The row's delivery status and time.
async fn delivery(stores: &TestStores, id: i64) -> (Option<String>, Option<DateTime<Utc>>) {
    sqlx::query_as("SELECT delivery_status, delivery_at FROM email_log WHERE id = $1")
        .bind(id)
        .fetch_one(&stores.pool)
        .await
        .unwrap()
}

/// Every suppressed address with its reason and message id, by address.
async fn suppressions(stores: &TestStores) -> Vec<(String, String, Option<String>)> {
    sqlx::query_as(
        "SELECT address, reason, provider_message_id FROM email_suppressions ORDER BY address",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

/// Stored events and how many were processed.
async fn stored(stores: &TestStores) -> (i64, i64) {
    sqlx::query_as("SELECT count(*), count(processed_at) FROM resend_events")
        .fetch_one(&stores.pool)
        .await
        .unwrap()
}

/// A Resend event body of `kind` about `email_id` to `to`, created at `created_at`, with
/// `extra` merged into its `data`.
fn event(kind: &str, email_id: &str, to: &[&str], created_at: &str, extra: Value) -> String {
    let mut data = json!({
        "created_at": "2026-03-01 10:00:00.000000+00",
        "email_id": email_id,
        "from": "Apex <billing@apex.example>",
        "to": to,
        "subject": "Welcome",
    });
    if let Value::Object(extra) = extra {
        data.as_object_mut().unwrap().extend(extra);
    }
    json!({"type": kind, "created_at": created_at, "data": data}).to_string()
}

/// Parses and handles one delivery as the edge does.
async fn deliver(stores: &TestStores, svix_id: &str, body: &str) -> Handled {
    let event = email_webhooks::parse_event(svix_id, body.as_bytes()).expect("a Resend event");
    email_webhooks::handle(&mut stores.pool.acquire().await.unwrap(), &event)
        .await
        .unwrap()
}

fn at(rfc3339: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(rfc3339)
        .unwrap()
        .with_timezone(&Utc)
}

fn stored_with(emails_updated: u64, addresses_suppressed: u64) -> Handled {
    Handled::Stored {
        emails_updated,
        addresses_suppressed,
    }
}

fn permanent() -> Value {
    json!({"bounce": {"message": "550 5.1.1 user unknown", "subType": "General",
                      "type": "Permanent"}})
}

#[tokio::test]
async fn delivered_bounced_and_complained_move_their_email() {
    let stores = TestStores::migrated().await;
    let delivered = logged(&stores, "em_delivered", "ada@example.com").await;
    let bounced = logged(&stores, "em_bounced", "Bob@Example.com").await;
    let complained = logged(&stores, "em_complained", "cy@example.com").await;
    let untouched = logged(&stores, "em_other", "dee@example.com").await;

    let t1 = "2026-03-01T10:00:05.123Z";
    let body = event(
        "email.delivered",
        "em_delivered",
        &["ada@example.com"],
        t1,
        json!({}),
    );
    assert_eq!(deliver(&stores, "msg_d1", &body).await, stored_with(1, 0));
    assert_eq!(
        delivery(&stores, delivered).await,
        (Some("delivered".into()), Some(at(t1)))
    );
    // Delivered suppresses nothing.
    assert!(suppressions(&stores).await.is_empty());

    // A hard bounce: the row, and the address, lowercased, from the `Name <address>` form.
    let t2 = "2026-03-01T10:00:06Z";
    let body = event(
        "email.bounced",
        "em_bounced",
        &["Bob <Bob@Example.com>"],
        t2,
        permanent(),
    );
    assert_eq!(deliver(&stores, "msg_b1", &body).await, stored_with(1, 1));
    assert_eq!(
        delivery(&stores, bounced).await,
        (Some("bounced".into()), Some(at(t2)))
    );

    // A complaint suppresses every recipient.
    let t3 = "2026-03-01T11:00:00Z";
    let body = event(
        "email.complained",
        "em_complained",
        &["cy@example.com", "CY@example.com", "zed@Example.com"],
        t3,
        json!({}),
    );
    assert_eq!(deliver(&stores, "msg_c1", &body).await, stored_with(1, 2));
    assert_eq!(
        delivery(&stores, complained).await,
        (Some("complained".into()), Some(at(t3)))
    );
    assert_eq!(
        suppressions(&stores).await,
        [
            (
                "bob@example.com".into(),
                "bounced".into(),
                Some("em_bounced".into())
            ),
            (
                "cy@example.com".into(),
                "complained".into(),
                Some("em_complained".into())
            ),
            (
                "zed@example.com".into(),
                "complained".into(),
                Some("em_complained".into())
            ),
        ]
    );
    // What the email queue reads: the lead's lookup finds them, whatever the case.
    assert_eq!(
        email_log::suppression(&stores.pool, "BOB@example.com")
            .await
            .unwrap()
            .as_deref(),
        Some("bounced")
    );
    assert_eq!(delivery(&stores, untouched).await, (None, None));
    assert_eq!(stored(&stores).await, (3, 3));
}

#[tokio::test]
async fn only_a_hard_bounce_suppresses() {
    let stores = TestStores::migrated().await;
    let soft = logged(&stores, "em_soft", "full@example.com").await;
    let undetermined = logged(&stores, "em_undetermined", "odd@example.com").await;
    let untyped = logged(&stores, "em_untyped", "gone@example.com").await;

    let body = event(
        "email.bounced",
        "em_soft",
        &["full@example.com"],
        "2026-03-01T10:00:00Z",
        json!({"bounce": {"message": "mailbox full", "subType": "MailboxFull", "type": "Transient"}}),
    );
    assert_eq!(deliver(&stores, "msg_s1", &body).await, stored_with(1, 0));
    assert_eq!(delivery(&stores, soft).await.0.as_deref(), Some("bounced"));

    let body = event(
        "email.bounced",
        "em_undetermined",
        &["odd@example.com"],
        "2026-03-01T10:00:00Z",
        json!({"bounce": {"message": "?", "subType": "Undetermined", "type": "Undetermined"}}),
    );
    assert_eq!(deliver(&stores, "msg_u1", &body).await, stored_with(1, 0));
    assert_eq!(
        delivery(&stores, undetermined).await.0.as_deref(),
        Some("bounced")
    );
    assert!(suppressions(&stores).await.is_empty());

    // No bounce type at all: Resend documents email.bounced as permanent.
    let body = event(
        "email.bounced",
        "em_untyped",
        &["gone@example.com"],
        "2026-03-01T10:00:00Z",
        json!({}),
    );
    assert_eq!(deliver(&stores, "msg_n1", &body).await, stored_with(1, 1));
    assert_eq!(
        delivery(&stores, untyped).await.0.as_deref(),
        Some("bounced")
    );
    assert_eq!(
        suppressions(&stores).await,
        [(
            "gone@example.com".into(),
            "bounced".into(),
            Some("em_untyped".into())
        )]
    );
}

#[tokio::test]
async fn a_redelivery_changes_nothing() {
    let stores = TestStores::migrated().await;
    let email = logged(&stores, "em_dup", "dup@example.com").await;
    let body = event(
        "email.bounced",
        "em_dup",
        &["dup@example.com"],
        "2026-03-01T10:00:00Z",
        permanent(),
    );
    assert_eq!(deliver(&stores, "msg_dup", &body).await, stored_with(1, 1));
    // Undo its effects by hand; the same svix-id again must not redo them.
    sqlx::query("UPDATE email_log SET delivery_status = NULL, delivery_at = NULL")
        .execute(&stores.pool)
        .await
        .unwrap();
    sqlx::query("DELETE FROM email_suppressions")
        .execute(&stores.pool)
        .await
        .unwrap();
    assert_eq!(deliver(&stores, "msg_dup", &body).await, Handled::Duplicate);
    assert_eq!(delivery(&stores, email).await, (None, None));
    assert!(suppressions(&stores).await.is_empty());
    assert_eq!(stored(&stores).await, (1, 1));
}

#[tokio::test]
async fn a_late_delivered_never_hides_a_bounce_or_a_complaint() {
    let stores = TestStores::migrated().await;
    let email = logged(&stores, "em_order", "late@example.com").await;
    let bounced_at = "2026-03-01T10:00:10Z";
    let bounce = event(
        "email.bounced",
        "em_order",
        &["late@example.com"],
        bounced_at,
        permanent(),
    );
    assert_eq!(deliver(&stores, "msg_o1", &bounce).await, stored_with(1, 1));
    // Created after the bounce, or before it and delivered late: either way, it stays bounced.
    for (id, created) in [
        ("msg_o2", "2026-03-01T10:00:20Z"),
        ("msg_o3", "2026-03-01T10:00:05Z"),
    ] {
        let delivered = event(
            "email.delivered",
            "em_order",
            &["late@example.com"],
            created,
            json!({}),
        );
        assert_eq!(deliver(&stores, id, &delivered).await, stored_with(0, 0));
        assert_eq!(
            delivery(&stores, email).await,
            (Some("bounced".into()), Some(at(bounced_at)))
        );
    }
    // A complaint outranks the bounce; the address keeps its first reason.
    let complained_at = "2026-03-01T12:00:00Z";
    let complaint = event(
        "email.complained",
        "em_order",
        &["late@example.com"],
        complained_at,
        json!({}),
    );
    assert_eq!(
        deliver(&stores, "msg_o4", &complaint).await,
        stored_with(1, 0)
    );
    let late_bounce = event(
        "email.bounced",
        "em_order",
        &["late@example.com"],
        "2026-03-01T13:00:00Z",
        permanent(),
    );
    assert_eq!(
        deliver(&stores, "msg_o5", &late_bounce).await,
        stored_with(0, 0)
    );
    assert_eq!(
        delivery(&stores, email).await,
        (Some("complained".into()), Some(at(complained_at)))
    );
    assert_eq!(
        suppressions(&stores).await,
        [(
            "late@example.com".into(),
            "bounced".into(),
            Some("em_order".into())
        )]
    );
    assert_eq!(stored(&stores).await, (5, 5));
}

#[tokio::test]
async fn unknown_emails_and_other_types_are_stored_and_change_nothing() {
    let stores = TestStores::migrated().await;
    let email = logged(&stores, "em_known", "known@example.com").await;
    // Another application's email on the same Resend account.
    let foreign = event(
        "email.complained",
        "em_unknown",
        &["stranger@example.com"],
        "2026-03-01T10:00:00Z",
        json!({}),
    );
    assert_eq!(
        deliver(&stores, "msg_x1", &foreign).await,
        stored_with(0, 0)
    );
    assert!(suppressions(&stores).await.is_empty());
    for (n, kind) in [
        "email.sent",
        "email.delivery_delayed",
        "email.opened",
        "email.clicked",
    ]
    .into_iter()
    .enumerate()
    {
        let body = event(
            kind,
            "em_known",
            &["known@example.com"],
            "2026-03-01T10:00:00Z",
            json!({}),
        );
        assert_eq!(
            deliver(&stores, &format!("msg_t{n}"), &body).await,
            stored_with(0, 0)
        );
    }
    // Not about an email at all.
    let contact = json!({"type": "contact.created", "created_at": "2026-03-01T10:00:00Z",
                         "data": {"id": "c1", "email": "x@example.com"}})
    .to_string();
    assert_eq!(deliver(&stores, "msg_c", &contact).await, stored_with(0, 0));
    assert_eq!(delivery(&stores, email).await, (None, None));
    assert_eq!(stored(&stores).await, (6, 6));
    let kinds: Vec<String> =
        sqlx::query_scalar("SELECT event_type FROM resend_events ORDER BY event_type")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    assert_eq!(
        kinds,
        [
            "contact.created",
            "email.clicked",
            "email.complained",
            "email.delivery_delayed",
            "email.opened",
            "email.sent"
        ]
    );
}

#[tokio::test]
async fn an_event_carrying_nul_is_stored_and_applied() {
    let stores = TestStores::migrated().await;
    let email = logged(&stores, "em_nul", "nul@example.com").await;
    let body = event(
        "email.bounced",
        "em_nul",
        &["nul@example.com", "x\u{0}y@example.com"],
        "2026-03-01T10:00:00Z",
        json!({"subject": "Acme\u{0}Games", "tags": {"k\u{0}": "\u{0}"},
               "bounce": {"type": "Permanent", "message": "5.1.1\u{0}"}}),
    );
    assert!(body.contains(r"\u0000"), "{body}");
    assert_eq!(deliver(&stores, "msg_nul", &body).await, stored_with(1, 2));
    assert_eq!(delivery(&stores, email).await.0.as_deref(), Some("bounced"));
    let subject: Option<String> =
        sqlx::query_scalar("SELECT payload #>> '{data,subject}' FROM resend_events")
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(subject.as_deref(), Some("Acme\u{FFFD}Games"));
    assert_eq!(
        suppressions(&stores)
            .await
            .into_iter()
            .map(|s| s.0)
            .collect::<Vec<_>>(),
        ["nul@example.com", "x\u{FFFD}y@example.com"]
    );
}

#[tokio::test]
async fn a_failed_transaction_leaves_nothing_and_the_redelivery_applies() {
    let stores = TestStores::migrated().await;
    let email = logged(&stores, "em_tx", "tx@example.com").await;
    let body = event(
        "email.delivered",
        "em_tx",
        &["tx@example.com"],
        "2026-03-01T10:00:00Z",
        json!({}),
    );
    let event = email_webhooks::parse_event("msg_tx", body.as_bytes()).unwrap();
    // Handled inside a caller's transaction that then rolls back: its savepoint goes too.
    {
        use sqlx::Connection;
        let mut conn = stores.pool.acquire().await.unwrap();
        let mut tx = conn.begin().await.unwrap();
        assert_eq!(
            email_webhooks::handle(&mut tx, &event).await.unwrap(),
            stored_with(1, 0)
        );
        tx.rollback().await.unwrap();
    }
    assert_eq!(delivery(&stores, email).await, (None, None));
    assert_eq!(stored(&stores).await, (0, 0));
    assert_eq!(deliver(&stores, "msg_tx", &body).await, stored_with(1, 0));
    assert_eq!(
        delivery(&stores, email).await.0.as_deref(),
        Some("delivered")
    );
}
