//! The production [`RecordSink`]: requests are acknowledged once their records are fsynced in
//! the write-ahead log (group commit: one fsync covers every request queued meanwhile), and
//! one applier per store feeds Postgres and ClickHouse from the log, in order, exactly once.
//! A segment is deleted only when both stores have applied it. After a crash each applier
//! resumes from its own store's watermark, so whatever was acknowledged but not yet applied
//! is replayed, and nothing applied is applied again.
//!
//! Three threads, sharing nothing but atomics:
//! - the writer drains the bounded submission queue (crossbeam), appends, fsyncs, acks;
//! - the Postgres applier and the ClickHouse applier each tail the log up to the durable
//!   position, cut it into batches (by rows, bytes or age: [`BatchLimits`]) and write them,
//!   retrying with capped exponential backoff while their store is down. One store down does
//!   not hold the other back: the log is the buffer of the slower one.
//!
//! When the log on disk exceeds its cap (a store down for long), submissions are refused with
//! [`SinkError::Full`], which the edge answers with 503 and `Retry-After`.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::clickhouse_sink::{self, Progress, Resume};
use crate::model::UsageRecord;
use crate::postgres_sink;
use crate::sink::{Ack, RecordSink, SinkError, Submission};
use crate::stores::StoreConfig;
use crate::telemetry;
use crate::wal::{self, WalWriter};

/// When an applier writes a batch: as soon as the unapplied log reaches `max_bytes`, or its
/// oldest record is `max_age` old; a batch holds at most `max_rows` records and about
/// `max_bytes` of log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Records in one batch at most.
    pub max_rows: usize,
    /// Log bytes in one batch at most (a block larger than this still makes one batch).
    pub max_bytes: usize,
    /// How long an acknowledged record may wait for its batch.
    pub max_age: Duration,
}

impl BatchLimits {
    /// Large batches (ClickHouse wants few, big inserts), none older than half a second, so
    /// a record is in both stores well within a second.
    pub const DEFAULT: Self = Self {
        max_rows: 500_000,
        max_bytes: 16 * 1024 * 1024,
        max_age: Duration::from_millis(500),
    };

    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_rows == 0 || self.max_bytes == 0 {
            return Err("batch rows and bytes must be at least 1".into());
        }
        if self.max_rows > clickhouse_sink::MAX_BATCH_ROWS {
            return Err(format!(
                "batches of more than {} rows could be split into several ClickHouse parts",
                clickhouse_sink::MAX_BATCH_ROWS
            ));
        }
        if self.max_age > Duration::from_secs(60) {
            return Err("batch age above a minute delays usage data too long".into());
        }
        Ok(())
    }
}

/// Limits of the durable pipeline, named and checked.
#[derive(Debug, Clone)]
pub struct DurableConfig {
    /// Folder of the write-ahead log (`APEX_WAL_DIR`).
    pub wal_dir: PathBuf,
    /// Where the stores are.
    pub stores: StoreConfig,
    /// Requests waiting for the writer at most; more are refused with 503.
    pub queue_capacity: usize,
    /// A new segment is started past this size.
    pub segment_bytes: u64,
    /// Log bytes on disk beyond which submissions are refused (`APEX_WAL_MAX_BYTES`).
    pub max_log_bytes: u64,
    /// One fsync covers at most this many bytes of blocks.
    pub group_commit_bytes: usize,
    /// How long the writer may hold a group open for more requests before its fsync; zero:
    /// the group is whatever queued during the previous fsync.
    pub group_commit_window: Duration,
    /// How the appliers cut the log into batches.
    pub batch: BatchLimits,
    /// At shutdown, how long the appliers keep trying to apply what is left.
    pub shutdown_apply_budget: Duration,
}

