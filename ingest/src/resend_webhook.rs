//! `POST /webhooks/resend`: checks the Svix headers (`svix-id`, `svix-timestamp`,
//! `svix-signature`) over the raw body (forged, stale or unsigned requests get 400) and hands
//! the event to billing, which stores each `svix-id` once (a redelivery is a 200 no-op) and
//! moves the email's delivery status and the suppressed addresses
//! ([`apex_billing::email_webhooks`]). Any validly signed event is stored, whatever its
//! strings hold, so only a store failure is answered 503, for Resend to retry. Without
//! `RESEND_WEBHOOK_SECRET` the endpoint is off (404). Secrets are never logged. The Svix
//! check is billing's own HMAC: the edge links no email or Svix crate.

use apex_billing::email_webhooks::{self, Handled, SignatureError, SvixHeaders};
use chrono::Utc;
use hyper::body::Incoming;
use hyper::header::HeaderMap;
use hyper::{Request, Response, StatusCode};
use serde::Serialize;

use crate::body::read_body;
use crate::error::ApiError;
use crate::names;
use crate::response::{self, Body};
use crate::state::AppState;

/// Largest webhook body accepted (Resend's events are a few KiB).
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

/// The value of header `name`; a value that is not visible ASCII is malformed.
fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| signature_error(SignatureError::Malformed))
        })
        .transpose()
}

/// Handles one delivery.
pub async fn resend(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    if state.resend_webhook_secrets.is_empty() {
        // A 404 like an unknown path's, but saying why: an operator pointing Resend here
        // sees that the secret is missing, not that the route is.
        return Ok(response::error(
            StatusCode::NOT_FOUND,
            "not_found",
            "Resend webhooks are not configured on this server",
        ));
    }
    let (parts, body) = request.into_parts();
    let svix = SvixHeaders {
        id: header(&parts.headers, "svix-id")?,
        timestamp: header(&parts.headers, "svix-timestamp")?,
        signature: header(&parts.headers, "svix-signature")?,
    };
    let payload = read_body(
        &parts.headers,
        body,
        MAX_BODY_BYTES,
        state.limits.body_read_timeout,
    )
    .await?;
    let secrets: Vec<&str> = state
        .resend_webhook_secrets
        .iter()
        .map(|s| s.expose())
        .collect();
    email_webhooks::verify(&svix, &payload, &secrets, Utc::now().timestamp())
        .map_err(signature_error)?;
    // verify() accepted the id, so it is there.
    let id = svix.id.unwrap_or_default();
    let event =
        email_webhooks::parse_event(id, &payload).ok_or_else(|| ApiError::InvalidParameter {
            code: "invalid_event",
            message: "the body is not a Resend event (JSON with a type and a data object)".into(),
        })?;
    let mut conn = crate::webhook::connection(state, &event.id, "resend").await?;
    let handled = email_webhooks::handle(&mut conn, &event)
        .await
        .map_err(|e| crate::webhook::not_stored(e, &event.id, "resend"))?;
    if let Handled::Stored {
        emails_updated,
        addresses_suppressed,
    } = handled
    {
        // First deliveries only: a redelivery is no new event.
        metrics::counter!(names::EMAIL_EVENTS_TOTAL, "type" => event.kind().label()).increment(1);
        tracing::info!(
            event = %event.id,
            kind = %event.event_type,
            emails_updated,
            addresses_suppressed,
            "resend event"
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
