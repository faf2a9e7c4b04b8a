//! `apex-cron` configuration: one typed struct from environment variables, with defaults and
//! validation, so a bad value (a cron expression that does not parse, an override of a job
//! that does not exist) stops start-up with one line naming it (exit status 2).

use std::net::SocketAddr;
use std::time::Duration;

use apex_core::env::{ConfigError, EnvSource};
use apex_core::stores::StoreConfig;
use apex_stripe::config::StripeConfig;

use crate::clock::Clock;
use apex_billing::invoices::CloseSettings;
use apex_notify::config::EmailConfig;

use crate::jobs::{Job, Retention, jobs_from_env};

/// Everything `apex-cron` reads from the environment.
#[derive(Debug, Clone)]
pub struct CronConfig {
    /// `APEX_CRON_LISTEN`, default `127.0.0.1:9464`: `/healthz` and `/metrics`.
    pub listen: SocketAddr,
    /// The stores (`DATABASE_URL`, `CLICKHOUSE_URL`, ...).
    pub stores: StoreConfig,
    /// Stripe (`STRIPE_SECRET_KEY`, `STRIPE_API_BASE`).
    pub stripe: StripeConfig,
    /// `APEX_STRIPE_RATE`, default 50: Stripe requests per second at most.
    pub stripe_rate: f64,
    /// The jobs with their schedules (`APEX_CRON_SCHEDULE_<JOB>`) and timeouts
    /// (`APEX_CRON_TIMEOUT_SECS_<JOB>`), and test jobs (`APEX_CRON_TEST_JOBS`).
    pub jobs: Vec<Job>,
    /// Maintenance's horizons (`APEX_CRON_MARKER_RETENTION_DAYS`, `APEX_CRON_HISTORY_DAYS`).
    pub retention: Retention,
    /// The invoice close's revenue wait (`APEX_INVOICE_REVENUE_WAIT_DAYS`).
    pub invoicing: CloseSettings,
    /// The email provider, sender, caps (`EMAIL_*`, `RESEND_*`, `SMTP_URL`).
    pub email: EmailConfig,
    /// The dunning retry schedule (`APEX_DUNNING_RETRY_DAYS`, `APEX_DUNNING_POSTPONE_SECS`),
    /// checked at start.
    pub dunning: apex_billing::dunning::Policy,
    /// The usage alert thresholds (`APEX_USAGE_ALERT_THRESHOLDS`), checked at start.
    pub alert_thresholds: apex_billing::alerts::Thresholds,
    /// `APEX_CRON_SHUTDOWN_GRACE_MS`, default 30,000: how long runs in flight get at SIGTERM.
    pub shutdown_grace: Duration,
    /// `APEX_MIGRATE_ON_START`, default true: apply pending migrations before scheduling.
    pub migrate_on_start: bool,
    /// The clock (`APEX_CLOCK_START`, `APEX_CLOCK_SPEED`, `APEX_CLOCK_EPOCH`).
    pub clock: Clock,
}

impl CronConfig {
    /// Reads and validates the configuration.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let stores = StoreConfig::from_env(env)?;
        let listen = env.parse_or("APEX_CRON_LISTEN", SocketAddr::from(([127, 0, 0, 1], 9464)))?;
        let stripe = StripeConfig::from_env(env)?;
        let stripe_rate: f64 = env.parse_or("APEX_STRIPE_RATE", 50.0)?;
        if !(stripe_rate.is_finite() && stripe_rate > 0.0 && stripe_rate <= 100.0) {
            return Err(ConfigError::Invalid {
                name: "APEX_STRIPE_RATE",
                reason: "must be above 0 and at most 100 (Stripe's limit)".to_owned(),
            });
        }
        let jobs = jobs_from_env(env)?;
        let retention = Retention {
            marker_days: days(env, "APEX_CRON_MARKER_RETENTION_DAYS", 7)?,
            history_days: days(env, "APEX_CRON_HISTORY_DAYS", 90)?,
        };
        let grace_ms: u64 = env.parse_or("APEX_CRON_SHUTDOWN_GRACE_MS", 30_000)?;
        Ok(Self {
            listen,
            stores,
            stripe,
            stripe_rate,
            jobs,
            retention,
            invoicing: CloseSettings::from_env(env)?,
            email: EmailConfig::from_env(env)?,
            dunning: apex_billing::dunning::Policy::from_env(env)?,
            alert_thresholds: apex_billing::alerts::Thresholds::from_env(env)?,
            shutdown_grace: Duration::from_millis(grace_ms),
            migrate_on_start: env.parse_or("APEX_MIGRATE_ON_START", true)?,
            clock: Clock::from_env(env)?,
        })
    }
}

fn days(env: &EnvSource, name: &'static str, default: i64) -> Result<i64, ConfigError> {
    let days = env.parse_or(name, default)?;
    if !(1..=3_650).contains(&days) {
        return Err(ConfigError::Invalid {
            name,
            reason: "must be 1 to 3650 days".to_owned(),
        });
    }
    Ok(days)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(extra: &[(&'static str, &'static str)]) -> EnvSource {
        let mut pairs = vec![
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:15432/apex"),
            ("CLICKHOUSE_URL", "http://127.0.0.1:18123"),
        ];
        pairs.extend_from_slice(extra);
        EnvSource::from_pairs(pairs)
    }

    #[test]
    fn defaults() {
        let cfg = CronConfig::from_env(&env(&[])).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:9464");
        assert_eq!(
            (cfg.retention.marker_days, cfg.retention.history_days),
            (7, 90)
        );
        assert_eq!(cfg.clock, Clock::Wall);
        assert_eq!(cfg.jobs.len(), 9);
        assert_eq!(cfg.invoicing.revenue_wait.num_days(), 5);
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (name, value) in [
            ("APEX_CRON_LISTEN", "localhost"),
            ("APEX_STRIPE_RATE", "0"),
            ("APEX_CRON_HISTORY_DAYS", "0"),
            ("APEX_CRON_MARKER_RETENTION_DAYS", "x"),
            ("APEX_CRON_SHUTDOWN_GRACE_MS", "-5"),
            ("APEX_CRON_SCHEDULE_STRIPE_SYNC", "0 25 * * *"),
            ("APEX_CLOCK_START", "noon"),
            ("APEX_INVOICE_REVENUE_WAIT_DAYS", "29"),
        ] {
            let err = CronConfig::from_env(&env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(name), "{name}={value}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }
}
