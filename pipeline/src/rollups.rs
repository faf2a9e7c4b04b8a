//! The usage tables the pipeline writes, read and repaired as stores: per-day totals of the
//! ClickHouse raw events (`usage_events`, the source of truth), of the ClickHouse daily rollup
//! (`usage_daily`) and of the Postgres hourly rollups (`usage_records`), for reconciliation
//! (`apexctl reconcile`), and the rebuild of either rollup from the raw events (`apexctl
//! rollup rebuild`).
//!
//! Every read is one grouped query over the whole range, never one per customer and day.
//! Days are UTC days: `usage_events.ts` is read as `toDate(ts, 'UTC')`, `usage_records` as
//! `recorded_at AT TIME ZONE 'UTC'`, hours as `intDiv(toUInt32(ts), 3600) * 3600` (never the
//! server's zone). The daily rollup's materialized view groups by `toDate(ts)`, the server's
//! own day: the stack's ClickHouse runs in UTC; on a server that does not
//! ([`server_timezone`]), the rollup's days are not UTC days, the ClickHouse rebuild refuses
//! and reconciliation warns.
//!
//! # Rebuilding while the pipeline writes
//!
//! Both rebuilds take only complete days (a caller refuses today and later) and still expect
//! the pipeline to write at any time: records may carry timestamps up to 35 days old.
//!
//! - ClickHouse ([`rebuild_clickhouse`]): rows reach `usage_events` only between a batch's
//!   `started` and `done` markers in `pipeline_batches`, and each marker carries the span of
//!   its batch's timestamps (see [`crate::clickhouse_sink`]). So the rebuild first checks that
//!   no batch touching the days is open, reads the raw and rollup totals, then checks that the
//!   markers touching the days are still the same: if one was added, a batch may have landed
//!   between the two reads, and nothing is written (the caller may run it again). A shortfall
//!   (the server died between an events part and its view part) is repaired by inserting the
//!   difference, which the SummingMergeTree adds, as the view would have: one atomic insert,
//!   never a gap for readers. An excess (which the pipeline cannot make) is repaired by
//!   deleting that customer's, metric's and day's rows (a mutation, asynchronous in 18.16:
//!   the rebuild waits for it in `system.mutations`), then reading both sides again the same
//!   way (retried with a growing pause while a batch lands) and inserting what is now short
//!   (so a batch whose view part the delete took as well is put back too); readers may see
//!   the day short while the mutation runs. If the wait or the re-read fails, the error
//!   ([`RollupError::Interrupted`]) names the keys left short, and the next run puts them
//!   back. Statements name at most 500 keys each (ClickHouse's `max_query_size`). Two
//!   rebuilds of one store never run at once (`apexctl` takes an advisory lock per store).
//! - Postgres ([`rebuild_postgres`]): the rollups are additive upserts, each batch recorded in
//!   `pipeline_batches` in the same transaction. The rebuild takes `pipeline_batches` in SHARE
//!   mode in its transaction, which makes the Postgres applier wait (its first statement
//!   inserts there), reads each log's watermark, and sums only the raw rows of batches below
//!   it: exactly the batches the rollups hold. The appliers batch the log independently, so
//!   a ClickHouse batch may straddle a watermark; that is harmless unless it holds records of
//!   the days (its marker's span says), and so is one still open: in those cases, or when
//!   ClickHouse has not reached the watermark, the rebuild refuses and may be run again (a
//!   batch's records are usually minutes old, the rebuilt days at least a day). The hours are
//!   then set (inserted, updated or deleted) and the transaction commits, releasing the
//!   applier, which adds its next batches on top of the repaired hours. The lock waits 5 s
//!   at most (`lock_timeout`: a rebuild never queues behind a long transaction with the
//!   applier queued behind it), statements 60 s, and ClickHouse's answers 30 s each. An hour
//!   would only be lowered on request (the pipeline never leaves Postgres above the raw
//!   events, so raw rows may be missing instead). The dry run locks nothing: it reads the
//!   rollups and the watermarks in one snapshot (the applier writes both in one
//!   transaction).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Client;
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgExecutor};

use apex_core::model::Metric;

use crate::clickhouse_sink::{self, ChError};
use crate::postgres_sink;

/// A customer's total of one metric on one UTC day (units: impressions and API calls, bytes
/// of data transfer).
pub type DayKey = (String, Metric, NaiveDate);

/// Totals per customer, metric and UTC day.
pub type DayTotals = BTreeMap<DayKey, u64>;

