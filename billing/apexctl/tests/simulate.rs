//! `apexctl simulate` as an operator runs it: a 20-customer, 35-day simulation on its own
//! databases whose timeline holds every kind of event the issue names and that ends
//! reconciled (exit 0), run twice with the same seed (at once, on databases of their own)
//! giving the same timeline; the report opened from disk in headless Chromium, with its
//! charts rendered, a screenshot that is not blank and no console message; and the refusals
//! of a live Stripe key and of a Stripe base URL that is not loopback, which create nothing.
//! The "main" database each run is pointed at is a test database of its own, checked
//! untouched afterwards.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use apex_core::testing::TestStores;
use sqlx::{Connection, PgConnection};

/// The simulation the tests run: 20 customers, 35 days from 2026-03-20 (the month's end and
/// its invoices' dunning fall within it).
fn simulate(stores: &TestStores, seed: &str, extra: &[&str]) -> Command {
    let mut command = common::apexctl_command(stores);
    command.args([
        "simulate",
        "--customers",
        "20",
        "--days",
        "35",
        "--seed",
        seed,
        "--start",
        "2026-03-20",
        "--json",
    ]);
    command.args(extra);
    command
}

fn parse(output: &Output) -> serde_json::Value {
    assert!(
        output.status.success(),
        "exit {:?}: {}\n{}",
        output.status.code(),
        String::from_utf8_lossy(&output.stderr),
        String::from_utf8_lossy(&output.stdout)
    );
    serde_json::from_slice(&output.stdout).expect("one JSON document on stdout")
}

/// The test's own "main" database is as it was made: empty, no table.
async fn assert_untouched(stores: &TestStores) {
    let tables: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'",
    )
    .fetch_one(&stores.pool)
    .await
    .unwrap();
    assert_eq!(
        tables, 0,
        "the simulation wrote to the database it was pointed at"
    );
}

/// Postgres databases whose name starts with `prefix`.
async fn databases_named(stores: &TestStores, prefix: &str) -> Vec<String> {
    let mut admin = PgConnection::connect(&stores.config.database_url)
        .await
        .unwrap();
    let names = sqlx::query_scalar("SELECT datname::text FROM pg_database WHERE datname LIKE $1")
        .bind(format!("{prefix}%"))
        .fetch_all(&mut admin)
        .await
        .unwrap();
    let _ = admin.close().await;
    names
}

/// ClickHouse databases whose name starts with `prefix`.
async fn clickhouse_databases_named(stores: &TestStores, prefix: &str) -> Vec<String> {
    stores
        .config
        .clickhouse_server()
        .query("SELECT name FROM system.databases WHERE startsWith(name, ?)")
        .bind(prefix)
        .fetch_all::<String>()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_simulated_month_shows_every_event_reconciles_and_repeats_for_its_seed() {
    let stores = TestStores::empty().await;
    let report = std::env::temp_dir().join(format!("{}_report.html", stores.name));
    // The two runs of one seed at once, each on databases of its own.
    let first = simulate(&stores, "7", &["--report", report.to_str().unwrap()])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let second = simulate(&stores, "7", &[]).output().unwrap();
    let first = first.wait_with_output().unwrap();
    let (a, b) = (parse(&first), parse(&second));

    // The same timeline, event for event.
    assert_eq!(a["events"], b["events"]);
    assert_eq!(a["counts"], b["counts"]);
    let events = a["events"].as_array().unwrap();
    let kinds: BTreeSet<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for kind in [
        "signup",
        "alert",
        "trial_reminder",
        "invoice",
        "payment_failed",
        "retry",
        "recovered",
        "suspension",
        "reactivation",
        "card_updated",
        "paid_by_hand",
        "email",
    ] {
        assert!(kinds.contains(kind), "no {kind} event in {kinds:?}");
    }
    assert!(!kinds.contains("job_failed"), "{events:#?}");
    // Every event names a simulated customer or none, never an id.
    for e in events {
        let customer = e["customer"].as_str().unwrap();
        assert!(customer == "-" || customer.starts_with("sim-"), "{e}");
        assert!(e["day"].as_i64().unwrap() >= 1 && e["day"].as_i64().unwrap() <= 35);
    }
    // The emails of the events went out.
    let emails: BTreeSet<&str> = events
        .iter()
        .filter(|e| e["kind"] == "email")
        .map(|e| e["detail"].as_str().unwrap().split(' ').next().unwrap())
        .collect();
    for email in [
        "welcome",
        "trial_ending_7d",
        "trial_ending_3d",
        "trial_ending_1d",
        "usage_alert_80",
        "usage_alert_100",
        "payment_failed",
        "payment_retry_1",
        "subscription_suspended",
        "payment_succeeded",
        "monthly_summary",
    ] {
        assert!(emails.contains(email), "no {email} email in {emails:?}");
    }
    // The dunning funnel: two cards recover, two customers are suspended and pay by hand.
    assert_eq!(a["funnel"]["1_failed"], 4);
    assert_eq!(a["funnel"]["3_recovered"], 2);
    assert_eq!(a["funnel"]["4_suspended"], 2);
    assert_eq!(a["funnel"]["5_reactivated"], 2);
    // Reconciled: March and April compared, nothing drifted.
    let reconcile = &a["reconcile"];
    assert_eq!(
        reconcile["periods"],
        serde_json::json!(["2026-03", "2026-04"])
    );
    assert_eq!(reconcile["clean"], true, "{reconcile:#}");
    assert_eq!(reconcile["drift"], 0);
    assert!(reconcile["ok"].as_u64().unwrap() > 0, "{reconcile:#}");
    // Its databases were dropped, and the one it was pointed at never written.
    for run in [&a, &b] {
        let name = run["databases"]["name"].as_str().unwrap();
        assert!(
            databases_named(&stores, name).await.is_empty(),
            "{name} kept"
        );
        assert!(clickhouse_databases_named(&stores, name).await.is_empty());
    }
    assert_untouched(&stores).await;

    report_renders_in_chromium(&report, a["customers"].as_array().unwrap().len());
    let _ = std::fs::remove_file(&report);
}

/// Headless Chromium (Debian's, installed by `scripts/stack.sh up`) with the flags a machine
/// without network needs, and a fresh profile.
fn chromium(profile: &Path) -> Command {
    let path = std::env::var("APEX_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(
        Path::new(&path).exists(),
        "{path} is missing: run scripts/stack.sh up, which installs Debian's chromium"
    );
    let mut command = Command::new(path);
    command.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--enable-logging=stderr",
        "--v=0",
    ]);
    command.arg(format!("--user-data-dir={}", profile.display()));
    command
}

