//! The cron process (`apex-cron`): runs the operations guide's schedule of jobs, in UTC, each
//! slot once across any number of replicas sharing the database, with the history in
//! `cron_runs`, catch-up after downtime, skipped slots on overlap, a timeout per job, and a
//! clock that tests (and the simulation) can drive. `apexctl cron ...` reads and runs the
//! same jobs through the same rules.
//!
//! - [`config`]: the process's typed environment configuration.
//! - [`clock`]: the wall clock or a simulated one (`APEX_CLOCK_*`).
//! - [`jobs`]: the jobs, their schedules (overridable) and what each does.
//! - [`runs`]: the `cron_runs` table and the job locks.
//! - [`runner`]: running one slot once: lock, claim, run within the timeout, record.
//! - [`scheduler`]: the loops: slots on time, catch-up at start, the sweep for dead runners,
//!   the orderly stop.
//! - [`server`]: `/healthz` and `/metrics`.
//! - [`names`]: the metric names.

pub mod clock;
pub mod config;
pub mod jobs;
pub mod names;
pub mod runner;
pub mod runs;
pub mod scheduler;
pub mod server;

use std::future::Future;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use tokio::net::TcpListener;

use crate::config::CronConfig;
use crate::jobs::JobContext;

/// Why the process could not start.
#[derive(Debug, thiserror::Error)]
pub enum CronError {
    /// Postgres could not be reached at start-up.
    #[error("cannot connect to Postgres (DATABASE_URL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed at start-up.
    #[error(transparent)]
    Migrate(#[from] apex_core::migrate::MigrateError),
}

/// Installs the process-wide Prometheus recorder once (the buckets of the run-time, send-time
/// and dunning recovery-days histograms, and the HELP text of the cron process's, the Stripe
/// work's, the email queue's and the billing rules' dunning metrics) and returns its handle.
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: std::sync::OnceLock<PrometheusHandle> = std::sync::OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(names::RUN_DURATION_SECONDS.to_owned()),
                names::RUN_DURATION_BUCKETS,
            )
            .expect("duration buckets are not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    apex_notify::names::SEND_DURATION_SECONDS.to_owned(),
                ),
                apex_notify::names::SEND_DURATION_BUCKETS,
            )
            .expect("send buckets are not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    apex_billing::names::DUNNING_RECOVERY_SECONDS.to_owned(),
                ),
                apex_billing::names::DUNNING_RECOVERY_SECONDS_BUCKETS,
            )
            .expect("recovery-days buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        if metrics::set_global_recorder(recorder).is_ok() {
            apex_core::telemetry::describe(names::ALL);
            apex_core::telemetry::describe(apex_stripe::names::ALL);
            apex_core::telemetry::describe(apex_notify::names::ALL);
            apex_core::telemetry::describe(apex_billing::names::ALL);
        }
        handle
    })
}

/// Runs the cron process until `shutdown` resolves: connects and migrates, serves
/// `/healthz` and `/metrics` on `listener`, schedules the jobs; then lets runs in flight
/// finish within the grace period and returns.
pub async fn run(
    config: CronConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CronError> {
    let metrics = prometheus();
    let pool = config.stores.connect_postgres().await?;
    if config.migrate_on_start {
        apex_core::migrate::migrate_postgres(&pool).await?;
    }
    // Every job's series from the start, and when it last succeeded, from the history.
    let last = runs::last_successes(&pool).await?;
    for job in &config.jobs {
        for status in ["succeeded", "failed", "skipped"] {
            metrics::counter!(names::RUNS_TOTAL, "job" => job.name.clone(), "status" => status)
                .increment(0);
        }
        if let Some(at) = last.get(&job.name) {
            metrics::gauge!(names::LAST_SUCCESS_TIMESTAMP_SECONDS, "job" => job.name.clone())
                .set(at.timestamp() as f64);
        }
    }
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let server = tokio::spawn(server::serve(listener, metrics.clone(), stopped.clone()));
    let ctx = JobContext::from_config(&config, pool.clone());
    // `apex_stripe_invoices{status}` follows the mirror, which webhooks move at any time.
    let gauge = tokio::spawn(refresh_invoice_gauge(pool.clone(), stopped.clone()));
    let scheduled: Vec<String> = config
        .jobs
        .iter()
        .map(|j| match &j.schedule {
            Some(s) => format!("{} ({})", j.name, s.expression()),
            None => format!("{} (off)", j.name),
        })
        .collect();
    tracing::info!(
        jobs = %scheduled.join(", "),
        now = %config.clock.now(),
        simulated = config.clock.is_simulated(),
        "apex-cron scheduling"
    );
    let locks = runner::lock_pool(&config.stores.database_url, config.jobs.len()).await?;
    let scheduler = tokio::spawn(scheduler::run(
        ctx,
        locks,
        config.jobs.clone(),
        stopped,
        config.shutdown_grace,
    ));
    shutdown.await;
    tracing::info!("shutting down: no new slots; letting runs in flight finish");
    let _ = stop.send(true);
    let _ = scheduler.await;
    let _ = server.await;
    let _ = gauge.await;
    pool.close().await;
    tracing::info!("apex-cron stopped");
    Ok(())
}

/// How often the invoice-status gauge is read from the mirror.
const INVOICE_GAUGE_PERIOD: std::time::Duration = std::time::Duration::from_secs(15);

/// Sets `apex_stripe_invoices{status}` from the `invoices` table until `stop` turns true.
async fn refresh_invoice_gauge(pool: sqlx::PgPool, mut stop: tokio::sync::watch::Receiver<bool>) {
    loop {
        if let Err(e) = apex_stripe::invoicing::record_invoice_gauge(&pool).await {
            tracing::warn!(error = %e, "cannot read the invoice statuses for the gauge");
        }
        tokio::select! {
            _ = tokio::time::sleep(INVOICE_GAUGE_PERIOD) => {}
            _ = stop.wait_for(|stop| *stop) => return,
        }
    }
}
