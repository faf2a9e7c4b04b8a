//! The webhook side of the invoice mirror: Stripe's invoice events copied onto our
//! `invoices` rows (status, amounts, the hosted page, payment attempts and the times of each
//! transition), so the dashboard and dunning read them without asking Stripe. Every query the
//! webhooks make on `invoices` is here.
//!
//! A row is found by its Stripe id, else by the invoice's metadata `apex_invoice_id` (our
//! `invoices.id`, which the invoicing writes on every invoice it creates) while the row has no
//! Stripe id yet or the same one; the Stripe id is then recorded, so an invoice whose creation
//! was interrupted before we stored its id is still followed. An invoice we did not create
//! (Stripe's own subscription invoices, usually $0) has no row: nothing to do.
//!
//! Stripe does not deliver events in order, so `invoices.stripe_event_at` keeps the
//! `created` time of the latest event applied, and:
//! - an event strictly older than it changes nothing;
//! - `paid` and `void` are final: an event that would move the row elsewhere changes nothing;
//! - `uncollectible` never goes back to `draft` or `open` (Stripe moves it only to paid or
//!   void);
//! - on a tie (the same second) an event whose status ranks below the row's changes nothing,
//!   the ranks being draft < open < uncollectible < paid, void: finalizing and paying in the
//!   same second is the common case, and the `invoice.finalized` snapshot (open, nothing
//!   paid) must not undo the `invoice.paid` one.
//!
//! `invoice.updated` is not followed: it fires while the invoicing still edits a draft (so
//! it would race the job that owns pending rows), and every transition we keep has its own
//! event above.

use chrono::{DateTime, Utc};
use serde_json::Value;
use sqlx::PgExecutor;

use crate::error::BillingError;

/// The invoice events the mirror follows.
pub const EVENT_TYPES: [&str; 6] = [
    "invoice.finalized",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "invoice.voided",
    "invoice.marked_uncollectible",
];

/// What one invoice event says about the invoice, read from its object. `None` fields leave
/// the row's value as it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvoiceUpdate {
    /// Stripe's invoice id (`in_...`).
    pub stripe_invoice_id: String,
    /// Our `invoices.id`, from metadata `apex_invoice_id` (a decimal string).
    pub apex_invoice_id: Option<i64>,
    /// One of `draft`, `open`, `paid`, `void`, `uncollectible`: `paid` for the paid events,
    /// else Stripe's `status` (or, when the object has none, what the event type implies).
    pub status: Option<&'static str>,
    /// `amount_due`, cents.
    pub amount_due_cents: Option<i64>,
    /// `amount_paid`, cents.
    pub amount_paid_cents: Option<i64>,
    /// `hosted_invoice_url`.
    pub hosted_invoice_url: Option<String>,
    /// `attempt_count`: payment attempts so far.
    pub attempt_count: Option<i32>,
    /// `status_transitions.finalized_at`.
    pub finalized_at: Option<DateTime<Utc>>,
    /// `status_transitions.paid_at`.
    pub paid_at: Option<DateTime<Utc>>,
    /// `status_transitions.voided_at`.
    pub voided_at: Option<DateTime<Utc>>,
    /// `next_payment_attempt`: `None` when the object has no such field, `Some(None)` when
    /// Stripe says there is none (paid, or retries exhausted).
    pub next_payment_attempt: Option<Option<DateTime<Utc>>>,
    /// Set for `invoice.payment_failed`: when the failure happened.
    pub payment_failed: bool,
}

/// Reads what `event_type` says about the invoice `object`; `None` when the event is not one
/// the mirror follows ([`EVENT_TYPES`]) or the object has no id.
pub fn invoice_update(event_type: &str, object: &Value) -> Option<InvoiceUpdate> {
    if !EVENT_TYPES.contains(&event_type) {
        return None;
    }
    let stripe_invoice_id = object
        .get("id")?
        .as_str()
        .filter(|id| !id.is_empty())?
        .to_owned();
    let status = match event_type {
        // The paid events are sent once the invoice is paid, whatever the snapshot says.
        "invoice.paid" | "invoice.payment_succeeded" => Some("paid"),
        _ => match object.get("status").and_then(Value::as_str) {
            Some("draft") => Some("draft"),
            Some("open") => Some("open"),
            Some("paid") => Some("paid"),
            Some("void") => Some("void"),
            Some("uncollectible") => Some("uncollectible"),
            // An unknown status is ignored (the table takes only these five); a missing one
            // is what the event names, as Stripe's stand-ins leave fields out.
            Some(_) => None,
            None => match event_type {
                "invoice.finalized" | "invoice.payment_failed" => Some("open"),
                "invoice.voided" => Some("void"),
                "invoice.marked_uncollectible" => Some("uncollectible"),
                _ => None,
            },
        },
    };
    let transitions = object.get("status_transitions");
    let transition = |name: &str| transitions.and_then(|t| unix_time(t.get(name)?));
    Some(InvoiceUpdate {
        stripe_invoice_id,
        apex_invoice_id: object
            .get("metadata")
            .and_then(|m| m.get("apex_invoice_id"))
            .and_then(Value::as_str)
            .and_then(|id| id.parse().ok())
            .filter(|id: &i64| *id > 0),
        status,
        amount_due_cents: object.get("amount_due").and_then(Value::as_i64),
        amount_paid_cents: object.get("amount_paid").and_then(Value::as_i64),
        hosted_invoice_url: object
            .get("hosted_invoice_url")
            .and_then(Value::as_str)
            .map(str::to_owned),
        attempt_count: object
            .get("attempt_count")
            .and_then(Value::as_i64)
            .and_then(|n| i32::try_from(n).ok()),
        finalized_at: transition("finalized_at"),
        paid_at: transition("paid_at"),
        voided_at: transition("voided_at"),
        next_payment_attempt: object.get("next_payment_attempt").map(unix_time),
        payment_failed: event_type == "invoice.payment_failed",
    })
}