/// Why a read or a rebuild failed.
#[derive(Debug, thiserror::Error)]
pub enum RollupError {
    /// ClickHouse failed.
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
    /// Postgres failed.
    #[error("postgres: {0}")]
    Postgres(#[from] sqlx::Error),
    /// The pipeline was writing the days concurrently: no change was made, and running it
    /// again is safe.
    #[error("{0}")]
    Busy(String),
    /// A stored value is unreadable (an unknown metric, a negative total).
    #[error("{0}")]
    Corrupt(String),
    /// The request is refused as it stands (a decrease without `allow_decrease`, a server not
    /// in UTC): nothing was changed.
    #[error("{0}")]
    Refused(String),
    /// A ClickHouse rebuild deleted an excess but could not put back what the days are now
    /// short of: those keys are short until the rebuild is run again.
    #[error("{0}")]
    Interrupted(String),
}

/// How many keys one ClickHouse statement names at most: the `ALTER ... DELETE` condition and
/// the `INSERT ... VALUES` list grow with them, and ClickHouse refuses a query over
/// `max_query_size` (256 KiB by default); 500 keys stay far below it.
const KEYS_PER_STATEMENT: usize = 500;

/// How long one ClickHouse request of the Postgres rebuild may take while it holds the
/// Postgres applier waiting.
const LOCKED_CLICKHOUSE_TIMEOUT: Duration = Duration::from_secs(30);

/// The ClickHouse server's time zone (`SELECT timezone()`): the daily rollup's view groups by
/// `toDate(ts)`, the server's day, so its days are UTC days only on a server in UTC.
pub async fn server_timezone(client: &Client) -> Result<String, RollupError> {
    Ok(client
        .query("SELECT timezone()")
        .fetch_one::<String>()
        .await?)
}

/// Refuses a rebuild of the daily rollup on a server whose days are not UTC days.
async fn require_utc(client: &Client) -> Result<(), RollupError> {
    let zone = server_timezone(client).await?;
    if zone == "UTC" || zone == "Etc/UTC" {
        Ok(())
    } else {
        Err(RollupError::Refused(format!(
            "the ClickHouse server runs in {zone}, not UTC: the daily rollup's days are not UTC \
             days, and a rebuild by UTC days would corrupt it"
        )))
    }
}

fn day_start(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(0, 0, 0).expect("midnight exists").and_utc()
}

/// A ClickHouse `DateTime` (unsigned seconds) for an instant, clamped.
fn ch_seconds(at: DateTime<Utc>) -> u32 {
    u32::try_from(at.timestamp().max(0)).unwrap_or(u32::MAX)
}

/// Days since 1970-01-01, as ClickHouse's `Date` is encoded.
fn from_ch_date(days: u16) -> NaiveDate {
    NaiveDate::from_ymd_opt(1970, 1, 1).expect("epoch") + chrono::Duration::days(i64::from(days))
}

fn metric(name: &str) -> Result<Metric, RollupError> {
    name.parse()
        .map_err(|e| RollupError::Corrupt(format!("unreadable metric in the store: {e}")))
}

/// The non-zero totals of `rows` (customer, metric name, time, quantity) by customer, metric
/// and time.
fn collect<K: Ord>(
    rows: impl IntoIterator<Item = (String, String, K, u64)>,
) -> Result<BTreeMap<(String, Metric, K), u64>, RollupError> {
    let mut totals = BTreeMap::new();
    for (customer, name, at, quantity) in rows {
        if quantity > 0 {
            totals.insert((customer, metric(&name)?, at), quantity);
        }
    }
    Ok(totals)
}

/// The day totals `query` reads as (customer, metric, ClickHouse day number, quantity) rows,
/// its last two parameters the `(? = '' OR customer_id = ?)` of one customer if given.
async fn day_totals(
    query: clickhouse::query::Query,
    customer: Option<&str>,
) -> Result<DayTotals, RollupError> {
    let rows = query
        .bind(customer.unwrap_or(""))
        .bind(customer.unwrap_or(""))
        .fetch_all::<(String, String, u16, u64)>()
        .await?;
    collect(
        rows.into_iter()
            .map(|(c, m, d, q)| (c, m, from_ch_date(d), q)),
    )
}

/// Raw event totals (`usage_events`) of UTC days `first..=last`, of one customer if given.
/// Days with a zero total are left out.
pub async fn raw_daily(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<DayTotals, RollupError> {
    let query = client
        .query(
            "SELECT customer_id, toString(metric_type), toUInt16(toDate(ts, 'UTC')) AS d, \
                 sum(quantity) FROM usage_events \
             WHERE ts >= toDateTime(?) AND ts < toDateTime(?) AND (? = '' OR customer_id = ?) \
             GROUP BY customer_id, metric_type, d",
        )
        .bind(ch_seconds(day_start(first)))
        .bind(ch_seconds(day_start(last.succ_opt().unwrap_or(last))));
    day_totals(query, customer).await
}

/// Raw event totals per UTC hour of `first..=last`, restricted to the rows of batches below
/// each log's `watermarks` (log id → end position; logs not named are left out).
async fn raw_hourly_below(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    watermarks: &[(String, u64)],
) -> Result<BTreeMap<(String, Metric, i64), u64>, RollupError> {
    if watermarks.is_empty() {
        return Ok(BTreeMap::new());
    }
    let below = vec!["(log_id = ? AND batch_id < ?)"; watermarks.len()].join(" OR ");
    let mut query = client
        .query(&format!(
            "SELECT customer_id, toString(metric_type), toUInt32(intDiv(toUInt32(ts), 3600) * 3600) AS h, \
                 sum(quantity) FROM usage_events \
             WHERE ts >= toDateTime(?) AND ts < toDateTime(?) AND ({below}) \
             GROUP BY customer_id, metric_type, h"
        ))
        .bind(ch_seconds(day_start(first)))
        .bind(ch_seconds(day_start(last.succ_opt().unwrap_or(last))));
    for (log, end) in watermarks {
        query = query.bind(log.as_str()).bind(*end);
    }
    let rows = query.fetch_all::<(String, String, u32, u64)>().await?;
    collect(rows.into_iter().map(|(c, m, h, q)| (c, m, i64::from(h), q)))
}

/// Daily rollup totals (`usage_daily`, summed: the SummingMergeTree may not have merged a
/// key's rows yet) of UTC days `first..=last`, of one customer if given.
pub async fn clickhouse_daily(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<DayTotals, RollupError> {
    let query = client
        .query(
            "SELECT customer_id, toString(metric_type), toUInt16(day) AS d, sum(quantity) \
             FROM usage_daily \
             WHERE day >= toDate(?) AND day <= toDate(?) AND (? = '' OR customer_id = ?) \
             GROUP BY customer_id, metric_type, d",
        )
        .bind(first.to_string())
        .bind(last.to_string());
    day_totals(query, customer).await
}

/// A day of the Postgres rollups: its total and the latest change to any of its hours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PostgresDay {
    /// The day's total (units; data transfer in bytes).
    pub quantity: u64,
    /// When one of its hours last changed (`usage_records.updated_at`): a record arriving
    /// after its day was reported moves it.
    pub changed_at: DateTime<Utc>,
}

/// Postgres hourly rollups (`usage_records`) summed per UTC day of `first..=last`, of one
/// customer if given, with each day's latest change.
pub async fn postgres_daily(
    db: impl PgExecutor<'_>,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<BTreeMap<DayKey, PostgresDay>, RollupError> {
    let rows: Vec<(String, String, NaiveDate, i64, DateTime<Utc>)> = sqlx::query_as(
        "SELECT customer_id, metric_type, (recorded_at AT TIME ZONE 'UTC')::date AS day, \
             LEAST(sum(quantity), 9223372036854775807)::bigint, max(updated_at) \
         FROM usage_records \
         WHERE recorded_at >= $1 AND recorded_at < $2 AND ($3::text IS NULL OR customer_id = $3) \
         GROUP BY 1, 2, 3",
    )
    .bind(day_start(first))
    .bind(day_start(last.succ_opt().unwrap_or(last)))
    .bind(customer)
    .fetch_all(db)
    .await?;
    let mut days = BTreeMap::new();
    for (customer, name, day, quantity, changed_at) in rows {
        let quantity = u64::try_from(quantity).map_err(|_| {
            RollupError::Corrupt(format!(
                "usage_records of {customer}, {name} on {day} sum to {quantity}, below zero"
            ))
        })?;
        if quantity > 0 {
            days.insert(
                (customer, metric(&name)?, day),
                PostgresDay {
                    quantity,
                    changed_at,
                },
            );
        }
    }
    Ok(days)
}

/// How long a batch one store holds and the other not may wait, in seconds, before the
/// difference it makes stops being "in flight" (see [`InFlight`]): a stuck applier.
pub const IN_FLIGHT_LIMIT_SECONDS: i64 = 600;

/// One log's position in both stores at a reading.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LogPosition {
    /// The log.
    pub log_id: String,
    /// The end of the last batch Postgres applied (its watermark).
    pub postgres_end: u64,
    /// The end of the last batch ClickHouse finished (`done`).
    pub clickhouse_end: u64,
    /// How long the oldest batch one store holds and the other not has waited, seconds (0
    /// when both are level): the Postgres applier's `applied_at` when ClickHouse is behind,
    /// ClickHouse's marker `written_at` when Postgres is behind (each on its own server's
    /// clock).
    pub lag_seconds: i64,
}

/// The pipeline's batches that may be between the two stores at the moment of a read:
/// applied by one store's applier and not (or not wholly) by the other's, or still being
/// written to ClickHouse, for less than [`IN_FLIGHT_LIMIT_SECONDS`] (a batch waiting longer
/// is a stuck applier, and explains nothing).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Days of ClickHouse batches not (wholly) applied by Postgres yet: raw events and
    /// Postgres may differ either way.
    pub between_stores: Vec<NaiveDate>,
    /// Whether Postgres holds batches whose ClickHouse rows are not all written yet: raw
    /// events may fall short of Postgres (never exceed it), on days the markers cannot name.
    pub clickhouse_behind: bool,
    /// Days of ClickHouse batches open (`started` without `done`), or written since the
    /// reading this one was taken after: their rollup part may lag their rows (raw events vs
    /// the daily rollup).
    pub clickhouse_open: Vec<NaiveDate>,
    /// Each log's position at the reading.
    pub positions: Vec<LogPosition>,
}

