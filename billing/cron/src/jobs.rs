//! The jobs of the cron process: the operations guide's table (`email_queue` every minute,
//! `usage_limits` hourly, `stripe_sync` daily 02:00, `dunning_retries` daily 03:00,
//! `trial_reminders` daily 09:00, `monthly_summaries` 1st 10:00, all UTC), of which a job is
//! listed here only once it does its work (all of them now), plus our own `maintenance`,
//! `invoice_close` and `dunning_postponed`. Each job's schedule
//! can be overridden (`APEX_CRON_SCHEDULE_<JOB>`: a cron expression, or `off`), and so can
//! its timeout (`APEX_CRON_TIMEOUT_SECS_<JOB>`).
//!
//! Every job is written so that one late run covers what was missed: the Stripe sync reports
//! every day of Stripe's 35-day window, maintenance removes everything past its horizon. So a
//! process that starts after missing slots runs only each job's most recent one.
//!
//! `APEX_CRON_TEST_JOBS` adds test jobs (a marked test double, for the tests of the process
//! itself): `name=EXPR[@SECONDS][~TIMEOUT][!]` separated by `;`, a name starting with
//! `test_`; the job waits SECONDS of the process's clock and succeeds, or fails with `!`; its
//! timeout is TIMEOUT seconds (default a day).

use std::str::FromStr;

use apex_billing::dunning::Policy;
use apex_billing::invoices::CloseSettings;
use apex_core::env::{ConfigError, EnvSource};
use apex_core::stores::StoreConfig;
use apex_notify::config::{EmailConfig, build_provider};
use apex_notify::queue::{QueueSettings, Worker};
use apex_stripe::client::ClientSettings;
use apex_stripe::config::StripeConfig;
use apex_stripe::invoicing::{CloseRequest, close_invoices};
use apex_stripe::sync::{SyncRequest, sync_usage};
use chrono::{DateTime, Duration, Utc};
use croner::Cron;
use serde_json::json;
use sqlx::PgPool;

use crate::clock::Clock;
use crate::runs;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobKind {
    /// The guide's Email Queue: due `email.<type>` events sent (`apex_notify::queue`).
    EmailQueue,
    /// The guide's Stripe Sync: usage of complete days as meter events.
    StripeSync,
    /// Ours: pipeline markers and run history past their horizon removed.
    Maintenance,
    /// Ours: each ended month's invoice, issued in Stripe (`apex_stripe::invoicing`).
    InvoiceClose,
    /// The guide's Dunning Retries: due payment retries made (`apex_stripe::dunning`), and
    /// the retry emails of the next 24 hours.
    DunningRetries,
    /// Ours: the hourly follow-up of dunning retries Stripe could not take (put off by
    /// `APEX_DUNNING_POSTPONE_SECS`, default an hour).
    DunningPostponed,
    /// The guide's Usage Limits: thresholds crossed recorded, alert emails enqueued
    /// (`apex_billing::alerts`).
    UsageLimits,
    /// The guide's Trial Reminders (`apex_billing::trials`).
    TrialReminders,
    /// The guide's Monthly Summaries (`apex_billing::summaries`).
    MonthlySummaries,
    /// A test double: waits `work` of the process's clock, then succeeds (or fails).
    Test {
        /// How long a run takes.
        work: Duration,
        /// Whether it fails.
        fails: bool,
    },
}

/// A job as the code defines it.
#[derive(Debug, Clone, Copy)]
pub struct JobSpec {
    /// The job's name: `cron_runs.job_name`, the `job` label, the CLI's argument.
    pub name: &'static str,
    /// Its name in the operations guide's table (or ours).
    pub guide: &'static str,
    /// Its schedule, a cron expression in UTC.
    pub schedule: &'static str,
    /// How long a run may take before it is marked failed (the process's clock).
    pub timeout_secs: i64,
    /// Whether a process that starts after a missed slot runs it (the most recent one).
    pub catch_up: bool,
    /// What it does.
    pub kind: JobKind,
    /// The variable that overrides its schedule.
    pub schedule_var: &'static str,
    /// The variable that overrides its timeout.
    pub timeout_var: &'static str,
}

