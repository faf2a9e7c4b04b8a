//! Several `apex-cron` processes on one database, with the real `stripe_sync` job against the
//! Stripe stand-in: two replicas on one simulated clock run every slot of a week once and
//! report each day to Stripe once; a runner killed with `kill -9` in the middle of the sync
//! has its slot marked failed and run once more, by the next process, and nothing reaches
//! Stripe twice.

mod common;

use std::time::Duration as StdDuration;

use apex_core::testing::TestStores;
use apex_stripe::catalog::{sync_catalog, sync_customers};
use apex_stripe::client::{ClientSettings, StripeClient};
use apex_stripe::testing::{StripeStandIn, TEST_KEY, add_usage, signup};
use chrono::{DateTime, Duration, Utc};
use common::{
    CronProcess, SimClock, assert_each_slot_once, pages_once, rows, rows_once, settled, slots,
    statuses, succeeded_runs,
};

const METER_EVENTS: &str = "/v1/billing/meter_events";

/// A stand-in with the catalogue and one customer mapped; the customer's id.
async fn mapped(stores: &TestStores) -> (StripeStandIn, String) {
    let standin = StripeStandIn::start();
    let customer = signup(&stores.pool, "Replica Games").await;
    let client =
        StripeClient::new(&standin.base_url(), TEST_KEY, ClientSettings::default()).unwrap();
    sync_catalog(&stores.pool, &client).await.unwrap();
    let report = sync_customers(&stores.pool, &client, None).await.unwrap();
    assert!(report.failed.is_empty(), "{report:?}");
    (standin, customer)
}

