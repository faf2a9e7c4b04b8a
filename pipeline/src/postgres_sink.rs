//! The Postgres side of the pipeline: hourly rollups in `usage_records`, fed from the
//! write-ahead log. A batch is a log range `[start, end)`; its rollup rows (one per customer,
//! metric and UTC hour) are added with an additive upsert in the same transaction that
//! records the range in `pipeline_batches`.
//!
//! Exactly once: the log is applied in order by one applier per log, so the largest
//! `end_position` of a log in `pipeline_batches` is exactly where replay resumes after any
//! crash. If the outcome of a commit is unknown (the connection dropped during COMMIT), the
//! batch id is looked up before the batch is tried again.
//!
//! An hour's total saturates at `i64::MAX` (9.2 EB of data transfer, far beyond any real
//! hour), in Rust and in the upsert, so no input can make the sum overflow and turn a batch
//! into one the store refuses forever.
//!
//! Errors are told apart by SQLSTATE ([`classify`]): a lost connection or a deadlock is
//! retried; an undefined table or column, a type mismatch or a refused privilege is
//! permanent, and the applier parks the batch instead of retrying it forever.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgPoolOptions;
use sqlx::{Connection, PgConnection, PgExecutor, PgPool};

use apex_core::model::{Metric, UsageRecord};

use crate::store::{Batch, Resume, StoreError, StoreWriter};

/// One rollup row: a customer's quantity of one metric in one UTC hour.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RollupKey {
    /// Customer id.
    pub customer_id: Arc<str>,
    /// Metric.
    pub metric: Metric,
    /// Start of the hour, unix seconds.
    pub hour_start: i64,
}

/// Sums records into hourly rollups, sorted by key so concurrent writers lock rows in the
/// same order and cannot deadlock.
pub fn aggregate_hourly<'a>(
    records: impl IntoIterator<Item = &'a UsageRecord>,
) -> Vec<(RollupKey, u64)> {
    let mut sums: HashMap<RollupKey, u64> = HashMap::new();
    for record in records {
        let key = RollupKey {
            customer_id: record.customer_id.clone(),
            metric: record.metric,
            hour_start: record.timestamp_ms.div_euclid(3_600_000) * 3_600,
        };
        let sum = sums.entry(key).or_insert(0);
        // Per-record limits keep sums far below u64::MAX; saturate rather than wrap regardless.
        *sum = sum.saturating_add(record.quantity);
    }
    let mut rows: Vec<(RollupKey, u64)> = sums.into_iter().collect();
    rows.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    rows
}

/// Where replay of `log_id` resumes: the end of its last applied batch (0 for a new log).
pub async fn watermark(db: impl PgExecutor<'_>, log_id: &str) -> Result<u64, sqlx::Error> {
    let end: Option<i64> =
        sqlx::query_scalar("SELECT max(end_position) FROM pipeline_batches WHERE log_id = $1")
            .bind(log_id)
            .fetch_one(db)
            .await?;
    Ok(end.map_or(0, |e| e.max(0) as u64))
}

/// Every log's watermark ([`watermark`]), by log id.
pub async fn watermarks(db: impl PgExecutor<'_>) -> Result<Vec<(String, u64)>, sqlx::Error> {
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT log_id, max(end_position) FROM pipeline_batches GROUP BY log_id ORDER BY log_id",
    )
    .fetch_all(db)
    .await?;
    Ok(rows
        .into_iter()
        .map(|(log, end)| (log, end.max(0) as u64))
        .collect())
}

/// How long ago (seconds, on the database's clock) the oldest batch of `log_id` ending past
/// `after` was applied; `None` when there is none.
pub async fn applied_age_past(
    db: impl PgExecutor<'_>,
    log_id: &str,
    after: u64,
) -> Result<Option<i64>, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT extract(epoch FROM now() - min(applied_at))::bigint FROM pipeline_batches \
         WHERE log_id = $1 AND end_position > $2",
    )
    .bind(log_id)
    .bind(i64::try_from(after).unwrap_or(i64::MAX))
    .fetch_one(db)
    .await
}

/// True if the batch starting at `start` of `log_id` was committed.
pub async fn batch_applied(
    db: impl PgExecutor<'_>,
    log_id: &str,
    start: u64,
) -> Result<bool, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT EXISTS (SELECT 1 FROM pipeline_batches WHERE log_id = $1 AND batch_id = $2)",
    )
    .bind(log_id)
    .bind(start as i64)
    .fetch_one(db)
    .await
}

