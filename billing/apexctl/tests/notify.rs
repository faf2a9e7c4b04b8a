//! `apexctl notify sdk-update` end to end: the binary on the test's own Postgres and
//! ClickHouse, with SDK telemetry written straight into `usage_events` (metadata JSON as the
//! edge stores it, blanks included) and time set by the simulated clock (`APEX_CLOCK_*`):
//! exactly the customers on older versions get the email (`1.9.2` against `1.10.0`, a
//! pre-release, `1.2`, several devices judged by the oldest, garbage and missing versions
//! ignored), platforms match in any case, an Android release leaves iOS customers alone,
//! `--dry-run` enqueues nothing, a second run enqueues nothing new and says so, inactive and
//! opted-out customers are skipped, `--min-version-below` and `--days` narrow, the queued
//! emails render and go out through the queue, and bad flags exit non-zero with a clear
//! message.

mod common;

use std::collections::BTreeMap;

use apex_billing::customers::{self, NewCustomer};
use apex_billing::email_log;
use apex_core::testing::TestStores;
use apex_notify::kinds::EmailKind;
use chrono::{DateTime, Duration, Utc};
use serde_json::{Value, json};

/// What a run of the binary gave: exit code, stdout, stderr.
struct Run {
    code: i32,
    out: String,
    err: String,
}

impl Run {
    fn ok(self) -> Self {
        assert_eq!(self.code, 0, "stdout: {}\nstderr: {}", self.out, self.err);
        self
    }

    fn json(&self) -> Value {
        serde_json::from_str(&self.out)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}{}", self.out, self.err))
    }
}

/// The simulated "now" of every run.
fn t0() -> DateTime<Utc> {
    "2025-11-14T12:00:00Z".parse().unwrap()
}

