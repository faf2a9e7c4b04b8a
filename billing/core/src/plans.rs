//! The plan catalogue: per-metric included quantities and overage prices, and the
//! platform-fee rate and revenue band of each plan (seeded from the operations guide).

use serde::{Deserialize, Serialize};
use sqlx::{PgConnection, PgExecutor};

use crate::error::BillingError;

/// Included quantity and overage price of one metric.
#[derive(Debug, Clone, Serialize, Deserialize, sqlx::FromRow)]
pub struct PlanLimit {
    /// `impressions`, `api_calls` or `data_transfer` (bytes).
    pub metric_type: String,
    /// Included per billing period; `None` means unlimited.
    pub included_quantity: Option<i64>,
    /// Overage is priced per block of this many units.
    pub overage_unit_quantity: i64,
    /// Price of one overage block, in cents.
    pub overage_cents_per_unit: i64,
}

/// A plan with its limits.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// `starter`, `growth`, `scale`, `enterprise`.
    pub id: String,
    /// Display name.
    pub name: String,
    /// Fixed monthly price, cents (0 for every seeded plan).
    pub monthly_base_cents: i64,
    /// Default platform fee in basis points (250 = 2.5 %).
    pub platform_fee_bps: i32,
    /// Lowest negotiable platform fee.
    pub platform_fee_bps_min: i32,
    /// Highest negotiable platform fee.
    pub platform_fee_bps_max: i32,
    /// Monthly mediated revenue the plan is meant for, in cents.
    pub revenue_band_min_cents: i64,
    /// Upper end of the band; `None` means no upper bound.
    pub revenue_band_max_cents: Option<i64>,
    /// Default trial length for sign-ups.
    pub trial_days: i32,
    /// Per-metric limits.
    pub limits: Vec<PlanLimit>,
}

#[derive(sqlx::FromRow)]
struct PlanRow {
    id: String,
    name: String,
    monthly_base_cents: i64,
    platform_fee_bps: i32,
    platform_fee_bps_min: i32,
    platform_fee_bps_max: i32,
    revenue_band_min_cents: i64,
    revenue_band_max_cents: Option<i64>,
    trial_days: i32,
}

#[derive(sqlx::FromRow)]
struct LimitRow {
    plan_id: String,
    #[sqlx(flatten)]
    limit: PlanLimit,
}

/// Every plan, by ascending revenue band, with its limits in metric order (two reads on
/// `conn`, which may be in a transaction).
pub async fn list_plans(conn: &mut PgConnection) -> Result<Vec<Plan>, BillingError> {
    let plans: Vec<PlanRow> = sqlx::query_as(
        "SELECT id, name, monthly_base_cents, platform_fee_bps, platform_fee_bps_min, platform_fee_bps_max, \
         revenue_band_min_cents, revenue_band_max_cents, trial_days \
         FROM plans ORDER BY revenue_band_min_cents, id",
    )
    .fetch_all(&mut *conn)
    .await?;
    let limits: Vec<LimitRow> = sqlx::query_as(
        "SELECT plan_id, metric_type, included_quantity, overage_unit_quantity, overage_cents_per_unit \
         FROM plan_limits ORDER BY plan_id, array_position(ARRAY['impressions','api_calls','data_transfer'], metric_type)",
    )
    .fetch_all(&mut *conn)
    .await?;
    Ok(plans
        .into_iter()
        .map(|p| Plan {
            limits: limits
                .iter()
                .filter(|l| l.plan_id == p.id)
                .map(|l| l.limit.clone())
                .collect(),
            id: p.id,
            name: p.name,
            monthly_base_cents: p.monthly_base_cents,
            platform_fee_bps: p.platform_fee_bps,
            platform_fee_bps_min: p.platform_fee_bps_min,
            platform_fee_bps_max: p.platform_fee_bps_max,
            revenue_band_min_cents: p.revenue_band_min_cents,
            revenue_band_max_cents: p.revenue_band_max_cents,
            trial_days: p.trial_days,
        })
        .collect())
}

/// The default trial length of `plan_id` in days, or `None` for a plan not in the catalogue.
pub async fn trial_days(
    db: impl PgExecutor<'_>,
    plan_id: &str,
) -> Result<Option<i32>, BillingError> {
    Ok(
        sqlx::query_scalar("SELECT trial_days FROM plans WHERE id = $1")
            .bind(plan_id)
            .fetch_optional(db)
            .await?,
    )
}
