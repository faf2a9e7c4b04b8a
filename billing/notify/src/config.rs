//! Email settings from the environment (`EMAIL_*`, `RESEND_*`, `SMTP_URL`), checked at start-up
//! so a typo stops the process with one line naming the variable (the binaries exit 2 with
//! it), not a failed email hours later; and [`build_provider`], the provider they choose.
//!
//! | variable | default | rule |
//! | --- | --- | --- |
//! | `EMAIL_PROVIDER` | unset: nothing is sent, emails stay queued | `resend`, `smtp` or `file` |
//! | `RESEND_API_KEY` | none | `re_...`; required for `resend` |
//! | `RESEND_BASE_URL` | `https://api.resend.com` | an http(s) URL |
//! | `RESEND_RATE` | `2` | requests a second, above 0 and at most 100 |
//! | `SMTP_URL` | none | see [`SmtpSettings::from_url`]; required for `smtp` |
//! | `EMAIL_FILE_DIR` | `.apex/mail` | a folder, created if missing |
//! | `EMAIL_FROM` | `noreply@apexmediation.com` | an address (`Name <a@b.c>` too) |
//! | `EMAIL_DAILY_CAP`, `EMAIL_MONTHLY_CAP` | no cap | whole numbers above 0 |
//! | `EMAIL_UNSUBSCRIBE_URL` | `https://app.apexmediation.com/settings/email` | an http(s) URL without `?` or `#` |
//!
//! Only the chosen provider's variables are read: `RESEND_API_KEY` left over from another
//! setup does not stop a `file` deployment. Secrets (the API key, the SMTP password) never
//! appear in `Debug` or in an error.

use std::path::PathBuf;
use std::str::FromStr;

use apex_core::env::{ConfigError, EnvSource, check_url_scheme};

use crate::message::EmailProvider;
use crate::provider::file::FileProvider;
use crate::provider::resend::{ResendProvider, ResendSettings};
use crate::provider::smtp::{SmtpProvider, SmtpSettings};

/// `EMAIL_FROM` when unset.
pub const DEFAULT_FROM: &str = "noreply@apexmediation.com";
/// `RESEND_BASE_URL` when unset.
pub const DEFAULT_RESEND_BASE_URL: &str = "https://api.resend.com";
/// `RESEND_RATE` when unset: requests a second, Resend's documented default limit per team
/// (its usage-limits page; a team can ask for more, and then raises this).
pub const DEFAULT_RESEND_RATE: f64 = 2.0;
/// The highest `RESEND_RATE` accepted: far above any plan, so a larger value is a typo.
pub const MAX_RESEND_RATE: f64 = 100.0;
/// `EMAIL_FILE_DIR` when unset (relative to the working directory).
pub const DEFAULT_FILE_DIR: &str = ".apex/mail";
/// `EMAIL_UNSUBSCRIBE_URL` when unset.
pub const DEFAULT_UNSUBSCRIBE_URL: &str = "https://app.apexmediation.com/settings/email";

/// The provider and its own settings.
#[derive(Debug, Clone, PartialEq)]
pub enum ProviderSettings {
    /// `EMAIL_PROVIDER=resend`: Resend's HTTP API.
    Resend(ResendSettings),
    /// `EMAIL_PROVIDER=smtp`: any SMTP relay (Amazon SES among them).
    Smtp(SmtpSettings),
    /// `EMAIL_PROVIDER=file`: `.eml` files in a folder, for development (`scripts/dev.sh`
    /// sets it).
    File {
        /// `EMAIL_FILE_DIR`.
        dir: PathBuf,
    },
    /// `EMAIL_PROVIDER` unset: nothing is sent, and the queue keeps every email until it is
    /// set. No default provider: a production process that forgot the setting must not turn
    /// customers' emails into local files (or drop them).
    Unset,
}

impl ProviderSettings {
    /// The provider's name, as [`EmailProvider::name`] says it.
    pub fn name(&self) -> &'static str {
        match self {
            ProviderSettings::Resend(_) => "resend",
            ProviderSettings::Smtp(_) => "smtp",
            ProviderSettings::File { .. } => "file",
            ProviderSettings::Unset => "unset",
        }
    }
}

