//! The monthly invoice against the Stripe stand-in (localstripe plus the marked invoice test
//! double of `scripts/stripe-standin.py`), with the real Postgres of the stack: the guide's
//! example, band edges, overages, add-ons, contracts, late revenue and usage, credits, the job
//! twice and after a lost answer at each Stripe call, and webhooks moving the mirror. In every
//! case Stripe's invoice total equals the month's preview (the code behind
//! `GET /api/billing/preview`). Each test has its own databases and its own stand-in.

use std::time::Duration;

use apex_billing::invoices::{self, CloseSettings, Invoice};
use apex_billing::pricing::{Period, parse_month};
use apex_billing::{statement, webhooks};
use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, RetryPolicy, StripeClient};
use apex_stripe::invoicing::{CloseRequest, CloseSummary, close_invoices};
use apex_stripe::testing::{self, StripeStandIn, TEST_KEY};
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::json;

/// Fast retries, so fault tests take milliseconds per attempt.
fn client(standin: &StripeStandIn) -> StripeClient {
    let settings = ClientSettings {
        requests_per_second: 100.0,
        burst: 20,
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 3,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        },
    };
    StripeClient::new(&standin.base_url(), TEST_KEY, settings).unwrap()
}

fn month(text: &str) -> Period {
    parse_month(text).unwrap()
}

fn at(text: &str) -> DateTime<Utc> {
    text.parse().unwrap()
}

/// A migrated store and a stand-in with the catalogue and `names` customers mapped.
async fn mapped(names: &[&str]) -> (TestStores, StripeStandIn, Vec<String>) {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let mut ids = Vec::new();
    for name in names {
        ids.push(testing::signup(&stores.pool, name).await);
    }
    let stripe = client(&standin);
    sync_catalog(&stores.pool, &stripe).await.unwrap();
    let report = sync_customers(&stores.pool, &stripe, None).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    // Customers of the year: the close bills no month before a customer signed up.
    sqlx::query("UPDATE customers SET created_at = '2026-01-01T00:00:00Z'")
        .execute(&stores.pool)
        .await
        .unwrap();
    (stores, standin, ids)
}

/// Closes `period` (or the default months) for `customer` (or everyone) at `now`.
async fn close(
    stores: &TestStores,
    standin: &StripeStandIn,
    customer: Option<&str>,
    period: Option<&str>,
    now: DateTime<Utc>,
) -> Result<CloseSummary, apex_stripe::StripeWorkError> {
    let request = CloseRequest {
        customer: customer.map(str::to_owned),
        period: period.map(month),
        now,
        settings: CloseSettings::default(),
    };
    close_invoices(&stores.pool, &client(standin), &request).await
}

async fn set_revenue(stores: &TestStores, customer: &str, period: &str, cents: u64) {
    statement::set_revenue(&stores.pool, customer, &month(period), cents)
        .await
        .unwrap();
}

async fn usage(stores: &TestStores, customer: &str, metric: &str, day: &str, quantity: i64) {
    let day: NaiveDate = day.parse().unwrap();
    testing::add_usage(&stores.pool, customer, metric, day, quantity).await;
}

async fn invoice(stores: &TestStores, customer: &str, period: &str) -> Invoice {
    invoices::for_period(&stores.pool, customer, month(period).start)
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("{customer} has no invoice for {period}"))
}

/// Stripe's invoice of our invoice, as the stand-in holds it, and its lines as
/// (apex_line, amount, description).
fn stripe_side(
    standin: &StripeStandIn,
    ours: &Invoice,
) -> (serde_json::Value, Vec<(String, i64, String)>) {
    let id = ours.stripe_invoice_id.as_deref().expect("a Stripe invoice");
    (standin.invoice(id), lines_of(standin, id))
}

fn lines_of(standin: &StripeStandIn, invoice_id: &str) -> Vec<(String, i64, String)> {
    let mut all = Vec::new();
    for invoice in standin.invoices() {
        if invoice["id"] != invoice_id {
            continue;
        }
        for line in invoice["lines"]["data"].as_array().unwrap() {
            all.push((
                line["metadata"]["apex_line"]
                    .as_str()
                    .unwrap_or("")
                    .to_owned(),
                line["amount"].as_i64().unwrap(),
                line["description"].as_str().unwrap().to_owned(),
            ));
        }
    }
    all
}