impl InFlight {
    /// Whether a batch in flight explains the raw events (`raw`) and Postgres (`postgres`)
    /// differing on `day`.
    pub fn explains(&self, day: NaiveDate, raw: u64, postgres: u64) -> bool {
        self.between_stores.contains(&day) || (self.clickhouse_behind && raw < postgres)
    }

    /// Both readings together (the positions are the later reading's).
    pub fn union(mut self, other: InFlight) -> InFlight {
        for day in other.between_stores {
            if !self.between_stores.contains(&day) {
                self.between_stores.push(day);
            }
        }
        self.clickhouse_behind |= other.clickhouse_behind;
        for day in other.clickhouse_open {
            if !self.clickhouse_open.contains(&day) {
                self.clickhouse_open.push(day);
            }
        }
        self.positions = other.positions;
        self
    }
}

/// A ClickHouse batch marker: log, start, end, whether done, span of its timestamps, age of
/// its first marker in seconds.
type Marker = (String, u64, u64, bool, u32, u32, i64);

async fn clickhouse_markers_from(
    client: &Client,
    log_id: &str,
    from: u64,
) -> Result<Vec<Marker>, RollupError> {
    let rows = client
        .query(
            "SELECT log_id, batch_id, max(end_position), max(state) = ?, min(min_ts), \
                 max(max_ts), toInt64(now()) - toInt64(min(written_at)) \
             FROM pipeline_batches WHERE log_id = ? AND end_position > ? \
             GROUP BY log_id, batch_id ORDER BY batch_id",
        )
        .bind(clickhouse_sink::DONE)
        .bind(log_id)
        .bind(from)
        .fetch_all::<(String, u64, u64, u8, u32, u32, i64)>()
        .await?;
    Ok(rows
        .into_iter()
        .map(|(l, s, e, done, lo, hi, age)| (l, s, e, done == 1, lo, hi, age))
        .collect())
}

