//! `apex-server`: reads its configuration, sets up logging, starts the durable pipeline (the
//! write-ahead log and its appliers), binds, and runs the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use apex_core::env::EnvSource;
use apex_ingest::{ServerConfig, run_with_sink};
use apex_pipeline::durable::DurableSink;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn")),
        )
        .init();
    let config = match ServerConfig::from_env(&EnvSource::process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apex-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("apex-server: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "apex-server: cannot listen on APEX_LISTEN {}: {e}",
                    config.listen
                );
                return ExitCode::FAILURE;
            }
        };
        // The recorder first: the sink records from its start (a torn tail cut, its
        // zero-valued series), and nothing recorded before a recorder exists is kept.
        apex_ingest::telemetry::prometheus();
        // The production sink: the write-ahead log and one applier per store. Tests pass
        // their own sink to the same `run_with_sink`, which shuts it down at the end.
        let sink = match DurableSink::start(&config.durable_config()) {
            Ok(sink) => sink,
            Err(e) => {
                eprintln!("apex-server: cannot start the pipeline: {e}");
                return ExitCode::FAILURE;
            }
        };
        match run_with_sink(config, listener, sink, shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apex-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}

/// Resolves on the first SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("cannot install the SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {},
            _ = term.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
    tracing::info!("shutdown signal received");
}
