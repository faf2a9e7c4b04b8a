//! `apexctl doctor` end to end, as the binary with `--json` parsed, on the test's own Postgres
//! and ClickHouse and the Stripe stand-in, at a simulated time: a healthy system is all `ok`
//! and exits 0; then each of the guide's Troubleshooting causes, made by hand, is named by its
//! own check as `fail` (exit 1) or `warn`: a late cron job, no job ever run, a run past its
//! timeout, a stuck email queue and a given-up email, an overdue dunning retry, a subscription
//! not in Stripe, a key Stripe refuses, an unreachable Stripe, no key, no email provider, a
//! meter missing in Stripe or counting another event, unreachable, unmigrated or edited
//! stores. And what is not a trouble stays `ok`: an email put off by a backoff, one a worker
//! holds, a dunning run at work, retries no run would make.

mod common;

use std::collections::BTreeMap;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_core::testing::TestStores;
use apex_cron::jobs::{JOBS, Schedule};
use apex_stripe::testing::{StripeStandIn, TEST_KEY};
use chrono::{DateTime, Duration, Utc};

/// The simulated time of every run: a Thursday afternoon, after every daily job's slot.
const NOW: &str = "2026-05-14T12:07:00Z";

fn now() -> DateTime<Utc> {
    NOW.parse().unwrap()
}