impl DurableConfig {
    /// Defaults for a log in `wal_dir` applied to `stores`.
    pub fn new(wal_dir: &Path, stores: &StoreConfig) -> Self {
        Self {
            wal_dir: wal_dir.to_owned(),
            stores: stores.clone(),
            queue_capacity: 4_096,
            segment_bytes: 64 * 1024 * 1024,
            max_log_bytes: 4 * 1024 * 1024 * 1024,
            group_commit_bytes: 4 * 1024 * 1024,
            group_commit_window: Duration::ZERO,
            batch: BatchLimits::DEFAULT,
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
        self.batch.validate()
    }
}

/// The stores the log is applied to; each has its own applier thread and watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Store {
    Postgres = 0,
    ClickHouse = 1,
}

impl Store {
    const ALL: [Store; 2] = [Store::Postgres, Store::ClickHouse];

    fn label(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::ClickHouse => "clickhouse",
        }
    }
}

struct Shared {
    /// End of what is fsynced.
    durable: AtomicU64,
    /// End of what each store has, indexed by [`Store`].
    applied: [AtomicU64; 2],
    /// Start of the oldest segment on disk.
    oldest: AtomicU64,
    writer_done: AtomicBool,
    wake: (Mutex<()>, Condvar),
    /// Appliers blocked in [`Shared::wait_for_log`].
    idle_appliers: AtomicUsize,
    /// Held while segments are deleted, so the two appliers never delete at once.
    deleting: Mutex<()>,
    max_log_bytes: u64,
}

impl Shared {
    /// Wakes appliers waiting for the log to grow. Cheap when none waits (the common case
    /// under load), which matters: the writer calls it after every fsync.
    fn notify(&self) {
        if self.idle_appliers.load(Ordering::SeqCst) == 0 {
            return;
        }
        let _guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        self.wake.1.notify_all();
    }

    /// Waits until the log grows past `position`, the writer stops, or `timeout` passes.
    fn wait_for_log(&self, position: u64, timeout: Duration) {
        let guard = self.wake.0.lock().unwrap_or_else(|p| p.into_inner());
        // Registered before the re-check, so a writer that moves `durable` after the check
        // sees a waiter and takes the lock to notify (it cannot before we wait).
        self.idle_appliers.fetch_add(1, Ordering::SeqCst);
        if self.durable.load(Ordering::SeqCst) <= position
            && !self.writer_done.load(Ordering::SeqCst)
        {
            let _ = self.wake.1.wait_timeout(guard, timeout);
        }
        self.idle_appliers.fetch_sub(1, Ordering::SeqCst);
    }

    fn applied_by_all(&self) -> u64 {
        self.applied
            .iter()
            .map(|a| a.load(Ordering::Acquire))
            .min()
            .unwrap_or(0)
    }

    /// Deletes the segments every store has applied and updates the disk gauges.
    fn release_segments(&self, dir: &Path) {
        let _guard = self.deleting.lock().unwrap_or_else(|p| p.into_inner());
        if let Err(e) = wal::delete_below(dir, self.applied_by_all()) {
            tracing::warn!(error = %e, "cannot delete applied log segments");
        }
        if let Ok(segments) = wal::segments(dir) {
            let oldest = segments.first().copied().unwrap_or(0);
            self.oldest.store(oldest, Ordering::Release);
            metrics::gauge!(telemetry::WAL_SEGMENTS).set(segments.len() as f64);
            metrics::gauge!(telemetry::WAL_DISK_BYTES)
                .set(self.durable.load(Ordering::Acquire).saturating_sub(oldest) as f64);
        }
    }
}

/// The sink. Share it behind an `Arc`.
pub struct DurableSink {
    sender: RwLock<Option<Sender<Submission>>>,
    queue: Receiver<Submission>,
    shared: Arc<Shared>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    log_id: String,
    wal_dir: PathBuf,
    /// End of the log as this process found it: what a previous process wrote.
    inherited_end: u64,
}

