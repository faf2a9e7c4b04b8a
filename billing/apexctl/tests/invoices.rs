//! `apexctl invoices ...` end to end: the binary against the Stripe stand-in and the test's own
//! Postgres, on a simulated clock: close a month for one customer, list and show it, the
//! `invoice_close` cron job through `apexctl cron run`, reviews, and every bad request refused
//! with a clear message and a non-zero exit.

mod common;

use apex_billing::pricing::parse_month;
use apex_billing::statement;
use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, StripeClient};
use apex_stripe::testing::{StripeStandIn, TEST_KEY, signup};

/// `apexctl` with the stand-in and the clock at 2026-11-01 07:00 UTC.
fn apexctl(stores: &TestStores, standin: &StripeStandIn, args: &[&str]) -> (i32, String, String) {
    let out = common::apexctl_command(stores)
        .args(args)
        .env("STRIPE_SECRET_KEY", TEST_KEY)
        .env("STRIPE_API_BASE", standin.base_url())
        .env("APEX_CLOCK_START", "2026-11-01T07:00:00Z")
        .env("APEX_CLOCK_SPEED", "1")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn apexctl_closes_lists_and_shows_invoices_and_refuses_bad_requests() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let studio = signup(&stores.pool, "Ledger Games").await;
    let other = signup(&stores.pool, "Quiet Games").await;
    let client =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&stores.pool, &client).await.unwrap();
    sync_customers(&stores.pool, &client, None).await.unwrap();
    let october = parse_month("2026-10").unwrap();
    statement::set_revenue(&stores.pool, &studio, &october, 5_000_000)
        .await
        .unwrap();

    // One customer, one month, now.
    let (code, out, err) = apexctl(
        &stores,
        &standin,
        &[
            "invoices",
            "close",
            "--customer",
            &studio,
            "--period",
            "2026-10",
            "--json",
        ],
    );
    assert_eq!(code, 0, "{out}{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(summary["issued"][0]["total_cents"], 125_000);
    assert_eq!(summary["issued"][0]["status"], "open");
    assert_eq!(standin.invoices().len(), 1);

    let (code, out, _) = apexctl(&stores, &standin, &["invoices", "list"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&format!("{studio}\t2026-10\topen\t$1,250.00\tin_")),
        "{out}"
    );
    let (code, out, _) = apexctl(
        &stores,
        &standin,
        &[
            "invoices",
            "show",
            "--customer",
            &studio,
            "--period",
            "2026-10",
        ],
    );
    assert_eq!(code, 0);
    assert!(
        out.contains("platform_fee") && out.contains("$1,250.00"),
        "{out}"
    );
    assert!(out.contains("https://"), "the hosted page: {out}");
    let (code, out, _) = apexctl(
        &stores,
        &standin,
        &[
            "invoices",
            "show",
            "--customer",
            &studio,
            "--period",
            "2026-10",
            "--json",
        ],
    );
    assert_eq!(code, 0);
    let shown: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(shown["lines"][0]["line_key"], "platform_fee");
    assert_eq!(shown["month"], "2026-10");

    // The cron job closes everyone else's months (the other customer waits for revenue;
    // the studio's October is not issued again).
    let (code, out, err) = apexctl(
        &stores,
        &standin,
        &["cron", "run", "invoice_close", "--json"],
    );
    assert_eq!(code, 0, "{out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    assert_eq!(standin.invoices().len(), 1);
    let (_, out, _) = apexctl(
        &stores,
        &standin,
        &["invoices", "list", "--customer", &other],
    );
    assert_eq!(out.trim(), "no invoices");
    let (code, out, _) = apexctl(&stores, &standin, &["invoices", "pending-review"]);
    assert_eq!((code, out.trim()), (0, "nothing to review"));

    // Bad requests: a clear message and a non-zero exit.
    for (args, says) in [
        (
            vec!["invoices", "close", "--period", "2026-11"],
            "has not ended",
        ),
        (
            vec!["invoices", "close", "--period", "2026-13"],
            "expected a month YYYY-MM",
        ),
        (
            vec!["invoices", "close", "--customer", "cus_nobody"],
            "not found",
        ),
        (
            vec![
                "invoices",
                "show",
                "--customer",
                &other,
                "--period",
                "2026-10",
            ],
            "has no invoice",
        ),
        (
            vec!["invoices", "list", "--limit", "0"],
            "--limit must be at least 1",
        ),
        (
            vec!["invoices", "review", "42", "--dismiss"],
            "open review 42 not found",
        ),
        (
            vec!["invoices", "close", "--rate", "0"],
            "--rate must be above 0",
        ),
    ] {
        let (code, out, err) = apexctl(&stores, &standin, &args);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    for args in [
        vec!["invoices", "review", "42"],
        vec!["invoices", "review", "42", "--approve"],
        vec![
            "invoices",
            "review",
            "42",
            "--approve",
            "--dismiss",
            "--amount",
            "-5",
        ],
    ] {
        let (code, _, err) = apexctl(&stores, &standin, &args);
        assert_eq!(code, 2, "clap refuses {args:?}: {err}");
    }
    let (code, _, err) = apexctl(
        &stores,
        &standin,
        &["invoices", "review", "42", "--approve", "--amount", "-5"],
    );
    assert_eq!(code, 1);
    assert!(err.contains("not an open credit of that amount"), "{err}");
}
