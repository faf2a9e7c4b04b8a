//! Resend's delivery webhooks: the Svix signature check, and what each event does to
//! `email_log` and `email_suppressions`.
//!
//! Signature (Svix's scheme, which Resend's webhooks use): three headers, `svix-id` (the
//! message id, the same on every redelivery), `svix-timestamp` (unix seconds) and
//! `svix-signature` (space-separated `v1,<base64 HMAC-SHA256>` entries). The MAC is over
//! `"<svix-id>.<svix-timestamp>.<raw body>"`, keyed with the base64-decoded part of the
//! endpoint secret after `whsec_` (not the secret's text, as Stripe's is). Any `v1` entry
//! matching any configured secret passes, so a secret can be rotated with two configured at
//! once; other versions (`v1a`, asymmetric) are ignored. The timestamp must be within five
//! minutes of now either way, so a captured request cannot be replayed later; MACs are
//! compared in constant time. Checked against Svix's published test vector (see the tests).
//!
//! Events are read minimally (a type, a creation time, `data.email_id`, `data.to`,
//! `data.bounce.type`) from the body parsed once, every U+0000 in it replaced first
//! ([`sanitize_nul`], as for Stripe's events): Postgres refuses U+0000 in jsonb and text, and
//! an event that cannot be stored would be answered 5xx on every delivery. The body carries
//! no id of its own: the signed `svix-id` is the event's id.
//!
//! Each `svix-id` is stored once in `resend_events`; a redelivery changes nothing. Its
//! effect follows in the same transaction: `email.delivered`, `email.bounced` and
//! `email.complained` set the `email_log` row's `delivery_status` (found by
//! `provider_message_id` = `data.email_id`) and `delivery_at`, and a hard bounce or a
//! complaint adds the recipients to `email_suppressions`. Resend does not deliver in order: a
//! status only moves up `delivered` < `bounced` < `complained`, so a late `delivered` never
//! hides a bounce. Every other type (`email.sent`, `email.opened`, ...) and every event about
//! an email we did not log is stored and changes nothing.

use base64::Engine;
use base64::alphabet;
use base64::engine::DecodePaddingMode;
use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use chrono::{DateTime, Utc};
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use sqlx::{Connection, PgConnection};

use crate::error::BillingError;
use crate::webhooks::sanitize_nul;

/// How far `svix-timestamp` may be from now, seconds (Svix's libraries' tolerance).
pub const TOLERANCE_SECS: i64 = 300;

/// The prefix of a Svix endpoint secret; the rest is the base64 key.
pub const SECRET_PREFIX: &str = "whsec_";

/// The shortest key (decoded) a secret may hold: Svix's are 24 bytes or more, and a shorter
/// one is a truncated paste.
pub const MIN_KEY_BYTES: usize = 16;

/// The longest `svix-id` accepted (Svix's are `msg_` and some 25 characters).
const MAX_ID_LEN: usize = 255;

/// Base64 that takes a secret or a signature with or without its `=` padding: a secret
/// copied without its trailing `=` is still the same key.
const LENIENT_BASE64: GeneralPurpose = GeneralPurpose::new(
    &alphabet::STANDARD,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Why a webhook request is refused (all 400).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// A `svix-id`, `svix-timestamp` or `svix-signature` header is missing.
    #[error("the request lacks a svix-id, svix-timestamp or svix-signature header")]
    Missing,
    /// The id is not a printable token, the timestamp not an integer, or the signature
    /// header has no `v1,<base64>` entry.
    #[error("the svix-id, svix-timestamp or svix-signature header is malformed")]
    Malformed,
    /// The timestamp is more than the tolerance away from now.
    #[error("the svix-timestamp is outside the 5-minute tolerance")]
    Stale,
    /// No `v1` signature matches any secret.
    #[error("no signature matches")]
    Mismatch,
}

/// The three Svix headers of a delivery, as sent (`None` when absent).
#[derive(Debug, Clone, Copy, Default)]
pub struct SvixHeaders<'a> {
    /// `svix-id`: the message id, the same on every redelivery.
    pub id: Option<&'a str>,
    /// `svix-timestamp`: unix seconds.
    pub timestamp: Option<&'a str>,
    /// `svix-signature`: space-separated `v1,<base64>` entries.
    pub signature: Option<&'a str>,
}

