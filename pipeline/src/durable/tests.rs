//! Unit tests of the durable sink over the in-memory store: batching, replay after a restart,
//! a batch left unfinished, lost answers, backoff on a paused clock, and parking after a
//! permanent error. The same code runs against the real stores in `tests/durable.rs`.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use apex_core::model::{Metric, UsageRecord};
use apex_core::stores::StoreConfig;

use super::applier::Applier;
use super::batching::{BatchBuffers, NAP, Step, next_step, read_batch};
use super::memory::MemoryStore;
use super::{BatchLimits, DurableConfig, DurableSink, Shared, Store};
use crate::sink::{RecordSink, SinkError};
use crate::store::StoreError;
use crate::wal::{self, WalWriter};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("apex-durable-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn stores() -> StoreConfig {
    StoreConfig {
        database_url: "postgres://unused".into(),
        clickhouse_url: "http://unused".into(),
        clickhouse_database: "unused".into(),
        clickhouse_user: None,
        clickhouse_password: None,
        pg_max_connections: 1,
    }
}

fn config(dir: &Path) -> DurableConfig {
    let mut config = DurableConfig::new(dir, &stores());
    config.batch.max_age = Duration::from_millis(20);
    config
}

fn records(n: usize, first_quantity: u64) -> Vec<UsageRecord> {
    (0..n as u64)
        .map(|i| UsageRecord {
            customer_id: "cus_memory".into(),
            metric: Metric::Impressions,
            quantity: first_quantity + i,
            event_id: Some(format!("e{}", first_quantity + i).into()),
            timestamp_ms: 1_790_000_000_000,
            received_ms: 1_790_000_000_000,
            metadata: None,
        })
        .collect()
}

/// Writes `blocks` blocks of `per_block` records to a log in `dir`; returns the position of
/// every block and the end.
fn write_log(dir: &Path, blocks: usize, per_block: usize) -> Vec<u64> {
    let (mut log, _) = WalWriter::open(dir, 1 << 20).unwrap();
    let mut positions = vec![log.position()];
    for b in 0..blocks {
        log.append(&[wal::encode_records(&records(
            per_block,
            (b * per_block) as u64 + 1,
        ))])
        .unwrap();
        positions.push(log.position());
    }
    log.sync().unwrap();
    positions
}

/// The store's applied ranges follow one another with no gap and no overlap.
fn assert_contiguous(store: &MemoryStore) {
    let ranges = store.ranges();
    for pair in ranges.windows(2) {
        assert_eq!(pair[0].1, pair[1].0, "{ranges:?}");
    }
}

fn quantities(records: &[UsageRecord]) -> Vec<u64> {
    records.iter().map(|r| r.quantity).collect()
}

fn start(dir: &Path, postgres: &MemoryStore, clickhouse: &MemoryStore) -> Arc<DurableSink> {
    start_configured(&config(dir), postgres, clickhouse)
}

fn start_configured(
    config: &DurableConfig,
    postgres: &MemoryStore,
    clickhouse: &MemoryStore,
) -> Arc<DurableSink> {
    let (p, c) = (postgres.clone(), clickhouse.clone());
    DurableSink::start_with(config, move || Ok(p), move || Ok(c)).unwrap()
}

async fn submit(sink: &DurableSink, requests: usize, per_request: usize) -> Vec<u64> {
    let mut sent = Vec::new();
    for r in 0..requests {
        let batch = records(per_request, (r * per_request) as u64 + 1);
        sent.extend(quantities(&batch));
        sink.submit(batch).unwrap().await.unwrap().unwrap();
    }
    sent
}

