//! The dashboard API: usage in the current period with overages, daily analytics from
//! ClickHouse's rollup, usage against plan limits, the invoice preview of a month (all with a
//! customer's JWT), the customer's monthly invoices, and the admin endpoint that records
//! mediated revenue.

use std::collections::BTreeMap;

use apex_billing::BillingError;
use apex_billing::customers;
use apex_billing::ids::is_customer_id;
use apex_billing::pricing::parse_month;
use apex_billing::statement::{self, api_quantity, gb_number};
use apex_billing::tokens::{self, Claims};
use apex_core::model::Metric;
use chrono::{Duration, NaiveDate, Utc};
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
use sqlx::Postgres;
use sqlx::pool::PoolConnection;

use crate::auth::{self, AuthError};
use crate::body::read_body;
use crate::error::ApiError;
use crate::response::{self, Body};
use crate::state::AppState;
use crate::usage::{BodyKind, body_kind};

/// Most days `?days=` may ask for.
pub const MAX_DAYS: u32 = 365;

/// The verified claims of a dashboard request's token. Whether its customer exists is
/// checked by the query that loads the account (its `NotFound` is an invalid subject).
fn claims(state: &AppState, request: &Request<Incoming>) -> Result<Claims, ApiError> {
    let token = auth::bearer(request.headers())
        .ok()
        .flatten()
        .ok_or(ApiError::Unauthorized(AuthError::Missing))?;
    tokens::verify(
        token,
        state.jwt_secret.expose().as_bytes(),
        Utc::now().timestamp(),
    )
    .map_err(|e| ApiError::Unauthorized(AuthError::Token(e)))
}

/// Like [`claims`], for an endpoint that loads no account: the customer must exist.
async fn existing_customer(
    state: &AppState,
    request: &Request<Incoming>,
) -> Result<Claims, ApiError> {
    let claims = claims(state, request)?;
    let exists = customers::exists(&state.pool, &claims.customer_id)
        .await
        .map_err(|_| ApiError::Unavailable("the account store is unavailable"))?;
    if !exists {
        return Err(invalid_subject());
    }
    Ok(claims)
}

/// A pooled Postgres connection for a handler's reads.
async fn connection(state: &AppState) -> Result<PoolConnection<Postgres>, ApiError> {
    state.pool.acquire().await.map_err(|e| {
        tracing::warn!(error = %e, "no Postgres connection for a dashboard request");
        ApiError::Unavailable("the account store is unavailable")
    })
}

fn invalid_subject() -> ApiError {
    ApiError::Unauthorized(AuthError::Token(tokens::TokenError::InvalidSubject))
}

/// A billing failure as the dashboard answers it. A customer that vanished after its token
/// was checked is an invalid subject; a price that cannot be computed is our fault (500,
/// logged), never a reason for the client to retry.
fn billing_error(e: BillingError) -> ApiError {
    match e {
        BillingError::NotFound { .. } => invalid_subject(),
        BillingError::Invalid(message) => {
            tracing::error!(%message, "an account cannot be priced");
            ApiError::Internal("the account cannot be priced; the operators are alerted")
        }
        BillingError::Database(e) => {
            tracing::warn!(error = %e, "dashboard query failed");
            ApiError::Unavailable("the account store is unavailable")
        }
    }
}

/// The value of query parameter `name`, percent-decoded (`form_urlencoded`, so `%30` is `0`
/// and `+` a space), if present; the first occurrence wins.
fn query_param(request: &Request<Incoming>, name: &str) -> Option<String> {
    query_value(request.uri().query(), name)
}

fn query_value(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(key, _)| key == name)
        .map(|(_, value)| value.into_owned())
}

/// `GET /api/usage/current`.
pub async fn current(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claims = claims(state, &request)?;
    let mut conn = connection(state).await?;
    let usage = statement::current_usage(&mut conn, &claims.customer_id, Utc::now())
        .await
        .map_err(billing_error)?;
    Ok(response::json(StatusCode::OK, &usage))
}

/// `GET /api/usage/limits`.
pub async fn limits(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claims = claims(state, &request)?;
    let mut conn = connection(state).await?;
    let limits = statement::limits(&mut conn, &claims.customer_id, Utc::now())
        .await
        .map_err(billing_error)?;
    Ok(response::json(StatusCode::OK, &limits))
}

/// `GET /api/billing/preview?month=YYYY-MM`.
pub async fn preview(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claims = claims(state, &request)?;
    let month = query_param(&request, "month").ok_or_else(|| ApiError::InvalidParameter {
        code: "invalid_month",
        message: "give ?month=YYYY-MM".into(),
    })?;
    let period = parse_month(&month).ok_or_else(|| invalid_month(&month))?;
    let mut conn = connection(state).await?;
    let preview = statement::invoice_preview(&mut conn, &claims.customer_id, &month, &period)
        .await
        .map_err(billing_error)?;
    Ok(response::json(StatusCode::OK, &preview))
}