fn span_days(lo: u32, hi: u32, into: &mut Vec<NaiveDate>) {
    let (Some(lo), Some(hi)) = (
        DateTime::<Utc>::from_timestamp(i64::from(lo), 0),
        DateTime::<Utc>::from_timestamp(i64::from(hi), 0),
    ) else {
        return;
    };
    let mut day = lo.date_naive();
    while day <= hi.date_naive() {
        if !into.contains(&day) {
            into.push(day);
        }
        match day.succ_opt() {
            Some(next) => day = next,
            None => break,
        }
    }
}

/// Where the two stores stand: which days a batch in flight may make differ (see
/// [`InFlight`]). Taken before and after the totals are read, the second with the first as
/// `since`, their [`InFlight::union`] also covers every batch that moved during the reads.
pub async fn in_flight(
    client: &Client,
    db: &mut PgConnection,
    since: Option<&InFlight>,
) -> Result<InFlight, RollupError> {
    let watermarks = postgres_sink::watermarks(&mut *db).await?;
    let mut logs: Vec<String> = client
        .query("SELECT DISTINCT log_id FROM pipeline_batches")
        .fetch_all::<String>()
        .await?;
    for (log, _) in &watermarks {
        if !logs.contains(log) {
            logs.push(log.clone());
        }
    }
    logs.sort();
    let mut flight = InFlight::default();
    for log in logs {
        let applied = watermarks
            .iter()
            .find(|(l, _)| *l == log)
            .map_or(0, |(_, end)| *end);
        let clickhouse_end: u64 = client
            .query("SELECT max(end_position) FROM pipeline_batches WHERE log_id = ? AND state = ?")
            .bind(log.as_str())
            .bind(clickhouse_sink::DONE)
            .fetch_one()
            .await?;
        // Against an earlier reading, from where each store was then.
        let (applied_floor, clickhouse_floor) = since
            .and_then(|s| s.positions.iter().find(|p| p.log_id == log))
            .map_or((applied, clickhouse_end), |p| {
                (
                    applied.min(p.postgres_end),
                    clickhouse_end.min(p.clickhouse_end),
                )
            });
        // Batches that end past the Postgres watermark are not (wholly) in Postgres yet; those
        // past ClickHouse's earlier end were written during the reads. Only young ones are in
        // flight.
        let markers =
            clickhouse_markers_from(client, &log, applied_floor.min(clickhouse_floor)).await?;
        let mut lag_seconds = 0;
        for (_, _, end, done, lo, hi, age) in &markers {
            let young = *age < IN_FLIGHT_LIMIT_SECONDS;
            if (!done || *end > clickhouse_floor) && young {
                span_days(*lo, *hi, &mut flight.clickhouse_open);
            }
            if *end > applied_floor {
                lag_seconds = lag_seconds.max(*age);
                if young {
                    span_days(*lo, *hi, &mut flight.between_stores);
                }
            }
        }
        if clickhouse_end < applied {
            // Postgres holds batches whose ClickHouse markers are not all written yet: the
            // days they hold are unknown, but they can only make the raw events fall short.
            let age = postgres_sink::applied_age_past(&mut *db, &log, clickhouse_end)
                .await?
                .unwrap_or(0);
            lag_seconds = lag_seconds.max(age);
            if age < IN_FLIGHT_LIMIT_SECONDS {
                flight.clickhouse_behind = true;
            }
        }
        flight.positions.push(LogPosition {
            log_id: log,
            postgres_end: applied,
            clickhouse_end,
            lag_seconds,
        });
    }
    Ok(flight)
}

