//! The scheduler: one loop per scheduled job that waits, on the process's clock, for the
//! job's next slot and starts its run; a catch-up of each job's most recent missed slot at
//! start; a sweep that finds slots whose runner died; and an orderly stop.
//!
//! Runs are tasks of their own, so a slot that comes while the job's previous run is still
//! going is claimed and recorded `skipped` on time rather than queued behind it.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use sqlx::PgPool;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::jobs::{Job, JobContext};
use crate::runner::{self, SlotResult};
use crate::runs;

/// How often each process looks for slots whose runner died (real time).
pub const SWEEP_EVERY: Duration = Duration::from_secs(2);

/// What the loops share.
struct Shared {
    ctx: JobContext,
    locks: PgPool,
    runner: String,
    jobs: BTreeMap<String, Job>,
    stop: watch::Receiver<bool>,
    runs: Mutex<JoinSet<()>>,
}

impl Shared {
    /// Starts the run of `slot` of `job` as a task of its own. A slot that could not be
    /// claimed (Postgres unreachable, or erring) is tried again with backoff until it is
    /// claimed, the job's next slot comes (which covers what this one would have done), or
    /// the process stops.
    fn start(self: &Arc<Self>, job: &Job, slot: DateTime<Utc>, why: &'static str) {
        let (shared, job) = (self.clone(), job.clone());
        let mut runs = self.runs.lock().unwrap_or_else(|p| p.into_inner());
        // Finished runs leave the set here, so it holds only what is in flight.
        while runs.try_join_next().is_some() {}
        runs.spawn(async move {
            let give_up_at = job
                .schedule
                .as_ref()
                .and_then(|s| s.next_after(slot))
                .or_else(|| slot.checked_add_signed(job.timeout))
                .unwrap_or(DateTime::<Utc>::MAX_UTC);
            let mut backoff = UNCLAIMED_BACKOFF.build();
            let mut stop = shared.stop.clone();
            loop {
                let result =
                    runner::run_slot(&shared.ctx, &shared.locks, &shared.runner, &job, slot)
                        .await;
                match &result {
                    SlotResult::Failed(error) => {
                        tracing::warn!(job = job.name, %slot, why, %error, "cron: slot failed");
                    }
                    SlotResult::Unclaimed(error) => {
                        let wait = backoff.next().unwrap_or(UNCLAIMED_MAX_WAIT);
                        let clock = shared.ctx.clock;
                        let retry_at = clock.now().checked_add_signed(clock.span(wait));
                        if *stop.borrow() || retry_at.is_none_or(|at| at >= give_up_at) {
                            tracing::error!(job = job.name, %slot, why, %error, "cron: slot not run: it could not be claimed before the job's next slot");
                            return;
                        }
                        tracing::warn!(job = job.name, %slot, why, %error, ?wait, "cron: slot not claimed yet; retrying");
                        tokio::select! {
                            () = tokio::time::sleep(wait) => continue,
                            () = stopped(&mut stop) => return,
                        }
                    }
                    _ => {}
                }
                return;
            }
        });
    }
}

/// Retries of a slot that could not be claimed: 1 s doubling to 30 s (real time).
const UNCLAIMED_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_secs(1))
    .with_max_delay(UNCLAIMED_MAX_WAIT)
    .with_factor(2.0)
    .without_max_times();
const UNCLAIMED_MAX_WAIT: Duration = Duration::from_secs(30);

/// Runs the schedule of `jobs` until `stop` turns true, then lets the runs in flight finish
/// for up to `grace` (real time) and stops what is left (their rows stay `running` with
/// their locks released, so the next process runs those slots once more). Runs hold their
/// jobs' locks on connections of `locks` ([`runner::lock_pool`]), closed on return.
pub async fn run(
    ctx: JobContext,
    locks: PgPool,
    jobs: Vec<Job>,
    mut stop: watch::Receiver<bool>,
    grace: Duration,
) {
    let shared = Arc::new(Shared {
        ctx,
        locks: locks.clone(),
        runner: runner::runner_id(),
        jobs: jobs
            .iter()
            .filter(|j| j.schedule.is_some())
            .map(|j| (j.name.clone(), j.clone()))
            .collect(),
        runs: Mutex::new(JoinSet::new()),
        stop: stop.clone(),
    });
    let mut loops = JoinSet::new();
    for job in jobs.into_iter().filter(|j| j.schedule.is_some()) {
        loops.spawn(job_loop(shared.clone(), job, stop.clone()));
    }
    loops.spawn(sweep_loop(shared.clone(), stop.clone()));
    let _ = stop.wait_for(|stop| *stop).await;
    while loops.join_next().await.is_some() {}
    let mut runs = std::mem::take(&mut *shared.runs.lock().unwrap_or_else(|p| p.into_inner()));
    if !runs.is_empty() {
        tracing::info!(runs = runs.len(), "cron: letting the runs in flight finish");
    }
    let finished =
        tokio::time::timeout(grace, async { while runs.join_next().await.is_some() {} }).await;
    if finished.is_err() {
        tracing::warn!(
            runs = runs.len(),
            "cron: shutdown grace over; stopping the runs left (their slots run again at the next start)"
        );
        runs.shutdown().await;
    }
    // Ends every lock session, so nothing this process ran is left locked behind it.
    locks.close().await;
}

/// Waits until `stop` turns true.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|stop| *stop).await;
}

/// One job's schedule: the catch-up, then each slot on time.
async fn job_loop(shared: Arc<Shared>, job: Job, mut stop: watch::Receiver<bool>) {
    let Some(schedule) = job.schedule.clone() else {
        return;
    };
    let clock = shared.ctx.clock;
    let mut after = clock.now();
    if job.catch_up
        && let Some(last) = schedule.last_at_or_before(after)
    {
        match runs::missed(&shared.ctx.pool, &job.name, last).await {
            Ok(true) => {
                tracing::info!(job = job.name, slot = %last, "cron: catching up the most recent missed slot");
                shared.start(&job, last, "catch-up");
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(job = job.name, error = %e, "cron: cannot look for a missed slot")
            }
        }
    }
    loop {
        let Some(next) = schedule.next_after(after) else {
            tracing::warn!(job = job.name, "cron: the schedule has no next slot");
            return;
        };
        tokio::select! {
            () = clock.sleep_until(next) => {}
            () = stopped(&mut stop) => return,
        }
        shared.start(&job, next, "scheduled");
        after = next;
    }
}

/// Looks for slots recorded `running` and tries each: under a free lock its runner died, and
/// the slot is run once more; under a held lock it is alive and nothing happens.
async fn sweep_loop(shared: Arc<Shared>, mut stop: watch::Receiver<bool>) {
    let mut every = tokio::time::interval(SWEEP_EVERY);
    loop {
        tokio::select! {
            _ = every.tick() => {}
            () = stopped(&mut stop) => return,
        }
        let running = match runs::running(&shared.ctx.pool).await {
            Ok(running) => running,
            Err(e) => {
                tracing::warn!(error = %e, "cron: cannot look for dead runners");
                continue;
            }
        };
        for (name, slot) in running {
            // A job this process does not run (configured off, or only elsewhere) is left to
            // the processes that run it.
            if let Some(job) = shared.jobs.get(&name) {
                shared.start(job, slot, "sweep");
            }
        }
    }
}
