//! Customers and API keys against the real Postgres: only key hashes are stored, lookups find
//! active keys and refuse revoked ones, and sign-up composes into a caller's transaction.
//! (`apexctl`'s commands are tested in `billing/apexctl/tests`.)

use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::keys::{self, hash_key, visible_prefix};
use apex_billing::plans::list_plans;
use apex_billing::status::CustomerStatus;
use apex_core::testing::TestStores;
use sqlx::AssertSqlSafe;

fn signup(plan: &str) -> NewCustomer {
    NewCustomer {
        name: "Acme Games".into(),
        email: "billing@acme.example".into(),
        plan_id: plan.into(),
        trial_days: None,
    }
}

/// Rows of every table in the schema that mention `needle` anywhere.
async fn tables_containing(stores: &TestStores, needle: &str) -> Vec<String> {
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    let mut hits = Vec::new();
    for table in tables {
        let count: i64 = sqlx::query_scalar(AssertSqlSafe(format!(
            "SELECT count(*) FROM {table} t WHERE row_to_json(t)::text LIKE '%' || $1 || '%'"
        )))
        .bind(needle)
        .fetch_one(&stores.pool)
        .await
        .unwrap();
        if count > 0 {
            hits.push(table);
        }
    }
    hits
}

#[tokio::test]
async fn sign_up_stores_only_the_key_hash() {
    let stores = TestStores::migrated().await;
    let created = create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &signup("starter"),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let plain = created.api_key.expose().to_owned();
    assert!(keys::has_key_shape(&plain));

    let (hash, prefix): (Vec<u8>, String) =
        sqlx::query_as("SELECT key_hash, prefix FROM api_keys WHERE customer_id = $1")
            .bind(&created.customer.id)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(hash, hash_key(&plain));
    assert_eq!(prefix, visible_prefix(&plain));
    // The secret part of the key appears nowhere in the database.
    assert_eq!(
        tables_containing(&stores, &plain[12..]).await,
        Vec::<String>::new()
    );

    let (status, trial_end): (String, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT status, trial_end FROM subscriptions WHERE customer_id = $1")
            .bind(&created.customer.id)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(status, "trialing");
    assert_eq!(trial_end, created.trial_end);
    let welcome: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'email.welcome' AND data->>'customer_id' = $1",
    )
    .bind(&created.customer.id)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(welcome, 1);
}

