//! `apex-server`: reads its configuration, sets up logging, starts the durable pipeline (the
//! write-ahead log and its appliers), binds, and runs the server until SIGTERM or SIGINT.

use std::process::ExitCode;

use apex_core::env::EnvSource;
use apex_core::process;
use apex_ingest::{ServerConfig, run_with_sink};
use apex_pipeline::durable::DurableSink;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    process::init_logging();
    let config = match ServerConfig::from_env(&EnvSource::process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apex-server: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match process::runtime("apex-server") {
        Ok(runtime) => runtime,
        Err(code) => return code,
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
        match run_with_sink(config, listener, sink, process::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apex-server: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
