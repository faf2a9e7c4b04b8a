//! `apex-cron`: reads its configuration, sets up logging, binds its health and metrics port,
//! and runs the job schedule until SIGTERM or SIGINT.

use std::process::ExitCode;

use apex_core::env::EnvSource;
use apex_core::process;
use apex_cron::config::CronConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    process::init_logging();
    let config = match CronConfig::from_env(&EnvSource::process()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("apex-cron: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = match process::runtime("apex-cron") {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        // The provider is built at every email_queue run; building it once now stops a
        // missing or bad provider setting (no EMAIL_PROVIDER, a folder that cannot be made, a
        // key no header can carry) at start, when the job is on.
        let sends_email = config
            .jobs
            .iter()
            .any(|j| j.name == "email_queue" && j.schedule.is_some());
        if sends_email && let Err(e) = apex_notify::config::build_provider(&config.email) {
            eprintln!("apex-cron: {e} (or turn the job off: APEX_CRON_SCHEDULE_EMAIL_QUEUE=off)");
            return ExitCode::from(2);
        }
        let listener = match tokio::net::TcpListener::bind(config.listen).await {
            Ok(listener) => listener,
            Err(e) => {
                eprintln!(
                    "apex-cron: cannot listen on APEX_CRON_LISTEN {}: {e}",
                    config.listen
                );
                return ExitCode::FAILURE;
            }
        };
        match apex_cron::run(config, listener, process::shutdown_signal()).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("apex-cron: {e}");
                ExitCode::FAILURE
            }
        }
    })
}
