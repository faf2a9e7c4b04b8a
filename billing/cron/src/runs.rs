//! The `cron_runs` table, one row per scheduled slot of a job (`UNIQUE (job_name,
//! scheduled_for)`), and the job locks. Every query on the table is here.
//!
//! A run holds its job's Postgres advisory lock (session level, on a connection no other run
//! uses meanwhile, so a runner that dies releases it with its connection) from before it
//! claims its slot until after it records the outcome. Hence: a `running` row whose job lock is free belongs
//! to a dead runner; a slot that comes while the lock holder runs another slot is
//! `skipped`; a slot whose own run holds the lock (another replica) is left to it.
//!
//! Times in the table are the process's clock (simulated in tests), not the database's.

use std::collections::BTreeMap;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::{PgConnection, PgExecutor};

/// The first key of every job lock ("cron"); the second is `hashtext(job_name)`.
const LOCK_NAMESPACE: i32 = 0x6372_6f6e;

/// How many times a slot is run at most: once, and once more when its first runner died.
pub const MAX_ATTEMPTS: i32 = 2;

/// Takes the job's lock on `conn` if it is free.
pub async fn try_lock(conn: &mut PgConnection, job: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_try_advisory_lock($1, hashtext($2))")
        .bind(LOCK_NAMESPACE)
        .bind(job)
        .fetch_one(conn)
        .await
}

/// Releases the job's lock held on `conn`.
pub async fn unlock(conn: &mut PgConnection, job: &str) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_advisory_unlock($1, hashtext($2))")
        .bind(LOCK_NAMESPACE)
        .bind(job)
        .fetch_one(conn)
        .await
}

/// Records `slot` of `job` as skipped at `now`, provided another slot of the job is still
/// `running` (the run that holds the lock) and this slot has no row yet. True when this call
/// recorded it; false when the slot has a row, or when the other run has just ended (the
/// caller then tries the lock again), so a slot is never marked skipped beside no run.
pub async fn record_skipped(
    db: impl PgExecutor<'_>,
    job: &str,
    slot: DateTime<Utc>,
    now: DateTime<Utc>,
    runner: &str,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "INSERT INTO cron_runs (job_name, scheduled_for, started_at, finished_at, status, \
             error_message, runner) \
         SELECT $1, $2, $3, $3, 'skipped', 'the job''s previous run was still running', $4 \
         WHERE EXISTS (SELECT 1 FROM cron_runs \
             WHERE job_name = $1 AND status = 'running' AND scheduled_for <> $2) \
         ON CONFLICT (job_name, scheduled_for) DO NOTHING",
    )
    .bind(job)
    .bind(slot)
    .bind(now)
    .bind(runner)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// What claiming a slot found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The slot is ours to run, as row `id`, attempt `attempt`.
    Run {
        /// The row.
        id: i64,
        /// 1, or 2 for a slot whose first runner died.
        attempt: i32,
    },
    /// The slot was run already (or given up): nothing to do.
    Done,
    /// The slot's runner died and it was run the most times allowed: marked failed.
    GaveUp {
        /// The row.
        id: i64,
    },
}

