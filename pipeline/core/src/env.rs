//! Typed configuration from environment variables: every binary builds its config struct
//! through an [`EnvSource`], so a missing or invalid value becomes one line naming the variable,
//! and tests pass a map instead of touching the process environment.

use std::collections::HashMap;
use std::fmt::Display;
use std::str::FromStr;

/// A configuration value that is missing or cannot be used. Its `Display` is the one-line
/// message a binary prints before exiting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// A required variable is unset or empty.
    #[error("{name} is required but not set{hint}")]
    Missing {
        /// The variable's name.
        name: &'static str,
        /// Extra guidance, starting with a separator (": ..."), or empty.
        hint: String,
    },
    /// A variable is set to a value that cannot be used.
    #[error("{name} is invalid: {reason}")]
    Invalid {
        /// The variable's name.
        name: &'static str,
        /// Why the value was refused. Never includes the value of a secret.
        reason: String,
    },
    /// A variable of a family (`APEX_CRON_SCHEDULE_<JOB>`, say) names nothing that exists:
    /// a typo, which would otherwise be silently ignored.
    #[error("{name} is not a setting: {reason}")]
    Unknown {
        /// The variable's name.
        name: String,
        /// What the family's names may be.
        reason: String,
    },
}

/// Where configuration values come from: the process environment or, in tests, a map.
pub struct EnvSource {
    values: HashMap<String, String>,
}

impl EnvSource {
    /// A snapshot of the process environment (variables that are not UTF-8 are ignored).
    pub fn process() -> Self {
        Self {
            values: std::env::vars().collect(),
        }
    }

    /// A source made of the given pairs, for tests.
    pub fn from_pairs<'a>(pairs: impl IntoIterator<Item = (&'a str, &'a str)>) -> Self {
        Self {
            values: pairs
                .into_iter()
                .map(|(k, v)| (k.to_owned(), v.to_owned()))
                .collect(),
        }
    }

    /// The value of `name`; an empty value counts as unset, as shells make empty easy by mistake.
    pub fn optional(&self, name: &str) -> Option<String> {
        self.values
            .get(name)
            .map(|v| v.trim().to_owned())
            .filter(|v| !v.is_empty())
    }

    /// The names of the variables that start with `prefix`, sorted.
    pub fn names_with_prefix(&self, prefix: &str) -> Vec<String> {
        let mut names: Vec<String> = self
            .values
            .keys()
            .filter(|name| name.starts_with(prefix))
            .cloned()
            .collect();
        names.sort();
        names
    }

    /// The value of `name`, which must be set.
    pub fn required(&self, name: &'static str) -> Result<String, ConfigError> {
        self.optional(name).ok_or(ConfigError::Missing {
            name,
            hint: String::new(),
        })
    }

    /// The value of `name`, which must be set; `hint` says how to get one.
    pub fn required_with_hint(
        &self,
        name: &'static str,
        hint: &str,
    ) -> Result<String, ConfigError> {
        self.optional(name).ok_or_else(|| ConfigError::Missing {
            name,
            hint: format!(": {hint}"),
        })
    }

    /// `name` parsed as `T`, or `default` when unset.
    pub fn parse_or<T>(&self, name: &'static str, default: T) -> Result<T, ConfigError>
    where
        T: FromStr,
        T::Err: Display,
    {
        match self.optional(name) {
            None => Ok(default),
            Some(raw) => raw.parse().map_err(|e: T::Err| ConfigError::Invalid {
                name,
                reason: format!("{raw:?}: {e}"),
            }),
        }
    }
}

/// Checks that `url` starts with one of `schemes` (e.g. `postgres://`), for an early,
/// clear error instead of a connection failure deep in a driver.
pub fn check_url_scheme(
    name: &'static str,
    url: &str,
    schemes: &[&str],
) -> Result<(), ConfigError> {
    if schemes.iter().any(|s| url.starts_with(s)) {
        Ok(())
    } else {
        Err(ConfigError::Invalid {
            name,
            reason: format!("must start with {}", schemes.join(" or ")),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_counts_as_unset() {
        let env = EnvSource::from_pairs([("A", "  "), ("B", "x")]);
        assert_eq!(env.optional("A"), None);
        assert_eq!(env.optional("B").as_deref(), Some("x"));
        assert_eq!(
            env.required("A").unwrap_err().to_string(),
            "A is required but not set"
        );
    }

    #[test]
    fn parse_or_names_the_variable_on_bad_values() {
        let env = EnvSource::from_pairs([("N", "12x")]);
        let err = env.parse_or("N", 3u32).unwrap_err().to_string();
        assert!(err.starts_with("N is invalid: \"12x\""), "{err}");
        assert_eq!(env.parse_or("M", 3u32), Ok(3));
    }

    #[test]
    fn url_schemes_are_checked() {
        assert!(check_url_scheme("U", "postgres://x", &["postgres://", "postgresql://"]).is_ok());
        let err = check_url_scheme("U", "mysql://x", &["postgres://"]).unwrap_err();
        assert_eq!(err.to_string(), "U is invalid: must start with postgres://");
    }
}
