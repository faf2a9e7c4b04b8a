//! The simulation's own system: a fresh Postgres database and a fresh ClickHouse database on
//! the stack's servers (named `apex_sim_<seed>_<unix seconds>_<pid>`, migrated with
//! `apex_core::migrate`), the real durable pipeline (write-ahead log in a temporary folder,
//! the Postgres and ClickHouse appliers) writing them, and the cron jobs' context on a
//! simulated clock. The stack's own database is only used to create and drop the simulation's.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use apex_core::model::UsageRecord;
use apex_core::stores::StoreConfig;
use apex_cron::clock::Clock;
use apex_cron::jobs::JobContext;
use apex_pipeline::durable::{BatchLimits, DurableConfig, DurableSink};
use apex_pipeline::sink::RecordSink;
use chrono::{DateTime, Utc};
use sqlx::{Connection, PgConnection, PgPool};

use crate::config::CtlConfig;

/// The databases, the pipeline and the folders of one simulation.
pub(crate) struct World {
    /// The stack's settings (its servers; its database is never written).
    base: StoreConfig,
    /// The simulation's stores.
    pub(crate) stores: StoreConfig,
    /// A pool on the simulation's Postgres database.
    pub(crate) pool: PgPool,
    /// The databases' name (both stores).
    pub(crate) name: String,
    /// The pipeline.
    sink: Arc<DurableSink>,
    /// The write-ahead log's folder.
    wal_dir: PathBuf,
    /// Where the email file provider writes.
    pub(crate) mail_dir: PathBuf,
}

impl World {
    /// Creates and migrates the databases and starts the pipeline on them.
    pub(crate) async fn create(base: &StoreConfig, seed: u64) -> anyhow::Result<Self> {
        let wall = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        let name = format!("apex_sim_{seed}_{}_{}", wall.as_secs(), std::process::id());
        // The migrations create ClickHouse's database if it does not exist: one of this name
        // must not (it would be another run's, and the drop would take it).
        let clickhouse_taken: u64 = base
            .clickhouse_server()
            .query("SELECT count() FROM system.databases WHERE name = ?")
            .bind(&name)
            .fetch_one()
            .await
            .context("cannot reach the stack's ClickHouse (CLICKHOUSE_URL)")?;
        if clickhouse_taken > 0 {
            anyhow::bail!("a ClickHouse database {name} exists already: another simulation's?");
        }
        let mut admin = PgConnection::connect(&base.database_url)
            .await
            .context("cannot connect to the stack's Postgres (DATABASE_URL)")?;
        // `name` is letters, digits and underscores (made above): safe in DDL.
        sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {name}")))
            .execute(&mut admin)
            .await
            .with_context(|| format!("cannot create the simulation's database {name}"))?;
        let _ = admin.close().await;
        let mut database_url =
            url::Url::parse(&base.database_url).context("DATABASE_URL is not a URL")?;
        database_url.set_path(&format!("/{name}"));
        let stores = StoreConfig {
            database_url: database_url.into(),
            clickhouse_database: name.clone(),
            pg_max_connections: 8,
            ..base.clone()
        };
        let temp = std::env::temp_dir().join(&name);
        let wal_dir = temp.join("wal");
        let mail_dir = temp.join("mail");
        let world = async {
            let pool = stores.connect_postgres().await?;
            apex_core::migrate::migrate_all(&pool, &stores).await?;
            std::fs::create_dir_all(&wal_dir)?;
            std::fs::create_dir_all(&mail_dir)?;
            let mut config = DurableConfig::new(&wal_dir, &stores);
            // An hour of simulated usage is one submission, and the hour's jobs read it at
            // once: batches go as soon as they are logged instead of waiting up to half a
            // second (rows and bytes as in production).
            config.batch = BatchLimits {
                max_age: Duration::from_millis(1),
                ..BatchLimits::DEFAULT
            };
            let sink = DurableSink::start(&config)?;
            anyhow::Ok((pool, sink))
        }
        .await;
        let partial = |e: anyhow::Error| async {
            drop_databases(base, &name).await;
            let _ = std::fs::remove_dir_all(&temp);
            e
        };
        let (pool, sink) = match world {
            Ok(parts) => parts,
            Err(e) => return Err(partial(e).await.context("cannot set the simulation up")),
        };
        Ok(Self {
            base: base.clone(),
            stores,
            pool,
            name,
            sink,
            wal_dir,
            mail_dir,
        })
    }

    /// Sends one hour's records through the pipeline and waits until Postgres holds them
    /// (the hour's jobs read the Postgres rollups; ClickHouse follows on its own applier).
    pub(crate) async fn ingest(&self, records: Vec<UsageRecord>) -> anyhow::Result<()> {
        if records.is_empty() {
            return Ok(());
        }
        let ack = self
            .sink
            .submit(records)
            .map_err(|e| anyhow::anyhow!("the pipeline refused the hour's records: {e}"))?;
        ack.await
            .context("the pipeline stopped")?
            .map_err(|e| anyhow::anyhow!("the pipeline did not log the hour's records: {e}"))?;
        self.wait_applied(false).await
    }

