//! `apexctl alerts check|list` end to end on the test's own Postgres, with the file email
//! provider: the check records the thresholds and its email is sent (rendered) by `apexctl
//! email process`; a second check changes nothing; `list` shows the alerts and their count;
//! `cron run usage_limits` is the same work; bad flags are refused. `apexctl alerts frequency`
//! finds what the guide's alert-spam query finds. And `apexctl usage top`, the guide's "check
//! customer usage".

mod common;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_core::testing::TestStores;
use chrono::Utc;

/// The simulated time of every command: mid-month, so no run straddles a month's end.
const NOW: &str = "2026-05-14T12:00:00Z";

fn apexctl(stores: &TestStores, args: &[&str]) -> (i32, String, String) {
    let out = common::apexctl_command(stores)
        .args(args)
        .env("APEX_CLOCK_START", NOW)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn a_check_records_the_thresholds_and_its_email_goes_out_once() {
    let stores = TestStores::migrated().await;
    let customer = create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: "Acme Games".into(),
            email: "billing@acme.example".into(),
            plan_id: "starter".into(),
            trial_days: Some(0),
        },
        Utc::now(),
    )
    .await
    .unwrap()
    .customer
    .id;
    // 930,000 of Starter's 1,000,000 impressions this month (80 and 90 %), and 85,000 of its
    // 100,000 API calls (80 %), both crossed in the same run.
    for (metric, quantity) in [("impressions", 930_000), ("api_calls", 85_000)] {
        sqlx::query(
            "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
             VALUES ($1, $2, '2026-05-14T09:00:00Z', $3)",
        )
        .bind(&customer)
        .bind(metric)
        .bind(quantity)
        .execute(&stores.pool)
        .await
        .unwrap();
    }

    let (code, out, err) = apexctl(&stores, &["alerts", "check", "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["alerts_recorded"],
        serde_json::json!({"80": 2, "90": 1})
    );
    assert_eq!(summary["emails_enqueued"], 2);
    // Again, and as the cron job: nothing new.
    let (_, out, _) = apexctl(&stores, &["alerts", "check"]);
    assert!(out.contains("0 alerts recorded"), "{out}");
    let (code, _, err) = apexctl(&stores, &["cron", "run", "usage_limits"]);
    assert_eq!(code, 0, "{err}");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_alerts")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 3);

    // The emails render and go, one per metric for its highest threshold, both the same day:
    // each was decided once (the queue's 24-hour rule is for undeduplicated events).
    let (code, _, err) = apexctl(&stores, &["email", "process", "--json"]);
    assert_eq!(code, 0, "{err}");
    let dir = std::env::temp_dir().join(format!("{}_mail", stores.name));
    let mails: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|m| m.contains("X-Apex-Email-Type: usage_alert"))
        .collect();
    assert_eq!(mails.len(), 2, "{mails:?}");
    for subject in [
        "Subject: Usage alert: 90% of your impressions limit",
        "Subject: Usage alert: 80% of your API calls limit",
    ] {
        assert!(
            mails.iter().any(|m| m.contains(subject)),
            "{subject}: {mails:?}"
        );
    }

    let (code, out, _) = apexctl(&stores, &["alerts", "list", "--customer", &customer]);
    assert_eq!(code, 0);
    assert!(out.contains("90%") && out.contains("80%"), "{out}");
    let (_, out, _) = apexctl(&stores, &["alerts", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["alerts"].as_array().unwrap().len(), 3);
    assert_eq!(list["per_customer"][&customer], 3);

    for bad in [
        &["alerts", "list", "--days", "0"][..],
        &["alerts", "list", "--days", "x"],
        &["alerts", "nope"],
    ] {
        let (code, _, err) = apexctl(&stores, bad);
        assert_ne!(code, 0, "{bad:?}");
        assert!(!err.is_empty(), "{bad:?}");
    }
}

