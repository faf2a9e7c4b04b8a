//! Stripe webhooks: the `Stripe-Signature` check and the handling of each event.
//!
//! Signature: `t=<unix seconds>,v1=<hex HMAC-SHA256>[,v1=...]`, the MAC over
//! `"<t>.<raw body>"` keyed with the endpoint secret (`whsec_...`, used as-is). Any `v1`
//! matching any configured secret passes, so a secret can be rotated with two configured at
//! once; other schemes (`v0`) are ignored. The timestamp must be within five minutes of now
//! either way, so a captured request cannot be replayed later. MACs are compared in constant
//! time.
//!
//! Events are parsed into our own minimal struct (an id, a type, a creation time, the object
//! as JSON): Stripe adds fields freely, and test stand-ins leave some out. The body is
//! parsed once and every U+0000 in it (a string's or a key's) becomes U+FFFD before anything
//! else reads it: JSON allows `\u0000`, Postgres refuses it in jsonb and in text, and an
//! event that cannot be stored would be answered 5xx on every delivery and never land. The
//! signature is checked on the raw bytes, before that.
//!
//! Each event id is stored once in `stripe_events`; a second delivery changes nothing. What
//! the event moves (the invoice mirror in [`crate::invoices::mirror`], then dunning in
//! [`crate::dunning`] for invoice events, the subscription status for subscription events)
//! follows in the same transaction as the event row, so an event is never stored without its
//! effect, nor applied twice. Stripe does not deliver events in order: the mirror and the
//! subscription keep the `created` time of the latest event applied, and an older one
//! changes nothing (see [`subscriptions::apply_stripe_status`]); dunning finds a case by its
//! invoice and never opens a second one.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use serde_json::Value;
use sha2::Sha256;
use sqlx::{Connection, PgConnection};

use crate::dunning::{self, Policy};
use crate::error::BillingError;
use crate::invoices::mirror;
use crate::subscriptions::{self, StripeTarget};

/// How far a signature's timestamp may be from now, seconds (Stripe's default).
pub const TOLERANCE_SECS: i64 = 300;

/// Why a webhook request is refused (all 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Stripe-Signature` header.
    #[error("the request has no Stripe-Signature header")]
    Missing,
    /// The header has no timestamp or no `v1` signature, or is not `k=v` pairs.
    #[error("the Stripe-Signature header is malformed")]
    Malformed,
    /// The timestamp is more than the tolerance away from now.
    #[error("the Stripe-Signature timestamp is outside the 5-minute tolerance")]
    Stale,
    /// No `v1` matches any secret.
    #[error("no signature matches")]
    Mismatch,
}

/// The hex HMAC-SHA256 Stripe sends for `payload` at `timestamp` with `secret`.
pub fn sign(secret: &str, timestamp: i64, payload: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    hex::encode(mac.finalize().into_bytes())
}

/// Checks `header` (the `Stripe-Signature` value) for `payload` against `secrets` at `now`.
pub fn verify(
    header: Option<&str>,
    payload: &[u8],
    secrets: &[&str],
    now: i64,
) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let mut timestamp: Option<i64> = None;
    let mut signatures: Vec<Vec<u8>> = Vec::new();
    for pair in header.split(',') {
        let (key, value) = pair
            .trim()
            .split_once('=')
            .ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(value.parse().map_err(|_| SignatureError::Malformed)?);
            }
            // A v1 that is not hex cannot match; it is skipped, not fatal (Stripe may add
            // schemes and formats).
            "v1" => signatures.extend(hex::decode(value).ok()),
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed)?;
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // abs_diff: a hostile `t` (i64::MIN, say) must not overflow the subtraction.
    if now.abs_diff(timestamp) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    for secret in secrets {
        for signature in &signatures {
            let mut mac =
                Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
            mac.update(timestamp.to_string().as_bytes());
            mac.update(b".");
            mac.update(payload);
            if mac.verify_slice(signature).is_ok() {
                return Ok(());
            }
        }
    }
    Err(SignatureError::Mismatch)
}

/// The parts of a Stripe event we read, from a body [`parse_event`] accepted.
#[derive(Debug, Clone)]
pub struct Event {
    /// `evt_...`.
    pub id: String,
    /// `invoice.paid`, `customer.subscription.updated`, ...
    pub event_type: String,
    /// Unix seconds.
    pub created: Option<i64>,
    /// `data.object` and friends.
    pub data: EventData,
    /// The whole event, U+0000 replaced (see [`sanitize_nul`]): what `stripe_events.payload`
    /// stores.
    pub payload: Value,
}