/// Everything the email queue needs from the environment. `Debug` shows no secret.
#[derive(Debug, Clone, PartialEq)]
pub struct EmailConfig {
    /// `EMAIL_PROVIDER` and its settings.
    pub provider: ProviderSettings,
    /// `EMAIL_FROM`: the sender, checked to parse as an address; its domain is the right
    /// side of every SMTP `Message-ID`.
    pub from: String,
    /// `EMAIL_DAILY_CAP`: emails a UTC day through the provider at most; `None` is no cap.
    pub daily_cap: Option<i64>,
    /// `EMAIL_MONTHLY_CAP`: emails a UTC month at most; `None` is no cap.
    pub monthly_cap: Option<i64>,
    /// `EMAIL_UNSUBSCRIBE_URL`: the unsubscribe page, without a query (the queue appends
    /// `?customer=...&category=...`).
    pub unsubscribe_url: String,
}

impl EmailConfig {
    /// Reads and checks the email settings. Errors: a [`ConfigError`] naming the first
    /// variable that is missing (`RESEND_API_KEY` for `resend`, `SMTP_URL` for `smtp`) or
    /// invalid.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let provider = match env
            .optional("EMAIL_PROVIDER")
            .map(|p| p.to_ascii_lowercase())
            .as_deref()
        {
            None => ProviderSettings::Unset,
            Some("file") => ProviderSettings::File {
                dir: PathBuf::from(
                    env.optional("EMAIL_FILE_DIR")
                        .unwrap_or_else(|| DEFAULT_FILE_DIR.to_owned()),
                ),
            },
            Some("resend") => ProviderSettings::Resend(resend_from_env(env)?),
            Some("smtp") => {
                let url = env.required_with_hint(
                    "SMTP_URL",
                    "EMAIL_PROVIDER=smtp needs smtp(s)://user:pass@host:port",
                )?;
                ProviderSettings::Smtp(SmtpSettings::from_url(&url).map_err(|reason| {
                    ConfigError::Invalid {
                        name: "SMTP_URL",
                        reason,
                    }
                })?)
            }
            Some(other) => {
                return Err(ConfigError::Invalid {
                    name: "EMAIL_PROVIDER",
                    reason: format!("{other:?}: must be resend, smtp or file"),
                });
            }
        };
        let from = env
            .optional("EMAIL_FROM")
            .unwrap_or_else(|| DEFAULT_FROM.to_owned());
        lettre::message::Mailbox::from_str(&from).map_err(|e| ConfigError::Invalid {
            name: "EMAIL_FROM",
            reason: format!("{from:?} is not an email address: {e}"),
        })?;
        let unsubscribe_url = env
            .optional("EMAIL_UNSUBSCRIBE_URL")
            .unwrap_or_else(|| DEFAULT_UNSUBSCRIBE_URL.to_owned());
        check_url_scheme(
            "EMAIL_UNSUBSCRIBE_URL",
            &unsubscribe_url,
            &["https://", "http://"],
        )?;
        // It goes inside `<...>` of a header and gets a query appended, so neither a query
        // of its own nor anything that could end the header is allowed.
        if unsubscribe_url
            .chars()
            .any(|c| matches!(c, '?' | '#' | '<' | '>' | '"') || !c.is_ascii_graphic())
        {
            return Err(ConfigError::Invalid {
                name: "EMAIL_UNSUBSCRIBE_URL",
                reason: "must be a plain URL: no query, fragment, spaces or angle brackets".into(),
            });
        }
        Ok(Self {
            provider,
            from,
            daily_cap: cap(env, "EMAIL_DAILY_CAP")?,
            monthly_cap: cap(env, "EMAIL_MONTHLY_CAP")?,
            unsubscribe_url,
        })
    }
}

fn resend_from_env(env: &EnvSource) -> Result<ResendSettings, ConfigError> {
    let api_key = env.required_with_hint(
        "RESEND_API_KEY",
        "EMAIL_PROVIDER=resend needs an API key (re_...)",
    )?;
    // The reason never repeats the value: it is a secret.
    if !api_key.starts_with("re_") || !api_key.chars().all(|c| c.is_ascii_graphic()) {
        return Err(ConfigError::Invalid {
            name: "RESEND_API_KEY",
            reason: "must start with re_ and have no spaces".into(),
        });
    }
    let base_url = env
        .optional("RESEND_BASE_URL")
        .unwrap_or_else(|| DEFAULT_RESEND_BASE_URL.to_owned());
    check_url_scheme("RESEND_BASE_URL", &base_url, &["https://", "http://"])?;
    let parsed = url::Url::parse(&base_url).map_err(|e| ConfigError::Invalid {
        name: "RESEND_BASE_URL",
        reason: format!("{base_url:?}: {e}"),
    })?;
    if parsed.query().is_some() || parsed.fragment().is_some() {
        return Err(ConfigError::Invalid {
            name: "RESEND_BASE_URL",
            reason: "must have no query or fragment (`/emails` is appended)".into(),
        });
    }
    let rate: f64 = env.parse_or("RESEND_RATE", DEFAULT_RESEND_RATE)?;
    if !(rate.is_finite() && rate > 0.0 && rate <= MAX_RESEND_RATE) {
        return Err(ConfigError::Invalid {
            name: "RESEND_RATE",
            reason: format!(
                "{rate}: must be above 0 and at most {MAX_RESEND_RATE} requests a second"
            ),
        });
    }
    Ok(ResendSettings {
        api_key,
        base_url: base_url.trim_end_matches('/').to_owned(),
        requests_per_second: rate,
        ..ResendSettings::default()
    })
}

