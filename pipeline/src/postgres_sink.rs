//! A [`RecordSink`] that makes records durable in Postgres before acknowledging them: a worker
//! thread drains the bounded queue, aggregates every waiting submission into hourly rollups
//! (one row per customer, metric and hour), and adds them to `usage_records` in one
//! transaction together with the batch id in `pipeline_batches`. One commit acknowledges every
//! request in the batch (group commit).
//!
//! Exactly once: if the outcome of a commit is unknown (the connection dropped during
//! COMMIT), the worker looks the batch id up before retrying, so a batch that landed is never
//! added twice. A batch that cannot be written within the retry budget is refused (the
//! clients get 503 and retry); nothing is acknowledged that is not committed.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError, bounded};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::model::{Metric, UsageRecord};
use crate::sink::{Ack, RecordSink, SinkError, Submission};

/// Limits of the Postgres sink, named and checked.
#[derive(Debug, Clone)]
pub struct PostgresSinkConfig {
    /// Postgres URL for the worker's own connection.
    pub database_url: String,
    /// Submissions (requests) waiting at most; beyond it submit answers [`SinkError::Full`].
    pub queue_capacity: usize,
    /// Records aggregated into one transaction at most.
    pub max_batch_records: usize,
    /// How long a batch is retried while Postgres fails before its requests get 503.
    pub retry_budget: Duration,
}

impl PostgresSinkConfig {
    /// Default queue: 4,096 requests.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 4_096;
    /// Default batch: 100,000 records.
    pub const DEFAULT_MAX_BATCH_RECORDS: usize = 100_000;
    /// Default retry budget: 5 s, well inside an SDK's request timeout.
    pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(5);

    /// Defaults for `database_url`.
    pub fn new(database_url: &str) -> Self {
        Self {
            database_url: database_url.to_owned(),
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            max_batch_records: Self::DEFAULT_MAX_BATCH_RECORDS,
            retry_budget: Self::DEFAULT_RETRY_BUDGET,
        }
    }

    /// Checks the limits are usable.
    pub fn validate(&self) -> Result<(), String> {
        if self.queue_capacity == 0 {
            return Err("queue_capacity must be at least 1".into());
        }
        if self.max_batch_records == 0 {
            return Err("max_batch_records must be at least 1".into());
        }
        Ok(())
    }
}

/// The sink; cheap to share behind an `Arc`.
pub struct PostgresSink {
    sender: RwLock<Option<Sender<Submission>>>,
    queue: Receiver<Submission>,
    worker: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl PostgresSink {
    /// Starts the worker thread. The worker connects lazily and retries, so the sink can be
    /// started while Postgres is still coming up.
    pub fn start(config: PostgresSinkConfig) -> Result<Arc<Self>, String> {
        config.validate()?;
        let (sender, queue) = bounded(config.queue_capacity);
        let worker_queue = queue.clone();
        let worker = std::thread::Builder::new()
            .name("apex-pg-sink".into())
            .spawn(move || run_worker(&config, &worker_queue))
            .map_err(|e| e.to_string())?;
        Ok(Arc::new(Self {
            sender: RwLock::new(Some(sender)),
            queue,
            worker: std::sync::Mutex::new(Some(worker)),
        }))
    }
}

impl RecordSink for PostgresSink {
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError> {
        let (ack, acked) = tokio::sync::oneshot::channel();
        let guard = self.sender.read().unwrap_or_else(|p| p.into_inner());
        let Some(sender) = guard.as_ref() else {
            return Err(SinkError::Closed);
        };
        match sender.try_send(Submission { records, ack }) {
            Ok(()) => Ok(acked),
            Err(TrySendError::Full(_)) => Err(SinkError::Full),
            Err(TrySendError::Disconnected(_)) => Err(SinkError::Closed),
        }
    }

    fn queue_depth(&self) -> usize {
        self.queue.len()
    }

