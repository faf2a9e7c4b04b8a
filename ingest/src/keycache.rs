//! The API key cache of the edge: every active key's SHA-256 mapped to its customer and the
//! customer's status, loaded from Postgres at start and kept current by LISTEN/NOTIFY (the
//! migrations' triggers notify `apex_key_change` with the customer id on any key or status
//! change), with a periodic full refresh as a safety net. Each key also carries its customer's
//! plan rate limit ([`crate::ratelimit`]); a plan change reaches the edge with the next full
//! refresh (`APEX_KEY_REFRESH_SECS`), or sooner when a key or status change notifies.
//!
//! A miss goes to Postgres (a key created a moment ago may not have been notified yet), but
//! through a small number of permits and a bounded negative cache, so random keys cannot
//! hammer Postgres. While Postgres is down, every cached key keeps working.

use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use apex_billing::BillingError;
use apex_billing::keys::{self, KeyOwner, PlanRateLimit, has_key_shape, hash_key};
use apex_billing::status::CustomerStatus;
use backon::{BackoffBuilder, ExponentialBuilder};
use dashmap::DashMap;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Semaphore;

use crate::names;
use crate::ratelimit::PlanLimit;

/// The channel the migrations' triggers notify.
pub const KEY_CHANGE_CHANNEL: &str = "apex_key_change";
/// Unknown keys remembered at most; the cache is cleared when it would grow past this.
pub const NEGATIVE_CAPACITY: usize = 100_000;
/// How long an unknown key is remembered. A key created meanwhile is notified and replaces it.
pub const NEGATIVE_TTL: Duration = Duration::from_secs(60);
/// Postgres lookups for cache misses running at once, at most.
pub const MISS_LOOKUP_PERMITS: usize = 4;
/// How long a miss waits for a lookup permit before it is answered 503.
pub const MISS_LOOKUP_WAIT: Duration = Duration::from_millis(500);
/// Waits between attempts to reconnect the listener: 100 ms doubling to 1 s, so key changes
/// reach the edge within about a second of Postgres coming back.
const RECONNECT: ExponentialBuilder = ExponentialBuilder::new()
    .with_min_delay(Duration::from_millis(100))
    .with_max_delay(Duration::from_secs(1))
    .with_factor(2.0)
    .without_max_times();

type KeyHash = [u8; 32];

/// What the cache knows of a key.
#[derive(Debug, Clone)]
struct CachedKey {
    customer_id: Arc<str>,
    status: CustomerStatus,
    limit: PlanLimit,
}

impl From<KeyOwner> for CachedKey {
    fn from(owner: KeyOwner) -> Self {
        let limit = plan_limit(owner.plan, &mut Default::default());
        Self {
            customer_id: owner.customer_id.into(),
            status: owner.customer_status,
            limit,
        }
    }
}

/// The edge's view of a plan's limit; plans seen before share one allocation of their id.
fn plan_limit(
    plan: Option<PlanRateLimit>,
    plans: &mut std::collections::HashMap<String, Arc<str>>,
) -> PlanLimit {
    let Some(plan) = plan else {
        return PlanLimit::default_limit();
    };
    match (
        NonZeroU32::new(plan.records_per_sec),
        NonZeroU32::new(plan.burst),
    ) {
        (Some(records_per_sec), Some(burst)) => PlanLimit {
            plan: plans
                .entry(plan.plan_id)
                .or_insert_with_key(|id| Arc::from(id.as_str()))
                .clone(),
            records_per_sec,
            burst,
        },
        // The query refuses zero values already; keep a row that slips past it served.
        _ => PlanLimit::default_limit(),
    }
}

/// An active customer as the ingest endpoints need it: its id and its plan's rate limit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActiveCustomer {
    /// The customer's id.
    pub id: Arc<str>,
    /// Its plan's rate limit.
    pub limit: PlanLimit,
}

/// The verdict on a presented key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyVerdict {
    /// Active key of an active customer.
    Active(ActiveCustomer),
    /// Active key of a suspended customer.
    Suspended,
    /// Unknown, revoked, malformed, or its customer canceled.
    Unknown,
    /// Not in the cache and Postgres cannot be asked right now.
    Unavailable,
}

/// The cache. Share it behind an `Arc`.
pub struct KeyCache {
    pool: PgPool,
    keys: DashMap<KeyHash, CachedKey>,
    by_customer: DashMap<Arc<str>, Vec<KeyHash>>,
    unknown: DashMap<KeyHash, Instant>,
    miss_permits: Semaphore,
    loaded: AtomicBool,
}

