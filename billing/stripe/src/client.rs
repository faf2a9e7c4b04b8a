//! The Stripe HTTP client: sends requests built by async-stripe's typed builders to
//! `STRIPE_API_BASE` (production: `https://api.stripe.com`; tests: a loopback stand-in, the
//! same code path). It owns what a billing job needs from the transport and async-stripe's
//! own client hides: the status, Stripe's error code and `Retry-After` of every failure, an
//! `Idempotency-Key` on every POST, retries of 5xx, 429 and timeouts with that same key, and
//! one rate limit shared by all requests of a run.
//!
//! Answers are read into our own minimal structs (only the fields billing uses), so a field
//! Stripe adds, or a stand-in omits, never breaks a job. The secret key never reaches a log:
//! it lives in a header value marked sensitive and `Debug` prints it as `***`.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HeaderValue, RETRY_AFTER, USER_AGENT};
use hyper::{Method, Request};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::Client as HyperClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::de::DeserializeOwned;
use stripe_client_core::{RequestBuilder, StripeMethod, StripeRequest};

use crate::names;
use crate::rate::RequestRate;

/// Longest `Retry-After` we honour; a larger value is treated as this (a nightly job should
/// not sleep for an hour on one answer).
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// A Stripe request failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StripeError {
    /// Stripe answered with a non-2xx status.
    #[error("Stripe answered {status}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        /// HTTP status.
        status: u16,
        /// Stripe's `error.code`, when given.
        code: Option<String>,
        /// Stripe's `error.message`, or the body when it is not Stripe's error shape.
        message: String,
        /// Stripe's `error.decline_code` of a declined card (`insufficient_funds`), when
        /// given.
        decline_code: Option<String>,
        /// The `Retry-After` header (seconds), when given.
        retry_after: Option<Duration>,
        /// Stripe's `Stripe-Should-Retry` header, when given: its word on whether the same
        /// request can succeed (it replays a saved result for a reused idempotency key).
        should_retry: Option<bool>,
    },
    /// No answer: connection refused or reset, DNS, TLS.
    #[error("cannot reach Stripe: {0}")]
    Transport(String),
    /// No answer within the request timeout.
    #[error("Stripe did not answer within {0:?}")]
    Timeout(Duration),
    /// A 2xx answer that is not the JSON we expect.
    #[error("unexpected answer from Stripe: {0}")]
    Decode(String),
    /// The client is misconfigured (no key, bad base URL).
    #[error("{0}")]
    Config(String),
}

impl StripeError {
    /// True when the same request (with the same idempotency key) may succeed later: no
    /// answer, a timeout, or what `Stripe-Should-Retry` says; without that header, 429, 409
    /// (Stripe's idempotency lock: the first attempt is still running) and 5xx.
    pub fn is_retryable(&self) -> bool {
        match self {
            StripeError::Transport(_) | StripeError::Timeout(_) => true,
            StripeError::Api {
                should_retry: Some(retry),
                ..
            } => *retry,
            StripeError::Api { status, .. } => *status == 429 || *status == 409 || *status >= 500,
            StripeError::Decode(_) | StripeError::Config(_) => false,
        }
    }

    /// Stripe's error code, if it gave one.
    pub fn code(&self) -> Option<&str> {
        match self {
            StripeError::Api { code, .. } => code.as_deref(),
            _ => None,
        }
    }
}

/// How failed requests are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// Wait before the second attempt; doubled for each further one.
    pub first_backoff: Duration,
    /// The longest wait between attempts.
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// Six attempts over about 15 seconds: enough to ride out a Stripe blip, short enough
    /// that one failing customer does not hold the nightly run for long.
    pub const DEFAULT: Self = Self {
        max_attempts: 6,
        first_backoff: Duration::from_millis(500),
        max_backoff: Duration::from_secs(8),
    };

    /// The waits between attempts, in order (`backon`'s exponential backoff, no jitter: the
    /// requests of one run already go one at a time under the rate limit).
    pub fn delays(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::new()
            .with_min_delay(self.first_backoff)
            .with_max_delay(self.max_backoff)
            .with_factor(2.0)
            .with_max_times(self.max_attempts.saturating_sub(1) as usize)
            .build()
    }
}

/// Settings of a [`StripeClient`].
#[derive(Debug, Clone)]
pub struct ClientSettings {
    /// Requests per second at most (Stripe allows 100 in live mode, 25 in test mode).
    pub requests_per_second: f64,
    /// Requests that may go at once after a quiet spell.
    pub burst: u32,
    /// Timeout of one attempt.
    pub timeout: Duration,
    /// Retries.
    pub retry: RetryPolicy,
}

impl Default for ClientSettings {
    fn default() -> Self {
        Self {
            requests_per_second: 50.0,
            burst: 10,
            timeout: Duration::from_secs(30),
            retry: RetryPolicy::DEFAULT,
        }
    }
}

