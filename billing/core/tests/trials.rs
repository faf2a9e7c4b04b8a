//! Trial reminders against the real Postgres, with time passed in (`now`), never slept: the
//! `trial_reminders` job run every day at 09:00 over whole trials (and again the same day)
//! sends each of the 7-, 3- and 1-day reminders on its day exactly once; a 2-day trial gets
//! only the 1-day one; an extended trial gets the reminders of its new end; converted,
//! canceled, past-due and suspended customers get none; runs missed are caught up late but
//! never out of order; a trial never mapped to Stripe becomes active at its end, one mapped
//! is left to Stripe; two runs at once enqueue each reminder once; `upcoming` lists what the
//! operator needs.

use apex_billing::BillingError;
use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::subscriptions::{self, DunningStatus, StripeTarget};
use apex_billing::trials::{self, TrialReminderSummary, due_reminder, send_trial_reminders};
use apex_core::testing::TestStores;
use chrono::{DateTime, Duration, NaiveDate, Utc};
use serde_json::Value;

/// `y-m-d h:mi` UTC.
fn at(y: i32, m: u32, d: u32, h: u32, mi: u32) -> DateTime<Utc> {
    NaiveDate::from_ymd_opt(y, m, d)
        .unwrap()
        .and_hms_opt(h, mi, 0)
        .unwrap()
        .and_utc()
}

/// 09:00 of `day`.
fn nine(day: NaiveDate) -> DateTime<Utc> {
    day.and_hms_opt(9, 0, 0).unwrap().and_utc()
}

/// A Starter customer signed up at `now` with a trial of `days`: (id, subscription id, end).
async fn signup(
    stores: &TestStores,
    name: &str,
    days: u32,
    now: DateTime<Utc>,
) -> (String, i64, DateTime<Utc>) {
    let created = create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: name.into(),
            email: format!("{}@trials.example", name.to_lowercase().replace(' ', ".")),
            plan_id: "starter".into(),
            trial_days: Some(days),
        },
        now,
    )
    .await
    .unwrap();
    (
        created.customer.id,
        created.subscription_id,
        created.trial_end.expect("a trial"),
    )
}

async fn run(stores: &TestStores, now: DateTime<Utc>) -> TrialReminderSummary {
    send_trial_reminders(&mut stores.pool.acquire().await.unwrap(), now)
        .await
        .unwrap()
}

/// A trial email event: type, when enqueued, its dedup key and data.
#[derive(Debug)]
struct Reminder {
    kind: String,
    created_at: DateTime<Utc>,
    key: String,
    data: Value,
}

/// The trial emails of `customer`, oldest first.
async fn reminders(stores: &TestStores, customer: &str) -> Vec<Reminder> {
    let rows: Vec<(String, DateTime<Utc>, String, Value)> = sqlx::query_as(
        "SELECT event_type, created_at, dedup_key, data FROM events \
         WHERE data->>'customer_id' = $1 AND event_type LIKE 'email.trial%' ORDER BY id",
    )
    .bind(customer)
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    rows.into_iter()
        .map(|(kind, created_at, key, data)| Reminder {
            kind,
            created_at,
            key,
            data,
        })
        .collect()
}

/// (type, UTC date enqueued, days_left) of each reminder.
async fn schedule(stores: &TestStores, customer: &str) -> Vec<(String, NaiveDate, i64)> {
    reminders(stores, customer)
        .await
        .into_iter()
        .map(|r| {
            (
                r.kind,
                r.created_at.date_naive(),
                r.data["days_left"].as_i64().unwrap(),
            )
        })
        .collect()
}

fn day(s: &str) -> NaiveDate {
    s.parse().unwrap()
}

fn expect(rows: &[(&str, &str, i64)]) -> Vec<(String, NaiveDate, i64)> {
    rows.iter()
        .map(|(k, d, left)| (format!("email.{k}"), day(d), *left))
        .collect()
}

