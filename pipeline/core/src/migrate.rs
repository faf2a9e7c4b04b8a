//! Schema migrations for both stores, applied by `apexctl migrate` and at server start.
//!
//! Postgres uses sqlx's migrator over `migrations/postgres/` (it takes an advisory lock and
//! records checksums, so a second run is a no-op). ClickHouse has no transactions, so every
//! statement in `migrations/clickhouse/` is written with `IF NOT EXISTS`: a run that dies
//! half-way is simply run again, and only a fully applied migration is recorded in
//! `schema_migrations`.

use std::collections::HashSet;

use sqlx::PgPool;

use crate::stores::StoreConfig;

/// A migration failed; the message names the store and the migration.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    /// The Postgres migrator failed.
    #[error("postgres migration failed: {0}")]
    Postgres(#[from] sqlx::migrate::MigrateError),
    /// A ClickHouse statement failed.
    #[error("clickhouse migration {version} ({name}) failed: {source}")]
    ClickHouse {
        /// Number of the migration.
        version: u32,
        /// File name of the migration.
        name: &'static str,
        /// The client's error.
        source: clickhouse::error::Error,
    },
    /// The ClickHouse bookkeeping (database or `schema_migrations`) could not be set up.
    #[error("clickhouse migration bookkeeping failed: {0}")]
    ClickHouseSetup(#[from] clickhouse::error::Error),
}

static POSTGRES_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// One ClickHouse migration file, embedded at build time.
#[derive(Debug, Clone, Copy)]
pub struct ClickHouseMigration {
    /// Number from the file name; applied in ascending order.
    pub version: u32,
    /// File name, for messages and the `schema_migrations` table.
    pub name: &'static str,
    /// The file's SQL: statements separated by `;` at the end of a line.
    pub sql: &'static str,
}

/// Every file of `migrations/clickhouse/`, in order. A test checks the folder and this list agree.
pub const CLICKHOUSE_MIGRATIONS: &[ClickHouseMigration] = &[
    ClickHouseMigration {
        version: 1,
        name: "0001_usage_events.sql",
        sql: include_str!("../../../migrations/clickhouse/0001_usage_events.sql"),
    },
    ClickHouseMigration {
        version: 2,
        name: "0002_usage_daily.sql",
        sql: include_str!("../../../migrations/clickhouse/0002_usage_daily.sql"),
    },
    ClickHouseMigration {
        version: 3,
        name: "0003_pipeline_batches.sql",
        sql: include_str!("../../../migrations/clickhouse/0003_pipeline_batches.sql"),
    },
];

/// sqlx's bookkeeping table of applied Postgres migrations (its migrator's default name,
/// which ours keeps).
const POSTGRES_MIGRATIONS_TABLE: &str = "_sqlx_migrations";

/// Applies every pending Postgres migration. Returns the versions this run applied,
/// ascending (empty when the schema was already current), like [`migrate_clickhouse`].
pub async fn migrate_postgres(pool: &PgPool) -> Result<Vec<i64>, MigrateError> {
    let before = applied_postgres(pool)
        .await
        .map_err(sqlx::migrate::MigrateError::from)?;
    POSTGRES_MIGRATOR.run(pool).await?;
    let after = applied_postgres(pool)
        .await
        .map_err(sqlx::migrate::MigrateError::from)?;
    Ok(after
        .into_iter()
        .filter(|m| m.success && !before.iter().any(|b| b.version == m.version))
        .map(|m| m.version)
        .collect())
}

/// How a Postgres database stands against the migrations of this build (`apexctl doctor`).
/// Every list holds versions, ascending.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PostgresStatus {
    /// Every migration of this build (`migrations/postgres/`).
    pub known: Vec<i64>,
    /// Known migrations not applied (`apexctl migrate` applies them).
    pub pending: Vec<i64>,
    /// Applied migrations this build does not know: the binary is older than the schema
    /// (sqlx's migrator then refuses to run).
    pub unknown: Vec<i64>,
    /// Migrations recorded as failed part-way (`success = false`: a migration run outside a
    /// transaction died): the schema needs a person.
    pub dirty: Vec<i64>,
    /// Applied migrations whose file changed since (checksum mismatch): a landed migration
    /// was edited, which sqlx's migrator refuses.
    pub changed: Vec<i64>,
}

impl PostgresStatus {
    /// True when the schema is exactly this build's: nothing pending, unknown, dirty or
    /// changed.
    pub fn is_current(&self) -> bool {
        self.pending.is_empty()
            && self.unknown.is_empty()
            && self.dirty.is_empty()
            && self.changed.is_empty()
    }
}

/// One row of sqlx's bookkeeping table.
#[derive(sqlx::FromRow)]
struct AppliedPostgres {
    version: i64,
    checksum: Vec<u8>,
    success: bool,
}

/// The rows of [`POSTGRES_MIGRATIONS_TABLE`], by version; none on a database never migrated
/// (the table is not created here: reading the status changes nothing).
async fn applied_postgres(pool: &PgPool) -> Result<Vec<AppliedPostgres>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass($1) IS NOT NULL")
        .bind(POSTGRES_MIGRATIONS_TABLE)
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT version, checksum, success FROM {POSTGRES_MIGRATIONS_TABLE} ORDER BY version"
    )))
    .fetch_all(pool)
    .await
}

