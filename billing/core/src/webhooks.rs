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
//! as JSON): Stripe adds fields freely, and test stand-ins leave some out. Each event id is
//! stored once in `stripe_events`; a second delivery changes nothing. The subscription status
//! follows the events in the same transaction as the event row, so an event is never stored
//! without its effect, nor applied twice.

use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde::Deserialize;
use sha2::Sha256;
use sqlx::{Connection, PgConnection};

use crate::error::BillingError;
use crate::subscriptions;

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

/// The parts of a Stripe event we read.
#[derive(Debug, Clone, Deserialize)]
pub struct Event {
    /// `evt_...`.
    pub id: String,
    /// `invoice.paid`, `customer.subscription.updated`, ...
    #[serde(rename = "type")]
    pub event_type: String,
    /// Unix seconds.
    pub created: Option<i64>,
    /// `data.object` and friends.
    pub data: EventData,
}

/// An event's `data`.
#[derive(Debug, Clone, Deserialize)]
pub struct EventData {
    /// The object the event is about.
    pub object: serde_json::Value,
}

/// Parses an event body; `None` when it is not a Stripe event.
pub fn parse_event(payload: &[u8]) -> Option<Event> {
    let event: Event = serde_json::from_slice(payload).ok()?;
    let valid_id = event.id.strip_prefix("evt_").is_some_and(|rest| {
        !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    });
    (valid_id && !event.event_type.is_empty()).then_some(event)
}

/// What handling an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// First delivery: stored, and applied if it is a type billing acts on.
    Stored {
        /// Subscriptions whose status changed.
        subscriptions_updated: u64,
    },
    /// The event id was stored before: nothing changed.
    Duplicate,
}

/// The subscription status an event sets, and which subscription it names.
fn status_change(event: &Event) -> Option<(&str, &'static str)> {
    let object = &event.data.object;
    match event.event_type.as_str() {
        "invoice.payment_failed" => Some((object.get("subscription")?.as_str()?, "past_due")),
        "invoice.paid" | "invoice.payment_succeeded" => {
            Some((object.get("subscription")?.as_str()?, "active"))
        }
        "customer.subscription.updated" => {
            let status = match object.get("status")?.as_str()? {
                "trialing" => "trialing",
                "active" => "active",
                "past_due" | "unpaid" | "incomplete" => "past_due",
                "canceled" | "incomplete_expired" => "canceled",
                _ => return None,
            };
            Some((object.get("id")?.as_str()?, status))
        }
        "customer.subscription.deleted" => Some((object.get("id")?.as_str()?, "canceled")),
        _ => None,
    }
}

/// Stores `event` once and applies it, in one transaction (a savepoint when `conn` is already
/// in one): the event row, the subscription's new status and the processed mark.
pub async fn handle(
    conn: &mut PgConnection,
    event: &Event,
    payload: &[u8],
) -> Result<Handled, BillingError> {
    let payload_json: serde_json::Value = serde_json::from_slice(payload)
        .map_err(|e| BillingError::Invalid(format!("the event is not JSON: {e}")))?;
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
    .bind(&payload_json)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(Handled::Duplicate);
    }
    let mut updated = 0;
    if let Some((subscription, status)) = status_change(event) {
        updated = subscriptions::apply_stripe_status(&mut *tx, subscription, status).await?;
    }
    sqlx::query("UPDATE stripe_events SET processed_at = now() WHERE id = $1")
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Handled::Stored {
        subscriptions_updated: updated,
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
        assert_eq!(status_change(&failed), Some(("sub_9", "past_due")));
        let deleted = parse_event(
            br#"{"id":"evt_2","type":"customer.subscription.deleted","data":{"object":{"id":"sub_9","status":"canceled"}}}"#,
        )
        .unwrap();
        assert_eq!(status_change(&deleted), Some(("sub_9", "canceled")));
        let updated = parse_event(
            br#"{"id":"evt_3","type":"customer.subscription.updated","data":{"object":{"id":"sub_9","status":"unpaid"}}}"#,
        )
        .unwrap();
        assert_eq!(status_change(&updated), Some(("sub_9", "past_due")));
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
        ] {
            assert!(parse_event(bad).is_none());
        }
    }
}
