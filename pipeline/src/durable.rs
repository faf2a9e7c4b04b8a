//! The production [`RecordSink`]: requests are acknowledged once their records are fsynced in
//! the write-ahead log (group commit: one fsync covers every request queued meanwhile), and
//! an applier feeds Postgres from the log in order, exactly once, deleting segments once they
//! are applied. After a crash the applier resumes from Postgres' watermark, so whatever was
//! acknowledged but not yet applied is replayed.
//!
//! Two threads, each with what it needs and nothing shared but atomics:
//! - the writer drains the bounded submission queue (crossbeam), appends, fsyncs, acks;
//! - the applier tails the log up to the durable position and commits batches to Postgres,
//!   retrying with capped backoff while Postgres is down (the log is the buffer meanwhile).
//!
//! When the log holds more than its cap (Postgres down for long), submissions are refused
//! with [`SinkError::Full`], which the edge answers with 503 and `Retry-After`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::model::UsageRecord;
use crate::postgres_sink;
use crate::sink::{Ack, RecordSink, SinkError, Submission};
use crate::telemetry;
use crate::wal::{self, WalWriter};

/// Limits of the durable pipeline, named and checked.
#[derive(Debug, Clone)]
pub struct DurableConfig {
    /// Folder of the write-ahead log (`APEX_WAL_DIR`).
    pub wal_dir: PathBuf,
    /// Postgres URL for the applier.
    pub database_url: String,
    /// Requests waiting for the writer at most; more are refused with 503.
    pub queue_capacity: usize,
    /// A new segment is started past this size.
    pub segment_bytes: u64,
    /// Log bytes not yet applied beyond which submissions are refused (`APEX_WAL_MAX_BYTES`).
    pub max_log_bytes: u64,
    /// One fsync covers at most this many bytes of blocks.
    pub group_commit_bytes: usize,
    /// One Postgres transaction applies about this many bytes of log.
    pub apply_batch_bytes: usize,
    /// At shutdown, how long the applier keeps trying to apply what is left.
    pub shutdown_apply_budget: Duration,
}

impl DurableConfig {
    /// Defaults for a log in `wal_dir` applied to `database_url`.
    pub fn new(wal_dir: &Path, database_url: &str) -> Self {
        Self {
            wal_dir: wal_dir.to_owned(),
            database_url: database_url.to_owned(),
            queue_capacity: 4_096,
            segment_bytes: 64 * 1024 * 1024,
            max_log_bytes: 4 * 1024 * 1024 * 1024,
            group_commit_bytes: 4 * 1024 * 1024,
            apply_batch_bytes: 16 * 1024 * 1024,
            shutdown_apply_budget: Duration::from_secs(10),
        }
    }

    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.queue_capacity == 0 || self.segment_bytes == 0 || self.group_commit_bytes == 0 {
            return Err("queue, segment and group-commit limits must be at least 1".into());
        }
        if self.max_log_bytes < self.segment_bytes {
            return Err("the log cap must hold at least one segment".into());
        }
        Ok(())
    }
}

struct Shared {
    /// End of what is fsynced.
    durable: AtomicU64,
    /// End of what Postgres has.
    applied: AtomicU64,
    /// Start of the oldest segment on disk.
    oldest: AtomicU64,
    writer_done: AtomicBool,
    wake: (Mutex<()>, Condvar),
    max_log_bytes: u64,
}

impl Shared {
    fn notify(&self) {
        let _guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.1.notify_all();
    }

    fn wait(&self, timeout: Duration) {
        let guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        let _ = self.wake.1.wait_timeout(guard, timeout);
    }
}

/// The sink. Share it behind an `Arc`.
pub struct DurableSink {
    sender: RwLock<Option<Sender<Submission>>>,
    queue: Receiver<Submission>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    log_id: String,
}

/// The identity of the log in `dir`, created on first use: batches in Postgres are keyed by
/// it, so two instances' logs never mix.
pub fn log_id(dir: &Path) -> std::io::Result<String> {
    let path = dir.join("log.id");
    match std::fs::read_to_string(&path) {
        Ok(id) if !id.trim().is_empty() => Ok(id.trim().to_owned()),
        _ => {
            let mut bytes = [0u8; 12];
            getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
            let id: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let tmp = dir.join("log.id.tmp");
            std::fs::write(&tmp, &id)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
            std::fs::File::open(dir)?.sync_all()?;
            Ok(id)
        }
    }
}

