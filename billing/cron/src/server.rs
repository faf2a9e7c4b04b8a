//! The cron process's own HTTP port (`APEX_CRON_LISTEN`): `GET /healthz` and `GET /metrics`
//! (Prometheus), HTTP/1.1, nothing else. Every other path is a JSON 404, every other method
//! a JSON 405, in the API's error shape.

use std::convert::Infallible;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{CONTENT_TYPE, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use metrics_exporter_prometheus::PrometheusHandle;
use tokio::net::TcpListener;
use tokio::sync::watch;

fn response(status: StatusCode, content_type: &'static str, body: String) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    response
}

fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let body = serde_json::json!({"success": false, "error": {"code": code, "message": message}});
    response(status, "application/json", body.to_string())
}

fn route(metrics: &PrometheusHandle, request: &Request<Incoming>) -> Response<Full<Bytes>> {
    let path = request.uri().path();
    if path != "/healthz" && path != "/metrics" {
        return error(StatusCode::NOT_FOUND, "not_found", "no such endpoint");
    }
    if request.method() != Method::GET {
        return error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
            "this endpoint does not answer this method",
        );
    }
    if path == "/healthz" {
        response(
            StatusCode::OK,
            "application/json",
            r#"{"status":"ok"}"#.to_owned(),
        )
    } else {
        response(
            StatusCode::OK,
            "text/plain; version=0.0.4",
            metrics.render(),
        )
    }
}

/// Serves `listener` until `stop` turns true.
pub async fn serve(
    listener: TcpListener,
    metrics: PrometheusHandle,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = stop.wait_for(|stop| *stop) => return,
        };
        let (stream, _) = match accepted {
            Ok(accepted) => accepted,
            Err(e) => {
                tracing::warn!(error = %e, "cron: accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        let service = service_fn(move |request| {
            let answer = route(&metrics, &request);
            async move { Ok::<_, Infallible>(answer) }
        });
        tokio::spawn(async move {
            if let Err(e) = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                tracing::debug!(error = %e, "cron: connection ended with an error");
            }
        });
    }
}