/// An event's `data`.
#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    /// The object the event is about.
    pub object: Value,
}

/// The fields of [`Event`] that come from the body.
#[derive(Deserialize)]
struct RawEvent {
    id: String,
    #[serde(rename = "type")]
    event_type: String,
    created: Option<i64>,
    data: EventData,
}

/// Parses an event body; `None` when it is not JSON or not a Stripe event (an id `evt_`
/// followed by letters, digits and `_`, a type, `data.object`). Every U+0000 in it is
/// replaced first ([`sanitize_nul`]), so nothing read from the event carries one.
pub fn parse_event(payload: &[u8]) -> Option<Event> {
    let mut payload: Value = serde_json::from_slice(payload).ok()?;
    sanitize_nul(&mut payload);
    let raw = RawEvent::deserialize(&payload).ok()?;
    let valid_id = raw.id.strip_prefix("evt_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    (valid_id && !raw.event_type.is_empty()).then_some(Event {
        id: raw.id,
        event_type: raw.event_type,
        created: raw.created,
        data: raw.data,
        payload,
    })
}

/// Replaces every U+0000 in `value`'s strings and object keys with U+FFFD (the replacement
/// character), in place. Postgres stores no U+0000 in jsonb (`unsupported Unicode escape
/// sequence`) nor in text, yet JSON allows `\u0000`; an event must be storable whatever its
/// strings hold. Returns how many strings and keys changed.
pub fn sanitize_nul(value: &mut Value) -> usize {
    fn clean(s: &mut String) -> usize {
        if s.contains('\0') {
            *s = s.replace('\0', "\u{FFFD}");
            1
        } else {
            0
        }
    }
    // Recursion is bounded: serde_json refuses input nested deeper than 128.
    match value {
        Value::String(s) => clean(s),
        Value::Array(items) => items.iter_mut().map(sanitize_nul).sum(),
        Value::Object(map) => {
            let mut changed: usize = map.values_mut().map(sanitize_nul).sum();
            // Keys cannot be changed in place; rebuild the map only when one must change.
            if map.keys().any(|k| k.contains('\0')) {
                *map = std::mem::take(map)
                    .into_iter()
                    .map(|(mut key, v)| {
                        changed += clean(&mut key);
                        (key, v)
                    })
                    .collect();
            }
            changed
        }
        Value::Null | Value::Bool(_) | Value::Number(_) => 0,
    }
}

/// What handling an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// First delivery: stored, and applied if it is a type billing acts on.
    Stored {
        /// Subscriptions the event moved (0 or 1; see [`subscriptions::apply_stripe_status`]
        /// and [`dunning::apply_invoice_event`]).
        subscriptions_updated: u64,
        /// Invoice rows the event updated (0 or 1; see [`mirror::apply_invoice_event`]).
        invoices_updated: u64,
    },
    /// The event id was stored before: nothing changed.
    Duplicate,
}

/// A Stripe id where Stripe puts either the id or, expanded, the object with its `id`; an
/// empty id is none.
fn id_of(value: &Value) -> Option<&str> {
    let id = match value {
        Value::Object(object) => object.get("id")?.as_str()?,
        other => other.as_str()?,
    };
    (!id.is_empty()).then_some(id)
}

/// The subscription an invoice is about: its subscription where it names one, from API
/// version 2025-03-31 under `parent.subscription_details.subscription` and before that
/// under `subscription`; else its customer's (`customer`), as our own monthly invoices are
/// one-off invoices with no subscription.
pub fn invoice_target(invoice: &Value) -> Option<StripeTarget<'_>> {
    let current = invoice
        .get("parent")
        .and_then(|p| p.get("subscription_details"))
        .and_then(|d| d.get("subscription"))
        .and_then(id_of);
    let old = || invoice.get("subscription").and_then(id_of);
    match current.or_else(old) {
        Some(subscription) => Some(StripeTarget::Subscription(subscription)),
        None => Some(StripeTarget::Customer(id_of(invoice.get("customer")?)?)),
    }
}

