//! The SDK ingest endpoints, `POST /api/usage/track` (and `/usage/track`) and
//! `POST /api/usage/batch`. Each reads top to bottom: decode → key → validate → dedup → send,
//! and answers only after the sink says the records are durable.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use apex_core::model::UsageRecord;
use apex_pipeline::sink::{Ack, SinkError};
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderMap};
use hyper::{Request, Response, StatusCode};
use serde::Serialize;
use serde_json::value::RawValue;

use crate::auth;
use crate::body::read_body;
use crate::dedup::{Claim, PendingIds, Ticket};
use crate::error::{ApiError, DEDUP_FULL_MESSAGE, RecordError};
use crate::keycache::{ActiveCustomer, KeyVerdict};
use crate::records::{self, ValidRecord, WireBatch, WireRecord};
use crate::response::{self, Body};
use crate::state::AppState;
use crate::{names, telemetry};

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// The body formats the API reads.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyKind {
    /// `application/json`.
    Json,
    /// `application/x-ndjson` (batch only).
    NdJson,
}

/// JSON is the default (the guide's SDK sends it; a missing type is read as JSON); anything
/// else named explicitly is refused.
pub(crate) fn body_kind(headers: &HeaderMap) -> Result<BodyKind, ApiError> {
    let Some(value) = headers.get(CONTENT_TYPE) else {
        return Ok(BodyKind::Json);
    };
    let value = value
        .to_str()
        .map_err(|_| ApiError::UnsupportedContentType)?;
    let essence = value
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match essence.as_str() {
        "application/json" => Ok(BodyKind::Json),
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => Ok(BodyKind::NdJson),
        _ => Err(ApiError::UnsupportedContentType),
    }
}

/// The key in `Authorization: Bearer ...`, if the header is there.
fn bearer_key(headers: &HeaderMap) -> Result<Option<&str>, ApiError> {
    auth::bearer(headers).map_err(|_| ApiError::InvalidAuthorization)
}

fn choose_key<'a>(header: Option<&'a str>, body: Option<&'a str>) -> Result<&'a str, ApiError> {
    match (header, body) {
        (Some(h), Some(b)) if h != b => Err(ApiError::ConflictingApiKeys),
        (Some(key), _) | (None, Some(key)) => Ok(key),
        (None, None) => Err(ApiError::MissingApiKey),
    }
}

async fn authenticate(state: &AppState, key: &str) -> Result<ActiveCustomer, ApiError> {
    match state.keys.check(key).await {
        KeyVerdict::Active(customer) => Ok(customer),
        KeyVerdict::Suspended => Err(ApiError::AccountSuspended),
        KeyVerdict::Unknown => Err(ApiError::InvalidApiKey),
        KeyVerdict::Unavailable => Err(ApiError::Unavailable(
            "the API key cannot be checked right now",
        )),
    }
}

/// Takes `records` tokens from the customer's rate limit before anything is claimed or
/// logged: a refused request leaves no trace but the metric.
fn rate_limit(state: &AppState, customer: &ActiveCustomer, records: usize) -> Result<(), ApiError> {
    state
        .rate_limits
        .check(&customer.id, &customer.limit, records)
        .map_err(ApiError::RateLimited)
}

fn into_record(customer_id: &Arc<str>, valid: ValidRecord, now: i64) -> UsageRecord {
    UsageRecord {
        customer_id: customer_id.clone(),
        metric: valid.metric,
        quantity: valid.quantity,
        event_id: valid.event_id,
        timestamp_ms: valid.timestamp_ms,
        received_ms: now,
        metadata: valid.metadata,
    }
}

fn count_records(outcome: &'static str, cause: &'static str, n: usize) {
    if n > 0 {
        telemetry::count(
            names::RECORDS_TOTAL,
            [("outcome", outcome), ("cause", cause)],
            n as u64,
        );
    }
}

/// Ids claimed by a request whose records the sink took. If the request is dropped before
/// its acknowledgement arrives (the client went away), the acknowledgement is still awaited
/// in the background, so the ids end up committed or released, never pending forever. Where
/// no task can be spawned (no runtime) the ids are released by their guard.
struct ClaimedIds {
    ids: Option<PendingIds>,
    ack: Option<Ack>,
}

fn resolve(ids: PendingIds, outcome: &Result<(), SinkError>) {
    if outcome.is_ok() {
        ids.commit();
    } else {
        ids.release();
    }
}

impl Drop for ClaimedIds {
    fn drop(&mut self) {
        let (Some(ack), Some(ids)) = (self.ack.take(), self.ids.take()) else {
            return;
        };
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            // A runtime shutting down drops the task unrun, and with it the guard: released.
            runtime.spawn(async move {
                let outcome = ack.await.unwrap_or(Err(SinkError::Unavailable));
                resolve(ids, &outcome);
            });
        }
    }
}