/// The jobs that do their work today, in the order the guide lists them.
pub const JOBS: &[JobSpec] = &[
    JobSpec {
        name: "email_queue",
        guide: "Email Queue",
        schedule: "* * * * *",
        // A drain that outlives its minute skips the next slot rather than run beside it.
        timeout_secs: 10 * 60,
        // Every run drains whatever is due, so a missed minute needs no catch-up.
        catch_up: false,
        kind: JobKind::EmailQueue,
        schedule_var: "APEX_CRON_SCHEDULE_EMAIL_QUEUE",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_EMAIL_QUEUE",
    },
    JobSpec {
        name: "stripe_sync",
        guide: "Stripe Sync",
        schedule: "0 2 * * *",
        timeout_secs: 2 * 3_600,
        catch_up: true,
        kind: JobKind::StripeSync,
        schedule_var: "APEX_CRON_SCHEDULE_STRIPE_SYNC",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_STRIPE_SYNC",
    },
    JobSpec {
        name: "maintenance",
        guide: "Maintenance (ours)",
        schedule: "0 4 * * *",
        timeout_secs: 30 * 60,
        catch_up: true,
        kind: JobKind::Maintenance,
        schedule_var: "APEX_CRON_SCHEDULE_MAINTENANCE",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_MAINTENANCE",
    },
    JobSpec {
        name: "invoice_close",
        guide: "Monthly billing (ours)",
        // After the 02:00 usage sync of the month's last day; daily, because a month whose
        // revenue is awaited is closed on a later day.
        schedule: "0 6 * * *",
        timeout_secs: 2 * 3_600,
        catch_up: true,
        kind: JobKind::InvoiceClose,
        schedule_var: "APEX_CRON_SCHEDULE_INVOICE_CLOSE",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_INVOICE_CLOSE",
    },
    JobSpec {
        name: "dunning_retries",
        guide: "Dunning Retries",
        schedule: "0 3 * * *",
        timeout_secs: 2 * 3_600,
        // A missed 03:00 is made up at start: the retries of that day are still due.
        catch_up: true,
        kind: JobKind::DunningRetries,
        schedule_var: "APEX_CRON_SCHEDULE_DUNNING_RETRIES",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_DUNNING_RETRIES",
    },
    JobSpec {
        name: "usage_limits",
        guide: "Usage Limits",
        schedule: "0 * * * *",
        timeout_secs: 30 * 60,
        // Every run checks the period as of now: a missed hour needs no catch-up.
        catch_up: false,
        kind: JobKind::UsageLimits,
        schedule_var: "APEX_CRON_SCHEDULE_USAGE_LIMITS",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_USAGE_LIMITS",
    },
    JobSpec {
        name: "trial_reminders",
        guide: "Trial Reminders",
        schedule: "0 9 * * *",
        timeout_secs: 30 * 60,
        catch_up: true,
        kind: JobKind::TrialReminders,
        schedule_var: "APEX_CRON_SCHEDULE_TRIAL_REMINDERS",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_TRIAL_REMINDERS",
    },
    JobSpec {
        name: "monthly_summaries",
        guide: "Monthly Summaries",
        schedule: "0 10 1 * *",
        timeout_secs: 2 * 3_600,
        // A summary missed on the 1st goes when the process is back (once per month).
        catch_up: true,
        kind: JobKind::MonthlySummaries,
        schedule_var: "APEX_CRON_SCHEDULE_MONTHLY_SUMMARIES",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_MONTHLY_SUMMARIES",
    },
    JobSpec {
        name: "dunning_postponed",
        guide: "Dunning retries put off (ours)",
        // Between the daily runs: a retry Stripe could not take is put off by an hour, and
        // this makes it when it is due (only those; the others wait for 03:00).
        schedule: "30 * * * *",
        timeout_secs: 3_600,
        catch_up: false,
        kind: JobKind::DunningPostponed,
        schedule_var: "APEX_CRON_SCHEDULE_DUNNING_POSTPONED",
        timeout_var: "APEX_CRON_TIMEOUT_SECS_DUNNING_POSTPONED",
    },
];

/// The longest timeout a job may have, in seconds: a week.
pub const MAX_TIMEOUT_SECS: i64 = 7 * 86_400;

/// The prefix of the schedule overrides.
pub const SCHEDULE_PREFIX: &str = "APEX_CRON_SCHEDULE_";
/// The prefix of the timeout overrides.
pub const TIMEOUT_PREFIX: &str = "APEX_CRON_TIMEOUT_SECS_";

