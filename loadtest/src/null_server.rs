//! The `null-server`: a bare hyper server that reads each body and answers 200
//! `{"success":true}`, the ceiling every apex-server figure is compared against on the same
//! client and machine.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

/// Serves until Ctrl-C (or SIGINT). Prints `null-server listening on ADDR` to stderr once
/// bound, so a parent process can read the port it got for `127.0.0.1:0`.
pub async fn serve(listen: SocketAddr) -> Result<(), String> {
    if !listen.ip().is_loopback() {
        return Err(format!(
            "refusing to listen on {listen}: loopback addresses only"
        ));
    }
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .map_err(|e| format!("cannot listen on {listen}: {e}"))?;
    eprintln!(
        "null-server listening on {}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let builder = auto::Builder::new(TokioExecutor::new());
    loop {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => return Ok(()),
            accepted = listener.accept() => {
                let Ok((stream, _)) = accepted else { continue };
                let _ = stream.set_nodelay(true);
                let builder = builder.clone();
                tokio::spawn(async move {
                    let service = service_fn(|request: Request<hyper::body::Incoming>| async move {
                        // Read the whole body, as a real server must, so the comparison is fair.
                        let _ = request.into_body().collect().await;
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"{\"success\":true}"))))
                    });
                    let _ = builder.serve_connection(TokioIo::new(stream), service).await;
                });
            }
        }
    }
}