/// Most invoices `GET /api/billing/invoices` returns (`?limit=`, default 24: two years).
pub const MAX_INVOICES: i64 = 100;

/// `GET /api/billing/invoices`.
#[derive(Serialize)]
struct InvoiceList {
    customer_id: String,
    invoices: Vec<apex_billing::invoices::InvoiceWithLines>,
}

/// `GET /api/billing/invoices[?limit=N]`: the customer's monthly invoices from the local
/// mirror, newest month first, with lines, status and Stripe's hosted page.
pub async fn invoices(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claims = claims(state, &request)?;
    let limit = match query_param(&request, "limit") {
        None => 24,
        Some(text) => text
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=MAX_INVOICES).contains(n) && text.bytes().all(|b| b.is_ascii_digit()))
            .ok_or_else(|| ApiError::InvalidParameter {
                code: "invalid_limit",
                message: format!("limit must be a whole number from 1 to {MAX_INVOICES}"),
            })?,
    };
    let mut conn = connection(state).await?;
    if !customers::exists(&mut *conn, &claims.customer_id)
        .await
        .map_err(billing_error)?
    {
        return Err(invalid_subject());
    }
    let invoices = apex_billing::invoices::list_with_lines(&mut conn, &claims.customer_id, limit)
        .await
        .map_err(billing_error)?;
    Ok(response::json(
        StatusCode::OK,
        &InvoiceList {
            customer_id: claims.customer_id,
            invoices,
        },
    ))
}

/// The 400 of a month that is not `YYYY-MM` in the years the API serves.
fn invalid_month(month: &str) -> ApiError {
    let years = apex_billing::pricing::MONTH_YEARS;
    ApiError::InvalidParameter {
        code: "invalid_month",
        message: format!(
            "month {month:?} is not YYYY-MM from {:04}-01 to {:04}-12",
            years.start(),
            years.end()
        ),
    }
}

/// Parses `?days=`: 1 to [`MAX_DAYS`], default 30.
pub fn parse_days(value: Option<&str>) -> Result<u32, ApiError> {
    let Some(text) = value else {
        return Ok(30);
    };
    let invalid = || ApiError::InvalidParameter {
        code: "invalid_days",
        message: format!("days must be a whole number from 1 to {MAX_DAYS}"),
    };
    if text.is_empty() || text.len() > 3 || !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(invalid());
    }
    match text.parse::<u32>() {
        Ok(days) if (1..=MAX_DAYS).contains(&days) => Ok(days),
        _ => Err(invalid()),
    }
}

#[derive(Serialize)]
struct DailyUsage {
    date: String,
    impressions: u64,
    api_calls: u64,
    data_transfer_gb: Box<RawValue>,
}

#[derive(Serialize)]
struct Analytics {
    daily_usage: Vec<DailyUsage>,
    total_impressions: u64,
    total_api_calls: u64,
    total_data_transfer_gb: Box<RawValue>,
    /// Total impressions ÷ days, rounded down.
    avg_daily_impressions: u64,
    days: u32,
    start_date: String,
    end_date: String,
}