/// Claims `slot` of `job` at `now` for `runner`, recording `conn`'s session as the one that
/// holds the lock for it. The caller holds the job's lock on `conn`,
/// so a `running` row found here belongs to a runner that died: it is marked failed (its
/// attempt moves to `details.previous_attempts` with the reason) and the slot is claimed for
/// one more attempt, up to [`MAX_ATTEMPTS`].
pub async fn claim(
    conn: &mut PgConnection,
    job: &str,
    slot: DateTime<Utc>,
    now: DateTime<Utc>,
    runner: &str,
) -> Result<Claim, sqlx::Error> {
    let inserted: Option<i64> = sqlx::query_scalar(
        "INSERT INTO cron_runs (job_name, scheduled_for, started_at, status, runner, lock_pid) \
         VALUES ($1, $2, $3, 'running', $4, pg_backend_pid()) \
         ON CONFLICT (job_name, scheduled_for) DO NOTHING RETURNING id",
    )
    .bind(job)
    .bind(slot)
    .bind(now)
    .bind(runner)
    .fetch_optional(&mut *conn)
    .await?;
    if let Some(id) = inserted {
        return Ok(Claim::Run { id, attempt: 1 });
    }
    let found: Option<(i64, String, i32)> = sqlx::query_as(
        "SELECT id, status, attempts FROM cron_runs WHERE job_name = $1 AND scheduled_for = $2",
    )
    .bind(job)
    .bind(slot)
    .fetch_optional(&mut *conn)
    .await?;
    let Some((id, status, attempts)) = found else {
        // Removed between the two statements (retention): nothing to run.
        return Ok(Claim::Done);
    };
    if status != "running" {
        return Ok(Claim::Done);
    }
    let reason = "its runner died while running it (the job's lock was free)";
    if attempts >= MAX_ATTEMPTS {
        sqlx::query(
            "UPDATE cron_runs SET status = 'failed', finished_at = $2, \
                 error_message = $3 || ', after ' || attempts || ' attempts' \
             WHERE id = $1 AND status = 'running'",
        )
        .bind(id)
        .bind(now)
        .bind(reason)
        .execute(&mut *conn)
        .await?;
        return Ok(Claim::GaveUp { id });
    }
    let attempt: i32 = sqlx::query_scalar(
        "UPDATE cron_runs SET attempts = attempts + 1, started_at = $2, runner = $3, \
             lock_pid = pg_backend_pid(), \
             details = jsonb_set(details, '{previous_attempts}', \
                 coalesce(details->'previous_attempts', '[]'::jsonb) || jsonb_build_array( \
                     jsonb_build_object('started_at', started_at, 'runner', runner, \
                         'status', 'failed', 'error', $4::text))) \
         WHERE id = $1 RETURNING attempts",
    )
    .bind(id)
    .bind(now)
    .bind(runner)
    .bind(reason)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Claim::Run { id, attempt })
}

/// Records how attempt `attempt` of run `id` ended at `now`: `succeeded`, or `failed` with
/// `error`; `details` (a JSON object) is merged into the row's. False when the row is no
/// longer that attempt's (another process took the slot over, believing this runner dead):
/// then nothing is written, so a late runner never overwrites the next attempt's outcome.
pub async fn finish(
    db: impl PgExecutor<'_>,
    id: i64,
    attempt: i32,
    now: DateTime<Utc>,
    error: Option<&str>,
    details: &serde_json::Value,
) -> Result<bool, sqlx::Error> {
    Ok(sqlx::query(
        "UPDATE cron_runs SET status = CASE WHEN $3::text IS NULL THEN 'succeeded' ELSE 'failed' END, \
             finished_at = $2, error_message = $3, details = details || $4 \
         WHERE id = $1 AND status = 'running' AND attempts = $5",
    )
    .bind(id)
    .bind(now)
    .bind(error)
    .bind(details)
    .bind(attempt)
    .execute(db)
    .await?
    .rows_affected()
        == 1)
}

/// The slot the holder of `job`'s lock runs: the running row whose session (`lock_pid`)
/// holds the lock now. `None` while the holder has not claimed its row yet (or has just
/// recorded its end). A dead runner's row never answers: its session holds nothing. Only
/// this database's locks count: another database's session may have the same pid.
pub async fn holder_slot(
    db: impl PgExecutor<'_>,
    job: &str,
) -> Result<Option<DateTime<Utc>>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT r.scheduled_for FROM cron_runs r \
         JOIN pg_locks l ON l.pid = r.lock_pid AND l.locktype = 'advisory' AND l.granted \
             AND l.classid = $2::bigint::oid AND l.objsubid = 2 \
             AND l.objid = (hashtext($1)::bigint & 4294967295)::oid \
             AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
         WHERE r.job_name = $1 AND r.status = 'running' \
         ORDER BY r.started_at DESC LIMIT 1",
    )
    .bind(job)
    .bind(i64::from(LOCK_NAMESPACE))
    .fetch_optional(db)
    .await
}

