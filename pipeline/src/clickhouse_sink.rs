//! The ClickHouse side of the pipeline: one `usage_events` row per record, written in
//! RowBinary, each carrying its `event_id`, the id of the log it came from (`log_id`) and its
//! batch (`batch_id`, the log position where the batch starts). The daily rollup
//! (`usage_daily`) is fed from `usage_events` by a materialized view.
//!
//! # Why replay never inserts a row twice
//!
//! ClickHouse has no transactions, and one `INSERT` is not all-or-nothing: a client that dies
//! while streaming rows can leave the server with a prefix of them, committed (seen here:
//! ClickHouse 18.16 took a RowBinary stream cut at a row boundary as complete). So every row
//! carries its batch (`batch_id`, the log position where the batch starts) and its index in
//! the batch (`batch_seq`), and a batch is written in three steps, each recorded in
//! `pipeline_batches`, all by the single applier of the log, in log order:
//!
//! 1. a `started` marker with the batch's exact log range `[batch_id, end_position)` and the
//!    span of its timestamps, written *before* any of its rows;
//! 2. the rows, in one `INSERT` tagged with a query id naming the batch;
//! 3. a `done` marker.
//!
//! On start the applier reads the newest marker of its log. `done` means everything up to its
//! `end_position` is in, and the next batch starts there. `started` means the process died
//! inside that batch: the applier reads back exactly the same log range, waits until no
//! `INSERT` of that batch is still running on the server (by query id in
//! `system.processes`), reads which `batch_seq` of the batch are present (`log_id`,
//! `batch_id` and the timestamp span narrow the scan to the batch's partitions), inserts only
//! the missing rows, then writes `done`. An `INSERT` whose outcome is unknown (an error after
//! the rows were sent) is settled the same way before it is retried. Nothing is inserted
//! before its `started` marker is known to be written, so rows without a marker cannot exist.
//!
//! The daily rollup is fed by the materialized view from exactly the rows that land in
//! `usage_events`, partial inserts included, so it stays equal to them. What this does not
//! cover: the ClickHouse server itself dying between writing a part of `usage_events` and the
//! view's part of `usage_daily`; `usage_events` stays exact, and `usage_daily` can be rebuilt
//! from it.

use std::collections::HashSet;
use std::time::Duration;

use bytes::{BufMut, BytesMut};
use chrono::{DateTime, Utc};
use clickhouse::Client;
use serde::Serialize;

use apex_core::model::{Metric, UsageRecord};

use crate::store::{Batch, Resume, StoreError, StoreWriter};

/// Rows in one batch at most: ClickHouse's advice is inserts of 10,000 to 1,000,000 rows,
/// and a replay reads the `batch_seq` of one batch into memory.
pub const MAX_BATCH_ROWS: usize = 500_000;

/// Why a ClickHouse step failed.
pub type ChError = clickhouse::error::Error;

#[derive(clickhouse::Row, Serialize, Debug, Clone, Copy, PartialEq, Eq)]
struct MarkerRow<'a> {
    log_id: &'a str,
    batch_id: u64,
    end_position: u64,
    rows: u64,
    state: i8,
    min_ts: u32,
    max_ts: u32,
}

/// The columns [`encode_row`] writes, in its order.
const INSERT_EVENTS: &str = "INSERT INTO usage_events (customer_id, metric_type, quantity, \
     event_id, batch_id, ts, received_at, metadata, log_id, batch_seq) FORMAT RowBinary";

/// Rows are encoded into chunks of about this size, each handed to the connection whole
/// (the crate's row-by-row writer copied every byte about three times).
const CHUNK_BYTES: usize = 1 << 20;

fn put_string(out: &mut impl BufMut, value: &str) {
    // RowBinary strings: the length as unsigned LEB128, then the bytes.
    let mut len = value.len();
    while len >= 0x80 {
        out.put_u8((len as u8) | 0x80);
        len >>= 7;
    }
    out.put_u8(len as u8);
    out.put_slice(value.as_bytes());
}

