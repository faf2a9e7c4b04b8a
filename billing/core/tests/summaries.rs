//! Monthly summaries against the real Postgres on a simulated clock: on the 1st every active
//! customer who had the month gets one summary of it with the right figures (usage per metric,
//! the seeded plans' allowances and overage prices, the platform fee on the month's revenue,
//! the invoice when there is one, the change against the month before); a second run, a
//! concurrent one and a late one enqueue nothing more; opted-out, suspended, canceled and
//! later customers get none. (The data's rendering is checked by apex-notify's snapshot of
//! `sample_data(MonthlySummary)`, which has this shape.)

use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::invoices::{self, CloseSettings, Prepared, StripeState};
use apex_billing::pricing::{Period, month_period};
use apex_billing::summaries::{
    self, SummaryRunSummary, dedup_key, monthly_summary, send_monthly_summaries,
};
use apex_billing::{email_log, statement};
use apex_core::testing::TestStores;
use chrono::{DateTime, Utc};
use serde_json::{Value, json};

fn at(text: &str) -> DateTime<Utc> {
    DateTime::parse_from_rfc3339(text).unwrap().to_utc()
}

fn october() -> Period {
    month_period(2025, 10).unwrap()
}

fn september() -> Period {
    month_period(2025, 9).unwrap()
}

/// Signs `name` up on `plan` at `created` (a trial of `trial_days`); returns its id.
async fn customer(
    stores: &TestStores,
    name: &str,
    plan: &str,
    trial_days: u32,
    created: &str,
) -> String {
    let mut conn = stores.pool.acquire().await.unwrap();
    create_customer(
        &mut conn,
        &NewCustomer {
            name: name.into(),
            email: format!("{}@example.com", name.to_lowercase()),
            plan_id: plan.into(),
            trial_days: Some(trial_days),
        },
        at(created),
    )
    .await
    .unwrap()
    .customer
    .id
}

/// Adds `quantity` of `metric` to the hourly rollup starting at `hour`.
async fn usage(stores: &TestStores, customer: &str, metric: &str, hour: &str, quantity: i64) {
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         VALUES ($1, $2, $3, $4) \
         ON CONFLICT (customer_id, metric_type, recorded_at) \
         DO UPDATE SET quantity = usage_records.quantity + EXCLUDED.quantity",
    )
    .bind(customer)
    .bind(metric)
    .bind(at(hour))
    .bind(quantity)
    .execute(&stores.pool)
    .await
    .unwrap();
}

async fn set_status(stores: &TestStores, customer: &str, status: &str) {
    sqlx::query("UPDATE customers SET status = $2 WHERE id = $1")
        .bind(customer)
        .bind(status)
        .execute(&stores.pool)
        .await
        .unwrap();
}

async fn run(stores: &TestStores, now: &str) -> SummaryRunSummary {
    let mut conn = stores.pool.acquire().await.unwrap();
    send_monthly_summaries(&mut conn, at(now)).await.unwrap()
}

/// Every summary event: (customer, dedup key, data), by customer and month.
async fn summary_events(stores: &TestStores) -> Vec<(String, String, Value)> {
    sqlx::query_as(
        "SELECT data->>'customer_id', dedup_key, data FROM events \
         WHERE event_type = 'email.monthly_summary' ORDER BY data->>'customer_id', dedup_key",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

fn data_of<'a>(events: &'a [(String, String, Value)], customer: &str) -> &'a Value {
    let found: Vec<&Value> = events
        .iter()
        .filter(|(c, _, _)| c == customer)
        .map(|(_, _, d)| d)
        .collect();
    assert_eq!(found.len(), 1, "{customer}: {events:#?}");
    found[0]
}

/// Asserts `data` holds every `(field, value)` of `expected`.
fn assert_fields(data: &Value, expected: &Value) {
    for (field, value) in expected.as_object().unwrap() {
        assert_eq!(&data[field], value, "field {field} of {data:#}");
    }
}

/// The seeded customers of the first-of-the-month scenario.
struct Seeded {
    starter: String,
    growth: String,
    trialing: String,
    idle: String,
    opted_out: String,
    suspended: String,
    canceled: String,
    late: String,
}