/// Hands records to the sink and waits until they are durable; then commits the request's
/// claimed ids, or releases them if the records were refused.
async fn send(
    state: &AppState,
    records: Vec<UsageRecord>,
    ids: PendingIds,
) -> Result<(), ApiError> {
    let ack = match state.sink.submit(records) {
        Ok(ack) => ack,
        Err(e) => {
            ids.release();
            return Err(sink_error(e));
        }
    };
    let mut claimed = ClaimedIds {
        ids: Some(ids),
        ack: Some(ack),
    };
    let outcome = match claimed.ack.as_mut() {
        // A dropped acknowledgement: the log writer stopped before writing the records.
        Some(ack) => ack.await.unwrap_or(Err(SinkError::Unavailable)),
        None => Err(SinkError::Unavailable),
    };
    claimed.ack = None;
    if let Some(ids) = claimed.ids.take() {
        resolve(ids, &outcome);
    }
    outcome.map_err(sink_error)
}

fn sink_error(e: SinkError) -> ApiError {
    match e {
        SinkError::Full => {
            metrics::counter!(names::QUEUE_FULL_TOTAL).increment(1);
            ApiError::QueueFull
        }
        SinkError::Unavailable => ApiError::Unavailable("the records could not be stored"),
        SinkError::Closed => ApiError::Unavailable("the server is shutting down"),
    }
}

#[derive(Serialize)]
struct TrackAnswer<'a> {
    success: bool,
    recorded: Recorded<'a>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    duplicate: bool,
}

#[derive(Serialize)]
struct Recorded<'a> {
    customer_id: &'a str,
    metric_type: &'static str,
    quantity: &'a RawValue,
}

fn track_answer(customer_id: &str, valid: &ValidRecord, duplicate: bool) -> Response<Body> {
    // The quantity is echoed exactly as sent; it was parsed from valid JSON number text.
    let quantity: &RawValue = serde_json::from_str(&valid.quantity_text)
        .unwrap_or_else(|_| serde_json::from_str("null").expect("null is JSON"));
    response::json(
        StatusCode::OK,
        &TrackAnswer {
            success: true,
            recorded: Recorded {
                customer_id,
                metric_type: valid.metric.as_str(),
                quantity,
            },
            duplicate,
        },
    )
}

/// `POST /api/usage/track`: one record, the guide's body and answer.
pub async fn track(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    if body_kind(&parts.headers)? != BodyKind::Json {
        return Err(ApiError::UnsupportedContentType);
    }
    let header_key = bearer_key(&parts.headers)?;
    let bytes = read_body(
        &parts.headers,
        body,
        state.limits.track_max_body_bytes,
        state.limits.body_read_timeout,
    )
    .await?;
    let wire = records::parse_track(&bytes)?;
    let customer = authenticate(state, choose_key(header_key, wire.api_key.as_deref())?).await?;
    rate_limit(state, &customer, 1)?;
    let customer = customer.id;
    let now = now_ms();
    let valid = records::validate(&wire, now).map_err(|e| {
        count_records("rejected", e.code, 1);
        ApiError::InvalidRecord(e)
    })?;
    // Owned by the guard from the claim on: released if the request ends before the sink.
    let mut ids = PendingIds::new(state.dedup.clone());
    if let Some(event_id) = &valid.event_id {
        match state.dedup.claim(state.dedup.customer(&customer), event_id) {
            Claim::New(ticket) => ids.push(ticket),
            Claim::Duplicate => {
                count_records("duplicate", "event_id", 1);
                return Ok(track_answer(&customer, &valid, true));
            }
            Claim::InFlight(_) => return Err(ApiError::DuplicateInFlight),
            Claim::Full => {
                metrics::counter!(names::DEDUP_FULL_TOTAL).increment(1);
                count_records("rejected", "dedup_full", 1);
                return Err(ApiError::DedupFull);
            }
        }
    }
    let answer = track_answer(&customer, &valid, false);
    send(state, vec![into_record(&customer, valid, now)], ids).await?;
    count_records("accepted", "ok", 1);
    Ok(answer)
}

#[derive(Serialize)]
struct BatchAnswer {
    success: bool,
    accepted: usize,
    duplicates: usize,
    rejected: usize,
    errors: Vec<IndexedError>,
}

/// A rejected record of a batch.
#[derive(Serialize)]
pub struct IndexedError {
    index: usize,
    code: &'static str,
    message: String,
}