    /// Waits until Postgres (and ClickHouse with `both`) hold everything logged.
    pub(crate) async fn wait_applied(&self, both: bool) -> anyhow::Result<()> {
        let target = self.sink.durable_position();
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            let applied = if both {
                self.sink.applied_position()
            } else {
                self.sink.postgres_position()
            };
            if applied >= target {
                return Ok(());
            }
            if let Some(stuck) = self.sink.stuck_stores().first() {
                anyhow::bail!(
                    "the pipeline's {} store is stuck: {}",
                    stuck.store,
                    stuck.error
                );
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        anyhow::bail!("the pipeline did not apply the simulated usage within a minute")
    }

    /// The jobs' context at `now`: the simulation's stores, Stripe (`stripe`: the stand-in's
    /// key and base URL), the email file provider in [`World::mail_dir`], and the operator's
    /// dunning, alert and invoicing settings. The clock is frozen (to a thousandth) at `now`.
    pub(crate) fn context(
        &self,
        ctl: &CtlConfig,
        stripe: &apex_stripe::config::StripeConfig,
        email: &apex_notify::config::EmailConfig,
        now: DateTime<Utc>,
    ) -> JobContext {
        JobContext {
            pool: self.pool.clone(),
            stores: self.stores.clone(),
            stripe: stripe.clone(),
            // Well above Stripe's 100 a second: the stand-in is a local process, not Stripe,
            // and the sync of 20 customers over 35 days sends two thousand meter events.
            stripe_rate: 1_000.0,
            clock: Clock::Simulated {
                start: now,
                speed: apex_cron::clock::MIN_SPEED,
                epoch: std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            },
            retention: ctl.cron.retention,
            invoicing: ctl.cron.invoicing,
            email: email.clone(),
            dunning: ctl.cron.dunning.clone(),
            alert_thresholds: ctl.cron.alert_thresholds.clone(),
            runner: "apexctl-simulate".into(),
        }
    }

    /// Once a simulated day: the hourly rollups rewritten in key order (customer, metric,
    /// hour) and the planner's statistics refreshed. The simulation writes in a minute what
    /// production writes in a month, one hour of every customer at a time, so each
    /// customer's rows lie one to a page and the usage check's per-customer sums (hourly, the
    /// slowest job here) read hundreds of pages each; in key order they read a few. The rows
    /// and every result stay the same. Autovacuum's analyze lags such a fresh, fast-growing
    /// database too.
    pub(crate) async fn compact(&self) -> anyhow::Result<()> {
        sqlx::raw_sql("CLUSTER usage_records USING usage_records_pkey; ANALYZE")
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    /// Stops the pipeline (everything logged is applied first), closes the pool, and drops
    /// the databases and folders unless `keep`. Whether both databases are gone (`false`
    /// when kept, or when a drop failed: the failure is printed).
    pub(crate) async fn finish(self, keep: bool) -> bool {
        let sink = self.sink.clone();
        let _ = tokio::task::spawn_blocking(move || sink.shutdown()).await;
        self.pool.close().await;
        let _ = std::fs::remove_dir_all(&self.wal_dir);
        if keep {
            return false;
        }
        if let Some(temp) = self.mail_dir.parent() {
            let _ = std::fs::remove_dir_all(temp);
        }
        drop_databases(&self.base, &self.name).await
    }
}

/// Drops the simulation's databases named `name` (best effort: a failure is reported, not
/// fatal; the names start with `apex_sim_` for an operator to find them). Whether both were
/// dropped.
async fn drop_databases(base: &StoreConfig, name: &str) -> bool {
    // The two at once: each server takes its time (Postgres a checkpoint, ClickHouse the
    // removal of every part's files).
    let (postgres, clickhouse) =
        tokio::join!(drop_postgres(base, name), drop_clickhouse(base, name));
    if let Err(e) = &postgres {
        eprintln!("apexctl: could not drop the Postgres database {name}: {e}");
    }
    if let Err(e) = &clickhouse {
        eprintln!("apexctl: could not drop the ClickHouse database {name}: {e}");
    }
    postgres.is_ok() && clickhouse.is_ok()
}

/// Drops the Postgres database `name`, closing any connection left to it.
async fn drop_postgres(base: &StoreConfig, name: &str) -> anyhow::Result<()> {
    let mut admin = PgConnection::connect(&base.database_url).await?;
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!(
        "DROP DATABASE IF EXISTS {name} WITH (FORCE)"
    )))
    .execute(&mut admin)
    .await?;
    let _ = admin.close().await;
    Ok(())
}

/// Drops the ClickHouse database `name` table by table, its materialized views first, then
/// the empty database. (ClickHouse 18.16's `DROP DATABASE` of a database just written by the
/// pipeline, with hundreds of parts waiting for removal, has been seen to take minutes; the
/// tables one by one go at once.) Each statement has a minute at most.
async fn drop_clickhouse(base: &StoreConfig, name: &str) -> anyhow::Result<()> {
    let client = base.clickhouse_server();
    let minute = Duration::from_secs(60);
    let tables: Vec<(String, String)> = tokio::time::timeout(
        minute,
        client
            .query("SELECT name, engine FROM system.tables WHERE database = ?")
            .bind(name)
            .fetch_all::<(String, String)>(),
    )
    .await??;
    let (views, others): (Vec<_>, Vec<_>) = tables
        .into_iter()
        .partition(|(_, engine)| engine == "MaterializedView");
    for (table, _) in views.into_iter().chain(others) {
        // Names come from ClickHouse's own catalogue of our database: quoted as identifiers.
        let statement = format!("DROP TABLE IF EXISTS {name}.`{}`", table.replace('`', ""));
        tokio::time::timeout(minute, client.query(&statement).execute()).await??;
    }
    tokio::time::timeout(
        minute,
        client
            .query(&format!("DROP DATABASE IF EXISTS {name}"))
            .execute(),
    )
    .await??;
    Ok(())
}
