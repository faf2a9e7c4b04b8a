//! The router: maps method and path to a handler, turns every [`ApiError`] into the one JSON
//! error shape, and records the request metrics. Routes match exact paths.

use std::sync::Arc;
use std::time::Instant;

use hyper::body::Incoming;
use hyper::header::{HeaderName, HeaderValue, RETRY_AFTER};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::error::ApiError;
use crate::ratelimit::Refusal;
use crate::response::{self, Body};
use crate::state::AppState;
use crate::{dashboard, names, resend_webhook, telemetry, usage, webhook};

/// The draft's fields (lower case, as `HeaderName` requires).
const RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
const RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");

/// Handles one request. Never fails: every outcome is a response.
///
/// Every route but `track` runs boxed. hyper keeps one allocation per connection as large as
/// this future, for the connection's whole life, and an unboxed state machine is as large as
/// its largest route: with the dashboard, billing and webhook handlers inline it was 20 KB,
/// about 100 MB for 5,000 open connections (issue 19's memory figure). Boxed, the rarer routes
/// pay one allocation per request and `track`, the hot path, pays none.
pub async fn handle(state: Arc<AppState>, request: Request<Incoming>) -> Response<Body> {
    let started = Instant::now();
    let method = request.method().clone();
    let (route, result) = match request.uri().path() {
        "/api/usage/track" | "/usage/track" => (
            "/api/usage/track",
            only(&method, &Method::POST, async {
                usage::track(&state, request).await
            })
            .await,
        ),
        "/api/usage/batch" => (
            "/api/usage/batch",
            Box::pin(only(&method, &Method::POST, async {
                usage::batch(&state, request).await
            }))
            .await,
        ),
        "/api/usage/current" => (
            "/api/usage/current",
            Box::pin(only(&method, &Method::GET, async {
                dashboard::current(&state, request).await
            }))
            .await,
        ),
        "/api/usage/analytics" => (
            "/api/usage/analytics",
            Box::pin(only(&method, &Method::GET, async {
                dashboard::analytics(&state, request).await
            }))
            .await,
        ),
        "/api/usage/limits" => (
            "/api/usage/limits",
            Box::pin(only(&method, &Method::GET, async {
                dashboard::limits(&state, request).await
            }))
            .await,
        ),
        "/api/billing/preview" => (
            "/api/billing/preview",
            Box::pin(only(&method, &Method::GET, async {
                dashboard::preview(&state, request).await
            }))
            .await,
        ),
        "/api/billing/invoices" => (
            "/api/billing/invoices",
            Box::pin(only(&method, &Method::GET, async {
                dashboard::invoices(&state, request).await
            }))
            .await,
        ),
        "/api/admin/revenue" => (
            "/api/admin/revenue",
            Box::pin(only(&method, &Method::POST, async {
                dashboard::set_revenue(&state, request).await
            }))
            .await,
        ),
        "/webhooks/stripe" => (
            "/webhooks/stripe",
            Box::pin(only(&method, &Method::POST, async {
                webhook::stripe(&state, request).await
            }))
            .await,
        ),
        "/webhooks/resend" => (
            "/webhooks/resend",
            Box::pin(only(&method, &Method::POST, async {
                resend_webhook::resend(&state, request).await
            }))
            .await,
        ),
        "/healthz" => (
            "/healthz",
            Box::pin(only(&method, &Method::GET, async {
                Ok(response::json(StatusCode::OK, &json!({"status": "ok"})))
            }))
            .await,
        ),
        "/readyz" => (
            "/readyz",
            Box::pin(only(&method, &Method::GET, async { Ok(readiness(&state)) })).await,
        ),
        "/metrics" => (
            "/metrics",
            Box::pin(only(&method, &Method::GET, async {
                // Read at scrape time rather than written by every request: a gauge is what
                // it is when scraped, and the hot path saves a shared write per request.
                telemetry::queue_depth().set(state.sink.queue_depth() as f64);
                metrics::gauge!(names::RATE_LIMITED_HELD_REQUESTS).set(state.holds.held() as f64);
                Ok(response::text(
                    StatusCode::OK,
                    "text/plain; version=0.0.4",
                    telemetry::prometheus().render(),
                ))
            }))
            .await,
        ),
        _ => ("unknown", Err(ApiError::NotFound)),
    };
    let hold = held_retry_after(&result).and_then(|secs| state.holds.try_hold(secs));
    let response = result.unwrap_or_else(|e| error_response(&e));
    telemetry::count(
        names::REQUESTS_TOTAL,
        [
            ("route", route),
            ("status", status_label(response.status())),
        ],
        1,
    );
    telemetry::observe(
        names::REQUEST_DURATION_SECONDS,
        ("route", route),
        started.elapsed().as_secs_f64(),
    );
    // After the metrics: `apex_ingest_request_duration_seconds` is the time the edge worked
    // on the request, not the hold.
    if let Some(hold) = hold {
        // Boxed: rare, and the timer would otherwise enlarge every connection's future.
        Box::pin(tokio::time::sleep(hold.duration)).await;
    }
    response
}

/// The `Retry-After` of a refusal to hold before it is sent ([`crate::ratelimit::RefusalHolds`]):
/// a 429 of the rate limit; not the 413 of a batch over the burst, which waiting cannot cure,
/// nor any other answer.
fn held_retry_after(result: &Result<Response<Body>, ApiError>) -> Option<u64> {
    match result {
        Err(ApiError::RateLimited(Refusal::Later { retry_after, .. })) => Some(*retry_after),
        _ => None,
    }
}

