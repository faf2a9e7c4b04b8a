//! Stripe settings from the environment (`STRIPE_SECRET_KEY`, `STRIPE_API_BASE`), checked
//! at start-up so a typo stops the process with one line, not a failed job at 2 AM.

use apex_core::env::{ConfigError, EnvSource, check_url_scheme};

/// Where Stripe is and the key to it. The key is kept out of `Debug`.
#[derive(Clone)]
pub struct StripeConfig {
    /// `STRIPE_SECRET_KEY`: `sk_...` or `rk_...`; Stripe work refuses to run without it.
    pub secret_key: Option<String>,
    /// `STRIPE_API_BASE`, default `https://api.stripe.com` (a loopback stand-in in tests).
    pub api_base: String,
}

impl std::fmt::Debug for StripeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeConfig")
            .field("secret_key", &self.secret_key.as_ref().map(|_| "***"))
            .field("api_base", &self.api_base)
            .finish()
    }
}

impl StripeConfig {
    /// Reads and validates the Stripe settings; none is required until Stripe work runs.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let secret_key = env.optional("STRIPE_SECRET_KEY");
        if secret_key
            .as_ref()
            .is_some_and(|k| !(k.starts_with("sk_") || k.starts_with("rk_")))
        {
            return Err(ConfigError::Invalid {
                name: "STRIPE_SECRET_KEY",
                reason: "must start with sk_ or rk_".to_owned(),
            });
        }
        let api_base = env
            .optional("STRIPE_API_BASE")
            .unwrap_or_else(|| "https://api.stripe.com".to_owned());
        check_url_scheme("STRIPE_API_BASE", &api_base, &["https://", "http://"])?;
        Ok(Self {
            secret_key,
            api_base,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_need_nothing() {
        let cfg = StripeConfig::from_env(&EnvSource::from_pairs([])).unwrap();
        assert_eq!(cfg.api_base, "https://api.stripe.com");
        assert!(cfg.secret_key.is_none());
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (name, value) in [
            ("STRIPE_SECRET_KEY", "pk_live_123"),
            ("STRIPE_API_BASE", "api.stripe.com"),
        ] {
            let err = StripeConfig::from_env(&EnvSource::from_pairs([(name, value)])).unwrap_err();
            assert!(err.to_string().starts_with(name), "{err}");
        }
    }

    #[test]
    fn the_key_stays_out_of_debug() {
        let cfg = StripeConfig::from_env(&EnvSource::from_pairs([(
            "STRIPE_SECRET_KEY",
            "sk_test_secretvalue",
        )]))
        .unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secretvalue"), "{shown}");
    }
}