/// `apexctl` on the test's stores at [`NOW`], with the stand-in's key and URL when given, an
/// SMTP relay configured (the doctor does not connect to it), and `env` last (an empty value
/// is an unset variable to apexctl).
fn apexctl(
    stores: &TestStores,
    standin: Option<&StripeStandIn>,
    args: &[&str],
    env: &[(&str, &str)],
) -> (i32, String, String) {
    let mut command = common::apexctl_command(stores);
    command
        .args(args)
        .env("APEX_CLOCK_START", NOW)
        .env("EMAIL_PROVIDER", "smtp")
        .env("SMTP_URL", "smtp://127.0.0.1:2525?tls=none");
    if let Some(standin) = standin {
        command
            .env("STRIPE_SECRET_KEY", TEST_KEY)
            .env("STRIPE_API_BASE", standin.base_url());
    }
    command.envs(env.iter().copied());
    let out = command.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// One doctor run: its exit code, overall status, and each check's (status, reason) by name.
struct Diagnosis {
    code: i32,
    status: String,
    checks: BTreeMap<String, (String, String)>,
}

impl Diagnosis {
    fn status_of(&self, name: &str) -> &str {
        &self
            .checks
            .get(name)
            .unwrap_or_else(|| panic!("no check {name}: {:?}", self.checks))
            .0
    }

    fn reason_of(&self, name: &str) -> &str {
        &self.checks[name].1
    }

    /// Asserts the reason of `name` starts with `prefix`.
    #[track_caller]
    fn assert_reason_starts(&self, name: &str, prefix: &str) {
        let reason = self.reason_of(name);
        assert!(reason.starts_with(prefix), "{name}: {reason}");
    }

    /// Asserts the reason of `name` contains `part`.
    #[track_caller]
    fn assert_reason_contains(&self, name: &str, part: &str) {
        let reason = self.reason_of(name);
        assert!(reason.contains(part), "{name}: {reason}");
    }

    /// The checks that are not `ok`, by name.
    fn not_ok(&self) -> BTreeMap<&str, &str> {
        self.checks
            .iter()
            .filter(|(_, (status, _))| status != "ok")
            .map(|(name, (status, _))| (name.as_str(), status.as_str()))
            .collect()
    }
}

fn doctor(stores: &TestStores, standin: Option<&StripeStandIn>, env: &[(&str, &str)]) -> Diagnosis {
    let (code, out, err) = apexctl(stores, standin, &["doctor", "--json"], env);
    let doc: serde_json::Value = serde_json::from_str(&out)
        .unwrap_or_else(|e| panic!("not one JSON document ({e}): {out}\nstderr: {err}"));
    let checks = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["name"].as_str().unwrap().to_owned(),
                (
                    c["status"].as_str().unwrap().to_owned(),
                    c["reason"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect();
    Diagnosis {
        code,
        status: doc["status"].as_str().unwrap().to_owned(),
        checks,
    }
}

/// Signs up a Starter customer named `name` at [`NOW`] (its welcome email is due from then);
/// returns its id.
async fn signup(stores: &TestStores, name: &str) -> String {
    let new = NewCustomer {
        name: name.into(),
        email: "billing@studio.example".into(),
        plan_id: "starter".into(),
        trial_days: None,
    };
    create_customer(&mut stores.pool.acquire().await.unwrap(), &new, now())
        .await
        .unwrap()
        .customer
        .id
}

/// Records a succeeded run of every job's last slot at or before `at`, as the cron process
/// does.
async fn record_every_jobs_last_slot(stores: &TestStores, at: DateTime<Utc>) {
    for spec in JOBS {
        let slot = Schedule::parse(spec.schedule)
            .unwrap()
            .last_at_or_before(at)
            .unwrap();
        record_run(stores, spec.name, slot, "succeeded").await;
    }
}

/// Runs one statement with no parameters.
async fn execute(stores: &TestStores, sql: &'static str) {
    sqlx::query(sql).execute(&stores.pool).await.unwrap();
}

async fn record_run(stores: &TestStores, job: &str, slot: DateTime<Utc>, status: &str) {
    sqlx::query(
        "INSERT INTO cron_runs (job_name, scheduled_for, started_at, finished_at, status) \
         VALUES ($1, $2, $2, $2 + interval '1 second', $3)",
    )
    .bind(job)
    .bind(slot)
    .bind(status)
    .execute(&stores.pool)
    .await
    .unwrap();
}

/// Marks the 03:00 dunning run as running since `started`.
async fn dunning_run_started(stores: &TestStores, started: DateTime<Utc>) {
    sqlx::query(
        "UPDATE cron_runs SET status = 'running', finished_at = NULL, started_at = $1 \
         WHERE job_name = 'dunning_retries' AND scheduled_for = '2026-05-14T03:00:00Z'",
    )
    .bind(started)
    .execute(&stores.pool)
    .await
    .unwrap();
}

/// A failed first attempt at the customer's `invoice` and its pending retry, due at `due`.
async fn retry_pending(stores: &TestStores, customer: &str, invoice: &str, due: &str) {
    sqlx::query(
        "INSERT INTO dunning_attempts (customer_id, invoice_id, attempt_number, status, \
             next_retry_at) VALUES \
           ($1, $2, 0, 'failed', NULL), \
           ($1, $2, 1, 'pending', $3)",
    )
    .bind(customer)
    .bind(invoice)
    .bind(due.parse::<DateTime<Utc>>().unwrap())
    .execute(&stores.pool)
    .await
    .unwrap();
}

/// A healthy system: the catalogue and a customer mapped to the stand-in, every job run on
/// time. Returns the customer.
async fn healthy(stores: &TestStores, standin: &StripeStandIn) -> String {
    let customer = signup(stores, "Healthy Games").await;
    for args in [&["stripe", "catalog"][..], &["stripe", "customers"]] {
        let (code, _, err) = apexctl(stores, Some(standin), args, &[]);
        assert_eq!(code, 0, "{args:?}: {err}");
    }
    record_every_jobs_last_slot(stores, now()).await;
    customer
}

#[tokio::test]
async fn a_healthy_system_is_all_ok_and_each_cause_is_named() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    let customer = healthy(&stores, &standin).await;

    let healthy = doctor(&stores, Some(&standin), &[]);
    assert_eq!(healthy.not_ok(), BTreeMap::new(), "{:?}", healthy.checks);
    assert_eq!((healthy.code, healthy.status.as_str()), (0, "ok"));
    assert_eq!(
        healthy.reason_of("stripe.api"),
        format!("Stripe at {} accepted the key", standin.base_url())
    );
    healthy.assert_reason_starts(
        "stripe.mapping",
        "meters for impressions, api_calls, data_transfer (active in Stripe)",
    );
    // The welcome email of the sign-up, due since NOW.
    assert_eq!(
        healthy.reason_of("email.queue"),
        "1 email due, the longest due for less than a minute"
    );
    healthy.assert_reason_starts(
        "dunning.retries",
        "no retry overdue (due by 2026-05-14 03:00 UTC); 0 due since",
    );
    healthy.assert_reason_starts("stripe.key", "test mode");
    for spec in JOBS {
        assert_eq!(healthy.status_of(&format!("cron.{}", spec.name)), "ok");
    }
    // The text form says the same, one line a check.
    let (code, text, _) = apexctl(&stores, Some(&standin), &["doctor"], &[]);
    assert_eq!(code, 0);
    assert!(text.contains("ok    stripe.api"), "{text}");
    assert!(text.contains(" 0 fail"), "{text}");

    // The troubles, each made by hand.
    // The 02:00 Stripe sync last ran the day before: cron is not running it.
    execute(
        &stores,
        "DELETE FROM cron_runs WHERE job_name = 'stripe_sync'",
    )
    .await;
    record_run(
        &stores,
        "stripe_sync",
        "2026-05-13T02:00:00Z".parse().unwrap(),
        "succeeded",
    )
    .await;
    // The 03:00 dunning run failed (alive, but its work is not done).
    execute(
        &stores,
        "UPDATE cron_runs SET status = 'failed', error_message = 'Stripe unreachable' \
         WHERE job_name = 'dunning_retries' AND scheduled_for = '2026-05-14T03:00:00Z'",
    )
    .await;
    // A welcome email due for an hour, and one given up yesterday.
    sqlx::query(
        "INSERT INTO events (event_type, data, created_at) \
         VALUES ('email.welcome', '{\"to\": \"a@studio.example\"}', $1)",
    )
    .bind(now() - Duration::hours(1))
    .execute(&stores.pool)
    .await
    .unwrap();
    sqlx::query(
        "INSERT INTO events (event_type, data, created_at, processed_at, error_message) \
         VALUES ('email.trial_ending', '{\"to\": \"b@studio.example\"}', $1, $1, 'refused')",
    )
    .bind(now() - Duration::days(1))
    .execute(&stores.pool)
    .await
    .unwrap();
    // A retry due at 00:00 today that the 03:00 run did not make, and one due tomorrow.
    retry_pending(&stores, &customer, "in_overdue", "2026-05-14T00:00:00Z").await;
    retry_pending(&stores, &customer, "in_later", "2026-05-15T00:00:00Z").await;
    // A customer who signed up but was never mapped to Stripe.
    let unmapped = signup(&stores, "Unmapped Games").await;

    let sick = doctor(&stores, Some(&standin), &[]);
    let (code, text, _) = apexctl(&stores, Some(&standin), &["doctor"], &[]);
    assert_eq!(code, 1);
    assert!(text.contains("\nfail  cron.stripe_sync "), "{text}");
    assert!(text.contains("18 checks: 12 ok, 2 warn, 4 fail"), "{text}");
    assert_eq!((sick.code, sick.status.as_str()), (1, "fail"));
    assert_eq!(
        sick.not_ok(),
        BTreeMap::from([
            ("cron.stripe_sync", "fail"),
            ("cron.dunning_retries", "warn"),
            ("email.queue", "fail"),
            ("email.failed", "warn"),
            ("dunning.retries", "fail"),
            ("stripe.mapping", "fail"),
        ]),
        "{:?}",
        sick.checks
    );
    sick.assert_reason_contains(
        "cron.stripe_sync",
        "no run for the 2026-05-14 02:00 UTC slot",
    );
    sick.assert_reason_contains("cron.dunning_retries", "Stripe unreachable");
    // The welcome emails of the two sign-ups are due too, since NOW.
    sick.assert_reason_starts("email.queue", "3 emails due, the longest due for 60 min: ");
    sick.assert_reason_starts("email.failed", "1 email given up");
    sick.assert_reason_starts(
        "dunning.retries",
        "1 retry due by 2026-05-14 03:00 UTC not made (the oldest due 2026-05-14 00:00 UTC)",
    );
    sick.assert_reason_contains(
        "stripe.mapping",
        "1 of 2 live subscriptions without a Stripe subscription",
    );
    sick.assert_reason_contains("stripe.mapping", &unmapped);

    // `--late-minutes` moves the line: at 12:07, with 11 hours of grace, the last daily slot
    // that must have run is yesterday's, which stripe_sync has.
    let (code, out, _) = apexctl(
        &stores,
        Some(&standin),
        &["doctor", "--json", "--late-minutes", "660"],
        &[],
    );
    assert_eq!(code, 1);
    let doc: serde_json::Value = serde_json::from_str(&out).unwrap();
    let sync = doc["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["name"] == "cron.stripe_sync")
        .unwrap();
    assert_eq!(sync["status"], "ok", "{sync}");
}

#[tokio::test]
async fn stripe_refusing_the_key_or_unreachable_fails_its_check() {
    let stores = TestStores::migrated().await;
    let standin = StripeStandIn::start();
    healthy(&stores, &standin).await;

    // Stripe answers 401 to a key it does not know; the stand-in takes any key, so the test
    // makes it answer as Stripe does.
    standin.inject_fault("/v1/billing/meters", 401, 1, None, false);
    let refused = doctor(&stores, Some(&standin), &[]);
    assert_eq!(refused.code, 1);
    assert_eq!(
        refused.not_ok(),
        BTreeMap::from([("stripe.api", "fail")]),
        "{:?}",
        refused.checks
    );
    refused.assert_reason_starts("stripe.api", "Stripe refused the key: Stripe answered 401");
    // The mapping is still checked in Postgres, only not against Stripe.
    refused.assert_reason_contains("stripe.mapping", "(not checked in Stripe)");

    // Nothing listens at the base URL.
    let unreachable = doctor(
        &stores,
        Some(&standin),
        &[("STRIPE_API_BASE", "http://127.0.0.1:1")],
    );
    assert_eq!(unreachable.code, 1);
    assert_eq!(unreachable.status_of("stripe.api"), "fail");
    unreachable.assert_reason_starts("stripe.api", "cannot reach Stripe");

    // A live key set for anywhere but Stripe is suspicious, not fatal by itself; and it is
    // not sent there.
    let asked = standin.requests().len();
    let live = doctor(
        &stores,
        Some(&standin),
        &[("STRIPE_SECRET_KEY", "sk_live_apex_standin")],
    );
    assert_eq!(
        live.not_ok(),
        BTreeMap::from([("stripe.key", "warn"), ("stripe.api", "warn")])
    );
    live.assert_reason_starts("stripe.api", "not checked: a live key is not sent to");
    assert_eq!(
        standin.requests().len(),
        asked,
        "nothing reached the stand-in"
    );

    // No key, no email provider: the guide's first causes.
    let bare = doctor(&stores, None, &[("EMAIL_PROVIDER", "")]);
    assert_eq!(bare.code, 1);
    assert_eq!(bare.status_of("stripe.key"), "fail");
    assert_eq!(bare.status_of("stripe.api"), "warn");
    assert_eq!(bare.status_of("email.provider"), "fail");
    let file = doctor(&stores, Some(&standin), &[("EMAIL_PROVIDER", "file")]);
    assert_eq!(file.status_of("email.provider"), "warn");
    assert_eq!(file.code, 0);

    // A meter id Stripe does not know; two meters swapped (each counts the other's event);
    // then a metric with no meter at all.
    execute(
        &stores,
        "UPDATE stripe_meters SET stripe_meter_id = 'mtr_gone' WHERE metric_type = 'impressions'",
    )
    .await;
    let gone = doctor(&stores, Some(&standin), &[]);
    assert_eq!(gone.not_ok(), BTreeMap::from([("stripe.mapping", "fail")]));
    assert_eq!(
        gone.reason_of("stripe.mapping"),
        "meters the usage sync cannot report to: impressions (mtr_gone: no such meter in Stripe)"
    );
    let ids: Vec<(String, String)> = sqlx::query_as(
        "SELECT metric_type, stripe_meter_id FROM stripe_meters \
         WHERE metric_type IN ('api_calls', 'data_transfer') ORDER BY metric_type",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    let (api_calls, data_transfer) = (&ids[0].1, &ids[1].1);
    for (metric, id) in [
        ("api_calls", "mtr_swapping"),
        ("data_transfer", api_calls),
        ("api_calls", data_transfer),
    ] {
        sqlx::query("UPDATE stripe_meters SET stripe_meter_id = $2 WHERE metric_type = $1")
            .bind(metric)
            .bind(id)
            .execute(&stores.pool)
            .await
            .unwrap();
    }
    let swapped = doctor(&stores, Some(&standin), &[]);
    assert_eq!(
        swapped.reason_of("stripe.mapping"),
        format!(
            "meters the usage sync cannot report to: impressions (mtr_gone: no such meter in \
             Stripe), api_calls ({data_transfer}: counts apex_data_transfer, not \
             apex_api_calls), data_transfer ({api_calls}: counts apex_api_calls, not \
             apex_data_transfer)"
        )
    );
    execute(
        &stores,
        "DELETE FROM stripe_meters WHERE metric_type = 'data_transfer'",
    )
    .await;
    let missing = doctor(&stores, Some(&standin), &[]);
    assert_eq!(
        missing.reason_of("stripe.mapping"),
        "no Stripe meter for data_transfer: run `apexctl stripe catalog`"
    );
}

#[tokio::test]
async fn unreachable_or_unmigrated_stores_fail_and_the_rest_still_runs() {
    let stores = TestStores::empty().await;
    let unmigrated = doctor(&stores, None, &[]);
    assert_eq!(unmigrated.code, 1);
    assert_eq!(unmigrated.status_of("postgres"), "fail");
    unmigrated.assert_reason_contains("postgres", "run `apexctl migrate`");
    assert_eq!(unmigrated.status_of("clickhouse"), "fail");
    assert_eq!(unmigrated.status_of("dunning.retries"), "warn");
    unmigrated.assert_reason_starts("dunning.retries", "not checked");

    // Credentials in the URLs (user info, a query) are never printed.
    let (_, text, _) = apexctl(
        &stores,
        None,
        &["doctor"],
        &[
            (
                "DATABASE_URL",
                "postgres://apex:pg-s3cret@127.0.0.1:1/apex?password=pg-s3cret",
            ),
            ("CLICKHOUSE_URL", "http://default:ch-s3cret@127.0.0.1:1"),
            ("STRIPE_SECRET_KEY", TEST_KEY),
            ("STRIPE_API_BASE", "http://127.0.0.1:1/?token=st-s3cret"),
        ],
    );
    assert!(!text.contains("s3cret"), "{text}");
    assert!(
        text.contains("(DATABASE_URL postgres://127.0.0.1:1/apex)"),
        "{text}"
    );
    assert!(
        text.contains("CLICKHOUSE_URL http://127.0.0.1:1,"),
        "{text}"
    );

    let down = doctor(
        &stores,
        None,
        &[
            ("DATABASE_URL", "postgres://postgres@127.0.0.1:1/apex"),
            ("CLICKHOUSE_URL", "http://127.0.0.1:1"),
        ],
    );
    assert_eq!(down.code, 1);
    assert_eq!(down.status_of("postgres"), "fail");
    down.assert_reason_starts("postgres", "cannot connect");
    assert_eq!(down.status_of("clickhouse"), "fail");
    down.assert_reason_starts("clickhouse", "ClickHouse connection failed");
    // Checks that need no store still ran.
    assert_eq!(down.status_of("email.provider"), "ok");
    assert_eq!(
        down.reason_of("email.provider"),
        "smtp relay 127.0.0.1:2525: configured (not contacted)"
    );

    // Bad flags: one clear line, exit 1.
    let (code, _, err) = apexctl(&stores, None, &["doctor", "--late-minutes", "0"], &[]);
    assert_eq!(code, 1);
    assert!(err.starts_with("apexctl: --late-minutes must be"), "{err}");
}

/// A migration edited after it was applied, or one that failed part-way, fails `postgres`.
#[tokio::test]
async fn an_edited_or_failed_migration_fails_postgres() {
    let stores = TestStores::migrated().await;
    execute(
        &stores,
        "UPDATE _sqlx_migrations SET checksum = '\\x00' WHERE version = 3",
    )
    .await;
    let edited = doctor(&stores, None, &[]);
    assert_eq!(edited.status_of("postgres"), "fail");
    edited.assert_reason_starts(
        "postgres",
        "reachable; migrations edited after they were applied (0003)",
    );
    // The tables are there: the other checks still read them.
    assert_ne!(edited.status_of("email.queue"), "warn");

    execute(
        &stores,
        "UPDATE _sqlx_migrations SET success = false WHERE version = 5",
    )
    .await;
    let dirty = doctor(&stores, None, &[]);
    dirty.assert_reason_contains("postgres", "failed part-way (0005;");
    dirty.assert_reason_starts(
        "dunning.retries",
        "not checked: a Postgres migration failed part-way",
    );
}

/// The guide's "verify cron is running": no run of any job at all fails every job's check;
/// a run still going past its timeout warns; a run at work within it is fine.
#[tokio::test]
async fn no_run_at_all_fails_every_job_and_a_run_past_its_timeout_warns() {
    let stores = TestStores::migrated().await;
    let never = doctor(&stores, None, &[]);
    for spec in JOBS {
        let name = format!("cron.{}", spec.name);
        assert_eq!(never.status_of(&name), "fail", "{name}");
        assert_eq!(
            never.reason_of(&name),
            "no run of any job is recorded: is apex-cron running?"
        );
    }

    record_every_jobs_last_slot(&stores, now()).await;
    // maintenance's 04:00 slot is still running at 12:07, past its 30 minutes; the 03:00
    // dunning run started a minute ago, well within its 2 hours.
    execute(
        &stores,
        "UPDATE cron_runs SET status = 'running', finished_at = NULL \
         WHERE job_name = 'maintenance' AND scheduled_for = '2026-05-14T04:00:00Z'",
    )
    .await;
    dunning_run_started(&stores, now() - Duration::minutes(1)).await;
    let running = doctor(&stores, None, &[]);
    assert_eq!(running.status_of("cron.maintenance"), "warn");
    assert_eq!(
        running.reason_of("cron.maintenance"),
        "the 2026-05-14 04:00 UTC slot is running since 2026-05-14 04:00 UTC, past its timeout \
         (30 min)"
    );
    assert_eq!(running.status_of("cron.dunning_retries"), "ok");
    running.assert_reason_starts(
        "cron.dunning_retries",
        "last slot 2026-05-14 03:00 UTC running;",
    );
}

/// `email.queue` counts what a queue run at the clock's now would take, by how long each has
/// been due: an email put off (a backoff, the daily cap, a `Retry-After`) is due from its
/// `next_attempt_at`, not from its creation; one a live worker holds, and one created after
/// now, are not waiting.
#[tokio::test]
async fn the_email_queue_is_late_by_what_is_due_not_by_age() {
    let stores = TestStores::migrated().await;
    record_every_jobs_last_slot(&stores, now()).await;
    let insert = |created: DateTime<Utc>,
                  next_attempt: Option<DateTime<Utc>>,
                  lease: Option<DateTime<Utc>>| {
        sqlx::query(
            "INSERT INTO events (event_type, data, created_at, next_attempt_at, lease_until) \
             VALUES ('email.welcome', '{\"to\": \"a@studio.example\"}', $1, $2, $3)",
        )
        .bind(created)
        .bind(next_attempt)
        .bind(lease)
        .execute(&stores.pool)
    };
    // Created two hours ago, put off until a minute ago: due for a minute.
    insert(
        now() - Duration::hours(2),
        Some(now() - Duration::minutes(1)),
        None,
    )
    .await
    .unwrap();
    // Created two hours ago and held by a worker whose lease runs: being sent.
    insert(
        now() - Duration::hours(2),
        None,
        Some(now() + Duration::minutes(4)),
    )
    .await
    .unwrap();
    // Put off until later, and created after the clock's now: not due.
    insert(
        now() - Duration::hours(3),
        Some(now() + Duration::hours(1)),
        None,
    )
    .await
    .unwrap();
    insert(now() + Duration::hours(1), None, None)
        .await
        .unwrap();
    let fine = doctor(&stores, None, &[]);
    assert_eq!(fine.status_of("email.queue"), "ok");
    assert_eq!(
        fine.reason_of("email.queue"),
        "1 email due, the longest due for 1 min"
    );

    // Twenty minutes on, the put-off one has waited too long; the lease has passed, so the
    // held one is waiting again, since its creation.
    let later = (now() + Duration::minutes(20))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let stuck = doctor(&stores, None, &[("APEX_CLOCK_START", &later)]);
    assert_eq!(stuck.status_of("email.queue"), "fail");
    stuck.assert_reason_starts("email.queue", "2 emails due, the longest due for 140 min: ");
}

/// `dunning.retries` counts what a run would make: not a retry a live run holds, nor one of
/// a closed case or an exempt customer; and while the 03:00 run is at work, nothing is
/// overdue yet.
#[tokio::test]
async fn retries_no_run_would_make_and_a_run_at_work_are_not_overdue() {
    let stores = TestStores::migrated().await;
    record_every_jobs_last_slot(&stores, now()).await;
    let customer = signup(&stores, "Dunned Games").await;
    let exempt = signup(&stores, "Exempt Games").await;
    sqlx::query("UPDATE customers SET dunning_exempt = true WHERE id = $1")
        .bind(&exempt)
        .execute(&stores.pool)
        .await
        .unwrap();
    // Held by a run that started a minute ago; of a closed case; of an exempt customer.
    sqlx::query(
        "INSERT INTO dunning_attempts (customer_id, invoice_id, attempt_number, status, \
             next_retry_at, attempted_at, resolution, resolved_at) VALUES \
           ($1, 'in_held', 0, 'failed', NULL, NULL, NULL, NULL), \
           ($1, 'in_held', 1, 'retrying', '2026-05-14T00:00:00Z', $3, NULL, NULL), \
           ($1, 'in_closed', 0, 'canceled', NULL, NULL, 'closed', $3), \
           ($1, 'in_closed', 1, 'pending', '2026-05-14T00:00:00Z', NULL, NULL, NULL), \
           ($2, 'in_exempt', 0, 'failed', NULL, NULL, NULL, NULL), \
           ($2, 'in_exempt', 1, 'pending', '2026-05-14T00:00:00Z', NULL, NULL, NULL)",
    )
    .bind(&customer)
    .bind(&exempt)
    .bind(now() - Duration::minutes(1))
    .execute(&stores.pool)
    .await
    .unwrap();
    let quiet = doctor(&stores, None, &[]);
    assert_eq!(
        quiet.status_of("dunning.retries"),
        "ok",
        "{:?}",
        quiet.checks
    );
    // The guide's query lists all three.
    let (code, out, _) = apexctl(&stores, None, &["dunning", "pending", "--json"], &[]);
    assert_eq!(code, 0);
    let pending: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(pending["total"], 3, "{pending}");

    // A pending retry due at 00:00 that the 03:00 run has not reached yet, while it runs.
    retry_pending(&stores, &customer, "in_waiting", "2026-05-14T00:00:00Z").await;
    dunning_run_started(&stores, now() - Duration::minutes(30)).await;
    let at_work = doctor(&stores, None, &[]);
    assert_eq!(at_work.status_of("dunning.retries"), "ok");
    assert_eq!(
        at_work.reason_of("dunning.retries"),
        "run in progress: the 2026-05-14 03:00 UTC slot, started 2026-05-14 11:37 UTC"
    );
    // Once the run is over (here: failed), the retry it did not make is overdue.
    sqlx::query(
        "UPDATE cron_runs SET status = 'failed', finished_at = $1 \
         WHERE job_name = 'dunning_retries'",
    )
    .bind(now())
    .execute(&stores.pool)
    .await
    .unwrap();
    let after = doctor(&stores, None, &[]);
    assert_eq!(after.status_of("dunning.retries"), "fail");
    after.assert_reason_starts(
        "dunning.retries",
        "1 retry due by 2026-05-14 03:00 UTC not made",
    );
}