async fn wait_until(what: &str, condition: impl Fn() -> bool) {
    for _ in 0..1_000 {
        if condition() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("timed out waiting until {what}");
}

/// Submits `n` one-record requests to a sink whose writer stopped: each is refused at once,
/// or answered `Unavailable` by the stopped writer, never left waiting.
async fn assert_refused_at_once(sink: &DurableSink, n: u64) {
    for i in 0..n {
        match sink.submit(records(1, 300 + i)) {
            Err(e) => assert_eq!(e, SinkError::Unavailable),
            Ok(ack) => {
                let answer = tokio::time::timeout(Duration::from_secs(5), ack)
                    .await
                    .expect("a submission to a stopped writer is answered at once");
                assert_eq!(answer, Ok(Err(SinkError::Unavailable)));
            }
        }
    }
}

/// Waits until both stores hold everything durable, then shuts the sink down.
async fn applied_then_shut(sink: Arc<DurableSink>) {
    wait_until("both stores hold what was acknowledged", || {
        sink.applied_position() == sink.durable_position()
    })
    .await;
    shut(sink).await;
}

async fn shut(sink: Arc<DurableSink>) {
    tokio::task::spawn_blocking(move || sink.shutdown())
        .await
        .unwrap();
}

#[test]
fn an_applier_waits_for_bytes_or_age_and_replays_at_once() {
    let limits = BatchLimits {
        max_rows: 100,
        max_bytes: 1_000,
        max_age: Duration::from_millis(500),
    };
    let step = |position, durable, unfinished, inherited, done, waited_ms| {
        next_step(
            position,
            durable,
            unfinished,
            inherited,
            done,
            Duration::from_millis(waited_ms),
            &limits,
        )
    };
    // Nothing to apply.
    assert_eq!(step(10, 10, None, 0, false, 0), Step::Idle);
    assert_eq!(step(10, 10, None, 0, true, 0), Step::Stop);
    // A little, young: wait, in naps, until it is old enough.
    assert_eq!(step(10, 20, None, 0, false, 0), Step::Wait(NAP));
    assert_eq!(
        step(10, 20, None, 0, false, 490),
        Step::Wait(Duration::from_millis(10))
    );
    let write_to = |limit, exact| Step::Write { limit, exact };
    assert_eq!(step(10, 20, None, 0, false, 500), write_to(20, false));
    // Enough bytes go at once.
    assert_eq!(step(10, 1_010, None, 0, false, 0), write_to(1_010, false));
    // Replay of what a previous process left, and a shutdown, go at once.
    assert_eq!(step(10, 20, None, 15, false, 0), write_to(20, false));
    assert_eq!(step(10, 20, None, 0, true, 0), write_to(20, false));
    // A batch begun before a crash is finished exactly, whatever else is in the log.
    assert_eq!(
        step(10, 5_000, Some(40), 5_000, false, 0),
        write_to(40, true)
    );
}

#[test]
fn batches_are_cut_at_block_boundaries_by_rows_and_bytes() {
    let dir = temp_dir("cut");
    let positions = write_log(&dir, 10, 30);
    let end = *positions.last().unwrap();
    let limits = |max_rows, max_bytes| BatchLimits {
        max_rows,
        max_bytes,
        max_age: Duration::ZERO,
    };
    // One set of buffers for every read, as an applier keeps it: no batch sees another's.
    let mut buffers = BatchBuffers::default();
    // 100 rows at most: three 30-record blocks, never a block split.
    let batch = read_batch(&dir, 0, end, &limits(100, 1 << 20), false, &mut buffers).unwrap();
    assert_eq!((batch.records.len(), batch.end), (90, positions[3]));
    // A byte budget of two blocks.
    let two = (positions[2] - positions[0]) as usize;
    let batch = read_batch(&dir, 0, end, &limits(1_000, two), false, &mut buffers).unwrap();
    assert_eq!(batch.end, positions[2]);
    // A block bigger than the row limit still makes one batch.
    let batch = read_batch(
        &dir,
        positions[4],
        end,
        &limits(10, 1 << 20),
        false,
        &mut buffers,
    )
    .unwrap();
    assert_eq!(batch.records[0].quantity, 121);
    assert_eq!((batch.records.len(), batch.end), (30, positions[5]));
    // Exactly a given range, limits or not.
    buffers.recycle();
    let batch = read_batch(
        &dir,
        positions[1],
        positions[7],
        &limits(10, 10),
        true,
        &mut buffers,
    )
    .unwrap();
    assert_eq!((batch.records.len(), batch.end), (180, positions[7]));
    assert_eq!(batch.records[0].quantity, 31);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn corruption_after_a_cut_is_counted_once_by_the_batch_that_reads_it() {
    let dir = temp_dir("cut-corrupt");
    let positions = write_log(&dir, 10, 30);
    let end = *positions.last().unwrap();
    // Flip a payload byte of block 5: its checksum fails, and the scan skips the whole block.
    let segment = std::fs::read_dir(&dir)
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&segment).unwrap();
    bytes[(positions[5] + wal::FRAME_HEADER as u64 + 2) as usize] ^= 0xff;
    std::fs::write(&segment, bytes).unwrap();
    let limits = BatchLimits {
        max_rows: 60,
        max_bytes: 1 << 20,
        max_age: Duration::ZERO,
    };
    // Each read scans to the end of the log, past block 5, but the first batches are cut by
    // rows before it.
    let mut buffers = BatchBuffers::default();
    let (mut at, mut corrupt, mut taken, mut batches) = (0, 0, 0, 0);
    while at < end {
        let batch = read_batch(&dir, at, end, &limits, false, &mut buffers).unwrap();
        corrupt += batch.corrupt_bytes;
        taken += batch.records.len();
        at = batch.end;
        batches += 1;
        buffers.recycle();
    }
    assert_eq!(corrupt, positions[6] - positions[5], "the one block, once");
    assert_eq!(taken, 9 * 30);
    assert!(batches >= 5, "{batches} batches");
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn acknowledged_records_reach_both_stores_once_across_a_restart() {
    let dir = temp_dir("once");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    let sink = start(&dir, &postgres, &clickhouse);
    let sent = submit(&sink, 50, 7).await;
    wait_until("both stores hold the log", || {
        sink.applied_position() == sink.durable_position()
    })
    .await;
    shut(sink).await;
    for store in [&postgres, &clickhouse] {
        assert_eq!(quantities(&store.records()), sent);
        assert_eq!(store.duplicates(), 0);
        assert_contiguous(store);
    }
    let ranges = postgres.ranges();

    // A restart replays nothing: both watermarks cover the log.
    let again = start(&dir, &postgres, &clickhouse);
    tokio::time::sleep(Duration::from_millis(200)).await;
    shut(again).await;
    assert_eq!(postgres.ranges(), ranges);
    assert_eq!(quantities(&clickhouse.records()), sent);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_store_that_was_down_replays_the_log_at_the_next_start() {
    let dir = temp_dir("replay");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    clickhouse.unreachable_for(usize::MAX);
    let mut config = config(&dir);
    config.shutdown_apply_budget = Duration::from_millis(100);
    let sink = start_configured(&config, &postgres, &clickhouse);
    let sent = submit(&sink, 20, 5).await;
    wait_until("postgres holds the log", || {
        sink.postgres_position() == sink.durable_position()
    })
    .await;
    assert_eq!(sink.clickhouse_position(), 0, "ClickHouse was down");
    shut(sink).await;
    assert!(clickhouse.records().is_empty());

    clickhouse.unreachable_for(0);
    let postgres_ranges = postgres.ranges();
    let again = start(&dir, &postgres, &clickhouse);
    wait_until("ClickHouse caught up", || {
        again.clickhouse_position() == again.durable_position()
    })
    .await;
    shut(again).await;
    assert_eq!(quantities(&clickhouse.records()), sent);
    assert_eq!(
        postgres.ranges(),
        postgres_ranges,
        "Postgres replays nothing"
    );
    assert_eq!(postgres.duplicates() + clickhouse.duplicates(), 0);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_batch_begun_before_a_crash_is_finished_exactly_then_the_rest_follows() {
    let dir = temp_dir("unfinished");
    let positions = write_log(&dir, 8, 10);
    let log_id = super::log_id(&dir).unwrap();
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    // Both stores have the first two blocks; ClickHouse began [block 2, block 5) and died.
    let first_two = records(20, 1);
    postgres.preload(&log_id, positions[2], first_two.clone());
    clickhouse.preload(&log_id, positions[2], first_two);
    clickhouse.leave_unfinished(&log_id, positions[2], positions[5]);
    let sink = start(&dir, &postgres, &clickhouse);
    wait_until("both stores hold the log", || {
        sink.applied_position() == *positions.last().unwrap()
    })
    .await;
    shut(sink).await;
    let ranges = clickhouse.ranges();
    assert_eq!(ranges[1], (positions[2], positions[5]), "{ranges:?}");
    let all: Vec<u64> = (1..=80).collect();
    assert_eq!(quantities(&clickhouse.records()), all);
    assert_eq!(quantities(&postgres.records()), all);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_lost_answer_is_checked_not_applied_twice() {
    let dir = temp_dir("lost");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    postgres.lose_next_answer(StoreError::Transient("connection reset at COMMIT".into()));
    let sink = start(&dir, &postgres, &clickhouse);
    let sent = submit(&sink, 5, 3).await;
    wait_until("both stores hold the log", || {
        sink.applied_position() == sink.durable_position()
    })
    .await;
    shut(sink).await;
    assert_eq!(quantities(&postgres.records()), sent);
    assert_eq!(postgres.duplicates(), 0);
    let attempts = postgres.attempts();
    assert!(
        !attempts[0].ok && attempts[1].retry && attempts[1].ok,
        "{attempts:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Gaps between attempts equal `expected` (ms), up to the timer's 1 ms granularity.
fn assert_gaps(gaps: &[u128], expected: &[u128]) {
    assert_eq!(gaps.len(), expected.len(), "{gaps:?}");
    for (gap, want) in gaps.iter().zip(expected) {
        assert!(
            (*want..=want + 1).contains(gap),
            "{gaps:?} against {expected:?}"
        );
    }
}

#[tokio::test(start_paused = true)]
async fn transient_errors_back_off_exponentially_and_the_backoff_resets() {
    let dir = temp_dir("backoff");
    let positions = write_log(&dir, 2, 5);
    let mut config = config(&dir);
    config.shutdown_apply_budget = Duration::from_secs(3_600);
    config.batch.max_rows = 5;
    let shared = Shared::new(positions[2], 0, config.max_log_bytes);
    shared.writer_done.store(true, Ordering::SeqCst);
    let store = MemoryStore::new();
    for _ in 0..7 {
        store.fail_next(StoreError::Transient("too many parts".into()));
    }
    // Each batch is one block: the first fails 7 times, the second goes through at once.
    let mut applier = Applier::new(Store::ClickHouse, &config, "log", &shared, store.clone());
    applier.run().await;
    let attempts = store.attempts();
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis())
        .collect();
    // 50 ms doubling to the 2 s cap, then the next batch at once.
    assert_gaps(&gaps, &[50, 100, 200, 400, 800, 1_600, 2_000, 0]);
    assert_eq!(
        store.ranges(),
        [(positions[0], positions[1]), (positions[1], positions[2])]
    );

    // After a success the backoff starts again from 50 ms.
    let dir2 = temp_dir("backoff-reset");
    let positions = write_log(&dir2, 2, 5);
    let mut config = config.clone();
    config.wal_dir = dir2.clone();
    let shared = Shared::new(positions[2], 0, config.max_log_bytes);
    shared.writer_done.store(true, Ordering::SeqCst);
    let store = MemoryStore::new();
    store.fail_next(StoreError::Transient("timeout".into()));
    store.fail_next(StoreError::Transient("timeout".into()));
    let mut applier = Applier::new(Store::Postgres, &config, "log", &shared, store.clone());
    applier.run().await;
    assert_eq!(store.ranges().len(), 2);
    let attempts = store.attempts();
    let gaps: Vec<u128> = attempts
        .windows(2)
        .map(|w| (w[1].at - w[0].at).as_millis())
        .collect();
    assert_gaps(&gaps, &[50, 100, 0]);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_dir_all(&dir2);
}

#[tokio::test]
async fn a_permanent_error_parks_the_batch_without_blocking_the_other_store() {
    let dir = temp_dir("parked");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    let sink = start(&dir, &postgres, &clickhouse);
    let before = submit(&sink, 3, 4).await;
    wait_until("both stores hold the log", || {
        sink.applied_position() == sink.durable_position()
    })
    .await;
    let parked_at = sink.durable_position();
    postgres.break_schema("column \"quantity\" does not exist");
    let after = submit(&sink, 10, 4).await;
    wait_until("Postgres is reported stuck", || {
        !sink.stuck_stores().is_empty()
    })
    .await;
    wait_until("ClickHouse holds everything", || {
        sink.clickhouse_position() == sink.durable_position()
    })
    .await;
    let stuck = sink.stuck_stores();
    assert_eq!(stuck.len(), 1, "{stuck:?}");
    assert_eq!(
        (stuck[0].store, stuck[0].batch_id),
        ("postgres", Some(parked_at))
    );
    assert!(stuck[0].error.contains("quantity"), "{}", stuck[0].error);
    // Parked, not retried in a loop.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failed: Vec<_> = postgres.attempts().into_iter().filter(|a| !a.ok).collect();
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(sink.postgres_position(), parked_at);
    // The log keeps accepting (until its cap) and keeps the parked batch.
    let more = submit(&sink, 2, 4).await;
    shut(sink).await;

    // Fixed and restarted: the parked batch and everything after it reach Postgres, once.
    postgres.fix();
    let again = start(&dir, &postgres, &clickhouse);
    wait_until("both stores hold the log", || {
        again.applied_position() == again.durable_position()
    })
    .await;
    assert!(again.stuck_stores().is_empty());
    shut(again).await;
    let all: Vec<u64> = [before, after, more].concat();
    assert_eq!(quantities(&postgres.records()), all);
    assert_eq!(quantities(&clickhouse.records()), all);
    assert_eq!(postgres.duplicates() + clickhouse.duplicates(), 0);
    assert_contiguous(&postgres);
    assert_contiguous(&clickhouse);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_store_broken_from_the_start_is_stuck_and_the_other_goes_on() {
    let dir = temp_dir("broken");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    clickhouse.break_schema(
        "Code: 60, e.displayText() = DB::Exception: Table apex.usage_events doesn't exist",
    );
    let sink = start(&dir, &postgres, &clickhouse);
    let sent = submit(&sink, 4, 2).await;
    wait_until("Postgres holds the log", || {
        sink.postgres_position() == sink.durable_position()
    })
    .await;
    wait_until("ClickHouse is stuck", || !sink.stuck_stores().is_empty()).await;
    let stuck = sink.stuck_stores();
    assert_eq!((stuck[0].store, stuck[0].batch_id), ("clickhouse", None));
    shut(sink).await;
    assert_eq!(quantities(&postgres.records()), sent);
    assert!(clickhouse.records().is_empty());
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn the_sink_prepares_segments_ahead_unless_told_not_to() {
    for preallocate in [true, false] {
        let dir = temp_dir(&format!("prepare-{preallocate}"));
        let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
        let mut config = config(&dir);
        config.segment_bytes = 4096;
        config.max_log_bytes = 1 << 20;
        config.preallocate_segments = preallocate;
        let sink = start_configured(&config, &postgres, &clickhouse);
        let prepared = dir.join(wal::PREPARED_SEGMENT);
        let segments = || wal::segments(&dir).unwrap();
        // Several segments (a request of five records is a few hundred bytes).
        let mut sent = submit(&sink, 40, 5).await;
        let one_more = async |sent: &mut Vec<u64>| {
            let batch = records(5, sent.len() as u64 + 1);
            sent.extend(quantities(&batch));
            sink.submit(batch).unwrap().await.unwrap().unwrap();
        };
        if preallocate {
            // Past half of a segment the next is asked for; the roll renames it into place.
            for _ in 0..2_000 {
                if prepared.exists() {
                    break;
                }
                one_more(&mut sent).await;
            }
            assert!(prepared.exists(), "the next segment is prepared");
            // The last segment is the writer's (the appliers delete only older ones).
            let before = *segments().last().unwrap();
            while *segments().last().unwrap() == before {
                one_more(&mut sent).await;
            }
            let last = dir.join(format!("{:020}.wal", segments().last().unwrap()));
            assert_eq!(
                std::fs::metadata(last).unwrap().len(),
                4096,
                "the prepared file"
            );
            assert!(!prepared.exists(), "taken, and the next not yet asked for");
        } else {
            // Rolled several times, each into a created file holding only what was written.
            let last = *segments().last().unwrap();
            assert!(last > 2 * 4096 && !prepared.exists());
            let file = dir.join(format!("{last:020}.wal"));
            assert_eq!(
                std::fs::metadata(file).unwrap().len(),
                sink.durable_position() - last
            );
        }
        wait_until("both stores hold the log", || {
            sink.applied_position() == sink.durable_position()
        })
        .await;
        let end = sink.durable_position();
        shut(sink).await;
        if !preallocate {
            // A segment an earlier run prepared: removed by a log that no longer prepares.
            std::fs::write(&prepared, [0u8; 4096]).unwrap();
        }
        // A restart over a segment that was prepared (zeros after its last block) cuts
        // nothing and replays nothing; what follows lands once.
        let again = start_configured(&config, &postgres, &clickhouse);
        assert_eq!(again.durable_position(), end, "nothing cut");
        assert!(
            preallocate || !prepared.exists(),
            "no leftover when not preparing"
        );
        let mut more = Vec::new();
        for r in 0..10 {
            let batch = records(5, 1_000 + r * 5);
            more.extend(quantities(&batch));
            again.submit(batch).unwrap().await.unwrap().unwrap();
        }
        wait_until("both stores hold the log", || {
            again.applied_position() == again.durable_position()
        })
        .await;
        shut(again).await;
        let all: Vec<u64> = sent.iter().chain(&more).copied().collect();
        for store in [&postgres, &clickhouse] {
            assert_eq!(quantities(&store.records()), all);
            assert_eq!(store.duplicates(), 0);
            assert_contiguous(store);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[tokio::test]
async fn a_failed_fsync_refuses_its_group_and_the_log_goes_on() {
    let dir = temp_dir("fsync-fails");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    let sink = start(&dir, &postgres, &clickhouse);
    let before = submit(&sink, 3, 2).await;
    // The next group's fsync fails: the log is cut back, its request refused.
    wal::faults::inject(&dir, wal::faults::Fault::Sync, 1);
    let refused = sink.submit(records(2, 100)).unwrap().await.unwrap();
    assert_eq!(refused, Err(SinkError::Unavailable));
    // The writer goes on: the next request is taken, and the sink is ready.
    sink.submit(records(2, 200))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    assert_eq!(sink.writer_failure(), None);
    applied_then_shut(sink).await;
    // Only acknowledged records reached the stores; the refused ones never will.
    let mut expected = before.clone();
    expected.extend([200, 201]);
    for store in [&postgres, &clickhouse] {
        assert_eq!(quantities(&store.records()), expected);
        assert_contiguous(store);
    }
    let again = start(&dir, &postgres, &clickhouse);
    tokio::time::sleep(Duration::from_millis(200)).await;
    shut(again).await;
    assert_eq!(quantities(&postgres.records()), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_failed_rollback_stops_the_writer_and_every_later_submission_is_refused_at_once() {
    let dir = temp_dir("rollback-fails");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    let sink = start(&dir, &postgres, &clickhouse);
    let before = submit(&sink, 3, 2).await;
    wal::faults::inject(&dir, wal::faults::Fault::Sync, 1);
    wal::faults::inject(&dir, wal::faults::Fault::Rollback, 1);
    let refused = sink.submit(records(2, 100)).unwrap().await.unwrap();
    assert_eq!(refused, Err(SinkError::Unavailable));
    // The writer stops: it says why, and nothing more is taken (refused at once, or
    // answered Unavailable by the stopped writer: never left waiting).
    wait_until("the writer reports its failure", || {
        sink.writer_failure().is_some()
    })
    .await;
    let why = sink.writer_failure().unwrap();
    assert!(why.contains("restart the server"), "{why}");
    assert_refused_at_once(&sink, 20).await;
    assert_eq!(sink.queue_depth(), 0);
    // Shutdown still ends, and what was acknowledged reaches both stores.
    applied_then_shut(sink).await;
    for store in [&postgres, &clickhouse] {
        assert_eq!(quantities(&store.records()), before);
    }
    // A restart recovers the log from the disk: the writer runs again. The refused group
    // was not cut (that is what failed) and its bytes reached the file, so it is read back:
    // a refused request may still be counted, which its client's retry with the same
    // event ids (deduplicated) makes harmless; nothing acknowledged is ever lost.
    let again = start(&dir, &postgres, &clickhouse);
    assert_eq!(again.writer_failure(), None);
    again
        .submit(records(1, 400))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    applied_then_shut(again).await;
    let mut expected = before.clone();
    expected.extend([100, 101, 400]);
    assert_eq!(quantities(&postgres.records()), expected);
    assert_eq!(quantities(&clickhouse.records()), expected);
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn a_panicking_writer_refuses_its_group_and_everything_after_until_a_restart() {
    let dir = temp_dir("writer-panics");
    let (postgres, clickhouse) = (MemoryStore::new(), MemoryStore::new());
    let sink = start(&dir, &postgres, &clickhouse);
    let before = submit(&sink, 2, 2).await;
    wal::faults::inject(&dir, wal::faults::Fault::Panic, 1);
    // The group in hand has its acknowledgement dropped: not durable, refused.
    let answer = sink.submit(records(2, 100)).unwrap().await;
    assert!(answer.is_err(), "{answer:?}");
    wait_until("the writer reports its failure", || {
        sink.writer_failure().is_some()
    })
    .await;
    assert!(sink.writer_failure().unwrap().contains("panicked"));
    assert_refused_at_once(&sink, 5).await;
    applied_then_shut(sink).await;
    assert_eq!(quantities(&postgres.records()), before);
    let again = start(&dir, &postgres, &clickhouse);
    again
        .submit(records(1, 400))
        .unwrap()
        .await
        .unwrap()
        .unwrap();
    shut(again).await;
    assert_eq!(quantities(&clickhouse.records()).last(), Some(&400));
    let _ = std::fs::remove_dir_all(&dir);
}