/// Compares the database of `pool` with the migrations of this build, as sqlx's migrator
/// would before running (same migrations, same checksums), without changing anything.
pub async fn postgres_status(pool: &PgPool) -> Result<PostgresStatus, sqlx::Error> {
    let applied = applied_postgres(pool).await?;
    let known: Vec<&sqlx::migrate::Migration> = POSTGRES_MIGRATOR
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .collect();
    let mut status = PostgresStatus {
        known: known.iter().map(|m| m.version).collect(),
        ..PostgresStatus::default()
    };
    for migration in &known {
        match applied.iter().find(|a| a.version == migration.version) {
            None => status.pending.push(migration.version),
            Some(a) if !a.success => status.dirty.push(a.version),
            Some(a) if a.checksum.as_slice() != &*migration.checksum => {
                status.changed.push(a.version)
            }
            Some(_) => {}
        }
    }
    for a in &applied {
        if !known.iter().any(|m| m.version == a.version) {
            if a.success {
                status.unknown.push(a.version);
            } else {
                status.dirty.push(a.version);
            }
        }
    }
    status.dirty.sort_unstable();
    Ok(status)
}

/// Creates the ClickHouse database if needed and applies every pending migration.
/// Returns the versions it applied (empty when the schema was already current).
pub async fn migrate_clickhouse(stores: &StoreConfig) -> Result<Vec<u32>, MigrateError> {
    // The database name was checked by StoreConfig to be a plain identifier.
    stores
        .clickhouse_server()
        .query(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            stores.clickhouse_database
        ))
        .execute()
        .await?;
    let client = stores.clickhouse();
    client
        .query(
            "CREATE TABLE IF NOT EXISTS schema_migrations \
             (version UInt32, name String, applied_at DateTime) \
             ENGINE = MergeTree() ORDER BY version",
        )
        .execute()
        .await?;
    let applied: HashSet<u32> = client
        .query("SELECT version FROM schema_migrations")
        .fetch_all::<u32>()
        .await?
        .into_iter()
        .collect();

    let mut newly_applied = Vec::new();
    for migration in CLICKHOUSE_MIGRATIONS {
        if applied.contains(&migration.version) {
            continue;
        }
        for statement in split_statements(migration.sql) {
            client.query(&statement).execute().await.map_err(|source| {
                MigrateError::ClickHouse {
                    version: migration.version,
                    name: migration.name,
                    source,
                }
            })?;
        }
        client
            .query("INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, now())")
            .bind(migration.version)
            .bind(migration.name)
            .execute()
            .await?;
        tracing::info!(
            version = migration.version,
            name = migration.name,
            "applied clickhouse migration"
        );
        newly_applied.push(migration.version);
    }
    Ok(newly_applied)
}

/// Applies both stores' migrations.
pub async fn migrate_all(pool: &PgPool, stores: &StoreConfig) -> Result<(), MigrateError> {
    migrate_postgres(pool).await?;
    migrate_clickhouse(stores).await?;
    Ok(())
}

/// Splits a migration file into statements: the HTTP interface runs one statement per request.
/// Comment lines are dropped; statements end with `;` at the end of a line.
fn split_statements(sql: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    for line in sql.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() || trimmed.starts_with("--") {
            continue;
        }
        current.push_str(line);
        current.push('\n');
        if trimmed.ends_with(';') {
            let statement = current.trim().trim_end_matches(';').trim().to_owned();
            if !statement.is_empty() {
                statements.push(statement);
            }
            current.clear();
        }
    }
    let rest = current.trim();
    if !rest.is_empty() {
        statements.push(rest.to_owned());
    }
    statements
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_clickhouse_migration_file_is_listed_in_order() {
        let dir = crate::testing::package_dir().join("../../migrations/clickhouse");
        let mut files: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .filter(|n| n.ends_with(".sql"))
            .collect();
        files.sort();
        let listed: Vec<&str> = CLICKHOUSE_MIGRATIONS.iter().map(|m| m.name).collect();
        assert_eq!(files, listed);
        for (i, m) in CLICKHOUSE_MIGRATIONS.iter().enumerate() {
            assert_eq!(m.version as usize, i + 1);
            assert!(m.name.starts_with(&format!("{:04}_", m.version)));
        }
    }

    #[test]
    fn statements_split_at_line_ending_semicolons() {
        let sql = "-- a comment; not a statement\nCREATE TABLE a (x UInt8)\nENGINE = Memory;\n\nCREATE VIEW v AS SELECT 1;\n";
        assert_eq!(
            split_statements(sql),
            vec![
                "CREATE TABLE a (x UInt8)\nENGINE = Memory",
                "CREATE VIEW v AS SELECT 1"
            ]
        );
    }

    #[test]
    fn every_clickhouse_statement_is_idempotent() {
        for m in CLICKHOUSE_MIGRATIONS {
            for statement in split_statements(m.sql) {
                assert!(
                    statement.contains("IF NOT EXISTS"),
                    "{}: a re-run after a partial failure needs IF NOT EXISTS: {statement}",
                    m.name
                );
            }
        }
    }
}
