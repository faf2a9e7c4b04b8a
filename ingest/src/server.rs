//! The server's life: connect the stores, migrate, then accept connections until `shutdown`
//! resolves; then stop accepting, let in-flight requests finish (up to the grace period), shut
//! the sink down (everything acknowledged is durable) and return. `main` starts the durable
//! sink and calls [`run_with_sink`]; the tests call the same function with the sink they want.

use std::future::Future;
use std::sync::Arc;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, watch};

use apex_pipeline::sink::RecordSink;

use crate::config::ServerConfig;
use crate::conn::{self, Timeouts};
use crate::dedup::Dedup;
use crate::keycache::KeyCache;
use crate::state::AppState;
use crate::{names, telemetry};

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Postgres could not be reached at start-up.
    #[error("cannot connect to Postgres (DATABASE_URL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// The API keys could not be read at start-up (a row the edge cannot read).
    #[error("cannot load the API keys: {0}")]
    Keys(apex_billing::BillingError),
    /// A migration failed at start-up.
    #[error(transparent)]
    Migrate(#[from] apex_core::migrate::MigrateError),
    /// The write-ahead log folder cannot be created.
    #[error("APEX_WAL_DIR {path} cannot be created: {source}")]
    WalDir {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// Runs the server with the given sink (tests pass their own) until `shutdown` resolves;
/// then stops accepting, lets in-flight requests finish, and shuts the sink down, which makes
/// everything it acknowledged durable.
pub async fn run_with_sink(
    config: ServerConfig,
    listener: TcpListener,
    sink: Arc<dyn RecordSink>,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    telemetry::prometheus();
    // Counters that only move on trouble start at 0, so their alerts have a series to read.
    metrics::counter!(names::QUEUE_FULL_TOTAL).increment(0);
    metrics::counter!(names::DEDUP_EVICTIONS_TOTAL).increment(0);
    metrics::counter!(names::DEDUP_FULL_TOTAL).increment(0);
    std::fs::create_dir_all(&config.wal_dir).map_err(|source| ServerError::WalDir {
        path: config.wal_dir.display().to_string(),
        source,
    })?;
    let pool = config.stores.connect_postgres().await?;
    if config.migrate_on_start {
        apex_core::migrate::migrate_all(&pool, &config.stores).await?;
    }
    let keys = KeyCache::new(pool.clone());
    keys.refresh_all().await.map_err(|e| match e {
        // Postgres could not be reached: said as before the key queries moved to billing.
        apex_billing::BillingError::Database(e) => ServerError::Postgres(e),
        other => ServerError::Keys(other),
    })?;
    let dedup = Arc::new(Dedup::new(
        config.dedup_window,
        config.dedup_max_bytes,
        config.dedup_capacity,
    ));
    let replayed = sink.replay_event_ids(&mut |customer, event| dedup.remember(customer, event));
    if replayed > 0 {
        tracing::info!(
            ids = replayed,
            "dedup: remembered the event ids of the write-ahead log"
        );
    }
    let (stop_background, background_stopped) = tokio::sync::watch::channel(false);
    let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let listener_task = tokio::spawn(
        keys.clone()
            .listen(config.key_refresh, stopped(background_stopped.clone())),
    );
    let rate_limits = Arc::new(crate::ratelimit::RateLimits::new(
        config.customer_rate_limit,
        config.customer_rate_burst,
    ));
    let sweeper = {
        let dedup = dedup.clone();
        let rate_limits = rate_limits.clone();
        let stop = stopped(background_stopped.clone());
        tokio::spawn(async move {
            tokio::pin!(stop);
            let mut every_minute = tokio::time::interval(std::time::Duration::from_secs(60));
            loop {
                tokio::select! {
                    () = &mut stop => return,
                    _ = every_minute.tick() => {
                        // The sweep reads every entry of the table, one shard lock at a time
                        // (about 150 µs a shard, 10 ms in all at 128 MiB): off the async
                        // workers, so no worker stalls that long; a request meeting the shard
                        // being read waits at most its 150 µs.
                        let dedup = dedup.clone();
                        if let Err(e) = tokio::task::spawn_blocking(move || dedup.sweep()).await {
                            tracing::error!(error = %e, "the dedup sweep failed");
                        }
                        rate_limits.prune();
                    }
                }
            }
        })
    };
    let state = Arc::new(AppState {
        pool,
        keys,
        dedup,
        sink: sink.clone(),
        limits: config.limits.clone(),
        rate_limits,
        // A tenth of the connection slots at most: holds must not take them all.
        holds: crate::ratelimit::RefusalHolds::new(
            config.limits.rate_limited_delay,
            (config.max_connections / 10).max(1),
        ),
        clickhouse: config.stores.clickhouse(),
        jwt_secret: config.jwt_secret.clone(),
        admin_token: config.admin_token.clone(),
        stripe_webhook_secrets: config.stripe_webhook_secrets.clone(),
        resend_webhook_secrets: config.resend_webhook_secrets.clone(),
        dunning: config.dunning.clone(),
    });
    let local_addr = listener.local_addr().ok();
    tracing::info!(addr = ?local_addr, "apex-server listening");

    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(config.header_read_timeout)
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(256);

    let builder = Arc::new(builder);
    let timeouts = Timeouts {
        first_bytes: config.header_read_timeout,
        idle: config.idle_timeout,
    };
    let (stop_connections, connections_stop) = watch::channel(false);
    let connection_slots = Arc::new(Semaphore::new(config.max_connections));
    tokio::pin!(shutdown);
    loop {
        // Take a slot before accepting: at the cap, new connections wait in the kernel's
        // backlog instead of being accepted and starved.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = connection_slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, _peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    // Out of file descriptors and similar: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        metrics::counter!(names::CONNECTIONS_TOTAL).increment(1);
        let (state, builder, stop) = (state.clone(), builder.clone(), connections_stop.clone());
        tokio::spawn(async move {
            metrics::gauge!(names::CONNECTIONS_OPEN).increment(1.0);
            conn::serve(stream, builder, state, timeouts, stop).await;
            metrics::gauge!(names::CONNECTIONS_OPEN).decrement(1.0);
            drop(slot);
        });
    }

    drop(listener);
    state.holds.drain();
    tracing::info!("shutting down: draining connections");
    let _ = stop_connections.send(true);
    // Every connection gives its slot back when it ends: all of them back, all ended.
    // At most a million (`config::MAX_CONNECTIONS`): a u32.
    let all = u32::try_from(config.max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = connection_slots.acquire_many(all) => tracing::info!("all connections closed"),
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over, closing remaining connections");
        }
    }
    let _ = stop_background.send(true);
    let _ = listener_task.await;
    let _ = sweeper.await;
    // The sink's shutdown blocks until its queue is durable; keep it off the async workers.
    let _ = tokio::task::spawn_blocking(move || sink.shutdown()).await;
    tracing::info!("pipeline flushed");
    Ok(())
}
