//! Integration-test support: every test gets its own freshly created Postgres database and
//! ClickHouse database on the real servers of `scripts/stack.sh`, so tests never share data
//! and can run in parallel. Databases are named `apex_t_*`; `scripts/test.sh` drops old ones.

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use sqlx::{Connection, PgConnection, PgPool};

use crate::env::EnvSource;
use crate::stores::StoreConfig;

/// A pair of empty databases (Postgres and ClickHouse) private to one test.
pub struct TestStores {
    /// Settings pointing at the private databases.
    pub config: StoreConfig,
    /// A pool on the private Postgres database.
    pub pool: PgPool,
    /// The databases' shared name.
    pub name: String,
}

static COUNTER: AtomicU32 = AtomicU32::new(0);

fn unique_name() -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "apex_t_{}_{}_{}",
        std::process::id(),
        nanos,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// `url` with its database path replaced by `database`.
pub fn with_database(url: &str, database: &str) -> String {
    let after_scheme = url.find("://").map_or(0, |i| i + 3);
    let (base, query) = match url.find('?') {
        Some(q) => (&url[..q], &url[q..]),
        None => (url, ""),
    };
    let host_end = base[after_scheme..]
        .find('/')
        .map_or(base.len(), |i| after_scheme + i);
    format!("{}/{}{}", &base[..host_end], database, query)
}

impl TestStores {
    /// Creates empty databases (no migrations applied).
    ///
    /// Panics with a pointer to `scripts/test.sh` when the stack's variables are missing:
    /// a test that needs the stores must fail, never pass silently, without them.
    pub async fn empty() -> Self {
        let base = StoreConfig::from_env(&EnvSource::process()).unwrap_or_else(|e| {
            panic!("{e}. Integration tests need the local stack: run scripts/test.sh")
        });
        let name = unique_name();
        let mut admin = PgConnection::connect(&base.database_url)
            .await
            .expect("cannot connect to the stack's Postgres");
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .expect("cannot create a test database");
        let _ = admin.close().await;
        let config = StoreConfig {
            database_url: with_database(&base.database_url, &name),
            clickhouse_database: name.clone(),
            pg_max_connections: 8,
            ..base
        };
        let pool = config
            .connect_postgres()
            .await
            .expect("cannot connect to the test database");
        Self { config, pool, name }
    }

    /// Creates databases and applies every migration to both.
    pub async fn migrated() -> Self {
        let stores = Self::empty().await;
        crate::migrate::migrate_all(&stores.pool, &stores.config)
            .await
            .expect("migrations failed on empty databases");
        stores
    }
}

#[cfg(test)]
mod tests {
    use super::with_database;

    #[test]
    fn database_is_replaced_in_urls() {
        assert_eq!(
            with_database("postgres://u:p@h:1/apex?sslmode=disable", "t1"),
            "postgres://u:p@h:1/t1?sslmode=disable"
        );
        assert_eq!(with_database("postgres://h:1", "t1"), "postgres://h:1/t1");
        assert_eq!(with_database("postgres://h:1/", "t1"), "postgres://h:1/t1");
    }
}
