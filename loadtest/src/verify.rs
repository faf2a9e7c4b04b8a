//! `--verify`: waits for the server's pipeline to drain (its backlog gauges at zero), then
//! checks that Postgres (`usage_records`), ClickHouse (`usage_events`) and ClickHouse's daily
//! rollup (`usage_daily`) each grew, per customer and metric, by exactly what the server
//! acknowledged during the run. Totals are read before the run too, so customers with earlier
//! usage (a reused key file) are checked on the difference.

use std::collections::{BTreeMap, HashMap};
use std::time::{Duration, Instant};

use apex_core::env::EnvSource;
use apex_core::model::Metric;
use apex_core::stores::StoreConfig;
use http_body_util::{BodyExt, Empty};
use hyper::Request;
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::Serialize;
use sqlx::PgPool;

use crate::runner::{Ledger, LedgerEntry, Target};
use crate::workload::Customer;

/// The stores checked, in report order.
pub const STORES: [&str; 3] = ["postgres", "clickhouse", "clickhouse_daily"];

/// Totals per (customer id, metric) of one store.
pub type Totals = HashMap<(String, Metric), u64>;

/// Connections to the stores the server writes to, from the same variables the server reads
/// (`DATABASE_URL`, `CLICKHOUSE_URL`, `CLICKHOUSE_DATABASE`, ...).
pub struct Stores {
    config: StoreConfig,
    pool: PgPool,
}

impl Stores {
    /// Connects using the process environment.
    pub async fn from_env() -> Result<Self, String> {
        let config = StoreConfig::from_env(&EnvSource::process())
            .map_err(|e| format!("--verify reads the stores the server writes to: {e}"))?;
        let pool = config
            .connect_postgres()
            .await
            .map_err(|e| format!("--verify cannot connect to Postgres: {e}"))?;
        Ok(Self { config, pool })
    }

    /// Current totals of `customers` in every store of [`STORES`].
    pub async fn totals(&self, customers: &[Customer]) -> Result<[Totals; 3], String> {
        let ids: Vec<String> = customers.iter().map(|c| c.customer_id.clone()).collect();
        let rows: Vec<(String, String, i64)> = sqlx::query_as(
            "SELECT customer_id, metric_type, sum(quantity)::bigint FROM usage_records \
             WHERE customer_id = ANY($1) GROUP BY customer_id, metric_type",
        )
        .bind(&ids)
        .fetch_all(&self.pool)
        .await
        .map_err(|e| format!("cannot read usage_records: {e}"))?;
        let postgres = to_totals(rows.into_iter().map(|(c, m, q)| (c, m, q.max(0) as u64)))?;
        let mut clickhouse = Vec::with_capacity(2);
        // `customer_id IN (?, ...)` lets ClickHouse use the primary key; `has(array, column)`
        // scanned the whole table (a minute on a table of benchmark leftovers).
        let placeholders = vec!["?"; ids.len()].join(", ");
        for table in ["usage_events", "usage_daily"] {
            let mut query = self.config.clickhouse().query(&format!(
                "SELECT customer_id, toString(metric_type), sum(quantity) FROM {table} \
                 WHERE customer_id IN ({placeholders}) GROUP BY customer_id, metric_type"
            ));
            for id in &ids {
                query = query.bind(id.as_str());
            }
            let rows: Vec<(String, String, u64)> = query
                .fetch_all()
                .await
                .map_err(|e| format!("cannot read {table}: {e}"))?;
            clickhouse.push(to_totals(rows.into_iter())?);
        }
        let daily = clickhouse.pop().unwrap_or_default();
        let events = clickhouse.pop().unwrap_or_default();
        Ok([postgres, events, daily])
    }
}

fn to_totals(rows: impl Iterator<Item = (String, String, u64)>) -> Result<Totals, String> {
    let mut totals = Totals::new();
    for (customer, metric, quantity) in rows {
        let metric: Metric = metric.parse().map_err(|e| format!("{e}"))?;
        *totals.entry((customer, metric)).or_default() += quantity;
    }
    Ok(totals)
}