async fn only(
    method: &Method,
    allowed: &Method,
    handler: impl Future<Output = Result<Response<Body>, ApiError>>,
) -> Result<Response<Body>, ApiError> {
    if method == allowed {
        handler.await
    } else {
        Err(ApiError::MethodNotAllowed)
    }
}

/// The JSON error answer of `error`, with `Retry-After` on 503, and on 429 also the
/// `RateLimit-Policy` and `RateLimit` fields of draft-ietf-httpapi-ratelimit-headers
/// (`RateLimit-Policy` alone on the 413 of a batch over the burst: the size to split to) (the
/// syntax of drafts -08 to -11: `"customer";q=<burst>;w=<secs to refill it>` and
/// `"customer";r=<records that would pass now>;t=<secs until this request would pass>`).
pub fn error_response(error: &ApiError) -> Response<Body> {
    let (status, code, message) = error.status();
    let mut response = match error {
        ApiError::AllRejected(errors) => response::json(
            status,
            &json!({
                "success": false,
                "error": {"code": code, "message": message},
                "errors": usage::indexed_errors(errors),
            }),
        ),
        _ => response::error(status, code, &message),
    };
    if status == StatusCode::SERVICE_UNAVAILABLE {
        response
            .headers_mut()
            .insert(RETRY_AFTER, HeaderValue::from_static("1"));
    }
    if let ApiError::RateLimited(Refusal::Later {
        burst,
        window_secs,
        remaining,
        retry_after,
    }) = error
    {
        let headers = response.headers_mut();
        headers.insert(RETRY_AFTER, HeaderValue::from(*retry_after));
        // Digits and fixed text only: always a valid header value.
        for (name, value) in [
            (
                RATELIMIT_POLICY,
                format!("\"customer\";q={burst};w={window_secs}"),
            ),
            (
                RATELIMIT,
                format!("\"customer\";r={remaining};t={retry_after}"),
            ),
        ] {
            if let Ok(value) = HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }
    if let ApiError::RateLimited(Refusal::OverBurst {
        burst, window_secs, ..
    }) = error
    {
        // Digits and fixed text only: always a valid header value.
        if let Ok(value) = HeaderValue::from_str(&format!("\"customer\";q={burst};w={window_secs}"))
        {
            response.headers_mut().insert(RATELIMIT_POLICY, value);
        }
    }
    response
}

/// Status codes as static labels, so recording a request allocates nothing.
fn status_label(status: StatusCode) -> &'static str {
    match status.as_u16() {
        200 => "200",
        400 => "400",
        401 => "401",
        403 => "403",
        404 => "404",
        405 => "405",
        408 => "408",
        409 => "409",
        413 => "413",
        415 => "415",
        429 => "429",
        500 => "500",
        503 => "503",
        _ => "other",
    }
}

/// Ready when the key cache has loaded and the log writer runs (one stopped after a disk
/// fault refuses every record until a restart: 503 `log_stopped`, so a load balancer sends
/// the traffic elsewhere). A store stuck on a permanent error does not make the
/// edge unready (the log still takes and keeps every record until its cap, so taking this
/// instance out of rotation would only turn a store fault into an ingest outage); the answer
/// says `degraded` and names the store, its parked batch and the error, and
/// `apex_pipeline_parked_batches` alerts on it.
fn readiness(state: &AppState) -> Response<Body> {
    if !state.keys.is_loaded() {
        return response::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the API key cache is not loaded",
        );
    }
    if let Some(why) = state.sink.writer_failure() {
        return response::error(
            StatusCode::SERVICE_UNAVAILABLE,
            "log_stopped",
            &format!("the write-ahead log takes no records: {why}"),
        );
    }
    let stuck = state.sink.stuck_stores();
    let status = if stuck.is_empty() {
        "ready"
    } else {
        "degraded"
    };
    response::json(
        StatusCode::OK,
        &json!({"status": status, "keys": state.keys.len(), "stuck_stores": stuck}),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of the future an async fn returns, read from its type (no call needed).
    fn future_size<F, Fut>(_: &F) -> usize
    where
        F: Fn(Arc<AppState>, Request<Incoming>) -> Fut,
    {
        std::mem::size_of::<Fut>()
    }

    #[test]
    fn the_request_future_hyper_keeps_per_connection_stays_small() {
        // hyper allocates this much once per connection and keeps it while the connection
        // lives; 20 KB with the rarer routes inline was 100 MB at 5,000 connections.
        let size = future_size(&handle);
        assert!(size <= 4096, "routes::handle's future is {size} bytes");
    }

    #[test]
    fn only_a_429_of_the_rate_limit_is_held() {
        let later = Refusal::Later {
            burst: 5,
            window_secs: 5,
            remaining: 0,
            retry_after: 3,
        };
        let over = Refusal::OverBurst {
            records: 6,
            burst: 5,
            window_secs: 5,
        };
        assert_eq!(
            held_retry_after(&Err(ApiError::RateLimited(later))),
            Some(3)
        );
        assert_eq!(held_retry_after(&Err(ApiError::RateLimited(over))), None);
        assert_eq!(held_retry_after(&Err(ApiError::DedupFull)), None);
        let ok = response::json(StatusCode::OK, &json!({"success": true}));
        assert_eq!(held_retry_after(&Ok(ok)), None);
    }
}
