//! The seam between the write-ahead log and a store: a [`StoreWriter`] takes the log one
//! [`Batch`] at a time and says where its copy of a log resumes; its failures are typed as
//! [`StoreError::Transient`] (the applier retries with backoff) or [`StoreError::Permanent`]
//! (retrying the same batch fails the same way, so the applier parks it in the log). The
//! Postgres and ClickHouse writers implement it; tests use an in-memory store
//! (`durable::memory`, feature `test-support`).

use std::future::Future;

use apex_core::model::UsageRecord;

/// One batch of the log on its way to a store: the records of the log range `[start, end)`.
#[derive(Debug, Clone, Copy)]
pub struct Batch<'a> {
    /// The log's identity (every store keys its batches by it).
    pub log_id: &'a str,
    /// First log position of the batch: its id.
    pub start: u64,
    /// Log position just after it.
    pub end: u64,
    /// Its records, in log order.
    pub records: &'a [UsageRecord],
}

/// Where a store's copy of a log resumes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    /// Every batch before this position is in the store.
    At(u64),
    /// The batch `[start, end)` was begun and may be partly written: it is read back exactly
    /// and finished before anything else.
    Unfinished {
        /// Its first log position (its id).
        start: u64,
        /// Its end.
        end: u64,
    },
}

/// Why a store step failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StoreError {
    /// May succeed later: the store is unreachable, overloaded, timed out or restarting, or it
    /// refuses our credentials or privileges (fixed on the server, no restart needed).
    #[error("{0}")]
    Transient(String),
    /// Fails the same way until a person fixes its cause (a missing table or column, a type
    /// mismatch, data the table refuses): the batch is parked, never retried in a loop.
    #[error("{0}")]
    Permanent(String),
}

impl StoreError {
    /// A permanent error when `permanent`, else a transient one.
    pub fn new(permanent: bool, message: String) -> Self {
        if permanent {
            StoreError::Permanent(message)
        } else {
            StoreError::Transient(message)
        }
    }

    /// True for errors retrying cannot fix.
    pub fn is_permanent(&self) -> bool {
        matches!(self, StoreError::Permanent(_))
    }
}

/// A store the log is applied to. One applier drives one writer, in log order, so a writer
/// never sees two batches at once. Every method may be called again after an error.
pub trait StoreWriter {
    /// Reads where the store's copy of `log_id` ends.
    fn resume(&mut self, log_id: &str) -> impl Future<Output = Result<Resume, StoreError>>;

    /// Writes `batch` exactly once. `retry` is true when an earlier attempt at this batch
    /// failed, so it may or may not have landed: the writer finds out before writing again.
    fn write(
        &mut self,
        batch: &Batch<'_>,
        retry: bool,
    ) -> impl Future<Output = Result<(), StoreError>>;

    /// Releases the writer's connections when its applier stops.
    fn close(&mut self) -> impl Future<Output = ()> {
        async {}
    }
}