/// Sum of the server's `apex_pipeline_wal_backlog_bytes` series: log bytes not yet in a store.
pub async fn backlog_bytes(target: &Target) -> Result<u64, String> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| format!("cannot reach {} for /metrics: {e}", target.authority))?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(connection);
    let request = Request::get("/metrics")
        .header(hyper::header::HOST, &target.authority)
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("GET /metrics: {e}"))?
        .to_bytes();
    parse_backlog(&String::from_utf8_lossy(&body)).ok_or_else(|| {
        "the server's /metrics has no apex_pipeline_wal_backlog_bytes: is it apex-server?"
            .to_owned()
    })
}

/// Sums the backlog series of a Prometheus text page; `None` when there is none.
pub fn parse_backlog(page: &str) -> Option<u64> {
    let mut seen = false;
    let mut sum = 0f64;
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("apex_pipeline_wal_backlog_bytes")
            && (rest.starts_with('{') || rest.starts_with(' '))
        {
            seen = true;
            sum += rest
                .rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0);
        }
    }
    seen.then_some(sum as u64)
}

/// Waits until the server reports no backlog in any store, for at most `timeout`.
pub async fn wait_drained(target: &Target, timeout: Duration) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        let backlog = backlog_bytes(target).await?;
        if backlog == 0 {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!(
                "the pipeline still had {backlog} bytes to apply after {} s",
                timeout.as_secs()
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// One customer, metric and store whose growth is not what was acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    /// The store (one of [`STORES`]).
    pub store: &'static str,
    /// Customer id.
    pub customer_id: String,
    /// Metric.
    pub metric: &'static str,
    /// Acknowledged during the run, in storage units.
    pub acknowledged: u64,
    /// Sent without a known outcome.
    pub unknown: u64,
    /// How much the store grew.
    pub stored: i128,
}

/// The verification result.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Verdict {
    /// True when every store grew by exactly the acknowledged amounts.
    pub passed: bool,
    /// Every mismatch.
    pub differences: Vec<Difference>,
    /// Customer and metric pairs compared per store.
    pub compared: usize,
    /// Seconds from the end of the load until the stores held it all (or the check gave up).
    pub settled_after_s: f64,
    /// Why the check could not be completed, or why it fails beyond the differences.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl Verdict {
    /// A check that could not run to its end.
    pub fn failed(error: String) -> Self {
        Self {
            passed: false,
            error: Some(error),
            ..Self::default()
        }
    }
}

/// Compares the growth of each store (`after` minus `before`) with `ledger`.
pub fn compare(
    customers: &[Customer],
    ledger: &Ledger,
    before: &[Totals; 3],
    after: &[Totals; 3],
) -> Verdict {
    let mut verdict = Verdict {
        passed: true,
        ..Verdict::default()
    };
    // A key file may list one customer under several keys: their records all count toward
    // that customer, so the ledger is summed by customer id first.
    let mut by_id: BTreeMap<(&str, Metric), LedgerEntry> = BTreeMap::new();
    for customer in customers {
        for metric in Metric::ALL {
            by_id
                .entry((customer.customer_id.as_str(), metric))
                .or_default();
        }
    }
    for ((index, metric), entry) in ledger {
        let total = by_id
            .entry((customers[*index].customer_id.as_str(), *metric))
            .or_default();
        total.acked += entry.acked;
        total.unknown += entry.unknown;
    }
    for ((customer_id, metric), entry) in by_id {
        let key = (customer_id.to_owned(), metric);
        for (store, (b, a)) in STORES.iter().zip(before.iter().zip(after)) {
            let grew = i128::from(a.get(&key).copied().unwrap_or(0))
                - i128::from(b.get(&key).copied().unwrap_or(0));
            if grew != i128::from(entry.acked) || entry.unknown > 0 {
                verdict.passed = false;
                verdict.differences.push(Difference {
                    store,
                    customer_id: customer_id.to_owned(),
                    metric: metric.as_str(),
                    acknowledged: entry.acked,
                    unknown: entry.unknown,
                    stored: grew,
                });
            }
        }
        verdict.compared += 1;
    }
    verdict
}

