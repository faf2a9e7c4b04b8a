//! The usage tables the pipeline writes, read and repaired as stores: per-day totals of the
//! ClickHouse raw events (`usage_events`, the source of truth), of the ClickHouse daily rollup
//! (`usage_daily`) and of the Postgres hourly rollups (`usage_records`), for reconciliation
//! (`apexctl reconcile`), and the rebuild of either rollup from the raw events (`apexctl
//! rollup rebuild`).
//!
//! Every read is one grouped query over the whole range, never one per customer and day.
//! Days are UTC days: `usage_events.ts` is read as `toDate(ts, 'UTC')`, `usage_records` as
//! `recorded_at AT TIME ZONE 'UTC'`. The daily rollup's materialized view groups by
//! `toDate(ts)`, the server's own day: the stack's ClickHouse runs in UTC, and on a server
//! that does not, the rollup's days would not be UTC days.
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
//!   the rebuild waits for it in `system.mutations`) and inserting the raw total; readers may
//!   see the day short while the mutation runs.
//! - Postgres ([`rebuild_postgres`]): the rollups are additive upserts, each batch recorded in
//!   `pipeline_batches` in the same transaction. The rebuild takes `pipeline_batches` in SHARE
//!   mode in its transaction, which makes the Postgres applier wait (its first statement
//!   inserts there), reads each log's watermark, and sums only the raw rows of batches below
//!   it: exactly the batches the rollups hold. The applier batches the log independently per
//!   store, so this needs a ClickHouse batch ending exactly at each watermark (the normal
//!   state when the pipeline is idle or caught up); otherwise the rebuild refuses and may be
//!   run again. The hours are then set (inserted, updated or deleted) and the transaction
//!   commits, releasing the applier, which adds its batch on top of the repaired hours.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, NaiveDate, Utc};
use clickhouse::Client;
use serde::Serialize;
use sqlx::{Connection, PgConnection, PgExecutor};

use apex_core::model::Metric;

use crate::clickhouse_sink::ChError;

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
    /// The pipeline was writing the days concurrently, or a stored value is unreadable: no
    /// change was made.
    #[error("{0}")]
    Busy(String),
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
        .map_err(|e| RollupError::Busy(format!("unreadable metric in the store: {e}")))
}

fn collect<I>(rows: I) -> Result<DayTotals, RollupError>
where
    I: IntoIterator<Item = (String, String, NaiveDate, u64)>,
{
    let mut totals = DayTotals::new();
    for (customer, name, day, quantity) in rows {
        if quantity > 0 {
            totals.insert((customer, metric(&name)?, day), quantity);
        }
    }
    Ok(totals)
}

/// Raw event totals (`usage_events`) of UTC days `first..=last`, of one customer if given.
/// Days with a zero total are left out.
pub async fn raw_daily(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<DayTotals, RollupError> {
    let rows = client
        .query(
            "SELECT customer_id, toString(metric_type), toUInt16(toDate(ts, 'UTC')) AS d, \
                 sum(quantity) FROM usage_events \
             WHERE ts >= toDateTime(?) AND ts < toDateTime(?) AND (? = '' OR customer_id = ?) \
             GROUP BY customer_id, metric_type, d",
        )
        .bind(ch_seconds(day_start(first)))
        .bind(ch_seconds(day_start(last.succ_opt().unwrap_or(last))))
        .bind(customer.unwrap_or(""))
        .bind(customer.unwrap_or(""))
        .fetch_all::<(String, String, u16, u64)>()
        .await?;
    collect(
        rows.into_iter()
            .map(|(c, m, d, q)| (c, m, from_ch_date(d), q)),
    )
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
            "SELECT customer_id, toString(metric_type), toUInt32(toStartOfHour(ts)) AS h, \
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
    let mut hours = BTreeMap::new();
    for (customer, name, hour, quantity) in rows {
        if quantity > 0 {
            hours.insert((customer, metric(&name)?, i64::from(hour)), quantity);
        }
    }
    Ok(hours)
}

/// Daily rollup totals (`usage_daily`, summed: the SummingMergeTree may not have merged a
/// key's rows yet) of UTC days `first..=last`, of one customer if given.
pub async fn clickhouse_daily(
    client: &Client,
    first: NaiveDate,
    last: NaiveDate,
    customer: Option<&str>,
) -> Result<DayTotals, RollupError> {
    let rows = client
        .query(
            "SELECT customer_id, toString(metric_type), toUInt16(day) AS d, sum(quantity) \
             FROM usage_daily \
             WHERE day >= toDate(?) AND day <= toDate(?) AND (? = '' OR customer_id = ?) \
             GROUP BY customer_id, metric_type, d",
        )
        .bind(first.to_string())
        .bind(last.to_string())
        .bind(customer.unwrap_or(""))
        .bind(customer.unwrap_or(""))
        .fetch_all::<(String, String, u16, u64)>()
        .await?;
    collect(
        rows.into_iter()
            .map(|(c, m, d, q)| (c, m, from_ch_date(d), q)),
    )
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
        let quantity = u64::try_from(quantity).unwrap_or(0);
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

/// The UTC days of the pipeline's batches that may be between the two stores at the moment
/// of a read: applied by one store's applier and not (or not wholly) by the other's, or
/// still being written to ClickHouse. `None` means any day may be (the ClickHouse applier is
/// behind the Postgres one, and its markers do not say which days the missing batches hold).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InFlight {
    /// Days of batches in flight between the stores (raw events vs Postgres).
    pub between_stores: Option<Vec<NaiveDate>>,
    /// Days of ClickHouse batches open (`started` without `done`): their rollup part may lag
    /// their rows (raw events vs the daily rollup).
    pub clickhouse_open: Vec<NaiveDate>,
}

impl InFlight {
    /// Whether `day` may differ between the raw events and Postgres only because a batch is
    /// in flight.
    pub fn between_stores(&self, day: NaiveDate) -> bool {
        self.between_stores
            .as_ref()
            .is_none_or(|days| days.contains(&day))
    }
}

/// Each log's applied end in Postgres (its watermark).
async fn postgres_watermarks(db: impl PgExecutor<'_>) -> Result<Vec<(String, u64)>, RollupError> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT log_id, max(end_position) FROM pipeline_batches GROUP BY log_id ORDER BY log_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(log, end)| (log, u64::try_from(end).unwrap_or(0)))
        .collect())
}

