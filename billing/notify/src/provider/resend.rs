//! Resend's HTTP API: `POST {RESEND_BASE_URL}/emails` with `Authorization: Bearer re_...`,
//! `Idempotency-Key` (Resend keeps a key 24 hours: the same key again answers the first
//! email's id and sends nothing) and a JSON body:
//!
//! ```json
//! {"from": "...", "to": ["..."], "subject": "...", "html": "...", "text": "...",
//!  "headers": {"List-Unsubscribe": "<https://...>"},
//!  "tags": [{"name": "email_type", "value": "payment_failed"}]}
//! ```
//!
//! (`headers` only when there is a `List-Unsubscribe`.) A 200 answers `{"id": "..."}`.
//!
//! Our own small client rather than the `resend-rs` crate: that pulls in reqwest and a second
//! HTTP stack, while we already have hyper with rustls (as `apex-stripe`), and we need what
//! its typed API hides: the status, `Retry-After`, Resend's error `name`, and our own
//! idempotency key and timeout on every request.
//!
//! Answers: 2xx is accepted. 429 is [`SendError::Transient`] with `rate_limited` and the
//! `Retry-After` (seconds). 409 `concurrent_idempotent_requests` (the first request with
//! this key is still running), 5xx, a timeout and no answer are transient. 401 and 403 (the
//! key rejected, a domain not allowed) are [`SendError::Unavailable`]: about our account, they
//! stop the queue instead of giving up every email. Any other 4xx (400, 422, and 409
//! `invalid_idempotent_request`: the key was used for a different email) is
//! [`SendError::Permanent`] with Resend's message.
//!
//! Requests go through a `governor` limiter at `RESEND_RATE` a second (one at a time, no
//! burst), so a batch does not run into Resend's per-team limit in the first place.

use std::num::NonZeroU32;
use std::time::Duration;

use bytes::Bytes;
use governor::clock::DefaultClock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::message::{Accepted, EmailProvider, OutgoingEmail, SendError, SendFuture};
use crate::provider::check_idempotency_key;

/// Timeout of one request, unless set otherwise: Resend answers in well under a second, and
/// a hung request must not hold a batch (the retry carries the same idempotency key).
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Where Resend is, the key, and how fast to go. `Debug` prints the key as `***`.
#[derive(Clone, PartialEq)]
pub struct ResendSettings {
    /// `RESEND_API_KEY` (`re_...`, secret).
    pub api_key: String,
    /// `RESEND_BASE_URL` without a trailing `/` (`https://api.resend.com`).
    pub base_url: String,
    /// `RESEND_RATE`: requests a second at most.
    pub requests_per_second: f64,
    /// Timeout of one request, connection included ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

impl Default for ResendSettings {
    /// Resend's production API at its default rate; the key is empty (set it).
    fn default() -> Self {
        Self {
            api_key: String::new(),
            base_url: crate::config::DEFAULT_RESEND_BASE_URL.to_owned(),
            requests_per_second: crate::config::DEFAULT_RESEND_RATE,
            timeout: DEFAULT_TIMEOUT,
        }
    }
}

impl std::fmt::Debug for ResendSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResendSettings")
            .field("api_key", &"***")
            .field("base_url", &self.base_url)
            .field("requests_per_second", &self.requests_per_second)
            .field("timeout", &self.timeout)
            .finish()
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, DefaultClock, NoOpMiddleware>;

/// Sends through Resend's API. Share one per process: the rate limit is per instance.
pub struct ResendProvider {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    endpoint: String,
    authorization: HeaderValue,
    timeout: Duration,
    limiter: Limiter,
}

impl std::fmt::Debug for ResendProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResendProvider")
            .field("endpoint", &self.endpoint)
            .field("authorization", &"***")
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

impl ResendProvider {
    /// A provider for `settings`. Errors (never containing the key): the key cannot be a
    /// header value, or the rate is not a positive, finite number.
    pub fn new(settings: &ResendSettings) -> Result<Self, String> {
        let mut authorization = HeaderValue::from_str(&format!("Bearer {}", settings.api_key))
            .map_err(|_| "the API key has characters a header cannot carry".to_owned())?;
        // Kept out of hyper's own debug output and HPACK tables.
        authorization.set_sensitive(true);
        let rate = settings.requests_per_second;
        let period = (rate.is_finite() && rate > 0.0)
            .then(|| Duration::from_secs_f64(1.0 / rate))
            .and_then(Quota::with_period)
            .ok_or_else(|| format!("request rate {rate}: must be a positive number"))?;
        let limiter = RateLimiter::direct(period.allow_burst(NonZeroU32::MIN));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_webpki_roots()
            .https_or_http()
            .enable_http1()
            .build();
        let http = HyperClient::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(30))
            .build(connector);
        Ok(Self {
            http,
            endpoint: format!("{}/emails", settings.base_url.trim_end_matches('/')),
            authorization,
            timeout: settings.timeout,
            limiter,
        })
    }

