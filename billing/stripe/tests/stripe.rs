//! Stripe mapping and the usage sync against localstripe plus the marked meter-events test
//! double (`scripts/stripe-standin.py`), with the real Postgres of the stack. Each test has
//! its own databases and its own stand-in process.

use std::time::Duration;

use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, RetryPolicy, StripeClient};
use apex_stripe::sync::{SyncRequest, SyncSummary, sync_usage};
use apex_stripe::testing::{self, StripeStandIn, TEST_KEY, day_ago};
use chrono::{DateTime, Duration as Days, NaiveDate, Utc};

const METER_EVENTS: &str = "/v1/billing/meter_events";

/// Fast retries, so fault tests take milliseconds per attempt.
fn settings() -> ClientSettings {
    ClientSettings {
        requests_per_second: 100.0,
        burst: 20,
        timeout: Duration::from_secs(5),
        retry: RetryPolicy {
            max_attempts: 4,
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
        },
    }
}

fn client(standin: &StripeStandIn) -> StripeClient {
    StripeClient::new(&standin.base_url(), TEST_KEY, settings()).unwrap()
}

async fn signup(stores: &TestStores, name: &str) -> String {
    testing::signup(&stores.pool, name).await
}

async fn add_usage(
    stores: &TestStores,
    customer: &str,
    metric: &str,
    day: NaiveDate,
    quantity: i64,
) {
    testing::add_usage(&stores.pool, customer, metric, day, quantity).await;
}

/// A migrated store and a stand-in with the catalogue and `names` customers mapped.
async fn mapped(names: &[&str]) -> (TestStores, StripeStandIn, Vec<String>) {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let mut ids = Vec::new();
    for name in names {
        ids.push(signup(&stores, name).await);
    }
    let stripe = client(&standin);
    sync_catalog(&stores.pool, &stripe).await.unwrap();
    let report = sync_customers(&stores.pool, &stripe, None).await.unwrap();
    assert!(report.failed.is_empty(), "{:?}", report.failed);
    (stores, standin, ids)
}

async fn run_sync(
    stores: &TestStores,
    standin: &StripeStandIn,
    customer: Option<&str>,
) -> SyncSummary {
    run_sync_at(stores, standin, customer, Utc::now()).await
}

/// A run that takes `now` as the time (a later night, or the instant the test's days were
/// computed from, so midnight passing mid-test changes nothing).
async fn run_sync_at(
    stores: &TestStores,
    standin: &StripeStandIn,
    customer: Option<&str>,
    now: DateTime<Utc>,
) -> SyncSummary {
    let request = SyncRequest {
        customer: customer.map(str::to_owned),
        ..every_day(now)
    };
    sync_usage(&stores.pool, &client(standin), &request)
        .await
        .unwrap()
}

/// A sync of every customer and reportable day at `now`.
fn every_day(now: DateTime<Utc>) -> SyncRequest {
    SyncRequest {
        customer: None,
        day: None,
        now,
    }
}

/// A customer's Stripe id as Postgres has it.
async fn stripe_customer_of(stores: &TestStores, customer: &str) -> Option<String> {
    sqlx::query_scalar("SELECT stripe_customer_id FROM customers WHERE id = $1")
        .bind(customer)
        .fetch_one(&stores.pool)
        .await
        .unwrap()
}

/// Sets (or clears) a customer's Stripe id in Postgres, behind the mapping's back.
async fn set_stripe_customer(stores: &TestStores, customer: &str, stripe_id: Option<&str>) {
    sqlx::query("UPDATE customers SET stripe_customer_id = $2 WHERE id = $1")
        .bind(customer)
        .bind(stripe_id)
        .execute(&stores.pool)
        .await
        .unwrap();
}