impl KeyCache {
    /// An empty cache; call [`KeyCache::refresh_all`] (or [`KeyCache::spawn_listener`]) to fill it.
    pub fn new(pool: PgPool) -> Arc<Self> {
        Arc::new(Self {
            pool,
            keys: DashMap::new(),
            by_customer: DashMap::new(),
            unknown: DashMap::new(),
            miss_permits: Semaphore::new(MISS_LOOKUP_PERMITS),
            loaded: AtomicBool::new(false),
        })
    }

    /// True once a full load has succeeded.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(Ordering::Acquire)
    }

    /// Keys cached now.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// True when no key is cached.
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Judges a presented plain key.
    pub async fn check(&self, plain: &str) -> KeyVerdict {
        if !has_key_shape(plain) {
            return KeyVerdict::Unknown;
        }
        let hash = hash_key(plain);
        if let Some(verdict) = self.cached(&hash) {
            return verdict;
        }
        if self
            .unknown
            .get(&hash)
            .is_some_and(|seen| seen.elapsed() < NEGATIVE_TTL)
        {
            return KeyVerdict::Unknown;
        }
        // Only a few misses go to Postgres at once; the others wait their turn briefly, and
        // a flood of unknown keys ends in 503s rather than in load on Postgres.
        let Ok(Ok(_permit)) =
            tokio::time::timeout(MISS_LOOKUP_WAIT, self.miss_permits.acquire()).await
        else {
            return KeyVerdict::Unavailable;
        };
        // Another request may have loaded this key while we waited.
        if let Some(verdict) = self.cached(&hash) {
            return verdict;
        }
        match self.lookup(&hash).await {
            Ok(Some(key)) => {
                self.insert(hash, key);
                self.cached(&hash).unwrap_or(KeyVerdict::Unknown)
            }
            Ok(None) => {
                if self.unknown.len() >= NEGATIVE_CAPACITY {
                    self.unknown.clear();
                }
                self.unknown.insert(hash, Instant::now());
                KeyVerdict::Unknown
            }
            Err(e) => {
                tracing::warn!(error = %e, "key lookup failed");
                KeyVerdict::Unavailable
            }
        }
    }

    fn cached(&self, hash: &KeyHash) -> Option<KeyVerdict> {
        let entry = self.keys.get(hash)?;
        Some(match entry.status {
            // Two reference counts, no allocation.
            CustomerStatus::Active => KeyVerdict::Active(ActiveCustomer {
                id: entry.customer_id.clone(),
                limit: entry.limit.clone(),
            }),
            CustomerStatus::Suspended => KeyVerdict::Suspended,
            CustomerStatus::Canceled => KeyVerdict::Unknown,
        })
    }

    async fn lookup(&self, hash: &KeyHash) -> Result<Option<CachedKey>, BillingError> {
        Ok(keys::active_key_by_hash(&self.pool, hash)
            .await?
            .map(CachedKey::from))
    }

    /// Puts a key into the cache directly, as a load would (benchmarks use it to fill the
    /// cache without a database).
    pub fn insert_key(&self, plain: &str, customer_id: &str, status: CustomerStatus) {
        self.insert(
            hash_key(plain),
            CachedKey {
                customer_id: customer_id.into(),
                status,
                limit: PlanLimit::default_limit(),
            },
        );
    }

    /// Remembers a key as unknown, as a failed lookup would (for benchmarks).
    pub fn insert_unknown(&self, plain: &str) {
        self.unknown.insert(hash_key(plain), Instant::now());
    }

    fn insert(&self, hash: KeyHash, key: CachedKey) {
        self.unknown.remove(&hash);
        let mut hashes = self.by_customer.entry(key.customer_id.clone()).or_default();
        if !hashes.contains(&hash) {
            hashes.push(hash);
        }
        drop(hashes);
        self.keys.insert(hash, key);
    }

    /// Replaces the cache's view of one customer with what Postgres holds now.
    pub async fn refresh_customer(&self, customer_id: &str) -> Result<(), BillingError> {
        let fresh: Vec<(KeyHash, CachedKey)> = keys::active_keys_of(&self.pool, customer_id)
            .await?
            .into_iter()
            .map(|owner| (owner.key_hash, CachedKey::from(owner)))
            .collect();
        if let Some((_, old)) = self.by_customer.remove(customer_id) {
            for hash in old {
                if !fresh.iter().any(|(h, _)| *h == hash) {
                    self.keys.remove(&hash);
                }
            }
        }
        for (hash, key) in fresh {
            self.insert(hash, key);
        }
        metrics::counter!(names::KEY_CACHE_REFRESHES_TOTAL, "kind" => "customer").increment(1);
        metrics::gauge!(names::KEY_CACHE_KEYS).set(self.keys.len() as f64);
        Ok(())
    }

    /// Reloads every active key and drops what is gone.
    pub async fn refresh_all(&self) -> Result<(), BillingError> {
        let owners = keys::all_active_keys(&self.pool).await?;
        let mut fresh: std::collections::HashMap<KeyHash, CachedKey> =
            std::collections::HashMap::with_capacity(owners.len());
        // Keys of one customer share one allocation of its id.
        let mut customers: std::collections::HashMap<String, Arc<str>> = Default::default();
        let mut plans: std::collections::HashMap<String, Arc<str>> = Default::default();
        for owner in owners {
            let customer_id = customers
                .entry(owner.customer_id)
                .or_insert_with_key(|id| Arc::from(id.as_str()))
                .clone();
            fresh.insert(
                owner.key_hash,
                CachedKey {
                    customer_id,
                    status: owner.customer_status,
                    limit: plan_limit(owner.plan, &mut plans),
                },
            );
        }
        self.keys.retain(|hash, _| fresh.contains_key(hash));
        self.by_customer.clear();
        for (hash, key) in fresh {
            self.insert(hash, key);
        }
        self.loaded.store(true, Ordering::Release);
        metrics::counter!(names::KEY_CACHE_REFRESHES_TOTAL, "kind" => "full").increment(1);
        metrics::gauge!(names::KEY_CACHE_KEYS).set(self.keys.len() as f64);
        Ok(())
    }

    /// Listens for key changes and refreshes; does a full refresh every `full_every` and after
    /// every reconnection (notifications sent while disconnected are lost). Runs until
    /// `shutdown` resolves.
    pub async fn listen(
        self: Arc<Self>,
        full_every: Duration,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        let mut full = tokio::time::interval(full_every);
        full.tick().await;
        // Reconnection waits grow to a second while Postgres stays away, and start over once
        // a connection listens.
        let mut reconnect = RECONNECT.build();
        'connect: loop {
            let connected = match PgListener::connect_with(&self.pool).await {
                Ok(mut listener) => listener.listen(KEY_CHANGE_CHANNEL).await.map(|()| listener),
                Err(e) => Err(e),
            };
            let mut listener = match connected {
                Ok(listener) => listener,
                Err(e) => {
                    tracing::warn!(error = %e, "key cache: cannot connect the listener; retrying");
                    let wait = reconnect.next().unwrap_or(Duration::from_secs(1));
                    tokio::select! {
                        () = &mut shutdown => return,
                        () = tokio::time::sleep(wait) => continue 'connect,
                    }
                }
            };
            reconnect = RECONNECT.build();
            // Anything may have changed while we were not listening.
            if let Err(e) = self.refresh_all().await {
                tracing::warn!(error = %e, "key cache: full refresh failed");
            }
            loop {
                tokio::select! {
                    () = &mut shutdown => return,
                    _ = full.tick() => {
                        if let Err(e) = self.refresh_all().await {
                            tracing::warn!(error = %e, "key cache: periodic refresh failed; serving cached keys");
                        }
                    }
                    notification = listener.try_recv() => match notification {
                        Ok(Some(n)) => {
                            if let Err(e) = self.refresh_customer(n.payload()).await {
                                tracing::warn!(error = %e, "key cache: customer refresh failed; full refresh");
                                let _ = self.refresh_all().await;
                            }
                        }
                        // The connection was lost and will be re-established on the next call:
                        // catch up with a full refresh.
                        Ok(None) => {
                            if let Err(e) = self.refresh_all().await {
                                tracing::warn!(error = %e, "key cache: refresh after reconnect failed");
                            }
                        }
                        Err(e) => {
                            tracing::warn!(error = %e, "key cache: listener failed; reconnecting");
                            let wait = reconnect.next().unwrap_or(Duration::from_secs(1));
                            tokio::select! {
                                () = &mut shutdown => return,
                                () = tokio::time::sleep(wait) => continue 'connect,
                            }
                        }
                    }
                }
            }
        }
    }
}
