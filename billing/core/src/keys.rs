//! API keys: issued as `rsk_` plus 40 base62 characters (238 random bits), shown once, and
//! stored only as their SHA-256 hash with a short visible prefix. A fast unsalted hash is the
//! right tool here: the keys are long random secrets, not passwords, and the edge must look
//! one up per request.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::Serialize;
use sha2::{Digest, Sha256};
use sqlx::PgExecutor;

use crate::error::BillingError;
use crate::ids;
use crate::status::CustomerStatus;

/// Every API key starts with this.
pub const KEY_PREFIX: &str = "rsk_";
/// Random characters after [`KEY_PREFIX`].
pub const KEY_RANDOM_LEN: usize = 40;
/// Characters of a key kept in the clear to tell keys apart: `rsk_` and 8 more.
pub const VISIBLE_PREFIX_LEN: usize = 12;

/// A plain API key. It exists only between its creation and the moment it is shown;
/// `Debug` hides it so it cannot leak into logs.
#[derive(Clone, PartialEq, Eq)]
pub struct PlainApiKey(String);

impl PlainApiKey {
    /// The key itself, to show the user once.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for PlainApiKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PlainApiKey({}…)", visible_prefix(&self.0))
    }
}

/// A fresh random key.
pub fn generate_key() -> PlainApiKey {
    PlainApiKey(format!(
        "{KEY_PREFIX}{}",
        ids::random_base62(KEY_RANDOM_LEN)
    ))
}

/// SHA-256 of the key's bytes: what is stored and what caches are keyed by.
pub fn hash_key(plain: &str) -> [u8; 32] {
    Sha256::digest(plain.as_bytes()).into()
}

/// The part of a key that may be shown and stored in the clear.
pub fn visible_prefix(plain: &str) -> &str {
    let end = plain
        .char_indices()
        .nth(VISIBLE_PREFIX_LEN)
        .map_or(plain.len(), |(i, _)| i);
    &plain[..end]
}

/// True when `s` has the shape of a key we issue; anything else cannot be a key, so the
/// edge can refuse it without a lookup.
pub fn has_key_shape(s: &str) -> bool {
    s.len() == KEY_PREFIX.len() + KEY_RANDOM_LEN
        && s.starts_with(KEY_PREFIX)
        && s[KEY_PREFIX.len()..]
            .bytes()
            .all(|b| b.is_ascii_alphanumeric())
}

/// Whether a key is usable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyStatus {
    /// Accepted at the edge (if its customer is active).
    Active,
    /// Refused forever.
    Revoked,
}

impl KeyStatus {
    fn parse(s: &str) -> Result<Self, BillingError> {
        match s {
            "active" => Ok(KeyStatus::Active),
            "revoked" => Ok(KeyStatus::Revoked),
            other => Err(BillingError::Invalid(format!(
                "unknown key status {other:?}"
            ))),
        }
    }
}

/// A stored key, without any secret.
#[derive(Debug, Clone, Serialize)]
pub struct ApiKey {
    /// Public id, `key_...`.
    pub id: String,
    /// Owner.
    pub customer_id: String,
    /// The visible start of the key, e.g. `rsk_AbC12345`.
    pub prefix: String,
    /// Active or revoked.
    pub status: KeyStatus,
    /// When it was issued.
    pub created_at: DateTime<Utc>,
    /// When it was revoked, if it was.
    pub revoked_at: Option<DateTime<Utc>>,
}

#[derive(sqlx::FromRow)]
struct ApiKeyRow {
    id: String,
    customer_id: String,
    prefix: String,
    status: String,
    created_at: DateTime<Utc>,
    revoked_at: Option<DateTime<Utc>>,
}

impl TryFrom<ApiKeyRow> for ApiKey {
    type Error = BillingError;
    fn try_from(row: ApiKeyRow) -> Result<Self, BillingError> {
        Ok(ApiKey {
            status: KeyStatus::parse(&row.status)?,
            id: row.id,
            customer_id: row.customer_id,
            prefix: row.prefix,
            created_at: row.created_at,
            revoked_at: row.revoked_at,
        })
    }
}

/// The columns of [`ApiKeyRow`], spliced into literal SQL with `concat!`.
macro_rules! key_columns {
    () => {
        "id, customer_id, prefix, status, created_at, revoked_at"
    };
}

/// An active key: whose it is and whether that customer may be served. What the edge's key
/// cache holds, and what [`lookup_key`] answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyOwner {
    /// The key's id.
    pub key_id: String,
    /// SHA-256 of the key ([`hash_key`]).
    pub key_hash: [u8; 32],
    /// The customer the key belongs to.
    pub customer_id: String,
    /// The customer's status: the edge refuses suspended customers with 403.
    pub customer_status: CustomerStatus,
    /// The customer's plan and its edge rate limit (migration 0012), from its newest
    /// subscription that is not canceled; `None` for a customer without one.
    pub plan: Option<PlanRateLimit>,
}

