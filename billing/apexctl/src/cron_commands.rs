//! `apexctl cron ...`: the cron process's jobs by hand. `list` shows each job's schedule,
//! last run and next run; `run JOB` is the guide's "Manual Cron Execution": one run now,
//! through the same once-only rules as the process (the job's lock, a `cron_runs` row);
//! `history` reads `cron_runs`.

use std::process::ExitCode;

use anyhow::Context;
use apex_cron::config::CronConfig;
use apex_cron::jobs::{Job, JobContext, job_names};
use apex_cron::runner::{self, SlotResult};
use apex_cron::runs;
use chrono::{DateTime, SubsecRound, Utc};
use clap::Subcommand;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum CronCommand {
    /// List the jobs: schedule, last run and its status, next run.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run one job now, through the same once-only rules as the cron process (the guide's
    /// Manual Cron Execution). Exits 1 if it failed or another run of it is in progress.
    Run {
        /// The job's name (see `apexctl cron list`).
        job: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The run history, newest slot first.
    History {
        /// Only this job.
        #[arg(long)]
        job: Option<String>,
        /// Rows at most (1 to 10000).
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

/// The job named `name`, or an error that lists the jobs.
fn find<'a>(jobs: &'a [Job], name: &str) -> anyhow::Result<&'a Job> {
    jobs.iter()
        .find(|j| j.name == name)
        .with_context(|| format!("there is no job {name:?}: the jobs are {}", job_names(jobs)))
}

pub(crate) async fn run(
    command: CronCommand,
    pool: PgPool,
    config: &CronConfig,
) -> anyhow::Result<ExitCode> {
    let now = config.clock.now();
    match command {
        CronCommand::List { json } => {
            let latest = runs::latest(&pool).await?;
            let rows: Vec<serde_json::Value> = config
                .jobs
                .iter()
                .map(|job| {
                    let last = latest.get(&job.name);
                    serde_json::json!({
                        "job": job.name,
                        "guide": job.guide,
                        "schedule": job.schedule.as_ref().map_or("off", |s| s.expression()),
                        "timeout_secs": job.timeout.num_seconds(),
                        "last_slot": last.map(|r| r.scheduled_for),
                        "last_status": last.map(|r| r.status.as_str()),
                        "last_error": last.and_then(|r| r.error_message.as_deref()),
                        "next_slot": job.schedule.as_ref().and_then(|s| s.next_after(now)),
                    })
                })
                .collect();
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                println!("now {}", format_time(Some(now)));
                for job in &config.jobs {
                    let last = latest.get(&job.name);
                    println!(
                        "{}\t{}\tlast {} {}\tnext {}",
                        job.name,
                        job.schedule.as_ref().map_or("off", |s| s.expression()),
                        format_time(last.map(|r| r.scheduled_for)),
                        last.map_or("-", |r| r.status.as_str()),
                        format_time(job.schedule.as_ref().and_then(|s| s.next_after(now))),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CronCommand::Run { job, json } => {
            let job = find(&config.jobs, &job)?;
            let ctx = JobContext::from_config(config, pool);
            // A manual run is a slot of its own, at this microsecond (what Postgres keeps).
            let slot = now.trunc_subsecs(6);
            let locks = runner::lock_pool(&config.stores.database_url, 1)
                .await
                .context("cannot connect to Postgres (DATABASE_URL)")?;
            let result = runner::run_slot(&ctx, &locks, &runner::runner_id(), job, slot).await;
            locks.close().await;
            let (status, ok, said) = match &result {
                SlotResult::Succeeded(_) => ("succeeded", true, String::new()),
                SlotResult::Failed(error) => ("failed", false, error.clone()),
                SlotResult::Unclaimed(error) => {
                    ("not_run", false, format!("nothing was run: {error}"))
                }
                SlotResult::Skipped => (
                    "skipped",
                    false,
                    "another run of this job is in progress; nothing was run".to_owned(),
                ),
                SlotResult::AlreadyDone => (
                    "already_done",
                    false,
                    "this moment's slot was run already; try again".to_owned(),
                ),
            };
            if json {
                let details = match &result {
                    SlotResult::Succeeded(details) => details.clone(),
                    _ => serde_json::json!({}),
                };
                println!(
                    "{}",
                    serde_json::json!({"job": job.name, "slot": slot, "status": status,
                        "error": (!said.is_empty()).then_some(&said), "details": details})
                );
            } else if ok {
                println!("{} at {}: succeeded", job.name, format_time(Some(slot)));
            } else {
                println!(
                    "{} at {}: {status}: {said}",
                    job.name,
                    format_time(Some(slot))
                );
            }
            Ok(if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        CronCommand::History { job, limit, json } => {
            anyhow::ensure!((1..=10_000).contains(&limit), "--limit must be 1 to 10000");
            if let Some(name) = &job {
                find(&config.jobs, name)?;
            }
            let rows = runs::history(&pool, job.as_deref(), limit).await?;
            if json {
                println!("{}", serde_json::to_string(&rows)?);
            } else {
                for r in rows {
                    println!(
                        "{}\t{}\t{}\tattempts {}\t{}{}",
                        format_time(Some(r.scheduled_for)),
                        r.job_name,
                        r.status,
                        r.attempts,
                        r.finished_at
                            .map(|f| format!("took {} s", (f - r.started_at).num_seconds()))
                            .unwrap_or_else(|| "running".to_owned()),
                        r.error_message
                            .map(|e| format!("\t{e}"))
                            .unwrap_or_default()
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn format_time(at: Option<DateTime<Utc>>) -> String {
    at.map_or("-".to_owned(), |t| {
        t.format("%Y-%m-%d %H:%M:%S UTC").to_string()
    })
}
