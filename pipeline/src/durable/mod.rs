//! The production [`RecordSink`]: requests are acknowledged once their records are fsynced in
//! the write-ahead log (group commit: one fsync covers every request queued meanwhile), and
//! one applier per store feeds Postgres and ClickHouse from the log, in order, exactly once.
//! A segment is deleted only when both stores have applied it. After a crash each applier
//! resumes from its own store's watermark, so whatever was acknowledged but not yet applied
//! is replayed, and nothing applied is applied again.
//!
//! Three threads, sharing positions (atomics), a wake-up per store (`Notify`), and two locks
//! off the hot path (segment deletion, and the record of a parked store):
//! - the writer ([`writer`]) drains the bounded submission queue (crossbeam), appends, fsyncs,
//!   acks;
//! - the Postgres applier and the ClickHouse applier ([`applier`]) each tail the log up to the
//!   durable position, cut it into batches ([`batching`]: by rows, bytes or age, see
//!   [`BatchLimits`]) and hand them to their [`StoreWriter`]. A transient store error is
//!   retried with capped exponential backoff; a permanent one parks the batch and reports the
//!   store stuck. One store down or stuck does not hold the other back: the log is the buffer
//!   of the slower one.
//!
//! When the log on disk exceeds its cap (a store down for long), submissions are refused with
//! [`SinkError::Full`], which the edge answers with 503 and `Retry-After`.
//!
//! The stores are a seam ([`DurableSink::start_with`]): tests run the same writer, batching
//! and appliers over an in-memory store (`memory`, feature `test-support`).

mod applier;
mod batching;
mod config;
#[cfg(any(test, feature = "test-support"))]
pub mod memory;
#[cfg(test)]
mod tests;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use crossbeam_channel::{Sender, TrySendError, bounded};
use tokio::sync::Notify;

pub use config::{BatchLimits, DurableConfig};

use apex_core::model::UsageRecord;

use crate::clickhouse_sink::ClickHouseWriter;
use crate::names;
use crate::postgres_sink::PostgresWriter;
use crate::sink::{Ack, RecordSink, SinkError, StuckStore};
use crate::store::StoreWriter;
use crate::wal::{self, WalWriter};

/// Why the sink could not start.
#[derive(Debug, thiserror::Error)]
pub enum DurableError {
    /// A limit is unusable.
    #[error("invalid pipeline limits: {0}")]
    Config(String),
    /// The log folder cannot be opened, recovered or read.
    #[error("cannot open the log in {dir}: {source}")]
    Log {
        /// The folder.
        dir: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A thread could not be started.
    #[error("cannot start a pipeline thread: {0}")]
    Thread(std::io::Error),
}

/// The stores the log is applied to; each has its own applier thread and watermark.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Store {
    Postgres = 0,
    ClickHouse = 1,
}

impl Store {
    pub(crate) fn label(self) -> &'static str {
        match self {
            Store::Postgres => "postgres",
            Store::ClickHouse => "clickhouse",
        }
    }
}

/// What the writer and the appliers share.
pub(crate) struct Shared {
    /// End of what is fsynced.
    durable: AtomicU64,
    /// End of what each store has, indexed by [`Store`].
    applied: [AtomicU64; 2],
    /// Start of the oldest segment on disk.
    oldest: AtomicU64,
    writer_done: AtomicBool,
    /// Why the log writer stopped while the sink was open (a failed rollback, a panic):
    /// nothing can be made durable until a restart. `None` while it runs, and after a
    /// shutdown.
    writer_failure: Mutex<Option<String>>,
    /// Wakes each store's applier when the log grows (a permit is kept when it is busy).
    grew: [Notify; 2],
    /// Held while segments are deleted, so the two appliers never delete at once.
    deleting: Mutex<()>,
    /// What each store's applier parked after a permanent error.
    parked: [Mutex<Option<StuckStore>>; 2],
    max_log_bytes: u64,
}

impl Shared {
    fn new(durable: u64, oldest: u64, max_log_bytes: u64) -> Self {
        Self {
            durable: AtomicU64::new(durable),
            applied: [AtomicU64::new(oldest), AtomicU64::new(oldest)],
            oldest: AtomicU64::new(oldest),
            writer_done: AtomicBool::new(false),
            writer_failure: Mutex::new(None),
            grew: [Notify::new(), Notify::new()],
            deleting: Mutex::new(()),
            parked: [Mutex::new(None), Mutex::new(None)],
            max_log_bytes,
        }
    }

