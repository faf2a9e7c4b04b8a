//! `apexctl`'s settings: the cron process's ([`apex_cron::config::CronConfig`]: the stores,
//! Stripe, the jobs with their schedules, the clock) and the email provider's, all checked
//! before any command runs, so a typo shows up at the first command an operator runs, not in
//! a nightly job. The email settings move to the email crate when the sender lands; until
//! then they are only checked.

use apex_core::env::{ConfigError, EnvSource};
use apex_cron::config::CronConfig;

/// Which service sends email (`EMAIL_PROVIDER`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum EmailProvider {
    /// Resend's HTTP API (`RESEND_API_KEY` required).
    Resend,
    /// An SMTP relay (Amazon SES speaks SMTP too).
    Smtp,
    /// No delivery: emails are logged and recorded, for development.
    Log,
}

impl std::str::FromStr for EmailProvider {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "resend" => Ok(EmailProvider::Resend),
            "smtp" => Ok(EmailProvider::Smtp),
            "log" => Ok(EmailProvider::Log),
            _ => Err("expected resend, smtp or log".to_owned()),
        }
    }
}

/// Everything `apexctl` reads besides the stores. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub(crate) struct CtlConfig {
    /// The stores, Stripe, the jobs and the clock, as the cron process reads them.
    pub(crate) cron: CronConfig,
    /// `EMAIL_PROVIDER`, default `log`.
    pub(crate) email_provider: EmailProvider,
    /// `RESEND_API_KEY`: `re_...`, required when the provider is Resend.
    pub(crate) resend_api_key: Option<String>,
}

impl std::fmt::Debug for CtlConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CtlConfig")
            .field("cron", &self.cron)
            .field("email_provider", &self.email_provider)
            .field(
                "resend_api_key",
                &self.resend_api_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl CtlConfig {
    /// Reads and validates the settings.
    pub(crate) fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let cron = CronConfig::from_env(env)?;
        let email_provider = env.parse_or("EMAIL_PROVIDER", EmailProvider::Log)?;
        let resend_api_key = env.optional("RESEND_API_KEY");
        if resend_api_key
            .as_ref()
            .is_some_and(|k| !k.starts_with("re_"))
        {
            return Err(ConfigError::Invalid {
                name: "RESEND_API_KEY",
                reason: "must start with re_".to_owned(),
            });
        }
        if email_provider == EmailProvider::Resend && resend_api_key.is_none() {
            return Err(ConfigError::Missing {
                name: "RESEND_API_KEY",
                hint: ": EMAIL_PROVIDER=resend needs it".to_owned(),
            });
        }
        Ok(Self {
            cron,
            email_provider,
            resend_api_key,
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
        assert_eq!(cfg.email_provider, EmailProvider::Log);
        assert_eq!(cfg.cron.stripe.api_base, "https://api.stripe.com");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for pairs in [
            vec![("STRIPE_SECRET_KEY", "pk_live_123")],
            vec![("STRIPE_API_BASE", "api.stripe.com")],
            vec![("EMAIL_PROVIDER", "sendgrid")],
            vec![("RESEND_API_KEY", "abc")],
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
