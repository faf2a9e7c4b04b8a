//! The limits of the durable pipeline, named and checked: the log writer's queue, segments
//! and group commits, the log's cap on disk, and how the appliers cut the log into batches.

use std::path::{Path, PathBuf};
use std::time::Duration;

use apex_core::stores::StoreConfig;

use crate::clickhouse_sink;

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
    /// Whether the next segment is written ahead as zeros (`APEX_WAL_PREALLOCATE`, default
    /// on; only while the groups are small, [`crate::wal::PREPARE_BELOW_GROUP_BYTES`]): a
    /// group commit's fsync then writes only data, not the growing file's inode too (see
    /// [`crate::wal`]). Turn it off on copy-on-write filesystems (ZFS, btrfs), where
    /// writing over zeros allocates anew and the zeros are only extra writes.
    pub preallocate_segments: bool,
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
            preallocate_segments: true,
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
