//! One applier per store: it tails the log up to the durable position, cuts it into batches
//! ([`super::batching`]) and hands them to its [`StoreWriter`], in log order. A transient
//! store error is retried with capped exponential backoff (the log is the buffer meanwhile);
//! a permanent one parks the batch: it is logged with its batch id and counted, the store is
//! reported stuck (`/readyz`), and nothing more is written to that store until the process
//! restarts, when the batch is read back from the log and applied. The other store's applier
//! is not held back either way.

use std::sync::atomic::Ordering;
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};
use tokio::time::Instant;

use super::batching::{self, BatchBuffers, Step, read_batch};
use super::{DurableConfig, Shared, Store};
use crate::names;
use crate::store::{Batch, Resume, StoreError, StoreWriter};

/// Backoff while a store fails transiently: 50 ms doubling to 2 s, for as long as it takes
/// (the log holds everything meanwhile, up to its cap).
pub(super) const BACKOFF: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(50))
    .with_max_delay(Duration::from_secs(2))
    .with_factor(2.0)
    .without_max_times();

/// How long an idle applier waits for the log to grow before it looks again anyway.
const IDLE_WAIT: Duration = Duration::from_millis(100);

/// The applier of one store.
pub(super) struct Applier<'a, W> {
    store: Store,
    config: &'a DurableConfig,
    log_id: &'a str,
    shared: &'a Shared,
    /// The store's writer.
    pub(super) writer: W,
    shutdown_since: Option<Instant>,
    backoff: ExponentialBackoff,
}

impl<'a, W: StoreWriter> Applier<'a, W> {
    pub(super) fn new(
        store: Store,
        config: &'a DurableConfig,
        log_id: &'a str,
        shared: &'a Shared,
        writer: W,
    ) -> Self {
        Self {
            store,
            config,
            log_id,
            shared,
            writer,
            shutdown_since: None,
            backoff: BACKOFF.build(),
        }
    }

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

    /// Waits out the next backoff step; false when shutting down with the budget spent.
    async fn back_off(&mut self) -> bool {
        if self.out_of_time() {
            return false;
        }
        let wait = self.backoff.next().unwrap_or(Duration::from_secs(2));
        tokio::time::sleep(wait).await;
        true
    }

    /// Parks the store after a permanent error at the batch starting at `batch_id` (`None`
    /// when it failed before it knew where it stood) and holds until shutdown.
    async fn park(&mut self, batch_id: Option<u64>, error: &StoreError) {
        self.shared
            .park(self.store, self.log_id, batch_id, error.to_string());
        self.shared.hold_parked(self.store).await;
    }

    fn set_applied(&self, position: u64) {
        self.shared.applied[self.store as usize].store(position, Ordering::Release);
        self.shared.release_segments(&self.config.wal_dir);
    }

    /// Applies the log until the writer has stopped and everything is applied (or the
    /// shutdown budget is spent, or a permanent error parks the store).
    pub(super) async fn run(&mut self) {
        let label = self.store.label();
        let oldest = self.shared.oldest.load(Ordering::Acquire);
        let resume = loop {
            match self.writer.resume(self.log_id).await {
                Ok(resume) => break resume,
                Err(e) if e.is_permanent() => return self.park(None, &e).await,
                Err(e) => {
                    tracing::warn!(error = %e, store = label, "applier: store unreachable; will replay when it is back");
                    if !self.back_off().await {
                        return;
                    }
                }
            }
        };
        self.backoff = BACKOFF.build();
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
        let mut buffers = BatchBuffers::default();
        loop {
            let durable = self.shared.durable.load(Ordering::Acquire);
            let backlog = durable.saturating_sub(position);
            if backlog == 0 {
                waiting_since = None;
            } else {
                waiting_since.get_or_insert_with(Instant::now);
            }
            let waited = waiting_since.map_or(Duration::ZERO, |t| t.elapsed());
            metrics::gauge!(names::WAL_BACKLOG_BYTES, "store" => label).set(backlog as f64);
            metrics::gauge!(names::LAG_SECONDS, "store" => label).set(waited.as_secs_f64());
            let writer_done = self.shared.writer_done.load(Ordering::Acquire);
            let step = batching::next_step(
                position,
                durable,
                unfinished_end,
                inherited,
                writer_done,
                waited,
                &limits,
            );
            let (limit, exact) = match step {
                Step::Stop => return,
                Step::Idle => {
                    self.shared
                        .wait_for_log(self.store, position, IDLE_WAIT)
                        .await;
                    continue;
                }
                Step::Wait(nap) => {
                    tokio::time::sleep(nap).await;
                    continue;
                }
                Step::Write { limit, exact } => (limit, exact),
            };
            let replaying = position < inherited || unfinished_end.is_some();
            let read_at = Instant::now();
            let read = read_batch(
                &self.config.wal_dir,
                position,
                limit,
                &limits,
                exact,
                &mut buffers,
            );
            let batch = match read {
                Ok(batch) => batch,
                Err(e) => {
                    tracing::error!(error = %e, store = label, "applier: cannot read the log");
                    if !self.back_off().await {
                        return;
                    }
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
                metrics::counter!(names::WAL_CORRUPT_BYTES_TOTAL, "store" => label)
                    .increment(batch.corrupt_bytes);
            }
            if batch.end <= position {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
            let started = Instant::now();
            let store_batch = Batch {
                log_id: self.log_id,
                start: position,
                end: batch.end,
                records: batch.records,
            };
            let mut retry = false;
            loop {
                match self.writer.write(&store_batch, retry).await {
                    Ok(()) => break,
                    Err(e) => {
                        metrics::counter!(names::WRITE_ERRORS_TOTAL, "store" => label).increment(1);
                        if e.is_permanent() {
                            return self.park(Some(position), &e).await;
                        }
                        tracing::warn!(error = %e, store = label, batch_id = position, "applier: write failed; retrying");
                        retry = true;
                        if !self.back_off().await {
                            tracing::warn!(
                                store = label,
                                "applier: shutting down with log left to replay at next start"
                            );
                            return;
                        }
                    }
                }
            }
            self.backoff = BACKOFF.build();
            let rows = batch.records.len() as u64;
            metrics::histogram!(names::FLUSH_SECONDS, "store" => label)
                .record(started.elapsed().as_secs_f64());
            metrics::histogram!(names::BATCH_ROWS, "store" => label).record(rows as f64);
            metrics::counter!(names::ROWS_WRITTEN_TOTAL, "store" => label).increment(rows);
            if replaying {
                metrics::counter!(names::REPLAYED_RECORDS_TOTAL, "store" => label).increment(rows);
            }
            // Records left behind a batch cut by its limits have waited as long as it did;
            // records that arrived since the read have waited since then at most.
            let cut = !exact && batch.end < limit;
            if !cut {
                waiting_since =
                    (self.shared.durable.load(Ordering::Acquire) > batch.end).then_some(read_at);
            }
            position = batch.end;
            buffers.recycle();
            unfinished_end = None;
            self.set_applied(position);
        }
    }
}
