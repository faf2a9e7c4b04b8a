//! `apex-server` configuration: one typed struct from environment variables, with defaults
//! and validation, so a bad value stops start-up with one line naming it.

use std::net::SocketAddr;
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use apex_core::env::{ConfigError, EnvSource};
use apex_core::stores::StoreConfig;
use apex_pipeline::durable::DurableConfig;

use crate::dedup::{MAX_MAX_BYTES, MIN_MAX_BYTES};

/// A secret value whose `Debug` never shows it.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// The secret itself, for the one place that uses it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Everything `apex-server` reads from the environment.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// `APEX_LISTEN`, default `127.0.0.1:8080`.
    pub listen: SocketAddr,
    /// The stores (`DATABASE_URL`, `CLICKHOUSE_URL`, ...).
    pub stores: StoreConfig,
    /// `APEX_WAL_DIR`, default `.apex/wal`: the write-ahead log of accepted records.
    pub wal_dir: PathBuf,
    /// `APEX_JWT_SECRET` (required, at least 32 bytes): signs dashboard tokens.
    pub jwt_secret: Secret,
    /// `APEX_ADMIN_TOKEN` (optional, at least 16 bytes): admin endpoints are off without it.
    pub admin_token: Option<Secret>,
    /// `STRIPE_WEBHOOK_SECRET` (optional): one or more `whsec_...`, comma-separated for rotation.
    pub stripe_webhook_secrets: Vec<Secret>,
    /// `RESEND_WEBHOOK_SECRET` (optional): one or more Svix `whsec_<base64>` secrets,
    /// comma-separated (two during a rotation).
    pub resend_webhook_secrets: Vec<Secret>,
    /// `APEX_DUNNING_RETRY_DAYS` (default `3,4,7`) and `APEX_DUNNING_POSTPONE_SECS`: the
    /// retry schedule a failed-payment webhook opens a case on
    /// ([`apex_billing::dunning::Policy`]), checked at start.
    pub dunning: apex_billing::dunning::Policy,
    /// `APEX_MAX_CONNECTIONS`, default 10,000, at most [`MAX_CONNECTIONS`]: connections served
    /// at once; more wait in the backlog.
    pub max_connections: usize,
    /// `APEX_HEADER_READ_TIMEOUT_MS`, default 10,000: a new connection must send its first
    /// bytes in time (one that sends nothing would hold one of the `APEX_MAX_CONNECTIONS`
    /// slots for ever), then each request its headers (hyper's timer, which starts once the
    /// first bytes are in: a first request's headers can take up to twice this); an HTTP/1
    /// connection idle between requests is closed after it too.
    pub header_read_timeout: Duration,
    /// `APEX_IDLE_TIMEOUT_MS`, default 60,000: an HTTP/2 connection with no request open for
    /// this long is closed (GOAWAY, then close), so idle connections do not keep the slots.
    pub idle_timeout: Duration,
    /// `APEX_SHUTDOWN_GRACE_MS`, default 30,000: how long in-flight requests get at shutdown.
    pub shutdown_grace: Duration,
    /// `APEX_MIGRATE_ON_START`, default true: apply pending migrations before serving.
    pub migrate_on_start: bool,
    /// Request limits of the ingest endpoints.
    pub limits: IngestLimits,
    /// `APEX_QUEUE_CAPACITY`, default 4,096: requests waiting for the pipeline at most.
    pub queue_capacity: usize,
    /// `APEX_DEDUP_WINDOW_SECS`, default 86,400: how long an event id is remembered.
    pub dedup_window: Duration,
    /// `APEX_DEDUP_CAPACITY`, default 8,000,000: event ids remembered at most, about: it is
    /// split over 256 generations, rounded down to a multiple of 256 but at least 256 (the
    /// byte budget usually binds first).
    pub dedup_capacity: usize,
    /// `APEX_DEDUP_MAX_BYTES`, default 134,217,728 (128 MiB), 1 MiB to 4 GiB: the dedup
    /// table's memory, allocated and made resident (every page written) at start
    /// ([`crate::dedup`]).
    pub dedup_max_bytes: usize,
    /// `APEX_KEY_REFRESH_SECS`, default 60: full key cache refresh period.
    pub key_refresh: Duration,
    /// `APEX_WAL_MAX_BYTES`, default 4 GiB: unapplied log beyond which ingest answers 503.
    pub wal_max_bytes: u64,
    /// `APEX_WAL_GROUP_COMMIT_US`, default 0: how long the log writer may hold a group open
    /// for more requests before its fsync (0: the group is whatever queued during the last
    /// fsync; at most 2,000).
    pub wal_group_commit_window: Duration,
    /// `APEX_WAL_PREALLOCATE`, default `true`: write the log's next segment ahead as zeros
    /// while its group commits are small, so their fsync writes only data (`false` on
    /// copy-on-write filesystems such as ZFS or btrfs, where it only adds writes).
    pub wal_preallocate: bool,
    /// `APEX_CUSTOMER_RATE_LIMIT` (records per second) and `APEX_CUSTOMER_RATE_BURST`
    /// (records), each optional and at least 1: when set, they replace the plans' rate limits
    /// (`plans.rate_limit_records_per_sec` and `plans.rate_limit_burst`) for every customer.
    pub customer_rate_limit: Option<NonZeroU32>,
    /// See [`ServerConfig::customer_rate_limit`].
    pub customer_rate_burst: Option<NonZeroU32>,
}