#[tokio::test]
async fn lookup_finds_active_keys_and_refuses_revoked_ones() {
    let stores = TestStores::migrated().await;
    let db = &stores.pool;
    let created = create_customer(
        &mut db.acquire().await.unwrap(),
        &signup("growth"),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let plain = created.api_key.expose();

    let owner = keys::lookup_key(db, plain)
        .await
        .unwrap()
        .expect("active key is found");
    assert_eq!(owner.customer_id, created.customer.id);
    assert_eq!(owner.key_id, created.key.id);
    assert_eq!(owner.customer_status, CustomerStatus::Active);

    let (second, second_plain) = keys::create_key(db, &created.customer.id).await.unwrap();
    let revoked = keys::revoke_key(db, plain).await.unwrap();
    assert_eq!(revoked.id, created.key.id);
    assert!(revoked.revoked_at.is_some());
    assert_eq!(
        keys::lookup_key(db, plain).await.unwrap(),
        None,
        "revoked key"
    );
    // Revoking again keeps the first revocation time.
    let again = keys::revoke_key(db, &created.key.id).await.unwrap();
    assert_eq!(again.revoked_at, revoked.revoked_at);
    // The customer's other key still works.
    assert!(
        keys::lookup_key(db, second_plain.expose())
            .await
            .unwrap()
            .is_some()
    );
    assert_eq!(
        keys::list_keys(db, Some(&created.customer.id))
            .await
            .unwrap()
            .len(),
        2
    );

    // A suspended customer's key is found, with the status the edge turns into a 403.
    sqlx::query("UPDATE customers SET status = 'suspended' WHERE id = $1")
        .bind(&created.customer.id)
        .execute(db)
        .await
        .unwrap();
    let owner = keys::lookup_key(db, second_plain.expose())
        .await
        .unwrap()
        .unwrap();
    assert_eq!(owner.customer_status, CustomerStatus::Suspended);
    assert_eq!(owner.key_id, second.id);

    // Unknown, malformed and near-miss keys are not found.
    // The last character changed (to one it is not: a key ending in x stays a near miss).
    let plain = second_plain.expose();
    let last = if plain.ends_with('x') { 'y' } else { 'x' };
    let near_miss = format!("{}{last}", &plain[..plain.len() - 1]);
    for key in ["", "rsk_", "rsk_unknown", near_miss.as_str()] {
        assert_eq!(keys::lookup_key(db, key).await.unwrap(), None, "{key:?}");
    }
    assert!(keys::revoke_key(db, "key_doesnotexist").await.is_err());
    assert!(keys::revoke_key(db, "something").await.is_err());
}

#[tokio::test]
async fn bad_sign_ups_change_nothing() {
    let stores = TestStores::migrated().await;
    let db = &stores.pool;
    let mut bad_email = signup("starter");
    bad_email.email = "not-an-address".into();
    for bad in [signup("platinum"), bad_email] {
        assert!(
            create_customer(&mut db.acquire().await.unwrap(), &bad, chrono::Utc::now())
                .await
                .is_err()
        );
    }
    for table in ["customers", "subscriptions", "api_keys", "events"] {
        let rows: i64 = sqlx::query_scalar(AssertSqlSafe(format!("SELECT count(*) FROM {table}")))
            .fetch_one(db)
            .await
            .unwrap();
        assert_eq!(rows, 0, "{table}");
    }
    assert!(keys::create_key(db, "cus_nobody").await.is_err());
}

#[tokio::test]
async fn plans_are_seeded_from_the_guide() {
    let stores = TestStores::migrated().await;
    let plans = list_plans(&mut stores.pool.acquire().await.unwrap())
        .await
        .unwrap();
    let summary: Vec<(&str, i32, i32, i32)> = plans
        .iter()
        .map(|p| {
            (
                p.id.as_str(),
                p.platform_fee_bps,
                p.platform_fee_bps_min,
                p.platform_fee_bps_max,
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("starter", 0, 0, 0),
            ("growth", 250, 250, 250),
            ("scale", 200, 200, 200),
            ("enterprise", 150, 100, 150)
        ]
    );
    let starter = &plans[0];
    assert_eq!(starter.revenue_band_max_cents, Some(1_000_000), "$10k");
    let impressions = starter
        .limits
        .iter()
        .find(|l| l.metric_type == "impressions")
        .unwrap();
    assert_eq!(impressions.included_quantity, Some(1_000_000));
    assert_eq!(plans[3].revenue_band_max_cents, None);
    assert!(plans.iter().all(|p| p.limits.len() == 3));
}

#[tokio::test]
async fn sign_up_composes_into_the_callers_transaction() {
    let stores = TestStores::migrated().await;
    let mut tx = stores.pool.begin().await.unwrap();
    let created = create_customer(&mut tx, &signup("starter"), chrono::Utc::now())
        .await
        .unwrap();
    // Inside the transaction the key works; rolled back, nothing of the sign-up remains.
    assert!(
        keys::lookup_key(&mut *tx, created.api_key.expose())
            .await
            .unwrap()
            .is_some()
    );
    tx.rollback().await.unwrap();
    assert!(
        tables_containing(&stores, &created.customer.id)
            .await
            .is_empty()
    );
    assert_eq!(
        keys::lookup_key(&stores.pool, created.api_key.expose())
            .await
            .unwrap(),
        None
    );
}

/// A key carries its customer's live plan's rate limit (migration 0012), and none (the edge's
/// default) without a subscription or with only canceled ones.
#[tokio::test]
async fn a_key_carries_the_rate_limit_of_the_live_subscriptions_plan() {
    let stores = TestStores::migrated().await;
    let db = &stores.pool;
    let created = create_customer(
        &mut db.acquire().await.unwrap(),
        &signup("growth"),
        chrono::Utc::now(),
    )
    .await
    .unwrap();
    let plain = created.api_key.expose();
    let plan = |owner: Option<keys::KeyOwner>| owner.expect("active key").plan;

    // A live subscription: its plan's limit.
    assert_eq!(
        plan(keys::lookup_key(db, plain).await.unwrap()),
        Some(keys::PlanRateLimit {
            plan_id: "growth".into(),
            records_per_sec: 50_000,
            burst: 500_000,
        })
    );

    // Only canceled subscriptions (a second one too, so more than one row could join): none.
    sqlx::query(
        "UPDATE subscriptions SET status = 'canceled', canceled_at = now() WHERE customer_id = $1",
    )
    .bind(&created.customer.id)
    .execute(db)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO subscriptions (customer_id, plan_id, status, canceled_at) \
         VALUES ($1, 'scale', 'canceled', now())",
    )
    .bind(&created.customer.id)
    .execute(db)
    .await
    .unwrap();
    assert_eq!(plan(keys::lookup_key(db, plain).await.unwrap()), None);
    assert_eq!(
        keys::active_keys_of(db, &created.customer.id)
            .await
            .unwrap()
            .len(),
        1,
        "one row per key, whatever the canceled subscriptions"
    );

    // No subscription at all: none.
    sqlx::query("DELETE FROM subscriptions WHERE customer_id = $1")
        .bind(&created.customer.id)
        .execute(db)
        .await
        .unwrap();
    assert_eq!(plan(keys::lookup_key(db, plain).await.unwrap()), None);
}