/// Adds the records of `batch` to the rollups, once: the rollup rows and the batch's
/// `pipeline_batches` row are written in one transaction (a savepoint when `conn` is already
/// in one).
pub async fn apply_batch(conn: &mut PgConnection, batch: &Batch<'_>) -> Result<(), sqlx::Error> {
    let rows = aggregate_hourly(batch.records);
    let mut customers = Vec::with_capacity(rows.len());
    let mut metrics = Vec::with_capacity(rows.len());
    let mut hours = Vec::with_capacity(rows.len());
    let mut quantities = Vec::with_capacity(rows.len());
    for (key, quantity) in &rows {
        customers.push(key.customer_id.to_string());
        metrics.push(key.metric.as_str());
        hours.push(DateTime::<Utc>::from_timestamp(key.hour_start, 0).unwrap_or_default());
        quantities.push(i64::try_from(*quantity).unwrap_or(i64::MAX));
    }
    let mut tx = conn.begin().await?;
    // The primary key makes a second application of the same range fail instead of adding twice.
    sqlx::query(
        "INSERT INTO pipeline_batches (log_id, batch_id, end_position, record_count) VALUES ($1, $2, $3, $4)",
    )
    .bind(batch.log_id)
    .bind(batch.start as i64)
    .bind(batch.end as i64)
    .bind(i32::try_from(batch.records.len()).unwrap_or(i32::MAX))
    .execute(&mut *tx)
    .await?;
    if !rows.is_empty() {
        sqlx::query(
            "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
             SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) \
             ON CONFLICT (customer_id, metric_type, recorded_at) \
             DO UPDATE SET quantity = LEAST(usage_records.quantity::numeric + EXCLUDED.quantity, \
                 9223372036854775807)::bigint, updated_at = now()",
        )
        .bind(customers)
        .bind(metrics)
        .bind(hours)
        .bind(quantities)
        .execute(&mut *tx)
        .await?;
    }
    tx.commit().await
}

/// Deletes up to `limit` of the `pipeline_batches` rows applied before `before`, except each
/// log's newest (its watermark: where replay resumes; replay checks only batches past it).
/// Returns how many it removed: a caller removes everything by calling again until that is
/// below `limit`, each call a short transaction of its own. Running it again removes
/// nothing more.
///
/// A log's batches follow one another, so its newest is its largest `batch_id` (the batch's
/// start position), which the primary key finds without reading the log's rows: the work is
/// linear in the rows removed, not quadratic in the rows kept.
pub async fn prune_batches(
    db: impl PgExecutor<'_>,
    before: DateTime<Utc>,
    limit: i64,
) -> Result<u64, sqlx::Error> {
    Ok(sqlx::query(
        "DELETE FROM pipeline_batches WHERE (log_id, batch_id) IN ( \
             SELECT p.log_id, p.batch_id FROM pipeline_batches p \
             JOIN (SELECT log_id, max(batch_id) AS newest FROM pipeline_batches GROUP BY log_id) n \
                 ON n.log_id = p.log_id \
             WHERE p.batch_id < n.newest AND p.applied_at < $1 \
             LIMIT $2)",
    )
    .bind(before)
    .bind(limit)
    .execute(db)
    .await?
    .rows_affected())
}

/// SQLSTATE classes of errors that the same statement hits again however often it is
/// retried: data exceptions (22), integrity violations (23), undefined tables, columns and
/// types (42), unsupported features (0A) and program limits (54). Everything else may pass
/// later and is retried: connection failures (08), serialization failures and deadlocks
/// (40), resource shortages (53), a server shutting down (57), system errors (58), and
/// refused credentials (28) or privileges (42501), which an operator fixes on the server
/// while the applier goes on.
const PERMANENT_SQLSTATE_CLASSES: &[&str] = &["22", "23", "42", "0A", "54"];

/// Exceptions inside the permanent classes: insufficient privilege.
const RETRIED_SQLSTATES: &[&str] = &["42501"];

/// True for a SQLSTATE in one of [`PERMANENT_SQLSTATE_CLASSES`] and not in
/// [`RETRIED_SQLSTATES`].
fn permanent_sqlstate(code: &str) -> bool {
    !RETRIED_SQLSTATES.contains(&code)
        && PERMANENT_SQLSTATE_CLASSES
            .iter()
            .any(|class| code.starts_with(class))
}