    /// Wakes the appliers: the log grew, or the writer stopped. Cheap when they are busy (an
    /// atomic store of a permit), which matters: the writer calls it after every fsync.
    fn log_grew(&self) {
        for notify in &self.grew {
            notify.notify_one();
        }
    }

    /// Waits until the log grows past `position`, the writer stops, or `timeout` passes.
    async fn wait_for_log(&self, store: Store, position: u64, timeout: Duration) {
        // The permit `notify_one` leaves makes a growth between this check and the wait
        // end the wait at once.
        if self.durable.load(Ordering::SeqCst) > position || self.writer_done.load(Ordering::SeqCst)
        {
            return;
        }
        let _ = tokio::time::timeout(timeout, self.grew[store as usize].notified()).await;
    }

    /// Records that `store` is stuck after a permanent error at the batch starting at
    /// `batch_id` of log `log_id` (`None`: before its applier knew where it stood): logged,
    /// counted, and reported by [`RecordSink::stuck_stores`].
    fn park(&self, store: Store, log_id: &str, batch_id: Option<u64>, error: String) {
        let label = store.label();
        metrics::counter!(names::PERMANENT_ERRORS_TOTAL, "store" => label).increment(1);
        metrics::gauge!(names::PARKED_BATCHES, "store" => label).set(1.0);
        tracing::error!(
            store = label,
            batch_id,
            log_id,
            %error,
            "applier: permanent store error; the batch is parked in the log and nothing more \
             goes to this store until the cause is fixed and the server restarted"
        );
        *self.parked[store as usize]
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(StuckStore {
            store: label,
            batch_id,
            error,
        });
    }

    /// A parked store's applier holds here until the writer stops, keeping the store's
    /// backlog and lag gauges current (lag counts from the park: a lower bound), so their
    /// alerts go on firing. It polls rather than waits on `grew`, which every fsync would
    /// wake for nothing.
    async fn hold_parked(&self, store: Store) {
        let label = store.label();
        let since = tokio::time::Instant::now();
        while !self.writer_done.load(Ordering::SeqCst) {
            let backlog = self
                .durable
                .load(Ordering::Acquire)
                .saturating_sub(self.applied[store as usize].load(Ordering::Acquire));
            metrics::gauge!(names::WAL_BACKLOG_BYTES, "store" => label).set(backlog as f64);
            metrics::gauge!(names::LAG_SECONDS, "store" => label)
                .set(since.elapsed().as_secs_f64());
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Records why the log writer stopped while the sink is open: it makes nothing more
    /// durable, and refuses what it is sent.
    fn writer_failed(&self, why: String) {
        // Done first: whoever sees the failure sees a writer that takes nothing.
        self.writer_stopped();
        *self
            .writer_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner()) = Some(why);
    }

    /// Marks the writer done: the gauge says so, new submissions are refused before they
    /// queue, and the appliers finish what is durable.
    fn writer_stopped(&self) {
        metrics::gauge!(names::WAL_WRITER_UP).set(0.0);
        self.writer_done.store(true, Ordering::SeqCst);
        self.log_grew();
    }

    fn stuck_stores(&self) -> Vec<StuckStore> {
        self.parked
            .iter()
            .filter_map(|p| p.lock().unwrap_or_else(|p| p.into_inner()).clone())
            .collect()
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
            metrics::gauge!(names::WAL_SEGMENTS).set(segments.len() as f64);
            metrics::gauge!(names::WAL_DISK_BYTES)
                .set(self.durable.load(Ordering::Acquire).saturating_sub(oldest) as f64);
        }
    }
}

/// One request's records as a whole log frame ([`wal::frame_records`]), on their way to the
/// log writer with the acknowledgement to send once they are fsynced.
pub(crate) struct Framed {
    frame: Vec<u8>,
    ack: tokio::sync::oneshot::Sender<Result<(), SinkError>>,
}

/// The sink. Share it behind an `Arc`.
pub struct DurableSink {
    /// The queue to the log writer; `None` once shut down. The writer thread holds the only
    /// receiver: a writer that stops on a fault answers everything queued `Unavailable`
    /// until the shutdown drops this sender, and should the thread die anyway the queue is
    /// disconnected and whatever it held has its acknowledgement dropped (see [`Ack`]).
    /// Nothing is kept waiting.
    sender: RwLock<Option<Sender<Framed>>>,
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

fn log_error(dir: &Path) -> impl FnOnce(std::io::Error) -> DurableError + '_ {
    move |source| DurableError::Log {
        dir: dir.display().to_string(),
        source,
    }
}

