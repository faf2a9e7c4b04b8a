//! `apexctl cron list|run|history` end to end against the test's own Postgres: the jobs with
//! their schedules and next slots on the clock of `APEX_CLOCK_*`, a manual run through the
//! same once-only rules (recorded in `cron_runs`, exit 1 when it fails), the history, and an
//! unknown job refused with the list of the valid ones.

mod common;

use std::process::Output;

use apex_core::testing::TestStores;

fn apexctl(stores: &TestStores, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = common::apexctl_command(stores);
    command.args(args).envs(env.iter().copied());
    command.output().expect("apexctl runs")
}

fn text(out: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

const CLOCK: &[(&str, &str)] = &[
    ("APEX_CLOCK_START", "2026-03-10T01:30:00Z"),
    ("APEX_CLOCK_SPEED", "1"),
];

#[tokio::test]
async fn apexctl_lists_runs_and_reads_the_history_of_the_cron_jobs() {
    let stores = TestStores::migrated().await;
    let out = apexctl(&stores, &["cron", "list", "--json"], CLOCK);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let jobs: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(jobs[0]["job"], "email_queue");
    assert_eq!(jobs[0]["next_slot"], "2026-03-10T01:31:00Z");
    assert_eq!(jobs[1]["job"], "stripe_sync");
    assert_eq!(jobs[1]["schedule"], "0 2 * * *");
    // The next slot on the simulated clock, not the wall clock.
    assert_eq!(jobs[1]["next_slot"], "2026-03-10T02:00:00Z");
    assert_eq!(jobs[2]["job"], "maintenance");
    assert_eq!(jobs[2]["next_slot"], "2026-03-10T04:00:00Z");
    assert_eq!(jobs[3]["job"], "invoice_close");
    assert_eq!(jobs[3]["next_slot"], "2026-03-10T06:00:00Z");
    assert_eq!(jobs[1]["last_status"], serde_json::Value::Null);

    // A manual run succeeds and is recorded; one that fails says why and exits 1.
    let out = apexctl(&stores, &["cron", "run", "maintenance"], CLOCK);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stdout}{stderr}");
    assert!(
        stdout.contains("maintenance at 2026-03-10 01:30:"),
        "{stdout}"
    );
    assert!(stdout.contains("succeeded"), "{stdout}");
    let out = apexctl(&stores, &["cron", "run", "stripe_sync", "--json"], CLOCK);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let ran: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(ran["status"], "failed");
    assert!(
        ran["error"]
            .as_str()
            .is_some_and(|e| e.contains("STRIPE_SECRET_KEY is not set")),
        "{ran}"
    );

    let out = apexctl(&stores, &["cron", "history", "--json"], CLOCK);
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    let history: serde_json::Value = serde_json::from_str(&stdout).unwrap();
    let rows = history.as_array().unwrap();
    assert_eq!(rows.len(), 2, "{history}");
    let statuses: Vec<(&str, &str)> = rows
        .iter()
        .map(|r| {
            (
                r["job_name"].as_str().unwrap(),
                r["status"].as_str().unwrap(),
            )
        })
        .collect();
    assert!(
        statuses.contains(&("maintenance", "succeeded")),
        "{history}"
    );
    assert!(statuses.contains(&("stripe_sync", "failed")), "{history}");
    let out = apexctl(
        &stores,
        &["cron", "history", "--job", "maintenance", "--limit", "5"],
        CLOCK,
    );
    let (stdout, _) = text(&out);
    assert!(out.status.success());
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.contains("maintenance\tsucceeded\tattempts 1"),
        "{stdout}"
    );
    // The list shows the last runs now.
    let (stdout, _) = text(&apexctl(&stores, &["cron", "list"], CLOCK));
    assert!(
        stdout.contains("stripe_sync\t0 2 * * *\tlast 2026-03-10 01:30"),
        "{stdout}"
    );
    assert!(
        stdout.contains("failed\tnext 2026-03-10 02:00:00 UTC"),
        "{stdout}"
    );

    // Unknown jobs, bad limits and bad overrides are refused with a clear line.
    for (args, env, code, says) in [
        (
            vec!["cron", "run", "nope"],
            vec![],
            1,
            "the jobs are email_queue, stripe_sync, maintenance, invoice_close",
        ),
        (
            vec!["cron", "history", "--job", "nope"],
            vec![],
            1,
            "there is no job \"nope\"",
        ),
        (
            vec!["cron", "history", "--limit", "0"],
            vec![],
            1,
            "--limit must be 1 to 10000",
        ),
        (
            vec!["cron", "list"],
            vec![("APEX_CRON_SCHEDULE_STRIPE_SYNC", "2am")],
            2,
            "APEX_CRON_SCHEDULE_STRIPE_SYNC is invalid: job stripe_sync",
        ),
    ] {
        let out = apexctl(&stores, &args, &env);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[tokio::test]
async fn a_manual_run_while_the_job_runs_elsewhere_runs_nothing_and_exits_1() {
    let stores = TestStores::migrated().await;
    // A run that holds the job's lock for a while: a test job working 3 s of wall time.
    let env = [("APEX_CRON_TEST_JOBS", "test_long=0 0 1 1 *@3")];
    let mut first = common::apexctl_command(&stores);
    let first = first
        .args(["cron", "run", "test_long"])
        .envs(env)
        .spawn()
        .unwrap();
    // Let the first take the lock and claim its slot.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    loop {
        let running: i64 =
            sqlx::query_scalar("SELECT count(*) FROM cron_runs WHERE status = 'running'")
                .fetch_one(&stores.pool)
                .await
                .unwrap();
        if running == 1 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the first run never started"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    let out = apexctl(&stores, &["cron", "run", "test_long"], &env);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert!(
        stdout.contains("another run of this job is in progress"),
        "{stdout}"
    );
    assert!(first.wait_with_output().unwrap().status.success());
}