/// Appends one `usage_events` row in RowBinary, in the column order of [`INSERT_EVENTS`], to
/// `out` (a `Vec<u8>` or the sink's reused `BytesMut`).
pub fn encode_row(out: &mut impl BufMut, batch: &Batch<'_>, seq: u32, record: &UsageRecord) {
    put_string(out, &record.customer_id);
    out.put_u8(metric_code(record.metric) as u8);
    out.put_u64_le(record.quantity);
    put_string(out, record.event_id.as_deref().unwrap_or(""));
    out.put_u64_le(batch.start);
    out.put_u32_le(datetime(record.timestamp_ms));
    out.put_u32_le(datetime(record.received_ms));
    put_string(out, record.metadata.as_deref().unwrap_or(""));
    put_string(out, batch.log_id);
    out.put_u32_le(seq);
}

/// `pipeline_batches.state` of a batch being written (`started`).
pub const STARTED: i8 = 1;
/// `pipeline_batches.state` of a batch whose rows are all in `usage_events` (`done`).
pub const DONE: i8 = 2;

/// Reads the newest marker of `log_id`.
pub async fn resume(client: &Client, log_id: &str) -> Result<Resume, ChError> {
    let newest = client
        .query(
            "SELECT batch_id, end_position, state FROM pipeline_batches WHERE log_id = ? \
             ORDER BY batch_id DESC, state DESC LIMIT 1",
        )
        .bind(log_id)
        .fetch_all::<(u64, u64, i8)>()
        .await?;
    Ok(match newest.first() {
        None => Resume::At(0),
        Some(&(_, end, DONE)) => Resume::At(end),
        Some(&(start, end, _)) => Resume::Unfinished { start, end },
    })
}

fn metric_code(metric: Metric) -> i8 {
    // The values of the Enum8 in migrations/clickhouse/0001_usage_events.sql.
    match metric {
        Metric::Impressions => 1,
        Metric::ApiCalls => 2,
        Metric::DataTransfer => 3,
    }
}

/// Unix seconds as a ClickHouse `DateTime` (unsigned 32-bit seconds), clamped.
fn datetime(ms: i64) -> u32 {
    u32::try_from(ms.div_euclid(1000).max(0)).unwrap_or(u32::MAX)
}

/// The `pipeline_batches` marker of `batch` in `state`, with the span of its timestamps.
fn marker<'a>(batch: &Batch<'a>, state: i8) -> MarkerRow<'a> {
    let (min_ts, max_ts) = batch
        .records
        .iter()
        .map(|r| datetime(r.timestamp_ms))
        .fold((u32::MAX, 0), |(lo, hi), ts| (lo.min(ts), hi.max(ts)));
    MarkerRow {
        log_id: batch.log_id,
        batch_id: batch.start,
        end_position: batch.end,
        rows: batch.records.len() as u64,
        state,
        min_ts: min_ts.min(max_ts),
        max_ts,
    }
}

async fn write_marker(client: &Client, marker: &MarkerRow<'_>) -> Result<(), ChError> {
    let mut insert = client.insert::<MarkerRow<'_>>("pipeline_batches").await?;
    insert.write(marker).await?;
    insert.end().await
}

/// The query id of the `INSERT`s of a batch, so a replay can tell whether one still runs.
fn insert_query_id(batch: &Batch<'_>) -> String {
    format!("apex-{}-{}", batch.log_id, batch.start)
}

/// `batch_seq` of the rows of the batch already present (from an attempt whose outcome is
/// unknown), once no `INSERT` of the batch is running any more.
async fn rows_present(client: &Client, batch: &Batch<'_>) -> Result<HashSet<u32>, ChError> {
    let query_id = insert_query_id(batch);
    for _ in 0..600 {
        let running: u64 = client
            .query("SELECT count() FROM system.processes WHERE query_id = ?")
            .bind(&query_id)
            .fetch_one()
            .await?;
        if running == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let marker = marker(batch, STARTED);
    let present = client
        .query(
            "SELECT batch_seq FROM usage_events \
             WHERE log_id = ? AND batch_id = ? AND ts >= toDateTime(?) AND ts <= toDateTime(?)",
        )
        .bind(batch.log_id)
        .bind(batch.start)
        .bind(marker.min_ts)
        .bind(marker.max_ts)
        .fetch_all::<u32>()
        .await?;
    Ok(present.into_iter().collect())
}

/// How far the applier got with the batch it is writing; kept across retries so a retry
/// knows what is certain and what must be looked up.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Progress {
    /// The `started` marker is known to be written.
    pub started: bool,
    /// Some rows may have been written by an attempt whose outcome is unknown.
    pub uncertain: bool,
}