/// A unix-seconds JSON number as a time; `None` for null or anything else.
fn unix_time(value: &Value) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp(value.as_i64()?, 0)
}

/// Applies the invoice event `event_type` (created at `created`, unix seconds in the event)
/// about `object` (the event's `data.object`, a Stripe invoice) to our row for it, under the
/// order rules of this module; `invoice.payment_failed` also records `payment_failed_at`
/// (the event's time, or now when it has none). Returns the rows updated: 0 when the event
/// is not one the mirror follows, no row is ours, or the rules keep the row as it is; else 1.
/// One statement, so it joins the caller's transaction (the webhook's, with its event row).
pub async fn apply_invoice_event(
    db: impl PgExecutor<'_>,
    event_type: &str,
    object: &Value,
    created: Option<DateTime<Utc>>,
) -> Result<u64, BillingError> {
    let Some(update) = invoice_update(event_type, object) else {
        return Ok(0);
    };
    let payment_failed_at = update
        .payment_failed
        .then(|| created.unwrap_or_else(Utc::now));
    // The row is the one with this Stripe id, else the metadata's while it has no Stripe id
    // (coalesce keeps that order: both could match, and the second must then lose, or the
    // unique Stripe id would be written twice). The outer conditions are checked again on
    // the row's latest version when a concurrent delivery updated it first.
    Ok(sqlx::query(
        "UPDATE invoices SET \
             stripe_invoice_id = $1, \
             status = coalesce($3, status), \
             amount_due_cents = coalesce($4, amount_due_cents), \
             amount_paid_cents = coalesce($5, amount_paid_cents), \
             hosted_invoice_url = coalesce($6, hosted_invoice_url), \
             attempt_count = greatest(attempt_count, $7), \
             finalized_at = coalesce($8, finalized_at), \
             paid_at = coalesce($9, paid_at), \
             voided_at = coalesce($10, voided_at), \
             next_payment_attempt = CASE WHEN $11 THEN $12 ELSE next_payment_attempt END, \
             payment_failed_at = greatest(payment_failed_at, $13), \
             stripe_event_at = greatest(stripe_event_at, $14), \
             updated_at = now() \
         WHERE id = coalesce( \
                   (SELECT id FROM invoices WHERE stripe_invoice_id = $1), \
                   (SELECT id FROM invoices WHERE id = $2 AND stripe_invoice_id IS NULL)) \
           AND (stripe_invoice_id IS NULL OR stripe_invoice_id = $1) \
           AND ($14::timestamptz IS NULL OR stripe_event_at IS NULL OR stripe_event_at <= $14) \
           AND ($3::text IS NULL OR ( \
                 CASE WHEN status IN ('paid', 'void') THEN $3 = status \
                      WHEN status = 'uncollectible' THEN $3 IN ('uncollectible', 'paid', 'void') \
                      ELSE true END \
                 AND NOT coalesce(stripe_event_at = $14 AND $15 < \
                     CASE status WHEN 'draft' THEN 1 WHEN 'open' THEN 2 \
                                 WHEN 'uncollectible' THEN 3 WHEN 'paid' THEN 4 \
                                 WHEN 'void' THEN 4 ELSE 0 END, false)))",
    )
    .bind(&update.stripe_invoice_id)
    .bind(update.apex_invoice_id)
    .bind(update.status)
    .bind(update.amount_due_cents)
    .bind(update.amount_paid_cents)
    .bind(&update.hosted_invoice_url)
    .bind(update.attempt_count)
    .bind(update.finalized_at)
    .bind(update.paid_at)
    .bind(update.voided_at)
    .bind(update.next_payment_attempt.is_some())
    .bind(update.next_payment_attempt.flatten())
    .bind(payment_failed_at)
    .bind(created)
    .bind(update.status.map(rank))
    .execute(db)
    .await?
    .rows_affected())
}

