//! `apexctl` end to end against the real Postgres and ClickHouse: migrations, customers and
//! keys, revenue, dashboard tokens, every command's `--help`, and one-line configuration
//! errors.

mod common;

use std::process::{Command, Output};

use apex_billing::keys;
use apex_core::testing::TestStores;

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

/// `apexctl revenue set` of `cents` for `customer`'s `month`, then `extra`.
fn revenue_set(
    stores: &TestStores,
    customer: &str,
    month: &str,
    cents: &str,
    extra: &[&str],
) -> Output {
    let args = [
        "revenue",
        "set",
        "--customer",
        customer,
        "--month",
        month,
        "--cents",
        cents,
    ];
    apexctl(stores, &[&args[..], extra].concat())
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
        &["token", "--help"][..],
        &["revenue", "set", "--help"][..],
        &["stripe", "catalog", "--help"][..],
        &["stripe", "customers", "--help"][..],
        &["stripe", "sync", "--help"][..],
        &["cron", "list", "--help"][..],
        &["cron", "run", "--help"][..],
        &["cron", "history", "--help"][..],
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
    let set = |month: &str, cents: &str| revenue_set(&stores, customer, month, cents, &[]);
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
    let unknown = revenue_set(&stores, "cus_nobody", "2025-11", "1", &[]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("not found"));
    assert_eq!(stored().await, vec![(nov, 4_000_000), (dec, 1)]);
}

#[tokio::test]
async fn apexctl_mints_dashboard_tokens_for_existing_customers() {
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
    // The token is what the edge accepts: its verifier, at the time it was minted.
    let now = chrono::Utc::now().timestamp();
    let claims = apex_billing::tokens::verify(&token, SECRET.as_bytes(), now).unwrap();
    assert_eq!(claims.customer_id, customer);
    assert!(
        (now + 115..=now + 120).contains(&claims.expires_at),
        "expires {} for a 120 s token minted by {now}",
        claims.expires_at
    );
    assert!(
        apex_billing::tokens::verify(&token, b"another-secret-of-32-bytes-or-more", now).is_err()
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

/// The subcommands a `--help` page lists under "Commands:" (without `help`).
fn subcommands(help: &str) -> Vec<String> {
    help.lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|name| *name != "help")
        .map(str::to_owned)
        .collect()
}

/// Every command, found by walking the `--help` pages (so a command added later is covered
/// too), has help text and a `--json` flag: the charter's rule for the operators' CLI.
#[test]
fn every_command_has_help_and_json() {
    let help = |path: &[String]| {
        let out = Command::new(env!("CARGO_BIN_EXE_apexctl"))
            .args(path)
            .arg("--help")
            .output()
            .unwrap();
        assert!(out.status.success(), "{path:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    let mut leaves = Vec::new();
    let mut stack: Vec<Vec<String>> = vec![Vec::new()];
    while let Some(path) = stack.pop() {
        let page = help(&path);
        assert!(page.contains("Usage: apexctl"), "{path:?}: {page}");
        let children = subcommands(&page);
        if children.is_empty() {
            assert!(page.contains("--json"), "{path:?} has no --json: {page}");
            leaves.push(path.join(" "));
        }
        for child in children {
            let mut next = path.clone();
            next.push(child);
            stack.push(next);
        }
    }
    // The guide's operations and the doctor are among them.
    for command in [
        "usage top",
        "stripe sync",
        "dunning status",
        "dunning pending",
        "dunning process",
        "dunning reactivate",
        "email send-test",
        "email pending",
        "email failed",
        "email retry",
        "alerts check",
        "alerts frequency",
        "cron run",
        "doctor",
        "migrate",
        "token",
    ] {
        assert!(leaves.iter().any(|l| l == command), "{command}: {leaves:?}");
    }
}

#[tokio::test]
async fn the_admin_commands_print_json_too() {
    const SECRET: &str = "a-dashboard-secret-of-32-bytes-or-more";
    let stores = TestStores::empty().await;
    let json_of =
        |out: Output| -> serde_json::Value { serde_json::from_str(&stdout_of(&out)).unwrap() };
    let first = json_of(apexctl(&stores, &["migrate", "--json"]));
    // Every migration of the folders, applied now, in order.
    let versions = apex_core::testing::migration_file_versions;
    assert_eq!(
        first,
        serde_json::json!({
            "postgres_applied": versions("postgres"),
            "clickhouse_applied": versions("clickhouse"),
        })
    );
    assert_eq!(
        json_of(apexctl(&stores, &["migrate", "--json"])),
        serde_json::json!({"postgres_applied": [], "clickhouse_applied": []})
    );

    let created = json_of(apexctl(
        &stores,
        &[
            "customers",
            "create",
            "--name",
            "Json",
            "--email",
            "json@example.com",
            "--json",
        ],
    ));
    let customer = created["customer_id"].as_str().unwrap();
    let key_id = created["api_key_id"].as_str().unwrap();

    let revoked = json_of(apexctl(&stores, &["keys", "revoke", key_id, "--json"]));
    assert_eq!(
        revoked,
        serde_json::json!({"api_key_id": key_id, "api_key_prefix": created["api_key_prefix"],
            "customer_id": customer, "revoked": true})
    );

    let revenue = json_of(revenue_set(
        &stores,
        customer,
        "2026-04",
        "125000",
        &["--json"],
    ));
    assert_eq!(
        revenue,
        serde_json::json!({"customer_id": customer, "month": "2026-04", "revenue_cents": 125000})
    );

    let token = json_of(apexctl_with_jwt_secret(
        &stores,
        &[
            "token",
            "--customer",
            customer,
            "--ttl-secs",
            "60",
            "--json",
        ],
        Some(SECRET),
    ));
    let now = chrono::Utc::now().timestamp();
    let claims =
        apex_billing::tokens::verify(token["token"].as_str().unwrap(), SECRET.as_bytes(), now)
            .unwrap();
    assert_eq!(claims.customer_id, customer);
    let expires_at: chrono::DateTime<chrono::Utc> =
        token["expires_at"].as_str().unwrap().parse().unwrap();
    assert_eq!(expires_at.timestamp(), claims.expires_at);
}
