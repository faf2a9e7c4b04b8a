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
use std::path::Path;
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
    // The report and Chromium's profiles go in a folder removed even when an assertion fails.
    let scratch = tempfile::tempdir().unwrap();
    let report = scratch.path().join("report.html");
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
    assert_eq!(a["failures"]["count"], 0, "{:#}", a["failures"]);
    // Usage past the limits is billed: the first month's invoices carry overage lines.
    assert!(
        events.iter().any(|e| e["kind"] == "invoice"
            && e["detail"]
                .as_str()
                .unwrap()
                .contains("overage impressions")),
        "no invoice bills overage"
    );
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
    // Every check of reconcile compared something, and so did the simulation's own (what was
    // sent against both stores).
    for check in apex_stripe::reconcile::CHECKS
        .iter()
        .chain(&["sent/raw_events", "sent/postgres_hourly"])
    {
        let counts = &reconcile["checks"][check];
        let pairs: u64 = counts
            .as_object()
            .map(|o| o.values().map(|n| n.as_u64().unwrap()).sum())
            .unwrap_or(0);
        assert!(pairs > 0, "no pair of {check}: {:#}", reconcile["checks"]);
        assert!(counts.get("drift").is_none(), "{check}: {counts}");
    }
    // A settled run: every unsynced pair is one the simulated clock explains (the days and
    // the month after its end), none is excused by the database's clock.
    let unsynced = reconcile["unsynced_pairs"].as_array().unwrap();
    assert_eq!(
        unsynced.len() as u64,
        reconcile["unsynced"].as_u64().unwrap()
    );
    for pair in unsynced {
        let note = pair["note"].as_str().unwrap_or("");
        assert!(
            note.starts_with("not yet due")
                || note.contains("day is not complete")
                || note.contains("period is not over"),
            "{pair}"
        );
    }
    // Its databases were dropped, and the one it was pointed at never written.
    for run in [&a, &b] {
        let name = run["databases"]["name"].as_str().unwrap();
        assert!(
            databases_named(&stores, name).await.is_empty(),
            "{name} kept"
        );
        assert!(clickhouse_databases_named(&stores, name).await.is_empty());
        assert_eq!(run["databases"]["dropped"], true);
        assert!(!Path::new(run["databases"]["mail_dir"].as_str().unwrap()).exists());
    }
    assert_untouched(&stores).await;

    report_renders_in_chromium(&report, &Expected::from_run(&a), scratch.path());
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

/// What the report's charts must show, from the run's JSON.
struct Expected {
    /// The limited customers' names (Enterprise has no allowance: no line).
    limited: Vec<String>,
    /// Simulated days (points of each usage line).
    days: usize,
    /// Funnel steps with at least one customer (one bar each).
    funnel_bars: usize,
    /// Days with an email (one bar each).
    email_days: usize,
}

impl Expected {
    fn from_run(run: &serde_json::Value) -> Self {
        let limited = run["customers"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|c| c["plan"] != "enterprise")
            .map(|c| c["name"].as_str().unwrap().to_owned())
            .collect();
        let count = |v: &serde_json::Value| {
            v.as_object()
                .unwrap()
                .values()
                .filter(|n| n.as_u64().unwrap() > 0)
                .count()
        };
        Self {
            limited,
            days: run["days"].as_u64().unwrap() as usize,
            funnel_bars: count(&run["funnel"]),
            email_days: count(&run["emails_per_day"]),
        }
    }
}

/// The fill colours of the funnel's and the emails' bars (report.rs).
const FUNNEL: [u8; 3] = [0xc0, 0x39, 0x2b];
const EMAILS: [u8; 3] = [0x29, 0x80, 0xb9];

/// The part of the DOM inside the chart container `id`.
fn chart_slice<'a>(dom: &'a str, id: &str) -> Result<&'a str, String> {
    let open = dom
        .find(&format!("id=\"{id}\""))
        .ok_or(format!("no {id} chart"))?;
    let rest = &dom[open..];
    Ok(&rest[..rest.find("</div>").ok_or(format!("{id} not closed"))?])
}