/// Checks that Stripe's invoice of `customer`'s month carries exactly our lines, and that
/// its total equals the month's preview plus `adjustments`; returns the invoice.
async fn assert_matches_preview(
    stores: &TestStores,
    standin: &StripeStandIn,
    customer: &str,
    period: &str,
    adjustments: i64,
) -> Invoice {
    let ours = invoice(stores, customer, period).await;
    let preview = statement::invoice_preview(
        &mut stores.pool.acquire().await.unwrap(),
        customer,
        period,
        &month(period),
    )
    .await
    .unwrap();
    let (stripe, stripe_lines) = stripe_side(standin, &ours);
    assert_eq!(
        stripe["total"].as_i64().unwrap(),
        preview.total_cents as i64 + adjustments,
        "Stripe's total against the preview of {period}: {stripe}"
    );
    assert_eq!(stripe["total"].as_i64().unwrap(), ours.total_cents);
    assert_eq!(stripe["currency"], "usd");
    assert_eq!(stripe["status"], ours.status);
    assert_eq!(stripe["metadata"]["apex_invoice_id"], ours.id.to_string());
    let lines = invoices::lines(&stores.pool, ours.id).await.unwrap();
    let expected: Vec<(String, i64, String)> = lines
        .iter()
        .map(|l| (l.line_key.clone(), l.amount_cents, l.description.clone()))
        .collect();
    assert_eq!(
        stripe_lines, expected,
        "Stripe's lines are ours, in order, once each"
    );
    // The preview's own lines are the invoice's first ones.
    for (line, previewed) in lines.iter().zip(&preview.lines) {
        assert_eq!(line.amount_cents, previewed.amount_cents as i64);
        assert_eq!(line.description, previewed.description);
    }
    ours
}

#[tokio::test]
async fn the_guides_example_and_the_band_edges_reach_stripe_to_the_cent() {
    let (stores, standin, ids) = mapped(&["Growth Studio", "Starter Edge", "Growth Edge"]).await;
    let (growth, starter_edge, growth_edge) = (&ids[0], &ids[1], &ids[2]);
    // $50,000.00 is Growth at 2.5 %: $1,250.00. $10,000.00 is Starter (no fee); $10,000.01
    // is Growth: 1,000,001 x 2.5 % = 25,000.025, rounded once, half up: $250.00.
    set_revenue(&stores, growth, "2026-10", 5_000_000).await;
    set_revenue(&stores, starter_edge, "2026-10", 1_000_000).await;
    set_revenue(&stores, growth_edge, "2026-10", 1_000_001).await;
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-10"),
        at("2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!(summary.issued.len(), 2, "{summary:?}");
    assert_eq!(summary.nothing_due, 1);

    let ours = assert_matches_preview(&stores, &standin, growth, "2026-10", 0).await;
    assert_eq!(ours.status, "open");
    assert_eq!(ours.total_cents, 125_000);
    let lines = invoices::lines(&stores.pool, ours.id).await.unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].line_key, "platform_fee");
    assert_eq!(
        lines[0].description,
        "Platform fee: 2.50 % of $50,000.00 mediated revenue (growth band)"
    );
    assert!(ours.hosted_invoice_url.is_some() && ours.finalized_at.is_some());
    assert_eq!(ours.amount_due_cents, Some(125_000));

    // Nothing to charge: no Stripe invoice at all.
    let nothing = invoice(&stores, starter_edge, "2026-10").await;
    assert_eq!(
        (nothing.status.as_str(), nothing.total_cents),
        ("nothing_due", 0)
    );
    assert!(nothing.stripe_invoice_id.is_none());
    let edge = assert_matches_preview(&stores, &standin, growth_edge, "2026-10", 0).await;
    assert_eq!(edge.total_cents, 25_000);
    assert_eq!(standin.invoices().len(), 2);
}