/// POSTs to meter events on the stand-in, as (idempotency key, status), in order.
fn meter_event_posts(standin: &StripeStandIn) -> Vec<(String, u64)> {
    standin
        .requests()
        .into_iter()
        .filter(|r| r["path"] == METER_EVENTS)
        .map(|r| {
            (
                r["idempotency_key"].as_str().unwrap_or_default().to_owned(),
                r["status"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

fn events(standin: &StripeStandIn) -> Vec<(String, String, u64)> {
    standin.events()
}

fn ymd(day: NaiveDate) -> String {
    day.format("%Y%m%d").to_string()
}

#[tokio::test]
async fn catalog_and_customers_are_created_once_with_idempotency_keys() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let first = signup(&stores, "Lumen Games").await;
    let second = signup(&stores, "Pixel Forge").await;
    let stripe = client(&standin);

    let catalog = sync_catalog(&stores.pool, &stripe).await.unwrap();
    assert_eq!(
        catalog.meters_mapped,
        ["impressions", "api_calls", "data_transfer"]
    );
    let plan_count: i64 = sqlx::query_scalar("SELECT count(*) FROM plans")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(catalog.plans_mapped.len() as i64, plan_count);
    let again = sync_catalog(&stores.pool, &stripe).await.unwrap();
    assert!(again.meters_mapped.is_empty() && again.plans_mapped.is_empty());
    assert_eq!(again.unchanged as i64, 3 + plan_count);

    let customers = sync_customers(&stores.pool, &stripe, None).await.unwrap();
    assert_eq!(
        (customers.customers_created, customers.subscriptions_created),
        (2, 2)
    );
    let again = sync_customers(&stores.pool, &stripe, None).await.unwrap();
    assert_eq!(
        (again.customers_created, again.subscriptions_created),
        (0, 0)
    );

    // Stripe holds each object once, and Postgres its id.
    assert_eq!(standin.objects("customers").len(), 2);
    assert_eq!(standin.objects("subscriptions").len(), 2);
    assert_eq!(standin.objects("products").len() as i64, plan_count);
    let mapped: Vec<(String, Option<String>, Option<String>)> = sqlx::query_as(
        "SELECT c.id, c.stripe_customer_id, s.stripe_subscription_id
         FROM customers c JOIN subscriptions s ON s.customer_id = c.id ORDER BY c.id",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    for (id, stripe_customer, stripe_subscription) in &mapped {
        assert!(
            stripe_customer
                .as_deref()
                .is_some_and(|c| c.starts_with("cus_")),
            "{id}"
        );
        assert!(
            stripe_subscription
                .as_deref()
                .is_some_and(|s| s.starts_with("sub_")),
            "{id}"
        );
    }
    let metadata: Vec<String> = standin
        .objects("customers")
        .iter()
        .map(|c| {
            c["metadata"]["apex_customer_id"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert!(metadata.contains(&first) && metadata.contains(&second));

    // Every POST carried an idempotency key derived from our ids.
    let posts: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r["method"] == "POST")
        .collect();
    assert!(!posts.is_empty());
    for post in &posts {
        let key = post["idempotency_key"].as_str().unwrap_or_default();
        assert!(key.starts_with("apex_"), "{post}");
    }
}

#[tokio::test]
async fn sync_twice_sends_one_set_and_a_late_record_is_a_correction() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    let customer = &ids[0];
    let now = Utc::now();
    let yesterday = day_ago(now, 1);
    let earlier = day_ago(now, 3);
    add_usage(&stores, customer, "impressions", yesterday, 1_500_000).await;
    add_usage(&stores, customer, "api_calls", yesterday, 40_000).await;
    add_usage(&stores, customer, "data_transfer", earlier, 35_200_000_000).await;
    // Today is not complete, and 40 days ago is outside Stripe's window: neither is sent.
    add_usage(&stores, customer, "impressions", now.date_naive(), 7).await;
    add_usage(&stores, customer, "impressions", day_ago(now, 40), 9).await;

    let first = run_sync_at(&stores, &standin, None, now).await;
    assert_eq!(first.events_sent, 3, "{first:?}");
    assert_eq!(first.corrections, 0);
    assert_eq!(first.quantity_sent["impressions"], 1_500_000);
    assert_eq!(first.quantity_sent["data_transfer"], 35_200_000_000);
    let mut sent = events(&standin);
    sent.sort();
    assert_eq!(
        sent,
        [
            (
                format!("apex_{customer}_api_calls_{}_r0", ymd(yesterday)),
                "apex_api_calls".into(),
                40_000
            ),
            (
                format!("apex_{customer}_data_transfer_{}_r0", ymd(earlier)),
                "apex_data_transfer".into(),
                35_200_000_000
            ),
            (
                format!("apex_{customer}_impressions_{}_r0", ymd(yesterday)),
                "apex_impressions".into(),
                1_500_000
            ),
        ]
    );
    // The event is stamped inside its day, for the customer's Stripe id.
    let stripe_customer = stripe_customer_of(&stores, customer).await.unwrap();
    for event in standin.meter_events() {
        assert_eq!(
            event["payload"]["stripe_customer_id"],
            stripe_customer.as_str()
        );
        let stamp = DateTime::from_timestamp(event["timestamp"].as_i64().unwrap(), 0).unwrap();
        assert!(stamp.date_naive() == yesterday || stamp.date_naive() == earlier);
    }

    // A second run sends nothing.
    let second = run_sync_at(&stores, &standin, None, now).await;
    assert_eq!(second.events_sent, 0, "{second:?}");
    assert_eq!(events(&standin).len(), 3);

    // A record arriving late for yesterday: only the difference, as revision 1.
    add_usage(&stores, customer, "impressions", yesterday, 2_500).await;
    let third = run_sync_at(&stores, &standin, None, now).await;
    assert_eq!((third.events_sent, third.corrections), (1, 1), "{third:?}");
    let last = events(&standin).pop().unwrap();
    assert_eq!(
        last,
        (
            format!("apex_{customer}_impressions_{}_r1", ymd(yesterday)),
            "apex_impressions".into(),
            2_500
        )
    );
    let (reported, revisions, status): (i64, i32, String) = sqlx::query_as(
        "SELECT quantity_reported, revisions, status FROM stripe_usage_sync
         WHERE customer_id = $1 AND metric_type = 'impressions' AND usage_date = $2",
    )
    .bind(customer)
    .bind(yesterday)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(
        (reported, revisions, status.as_str()),
        (1_502_500, 2, "sent")
    );
    // Stripe's sum per day and metric equals our rollup.
    let stripe_total: u64 = events(&standin)
        .iter()
        .filter(|(id, _, _)| id.contains(&format!("impressions_{}", ymd(yesterday))))
        .map(|(_, _, v)| v)
        .sum();
    assert_eq!(stripe_total, 1_502_500);

    // Reconciled after the sync: the rollups, what was reported and Stripe's daily meter
    // summaries agree for yesterday's month (the rollups were written directly here, with no
    // raw events to compare them with).
    let request = apex_stripe::reconcile::Request {
        period: apex_billing::pricing::calendar_month(
            yesterday.and_hms_opt(0, 0, 0).unwrap().and_utc(),
        ),
        customer: None,
        now,
        settled: false,
    };
    let checks = apex_stripe::reconcile::Checks {
        raw_events: false,
        ..Default::default()
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
    assert!(
        report
            .pairs
            .iter()
            .any(|p| p.check == apex_stripe::reconcile::REPORTED_VS_STRIPE
                && p.verdict == apex_stripe::reconcile::Verdict::Ok),
        "{report:#?}"
    );
}

#[tokio::test]
async fn a_stripe_500_then_success_gives_one_event() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    let yesterday = day_ago(Utc::now(), 1);
    add_usage(&stores, &ids[0], "impressions", yesterday, 1_000).await;
    // Stripe records the event but the answer is a 500 (as when a response is lost), then a
    // plain 500 before processing: the retries carry the same key, and Stripe keeps one.
    standin.inject_fault(METER_EVENTS, 500, 1, None, true);
    standin.inject_fault(METER_EVENTS, 500, 1, None, false);
    let summary = run_sync(&stores, &standin, None).await;
    assert_eq!(summary.events_sent, 1, "{summary:?}");
    assert_eq!(events(&standin).len(), 1);
    let attempts = meter_event_posts(&standin);
    assert_eq!(attempts.len(), 3, "{attempts:?}");
    assert!(attempts.iter().all(|(key, _)| *key == attempts[0].0));
    let statuses: Vec<u64> = attempts.iter().map(|(_, status)| *status).collect();
    assert_eq!(statuses, [500, 500, 200]);
}

#[tokio::test]
async fn a_timed_out_request_is_retried_with_the_same_key_and_counted_once() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    add_usage(&stores, &ids[0], "impressions", day_ago(Utc::now(), 1), 77).await;
    // Stripe takes the event but answers after our timeout.
    standin.delay_answer(METER_EVENTS, 1.5);
    let stripe = StripeClient::new(
        &standin.base_url(),
        TEST_KEY,
        ClientSettings {
            timeout: Duration::from_millis(300),
            ..settings()
        },
    )
    .unwrap();
    let request = every_day(Utc::now());
    let summary = sync_usage(&stores.pool, &stripe, &request).await.unwrap();
    assert_eq!(summary.events_sent, 1, "{summary:?}");
    assert_eq!(events(&standin).len(), 1);
    let attempts = meter_event_posts(&standin);
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(attempts[0].0, attempts[1].0);
}

#[tokio::test]
async fn a_429_waits_for_retry_after() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    add_usage(&stores, &ids[0], "api_calls", day_ago(Utc::now(), 2), 10).await;
    standin.inject_fault(METER_EVENTS, 429, 1, Some(1), false);
    let summary = run_sync(&stores, &standin, None).await;
    assert_eq!(summary.events_sent, 1, "{summary:?}");
    let attempts: Vec<_> = standin
        .requests()
        .into_iter()
        .filter(|r| r["path"] == METER_EVENTS)
        .collect();
    assert_eq!(attempts.len(), 2);
    assert_eq!(attempts[0]["status"], 429);
    let gap = attempts[1]["at"].as_f64().unwrap() - attempts[0]["at"].as_f64().unwrap();
    // Our own backoff would have been 10 ms; the retry waited for Stripe's second.
    assert!(
        gap >= 0.95,
        "retried {gap:.3} s after a 429 with Retry-After: 1"
    );
    assert_eq!(events(&standin).len(), 1);
}

#[tokio::test]
async fn a_failing_customer_does_not_stop_the_others_and_is_resent_exactly_later() {
    let (stores, standin, ids) = mapped(&["Broken Studio", "Working Studio"]).await;
    let yesterday = day_ago(Utc::now(), 1);
    for id in &ids {
        add_usage(&stores, id, "impressions", yesterday, 500).await;
    }
    // The first customer's Stripe id is wrong: Stripe refuses its events (400).
    let real = stripe_customer_of(&stores, &ids[0]).await;
    set_stripe_customer(&stores, &ids[0], Some("cus_doesnotexist")).await;
    let summary = run_sync(&stores, &standin, None).await;
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    assert_eq!(summary.failed[0].customer_id, ids[0]);
    assert!(
        summary.failed[0].error.contains("400"),
        "{}",
        summary.failed[0].error
    );
    assert!(!summary.stopped_early);
    assert_eq!(summary.events_sent, 1);
    assert_eq!(events(&standin).len(), 1);
    let (status, pending): (String, Option<i64>) = sqlx::query_as(
        "SELECT status, pending_quantity FROM stripe_usage_sync WHERE customer_id = $1",
    )
    .bind(&ids[0])
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!((status.as_str(), pending), ("failed", Some(500)));

    // Fixed, and more usage arrived meanwhile: the pending event goes first, exactly as it
    // was, then the difference.
    set_stripe_customer(&stores, &ids[0], real.as_deref()).await;
    add_usage(&stores, &ids[0], "impressions", yesterday, 20).await;
    let summary = run_sync(&stores, &standin, Some(&ids[0])).await;
    assert!(summary.failed.is_empty(), "{summary:?}");
    let mut mine: Vec<_> = events(&standin)
        .into_iter()
        .filter(|(id, _, _)| id.contains(&ids[0]))
        .map(|(id, _, v)| (id, v))
        .collect();
    mine.sort();
    let day = ymd(yesterday);
    assert_eq!(
        mine,
        [
            (format!("apex_{}_impressions_{day}_r0", ids[0]), 500),
            (format!("apex_{}_impressions_{day}_r1", ids[0]), 20),
        ]
    );
}

#[tokio::test]
async fn an_event_stripe_took_before_the_run_died_is_not_counted_twice() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    let day = day_ago(Utc::now(), 2);
    add_usage(&stores, &ids[0], "data_transfer", day, 1_000_000_000).await;
    // Stripe takes the event, then every answer is lost until the client gives up.
    standin.inject_fault(METER_EVENTS, 503, settings().retry.max_attempts, None, true);
    let summary = run_sync(&stores, &standin, None).await;
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    assert_eq!(summary.events_sent, 0);
    assert_eq!(events(&standin).len(), 1, "Stripe did take it");

    // The next run resends the same event under the same key: Stripe answers with the
    // original, and nothing is added.
    add_usage(&stores, &ids[0], "data_transfer", day, 5).await;
    let summary = run_sync(&stores, &standin, None).await;
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!((summary.events_sent, summary.corrections), (2, 1));
    let values: Vec<u64> = events(&standin).iter().map(|(_, _, v)| *v).collect();
    assert_eq!(values, [1_000_000_000, 5]);
}

#[tokio::test]
async fn an_unreachable_stripe_stops_the_run_early() {
    let stores = TestStores::migrated().await;
    let mut ids = Vec::new();
    for n in 0..5 {
        let id = signup(&stores, &format!("Studio {n}")).await;
        set_stripe_customer(&stores, &id, Some(&format!("cus_fake{n}"))).await;
        add_usage(&stores, &id, "impressions", day_ago(Utc::now(), 1), 1).await;
        ids.push(id);
    }
    for metric in ["impressions", "api_calls", "data_transfer"] {
        sqlx::query(
            "INSERT INTO stripe_meters (metric_type, event_name, stripe_meter_id) VALUES ($1, $2, $3)",
        )
        .bind(metric)
        .bind(format!("apex_{metric}"))
        .bind(format!("mtr_{metric}"))
        .execute(&stores.pool)
        .await
        .unwrap();
    }
    // A port nothing listens on.
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", closed.local_addr().unwrap());
    drop(closed);
    let stripe = StripeClient::new(&base, TEST_KEY, settings()).unwrap();
    let request = every_day(Utc::now());
    let summary = sync_usage(&stores.pool, &stripe, &request).await.unwrap();
    assert!(summary.stopped_early, "{summary:?}");
    assert_eq!(summary.failed.len(), 3);
    assert!(
        summary.failed[0].error.contains("cannot reach Stripe"),
        "{}",
        summary.failed[0].error
    );
}

/// A customer with `quantity` impressions two days ago whose event is left pending by a run
/// that failed on `status` from Stripe every attempt, Stripe carrying it out first when
/// `taken`. Returns the stores, the stand-in, the customer and the day.
async fn left_pending(
    taken: bool,
    quantity: i64,
) -> (TestStores, StripeStandIn, String, NaiveDate) {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    let day = day_ago(Utc::now(), 2);
    add_usage(&stores, &ids[0], "impressions", day, quantity).await;
    standin.inject_fault(
        METER_EVENTS,
        503,
        settings().retry.max_attempts,
        None,
        taken,
    );
    let summary = run_sync(&stores, &standin, None).await;
    assert_eq!(summary.failed.len(), 1, "{summary:?}");
    assert_eq!(events(&standin).len(), usize::from(taken));
    let customer = ids[0].clone();
    (stores, standin, customer, day)
}

#[tokio::test]
async fn a_day_old_pending_event_stripe_has_is_confirmed_without_sending() {
    let (stores, standin, _, _) = left_pending(true, 300).await;
    // The next night: Stripe has forgotten the key, so the event is not resent blindly.
    standin.forget_idempotency_keys();
    let posts_before = meter_event_posts(&standin).len();
    let summary = run_sync_at(&stores, &standin, None, Utc::now() + Days::hours(21)).await;
    assert!(summary.failed.is_empty(), "{summary:?}");
    assert_eq!(summary.events_sent, 1, "{summary:?}");
    assert_eq!(
        meter_event_posts(&standin).len(),
        posts_before,
        "nothing was sent"
    );
    assert_eq!(events(&standin).len(), 1);
    let (reported, pending): (i64, Option<i64>) =
        sqlx::query_as("SELECT quantity_reported, pending_quantity FROM stripe_usage_sync")
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!((reported, pending), (300, None));
}

#[tokio::test]
async fn a_day_old_pending_event_stripe_lacks_is_sent_under_a_fresh_key() {
    let (stores, standin, _, _) = left_pending(false, 300).await;
    standin.forget_idempotency_keys();
    let first_key = meter_event_posts(&standin)[0].0.clone();
    let summary = run_sync_at(&stores, &standin, None, Utc::now() + Days::hours(21)).await;
    assert_eq!(summary.events_sent, 1, "{summary:?}");
    let values: Vec<u64> = events(&standin).iter().map(|(_, _, v)| *v).collect();
    assert_eq!(values, [300]);
    let last_key = meter_event_posts(&standin).pop().unwrap().0;
    assert_ne!(first_key, last_key);
    assert!(
        first_key.ends_with("_a1") && last_key.ends_with("_a2"),
        "{first_key} {last_key}"
    );
}

#[tokio::test]
async fn a_day_old_pending_event_stripe_disagrees_with_is_held_for_a_person() {
    let (stores, standin, customer, day) = left_pending(false, 300).await;
    // Something else put 40 on the customer's meter for that day.
    let stripe_customer = stripe_customer_of(&stores, &customer).await.unwrap();
    let stamp = day.and_hms_opt(12, 0, 0).unwrap().and_utc().timestamp();
    let stray = serde_json::json!({
        "event_name": "apex_impressions", "identifier": "stray_1", "timestamp": stamp,
        "payload": {"stripe_customer_id": stripe_customer, "value": "40"},
    });
    standin.post_json("/v1/billing/meter_events", &stray);
    let posts_before = meter_event_posts(&standin).len();
    let summary = run_sync_at(&stores, &standin, None, Utc::now() + Days::hours(21)).await;
    assert_eq!(summary.events_sent, 0, "{summary:?}");
    assert_eq!(summary.unconfirmed.len(), 1, "{summary:?}");
    assert_eq!(
        (
            summary.unconfirmed[0].stripe_total,
            summary.unconfirmed[0].pending
        ),
        (40, 300)
    );
    assert_eq!(meter_event_posts(&standin).len(), posts_before);
    let (status, error): (String, String) =
        sqlx::query_as("SELECT status, last_error FROM stripe_usage_sync")
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(status, "failed");
    assert!(error.contains("needs a person"), "{error}");
}

#[tokio::test]
async fn a_second_run_while_one_holds_the_lock_is_refused() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    add_usage(&stores, &ids[0], "impressions", day_ago(Utc::now(), 1), 5).await;
    let mut other = stores.pool.acquire().await.unwrap();
    sqlx::query("SELECT pg_advisory_lock($1)")
        .bind(0x6170_6578_7379_6e63_i64)
        .execute(&mut *other)
        .await
        .unwrap();
    let request = every_day(Utc::now());
    let refused = sync_usage(&stores.pool, &client(&standin), &request)
        .await
        .unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("another Stripe usage sync is running"),
        "{refused}"
    );
    assert!(events(&standin).is_empty());
    sqlx::query("SELECT pg_advisory_unlock($1)")
        .bind(0x6170_6578_7379_6e63_i64)
        .execute(&mut *other)
        .await
        .unwrap();
    // Once it is released, a run goes, and releases it in turn.
    assert_eq!(run_sync(&stores, &standin, None).await.events_sent, 1);
    assert_eq!(run_sync(&stores, &standin, None).await.events_sent, 0);
}