/// One customer, metric and day of a rebuild: the rollup's total before and the raw total
/// it is (or would be) set to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    /// Customer id.
    pub customer_id: String,
    /// The metric.
    pub metric_type: Metric,
    /// The UTC day (`YYYY-MM-DD`).
    pub day: NaiveDate,
    /// The rollup's total before (units; data transfer in bytes).
    pub current: u64,
    /// The raw events' total, which the rollup is (or would be) set to.
    pub rebuilt: u64,
    /// Hours changed (Postgres only; 0 for ClickHouse's daily rows).
    pub hours: usize,
    /// Of those, hours lowered (Postgres only): the pipeline never leaves Postgres above the
    /// raw events, so a decrease may mean raw rows are missing instead.
    pub hours_decreased: usize,
}

/// The changes between two sets of day totals, `current` to `rebuilt`.
fn differences(current: &DayTotals, rebuilt: &DayTotals) -> Vec<Change> {
    let mut keys: Vec<&DayKey> = current.keys().chain(rebuilt.keys()).collect();
    keys.sort();
    keys.dedup();
    keys.into_iter()
        .filter_map(|key| {
            let before = current.get(key).copied().unwrap_or(0);
            let after = rebuilt.get(key).copied().unwrap_or(0);
            (before != after).then(|| Change {
                customer_id: key.0.clone(),
                metric_type: key.1,
                day: key.2,
                current: before,
                rebuilt: after,
                hours: 0,
                hours_decreased: 0,
            })
        })
        .collect()
}

/// The ClickHouse batches whose timestamps touch `[start, end)`: how many are open
/// (`started` without `done`), and a fingerprint of all their markers (their count and the sum
/// of a hash of each), which any marker written (or pruned) in between changes.
async fn clickhouse_activity(
    client: &Client,
    start: u32,
    end: u32,
) -> Result<(u64, (u64, u64)), RollupError> {
    let (open, count, hash): (u64, u64, u64) = client
        .query(
            "SELECT countIf(s = ?), sum(n), sum(h) FROM ( \
                 SELECT log_id, batch_id, max(state) AS s, count() AS n, \
                     sum(cityHash64(log_id, batch_id, toInt8(state))) AS h \
                 FROM pipeline_batches \
                 WHERE min_ts < toDateTime(?) AND max_ts >= toDateTime(?) \
                 GROUP BY log_id, batch_id)",
        )
        .bind(clickhouse_sink::STARTED)
        .bind(end)
        .bind(start)
        .fetch_one()
        .await?;
    Ok((open, (count, hash)))
}