/// Chromium's console messages and load failures on its stderr (its own start-up noise,
/// D-Bus and GPU lines among them, is not the page's).
fn page_complaints(stderr: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(stderr)
        .lines()
        .filter(|l| l.contains("CONSOLE") || l.contains("net::ERR") || l.contains("Uncaught"))
        .map(str::to_owned)
        .collect()
}

/// The report as a person sees it: its DOM holds the three charts with their data, the
/// screenshot is the page drawn (not one colour), and the console said nothing.
fn report_renders_in_chromium(report: &Path, customers: usize) {
    let url = format!("file://{}", report.display());
    let profile = std::env::temp_dir().join(format!(
        "apex_chromium_{}_{}",
        std::process::id(),
        report.file_stem().unwrap().to_string_lossy()
    ));
    // The method sees a console message when a page makes one (a control page).
    let control = profile.with_extension("control.html");
    std::fs::create_dir_all(&profile).unwrap();
    std::fs::write(
        &control,
        "<html><body><script>console.error('control')</script></body></html>",
    )
    .unwrap();
    let seen = chromium(&profile.join("control"))
        .args(["--dump-dom", &format!("file://{}", control.display())])
        .output()
        .expect("chromium runs");
    assert_eq!(
        page_complaints(&seen.stderr).len(),
        1,
        "{}",
        String::from_utf8_lossy(&seen.stderr)
    );
    let _ = std::fs::remove_file(&control);

    let dom = chromium(&profile.join("dom"))
        .args(["--dump-dom", &url])
        .output()
        .expect("chromium runs");
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert_eq!(page_complaints(&dom.stderr), Vec::<String>::new());
    let dom = String::from_utf8_lossy(&dom.stdout);
    for chart in ["id=\"usage\"", "id=\"funnel\"", "id=\"emails\""] {
        assert!(dom.contains(chart), "no {chart} chart");
    }
    assert_eq!(dom.matches("<svg").count(), 3, "three charts");
    // A line per limited customer (Enterprise has no allowance) plus the two thresholds;
    // bars for the funnel's five steps and the 35 days.
    let lines = dom.matches("<polyline").count();
    assert!(lines >= customers / 2 + 2, "{lines} lines");
    assert!(dom.contains("sim-01") && dom.contains("recovered") && dom.contains("03-20"));
    assert!(dom.matches("<rect").count() >= 5 + 35, "bars");

    let png: PathBuf = profile.join("report.png");
    let shot = chromium(&profile.join("shot"))
        .args([
            &format!("--screenshot={}", png.display()),
            "--window-size=1200,1800",
            &url,
        ])
        .output()
        .expect("chromium runs");
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    assert_eq!(page_complaints(&shot.stderr), Vec::<String>::new());
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&png).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).unwrap();
    assert_eq!((frame.width, frame.height), (1200, 1800));
    let channels = frame.color_type.samples();
    let pixels = &pixels[..frame.buffer_size()];
    let colours: BTreeSet<&[u8]> = pixels.chunks(channels).map(|p| &p[..3]).collect();
    let not_white = pixels
        .chunks(channels)
        .filter(|p| p[..3].iter().any(|&c| c < 200))
        .count();
    // Charts in many colours, and a good part of the page drawn on.
    assert!(colours.len() > 50, "{} colours", colours.len());
    assert!(
        not_white > pixels.len() / channels / 50,
        "{not_white} drawn pixels"
    );
    let _ = std::fs::remove_dir_all(&profile);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_live_stripe_key_or_a_remote_stripe_base_is_refused_and_nothing_is_created() {
    let stores = TestStores::empty().await;
    // A seed of its own: the databases a run would make start with apex_sim_<seed>_.
    let prefix = "apex_sim_9090901_";
    for (name, value, says) in [
        (
            "STRIPE_SECRET_KEY",
            "sk_live_0123456789abcdef",
            "live Stripe key",
        ),
        (
            "STRIPE_SECRET_KEY",
            "rk_live_0123456789abcdef",
            "live Stripe key",
        ),
        (
            "STRIPE_API_BASE",
            "https://api.stripe.com",
            "not a loopback address",
        ),
        (
            "STRIPE_API_BASE",
            "http://10.0.0.8:12111",
            "not a loopback address",
        ),
    ] {
        let output = common::apexctl_command(&stores)
            .env(name, value)
            .args([
                "simulate",
                "--customers",
                "2",
                "--days",
                "1",
                "--seed",
                "9090901",
            ])
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1), "{name}={value}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.starts_with("apexctl: simulate refuses"), "{stderr}");
        assert!(stderr.contains(says), "{stderr}");
        assert!(output.stdout.is_empty());
    }
    assert!(databases_named(&stores, prefix).await.is_empty());
    assert!(clickhouse_databases_named(&stores, prefix).await.is_empty());
    assert_untouched(&stores).await;
}