/// Size and time limits of the ingest endpoints.
#[derive(Debug, Clone)]
pub struct IngestLimits {
    /// `APEX_TRACK_MAX_BODY_BYTES`, default 65,536.
    pub track_max_body_bytes: usize,
    /// `APEX_BATCH_MAX_BODY_BYTES`, default 8 MiB, compressed and decompressed alike.
    pub batch_max_body_bytes: usize,
    /// `APEX_BATCH_MAX_RECORDS`, default 10,000.
    pub batch_max_records: usize,
    /// `APEX_BODY_READ_TIMEOUT_MS`, default 30,000: the whole body must arrive in this time.
    pub body_read_timeout: Duration,
    /// `APEX_RATE_LIMITED_DELAY_MS`, default 500, 0 to answer at once, at most 10,000: how
    /// long a request refused with 429 for its customer's rate limit is held before its
    /// answer, never longer than its `Retry-After`, with at most a tenth of
    /// `APEX_MAX_CONNECTIONS` held at once ([`crate::ratelimit::RefusalHolds`]).
    pub rate_limited_delay: Duration,
}

impl ServerConfig {
    /// Reads and validates the configuration.
    pub fn from_env(env: &EnvSource) -> Result<Self, ConfigError> {
        let stores = StoreConfig::from_env(env)?;
        let listen = env.parse_or("APEX_LISTEN", SocketAddr::from(([127, 0, 0, 1], 8080)))?;
        let wal_dir = PathBuf::from(
            env.optional("APEX_WAL_DIR")
                .unwrap_or_else(|| ".apex/wal".to_owned()),
        );
        let jwt_secret = env.required_with_hint(
            "APEX_JWT_SECRET",
            "set it to a random string of at least 32 characters, e.g. `openssl rand -hex 32`",
        )?;
        if jwt_secret.len() < 32 {
            return Err(ConfigError::Invalid {
                name: "APEX_JWT_SECRET",
                reason: "must be at least 32 bytes".to_owned(),
            });
        }
        let admin_token = env.optional("APEX_ADMIN_TOKEN");
        if admin_token.as_ref().is_some_and(|t| t.len() < 16) {
            return Err(ConfigError::Invalid {
                name: "APEX_ADMIN_TOKEN",
                reason: "must be at least 16 bytes".to_owned(),
            });
        }
        let stripe_webhook_secrets: Vec<Secret> = env
            .optional("STRIPE_WEBHOOK_SECRET")
            .map(|raw| {
                raw.split(',')
                    .map(|s| Secret(s.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        if stripe_webhook_secrets
            .iter()
            .any(|s| !s.0.starts_with("whsec_") || s.0.len() < 12)
        {
            return Err(ConfigError::Invalid {
                name: "STRIPE_WEBHOOK_SECRET",
                reason: "each comma-separated secret must start with whsec_".to_owned(),
            });
        }
        let resend_webhook_secrets: Vec<Secret> = env
            .optional("RESEND_WEBHOOK_SECRET")
            .map(|raw| {
                raw.split(',')
                    .map(|s| Secret(s.trim().to_owned()))
                    .collect()
            })
            .unwrap_or_default();
        // Checked here, not per request: a secret that is no key would refuse every delivery.
        if resend_webhook_secrets
            .iter()
            .any(|s| apex_billing::email_webhooks::signing_key(&s.0).is_none())
        {
            return Err(ConfigError::Invalid {
                name: "RESEND_WEBHOOK_SECRET",
                reason:
                    "each comma-separated secret must be whsec_ and base64 of at least 16 bytes"
                        .to_owned(),
            });
        }
        let dunning = apex_billing::dunning::Policy::from_env(env)?;
        let max_connections = at_least_one(env, "APEX_MAX_CONNECTIONS", 10_000)?;
        if max_connections > MAX_CONNECTIONS {
            return Err(ConfigError::Invalid {
                name: "APEX_MAX_CONNECTIONS",
                reason: format!("at most {MAX_CONNECTIONS}"),
            });
        }
        let header_read_timeout = millis(env, "APEX_HEADER_READ_TIMEOUT_MS", 10_000)?;
        let idle_timeout = millis(env, "APEX_IDLE_TIMEOUT_MS", 60_000)?;
        let shutdown_grace = millis(env, "APEX_SHUTDOWN_GRACE_MS", 30_000)?;
        let migrate_on_start = env.parse_or("APEX_MIGRATE_ON_START", true)?;
        let limits = IngestLimits {
            track_max_body_bytes: at_least_one(env, "APEX_TRACK_MAX_BODY_BYTES", 64 * 1024)?,
            batch_max_body_bytes: at_least_one(env, "APEX_BATCH_MAX_BODY_BYTES", 8 * 1024 * 1024)?,
            batch_max_records: at_least_one(env, "APEX_BATCH_MAX_RECORDS", 10_000)?,
            body_read_timeout: millis(env, "APEX_BODY_READ_TIMEOUT_MS", 30_000)?,
            rate_limited_delay: Duration::from_millis(
                env.parse_or("APEX_RATE_LIMITED_DELAY_MS", 500u64)?,
            ),
        };
        if limits.rate_limited_delay > MAX_RATE_LIMITED_DELAY {
            return Err(ConfigError::Invalid {
                name: "APEX_RATE_LIMITED_DELAY_MS",
                reason: "must be at most 10000 (10 s): a held refusal keeps its connection"
                    .to_owned(),
            });
        }
        let queue_capacity = at_least_one(env, "APEX_QUEUE_CAPACITY", 4_096)?;
        let dedup_window = Duration::from_secs(env.parse_or("APEX_DEDUP_WINDOW_SECS", 86_400u64)?);
        let dedup_capacity = at_least_one(env, "APEX_DEDUP_CAPACITY", 8_000_000)?;
        let dedup_max_bytes = env.parse_or("APEX_DEDUP_MAX_BYTES", 128usize << 20)?;
        if !(MIN_MAX_BYTES..=MAX_MAX_BYTES).contains(&dedup_max_bytes) {
            return Err(ConfigError::Invalid {
                name: "APEX_DEDUP_MAX_BYTES",
                reason: format!("must be {MIN_MAX_BYTES} (1 MiB) to {MAX_MAX_BYTES} (4 GiB) bytes"),
            });
        }
        let key_refresh =
            Duration::from_secs(at_least_one(env, "APEX_KEY_REFRESH_SECS", 60)? as u64);
        let wal_max_bytes = at_least_one(env, "APEX_WAL_MAX_BYTES", 4 << 30)? as u64;
        if wal_max_bytes < 64 << 20 {
            return Err(ConfigError::Invalid {
                name: "APEX_WAL_MAX_BYTES",
                reason: "must be at least one 64 MiB segment (67108864)".to_owned(),
            });
        }
        let group_commit_us: u64 = env.parse_or("APEX_WAL_GROUP_COMMIT_US", 0)?;
        if group_commit_us > 2_000 {
            return Err(ConfigError::Invalid {
                name: "APEX_WAL_GROUP_COMMIT_US",
                reason: "must be at most 2000 (2 ms): every request waits for it".to_owned(),
            });
        }
        let wal_preallocate = env.parse_or("APEX_WAL_PREALLOCATE", true)?;
        let customer_rate_limit = optional_at_least_one(env, "APEX_CUSTOMER_RATE_LIMIT")?;
        let customer_rate_burst = optional_at_least_one(env, "APEX_CUSTOMER_RATE_BURST")?;
        Ok(Self {
            listen,
            stores,
            wal_dir,
            jwt_secret: Secret(jwt_secret),
            admin_token: admin_token.map(Secret),
            stripe_webhook_secrets,
            resend_webhook_secrets,
            dunning,
            max_connections,
            header_read_timeout,
            idle_timeout,
            shutdown_grace,
            migrate_on_start,
            limits,
            queue_capacity,
            dedup_window,
            dedup_capacity,
            dedup_max_bytes,
            key_refresh,
            wal_max_bytes,
            wal_group_commit_window: Duration::from_micros(group_commit_us),
            wal_preallocate,
            customer_rate_limit,
            customer_rate_burst,
        })
    }
}

impl ServerConfig {
    /// The durable sink's settings: the log in `APEX_WAL_DIR` applied to the stores, with the
    /// queue, log cap and group-commit window of this configuration.
    pub fn durable_config(&self) -> DurableConfig {
        let mut sink = DurableConfig::new(&self.wal_dir, &self.stores);
        sink.queue_capacity = self.queue_capacity;
        sink.max_log_bytes = self.wal_max_bytes;
        sink.group_commit_window = self.wal_group_commit_window;
        sink.preallocate_segments = self.wal_preallocate;
        sink
    }
}

/// The longest `APEX_RATE_LIMITED_DELAY_MS` accepted.
const MAX_RATE_LIMITED_DELAY: Duration = Duration::from_secs(10);

fn at_least_one(env: &EnvSource, name: &'static str, default: usize) -> Result<usize, ConfigError> {
    let value = env.parse_or(name, default)?;
    if value == 0 {
        return Err(ConfigError::Invalid {
            name,
            reason: "must be at least 1".to_owned(),
        });
    }
    Ok(value)
}

/// An optional count of at least 1 (unset: `None`).
fn optional_at_least_one(
    env: &EnvSource,
    name: &'static str,
) -> Result<Option<NonZeroU32>, ConfigError> {
    if env.optional(name).is_none() {
        return Ok(None);
    }
    let value: u32 = env.parse_or(name, 0)?;
    NonZeroU32::new(value)
        .map(Some)
        .ok_or(ConfigError::Invalid {
            name,
            reason: "must be at least 1".to_owned(),
        })
}

/// The most `APEX_MAX_CONNECTIONS` can be: far past any file descriptor limit, and what the
/// shutdown can count back in one go.
pub const MAX_CONNECTIONS: usize = 1_000_000;

fn millis(env: &EnvSource, name: &'static str, default: u64) -> Result<Duration, ConfigError> {
    let ms = env.parse_or(name, default)?;
    if ms == 0 {
        return Err(ConfigError::Invalid {
            name,
            reason: "must be at least 1 ms".to_owned(),
        });
    }
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECRET: &str = "0123456789abcdef0123456789abcdef";

    fn env(extra: &[(&'static str, &'static str)]) -> EnvSource {
        let mut pairs = vec![
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:15432/apex"),
            ("CLICKHOUSE_URL", "http://127.0.0.1:18123"),
            ("APEX_JWT_SECRET", SECRET),
        ];
        pairs.extend_from_slice(extra);
        EnvSource::from_pairs(pairs)
    }

    #[test]
    fn defaults() {
        let cfg = ServerConfig::from_env(&env(&[])).unwrap();
        assert_eq!(cfg.listen.to_string(), "127.0.0.1:8080");
        assert_eq!(cfg.wal_dir, PathBuf::from(".apex/wal"));
        assert!(cfg.admin_token.is_none() && cfg.stripe_webhook_secrets.is_empty());
        assert!(cfg.resend_webhook_secrets.is_empty());
        assert!(cfg.migrate_on_start);
        assert!(cfg.wal_preallocate && cfg.durable_config().preallocate_segments);
        let off = ServerConfig::from_env(&env(&[("APEX_WAL_PREALLOCATE", "false")])).unwrap();
        assert!(!off.durable_config().preallocate_segments);
        let err = ServerConfig::from_env(&env(&[("APEX_WAL_PREALLOCATE", "no")]))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("APEX_WAL_PREALLOCATE is invalid"), "{err}");
        assert_eq!(
            (cfg.dedup_max_bytes, cfg.dedup_capacity),
            (134_217_728, 8_000_000)
        );
        assert_eq!(
            (cfg.customer_rate_limit, cfg.customer_rate_burst),
            (None, None)
        );
        let cfg = ServerConfig::from_env(&env(&[
            ("APEX_CUSTOMER_RATE_LIMIT", "5"),
            ("APEX_CUSTOMER_RATE_BURST", "10"),
        ]))
        .unwrap();
        assert_eq!(
            (cfg.customer_rate_limit, cfg.customer_rate_burst),
            (NonZeroU32::new(5), NonZeroU32::new(10))
        );
    }

    #[test]
    fn each_bad_value_names_its_variable() {
        for (name, value) in [
            ("APEX_LISTEN", "localhost"),
            ("APEX_JWT_SECRET", "short"),
            ("APEX_ADMIN_TOKEN", "short"),
            ("STRIPE_WEBHOOK_SECRET", "whsec_abcdefgh,sk_live_x"),
            (
                "RESEND_WEBHOOK_SECRET",
                "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw,whsec_not-base64",
            ),
            ("RESEND_WEBHOOK_SECRET", "MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
            ("APEX_MAX_CONNECTIONS", "0"),
            ("APEX_MAX_CONNECTIONS", "1000001"),
            ("APEX_HEADER_READ_TIMEOUT_MS", "-1"),
            ("APEX_IDLE_TIMEOUT_MS", "0"),
            ("APEX_SHUTDOWN_GRACE_MS", "0"),
            ("APEX_MIGRATE_ON_START", "maybe"),
            ("APEX_BATCH_MAX_RECORDS", "0"),
            ("APEX_QUEUE_CAPACITY", "many"),
            ("APEX_DEDUP_CAPACITY", "0"),
            ("APEX_DEDUP_MAX_BYTES", "0"),
            ("APEX_DEDUP_MAX_BYTES", "128MiB"),
            ("APEX_DEDUP_MAX_BYTES", "1048575"),
            ("APEX_DEDUP_MAX_BYTES", "4294967297"),
            ("APEX_CUSTOMER_RATE_LIMIT", "0"),
            ("APEX_CUSTOMER_RATE_LIMIT", "fast"),
            ("APEX_CUSTOMER_RATE_BURST", "-5"),
            ("APEX_RATE_LIMITED_DELAY_MS", "10001"),
            ("APEX_RATE_LIMITED_DELAY_MS", "half"),
        ] {
            let err = ServerConfig::from_env(&env(&[(name, value)]))
                .unwrap_err()
                .to_string();
            assert!(err.starts_with(name), "{name}={value}: {err}");
            assert!(!err.contains('\n'), "one line: {err}");
        }
    }

    #[test]
    fn missing_jwt_secret_stops_start_up() {
        let env = EnvSource::from_pairs([
            ("DATABASE_URL", "postgres://x/y"),
            ("CLICKHOUSE_URL", "http://x"),
        ]);
        let err = ServerConfig::from_env(&env).unwrap_err().to_string();
        assert!(err.starts_with("APEX_JWT_SECRET is required"), "{err}");
    }

    #[test]
    fn rotation_takes_several_webhook_secrets_and_hides_them() {
        let cfg = ServerConfig::from_env(&env(&[(
            "STRIPE_WEBHOOK_SECRET",
            "whsec_oldsecret1, whsec_newsecret2",
        )]))
        .unwrap();
        assert_eq!(cfg.stripe_webhook_secrets.len(), 2);
        assert_eq!(cfg.stripe_webhook_secrets[1].expose(), "whsec_newsecret2");
        let cfg = ServerConfig::from_env(&env(&[(
            "RESEND_WEBHOOK_SECRET",
            "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw, whsec_YXBleC1yb3RhdGVkLXJlc2VuZC1zZWNyZXQtMjAyNg==",
        )]))
        .unwrap();
        assert_eq!(cfg.resend_webhook_secrets.len(), 2);
        let shown = format!("{cfg:?}");
        assert!(
            !shown.contains("whsec_") && !shown.contains(SECRET),
            "{shown}"
        );
    }
}
