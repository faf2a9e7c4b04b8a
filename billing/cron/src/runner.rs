//! Running one slot of one job, once across every process that shares the database: take
//! the job's lock (on a lock connection that no other run uses meanwhile), claim the slot's
//! row, run the job within its timeout, record the outcome, release the lock. When the lock
//! is held, the holder's running row tells why: the same slot (another replica has it:
//! nothing to do) or another one (its run is still going: this slot is recorded `skipped`).
//! A slot found `running` under a free lock is a dead runner's, and is run once more
//! ([`crate::runs::claim`]).

use std::time::{Duration as StdDuration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use chrono::{DateTime, Utc};
use sqlx::pool::PoolConnection;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{PgConnection, PgPool, Postgres};

use crate::jobs::{Job, JobContext, Outcome};
use crate::{names, runs};

/// How a slot ended, for the caller (the scheduler logs it; `apexctl cron run` exits by it).
#[derive(Debug, Clone, PartialEq)]
pub enum SlotResult {
    /// The job ran and succeeded.
    Succeeded(serde_json::Value),
    /// The job ran and failed (or timed out), or its runners died twice: its row says so.
    Failed(String),
    /// Nothing ran and no row was written: Postgres could not be reached or answered with
    /// an error before the slot was claimed. The scheduler tries again (see
    /// [`crate::scheduler`]); the slot is no one else's meanwhile.
    Unclaimed(String),
    /// Another run of the job held its lock: the slot was recorded skipped.
    Skipped,
    /// The slot had been run already (by another process, or before).
    AlreadyDone,
}

/// The identity of this process in `cron_runs.runner`: host and pid.
pub fn runner_id() -> String {
    let host = std::fs::read_to_string("/etc/hostname")
        .ok()
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned());
    format!("{host}:{}", std::process::id())
}

/// Counts a slot's end in the metrics.
fn count(job: &str, status: &'static str) {
    metrics::counter!(names::RUNS_TOTAL, "job" => job.to_owned(), "status" => status).increment(1);
}

/// TCP keepalive of the lock sessions, as Postgres settings of each session (seconds idle,
/// seconds between probes, probes): the server ends the session of a runner whose host
/// vanished (no FIN, no RST) within about a minute and releases its locks, where the
/// system default (two hours idle) would keep the job locked for that long.
const LOCK_KEEPALIVE: [(&str, &str); 3] = [
    ("tcp_keepalives_idle", "30"),
    ("tcp_keepalives_interval", "10"),
    ("tcp_keepalives_count", "3"),
];

/// The connections runs hold their jobs' locks on: a session-level advisory lock lives as
/// long as its connection, so a runner that dies (or a run cancelled at shutdown) drops it
/// and Postgres releases the lock. Pooled, because a connection of its own per run cost more
/// than the run of a quick job (a minute job's slots would find the previous one still
/// connecting); see [`run_slot`] for how a connection that may still hold a lock is kept out
/// of the pool.
/// The sessions keep [`LOCK_KEEPALIVE`]. A session-level lock needs a session of its own:
/// `DATABASE_URL` must reach Postgres directly or through a pooler in session mode, never
/// one in transaction mode (PgBouncer's `pool_mode = transaction`).
pub async fn lock_pool(database_url: &str, jobs: usize) -> Result<PgPool, sqlx::Error> {
    let options = database_url
        .parse::<PgConnectOptions>()?
        .options(LOCK_KEEPALIVE);
    PgPoolOptions::new()
        // One per job that can run at once, plus the skipped-slot checks of the next slots.
        .max_connections(u32::try_from(jobs).unwrap_or(u32::MAX).saturating_add(2))
        .min_connections(0)
        .connect_with(options)
        .await
}

/// A lock connection that goes back to the pool only once its lock is known released: one
/// dropped otherwise (a panicking job, a run cancelled at shutdown, a failed unlock) is
/// closed instead, so no pooled connection keeps a job's lock (an advisory lock is
/// re-entrant within its session, so a later run on it would take it again unnoticed).
struct LockSession(Option<PoolConnection<Postgres>>);

impl LockSession {
    fn conn(&mut self) -> &mut PgConnection {
        self.0
            .as_mut()
            .expect("a lock session holds its connection until it ends")
    }

    /// Returns the connection to the pool: its lock is released.
    fn release(mut self) {
        drop(self.0.take());
    }
}