/// A ClickHouse batch marker: log, start, end, whether done, span of its timestamps.
type Marker = (String, u64, u64, bool, u32, u32);

async fn clickhouse_markers_from(
    client: &Client,
    log_id: &str,
    from: u64,
) -> Result<Vec<Marker>, RollupError> {
    let rows = client
        .query(
            "SELECT log_id, batch_id, max(end_position), max(state) = 2, min(min_ts), max(max_ts) \
             FROM pipeline_batches WHERE log_id = ? AND end_position > ? \
             GROUP BY log_id, batch_id ORDER BY batch_id",
        )
        .bind(log_id)
        .bind(from)
        .fetch_all::<(String, u64, u64, u8, u32, u32)>()
        .await?;
    Ok(rows
        .into_iter()
        .map(|(l, s, e, done, lo, hi)| (l, s, e, done == 1, lo, hi))
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
/// [`InFlight`]). Read before and after the totals, the union covers a batch that moved
/// during the reads.
pub async fn in_flight(client: &Client, db: &mut PgConnection) -> Result<InFlight, RollupError> {
    let watermarks = postgres_watermarks(&mut *db).await?;
    let mut logs: Vec<String> = client
        .query("SELECT DISTINCT log_id FROM pipeline_batches")
        .fetch_all::<String>()
        .await?;
    for (log, _) in &watermarks {
        if !logs.contains(log) {
            logs.push(log.clone());
        }
    }
    let mut flight = InFlight {
        between_stores: Some(Vec::new()),
        clickhouse_open: Vec::new(),
    };
    for log in logs {
        let applied = watermarks
            .iter()
            .find(|(l, _)| *l == log)
            .map_or(0, |(_, end)| *end);
        // Markers of the batches that end past the Postgres watermark: not (wholly) in
        // Postgres yet.
        let markers = clickhouse_markers_from(client, &log, applied).await?;
        for (_, _, _, done, lo, hi) in &markers {
            if !done {
                span_days(*lo, *hi, &mut flight.clickhouse_open);
            }
            if let Some(days) = flight.between_stores.as_mut() {
                span_days(*lo, *hi, days);
            }
        }
        let clickhouse_end: u64 = client
            .query("SELECT max(end_position) FROM pipeline_batches WHERE log_id = ? AND state = 2")
            .bind(log.as_str())
            .fetch_one()
            .await?;
        if clickhouse_end < applied {
            // Postgres holds batches whose ClickHouse markers are not all written yet: the
            // days they hold are unknown.
            flight.between_stores = None;
        }
    }
    Ok(flight)
}

impl InFlight {
    /// Both readings together.
    pub fn union(mut self, other: InFlight) -> InFlight {
        self.between_stores = match (self.between_stores, other.between_stores) {
            (Some(mut a), Some(b)) => {
                for day in b {
                    if !a.contains(&day) {
                        a.push(day);
                    }
                }
                Some(a)
            }
            _ => None,
        };
        for day in other.clickhouse_open {
            if !self.clickhouse_open.contains(&day) {
                self.clickhouse_open.push(day);
            }
        }
        self
    }
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
            "SELECT countIf(s = 1), sum(n), sum(h) FROM ( \
                 SELECT log_id, batch_id, max(state) AS s, count() AS n, \
                     sum(cityHash64(log_id, batch_id, toInt8(state))) AS h \
                 FROM pipeline_batches \
                 WHERE min_ts < toDateTime(?) AND max_ts >= toDateTime(?) \
                 GROUP BY log_id, batch_id)",
        )
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
            "the pipeline wrote to {first}..{last} while the rollup was read: nothing was \
             changed, try again"
        )));
    }
    let changes = differences(&rollup, &raw);
    if dry_run || changes.is_empty() {
        return Ok(changes);
    }
    // Excess first: those keys are deleted (a mutation), then get their whole raw total.
    let excess: Vec<&Change> = changes.iter().filter(|c| c.current > c.rebuilt).collect();
    if !excess.is_empty() {
        let keys = vec!["(customer_id = ? AND metric_type = ? AND day = toDate(?))"; excess.len()]
            .join(" OR ");
        let mut delete = client.query(&format!("ALTER TABLE usage_daily DELETE WHERE {keys}"));
        for change in &excess {
            delete = delete
                .bind(change.customer_id.as_str())
                .bind(change.metric_type.as_str())
                .bind(change.day.to_string());
        }
        delete.execute().await?;
        wait_for_mutations(client).await?;
    }
    let mut rows = Vec::with_capacity(changes.len());
    for change in &changes {
        let quantity = if change.current > change.rebuilt {
            change.rebuilt
        } else {
            change.rebuilt - change.current
        };
        if quantity > 0 {
            rows.push((change, quantity));
        }
    }
    if !rows.is_empty() {
        let values = vec!["(toDate(?), ?, ?, toUInt64(?))"; rows.len()].join(", ");
        let mut insert = client.query(&format!(
            "INSERT INTO usage_daily (day, customer_id, metric_type, quantity) VALUES {values}"
        ));
        for (change, quantity) in rows {
            insert = insert
                .bind(change.day.to_string())
                .bind(change.customer_id.as_str())
                .bind(change.metric_type.as_str())
                .bind(quantity);
        }
        insert.execute().await?;
    }
    Ok(changes)
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