/// A Stripe API client. Cheap to share by reference; one per job run.
pub struct StripeClient {
    http: HyperClient<HttpsConnector<HttpConnector>, Full<Bytes>>,
    base: String,
    authorization: HeaderValue,
    settings: ClientSettings,
    limiter: RequestRate,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient")
            .field("base", &self.base)
            .field("authorization", &"***")
            .field("settings", &self.settings)
            .finish()
    }
}

/// The `id` of a created or fetched Stripe object.
#[derive(Debug, Clone, serde::Deserialize)]
pub struct StripeObject {
    /// Stripe's id (`cus_...`, `prod_...`, `mtr_...`).
    pub id: String,
}

impl StripeClient {
    /// A client for `base` (e.g. `https://api.stripe.com`) with the secret key `secret_key`.
    pub fn new(
        base: &str,
        secret_key: &str,
        settings: ClientSettings,
    ) -> Result<Self, StripeError> {
        if !(base.starts_with("https://") || base.starts_with("http://")) {
            return Err(StripeError::Config(
                "STRIPE_API_BASE must be an http(s) URL".into(),
            ));
        }
        let limiter =
            RequestRate::new(settings.requests_per_second, settings.burst).ok_or_else(|| {
                StripeError::Config("the Stripe request rate must be above zero".into())
            })?;
        let mut authorization = HeaderValue::from_str(&format!("Bearer {secret_key}"))
            .map_err(|_| StripeError::Config("STRIPE_SECRET_KEY is not a valid header".into()))?;
        authorization.set_sensitive(true);
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
            base: base.trim_end_matches('/').to_owned(),
            authorization,
            settings,
            limiter,
        })
    }

    /// Sends `request` with `idempotency_key` (required on POST: a retry after a lost answer
    /// must not create a second object), retrying what may succeed later, and reads the
    /// answer into `T`.
    pub async fn send<T: DeserializeOwned>(
        &self,
        request: &impl StripeRequest,
        idempotency_key: Option<&str>,
    ) -> Result<T, StripeError> {
        let built = request.build();
        if matches!(built.method, StripeMethod::Post) && idempotency_key.is_none() {
            return Err(StripeError::Config(format!(
                "POST {} without an idempotency key",
                built.path
            )));
        }
        let bytes = self.send_with_retries(&built, idempotency_key).await?;
        serde_json::from_slice(&bytes).map_err(|e| StripeError::Decode(e.to_string()))
    }

    async fn send_with_retries(
        &self,
        request: &RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> Result<Bytes, StripeError> {
        let mut delays = self.settings.retry.delays();
        let mut attempt = 0;
        loop {
            attempt += 1;
            self.limiter.acquire().await;
            let error = match self.attempt(request, idempotency_key).await {
                Ok(bytes) => return Ok(bytes),
                Err(error) => error,
            };
            // The backoff's next wait; none left means the attempts are spent.
            let backoff = match delays.next() {
                Some(backoff) if error.is_retryable() => backoff,
                _ => return Err(error),
            };
            let wait = match &error {
                // Stripe said when (a 429, or a 503 during maintenance): every request of
                // this client waits, not only this one.
                StripeError::Api {
                    retry_after: Some(after),
                    ..
                } => {
                    let after = (*after).min(MAX_RETRY_AFTER);
                    self.limiter.pause_for(after);
                    after
                }
                _ => backoff,
            };
            tracing::warn!(
                path = %request.path,
                attempt,
                wait_ms = wait.as_millis() as u64,
                error = %error,
                "Stripe request failed; retrying with the same idempotency key"
            );
            metrics::counter!(names::RETRIES_TOTAL).increment(1);
            tokio::time::sleep(wait).await;
        }
    }

    async fn attempt(
        &self,
        request: &RequestBuilder,
        idempotency_key: Option<&str>,
    ) -> Result<Bytes, StripeError> {
        let mut uri = format!("{}/v1{}", self.base, request.path);
        if let Some(query) = &request.query {
            uri.push('?');
            uri.push_str(query);
        }
        let method = match request.method {
            StripeMethod::Get => Method::GET,
            StripeMethod::Post => Method::POST,
            StripeMethod::Delete => Method::DELETE,
        };
        let mut builder = Request::builder()
            .method(method)
            .uri(&uri)
            .header(AUTHORIZATION, self.authorization.clone())
            .header(
                USER_AGENT,
                concat!("apex-billing/", env!("CARGO_PKG_VERSION")),
            )
            .header("stripe-version", stripe_client_core::VERSION.as_str());
        if let Some(key) = idempotency_key {
            builder = builder.header("idempotency-key", key);
        }
        let body = match &request.body {
            Some(form) => {
                builder = builder.header(CONTENT_TYPE, "application/x-www-form-urlencoded");
                Bytes::from(form.clone())
            }
            None => Bytes::new(),
        };
        let http_request = builder
            .body(Full::new(body))
            .map_err(|e| StripeError::Config(format!("cannot build a request to {uri}: {e}")))?;
        let exchange = async {
            let response = self
                .http
                .request(http_request)
                .await
                .map_err(|e| StripeError::Transport(transport_reason(&e)))?;
            let status = response.status().as_u16();
            let retry_after = response
                .headers()
                .get(RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            let should_retry = response
                .headers()
                .get("stripe-should-retry")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<bool>().ok());
            let bytes = response
                .into_body()
                .collect()
                .await
                .map_err(|e| StripeError::Transport(e.to_string()))?
                .to_bytes();
            Ok((status, retry_after, should_retry, bytes))
        };
        let (status, retry_after, should_retry, bytes) =
            match tokio::time::timeout(self.settings.timeout, exchange).await {
                Ok(result) => result?,
                Err(_) => return Err(StripeError::Timeout(self.settings.timeout)),
            };
        metrics::counter!(names::REQUESTS_TOTAL, "status" => status_class(status)).increment(1);
        if (200..300).contains(&status) {
            return Ok(bytes);
        }
        let (code, message, decline_code) = error_parts(&bytes);
        Err(StripeError::Api {
            status,
            code,
            message,
            decline_code,
            retry_after,
            should_retry,
        })
    }
}