/// October 2025 (and September) for a set of customers, as the 1st of November sees it.
async fn seed(stores: &TestStores) -> Seeded {
    let starter = customer(stores, "Starter", "starter", 0, "2025-08-15T12:00:00Z").await;
    let growth = customer(stores, "Growth", "growth", 0, "2025-08-15T12:00:00Z").await;
    // Signed up during October, still in its trial on the 1st.
    let trialing = customer(stores, "Trialing", "growth", 14, "2025-10-25T09:00:00Z").await;
    let idle = customer(stores, "Idle", "starter", 0, "2025-09-01T00:00:00Z").await;
    let opted_out = customer(stores, "OptedOut", "starter", 0, "2025-08-15T12:00:00Z").await;
    let suspended = customer(stores, "Suspended", "starter", 0, "2025-08-15T12:00:00Z").await;
    let canceled = customer(stores, "Canceled", "starter", 0, "2025-08-15T12:00:00Z").await;
    // Signed up after October ended: no month to summarise.
    let late = customer(stores, "Late", "starter", 0, "2025-11-01T05:00:00Z").await;

    // Starter (1,000,000 impressions at 10 cents per 1,000 over; 100,000 API calls; 50 GB at
    // 10 cents per GB over): 500,000 impressions over ($50.00), 2.5 GB over ($0.25).
    usage(
        stores,
        &starter,
        "impressions",
        "2025-10-02T10:00:00Z",
        1_000_000,
    )
    .await;
    usage(
        stores,
        &starter,
        "impressions",
        "2025-10-31T23:00:00Z",
        500_000,
    )
    .await;
    // The next month's first hour is not October's.
    usage(
        stores,
        &starter,
        "impressions",
        "2025-11-01T00:00:00Z",
        7_000_000,
    )
    .await;
    usage(
        stores,
        &starter,
        "api_calls",
        "2025-10-10T10:00:00Z",
        80_000,
    )
    .await;
    usage(
        stores,
        &starter,
        "data_transfer",
        "2025-10-10T10:00:00Z",
        52_500_000_000,
    )
    .await;
    // September: 1,200,000 impressions (+25 %), 100,000 API calls (-20 %), no data transfer.
    usage(
        stores,
        &starter,
        "impressions",
        "2025-09-30T23:00:00Z",
        1_200_000,
    )
    .await;
    usage(
        stores,
        &starter,
        "api_calls",
        "2025-09-01T00:00:00Z",
        100_000,
    )
    .await;
    // August is not the month before.
    usage(
        stores,
        &starter,
        "data_transfer",
        "2025-08-31T23:00:00Z",
        9_000_000_000,
    )
    .await;
    // $8,000 of revenue: the Starter band's 0 %.
    statement::set_revenue(&stores.pool, &starter, &october(), 800_000)
        .await
        .unwrap();

    // Growth (10,000,000 impressions at 8 cents per 1,000 over; 1,000,000 API calls at 4; 500
    // GB at 8 per GB): 2,000,000 impressions over ($160.00), 250,000 API calls over ($10.00).
    usage(
        stores,
        &growth,
        "impressions",
        "2025-10-05T10:00:00Z",
        12_000_000,
    )
    .await;
    usage(
        stores,
        &growth,
        "api_calls",
        "2025-10-05T10:00:00Z",
        1_250_000,
    )
    .await;
    usage(
        stores,
        &growth,
        "data_transfer",
        "2025-10-05T10:00:00Z",
        100_000_000_000,
    )
    .await;
    usage(
        stores,
        &growth,
        "impressions",
        "2025-09-05T10:00:00Z",
        10_000_000,
    )
    .await;
    usage(
        stores,
        &growth,
        "api_calls",
        "2025-09-05T10:00:00Z",
        1_000_000,
    )
    .await;
    usage(
        stores,
        &growth,
        "data_transfer",
        "2025-09-05T10:00:00Z",
        200_000_000_000,
    )
    .await;
    // The guide's example: $50,000 in the Growth band, 2.5 % = $1,250.00.
    statement::set_revenue(&stores.pool, &growth, &october(), 5_000_000)
        .await
        .unwrap();

    usage(
        stores,
        &trialing,
        "impressions",
        "2025-10-26T10:00:00Z",
        100_000,
    )
    .await;

    for c in [&opted_out, &suspended, &canceled, &late] {
        usage(stores, c, "impressions", "2025-10-02T10:00:00Z", 2_000_000).await;
    }
    email_log::set_opt_out(&stores.pool, &opted_out, "monthly_summary", true)
        .await
        .unwrap();
    // Opted out of something else only: still gets its summary.
    email_log::set_opt_out(&stores.pool, &idle, "sdk_update", true)
        .await
        .unwrap();
    set_status(stores, &suspended, "suspended").await;
    set_status(stores, &canceled, "canceled").await;
    Seeded {
        starter,
        growth,
        trialing,
        idle,
        opted_out,
        suspended,
        canceled,
        late,
    }
}

