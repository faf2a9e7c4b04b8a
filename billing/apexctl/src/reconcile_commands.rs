//! `apexctl reconcile`: one period compared across the stores and Stripe
//! ([`apex_stripe::reconcile`]), printed as a table or JSON; exit 1 on any drift. (Being built:
//! issue 18.)

use std::process::ExitCode;

use clap::Args;

use crate::config::CtlConfig;

/// `apexctl reconcile --period YYYY-MM [--customer C] [--stripe] [--json]`.
#[derive(Args)]
pub(crate) struct ReconcileArgs {
    /// The billing period, `YYYY-MM` (UTC).
    #[arg(long)]
    pub(crate) period: String,
    /// Only this customer (`cus_...`).
    #[arg(long)]
    pub(crate) customer: Option<String>,
    /// Also compare with Stripe's own meter event summaries and invoices.
    #[arg(long)]
    pub(crate) stripe: bool,
    /// Print JSON.
    #[arg(long)]
    pub(crate) json: bool,
}

pub(crate) async fn run(
    _args: ReconcileArgs,
    _ctl: &CtlConfig,
    _pool: &sqlx::PgPool,
    _now: chrono::DateTime<chrono::Utc>,
) -> anyhow::Result<ExitCode> {
    anyhow::bail!("reconcile is not built yet")
}