/// Rebuilds the ClickHouse daily rollup of UTC days `first..=last` from the raw events (see
/// the module documentation for how it stays safe while the pipeline writes). With
/// `dry_run`, only reads. Returns the customer, metric and day totals that differ(ed).
/// `Busy` when a pipeline batch touching the days is open or was written during the reads:
/// nothing was changed, and running it again once the pipeline has moved on is safe.
pub async fn rebuild_clickhouse(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    dry_run: bool,
) -> Result<Vec<Change>, RollupError> {
    require_utc(client).await?;
    let (raw, rollup) = read_quietly(client, first, last).await?;
    let changes = differences(&rollup, &raw);
    if dry_run || changes.is_empty() {
        return Ok(changes);
    }
    // An excess: the keys' rows are deleted (a mutation), which turns it into a shortfall of
    // the whole raw total.
    let excess: Vec<&Change> = changes.iter().filter(|c| c.current > c.rebuilt).collect();
    let shortfalls = if excess.is_empty() {
        changes.clone()
    } else {
        for chunk in excess.chunks(KEYS_PER_STATEMENT) {
            let keys =
                vec!["(customer_id = ? AND metric_type = ? AND day = toDate(?))"; chunk.len()]
                    .join(" OR ");
            let mut delete = client.query(&format!("ALTER TABLE usage_daily DELETE WHERE {keys}"));
            for change in chunk {
                delete = delete
                    .bind(change.customer_id.as_str())
                    .bind(change.metric_type.as_str())
                    .bind(change.day.to_string());
            }
            delete.execute().await?;
        }
        // From here on the deleted keys are short until the insert below: every failure says
        // so, naming them.
        let short = |why: String| {
            let keys: Vec<String> = excess
                .iter()
                .map(|c| format!("{} {} {}", c.customer_id, c.metric_type.as_str(), c.day))
                .collect();
            RollupError::Interrupted(format!(
                "{why}: the daily rollup of {} is now short (its excess rows were deleted); run \
                 the rebuild again to put the raw totals back",
                keys.join(", ")
            ))
        };
        wait_for_mutations(client)
            .await
            .map_err(|e| short(e.to_string()))?;
        // Read again: a batch whose view part landed before the mutation began lost it too,
        // and is a shortfall now like the rest. A batch landing meanwhile makes the read busy:
        // retried with a growing pause, as the pipeline's batches take seconds.
        let mut pause = Duration::from_millis(200);
        let mut attempt = 0;
        let (raw, rollup) = loop {
            match read_quietly(client, first, last).await {
                Ok(read) => break read,
                Err(RollupError::Busy(why)) if attempt < 8 => {
                    tracing::debug!(%why, "re-read after the delete is busy; retrying");
                    attempt += 1;
                    // Waiting for the pipeline's batch to finish: nothing to wait on instead.
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_secs(5));
                }
                Err(e) => return Err(short(e.to_string())),
            }
        };
        differences(&rollup, &raw)
    };
    if shortfalls.iter().any(|c| c.current > c.rebuilt) {
        return Err(RollupError::Busy(
            "the daily rollup still exceeds the raw events after the delete: run the rebuild \
             again"
                .into(),
        ));
    }
    for chunk in shortfalls.chunks(KEYS_PER_STATEMENT) {
        let values = vec!["(toDate(?), ?, ?, toUInt64(?))"; chunk.len()].join(", ");
        let mut insert = client.query(&format!(
            "INSERT INTO usage_daily (day, customer_id, metric_type, quantity) VALUES {values}"
        ));
        for change in chunk {
            insert = insert
                .bind(change.day.to_string())
                .bind(change.customer_id.as_str())
                .bind(change.metric_type.as_str())
                .bind(change.rebuilt - change.current);
        }
        insert.execute().await?;
    }
    Ok(changes)
}

/// The raw and rollup totals of `first..=last`, read while no pipeline batch touching the
/// days was open or written (`Busy` otherwise).
async fn read_quietly(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
) -> Result<(DayTotals, DayTotals), RollupError> {
    let start = ch_seconds(day_start(first));
    let end = ch_seconds(day_start(last.succ_opt().unwrap_or(last)));
    let (open, markers) = clickhouse_activity(client, start, end).await?;
    if open > 0 {
        return Err(RollupError::Busy(format!(
            "{open} pipeline batch(es) touching {first}..{last} are being written to ClickHouse \
             (a `started` marker without `done`; a stopped applier finishes its batch when it \
             starts again): nothing was changed, try again later"
        )));
    }
    let raw = raw_daily(client, first, last, None).await?;
    let rollup = clickhouse_daily(client, first, last, None).await?;
    if clickhouse_activity(client, start, end).await? != (0, markers) {
        return Err(RollupError::Busy(format!(
            "the pipeline wrote to {first}..{last} while the rollup was read: nothing more was \
             changed, try again"
        )));
    }
    Ok((raw, rollup))
}

/// Waits until no mutation of `usage_daily` in the current database is unfinished (about a
/// minute at most).
async fn wait_for_mutations(client: &Client) -> Result<(), RollupError> {
    for _ in 0..600 {
        let running: u64 = client
            .query(
                "SELECT count() FROM system.mutations \
                 WHERE database = currentDatabase() AND table = 'usage_daily' AND is_done = 0",
            )
            .fetch_one()
            .await?;
        if running == 0 {
            return Ok(());
        }
        // Polling a background task of the server: there is nothing to wait on instead.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(RollupError::Busy(
        "the delete of the rollup's excess rows is still running in ClickHouse \
         (system.mutations): run the rebuild again once it has finished"
            .into(),
    ))
}

/// A ClickHouse request made while the Postgres applier waits on the rebuild: bounded.
async fn bounded<T>(
    request: impl std::future::Future<Output = Result<T, ChError>>,
) -> Result<T, RollupError> {
    match tokio::time::timeout(LOCKED_CLICKHOUSE_TIMEOUT, request).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(RollupError::Busy(format!(
            "ClickHouse did not answer within {} s while the Postgres applier was held: nothing \
             was changed, try again",
            LOCKED_CLICKHOUSE_TIMEOUT.as_secs()
        ))),
    }
}