#[tokio::test]
async fn a_mapping_whose_ids_were_lost_adopts_what_stripe_has() {
    let (stores, standin, ids) = mapped(&["Lumen Games"]).await;
    let before: (String, String) = sqlx::query_as(
        "SELECT c.stripe_customer_id, s.stripe_subscription_id
         FROM customers c JOIN subscriptions s ON s.customer_id = c.id WHERE c.id = $1",
    )
    .bind(&ids[0])
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    // A run died after Stripe created them and before Postgres kept the ids, and a day went
    // by (Stripe forgot the keys).
    set_stripe_customer(&stores, &ids[0], None).await;
    sqlx::query("UPDATE subscriptions SET stripe_subscription_id = NULL, stripe_customer_id = NULL WHERE customer_id = $1")
        .bind(&ids[0])
        .execute(&stores.pool)
        .await
        .unwrap();
    standin.forget_idempotency_keys();
    let report = sync_customers(&stores.pool, &client(&standin), None)
        .await
        .unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    let after: (String, String) = sqlx::query_as(
        "SELECT c.stripe_customer_id, s.stripe_subscription_id
         FROM customers c JOIN subscriptions s ON s.customer_id = c.id WHERE c.id = $1",
    )
    .bind(&ids[0])
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(after, before);
    assert_eq!(standin.objects("customers").len(), 1);
    assert_eq!(standin.objects("subscriptions").len(), 1);
}

