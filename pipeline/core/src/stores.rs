//! Connections to the two stores, built from one typed configuration shared by every binary:
//! Postgres (billing state and hourly rollups) and ClickHouse (raw events and analytics).

use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;

use crate::env::{ConfigError, EnvSource, check_url_scheme};

/// Where the stores are, read from `DATABASE_URL`, `CLICKHOUSE_URL`, `CLICKHOUSE_DATABASE`,
/// `CLICKHOUSE_USER` and `CLICKHOUSE_PASSWORD`.
#[derive(Clone)]
pub struct StoreConfig {
    /// Postgres connection URL.
    pub database_url: String,
    /// ClickHouse HTTP interface URL, e.g. `http://127.0.0.1:18123`.
    pub clickhouse_url: String,
    /// ClickHouse database holding our tables (created by migrations if missing).
    pub clickhouse_database: String,
    /// ClickHouse user; `default` when unset.
    pub clickhouse_user: Option<String>,
    /// ClickHouse password; never logged.
    pub clickhouse_password: Option<String>,
    /// Upper bound on pooled Postgres connections (`APEX_PG_MAX_CONNECTIONS`, default 16).
    pub pg_max_connections: u32,
}

impl std::fmt::Debug for StoreConfig {
    // URLs may carry passwords, so only their scheme and host part are shown.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("database_url", &redact_url(&self.database_url))
            .field("clickhouse_url", &redact_url(&self.clickhouse_url))
            .field("clickhouse_database", &self.clickhouse_database)
            .field("clickhouse_user", &self.clickhouse_user)
            .field("pg_max_connections", &self.pg_max_connections)
            .finish_non_exhaustive()
    }
}

/// `url` with any `user:password@` part replaced, safe to log.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme_end), Some(at)) if at > scheme_end => {
            format!("{}://***@{}", &url[..scheme_end], &url[at + 1..])
        }
        _ => url.to_owned(),
    }
}

impl StoreConfig {
    /// Reads and validates the store settings.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        const STACK_HINT: &str =
            "run `eval \"$(scripts/stack.sh up --export)\"` for the local stack";
        let database_url = env.required_with_hint("DATABASE_URL", STACK_HINT)?;
        check_url_scheme(
            "DATABASE_URL",
            &database_url,
            &["postgres://", "postgresql://"],
        )?;
        let clickhouse_url = env.required_with_hint("CLICKHOUSE_URL", STACK_HINT)?;
        check_url_scheme("CLICKHOUSE_URL", &clickhouse_url, &["http://", "https://"])?;
        let clickhouse_database = env
            .optional("CLICKHOUSE_DATABASE")
            .unwrap_or_else(|| "apex".to_owned());
        if !is_identifier(&clickhouse_database) {
            return Err(ConfigError::Invalid {
                name: "CLICKHOUSE_DATABASE",
                reason: "must be letters, digits and underscores".to_owned(),
            });
        }
        let pg_max_connections = env.parse_or("APEX_PG_MAX_CONNECTIONS", 16u32)?;
        if pg_max_connections == 0 {
            return Err(ConfigError::Invalid {
                name: "APEX_PG_MAX_CONNECTIONS",
                reason: "must be at least 1".to_owned(),
            });
        }
        Ok(Self {
            database_url,
            clickhouse_url,
            clickhouse_database,
            clickhouse_user: env.optional("CLICKHOUSE_USER"),
            clickhouse_password: env.optional("CLICKHOUSE_PASSWORD"),
            pg_max_connections,
        })
    }

    /// A Postgres pool; fails if the server cannot be reached within a few seconds.
    pub async fn connect_postgres(&self) -> Result<PgPool, sqlx::Error> {
        PgPoolOptions::new()
            .max_connections(self.pg_max_connections)
            .acquire_timeout(Duration::from_secs(5))
            .connect(&self.database_url)
            .await
    }

    /// A ClickHouse client bound to [`StoreConfig::clickhouse_database`].
    pub fn clickhouse(&self) -> clickhouse::Client {
        self.clickhouse_server()
            .with_database(&self.clickhouse_database)
    }

    /// A ClickHouse client bound to no database, for creating it.
    pub fn clickhouse_server(&self) -> clickhouse::Client {
        // Validation is off: it relies on a response format ClickHouse 18.16 does not have.
        let mut client = clickhouse::Client::default()
            .with_url(&self.clickhouse_url)
            .with_validation(false);
        if let Some(user) = &self.clickhouse_user {
            client = client.with_user(user);
        }
        if let Some(password) = &self.clickhouse_password {
            client = client.with_password(password);
        }
        client
    }
}

/// True for names made of ASCII letters, digits and underscores, not starting with a digit:
/// safe to splice into DDL that cannot take bound parameters.
pub fn is_identifier(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(|c: char| c.is_ascii_digit())
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> Vec<(&'static str, &'static str)> {
        vec![
            (
                "DATABASE_URL",
                "postgres://postgres:secret@127.0.0.1:15432/apex",
            ),
            ("CLICKHOUSE_URL", "http://127.0.0.1:18123"),
        ]
    }

    #[test]
    fn reads_defaults() {
        let cfg = StoreConfig::from_env(&EnvSource::from_pairs(base())).unwrap();
        assert_eq!(cfg.clickhouse_database, "apex");
        assert_eq!(cfg.pg_max_connections, 16);
    }

    #[test]
    fn missing_database_url_names_it() {
        let env = EnvSource::from_pairs([("CLICKHOUSE_URL", "http://x")]);
        let msg = StoreConfig::from_env(&env).unwrap_err().to_string();
        assert!(msg.starts_with("DATABASE_URL is required"), "{msg}");
    }

    #[test]
    fn bad_values_are_refused() {
        for (name, value) in [
            ("DATABASE_URL", "mysql://x"),
            ("CLICKHOUSE_URL", "127.0.0.1:18123"),
            ("CLICKHOUSE_DATABASE", "apex; DROP"),
            ("APEX_PG_MAX_CONNECTIONS", "0"),
        ] {
            let mut pairs = base();
            pairs.push((name, value));
            let msg = StoreConfig::from_env(&EnvSource::from_pairs(pairs))
                .err()
                .map(|e| e.to_string())
                .unwrap_or_default();
            assert!(msg.starts_with(name), "{name}={value}: {msg}");
        }
    }

    #[test]
    fn debug_output_hides_passwords() {
        let cfg = StoreConfig::from_env(&EnvSource::from_pairs(base())).unwrap();
        let shown = format!("{cfg:?}");
        assert!(!shown.contains("secret"), "{shown}");
        assert!(shown.contains("127.0.0.1:15432/apex"), "{shown}");
    }
}