/// The subscription status a subscription event sets, and which subscription it names.
/// Invoice events are dunning's ([`dunning::apply_invoice_event`]).
fn status_change(event: &Event) -> Option<(StripeTarget<'_>, &'static str)> {
    let object = &event.data.object;
    match event.event_type.as_str() {
        "customer.subscription.updated" => {
            let status = match object.get("status")?.as_str()? {
                "trialing" => "trialing",
                "active" => "active",
                "past_due" | "unpaid" | "incomplete" => "past_due",
                "canceled" | "incomplete_expired" => "canceled",
                _ => return None,
            };
            Some((StripeTarget::Subscription(id_of(object)?), status))
        }
        "customer.subscription.deleted" => {
            Some((StripeTarget::Subscription(id_of(object)?), "canceled"))
        }
        _ => None,
    }
}

/// True when a stored event says Stripe invoice `invoice_id` was paid or voided: a
/// `payment_failed` that arrives after it is older news.
pub async fn invoice_settled_by_event(
    db: impl sqlx::PgExecutor<'_>,
    invoice_id: &str,
) -> Result<bool, BillingError> {
    Ok(sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM stripe_events \
         WHERE event_type LIKE 'invoice.%' AND payload -> 'data' -> 'object' ->> 'id' = $1 \
           AND event_type IN ('invoice.voided', 'invoice.paid', 'invoice.payment_succeeded'))",
    )
    .bind(invoice_id)
    .fetch_one(db)
    .await?)
}