/// The HMAC key of a `whsec_<base64>` secret; `None` when it lacks the prefix, is not
/// base64, or decodes to fewer than [`MIN_KEY_BYTES`] (the configuration refuses such a
/// secret at start-up).
pub fn signing_key(secret: &str) -> Option<Vec<u8>> {
    let key = LENIENT_BASE64
        .decode(secret.strip_prefix(SECRET_PREFIX)?)
        .ok()?;
    (key.len() >= MIN_KEY_BYTES).then_some(key)
}

fn mac(key: &[u8], id: &str, timestamp: &str, payload: &[u8]) -> Hmac<Sha256> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("any key length");
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.as_bytes());
    mac.update(b".");
    mac.update(payload);
    mac
}

/// The base64 signature Svix sends (after `v1,`) for `payload` with message `id` at
/// `timestamp`, under `secret`; `None` when the secret is not a valid `whsec_` secret.
pub fn sign(secret: &str, id: &str, timestamp: i64, payload: &[u8]) -> Option<String> {
    let key = signing_key(secret)?;
    let mac = mac(&key, id, &timestamp.to_string(), payload);
    Some(STANDARD.encode(mac.finalize().into_bytes()))
}

/// Whether `id` can be an event id: 1 to 255 visible ASCII characters. It is signed, so any
/// such id is Svix's; this only keeps the key of `resend_events` printable and bounded.
fn valid_id(id: &str) -> bool {
    (1..=MAX_ID_LEN).contains(&id.len()) && id.bytes().all(|b| b.is_ascii_graphic())
}

/// Checks a delivery's `headers` for `payload` (the raw body) against `secrets` (each
/// `whsec_...`) at `now` (unix seconds).
pub fn verify(
    headers: &SvixHeaders<'_>,
    payload: &[u8],
    secrets: &[&str],
    now: i64,
) -> Result<(), SignatureError> {
    let (Some(id), Some(timestamp), Some(header)) =
        (headers.id, headers.timestamp, headers.signature)
    else {
        return Err(SignatureError::Missing);
    };
    if !valid_id(id) {
        return Err(SignatureError::Malformed);
    }
    let seconds: i64 = timestamp.parse().map_err(|_| SignatureError::Malformed)?;
    // Entries that are not `v1,<base64>` cannot match; they are skipped, not fatal (Svix
    // may add versions, `v1a` for one).
    let signatures: Vec<Vec<u8>> = header
        .split_ascii_whitespace()
        .filter_map(|entry| entry.split_once(','))
        .filter(|(version, _)| *version == "v1")
        .filter_map(|(_, signature)| LENIENT_BASE64.decode(signature).ok())
        .filter(|signature| !signature.is_empty())
        .collect();
    if signatures.is_empty() {
        return Err(SignatureError::Malformed);
    }
    // abs_diff: a hostile timestamp (i64::MIN, say) must not overflow the subtraction.
    if now.abs_diff(seconds) > TOLERANCE_SECS.unsigned_abs() {
        return Err(SignatureError::Stale);
    }
    for key in secrets.iter().filter_map(|s| signing_key(s)) {
        // The MAC is over the timestamp as sent: `+5` or `05` would parse to the same
        // seconds yet sign other bytes, and must not match a signature of `5`.
        let mac = mac(&key, id, timestamp, payload);
        if signatures
            .iter()
            .any(|signature| mac.clone().verify_slice(signature).is_ok())
        {
            return Ok(());
        }
    }
    Err(SignatureError::Mismatch)
}

/// What an event does, and the bounded `type` label of its metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `email.delivered`.
    Delivered,
    /// `email.bounced`.
    Bounced,
    /// `email.complained`.
    Complained,
    /// Any other type: stored, not applied.
    Other,
}

impl Kind {
    /// `delivered`, `bounced`, `complained` or `other`.
    pub fn label(self) -> &'static str {
        match self {
            Kind::Delivered => "delivered",
            Kind::Bounced => "bounced",
            Kind::Complained => "complained",
            Kind::Other => "other",
        }
    }

    /// The `delivery_status` it sets and that status's rank (a status moves only up).
    fn status(self) -> Option<(&'static str, i32)> {
        match self {
            Kind::Delivered => Some(("delivered", 1)),
            Kind::Bounced => Some(("bounced", 2)),
            Kind::Complained => Some(("complained", 3)),
            Kind::Other => None,
        }
    }
}

