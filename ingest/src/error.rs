//! The edge's error type: every way a request can fail, and (in [`ApiError::status`]) the one
//! mapping from failure to HTTP status and stable error code.

use hyper::StatusCode;

/// A record that cannot be accepted: a stable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError {
    /// Machine-readable cause, e.g. `invalid_quantity`.
    pub code: &'static str,
    /// What was wrong, for the developer integrating the SDK.
    pub message: String,
}

impl RecordError {
    /// A record error with `code` and `message`.
    pub fn new(code: &'static str, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }
}

/// The message of a `dedup_full` refusal, of a request or of one record of a batch.
pub const DEDUP_FULL_MESSAGE: &str = "the duplicate check has no room to hold this event_id \
     right now; nothing was recorded: retry after the Retry-After delay";

/// Why a request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiError {
    /// The body is not JSON (syntax, bad UTF-8, trailing garbage).
    InvalidJson(String),
    /// A field is missing or has the wrong type.
    InvalidField(String),
    /// The record itself is invalid (metric, quantity, timestamp, event id, metadata).
    InvalidRecord(RecordError),
    /// The body's content type is not one this endpoint reads.
    UnsupportedContentType,
    /// A batch without records.
    EmptyBatch,
    /// Every record of a batch was rejected; the errors say why, by index.
    AllRejected(Vec<(usize, RecordError)>),
    /// The key in the body and the one in `Authorization` differ.
    ConflictingApiKeys,
    /// No API key in the body or the `Authorization` header.
    MissingApiKey,
    /// The `Authorization` header is not `Bearer <key>`.
    InvalidAuthorization,
    /// The key is unknown or revoked.
    InvalidApiKey,
    /// The key's customer is suspended for non-payment.
    AccountSuspended,
    /// A request with the same event id is still being made durable.
    DuplicateInFlight,
    /// The dedup table has no room to hold the event id pending right now
    /// ([`crate::dedup::Claim::Full`]): 503, retry after `Retry-After`.
    DedupFull,
    /// The body did not arrive in time.
    BodyTimeout,
    /// The body, its decompressed form or its record count is over a limit.
    TooLarge {
        /// `body_too_large`, `decompressed_too_large` or `too_many_records`.
        code: &'static str,
        /// Which limit.
        message: String,
    },
    /// `Content-Encoding` is not gzip, zstd or identity.
    UnsupportedEncoding(String),
    /// The compressed body cannot be decompressed.
    InvalidEncoding(String),
    /// The customer is over its rate limit ([`crate::ratelimit`]): 429 with `Retry-After`
    /// and the RateLimit headers, or 413 for a batch larger than the burst.
    RateLimited(crate::ratelimit::Refusal),
    /// The pipeline queue is full.
    QueueFull,
    /// The records could not be made durable, or a key could not be checked, right now.
    Unavailable(&'static str),
    /// No such endpoint.
    NotFound,
    /// The endpoint exists but not for this method.
    MethodNotAllowed,
    /// A dashboard token was missing or refused.
    Unauthorized(crate::auth::AuthError),
    /// The admin token is missing or wrong.
    AdminUnauthorized,
    /// A query parameter or field has a bad value.
    InvalidParameter {
        /// Stable code, e.g. `invalid_days`.
        code: &'static str,
        /// What is wrong.
        message: String,
    },
    /// A named thing (a customer) does not exist.
    UnknownResource(String),
    /// A fault of ours that retrying will not fix (a misconfigured price); logged.
    Internal(&'static str),
}

impl ApiError {
    /// HTTP status, error code and message: the single mapping of the API.
    pub fn status(&self) -> (StatusCode, &'static str, String) {
        use ApiError::*;
        match self {
            InvalidJson(m) => (StatusCode::BAD_REQUEST, "invalid_json", m.clone()),
            InvalidField(m) => (StatusCode::BAD_REQUEST, "invalid_field", m.clone()),
            InvalidRecord(e) => (StatusCode::BAD_REQUEST, e.code, e.message.clone()),
            UnsupportedContentType => (
                StatusCode::BAD_REQUEST,
                "unsupported_content_type",
                "send Content-Type: application/json (or application/x-ndjson to /api/usage/batch)"
                    .into(),
            ),
            EmptyBatch => (
                StatusCode::BAD_REQUEST,
                "empty_batch",
                "the batch has no records".into(),
            ),
            AllRejected(errors) => (
                StatusCode::BAD_REQUEST,
                "all_records_rejected",
                format!("all {} records were rejected; see errors", errors.len()),
            ),
            ConflictingApiKeys => (
                StatusCode::BAD_REQUEST,
                "conflicting_api_keys",
                "the api_key field and the Authorization header name different keys".into(),
            ),
            MissingApiKey => (
                StatusCode::UNAUTHORIZED,
                "missing_api_key",
                "send api_key in the body or Authorization: Bearer rsk_...".into(),
            ),
            InvalidAuthorization => (
                StatusCode::UNAUTHORIZED,
                "invalid_authorization",
                "the Authorization header must be Bearer rsk_...".into(),
            ),
            InvalidApiKey => (
                StatusCode::UNAUTHORIZED,
                "invalid_api_key",
                "the API key is unknown or revoked".into(),
            ),
            AccountSuspended => (
                StatusCode::FORBIDDEN,
                "account_suspended",
                "the account is suspended for non-payment; paying the open invoice restores it"
                    .into(),
            ),
            DuplicateInFlight => (
                StatusCode::CONFLICT,
                "duplicate_in_flight",
                "a request with this event_id is still being recorded; retry shortly".into(),
            ),
            DedupFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "dedup_full",
                DEDUP_FULL_MESSAGE.into(),
            ),
            BodyTimeout => (
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                "the request body did not arrive in time".into(),
            ),
            TooLarge { code, message } => (StatusCode::PAYLOAD_TOO_LARGE, code, message.clone()),
            UnsupportedEncoding(m) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_encoding",
                m.clone(),
            ),
            InvalidEncoding(m) => (StatusCode::BAD_REQUEST, "invalid_encoding", m.clone()),
            RateLimited(crate::ratelimit::Refusal::Later {
                burst,
                window_secs,
                retry_after,
                ..
            }) => (
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "over this customer's rate limit (a burst of {burst} records, refilled in \
                     {window_secs} s); nothing was recorded: retry after {retry_after} s"
                ),
            ),
            RateLimited(crate::ratelimit::Refusal::OverBurst { records, burst, .. }) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "batch_over_burst",
                format!(
                    "a batch of {records} records is larger than this customer's rate-limit \
                     burst of {burst} and can never pass; nothing was recorded: split it"
                ),
            ),
            QueueFull => (
                StatusCode::SERVICE_UNAVAILABLE,
                "queue_full",
                "the server is at capacity; retry after the Retry-After delay".into(),
            ),
            Unavailable(what) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                format!("{what}; retry after the Retry-After delay"),
            ),
            NotFound => (
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
            ),
            MethodNotAllowed => (
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint does not answer this method".into(),
            ),
            Unauthorized(e) => {
                let (code, message) = e.describe();
                (StatusCode::UNAUTHORIZED, code, message)
            }
            AdminUnauthorized => (
                StatusCode::UNAUTHORIZED,
                "invalid_admin_token",
                "send Authorization: Bearer <APEX_ADMIN_TOKEN>".into(),
            ),
            InvalidParameter { code, message } => (StatusCode::BAD_REQUEST, code, message.clone()),
            UnknownResource(what) => (
                StatusCode::NOT_FOUND,
                "not_found",
                format!("{what} not found"),
            ),
            Internal(message) => (
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal_error",
                (*message).into(),
            ),
        }
    }
}