    async fn post(&self, email: &OutgoingEmail) -> Result<Accepted, SendError> {
        check_idempotency_key(&email.idempotency_key)?;
        let body = request_body(email);
        let request = Request::builder()
            .method(Method::POST)
            .uri(&self.endpoint)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                USER_AGENT,
                concat!("apex-notify/", env!("CARGO_PKG_VERSION")),
            )
            .header("idempotency-key", email.idempotency_key.as_str())
            .body(Full::new(Bytes::from(body.to_string())))
            .map_err(|e| SendError::Permanent {
                reason: format!("cannot build the request to {}: {e}", self.endpoint),
            })?;
        self.limiter.until_ready().await;
        let exchange = async {
            let response = self.http.request(request).await.map_err(|e| {
                transient(
                    format!("cannot reach Resend: {}", transport_reason(&e)),
                    None,
                )
            })?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| transient(format!("Resend's answer was cut: {e}"), None))?
                .to_bytes();
            Ok((status, retry_after, bytes))
        };
        let (status, retry_after, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| {
                transient(
                    format!("Resend did not answer within {:?}", self.timeout),
                    None,
                )
            })??;
        classify(status, retry_after, &bytes)
    }
}

impl EmailProvider for ResendProvider {
    fn name(&self) -> &'static str {
        "resend"
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> SendFuture<'a> {
        Box::pin(self.post(email))
    }
}

/// The JSON of `POST /emails`.
fn request_body(email: &OutgoingEmail) -> serde_json::Value {
    let mut body = serde_json::json!({
        "from": email.from,
        "to": [email.to],
        "subject": email.subject,
        "html": email.html,
        "text": email.text,
        "tags": [{"name": "email_type", "value": email.email_type}],
    });
    if let Some(unsubscribe) = &email.list_unsubscribe {
        body["headers"] = serde_json::json!({ "List-Unsubscribe": unsubscribe });
    }
    body
}

fn transient(reason: String, retry_after: Option<Duration>) -> SendError {
    SendError::Transient {
        reason,
        retry_after,
        rate_limited: false,
    }
}

/// Resend's answer as our outcome (see the module's table).
fn classify(
    status: u16,
    retry_after: Option<Duration>,
    body: &[u8],
) -> Result<Accepted, SendError> {
    if (200..300).contains(&status) {
        #[derive(serde::Deserialize)]
        struct Created {
            id: String,
        }
        // A 2xx without an id: Resend may well have taken it; the retry carries the same
        // key, so trying again cannot make a second email.
        return serde_json::from_slice::<Created>(body)
            .map(|created| Accepted {
                provider_message_id: created.id,
            })
            .map_err(|e| transient(format!("Resend answered {status} without an id: {e}"), None));
    }
    let (name, message) = error_parts(body);
    let reason = format!(
        "Resend answered {status}{}: {message}",
        name.as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default()
    );
    match status {
        429 => Err(SendError::Transient {
            reason,
            retry_after,
            rate_limited: true,
        }),
        409 if name.as_deref() == Some("concurrent_idempotent_requests") => {
            Err(transient(reason, retry_after))
        }
        500.. => Err(transient(reason, retry_after)),
        // The key is missing, rejected or revoked, or the sending domain is not allowed:
        // about our account, not this email.
        401 | 403 => Err(SendError::Unavailable { reason }),
        _ => Err(SendError::Permanent { reason }),
    }
}

