//! What the apex servers (`apex-server`, `apex-cron`) do the same way around their own work
//! (feature `process`): log to stdout filtered by `APEX_LOG`, builds the multi-threaded runtime, and stops on the
//! first SIGTERM or SIGINT.

use std::process::ExitCode;

/// Sets up logging to stdout, filtered by `APEX_LOG` (a `tracing` filter such as
/// `info,sqlx=warn`, the default).
pub fn init_logging() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .init();
}

/// Builds the multi-threaded runtime, or says why not on stderr as `binary: ...` and gives
/// the exit code (1) to return.
pub fn runtime(binary: &str) -> Result<tokio::runtime::Runtime, ExitCode> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| {
            eprintln!("{binary}: cannot start the runtime: {e}");
            ExitCode::FAILURE
        })
}

/// Resolves on the first SIGTERM or SIGINT. Without a SIGTERM handler (it cannot be
/// installed), SIGINT still stops the process, and a warning says so.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! {
                _ = ctrl_c => {},
                _ = term.recv() => {},
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot install the SIGTERM handler; SIGINT still stops");
            let _ = ctrl_c.await;
        }
    }
    tracing::info!("shutdown signal received");
}