/// The slots recorded as `running`: (job, slot), oldest first.
pub async fn running(db: impl PgExecutor<'_>) -> Result<Vec<(String, DateTime<Utc>)>, sqlx::Error> {
    sqlx::query_as(
        "SELECT job_name, scheduled_for FROM cron_runs WHERE status = 'running' \
         ORDER BY scheduled_for",
    )
    .fetch_all(db)
    .await
}

/// True when `slot` of `job` has no row while an earlier slot of the job has one: the job
/// was scheduled before, and this slot was missed.
pub async fn missed(
    db: impl PgExecutor<'_>,
    job: &str,
    slot: DateTime<Utc>,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT NOT EXISTS (SELECT 1 FROM cron_runs WHERE job_name = $1 AND scheduled_for = $2) \
            AND EXISTS (SELECT 1 FROM cron_runs WHERE job_name = $1 AND scheduled_for < $2)",
    )
    .bind(job)
    .bind(slot)
    .fetch_one(db)
    .await
}

/// Removes the rows of slots before `before` that are not running, except each job's newest
/// row: it shows the job was scheduled before, which [`missed`] needs to catch up a monthly
/// job however short the retention. Returns how many it removed.
pub async fn prune(db: impl PgExecutor<'_>, before: DateTime<Utc>) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM cron_runs WHERE scheduled_for < $1 AND status <> 'running' \
             AND id NOT IN (SELECT DISTINCT ON (job_name) id FROM cron_runs \
                 ORDER BY job_name, scheduled_for DESC, id DESC)",
    )
    .bind(before)
    .execute(db)
    .await?
    .rows_affected())
}

/// One row of the history.
#[derive(Debug, Clone, Serialize, sqlx::FromRow)]
pub struct Run {
    /// The row's id.
    pub id: i64,
    /// The job.
    pub job_name: String,
    /// The slot.
    pub scheduled_for: DateTime<Utc>,
    /// When its latest attempt started.
    pub started_at: DateTime<Utc>,
    /// When it ended.
    pub finished_at: Option<DateTime<Utc>>,
    /// `running`, `succeeded`, `failed` or `skipped`.
    pub status: String,
    /// Why it failed or was skipped.
    pub error_message: Option<String>,
    /// Attempts made.
    pub attempts: i32,
    /// The process of the latest attempt.
    pub runner: Option<String>,
    /// What the run did.
    pub details: serde_json::Value,
}

/// The history, newest slot first: `limit` rows at most, of `job` only when given.
pub async fn history(
    db: impl PgExecutor<'_>,
    job: Option<&str>,
    limit: i64,
) -> Result<Vec<Run>, sqlx::Error> {
    sqlx::query_as(
        "SELECT id, job_name, scheduled_for, started_at, finished_at, status, error_message, \
             attempts, runner, details \
         FROM cron_runs WHERE $1::text IS NULL OR job_name = $1 \
         ORDER BY scheduled_for DESC, id DESC LIMIT $2",
    )
    .bind(job)
    .bind(limit)
    .fetch_all(db)
    .await
}

/// Each job's latest slot with a row, by job name.
pub async fn latest(db: impl PgExecutor<'_>) -> Result<BTreeMap<String, Run>, sqlx::Error> {
    let rows: Vec<Run> = sqlx::query_as(
        "SELECT DISTINCT ON (job_name) id, job_name, scheduled_for, started_at, finished_at, \
             status, error_message, attempts, runner, details \
         FROM cron_runs ORDER BY job_name, scheduled_for DESC, id DESC",
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(|r| (r.job_name.clone(), r)).collect())
}

/// When each job last succeeded (the process's clock), by job name.
pub async fn last_successes(
    db: impl PgExecutor<'_>,
) -> Result<BTreeMap<String, DateTime<Utc>>, sqlx::Error> {
    let rows: Vec<(String, DateTime<Utc>)> = sqlx::query_as(
        "SELECT job_name, max(finished_at) FROM cron_runs \
         WHERE status = 'succeeded' AND finished_at IS NOT NULL GROUP BY job_name",
    )
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().collect())
}
