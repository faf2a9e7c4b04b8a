//! The server's life: connect the stores, migrate, then accept connections until `shutdown`
//! resolves; then stop accepting, let in-flight requests finish (up to the grace period) and
//! return. `main` and the tests call the same [`run`].

use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

use crate::config::ServerConfig;
use crate::{routes, telemetry};

/// Why the server could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Postgres could not be reached at start-up.
    #[error("cannot connect to Postgres (DATABASE_URL): {0}")]
    Postgres(#[from] sqlx::Error),
    /// A migration failed at start-up.
    #[error(transparent)]
    Migrate(#[from] apex_pipeline::migrate::MigrateError),
    /// The write-ahead log folder cannot be created.
    #[error("APEX_WAL_DIR {path} cannot be created: {source}")]
    WalDir {
        /// The folder.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// What every request handler can reach.
pub struct AppState {
    /// Postgres pool.
    pub pool: PgPool,
    /// The configuration the server runs with.
    pub config: ServerConfig,
}

/// Runs the server on `listener` until `shutdown` resolves, then drains and returns.
pub async fn run(
    config: ServerConfig,
    listener: TcpListener,
    shutdown: impl Future<Output = ()>,
) -> Result<(), ServerError> {
    telemetry::prometheus();
    std::fs::create_dir_all(&config.wal_dir).map_err(|source| ServerError::WalDir {
        path: config.wal_dir.display().to_string(),
        source,
    })?;
    let pool = config.stores.connect_postgres().await?;
    if config.migrate_on_start {
        apex_pipeline::migrate::migrate_all(&pool, &config.stores).await?;
    }
    let state = Arc::new(AppState {
        pool,
        config: config.clone(),
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

    let graceful = GracefulShutdown::new();
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
        metrics::counter!(telemetry::CONNECTIONS_TOTAL).increment(1);
        let state = state.clone();
        let service = service_fn(move |request| {
            let state = state.clone();
            async move { Ok::<_, Infallible>(routes::handle(state, request).await) }
        });
        let connection = graceful.watch(
            builder
                .serve_connection(TokioIo::new(stream), service)
                .into_owned(),
        );
        tokio::spawn(async move {
            metrics::gauge!(telemetry::CONNECTIONS_OPEN).increment(1.0);
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "connection ended with an error");
            }
            metrics::gauge!(telemetry::CONNECTIONS_OPEN).decrement(1.0);
            drop(slot);
        });
    }

    drop(listener);
    tracing::info!("shutting down: draining connections");
    tokio::select! {
        () = graceful.shutdown() => tracing::info!("all connections closed"),
        () = tokio::time::sleep(config.shutdown_grace) => {
            tracing::warn!("shutdown grace period over, closing remaining connections");
        }
    }
    Ok(())
}
