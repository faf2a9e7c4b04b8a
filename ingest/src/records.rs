//! Parsing and validating usage records: the guide's track body, batch envelopes (JSON and
//! NDJSON), exact quantities, timestamps and limits. Pure functions over bytes and a clock
//! value, so the whole bad-input surface is unit-testable without a server.
//!
//! Quantities are read from the JSON number's text, never through a float: `35.2` GB is
//! exactly 35,200,000,000 bytes, and `1.5` impressions is refused rather than rounded.

use std::borrow::Cow;

use apex_core::model::{BYTES_PER_GB, Metric};
use serde::Deserialize;
use serde_json::value::RawValue;

use crate::error::{ApiError, RecordError};

/// Largest quantity of one record, per metric, in storage units.
pub const fn max_quantity(metric: Metric) -> u64 {
    match metric {
        Metric::Impressions | Metric::ApiCalls => 1_000_000_000,
        // 10,000 GB in one record.
        Metric::DataTransfer => 10_000 * BYTES_PER_GB,
    }
}
/// Longest `event_id`, in bytes.
pub const MAX_EVENT_ID_BYTES: usize = 128;
/// Largest `metadata` object, in bytes of JSON.
pub const MAX_METADATA_BYTES: usize = 4_096;
/// Oldest accepted timestamp: 35 days back, Stripe's window for usage.
pub const MAX_PAST_MS: i64 = 35 * 24 * 3_600 * 1_000;
/// Newest accepted timestamp: 5 minutes ahead, for clock skew.
pub const MAX_FUTURE_MS: i64 = 5 * 60 * 1_000;

/// One record as it appears on the wire (the guide's track body, or a batch element).
#[derive(Debug, Deserialize)]
pub struct WireRecord<'a> {
    /// The key, when sent in the body.
    #[serde(borrow, default)]
    pub api_key: Option<Cow<'a, str>>,
    /// `impressions`, `api_calls` or `data_transfer`.
    #[serde(borrow)]
    pub metric_type: Cow<'a, str>,
    /// The quantity's JSON text.
    #[serde(borrow)]
    pub quantity: &'a RawValue,
    /// Optional idempotency key.
    #[serde(borrow, default)]
    pub event_id: Option<Cow<'a, str>>,
    /// Optional time of use.
    #[serde(borrow, default)]
    pub timestamp: Option<&'a RawValue>,
    /// Optional object of client details.
    #[serde(borrow, default)]
    pub metadata: Option<&'a RawValue>,
}

/// A batch envelope: one key for many records.
#[derive(Debug, Deserialize)]
pub struct WireBatch<'a> {
    /// The key, when sent in the body.
    #[serde(borrow, default)]
    pub api_key: Option<Cow<'a, str>>,
    /// The records, parsed one by one so a bad one is reported by index.
    #[serde(borrow)]
    pub records: Vec<&'a RawValue>,
}

/// A record that passed validation, still without its customer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidRecord {
    /// What was used.
    pub metric: Metric,
    /// How much, in storage units.
    pub quantity: u64,
    /// The quantity as the client sent it (echoed in the track answer).
    pub quantity_text: Box<str>,
    /// Idempotency key.
    pub event_id: Option<Box<str>>,
    /// Time of use, unix ms.
    pub timestamp_ms: i64,
    /// Metadata object as JSON text.
    pub metadata: Option<Box<str>>,
}

/// Turns a serde error into the API's 400: syntax problems are `invalid_json`, shape
/// problems (missing field, wrong type) are `invalid_field`.
pub fn json_error(e: &serde_json::Error) -> ApiError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => ApiError::InvalidField(e.to_string()),
        Category::Syntax | Category::Eof | Category::Io => ApiError::InvalidJson(e.to_string()),
    }
}

/// Parses the guide's track body.
pub fn parse_track(body: &[u8]) -> Result<WireRecord<'_>, ApiError> {
    serde_json::from_slice(body).map_err(|e| json_error(&e))
}