impl Progress {
    /// The state of a batch found `started` at start-up.
    pub fn unfinished() -> Self {
        Self {
            started: true,
            uncertain: true,
        }
    }
}

/// Writes `batch` once, whatever earlier attempts did (see the module documentation).
/// `progress` starts as [`Progress::default`] for a new batch and is updated as steps succeed.
pub async fn write_batch(
    client: &Client,
    batch: &Batch<'_>,
    progress: &mut Progress,
) -> Result<(), ChError> {
    write_batch_with(client, batch, progress, &mut BytesMut::new()).await
}

/// [`write_batch`], encoding into `chunk`, which the [`ClickHouseWriter`] keeps from batch to
/// batch: once the client has sent and dropped the last batch's chunks, the allocation is
/// taken back instead of made afresh (a new 1 MiB chunk cost 256 page faults once the
/// allocator had returned the last one to the kernel).
async fn write_batch_with(
    client: &Client,
    batch: &Batch<'_>,
    progress: &mut Progress,
    chunk: &mut BytesMut,
) -> Result<(), ChError> {
    if !progress.started {
        write_marker(client, &marker(batch, STARTED)).await?;
        progress.started = true;
        crate::failpoint::hit("ch_after_started");
    }
    let present = if progress.uncertain {
        rows_present(client, batch).await?
    } else {
        HashSet::new()
    };
    if present.len() < batch.records.len() {
        // From here until this INSERT is answered, its outcome is unknown.
        progress.uncertain = true;
        let mut insert = client
            .insert_formatted_with(INSERT_EVENTS)
            .with_setting("query_id", insert_query_id(batch));
        let half = batch.records.len() / 2;
        // `reserve` takes the buffer back when every chunk made from it has been dropped.
        chunk.clear();
        chunk.reserve(CHUNK_BYTES + 4096);
        for (seq, record) in (0u32..).zip(batch.records) {
            if present.contains(&seq) {
                continue;
            }
            encode_row(chunk, batch, seq, record);
            if chunk.len() >= CHUNK_BYTES {
                insert.send(chunk.split().freeze()).await?;
                chunk.reserve(CHUNK_BYTES + 4096);
            }
            if seq as usize == half {
                // Half the rows are on their way: a crash now cuts the stream.
                crate::failpoint::hit("ch_mid_insert");
            }
        }
        if !chunk.is_empty() {
            insert.send(chunk.split().freeze()).await?;
        }
        insert.end().await?;
    }
    crate::failpoint::hit("ch_after_data");
    write_marker(client, &marker(batch, DONE)).await
}

/// Deletes the `pipeline_batches` markers written before `before`, except each log's newest
/// batch (its `started` and `done` markers), from which replay resumes; the rows of
/// `usage_events` are not touched. Returns how many logs it pruned: only logs with markers
/// to remove get a delete. The deletes are ClickHouse mutations (`ALTER TABLE ... DELETE`,
/// in 18.16 and current releases), carried out in the background; running it again changes
/// nothing more.
pub async fn prune_markers(client: &Client, before: DateTime<Utc>) -> Result<usize, ChError> {
    let before = u32::try_from(before.timestamp().max(0)).unwrap_or(u32::MAX);
    // A log has markers to remove when its oldest marker is old and not of its newest batch.
    let newest = client
        .query(
            "SELECT log_id, max(batch_id) AS newest FROM pipeline_batches GROUP BY log_id \
             HAVING countIf(written_at < toDateTime(?)) > 0 \
                AND minIf(batch_id, written_at < toDateTime(?)) < newest",
        )
        .bind(before)
        .bind(before)
        .fetch_all::<(String, u64)>()
        .await?;
    for (log_id, newest) in &newest {
        client
            .query(
                "ALTER TABLE pipeline_batches DELETE \
                 WHERE log_id = ? AND batch_id < ? AND written_at < toDateTime(?)",
            )
            .bind(log_id.as_str())
            .bind(*newest)
            .bind(before)
            .execute()
            .await?;
    }
    Ok(newest.len())
}