/// A plan's per-customer rate limit at the edge (`plans.rate_limit_records_per_sec` and
/// `plans.rate_limit_burst`, both at least 1 by the schema's checks).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlanRateLimit {
    /// The plan's id, e.g. `starter`.
    pub plan_id: String,
    /// Records per second a customer may send, sustained.
    pub records_per_sec: u32,
    /// Records a customer may send at once above that rate.
    pub burst: u32,
}

/// The one query behind every active-key lookup (by hash, by customer, all of them): an
/// active key, its customer's status and the rate limit of the customer's plan (its
/// subscription that is not canceled: at most one per customer, by the unique index
/// `subscriptions_one_live_idx`, so a plain join cannot multiply the key's row, and is cheaper
/// than a per-key subquery on the full refresh). Callers append their `AND ...` condition.
macro_rules! active_keys {
    () => {
        "SELECT k.id, k.key_hash, k.customer_id, c.status, \
                p.id, p.rate_limit_records_per_sec, p.rate_limit_burst \
         FROM api_keys k JOIN customers c ON c.id = k.customer_id \
         LEFT JOIN subscriptions s ON s.customer_id = k.customer_id AND s.status <> 'canceled' \
         LEFT JOIN plans p ON p.id = s.plan_id \
         WHERE k.status = 'active'"
    };
}

type ActiveKeyRow = (
    String,
    Vec<u8>,
    String,
    String,
    Option<String>,
    Option<i32>,
    Option<i32>,
);

/// The owner a row names, or `None` for a row that cannot be served: a customer status or a
/// hash the code does not know (the schema's checks rule both out; a row that slips past
/// them is refused like an unknown key rather than failing every lookup). A plan limit that
/// is not positive (also ruled out by the schema) only loses the plan's limit: the key is
/// served under the default one rather than refused.
fn owner(row: ActiveKeyRow) -> Option<KeyOwner> {
    let (key_id, hash, customer_id, status, plan_id, rate, burst) = row;
    let positive = |v: i32| u32::try_from(v).ok().filter(|v| *v > 0);
    let plan = match (plan_id, rate.and_then(positive), burst.and_then(positive)) {
        (Some(plan_id), Some(records_per_sec), Some(burst)) => Some(PlanRateLimit {
            plan_id,
            records_per_sec,
            burst,
        }),
        _ => None,
    };
    Some(KeyOwner {
        key_hash: hash.try_into().ok()?,
        key_id,
        customer_id,
        customer_status: status.parse().ok()?,
        plan,
    })
}

/// The owner of the active key whose hash is `hash`, or `None` for unknown and revoked keys.
pub async fn active_key_by_hash(
    db: impl PgExecutor<'_>,
    hash: &[u8; 32],
) -> Result<Option<KeyOwner>, BillingError> {
    let row: Option<ActiveKeyRow> = sqlx::query_as(concat!(active_keys!(), " AND k.key_hash = $1"))
        .bind(hash.as_slice())
        .fetch_optional(db)
        .await?;
    Ok(row.and_then(owner))
}

/// Every active key of `customer_id` (none for an unknown customer).
pub async fn active_keys_of(
    db: impl PgExecutor<'_>,
    customer_id: &str,
) -> Result<Vec<KeyOwner>, BillingError> {
    let rows: Vec<ActiveKeyRow> =
        sqlx::query_as(concat!(active_keys!(), " AND k.customer_id = $1"))
            .bind(customer_id)
            .fetch_all(db)
            .await?;
    Ok(rows.into_iter().filter_map(owner).collect())
}

/// Every active key of every customer.
pub async fn all_active_keys(db: impl PgExecutor<'_>) -> Result<Vec<KeyOwner>, BillingError> {
    let rows: Vec<ActiveKeyRow> = sqlx::query_as(active_keys!()).fetch_all(db).await?;
    Ok(rows.into_iter().filter_map(owner).collect())
}