/// The identity of the log in `dir`, created on first use: batches in both stores are keyed
/// by it, so two instances' logs never mix.
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
    /// Opens the log (recovering a torn tail) and starts the writer and both appliers.
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
        let inherited_end = writer.position();
        let shared = Arc::new(Shared {
            durable: AtomicU64::new(inherited_end),
            applied: [AtomicU64::new(oldest), AtomicU64::new(oldest)],
            oldest: AtomicU64::new(oldest),
            writer_done: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
            idle_appliers: AtomicUsize::new(0),
            deleting: Mutex::new(()),
            max_log_bytes: config.max_log_bytes,
        });
        let (sender, queue) = bounded(config.queue_capacity);
        let mut threads = Vec::new();
        let writer_thread = {
            let (queue, shared) = (queue.clone(), shared.clone());
            let (limit, window) = (config.group_commit_bytes, config.group_commit_window);
            std::thread::Builder::new()
                .name("apex-wal-writer".into())
                .spawn(move || run_writer(writer, &queue, &shared, limit, window))
                .map_err(|e| e.to_string())?
        };
        threads.push(writer_thread);
        for store in Store::ALL {
            let (shared, config, log_id) = (shared.clone(), config.clone(), log_id.clone());
            let thread = std::thread::Builder::new()
                .name(format!("apex-apply-{}", store.label()))
                .spawn(move || run_applier(store, &config, &log_id, &shared))
                .map_err(|e| e.to_string())?;
            threads.push(thread);
        }
        Ok(Arc::new(Self {
            sender: RwLock::new(Some(sender)),
            queue,
            shared,
            threads: Mutex::new(threads),
            log_id,
            wal_dir: config.wal_dir.clone(),
            inherited_end,
        }))
    }

    /// The log's identity (the `log_id` of its batches in both stores).
    pub fn log_id(&self) -> &str {
        &self.log_id
    }

    /// End of the fsynced log.
    pub fn durable_position(&self) -> u64 {
        self.shared.durable.load(Ordering::Acquire)
    }

    /// End of what both stores hold.
    pub fn applied_position(&self) -> u64 {
        self.shared.applied_by_all()
    }

    /// End of what Postgres holds.
    pub fn postgres_position(&self) -> u64 {
        self.shared.applied[Store::Postgres as usize].load(Ordering::Acquire)
    }

    /// End of what ClickHouse holds.
    pub fn clickhouse_position(&self) -> u64 {
        self.shared.applied[Store::ClickHouse as usize].load(Ordering::Acquire)
    }
}