/// The customer of our invoice row for Stripe invoice `stripe_invoice_id` (or, while the row
/// has no Stripe id yet, the one the invoice's metadata `apex_invoice_id` names); `None`
/// when the invoice is not ours.
pub async fn customer_of(
    db: impl PgExecutor<'_>,
    stripe_invoice_id: &str,
    invoice: &Value,
) -> Result<Option<String>, BillingError> {
    let apex_id: Option<i64> = invoice
        .get("metadata")
        .and_then(|m| m.get("apex_invoice_id"))
        .and_then(Value::as_str)
        .and_then(|id| id.parse().ok());
    Ok(sqlx::query_scalar(
        "SELECT customer_id FROM invoices WHERE stripe_invoice_id = $1 \
         UNION ALL SELECT customer_id FROM invoices WHERE id = $2 AND stripe_invoice_id IS NULL \
         LIMIT 1",
    )
    .bind(stripe_invoice_id)
    .bind(apex_id)
    .fetch_optional(db)
    .await?)
}

/// True when our row of Stripe invoice `stripe_invoice_id` is `paid` or `void`.
pub async fn is_settled(
    db: impl PgExecutor<'_>,
    stripe_invoice_id: &str,
) -> Result<bool, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM invoices WHERE stripe_invoice_id = $1 \
             AND status IN ('paid', 'void'))",
    )
    .bind(stripe_invoice_id)
    .fetch_one(db)
    .await?)
}

/// The hosted invoice page of our row of Stripe invoice `stripe_invoice_id`, when known.
pub async fn hosted_invoice_url(
    db: impl PgExecutor<'_>,
    stripe_invoice_id: &str,
) -> Result<Option<String>, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT hosted_invoice_url FROM invoices WHERE stripe_invoice_id = $1")
            .bind(stripe_invoice_id)
            .fetch_optional(db)
            .await?
            .flatten(),
    )
}

/// The order of invoice statuses on a tie: a later state never gives way to an earlier one.
/// Our own `pending` and `nothing_due` (before Stripe has the invoice) rank below all (0, in
/// the statement).
fn rank(status: &str) -> i32 {
    match status {
        "draft" => 1,
        "open" => 2,
        "uncollectible" => 3,
        "paid" | "void" => 4,
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn at(t: i64) -> Option<DateTime<Utc>> {
        DateTime::from_timestamp(t, 0)
    }

    #[test]
    fn an_invoice_object_is_read_field_by_field() {
        let object = json!({
            "id": "in_1",
            "status": "open",
            "amount_due": 4900,
            "amount_paid": 0,
            "hosted_invoice_url": "https://invoice.stripe.com/i/x",
            "attempt_count": 2,
            "next_payment_attempt": 1_790_086_400,
            "metadata": {"apex_invoice_id": "42"},
            "status_transitions": {"finalized_at": 1_790_000_000, "paid_at": null},
        });
        let update = invoice_update("invoice.payment_failed", &object).unwrap();
        assert_eq!(
            update,
            InvoiceUpdate {
                stripe_invoice_id: "in_1".into(),
                apex_invoice_id: Some(42),
                status: Some("open"),
                amount_due_cents: Some(4900),
                amount_paid_cents: Some(0),
                hosted_invoice_url: Some("https://invoice.stripe.com/i/x".into()),
                attempt_count: Some(2),
                finalized_at: at(1_790_000_000),
                paid_at: None,
                voided_at: None,
                next_payment_attempt: Some(at(1_790_086_400)),
                payment_failed: true,
            }
        );
        // The paid events mean paid whatever the snapshot's status; a null next attempt is
        // "none", not "unknown".
        let paid = invoice_update(
            "invoice.payment_succeeded",
            &json!({"id": "in_1", "status": "open", "next_payment_attempt": null}),
        )
        .unwrap();
        assert_eq!(paid.status, Some("paid"));
        assert_eq!(paid.next_payment_attempt, Some(None));
        assert!(!paid.payment_failed);
    }

    #[test]
    fn statuses_outside_the_table_and_foreign_events_are_ignored() {
        let deleted = invoice_update(
            "invoice.finalized",
            &json!({"id": "in_1", "status": "deleted"}),
        )
        .unwrap();
        assert_eq!(deleted.status, None);
        assert_eq!(
            invoice_update("invoice.voided", &json!({"id": "in_1"}))
                .unwrap()
                .status,
            Some("void")
        );
        for (kind, object) in [
            ("invoice.updated", json!({"id": "in_1", "status": "open"})),
            ("invoice.created", json!({"id": "in_1", "status": "draft"})),
            ("customer.deleted", json!({"id": "cus_1"})),
            ("invoice.paid", json!({"status": "paid"})),
            ("invoice.paid", json!({"id": 7})),
        ] {
            assert_eq!(invoice_update(kind, &object), None, "{kind} {object}");
        }
        // Metadata that is not one of our ids is no id.
        for id in [json!("x"), json!("-3"), json!("0"), json!(42), json!("")] {
            let update = invoice_update(
                "invoice.paid",
                &json!({"id": "in_1", "metadata": {"apex_invoice_id": id}}),
            )
            .unwrap();
            assert_eq!(update.apex_invoice_id, None, "{id}");
        }
    }

    #[test]
    fn ranks_put_final_states_last() {
        assert!(rank("pending") < rank("draft"));
        assert!(rank("draft") < rank("open"));
        assert!(rank("open") < rank("uncollectible"));
        assert!(rank("uncollectible") < rank("paid"));
        assert_eq!(rank("paid"), rank("void"));
    }
}
