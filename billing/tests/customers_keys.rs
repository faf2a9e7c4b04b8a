//! Customers and API keys against the real Postgres: only key hashes are stored, lookups find
//! active keys and refuse revoked ones, and the `apexctl` commands do the same end to end.

mod common;

use std::process::{Command, Output};

use apex_billing::customers::{CustomerStatus, NewCustomer, create_customer};
use apex_billing::keys::{self, hash_key, visible_prefix};
use apex_billing::plans::list_plans;
use apex_pipeline::testing::TestStores;
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
    let created = create_customer(&stores.pool, &signup("starter"), chrono::Utc::now())
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
    let created = create_customer(db, &signup("growth"), chrono::Utc::now())
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
    let near_miss = format!(
        "{}x",
        &second_plain.expose()[..second_plain.expose().len() - 1]
    );
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
        assert!(create_customer(db, &bad, chrono::Utc::now()).await.is_err());
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
    let plans = list_plans(&stores.pool).await.unwrap();
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

fn apexctl(stores: &TestStores, args: &[&str]) -> Output {
    apexctl_with_jwt_secret(stores, args, None)
}

/// `apexctl` with `APEX_JWT_SECRET` set to `secret`, or removed.
fn apexctl_with_jwt_secret(stores: &TestStores, args: &[&str], secret: Option<&str>) -> Output {
    let mut command = common::apexctl_command(stores);
    command.args(args);
    if let Some(secret) = secret {
        command.env("APEX_JWT_SECRET", secret);
    }
    command.output().expect("apexctl runs")
}

fn stdout_of(output: &Output) -> String {
    assert!(
        output.status.success(),
        "apexctl failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8(output.stdout.clone()).unwrap()
}

#[tokio::test]
async fn apexctl_manages_customers_and_keys_end_to_end() {
    let stores = TestStores::empty().await;
    stdout_of(&apexctl(&stores, &["migrate"]));
    let second = stdout_of(&apexctl(&stores, &["migrate"]));
    assert!(second.contains("clickhouse up to date"), "{second}");

    let created: serde_json::Value = serde_json::from_str(&stdout_of(&apexctl(
        &stores,
        &[
            "customers",
            "create",
            "--name",
            "Demo",
            "--email",
            "demo@example.com",
            "--plan",
            "scale",
            "--json",
        ],
    )))
    .unwrap();
    let customer_id = created["customer_id"].as_str().unwrap();
    let api_key = created["api_key"].as_str().unwrap();
    assert!(customer_id.starts_with("cus_") && keys::has_key_shape(api_key));
    assert_eq!(
        keys::lookup_key(&stores.pool, api_key)
            .await
            .unwrap()
            .unwrap()
            .customer_id,
        customer_id
    );

    let listed = stdout_of(&apexctl(
        &stores,
        &["keys", "list", "--customer", customer_id, "--json"],
    ));
    assert!(
        !listed.contains(&api_key[12..]),
        "listing never shows the key"
    );
    let listed: serde_json::Value = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.as_array().unwrap().len(), 1);

    let text = stdout_of(&apexctl(
        &stores,
        &["keys", "create", "--customer", customer_id],
    ));
    assert!(text.contains("rsk_"), "{text}");
    stdout_of(&apexctl(&stores, &["keys", "revoke", api_key]));
    assert_eq!(keys::lookup_key(&stores.pool, api_key).await.unwrap(), None);

    let plans: serde_json::Value =
        serde_json::from_str(&stdout_of(&apexctl(&stores, &["plans", "list", "--json"]))).unwrap();
    assert_eq!(plans.as_array().unwrap().len(), 4);

    // Bad input: a clear message and a failing exit status, nothing written.
    for args in [
        &[
            "customers",
            "create",
            "--name",
            "X",
            "--email",
            "x@example.com",
            "--plan",
            "platinum",
        ][..],
        &[
            "customers",
            "create",
            "--name",
            "X",
            "--email",
            "nope",
            "--plan",
            "starter",
        ][..],
        &["keys", "create", "--customer", "cus_missing"][..],
        &["keys", "revoke", "key_missing"][..],
    ] {
        let out = apexctl(&stores, args);
        assert!(!out.status.success(), "{args:?} must fail");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.starts_with("apexctl: "), "{args:?}: {err}");
    }
    let customers: i64 = sqlx::query_scalar("SELECT count(*) FROM customers")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(customers, 1);
}

#[test]
fn every_apexctl_command_has_help() {
    for args in [
        &["--help"][..],
        &["migrate", "--help"][..],
        &["customers", "create", "--help"][..],
        &["customers", "list", "--help"][..],
        &["keys", "create", "--help"][..],
        &["keys", "revoke", "--help"][..],
        &["keys", "list", "--help"][..],
        &["plans", "list", "--help"][..],
    ] {
        let out = Command::new(env!("CARGO_BIN_EXE_apexctl"))
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}");
        assert!(
            String::from_utf8_lossy(&out.stdout).contains("Usage: apexctl"),
            "{args:?}"
        );
    }
}

