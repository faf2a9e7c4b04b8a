//! An in-memory [`StoreWriter`] for tests of the log, its batching and its appliers without
//! a database: it keeps every batch it was given by log range, answers `resume` like a real
//! store (its watermark, or a batch left unfinished), counts a batch written twice instead of
//! hiding it, and fails on demand, transiently or permanently, before or after applying.
//! Clones share one store, so a test keeps a handle while the applier owns another.

use std::collections::btree_map::Entry;
use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use apex_core::model::UsageRecord;
use tokio::time::Instant;

use crate::store::{Batch, Resume, StoreError, StoreWriter};

/// One call of [`StoreWriter::write`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attempt {
    /// When it was made (tokio's clock, so a paused test clock measures backoff).
    pub at: Instant,
    /// The batch's start.
    pub start: u64,
    /// The batch's end.
    pub end: u64,
    /// Whether the applier said an earlier attempt may have landed.
    pub retry: bool,
    /// Whether it succeeded.
    pub ok: bool,
}

/// How the next write fails.
#[derive(Debug, Clone)]
enum Fault {
    /// Fails without applying.
    Before(StoreError),
    /// Applies, then fails: the answer is lost, as after a dropped connection at commit.
    After(StoreError),
}

#[derive(Default)]
struct State {
    /// Applied batches by log and start: their end and records.
    batches: BTreeMap<(String, u64), (u64, Vec<UsageRecord>)>,
    /// A batch begun and not finished, as a crash mid-insert leaves one in ClickHouse.
    unfinished: Option<(String, u64, u64)>,
    faults: VecDeque<Fault>,
    /// Every call fails with this permanent error until [`MemoryStore::fix`].
    broken: Option<String>,
    /// Resumes fail transiently this many more times.
    unreachable_resumes: usize,
    attempts: Vec<Attempt>,
    duplicates: usize,
}

/// The store. `Clone` shares it.
#[derive(Clone, Default)]
pub struct MemoryStore {
    state: Arc<Mutex<State>>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The next write fails with `error` without applying anything.
    pub fn fail_next(&self, error: StoreError) {
        self.state().faults.push_back(Fault::Before(error));
    }

    /// The next write applies its batch, then fails with `error` (its outcome is unknown to
    /// the applier).
    pub fn lose_next_answer(&self, error: StoreError) {
        self.state().faults.push_back(Fault::After(error));
    }

    /// Every call fails with a permanent error (a schema fault) until [`MemoryStore::fix`].
    pub fn break_schema(&self, message: &str) {
        self.state().broken = Some(message.to_owned());
    }

    /// Clears the fault of [`MemoryStore::break_schema`].
    pub fn fix(&self) {
        self.state().broken = None;
    }

    /// The next `n` resumes fail transiently (the store is down at start).
    pub fn unreachable_for(&self, n: usize) {
        self.state().unreachable_resumes = n;
    }

    /// Records that the batch `[start, end)` of `log_id` was begun and not finished: `resume`
    /// reports it, and its write must cover exactly that range.
    pub fn leave_unfinished(&self, log_id: &str, start: u64, end: u64) {
        self.state().unfinished = Some((log_id.to_owned(), start, end));
    }

    /// Marks everything of `log_id` before `end` as applied, as one batch holding `records`.
    pub fn preload(&self, log_id: &str, end: u64, records: Vec<UsageRecord>) {
        self.state()
            .batches
            .insert((log_id.to_owned(), 0), (end, records));
    }

    /// Every record applied, in log order.
    pub fn records(&self) -> Vec<UsageRecord> {
        self.state()
            .batches
            .values()
            .flat_map(|(_, records)| records.iter().cloned())
            .collect()
    }

    /// The log ranges applied, in order.
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        self.state()
            .batches
            .iter()
            .map(|((_, start), (end, _))| (*start, *end))
            .collect()
    }

    /// Every write attempt so far.
    pub fn attempts(&self) -> Vec<Attempt> {
        self.state().attempts.clone()
    }

    /// Writes that overlapped a range already applied, other than the same batch retried
    /// after a lost answer (an exactly-once violation; 0 in a correct pipeline).
    pub fn duplicates(&self) -> usize {
        self.state().duplicates
    }
}

impl StoreWriter for MemoryStore {
    async fn resume(&mut self, log_id: &str) -> Result<Resume, StoreError> {
        let mut state = self.state();
        if let Some(message) = &state.broken {
            return Err(StoreError::Permanent(message.clone()));
        }
        if state.unreachable_resumes > 0 {
            state.unreachable_resumes -= 1;
            return Err(StoreError::Transient("memory store: unreachable".into()));
        }
        if let Some((log, start, end)) = &state.unfinished
            && log == log_id
        {
            return Ok(Resume::Unfinished {
                start: *start,
                end: *end,
            });
        }
        let mark = state
            .batches
            .iter()
            .filter(|((log, _), _)| log == log_id)
            .map(|(_, (end, _))| *end)
            .max()
            .unwrap_or(0);
        Ok(Resume::At(mark))
    }

    async fn write(&mut self, batch: &Batch<'_>, retry: bool) -> Result<(), StoreError> {
        let mut state = self.state();
        let mut attempt = Attempt {
            at: Instant::now(),
            start: batch.start,
            end: batch.end,
            retry,
            ok: false,
        };
        if let Some(message) = state.broken.clone() {
            state.attempts.push(attempt);
            return Err(StoreError::Permanent(message));
        }
        let fault = state.faults.pop_front();
        if let Some(Fault::Before(error)) = fault {
            state.attempts.push(attempt);
            return Err(error);
        }
        if let Some((log, start, end)) = state.unfinished.take() {
            assert!(
                log == batch.log_id && start == batch.start && end == batch.end,
                "an unfinished batch [{start}, {end}) must be finished exactly, got [{}, {})",
                batch.start,
                batch.end
            );
        }
        // A batch that overlaps one already applied is applied twice, unless it is that very
        // batch again after an answer was lost (`retry`: the writer checks, as Postgres does
        // by batch id).
        let overlapping = state.batches.iter().any(|((log, start), (end, _))| {
            log == batch.log_id && *start < batch.end && batch.start < *end
        });
        let key = (batch.log_id.to_owned(), batch.start);
        let same_batch = state.batches.contains_key(&key);
        if overlapping && !(same_batch && retry) {
            state.duplicates += 1;
        }
        if let Entry::Vacant(slot) = state.batches.entry(key) {
            slot.insert((batch.end, batch.records.to_vec()));
        }
        if let Some(Fault::After(error)) = fault {
            state.attempts.push(attempt);
            return Err(error);
        }
        attempt.ok = true;
        state.attempts.push(attempt);
        Ok(())
    }
}