/// Issues Growth's October invoice as the 06:00 close would, finalized by Stripe with a page.
async fn invoice_october(stores: &TestStores, customer: &str) -> i64 {
    let mut conn = stores.pool.acquire().await.unwrap();
    let prepared = invoices::prepare(
        &mut conn,
        customer,
        &october(),
        at("2025-11-01T06:00:00Z"),
        &CloseSettings::default(),
    )
    .await
    .unwrap();
    let Prepared::Written { invoice, .. } = prepared else {
        panic!("the invoice was not written: {prepared:?}");
    };
    invoices::record_finalized(
        &stores.pool,
        invoice.id,
        &StripeState {
            status: "open".into(),
            amount_due_cents: Some(invoice.total_cents),
            hosted_invoice_url: Some("https://invoice.stripe.com/i/in_growth_oct".into()),
            ..StripeState::default()
        },
        at("2025-11-01T06:05:00Z"),
    )
    .await
    .unwrap();
    invoice.total_cents
}

#[tokio::test]
async fn every_active_customer_gets_one_summary_of_the_month_with_its_figures() {
    let stores = TestStores::migrated().await;
    let s = seed(&stores).await;
    let invoice_total = invoice_october(&stores, &s.growth).await;
    // Fee $1,250.00 + impressions $160.00 + API calls $10.00.
    assert_eq!(invoice_total, 142_000);
    // Growth moves to Starter after its invoice: the summary still agrees with the invoice.
    sqlx::query("UPDATE subscriptions SET plan_id = 'starter' WHERE customer_id = $1")
        .bind(&s.growth)
        .execute(&stores.pool)
        .await
        .unwrap();

    let summary = run(&stores, "2025-11-01T10:00:00Z").await;
    assert_eq!(
        summary,
        SummaryRunSummary {
            month: "2025-10".into(),
            // Starter, Growth, Trialing, Idle, OptedOut.
            customers: 5,
            enqueued: 4,
            already_enqueued: 0,
            opted_out: 1,
            failed: vec![],
        }
    );
    assert_eq!(summary.failure(), None);

    let events = summary_events(&stores).await;
    let mut who: Vec<&str> = events.iter().map(|(c, _, _)| c.as_str()).collect();
    who.sort_unstable();
    let mut expected = vec![
        s.starter.as_str(),
        s.growth.as_str(),
        s.trialing.as_str(),
        s.idle.as_str(),
    ];
    expected.sort_unstable();
    assert_eq!(who, expected);
    for nobody in [&s.opted_out, &s.suspended, &s.canceled, &s.late] {
        assert!(events.iter().all(|(c, _, _)| c != nobody), "{nobody}");
    }
    for (customer, key, _) in &events {
        assert_eq!(key, &format!("monthly_summary:{customer}:2025-10"));
        assert_eq!(key, &dedup_key(customer, "2025-10"));
    }

    assert_fields(
        data_of(&events, &s.starter),
        &json!({
            "to": "starter@example.com",
            "customer_id": s.starter,
            "name": "Starter",
            "month": "2025-10",
            "previous_month": "2025-09",
            "plan_type": "starter",
            "plan_name": "Starter",
            "currency": "usd",
            "impressions": 1_500_000,
            "impressions_included": 1_000_000,
            "impressions_overage": 500_000,
            "impressions_overage_cost_cents": 5_000,
            "impressions_previous": 1_200_000,
            "impressions_change_percent": 25,
            "api_calls": 80_000,
            "api_calls_included": 100_000,
            "api_calls_overage": 0,
            "api_calls_overage_cost_cents": 0,
            "api_calls_previous": 100_000,
            "api_calls_change_percent": -20,
            "data_transfer_gb": 52.5,
            "data_transfer_gb_included": 50.0,
            "data_transfer_gb_overage": 2.5,
            "data_transfer_gb_overage_cost_cents": 25,
            "data_transfer_gb_previous": 0.0,
            "data_transfer_gb_change_percent": null,
            "overage_cost_cents": 5_025,
            "mediated_revenue_cents": 800_000,
            "platform_fee_cents": 0,
            "platform_fee_bps": 0,
            // No invoice yet: the preview's total, an estimate.
            "total_cents": 5_025,
            "invoice_total_cents": null,
            "invoice_url": null,
        }),
    );

    assert_fields(
        data_of(&events, &s.growth),
        &json!({
            "to": "growth@example.com",
            // Priced on the plan its invoice was issued on, not today's.
            "plan_type": "growth",
            "plan_name": "Growth",
            "impressions": 12_000_000,
            "impressions_included": 10_000_000,
            "impressions_overage": 2_000_000,
            "impressions_overage_cost_cents": 16_000,
            "impressions_previous": 10_000_000,
            "impressions_change_percent": 20,
            "api_calls": 1_250_000,
            "api_calls_included": 1_000_000,
            "api_calls_overage": 250_000,
            "api_calls_overage_cost_cents": 1_000,
            "api_calls_change_percent": 25,
            "data_transfer_gb": 100.0,
            "data_transfer_gb_included": 500.0,
            "data_transfer_gb_overage": 0.0,
            "data_transfer_gb_overage_cost_cents": 0,
            "data_transfer_gb_previous": 200.0,
            "data_transfer_gb_change_percent": -50,
            "overage_cost_cents": 17_000,
            "mediated_revenue_cents": 5_000_000,
            "platform_fee_cents": 125_000,
            "platform_fee_bps": 250,
            "total_cents": 142_000,
            "invoice_total_cents": 142_000,
            "invoice_url": "https://invoice.stripe.com/i/in_growth_oct",
        }),
    );

    // In its trial, signed up during October: its days of October, nothing to compare with,
    // no revenue reported (no fee yet).
    assert_fields(
        data_of(&events, &s.trialing),
        &json!({
            "plan_type": "growth",
            "impressions": 100_000,
            "impressions_included": 10_000_000,
            "impressions_overage_cost_cents": 0,
            "impressions_previous": 0,
            "impressions_change_percent": null,
            "api_calls": 0,
            "data_transfer_gb": 0.0,
            "overage_cost_cents": 0,
            "mediated_revenue_cents": null,
            "platform_fee_cents": null,
            "platform_fee_bps": null,
            "total_cents": 0,
            "invoice_total_cents": null,
        }),
    );

    assert_fields(
        data_of(&events, &s.idle),
        &json!({
            "impressions": 0,
            "api_calls": 0,
            "data_transfer_gb": 0.0,
            "impressions_change_percent": null,
            "overage_cost_cents": 0,
            "total_cents": 0,
        }),
    );

    // The same figures without enqueuing, for one customer.
    let mut conn = stores.pool.acquire().await.unwrap();
    let one = monthly_summary(&mut conn, &s.starter, &october())
        .await
        .unwrap();
    assert_eq!(&one.email_data(), data_of(&events, &s.starter));
}