#[tokio::test]
async fn usage_top_is_the_guides_check_customer_usage() {
    let stores = TestStores::migrated().await;
    // Three customers' rollups in May; one from March, outside the 30 days before NOW.
    for (customer, impressions, api_calls, at) in [
        ("cus_small", 100, 5, "2026-05-10T10:00:00Z"),
        ("cus_big", 9_000, 40, "2026-05-12T10:00:00Z"),
        ("cus_mid", 500, 7, "2026-05-13T10:00:00Z"),
        ("cus_old", 1_000_000, 1, "2026-03-01T10:00:00Z"),
    ] {
        for (metric, quantity) in [("impressions", impressions), ("api_calls", api_calls)] {
            sqlx::query(
                "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
                 VALUES ($1, $2, $3::timestamptz, $4)",
            )
            .bind(customer)
            .bind(metric)
            .bind(at)
            .bind(quantity)
            .execute(&stores.pool)
            .await
            .unwrap();
        }
    }
    let (code, out, err) = apexctl(&stores, &["usage", "top", "--limit", "2", "--json"]);
    assert_eq!(code, 0, "{err}");
    let top: serde_json::Value = serde_json::from_str(&out).unwrap();
    let rows: Vec<(String, i64, i64)> = top["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["customer_id"].as_str().unwrap().to_owned(),
                r["impressions"].as_i64().unwrap(),
                r["api_calls"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            ("cus_big".to_owned(), 9_000, 40),
            ("cus_mid".to_owned(), 500, 7)
        ]
    );
    let (code, out, _) = apexctl(&stores, &["usage", "top"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("cus_small") && !out.contains("cus_old"),
        "{out}"
    );
    for bad in [
        &["usage", "top", "--days", "0"][..],
        &["usage", "top", "--limit", "0"],
    ] {
        let (code, _, err) = apexctl(&stores, bad);
        assert_eq!(code, 1, "{bad:?}");
        assert!(err.contains("must be"), "{err}");
    }
}

/// `alerts frequency` is the guide's "check alert frequency" ("High usage alert spam"): the
/// customers with more than 10 alerts in the last 7 days of the clock, most first, the same
/// rows as the guide's own query; `--days` and `--more-than` move its constants.
#[tokio::test]
async fn alert_frequency_is_the_guides_alert_spam_query() {
    let stores = TestStores::migrated().await;
    let now = Utc::now();
    let mut ids = Vec::new();
    for name in ["Spammed", "Busy", "Quiet", "Old"] {
        let id = create_customer(
            &mut stores.pool.acquire().await.unwrap(),
            &NewCustomer {
                name: name.into(),
                email: "ops@studio.example".into(),
                plan_id: "starter".into(),
                trial_days: Some(0),
            },
            now,
        )
        .await
        .unwrap()
        .customer
        .id;
        ids.push(id);
    }
    // 12, 11 and 10 alerts in the last days; 12 eight days ago.
    for (customer, count, days_ago) in [
        (&ids[0], 12, 1),
        (&ids[1], 11, 2),
        (&ids[2], 10, 3),
        (&ids[3], 12, 8),
    ] {
        sqlx::query(
            "INSERT INTO usage_alerts (customer_id, metric_type, threshold_percent, \
                 period_start, usage_quantity, limit_quantity, created_at) \
             SELECT $1, 'impressions', t, date_trunc('month', $3), 1, 1, $3 \
             FROM generate_series(1, $2) AS t",
        )
        .bind(customer)
        .bind(count)
        .bind(now - chrono::Duration::days(days_ago))
        .execute(&stores.pool)
        .await
        .unwrap();
    }
    // The wall clock: the guide's query reads NOW().
    let frequency = |args: &[&str]| -> Vec<(String, i64)> {
        let out = common::apexctl_command(&stores)
            .args(["alerts", "frequency", "--json"])
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        doc["customers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| {
                (
                    c["customer_id"].as_str().unwrap().to_owned(),
                    c["alert_count"].as_i64().unwrap(),
                )
            })
            .collect()
    };
    let spam = frequency(&[]);
    assert_eq!(spam, [(ids[0].clone(), 12), (ids[1].clone(), 11)]);
    let path = apex_core::testing::package_dir()
        .join("../core/tests/fixtures/ops-guide-sql/12_alert_frequency.sql");
    let guide_sql = std::fs::read_to_string(path).unwrap();
    let guide: Vec<(String, i64)> = sqlx::query_as(sqlx::AssertSqlSafe(guide_sql))
        .fetch_all(&stores.pool)
        .await
        .unwrap();
    assert_eq!(spam, guide, "the guide's query finds the same customers");

    assert_eq!(frequency(&["--more-than", "10", "--days", "30"]).len(), 3);
    assert_eq!(frequency(&["--more-than", "9"]).len(), 3);
    assert_eq!(frequency(&["--more-than", "12"]), []);

    // The window is the clock's: five and a half days on, the alerts of two days ago have
    // left the 7 days, and those of a day ago are still in.
    let later = (now + chrono::Duration::days(5) + chrono::Duration::hours(12))
        .format("%Y-%m-%dT%H:%M:%SZ")
        .to_string();
    let out = common::apexctl_command(&stores)
        .args(["alerts", "frequency", "--json"])
        .env("APEX_CLOCK_START", &later)
        .output()
        .unwrap();
    assert!(out.status.success());
    let doc: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["more_than"], 10);
    let customers: Vec<&str> = doc["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["customer_id"].as_str().unwrap())
        .collect();
    assert_eq!(customers, [ids[0].as_str()], "{doc}");

    let text = common::apexctl_command(&stores)
        .args(["alerts", "frequency", "--more-than", "12"])
        .output()
        .unwrap();
    assert!(text.status.success());
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("no customer has more than 12 usage alerts in the last 7 days"),
        "{text}"
    );
    let text = common::apexctl_command(&stores)
        .args(["alerts", "frequency"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(text.contains(&ids[0]) && !text.contains(&ids[2]), "{text}");
    // Out of range: our own message, exit 1 (`--x=-1`, or clap would take -1 for a flag).
    for (bad, message) in [
        ("--days=0", "apexctl: --days must be 1 to 3650, not 0"),
        (
            "--more-than=-1",
            "apexctl: --more-than must be 0 or more, not -1",
        ),
    ] {
        let (code, _, err) = apexctl(&stores, &["alerts", "frequency", bad]);
        assert_eq!((code, err.trim()), (1, message), "{bad}");
    }
    // Not a number: clap's own error, exit 2.
    let (code, _, err) = apexctl(&stores, &["alerts", "frequency", "--more-than", "ten"]);
    assert_eq!(code, 2);
    assert!(err.starts_with("error:"), "{err}");
}