/// True when a difference can still close by waiting (a store behind, never ahead).
pub fn may_catch_up(verdict: &Verdict) -> bool {
    verdict
        .differences
        .iter()
        .all(|d| d.unknown == 0 && d.stored < i128::from(d.acknowledged))
}

/// Verifies the run: drains, then compares until equal or until `timeout`, re-reading every
/// 100 ms, since ClickHouse's rollup can lag the events by a merge.
pub async fn verify(
    stores: &Stores,
    target: &Target,
    customers: &[Customer],
    ledger: &Ledger,
    before: &[Totals; 3],
    timeout: Duration,
) -> Result<Verdict, String> {
    let started = Instant::now();
    let deadline = started + timeout;
    wait_drained(target, timeout).await?;
    loop {
        let after = stores.totals(customers).await?;
        let mut verdict = compare(customers, ledger, before, &after);
        if verdict.passed || !may_catch_up(&verdict) || Instant::now() >= deadline {
            verdict.settled_after_s = started.elapsed().as_secs_f64();
            return Ok(verdict);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn customers() -> Vec<Customer> {
        vec![
            Customer {
                api_key: "rsk_a".into(),
                customer_id: "cus_a".into(),
            },
            Customer {
                api_key: "rsk_b".into(),
                customer_id: "cus_b".into(),
            },
        ]
    }

    fn totals(pairs: &[(&str, Metric, u64)]) -> Totals {
        pairs
            .iter()
            .map(|(c, m, q)| (((*c).to_owned(), *m), *q))
            .collect()
    }

    #[test]
    fn growth_equal_to_the_acknowledged_passes() {
        let mut ledger = Ledger::new();
        ledger.insert(
            (0, Metric::Impressions),
            LedgerEntry {
                acked: 100,
                unknown: 0,
            },
        );
        let before = [
            totals(&[("cus_a", Metric::Impressions, 5)]),
            totals(&[]),
            totals(&[]),
        ];
        let grown = |extra: u64| {
            [
                totals(&[("cus_a", Metric::Impressions, 105 + extra)]),
                totals(&[("cus_a", Metric::Impressions, 100)]),
                totals(&[("cus_a", Metric::Impressions, 100)]),
            ]
        };
        let verdict = compare(&customers(), &ledger, &before, &grown(0));
        assert!(verdict.passed, "{verdict:?}");
        assert_eq!(verdict.compared, 6);

        // One unit too many in Postgres: a failure that waiting cannot fix.
        let verdict = compare(&customers(), &ledger, &before, &grown(1));
        assert!(!verdict.passed);
        assert_eq!(verdict.differences.len(), 1);
        assert_eq!(verdict.differences[0].store, "postgres");
        assert_eq!(verdict.differences[0].stored, 101);
        assert!(!may_catch_up(&verdict));

        // A store behind may still catch up.
        let verdict = compare(&customers(), &ledger, &before, &before.clone());
        assert!(!verdict.passed);
        assert!(may_catch_up(&verdict));
    }

    #[test]
    fn unknown_outcomes_fail_the_check() {
        let mut ledger = Ledger::new();
        ledger.insert(
            (1, Metric::ApiCalls),
            LedgerEntry {
                acked: 0,
                unknown: 3,
            },
        );
        let empty = [totals(&[]), totals(&[]), totals(&[])];
        let verdict = compare(&customers(), &ledger, &empty, &empty);
        assert!(!verdict.passed);
        assert_eq!(verdict.differences.len(), 3);
        assert!(!may_catch_up(&verdict));
    }

    #[test]
    fn the_backlog_is_summed_over_stores() {
        let page = "# TYPE apex_pipeline_wal_backlog_bytes gauge\n\
            apex_pipeline_wal_backlog_bytes{store=\"postgres\"} 0\n\
            apex_pipeline_wal_backlog_bytes{store=\"clickhouse\"} 1234\n\
            apex_pipeline_wal_backlog_bytes_other 99\n";
        assert_eq!(parse_backlog(page), Some(1234));
        assert_eq!(parse_backlog("apex_ingest_requests_total 3\n"), None);
    }
}