impl DurableSink {
    /// Opens the log (recovering a torn tail) and starts the writer and the appliers of the
    /// stores in `config.stores`.
    pub fn start(config: &DurableConfig) -> Result<Arc<Self>, DurableError> {
        let database_url = config.stores.database_url.clone();
        let clickhouse = config.stores.clickhouse();
        Self::start_with(
            config,
            move || {
                PostgresWriter::connect_lazy(&database_url)
                    .map_err(|e| format!("DATABASE_URL cannot be used: {e}"))
            },
            move || Ok(ClickHouseWriter::new(clickhouse)),
        )
    }

    /// Like [`DurableSink::start`], with the store writers `postgres()` and `clickhouse()`
    /// make (each called on its applier's thread, inside that thread's runtime);
    /// `config.stores` is not read. A writer that cannot be made leaves its store stuck,
    /// reported by [`RecordSink::stuck_stores`].
    pub fn start_with<P, C>(
        config: &DurableConfig,
        postgres: impl FnOnce() -> Result<P, String> + Send + 'static,
        clickhouse: impl FnOnce() -> Result<C, String> + Send + 'static,
    ) -> Result<Arc<Self>, DurableError>
    where
        P: StoreWriter + 'static,
        C: StoreWriter + 'static,
    {
        config.validate().map_err(DurableError::Config)?;
        zero_series();
        let dir = &config.wal_dir;
        let (mut log, recovery) =
            WalWriter::open(dir, config.segment_bytes).map_err(log_error(dir))?;
        if config.preallocate_segments {
            log.prepare_segments_ahead().map_err(DurableError::Thread)?;
        } else {
            log.discard_prepared_segment().map_err(log_error(dir))?;
        }
        if recovery.truncated_bytes > 0 {
            tracing::warn!(
                bytes = recovery.truncated_bytes,
                "write-ahead log: cut a torn tail"
            );
            metrics::counter!(names::WAL_TRUNCATED_BYTES_TOTAL).increment(recovery.truncated_bytes);
        }
        let log_id = log_id(dir).map_err(log_error(dir))?;
        let oldest = wal::oldest_position(dir).map_err(log_error(dir))?;
        let inherited_end = log.position();
        let shared = Arc::new(Shared::new(inherited_end, oldest, config.max_log_bytes));
        // Up from here (the writer thread is about to run), so a scrape right after the
        // start never reads the previous writer's 0.
        metrics::gauge!(names::WAL_WRITER_UP).set(1.0);
        let (sender, queue) = bounded(config.queue_capacity);
        let mut threads = Vec::new();
        let writer_thread = {
            let shared = shared.clone();
            let (limit, window) = (config.group_commit_bytes, config.group_commit_window);
            std::thread::Builder::new()
                .name("apex-wal-writer".into())
                .spawn(move || writer::run(log, &queue, &shared, limit, window))
                .map_err(DurableError::Thread)?
        };
        threads.push(writer_thread);
        threads.push(spawn_applier(
            Store::Postgres,
            config,
            &log_id,
            &shared,
            postgres,
        )?);
        threads.push(spawn_applier(
            Store::ClickHouse,
            config,
            &log_id,
            &shared,
            clickhouse,
        )?);
        Ok(Arc::new(Self {
            sender: RwLock::new(Some(sender)),
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

/// Gives every counter and gauge that only moves on trouble its 0, per store, so `/metrics`
/// shows them from the start and an alert on them (a parked batch, write errors, a full log)
/// has a series to read in a healthy process.
fn zero_series() {
    metrics::counter!(names::WAL_FULL_TOTAL).increment(0);
    metrics::counter!(names::WAL_TRUNCATED_BYTES_TOTAL).increment(0);
    for segment in ["prepared", "created"] {
        metrics::counter!(names::WAL_ROLLS_TOTAL, "segment" => segment).increment(0);
    }
    for store in [Store::Postgres, Store::ClickHouse] {
        let label = store.label();
        metrics::counter!(names::PERMANENT_ERRORS_TOTAL, "store" => label).increment(0);
        metrics::gauge!(names::PARKED_BATCHES, "store" => label).set(0.0);
        metrics::counter!(names::WRITE_ERRORS_TOTAL, "store" => label).increment(0);
        metrics::counter!(names::WAL_CORRUPT_BYTES_TOTAL, "store" => label).increment(0);
        metrics::counter!(names::REPLAYED_RECORDS_TOTAL, "store" => label).increment(0);
    }
}

/// Starts the applier thread of `store`: its own current-thread runtime (the store clients
/// spawn their maintenance tasks on it), its writer made there, then [`applier::Applier::run`].
fn spawn_applier<W: StoreWriter + 'static>(
    store: Store,
    config: &DurableConfig,
    log_id: &str,
    shared: &Arc<Shared>,
    make: impl FnOnce() -> Result<W, String> + Send + 'static,
) -> Result<JoinHandle<()>, DurableError> {
    let (config, log_id, shared) = (config.clone(), log_id.to_owned(), shared.clone());
    std::thread::Builder::new()
        .name(format!("apex-apply-{}", store.label()))
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                Ok(runtime) => runtime,
                Err(e) => {
                    let error = format!("cannot start the applier's runtime: {e}");
                    return shared.park(store, &log_id, None, error);
                }
            };
            let made = {
                let _context = runtime.enter();
                make()
            };
            let writer = match made {
                Ok(writer) => writer,
                Err(error) => {
                    let error = format!("cannot make the store writer: {error}");
                    shared.park(store, &log_id, None, error);
                    return runtime.block_on(shared.hold_parked(store));
                }
            };
            let mut applier = applier::Applier::new(store, &config, &log_id, &shared, writer);
            runtime.block_on(async {
                applier.run().await;
                applier.writer.close().await;
            });
        })
        .map_err(DurableError::Thread)
}

impl DurableSink {
    /// What a submission gets once the writer is done: `Closed` after a shutdown, else
    /// `Unavailable` (the writer stopped on its own).
    fn refusal(&self) -> SinkError {
        if self
            .sender
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            SinkError::Unavailable
        } else {
            SinkError::Closed
        }
    }
}