/// Reconciliation of the sync's own ledger, with Stripe's meter (rollups written directly:
/// no raw events to compare), at the run's time `now`: the verdict and note of `check` for
/// the customer's day.
async fn reconciled(
    stores: &TestStores,
    standin: &StripeStandIn,
    customer: &str,
    day: NaiveDate,
    now: DateTime<Utc>,
    check: &str,
) -> (apex_stripe::reconcile::Verdict, String) {
    let request = apex_stripe::reconcile::Request {
        period: apex_billing::pricing::calendar_month(day.and_hms_opt(0, 0, 0).unwrap().and_utc()),
        customer: Some(customer.to_owned()),
        now,
        settled: false,
    };
    let checks = apex_stripe::reconcile::Checks {
        raw_events: false,
        ..Default::default()
    };
    let report = apex_stripe::reconcile::reconcile_with(
        &stores.pool,
        &stores.config,
        Some(&client(standin)),
        &request,
        checks,
    )
    .await
    .unwrap();
    let pair = report
        .pairs
        .iter()
        .find(|p| p.check == check && p.day.as_deref() == Some(day.to_string().as_str()))
        .unwrap_or_else(|| panic!("no {check} pair: {report:#?}"));
    (pair.verdict, pair.note.clone().unwrap_or_default())
}