#[test]
fn missing_configuration_is_one_clear_line() {
    let out = Command::new(env!("CARGO_BIN_EXE_apexctl"))
        .args(["plans", "list"])
        .env_remove("DATABASE_URL")
        .env("CLICKHOUSE_URL", "http://127.0.0.1:1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8(out.stderr).unwrap();
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.starts_with("apexctl: DATABASE_URL is required"),
        "{err}"
    );
}

#[tokio::test]
async fn apexctl_sets_mediated_revenue_per_month() {
    let stores = TestStores::migrated().await;
    let created: serde_json::Value = serde_json::from_str(&stdout_of(&apexctl(
        &stores,
        &[
            "customers",
            "create",
            "--name",
            "Rev",
            "--email",
            "rev@example.com",
            "--json",
        ],
    )))
    .unwrap();
    let customer = created["customer_id"].as_str().unwrap();
    let stored = || async {
        sqlx::query_as::<_, (chrono::NaiveDate, i64)>(
            "SELECT month, revenue_cents FROM mediated_revenue WHERE customer_id = $1 ORDER BY month",
        )
        .bind(customer)
        .fetch_all(&stores.pool)
        .await
        .unwrap()
    };
    let set = |month: &str, cents: &str| {
        apexctl(
            &stores,
            &[
                "revenue",
                "set",
                "--customer",
                customer,
                "--month",
                month,
                "--cents",
                cents,
            ],
        )
    };
    stdout_of(&set("2025-11", "5000000"));
    stdout_of(&set("2025-12", "1"));
    // A second figure for a month replaces the first.
    stdout_of(&set("2025-11", "4000000"));
    let nov = chrono::NaiveDate::from_ymd_opt(2025, 11, 1).unwrap();
    let dec = chrono::NaiveDate::from_ymd_opt(2025, 12, 1).unwrap();
    assert_eq!(stored().await, vec![(nov, 4_000_000), (dec, 1)]);
    // Refusals change nothing.
    for (month, cents) in [
        ("2025-13", "1"),
        ("2025/11", "1"),
        ("2025-11", "-5"),
        ("2025-11", "1.5"),
    ] {
        assert!(!set(month, cents).status.success(), "{month} {cents}");
    }
    let unknown = apexctl(
        &stores,
        &[
            "revenue",
            "set",
            "--customer",
            "cus_nobody",
            "--month",
            "2025-11",
            "--cents",
            "1",
        ],
    );
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));
    assert_eq!(stored().await, vec![(nov, 4_000_000), (dec, 1)]);
}

#[tokio::test]
async fn apexctl_mints_dashboard_tokens_for_existing_customers() {
    use base64::Engine;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD;
    use hmac::{Hmac, Mac};
    const SECRET: &str = "a-dashboard-secret-of-32-bytes-or-more";
    let stores = TestStores::migrated().await;
    let created: serde_json::Value = serde_json::from_str(&stdout_of(&apexctl(
        &stores,
        &[
            "customers",
            "create",
            "--name",
            "Tok",
            "--email",
            "tok@example.com",
            "--json",
        ],
    )))
    .unwrap();
    let customer = created["customer_id"].as_str().unwrap();
    let token_for =
        |args: &[&str], secret: Option<&str>| apexctl_with_jwt_secret(&stores, args, secret);
    let out = token_for(
        &["token", "--customer", customer, "--ttl-secs", "120"],
        Some(SECRET),
    );
    let token = stdout_of(&out).trim().to_owned();
    let parts: Vec<&str> = token.split('.').collect();
    assert_eq!(parts.len(), 3);
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{}.{}", parts[0], parts[1]).as_bytes());
    mac.verify_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
        .unwrap();
    let claims: serde_json::Value =
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
    assert_eq!(claims["sub"], customer);
    assert_eq!(
        claims["exp"].as_i64().unwrap() - claims["iat"].as_i64().unwrap(),
        120
    );
    // No secret, a short one, an unknown customer, a silly lifetime: refused.
    assert!(
        !token_for(&["token", "--customer", customer], None)
            .status
            .success()
    );
    assert!(
        !token_for(&["token", "--customer", customer], Some("short"))
            .status
            .success()
    );
    assert!(
        !token_for(&["token", "--customer", "cus_nobody"], Some(SECRET))
            .status
            .success()
    );
    assert!(
        !token_for(
            &["token", "--customer", customer, "--ttl-secs", "0"],
            Some(SECRET)
        )
        .status
        .success()
    );
}
