//! `apexctl`'s settings: the cron process's ([`apex_cron::config::CronConfig`]: the stores,
//! Stripe, the email provider, the jobs with their schedules, the clock), all checked before
//! any command runs, so a typo shows up at the first command an operator runs, not in a
//! nightly job.

use apex_core::env::{ConfigError, EnvSource};
use apex_cron::config::CronConfig;

/// Everything `apexctl` reads besides its arguments. Secrets are kept out of `Debug`.
#[derive(Debug, Clone)]
pub(crate) struct CtlConfig {
    /// The stores, Stripe, email, the jobs and the clock, as the cron process reads them.
    pub(crate) cron: CronConfig,
}

impl CtlConfig {
    /// Reads and validates the settings.
    pub(crate) fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        Ok(Self {
            cron: CronConfig::from_env(env)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_stores<'a>(pairs: Vec<(&'a str, &'a str)>) -> EnvSource {
        let mut all = vec![
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:15432/apex"),
            ("CLICKHOUSE_URL", "http://127.0.0.1:18123"),
        ];
        all.extend(pairs);
        EnvSource::from_pairs(all)
    }

    #[test]
    fn defaults_need_only_the_stores() {
        let cfg = CtlConfig::from_env(&with_stores(vec![])).unwrap();
        assert_eq!(cfg.cron.email.provider.name(), "unset");
        assert_eq!(cfg.cron.stripe.api_base, "https://api.stripe.com");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for pairs in [
            vec![("STRIPE_SECRET_KEY", "pk_live_123")],
            vec![("STRIPE_API_BASE", "api.stripe.com")],
            vec![("EMAIL_PROVIDER", "sendgrid")],
            vec![("EMAIL_PROVIDER", "resend"), ("RESEND_API_KEY", "abc")],
            vec![("EMAIL_PROVIDER", "resend")],
            vec![("APEX_CRON_SCHEDULE_STRIPE_SYNC", "never")],
            vec![("APEX_CLOCK_START", "soon")],
        ] {
            let name = if pairs[0].1 == "resend" {
                "RESEND_API_KEY"
            } else {
                pairs[0].0
            };
            let err = CtlConfig::from_env(&with_stores(pairs)).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let cfg = CtlConfig::from_env(&with_stores(vec![
            ("STRIPE_SECRET_KEY", "sk_test_secretvalue"),
            ("EMAIL_PROVIDER", "resend"),
            ("RESEND_API_KEY", "re_secretvalue"),
        ]))
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secretvalue"), "{shown}");
    }
}
