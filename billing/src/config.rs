//! Billing configuration from the environment: Stripe and the email provider. Values are
//! checked at start-up so a typo stops the process with one line, not a failed job at 2 AM.

use apex_pipeline::env::{ConfigError, EnvSource, check_url_scheme};

/// Which service sends email.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EmailProvider {
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

/// Billing settings. Secrets are kept out of `Debug`.
#[derive(Clone)]
pub struct BillingConfig {
    /// `STRIPE_SECRET_KEY`: `sk_...` or `rk_...`; Stripe work refuses to run without it.
    pub stripe_secret_key: Option<String>,
    /// `STRIPE_API_BASE`, default `https://api.stripe.com`.
    pub stripe_api_base: String,
    /// `EMAIL_PROVIDER`, default `log`.
    pub email_provider: EmailProvider,
    /// `RESEND_API_KEY`: `re_...`, required when the provider is Resend.
    pub resend_api_key: Option<String>,
}

impl std::fmt::Debug for BillingConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BillingConfig")
            .field(
                "stripe_secret_key",
                &self.stripe_secret_key.as_ref().map(|_| "***"),
            )
            .field("stripe_api_base", &self.stripe_api_base)
            .field("email_provider", &self.email_provider)
            .field(
                "resend_api_key",
                &self.resend_api_key.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

impl BillingConfig {
    /// Reads and validates the billing settings.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let stripe_secret_key = env.optional("STRIPE_SECRET_KEY");
        if stripe_secret_key
            .as_ref()
            .is_some_and(|k| !(k.starts_with("sk_") || k.starts_with("rk_")))
        {
            return Err(ConfigError::Invalid {
                name: "STRIPE_SECRET_KEY",
                reason: "must start with sk_ or rk_".to_owned(),
            });
        }
        let stripe_api_base = env
            .optional("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".to_owned());
        check_url_scheme(
            "STRIPE_API_BASE",
            &stripe_api_base,
            &["https://", "http://"],
        )?;
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
            stripe_secret_key,
            stripe_api_base,
            email_provider,
            resend_api_key,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_nothing() {
        let cfg = BillingConfig::from_env(&EnvSource::from_pairs([])).unwrap();
        assert_eq!(cfg.email_provider, EmailProvider::Log);
        assert_eq!(cfg.stripe_api_base, "https://api.stripe.com");
    }

    #[test]
    fn bad_values_name_their_variable() {
        for pairs in [
            vec![("STRIPE_SECRET_KEY", "pk_live_123")],
            vec![("STRIPE_API_BASE", "api.stripe.com")],
            vec![("EMAIL_PROVIDER", "sendgrid")],
            vec![("RESEND_API_KEY", "abc")],
            vec![("EMAIL_PROVIDER", "resend")],
        ] {
            let name = if pairs[0].1 == "resend" {
                "RESEND_API_KEY"
            } else {
                pairs[0].0
            };
            let err = BillingConfig::from_env(&EnvSource::from_pairs(pairs)).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug() {
        let cfg = BillingConfig::from_env(&EnvSource::from_pairs([
            ("STRIPE_SECRET_KEY", "sk_test_secretvalue"),
            ("EMAIL_PROVIDER", "resend"),
            ("RESEND_API_KEY", "re_secretvalue"),
        ]))
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secretvalue"), "{shown}");
    }
}