/// Stores `event` once and applies it, in one transaction (a savepoint when `conn` is already
/// in one): the event row (its sanitized payload), the invoice mirror, dunning under
/// `policy` (a failure opens a case, a payment or a void closes it, each with its statuses
/// and emails) or the subscription's new status, and the processed mark. Errors are the
/// store's ([`BillingError::Database`]); Stripe retries a delivery that fails, and nothing
/// of it stays. `now` is the time of handling (the edge's wall clock; a simulation's clock):
/// dunning dates the emails and steps of a case from it, never from the process clock.
pub async fn handle(
    conn: &mut PgConnection,
    policy: &Policy,
    event: &Event,
    now: DateTime<Utc>,
) -> Result<Handled, BillingError> {
    let created: Option<DateTime<Utc>> = event
        .created
        .and_then(|t| DateTime::<Utc>::from_timestamp(t, 0));
    let mut tx = conn.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO stripe_events (id, event_type, stripe_created, payload) VALUES ($1, $2, $3, $4) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(created)
    .bind(&event.payload)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(Handled::Duplicate);
    }
    // The mirror first: dunning reads whether the invoice is settled from it.
    let invoices_updated =
        mirror::apply_invoice_event(&mut *tx, &event.event_type, &event.data.object, created)
            .await?;
    let mut subscriptions_updated = 0;
    if event.event_type.starts_with("invoice.") {
        let invoice_event = dunning::InvoiceEvent {
            event_type: &event.event_type,
            invoice: &event.data.object,
            created,
            request_key: event
                .payload
                .get("request")
                .and_then(|r| r.get("idempotency_key"))
                .and_then(Value::as_str),
        };
        let effect = dunning::apply_invoice_event(&mut tx, policy, &invoice_event, now).await?;
        subscriptions_updated = u64::from(effect.subscription_moved);
    } else if let Some((target, status)) = status_change(event) {
        subscriptions_updated =
            subscriptions::apply_stripe_status(&mut *tx, target, status, created).await?;
    }
    sqlx::query("UPDATE stripe_events SET processed_at = now() WHERE id = $1")
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Handled::Stored {
        subscriptions_updated,
        invoices_updated,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "whsec_test_secret_0123456789";
    const ROTATED: &str = "whsec_rotated_secret_abcdef";
    const PAYLOAD: &[u8] = br#"{"id":"evt_1","type":"invoice.paid"}"#;
    const T: i64 = 1_790_000_000;
    // Computed independently with Python:
    //   hmac.new(b"whsec_test_secret_0123456789", b"1790000000." + payload, hashlib.sha256).hexdigest()
    const PYTHON_V1: &str = "8bc29a250b772e76bfaf874db139a0a56be23337ce56fb63dd3423469c839e22";
    const PYTHON_V1_ROTATED: &str =
        "a70ea8cbf2a0ee7ae67dfa636885afd90cac128ce53cafada7ec921fc3b735f7";

    #[test]
    fn signatures_match_an_independent_implementation() {
        assert_eq!(sign(SECRET, T, PAYLOAD), PYTHON_V1);
        assert_eq!(sign(ROTATED, T, PAYLOAD), PYTHON_V1_ROTATED);
        let header = format!("t={T},v1={PYTHON_V1}");
        assert_eq!(verify(Some(&header), PAYLOAD, &[SECRET], T), Ok(()));
    }

    #[test]
    fn rotation_accepts_either_secret_and_any_v1() {
        let old = format!("t={T},v1={PYTHON_V1}");
        let new = format!("t={T},v1={PYTHON_V1_ROTATED}");
        let both = format!("t={T},v1={},v1={PYTHON_V1_ROTATED},v0=abc", "00".repeat(32));
        for header in [&old, &new, &both] {
            assert_eq!(
                verify(Some(header), PAYLOAD, &[SECRET, ROTATED], T),
                Ok(()),
                "{header}"
            );
        }
        assert_eq!(
            verify(Some(&new), PAYLOAD, &[SECRET], T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn forged_stale_and_unsigned_requests_are_refused() {
        let good = format!("t={T},v1={PYTHON_V1}");
        // Another body under the same signature.
        assert_eq!(
            verify(Some(&good), br#"{"id":"evt_2"}"#, &[SECRET], T),
            Err(SignatureError::Mismatch)
        );
        // The timestamp is signed too.
        let moved = format!("t={},v1={PYTHON_V1}", T + 1);
        assert_eq!(
            verify(Some(&moved), PAYLOAD, &[SECRET], T),
            Err(SignatureError::Mismatch)
        );
        // Five minutes either way is the limit.
        assert_eq!(verify(Some(&good), PAYLOAD, &[SECRET], T + 300), Ok(()));
        assert_eq!(verify(Some(&good), PAYLOAD, &[SECRET], T - 300), Ok(()));
        assert_eq!(
            verify(Some(&good), PAYLOAD, &[SECRET], T + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(Some(&good), PAYLOAD, &[SECRET], T - 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            verify(None, PAYLOAD, &[SECRET], T),
            Err(SignatureError::Missing)
        );
        for bad in [
            "",
            "garbage",
            &format!("v1={PYTHON_V1}"),
            &format!("t={T}"),
            &format!("t=yesterday,v1={PYTHON_V1}"),
            &format!("t={T},t={T},v1={PYTHON_V1}"),
            &format!("t={T},v0={PYTHON_V1}"),
        ] {
            assert!(verify(Some(bad), PAYLOAD, &[SECRET], T).is_err(), "{bad:?}");
        }
        // Hostile timestamps are stale, never an overflow.
        for t in [i64::MIN, i64::MAX, -1] {
            let header = format!("t={t},v1={PYTHON_V1}");
            assert_eq!(
                verify(Some(&header), PAYLOAD, &[SECRET], T),
                Err(SignatureError::Stale),
                "{t}"
            );
        }
        // No secret configured: nothing passes.
        assert_eq!(
            verify(Some(&good), PAYLOAD, &[], T),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn events_parse_minimally_and_name_their_subscription() {
        let failed = parse_event(
            br#"{"id":"evt_1","type":"invoice.payment_failed","created":1790000000,"data":{"object":{"id":"in_1","subscription":"sub_9"}}}"#,
        )
        .unwrap();
        assert_eq!(failed.created, Some(T));
        // Invoice events are dunning's; the invoice names its subscription.
        assert_eq!(status_change(&failed), None);
        assert_eq!(
            invoice_target(&failed.data.object),
            Some(StripeTarget::Subscription("sub_9"))
        );
        let deleted = parse_event(
            br#"{"id":"evt_2","type":"customer.subscription.deleted","data":{"object":{"id":"sub_9","status":"canceled"}}}"#,
        )
        .unwrap();
        assert_eq!(
            status_change(&deleted),
            Some((StripeTarget::Subscription("sub_9"), "canceled"))
        );
        let updated = parse_event(
            br#"{"id":"evt_3","type":"customer.subscription.updated","data":{"object":{"id":"sub_9","status":"unpaid"}}}"#,
        )
        .unwrap();
        assert_eq!(
            status_change(&updated),
            Some((StripeTarget::Subscription("sub_9"), "past_due"))
        );
        let other = parse_event(
            br#"{"id":"evt_4","type":"customer.deleted","data":{"object":{"id":"cus_x"}}}"#,
        )
        .unwrap();
        assert_eq!(status_change(&other), None);
        for bad in [
            &br#"{"type":"invoice.paid","data":{"object":{}}}"#[..],
            br#"{"id":"evt_5","data":{"object":{}}}"#,
            br#"{"id":"nope","type":"invoice.paid","data":{"object":{}}}"#,
            br#"{"id":"evt_6","type":"invoice.paid"}"#,
            b"not json",
            // A NUL in the id is no valid id, sanitized or not.
            br#"{"id":"evt_\u0000","type":"invoice.paid","data":{"object":{}}}"#,
        ] {
            assert!(parse_event(bad).is_none());
        }
    }

    #[test]
    fn invoices_name_their_subscription_in_either_api_shape() {
        use serde_json::json;
        let sub = |s| Some(StripeTarget::Subscription(s));
        // Since 2025-03-31: under parent.subscription_details, as an id or expanded.
        let current = json!({"id": "in_1", "customer": "cus_s1", "parent": {
            "type": "subscription_details",
            "subscription_details": {"subscription": "sub_new"}}});
        assert_eq!(invoice_target(&current), sub("sub_new"));
        let expanded = json!({"id": "in_1", "parent": {
            "subscription_details": {"subscription": {"id": "sub_exp", "object": "subscription"}}}});
        assert_eq!(invoice_target(&expanded), sub("sub_exp"));
        // The current shape wins over the old field when both are there.
        let both = json!({"subscription": "sub_old", "parent": {
            "subscription_details": {"subscription": "sub_new"}}});
        assert_eq!(invoice_target(&both), sub("sub_new"));
        // Before: `subscription`, as an id or expanded; a null parent is no subscription.
        let old = json!({"id": "in_1", "subscription": "sub_old", "parent": null});
        assert_eq!(invoice_target(&old), sub("sub_old"));
        let old_expanded = json!({"subscription": {"id": "sub_oe"}});
        assert_eq!(
            invoice_target(&old_expanded),
            Some(StripeTarget::Subscription("sub_oe"))
        );
        // No subscription anywhere (a one-off invoice): its customer's, as an id or expanded.
        for object in [
            json!({"id": "in_1", "customer": "cus_s1", "subscription": null,
                   "parent": {"type": "quote_details", "subscription_details": null}}),
            json!({"id": "in_1", "customer": {"id": "cus_s1", "object": "customer"}}),
            json!({"customer": "cus_s1", "subscription": ""}),
        ] {
            assert_eq!(
                invoice_target(&object),
                Some(StripeTarget::Customer("cus_s1")),
                "{object}"
            );
        }
        // Neither a subscription nor a customer: nothing to move.
        assert_eq!(invoice_target(&json!({"id": "in_1"})), None);
        assert_eq!(invoice_target(&json!({"customer": null})), None);
    }

    #[test]
    fn nul_is_replaced_in_strings_and_keys_at_any_depth() {
        let mut value = serde_json::json!({
            "a\u{0}b": ["x\u{0}", {"k": "\u{0}\u{0}"}, 1, null, true],
            "clean": "text",
        });
        assert_eq!(sanitize_nul(&mut value), 3);
        assert_eq!(
            value,
            serde_json::json!({
                "a\u{FFFD}b": ["x\u{FFFD}", {"k": "\u{FFFD}\u{FFFD}"}, 1, null, true],
                "clean": "text",
            })
        );
        // Nothing left to change.
        assert_eq!(sanitize_nul(&mut value), 0);
        assert!(!value.to_string().contains("\\u0000"));
    }

    #[test]
    fn parsed_events_carry_no_nul_anywhere() {
        let body = br#"{"id":"evt_nul","type":"invoice.pa\u0000id","created":1790000000,
            "data":{"object":{"id":"in_1","customer":"cus_\u0000x","description":"a\u0000b",
            "metadata":{"k\u0000":"v"}}}}"#;
        let event = parse_event(body).unwrap();
        assert_eq!(event.id, "evt_nul");
        assert_eq!(event.event_type, "invoice.pa\u{FFFD}id");
        assert_eq!(event.data.object["customer"], "cus_\u{FFFD}x");
        assert_eq!(event.data.object["metadata"]["k\u{FFFD}"], "v");
        // What is stored is the sanitized whole, and the object read is the stored one.
        assert_eq!(event.payload["data"]["object"], event.data.object);
        let stored = event.payload.to_string();
        assert!(
            !stored.contains('\0') && !stored.contains("\\u0000"),
            "{stored}"
        );
    }
}