/// ClickHouse exception codes that the same insert hits again however often it is retried:
/// the table, a column, the database or a type is missing or wrong, or our rows do not parse
/// against the table (which is the schema's fault: our encoder writes the migrations'
/// columns). Every other code may pass later and is retried: too many parts, memory,
/// timeouts, network, a replica in read-only mode, and refused credentials or privileges
/// (an operator fixes them on the server, and the applier goes on without a restart).
const PERMANENT_CODES: &[u32] = &[
    6,   // CANNOT_PARSE_TEXT
    8,   // THERE_IS_NO_COLUMN
    10,  // NOT_FOUND_COLUMN_IN_BLOCK
    16,  // NO_SUCH_COLUMN_IN_TABLE
    20,  // NUMBER_OF_COLUMNS_DOESNT_MATCH
    27,  // CANNOT_PARSE_INPUT_ASSERTION_FAILED
    36,  // BAD_ARGUMENTS
    41,  // CANNOT_PARSE_DATETIME
    43,  // ILLEGAL_TYPE_OF_ARGUMENT
    44,  // ILLEGAL_COLUMN
    47,  // UNKNOWN_IDENTIFIER
    50,  // UNKNOWN_TYPE
    53,  // TYPE_MISMATCH
    60,  // UNKNOWN_TABLE
    62,  // SYNTAX_ERROR
    70,  // CANNOT_CONVERT_TYPE
    81,  // UNKNOWN_DATABASE
    115, // UNKNOWN_SETTING
    117, // INCORRECT_DATA
];

/// The exception code in a ClickHouse error text: `Code: 16, e.displayText() = ...` (18.16),
/// `Code: 16. DB::Exception: ...` (current releases), or the bare `16` of the exception-code
/// header.
pub fn exception_code(text: &str) -> Option<u32> {
    // When the body cannot be read the client keeps only the `X-ClickHouse-Exception-Code`
    // header: the bare number.
    if let Ok(code) = text.trim().parse() {
        return Some(code);
    }
    let rest = &text[text.find("Code: ")? + "Code: ".len()..];
    let digits: &str = &rest[..rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len())];
    digits.parse().ok()
}

/// Whether a ClickHouse error is worth retrying.
pub fn classify(error: &ChError) -> StoreError {
    use clickhouse::error::Error;
    let permanent = match error {
        Error::BadResponse(text) => {
            exception_code(text).is_some_and(|c| PERMANENT_CODES.contains(&c))
        }
        // Our rows and the table disagree: the same rows fail the same way.
        Error::SchemaMismatch(_) | Error::InvalidParams(_) | Error::Unsupported(_) => true,
        _ => false,
    };
    StoreError::new(permanent, format!("clickhouse: {error}"))
}

/// The ClickHouse [`StoreWriter`]: keeps how far the batch being written got, so a retry
/// knows what is certain and what must be looked up.
pub struct ClickHouseWriter {
    // Boxed: the client is large, and the writer moves into its applier's thread.
    client: Box<Client>,
    /// The batch being written (its start) and how far it got.
    current: Option<(u64, Progress)>,
    /// The RowBinary chunk buffer, kept between batches (see `write_batch_with`).
    chunk: BytesMut,
}

impl ClickHouseWriter {
    /// A writer with `client` (bound to the database holding `usage_events`).
    pub fn new(client: Client) -> Self {
        Self {
            client: Box::new(client),
            current: None,
            chunk: BytesMut::new(),
        }
    }
}

impl StoreWriter for ClickHouseWriter {
    async fn resume(&mut self, log_id: &str) -> Result<Resume, StoreError> {
        let resume = resume(&self.client, log_id)
            .await
            .map_err(|e| classify(&e))?;
        if let Resume::Unfinished { start, .. } = resume {
            self.current = Some((start, Progress::unfinished()));
        }
        Ok(resume)
    }