/// The per-record errors of a batch, as the answer lists them.
pub fn indexed_errors(errors: &[(usize, RecordError)]) -> Vec<IndexedError> {
    errors
        .iter()
        .map(|(index, e)| IndexedError {
            index: *index,
            code: e.code,
            message: e.message.clone(),
        })
        .collect()
}

/// The refusal of a batch of which no record was taken. A 400 is permanent to ordinary
/// clients, so when some records only lacked room in the dedup table (`full` of them), the
/// whole batch is answered 503 `dedup_full` instead, and when some were only being recorded
/// by another request (`in_flight` of them), 409 `duplicate_in_flight`, as `track` answers
/// one such record: either way its retry then lists any invalid records by index.
fn nothing_taken(errors: Vec<(usize, RecordError)>, full: usize, in_flight: usize) -> ApiError {
    if full > 0 {
        ApiError::DedupFull
    } else if in_flight > 0 {
        ApiError::DuplicateInFlight
    } else {
        ApiError::AllRejected(errors)
    }
}

fn record_parse_error(e: &serde_json::Error) -> RecordError {
    match records::json_error(e) {
        ApiError::InvalidField(m) => RecordError::new("invalid_field", m),
        _ => RecordError::new("invalid_json", e.to_string()),
    }
}

/// `POST /api/usage/batch`: many records with one key, as JSON or NDJSON. Valid records are
/// made durable together; invalid ones are reported by index.
pub async fn batch(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let (parts, body) = request.into_parts();
    let kind = body_kind(&parts.headers)?;
    let header_key = bearer_key(&parts.headers)?;
    let limits = &state.limits;
    let bytes = read_body(
        &parts.headers,
        body,
        limits.batch_max_body_bytes,
        limits.body_read_timeout,
    )
    .await?;

    // Decode: the envelope (JSON) or the lines (NDJSON), each record still raw.
    let envelope: Option<WireBatch<'_>>;
    let items: Vec<&[u8]> = match kind {
        BodyKind::Json => {
            envelope = Some(serde_json::from_slice(&bytes).map_err(|e| records::json_error(&e))?);
            envelope
                .as_ref()
                .map(|b| b.records.iter().map(|r| r.get().as_bytes()).collect())
                .unwrap_or_default()
        }
        BodyKind::NdJson => {
            envelope = None;
            bytes
                .split(|&b| b == b'\n')
                .map(|line| line.strip_suffix(b"\r").unwrap_or(line))
                .filter(|line| !line.iter().all(u8::is_ascii_whitespace))
                .collect()
        }
    };
    if items.is_empty() {
        return Err(ApiError::EmptyBatch);
    }
    if items.len() > limits.batch_max_records {
        return Err(ApiError::TooLarge {
            code: "too_many_records",
            message: format!("a batch holds at most {} records", limits.batch_max_records),
        });
    }
    let body_key = envelope.as_ref().and_then(|e| e.api_key.as_deref());
    let customer = authenticate(state, choose_key(header_key, body_key)?).await?;
    // Every record of the body costs a token, valid or not: a flood of invalid records is
    // work too, and the charge is known before any is parsed.
    rate_limit(state, &customer, items.len())?;
    let customer = customer.id;
    let dedup_customer = state.dedup.customer(&customer);

    let now = now_ms();
    let mut accepted = Vec::with_capacity(items.len());
    let mut errors: Vec<(usize, RecordError)> = Vec::new();
    let mut duplicates = 0usize;
    let mut full = 0usize;
    let mut in_flight = 0usize;
    // Owned by the guard from the claim on: released if the request ends before the sink.
    let mut ids = PendingIds::new(state.dedup.clone());
    // The ids of this request, exactly: the tickets it holds, and those of other requests
    // it found in flight. An id met again in the same request is a duplicate.
    let mut seen_here: HashSet<Ticket> = HashSet::with_capacity(items.len());
    for (index, raw) in items.iter().enumerate() {
        let wire: WireRecord<'_> = match serde_json::from_slice(raw) {
            Ok(wire) => wire,
            Err(e) => {
                errors.push((index, record_parse_error(&e)));
                continue;
            }
        };
        if wire
            .api_key
            .as_deref()
            .is_some_and(|k| Some(k) != body_key.or(header_key))
        {
            errors.push((
                index,
                RecordError::new(
                    "conflicting_api_keys",
                    "a record names a different api_key than the batch",
                ),
            ));
            continue;
        }
        let valid = match records::validate(&wire, now) {
            Ok(valid) => valid,
            Err(e) => {
                errors.push((index, e));
                continue;
            }
        };
        if let Some(event_id) = &valid.event_id {
            match state.dedup.claim(dedup_customer, event_id) {
                Claim::New(ticket) => {
                    seen_here.insert(ticket);
                    ids.push(ticket);
                }
                Claim::Duplicate => {
                    duplicates += 1;
                    continue;
                }
                Claim::InFlight(holder) if !seen_here.insert(holder) => {
                    duplicates += 1;
                    continue;
                }
                Claim::InFlight(_) => {
                    in_flight += 1;
                    errors.push((
                        index,
                        RecordError::new(
                            "duplicate_in_flight",
                            "a request with this event_id is still being recorded; retry shortly",
                        ),
                    ));
                    continue;
                }
                Claim::Full => {
                    full += 1;
                    errors.push((index, RecordError::new("dedup_full", DEDUP_FULL_MESSAGE)));
                    continue;
                }
            }
        }
        accepted.push(into_record(&customer, valid, now));
    }
    for (_, e) in &errors {
        count_records("rejected", e.code, 1);
    }
    count_records("duplicate", "event_id", duplicates);
    if full > 0 {
        metrics::counter!(names::DEDUP_FULL_TOTAL).increment(full as u64);
    }
    if accepted.is_empty() && duplicates == 0 {
        return Err(nothing_taken(errors, full, in_flight));
    }
    let accepted_count = accepted.len();
    if !accepted.is_empty() {
        send(state, accepted, ids).await?;
    }
    count_records("accepted", "ok", accepted_count);
    Ok(response::json(
        StatusCode::OK,
        &BatchAnswer {
            success: true,
            accepted: accepted_count,
            duplicates,
            rejected: errors.len(),
            errors: indexed_errors(&errors),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dedup::Dedup;

    fn claimed(dedup: &Arc<Dedup>, id: &str) -> PendingIds {
        let mut ids = PendingIds::new(dedup.clone());
        match dedup.claim(dedup.customer("cus"), id) {
            Claim::New(ticket) => ids.push(ticket),
            other => panic!("{other:?}"),
        }
        ids
    }

    #[test]
    fn a_dropped_request_still_resolves_its_ids() {
        let dedup = Arc::new(Dedup::new(
            std::time::Duration::from_secs(3600),
            1 << 20,
            1_000,
        ));
        let cus = dedup.customer("cus");
        // Outside a runtime nothing can wait for the answer: the guard releases the ids.
        let (_answer, ack) = tokio::sync::oneshot::channel();
        drop(ClaimedIds {
            ids: Some(claimed(&dedup, "no-runtime")),
            ack: Some(ack),
        });
        assert!(matches!(dedup.claim(cus, "no-runtime"), Claim::New(_)));
        // In a runtime the answer is awaited in the background and commits them.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async {
            let (answer, ack) = tokio::sync::oneshot::channel();
            drop(ClaimedIds {
                ids: Some(claimed(&dedup, "client-gone")),
                ack: Some(ack),
            });
            assert!(matches!(
                dedup.claim(cus, "client-gone"),
                Claim::InFlight(_)
            ));
            answer.send(Ok(())).unwrap();
            for _ in 0..10 {
                tokio::task::yield_now().await;
            }
            assert_eq!(dedup.claim(cus, "client-gone"), Claim::Duplicate);
        });
    }

    #[test]
    fn a_batch_refused_only_for_room_or_records_in_flight_is_retryable() {
        let invalid = (0, RecordError::new("invalid_quantity", "negative"));
        let full = (1, RecordError::new("dedup_full", DEDUP_FULL_MESSAGE));
        // All refused for room, or some invalid as well: 503, never a permanent 400.
        for errors in [vec![full.clone()], vec![invalid.clone(), full]] {
            let answer = nothing_taken(errors, 1, 0);
            assert_eq!(answer, ApiError::DedupFull);
            let (status, code, _) = answer.status();
            assert_eq!((status.as_u16(), code), (503, "dedup_full"));
        }
        // Records only in flight elsewhere (with or without invalid ones): 409, retryable,
        // as `track` answers one such record.
        let in_flight = (1, RecordError::new("duplicate_in_flight", "retry shortly"));
        for errors in [vec![in_flight.clone()], vec![invalid.clone(), in_flight]] {
            let answer = nothing_taken(errors, 0, 1);
            assert_eq!(answer, ApiError::DuplicateInFlight);
            let (status, code, _) = answer.status();
            assert_eq!((status.as_u16(), code), (409, "duplicate_in_flight"));
        }
        // Only invalid records: the 400 with the errors by index, as before.
        assert_eq!(
            nothing_taken(vec![invalid.clone()], 0, 0),
            ApiError::AllRejected(vec![invalid])
        );
    }
}