fn stripe_env(standin: &StripeStandIn, clock: &SimClock) -> Vec<(String, String)> {
    let mut env = clock.env();
    env.push(("STRIPE_SECRET_KEY".into(), TEST_KEY.into()));
    env.push(("STRIPE_API_BASE".into(), standin.base_url()));
    // The Stripe work alone: the sign-up's welcome email is not these tests' business.
    env.push(("APEX_CRON_SCHEDULE_EMAIL_QUEUE".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_DUNNING_RETRIES".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_DUNNING_POSTPONED".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_USAGE_LIMITS".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_TRIAL_REMINDERS".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_MONTHLY_SUMMARIES".into(), "off".into()));
    env
}

/// A mapped stand-in, and midnight three days ago: the day after a day of usage (42 API
/// calls), so that day's 02:00 sync reports it.
async fn one_day_of_usage(stores: &TestStores) -> (StripeStandIn, DateTime<Utc>) {
    let (standin, customer) = mapped(stores).await;
    let day = days_ago(3);
    let usage_day = (day - Duration::days(1)).date_naive();
    add_usage(&stores.pool, &customer, "api_calls", usage_day, 42).await;
    (standin, day)
}

/// Midnight UTC `days` days before today (the stand-in takes meter events of the last 35
/// real days only, so the simulated days are recent ones).
fn days_ago(days: i64) -> DateTime<Utc> {
    (Utc::now().date_naive() - Duration::days(days))
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc()
}

#[tokio::test]
async fn two_replicas_run_every_slot_of_a_week_once_and_report_each_day_once() {
    let stores = TestStores::migrated().await;
    let (standin, customer) = mapped(&stores).await;
    let week = days_ago(9);
    // Usage on eight days, from two days before the week to its sixth day: the last sync of
    // the week (day 7, 02:00) has every one of them complete.
    for day in 0..8 {
        let date = (week + Duration::days(day - 2)).date_naive();
        add_usage(&stores.pool, &customer, "impressions", date, 100 + day).await;
    }
    // Six hours a second: the week in 28 s. Both replicas read the same simulated time,
    // from 48 hours before the week (eight real seconds to come up: with three, a replica
    // started under a full test run's load now and then missed the week's first 02:00 slot,
    // 3.4 real seconds in). Every job runs on the week's days only (their days of the month;
    // the test spans eleven days, so no other day matches), so nothing runs after it and the
    // processes' own counts of runs can be read once all are done.
    let clock = SimClock::starting_in(week - Duration::minutes(30), 21_600.0, 8.0);
    let days: Vec<String> = (0..7)
        .map(|d| (week + Duration::days(d)).format("%-d").to_string())
        .collect();
    let days = days.join(",");
    let mut env = stripe_env(&standin, &clock);
    env.push((
        "APEX_CRON_TEST_JOBS".into(),
        // Every two hours: at six simulated hours a second a slot comes every third of a real
        // second, which a loaded two-core machine keeps up with (hourly slots, a sixth of a
        // second apart, were now and then missed under a full test run's load).
        format!("test_two_hourly=0 */2 {days} * *"),
    ));
    env.push((
        "APEX_CRON_SCHEDULE_STRIPE_SYNC".into(),
        format!("0 2 {days} * *"),
    ));
    env.push((
        "APEX_CRON_SCHEDULE_MAINTENANCE".into(),
        format!("0 4 {days} * *"),
    ));
    env.push(("APEX_CRON_SCHEDULE_INVOICE_CLOSE".into(), "off".into()));
    // Timeouts are simulated time: the sync's two hours and maintenance's thirty minutes
    // would be a third and a twelfth of a real second here, which a loaded machine's sync
    // now and then outlasts. A day (four real seconds) stops nothing this test runs; the
    // timeouts have tests of their own.
    for variable in [
        "APEX_CRON_TIMEOUT_SECS_STRIPE_SYNC",
        "APEX_CRON_TIMEOUT_SECS_MAINTENANCE",
    ] {
        env.push((variable.into(), "86400".into()));
    }
    let mut first = CronProcess::start(&stores, &env);
    let mut second = CronProcess::start(&stores, &env);
    let end = week + Duration::days(7);
    clock.sleep_until(end + Duration::minutes(30)).await;
    // The week's last runs may still be going (the last two-hourly slot is 0.4 real seconds
    // before this): the counts are read once every slot has its row and none is running.
    let expected = [
        ("stripe_sync", week + Duration::hours(2), Duration::days(1)),
        ("maintenance", week + Duration::hours(4), Duration::days(1)),
        ("test_two_hourly", week, Duration::hours(2)),
    ]
    .map(|(job, from, every)| (job, slots(from, end, every).len() as u64));
    for (job, runs) in expected {
        settled(&stores, job, week, end, runs as usize).await;
    }
    let pages = pages_once(&[&first, &second], &expected).await;
    assert!(first.terminate().success());
    assert!(second.terminate().success());
    // Each slot ran once, counted where it ran: the two replicas' runs add up to the slots.
    assert_eq!(
        expected.map(|(_, runs)| runs),
        [7, 7, 84],
        "the week's slots"
    );
    for (job, runs) in expected {
        let counted: Vec<u64> = pages.iter().map(|p| succeeded_runs(p, job)).collect();
        if counted.iter().sum::<u64>() != runs {
            let found = rows(&stores, job, week - Duration::days(3), end).await;
            let odd: Vec<&common::Row> = found.iter().filter(|r| r.status != "succeeded").collect();
            panic!(
                "{job}: {counted:?} runs succeeded of {runs}; rows {:?}, first {:?}, last {:?}, not succeeded {odd:?}",
                statuses(&found),
                found.first().map(|r| r.scheduled_for),
                found.last().map(|r| r.scheduled_for),
            );
        }
    }

    assert_each_slot_once(
        "stripe_sync",
        &rows(&stores, "stripe_sync", week, end).await,
        &slots(week + Duration::hours(2), end, Duration::days(1)),
    );
    assert_each_slot_once(
        "maintenance",
        &rows(&stores, "maintenance", week, end).await,
        &slots(week + Duration::hours(4), end, Duration::days(1)),
    );
    assert_each_slot_once(
        "test_two_hourly",
        &rows(&stores, "test_two_hourly", week, end).await,
        &slots(week, end, Duration::hours(2)),
    );
    // Each day reached Stripe once: one event per day, its first revision, the day's total.
    let mut events = standin.events();
    events.sort();
    assert_eq!(events.len(), 8, "{events:?}");
    for (i, (identifier, event_name, value)) in events.iter().enumerate() {
        let date = (week + Duration::days(i as i64 - 2)).date_naive();
        assert_eq!(
            identifier,
            &format!("apex_{customer}_impressions_{}_r0", date.format("%Y%m%d"))
        );
        assert_eq!(event_name, "apex_impressions");
        assert_eq!(*value, 100 + i as u64);
    }
}

#[tokio::test]
async fn a_runner_killed_mid_sync_has_its_slot_failed_and_run_once_more() {
    let stores = TestStores::migrated().await;
    let (standin, day) = one_day_of_usage(&stores).await;
    // The sync's meter event is carried out, then its answer held: the runner dies waiting.
    standin.delay_answer(METER_EVENTS, 30.0);
    // Ten seconds a second, from 01:59:10 (five real seconds to come up).
    let clock = SimClock::starting_in(day + Duration::hours(2), 10.0, 5.0);
    let env = stripe_env(&standin, &clock);
    let mut doomed = CronProcess::start(&stores, &env);
    let slot = day + Duration::hours(2);
    let deadline = std::time::Instant::now() + StdDuration::from_secs(30);
    while !standin.requests().iter().any(|r| r["path"] == METER_EVENTS) {
        assert!(
            std::time::Instant::now() < deadline,
            "the sync never sent its event"
        );
        tokio::time::sleep(StdDuration::from_millis(50)).await;
    }
    let running = rows(&stores, "stripe_sync", slot, slot + Duration::seconds(1)).await;
    assert_eq!(running[0].status, "running", "{running:?}");
    doomed.kill9();

    // The next process finds the slot running under a free lock: its runner died.
    let mut next = CronProcess::start(&stores, &env);
    let done = rows_once(
        &stores,
        "stripe_sync",
        slot,
        slot + Duration::seconds(1),
        |row| row.len() == 1 && row[0].status != "running",
    )
    .await;
    assert!(next.terminate().success());
    assert_eq!(done.len(), 1);
    assert_eq!(
        (done[0].status.as_str(), done[0].attempts),
        ("succeeded", 2),
        "{done:?}"
    );
    let previous = &done[0].details["previous_attempts"];
    assert_eq!(previous.as_array().map(Vec::len), Some(1), "{previous}");
    assert!(
        previous[0]["error"]
            .as_str()
            .is_some_and(|e| e.contains("runner died")),
        "{previous}"
    );
    // The event reached Stripe once: resent under its own key, which Stripe deduplicates.
    assert_eq!(standin.events().len(), 1, "{:?}", standin.events());
    let keys: Vec<String> = standin
        .requests()
        .iter()
        .filter(|r| r["path"] == METER_EVENTS)
        .map(|r| r["idempotency_key"].as_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(keys.len(), 2, "{keys:?}");
    assert_eq!(keys[0], keys[1], "the same event under the same key");
}

#[tokio::test]
async fn a_sync_stopped_by_its_timeout_leaves_no_lock_behind() {
    let stores = TestStores::migrated().await;
    let (standin, day) = one_day_of_usage(&stores).await;
    // The first meter event is carried out and its answer held past the sync's timeout
    // (60 simulated seconds: one real second), which stops the sync part-way, holding the
    // sync's own lock. The next slot, five minutes later, must find that lock free.
    standin.delay_answer(METER_EVENTS, 20.0);
    let clock = SimClock::starting_in(day + Duration::hours(2), 60.0, 4.0);
    let mut env = stripe_env(&standin, &clock);
    env.push((
        "APEX_CRON_SCHEDULE_STRIPE_SYNC".into(),
        "*/5 2 * * *".into(),
    ));
    env.push(("APEX_CRON_TIMEOUT_SECS_STRIPE_SYNC".into(), "60".into()));
    env.push(("APEX_CRON_SCHEDULE_MAINTENANCE".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_INVOICE_CLOSE".into(), "off".into()));
    let mut cron = CronProcess::start(&stores, &env);
    let (first, second) = (day + Duration::hours(2), day + Duration::minutes(125));
    clock.sleep_until(second).await;
    let found = rows_once(
        &stores,
        "stripe_sync",
        first,
        second + Duration::seconds(1),
        |r| r.len() == 2 && r[1].status != "running",
    )
    .await;
    assert!(cron.terminate().success());
    assert_eq!(found[0].status, "failed", "{found:?}");
    assert!(
        found[0]
            .error_message
            .as_deref()
            .is_some_and(|e| e.contains("timed out after 60 s")),
        "{found:?}"
    );
    assert_eq!(
        (found[1].status.as_str(), found[1].error_message.as_deref()),
        ("succeeded", None),
        "{found:?}"
    );
    // The event the stopped sync sent reached Stripe once: resent under its own key.
    assert_eq!(standin.events().len(), 1, "{:?}", standin.events());
}