#[tokio::test]
async fn reconcile_waits_for_a_pending_event_a_day_and_calls_a_day_held_for_a_person_drift() {
    use apex_stripe::reconcile::{POSTGRES_VS_REPORTED, REPORTED_VS_STRIPE, Verdict};
    let (stores, standin, customer, day) = left_pending(false, 300).await;
    let now = Utc::now();
    // Left pending by this run: the next sync sends it again.
    let (verdict, note) =
        reconciled(&stores, &standin, &customer, day, now, POSTGRES_VS_REPORTED).await;
    assert_eq!(verdict, Verdict::Unsynced, "{note}");
    // Still pending more than a day after it was written (no sync settled it): drift.
    let (verdict, note) = reconciled(
        &stores,
        &standin,
        &customer,
        day,
        now + Days::hours(27),
        POSTGRES_VS_REPORTED,
    )
    .await;
    assert_eq!(verdict, Verdict::Drift, "{note}");
    assert!(note.contains("pending since"), "{note}");

    // Stripe's meter then holds something else (40): the next sync holds the day for a
    // person, and reconcile calls it drift on both pairs, quoting the sync's reason.
    let stripe_customer = stripe_customer_of(&stores, &customer).await.unwrap();
    let stamp = day.and_hms_opt(12, 0, 0).unwrap().and_utc().timestamp();
    let stray = serde_json::json!({
        "event_name": "apex_impressions", "identifier": "stray_r", "timestamp": stamp,
        "payload": {"stripe_customer_id": stripe_customer, "value": "40"},
    });
    standin.post_json("/v1/billing/meter_events", &stray);
    let later = now + Days::hours(21);
    let summary = run_sync_at(&stores, &standin, None, later).await;
    assert_eq!(summary.unconfirmed.len(), 1, "{summary:?}");
    let (verdict, note) = reconciled(
        &stores,
        &standin,
        &customer,
        day,
        later,
        POSTGRES_VS_REPORTED,
    )
    .await;
    assert_eq!(verdict, Verdict::Drift, "{note}");
    assert!(note.ends_with(apex_stripe::sync::NEEDS_A_PERSON), "{note}");
    // Stripe holds neither what it accepted (0) nor that plus the pending 300.
    let (verdict, note) =
        reconciled(&stores, &standin, &customer, day, later, REPORTED_VS_STRIPE).await;
    assert_eq!(verdict, Verdict::Drift, "{note}");
}