/// Rebuilds the Postgres hourly rollups of UTC days `first..=last` from the raw events, in
/// one transaction (see the module documentation for how it stays exact while the pipeline
/// writes). With `dry_run`, the transaction is rolled back. Returns the customer, metric and
/// day totals that differ(ed), with how many hours changed. `Busy` when the ClickHouse
/// applier is not at a batch boundary at the Postgres watermark of some log.
pub async fn rebuild_postgres(
    client: &Client,
    conn: &mut PgConnection,
    first: NaiveDate,
    last: NaiveDate,
    dry_run: bool,
) -> Result<Vec<Change>, RollupError> {
    let mut tx = conn.begin().await?;
    // The applier's first statement inserts into pipeline_batches: it waits until we commit.
    sqlx::query("LOCK TABLE pipeline_batches IN SHARE MODE")
        .execute(&mut *tx)
        .await?;
    let watermarks = postgres_watermarks(&mut *tx).await?;
    for (log, end) in &watermarks {
        let boundary: u64 = client
            .query(
                "SELECT count() FROM pipeline_batches \
                 WHERE log_id = ? AND end_position = ? AND state = 2",
            )
            .bind(log.as_str())
            .bind(*end)
            .fetch_one()
            .await?;
        if boundary == 0 {
            return Err(RollupError::Busy(format!(
                "ClickHouse has no finished batch ending at log {log}'s Postgres watermark {end} \
                 (its applier is behind or between batches): nothing was changed, try again"
            )));
        }
    }
    let raw = raw_hourly_below(client, first, last, &watermarks).await?;
    let start = day_start(first);
    let end = day_start(last.succ_opt().unwrap_or(last));
    let rows: Vec<(String, String, DateTime<Utc>, i64)> = sqlx::query_as(
        "SELECT customer_id, metric_type, recorded_at, quantity FROM usage_records \
         WHERE recorded_at >= $1 AND recorded_at < $2 FOR UPDATE",
    )
    .bind(start)
    .bind(end)
    .fetch_all(&mut *tx)
    .await?;
    let mut hours: BTreeMap<(String, Metric, i64), (u64, u64)> = BTreeMap::new();
    for (customer, name, at, quantity) in rows {
        let key = (customer, metric(&name)?, at.timestamp());
        hours.entry(key).or_default().0 = u64::try_from(quantity).unwrap_or(0);
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
            });
        change.current = change.current.saturating_add(*current);
        change.rebuilt = change.rebuilt.saturating_add(*rebuilt);
        if current != rebuilt {
            change.hours += 1;
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