/// Whether a Postgres error is worth retrying.
pub fn classify(error: &sqlx::Error) -> StoreError {
    use sqlx::Error;
    let permanent = match error {
        Error::Database(db) => db.code().is_some_and(|code| permanent_sqlstate(&code)),
        // Our code and the schema disagree: the same query decodes the same way next time.
        Error::ColumnDecode { .. }
        | Error::Decode(_)
        | Error::Encode(_)
        | Error::TypeNotFound { .. }
        | Error::ColumnNotFound(_)
        | Error::ColumnIndexOutOfBounds { .. }
        | Error::Configuration(_)
        | Error::InvalidArgument(_) => true,
        _ => false,
    };
    StoreError::new(permanent, format!("postgres: {error}"))
}

/// The Postgres [`StoreWriter`]: a small pool of its own, so the edge's pool never waits
/// behind a large batch.
pub struct PostgresWriter {
    pool: PgPool,
}

impl PostgresWriter {
    /// A writer on `database_url`; connects on first use (the store may be down at start).
    /// Must be called inside the tokio runtime the writer will run on.
    pub fn connect_lazy(database_url: &str) -> Result<Self, sqlx::Error> {
        let pool = PgPoolOptions::new()
            .max_connections(2)
            .acquire_timeout(Duration::from_secs(2))
            .connect_lazy(database_url)?;
        Ok(Self { pool })
    }
}

impl StoreWriter for PostgresWriter {
    async fn resume(&mut self, log_id: &str) -> Result<Resume, StoreError> {
        watermark(&self.pool, log_id)
            .await
            .map(Resume::At)
            .map_err(|e| classify(&e))
    }

    async fn write(&mut self, batch: &Batch<'_>, retry: bool) -> Result<(), StoreError> {
        // An earlier attempt may have committed with its answer lost.
        if retry
            && batch_applied(&self.pool, batch.log_id, batch.start)
                .await
                .map_err(|e| classify(&e))?
        {
            return Ok(());
        }
        let mut conn = self.pool.acquire().await.map_err(|e| classify(&e))?;
        apply_batch(&mut conn, batch)
            .await
            .map_err(|e| classify(&e))?;
        crate::failpoint::hit("pg_after_commit");
        Ok(())
    }

    async fn close(&mut self) {
        self.pool.close().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(customer: &str, metric: Metric, quantity: u64, timestamp_ms: i64) -> UsageRecord {
        UsageRecord {
            customer_id: customer.into(),
            metric,
            quantity,
            event_id: None,
            timestamp_ms,
            received_ms: timestamp_ms,
            metadata: None,
        }
    }

    #[test]
    fn records_sum_per_customer_metric_and_hour() {
        let hour = 1_764_000_000_000 / 3_600_000 * 3_600_000;
        let records = [
            record("cus_b", Metric::Impressions, 5, hour),
            record("cus_a", Metric::Impressions, 1, hour + 3_599_999),
            record("cus_a", Metric::Impressions, 2, hour),
            record("cus_a", Metric::Impressions, 4, hour + 3_600_000),
            record("cus_a", Metric::ApiCalls, 8, hour),
        ];
        let rows: Vec<(String, Metric, i64, u64)> = aggregate_hourly(&records)
            .into_iter()
            .map(|(k, q)| (k.customer_id.to_string(), k.metric, k.hour_start, q))
            .collect();
        let h = hour / 1000;
        assert_eq!(
            rows,
            [
                ("cus_a".into(), Metric::Impressions, h, 3),
                ("cus_a".into(), Metric::Impressions, h + 3600, 4),
                ("cus_a".into(), Metric::ApiCalls, h, 8),
                ("cus_b".into(), Metric::Impressions, h, 5),
            ]
        );
    }

    #[test]
    fn schema_and_data_errors_are_permanent_and_the_rest_transient() {
        // undefined column, undefined table, datatype mismatch, numeric out of range,
        // unique violation
        for code in ["42703", "42P01", "42804", "22003", "23505"] {
            assert!(permanent_sqlstate(code), "{code}");
        }
        // connection failure, serialization failure, deadlock, too many connections,
        // admin shutdown, cannot connect now, I/O error
        for code in [
            "08006", "40001", "40P01", "53300", "57P01", "57P03", "58030",
        ] {
            assert!(!permanent_sqlstate(code), "{code}");
        }
        assert!(!classify(&sqlx::Error::PoolTimedOut).is_permanent());
        assert!(classify(&sqlx::Error::ColumnNotFound("quantity".into())).is_permanent());
    }

    #[test]
    fn hours_before_1970_round_down() {
        let rows = aggregate_hourly(&[record("c", Metric::Impressions, 1, -1)]);
        assert_eq!(rows[0].0.hour_start, -3600);
    }
}