impl Drop for LockSession {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take() {
            // Closing the socket ends the session, and the lock with it.
            drop(conn.detach());
        }
    }
}

/// Runs `slot` of `job` under the once-only rules, holding the job's lock on a connection of
/// `locks` (see [`lock_pool`]); the job itself works through `ctx`.
pub async fn run_slot(
    ctx: &JobContext,
    locks: &PgPool,
    runner: &str,
    job: &Job,
    slot: DateTime<Utc>,
) -> SlotResult {
    let mut session = match locks.acquire().await {
        Ok(conn) => LockSession(Some(conn)),
        Err(e) => return unclaimed(&job.name, format!("cannot connect to Postgres: {e}")),
    };
    let (result, released) = locked_run(ctx, session.conn(), runner, job, slot).await;
    if released {
        session.release();
    }
    result
}

/// A slot that could not be claimed: counted failed (an alert on failures sees it), with
/// no row.
fn unclaimed(job: &str, error: String) -> SlotResult {
    count(job, "failed");
    SlotResult::Unclaimed(error)
}

/// Retries of recording a run's outcome: 0.5 s doubling to 8 s, six times (about 30 s).
const FINISH_BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(StdDuration::from_millis(500))
    .with_max_delay(StdDuration::from_secs(8))
    .with_factor(2.0)
    .with_max_times(6);

/// How long a slot waits for the lock holder's row to show which slot it runs (it takes the
/// lock a moment before it claims its row, and frees it a moment after it records the end).
const HOLDER_WAIT: StdDuration = StdDuration::from_millis(20);
/// How many times it looks before it records the slot skipped anyway.
const HOLDER_LOOKS: usize = 100;

/// Takes the job's lock on `conn` and runs the slot; true beside the result when `conn`
/// holds no lock of the job any more.
async fn locked_run(
    ctx: &JobContext,
    conn: &mut PgConnection,
    runner: &str,
    job: &Job,
    slot: DateTime<Utc>,
) -> (SlotResult, bool) {
    let name = job.name.as_str();
    let mut looks = 0;
    loop {
        match runs::try_lock(conn, name).await {
            Ok(true) => break,
            Ok(false) => {}
            Err(e) => {
                let error = format!("cannot take the job's lock: {e}");
                return (unclaimed(name, error), false);
            }
        }
        looks += 1;
        // Someone holds the job's lock: which slot does it run?
        let holder = match runs::holder_slot(&ctx.pool, name).await {
            Ok(holder) => holder,
            Err(e) => {
                let error = format!("cannot read the running slot: {e}");
                return (unclaimed(name, error), true);
            }
        };
        match holder {
            // Another process runs this very slot.
            Some(running) if running == slot => return (SlotResult::AlreadyDone, true),
            // Another slot of the job is still running: this one is skipped, unless that run
            // has just ended (then the lock is tried again).
            Some(_) => {
                if let Some(result) = skip(ctx, runner, name, slot).await {
                    return (result, true);
                }
            }
            // The holder is claiming its row or has just recorded its end: look again.
            None => {}
        }
        if looks >= HOLDER_LOOKS {
            // Never guessed: a slot recorded skipped while its own run was starting would
            // never run.
            let error = "the job's lock stayed held with no running slot to show for it";
            return (unclaimed(name, error.to_owned()), true);
        }
        tokio::time::sleep(HOLDER_WAIT).await;
    }
    let result = claimed_run(ctx, conn, runner, job, slot).await;
    match runs::unlock(conn, name).await {
        Ok(true) => (result, true),
        Ok(false) => {
            tracing::warn!(
                job = name,
                "cron: the job's lock was not held at the end of its run"
            );
            (result, false)
        }
        Err(e) => {
            // The connection is closed instead of pooled, which releases the lock.
            tracing::warn!(job = name, error = %e, "cron: cannot release the job's lock");
            (result, false)
        }
    }
}

/// Records `slot` skipped: another run of the job holds its lock. `None` when that run has
/// just ended (nothing recorded: the caller tries the lock again).
async fn skip(
    ctx: &JobContext,
    runner: &str,
    name: &str,
    slot: DateTime<Utc>,
) -> Option<SlotResult> {
    match runs::record_skipped(&ctx.pool, name, slot, ctx.clock.now(), runner).await {
        Ok(true) => {
            count(name, "skipped");
            tracing::warn!(job = name, %slot, "cron: slot skipped: the job's previous run is still running");
            Some(SlotResult::Skipped)
        }
        Ok(false) => None,
        Err(e) => Some(unclaimed(
            name,
            format!("cannot record the skipped slot: {e}"),
        )),
    }
}

