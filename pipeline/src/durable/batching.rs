//! Cutting the log into batches: when an applier writes ([`next_step`]: by bytes or age, at
//! once on replay and at shutdown) and what a batch holds ([`read_batch`]: whole blocks, up
//! to the row and byte limits, or exactly the range of a batch begun before a crash). Both
//! are plain functions over the log on disk and a few numbers, so they are unit-tested
//! without any store.

use std::path::Path;
use std::time::Duration;

use apex_core::model::UsageRecord;

use super::config::BatchLimits;
use crate::wal;

/// How long an applier waiting for its batch to fill sleeps before it looks again: it is not
/// woken by every fsync (there is one per group commit), so it naps, and a backlog that
/// reaches `max_bytes` meanwhile goes within a nap.
pub(super) const NAP: Duration = Duration::from_millis(20);

/// What an applier does next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Step {
    /// Everything durable is applied: wait for the log to grow.
    Idle,
    /// Everything is applied and the writer has stopped: the applier is done.
    Stop,
    /// Records wait, but neither enough nor old enough for a batch: look again after this.
    Wait(Duration),
    /// Read a batch from the applier's position towards `limit` and write it; `exact` reads
    /// exactly to `limit` (the range of a batch begun before a crash).
    Write {
        /// Where the batch may end at most.
        limit: u64,
        /// Read exactly to `limit`, ignoring the batch limits.
        exact: bool,
    },
}

/// The next step of an applier at `position` when the log is durable up to `durable`.
/// `unfinished_end` is the end of a batch begun before a crash, `inherited` the end of the
/// log a previous process left (replay goes at once, without waiting for a batch to fill),
/// and `waited` how long the oldest unapplied record has waited.
pub(super) fn next_step(
    position: u64,
    durable: u64,
    unfinished_end: Option<u64>,
    inherited: u64,
    writer_done: bool,
    waited: Duration,
    limits: &BatchLimits,
) -> Step {
    if durable <= position {
        return if writer_done { Step::Stop } else { Step::Idle };
    }
    let full = durable - position >= limits.max_bytes as u64;
    let replaying = position < inherited || unfinished_end.is_some();
    if !full && !replaying && !writer_done && waited < limits.max_age {
        return Step::Wait((limits.max_age - waited).min(NAP));
    }
    match unfinished_end {
        Some(end) => Step::Write {
            limit: end,
            exact: true,
        },
        None => Step::Write {
            limit: durable,
            exact: false,
        },
    }
}

/// A batch read from the log; its records are in the [`BatchBuffers`] it was read with.
pub(super) struct ReadBatch<'a> {
    /// Log position just after the batch.
    pub(super) end: u64,
    /// Its records, in log order.
    pub(super) records: &'a [UsageRecord],
    /// Corrupt log bytes skipped inside it.
    pub(super) corrupt_bytes: u64,
}

/// What an applier keeps from batch to batch: the log bytes it reads and the records it
/// decodes. A batch is a few MiB every half second; allocating them afresh each time cost a
/// page fault per 4 KiB once the allocator had given the last batch's pages back to the
/// kernel (0.28 faults per `track` request in the two appliers, issue 19).
#[derive(Default)]
pub(super) struct BatchBuffers {
    /// The last read's bytes and block offsets.
    scan: wal::Scan,
    records: Vec<UsageRecord>,
}

impl BatchBuffers {
    /// Capacity kept between batches (about 11 MiB per applier: 4 MiB of log bytes, 65,536
    /// records of 80 bytes and block offsets of 32): a half second of `track` at 50,000
    /// requests a second fits. Up to twice that is kept as it is, so that batches just above
    /// it do not shrink and grow their buffers every time; a replay's or a burst's larger
    /// batch is cut back to it after it is written.
    const KEPT_BYTES: usize = 4 << 20;
    const KEPT_RECORDS: usize = 64 * 1024;

    /// Drops the last batch's records (so an idle applier holds none) and cuts any buffer
    /// over twice its kept capacity back to it.
    pub(super) fn recycle(&mut self) {
        fn cut<T>(buffer: &mut Vec<T>, kept: usize) {
            buffer.clear();
            if buffer.capacity() > 2 * kept {
                buffer.shrink_to(kept);
            }
        }
        cut(&mut self.records, Self::KEPT_RECORDS);
        cut(&mut self.scan.bytes, Self::KEPT_BYTES);
        cut(&mut self.scan.blocks, Self::KEPT_RECORDS);
    }
}

/// Reads whole blocks from `start` towards `limit`: up to the batch limits, or, when `exact`,
/// exactly to `limit` (the range of a batch begun before a crash). The records replace those
/// in `buffers`.
pub(super) fn read_batch<'a>(
    dir: &Path,
    start: u64,
    limit: u64,
    limits: &BatchLimits,
    exact: bool,
    buffers: &'a mut BatchBuffers,
) -> std::io::Result<ReadBatch<'a>> {
    let records = &mut buffers.records;
    records.clear();
    let mut end = start;
    let mut corrupt_bytes = 0;
    while end < limit {
        let taken = usize::try_from(end - start).unwrap_or(usize::MAX);
        if !exact && (taken >= limits.max_bytes || records.len() >= limits.max_rows) {
            break;
        }
        let budget = limits.max_bytes.saturating_sub(taken).max(1);
        let scan = wal::read(dir, end, limit, budget, std::mem::take(&mut buffers.scan))?;
        let mut cut = None;
        // Log bytes of the blocks taken, so that a cut batch counts only the corruption
        // before its cut (the next batch reads and counts what lies after it).
        let mut block_bytes = 0;
        for block in &scan.blocks {
            let before = records.len();
            if let Err(e) = wal::decode_records_into(scan.payload(block), records) {
                tracing::error!(error = %e, at = block.position, "skipped an undecodable log block");
            }
            if !exact && before > 0 && records.len() > limits.max_rows {
                // This block starts the next batch.
                records.truncate(before);
                cut = Some(block.position);
                break;
            }
            block_bytes += block.next - block.position;
        }
        let scanned_end = scan.end;
        buffers.scan = scan;
        if let Some(position) = cut {
            // Below the cut, every byte is a block taken or skipped corruption.
            corrupt_bytes += (position - end) - block_bytes;
            end = position;
            break;
        }
        corrupt_bytes += buffers.scan.corrupt_bytes;
        if scanned_end <= end {
            break; // nothing complete to read (cannot happen below the durable position)
        }
        end = scanned_end;
    }
    if exact {
        end = limit;
    }
    Ok(ReadBatch {
        end,
        records,
        corrupt_bytes,
    })
}