/// A parsed cron expression.
#[derive(Debug, Clone)]
pub struct Schedule {
    expression: String,
    cron: Cron,
}

impl Schedule {
    /// Parses `expression` (five fields, UTC; `croner` also takes `@daily` and friends). An
    /// expression that never comes (`0 0 30 2 *`, February 30th) is refused too.
    pub fn parse(expression: &str) -> Result<Self, String> {
        let cron = Cron::from_str(expression.trim()).map_err(|e| e.to_string())?;
        let schedule = Self {
            expression: expression.trim().to_owned(),
            cron,
        };
        if schedule.next_after(Utc::now()).is_none() {
            return Err("no time ever matches it".to_owned());
        }
        Ok(schedule)
    }

    /// The expression as configured.
    pub fn expression(&self) -> &str {
        &self.expression
    }

    /// The first slot strictly after `after`.
    pub fn next_after(&self, after: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_next_occurrence(&after, false).ok()
    }

    /// The last slot at or before `at`.
    pub fn last_at_or_before(&self, at: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cron.find_previous_occurrence(&at, true).ok()
    }
}

/// A job as this process runs it: its spec with the configured schedule and timeout.
#[derive(Debug, Clone)]
pub struct Job {
    /// The name.
    pub name: String,
    /// The guide's name.
    pub guide: String,
    /// When it runs; `None` when configured `off`.
    pub schedule: Option<Schedule>,
    /// How long a run may take.
    pub timeout: Duration,
    /// Whether a missed slot is caught up at start.
    pub catch_up: bool,
    /// What it does.
    pub kind: JobKind,
}

/// The jobs with the environment's overrides, and the test jobs of `APEX_CRON_TEST_JOBS`.
/// A bad expression or timeout names the job and the variable; an override naming no job is
/// an error that lists the jobs.
pub fn jobs_from_env(env: &EnvSource) -> Result<Vec<Job>, ConfigError> {
    let mut jobs = Vec::new();
    for spec in JOBS {
        let expression = env
            .optional(spec.schedule_var)
            .unwrap_or_else(|| spec.schedule.to_owned());
        let schedule = if expression.eq_ignore_ascii_case("off") {
            None
        } else {
            Some(
                Schedule::parse(&expression).map_err(|e| ConfigError::Invalid {
                    name: spec.schedule_var,
                    reason: format!(
                        "job {}: {expression:?} is not a cron expression (or off): {e}",
                        spec.name
                    ),
                })?,
            )
        };
        let timeout_secs: i64 = env.parse_or(spec.timeout_var, spec.timeout_secs)?;
        if !(1..=MAX_TIMEOUT_SECS).contains(&timeout_secs) {
            return Err(ConfigError::Invalid {
                name: spec.timeout_var,
                reason: format!(
                    "job {}: the timeout is from 1 to {MAX_TIMEOUT_SECS} seconds (a week)",
                    spec.name
                ),
            });
        }
        jobs.push(Job {
            name: spec.name.to_owned(),
            guide: spec.guide.to_owned(),
            schedule,
            timeout: Duration::seconds(timeout_secs),
            catch_up: spec.catch_up,
            kind: spec.kind,
        });
    }
    if let Some(tests) = env.optional("APEX_CRON_TEST_JOBS") {
        for test in tests.split(';').filter(|t| !t.trim().is_empty()) {
            jobs.push(test_job(test.trim())?);
        }
    }
    // Overrides are for the jobs of the table; a test job takes its schedule from
    // APEX_CRON_TEST_JOBS.
    for (prefix, what) in [(SCHEDULE_PREFIX, "schedule"), (TIMEOUT_PREFIX, "timeout")] {
        for name in env.names_with_prefix(prefix) {
            let job = name[prefix.len()..].to_ascii_lowercase();
            if !JOBS.iter().any(|j| j.name == job) {
                return Err(ConfigError::Unknown {
                    name,
                    reason: format!(
                        "it sets the {what} of a job {job:?} that does not exist: the jobs are {}",
                        job_names(&jobs[..JOBS.len()])
                    ),
                });
            }
        }
    }
    Ok(jobs)
}

