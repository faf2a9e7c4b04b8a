//! The schedule of real `apex-cron` processes on simulated clocks, against the test's own
//! Postgres: every slot of a simulated day and of a simulated month once; catch-up of the
//! most recent missed slot only; a job slower than its period skips slots instead of running
//! twice at once; failures and timeouts recorded and the next slot run as usual; bad
//! configuration stops the process at start; `/metrics` passes promtool.

mod common;

use apex_core::testing::TestStores;
use chrono::Duration;
use common::{
    CronProcess, SimClock, assert_each_slot_once, at, pages_once, rows, settled, slots, statuses,
    succeeded_runs,
};

/// The real jobs off, so a test sees only its test jobs.
fn only(test_jobs: &str, clock: &SimClock) -> Vec<(String, String)> {
    let mut env = clock.env();
    env.push(("APEX_CRON_SCHEDULE_EMAIL_QUEUE".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_STRIPE_SYNC".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_MAINTENANCE".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_INVOICE_CLOSE".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_DUNNING_RETRIES".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_DUNNING_POSTPONED".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_USAGE_LIMITS".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_TRIAL_REMINDERS".into(), "off".into()));
    env.push(("APEX_CRON_SCHEDULE_MONTHLY_SUMMARIES".into(), "off".into()));
    env.push(("APEX_CRON_TEST_JOBS".into(), test_jobs.into()));
    env
}

#[tokio::test]
async fn a_simulated_day_runs_every_minute_hour_and_day_slot_once() {
    let stores = TestStores::migrated().await;
    // A day in four minutes of real time: minute slots 167 ms apart. A run holds its job's
    // lock for 1 ms (median; 7 ms at p99), but a process starved of the CPU has held it for
    // 110 ms (three of these suites at once on two cores), and a slot that comes while the
    // previous run holds the lock is rightly skipped; at 83 ms apart (speed 720) that
    // happened about once a run under load. The process starts at 23:30 (five real seconds
    // to come up); the minute and hourly jobs run on January 1st only, so nothing runs after
    // the day and the process's own count of runs can be read once all are done.
    let clock = SimClock::starting_in(at("2026-01-01T00:00:00Z"), 360.0, 5.0);
    let mut cron = CronProcess::start(
        &stores,
        &only(
            "test_minute=* * 1 1 *; test_hourly=0 * 1 1 *; test_daily=0 2 * * *",
            &clock,
        ),
    );
    let (day, next) = (at("2026-01-01T00:00:00Z"), at("2026-01-02T00:00:00Z"));
    clock.sleep_until(next + Duration::seconds(30)).await;
    let expected = [
        ("test_minute", 1440),
        ("test_hourly", 24),
        ("test_daily", 1),
    ];
    for (job, runs) in expected {
        settled(&stores, job, day, next, runs as usize).await;
    }
    let page = pages_once(&[&cron], &expected).await.remove(0);
    assert!(cron.terminate().success());
    // Each slot ran once: counted where it ran, not only as rows.
    for (job, runs) in expected {
        assert_eq!(succeeded_runs(&page, job), runs, "{job}");
    }
    assert_each_slot_once(
        "test_minute",
        &rows(&stores, "test_minute", day, next).await,
        &slots(day, next, Duration::minutes(1)),
    );
    assert_each_slot_once(
        "test_hourly",
        &rows(&stores, "test_hourly", day, next).await,
        &slots(day, next, Duration::hours(1)),
    );
    assert_each_slot_once(
        "test_daily",
        &rows(&stores, "test_daily", day, next).await,
        &[at("2026-01-01T02:00:00Z")],
    );
}

#[tokio::test]
async fn a_simulated_month_runs_the_monthly_slot_once() {
    let stores = TestStores::migrated().await;
    // Two days a second; the process starts ten simulated days early.
    let clock = SimClock::starting_in(at("2026-01-01T00:00:00Z"), 172_800.0, 5.0);
    let mut cron = CronProcess::start(
        &stores,
        &only("test_monthly=0 10 1 * *; test_daily=0 2 * * *", &clock),
    );
    let (month, next) = (at("2026-01-01T00:00:00Z"), at("2026-02-01T00:00:00Z"));
    clock.sleep_until(next + Duration::hours(1)).await;
    assert!(cron.terminate().success());
    assert_each_slot_once(
        "test_monthly",
        &rows(&stores, "test_monthly", month, next).await,
        &[at("2026-01-01T10:00:00Z")],
    );
    assert_each_slot_once(
        "test_daily",
        &rows(&stores, "test_daily", month, next).await,
        &slots(at("2026-01-01T02:00:00Z"), next, Duration::days(1)),
    );
}

#[tokio::test]
async fn after_downtime_over_a_slot_only_the_most_recent_missed_slot_runs() {
    let stores = TestStores::migrated().await;
    let jobs = "test_daily=0 2 * * *";
    // Up over day 1's 02:00 (an hour a second, from 20:00 the day before), then down.
    let first = SimClock::starting_in(at("2026-01-01T01:00:00Z"), 3_600.0, 5.0);
    let mut cron = CronProcess::start(&stores, &only(jobs, &first));
    first.sleep_until(at("2026-01-01T03:00:00Z")).await;
    assert!(cron.terminate().success());
    // Back at day 3, 05:00: day 2's and day 3's slots were missed; day 3's runs, once.
    let second = SimClock::starting(at("2026-01-03T05:00:00Z"), 3_600.0);
    let mut cron = CronProcess::start(&stores, &only(jobs, &second));
    second.sleep_until(at("2026-01-03T09:00:00Z")).await;
    assert!(cron.terminate().success());
    let all = rows(
        &stores,
        "test_daily",
        at("2026-01-01T00:00:00Z"),
        at("2026-01-04T00:00:00Z"),
    )
    .await;
    assert_each_slot_once(
        "test_daily",
        &all,
        &[at("2026-01-01T02:00:00Z"), at("2026-01-03T02:00:00Z")],
    );
}

#[tokio::test]
async fn a_job_slower_than_its_period_skips_slots_and_never_runs_twice_at_once() {
    let stores = TestStores::migrated().await;
    // A minute a second; each run takes two and a half minutes. The process starts at
    // 23:55 (five real seconds to come up); the job runs every minute of hour 0.
    let clock = SimClock::starting_in(at("2026-01-01T00:00:00Z"), 60.0, 5.0);
    let mut cron = CronProcess::start(&stores, &only("test_slow=* 0 * * *@150", &clock));
    cron.wait_healthy().await;
    clock.sleep_until(at("2026-01-01T00:04:30Z")).await;
    let (status, page) = cron.get("/metrics").unwrap();
    assert!(cron.terminate().success());
    let all = rows(
        &stores,
        "test_slow",
        at("2026-01-01T00:00:00Z"),
        at("2026-01-01T00:06:00Z"),
    )
    .await;
    let by_slot: Vec<(String, &str)> = all
        .iter()
        .map(|r| {
            (
                r.scheduled_for.format("%H:%M").to_string(),
                r.status.as_str(),
            )
        })
        .collect();
    // 00:00 runs until 00:02:30; 00:03 runs (finishing within the shutdown grace).
    assert_eq!(
        by_slot,
        [
            ("00:00".to_owned(), "succeeded"),
            ("00:01".to_owned(), "skipped"),
            ("00:02".to_owned(), "skipped"),
            ("00:03".to_owned(), "succeeded"),
            ("00:04".to_owned(), "skipped"),
        ],
        "{all:?}"
    );
    assert!(
        all[1]
            .error_message
            .as_deref()
            .is_some_and(|e| e.contains("still running")),
        "{all:?}"
    );

    assert_eq!(status, 200);
    assert!(
        page.contains("apex_cron_runs_total{job=\"test_slow\",status=\"skipped\"} 3"),
        "{page}"
    );
    assert!(page.contains("# HELP apex_cron_runs_total "), "{page}");
    assert!(
        page.contains("apex_cron_run_duration_seconds_bucket"),
        "{page}"
    );
    if let Err(said) = apex_core::testing::promtool_check(&page) {
        panic!("promtool check metrics: {said}\n{page}");
    }
}

#[tokio::test]
async fn failures_and_timeouts_are_recorded_and_the_next_slot_runs_as_usual() {
    let stores = TestStores::migrated().await;
    // The process starts at 23:55 (five real seconds to come up); the jobs run every minute
    // of hour 0.
    let clock = SimClock::starting_in(at("2026-01-01T00:00:00Z"), 60.0, 5.0);
    let mut cron = CronProcess::start(
        &stores,
        &only("test_fail=* 0 * * *!; test_hang=* 0 * * *@3600~90", &clock),
    );
    clock.sleep_until(at("2026-01-01T00:02:10Z")).await;
    assert!(cron.terminate().success());
    let (from, to) = (at("2025-12-31T00:00:00Z"), at("2026-01-01T00:04:00Z"));
    let failing = rows(&stores, "test_fail", from, to).await;
    assert_eq!(failing.len(), 3, "{failing:?}");
    for row in &failing {
        assert_eq!(row.status, "failed");
        assert_eq!(
            row.error_message.as_deref(),
            Some("the test job fails on purpose")
        );
    }
    // The hung run is stopped at its 90 s timeout: 00:01 finds it still running, 00:02 runs
    // (and is stopped by its timeout within the shutdown grace).
    let hung = rows(&stores, "test_hang", from, to).await;
    let seen: Vec<(&str, Option<&str>)> = hung
        .iter()
        .map(|r| (r.status.as_str(), r.error_message.as_deref()))
        .collect();
    assert_eq!(seen.len(), 3, "{hung:?}");
    assert_eq!(seen[0].0, "failed");
    assert!(
        seen[0].1.unwrap().contains("timed out after 90 s"),
        "{hung:?}"
    );
    assert_eq!(seen[1].0, "skipped");
    assert_eq!(seen[2].0, "failed", "{hung:?}");
    assert_eq!(statuses(&hung).get("running"), None);
}

#[tokio::test]
async fn bad_configuration_stops_the_process_at_start_with_a_clear_line() {
    let stores = TestStores::migrated().await;
    for (env, code, says) in [
        (
            vec![("APEX_CRON_SCHEDULE_STRIPE_SYNC", "61 * * * *")],
            2,
            "APEX_CRON_SCHEDULE_STRIPE_SYNC is invalid: job stripe_sync",
        ),
        (
            vec![("APEX_CRON_SCHEDULE_STRIPE_SYNCS", "0 2 * * *")],
            2,
            "the jobs are email_queue, stripe_sync, maintenance, invoice_close",
        ),
        (
            vec![("APEX_CRON_TIMEOUT_SECS_MAINTENANCE", "0")],
            2,
            "APEX_CRON_TIMEOUT_SECS_MAINTENANCE is invalid",
        ),
        (
            vec![("APEX_CLOCK_SPEED", "100")],
            2,
            "APEX_CLOCK_SPEED is invalid",
        ),
        (
            vec![("APEX_DUNNING_RETRY_DAYS", "7,4")],
            2,
            "APEX_DUNNING_RETRY_DAYS is invalid: retry days must be strictly increasing",
        ),
        (
            vec![("DATABASE_URL", "postgres://postgres@127.0.0.1:1/none")],
            1,
            "cannot connect to Postgres (DATABASE_URL)",
        ),
        (
            vec![("APEX_CRON_LISTEN", "256.0.0.1:1")],
            2,
            "APEX_CRON_LISTEN is invalid",
        ),
    ] {
        let out = common::run_to_exit(&stores, &env);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(code), "{env:?}: {err}");
        let line = err
            .lines()
            .find(|l| l.starts_with("apex-cron: "))
            .unwrap_or_else(|| panic!("{env:?}: no apex-cron: line in {err}"));
        assert!(line.contains(says), "{env:?}: {line}");
        assert!(!err.contains("panicked"), "{env:?}: {err}");
    }
}

#[tokio::test]
async fn a_slot_that_cannot_be_claimed_is_tried_again_until_it_runs() {
    let stores = TestStores::migrated().await;
    // Real time from 01:59:55; the table the claim writes to goes away over 02:00, then
    // comes back.
    let clock = SimClock::starting_in(at("2026-01-01T02:00:00Z"), 1.0, 5.0);
    let mut cron = CronProcess::start(&stores, &only("test_daily=0 2 * * *", &clock));
    cron.wait_healthy().await;
    sqlx::query("ALTER TABLE cron_runs RENAME TO cron_runs_away")
        .execute(&stores.pool)
        .await
        .unwrap();
    clock.sleep_until(at("2026-01-01T02:00:02Z")).await;
    sqlx::query("ALTER TABLE cron_runs_away RENAME TO cron_runs")
        .execute(&stores.pool)
        .await
        .unwrap();
    // Retries 1, 2, 4 s apart: the one after the table is back claims and runs the slot.
    let slot = at("2026-01-01T02:00:00Z");
    let done = common::rows_once(
        &stores,
        "test_daily",
        slot,
        slot + Duration::seconds(1),
        |r| r.first().is_some_and(|r| r.status != "running"),
    )
    .await;
    let page = pages_once(&[&cron], &[("test_daily", 1)]).await.remove(0);
    assert!(cron.terminate().success());
    assert_each_slot_once("test_daily", &done, &[slot]);
    // The attempts that found no table are counted as failures, for alerts.
    assert!(
        common::series_value(
            &page,
            "apex_cron_runs_total{job=\"test_daily\",status=\"failed\"}"
        ) >= 1.0,
        "{page}"
    );
    assert_eq!(succeeded_runs(&page, "test_daily"), 1);
}