/// `GET /api/usage/analytics?days=N`: the last N UTC days, today included, from ClickHouse's
/// `usage_daily`; days without usage are zero rows.
pub async fn analytics(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    let claims = existing_customer(state, &request).await?;
    let days = parse_days(query_param(&request, "days").as_deref())?;
    let end: NaiveDate = Utc::now().date_naive();
    let start = end - Duration::days(i64::from(days) - 1);
    let rows: Vec<(String, String, u64)> = state
        .clickhouse
        .query(
            "SELECT toString(day), toString(metric_type), sum(quantity) FROM usage_daily \
             WHERE customer_id = ? AND day >= toDate(?) AND day <= toDate(?) \
             GROUP BY day, metric_type",
        )
        .bind(claims.customer_id.as_str())
        .bind(start.to_string())
        .bind(end.to_string())
        .fetch_all()
        .await
        .map_err(|e| {
            tracing::warn!(error = %e, "analytics query failed");
            ApiError::Unavailable("the analytics store is unavailable")
        })?;
    let mut by_day: BTreeMap<String, [u64; 3]> = BTreeMap::new();
    for (day, metric, quantity) in rows {
        let Ok(metric) = metric.parse::<Metric>() else {
            continue;
        };
        let slot = Metric::ALL.iter().position(|m| *m == metric).unwrap_or(0);
        by_day.entry(day).or_default()[slot] += quantity;
    }
    let mut totals = [0u64; 3];
    let mut daily_usage = Vec::with_capacity(days as usize);
    let mut day = start;
    while day <= end {
        let date = day.to_string();
        let q = by_day.get(&date).copied().unwrap_or_default();
        for (total, value) in totals.iter_mut().zip(q) {
            *total = total.saturating_add(value);
        }
        daily_usage.push(DailyUsage {
            date,
            impressions: q[0],
            api_calls: q[1],
            data_transfer_gb: gb_number(q[2]),
        });
        day += Duration::days(1);
    }
    Ok(response::json(
        StatusCode::OK,
        &Analytics {
            daily_usage,
            total_impressions: totals[0],
            total_api_calls: totals[1],
            total_data_transfer_gb: api_quantity(Metric::DataTransfer, totals[2]),
            avg_daily_impressions: totals[0] / u64::from(days),
            days,
            start_date: start.to_string(),
            end_date: end.to_string(),
        },
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RevenueBody {
    customer_id: String,
    month: String,
    cents: u64,
}

/// `POST /api/admin/revenue` with `Authorization: Bearer <APEX_ADMIN_TOKEN>`:
/// `{"customer_id","month":"YYYY-MM","cents"}`.
pub async fn set_revenue(
    state: &AppState,
    request: Request<Incoming>,
) -> Result<Response<Body>, ApiError> {
    // With no admin token configured the endpoint does not exist.
    let Some(expected) = &state.admin_token else {
        return Err(ApiError::NotFound);
    };
    let given = auth::bearer(request.headers())
        .ok()
        .flatten()
        .ok_or(ApiError::AdminUnauthorized)?;
    if !auth::secrets_equal(given, expected.expose()) {
        return Err(ApiError::AdminUnauthorized);
    }
    if body_kind(request.headers())? != BodyKind::Json {
        return Err(ApiError::UnsupportedContentType);
    }
    let (parts, body) = request.into_parts();
    let bytes = read_body(
        &parts.headers,
        body,
        state.limits.track_max_body_bytes,
        state.limits.body_read_timeout,
    )
    .await?;
    let body: RevenueBody = serde_json::from_slice(&bytes).map_err(|e| {
        if e.is_data() {
            ApiError::InvalidField(format!(
                "expected {{\"customer_id\",\"month\",\"cents\"}}: {e}"
            ))
        } else {
            ApiError::InvalidJson(format!("the body is not JSON: {e}"))
        }
    })?;
    if !is_customer_id(&body.customer_id) {
        return Err(ApiError::InvalidParameter {
            code: "invalid_customer_id",
            message: "customer_id must be cus_...".into(),
        });
    }
    let period = parse_month(&body.month).ok_or_else(|| invalid_month(&body.month))?;
    if body.cents > i64::MAX as u64 {
        return Err(ApiError::InvalidParameter {
            code: "invalid_cents",
            message: "cents is too large".into(),
        });
    }
    statement::set_revenue(&state.pool, &body.customer_id, &period, body.cents)
        .await
        .map_err(|e| match e {
            BillingError::NotFound { what } => ApiError::UnknownResource(what),
            other => billing_error(other),
        })?;
    Ok(response::json(
        StatusCode::OK,
        &serde_json::json!({
            "success": true,
            "customer_id": body.customer_id,
            "month": body.month,
            "revenue_cents": body.cents,
        }),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_values_are_percent_decoded() {
        assert_eq!(
            query_value(Some("days=3%30"), "days").as_deref(),
            Some("30")
        );
        assert_eq!(
            query_value(Some("x=1&month=2025%2D11&month=2024-01"), "month").as_deref(),
            Some("2025-11")
        );
        assert_eq!(query_value(Some("da%79s=7"), "days").as_deref(), Some("7"));
        assert_eq!(query_value(Some("days"), "days").as_deref(), Some(""));
        assert_eq!(query_value(Some("other=1"), "days"), None);
        assert_eq!(query_value(None, "days"), None);
        // Decoded text still goes through the strict parsers.
        assert!(parse_days(query_value(Some("days=%2B5"), "days").as_deref()).is_err());
        assert_eq!(
            parse_days(query_value(Some("days=3%30"), "days").as_deref()).unwrap(),
            30
        );
    }

    #[test]
    fn days_are_1_to_365_with_30_by_default() {
        assert_eq!(parse_days(None).unwrap(), 30);
        assert_eq!(parse_days(Some("1")).unwrap(), 1);
        assert_eq!(parse_days(Some("365")).unwrap(), 365);
        assert_eq!(parse_days(Some("007")).unwrap(), 7);
        for bad in [
            "0",
            "366",
            "1000",
            "-1",
            "abc",
            "",
            "3.5",
            "1e2",
            " 5",
            "+5",
            "99999999999",
        ] {
            assert!(parse_days(Some(bad)).is_err(), "{bad:?}");
        }
    }
}