fn status_class(status: u16) -> &'static str {
    match status {
        200..=299 => "2xx",
        429 => "429",
        400..=499 => "4xx",
        _ => "5xx",
    }
}

/// Stripe's `{"error": {"code", "message", "decline_code"}}`, or the start of whatever else
/// came back.
fn error_parts(body: &[u8]) -> (Option<String>, String, Option<String>) {
    #[derive(serde::Deserialize)]
    struct Envelope {
        error: Detail,
    }
    #[derive(serde::Deserialize)]
    struct Detail {
        code: Option<String>,
        message: Option<String>,
        decline_code: Option<String>,
    }
    match serde_json::from_slice::<Envelope>(body) {
        Ok(Envelope { error }) => (
            error.code,
            error.message.unwrap_or_else(|| "no message".into()),
            error.decline_code,
        ),
        Err(_) => (
            None,
            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned(),
            None,
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
    fn what_is_retried() {
        let api = |status| StripeError::Api {
            status,
            code: None,
            message: String::new(),
            decline_code: None,
            retry_after: None,
            should_retry: None,
        };
        assert!(api(429).is_retryable());
        assert!(api(409).is_retryable());
        assert!(api(500).is_retryable());
        assert!(api(503).is_retryable());
        assert!(!api(400).is_retryable());
        assert!(!api(401).is_retryable());
        assert!(!api(404).is_retryable());
        // Stripe's own word wins over the status.
        let with_header = |status, retry| StripeError::Api {
            status,
            code: None,
            message: String::new(),
            decline_code: None,
            retry_after: None,
            should_retry: Some(retry),
        };
        assert!(!with_header(500, false).is_retryable());
        assert!(with_header(400, true).is_retryable());
        assert!(StripeError::Transport("refused".into()).is_retryable());
        assert!(StripeError::Timeout(Duration::from_secs(1)).is_retryable());
        assert!(!StripeError::Decode("x".into()).is_retryable());
    }

    #[test]
    fn backoff_doubles_up_to_its_cap_for_the_attempts_allowed() {
        let waits: Vec<_> = RetryPolicy::DEFAULT
            .delays()
            .map(|d| d.as_millis())
            .collect();
        // Six attempts: five waits between them.
        assert_eq!(waits, [500, 1_000, 2_000, 4_000, 8_000]);
        let long = RetryPolicy {
            max_attempts: 8,
            ..RetryPolicy::DEFAULT
        };
        let waits: Vec<_> = long.delays().map(|d| d.as_millis()).collect();
        assert_eq!(waits, [500, 1_000, 2_000, 4_000, 8_000, 8_000, 8_000]);
    }

    #[test]
    fn stripe_errors_are_read_and_other_bodies_quoted() {
        let (code, message, decline) =
            error_parts(br#"{"error":{"type":"invalid_request_error","code":"resource_missing","message":"No such customer"}}"#);
        assert_eq!(code.as_deref(), Some("resource_missing"));
        assert_eq!(message, "No such customer");
        assert_eq!(decline, None);
        let (code, _, decline) = error_parts(
            br#"{"error":{"type":"card_error","code":"card_declined","decline_code":"insufficient_funds","message":"Your card has insufficient funds."}}"#,
        );
        assert_eq!(code.as_deref(), Some("card_declined"));
        assert_eq!(decline.as_deref(), Some("insufficient_funds"));
        let (code, message, _) = error_parts(b"<html>bad gateway</html>");
        assert_eq!(code, None);
        assert_eq!(message, "<html>bad gateway</html>");
    }

    #[test]
    fn the_secret_key_stays_out_of_debug() {
        let client = StripeClient::new(
            "https://api.stripe.com",
            "sk_test_supersecret",
            ClientSettings::default(),
        )
        .unwrap();
        let shown = format!("{client:?}");
        assert!(!shown.contains("supersecret"), "{shown}");
        assert!(shown.contains("***"));
        assert!(StripeClient::new("ftp://x", "sk_test_x", ClientSettings::default()).is_err());
    }
}
