//! `apexctl reconcile` end to end: usage written through the real pipeline store writers into
//! both stores, the real usage sync and invoice close against the Stripe stand-in, then the
//! binary shows no drift; a hand-made difference planted in each store in turn (a raw event,
//! a daily rollup row, a rollup hour, a reported quantity, a Stripe meter event, an invoice
//! total and line) is named exactly: check, customer, metric, day or line, and difference.

mod common;

use std::collections::BTreeSet;

use apex_billing::invoices::CloseSettings;
use apex_billing::pricing::{Period, calendar_month};
use apex_billing::statement;
use apex_core::model::Metric;
use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, StripeClient};
use apex_stripe::invoicing::{CloseRequest, close_invoices};
use apex_stripe::sync::{SyncRequest, sync_usage};
use apex_stripe::testing::{StripeStandIn, TEST_KEY, signup};
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::Value;

use common::{at, record, write_usage};

/// Runs `apexctl reconcile --period P --stripe --json` (plus `extra`) on the wall clock;
/// returns the exit code and the parsed report.
fn reconcile(
    stores: &TestStores,
    standin: &StripeStandIn,
    month: &str,
    extra: &[&str],
) -> (i32, Value) {
    let out = common::apexctl_command(stores)
        .args(["reconcile", "--period", month, "--stripe", "--json"])
        .args(extra)
        .env("STRIPE_SECRET_KEY", TEST_KEY)
        .env("STRIPE_API_BASE", standin.base_url())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(&stdout).unwrap_or_else(|e| {
        panic!(
            "not one JSON document ({e}): {stdout}\nstderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap_or(-1), report)
}

/// A drift as (check, customer, metric or line, day, difference).
type Drift = (String, String, String, String, i64);

fn drifts(report: &Value) -> BTreeSet<Drift> {
    report["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["verdict"] == "drift")
        .map(|p| {
            (
                p["check"].as_str().unwrap().to_owned(),
                p["customer_id"].as_str().unwrap().to_owned(),
                p["metric_type"]
                    .as_str()
                    .or(p["line"].as_str())
                    .unwrap_or("-")
                    .to_owned(),
                p["day"].as_str().unwrap_or("-").to_owned(),
                p["difference"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn drift(check: &str, customer: &str, what: &str, day: &str, difference: i64) -> Drift {
    (
        check.into(),
        customer.into(),
        what.into(),
        day.into(),
        difference,
    )
}

async fn execute(stores: &TestStores, sql: &'static str, customer: &str, day: NaiveDate) {
    sqlx::query(sql)
        .bind(customer)
        .bind(day)
        .execute(&stores.pool)
        .await
        .unwrap();
}

#[tokio::test]
async fn reconcile_is_clean_after_the_real_flows_and_names_each_planted_difference() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let a = signup(&stores.pool, "Lumen Games").await;
    let b = signup(&stores.pool, "Quiet Games").await;
    let stripe =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&stores.pool, &stripe).await.unwrap();
    sync_customers(&stores.pool, &stripe, None).await.unwrap();
    // Signed up after the mapping: not in Stripe.
    let unmapped = signup(&stores.pool, "Offline Games").await;

    // The period is yesterday's month: its days are inside Stripe's window (the stand-in
    // refuses meter events older than 35 days of the wall clock).
    let now = Utc::now();
    let yesterday = now.date_naive() - Duration::days(1);
    let period: Period = calendar_month(at(yesterday, 0));
    let month = yesterday.format("%Y-%m").to_string();
    // Customers of the whole month, as the close bills months of a customer's life only.
    sqlx::query("UPDATE customers SET created_at = $1")
        .bind(period.start - Duration::days(1))
        .execute(&stores.pool)
        .await
        .unwrap();

    // Usage through the pipeline's writers: A and B go past Starter's 1,000,000 included
    // impressions (an overage line each); today's records make an incomplete day.
    let log = "log_reconcile";
    let mut position = 0;
    let mut records = Vec::new();
    for customer in [&a, &b, &unmapped] {
        records.push(record(
            customer,
            Metric::Impressions,
            600_000,
            at(yesterday, 3),
        ));
        records.push(record(
            customer,
            Metric::Impressions,
            401_500,
            at(yesterday, 17),
        ));
        records.push(record(customer, Metric::ApiCalls, 4_000, at(yesterday, 9)));
        records.push(record(
            customer,
            Metric::DataTransfer,
            2_500_000_000,
            at(yesterday, 11),
        ));
    }
    write_usage(&stores, log, &mut position, &records).await;
    let today = vec![
        record(&a, Metric::Impressions, 10, now - Duration::seconds(1)),
        record(&b, Metric::ApiCalls, 3, now - Duration::seconds(1)),
    ];
    write_usage(&stores, log, &mut position, &today).await;

    // The nightly sync (every reportable day as of now) and the month's invoice close (as
    // of the end of the month when it has not ended yet: the close bills ended months).
    let synced = sync_usage(
        &stores.pool,
        &stripe,
        &SyncRequest {
            customer: None,
            day: None,
            now,
        },
    )
    .await
    .unwrap();
    assert!(synced.failed.is_empty(), "{synced:?}");
    assert!(synced.events_sent >= 6, "{synced:?}");
    for customer in [&a, &b] {
        statement::set_revenue(&stores.pool, customer, &period, 0)
            .await
            .unwrap();
    }
    let closed = close_invoices(
        &stores.pool,
        &stripe,
        &CloseRequest {
            customer: None,
            period: Some(period),
            now: now.max(period.end + Duration::seconds(1)),
            settings: CloseSettings::default(),
        },
    )
    .await
    .unwrap();
    assert!(closed.failed.is_empty(), "{closed:?}");

    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), BTreeSet::new(), "{report:#}");
    assert_eq!(code, 0, "{report:#}");
    assert_eq!(report["clean"], true);
    assert_eq!(report["period"], month.as_str());
    assert_eq!(report["unmapped_customers"], serde_json::json!([unmapped]));
    let summary = &report["summary"];
    for check in [
        "raw_events/clickhouse_daily",
        "raw_events/postgres_hourly",
        "postgres_hourly/stripe_reported",
        "stripe_reported/stripe_meter",
        "invoice/invoice_lines",
        "invoice/preview",
        "invoice/stripe_invoice",
        "invoice_line/stripe_invoice_line",
    ] {
        assert!(
            summary[check]["ok"].as_u64().unwrap() > 0,
            "{check} compared nothing: {summary:#}"
        );
    }
    // The unmapped customer's usage is compared between the stores, never with Stripe.
    let pairs = report["pairs"].as_array().unwrap();
    assert!(pairs.iter().any(
        |p| p["customer_id"] == unmapped.as_str() && p["check"] == "raw_events/postgres_hourly"
    ));
    assert!(!pairs.iter().any(|p| p["customer_id"] == unmapped.as_str()
        && p["check"].as_str().unwrap().contains("stripe")));
    // Today is not complete: unsynced, not drift (in today's month, which on the 1st is not
    // the period's).
    let this_month = now.date_naive().format("%Y-%m").to_string();
    let today_report = if this_month == month {
        report.clone()
    } else {
        reconcile(&stores, &standin, &this_month, &[]).1
    };
    assert!(
        today_report["pairs"].as_array().unwrap().iter().any(
            |p| p["verdict"] == "unsynced" && p["day"] == now.date_naive().to_string().as_str()
        ),
        "{today_report:#}"
    );

    let day = yesterday.to_string();
    let mut expected = BTreeSet::new();
    let ch = stores.config.clickhouse();
    // An hour later on the database's clock: Stripe's summaries have caught up with what the
    // sync sent (minutes after a send they may not have, and that pair is unsynced).
    sqlx::query("UPDATE stripe_usage_sync SET synced_at = synced_at - interval '1 hour'")
        .execute(&stores.pool)
        .await
        .unwrap();

    // 1. A raw event the Postgres rollups never got (the materialized view adds it to the
    //    daily rollup, as for any insert).
    ch.query(
        "INSERT INTO usage_events (customer_id, metric_type, quantity, event_id, batch_id, ts, \
             received_at, metadata, log_id, batch_seq) \
         VALUES (?, 'data_transfer', 1000, '', 0, toDateTime(?), toDateTime(?), '', 'planted', 0)",
    )
    .bind(a.as_str())
    .bind(at(yesterday, 12).timestamp() as u32)
    .bind(at(yesterday, 12).timestamp() as u32)
    .execute()
    .await
    .unwrap();
    expected.insert(drift(
        "raw_events/postgres_hourly",
        &a,
        "data_transfer",
        &day,
        -1000,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!((code, &report["clean"]), (1, &Value::Bool(false)));

    // 2. A daily rollup row without raw events.
    ch.query(
        "INSERT INTO usage_daily (day, customer_id, metric_type, quantity) \
         VALUES (toDate(?), ?, 'api_calls', 5)",
    )
    .bind(day.as_str())
    .bind(a.as_str())
    .execute()
    .await
    .unwrap();
    expected.insert(drift(
        "raw_events/clickhouse_daily",
        &a,
        "api_calls",
        &day,
        5,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);

    // 3. A rollup hour changed behind the pipeline's back (the sync has not had a day to
    //    notice: that pair is unsynced, not drift).
    execute(
        &stores,
        "UPDATE usage_records SET quantity = quantity + 2 WHERE customer_id = $1 \
           AND metric_type = 'impressions' AND recorded_at = $2::date + interval '3 hours'",
        &b,
        yesterday,
    )
    .await;
    expected.insert(drift(
        "raw_events/postgres_hourly",
        &b,
        "impressions",
        &day,
        2,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);
    let synced_pair = report["pairs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| {
            p["check"] == "postgres_hourly/stripe_reported"
                && p["customer_id"] == b.as_str()
                && p["metric_type"] == "impressions"
                && p["day"] == day.as_str()
        })
        .cloned()
        .unwrap();
    assert_eq!(
        (&synced_pair["verdict"], &synced_pair["difference"]),
        (&Value::from("unsynced"), &Value::from(-2)),
        "{synced_pair:#}"
    );

    // 4. A reported quantity Stripe never got: against the rollups and against Stripe.
    execute(
        &stores,
        "UPDATE stripe_usage_sync SET quantity_reported = quantity_reported + 3 \
         WHERE customer_id = $1 AND metric_type = 'impressions' AND usage_date = $2",
        &a,
        yesterday,
    )
    .await;
    expected.insert(drift(
        "postgres_hourly/stripe_reported",
        &a,
        "impressions",
        &day,
        3,
    ));
    expected.insert(drift(
        "stripe_reported/stripe_meter",
        &a,
        "impressions",
        &day,
        -3,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);

    // 5. A meter event someone else sent to Stripe.
    let stripe_b: String =
        sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
            .bind(&b)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    standin.post_json(
        "/v1/billing/meter_events",
        &serde_json::json!({
            "event_name": "apex_api_calls", "identifier": "planted_1",
            "timestamp": at(yesterday, 13).timestamp(),
            "payload": {"stripe_customer_id": stripe_b, "value": "11"},
        }),
    );
    expected.insert(drift(
        "stripe_reported/stripe_meter",
        &b,
        "api_calls",
        &day,
        11,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);

    // 6. An invoice total, then an invoice line, changed in our mirror.
    sqlx::query("UPDATE invoices SET total_cents = total_cents + 100 WHERE customer_id = $1")
        .bind(&a)
        .execute(&stores.pool)
        .await
        .unwrap();
    expected.insert(drift("invoice/invoice_lines", &a, "-", "-", -100));
    expected.insert(drift("invoice/stripe_invoice", &a, "-", "-", -100));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);
    let line: String = sqlx::query_scalar(
        "UPDATE invoice_lines SET amount_cents = amount_cents + 50 \
         WHERE invoice_id = (SELECT id FROM invoices WHERE customer_id = $1) \
           AND kind = 'overage' AND metric_type = 'impressions' RETURNING line_key",
    )
    .bind(&b)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    expected.insert(drift("invoice/invoice_lines", &b, "-", "-", 50));
    expected.insert(drift("invoice/preview", &b, "-", "-", -50));
    expected.insert(drift(
        "invoice_line/stripe_invoice_line",
        &b,
        &line,
        "-",
        -50,
    ));
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);

    // One customer only: only its drifts.
    let (code, report) = reconcile(&stores, &standin, &month, &["--customer", &b]);
    let only_b: BTreeSet<Drift> = expected.iter().filter(|d| d.1 == b).cloned().collect();
    assert_eq!(drifts(&report), only_b, "{report:#}");
    assert_eq!(code, 1);

    // The text form: a table of what is not ok and a summary line.
    let out = common::apexctl_command(&stores)
        .args(["reconcile", "--period", &month])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.contains("DRIFT    raw_events/clickhouse_daily"),
        "{text}"
    );
    assert!(
        text.lines().last().unwrap().starts_with(&format!(
            "reconcile {month}: DRIFT — raw_events/clickhouse_daily "
        )),
        "{text}"
    );

    // 7. A's invoice back in `draft` (the close still building it, written moments ago on
    //    the run's clock): its difference from Stripe's is unsynced; written two days ago, it
    //    is drift; and drift at once while a total_mismatch review says the close gave up.
    let stripe_pair = |report: &Value| {
        report["pairs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["check"] == "invoice/stripe_invoice" && p["customer_id"] == a.as_str())
            .cloned()
            .unwrap()
    };
    sqlx::query("UPDATE invoices SET status = 'draft' WHERE customer_id = $1")
        .bind(&a)
        .execute(&stores.pool)
        .await
        .unwrap();
    let (_, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(stripe_pair(&report)["verdict"], "unsynced", "{report:#}");
    // Two days before the run's clock (reconcile runs on the wall clock here), not before the
    // close's: when the period is this month, the close ran as of its end, weeks ahead.
    let written: DateTime<Utc> =
        sqlx::query_scalar("SELECT created_at FROM invoices WHERE customer_id = $1")
            .bind(&a)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    let set_created = async |at: DateTime<Utc>| {
        sqlx::query("UPDATE invoices SET created_at = $2 WHERE customer_id = $1")
            .bind(&a)
            .bind(at)
            .execute(&stores.pool)
            .await
            .unwrap();
    };
    set_created(Utc::now() - Duration::days(2)).await;
    let (_, report) = reconcile(&stores, &standin, &month, &[]);
    assert_eq!(stripe_pair(&report)["verdict"], "drift", "{report:#}");
    set_created(written).await;
    apex_billing::invoices::open_review(
        &stores.pool,
        &a,
        period.start,
        "total_mismatch",
        -100,
        "Stripe's draft differs: not finalized",
        now,
    )
    .await
    .unwrap();
    let (code, report) = reconcile(&stores, &standin, &month, &[]);
    let pair = stripe_pair(&report);
    assert_eq!(pair["verdict"], "drift", "{report:#}");
    assert!(
        pair["note"]
            .as_str()
            .unwrap()
            .contains("total_mismatch review"),
        "{pair:#}"
    );
    assert_eq!(drifts(&report), expected, "{report:#}");
    assert_eq!(code, 1);
}

#[tokio::test]
async fn bad_requests_are_refused_with_a_reason() {
    let stores = TestStores::migrated().await;
    for (args, code, says) in [
        (
            vec!["reconcile", "--period", "2026-13"],
            1,
            "--period \"2026-13\": expected a month YYYY-MM",
        ),
        (
            vec![
                "reconcile",
                "--period",
                "2026-11",
                "--customer",
                "cus_nobody",
            ],
            1,
            "customer cus_nobody not found",
        ),
        (
            vec!["reconcile", "--period", "2026-11", "--stripe"],
            1,
            "STRIPE_SECRET_KEY is not set",
        ),
        (vec!["reconcile"], 2, "--period"),
    ] {
        let out = common::apexctl_command(&stores)
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(err.contains(says), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
    // A period with nothing in it is clean.
    let out = common::apexctl_command(&stores)
        .args(["reconcile", "--period", "2026-01", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(report["pairs"], serde_json::json!([]));
    assert_eq!(report["stripe"], false);
    // A store that cannot be read is not drift: exit 3, with the reason, nothing on stdout.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let out = common::apexctl_command(&stores)
        .env("CLICKHOUSE_URL", &url)
        .args(["reconcile", "--period", "2026-01", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(err.contains("could not compare"), "{err}");
    assert!(out.stdout.is_empty());
}

#[tokio::test]
async fn late_usage_is_unsynced_until_the_next_invoice_adjusts_it() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let studio = signup(&stores.pool, "Late Games").await;
    let stripe =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&stores.pool, &stripe).await.unwrap();
    sync_customers(&stores.pool, &stripe, None).await.unwrap();
    sqlx::query("UPDATE customers SET created_at = '2026-01-01T00:00:00Z'")
        .execute(&stores.pool)
        .await
        .unwrap();
    let september = apex_billing::pricing::parse_month("2026-09").unwrap();
    let october = apex_billing::pricing::parse_month("2026-10").unwrap();
    let day: NaiveDate = "2026-09-15".parse().unwrap();
    let mut position = 0;
    write_usage(
        &stores,
        "log_late",
        &mut position,
        &[record(&studio, Metric::Impressions, 1_001_500, at(day, 10))],
    )
    .await;
    for period in [&september, &october] {
        statement::set_revenue(&stores.pool, &studio, period, 0)
            .await
            .unwrap();
    }
    let close = |period: Period, now: &str| CloseRequest {
        customer: None,
        period: Some(period),
        now: now.parse().unwrap(),
        settings: CloseSettings::default(),
    };
    let closed = close_invoices(
        &stores.pool,
        &stripe,
        &close(september, "2026-10-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(closed.failed.len(), 0, "{closed:?}");
    // The usage sync is not part of this story (September is past Stripe's window).
    let checks = apex_stripe::reconcile::Checks {
        usage_sync: false,
        ..Default::default()
    };
    let preview = |report: &apex_stripe::reconcile::Report| {
        let pair = report
            .pairs
            .iter()
            .find(|p| p.check == apex_stripe::reconcile::INVOICE_VS_PREVIEW)
            .unwrap()
            .clone();
        (pair.verdict, pair.difference)
    };
    // The run's clock is the test's, never the wall clock: the database's change times are
    // compared only with the database's.
    let report =
        reconcile_library(&stores, &stripe, september, checks, "2026-10-02T00:00:00Z").await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(preview(&report), (apex_stripe::reconcile::Verdict::Ok, 0));

    // 3,000 more impressions for September arrive after its invoice: 30 cents more due,
    // which the next invoice adjusts. Until it is written, that is not drift.
    write_usage(
        &stores,
        "log_late",
        &mut position,
        &[record(&studio, Metric::Impressions, 3_000, at(day, 11))],
    )
    .await;
    let report =
        reconcile_library(&stores, &stripe, september, checks, "2026-10-20T00:00:00Z").await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(
        preview(&report),
        (apex_stripe::reconcile::Verdict::Unsynced, 30)
    );
    // Only until October's close is due (a day after October plus the longest revenue wait):
    // a close that never runs is drift.
    let report =
        reconcile_library(&stores, &stripe, september, checks, "2026-12-01T00:00:00Z").await;
    assert_eq!(
        preview(&report),
        (apex_stripe::reconcile::Verdict::Drift, 30)
    );

    // October's invoice carries the adjustment: September is billed in full again.
    let closed = close_invoices(
        &stores.pool,
        &stripe,
        &close(october, "2026-11-01T06:00:00Z"),
    )
    .await
    .unwrap();
    assert_eq!(closed.failed.len(), 0, "{closed:?}");
    let report =
        reconcile_library(&stores, &stripe, september, checks, "2026-11-02T00:00:00Z").await;
    assert!(report.is_clean(), "{report:#?}");
    assert_eq!(preview(&report), (apex_stripe::reconcile::Verdict::Ok, 0));
}

/// The library's reconciliation of `period` at the run's time `now`, with Stripe.
async fn reconcile_library(
    stores: &TestStores,
    stripe: &StripeClient,
    period: Period,
    checks: apex_stripe::reconcile::Checks,
    now: &str,
) -> apex_stripe::reconcile::Report {
    let request = apex_stripe::reconcile::Request {
        period,
        customer: None,
        now: now.parse().unwrap(),
        settled: false,
    };
    apex_stripe::reconcile::reconcile_with(
        &stores.pool,
        &stores.config,
        Some(stripe),
        &request,
        checks,
    )
    .await
    .unwrap()
}