impl RecordSink for DurableSink {
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError> {
        let on_disk = self
            .shared
            .durable
            .load(Ordering::Relaxed)
            .saturating_sub(self.shared.oldest.load(Ordering::Relaxed));
        if on_disk > self.shared.max_log_bytes {
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

    fn replay_event_ids(&self, visit: &mut dyn FnMut(&str, &str)) -> usize {
        // Only what a previous process wrote: it may hold requests that were logged but never
        // answered. The log keeps its newest segment even when both stores have it, so those
        // are on disk whatever the stores did.
        let mut visited = 0;
        let mut position = self.shared.oldest.load(Ordering::Acquire);
        while position < self.inherited_end {
            let scan = match wal::read(&self.wal_dir, position, self.inherited_end, 16 << 20) {
                Ok(scan) => scan,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the log for its event ids");
                    break;
                }
            };
            for block in &scan.blocks {
                for record in wal::decode_records(&block.payload).unwrap_or_default() {
                    if let Some(event_id) = &record.event_id {
                        visit(&record.customer_id, event_id);
                        visited += 1;
                    }
                }
            }
            if scan.end <= position {
                break;
            }
            position = scan.end;
        }
        visited
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
    window: Duration,
) {
    while let Ok(first) = queue.recv() {
        let close_at = Instant::now() + window;
        let mut payloads = vec![wal::encode_records(&first.records)];
        let mut acks = vec![first.ack];
        let mut bytes = payloads[0].len();
        // Everything that queued up during the previous fsync rides on this one, and what
        // arrives within the window.
        while bytes < group_bytes {
            let next = if window.is_zero() {
                queue.try_recv().ok()
            } else {
                queue.recv_deadline(close_at).ok()
            };
            let Some(next) = next else { break };
            let payload = wal::encode_records(&next.records);
            bytes += payload.len();
            payloads.push(payload);
            acks.push(next.ack);
        }
        let before = wal.position();
        let started = Instant::now();
        let outcome = wal.append(&payloads).and_then(|()| {
            crate::failpoint::hit("wal_before_fsync");
            wal.sync()
        });
        let outcome = match outcome {
            Ok(()) => {
                crate::failpoint::hit("wal_after_fsync");
                shared.durable.store(wal.position(), Ordering::SeqCst);
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
    shared.writer_done.store(true, Ordering::SeqCst);
    shared.notify();
}

/// A batch read from the log.
struct ReadBatch {
    end: u64,
    records: Vec<UsageRecord>,
    corrupt_bytes: u64,
}

/// Reads whole blocks from `start` towards `limit`: up to the batch limits, or, when `exact`,
/// exactly to `limit` (the range of a batch begun before a crash).
fn read_batch(
    dir: &Path,
    start: u64,
    limit: u64,
    limits: &BatchLimits,
    exact: bool,
) -> std::io::Result<ReadBatch> {
    let mut batch = ReadBatch {
        end: start,
        records: Vec::new(),
        corrupt_bytes: 0,
    };
    while batch.end < limit {
        let taken = usize::try_from(batch.end - start).unwrap_or(usize::MAX);
        if !exact && (taken >= limits.max_bytes || batch.records.len() >= limits.max_rows) {
            break;
        }
        let budget = limits.max_bytes.saturating_sub(taken).max(1);
        let scan = wal::read(dir, batch.end, limit, budget)?;
        batch.corrupt_bytes += scan.corrupt_bytes;
        let mut cut = None;
        for block in scan.blocks {
            let mut decoded = match wal::decode_records(&block.payload) {
                Ok(decoded) => decoded,
                Err(e) => {
                    tracing::error!(error = %e, at = block.position, "skipped an undecodable log block");
                    Vec::new()
                }
            };
            if !exact
                && !batch.records.is_empty()
                && batch.records.len() + decoded.len() > limits.max_rows
            {
                cut = Some(block.position);
                break;
            }
            batch.records.append(&mut decoded);
        }
        if let Some(position) = cut {
            batch.end = position;
            break;
        }
        if scan.end <= batch.end {
            break; // nothing complete to read (cannot happen below the durable position)
        }
        batch.end = scan.end;
    }
    if exact {
        batch.end = limit;
    }
    Ok(batch)
}

/// One store's side of applying a batch.
enum Target {
    Postgres(PgPool),
    ClickHouse {
        // Boxed: the client is large and there is one Target per applier thread.
        client: Box<clickhouse::Client>,
        /// The batch being written and how far it got.
        current: Option<(u64, Progress)>,
    },
}

impl Target {
    async fn resume(&mut self, log_id: &str) -> Result<Resume, String> {
        match self {
            Target::Postgres(pool) => postgres_sink::watermark(pool, log_id)
                .await
                .map(Resume::At)
                .map_err(|e| e.to_string()),
            Target::ClickHouse { client, current } => {
                let resume = clickhouse_sink::resume(client, log_id)
                    .await
                    .map_err(|e| e.to_string())?;
                if let Resume::Unfinished { start, .. } = resume {
                    *current = Some((start, Progress::unfinished()));
                }
                Ok(resume)
            }
        }
    }

    /// Writes the batch `[start, end)`; `retry` is true when an earlier attempt failed, so it
    /// may or may not have landed.
    async fn write(
        &mut self,
        log_id: &str,
        batch: &ReadBatch,
        start: u64,
        retry: bool,
    ) -> Result<(), String> {
        match self {
            Target::Postgres(pool) => {
                if retry
                    && postgres_sink::batch_applied(pool, log_id, start)
                        .await
                        .map_err(|e| e.to_string())?
                {
                    return Ok(());
                }
                postgres_sink::apply_batch(pool, log_id, start, batch.end, &batch.records)
                    .await
                    .map_err(|e| e.to_string())?;
                crate::failpoint::hit("pg_after_commit");
                Ok(())
            }
            Target::ClickHouse { client, current } => {
                let progress = match current {
                    Some((at, progress)) if *at == start => progress,
                    _ => &mut current.insert((start, Progress::default())).1,
                };
                let ch_batch = clickhouse_sink::Batch {
                    log_id,
                    start,
                    end: batch.end,
                    records: &batch.records,
                };
                clickhouse_sink::write_batch(client, &ch_batch, progress)
                    .await
                    .map_err(|e| e.to_string())
            }
        }
    }
}

fn run_applier(store: Store, config: &DurableConfig, log_id: &str, shared: &Shared) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, store = store.label(), "applier: cannot start its runtime");
            return;
        }
    };
    let target = {
        // The pool spawns its maintenance task on the runtime it is created in.
        let _context = runtime.enter();
        match store {
            Store::Postgres => match PgPoolOptions::new()
                .max_connections(2)
                .acquire_timeout(Duration::from_secs(2))
                .connect_lazy(&config.stores.database_url)
            {
                Ok(pool) => Target::Postgres(pool),
                Err(e) => {
                    tracing::error!(error = %e, "applier: bad DATABASE_URL");
                    return;
                }
            },
            Store::ClickHouse => Target::ClickHouse {
                client: Box::new(config.stores.clickhouse()),
                current: None,
            },
        }
    };
    let mut applier = Applier {
        store,
        config,
        log_id,
        shared,
        target,
        shutdown_since: None,
    };
    runtime.block_on(applier.run());
    if let Target::Postgres(pool) = &applier.target {
        runtime.block_on(pool.close());
    }
}

struct Applier<'a> {
    store: Store,
    config: &'a DurableConfig,
    log_id: &'a str,
    shared: &'a Shared,
    target: Target,
    shutdown_since: Option<Instant>,
}

