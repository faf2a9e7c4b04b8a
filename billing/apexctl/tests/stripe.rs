//! `apexctl stripe ...` end to end: the binary against the Stripe stand-in and the test's own
//! Postgres: mapping, the usage sync, logged retries that never show the key, and every bad
//! request refused with a clear message and exit status 1.

mod common;

use apex_core::testing::TestStores;
use apex_stripe::testing::{StripeStandIn, TEST_KEY, add_usage, day_ago, signup};
use chrono::Utc;

const METER_EVENTS: &str = "/v1/billing/meter_events";

fn apexctl(
    stores: &TestStores,
    standin: Option<&StripeStandIn>,
    args: &[&str],
) -> (i32, String, String) {
    apexctl_with(stores, standin, args, &[])
}

/// `apexctl` on the test's databases, with the stand-in's key and URL when given, and `env`.
fn apexctl_with(
    stores: &TestStores,
    standin: Option<&StripeStandIn>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = common::apexctl_command(stores);
    command.args(args).envs(env.iter().copied());
    if let Some(standin) = standin {
        command
            .env("STRIPE_SECRET_KEY", TEST_KEY)
            .env("STRIPE_API_BASE", standin.base_url());
    }
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn apexctl_stripe_maps_syncs_and_refuses_bad_requests() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let customer = signup(&stores.pool, "Lumen Games").await;
    let yesterday = day_ago(Utc::now(), 1);
    add_usage(&stores.pool, &customer, "impressions", yesterday, 42).await;

    // Without a key, nothing runs.
    let (code, _, err) = apexctl(&stores, None, &["stripe", "catalog"]);
    assert_eq!(code, 1);
    assert!(err.contains("STRIPE_SECRET_KEY is not set"), "{err}");
    // Before the catalogue, the sync says what to do.
    let (code, _, err) = apexctl(&stores, Some(&standin), &["stripe", "sync"]);
    assert_eq!(code, 1);
    assert!(err.contains("apexctl stripe catalog"), "{err}");

    let (code, out, err) = apexctl(&stores, Some(&standin), &["stripe", "catalog"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("meters mapped now: impressions, api_calls, data_transfer"),
        "{out}"
    );
    let (code, out, err) = apexctl(&stores, Some(&standin), &["stripe", "customers", "--json"]);
    assert_eq!(code, 0, "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["customers_created"], 1);

    let day = yesterday.format("%Y-%m-%d").to_string();
    let (code, out, err) = apexctl(
        &stores,
        Some(&standin),
        &[
            "stripe",
            "sync",
            "--customer",
            &customer,
            "--date",
            &day,
            "--json",
        ],
    );
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["events_sent"], 1);
    assert_eq!(summary["quantity_sent"]["impressions"], 42);
    assert_eq!(summary["days"], serde_json::json!([day]));
    let (code, out, _) = apexctl(&stores, Some(&standin), &["stripe", "sync"]);
    assert_eq!(code, 0);
    assert!(out.contains("0 meter events sent"), "{out}");
    assert_eq!(standin.events().len(), 1);

    // Retries are logged, the key never is, even at the most verbose level.
    add_usage(&stores.pool, &customer, "api_calls", yesterday, 3).await;
    standin.inject_fault(METER_EVENTS, 500, 1, None, false);
    let (code, out, err) = apexctl_with(
        &stores,
        Some(&standin),
        &["stripe", "sync"],
        &[("APEX_LOG", "trace")],
    );
    let printed = format!("{out}{err}");
    assert_eq!(code, 0, "{printed}");
    assert!(
        printed.contains("retrying with the same idempotency key"),
        "{printed}"
    );
    assert!(!printed.contains(TEST_KEY), "{printed}");

    let today = Utc::now().date_naive().format("%Y-%m-%d").to_string();
    let old = day_ago(Utc::now(), 36).format("%Y-%m-%d").to_string();
    for (args, expected) in [
        (
            vec!["stripe", "sync", "--date", today.as_str()],
            "not reportable",
        ),
        (
            vec!["stripe", "sync", "--date", old.as_str()],
            "not reportable",
        ),
        (
            vec!["stripe", "sync", "--date", "2026-13-01"],
            "expected YYYY-MM-DD",
        ),
        (
            vec!["stripe", "sync", "--customer", "cus_nobody"],
            "customer cus_nobody not found",
        ),
        (vec!["stripe", "sync", "--rate", "0"], "--rate"),
        (vec!["stripe", "sync", "--rate", "500"], "--rate"),
        (
            vec!["stripe", "customers", "--customer", "cus_nobody"],
            "customer cus_nobody not found",
        ),
    ] {
        let (code, _, err) = apexctl(&stores, Some(&standin), &args);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(expected), "{args:?}: {err}");
    }
}
