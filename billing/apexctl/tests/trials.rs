//! `apexctl trials upcoming` end to end: the binary on the test's own Postgres at a time set
//! by the simulated clock (`APEX_CLOCK_*`), after the `trial_reminders` job
//! (`apex_billing::trials::send_trial_reminders`) enqueued reminders: the table and `--json`,
//! `--days` as calendar days, a reminder shown `sent` once the email queue (`apexctl email
//! process`, the file provider) sent it, and a bad `--days` refused with a clear message and
//! a non-zero exit. Also: every reminder the job enqueues renders
//! (`apex_notify::templates::render`) with the right wording.

mod common;

use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::trials::send_trial_reminders;
use apex_core::testing::TestStores;
use apex_notify::kinds::EmailKind;
use apex_notify::templates::render;
use chrono::{DateTime, NaiveDate, Utc};
use serde_json::Value;

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

/// `apexctl args` on the test's databases at `now` on the simulated clock.
fn apexctl(stores: &TestStores, now: DateTime<Utc>, args: &[&str]) -> Run {
    let out = common::apexctl_command(stores)
        .args(args)
        .env("APEX_CLOCK_START", now.to_rfc3339())
        .env("APEX_CLOCK_SPEED", "1")
        .output()
        .unwrap();
    Run {
        code: out.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&out.stdout).into_owned(),
        err: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn at(day: &str, h: u32) -> DateTime<Utc> {
    day.parse::<NaiveDate>()
        .unwrap()
        .and_hms_opt(h, 0, 0)
        .unwrap()
        .and_utc()
}

async fn signup(stores: &TestStores, name: &str, days: u32, now: DateTime<Utc>) -> String {
    create_customer(
        &mut stores.pool.acquire().await.unwrap(),
        &NewCustomer {
            name: name.into(),
            email: format!(
                "{}@trials.example",
                name.to_lowercase()
                    .chars()
                    .filter(char::is_ascii_alphanumeric)
                    .collect::<String>()
            ),
            plan_id: "growth".into(),
            trial_days: Some(days),
        },
        now,
    )
    .await
    .unwrap()
    .customer
    .id
}

#[tokio::test]
async fn upcoming_lists_trials_ending_soon_as_a_table_and_as_json() {
    let stores = TestStores::migrated().await;
    let signed = at("2031-03-01", 8);
    let soon = signup(&stores, "Ends Tomorrow", 2, signed).await; // Mar 3, 08:00
    let week = signup(&stores, "Ends In A Week", 8, signed).await; // Mar 9
    let later = signup(&stores, "Ends Later", 30, signed).await; // Mar 31
    let now = at("2031-03-02", 9);
    let summary = send_trial_reminders(&mut stores.pool.acquire().await.unwrap(), now)
        .await
        .unwrap();
    assert_eq!(
        (summary.trial_ending_7d, summary.trial_ending_1d),
        (1, 1),
        "{summary:?}"
    );

    // The table, 7 days ahead by default: soonest first, the later trial not in it.
    let run = apexctl(&stores, now, &["trials", "upcoming"]).ok();
    let lines: Vec<&str> = run.out.lines().collect();
    assert!(lines[0].starts_with("customer"), "{}", run.out);
    assert!(lines[1].starts_with(&soon), "{}", run.out);
    assert!(lines[2].starts_with(&week), "{}", run.out);
    assert!(!run.out.contains(&later), "{}", run.out);
    assert!(lines[1].contains("2031-03-03 08:00"), "{}", run.out);
    assert!(lines[1].contains("1d(queued)"), "{}", run.out);
    assert!(lines[2].contains("7d(queued)"), "{}", run.out);
    assert!(
        lines[2].contains("trial_ending_3d from 2031-03-06"),
        "{}",
        run.out
    );
    assert!(run.out.contains("2 trial(s)"), "{}", run.out);

    // The queue sends them (file provider); the list then says sent.
    apexctl(&stores, now, &["email", "process", "--json"]).ok();
    let run = apexctl(&stores, now, &["trials", "upcoming", "--json"]).ok();
    let json = run.json();
    assert_eq!(json["days"], 7);
    let trials = json["trials"].as_array().unwrap();
    assert_eq!(trials.len(), 2, "{json}");
    let first = &trials[0];
    assert_eq!(first["customer_id"], soon.as_str());
    assert_eq!(first["name"], "Ends Tomorrow");
    assert_eq!(first["email"], "endstomorrow@trials.example");
    assert_eq!(first["plan_id"], "growth");
    assert_eq!(first["days_left"], 1);
    assert_eq!(first["customer_status"], "active");
    assert_eq!(first["stripe_mapped"], false);
    assert_eq!(first["reminders"][0]["email_type"], "trial_ending_1d");
    assert_eq!(first["reminders"][0]["status"], "sent", "{json}");
    assert!(first["next_reminder"].is_null());
    assert_eq!(
        trials[1]["next_reminder"]["email_type"], "trial_ending_3d",
        "{json}"
    );
    let table = apexctl(&stores, now, &["trials", "upcoming"]).ok();
    assert!(
        table.out.lines().nth(1).unwrap().contains(" 1d "),
        "{}",
        table.out
    );

    // --days: calendar days ahead; 0 is today; 29 reaches Mar 31.
    let run = apexctl(&stores, now, &["trials", "upcoming", "--days", "0"]).ok();
    assert!(
        run.out
            .contains("no trial ends within 0 day(s) of 2031-03-02"),
        "{}",
        run.out
    );
    let run = apexctl(
        &stores,
        now,
        &["trials", "upcoming", "--days", "1", "--json"],
    )
    .ok();
    assert_eq!(run.json()["trials"].as_array().unwrap().len(), 1);
    let run = apexctl(
        &stores,
        now,
        &["trials", "upcoming", "--days", "29", "--json"],
    )
    .ok();
    assert_eq!(run.json()["trials"][2]["customer_id"], later.as_str());

    // A negative --days is refused with a clear message.
    for bad in [["--days", "-1"], ["--days", "99999"]] {
        let run = apexctl(&stores, now, &["trials", "upcoming", bad[0], bad[1]]);
        assert_ne!(run.code, 0, "{}", run.out);
        assert!(run.err.contains("--days must be 0 to"), "{}", run.err);
        assert!(run.out.is_empty(), "{}", run.out);
    }
}

#[tokio::test]
async fn every_reminder_the_job_enqueues_renders() {
    let stores = TestStores::migrated().await;
    let customer = signup(&stores, "Render <Me>", 14, at("2031-04-01", 8)).await;
    // Ends Apr 15 08:00: 7 days before, 3 days before, and a late 1-day one on the end's day.
    for now in [
        at("2031-04-08", 9),
        at("2031-04-12", 9),
        at("2031-04-15", 7),
    ] {
        send_trial_reminders(&mut stores.pool.acquire().await.unwrap(), now)
            .await
            .unwrap();
    }
    let events: Vec<(String, Value)> = sqlx::query_as(
        "SELECT event_type, data FROM events WHERE event_type LIKE 'email.trial%' ORDER BY id",
    )
    .fetch_all(&stores.pool)
    .await
    .unwrap();
    assert_eq!(events.len(), 3);
    let expected = [
        (
            EmailKind::TrialEnding { days: 7 },
            "Your trial ends in 7 days",
        ),
        (
            EmailKind::TrialEnding { days: 3 },
            "Your trial ends in 3 days",
        ),
        (EmailKind::TrialEnding { days: 1 }, "Your trial ends today"),
    ];
    for ((event_type, data), (kind, subject)) in events.iter().zip(expected) {
        assert_eq!(EmailKind::from_event_type(event_type), Some(kind));
        assert_eq!(data["customer_id"], customer.as_str());
        let email = render(kind, data).unwrap_or_else(|e| panic!("{event_type}: {e}: {data}"));
        assert_eq!(email.subject, subject);
        assert!(email.text.contains("Growth plan"), "{}", email.text);
        assert!(email.text.contains("April 15, 2031"), "{}", email.text);
        assert!(email.html.contains("Render &lt;Me&gt;"), "{}", email.html);
        assert!(
            email
                .text
                .contains("https://dashboard.apexmediation.com/billing"),
            "{}",
            email.text
        );
    }
}