impl DurableSink {
    /// Opens the log (recovering a torn tail) and starts the writer and the applier.
    pub fn start(config: &DurableConfig) -> Result<Arc<Self>, String> {
        config.validate()?;
        let (writer, recovery) = WalWriter::open(&config.wal_dir, config.segment_bytes)
            .map_err(|e| format!("cannot open the log in {}: {e}", config.wal_dir.display()))?;
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "write-ahead log: cut a torn tail"
            );
            metrics::counter!(telemetry::WAL_TRUNCATED_BYTES_TOTAL)
                .increment(recovery.truncated_bytes);
        }
        let log_id = log_id(&config.wal_dir).map_err(|e| format!("cannot read the log id: {e}"))?;
        let oldest = wal::oldest_position(&config.wal_dir).map_err(|e| e.to_string())?;
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(writer.position()),
            applied: AtomicU64::new(oldest),
            oldest: AtomicU64::new(oldest),
            writer_done: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            max_log_bytes: config.max_log_bytes,
        });
        let (sender, queue) = bounded(config.queue_capacity);
        let writer_thread = {
            let (queue, shared, limit) = (queue.clone(), shared.clone(), config.group_commit_bytes);
            std::thread::Builder::new()
                .name("apex-wal-writer".into())
                .spawn(move || run_writer(writer, &queue, &shared, limit))
                .map_err(|e| e.to_string())?
        };
        let applier_thread = {
            let (shared, config, log_id) = (shared.clone(), config.clone(), log_id.clone());
            std::thread::Builder::new()
                .name("apex-wal-applier".into())
                .spawn(move || run_applier(&config, &log_id, &shared))
                .map_err(|e| e.to_string())?
        };
        Ok(Arc::new(Self {
            sender: RwLock::new(Some(sender)),
            queue,
            shared,
            threads: Mutex::new(vec![writer_thread, applier_thread]),
            log_id,
        }))
    }

    /// The log's identity (the `log_id` of its batches in Postgres).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// End of the fsynced log.
    pub fn durable_position(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// End of what Postgres holds.
    pub fn applied_position(&self) -> u64 {
        self.shared.applied.load(Ordering::Acquire)
    }
}

impl RecordSink for DurableSink {
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError> {
        let backlog = self
            .shared
            .durable
            .load(Ordering::Relaxed)
            .saturating_sub(self.shared.oldest.load(Ordering::Relaxed));
        if backlog > self.shared.max_log_bytes {
            metrics::counter!(telemetry::WAL_FULL_TOTAL).increment(1);
            return Err(SinkError::Full);
        }
        let (ack, acked) = tokio::sync::oneshot::channel();
        let guard = self.sender.read().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            return Err(SinkError::Closed);
        };
        match sender.try_send(Submission { records, ack }) {
            Ok(()) => Ok(acked),
            Err(TrySendError::Full(_)) => Err(SinkError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SinkError::Closed),
        }
    }

    fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    fn shutdown(&self) {
        drop(
            self.sender
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let threads: Vec<_> = self
            .threads
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for thread in threads {
            let _ = thread.join();
        }
    }
}

fn run_writer(
    mut wal: WalWriter,
    queue: &Receiver<Submission>,
    shared: &Shared,
    group_bytes: usize,
) {
    while let Ok(first) = queue.recv() {
        let mut payloads = vec![wal::encode_records(&first.records)];
        let mut acks = vec![first.ack];
        let mut bytes = payloads[0].len();
        // Everything that queued up during the previous fsync rides on this one.
        while bytes < group_bytes {
            let Ok(next) = queue.try_recv() else { break };
            let payload = wal::encode_records(&next.records);
            bytes += payload.len();
            payloads.push(payload);
            acks.push(next.ack);
        }
        let before = wal.position();
        let started = Instant::now();
        let outcome = wal.append(&payloads).and_then(|()| wal.sync());
        let outcome = match outcome {
            Ok(()) => {
                shared.durable.store(wal.position(), Ordering::Release);
                shared.notify();
                metrics::histogram!(telemetry::WAL_FSYNC_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(telemetry::WAL_BYTES_TOTAL).increment(wal.position() - before);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "write-ahead log: append failed; refusing the requests");
                if let Err(e) = wal.rollback_to(before) {
                    tracing::error!(error = %e, "write-ahead log: rollback failed");
                }
                Err(SinkError::Unavailable)
            }
        };
        for ack in acks {
            let _ = ack.send(outcome);
        }
    }
    shared.writer_done.store(true, Ordering::Release);
    shared.notify();
}

fn run_applier(config: &DurableConfig, log_id: &str, shared: &Shared) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "applier: cannot start its runtime");
            return;
        }
    };
    let pool = {
        // The pool spawns its maintenance task on the runtime it is created in.
        let _context = runtime.enter();
        match PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(&config.database_url)
        {
            Ok(pool) => pool,
            Err(e) => {
                tracing::error!(error = %e, "applier: bad DATABASE_URL");
                return;
            }
        }
    };
    runtime.block_on(apply_loop(config, log_id, shared, &pool));
    runtime.block_on(pool.close());
}