/// The jobs' names, comma-separated, for messages.
pub fn job_names(jobs: &[Job]) -> String {
    jobs.iter()
        .map(|j| j.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// One `name=EXPR[@SECONDS][~TIMEOUT][!]` of `APEX_CRON_TEST_JOBS`.
fn test_job(text: &str) -> Result<Job, ConfigError> {
    let invalid = |reason: String| ConfigError::Invalid {
        name: "APEX_CRON_TEST_JOBS",
        reason,
    };
    let (name, rest) = text
        .split_once('=')
        .ok_or_else(|| invalid(format!("{text:?} is not name=EXPR[@SECONDS][~TIMEOUT][!]")))?;
    let name = name.trim();
    if !name.starts_with("test_")
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(invalid(format!(
            "test job {name:?}: names start with test_ and are lowercase letters, digits and _"
        )));
    }
    let seconds = |text: &str| {
        text.trim()
            .parse::<i64>()
            .ok()
            .filter(|s| (0..=MAX_TIMEOUT_SECS).contains(s))
            .ok_or_else(|| {
                invalid(format!(
                    "test job {name}: {text:?} is not seconds (0 to {MAX_TIMEOUT_SECS})"
                ))
            })
    };
    let (rest, fails) = match rest.trim().strip_suffix('!') {
        Some(rest) => (rest, true),
        None => (rest.trim(), false),
    };
    let (rest, timeout) = match rest.rsplit_once('~') {
        Some((rest, timeout)) => (rest, seconds(timeout)?.max(1)),
        None => (rest, 24 * 3_600),
    };
    let (expression, work) = match rest.rsplit_once('@') {
        Some((expression, work)) => (expression, seconds(work)?),
        None => (rest, 0),
    };
    let schedule = Schedule::parse(expression)
        .map_err(|e| invalid(format!("test job {name}: {expression:?}: {e}")))?;
    Ok(Job {
        name: name.to_owned(),
        guide: "test double".to_owned(),
        schedule: Some(schedule),
        timeout: Duration::seconds(timeout),
        catch_up: true,
        kind: JobKind::Test {
            work: Duration::seconds(work),
            fails,
        },
    })
}

/// What the jobs need to do their work.
#[derive(Clone)]
pub struct JobContext {
    /// Postgres.
    pub pool: PgPool,
    /// Where the stores are (ClickHouse for maintenance).
    pub stores: StoreConfig,
    /// Stripe.
    pub stripe: StripeConfig,
    /// Stripe requests per second at most (`APEX_STRIPE_RATE`).
    pub stripe_rate: f64,
    /// The process's clock.
    pub clock: Clock,
    /// How long maintenance keeps what it removes.
    pub retention: Retention,
    /// How the invoice close waits for revenue.
    pub invoicing: CloseSettings,
    /// The email provider and queue settings.
    pub email: EmailConfig,
    /// The dunning retry schedule.
    pub dunning: Policy,
    /// The usage alert thresholds.
    pub alert_thresholds: apex_billing::alerts::Thresholds,
    /// This process's name in `events.leased_by`.
    pub runner: String,
}

impl JobContext {
    /// The context of the jobs of `config`, over `pool`, for this process.
    pub fn from_config(config: &crate::config::CronConfig, pool: PgPool) -> Self {
        Self {
            pool,
            stores: config.stores.clone(),
            stripe: config.stripe.clone(),
            stripe_rate: config.stripe_rate,
            clock: config.clock,
            retention: config.retention,
            invoicing: config.invoicing,
            email: config.email.clone(),
            dunning: config.dunning.clone(),
            alert_thresholds: config.alert_thresholds.clone(),
            runner: crate::runner::runner_id(),
        }
    }
}

/// Maintenance's horizons, in days of the process's clock.
#[derive(Debug, Clone, Copy)]
pub struct Retention {
    /// `pipeline_batches` markers (ClickHouse) and batch rows (Postgres) older than this are
    /// removed, except each log's newest, from which replay resumes
    /// (`APEX_CRON_MARKER_RETENTION_DAYS`, default 7).
    pub marker_days: i64,
    /// `cron_runs` rows older than this are removed (`APEX_CRON_HISTORY_DAYS`, default 90).
    pub history_days: i64,
}

/// What a run ended with: details for `cron_runs.details`, and an error when it failed.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// What the run did (JSON object).
    pub details: serde_json::Value,
    /// Why it failed; `None` when it succeeded.
    pub error: Option<String>,
}