#[tokio::test]
async fn overage_on_two_metrics_an_addon_and_a_contract_are_each_a_line() {
    let (stores, standin, ids) = mapped(&["Busy Studio", "Enterprise Co"]).await;
    let (busy, enterprise) = (&ids[0], &ids[1]);
    // Starter includes 1,000,000 impressions (10 cents per 1,000 over) and 100,000 API calls
    // (5 cents per 1,000 over): 1,500 impressions over are 15 cents; 2,500 calls over are
    // 12.5 cents, rounded once, half up: 13.
    usage(&stores, busy, "impressions", "2026-09-03", 600_000).await;
    usage(&stores, busy, "impressions", "2026-09-20", 401_500).await;
    usage(&stores, busy, "api_calls", "2026-09-30", 102_500).await;
    set_revenue(&stores, busy, "2026-09", 0).await;
    // An add-on bought before the month ended; another after it (not on this invoice).
    for (addon, description, cents, created) in [
        (
            "white_label",
            "White-label console",
            50_000,
            "2026-08-15T00:00:00Z",
        ),
        (
            "priority_support",
            "Priority support",
            20_000,
            "2026-10-02T00:00:00Z",
        ),
    ] {
        sqlx::query(
            "INSERT INTO customer_addons (customer_id, addon, description, monthly_cents, created_at)
             VALUES ($1, $2, $3, $4, $5)",
        )
        .bind(busy)
        .bind(addon)
        .bind(description)
        .bind(cents)
        .bind(at(created))
        .execute(&stores.pool)
        .await
        .unwrap();
    }
    // A contract: 1.0 % with a $6,000 minimum; $500,000 x 1 % = $5,000, raised to $6,000.
    sqlx::query(
        "UPDATE customers SET platform_fee_bps_override = 100, platform_fee_minimum_cents = 600000
         WHERE id = $1",
    )
    .bind(enterprise)
    .execute(&stores.pool)
    .await
    .unwrap();
    set_revenue(&stores, enterprise, "2026-09", 50_000_000).await;

    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-09"),
        at("2026-10-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert!(summary.failed.is_empty(), "{summary:?}");
    let ours = assert_matches_preview(&stores, &standin, busy, "2026-09", 0).await;
    let lines: Vec<(String, i64)> = invoices::lines(&stores.pool, ours.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| (l.line_key, l.amount_cents))
        .collect();
    assert_eq!(
        lines,
        [
            ("overage:impressions".to_owned(), 15),
            ("overage:api_calls".to_owned(), 13),
            ("addon:white_label".to_owned(), 50_000),
        ]
    );
    assert_eq!(ours.total_cents, 50_028);

    let contract = assert_matches_preview(&stores, &standin, enterprise, "2026-09", 0).await;
    assert_eq!(contract.total_cents, 600_000);
    let fee = &invoices::lines(&stores.pool, contract.id).await.unwrap()[0];
    assert!(
        fee.description.contains("negotiated rate") && fee.description.contains("minimum"),
        "{}",
        fee.description
    );

    // Reconciled after the close: each invoice's total is its lines, what it bills is what the
    // month prices at, and Stripe's invoices carry the same total and lines (the rollups were
    // written directly and never synced here: those checks are the pipeline's and the sync's).
    let request = apex_stripe::reconcile::Request {
        period: month("2026-09"),
        customer: None,
        now: at("2026-10-01T06:00:00Z"),
        settled: false,
    };
    let checks = apex_stripe::reconcile::Checks {
        raw_events: false,
        usage_sync: false,
    };
    let report = apex_stripe::reconcile::reconcile_with(
        &stores.pool,
        &stores.config,
        Some(&client(&standin)),
        &request,
        checks,
    )
    .await
    .unwrap();
    assert!(report.is_clean(), "{report:#?}");
    let lines_compared = report
        .pairs
        .iter()
        .filter(|p| {
            p.check == apex_stripe::reconcile::LINE_VS_STRIPE
                && p.verdict == apex_stripe::reconcile::Verdict::Ok
        })
        .count();
    assert_eq!(lines_compared, 4, "{report:#?}");
}

#[tokio::test]
async fn an_invoice_waits_for_revenue_then_goes_without_a_fee_and_late_revenue_is_adjusted() {
    let (stores, standin, ids) = mapped(&["Punctual", "Forgetful"]).await;
    let (punctual, forgetful) = (&ids[0], &ids[1]);
    // Two days after the month: both wait (default wait: five days), nothing reaches Stripe.
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-08"),
        at("2026-09-03T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(summary.waiting.len(), 2, "{summary:?}");
    assert!(summary.issued.is_empty());
    assert!(
        standin
            .requests()
            .iter()
            .all(|r| r["path"] != "/v1/invoices")
    );
    assert!(
        invoices::for_period(&stores.pool, punctual, month("2026-08").start)
            .await
            .unwrap()
            .is_none()
    );

    // Revenue arrives for one: its invoice goes out with the fee the next day.
    set_revenue(&stores, punctual, "2026-08", 2_000_000).await;
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-08"),
        at("2026-09-04T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(summary.issued.len(), 1);
    assert_eq!(summary.waiting.len(), 1);
    let issued = assert_matches_preview(&stores, &standin, punctual, "2026-08", 0).await;
    assert_eq!(issued.total_cents, 50_000);

    // Past the wait: the other goes out without a fee line (here: nothing due) and a person
    // is told.
    usage(&stores, forgetful, "impressions", "2026-08-10", 1_010_000).await;
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-08"),
        at("2026-09-06T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(summary.issued.len(), 1, "{summary:?}");
    assert_eq!(summary.reviews_opened.len(), 1);
    assert_eq!(summary.reviews_opened[0].kind, "revenue_missing");
    let august = assert_matches_preview(&stores, &standin, forgetful, "2026-08", 0).await;
    assert_eq!(august.total_cents, 100);
    assert_eq!(august.revenue_cents, None);
    // Running again changes nothing and opens no second review.
    let again = close(
        &stores,
        &standin,
        None,
        Some("2026-08"),
        at("2026-09-07T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(
        (again.issued.len(), again.already_issued),
        (0, 2),
        "{again:?}"
    );
    assert!(again.reviews_opened.is_empty());
    let open = invoices::reviews(&stores.pool, Some(forgetful), false)
        .await
        .unwrap();
    assert_eq!(open.len(), 1);

    // The revenue comes after all: September's invoice carries August's fee as an adjustment.
    set_revenue(&stores, forgetful, "2026-08", 3_000_000).await;
    set_revenue(&stores, forgetful, "2026-09", 1_000_000).await;
    close(
        &stores,
        &standin,
        Some(forgetful),
        Some("2026-09"),
        at("2026-10-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let september = assert_matches_preview(&stores, &standin, forgetful, "2026-09", 75_000).await;
    let lines = invoices::lines(&stores.pool, september.id).await.unwrap();
    let adjustment = lines.iter().find(|l| l.kind == "adjustment").unwrap();
    assert_eq!(adjustment.line_key, "adjustment:2026-08");
    assert_eq!(adjustment.amount_cents, 75_000);
    assert_eq!(
        adjustment.corrects_period_start,
        Some(month("2026-08").start)
    );
    assert!(
        adjustment.description.contains("2026-08"),
        "{}",
        adjustment.description
    );
}

#[tokio::test]
async fn usage_after_the_invoice_is_adjusted_and_a_credit_waits_for_a_person() {
    let (stores, standin, ids) = mapped(&["Late Usage"]).await;
    let customer = &ids[0];
    set_revenue(&stores, customer, "2026-07", 2_000_000).await;
    usage(&stores, customer, "impressions", "2026-07-05", 1_002_000).await;
    close(
        &stores,
        &standin,
        None,
        Some("2026-07"),
        at("2026-08-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let july = assert_matches_preview(&stores, &standin, customer, "2026-07", 0).await;
    assert_eq!(july.total_cents, 50_000 + 20);

    // Records of July arrive late (3,000 impressions over: 30 cents more); the revenue figure is
    // corrected down ($20,000 -> $16,000: the fee $100 less). The difference is -$99.70: a
    // credit, which is never sent without a person's say.
    usage(&stores, customer, "impressions", "2026-07-31", 3_000).await;
    set_revenue(&stores, customer, "2026-07", 1_600_000).await;
    set_revenue(&stores, customer, "2026-08", 0).await;
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-08"),
        at("2026-09-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(summary.reviews_opened.len(), 1, "{summary:?}");
    let review = summary.reviews_opened[0].clone();
    assert_eq!(
        (review.kind.as_str(), review.amount_cents),
        ("negative_adjustment", -9_970)
    );
    let august = invoice(&stores, customer, "2026-08").await;
    assert_eq!(august.status, "nothing_due");

    // An approval names the amount the person saw; another amount is refused.
    assert!(
        invoices::resolve_review(
            &stores.pool,
            review.id,
            "approved",
            Some(-9_000),
            Utc::now()
        )
        .await
        .is_err()
    );
    // Approved: September's invoice carries the credit; only once.
    invoices::resolve_review(
        &stores.pool,
        review.id,
        "approved",
        Some(-9_970),
        at("2026-09-02T00:00:00Z"),
    )
    .await
    .unwrap();
    usage(&stores, customer, "api_calls", "2026-09-09", 2_100_000).await;
    set_revenue(&stores, customer, "2026-09", 0).await;
    close(
        &stores,
        &standin,
        None,
        Some("2026-09"),
        at("2026-10-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let september = assert_matches_preview(&stores, &standin, customer, "2026-09", -9_970).await;
    assert_eq!(september.total_cents, 10_000 - 9_970);
    // Usage arriving for September after its invoice goes on October's, as a positive line.
    usage(&stores, customer, "api_calls", "2026-09-30", 2_000).await;
    set_revenue(&stores, customer, "2026-10", 0).await;
    close(
        &stores,
        &standin,
        None,
        Some("2026-10"),
        at("2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let october = assert_matches_preview(&stores, &standin, customer, "2026-10", 10).await;
    let keys: Vec<String> = invoices::lines(&stores.pool, october.id)
        .await
        .unwrap()
        .into_iter()
        .map(|l| format!("{}={}", l.line_key, l.amount_cents))
        .collect();
    assert_eq!(
        keys,
        ["adjustment:2026-09=10"],
        "July's credit is not given twice"
    );
}

/// POSTs to `path` on the stand-in as (idempotency key, status).
fn posts(standin: &StripeStandIn, path: &str) -> Vec<(String, u64)> {
    standin
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "POST" && r["path"] == path)
        .map(|r| {
            (
                r["idempotency_key"].as_str().unwrap_or("").to_owned(),
                r["status"].as_u64().unwrap_or(0),
            )
        })
        .collect()
}

#[tokio::test]
async fn a_lost_answer_at_each_stripe_call_creates_no_second_invoice_or_line() {
    let (stores, standin, ids) = mapped(&["Unlucky"]).await;
    let customer = &ids[0];
    set_revenue(&stores, customer, "2026-10", 5_000_000).await;
    usage(&stores, customer, "impressions", "2026-10-12", 1_001_500).await;
    let now = at("2026-11-02T06:00:00Z");

    // 1. The invoice is created but every answer is lost: the run fails for the customer.
    standin.inject_fault_on("POST", "/v1/invoices", 500, 3, None, true);
    let summary = close(&stores, &standin, None, Some("2026-10"), now)
        .await
        .unwrap();
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    let row = invoice(&stores, customer, "2026-10").await;
    assert_eq!(
        (row.status.as_str(), row.stripe_invoice_id.as_deref()),
        ("pending", None)
    );
    // 2. The next run finds it by its metadata; the first item's answer is lost.
    standin.inject_fault_on("POST", "/v1/invoiceitems", 500, 3, None, true);
    let summary = close(&stores, &standin, None, Some("2026-10"), now)
        .await
        .unwrap();
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    let row = invoice(&stores, customer, "2026-10").await;
    assert_eq!(row.status, "draft");
    let stripe_id = row.stripe_invoice_id.clone().unwrap();
    // 3. Finalizing is carried out and its answer lost; and Stripe forgets every key (as
    //    after 24 hours), so only our metadata can find what exists.
    let finalize = format!("/v1/invoices/{stripe_id}/finalize");
    standin.inject_fault_on("POST", &finalize, 500, 3, None, true);
    let summary = close(&stores, &standin, None, Some("2026-10"), now)
        .await
        .unwrap();
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    standin.forget_idempotency_keys();
    // 4. Done: one invoice, each line once, finalized once.
    let summary = close(&stores, &standin, None, Some("2026-10"), now)
        .await
        .unwrap();
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!(summary.issued.len(), 1, "{summary:?}");
    let ours = assert_matches_preview(&stores, &standin, customer, "2026-10", 0).await;
    assert_eq!(ours.status, "open");
    assert_eq!(standin.invoices().len(), 1);
    // 5. Twice more: nothing new in Stripe.
    let before = standin.requests().len();
    for _ in 0..2 {
        let summary = close(&stores, &standin, None, Some("2026-10"), now)
            .await
            .unwrap();
        assert_eq!(summary.already_issued, 1, "{summary:?}");
    }
    let after: Vec<_> = standin.requests()[before..]
        .iter()
        .filter(|r| r["method"] == "POST")
        .cloned()
        .collect();
    assert!(after.is_empty(), "{after:?}");

    // The stand-in's log shows the keys: one per invoice, line and finalize, reused on retry.
    // The invoice was POSTed by the first run only (three attempts under one key); the second
    // found it by its metadata before creating anything.
    let invoice_posts = posts(&standin, "/v1/invoices");
    assert_eq!(invoice_posts.len(), 3, "{invoice_posts:?}");
    let key = format!("apex_invoice_{customer}_2026-10");
    assert!(
        invoice_posts.iter().all(|(k, _)| *k == key),
        "{invoice_posts:?}"
    );
    let item_keys: std::collections::BTreeSet<String> = posts(&standin, "/v1/invoiceitems")
        .into_iter()
        .map(|(k, _)| k)
        .collect();
    assert_eq!(
        item_keys.into_iter().collect::<Vec<_>>(),
        [
            format!("{key}_overage:impressions"),
            format!("{key}_platform_fee")
        ]
    );
    // Finalize was carried out once; the later runs read Stripe's status instead of
    // finalizing again.
    let finalizes = posts(&standin, &finalize);
    assert!(
        finalizes
            .iter()
            .all(|(k, _)| *k == format!("{key}_finalize"))
    );
    assert_eq!(
        finalizes.len(),
        3,
        "three attempts of one run: {finalizes:?}"
    );
}

#[tokio::test]
async fn a_server_error_is_retried_with_the_same_key() {
    let (stores, standin, ids) = mapped(&["Retry Co"]).await;
    set_revenue(&stores, &ids[0], "2026-10", 5_000_000).await;
    standin.inject_fault_on("POST", "/v1/invoices", 500, 1, None, false);
    standin.inject_fault_on("POST", "/v1/invoiceitems", 429, 1, Some(0), false);
    let summary = close(
        &stores,
        &standin,
        None,
        Some("2026-10"),
        at("2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!(
        posts(&standin, "/v1/invoices")
            .into_iter()
            .map(|(_, status)| status)
            .collect::<Vec<_>>(),
        [500, 200]
    );
    let items = posts(&standin, "/v1/invoiceitems");
    assert_eq!(items.len(), 2);
    assert_eq!(items[0].0, items[1].0);
    assert_matches_preview(&stores, &standin, &ids[0], "2026-10", 0).await;
}

/// A signed-shape Stripe event about `object`, as Stripe sends it.
fn event(id: &str, kind: &str, created: i64, object: &serde_json::Value) -> Vec<u8> {
    json!({"id": id, "object": "event", "type": kind, "created": created,
           "data": {"object": object}})
    .to_string()
    .into_bytes()
}

async fn deliver(stores: &TestStores, payload: &[u8]) {
    let event = webhooks::parse_event(payload).expect("a Stripe event");
    webhooks::handle(
        &mut stores.pool.acquire().await.unwrap(),
        &Default::default(),
        &event,
        chrono::Utc::now(),
    )
    .await
    .unwrap();
}

async fn subscription_status(stores: &TestStores, customer: &str) -> String {
    sqlx::query_scalar(
        "SELECT status FROM subscriptions WHERE customer_id = $1 AND status <> 'canceled'",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn webhooks_move_the_mirror_to_paid_or_payment_failed_and_the_subscription_with_it() {
    let (stores, standin, ids) = mapped(&["Pays Late", "Pays Now"]).await;
    let (late, prompt) = (&ids[0], &ids[1]);
    for customer in [late, prompt] {
        set_revenue(&stores, customer, "2026-10", 5_000_000).await;
    }
    close(
        &stores,
        &standin,
        None,
        Some("2026-10"),
        at("2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let t = Utc::now().timestamp();

    // Paid: open -> paid, with the time.
    let ours = invoice(&stores, prompt, "2026-10").await;
    let stripe_id = ours.stripe_invoice_id.clone().unwrap();
    let paid = standin.pay_invoice(&stripe_id);
    deliver(&stores, &event("evt_paid_1", "invoice.paid", t, &paid)).await;
    let mirrored = invoice(&stores, prompt, "2026-10").await;
    assert_eq!(mirrored.status, "paid");
    assert_eq!(mirrored.amount_paid_cents, Some(125_000));
    assert!(mirrored.paid_at.is_some());

    // Payment failed: the invoice stays open with the failure recorded, and the customer's
    // subscription (our invoices carry none: found by the Stripe customer) goes past_due.
    let ours = invoice(&stores, late, "2026-10").await;
    let stripe_id = ours.stripe_invoice_id.clone().unwrap();
    let failed = standin.fail_invoice_payment(&stripe_id);
    deliver(
        &stores,
        &event("evt_failed_1", "invoice.payment_failed", t, &failed),
    )
    .await;
    let mirrored = invoice(&stores, late, "2026-10").await;
    assert_eq!(mirrored.status, "open");
    assert_eq!(mirrored.attempt_count, 1);
    assert!(mirrored.payment_failed_at.is_some());
    assert_eq!(subscription_status(&stores, late).await, "past_due");
    // Then paid: active again; a late copy of an older failure changes nothing.
    let paid = standin.pay_invoice(&stripe_id);
    deliver(&stores, &event("evt_paid_2", "invoice.paid", t + 60, &paid)).await;
    deliver(
        &stores,
        &event("evt_failed_old", "invoice.payment_failed", t - 60, &failed),
    )
    .await;
    assert_eq!(invoice(&stores, late, "2026-10").await.status, "paid");
    assert_eq!(subscription_status(&stores, late).await, "active");
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_reason() {
    let (stores, standin, ids) = mapped(&["Early Bird"]).await;
    // A month that has not ended is never invoiced.
    let err = close(
        &stores,
        &standin,
        None,
        Some("2026-11"),
        at("2026-11-20T00:00:00Z"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("has not ended"), "{err}");
    let err = close(
        &stores,
        &standin,
        Some("cus_nobody"),
        None,
        at("2026-11-20T00:00:00Z"),
    )
    .await
    .unwrap_err();
    assert!(err.to_string().contains("not found"), "{err}");
    // A customer not in Stripe is listed, not failed.
    sqlx::query("UPDATE customers SET stripe_customer_id = NULL WHERE id = $1")
        .bind(&ids[0])
        .execute(&stores.pool)
        .await
        .unwrap();
    let summary = close(&stores, &standin, None, None, at("2026-11-20T00:00:00Z"))
        .await
        .unwrap();
    assert_eq!(summary.unmapped_customers, [ids[0].clone()]);
    // A review that is not a credit cannot be approved; an unknown one is not found.
    assert!(
        invoices::resolve_review(&stores.pool, 999_999, "dismissed", None, Utc::now())
            .await
            .is_err()
    );
}

#[tokio::test]
async fn the_job_closes_the_last_two_months_each_once_and_none_before_sign_up() {
    let (stores, standin, ids) = mapped(&["Since September", "Since October"]).await;
    let (september, october) = (&ids[0], &ids[1]);
    for (customer, created) in [
        (september, "2026-09-15T00:00:00Z"),
        (october, "2026-10-20T00:00:00Z"),
    ] {
        sqlx::query("UPDATE customers SET created_at = $2 WHERE id = $1")
            .bind(customer)
            .bind(at(created))
            .execute(&stores.pool)
            .await
            .unwrap();
    }
    for customer in [september, october] {
        set_revenue(&stores, customer, "2026-10", 2_000_000).await;
    }
    set_revenue(&stores, september, "2026-09", 4_000_000).await;
    let summary = close(&stores, &standin, None, None, at("2026-11-01T06:00:00Z"))
        .await
        .unwrap();
    assert_eq!(summary.periods, ["2026-09", "2026-10"]);
    let mut issued: Vec<(String, String, i64)> = summary
        .issued
        .iter()
        .map(|i| (i.customer_id.clone(), i.month.clone(), i.total_cents))
        .collect();
    issued.sort();
    let mut expected = vec![
        (september.clone(), "2026-09".to_owned(), 100_000),
        (september.clone(), "2026-10".to_owned(), 50_000),
        (october.clone(), "2026-10".to_owned(), 50_000),
    ];
    expected.sort();
    assert_eq!(issued, expected, "{summary:?}");
    assert!(
        invoices::for_period(&stores.pool, october, month("2026-09").start)
            .await
            .unwrap()
            .is_none(),
        "no invoice for a month before sign-up"
    );
    for (customer, period) in [
        (september, "2026-09"),
        (september, "2026-10"),
        (october, "2026-10"),
    ] {
        assert_matches_preview(&stores, &standin, customer, period, 0).await;
    }
    // The next day's run finds everything issued.
    let again = close(&stores, &standin, None, None, at("2026-11-02T06:00:00Z"))
        .await
        .unwrap();
    assert_eq!(
        (again.issued.len(), again.already_issued),
        (0, 3),
        "{again:?}"
    );
    assert_eq!(standin.invoices().len(), 3);
}

#[tokio::test]
async fn a_stripe_total_that_is_not_ours_is_never_finalized_and_the_other_invoices_go_out() {
    let (stores, standin, ids) = mapped(&["Tampered"]).await;
    let customer = &ids[0];
    set_revenue(&stores, customer, "2026-09", 2_000_000).await;
    set_revenue(&stores, customer, "2026-10", 5_000_000).await;
    // The first run creates September's draft and loses every item answer: the draft is left
    // with its fee line only half-recorded.
    standin.inject_fault_on("POST", "/v1/invoiceitems", 500, 3, None, true);
    close(
        &stores,
        &standin,
        None,
        Some("2026-09"),
        at("2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    let september = invoice(&stores, customer, "2026-09").await;
    let draft = september.stripe_invoice_id.clone().unwrap();
    // Someone adds a line to the draft in Stripe's dashboard.
    let stripe_customer: String =
        sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
            .bind(customer)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    standin.post_json(
        "/v1/invoiceitems",
        &json!({"customer": stripe_customer, "invoice": draft, "amount": 999,
                "currency": "usd", "description": "added by hand"}),
    );
    // September is not finalized and is listed; October still goes out; the run fails.
    let summary = close(
        &stores,
        &standin,
        Some(customer),
        Some("2026-09"),
        at("2026-11-01T07:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    assert_eq!(summary.reviews_opened.len(), 1);
    assert_eq!(summary.reviews_opened[0].kind, "total_mismatch");
    assert_eq!(summary.reviews_opened[0].amount_cents, 999);
    assert_eq!(standin.invoice(&draft)["status"], "draft");
    assert_eq!(invoice(&stores, customer, "2026-09").await.status, "draft");
    let summary = close(
        &stores,
        &standin,
        Some(customer),
        Some("2026-10"),
        at("2026-11-01T07:00:00Z"),
    )
    .await
    .unwrap();
    // October is issued; September is tried again and stays unfinalized (the open review is
    // kept, not duplicated).
    assert_eq!(summary.issued.len(), 1, "{summary:?}");
    assert!(summary.reviews_opened.is_empty(), "{summary:?}");
    assert_eq!(summary.failed.len(), 1);
    assert_eq!(standin.invoice(&draft)["status"], "draft");
    assert_matches_preview(&stores, &standin, customer, "2026-10", 0).await;
}

#[tokio::test]
async fn stripes_own_zero_invoices_and_one_paid_invoice_do_not_make_a_debtor_current() {
    let (stores, standin, ids) = mapped(&["Two Invoices"]).await;
    let customer = &ids[0];
    for month in ["2026-09", "2026-10"] {
        set_revenue(&stores, customer, month, 5_000_000).await;
        close(
            &stores,
            &standin,
            None,
            Some(month),
            at("2026-11-01T06:00:00Z"),
        )
        .await
        .unwrap();
    }
    let t = Utc::now().timestamp();
    let september = invoice(&stores, customer, "2026-09")
        .await
        .stripe_invoice_id
        .unwrap();
    let october = invoice(&stores, customer, "2026-10")
        .await
        .stripe_invoice_id
        .unwrap();
    for (n, id) in [&september, &october].into_iter().enumerate() {
        let failed = standin.fail_invoice_payment(id);
        deliver(
            &stores,
            &event(&format!("evt_f{n}"), "invoice.payment_failed", t, &failed),
        )
        .await;
    }
    assert_eq!(subscription_status(&stores, customer).await, "past_due");
    // Stripe's $0 renewal of the subscription is paid by itself: nothing changes.
    let subscription: String = sqlx::query_scalar(
        "SELECT stripe_subscription_id FROM subscriptions WHERE customer_id = $1",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    let renewal = json!({"id": "in_renewal", "object": "invoice", "status": "paid",
        "amount_due": 0, "amount_paid": 0, "total": 0,
        "parent": {"subscription_details": {"subscription": subscription}}});
    deliver(
        &stores,
        &event("evt_renewal", "invoice.paid", t + 1, &renewal),
    )
    .await;
    assert_eq!(subscription_status(&stores, customer).await, "past_due");
    // Paying September leaves October's failure: still past_due. Paying October too: active.
    let paid = standin.pay_invoice(&september);
    deliver(&stores, &event("evt_p_sep", "invoice.paid", t + 2, &paid)).await;
    assert_eq!(subscription_status(&stores, customer).await, "past_due");
    let paid = standin.pay_invoice(&october);
    deliver(&stores, &event("evt_p_oct", "invoice.paid", t + 3, &paid)).await;
    assert_eq!(subscription_status(&stores, customer).await, "active");
}