/// The parts of a Resend event we read, from a body [`parse_event`] accepted.
#[derive(Debug, Clone)]
pub struct Event {
    /// The `svix-id` it was delivered under.
    pub id: String,
    /// `email.delivered`, `email.bounced`, ...
    pub event_type: String,
    /// When Resend created it (`created_at`, else `data.created_at`), if readable.
    pub created_at: Option<DateTime<Utc>>,
    /// `data.email_id`: Resend's id of the email, our `email_log.provider_message_id`.
    pub email_id: Option<String>,
    /// `data.to`: the recipients' addresses (a `Name <address>` form reduced to the address).
    pub recipients: Vec<String>,
    /// `data.bounce.type` (`Permanent`, `Transient`, `Undetermined`), when there is one.
    pub bounce_type: Option<String>,
    /// The whole event, U+0000 replaced: what `resend_events.payload` stores.
    pub payload: Value,
}

impl Event {
    /// What the event does.
    pub fn kind(&self) -> Kind {
        match self.event_type.as_str() {
            "email.delivered" => Kind::Delivered,
            "email.bounced" => Kind::Bounced,
            "email.complained" => Kind::Complained,
            _ => Kind::Other,
        }
    }

    /// Whether the recipients must not be written to again: every complaint, and a bounce
    /// that is `Permanent` or says no type (Resend documents `email.bounced` as a permanent
    /// rejection, so a bounce of unknown type is taken as one). A `Transient` or
    /// `Undetermined` bounce may deliver next time.
    pub fn suppresses(&self) -> Option<&'static str> {
        match self.kind() {
            Kind::Complained => Some("complained"),
            Kind::Bounced => match self.bounce_type.as_deref() {
                None | Some("") => Some("bounced"),
                Some(t) if t.eq_ignore_ascii_case("permanent") => Some("bounced"),
                Some(_) => None,
            },
            Kind::Delivered | Kind::Other => None,
        }
    }
}

/// A time as Resend writes one: RFC 3339 (`2024-11-22T23:41:12.126Z`, the event's
/// `created_at`) or Postgres's text form (`2024-11-22 23:41:11.894719+00`, seen in
/// `data.created_at`).
fn parse_time(text: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(text)
        .or_else(|_| DateTime::parse_from_str(text, "%Y-%m-%d %H:%M:%S%.f%#z"))
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// The address of a recipient as sent: `Ada <ada@example.com>` is `ada@example.com`.
fn address(recipient: &str) -> &str {
    let recipient = recipient.trim();
    match (recipient.rfind('<'), recipient.strip_suffix('>')) {
        (Some(start), Some(inner)) => inner[start + 1..].trim(),
        _ => recipient,
    }
}

/// A non-empty string at `value`.
fn text(value: Option<&Value>) -> Option<&str> {
    value.and_then(Value::as_str).filter(|s| !s.is_empty())
}

/// Parses an event `payload` delivered under `id` (the `svix-id`); `None` when the id is not
/// one [`verify`] accepts or the body is not JSON with a non-empty `type` and a `data`
/// object. Every U+0000 in it is replaced first, so nothing read from the event carries one.
pub fn parse_event(id: &str, payload: &[u8]) -> Option<Event> {
    if !valid_id(id) {
        return None;
    }
    let mut payload: Value = serde_json::from_slice(payload).ok()?;
    sanitize_nul(&mut payload);
    let event_type = payload.get("type")?.as_str()?.to_owned();
    let data = payload.get("data")?.as_object()?;
    if event_type.is_empty() {
        return None;
    }
    let created_at = text(payload.get("created_at"))
        .and_then(parse_time)
        .or_else(|| text(data.get("created_at")).and_then(parse_time));
    let email_id = text(data.get("email_id")).map(str::to_owned);
    // An array per Resend's types; a lone string is taken too.
    let recipients = match data.get("to") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(Value::String(one)) => vec![one.as_str()],
        _ => Vec::new(),
    }
    .into_iter()
    .map(address)
    .filter(|a| !a.is_empty())
    .map(str::to_owned)
    .collect();
    let bounce_type = text(data.get("bounce").and_then(|b| b.get("type"))).map(str::to_owned);
    Some(Event {
        id: id.to_owned(),
        event_type,
        created_at,
        email_id,
        recipients,
        bounce_type,
        payload,
    })
}