/// Resend's `{"statusCode", "name", "message"}`, or the start of whatever else came back.
fn error_parts(body: &[u8]) -> (Option<String>, String) {
    #[derive(serde::Deserialize)]
    struct ErrorBody {
        name: Option<String>,
        message: Option<String>,
    }
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(ErrorBody {
            name,
            message: Some(message),
        }) => (name, message),
        _ => (
            None,
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
        ),
    }
}

/// The innermost cause of a hyper client error ("connection refused" beats "client error").
fn transport_reason(error: &hyper_util::client::legacy::Error) -> String {
    let mut reason = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        reason = cause.to_string();
        source = cause.source();
    }
    reason
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_map_to_outcomes() {
        let ok = classify(200, None, br#"{"id":"49a3999c"}"#).unwrap();
        assert_eq!(ok.provider_message_id, "49a3999c");
        let limited = classify(
            429,
            Some(Duration::from_secs(3)),
            br#"{"statusCode":429,"name":"rate_limit_exceeded","message":"Too many requests"}"#,
        )
        .unwrap_err();
        assert_eq!(
            limited,
            SendError::Transient {
                reason: "Resend answered 429 (rate_limit_exceeded): Too many requests".into(),
                retry_after: Some(Duration::from_secs(3)),
                rate_limited: true,
            }
        );
        assert!(matches!(
            classify(503, None, b"<html>bad gateway</html>"),
            Err(SendError::Transient {
                rate_limited: false,
                ..
            })
        ));
        assert!(matches!(
            classify(
                409,
                None,
                br#"{"name":"concurrent_idempotent_requests","message":"in progress"}"#
            ),
            Err(SendError::Transient { .. })
        ));
        for status in [401, 403] {
            let err = classify(
                status,
                None,
                br#"{"name":"invalid_api_key","message":"no"}"#,
            )
            .unwrap_err();
            assert!(matches!(err, SendError::Unavailable { .. }), "{status}");
        }
        for status in [400, 409, 422] {
            let err = classify(
                status,
                None,
                br#"{"name":"validation_error","message":"bad to"}"#,
            )
            .unwrap_err();
            assert!(
                matches!(&err, SendError::Permanent { reason } if reason.contains("bad to")),
                "{status}: {err:?}"
            );
        }
        assert!(matches!(
            classify(200, None, b"{}"),
            Err(SendError::Transient { .. })
        ));
    }

    #[test]
    fn the_body_has_what_resend_reads() {
        let email = OutgoingEmail {
            idempotency_key: "apex-email-1".into(),
            from: "noreply@apexmediation.com".into(),
            to: "dev@studio.example".into(),
            subject: "Hi".into(),
            html: "<p>Hi</p>".into(),
            text: "Hi".into(),
            list_unsubscribe: None,
            email_type: "welcome".into(),
        };
        let body = request_body(&email);
        assert_eq!(body["to"], serde_json::json!(["dev@studio.example"]));
        assert_eq!(
            body["tags"],
            serde_json::json!([{"name": "email_type", "value": "welcome"}])
        );
        assert!(body.get("headers").is_none());
    }

    #[test]
    fn the_key_stays_out_of_debug() {
        let settings = ResendSettings {
            api_key: "re_verysecret".into(),
            ..ResendSettings::default()
        };
        assert!(!format!("{settings:?}").contains("verysecret"));
        let provider = ResendProvider::new(&settings).unwrap();
        assert!(!format!("{provider:?}").contains("verysecret"));
    }
}