/// Validates one wire record at time `now_ms`.
pub fn validate(record: &WireRecord<'_>, now_ms: i64) -> Result<ValidRecord, RecordError> {
    let metric: Metric = record.metric_type.parse().map_err(|_| {
        RecordError::new(
            "invalid_metric",
            format!(
                "metric_type {:?} is not impressions, api_calls or data_transfer",
                truncate(&record.metric_type, 64)
            ),
        )
    })?;
    let quantity_text = record.quantity.get();
    let quantity = parse_quantity(quantity_text, metric)?;
    let event_id = match &record.event_id {
        None => None,
        Some(id) => {
            if id.is_empty() || id.len() > MAX_EVENT_ID_BYTES {
                return Err(RecordError::new(
                    "invalid_event_id",
                    format!("event_id must be 1 to {MAX_EVENT_ID_BYTES} bytes"),
                ));
            }
            if id.chars().any(char::is_control) {
                return Err(RecordError::new(
                    "invalid_event_id",
                    "event_id must not contain control characters",
                ));
            }
            Some(Box::from(id.as_ref()))
        }
    };
    let timestamp_ms = match record.timestamp {
        None => now_ms,
        Some(raw) if raw.get() == "null" => now_ms,
        Some(raw) => parse_timestamp(raw.get(), now_ms)?,
    };
    let metadata = match record.metadata {
        None => None,
        Some(raw) if raw.get() == "null" => None,
        Some(raw) => {
            let text = raw.get();
            if !text.starts_with('{') {
                return Err(RecordError::new(
                    "invalid_metadata",
                    "metadata must be an object",
                ));
            }
            if text.len() > MAX_METADATA_BYTES {
                return Err(RecordError::new(
                    "metadata_too_large",
                    format!("metadata must be at most {MAX_METADATA_BYTES} bytes of JSON"),
                ));
            }
            Some(Box::from(text))
        }
    };
    Ok(ValidRecord {
        metric,
        quantity,
        quantity_text: Box::from(quantity_text),
        event_id,
        timestamp_ms,
        metadata,
    })
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// Reads a JSON number's text as an exact quantity in the metric's storage unit.
/// Integer metrics take exact integers in any notation (`1000`, `1e3`, `1000.0`);
/// data transfer takes GB with up to 9 decimals (bytes).
pub fn parse_quantity(text: &str, metric: Metric) -> Result<u64, RecordError> {
    let invalid = |message: &str| RecordError::new("invalid_quantity", message.to_owned());
    let first = text.as_bytes().first().copied();
    match first {
        Some(b'"') => return Err(invalid("quantity must be a number, not a string")),
        Some(b'-') => return Err(invalid("quantity must be positive")),
        Some(b'0'..=b'9') => {}
        _ => return Err(invalid("quantity must be a number")),
    }
    let scale: i64 = if metric == Metric::DataTransfer { 9 } else { 0 };
    let (mantissa, exponent) = match text.find(['e', 'E']) {
        Some(i) => (
            &text[..i],
            text[i + 1..]
                .parse::<i64>()
                .map_err(|_| invalid("quantity exponent is out of range"))?,
        ),
        None => (text, 0),
    };
    let (int_part, frac_part) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = format!("{int_part}{frac_part}");
    let digits = digits.trim_start_matches('0');
    // Value = digits × 10^shift, and it must be a whole number of storage units.
    let mut shift = exponent
        .saturating_sub(frac_part.len() as i64)
        .saturating_add(scale);
    let mut digits = digits;
    while shift < 0 {
        match digits.strip_suffix('0') {
            Some(rest) => {
                digits = rest;
                shift += 1;
            }
            None if digits.is_empty() => {
                shift = 0;
            }
            None => {
                return Err(if metric == Metric::DataTransfer {
                    invalid("data_transfer has at most 9 decimals (GB to the byte)")
                } else {
                    invalid("quantity must be a whole number")
                });
            }
        }
    }
    if digits.is_empty() {
        return Err(invalid("quantity must be positive"));
    }
    let too_large = || {
        RecordError::new(
            "quantity_too_large",
            format!(
                "quantity is above the per-record maximum of {} {}",
                max_quantity(metric),
                metric.storage_unit()
            ),
        )
    };
    // Saturating: an exponent of i64::MAX must be "too large", never an overflow.
    if (digits.len() as i64).saturating_add(shift) > 20 {
        return Err(too_large());
    }
    let mut value: u64 = digits.parse().map_err(|_| too_large())?;
    for _ in 0..shift {
        value = value.checked_mul(10).ok_or_else(too_large)?;
    }
    if value > max_quantity(metric) {
        return Err(too_large());
    }
    Ok(value)
}

/// Reads a timestamp: an RFC 3339 string, or unix seconds, or unix milliseconds (numbers from
/// 10^11 up are milliseconds: as seconds they would be past the year 5000).
pub fn parse_timestamp(text: &str, now_ms: i64) -> Result<i64, RecordError> {
    let invalid = || {
        RecordError::new(
            "invalid_timestamp",
            "timestamp must be RFC 3339 text or unix seconds or milliseconds",
        )
    };
    let ms = if text.starts_with('"') {
        let inner: String = serde_json::from_str(text).map_err(|_| invalid())?;
        chrono::DateTime::parse_from_rfc3339(&inner)
            .map_err(|_| invalid())?
            .timestamp_millis()
    } else {
        let n: i64 = text.parse().map_err(|_| invalid())?;
        // unsigned_abs: i64::MIN has no positive i64 (abs() would overflow).
        if n.unsigned_abs() >= 100_000_000_000 {
            n
        } else {
            n.checked_mul(1_000).ok_or_else(invalid)?
        }
    };
    if ms < now_ms - MAX_PAST_MS || ms > now_ms + MAX_FUTURE_MS {
        return Err(RecordError::new(
            "timestamp_out_of_range",
            "timestamp must be within the last 35 days and at most 5 minutes ahead",
        ));
    }
    Ok(ms)
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_764_000_000_000;

    #[test]
    fn integer_metrics_take_exact_integers_in_any_notation() {
        for (text, want) in [
            ("1", 1),
            ("1000", 1000),
            ("1e3", 1000),
            ("1000.0", 1000),
            ("2.5E1", 25),
            ("1000000000", 1_000_000_000),
        ] {
            assert_eq!(
                parse_quantity(text, Metric::Impressions),
                Ok(want),
                "{text}"
            );
        }
    }

    #[test]
    fn data_transfer_is_exact_bytes() {
        for (text, want) in [
            ("35.2", 35_200_000_000),
            ("0.000000001", 1),
            ("1", BYTES_PER_GB),
            ("1e-9", 1),
            ("10000", 10_000 * BYTES_PER_GB),
        ] {
            assert_eq!(
                parse_quantity(text, Metric::DataTransfer),
                Ok(want),
                "{text}"
            );
        }
    }

    #[test]
    fn bad_quantities_are_refused_with_their_cause() {
        for (text, metric, code) in [
            ("0", Metric::Impressions, "invalid_quantity"),
            ("0.0", Metric::Impressions, "invalid_quantity"),
            ("-1", Metric::Impressions, "invalid_quantity"),
            ("1.5", Metric::Impressions, "invalid_quantity"),
            ("1e-1", Metric::ApiCalls, "invalid_quantity"),
            ("\"10\"", Metric::Impressions, "invalid_quantity"),
            ("null", Metric::Impressions, "invalid_quantity"),
            ("true", Metric::Impressions, "invalid_quantity"),
            ("[1]", Metric::Impressions, "invalid_quantity"),
            ("0.0000000001", Metric::DataTransfer, "invalid_quantity"),
            ("1000000001", Metric::Impressions, "quantity_too_large"),
            (
                "10000.000000001",
                Metric::DataTransfer,
                "quantity_too_large",
            ),
            ("1e400", Metric::Impressions, "quantity_too_large"),
            (
                "123456789012345678901234567890",
                Metric::Impressions,
                "quantity_too_large",
            ),
            (
                "1e99999999999999999999",
                Metric::Impressions,
                "invalid_quantity",
            ),
            // Hostile exponents at the ends of i64: refused, never an overflow.
            (
                "1e9223372036854775807",
                Metric::Impressions,
                "quantity_too_large",
            ),
            (
                "1e9223372036854775807",
                Metric::DataTransfer,
                "quantity_too_large",
            ),
            (
                "1e-9223372036854775808",
                Metric::Impressions,
                "invalid_quantity",
            ),
            (
                "1.5e-9223372036854775808",
                Metric::DataTransfer,
                "invalid_quantity",
            ),
            (
                "0e9223372036854775807",
                Metric::Impressions,
                "invalid_quantity",
            ),
        ] {
            assert_eq!(
                parse_quantity(text, metric).map_err(|e| e.code),
                Err(code),
                "{text}"
            );
        }
    }

    #[test]
    fn timestamps_in_three_forms() {
        let secs = NOW / 1000;
        assert_eq!(parse_timestamp(&secs.to_string(), NOW), Ok(NOW));
        assert_eq!(parse_timestamp(&NOW.to_string(), NOW), Ok(NOW));
        assert_eq!(parse_timestamp("\"2025-11-24T16:00:00Z\"", NOW), Ok(NOW));
        assert_eq!(
            parse_timestamp("\"2025-11-24T17:00:00+01:00\"", NOW),
            Ok(NOW)
        );
    }

    #[test]
    fn timestamps_outside_the_window_or_malformed_are_refused() {
        let day = 86_400_000;
        assert_eq!(
            parse_timestamp(&(NOW - 36 * day).to_string(), NOW)
                .unwrap_err()
                .code,
            "timestamp_out_of_range"
        );
        assert_eq!(
            parse_timestamp(&(NOW + 6 * 60_000).to_string(), NOW)
                .unwrap_err()
                .code,
            "timestamp_out_of_range"
        );
        assert!(parse_timestamp(&(NOW - 34 * day).to_string(), NOW).is_ok());
        for hostile in [
            "-9223372036854775808",
            "9223372036854775807",
            "-99999999999",
        ] {
            assert_eq!(
                parse_timestamp(hostile, NOW).unwrap_err().code,
                "timestamp_out_of_range",
                "{hostile}"
            );
        }
        for bad in [
            "\"yesterday\"",
            "\"2025-11-24\"",
            "1.5",
            "{}",
            "true",
            "-9223372036854775809",
        ] {
            assert_eq!(
                parse_timestamp(bad, NOW).unwrap_err().code,
                "invalid_timestamp",
                "{bad}"
            );
        }
    }

    #[test]
    fn the_guides_track_body_validates() {
        let body = br#"{"api_key":"rsk_abc123","metric_type":"impressions","quantity":1000,"metadata":{"platform":"iOS","sdk_version":"1.0.0"}}"#;
        let wire = parse_track(body).unwrap();
        let record = validate(&wire, NOW).unwrap();
        assert_eq!(record.metric, Metric::Impressions);
        assert_eq!(record.quantity, 1000);
        assert_eq!(record.timestamp_ms, NOW);
        assert_eq!(
            record.metadata.as_deref(),
            Some(r#"{"platform":"iOS","sdk_version":"1.0.0"}"#)
        );
    }

    #[test]
    fn record_fields_are_checked() {
        let long_id = "x".repeat(129);
        for (body, code) in [
            (
                r#"{"metric_type":"clicks","quantity":1}"#.to_owned(),
                "invalid_metric",
            ),
            (
                format!(r#"{{"metric_type":"api_calls","quantity":1,"event_id":"{long_id}"}}"#),
                "invalid_event_id",
            ),
            (
                r#"{"metric_type":"api_calls","quantity":1,"event_id":""}"#.to_owned(),
                "invalid_event_id",
            ),
            (
                r#"{"metric_type":"api_calls","quantity":1,"event_id":"a\u0000b"}"#.to_owned(),
                "invalid_event_id",
            ),
            (
                r#"{"metric_type":"api_calls","quantity":1,"metadata":[1]}"#.to_owned(),
                "invalid_metadata",
            ),
            (
                format!(
                    r#"{{"metric_type":"api_calls","quantity":1,"metadata":{{"k":"{}"}}}}"#,
                    "v".repeat(5000)
                ),
                "metadata_too_large",
            ),
        ] {
            let wire = parse_track(body.as_bytes()).unwrap();
            assert_eq!(validate(&wire, NOW).unwrap_err().code, code, "{body}");
        }
    }

    #[test]
    fn syntax_and_shape_errors_are_told_apart() {
        assert!(matches!(parse_track(b"{"), Err(ApiError::InvalidJson(_))));
        assert!(matches!(
            parse_track(br#"{"metric_type":"impressions","quantity":1} x"#),
            Err(ApiError::InvalidJson(_))
        ));
        assert!(matches!(
            parse_track(b"{\"metric_type\":1,\"quantity\":1}"),
            Err(ApiError::InvalidField(_))
        ));
        assert!(matches!(
            parse_track(b"{\"quantity\":1}"),
            Err(ApiError::InvalidField(_))
        ));
        assert!(matches!(
            parse_track(b"\xff"),
            Err(ApiError::InvalidJson(_))
        ));
    }
}