/// Issues a new key for `customer_id` and returns it with its plain form, which is not stored.
pub async fn create_key(
    db: impl PgExecutor<'_>,
    customer_id: &str,
) -> Result<(ApiKey, PlainApiKey), BillingError> {
    let plain = generate_key();
    let row: Option<ApiKeyRow> = sqlx::query_as(concat!(
        "INSERT INTO api_keys (id, customer_id, key_hash, prefix) \
         SELECT $1, c.id, $3, $4 FROM customers c WHERE c.id = $2 RETURNING ",
        key_columns!()
    ))
    .bind(ids::new_key_id())
    .bind(customer_id)
    .bind(hash_key(plain.expose()).as_slice())
    .bind(visible_prefix(plain.expose()))
    .fetch_optional(db)
    .await?;
    let row = row.ok_or_else(|| BillingError::NotFound {
        what: format!("customer {customer_id}"),
    })?;
    Ok((row.try_into()?, plain))
}

/// Revokes a key named by its id (`key_...`) or by the plain key itself (`rsk_...`).
/// Revoking a revoked key is a no-op that returns it unchanged.
pub async fn revoke_key(db: impl PgExecutor<'_>, key: &str) -> Result<ApiKey, BillingError> {
    let by_hash = key.starts_with(KEY_PREFIX);
    if !by_hash && !key.starts_with("key_") {
        return Err(BillingError::Invalid(format!(
            "expected a key id (key_...) or an API key (rsk_...), got {:?}",
            visible_prefix(key)
        )));
    }
    // COALESCE keeps the first revocation time when a key is revoked twice.
    let query = if by_hash {
        sqlx::query_as(concat!(
            "UPDATE api_keys SET status = 'revoked', revoked_at = COALESCE(revoked_at, now()) \
             WHERE key_hash = $1 RETURNING ",
            key_columns!()
        ))
        .bind(hash_key(key).to_vec())
    } else {
        sqlx::query_as(concat!(
            "UPDATE api_keys SET status = 'revoked', revoked_at = COALESCE(revoked_at, now()) \
             WHERE id = $1 RETURNING ",
            key_columns!()
        ))
        .bind(key)
    };
    let row: Option<ApiKeyRow> = query.fetch_optional(db).await?;
    row.ok_or_else(|| BillingError::NotFound {
        what: format!("API key {}", visible_prefix(key)),
    })?
    .try_into()
}

/// Keys of one customer, or of everyone, newest first.
pub async fn list_keys(
    db: impl PgExecutor<'_>,
    customer_id: Option<&str>,
) -> Result<Vec<ApiKey>, BillingError> {
    let rows: Vec<ApiKeyRow> = sqlx::query_as(concat!(
        "SELECT ",
        key_columns!(),
        " FROM api_keys WHERE $1::text IS NULL OR customer_id = $1 ORDER BY created_at DESC, id"
    ))
    .bind(customer_id)
    .fetch_all(db)
    .await?;
    rows.into_iter().map(ApiKey::try_from).collect()
}

/// The owner of an active key given in plain, or `None` for unknown, revoked and malformed
/// keys.
pub async fn lookup_key(
    db: impl PgExecutor<'_>,
    plain: &str,
) -> Result<Option<KeyOwner>, BillingError> {
    if !has_key_shape(plain) {
        return Ok(None);
    }
    active_key_by_hash(db, &hash_key(plain)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_keys_have_the_key_shape() {
        let key = generate_key();
        assert!(has_key_shape(key.expose()), "{}", key.expose());
        assert_ne!(generate_key(), key);
    }

    #[test]
    fn key_shape_refuses_near_misses() {
        let good = generate_key().expose().to_owned();
        let cases = [
            String::new(),
            "rsk_".to_owned(),
            good[..good.len() - 1].to_owned(),
            format!("{good}x"),
            good.replacen("rsk_", "sk__", 1),
            format!("{}-", &good[..good.len() - 1]),
            format!("{}é", &good[..good.len() - 2]),
        ];
        for case in cases {
            assert!(!has_key_shape(&case), "{case:?}");
        }
    }

    #[test]
    fn hash_is_sha256_of_the_key_bytes() {
        // Computed independently: `printf rsk_test | sha256sum`.
        assert_eq!(
            hex::encode(hash_key("rsk_test")),
            "392e97e2b87788be2ebf9b1b2780c363750e1e3697f71c08d2470e5012ce0a98"
        );
    }

    #[test]
    fn debug_never_shows_the_key() {
        let key = generate_key();
        let shown = format!("{key:?}");
        assert!(
            !shown.contains(&key.expose()[VISIBLE_PREFIX_LEN..]),
            "{shown}"
        );
        assert!(shown.contains(visible_prefix(key.expose())));
    }

    #[test]
    fn visible_prefix_is_safe_on_short_and_multibyte_input() {
        assert_eq!(visible_prefix("rsk_"), "rsk_");
        assert_eq!(
            visible_prefix("ééééééééééééééé").chars().count(),
            VISIBLE_PREFIX_LEN
        );
    }
}