/// (subscription status, customer status) of `customer`'s newest subscription.
async fn status(stores: &TestStores, customer: &str) -> (String, String) {
    sqlx::query_as(
        "SELECT s.status, c.status FROM subscriptions s JOIN customers c ON c.id = s.customer_id \
         WHERE c.id = $1 ORDER BY s.id DESC LIMIT 1",
    )
    .bind(customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap()
}

/// Runs the job at 09:00 (the cron's time, and again: a re-run) of every day from `from` to `to`; the sums.
async fn daily(stores: &TestStores, from: NaiveDate, to: NaiveDate) -> TrialReminderSummary {
    let mut total = TrialReminderSummary::default();
    let mut d = from;
    while d <= to {
        for now in [nine(d), nine(d)] {
            let s = run(stores, now).await;
            total.trial_ending_7d += s.trial_ending_7d;
            total.trial_ending_3d += s.trial_ending_3d;
            total.trial_ending_1d += s.trial_ending_1d;
            total.trials_ended += s.trials_ended;
        }
        d += Duration::days(1);
    }
    total
}

#[tokio::test]
async fn a_14_day_trial_gets_each_reminder_on_its_day_once() {
    let stores = TestStores::migrated().await;
    let signed = at(2031, 3, 1, 14, 30);
    let (customer, _, end) = signup(&stores, "Fourteen Days", 14, signed).await;
    assert_eq!(end, at(2031, 3, 15, 14, 30));

    // Every day at 09:00 (twice) and 23:59, from sign-up to two days after the end.
    let mut total = TrialReminderSummary::default();
    let mut d = signed.date_naive();
    while d <= day("2031-03-17") {
        let first = run(&stores, nine(d)).await;
        let again = run(&stores, nine(d)).await;
        assert_eq!(again, TrialReminderSummary::default(), "second run of {d}");
        let late = run(&stores, d.and_hms_opt(23, 59, 0).unwrap().and_utc()).await;
        assert_eq!(late.reminders(), 0, "23:59 run of {d}");
        let expected = match d.to_string().as_str() {
            "2031-03-08" => Some(7),
            "2031-03-12" => Some(3),
            "2031-03-14" => Some(1),
            _ => None,
        };
        for days in trials::REMINDER_DAYS {
            assert_eq!(
                first.of(days),
                u64::from(expected == Some(days)),
                "{days}-day reminder on {d}"
            );
        }
        total.trials_ended += first.trials_ended + late.trials_ended;
        d += Duration::days(1);
    }
    assert_eq!(
        schedule(&stores, &customer).await,
        expect(&[
            ("trial_ending_7d", "2031-03-08", 7),
            ("trial_ending_3d", "2031-03-12", 3),
            ("trial_ending_1d", "2031-03-14", 1),
        ])
    );
    let all = reminders(&stores, &customer).await;
    for (r, days) in all.iter().zip([7, 3, 1]) {
        assert_eq!(
            r.key,
            format!("trial:{customer}:2031-03-15:trial_ending_{days}d")
        );
        assert_eq!(r.data["to"], "fourteen.days@trials.example");
        assert_eq!(r.data["name"], "Fourteen Days");
        assert_eq!(r.data["plan_type"], "starter");
        assert_eq!(r.data["upgrade_url"], trials::UPGRADE_URL);
        let trial_end: DateTime<Utc> = r.data["trial_end"].as_str().unwrap().parse().unwrap();
        assert_eq!(trial_end, end);
        assert_eq!(r.created_at.time(), nine(day("2031-03-01")).time());
    }
    // Never mapped to Stripe: active from the first run after its end (23:59 on the 15th).
    assert_eq!(total.trials_ended, 1);
    assert_eq!(status(&stores, &customer).await.0, "active");
}

#[tokio::test]
async fn short_trials_skip_the_reminders_longer_than_themselves() {
    let stores = TestStores::migrated().await;
    let (two, _, _) = signup(&stores, "Two Days", 2, at(2031, 4, 1, 8, 0)).await;
    let (five, _, _) = signup(&stores, "Five Days", 5, at(2031, 4, 1, 8, 0)).await;
    // Exactly 7 days, signed up before the day's run: the 7-day one that very morning.
    let (seven, _, _) = signup(&stores, "Seven Days", 7, at(2031, 4, 1, 8, 0)).await;
    // Signed up after the run: its first run is the next morning, 6 days before the end.
    let (seven_late, _, _) = signup(&stores, "Seven Late", 7, at(2031, 4, 1, 10, 0)).await;
    let total = daily(&stores, day("2031-04-01"), day("2031-04-10")).await;

    assert_eq!(
        schedule(&stores, &two).await,
        expect(&[("trial_ending_1d", "2031-04-02", 1)])
    );
    assert_eq!(
        schedule(&stores, &five).await,
        expect(&[
            ("trial_ending_3d", "2031-04-03", 3),
            ("trial_ending_1d", "2031-04-05", 1),
        ])
    );
    assert_eq!(
        schedule(&stores, &seven).await,
        expect(&[
            ("trial_ending_7d", "2031-04-01", 7),
            ("trial_ending_3d", "2031-04-05", 3),
            ("trial_ending_1d", "2031-04-07", 1),
        ])
    );
    assert_eq!(
        schedule(&stores, &seven_late).await,
        expect(&[
            ("trial_ending_7d", "2031-04-02", 6),
            ("trial_ending_3d", "2031-04-05", 3),
            ("trial_ending_1d", "2031-04-07", 1),
        ])
    );
    assert_eq!(
        (
            total.trial_ending_7d,
            total.trial_ending_3d,
            total.trial_ending_1d,
            total.trials_ended
        ),
        (2, 3, 4, 4)
    );
}

#[tokio::test]
async fn an_extended_trial_gets_the_reminders_of_its_new_end() {
    let stores = TestStores::migrated().await;
    let (customer, subscription, _) = signup(&stores, "Extended", 14, at(2031, 5, 1, 12, 0)).await;
    daily(&stores, day("2031-05-01"), day("2031-05-12")).await;
    assert_eq!(
        schedule(&stores, &customer).await,
        expect(&[
            ("trial_ending_7d", "2031-05-08", 7),
            ("trial_ending_3d", "2031-05-12", 3),
        ])
    );
    // After the 3-day reminder, the trial is extended by a week (an operator, or Stripe).
    sqlx::query("UPDATE subscriptions SET trial_end = trial_end + interval '7 days' WHERE id = $1")
        .bind(subscription)
        .execute(&stores.pool)
        .await
        .unwrap();
    let total = daily(&stores, day("2031-05-13"), day("2031-05-23")).await;
    assert_eq!(
        schedule(&stores, &customer).await,
        expect(&[
            ("trial_ending_7d", "2031-05-08", 7),
            ("trial_ending_3d", "2031-05-12", 3),
            // No 1-day reminder of the old end (the 14th): the trial no longer ends then.
            ("trial_ending_7d", "2031-05-15", 7),
            ("trial_ending_3d", "2031-05-19", 3),
            ("trial_ending_1d", "2031-05-21", 1),
        ])
    );
    let keys: Vec<String> = reminders(&stores, &customer)
        .await
        .into_iter()
        .map(|r| r.key)
        .collect();
    assert_eq!(
        keys[2..],
        [7, 3, 1].map(|d| format!("trial:{customer}:2031-05-22:trial_ending_{d}d"))
    );
    assert_eq!(total.trials_ended, 1);
    assert_eq!(status(&stores, &customer).await.0, "active");
}

#[tokio::test]
async fn converted_canceled_past_due_and_suspended_customers_get_none() {
    let stores = TestStores::migrated().await;
    let signed = at(2031, 6, 1, 12, 0);
    let (control, _, _) = signup(&stores, "Still Trialing", 14, signed).await;

    // Converted: Stripe says its subscription is active.
    let (converted, sub, _) = signup(&stores, "Converted", 14, signed).await;
    subscriptions::set_stripe_ids(&stores.pool, sub, "sub_T_converted", "cus_T_converted")
        .await
        .unwrap();
    subscriptions::apply_stripe_status(
        &stores.pool,
        StripeTarget::Subscription("sub_T_converted"),
        "active",
        None,
    )
    .await
    .unwrap();
    // Canceled: its subscription deleted in Stripe, and the customer canceled.
    let (canceled, sub, _) = signup(&stores, "Canceled", 14, signed).await;
    subscriptions::set_stripe_ids(&stores.pool, sub, "sub_T_canceled", "cus_T_canceled")
        .await
        .unwrap();
    subscriptions::apply_stripe_status(
        &stores.pool,
        StripeTarget::Subscription("sub_T_canceled"),
        "canceled",
        None,
    )
    .await
    .unwrap();
    // Suspended by dunning: subscription and customer.
    let (suspended, _, _) = signup(&stores, "Suspended", 14, signed).await;
    subscriptions::apply_dunning_status(
        &stores.pool,
        &suspended,
        DunningStatus::Suspended,
        false,
        signed,
    )
    .await
    .unwrap();
    // Past due (a case is open) during its trial.
    let (past_due, _, _) = signup(&stores, "Past Due", 14, signed).await;
    subscriptions::apply_dunning_status(
        &stores.pool,
        &past_due,
        DunningStatus::PastDue,
        false,
        signed,
    )
    .await
    .unwrap();
    // A customer whose own status is not active, its subscription still trialing.
    let (customer_suspended, _, _) = signup(&stores, "Customer Suspended", 14, signed).await;
    let (customer_canceled, _, _) = signup(&stores, "Customer Canceled", 14, signed).await;
    for (id, st) in [
        (&suspended, "suspended"),
        (&customer_suspended, "suspended"),
        (&canceled, "canceled"),
        (&customer_canceled, "canceled"),
    ] {
        sqlx::query("UPDATE customers SET status = $2 WHERE id = $1")
            .bind(id)
            .bind(st)
            .execute(&stores.pool)
            .await
            .unwrap();
    }

    let total = daily(&stores, day("2031-06-01"), day("2031-06-17")).await;
    assert_eq!(reminders(&stores, &control).await.len(), 3);
    assert_eq!(total.reminders(), 3);
    for customer in [
        &converted,
        &canceled,
        &suspended,
        &past_due,
        &customer_suspended,
        &customer_canceled,
    ] {
        assert!(
            reminders(&stores, customer).await.is_empty(),
            "{customer}: {:?}",
            reminders(&stores, customer).await
        );
    }
    // Only the control's trial ended into `active`; the others are as they were.
    assert_eq!(total.trials_ended, 1);
    assert_eq!(
        status(&stores, &customer_suspended).await,
        ("trialing".into(), "suspended".into())
    );
    assert_eq!(
        status(&stores, &customer_canceled).await,
        ("trialing".into(), "canceled".into())
    );
    assert_eq!(status(&stores, &past_due).await.0, "past_due");
    assert_eq!(status(&stores, &canceled).await.0, "canceled");
}

#[tokio::test]
async fn missed_runs_are_caught_up_late_but_never_out_of_order() {
    let stores = TestStores::migrated().await;
    // Ends 2031-07-15 12:00. The job runs only on some days.
    let (a, _, _) = signup(&stores, "Caught Up", 14, at(2031, 7, 1, 12, 0)).await;
    // 6 days before: the 7-day reminder, late, saying 6 days.
    assert_eq!(
        run(&stores, nine(day("2031-07-09"))).await.trial_ending_7d,
        1
    );
    // 2 days before: the 3-day one, late.
    assert_eq!(
        run(&stores, nine(day("2031-07-13"))).await.trial_ending_3d,
        1
    );
    // The end's day, before the end: the 1-day one, late, saying "today".
    assert_eq!(
        run(&stores, nine(day("2031-07-15"))).await.trial_ending_1d,
        1
    );
    assert_eq!(
        schedule(&stores, &a).await,
        expect(&[
            ("trial_ending_7d", "2031-07-09", 6),
            ("trial_ending_3d", "2031-07-13", 2),
            ("trial_ending_1d", "2031-07-15", 0),
        ])
    );

    // After its end: active; nothing more.
    let after = run(&stores, nine(day("2031-07-16"))).await;
    assert_eq!((after.reminders(), after.trials_ended), (0, 1));

    // Down until 2 days before: only the 3-day one goes, the 7-day one never.
    let (b, _, _) = signup(&stores, "Down A Week", 14, at(2031, 8, 1, 12, 0)).await;
    for d in ["2031-08-13", "2031-08-14"] {
        run(&stores, nine(day(d))).await;
    }
    let at_end = run(&stores, at(2031, 8, 15, 12, 0)).await;
    assert_eq!((at_end.reminders(), at_end.trials_ended), (0, 1));
    assert_eq!(
        schedule(&stores, &b).await,
        expect(&[
            ("trial_ending_3d", "2031-08-13", 2),
            ("trial_ending_1d", "2031-08-14", 1),
        ])
    );

    // Down from 6 days before until after the end: no reminder once the trial has ended.
    let (c, _, _) = signup(&stores, "Down To The End", 14, at(2031, 9, 1, 12, 0)).await;
    run(&stores, nine(day("2031-09-09"))).await;
    run(&stores, nine(day("2031-09-16"))).await;
    assert_eq!(
        schedule(&stores, &c).await,
        expect(&[("trial_ending_7d", "2031-09-09", 6)])
    );
}

#[tokio::test]
async fn an_ended_trial_never_mapped_to_stripe_becomes_active_and_a_mapped_one_waits_for_stripe() {
    let stores = TestStores::migrated().await;
    let signed = at(2031, 10, 1, 12, 0);
    let (unmapped, _, end) = signup(&stores, "Never Mapped", 2, signed).await;
    let (mapped, sub, _) = signup(&stores, "Mapped", 2, signed).await;
    subscriptions::set_stripe_ids(&stores.pool, sub, "sub_T_mapped", "cus_T_mapped")
        .await
        .unwrap();

    // Before the end (to the microsecond): nothing moves.
    let before = run(&stores, end - Duration::microseconds(1)).await;
    assert_eq!(before.trials_ended, 0);
    assert_eq!(status(&stores, &unmapped).await.0, "trialing");
    // At the end: the unmapped one is active, the mapped one waits for Stripe's event.
    let at_end = run(&stores, end).await;
    assert_eq!(at_end.trials_ended, 1);
    assert_eq!(status(&stores, &unmapped).await.0, "active");
    assert_eq!(status(&stores, &mapped).await.0, "trialing");
    let updated: DateTime<Utc> =
        sqlx::query_scalar("SELECT updated_at FROM subscriptions WHERE customer_id = $1")
            .bind(&unmapped)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(updated, end);
    // Once: a second run moves nothing.
    assert_eq!(run(&stores, end + Duration::days(1)).await.trials_ended, 0);
    // Both got their 1-day reminder before, the ended ones no more after.
    assert_eq!(reminders(&stores, &unmapped).await.len(), 1);
    assert_eq!(reminders(&stores, &mapped).await.len(), 1);
}

#[tokio::test]
async fn two_runs_at_once_enqueue_and_count_each_reminder_once() {
    let stores = TestStores::migrated().await;
    let signed = at(2031, 11, 1, 12, 0);
    for n in 0..20 {
        signup(&stores, &format!("Concurrent {n}"), 7, signed).await;
    }
    let now = nine(day("2031-11-02"));
    let (a, b) = tokio::join!(
        async {
            send_trial_reminders(&mut stores.pool.acquire().await.unwrap(), now)
                .await
                .unwrap()
        },
        async {
            send_trial_reminders(&mut stores.pool.acquire().await.unwrap(), now)
                .await
                .unwrap()
        }
    );
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM events WHERE event_type = 'email.trial_ending_7d'",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(events, 20);
    assert_eq!(a.trial_ending_7d + b.trial_ending_7d, 20, "{a:?} {b:?}");
}

#[tokio::test]
async fn upcoming_lists_trials_ending_soon_with_their_reminders() {
    let stores = TestStores::migrated().await;
    let signed = at(2031, 12, 1, 12, 0);
    let (soon, _, soon_end) = signup(&stores, "Ends Soon", 3, signed).await; // Dec 4
    let (week, _, _) = signup(&stores, "Ends In A Week", 8, signed).await; // Dec 9
    let (later, _, _) = signup(&stores, "Ends Later", 30, signed).await; // Dec 31
    let (suspended, _, _) = signup(&stores, "Suspended", 2, signed).await; // Dec 3
    sqlx::query("UPDATE customers SET status = 'suspended' WHERE id = $1")
        .bind(&suspended)
        .execute(&stores.pool)
        .await
        .unwrap();
    let now = nine(day("2031-12-02"));
    run(&stores, nine(day("2031-12-01"))).await;
    run(&stores, now).await;

    let mut conn = stores.pool.acquire().await.unwrap();
    let list = trials::upcoming(&mut conn, now, 7).await.unwrap();
    let ids: Vec<&str> = list.iter().map(|t| t.customer_id.as_str()).collect();
    assert_eq!(ids, [suspended.as_str(), soon.as_str(), week.as_str()]);
    let s = &list[1];
    assert_eq!(
        (
            s.days_left,
            s.trial_end,
            s.plan_id.as_str(),
            s.stripe_mapped
        ),
        (2, soon_end, "starter", false)
    );
    assert_eq!(s.email, "ends.soon@trials.example");
    let sent: Vec<(&str, &str)> = s
        .reminders
        .iter()
        .map(|r| (r.email_type.as_str(), r.status.as_str()))
        .collect();
    assert_eq!(sent, [("trial_ending_3d", "queued")]);
    let next = s.next_reminder.as_ref().unwrap();
    assert_eq!(
        (next.email_type.as_str(), next.due_from),
        ("trial_ending_1d", at(2031, 12, 3, 0, 0))
    );
    // Ends Dec 9: 7-day reminder on Dec 2 (this morning), the 3-day one next.
    let w = &list[2];
    assert_eq!(w.days_left, 7);
    assert_eq!(w.reminders.len(), 1);
    assert_eq!(w.reminders[0].email_type, "trial_ending_7d");
    assert_eq!(
        w.next_reminder.as_ref().unwrap().email_type,
        "trial_ending_3d"
    );
    // The suspended customer is listed, with no reminder and none to come.
    assert_eq!(list[0].customer_status, "suspended");
    assert!(list[0].reminders.is_empty() && list[0].next_reminder.is_none());

    // Days are calendar days: 0 is today (none ends on Dec 2), 29 reaches Dec 31.
    assert!(
        trials::upcoming(&mut conn, now, 0)
            .await
            .unwrap()
            .is_empty()
    );
    assert_eq!(trials::upcoming(&mut conn, now, 1).await.unwrap().len(), 1);
    let all = trials::upcoming(&mut conn, now, 29).await.unwrap();
    assert_eq!(all.last().unwrap().customer_id, later);
    let next = all.last().unwrap().next_reminder.as_ref().unwrap();
    assert_eq!(
        (next.email_type.as_str(), next.due_from),
        ("trial_ending_7d", at(2031, 12, 24, 0, 0))
    );
    assert!(matches!(
        trials::upcoming(&mut conn, now, -1).await,
        Err(BillingError::Invalid(_))
    ));
}

#[test]
fn the_reminder_due_is_the_nearest_open_window() {
    let created = at(2032, 1, 1, 12, 0);
    let end = at(2032, 1, 15, 0, 30);
    // Windows open at 00:00 of Jan 8, Jan 12 and Jan 14, whatever the end's time of day.
    assert_eq!(trials::window_opens(end, 7), at(2032, 1, 8, 0, 0));
    assert_eq!(due_reminder(created, end, at(2032, 1, 7, 23, 59)), None);
    assert_eq!(due_reminder(created, end, at(2032, 1, 8, 0, 0)), Some(7));
    assert_eq!(due_reminder(created, end, at(2032, 1, 11, 9, 0)), Some(7));
    assert_eq!(due_reminder(created, end, at(2032, 1, 12, 9, 0)), Some(3));
    assert_eq!(due_reminder(created, end, at(2032, 1, 14, 9, 0)), Some(1));
    assert_eq!(due_reminder(created, end, at(2032, 1, 15, 0, 29)), Some(1));
    assert_eq!(due_reminder(created, end, end), None);
    // A trial shorter than N days skips the N-day reminder; exactly N days keeps it.
    let short = at(2032, 1, 3, 12, 0);
    assert_eq!(due_reminder(created, short, at(2032, 1, 1, 13, 0)), None);
    assert_eq!(due_reminder(created, short, at(2032, 1, 2, 9, 0)), Some(1));
    assert!(trials::applies(created, created + Duration::days(7), 7));
    assert!(!trials::applies(
        created,
        created + Duration::days(7) - Duration::seconds(1),
        7
    ));
    assert_eq!(trials::days_left(end, at(2032, 1, 14, 23, 0)), 1);
    assert_eq!(trials::days_left(end, at(2032, 1, 15, 0, 0)), 0);
}