/// What handling an event did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handled {
    /// First delivery: stored, and applied if its type moves anything.
    Stored {
        /// `email_log` rows whose delivery status moved (0 or 1).
        emails_updated: u64,
        /// Addresses newly added to `email_suppressions`.
        addresses_suppressed: u64,
    },
    /// The `svix-id` was stored before: nothing changed.
    Duplicate,
}

/// Stores `event` once and applies it, in one transaction (a savepoint when `conn` is already
/// in one): the event row (its sanitized payload), the email's delivery status, the
/// suppressed addresses and the processed mark. Errors are the store's
/// ([`BillingError::Database`]); Resend retries a delivery that fails, and nothing of it stays.
pub async fn handle(conn: &mut PgConnection, event: &Event) -> Result<Handled, BillingError> {
    let mut tx = conn.begin().await?;
    let inserted = sqlx::query(
        "INSERT INTO resend_events (id, event_type, payload) VALUES ($1, $2, $3) \
         ON CONFLICT (id) DO NOTHING",
    )
    .bind(&event.id)
    .bind(&event.event_type)
    .bind(&event.payload)
    .execute(&mut *tx)
    .await?
    .rows_affected();
    if inserted == 0 {
        tx.rollback().await?;
        return Ok(Handled::Duplicate);
    }
    let mut emails_updated = 0;
    let mut addresses_suppressed = 0;
    if let (Some(email_id), Some((status, rank))) = (&event.email_id, event.kind().status()) {
        // The rank is compared under the row's lock (READ COMMITTED re-reads the row after
        // waiting), so two events of one email racing still leave the higher status.
        emails_updated = sqlx::query(
            "UPDATE email_log SET delivery_status = $2, delivery_at = coalesce($3, now()) \
             WHERE provider_message_id = $1 \
               AND coalesce(CASE delivery_status WHEN 'delivered' THEN 1 \
                   WHEN 'bounced' THEN 2 WHEN 'complained' THEN 3 END, 0) < $4",
        )
        .bind(email_id)
        .bind(status)
        .bind(event.created_at)
        .bind(rank)
        .execute(&mut *tx)
        .await?
        .rows_affected();
        if let Some(reason) = event.suppresses() {
            // Only for an email we sent: the account may send for others, whose bounces
            // are not ours to act on. lower() in SQL, so the table's check holds whatever
            // Unicode the address holds. An address suppressed before keeps its first reason.
            addresses_suppressed = sqlx::query(
                "INSERT INTO email_suppressions (address, reason, provider_message_id) \
                 SELECT DISTINCT lower(a), $2, $3 FROM unnest($1::text[]) AS a \
                 WHERE EXISTS (SELECT 1 FROM email_log WHERE provider_message_id = $3) \
                 ON CONFLICT (address) DO NOTHING",
            )
            .bind(&event.recipients)
            .bind(reason)
            .bind(email_id)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
    }
    sqlx::query("UPDATE resend_events SET processed_at = now() WHERE id = $1")
        .bind(&event.id)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(Handled::Stored {
        emails_updated,
        addresses_suppressed,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Svix's published example (docs.svix.com, "How to Verify Webhooks with the Svix
    // Libraries": this secret, id, timestamp, body and `svix-signature: v1,g0hM...`); the svix
    // libraries' own tests sign the same secret, id and body.
    const SVIX_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const SVIX_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const SVIX_TIMESTAMP: i64 = 1_614_265_330;
    const SVIX_PAYLOAD: &[u8] = br#"{"test": 2432232314}"#;
    const SVIX_SIGNATURE: &str = "g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    // A second secret for rotation (base64 of b"apex-rotated-resend-secret-2026", padded)
    // and its signature of the same message, computed independently with Python:
    //   k = base64.b64decode("YXBleC1yb3RhdGVkLXJlc2VuZC1zZWNyZXQtMjAyNg==")
    //   base64.b64encode(hmac.new(k, b'msg_p5jXN8AQM9LWM0D4loKWxJek.1614265330.'
    //                              b'{"test": 2432232314}', hashlib.sha256).digest())
    // (the same lines with the Svix key give SVIX_SIGNATURE).
    const ROTATED_SECRET: &str = "whsec_YXBleC1yb3RhdGVkLXJlc2VuZC1zZWNyZXQtMjAyNg==";
    const ROTATED_SIGNATURE: &str = "icruUnznrZecocL4P4I/hHyU0ZNbSjLA60UO/C9/8Ys=";

    fn headers<'a>(id: &'a str, timestamp: &'a str, signature: &'a str) -> SvixHeaders<'a> {
        SvixHeaders {
            id: Some(id),
            timestamp: Some(timestamp),
            signature: Some(signature),
        }
    }

    fn check(
        signature: &str,
        payload: &[u8],
        secrets: &[&str],
        now: i64,
    ) -> Result<(), SignatureError> {
        let ts = SVIX_TIMESTAMP.to_string();
        verify(&headers(SVIX_ID, &ts, signature), payload, secrets, now)
    }

    #[test]
    fn svix_test_vector_verifies_and_signs() {
        assert_eq!(
            sign(SVIX_SECRET, SVIX_ID, SVIX_TIMESTAMP, SVIX_PAYLOAD).as_deref(),
            Some(SVIX_SIGNATURE)
        );
        assert_eq!(
            sign(ROTATED_SECRET, SVIX_ID, SVIX_TIMESTAMP, SVIX_PAYLOAD).as_deref(),
            Some(ROTATED_SIGNATURE)
        );
        let header = format!("v1,{SVIX_SIGNATURE}");
        assert_eq!(
            check(&header, SVIX_PAYLOAD, &[SVIX_SECRET], SVIX_TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn rotation_accepts_either_secret() {
        let old = format!("v1,{SVIX_SIGNATURE}");
        let new = format!("v1,{ROTATED_SIGNATURE}");
        for header in [&old, &new] {
            assert_eq!(
                check(
                    header,
                    SVIX_PAYLOAD,
                    &[SVIX_SECRET, ROTATED_SECRET],
                    SVIX_TIMESTAMP
                ),
                Ok(()),
                "{header}"
            );
        }
        // Each secret alone accepts only its own signature.
        assert_eq!(
            check(&new, SVIX_PAYLOAD, &[SVIX_SECRET], SVIX_TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(&old, SVIX_PAYLOAD, &[ROTATED_SECRET], SVIX_TIMESTAMP),
            Err(SignatureError::Mismatch)
        );
        // The padding of a secret may be left off.
        let unpadded = ROTATED_SECRET.trim_end_matches('=');
        assert_eq!(
            check(&new, SVIX_PAYLOAD, &[unpadded], SVIX_TIMESTAMP),
            Ok(())
        );
    }

    #[test]
    fn any_v1_entry_of_several_may_match() {
        let zeros = STANDARD.encode([0u8; 32]);
        for header in [
            format!("v1,{zeros} v1,{SVIX_SIGNATURE}"),
            format!("v1a,{SVIX_SIGNATURE} v1,{zeros}  v1,{ROTATED_SIGNATURE}"),
            // Entries that are not `version,signature` are skipped.
            format!("garbage v2,abc v1,!!notbase64!! v1,{SVIX_SIGNATURE}"),
        ] {
            assert_eq!(
                check(
                    &header,
                    SVIX_PAYLOAD,
                    &[SVIX_SECRET, ROTATED_SECRET],
                    SVIX_TIMESTAMP
                ),
                Ok(()),
                "{header}"
            );
        }
        // The right signature under another version is no v1 signature.
        assert_eq!(
            check(
                &format!("v1a,{SVIX_SIGNATURE} v1,{zeros}"),
                SVIX_PAYLOAD,
                &[SVIX_SECRET],
                SVIX_TIMESTAMP
            ),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn tampered_stale_and_future_deliveries_are_refused() {
        let good = format!("v1,{SVIX_SIGNATURE}");
        let now = SVIX_TIMESTAMP;
        // Another body under the same signature.
        assert_eq!(
            check(&good, br#"{"test": 2432232315}"#, &[SVIX_SECRET], now),
            Err(SignatureError::Mismatch)
        );
        // The id and the timestamp are signed too.
        let ts = SVIX_TIMESTAMP.to_string();
        assert_eq!(
            verify(
                &headers("msg_other", &ts, &good),
                SVIX_PAYLOAD,
                &[SVIX_SECRET],
                now
            ),
            Err(SignatureError::Mismatch)
        );
        let moved = (SVIX_TIMESTAMP + 1).to_string();
        assert_eq!(
            verify(
                &headers(SVIX_ID, &moved, &good),
                SVIX_PAYLOAD,
                &[SVIX_SECRET],
                now
            ),
            Err(SignatureError::Mismatch)
        );
        // The same seconds written otherwise are other signed bytes.
        let padded = format!("0{SVIX_TIMESTAMP}");
        assert_eq!(
            verify(
                &headers(SVIX_ID, &padded, &good),
                SVIX_PAYLOAD,
                &[SVIX_SECRET],
                now
            ),
            Err(SignatureError::Mismatch)
        );
        // Five minutes either way is the limit.
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &[SVIX_SECRET], now + 300),
            Ok(())
        );
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &[SVIX_SECRET], now - 300),
            Ok(())
        );
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &[SVIX_SECRET], now + 301),
            Err(SignatureError::Stale)
        );
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &[SVIX_SECRET], now - 301),
            Err(SignatureError::Stale)
        );
        // Hostile timestamps are stale, never an overflow.
        for t in [i64::MIN, i64::MAX, -1] {
            let t = t.to_string();
            assert_eq!(
                verify(
                    &headers(SVIX_ID, &t, &good),
                    SVIX_PAYLOAD,
                    &[SVIX_SECRET],
                    now
                ),
                Err(SignatureError::Stale),
                "{t}"
            );
        }
        // No usable secret: nothing passes.
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &[], now),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            check(&good, SVIX_PAYLOAD, &["whsec_not base64"], now),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn missing_and_malformed_headers_are_refused() {
        let ts = SVIX_TIMESTAMP.to_string();
        let good = format!("v1,{SVIX_SIGNATURE}");
        let now = SVIX_TIMESTAMP;
        for missing in [
            SvixHeaders {
                id: None,
                ..headers(SVIX_ID, &ts, &good)
            },
            SvixHeaders {
                timestamp: None,
                ..headers(SVIX_ID, &ts, &good)
            },
            SvixHeaders {
                signature: None,
                ..headers(SVIX_ID, &ts, &good)
            },
            SvixHeaders::default(),
        ] {
            assert_eq!(
                verify(&missing, SVIX_PAYLOAD, &[SVIX_SECRET], now),
                Err(SignatureError::Missing),
                "{missing:?}"
            );
        }
        let long_id = "m".repeat(256);
        for (id, timestamp, signature) in [
            ("", ts.as_str(), good.as_str()),
            ("msg 1", &ts, &good),
            ("msg\u{0}", &ts, &good),
            (&long_id, &ts, &good),
            (SVIX_ID, "yesterday", &good),
            (SVIX_ID, "", &good),
            (SVIX_ID, "1614265330.5", &good),
            (SVIX_ID, &ts, ""),
            (SVIX_ID, &ts, SVIX_SIGNATURE),
            (SVIX_ID, &ts, "v1"),
            (SVIX_ID, &ts, "v1,"),
            (SVIX_ID, &ts, "v1,***"),
            (SVIX_ID, &ts, &format!("v1a,{SVIX_SIGNATURE}")),
            (
                SVIX_ID,
                &ts,
                &format!("t={SVIX_TIMESTAMP},v1={SVIX_SIGNATURE}"),
            ),
        ] {
            assert_eq!(
                verify(
                    &headers(id, timestamp, signature),
                    SVIX_PAYLOAD,
                    &[SVIX_SECRET],
                    now
                ),
                Err(SignatureError::Malformed),
                "{id:?} {timestamp:?} {signature:?}"
            );
        }
    }

    #[test]
    fn secrets_need_the_prefix_and_a_real_key() {
        assert_eq!(signing_key(SVIX_SECRET).map(|k| k.len()), Some(24));
        for bad in [
            "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
            "whsec_",
            "whsec_not base64!",
            "whsec_c2hvcnQ=",
            "sk_live_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw",
        ] {
            assert_eq!(signing_key(bad), None, "{bad}");
            assert_eq!(sign(bad, SVIX_ID, SVIX_TIMESTAMP, SVIX_PAYLOAD), None);
        }
    }

    fn parse(body: &Value) -> Event {
        parse_event("msg_1", body.to_string().as_bytes()).unwrap()
    }

    #[test]
    fn events_parse_minimally() {
        use serde_json::json;
        // Resend's documented shape of a bounce.
        let bounced = parse(&json!({
            "type": "email.bounced",
            "created_at": "2024-11-22T23:41:12.126Z",
            "data": {
                "broadcast_id": "8b146471-e88e-4322-86af-016cd36fd216",
                "created_at": "2024-11-22 23:41:11.894719+00",
                "email_id": "56761188-7520-42d8-8898-ff6fc54ce618",
                "from": "Acme <onboarding@resend.dev>",
                "to": ["Ada <Ada@Example.COM>", " bob@example.com "],
                "subject": "Sending this example",
                "bounce": {"message": "The recipient's email address is on the suppression list.",
                           "subType": "Suppressed", "type": "Permanent"}
            }
        }));
        assert_eq!(bounced.kind(), Kind::Bounced);
        assert_eq!(
            bounced.created_at,
            DateTime::parse_from_rfc3339("2024-11-22T23:41:12.126Z")
                .ok()
                .map(|t| t.with_timezone(&Utc))
        );
        assert_eq!(
            bounced.email_id.as_deref(),
            Some("56761188-7520-42d8-8898-ff6fc54ce618")
        );
        // Lowercased when stored (by Postgres), not here.
        assert_eq!(bounced.recipients, ["Ada@Example.COM", "bob@example.com"]);
        assert_eq!(bounced.suppresses(), Some("bounced"));

        // No top-level time: data's, in Postgres's text form.
        let delivered = parse(&json!({"type": "email.delivered",
            "data": {"email_id": "e1", "to": "c@example.com",
                     "created_at": "2024-11-22 23:41:11.894719+00"}}));
        assert_eq!(delivered.kind(), Kind::Delivered);
        assert_eq!(
            delivered.created_at.map(|t| t.to_rfc3339()),
            Some("2024-11-22T23:41:11.894719+00:00".to_owned())
        );
        assert_eq!(delivered.recipients, ["c@example.com"]);
        assert_eq!(delivered.suppresses(), None);

        let bounce = |bounce: Value| {
            parse(&json!({"type": "email.bounced", "data": {"email_id": "e", "bounce": bounce}}))
                .suppresses()
        };
        assert_eq!(
            bounce(json!({"type": "Transient", "subType": "MailboxFull"})),
            None
        );
        assert_eq!(bounce(json!({"type": "Undetermined"})), None);
        assert_eq!(bounce(json!({"type": "permanent"})), Some("bounced"));
        assert_eq!(bounce(json!({"message": "no type"})), Some("bounced"));
        assert_eq!(bounce(Value::Null), Some("bounced"));
        let complained = parse(&json!({"type": "email.complained", "data": {"email_id": "e"}}));
        assert_eq!(complained.suppresses(), Some("complained"));

        for other in [
            "email.sent",
            "email.delivery_delayed",
            "email.opened",
            "contact.created",
        ] {
            let event = parse(&json!({"type": other, "created_at": "garbage", "data": {}}));
            assert_eq!((event.kind(), event.kind().label()), (Kind::Other, "other"));
            assert_eq!((event.created_at, event.email_id), (None, None));
        }

        for bad in [
            &b"not json"[..],
            br#"{"data": {}}"#,
            br#"{"type": "", "data": {}}"#,
            br#"{"type": 7, "data": {}}"#,
            br#"{"type": "email.sent"}"#,
            br#"{"type": "email.sent", "data": []}"#,
            br#"[]"#,
        ] {
            assert!(
                parse_event("msg_1", bad).is_none(),
                "{}",
                String::from_utf8_lossy(bad)
            );
        }
        assert!(parse_event("", br#"{"type": "email.sent", "data": {}}"#).is_none());
    }

    #[test]
    fn parsed_events_carry_no_nul_anywhere() {
        let body = br#"{"type":"email.bou\u0000nced","created_at":"2024-11-22T23:41:12Z",
            "data":{"email_id":"e\u00001","to":["a\u0000@example.com"],"subject":"x\u0000",
            "tags":{"k\u0000":"v"}}}"#;
        let event = parse_event("msg_nul", body).unwrap();
        assert_eq!(event.event_type, "email.bou\u{FFFD}nced");
        assert_eq!(event.kind(), Kind::Other);
        assert_eq!(event.email_id.as_deref(), Some("e\u{FFFD}1"));
        assert_eq!(event.recipients, ["a\u{FFFD}@example.com"]);
        let stored = event.payload.to_string();
        assert!(
            !stored.contains('\0') && !stored.contains("\\u0000"),
            "{stored}"
        );
    }
}