impl Applier<'_> {
    /// True once the writer has stopped and the shutdown budget, counted from then, is spent:
    /// what is left stays in the log for the next start.
    fn out_of_time(&mut self) -> bool {
        if !self.shared.writer_done.load(Ordering::Acquire) {
            return false;
        }
        self.shutdown_since
            .get_or_insert_with(Instant::now)
            .elapsed()
            > self.config.shutdown_apply_budget
    }

    fn set_applied(&self, position: u64) {
        self.shared.applied[self.store as usize].store(position, Ordering::Release);
        self.shared.release_segments(&self.config.wal_dir);
    }

    async fn run(&mut self) {
        let label = self.store.label();
        let mut backoff = Backoff::new();
        let resume = loop {
            match self.target.resume(self.log_id).await {
                Ok(resume) => break resume,
                Err(e) => {
                    tracing::warn!(error = %e, store = label, "applier: store unreachable; will replay when it is back");
                    if self.out_of_time() {
                        return;
                    }
                    backoff.wait().await;
                }
            }
        };
        let oldest = self.shared.oldest.load(Ordering::Acquire);
        let (mut position, mut unfinished_end) = match resume {
            Resume::At(mark) => (mark.max(oldest), None),
            Resume::Unfinished { start, end } => (start, Some(end)),
        };
        if position < oldest {
            // Cannot happen while segments are deleted only below every store's watermark.
            tracing::error!(
                store = label,
                from = position,
                oldest,
                "applier: log already deleted below the store's watermark"
            );
            position = oldest;
            unfinished_end = None;
        }
        self.shared.applied[self.store as usize].store(position, Ordering::Release);
        let inherited = self.shared.durable.load(Ordering::Acquire);
        if position < inherited {
            tracing::info!(
                store = label,
                bytes = inherited - position,
                "applier: replaying the log"
            );
        }
        let limits = self.config.batch;
        let mut waiting_since: Option<Instant> = None;
        loop {
            let durable = self.shared.durable.load(Ordering::Acquire);
            let backlog = durable.saturating_sub(position);
            metrics::gauge!(telemetry::WAL_BACKLOG_BYTES, "store" => label).set(backlog as f64);
            metrics::gauge!(telemetry::LAG_SECONDS, "store" => label)
                .set(waiting_since.map_or(0.0, |t| t.elapsed().as_secs_f64()));
            let writer_done = self.shared.writer_done.load(Ordering::Acquire);
            if backlog == 0 {
                waiting_since = None;
                if writer_done {
                    return;
                }
                self.shared
                    .wait_for_log(position, Duration::from_millis(100));
                continue;
            }
            let since = *waiting_since.get_or_insert_with(Instant::now);
            // Batch by bytes or age; at shutdown and on replay, write at once.
            let full = backlog >= limits.max_bytes as u64;
            let replaying = position < inherited || unfinished_end.is_some();
            if !full && !replaying && !writer_done && since.elapsed() < limits.max_age {
                // Not woken by every fsync (there is one per group commit): look again in
                // short naps, so a backlog that reaches `max_bytes` meanwhile goes soon.
                std::thread::sleep(
                    limits
                        .max_age
                        .saturating_sub(since.elapsed())
                        .min(Duration::from_millis(20)),
                );
                continue;
            }
            let (limit, exact) = match unfinished_end {
                Some(end) => (end, true),
                None => (durable, false),
            };
            let read_at = Instant::now();
            let batch = match read_batch(&self.config.wal_dir, position, limit, &limits, exact) {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, store = label, "applier: cannot read the log");
                    if self.out_of_time() {
                        return;
                    }
                    backoff.wait().await;
                    continue;
                }
            };
            if batch.corrupt_bytes > 0 {
                tracing::error!(
                    store = label,
                    bytes = batch.corrupt_bytes,
                    at = position,
                    "applier: skipped corrupt log bytes"
                );
                metrics::counter!(telemetry::WAL_CORRUPT_BYTES_TOTAL, "store" => label)
                    .increment(batch.corrupt_bytes);
            }
            if batch.end <= position {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            let started = Instant::now();
            let mut retry = false;
            loop {
                match self
                    .target
                    .write(self.log_id, &batch, position, retry)
                    .await
                {
                    Ok(()) => break,
                    Err(e) => {
                        metrics::counter!(telemetry::WRITE_ERRORS_TOTAL, "store" => label)
                            .increment(1);
                        tracing::warn!(error = %e, store = label, "applier: write failed; retrying");
                        if self.out_of_time() {
                            tracing::warn!(
                                store = label,
                                "applier: shutting down with log left to replay at next start"
                            );
                            return;
                        }
                        retry = true;
                        backoff.wait().await;
                    }
                }
            }
            backoff.reset();
            let rows = batch.records.len() as u64;
            metrics::histogram!(telemetry::FLUSH_SECONDS, "store" => label)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(telemetry::BATCH_ROWS, "store" => label).record(rows as f64);
            metrics::counter!(telemetry::ROWS_WRITTEN_TOTAL, "store" => label).increment(rows);
            if replaying {
                metrics::counter!(telemetry::REPLAYED_RECORDS_TOTAL, "store" => label)
                    .increment(rows);
            }
            // Records left behind a batch cut by its limits have waited as long as it did;
            // records that arrived since the read have waited since then at most.
            let cut = !exact && batch.end < limit;
            if !cut {
                waiting_since =
                    (self.shared.durable.load(Ordering::Acquire) > batch.end).then_some(read_at);
            }
            position = batch.end;
            unfinished_end = None;
            self.set_applied(position);
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
