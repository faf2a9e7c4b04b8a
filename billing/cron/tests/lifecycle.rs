//! The guide's lifecycle automation as the cron process runs it, over a simulated month: the
//! `usage_limits` job every hour, `trial_reminders` at 09:00, `monthly_summaries` on the 1st at
//! 10:00, each run through the job table (`Job::run`) on a clock set to its slot, and the email
//! queue sending to the real SMTP test server (aiosmtpd) every day. A customer signs up for a
//! 14-day trial never mapped to Stripe and its impressions grow past its limit: it gets the
//! three trial reminders on their days, its trial ends, the four usage alerts come once each
//! as usage crosses 80, 90, 100 and 110 %, and March's summary comes on April 1st, each once.

use std::collections::BTreeMap;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_core::env::EnvSource;
use apex_core::testing::TestStores;
use apex_cron::clock::Clock;
use apex_cron::jobs::{Job, JobContext, Retention, jobs_from_env};
use apex_notify::provider::smtp::SmtpProvider;
use apex_notify::queue::{QueueSettings, Worker};
use apex_notify::testing::SmtpStandIn;
use apex_stripe::config::StripeConfig;
use chrono::{DateTime, Duration, Timelike, Utc};

fn context(stores: &TestStores, now: DateTime<Utc>) -> JobContext {
    JobContext {
        pool: stores.pool.clone(),
        stores: stores.config.clone(),
        stripe: StripeConfig::from_env(&EnvSource::from_pairs([])).unwrap(),
        stripe_rate: 50.0,
        // Frozen (to a thousandth) at the slot: the job sees the slot's time.
        clock: Clock::Simulated {
            start: now,
            speed: 0.001,
            epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs_f64(),
        },
        retention: Retention {
            marker_days: 7,
            history_days: 90,
        },
        invoicing: Default::default(),
        email: apex_notify::config::EmailConfig::from_env(&EnvSource::from_pairs([])).unwrap(),
        dunning: Default::default(),
        alert_thresholds: Default::default(),
        runner: "lifecycle-test".into(),
    }
}

fn job<'a>(jobs: &'a [Job], name: &str) -> &'a Job {
    jobs.iter().find(|j| j.name == name).unwrap()
}

async fn run(stores: &TestStores, jobs: &[Job], name: &str, now: DateTime<Utc>) {
    let outcome = job(jobs, name).run(&context(stores, now)).await;
    assert_eq!(
        outcome.error, None,
        "{name} at {now}: {:?}",
        outcome.details
    );
}

async fn drain(stores: &TestStores, smtp: &SmtpStandIn, now: DateTime<Utc>) {
    let provider = SmtpProvider::new(&smtp.settings()).unwrap();
    let settings = QueueSettings::default();
    let clock = move || now;
    Worker {
        pool: &stores.pool,
        provider: &provider,
        settings: &settings,
        name: "lifecycle-test".into(),
        now: &clock,
    }
    .drain(None)
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_month_sends_reminders_alerts_and_the_summary_once_each() {
    let stores = TestStores::migrated().await;
    let smtp = SmtpStandIn::start();
    let jobs = jobs_from_env(&EnvSource::from_pairs([])).unwrap();
    let signup: DateTime<Utc> = "2026-03-10T08:00:00Z".parse().unwrap();
    let customer = create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: "Acme Games".into(),
            email: "owner@acme.example".into(),
            plan_id: "starter".into(),
            trial_days: Some(14),
        },
        signup,
    )
    .await
    .unwrap()
    .customer
    .id;

    // When each email went (the simulated day of the drain that sent it).
    let mut seen: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut sent_before = 0;
    let end: DateTime<Utc> = "2026-04-02T12:00:00Z".parse().unwrap();
    let mut now = signup + Duration::hours(1);
    while now < end {
        // 2,500 impressions an hour in March: 60,000 a day against Starter's 1,000,000.
        if now < "2026-04-01T00:00:00Z".parse::<DateTime<Utc>>().unwrap() {
            sqlx::query(
                "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
                 VALUES ($1, 'impressions', $2, 2500)",
            )
            .bind(&customer)
            .bind(now - Duration::hours(1))
            .execute(&stores.pool)
            .await
            .unwrap();
        }
        run(&stores, &jobs, "usage_limits", now).await;
        if now.hour() == 9 {
            run(&stores, &jobs, "trial_reminders", now).await;
            // A second run of the same slot (a replica, a retry) changes nothing.
            run(&stores, &jobs, "trial_reminders", now).await;
        }
        if now.hour() == 10 && now.format("%d").to_string() == "01" {
            run(&stores, &jobs, "monthly_summaries", now).await;
            run(&stores, &jobs, "monthly_summaries", now).await;
        }
        if now.hour() == 11 {
            drain(&stores, &smtp, now).await;
            let messages = smtp.messages();
            for m in &messages[sent_before..] {
                let kind = m.email_type.clone().unwrap_or_default();
                seen.entry(kind)
                    .or_default()
                    .push(now.format("%m-%d").to_string());
            }
            sent_before = messages.len();
        }
        now += Duration::hours(1);
    }
    let day = |d: &str| vec![d.to_owned()];
    assert_eq!(seen.remove("welcome"), Some(day("03-10")));
    // The trial ends on March 24th at 08:00: reminders 7, 3 and 1 days ahead.
    assert_eq!(seen.remove("trial_ending_7d"), Some(day("03-17")));
    assert_eq!(seen.remove("trial_ending_3d"), Some(day("03-21")));
    assert_eq!(seen.remove("trial_ending_1d"), Some(day("03-23")));
    // 2,500 an hour from March 10th 08:00: 80 % after 320 hours (the 23rd at 16:00, sent at
    // the next day's drain), 90 % the 25th at 08:00, 100 % the 27th at 00:00, 110 % the 28th
    // at 16:00.
    assert_eq!(seen.remove("usage_alert_80"), Some(day("03-24")));
    assert_eq!(seen.remove("usage_alert_90"), Some(day("03-25")));
    assert_eq!(seen.remove("usage_alert_100"), Some(day("03-27")));
    assert_eq!(seen.remove("usage_alert_overage"), Some(day("03-29")));
    assert_eq!(seen.remove("monthly_summary"), Some(day("04-01")));
    assert!(seen.is_empty(), "unexpected emails: {seen:?}");
    // The trial, never mapped to Stripe, ended into an active subscription.
    let status: String = sqlx::query_scalar(
        "SELECT status FROM subscriptions WHERE customer_id = $1 AND status <> 'canceled'",
    )
    .bind(&customer)
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(status, "active");
    // The summary carries March's figures.
    let summary = smtp
        .messages()
        .into_iter()
        .find(|m| m.email_type.as_deref() == Some("monthly_summary"))
        .unwrap();
    assert_eq!(
        summary.subject.as_deref(),
        Some("Your ApexMediation usage for March 2026")
    );
    let text = summary.text.unwrap();
    // 519 hours of March at 2,500 (the last insert, at 23:00, is of 22:00).
    assert!(text.contains("1,297,500"), "{text}");
}