/// The opening tags `<name ...>` in `html`, each with its attribute `attr` (lower case).
fn tags<'a>(html: &'a str, name: &str) -> Vec<&'a str> {
    html.match_indices(&format!("<{name} "))
        .map(|(i, _)| {
            let tag = &html[i..];
            &tag[..tag.find('>').unwrap_or(tag.len())]
        })
        .collect()
}

fn attr(tag: &str, name: &str) -> Option<String> {
    let start = tag.find(&format!(" {name}=\""))? + name.len() + 3;
    let rest = &tag[start..];
    Some(rest[..rest.find('"')?].to_lowercase())
}

fn rgb(hex: &str) -> Option<[u8; 3]> {
    let hex = hex.strip_prefix('#')?;
    let byte = |i: usize| u8::from_str_radix(hex.get(i..i + 2)?, 16).ok();
    Some([byte(0)?, byte(2)?, byte(4)?])
}

/// Whether the charts are drawn: in the DOM, each chart's container holds its data (a
/// usage line of a point a day per limited customer, each of its own colour and named; a
/// bar per funnel step and per day with email); in the screenshot, the pixels of exactly
/// those colours are there, each chart's below the one before it (the usage lines and
/// their end dots above the funnel's bars, those above the emails' bars, neither bar chart
/// taller than its 380-pixel chart).
fn charts_drawn(dom: &str, png: &Path, expected: &Expected) -> Result<(), String> {
    let usage = chart_slice(dom, "usage")?;
    let mut series = BTreeSet::new();
    for line in tags(usage, "polyline") {
        let points = attr(line, "points").unwrap_or_default();
        if points.split_whitespace().count() == expected.days {
            let stroke = attr(line, "stroke").ok_or("a line without a colour")?;
            if !series.insert(stroke.clone()) {
                return Err(format!("two usage lines of colour {stroke}"));
            }
        }
    }
    if series.len() != expected.limited.len() {
        return Err(format!(
            "{} usage lines of {} points, {} limited customers",
            series.len(),
            expected.days,
            expected.limited.len()
        ));
    }
    let labels: BTreeSet<&str> = usage
        .split("<text ")
        .skip(1)
        .filter_map(|t| {
            let inner = &t[t.find('>')? + 1..];
            Some(inner[..inner.find("</text>")?].trim())
        })
        .collect();
    for name in &expected.limited {
        if !labels.contains(name.as_str()) {
            return Err(format!("{name} is not named in the usage chart"));
        }
    }
    let bars = |id: &str, colour: [u8; 3]| -> Result<usize, String> {
        Ok(tags(chart_slice(dom, id)?, "rect")
            .iter()
            .filter(|r| attr(r, "fill").and_then(|f| rgb(&f)) == Some(colour))
            .count())
    };
    if bars("funnel", FUNNEL)? != expected.funnel_bars {
        return Err(format!("{} funnel bars", bars("funnel", FUNNEL)?));
    }
    if bars("emails", EMAILS)? != expected.email_days {
        return Err(format!("{} email bars", bars("emails", EMAILS)?));
    }

    let decoder = png::Decoder::new(std::io::BufReader::new(
        std::fs::File::open(png).map_err(|e| e.to_string())?,
    ));
    let mut reader = decoder.read_info().map_err(|e| e.to_string())?;
    let mut pixels = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut pixels).map_err(|e| e.to_string())?;
    let channels = frame.color_type.samples();
    let width = frame.width as usize;
    // Rows holding each colour exactly, and how many pixels.
    let rows_of = |colour: [u8; 3]| -> (usize, usize, usize) {
        let mut n = 0;
        let (mut top, mut bottom) = (usize::MAX, 0);
        for (i, p) in pixels[..frame.buffer_size()].chunks(channels).enumerate() {
            if p[..3] == colour {
                n += 1;
                top = top.min(i / width);
                bottom = bottom.max(i / width);
            }
        }
        (n, top, bottom)
    };
    let (funnel_px, funnel_top, funnel_bottom) = rows_of(FUNNEL);
    let (emails_px, emails_top, emails_bottom) = rows_of(EMAILS);
    if funnel_px < 1_000 || emails_px < 300 {
        return Err(format!(
            "{funnel_px} pixels of the funnel's bars, {emails_px} of the emails'"
        ));
    }
    if funnel_bottom - funnel_top > 380 || emails_bottom - emails_top > 380 {
        return Err("a bar chart's colour outside its chart".into());
    }
    if emails_top <= funnel_bottom {
        return Err("the emails' bars are not below the funnel".into());
    }
    // The usage lines' colours (their end dots hold a few dozen pixels each), above the
    // funnel; a line crossing another's dot may hide one or two.
    let mut drawn = 0;
    for stroke in &series {
        let colour = rgb(stroke).ok_or(format!("colour {stroke}"))?;
        let (n, _, bottom) = rows_of(colour);
        if n >= 20 && bottom < funnel_top {
            drawn += 1;
        }
    }
    if drawn + 2 < series.len() {
        return Err(format!(
            "{drawn} of {} usage lines drawn above the funnel",
            series.len()
        ));
    }
    Ok(())
}

