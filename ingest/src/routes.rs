//! The router: maps method and path to a handler and records the request metric.
//! Routes are matched on exact paths; anything else gets a JSON 404 or 405.

use std::sync::Arc;

use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use serde_json::json;

use crate::response::{self, Body};
use crate::server::AppState;
use crate::telemetry;

/// Handles one request. Never fails: every outcome is a response.
pub async fn handle(state: Arc<AppState>, request: Request<Incoming>) -> Response<Body> {
    let (route, response) = match (request.method(), request.uri().path()) {
        (&Method::GET, "/healthz") => (
            "/healthz",
            response::json(StatusCode::OK, &json!({"status": "ok"})),
        ),
        (&Method::GET, "/readyz") => ("/readyz", readiness(&state).await),
        (&Method::GET, "/metrics") => (
            "/metrics",
            response::text(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                telemetry::prometheus().render(),
            ),
        ),
        (_, "/healthz" | "/readyz" | "/metrics") => (
            "method_not_allowed",
            response::error(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this endpoint only answers GET",
            ),
        ),
        _ => (
            "not_found",
            response::error(StatusCode::NOT_FOUND, "not_found", "no such endpoint"),
        ),
    };
    metrics::counter!(telemetry::REQUESTS_TOTAL, "route" => route, "status" => response.status().as_str().to_owned())
        .increment(1);
    response
}

/// Ready when Postgres answers: without it no key could be checked.
async fn readiness(state: &AppState) -> Response<Body> {
    match sqlx::query("SELECT 1").execute(&state.pool).await {
        Ok(_) => response::json(StatusCode::OK, &json!({"status": "ready"})),
        Err(e) => {
            tracing::warn!(error = %e, "readiness: postgres unreachable");
            response::error(
                StatusCode::SERVICE_UNAVAILABLE,
                "not_ready",
                "postgres is unreachable",
            )
        }
    }
}