    fn shutdown(&self) {
        // Dropping the only sender lets the worker drain the queue and stop.
        drop(
            self.sender
                .write()
                .unwrap_or_else(|p| p.into_inner())
                .take(),
        );
        let worker = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(worker) = worker {
            let _ = worker.join();
        }
    }
}

fn run_worker(config: &PostgresSinkConfig, queue: &Receiver<Submission>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "postgres sink: cannot start its runtime");
            return;
        }
    };
    // The pool spawns its maintenance task on the runtime it is created in.
    let _runtime_context = runtime.enter();
    let pool = PgPoolOptions::new()
        .max_connections(2)
        .acquire_timeout(Duration::from_secs(2))
        .connect_lazy(&config.database_url);
    let pool = match pool {
        Ok(pool) => pool,
        Err(e) => {
            tracing::error!(error = %e, "postgres sink: bad DATABASE_URL");
            return;
        }
    };
    loop {
        let first = match queue.recv_timeout(Duration::from_millis(200)) {
            Ok(first) => first,
            Err(RecvTimeoutError::Timeout) => continue,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        let mut batch = vec![first];
        let mut records = batch[0].records.len();
        while records < config.max_batch_records {
            match queue.try_recv() {
                Ok(next) => {
                    records += next.records.len();
                    batch.push(next);
                }
                Err(_) => break,
            }
        }
        let outcome = runtime.block_on(write_with_retry(&pool, &batch, config.retry_budget));
        metrics::counter!(crate::telemetry::PG_SINK_BATCHES_TOTAL, "outcome" => if outcome.is_ok() { "committed" } else { "refused" })
            .increment(1);
        if outcome.is_ok() {
            metrics::counter!(crate::telemetry::PG_SINK_RECORDS_TOTAL).increment(records as u64);
        }
        for submission in batch {
            let _ = submission.ack.send(outcome);
        }
    }
    runtime.block_on(pool.close());
}

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

async fn write_with_retry(
    pool: &PgPool,
    batch: &[Submission],
    budget: Duration,
) -> Result<(), SinkError> {
    let rows = aggregate_hourly(batch.iter().flat_map(|s| s.records.iter()));
    let record_count: usize = batch.iter().map(|s| s.records.len()).sum();
    // Random, not positional: this sink has no log to take a position from.
    let batch_id = random_batch_id();
    let deadline = Instant::now() + budget;
    let mut backoff = Duration::from_millis(25);
    loop {
        match write_batch(pool, batch_id, record_count, &rows).await {
            Ok(()) => return Ok(()),
            Err(e) => {
                // The commit may have landed before the error reached us.
                if batch_landed(pool, batch_id).await == Some(true) {
                    return Ok(());
                }
                if Instant::now() + backoff > deadline {
                    tracing::error!(error = %e, records = record_count, "postgres sink: giving up on a batch; clients get 503");
                    return Err(SinkError::Unavailable);
                }
                tracing::warn!(error = %e, "postgres sink: write failed, retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
        }
    }
}

async fn write_batch(
    pool: &PgPool,
    batch_id: i64,
    record_count: usize,
    rows: &[(RollupKey, u64)],
) -> Result<(), sqlx::Error> {
    let mut customers = Vec::with_capacity(rows.len());
    let mut metrics = Vec::with_capacity(rows.len());
    let mut hours = Vec::with_capacity(rows.len());
    let mut quantities = Vec::with_capacity(rows.len());
    for (key, quantity) in rows {
        customers.push(key.customer_id.to_string());
        metrics.push(key.metric.as_str());
        hours.push(DateTime::<Utc>::from_timestamp(key.hour_start, 0).unwrap_or_default());
        quantities.push(i64::try_from(*quantity).unwrap_or(i64::MAX));
    }
    let mut tx = pool.begin().await?;
    sqlx::query("INSERT INTO pipeline_batches (batch_id, record_count) VALUES ($1, $2)")
        .bind(batch_id)
        .bind(i32::try_from(record_count).unwrap_or(i32::MAX))
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::bigint[]) \
         ON CONFLICT (customer_id, metric_type, recorded_at) \
         DO UPDATE SET quantity = usage_records.quantity + EXCLUDED.quantity, updated_at = now()",
    )
    .bind(customers)
    .bind(metrics)
    .bind(hours)
    .bind(quantities)
    .execute(&mut *tx)
    .await?;
    tx.commit().await
}

async fn batch_landed(pool: &PgPool, batch_id: i64) -> Option<bool> {
    sqlx::query_scalar::<_, bool>(
        "SELECT EXISTS (SELECT 1 FROM pipeline_batches WHERE batch_id = $1)",
    )
    .bind(batch_id)
    .fetch_one(pool)
    .await
    .ok()
}

fn random_batch_id() -> i64 {
    let mut bytes = [0u8; 8];
    getrandom::fill(&mut bytes).expect("the OS random source is unavailable");
    // Non-negative, as the column requires.
    (u64::from_le_bytes(bytes) >> 1) as i64
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
    fn hours_before_1970_round_down() {
        let rows = aggregate_hourly(&[record("c", Metric::Impressions, 1, -1)]);
        assert_eq!(rows[0].0.hour_start, -3600);
    }

    #[test]
    fn config_is_validated() {
        let mut config = PostgresSinkConfig::new("postgres://x/y");
        assert!(config.validate().is_ok());
        config.queue_capacity = 0;
        assert!(config.validate().is_err());
    }
}
