//! Reconciliation of one billing period across the stores and Stripe: per customer, metric and
//! UTC day, the ClickHouse raw events, the ClickHouse daily rollup, the Postgres hourly rollups,
//! the quantity reported to Stripe and (optionally) Stripe's meter event summaries; per
//! customer, our invoice against Stripe's and against the preview. (Being built: issue 18.)

use apex_billing::pricing::Period;
use chrono::{DateTime, Utc};
use serde::Serialize;
use sqlx::PgPool;

use crate::client::StripeClient;

/// What to reconcile.
#[derive(Debug, Clone)]
pub struct Request {
    /// The billing period (a calendar month in UTC).
    pub period: Period,
    /// Only this customer (our id, `cus_...`).
    pub customer: Option<String>,
    /// The time of the run: days after it, or not yet due for the sync, are `unsynced`.
    pub now: DateTime<Utc>,
}

/// The verdict on one pair of figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Verdict {
    /// Both sides agree.
    Ok,
    /// They differ by `difference`.
    Drift,
    /// The later side is not due yet, or still pending: not drift.
    Unsynced,
}

/// One compared pair.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    /// Customer id.
    pub customer_id: String,
    /// The metric, or `None` for an invoice comparison.
    pub metric_type: Option<String>,
    /// The UTC day (`YYYY-MM-DD`), or `None` for a per-period comparison.
    pub day: Option<String>,
    /// Which two figures, e.g. `raw_events/clickhouse_daily`.
    pub check: String,
    /// The first figure (units, or cents for invoices).
    pub left: i128,
    /// The second figure.
    pub right: i128,
    /// `right - left`.
    pub difference: i128,
    /// The verdict.
    pub verdict: Verdict,
}

/// The whole comparison.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Every pair compared.
    pub pairs: Vec<Pair>,
}

impl Report {
    /// The pairs that drifted.
    pub fn drifts(&self) -> impl Iterator<Item = &Pair> {
        self.pairs.iter().filter(|p| p.verdict == Verdict::Drift)
    }

    /// True when nothing drifted.
    pub fn is_clean(&self) -> bool {
        self.drifts().next().is_none()
    }
}

/// Compares the stores (and Stripe, when `stripe` is given) over `request`'s period.
pub async fn reconcile(
    _pool: &PgPool,
    _stores: &apex_core::stores::StoreConfig,
    _stripe: Option<&StripeClient>,
    _request: &Request,
) -> Result<Report, crate::StripeWorkError> {
    Err(crate::StripeWorkError::Invalid(
        "reconcile is not built yet".into(),
    ))
}