impl RecordSink for DurableSink {
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError> {
        if self.shared.writer_done.load(Ordering::Relaxed) {
            // Refused before any work; the queue's own disconnection below covers a writer
            // that stops from here on.
            return Err(self.refusal());
        }
        let on_disk = self
            .shared
            .durable
            .load(Ordering::Relaxed)
            .saturating_sub(self.shared.oldest.load(Ordering::Relaxed));
        if on_disk > self.shared.max_log_bytes {
            metrics::counter!(names::WAL_FULL_TOTAL).increment(1);
            return Err(SinkError::Full);
        }
        // Framed here, on the request's own thread: see `wal::frame_records`.
        let frame = wal::frame_records(&records);
        drop(records);
        let (ack, acked) = tokio::sync::oneshot::channel();
        let guard = self.sender.read().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            return Err(SinkError::Closed);
        };
        match sender.try_send(Framed { frame, ack }) {
            Ok(()) => Ok(acked),
            Err(TrySendError::Full(_)) => Err(SinkError::Full),
            // The sender is still here, so this is no shutdown: the log writer is gone (it
            // stopped after a failed rollback, or panicked) and nothing can be made durable.
            Err(TrySendError::Disconnected(_)) => Err(SinkError::Unavailable),
        }
    }

    fn queue_depth(&self) -> usize {
        self.sender
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            .map_or(0, Sender::len)
    }

    fn writer_failure(&self) -> Option<String> {
        self.shared
            .writer_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn replay_event_ids(&self, visit: &mut dyn FnMut(&str, &str)) -> usize {
        // Only what a previous process wrote: it may hold requests that were logged but never
        // answered. The log keeps its newest segment even when both stores have it, so those
        // are on disk whatever the stores did.
        let mut visited = 0;
        let mut position = self.shared.oldest.load(Ordering::Acquire);
        // The appliers' reader, in their batches: one way of reading the log.
        let (mut buffers, limits) = (batching::BatchBuffers::default(), BatchLimits::DEFAULT);
        while position < self.inherited_end {
            let read = batching::read_batch(
                &self.wal_dir,
                position,
                self.inherited_end,
                &limits,
                false,
                &mut buffers,
            );
            let batch = match read {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot read the log for its event ids");
                    break;
                }
            };
            for record in batch.records {
                if let Some(event_id) = &record.event_id {
                    visit(&record.customer_id, event_id);
                    visited += 1;
                }
            }
            let end = batch.end;
            buffers.recycle();
            if end <= position {
                break;
            }
            position = end;
        }
        visited
    }

    fn stuck_stores(&self) -> Vec<StuckStore> {
        self.shared.stuck_stores()
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