impl Outcome {
    fn failed(error: impl Into<String>) -> Self {
        Self {
            details: json!({}),
            error: Some(error.into()),
        }
    }
}

impl Job {
    /// Runs the job once, now.
    pub async fn run(&self, ctx: &JobContext) -> Outcome {
        match self.kind {
            JobKind::EmailQueue => email_queue(ctx).await,
            JobKind::StripeSync => stripe_sync(ctx).await,
            JobKind::Maintenance => maintenance(ctx).await,
            JobKind::InvoiceClose => invoice_close(ctx).await,
            JobKind::DunningRetries => dunning_retries(ctx, false).await,
            JobKind::DunningPostponed => dunning_retries(ctx, true).await,
            JobKind::UsageLimits => usage_limits(ctx).await,
            JobKind::TrialReminders => trial_reminders(ctx).await,
            JobKind::MonthlySummaries => monthly_summaries(ctx).await,
            JobKind::Test { work, fails } => {
                ctx.clock.sleep(work).await;
                Outcome {
                    details: json!({"test_double": true, "work_secs": work.num_seconds()}),
                    error: fails.then(|| "the test job fails on purpose".to_owned()),
                }
            }
        }
    }
}

/// The guide's every-minute Email Queue: drains every due email event. Fails when the
/// provider cannot be built or Postgres fails; per-email failures are retried or given up by
/// the queue itself (its report is the run's details).
async fn email_queue(ctx: &JobContext) -> Outcome {
    let provider = match build_provider(&ctx.email) {
        Ok(provider) => provider,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let settings = QueueSettings::from_config(&ctx.email);
    let clock = ctx.clock;
    let now = move || clock.now();
    let worker = Worker {
        pool: &ctx.pool,
        provider: provider.as_ref(),
        settings: &settings,
        name: apex_notify::queue::worker_name(&ctx.runner),
        now: &now,
    };
    match worker.drain(None).await {
        Ok(report) => Outcome {
            details: serde_json::to_value(&report).unwrap_or_else(|_| json!({})),
            // A provider that refuses us fails the run, for the alert.
            error: report
                .provider_unavailable
                .as_ref()
                .map(|reason| format!("the email provider refuses us: {reason}")),
        },
        Err(e) => Outcome::failed(e.to_string()),
    }
}

/// The guide's 03:00 Dunning Retries (`only_postponed`: the hourly follow-up of retries put
/// off). Fails when Postgres fails, Stripe has no key, or a retry was put off because Stripe
/// could not be reached or refused us (never skipped; the failed run is the alert).
async fn dunning_retries(ctx: &JobContext, only_postponed: bool) -> Outcome {
    let client = match stripe_client(ctx) {
        Ok(client) => client,
        Err(outcome) => return outcome,
    };
    let request = apex_stripe::dunning::RunRequest {
        now: ctx.clock.now(),
        only_postponed,
    };
    match apex_stripe::dunning::process(&ctx.pool, &client, &ctx.dunning, request).await {
        Ok(summary) => Outcome {
            details: serde_json::to_value(&summary).unwrap_or_else(|_| json!({})),
            error: summary.failure(),
        },
        Err(e) => Outcome::failed(e.to_string()),
    }
}

/// A job's summary as the run's details, or the error that failed it.
fn outcome_of<T: serde::Serialize>(result: Result<T, impl std::fmt::Display>) -> Outcome {
    match result {
        Ok(summary) => Outcome {
            details: serde_json::to_value(&summary).unwrap_or_else(|_| json!({})),
            error: None,
        },
        Err(e) => Outcome::failed(e.to_string()),
    }
}

/// A pooled connection, or the failed outcome.
async fn connection(
    ctx: &JobContext,
) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Outcome> {
    ctx.pool
        .acquire()
        .await
        .map_err(|e| Outcome::failed(format!("cannot reach Postgres: {e}")))
}

/// The guide's hourly Usage Limits check (`apexctl alerts check`).
async fn usage_limits(ctx: &JobContext) -> Outcome {
    match connection(ctx).await {
        Ok(mut conn) => outcome_of(
            apex_billing::alerts::check_usage_limits(
                &mut conn,
                &ctx.alert_thresholds,
                ctx.clock.now(),
            )
            .await,
        ),
        Err(outcome) => outcome,
    }
}

/// The guide's 09:00 Trial Reminders.
async fn trial_reminders(ctx: &JobContext) -> Outcome {
    match connection(ctx).await {
        Ok(mut conn) => {
            outcome_of(apex_billing::trials::send_trial_reminders(&mut conn, ctx.clock.now()).await)
        }
        Err(outcome) => outcome,
    }
}

/// The guide's Monthly Summaries, on the 1st at 10:00: the month before, once per customer.
async fn monthly_summaries(ctx: &JobContext) -> Outcome {
    match connection(ctx).await {
        Ok(mut conn) => {
            match apex_billing::summaries::send_monthly_summaries(&mut conn, ctx.clock.now()).await
            {
                // A customer whose month could not be summarised fails the run (for the
                // alert); the others went, and a rerun makes only what is missing.
                Ok(summary) => Outcome {
                    details: serde_json::to_value(&summary).unwrap_or_else(|_| json!({})),
                    error: summary.failure(),
                },
                Err(e) => Outcome::failed(e.to_string()),
            }
        }
        Err(outcome) => outcome,
    }
}

/// The Stripe client of a job, at the process's request rate; a failed outcome without a key.
fn stripe_client(ctx: &JobContext) -> Result<apex_stripe::client::StripeClient, Outcome> {
    let settings = ClientSettings {
        requests_per_second: ctx.stripe_rate,
        ..ClientSettings::default()
    };
    apex_stripe::client_from_config(&ctx.stripe, settings)
        .map_err(|e| Outcome::failed(e.to_string()))
}

/// The guide's 02:00 Stripe Sync: every complete day of Stripe's window, as of now.
async fn stripe_sync(ctx: &JobContext) -> Outcome {
    let client = match stripe_client(ctx) {
        Ok(client) => client,
        Err(outcome) => return outcome,
    };
    let request = SyncRequest {
        customer: None,
        day: None,
        now: ctx.clock.now(),
    };
    let summary = match sync_usage(&ctx.pool, &client, &request).await {
        Ok(summary) => summary,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let details = serde_json::to_value(&summary).unwrap_or_else(|_| json!({}));
    // As `apexctl stripe sync` exits 1: anything that needs a person fails the run.
    let error = if !summary.failed.is_empty() || summary.stopped_early {
        Some(customers_failed(
            summary.failed.len(),
            summary.stopped_early,
        ))
    } else if !summary.shrunk.is_empty() || !summary.unconfirmed.is_empty() {
        Some(format!(
            "{} days need a person (a total below what was reported, or an unconfirmed event)",
            summary.shrunk.len() + summary.unconfirmed.len()
        ))
    } else {
        None
    };
    Outcome { details, error }
}

/// The error of a Stripe job some customers failed in.
fn customers_failed(failed: usize, stopped_early: bool) -> String {
    format!(
        "{failed} customers failed{}",
        if stopped_early {
            "; stopped early: Stripe could not be reached"
        } else {
            ""
        }
    )
}

/// Ours, daily 06:00: every ended month's invoice (the last two months), issued in Stripe.
/// Fails when a customer failed or a review was opened for a person in this run.
async fn invoice_close(ctx: &JobContext) -> Outcome {
    let client = match stripe_client(ctx) {
        Ok(client) => client,
        Err(outcome) => return outcome,
    };
    let request = CloseRequest {
        customer: None,
        period: None,
        now: ctx.clock.now(),
        settings: ctx.invoicing,
    };
    let summary = match close_invoices(&ctx.pool, &client, &request).await {
        Ok(summary) => summary,
        Err(e) => return Outcome::failed(e.to_string()),
    };
    let _ = apex_stripe::invoicing::record_invoice_gauge(&ctx.pool).await;
    let details = serde_json::to_value(&summary).unwrap_or_else(|_| json!({}));
    let error = if !summary.failed.is_empty() || summary.stopped_early {
        Some(customers_failed(
            summary.failed.len(),
            summary.stopped_early,
        ))
    } else if !summary.reviews_opened.is_empty() {
        Some(format!(
            "{} invoices need a person: apexctl invoices pending-review",
            summary.reviews_opened.len()
        ))
    } else {
        None
    };
    Outcome { details, error }
}

/// Ours, daily: the pipeline's batch records past the replay horizon (never a log's newest,
/// from which replay resumes), and run history past its retention.
async fn maintenance(ctx: &JobContext) -> Outcome {
    let now = ctx.clock.now();
    let markers_before = now - Duration::days(ctx.retention.marker_days);
    let history_before = now - Duration::days(ctx.retention.history_days);
    let clickhouse =
        apex_pipeline::clickhouse_sink::prune_markers(&ctx.stores.clickhouse(), markers_before)
            .await;
    let postgres = prune_batches(&ctx.pool, markers_before).await;
    let history = runs::prune(&ctx.pool, history_before).await;
    let details = json!({
        "markers_before": markers_before,
        "history_before": history_before,
        "clickhouse_logs_pruned": clickhouse.as_ref().ok(),
        "postgres_batches_removed": postgres.as_ref().ok(),
        "cron_runs_removed": history.as_ref().ok(),
    });
    let errors: Vec<String> = [
        clickhouse.err().map(|e| format!("ClickHouse markers: {e}")),
        postgres.err().map(|e| format!("Postgres batches: {e}")),
        history.err().map(|e| format!("cron_runs: {e}")),
    ]
    .into_iter()
    .flatten()
    .collect();
    Outcome {
        details,
        error: (!errors.is_empty()).then(|| errors.join("; ")),
    }
}

/// How many `pipeline_batches` rows one delete removes at most: a few hundred milliseconds
/// of work, so the first run on months of rows is many short transactions, never one that
/// holds its locks and its WAL for minutes.
const PRUNE_CHUNK: i64 = 10_000;

/// Every Postgres batch row past `before` (but each log's newest), a chunk at a time.
async fn prune_batches(pool: &PgPool, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    let mut removed = 0;
    loop {
        let chunk = apex_pipeline::postgres_sink::prune_batches(pool, before, PRUNE_CHUNK).await?;
        removed += chunk;
        if chunk < PRUNE_CHUNK as u64 {
            return Ok(removed);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(text: &str) -> DateTime<Utc> {
        text.parse().unwrap()
    }

    #[test]
    fn the_guides_schedules_land_on_their_times() {
        let jobs = jobs_from_env(&EnvSource::from_pairs([])).unwrap();
        let names: Vec<&str> = jobs.iter().map(|j| j.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "email_queue",
                "stripe_sync",
                "maintenance",
                "invoice_close",
                "dunning_retries",
                "usage_limits",
                "trial_reminders",
                "monthly_summaries",
                "dunning_postponed"
            ]
        );
        // The guide's Dunning Retries at 03:00; its follow-up at half past every hour.
        assert_eq!(
            jobs[4]
                .schedule
                .as_ref()
                .unwrap()
                .next_after(at("2026-03-10T02:59:59Z")),
            Some(at("2026-03-10T03:00:00Z"))
        );
        let next = |i: usize, after: &str| jobs[i].schedule.as_ref().unwrap().next_after(at(after));
        assert_eq!(
            next(8, "2026-03-10T03:00:00Z"),
            Some(at("2026-03-10T03:30:00Z"))
        );
        // Usage Limits hourly, Trial Reminders at 09:00, Monthly Summaries on the 1st at 10:00.
        assert_eq!(
            next(5, "2026-03-10T03:00:00Z"),
            Some(at("2026-03-10T04:00:00Z"))
        );
        assert_eq!(
            next(6, "2026-03-10T03:00:00Z"),
            Some(at("2026-03-10T09:00:00Z"))
        );
        assert_eq!(
            next(7, "2026-03-10T03:00:00Z"),
            Some(at("2026-04-01T10:00:00Z"))
        );
        let minute = jobs[0].schedule.as_ref().unwrap();
        assert_eq!(
            minute.next_after(at("2026-03-10T01:59:59Z")),
            Some(at("2026-03-10T02:00:00Z"))
        );
        let sync = jobs[1].schedule.as_ref().unwrap();
        assert_eq!(
            sync.next_after(at("2026-03-10T01:59:59Z")),
            Some(at("2026-03-10T02:00:00Z"))
        );
        // Strictly after: a slot is never its own next.
        assert_eq!(
            sync.next_after(at("2026-03-10T02:00:00Z")),
            Some(at("2026-03-11T02:00:00Z"))
        );
        assert_eq!(
            sync.last_at_or_before(at("2026-03-10T02:00:00Z")),
            Some(at("2026-03-10T02:00:00Z"))
        );
        assert_eq!(
            sync.last_at_or_before(at("2026-03-10T01:00:00Z")),
            Some(at("2026-03-09T02:00:00Z"))
        );
        let monthly = Schedule::parse("0 10 1 * *").unwrap();
        assert_eq!(
            monthly.next_after(at("2026-01-31T23:00:00Z")),
            Some(at("2026-02-01T10:00:00Z"))
        );
        let hourly = Schedule::parse("0 * * * *").unwrap();
        assert_eq!(
            hourly.next_after(at("2026-01-01T00:00:00Z")),
            Some(at("2026-01-01T01:00:00Z"))
        );
    }

    #[test]
    fn schedules_and_timeouts_can_be_overridden_or_turned_off() {
        let jobs = jobs_from_env(&EnvSource::from_pairs([
            ("APEX_CRON_SCHEDULE_STRIPE_SYNC", "30 1 * * *"),
            ("APEX_CRON_SCHEDULE_MAINTENANCE", "off"),
            ("APEX_CRON_TIMEOUT_SECS_STRIPE_SYNC", "60"),
        ]))
        .unwrap();
        assert_eq!(
            jobs[1].schedule.as_ref().unwrap().expression(),
            "30 1 * * *"
        );
        assert_eq!(jobs[1].timeout, Duration::seconds(60));
        assert!(jobs[2].schedule.is_none());
    }

    #[test]
    fn bad_overrides_name_the_job_and_the_variable() {
        for (name, value, says) in [
            (
                "APEX_CRON_SCHEDULE_STRIPE_SYNC",
                "61 * * * *",
                "job stripe_sync",
            ),
            (
                "APEX_CRON_SCHEDULE_STRIPE_SYNC",
                "every day",
                "job stripe_sync",
            ),
            (
                "APEX_CRON_SCHEDULE_STRIPE_SYNC",
                "0 0 30 2 *",
                "no time ever matches it",
            ),
            ("APEX_CRON_TIMEOUT_SECS_MAINTENANCE", "0", "job maintenance"),
            (
                "APEX_CRON_TIMEOUT_SECS_MAINTENANCE",
                "9223372036854775807",
                "a week",
            ),
            ("APEX_CRON_TIMEOUT_SECS_MAINTENANCE", "soon", "soon"),
            (
                "APEX_CRON_SCHEDULE_STRIPE_SYNCC",
                "0 2 * * *",
                "stripe_sync, maintenance",
            ),
            (
                "APEX_CRON_TIMEOUT_SECS_NOPE",
                "5",
                "stripe_sync, maintenance",
            ),
            ("APEX_CRON_TEST_JOBS", "tick=* * * * *", "test_"),
            ("APEX_CRON_TEST_JOBS", "test_tick=* * * *", "test_tick"),
            ("APEX_CRON_TEST_JOBS", "test_tick=* * * * *@x", "test_tick"),
            (
                "APEX_CRON_TEST_JOBS",
                "test_tick=* * * * *~99999999999999",
                "test_tick",
            ),
        ] {
            let err = jobs_from_env(&EnvSource::from_pairs([(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(name), "{name}={value}: {err}");
            assert!(err.contains(says), "{name}={value}: {err}");
        }
    }

    #[test]
    fn test_jobs_are_parsed() {
        let jobs = jobs_from_env(&EnvSource::from_pairs([(
            "APEX_CRON_TEST_JOBS",
            "test_tick=* * * * *; test_slow=*/2 * * * *@150~90; test_bad=0 * * * *!",
        )]))
        .unwrap();
        let first = JOBS.len();
        assert_eq!(jobs[first + 1].timeout, Duration::seconds(90));
        assert_eq!(jobs[first].timeout, Duration::hours(24));
        let tests: Vec<(&str, JobKind)> = jobs[first..]
            .iter()
            .map(|j| (j.name.as_str(), j.kind))
            .collect();
        assert_eq!(
            tests,
            [
                (
                    "test_tick",
                    JobKind::Test {
                        work: Duration::zero(),
                        fails: false
                    }
                ),
                (
                    "test_slow",
                    JobKind::Test {
                        work: Duration::seconds(150),
                        fails: false
                    }
                ),
                (
                    "test_bad",
                    JobKind::Test {
                        work: Duration::zero(),
                        fails: true
                    }
                ),
            ]
        );
    }
}