    async fn write(&mut self, batch: &Batch<'_>, _retry: bool) -> Result<(), StoreError> {
        // The progress of this batch (kept across retries) says whether an earlier attempt
        // may have left rows; `retry` adds nothing to it.
        let progress = match &mut self.current {
            Some((at, progress)) if *at == batch.start => progress,
            current => &mut current.insert((batch.start, Progress::default())).1,
        };
        write_batch_with(&self.client, batch, progress, &mut self.chunk)
            .await
            .map_err(|e| classify(&e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_are_encoded_in_row_binary() {
        let record = UsageRecord {
            customer_id: "cus_a".into(),
            metric: Metric::DataTransfer,
            quantity: 300,
            event_id: None,
            timestamp_ms: 1_000_999,
            received_ms: 2_000_000,
            metadata: Some("x".repeat(130).into()),
        };
        let batch = Batch {
            log_id: "L",
            start: 7,
            end: 9,
            records: std::slice::from_ref(&record),
        };
        let mut out = Vec::new();
        encode_row(&mut out, &batch, 5, &record);
        let mut expected = vec![5u8];
        expected.extend_from_slice(b"cus_a");
        expected.push(3); // Enum8 data_transfer
        expected.extend_from_slice(&300u64.to_le_bytes());
        expected.push(0); // empty event id
        expected.extend_from_slice(&7u64.to_le_bytes());
        expected.extend_from_slice(&1_000u32.to_le_bytes());
        expected.extend_from_slice(&2_000u32.to_le_bytes());
        expected.extend_from_slice(&[0x82, 0x01]); // 130 in LEB128
        expected.extend_from_slice("x".repeat(130).as_bytes());
        expected.extend_from_slice(&[1, b'L']);
        expected.extend_from_slice(&5u32.to_le_bytes());
        assert_eq!(out, expected);
    }

    #[test]
    fn exception_codes_are_read_from_both_formats() {
        assert_eq!(
            exception_code("Code: 16, e.displayText() = DB::Exception: No such column x"),
            Some(16)
        );
        assert_eq!(
            exception_code("Code: 252. DB::Exception: Too many parts (300)."),
            Some(252)
        );
        assert_eq!(exception_code("60"), Some(60));
        assert_eq!(exception_code("bad gateway"), None);
        let permanent = classify(&clickhouse::error::Error::BadResponse(
            "Code: 16, e.displayText() = DB::Exception: No such column batch_seq".into(),
        ));
        assert!(permanent.is_permanent(), "{permanent}");
        for transient in [
            clickhouse::error::Error::BadResponse(
                "Code: 252, e.displayText() = too many parts".into(),
            ),
            clickhouse::error::Error::BadResponse("502 Bad Gateway".into()),
            clickhouse::error::Error::BadResponse(
                "Code: 516, e.displayText() = DB::Exception: default: Authentication failed".into(),
            ),
            clickhouse::error::Error::TimedOut,
        ] {
            assert!(!classify(&transient).is_permanent(), "{transient}");
        }
    }

    #[test]
    fn datetimes_clamp_instead_of_wrapping() {
        assert_eq!(datetime(-5_000), 0);
        assert_eq!(datetime(1_999), 1);
        assert_eq!(datetime(i64::MAX), u32::MAX);
    }

    #[test]
    fn a_batch_marker_spans_its_timestamps() {
        let record = |ms: i64| UsageRecord {
            customer_id: "cus_a".into(),
            metric: Metric::Impressions,
            quantity: 1,
            event_id: None,
            timestamp_ms: ms,
            received_ms: ms,
            metadata: None,
        };
        let records = [
            record(1_796_083_199_000),
            record(1_796_083_200_000),
            record(1_796_083_100_000),
        ];
        let batch = Batch {
            log_id: "l",
            start: 10,
            end: 20,
            records: &records,
        };
        let marker = marker(&batch, DONE);
        assert_eq!(
            (marker.min_ts, marker.max_ts),
            (1_796_083_100, 1_796_083_200)
        );
        assert_eq!(
            (marker.batch_id, marker.end_position, marker.rows),
            (10, 20, 3)
        );
    }
}