/// An optional cap: unset is no cap, 0 or less is refused (a cap of 0 would hold every
/// email forever, which is what leaving `EMAIL_PROVIDER` at `file` is for).
fn cap(env: &EnvSource, name: &'static str) -> Result<Option<i64>, ConfigError> {
    match env.optional(name) {
        None => Ok(None),
        Some(_) => {
            let value: i64 = env.parse_or(name, 0)?;
            if value <= 0 {
                return Err(ConfigError::Invalid {
                    name,
                    reason: format!("{value}: must be a whole number above 0 (unset for no cap)"),
                });
            }
            Ok(Some(value))
        }
    }
}

/// The provider `config` chooses, ready to send. Call it inside the tokio runtime that will
/// send (the SMTP provider's connection pool starts a task there). Errors: a [`ConfigError`]
/// naming the variable when the provider cannot be set up (`EMAIL_FILE_DIR` cannot be
/// created, the TLS settings of `SMTP_URL` are refused or there is no runtime,
/// `RESEND_API_KEY` is not a valid header).
pub fn build_provider(config: &EmailConfig) -> Result<Box<dyn EmailProvider>, ConfigError> {
    Ok(match &config.provider {
        ProviderSettings::Resend(settings) => Box::new(ResendProvider::new(settings).map_err(
            |reason| ConfigError::Invalid {
                name: "RESEND_API_KEY",
                reason,
            },
        )?),
        ProviderSettings::Smtp(settings) => Box::new(SmtpProvider::new(settings).map_err(
            |reason| ConfigError::Invalid {
                name: "SMTP_URL",
                reason,
            },
        )?),
        ProviderSettings::File { dir } => {
            Box::new(FileProvider::create(dir).map_err(|e| ConfigError::Invalid {
                name: "EMAIL_FILE_DIR",
                reason: format!("cannot create {}: {e}", dir.display()),
            })?)
        }
        ProviderSettings::Unset => {
            return Err(ConfigError::Missing {
                name: "EMAIL_PROVIDER",
                hint: ": set it to resend, smtp or file to send email (it stays queued until then)"
                    .into(),
            });
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provider::smtp::SmtpTls;

    fn config(pairs: &[(&str, &str)]) -> Result<EmailConfig, ConfigError> {
        EmailConfig::from_env(&EnvSource::from_pairs(pairs.iter().copied()))
    }

    #[test]
    fn defaults_are_no_provider_and_no_caps() {
        let cfg = config(&[]).unwrap();
        assert_eq!(cfg.provider, ProviderSettings::Unset);
        let err = build_provider(&cfg).err().unwrap().to_string();
        assert!(err.starts_with("EMAIL_PROVIDER"), "{err}");
        let cfg = config(&[("EMAIL_PROVIDER", "file")]).unwrap();
        assert_eq!(
            cfg.provider,
            ProviderSettings::File {
                dir: PathBuf::from(".apex/mail")
            }
        );
        assert_eq!(cfg.from, DEFAULT_FROM);
        assert_eq!(cfg.daily_cap, None);
        assert_eq!(cfg.monthly_cap, None);
        assert_eq!(cfg.unsubscribe_url, DEFAULT_UNSUBSCRIBE_URL);
    }

    #[test]
    fn resend_reads_its_settings() {
        let cfg = config(&[
            ("EMAIL_PROVIDER", "Resend"),
            ("RESEND_API_KEY", "re_123"),
            ("RESEND_BASE_URL", "http://127.0.0.1:9/"),
            ("RESEND_RATE", "0.5"),
            ("EMAIL_DAILY_CAP", "100"),
            ("EMAIL_MONTHLY_CAP", "3000"),
        ])
        .unwrap();
        let ProviderSettings::Resend(resend) = &cfg.provider else {
            panic!("{cfg:?}")
        };
        assert_eq!(resend.base_url, "http://127.0.0.1:9");
        assert_eq!(resend.requests_per_second, 0.5);
        assert_eq!(cfg.daily_cap, Some(100));
        assert_eq!(cfg.monthly_cap, Some(3000));
        let defaults = config(&[("EMAIL_PROVIDER", "resend"), ("RESEND_API_KEY", "re_1")]).unwrap();
        let ProviderSettings::Resend(resend) = &defaults.provider else {
            panic!()
        };
        assert_eq!(resend.base_url, DEFAULT_RESEND_BASE_URL);
        assert_eq!(resend.requests_per_second, DEFAULT_RESEND_RATE);
    }

    #[test]
    fn smtp_reads_its_url() {
        let cfg = config(&[
            ("EMAIL_PROVIDER", "smtp"),
            (
                "SMTP_URL",
                "smtps://AKIA:secret@email-smtp.eu-west-1.amazonaws.com",
            ),
        ])
        .unwrap();
        let ProviderSettings::Smtp(smtp) = &cfg.provider else {
            panic!()
        };
        assert_eq!(smtp.tls, SmtpTls::Implicit);
        assert_eq!(smtp.port, 465);
    }

    #[test]
    fn bad_values_name_their_variable() {
        for (pairs, name) in [
            (vec![("EMAIL_PROVIDER", "sendgrid")], "EMAIL_PROVIDER"),
            (vec![("EMAIL_PROVIDER", "resend")], "RESEND_API_KEY"),
            (
                vec![("EMAIL_PROVIDER", "resend"), ("RESEND_API_KEY", "sk_1")],
                "RESEND_API_KEY",
            ),
            (
                vec![
                    ("EMAIL_PROVIDER", "resend"),
                    ("RESEND_API_KEY", "re_1"),
                    ("RESEND_RATE", "0"),
                ],
                "RESEND_RATE",
            ),
            (
                vec![
                    ("EMAIL_PROVIDER", "resend"),
                    ("RESEND_API_KEY", "re_1"),
                    ("RESEND_RATE", "101"),
                ],
                "RESEND_RATE",
            ),
            (
                vec![
                    ("EMAIL_PROVIDER", "resend"),
                    ("RESEND_API_KEY", "re_1"),
                    ("RESEND_BASE_URL", "api.resend.com"),
                ],
                "RESEND_BASE_URL",
            ),
            (vec![("EMAIL_PROVIDER", "smtp")], "SMTP_URL"),
            (
                vec![("EMAIL_PROVIDER", "smtp"), ("SMTP_URL", "http://x")],
                "SMTP_URL",
            ),
            (vec![("EMAIL_FROM", "not an address")], "EMAIL_FROM"),
            (vec![("EMAIL_DAILY_CAP", "0")], "EMAIL_DAILY_CAP"),
            (vec![("EMAIL_MONTHLY_CAP", "-5")], "EMAIL_MONTHLY_CAP"),
            (vec![("EMAIL_MONTHLY_CAP", "lots")], "EMAIL_MONTHLY_CAP"),
            (
                vec![("EMAIL_UNSUBSCRIBE_URL", "https://x/unsub?a=1")],
                "EMAIL_UNSUBSCRIBE_URL",
            ),
            (
                vec![("EMAIL_UNSUBSCRIBE_URL", "app/settings")],
                "EMAIL_UNSUBSCRIBE_URL",
            ),
        ] {
            let err = config(&pairs).unwrap_err().to_string();
            assert!(err.starts_with(name), "{pairs:?}: {err}");
        }
    }

    #[test]
    fn secrets_stay_out_of_debug_and_errors() {
        let resend = config(&[
            ("EMAIL_PROVIDER", "resend"),
            ("RESEND_API_KEY", "re_topsecretvalue"),
        ])
        .unwrap();
        let shown = format!("{resend:?}");
        assert!(!shown.contains("topsecretvalue"), "{shown}");
        assert!(shown.contains("***"), "{shown}");
        let smtp = config(&[
            ("EMAIL_PROVIDER", "smtp"),
            ("SMTP_URL", "smtp://user:hunter2pass@mail.example.com:587"),
        ])
        .unwrap();
        let shown = format!("{smtp:?}");
        assert!(!shown.contains("hunter2pass"), "{shown}");
        let err = config(&[
            ("EMAIL_PROVIDER", "resend"),
            ("RESEND_API_KEY", "xx_secret"),
        ])
        .unwrap_err()
        .to_string();
        assert!(!err.contains("secret"), "{err}");
        let err = config(&[
            ("EMAIL_PROVIDER", "smtp"),
            (
                "SMTP_URL",
                "smtp://user:hunter2pass@mail.example.com:587?tls=maybe",
            ),
        ])
        .unwrap_err()
        .to_string();
        assert!(!err.contains("hunter2pass"), "{err}");
    }
}