async fn claimed_run(
    ctx: &JobContext,
    conn: &mut PgConnection,
    runner: &str,
    job: &Job,
    slot: DateTime<Utc>,
) -> SlotResult {
    let name = job.name.as_str();
    let claim = match runs::claim(conn, name, slot, ctx.clock.now(), runner).await {
        Ok(claim) => claim,
        Err(e) => return unclaimed(name, format!("cannot claim the slot: {e}")),
    };
    let (id, attempt) = match claim {
        runs::Claim::Done => return SlotResult::AlreadyDone,
        runs::Claim::GaveUp { id } => {
            count(name, "failed");
            tracing::error!(job = name, %slot, id, "cron: a slot whose runners died twice is given up");
            return SlotResult::Failed("its runners died twice; given up".into());
        }
        runs::Claim::Run { id, attempt } => {
            if attempt > 1 {
                // The attempt of the runner that died.
                count(name, "failed");
                tracing::warn!(job = name, %slot, attempt, "cron: running a slot once more: its runner died");
            }
            (id, attempt)
        }
    };
    tracing::info!(job = name, %slot, id, "cron: run started");
    let started = ctx.clock.now();
    let real_start = Instant::now();
    let deadline = started
        .checked_add_signed(job.timeout)
        .unwrap_or(DateTime::<Utc>::MAX_UTC);
    let outcome = tokio::select! {
        outcome = job.run(ctx) => outcome,
        () = ctx.clock.sleep_until(deadline) => Outcome {
            details: serde_json::json!({}),
            error: Some(format!(
                "timed out after {} s (its timeout); the run was stopped",
                job.timeout.num_seconds()
            )),
        },
    };
    let finished = ctx.clock.now();
    let elapsed = if ctx.clock.is_simulated() {
        (finished - started).num_milliseconds().max(0) as f64 / 1e3
    } else {
        real_start.elapsed().as_secs_f64()
    };
    metrics::histogram!(names::RUN_DURATION_SECONDS, "job" => name.to_owned()).record(elapsed);
    // The outcome is recorded while the lock is still held, retried through a short outage:
    // a row left `running` under a free lock would be taken for a dead runner's and the job,
    // done already, run once more.
    let mut backoff = FINISH_BACKOFF.build();
    loop {
        let recorded = runs::finish(
            &ctx.pool,
            id,
            attempt,
            finished,
            outcome.error.as_deref(),
            &outcome.details,
        )
        .await;
        match recorded {
            Ok(true) => break,
            Ok(false) => {
                // Another process took the slot over; its attempt's outcome stands.
                tracing::error!(job = name, %slot, attempt, "cron: the slot was taken over while this run went on; its outcome is not recorded");
                count(name, "failed");
                return SlotResult::Failed(
                    "the slot was taken over by another process while this run went on".into(),
                );
            }
            Err(e) => match backoff.next() {
                Some(wait) => {
                    tracing::warn!(job = name, %slot, error = %e, "cron: cannot record the run's outcome yet; retrying");
                    tokio::time::sleep(wait).await;
                }
                None => {
                    // The row stays `running` and the lock is released: a sweep runs the slot
                    // once more (every job is idempotent, so that costs only time).
                    tracing::error!(job = name, %slot, error = %e, "cron: cannot record the run's outcome");
                    count(name, "failed");
                    return SlotResult::Failed(format!("cannot record the outcome: {e}"));
                }
            },
        }
    }
    match outcome.error {
        None => {
            count(name, "succeeded");
            metrics::gauge!(names::LAST_SUCCESS_TIMESTAMP_SECONDS, "job" => name.to_owned())
                .set(finished.timestamp() as f64);
            tracing::info!(job = name, %slot, seconds = elapsed, "cron: run succeeded");
            SlotResult::Succeeded(outcome.details)
        }
        Some(error) => {
            count(name, "failed");
            tracing::error!(job = name, %slot, %error, "cron: run failed");
            SlotResult::Failed(error)
        }
    }
}
