//! What every request handler can reach: the stores, the key cache, the dedup table, the sink,
//! the limits (sizes and per-customer rates) and the secrets. Built once by [`crate::server::run_with_sink`].

use std::sync::Arc;

use apex_pipeline::sink::RecordSink;
use sqlx::PgPool;

use crate::config::{IngestLimits, Secret};
use crate::dedup::Dedup;
use crate::keycache::KeyCache;
use crate::ratelimit::RateLimits;

/// What every request handler can reach.
pub struct AppState {
    /// Postgres pool.
    pub pool: PgPool,
    /// API key cache.
    pub keys: Arc<KeyCache>,
    /// Event ids seen recently.
    pub dedup: Arc<Dedup>,
    /// Where accepted records go.
    pub sink: Arc<dyn RecordSink>,
    /// Request limits.
    pub limits: IngestLimits,
    /// Per-customer rate limits of the ingest endpoints.
    pub rate_limits: Arc<RateLimits>,
    /// The 429s of the rate limit being held before they are sent.
    pub holds: crate::ratelimit::RefusalHolds,
    /// ClickHouse, for the dashboard's analytics.
    pub clickhouse: clickhouse::Client,
    /// Secret of dashboard JWTs.
    pub jwt_secret: Secret,
    /// Token of the admin endpoints; `None` turns them off.
    pub admin_token: Option<Secret>,
    /// Stripe webhook endpoint secrets (two during a rotation); none turns webhooks off.
    pub stripe_webhook_secrets: Vec<Secret>,
    /// Resend (Svix) webhook endpoint secrets (two during a rotation); none turns them off.
    pub resend_webhook_secrets: Vec<Secret>,
    /// The dunning retry schedule Stripe's failed-payment events open cases on.
    pub dunning: apex_billing::dunning::Policy,
}
