//! `apexctl email ...` end to end: the binary with the file provider on the test's own
//! Postgres: the guide's test email, preview, pending, failed, retry, process and recent, and
//! every bad request refused with a clear message and a non-zero exit.

mod common;

use apex_core::testing::TestStores;

fn apexctl(stores: &TestStores, args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let out = common::apexctl_command(stores)
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn mail_dir(stores: &TestStores) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("{}_mail", stores.name))
}

#[tokio::test]
async fn apexctl_sends_a_test_email_and_runs_the_guides_manual_operations() {
    let stores = TestStores::migrated().await;
    // The guide's "send test email".
    let (code, out, err) = apexctl(
        &stores,
        &["email", "send-test", "--to", "dev@example.com"],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("sent through file"), "{out}");
    let files: Vec<_> = std::fs::read_dir(mail_dir(&stores))
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.path().extension().is_some_and(|x| x == "eml"))
        .collect();
    assert_eq!(files.len(), 1);
    let message = std::fs::read_to_string(files[0].path()).unwrap();
    assert!(message.contains("To: dev@example.com"), "{message}");
    let (_, out, _) = apexctl(&stores, &["email", "recent", "--json"], &[]);
    let recent: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(recent[0]["recipient"], "dev@example.com");
    assert_eq!(recent[0]["email_type"], "welcome");

    // A poison event: given up, listed as failed, revived by retry, pending again.
    sqlx::query(
        "INSERT INTO events (event_type, data, created_at) \
         VALUES ('email.welcome', '{\"customer_id\": \"cus_x\"}', NOW())",
    )
    .execute(&stores.pool)
    .await
    .unwrap();
    let (code, out, _) = apexctl(&stores, &["email", "process", "--json"], &[]);
    assert_eq!(code, 0);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["given_up"], 1, "{report}");
    let (_, out, _) = apexctl(&stores, &["email", "failed", "--json"], &[]);
    let failed: serde_json::Value = serde_json::from_str(&out).unwrap();
    let id = failed[0]["id"].as_i64().unwrap();
    assert!(
        failed[0]["error_message"]
            .as_str()
            .unwrap()
            .contains("no \"to\"")
    );
    let (code, out, _) = apexctl(&stores, &["email", "retry", "--id", &id.to_string()], &[]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("1 email events revived"), "{out}");
    let (_, out, _) = apexctl(&stores, &["email", "pending"], &[]);
    assert!(out.contains(&format!("{id}\temail.welcome")), "{out}");

    // The cron job does the same work (the revived event has no address: given up again).
    let (code, out, err) = apexctl(&stores, &["cron", "run", "email_queue", "--json"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    let run: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(run["status"], "succeeded", "{run}");
    // Without a provider nothing is sent and the run says why.
    let (code, out, _) = apexctl(
        &stores,
        &["cron", "run", "email_queue", "--json"],
        &[("EMAIL_PROVIDER", "")],
    );
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("EMAIL_PROVIDER is required"), "{out}");

    // Previews.
    let (code, out, _) = apexctl(
        &stores,
        &["email", "preview", "--type", "payment_failed"],
        &[],
    );
    assert_eq!(code, 0);
    assert!(
        out.starts_with("Subject: ⚠️ Payment failed - action required"),
        "{out}"
    );
    let (code, out, _) = apexctl(&stores, &["email", "preview", "--list"], &[]);
    assert_eq!(code, 0);
    assert_eq!(out.lines().count(), 16, "{out}");

    // Bad requests.
    for (args, says) in [
        (
            vec![
                "email",
                "send-test",
                "--to",
                "x@example.com",
                "--type",
                "nope",
            ],
            "unknown email type \"nope\": the types are welcome,",
        ),
        (
            vec!["email", "preview", "--type", "trial_ending_2d"],
            "unknown email type",
        ),
        (
            vec!["email", "retry", "--id", "999999"],
            "not a given-up email event",
        ),
        (
            vec!["email", "recent", "--limit", "0"],
            "--limit must be at least 1",
        ),
    ] {
        let (code, out, err) = apexctl(&stores, &args, &[]);
        assert_ne!(code, 0, "{args:?}: {out}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
    let (code, _, err) = apexctl(
        &stores,
        &["email", "pending"],
        &[("EMAIL_PROVIDER", "sendgrid")],
    );
    assert_eq!(code, 2);
    assert!(err.contains("EMAIL_PROVIDER"), "{err}");
    let (code, _, err) = apexctl(&stores, &["email", "retry"], &[]);
    assert_eq!(code, 2, "clap wants --id or --all-failed: {err}");

    // Opt-outs: only the optional categories, only known customers.
    let customer: String = sqlx::query_scalar(
        "INSERT INTO customers (id, name, email) VALUES ('cus_optout', 'Opt Out', 'o@example.com')          RETURNING id",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    let (code, out, _) = apexctl(
        &stores,
        &[
            "email",
            "opt-out",
            "--customer",
            &customer,
            "--category",
            "monthly_summary",
        ],
        &[],
    );
    assert_eq!(code, 0);
    assert!(out.contains("no longer receives monthly_summary"), "{out}");
    let opted: i64 =
        sqlx::query_scalar("SELECT count(*) FROM email_opt_outs WHERE customer_id = $1")
            .bind(&customer)
            .fetch_one(&stores.pool)
            .await
            .unwrap();
    assert_eq!(opted, 1);
    for (args, says) in [
        (
            vec![
                "email",
                "opt-out",
                "--customer",
                &customer,
                "--category",
                "payment_failed",
            ],
            "cannot be refused",
        ),
        (
            vec![
                "email",
                "opt-out",
                "--customer",
                "cus_nobody",
                "--category",
                "sdk_update",
            ],
            "customer cus_nobody not found",
        ),
    ] {
        let (code, _, err) = apexctl(&stores, &args, &[]);
        assert_eq!(code, 1, "{args:?}");
        assert!(err.contains(says), "{args:?}: {err}");
    }
}

#[tokio::test]
async fn a_crash_after_resend_accepted_sends_once_under_the_same_key() {
    use apex_notify::testing::{ResendStandIn, TEST_RESEND_KEY};
    let stores = TestStores::migrated().await;
    let resend = ResendStandIn::start();
    let id: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_type, data, created_at) \
         VALUES ('email.welcome', '{\"to\": \"crash@example.com\", \"customer_id\": \"cus_crash\", \
                 \"plan_type\": \"starter\", \"api_key_prefix\": \"rsk_AbC12345\"}', NOW()) \
         RETURNING id",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    let base = resend.base_url();
    let provider: Vec<(&str, &str)> = vec![
        ("EMAIL_PROVIDER", "resend"),
        ("RESEND_API_KEY", TEST_RESEND_KEY),
        ("RESEND_BASE_URL", &base),
        ("RESEND_RATE", "100"),
    ];
    // The worker dies right after Resend accepted, before anything is recorded.
    let mut crash = provider.clone();
    crash.push(("APEX_FAILPOINT", "email_after_send:1"));
    let (code, out, err) = apexctl(&stores, &["email", "process"], &crash);
    assert_ne!(code, 0, "the failpoint aborts the process: {out}{err}");
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM email_log")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(logged, 0);
    // Within the lease nobody takes it again; after it (six minutes on), a worker does and
    // sends it under the same key: Resend answers the first email's id and sends nothing new.
    let (_, out, _) = apexctl(&stores, &["email", "process", "--json"], &provider);
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["claimed"], 0, "{report}");
    let later = (chrono::Utc::now() + chrono::Duration::minutes(6)).to_rfc3339();
    let mut after_lease = provider.clone();
    after_lease.push(("APEX_CLOCK_START", &later));
    let (code, out, err) = apexctl(&stores, &["email", "process", "--json"], &after_lease);
    assert_eq!(code, 0, "{out}{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["sent"], 1, "{report}");
    let requests = resend.requests();
    assert_eq!(requests.len(), 2);
    let key = format!("apex-email-{id}");
    assert!(
        requests
            .iter()
            .all(|r| r.idempotency_key.as_deref() == Some(key.as_str())),
        "{requests:?}"
    );
    assert_eq!(resend.emails().len(), 1, "one email per key");
    let logged: Vec<(i64, Option<String>)> =
        sqlx::query_as("SELECT event_id, provider_message_id FROM email_log")
            .fetch_all(&stores.pool)
            .await
            .unwrap();
    assert_eq!(logged.len(), 1);
    assert_eq!(logged[0].1.as_deref(), Some(resend.emails()[0].0.as_str()));
}

/// The email commands that printed only text print JSON too, and the guide's and the issue's
/// names (`test`, `sent`, `drain`, `optout`) are aliases of the commands' names.
#[tokio::test]
async fn opt_out_preview_and_the_aliases_print_json() {
    let stores = TestStores::migrated().await;
    let customer = apex_billing::customers::create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &apex_billing::customers::NewCustomer {
            name: "Json Mail".into(),
            email: "json@mail.example".into(),
            plan_id: "starter".into(),
            trial_days: Some(0),
        },
        chrono::Utc::now(),
    )
    .await
    .unwrap()
    .customer
    .id;
    let json = |args: &[&str]| -> serde_json::Value {
        let (code, out, err) = apexctl(&stores, args, &[]);
        assert_eq!(code, 0, "{args:?}: {err}");
        serde_json::from_str(&out).unwrap_or_else(|e| panic!("{args:?}: {e}: {out}"))
    };
    assert_eq!(
        json(&[
            "email",
            "optout",
            "--customer",
            &customer,
            "--category",
            "sdk_update",
            "--json"
        ]),
        serde_json::json!({"customer_id": customer, "category": "sdk_update", "opted_out": true})
    );
    assert_eq!(
        json(&[
            "email",
            "opt-out",
            "--customer",
            &customer,
            "--category",
            "sdk_update",
            "--undo",
            "--json"
        ])["opted_out"],
        false
    );
    let opted: i64 = sqlx::query_scalar("SELECT count(*) FROM email_opt_outs")
        .fetch_one(&stores.pool)
        .await
        .unwrap();
    assert_eq!(opted, 0);

    let preview = json(&["email", "preview", "--type", "payment_failed", "--json"]);
    assert_eq!(preview["type"], "payment_failed");
    assert_eq!(preview["subject"], "⚠️ Payment failed - action required");
    assert!(
        preview["html"].as_str().unwrap().contains("<html"),
        "{preview}"
    );
    assert!(!preview["text"].as_str().unwrap().is_empty());
    let types = json(&["email", "preview", "--list", "--json"]);
    let (_, listed, _) = apexctl(&stores, &["email", "preview", "--list"], &[]);
    let listed: Vec<&str> = listed.lines().collect();
    assert_eq!(types["types"], serde_json::json!(listed));
    assert!(listed.contains(&"welcome"), "{listed:?}");

    // The aliases run the same commands.
    let sent = json(&["email", "test", "--to", "dev@example.com", "--json"]);
    assert_eq!(sent["sent"], true, "{sent}");
    assert_eq!(
        json(&["email", "sent", "--json"]),
        json(&["email", "recent", "--json"])
    );
    assert_eq!(
        json(&["email", "drain", "--json"])["claimed"],
        1,
        "the welcome email"
    );
}