/// Chromium's DOM of `url` and its screenshot into `png`, with no complaint on the console.
fn render(profile: &Path, url: &str, png: &Path) -> String {
    let dom = chromium(&profile.join("dom"))
        .args(["--dump-dom", url])
        .output()
        .expect("chromium runs");
    assert!(
        dom.status.success(),
        "{}",
        String::from_utf8_lossy(&dom.stderr)
    );
    assert_eq!(page_complaints(&dom.stderr), Vec::<String>::new());
    let shot = chromium(&profile.join("shot"))
        .args([
            &format!("--screenshot={}", png.display()),
            "--window-size=1200,1800",
            url,
        ])
        .output()
        .expect("chromium runs");
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    assert_eq!(page_complaints(&shot.stderr), Vec::<String>::new());
    String::from_utf8_lossy(&dom.stdout).into_owned()
}

/// The report as a person sees it: Chromium draws its three charts with their data (the
/// same predicate fails for the page with its charts taken out), and its console says
/// nothing.
fn report_renders_in_chromium(report: &Path, expected: &Expected, scratch: &Path) {
    let profile = scratch.join("chromium");
    // The method sees a console message when a page makes one (a control page).
    let control = scratch.join("control.html");
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

    let png = scratch.join("report.png");
    let dom = render(&profile, &format!("file://{}", report.display()), &png);
    assert_eq!(dom.matches("<svg").count(), 3, "three charts");
    if let Err(e) = charts_drawn(&dom, &png, expected) {
        panic!("the report's charts are not drawn: {e}");
    }

    // The same page without its charts' drawings fails the predicate.
    let html = std::fs::read_to_string(report).unwrap();
    let mut bare = String::new();
    let mut rest = html.as_str();
    while let Some(open) = rest.find("<svg") {
        bare.push_str(&rest[..open]);
        let close = rest[open..].find("</svg>").unwrap() + open + "</svg>".len();
        rest = &rest[close..];
    }
    bare.push_str(rest);
    let bare_page = scratch.join("bare.html");
    std::fs::write(&bare_page, bare).unwrap();
    let bare_png = scratch.join("bare.png");
    let bare_dom = render(
        &profile,
        &format!("file://{}", bare_page.display()),
        &bare_png,
    );
    assert!(
        charts_drawn(&bare_dom, &bare_png, expected).is_err(),
        "the predicate holds for a page without charts"
    );
    // Its screenshot half alone too: the report's DOM with the bare page's pixels.
    assert!(
        charts_drawn(&dom, &bare_png, expected).is_err(),
        "the screenshot check holds for a page without charts"
    );
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