#[tokio::test]
async fn a_second_run_and_a_concurrent_one_enqueue_nothing_more() {
    let stores = TestStores::migrated().await;
    let s = seed(&stores).await;
    let first = run(&stores, "2025-11-01T10:00:00Z").await;
    assert_eq!(first.enqueued, 4);
    let before = summary_events(&stores).await;

    // The same slot run again (a retry), and later the same day.
    for now in ["2025-11-01T10:00:00Z", "2025-11-01T18:30:00Z"] {
        let again = run(&stores, now).await;
        assert_eq!((again.enqueued, again.already_enqueued), (0, 4), "{now}");
        assert_eq!(again.opted_out, 1);
    }
    // Usage changing afterwards does not resend (the summary is of the month, once).
    usage(
        &stores,
        &s.starter,
        "impressions",
        "2025-10-20T10:00:00Z",
        1,
    )
    .await;
    assert_eq!(run(&stores, "2025-11-01T19:00:00Z").await.enqueued, 0);
    assert_eq!(summary_events(&stores).await, before);

    // A customer who opts back in, or is reactivated, later in the month gets the month's
    // summary at the next run (once).
    email_log::set_opt_out(&stores.pool, &s.opted_out, "monthly_summary", false)
        .await
        .unwrap();
    set_status(&stores, &s.suspended, "active").await;
    let caught_up = run(&stores, "2025-11-02T10:00:00Z").await;
    assert_eq!((caught_up.enqueued, caught_up.opted_out), (2, 0));
    assert_eq!(summary_events(&stores).await.len(), 6);

    // Two runs at once on fresh stores: one summary each, counted once between them.
    let stores = TestStores::migrated().await;
    seed(&stores).await;
    let (mut a, mut b) = (
        stores.pool.acquire().await.unwrap(),
        stores.pool.acquire().await.unwrap(),
    );
    let now = at("2025-11-01T10:00:00Z");
    let (ra, rb) = tokio::join!(
        send_monthly_summaries(&mut a, now),
        send_monthly_summaries(&mut b, now)
    );
    let (ra, rb) = (ra.unwrap(), rb.unwrap());
    assert_eq!(ra.enqueued + rb.enqueued, 4, "{ra:?} {rb:?}");
    assert_eq!(ra.already_enqueued + rb.already_enqueued, 4);
    assert_eq!(summary_events(&stores).await.len(), 4);
}