/// `apexctl args` on the test's databases at [`t0`].
fn apexctl(stores: &TestStores, args: &[&str]) -> Run {
    let out = common::apexctl_command(stores)
        .args(args)
        .env("APEX_CLOCK_START", t0().to_rfc3339())
        .env("APEX_CLOCK_SPEED", "1")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// Signs up an active (no trial) customer named `name`.
async fn signup(stores: &TestStores, name: &str) -> String {
    let new = NewCustomer {
        name: name.into(),
        email: format!("{name}@sdk.example"),
        plan_id: "starter".into(),
        trial_days: Some(0),
    };
    customers::create_customer(&mut stores.pool.acquire().await.unwrap(), &new, t0())
        .await
        .unwrap()
        .customer
        .id
}

/// One usage record of `customer` at `ts` carrying `metadata`, written straight into
/// ClickHouse as the pipeline does.
async fn record(stores: &TestStores, customer: &str, ts: DateTime<Utc>, metadata: &str) {
    stores
        .config
        .clickhouse()
        .query(
            "INSERT INTO usage_events (customer_id, metric_type, quantity, event_id, batch_id, \
                 ts, received_at, metadata, log_id, batch_seq) \
             VALUES (?, 'impressions', 1, '', 0, toDateTime(?), toDateTime(?), ?, 'test', 0)",
        )
        .bind(customer)
        .bind(ts.timestamp())
        .bind(ts.timestamp())
        .bind(metadata)
        .execute()
        .await
        .unwrap();
}

/// An SDK record's metadata as the SDKs send it (compact JSON).
fn sdk(platform: &str, version: &str) -> String {
    json!({"platform": platform, "sdk_version": version, "app_id": "com.example.game"}).to_string()
}

/// The `email.sdk_update` events, by dedup key.
async fn sdk_events(stores: &TestStores) -> BTreeMap<String, Value> {
    let rows: Vec<(String, Value)> = sqlx::query_as(
        "SELECT dedup_key, data FROM events WHERE event_type = 'email.sdk_update' ORDER BY id",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    rows.into_iter().collect()
}

/// `customer_id -> status` of a JSON report.
fn statuses(report: &Value) -> BTreeMap<String, String> {
    report["customers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["customer_id"].as_str().unwrap().to_owned(),
                c["status"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn ids_with(statuses: &BTreeMap<String, String>, status: &str) -> Vec<String> {
    statuses
        .iter()
        .filter(|(_, s)| s.as_str() == status)
        .map(|(id, _)| id.clone())
        .collect()
}

fn sorted(ids: &[&String]) -> Vec<String> {
    let mut ids: Vec<String> = ids.iter().map(|s| (*s).clone()).collect();
    ids.sort();
    ids
}

#[tokio::test]
async fn sdk_update_reaches_exactly_the_customers_on_older_versions_once() {
    let stores = TestStores::migrated().await;
    let now = t0();
    let hour = Duration::hours(1);

    // Due for iOS 1.10.0.
    let old = signup(&stores, "old").await;
    record(&stores, &old, now - hour, &sdk("iOS", "1.9.2")).await;
    let lower = signup(&stores, "lower").await;
    record(&stores, &lower, now - hour * 2, &sdk("ios", "1.2")).await;
    let beta = signup(&stores, "beta").await;
    record(&stores, &beta, now - hour * 3, &sdk("IOS", "1.10.0-beta.1")).await;
    // The guide's example shape: blanks after the colons, as the edge stores it.
    let spaced = signup(&stores, "spaced").await;
    record(
        &stores,
        &spaced,
        now - Duration::days(29),
        r#"{"platform": "iOS", "sdk_version": "1.0.0"}"#,
    )
    .await;
    let devices = signup(&stores, "devices").await;
    record(&stores, &devices, now - hour, &sdk("iOS", "1.10.0")).await;
    record(&stores, &devices, now - hour * 5, &sdk("iOS", "1.8.0")).await;
    record(&stores, &devices, now - hour * 9, &sdk("iOS", "1.8")).await;
    record(&stores, &devices, now - hour * 2, &sdk("iOS", "garbage")).await;

    // Not due: on the release or newer, unknown versions only, another platform, too old
    // telemetry.
    let same = signup(&stores, "same").await;
    record(&stores, &same, now - hour, &sdk("iOS", "1.10.0")).await;
    let newer = signup(&stores, "newer").await;
    record(&stores, &newer, now - hour, &sdk("iOS", "v2.0")).await;
    let mixed = signup(&stores, "mixed").await;
    record(&stores, &mixed, now - hour, &sdk("iOS", "1.11.0")).await;
    record(&stores, &mixed, now - hour, &sdk("iOS", "not-a-version")).await;
    let garbage = signup(&stores, "garbage").await;
    for metadata in [
        sdk("iOS", "garbage"),
        sdk("iOS", ""),
        sdk("iOS", "1.2.3.4"),
        sdk("iOS", "1.2é"),
        r#"{"platform":"iOS"}"#.to_owned(),
        r#"{"platform":"iOS","sdk_version":2}"#.to_owned(),
        r#"{"platform":"iOS","sdk_version":null}"#.to_owned(),
        r#"{"platform":"iOS","sdk_version":"1.2\u00e9"}"#.to_owned(),
        format!(
            r#"{{"platform":"iOS","sdk_version":"{}"}}"#,
            "1".repeat(200)
        ),
    ] {
        record(&stores, &garbage, now - hour, &metadata).await;
    }
    let android = signup(&stores, "android").await;
    record(&stores, &android, now - hour, &sdk("Android", "1.0.0")).await;
    let stale = signup(&stores, "stale").await;
    record(
        &stores,
        &stale,
        now - Duration::days(31),
        &sdk("iOS", "1.0.0"),
    )
    .await;
    let silent = signup(&stores, "silent").await;
    record(&stores, &silent, now - hour, "").await;
    record(&stores, &silent, now - hour, r#"{"app_id":"x"}"#).await;

    // Due but skipped: suspended, opted out, unknown to Postgres.
    let suspended = signup(&stores, "suspended").await;
    record(&stores, &suspended, now - hour, &sdk("iOS", "1.0.0")).await;
    assert!(
        customers::suspend(&stores.pool, &suspended, now)
            .await
            .unwrap()
    );
    let opted_out = signup(&stores, "optedout").await;
    record(&stores, &opted_out, now - hour, &sdk("iOS", "1.0.0")).await;
    email_log::set_opt_out(&stores.pool, &opted_out, "sdk_update", true)
        .await
        .unwrap();
    record(&stores, "cus_ghost", now - hour, &sdk("iOS", "1.0.0")).await;

    let due = sorted(&[&old, &lower, &beta, &spaced, &devices]);

    // A dry run lists them and writes nothing.
    let args = [
        "notify",
        "sdk-update",
        "--platform",
        "ios",
        "--version",
        "1.10.0",
    ];
    let report = apexctl(&stores, &[&args[..], &["--dry-run", "--json"][..]].concat())
        .ok()
        .json();
    let seen = statuses(&report);
    assert_eq!(ids_with(&seen, "would_enqueue"), due, "{report:#}");
    assert_eq!(ids_with(&seen, "inactive"), [suspended.as_str()]);
    assert_eq!(ids_with(&seen, "opted_out"), [opted_out.as_str()]);
    assert_eq!(ids_with(&seen, "unknown_customer"), ["cus_ghost"]);
    assert_eq!(seen.len(), 8, "{report:#}");
    assert_eq!(report["would_enqueue"], 5);
    assert_eq!(report["enqueued"], 0);
    assert_eq!(report["skipped"], 3);
    assert_eq!(report["up_to_date"], 3, "same, newer, mixed: {report:#}");
    assert_eq!(report["unknown_version_customers"], json!([garbage]));
    assert_eq!(report["dry_run"], true);
    assert_eq!(report["days"], 30);
    assert_eq!(report["version"], "1.10.0");
    let customer = |id: &str| {
        report["customers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["customer_id"] == id)
            .unwrap()
            .clone()
    };
    let d = customer(&devices);
    assert_eq!(d["oldest"], "1.8.0");
    assert_eq!(d["versions"], json!(["1.8.0", "1.10.0"]));
    assert_eq!(
        d["oldest_last_seen"]
            .as_str()
            .unwrap()
            .parse::<DateTime<Utc>>()
            .unwrap(),
        now - hour * 5
    );
    assert_eq!(d["unknown_records"], 1);
    assert_eq!(customer(&lower)["oldest"], "1.2.0");
    assert_eq!(customer(&beta)["oldest"], "1.10.0-beta.1");
    assert_eq!(customer(&old)["email"], "old@sdk.example");
    assert!(sdk_events(&stores).await.is_empty());

    // The text form: a table of customer, oldest version, last seen, status.
    let text = apexctl(&stores, &[&args[..], &["--dry-run"][..]].concat())
        .ok()
        .out;
    assert!(
        text.contains("CUSTOMER") && text.contains("OLDEST VERSION") && text.contains("LAST SEEN"),
        "{text}"
    );
    let line = text.lines().find(|l| l.starts_with(old.as_str())).unwrap();
    for part in [
        "1.9.2",
        "2025-11-14 11:00",
        "would_enqueue",
        "old@sdk.example",
    ] {
        assert!(line.contains(part), "{line}");
    }
    assert!(
        text.contains("dry run: 5 would get the sdk_update email")
            && text.contains("nothing enqueued"),
        "{text}"
    );
    assert!(sdk_events(&stores).await.is_empty());

    // The run enqueues one email each, with what the template needs.
    let report = apexctl(&stores, &[&args[..], &["--json"][..]].concat())
        .ok()
        .json();
    assert_eq!(report["enqueued"], 5, "{report:#}");
    assert_eq!(ids_with(&statuses(&report), "enqueued"), due);
    let events = sdk_events(&stores).await;
    let keys: Vec<String> = due
        .iter()
        .map(|id| format!("sdk_update:{id}:ios:1.10.0"))
        .collect();
    let mut found: Vec<String> = events.keys().cloned().collect();
    found.sort();
    let mut expected = keys.clone();
    expected.sort();
    assert_eq!(found, expected);
    let data = &events[&format!("sdk_update:{old}:ios:1.10.0")];
    assert_eq!(
        *data,
        json!({
            "to": "old@sdk.example",
            "customer_id": old,
            "name": "old",
            "sdk": "ios",
            "version": "1.10.0",
            "release_notes_url": "https://docs.apexmediation.com/sdk/ios/releases/1.10.0",
            "current_version": "1.9.2",
        })
    );
    for data in events.values() {
        let rendered = apex_notify::templates::render(EmailKind::SdkUpdate, data).unwrap();
        assert_eq!(
            rendered.subject,
            "ApexMediation iOS SDK 1.10.0 is available"
        );
    }

    // Again (also spelled differently): nothing new, and it says so.
    for version in ["1.10.0", "v1.10"] {
        let run = apexctl(
            &stores,
            &[
                "notify",
                "sdk-update",
                "--platform",
                "iOS",
                "--version",
                version,
            ],
        )
        .ok();
        assert!(
            run.out
                .contains("nothing new to enqueue: 5 already notified of iOS 1.10.0"),
            "{}",
            run.out
        );
    }
    assert_eq!(sdk_events(&stores).await.len(), 5);

    // An Android release tells the Android customer only.
    let report = apexctl(
        &stores,
        &[
            "notify",
            "sdk-update",
            "--platform",
            "ANDROID",
            "--version",
            "1.1.0",
            "--json",
        ],
    )
    .ok()
    .json();
    assert_eq!(statuses(&report).len(), 1, "{report:#}");
    assert_eq!(ids_with(&statuses(&report), "enqueued"), [android.as_str()]);
    let events = sdk_events(&stores).await;
    assert_eq!(events.len(), 6);
    assert_eq!(
        events[&format!("sdk_update:{android}:android:1.1.0")]["sdk"],
        "android"
    );

    // The queue sends them: one email per notified customer.
    let run = apexctl(&stores, &["email", "process", "--json"]).ok();
    assert!(run.json()["sent"].as_u64().unwrap() >= 6, "{}", run.out);
    let mail_dir = std::env::temp_dir().join(format!("{}_mail", stores.name));
    let mut subjects: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for entry in std::fs::read_dir(&mail_dir).unwrap() {
        let message = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        let (Some(to), Some(subject)) = (
            message.lines().find_map(|l| l.strip_prefix("To: ")),
            message.lines().find_map(|l| l.strip_prefix("Subject: ")),
        ) else {
            continue;
        };
        if subject.contains("SDK") {
            subjects
                .entry(subject.to_owned())
                .or_default()
                .push(to.to_owned());
        }
    }
    let mut ios_to: Vec<String> = ["old", "lower", "beta", "spaced", "devices"]
        .iter()
        .map(|n| format!("{n}@sdk.example"))
        .collect();
    ios_to.sort();
    let mut got = subjects
        .remove("ApexMediation iOS SDK 1.10.0 is available")
        .unwrap_or_default();
    got.sort();
    assert_eq!(got, ios_to);
    assert_eq!(
        subjects.remove("ApexMediation Android SDK 1.1.0 is available"),
        Some(vec!["android@sdk.example".to_owned()])
    );
    assert!(subjects.is_empty(), "{subjects:?}");
}

#[tokio::test]
async fn min_version_below_and_days_narrow_who_is_told() {
    let stores = TestStores::migrated().await;
    let now = t0();
    let a = signup(&stores, "a").await;
    record(
        &stores,
        &a,
        now - Duration::hours(1),
        &sdk("Android", "1.4.9"),
    )
    .await;
    let b = signup(&stores, "b").await;
    record(
        &stores,
        &b,
        now - Duration::hours(1),
        &sdk("Android", "1.9.0"),
    )
    .await;
    let c = signup(&stores, "c").await;
    record(
        &stores,
        &c,
        now - Duration::days(10),
        &sdk("Android", "1.0.0"),
    )
    .await;
    let base = [
        "notify",
        "sdk-update",
        "--platform",
        "android",
        "--version",
        "2.0.0",
    ];
    let would = |extra: &[&str]| {
        let report = apexctl(
            &stores,
            &[&base[..], extra, &["--dry-run", "--json"][..]].concat(),
        )
        .ok()
        .json();
        ids_with(&statuses(&report), "would_enqueue")
    };
    assert_eq!(would(&[]), sorted(&[&a, &b, &c]));
    assert_eq!(would(&["--min-version-below", "1.5.0"]), sorted(&[&a, &c]));
    assert_eq!(
        would(&["--min-version-below", "2.0"]),
        sorted(&[&a, &b, &c])
    );
    assert_eq!(would(&["--days", "7"]), sorted(&[&a, &b]));
    assert_eq!(
        would(&["--days", "7", "--min-version-below", "1.5.0"]),
        [a.as_str()]
    );
    assert!(sdk_events(&stores).await.is_empty());

    // Narrowed first, then everyone: once per customer and version whatever the bound.
    let report = apexctl(
        &stores,
        &[
            &base[..],
            &[
                "--min-version-below",
                "1.5.0",
                "--release-notes-url",
                "https://example.com/android/2.0.0",
                "--notes",
                "Faster start-up.\nSmaller binary.",
                "--json",
            ][..],
        ]
        .concat(),
    )
    .ok()
    .json();
    assert_eq!(report["enqueued"], 2, "{report:#}");
    assert_eq!(report["below"], "1.5.0");
    let events = sdk_events(&stores).await;
    let data = &events[&format!("sdk_update:{a}:android:2.0.0")];
    assert_eq!(
        data["release_notes_url"],
        "https://example.com/android/2.0.0"
    );
    assert_eq!(data["notes"], "Faster start-up.\nSmaller binary.");
    assert!(
        apex_notify::templates::render(EmailKind::SdkUpdate, data)
            .unwrap()
            .text
            .contains("Smaller binary.")
    );
    let report = apexctl(&stores, &[&base[..], &["--json"][..]].concat())
        .ok()
        .json();
    let seen = statuses(&report);
    assert_eq!(ids_with(&seen, "enqueued"), [b.as_str()]);
    assert_eq!(ids_with(&seen, "already_notified"), sorted(&[&a, &c]));
    assert_eq!(sdk_events(&stores).await.len(), 3);
}

#[tokio::test]
async fn bad_flags_exit_non_zero_with_a_clear_message() {
    let stores = TestStores::migrated().await;
    let customer = signup(&stores, "x").await;
    record(
        &stores,
        &customer,
        t0() - Duration::hours(1),
        &sdk("iOS", "1.0.0"),
    )
    .await;
    let cases: &[(&[&str], &[&str])] = &[
        (
            &["--platform", "windows", "--version", "1.0.0"],
            &["--platform", "windows", "ios or android"],
        ),
        (&["--platform", "", "--version", "1.0.0"], &["--platform"]),
        (
            &["--platform", "ios", "--version", "garbage"],
            &["--version", "not a version"],
        ),
        (&["--platform", "ios", "--version", ""], &["--version"]),
        (
            &["--platform", "ios", "--version", "1"],
            &["--version", "not a version"],
        ),
        (&["--platform", "ios"], &["--version"]),
        (&["--version", "1.0.0"], &["--platform"]),
        (
            &[
                "--platform",
                "ios",
                "--version",
                "2.0.0",
                "--min-version-below",
                "1.x",
            ],
            &["--min-version-below", "not a version"],
        ),
        (
            &[
                "--platform",
                "ios",
                "--version",
                "2.0.0",
                "--min-version-below",
                "2.1.0",
            ],
            &["--min-version-below 2.1.0 is newer than --version 2.0.0"],
        ),
        (
            &["--platform", "ios", "--version", "2.0.0", "--days", "0"],
            &["--days"],
        ),
        (
            &["--platform", "ios", "--version", "2.0.0", "--days", "366"],
            &["--days"],
        ),
        (
            &[
                "--platform",
                "ios",
                "--version",
                "2.0.0",
                "--release-notes-url",
                "ftp://x/y",
            ],
            &["--release-notes-url", "http"],
        ),
    ];
    for (args, expected) in cases {
        let run = apexctl(&stores, &[&["notify", "sdk-update"][..], *args].concat());
        assert_ne!(run.code, 0, "{args:?}: {}", run.out);
        for part in *expected {
            assert!(run.err.contains(part), "{args:?}: {}", run.err);
        }
    }
    assert!(sdk_events(&stores).await.is_empty());
}
