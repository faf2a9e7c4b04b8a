//! `POST /webhooks/stripe`: checks `Stripe-Signature` over the raw body (forged, stale or
//! unsigned requests get 400) and hands the event to billing, which stores each event id
//! once (a second delivery is a 200 no-op) and updates the invoice mirror, dunning (a failed
//! payment opens a case, a payment reactivates) and the subscription status. Any validly signed event is stored, whatever its strings hold (billing
//! replaces the U+0000 Postgres refuses), so only a store failure is answered 503 for Stripe
//! to retry. Without `STRIPE_WEBHOOK_SECRET` the endpoint does not exist (404). Secrets are
//! never logged.

use apex_billing::BillingError;
use apex_billing::webhooks::{self, Handled, SignatureError};
use chrono::Utc;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::body::read_body;
use crate::error::ApiError;
use crate::response::{self, Body};
use crate::state::AppState;

/// Largest webhook body accepted (Stripe's events are a few KiB).
pub const MAX_BODY_BYTES: usize = 1 << 20;

#[derive(Serialize)]
struct Received<'a> {
    received: bool,
    event_id: &'a str,
    duplicate: bool,
}

fn signature_error(e: SignatureError) -> ApiError {
    let code = match e {
        SignatureError::Missing => "missing_signature",
        SignatureError::Malformed | SignatureError::Mismatch => "invalid_signature",
        SignatureError::Stale => "stale_signature",
    };
    ApiError::InvalidParameter {
        code,
        message: e.to_string(),
    }
}

/// A Postgres connection to store a webhook event from `source` (`stripe`, `resend`); a 503
/// when there is none, so the sender delivers it again.
pub(crate) async fn connection(
    state: &AppState,
    event: &str,
    source: &'static str,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, ApiError> {
    state.pool.acquire().await.map_err(|e| {
        tracing::warn!(error = %e, event, source, "webhook not stored: no Postgres connection");
        ApiError::Unavailable("the event could not be stored; retry")
    })
}

/// How a webhook event that could not be stored is answered: 400 for an event billing
/// refuses, else 503 (Stripe and Resend deliver a 5xx again; the event is applied once it
/// lands).
pub(crate) fn not_stored(error: BillingError, event: &str, source: &'static str) -> ApiError {
    match error {
        BillingError::Invalid(message) => ApiError::InvalidJson(message),
        other => {
            tracing::warn!(error = %other, event, source, "webhook not stored");
            ApiError::Unavailable("the event could not be stored; retry")
        }
    }
}

/// Handles one delivery.
pub async fn stripe(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if state.stripe_webhook_secrets.is_empty() {
        return Err(ApiError::NotFound);
    }
    let (parts, body) = request.into_parts();
    let header = parts
        .headers
        .get("stripe-signature")
        .map(|v| {
            v.to_str()
                .map_err(|_| signature_error(SignatureError::Malformed))
        })
        .transpose()?;
    let payload = read_body(
        &parts.headers,
        body,
        MAX_BODY_BYTES,
        state.limits.body_read_timeout,
    )
    .await?;
    let secrets: Vec<&str> = state
        .stripe_webhook_secrets
        .iter()
        .map(|s| s.expose())
        .collect();
    webhooks::verify(header, &payload, &secrets, Utc::now().timestamp())
        .map_err(signature_error)?;
    let event = webhooks::parse_event(&payload).ok_or_else(|| ApiError::InvalidParameter {
        code: "invalid_event",
        message: "the body is not a Stripe event (id evt_..., type, data.object)".into(),
    })?;
    let mut conn = connection(state, &event.id, "stripe").await?;
    let handled = webhooks::handle(&mut conn, &state.dunning, &event, chrono::Utc::now())
        .await
        .map_err(|e| not_stored(e, &event.id, "stripe"))?;
    if let Handled::Stored {
        subscriptions_updated,
        invoices_updated,
    } = handled
    {
        tracing::info!(
            event = %event.id,
            kind = %event.event_type,
            subscriptions_updated,
            invoices_updated,
            "stripe event"
        );
    }
    Ok(response::json(
        StatusCode::OK,
        &Received {
            received: true,
            event_id: &event.id,
            duplicate: handled == Handled::Duplicate,
        },
    ))
}
