//! `apexctl alerts check|list` end to end on the test's own Postgres, with the file email
//! provider: the check records the thresholds and its email is sent (rendered) by `apexctl
//! email process`; a second check changes nothing; `list` shows the alerts and their count;
//! `cron run usage_limits` is the same work; bad flags are refused.

mod common;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_core::testing::TestStores;
use chrono::Utc;

fn apexctl(stores: &TestStores, args: &[&str]) -> (i32, String, String) {
    let out = common::apexctl_command(stores).args(args).output().unwrap();
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
    // 930,000 of Starter's 1,000,000 impressions this month: 80 and 90 %.
    sqlx::query(
        "INSERT INTO usage_records (customer_id, metric_type, recorded_at, quantity) \
         VALUES ($1, 'impressions', date_trunc('hour', now()), 930000)",
    )
    .bind(&customer)
    .execute(&stores.pool)
    .await
    .unwrap();

    let (code, out, err) = apexctl(&stores, &["alerts", "check", "--json"]);
    assert_eq!(code, 0, "{err}");
    let summary: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        summary["alerts_recorded"],
        serde_json::json!({"80": 1, "90": 1})
    );
    assert_eq!(summary["emails_enqueued"], 1);
    // Again, and as the cron job: nothing new.
    let (_, out, _) = apexctl(&stores, &["alerts", "check"]);
    assert!(out.contains("0 alerts recorded"), "{out}");
    let (code, _, err) = apexctl(&stores, &["cron", "run", "usage_limits"]);
    assert_eq!(code, 0, "{err}");
    let recorded: i64 = sqlx::query_scalar("SELECT count(*) FROM usage_alerts")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 2);

    // The email renders and goes: one, for 90 %.
    let (code, _, err) = apexctl(&stores, &["email", "process", "--json"]);
    assert_eq!(code, 0, "{err}");
    let dir = std::env::temp_dir().join(format!("{}_mail", stores.name));
    let mails: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .filter(|m| m.contains("X-Apex-Email-Type: usage_alert"))
        .collect();
    assert_eq!(mails.len(), 1, "{mails:?}");
    assert!(
        mails[0].contains("Subject: Usage alert: 90% of your impressions limit"),
        "{}",
        mails[0]
    );

    let (code, out, _) = apexctl(&stores, &["alerts", "list", "--customer", &customer]);
    assert_eq!(code, 0);
    assert!(out.contains("90%") && out.contains("80%"), "{out}");
    let (_, out, _) = apexctl(&stores, &["alerts", "list", "--json"]);
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list["alerts"].as_array().unwrap().len(), 2);
    assert_eq!(list["per_customer"][&customer], 2);

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