/// Rebuilds the Postgres hourly rollups of UTC days `first..=last` from the raw events, in
/// one transaction (see the module documentation for how it stays exact while the pipeline
/// writes). With `dry_run`, nothing is locked or written: the rollups and the watermarks are
/// read in one snapshot (the applier writes both in one transaction). Returns the customer,
/// metric and day totals that differ(ed), with how many hours changed and were lowered.
/// `Busy` when ClickHouse cannot say exactly which of its rows of the days Postgres holds, or
/// the applier's lock is not granted within 5 s (see the module documentation); `Refused`
/// when an hour would be lowered and `allow_decrease` is false (the pipeline never leaves
/// Postgres above the raw events: raw rows may be missing instead, and those hours feed the
/// usage sync and the invoices).
pub async fn rebuild_postgres(
    client: &Client,
    conn: &mut PgConnection,
    first: NaiveDate,
    last: NaiveDate,
    dry_run: bool,
    allow_decrease: bool,
) -> Result<Vec<Change>, RollupError> {
    let mut tx = conn.begin().await?;
    if dry_run {
        sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            .execute(&mut *tx)
            .await?;
    } else {
        // Never queue behind a long transaction (the applier would queue behind us), never
        // hold the applier long.
        sqlx::query("SET LOCAL lock_timeout = '5s'")
            .execute(&mut *tx)
            .await?;
        sqlx::query("SET LOCAL statement_timeout = '60s'")
            .execute(&mut *tx)
            .await?;
        // The applier's first statement inserts into pipeline_batches: it waits until we
        // commit.
        if let Err(e) = sqlx::query("LOCK TABLE pipeline_batches IN SHARE MODE")
            .execute(&mut *tx)
            .await
        {
            if let Some(db) = e.as_database_error()
                && db.code().as_deref() == Some("55P03")
            {
                return Err(RollupError::Busy(
                    "the pipeline's Postgres applier (or another transaction) held \
                     pipeline_batches for 5 s: nothing was changed, try again"
                        .into(),
                ));
            }
            return Err(e.into());
        }
    }
    let watermarks = postgres_sink::watermarks(&mut *tx).await?;
    let (span_start, span_end) = (
        ch_seconds(day_start(first)),
        ch_seconds(day_start(last.succ_opt().unwrap_or(last))),
    );
    for (log, applied) in &watermarks {
        // Everything Postgres holds of the log must be in ClickHouse: its markers reach the
        // watermark.
        let covered: u64 = bounded(
            client
                .query("SELECT max(end_position) FROM pipeline_batches WHERE log_id = ?")
                .bind(log.as_str())
                .fetch_one(),
        )
        .await?;
        if covered < *applied {
            return Err(RollupError::Busy(format!(
                "ClickHouse's applier is behind Postgres's on log {log} (at {covered}, Postgres \
                 at {applied}): nothing was changed, try again once it has caught up"
            )));
        }
        // `batch_id < watermark` is exact for the days unless a ClickHouse batch below the
        // watermark runs past it (the appliers batch independently) or is still open, and
        // holds records of the days.
        let split: u64 = bounded(
            client
                .query(
                    "SELECT count() FROM ( \
                         SELECT batch_id, max(end_position) AS e, max(state) AS s, \
                             min(min_ts) AS lo, max(max_ts) AS hi \
                         FROM pipeline_batches WHERE log_id = ? AND batch_id < ? \
                         GROUP BY batch_id) \
                     WHERE (e > ? OR s = ?) AND lo < toDateTime(?) AND hi >= toDateTime(?)",
                )
                .bind(log.as_str())
                .bind(*applied)
                .bind(*applied)
                .bind(clickhouse_sink::STARTED)
                .bind(span_end)
                .bind(span_start)
                .fetch_one(),
        )
        .await?;
        if split > 0 {
            return Err(RollupError::Busy(format!(
                "a ClickHouse batch of log {log} with records of {first}..{last} straddles \
                 Postgres's watermark {applied} or is still being written: nothing was changed, \
                 try again"
            )));
        }
    }
    let raw = match tokio::time::timeout(
        LOCKED_CLICKHOUSE_TIMEOUT,
        raw_hourly_below(client, first, last, &watermarks),
    )
    .await
    {
        Ok(raw) => raw?,
        Err(_) => {
            return Err(RollupError::Busy(format!(
                "ClickHouse did not answer within {} s while the Postgres applier was held: \
                 nothing was changed, try again",
                LOCKED_CLICKHOUSE_TIMEOUT.as_secs()
            )));
        }
    };
    let start = day_start(first);
    let end = day_start(last.succ_opt().unwrap_or(last));
    // Locked against any other writer for the write; the dry run only reads its snapshot.
    let rows: Vec<(String, String, DateTime<Utc>, i64)> = sqlx::query_as(if dry_run {
        "SELECT customer_id, metric_type, recorded_at, quantity FROM usage_records \
         WHERE recorded_at >= $1 AND recorded_at < $2"
    } else {
        "SELECT customer_id, metric_type, recorded_at, quantity FROM usage_records \
         WHERE recorded_at >= $1 AND recorded_at < $2 FOR UPDATE"
    })
    .bind(start)
    .bind(end)
    .fetch_all(&mut *tx)
    .await?;
    let mut hours: BTreeMap<(String, Metric, i64), (u64, u64)> = BTreeMap::new();
    for (customer, name, at, quantity) in rows {
        let current = u64::try_from(quantity).map_err(|_| {
            RollupError::Corrupt(format!(
                "usage_records of {customer}, {name} at {at} holds {quantity}, below zero"
            ))
        })?;
        let key = (customer, metric(&name)?, at.timestamp());
        hours.entry(key).or_default().0 = current;
    }
    for (key, quantity) in raw {
        hours.entry(key).or_default().1 = quantity;
    }
    let mut changes: BTreeMap<DayKey, Change> = BTreeMap::new();
    let (mut customers, mut metrics, mut at, mut quantities) = (vec![], vec![], vec![], vec![]);
    for ((customer, metric, hour), (current, rebuilt)) in &hours {
        let day = DateTime::<Utc>::from_timestamp(*hour, 0)
            .unwrap_or_default()
            .date_naive();
        let change = changes
            .entry((customer.clone(), *metric, day))
            .or_insert_with(|| Change {
                customer_id: customer.clone(),
                metric_type: *metric,
                day,
                current: 0,
                rebuilt: 0,
                hours: 0,
                hours_decreased: 0,
            });
        change.current = change.current.saturating_add(*current);
        change.rebuilt = change.rebuilt.saturating_add(*rebuilt);
        if current != rebuilt {
            change.hours += 1;
            if rebuilt < current {
                change.hours_decreased += 1;
            }
            customers.push(customer.clone());
            metrics.push(metric.as_str());
            at.push(DateTime::<Utc>::from_timestamp(*hour, 0).unwrap_or_default());
            quantities.push(i64::try_from(*rebuilt).unwrap_or(i64::MAX));
        }
    }
    let changes: Vec<Change> = changes.into_values().filter(|c| c.hours > 0).collect();
    if dry_run || changes.is_empty() {
        tx.rollback().await?;
        return Ok(changes);
    }
    let lowered: Vec<String> = changes
        .iter()
        .filter(|c| c.hours_decreased > 0)
        .map(|c| {
            format!(
                "{} {} {} ({} hour(s))",
                c.customer_id,
                c.metric_type.as_str(),
                c.day,
                c.hours_decreased
            )
        })
        .collect();
    if !lowered.is_empty() && !allow_decrease {
        tx.rollback().await?;
        return Err(RollupError::Refused(format!(
            "the rebuild would lower billed usage of {}: the pipeline never leaves Postgres above \
             the raw events, so raw rows may be missing instead; check them (a dry run lists \
             every change), then pass --allow-decrease to lower them: nothing was changed",
            lowered.join(", ")
        )));
    }
    // Hours whose raw total is 0 are deleted: the pipeline never writes a zero hour.
    sqlx::query(
        "DELETE FROM usage_records u USING unnest($1::text[], $2::text[], $3::timestamptz[], \
             $4::bigint[]) AS r(customer_id, metric_type, recorded_at, quantity) \
         WHERE r.quantity = 0 AND u.customer_id = r.customer_id \
           AND u.metric_type = r.metric_type AND u.recorded_at = r.recorded_at",
    )
    .bind(&customers)
    .bind(&metrics)
    .bind(&at)
    .bind(&quantities)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) \
             AS r(customer_id, metric_type, recorded_at, quantity) WHERE r.quantity > 0 \
         ON CONFLICT (customer_id, metric_type, recorded_at) \
         DO UPDATE SET quantity = EXCLUDED.quantity, updated_at = now()",
    )
    .bind(&customers)
    .bind(&metrics)
    .bind(&at)
    .bind(&quantities)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn date(text: &str) -> NaiveDate {
        text.parse().unwrap()
    }

    #[test]
    fn differences_cover_both_sides_and_skip_equal_totals() {
        let day = date("2026-11-03");
        let current = DayTotals::from([
            (("cus_a".into(), Metric::Impressions, day), 10),
            (("cus_a".into(), Metric::ApiCalls, day), 5),
            (("cus_b".into(), Metric::Impressions, day), 7),
        ]);
        let rebuilt = DayTotals::from([
            (("cus_a".into(), Metric::Impressions, day), 12),
            (("cus_a".into(), Metric::ApiCalls, day), 5),
            (("cus_c".into(), Metric::DataTransfer, day), 3),
        ]);
        let found: Vec<(String, u64, u64)> = differences(&current, &rebuilt)
            .into_iter()
            .map(|c| (c.customer_id, c.current, c.rebuilt))
            .collect();
        assert_eq!(
            found,
            [
                ("cus_a".into(), 10, 12),
                ("cus_b".into(), 7, 0),
                ("cus_c".into(), 0, 3)
            ]
        );
    }

    #[test]
    fn a_batch_span_covers_each_utc_day_it_touches() {
        let mut days = Vec::new();
        // 2026-11-02 23:00 to 2026-11-03 01:00 UTC.
        span_days(1_793_660_400, 1_793_667_600, &mut days);
        assert_eq!(days, [date("2026-11-02"), date("2026-11-03")]);
        assert_eq!(from_ch_date(0), date("1970-01-01"));
    }
}