#[tokio::test]
async fn a_late_run_summarises_the_month_that_ended_and_the_next_month_is_new() {
    let stores = TestStores::migrated().await;
    let s = seed(&stores).await;
    // The 1st's run was missed: the 3rd's summarises October, once.
    let late = run(&stores, "2025-11-03T08:15:00Z").await;
    assert_eq!((late.month.as_str(), late.enqueued), ("2025-10", 4));
    let events = summary_events(&stores).await;
    assert_eq!(
        data_of(&events, &s.starter)["impressions"],
        json!(1_500_000)
    );
    assert_eq!(run(&stores, "2025-11-20T10:00:00Z").await.enqueued, 0);
    // The customer who signed up on November 1st now has a month.
    let december = run(&stores, "2025-12-01T10:00:00Z").await;
    assert_eq!(december.month, "2025-11");
    // Starter, Growth, Trialing, Idle and Late (OptedOut still opted out).
    assert_eq!((december.enqueued, december.opted_out), (5, 1));
    let events = summary_events(&stores).await;
    assert_eq!(events.len(), 9);
    let november: Vec<&Value> = events
        .iter()
        .filter(|(_, key, _)| key.ends_with(":2025-11"))
        .map(|(_, _, d)| d)
        .collect();
    let starter = november
        .iter()
        .find(|d| d["customer_id"] == json!(s.starter))
        .unwrap();
    // November's first hour; October's 1,500,000 impressions are the month before.
    assert_fields(
        starter,
        &json!({
            "month": "2025-11",
            "previous_month": "2025-10",
            "impressions": 7_000_000,
            "impressions_previous": 1_500_000,
            "impressions_change_percent": 367,
            // November has no revenue reported.
            "platform_fee_cents": null,
        }),
    );
    assert!(november.iter().any(|d| d["customer_id"] == json!(s.late)));
    // The 1st of January summarises December, across the year.
    let january = run(&stores, "2026-01-01T10:00:00Z").await;
    assert_eq!(january.month, "2025-12");
}

#[tokio::test]
async fn only_ended_whole_months_are_summarised() {
    let stores = TestStores::migrated().await;
    let mut conn = stores.pool.acquire().await.unwrap();
    let not_ended =
        summaries::send_monthly_summaries_for(&mut conn, &october(), at("2025-10-31T23:59:59Z"))
            .await;
    assert!(not_ended.is_err());
    let part = Period {
        start: at("2025-10-05T00:00:00Z"),
        end: at("2025-11-01T00:00:00Z"),
    };
    assert!(
        summaries::send_monthly_summaries_for(&mut conn, &part, at("2025-11-02T00:00:00Z"))
            .await
            .is_err()
    );
    // A backfill of September once October is over.
    let september_run =
        summaries::send_monthly_summaries_for(&mut conn, &september(), at("2025-11-02T00:00:00Z"))
            .await
            .unwrap();
    assert_eq!(september_run.month, "2025-09");
    assert!(matches!(
        monthly_summary(&mut conn, "cus_nobody", &october()).await,
        Err(apex_billing::BillingError::NotFound { .. })
    ));
}

#[tokio::test]
async fn a_customer_whose_month_cannot_be_priced_is_listed_and_the_others_go() {
    let stores = TestStores::migrated().await;
    let good = customer(&stores, "Good", "starter", 0, "2025-08-15T12:00:00Z").await;
    let bad = customer(&stores, "Bad", "starter", 0, "2025-08-15T12:00:00Z").await;
    // A negotiated rate outside the Enterprise range cannot be billed.
    sqlx::query("UPDATE customers SET platform_fee_bps_override = 900 WHERE id = $1")
        .bind(&bad)
        .execute(&stores.pool)
        .await
        .unwrap();
    statement::set_revenue(&stores.pool, &bad, &october(), 100)
        .await
        .unwrap();
    let summary = run(&stores, "2025-11-01T10:00:00Z").await;
    assert_eq!(summary.enqueued, 1);
    assert_eq!(summary.failed.len(), 1);
    assert_eq!(summary.failed[0].customer_id, bad);
    assert!(summary.failure().is_some());
    let events = summary_events(&stores).await;
    assert_eq!(events.len(), 1);
    assert_eq!(events[0].0, good);
}