/// True once the writer has stopped and the shutdown budget, counted from then, is spent.
struct ShutdownClock {
    since: Option<Instant>,
    budget: Duration,
}

impl ShutdownClock {
    fn expired(&mut self, shared: &Shared) -> bool {
        if !shared.writer_done.load(Ordering::Acquire) {
            return false;
        }
        self.since.get_or_insert_with(Instant::now).elapsed() > self.budget
    }
}

async fn apply_loop(config: &DurableConfig, log_id: &str, shared: &Shared, pool: &PgPool) {
    let mut clock = ShutdownClock {
        since: None,
        budget: config.shutdown_apply_budget,
    };
    let mut backoff = Backoff::new();
    let mut position = loop {
        match postgres_sink::watermark(pool, log_id).await {
            Ok(mark) => break mark.max(shared.oldest.load(Ordering::Acquire)),
            Err(e) => {
                tracing::warn!(error = %e, "applier: Postgres unreachable; will replay when it is back");
                if clock.expired(shared) {
                    return;
                }
                backoff.wait().await;
            }
        }
    };
    shared.applied.store(position, Ordering::Release);
    let replay_until = shared.durable.load(Ordering::Acquire);
    if position < replay_until {
        tracing::info!(
            bytes = replay_until - position,
            "applier: replaying the log"
        );
    }
    loop {
        let durable = shared.durable.load(Ordering::Acquire);
        metrics::gauge!(telemetry::WAL_BACKLOG_BYTES).set(durable.saturating_sub(position) as f64);
        if position >= durable {
            if shared.writer_done.load(Ordering::Acquire) {
                return;
            }
            shared.wait(Duration::from_millis(100));
            continue;
        }
        let scan = match wal::read(&config.wal_dir, position, durable, config.apply_batch_bytes) {
            Ok(scan) => scan,
            Err(e) => {
                tracing::error!(error = %e, "applier: cannot read the log");
                if clock.expired(shared) {
                    return;
                }
                backoff.wait().await;
                continue;
            }
        };
        if scan.corrupt_bytes > 0 {
            tracing::error!(
                bytes = scan.corrupt_bytes,
                at = position,
                "applier: skipped corrupt log bytes"
            );
            metrics::counter!(telemetry::WAL_CORRUPT_BYTES_TOTAL).increment(scan.corrupt_bytes);
        }
        let mut records = Vec::new();
        for block in &scan.blocks {
            match wal::decode_records(&block.payload) {
                Ok(mut decoded) => records.append(&mut decoded),
                Err(e) => {
                    tracing::error!(error = %e, at = block.position, "applier: skipped an undecodable block")
                }
            }
        }
        if scan.end <= position {
            // Nothing complete to read yet (cannot happen below the durable position).
            shared.wait(Duration::from_millis(10));
            continue;
        }
        loop {
            let started = Instant::now();
            match postgres_sink::apply_batch(pool, log_id, position, scan.end, &records).await {
                Ok(()) => {
                    metrics::histogram!(telemetry::PG_APPLY_SECONDS)
                        .record(started.elapsed().as_secs_f64());
                    metrics::counter!(telemetry::PG_RECORDS_TOTAL).increment(records.len() as u64);
                    break;
                }
                Err(e) => {
                    if postgres_sink::batch_applied(pool, log_id, position)
                        .await
                        .unwrap_or(false)
                    {
                        break;
                    }
                    tracing::warn!(error = %e, "applier: Postgres write failed; retrying");
                    if clock.expired(shared) {
                        tracing::warn!(
                            "applier: shutting down with log left to replay at next start"
                        );
                        return;
                    }
                    backoff.wait().await;
                }
            }
        }
        backoff.reset();
        position = scan.end;
        shared.applied.store(position, Ordering::Release);
        match wal::delete_below(&config.wal_dir, position) {
            Ok(0) => {}
            Ok(_) => {
                if let Ok(oldest) = wal::oldest_position(&config.wal_dir) {
                    shared.oldest.store(oldest, Ordering::Release);
                }
            }
            Err(e) => tracing::warn!(error = %e, "applier: cannot delete applied segments"),
        }
    }
}

/// Capped exponential backoff: 50 ms doubling to 2 s.
struct Backoff(Duration);

impl Backoff {
    fn new() -> Self {
        Self(Duration::from_millis(50))
    }
    fn reset(&mut self) {
        self.0 = Duration::from_millis(50);
    }
    async fn wait(&mut self) {
        tokio::time::sleep(self.0).await;
        self.0 = (self.0 * 2).min(Duration::from_secs(2));
    }
}
