//! `apexctl simulate`: the real system run over simulated days on databases of its own.
//!
//! - [`world`]: fresh Postgres and ClickHouse databases on the stack's servers, migrated; the
//!   real durable pipeline (write-ahead log and both appliers) writing them; the cron jobs'
//!   context on the simulated clock.
//! - [`standin`]: the Stripe stand-in (`scripts/stripe-standin.py`) on the simulated clock,
//!   and the endpoint its signed webhooks reach (`apex_billing::webhooks::handle`).
//! - [`mix`]: the seeded synthetic customers.
//! - [`timeline`]: what the system did, read back from the database after each step.
//! - [`report`]: the HTML report (`--report`).
//!
//! Time moves hour by hour. Each hour, the customers' usage of that hour goes through the
//! pipeline (as `UsageRecord`s stamped at the hour's start, handed to the sink: the edge's
//! validation refuses records more than 35 days old or 5 minutes ahead of the wall clock,
//! and a suspended customer's records are not sent, as the edge refuses its keys), then every
//! job runs at each of its slots in the hour, as its own schedule (`Job::schedule`, the
//! operator's `APEX_CRON_SCHEDULE_*` included) gives them, on a clock frozen at the slot,
//! through `apex_cron::runner::run_slot` (claimed in `cron_runs` under the job's lock, with
//! its timeout), as `apex-cron` runs it.
//! The every-minute `email_queue` runs only at the first slot after something could have
//! enqueued an email (an idle drain changes nothing, and 50,000 of them would be most of the
//! run). Stripe's side plays its part: its automatic collection an hour after an invoice is
//! finalized, the customers' new cards and payments by hand, each a test control of the
//! stand-in whose webhooks are delivered before the simulation goes on.
//!
//! At the end, what was sent is compared with both stores per customer, metric and day
//! ([`SENT_VS_RAW`], [`SENT_VS_POSTGRES`]), and `apex_stripe::reconcile` compares every
//! month touched as a settled run (`Request::settled`: only the simulated clock excuses a
//! difference). Exit codes: 0 reconciled, 1 drift, 3 a failed job or email, or a run that
//! could not go on.

mod mix;
mod report;
mod standin;
mod timeline;
mod world;

use std::collections::{BTreeMap, HashMap};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, bail};
use apex_billing::customers::{NewCustomer, create_customer};
use apex_billing::pricing::{Period, calendar_month, month_period};
use apex_billing::statement::set_revenue;
use apex_core::model::{Metric, UsageRecord};
use apex_cron::jobs::{Job, JobKind};
use apex_cron::runner::{SlotResult, run_slot};
use apex_stripe::client::ClientSettings;
use apex_stripe::config::StripeConfig;
use apex_stripe::reconcile::{Request, Verdict, reconcile};
use chrono::{DateTime, Datelike, Duration, NaiveDate, Timelike, Utc};
use clap::Args;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};

use crate::config::CtlConfig;
use mix::{Card, SimCustomer};
use standin::{StandIn, WebhookEndpoint};
use timeline::Timeline;
use world::World;

/// `apexctl simulate --customers N --days D [--seed S] [--start YYYY-MM-DD] [--json]
/// [--report FILE.html] [--keep]`.
///
/// Exit codes (reconcile's convention): 0 the run ended reconciled; 1 drift, or bad input; 3
/// the run failed (a job failed, an email was given up, or the simulation itself could not
/// go on).
#[derive(Args)]
#[command(
    after_help = "Exit codes: 0 the run ended reconciled (unsynced differences the simulated \
                  clock explains are not drift); 1 drift (reconcile, or what was sent against \
                  the stores), or bad input; 3 the run failed: a job failed or an email was \
                  given up (counted under \"failures\"), or the simulation could not go on."
)]
pub(crate) struct SimulateArgs {
    /// Synthetic customers (1 to 500; 10 or more play every role of the timeline).
    #[arg(long, default_value_t = 20)]
    pub(crate) customers: u32,
    /// Simulated days (1 to 366).
    #[arg(long, default_value_t = 35)]
    pub(crate) days: u32,
    /// The seed of the customer mix and their usage.
    #[arg(long, default_value_t = 1)]
    pub(crate) seed: u64,
    /// First simulated day, `YYYY-MM-DD` (default: the 20th of the current month, so the
    /// month's invoices and their dunning fall within 35 days).
    #[arg(long)]
    pub(crate) start: Option<String>,
    /// Print JSON: one document with the timeline's events, their counts and the
    /// reconciliation.
    #[arg(long)]
    pub(crate) json: bool,
    /// Write an HTML report here (one self-contained page: usage against limits, the
    /// dunning funnel, emails per day).
    #[arg(long)]
    pub(crate) report: Option<std::path::PathBuf>,
    /// Keep the simulation's databases (their names are printed).
    #[arg(long)]
    pub(crate) keep: bool,
}

/// The exit code of a run with failures (a job failed, an email given up): reconcile's
/// "could not compare", distinct from drift (1).
const EXIT_FAILURES: u8 = 3;

/// What was handed to the pipeline against ClickHouse's raw events, per customer, metric
/// and day (the simulation's own check, next to reconcile's).
pub(crate) const SENT_VS_RAW: &str = "sent/raw_events";
/// What was handed to the pipeline against the Postgres hourly rollups summed per day.
pub(crate) const SENT_VS_POSTGRES: &str = "sent/postgres_hourly";

/// The decline code of the failing cards.
const DECLINE: &str = "insufficient_funds";

/// Refuses a live Stripe key in the environment, or a Stripe base URL that is not loopback:
/// the simulation talks to its own stand-in only, and an operator's shell configured for
/// production must not be one flag away from charging real cards.
fn refuse_live_stripe(ctl: &CtlConfig) -> anyhow::Result<()> {
    refuse_live(
        ctl.cron.stripe.secret_key.as_deref(),
        std::env::var("STRIPE_API_BASE").ok().as_deref(),
    )
}

/// [`refuse_live_stripe`] on the key and the base URL given.
fn refuse_live(key: Option<&str>, base: Option<&str>) -> anyhow::Result<()> {
    if let Some(key) = key
        && (key.starts_with("sk_live_") || key.starts_with("rk_live_"))
    {
        bail!(
            "simulate refuses to run with a live Stripe key in STRIPE_SECRET_KEY: unset it or \
             use a test key (the simulation uses its own Stripe stand-in)"
        );
    }
    if let Some(base) = base {
        let host = url::Url::parse(base)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned));
        let loopback = match host.as_deref() {
            Some("localhost") => true,
            Some(h) => h
                .trim_start_matches('[')
                .trim_end_matches(']')
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback()),
            None => false,
        };
        if !loopback {
            bail!(
                "simulate refuses to run with STRIPE_API_BASE={base}: not a loopback address \
                 (the simulation uses its own Stripe stand-in; unset it)"
            );
        }
    }
    Ok(())
}

/// The first simulated day.
fn start_day(args: &SimulateArgs, ctl: &CtlConfig) -> anyhow::Result<NaiveDate> {
    match &args.start {
        Some(text) => NaiveDate::parse_from_str(text, "%Y-%m-%d")
            .ok()
            .filter(|d| (1971..=9997).contains(&d.year()))
            .with_context(|| format!("--start {text:?} is not a date YYYY-MM-DD (1971 to 9997)")),
        None => {
            let today = ctl.cron.clock.now().date_naive();
            Ok(today.with_day(20).unwrap_or(today))
        }
    }
}

/// Says which databases a simulation that did not finish leaves behind (a panic), unless
/// disarmed once [`World::finish`] ran.
struct LeftBehind(Option<String>);

impl LeftBehind {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for LeftBehind {
    fn drop(&mut self) {
        if let Some(name) = &self.0 {
            eprintln!(
                "apexctl: the simulation stopped without dropping its databases: drop the \
                 Postgres database {name} and the ClickHouse database {name} by hand"
            );
        }
    }
}

/// `apexctl simulate`.
pub(crate) async fn run(args: SimulateArgs, ctl: &CtlConfig) -> anyhow::Result<ExitCode> {
    refuse_live_stripe(ctl)?;
    if !(1..=500).contains(&args.customers) {
        bail!("--customers is from 1 to 500");
    }
    if !(1..=366).contains(&args.days) {
        bail!("--days is from 1 to 366");
    }
    let start = start_day(&args, ctl)?;
    let started = std::time::Instant::now();
    // Ctrl-C and SIGTERM stop the simulation and still drop its databases: listened for
    // before they are created, so one arriving during the migrations waits for them.
    let mut interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
    let mut terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
    let world = match World::create(&ctl.cron.stores, args.seed).await {
        Ok(world) => world,
        Err(e) => {
            eprintln!("apexctl: simulate could not go on: {e:#}");
            return Ok(ExitCode::from(EXIT_FAILURES));
        }
    };
    // A panic cannot drop them (no async in a drop): it says which to drop by hand.
    let guard = LeftBehind(Some(world.name.clone()));
    let result = tokio::select! {
        result = simulate(&world, &args, ctl, start) => result,
        _ = interrupt.recv() => Err(anyhow::anyhow!("interrupted")),
        _ = terminate.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
    };
    let databases = world.name.clone();
    let mail_dir = world.mail_dir.clone();
    let dropped = world.finish(args.keep).await;
    guard.disarm();
    let outcome = match result {
        Ok(outcome) => outcome,
        Err(e) => {
            eprintln!("apexctl: simulate could not go on: {e:#}");
            return Ok(ExitCode::from(EXIT_FAILURES));
        }
    };
    let elapsed = started.elapsed().as_secs_f64();
    let clean = outcome.drifts.is_empty();
    let failures = outcome.failures();
    if let Some(path) = &args.report {
        std::fs::write(path, report::html(&outcome, &args, start)?)
            .with_context(|| format!("cannot write the report to {}", path.display()))?;
    }
    if args.json {
        let document = json!({
            "seed": args.seed,
            "start": start.to_string(),
            "days": args.days,
            "customers": outcome.customers,
            "events": outcome.timeline.events,
            "counts": outcome.timeline.counts(),
            "emails_per_day": outcome.timeline.emails_per_day.iter()
                .map(|(d, n)| (d.to_string(), *n)).collect::<BTreeMap<_, _>>(),
            "funnel": outcome.funnel(),
            "reconcile": {
                "periods": outcome.periods,
                "pairs": outcome.pairs,
                "ok": outcome.verdicts.get("ok").copied().unwrap_or(0),
                "unsynced": outcome.verdicts.get("unsynced").copied().unwrap_or(0),
                "drift": outcome.drifts.len(),
                "clean": clean,
                "drifts": outcome.drifts,
                "checks": outcome.by_check,
                "unsynced_pairs": outcome.unsynced,
            },
            "failures": {
                "count": failures.len(),
                "jobs": outcome.job_failures,
                "emails": outcome.timeline.failed_emails,
            },
            "databases": {
                "name": databases,
                "kept": args.keep,
                "dropped": dropped,
                "mail_dir": mail_dir,
            },
            "elapsed_secs": elapsed,
        });
        println!("{document}");
    } else {
        print!("{}", outcome.timeline.text());
        println!();
        let counts: Vec<String> = outcome
            .timeline
            .counts()
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        println!("events: {}", counts.join(", "));
        println!(
            "reconcile {}: {} pairs, {} ok, {} unsynced, {} drift",
            outcome.periods.join(", "),
            outcome.pairs,
            outcome.verdicts.get("ok").copied().unwrap_or(0),
            outcome.verdicts.get("unsynced").copied().unwrap_or(0),
            outcome.drifts.len()
        );
        for drift in &outcome.drifts {
            println!("  drift: {drift}");
        }
        println!("failures: {}", failures.len());
        for failure in &failures {
            println!("  failed: {failure}");
        }
        if args.keep {
            println!(
                "kept: Postgres database {databases}, ClickHouse database {databases}, emails in {}",
                mail_dir.display()
            );
        }
        eprintln!("simulated {} days in {elapsed:.1} s", args.days);
    }
    if !args.keep && !dropped {
        eprintln!(
            "apexctl: warning: the simulation's databases {databases} were not all dropped \
             (see above): drop them by hand"
        );
    }
    Ok(if !failures.is_empty() {
        ExitCode::from(EXIT_FAILURES)
    } else if clean {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// What a simulation ends with.
pub(crate) struct Outcome {
    pub(crate) customers: Vec<SimCustomer>,
    pub(crate) timeline: Timeline,
    /// Impressions per customer (by name) and simulated day, as Postgres recorded them.
    pub(crate) usage: BTreeMap<String, BTreeMap<NaiveDate, u64>>,
    /// Monthly impression allowance per customer name (`None`: unlimited).
    pub(crate) allowance: BTreeMap<String, Option<u64>>,
    /// The months reconciled, `YYYY-MM`.
    pub(crate) periods: Vec<String>,
    /// Pairs compared, and how many of each verdict.
    pub(crate) pairs: usize,
    pub(crate) verdicts: BTreeMap<&'static str, usize>,
    /// The drifted pairs, as text.
    pub(crate) drifts: Vec<String>,
    /// Per reconcile check, how many pairs of each verdict.
    pub(crate) by_check: BTreeMap<String, BTreeMap<&'static str, usize>>,
    /// The unsynced pairs: `{check, customer, metric, day, left, right, note}`.
    pub(crate) unsynced: Vec<serde_json::Value>,
    /// Jobs that failed: `job at: error`.
    pub(crate) job_failures: Vec<String>,
    /// The usage alerts' thresholds, percent (`APEX_ALERT_THRESHOLDS`), for the report.
    pub(crate) thresholds: Vec<i32>,
}

impl Outcome {
    /// Everything that failed in the run: jobs, then emails the queue gave up.
    pub(crate) fn failures(&self) -> Vec<String> {
        self.job_failures
            .iter()
            .cloned()
            .chain(
                self.timeline
                    .failed_emails
                    .iter()
                    .map(|e| format!("email {e}")),
            )
            .collect()
    }

    /// The dunning funnel, in customers (each counted once per step): a payment failed,
    /// retried, recovered before suspension, suspended, reactivated.
    pub(crate) fn funnel(&self) -> BTreeMap<&'static str, u64> {
        let customers = |kind: &str| {
            self.timeline
                .events
                .iter()
                .filter(|e| e.kind == kind)
                .map(|e| e.customer.as_str())
                .collect::<std::collections::BTreeSet<&str>>()
                .len() as u64
        };
        BTreeMap::from([
            ("1_failed", customers("payment_failed")),
            ("2_retried", customers("retry")),
            ("3_recovered", customers("recovered")),
            ("4_suspended", customers("suspension")),
            ("5_reactivated", customers("reactivation")),
        ])
    }
}

/// Something the simulation's customers or Stripe do at a given time.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Action {
    /// Stripe's automatic collection of an open invoice (customer id, Stripe invoice id).
    Collect(String, String),
    /// The customer puts in a card that works.
    NewCard(String),
    /// The customer pays an invoice by hand on its hosted page.
    PayByHand(String, String),
}

/// A step of an hour: a job's slot or an action, in time order (jobs in the order of the
/// guide's table within one minute, actions after them).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
enum Step {
    Job(usize),
    Act(Action),
}

/// One customer as the simulation holds it.
struct Live {
    sim: SimCustomer,
    id: Arc<str>,
    stripe_id: String,
    allowance: Option<u64>,
}

async fn simulate(
    world: &World,
    args: &SimulateArgs,
    ctl: &CtlConfig,
    start: NaiveDate,
) -> anyhow::Result<Outcome> {
    let t0 = start.and_hms_opt(0, 0, 0).context("start")?.and_utc();
    let end = t0 + Duration::days(i64::from(args.days));
    let pool = &world.pool;

    let standin = StandIn::start().await?;
    standin.set_clock(t0).await?;
    let now_secs = Arc::new(AtomicI64::new(t0.timestamp()));
    let secret = format!("whsec_sim_{}", args.seed);
    let endpoint = WebhookEndpoint::start(
        pool.clone(),
        ctl.cron.dunning.clone(),
        secret.clone(),
        now_secs.clone(),
    )
    .await?;
    standin
        .deliver_webhooks_to(&endpoint.url(), &secret)
        .await?;
    let stripe = StripeConfig {
        secret_key: Some(standin::SIM_KEY.to_owned()),
        api_base: standin.base_url(),
    };
    let client = apex_stripe::client_from_config(
        &stripe,
        ClientSettings {
            requests_per_second: 100.0,
            ..ClientSettings::default()
        },
    )?;
    let email =
        apex_notify::config::EmailConfig::from_env(&apex_core::env::EnvSource::from_pairs([
            ("EMAIL_PROVIDER", "file"),
            ("EMAIL_FILE_DIR", world.mail_dir.to_string_lossy().as_ref()),
        ]))?;
    let runner = format!("simulate:{}", std::process::id());
    let locks = apex_cron::runner::lock_pool(&world.stores.database_url, 1)
        .await
        .context("cannot open the cron runner's lock pool on the simulation's database")?;
    let jobs: Vec<Job> = ctl
        .cron
        .jobs
        .iter()
        .filter(|j| !matches!(j.kind, JobKind::Test { .. }))
        .cloned()
        .collect();

    // Sign-up, mediated revenue for every month of the run, the Stripe mapping, the cards.
    let mut timeline = Timeline::new(start);
    let plans = apex_billing::plans::list_plans(&mut *pool.acquire().await?).await?;
    mix::check_catalogue(
        &plans
            .iter()
            .map(|p| {
                (
                    p.id.clone(),
                    p.revenue_band_min_cents,
                    p.revenue_band_max_cents,
                )
            })
            .collect::<Vec<_>>(),
    )?;
    let months = months_between(t0, end);
    let mut live = Vec::new();
    for sim in mix::customers(args.customers, args.seed) {
        let created = create_customer(
            &mut *pool.acquire().await?,
            &NewCustomer {
                name: sim.name.clone(),
                email: format!("billing@{}.example", sim.name),
                plan_id: sim.plan.to_owned(),
                trial_days: Some(sim.trial_days.unwrap_or(0)),
            },
            t0,
        )
        .await?;
        let id = created.customer.id;
        for month in &months {
            set_revenue(pool, &id, month, sim.revenue_cents).await?;
        }
        let allowance = plans
            .iter()
            .find(|p| p.id == sim.plan)
            .and_then(|p| p.limits.iter().find(|l| l.metric_type == "impressions"))
            .and_then(|l| l.included_quantity)
            .map(|q| q.max(0) as u64);
        timeline.name(&id, &sim.name);
        timeline.push(
            t0,
            "signup",
            &sim.name,
            format!(
                "{}{}, revenue {} a month",
                sim.plan,
                sim.trial_days
                    .map(|d| format!(", {d}-day trial"))
                    .unwrap_or_default(),
                timeline::dollars(sim.revenue_cents as i64)
            ),
        );
        live.push(Live {
            sim,
            id: id.into(),
            stripe_id: String::new(),
            allowance,
        });
    }
    apex_stripe::catalog::sync_catalog(pool, &client).await?;
    let mapped = apex_stripe::catalog::sync_customers(pool, &client, None).await?;
    if let Some(failure) = mapped.failed.first() {
        bail!(
            "cannot map {} to the Stripe stand-in: {}",
            failure.customer_id,
            failure.error
        );
    }
    for customer in &mut live {
        customer.stripe_id =
            apex_billing::customers::stripe_mappings(pool, Some(&customer.id), true)
                .await?
                .into_iter()
                .find_map(|m| m.stripe_customer_id)
                .context("a customer without its Stripe customer after the mapping")?;
        if customer.sim.card != Card::Good {
            standin.set_card(&customer.stripe_id, Some(DECLINE)).await?;
        }
    }
    timeline.end_step(t0);

    let by_id: HashMap<Arc<str>, usize> = live
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.clone(), i))
        .collect();
    let mut actions: BTreeMap<DateTime<Utc>, Vec<Action>> = BTreeMap::new();
    // Stripe invoices whose automatic collection is planned, and the customers' reactions
    // planned (`card:<customer>`, `byhand:<invoice>`): each once.
    let mut collected: std::collections::HashSet<String> = Default::default();
    let mut reacted: std::collections::HashSet<String> = Default::default();
    let mut job_failures = Vec::new();
    // Customers whose failing card was replaced by one that works: their later invoices
    // are charged to the new card.
    let mut replaced_cards: std::collections::HashSet<String> = Default::default();
    // What was handed to the pipeline, per customer id, metric and UTC day.
    let mut sent: BTreeMap<(String, Metric, NaiveDate), u64> = BTreeMap::new();
    // Something may have enqueued an email since the last drain.
    let mut mail_due = true;
    let mut hour = 0u64;
    let mut stripe_clock = Some(t0);
    let mut at = t0;
    while at < end {
        let next = at + Duration::hours(1);
        // The hour's usage, stamped within it; suspended customers' records are refused at
        // the edge, so they send none.
        let statuses: HashMap<String, String> = apex_billing::customers::list_customers(pool)
            .await?
            .into_iter()
            .map(|c| (c.id, c.status))
            .collect();
        let mut records = Vec::new();
        for customer in &live {
            if statuses.get(&*customer.id).map(String::as_str) != Some("active") {
                continue;
            }
            // Enterprise has no allowance: it uses at the pace of Growth's 10,000,000.
            let impressions = mix::hourly_quantity(
                &customer.sim,
                customer.allowance.unwrap_or(10_000_000),
                hour,
            );
            // Stamped at the hour's start: every job slot of the hour, (at, next], sees it.
            let stamp = at.timestamp_millis();
            // API calls and bytes follow the impressions (at 40 % of each allowance's pace:
            // the alerts are the impressions').
            for (metric, quantity) in [
                (Metric::Impressions, impressions),
                (Metric::ApiCalls, (impressions / 25).max(1)),
                (Metric::DataTransfer, impressions * 20_000),
            ] {
                *sent
                    .entry((customer.id.to_string(), metric, at.date_naive()))
                    .or_default() += quantity;
                records.push(UsageRecord {
                    customer_id: customer.id.clone(),
                    metric,
                    quantity,
                    event_id: None,
                    timestamp_ms: stamp,
                    received_ms: stamp,
                    metadata: None,
                });
            }
        }
        world.ingest(records).await?;
        if at.hour() == 0 {
            world.compact().await?;
        }

        // The hour's steps: every job's slots in (at, next] before the end, and the actions due.
        let mut steps: Vec<(DateTime<Utc>, Step)> = Vec::new();
        for (i, job) in jobs.iter().enumerate() {
            let Some(schedule) = &job.schedule else {
                continue;
            };
            let mut slot = at;
            // Within the simulated days: the last hour's slot at `end` is the next day's.
            while let Some(s) = schedule.next_after(slot).filter(|s| *s <= next && *s < end) {
                steps.push((s, Step::Job(i)));
                slot = s;
            }
        }
        let due: Vec<DateTime<Utc>> = actions
            .range(..=next)
            .map(|(t, _)| *t)
            .filter(|t| *t < end)
            .collect();
        for t in due {
            for action in actions.remove(&t).unwrap_or_default() {
                steps.push((t.max(at), Step::Act(action)));
            }
        }
        steps.sort();
        for (slot, step) in steps {
            now_secs.store(slot.timestamp(), Ordering::SeqCst);
            // Stripe's clock is set for the steps that reach Stripe (between them it runs on
            // from the last setting, by the few real seconds the others take).
            let reaches_stripe = match &step {
                Step::Job(i) => matches!(
                    jobs[*i].kind,
                    JobKind::StripeSync
                        | JobKind::InvoiceClose
                        | JobKind::DunningRetries
                        | JobKind::DunningPostponed
                ),
                Step::Act(_) => true,
            };
            if reaches_stripe && stripe_clock != Some(slot) {
                standin.set_clock(slot).await?;
                stripe_clock = Some(slot);
            }
            let mut billing_moved = false;
            match step {
                Step::Job(i) => {
                    let job = &jobs[i];
                    if job.kind == JobKind::EmailQueue && !mail_due {
                        continue;
                    }
                    // Through the runner, as `apex-cron` runs it: the slot claimed in
                    // `cron_runs` under the job's lock, with its timeout.
                    let ctx = world.context(ctl, &stripe, &email, slot);
                    let details = match run_slot(&ctx, &locks, &runner, job, slot).await {
                        SlotResult::Succeeded(details) => details,
                        other => {
                            let error = match other {
                                SlotResult::Failed(e) => e,
                                SlotResult::Unclaimed(e) => format!("not run: {e}"),
                                SlotResult::Skipped => "skipped: its last run still held it".into(),
                                _ => "already run".into(),
                            };
                            job_failures.push(format!(
                                "{} {}: {error}",
                                job.name,
                                slot.format("%F %R")
                            ));
                            timeline.push(
                                slot,
                                "job_failed",
                                "-",
                                format!("{}: {error}", job.name),
                            );
                            serde_json::Value::Null
                        }
                    };
                    match job.kind {
                        JobKind::EmailQueue => {
                            mail_due = false;
                            timeline.collect_emails(pool, slot).await?;
                        }
                        JobKind::UsageLimits => {
                            timeline.collect_alerts(pool, slot).await?;
                        }
                        JobKind::InvoiceClose | JobKind::DunningRetries => billing_moved = true,
                        // The hourly follow-up moves dunning only when it made a retry.
                        JobKind::DunningPostponed => {
                            billing_moved = details["attempts"]
                                .as_array()
                                .is_some_and(|a| !a.is_empty());
                        }
                        _ => {}
                    }
                    if job.kind != JobKind::EmailQueue {
                        // Jobs that enqueue nothing make the drain a no-op; it is cheap.
                        mail_due = true;
                    }
                }
                Step::Act(action) => {
                    act(
                        &standin,
                        &live,
                        &by_id,
                        &action,
                        slot,
                        &mut timeline,
                        &mut replaced_cards,
                    )
                    .await?;
                    billing_moved = true;
                    mail_due = true;
                }
            }
            if billing_moved {
                standin.settle_webhooks().await?;
                let news = timeline.collect_billing(pool, slot).await?;
                plan_reactions(&live, &by_id, &news, slot, &mut actions, &mut reacted);
                // Stripe's automatic collection, an hour after an invoice is finalized.
                for invoice in apex_billing::invoices::list(pool, None, None, 100_000).await? {
                    if invoice.status == "open"
                        && let Some(stripe_invoice) = invoice.stripe_invoice_id
                        && collected.insert(stripe_invoice.clone())
                    {
                        actions
                            .entry(slot + Duration::hours(1))
                            .or_default()
                            .push(Action::Collect(invoice.customer_id, stripe_invoice));
                    }
                }
            }
            timeline.end_step(slot);
        }
        at = next;
        hour += 1;
    }

    // Everything applied to both stores, then the reconciliation of every month touched.
    world.wait_applied(true).await?;
    standin.set_clock(end).await?;
    let mut periods = Vec::new();
    let mut pairs = 0;
    let mut verdicts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut drifts = Vec::new();
    let mut by_check: BTreeMap<String, BTreeMap<&'static str, usize>> =
        apex_stripe::reconcile::CHECKS
            .iter()
            .map(|c| ((*c).to_owned(), BTreeMap::new()))
            .collect();
    let mut unsynced = Vec::new();
    // What was sent against what both stores hold: reconcile compares the stores with each
    // other, so a record lost before either would pass it.
    let names: HashMap<&str, &str> = live.iter().map(|c| (&*c.id, c.sim.name.as_str())).collect();
    let first = start;
    let last = (end - Duration::days(1)).date_naive();
    let raw = apex_pipeline::rollups::raw_daily(&world.stores.clickhouse(), first, last, None)
        .await
        .context("the raw events of the run")?;
    let recorded = apex_pipeline::rollups::postgres_daily(pool, first, last, None)
        .await
        .context("the hourly rollups of the run")?;
    for (check, held) in [
        (SENT_VS_RAW, raw),
        (
            SENT_VS_POSTGRES,
            recorded
                .iter()
                .map(|(k, d)| (k.clone(), d.quantity))
                .collect(),
        ),
    ] {
        let counts = by_check.entry(check.to_owned()).or_default();
        let keys: std::collections::BTreeSet<&(String, Metric, NaiveDate)> =
            sent.keys().chain(held.keys()).collect();
        for key in keys {
            let (left, right) = (
                sent.get(key).copied().unwrap_or(0),
                held.get(key).copied().unwrap_or(0),
            );
            pairs += 1;
            let verdict = if left == right { "ok" } else { "drift" };
            *verdicts.entry(verdict).or_default() += 1;
            *counts.entry(verdict).or_default() += 1;
            if left != right {
                drifts.push(format!(
                    "{} {} {} {check}: {left} vs {right} ({:+})",
                    names.get(key.0.as_str()).unwrap_or(&"-"),
                    key.1.as_str(),
                    key.2,
                    i128::from(right) - i128::from(left)
                ));
            }
        }
    }
    // The usage chart draws what the system recorded (Postgres), not what was sent.
    let mut usage: BTreeMap<String, BTreeMap<NaiveDate, u64>> = BTreeMap::new();
    for ((customer, metric, day), held) in &recorded {
        if *metric == Metric::Impressions
            && let Some(name) = names.get(customer.as_str())
        {
            usage
                .entry((*name).to_owned())
                .or_default()
                .insert(*day, held.quantity);
        }
    }
    for period in &months {
        let report = reconcile(
            pool,
            &world.stores,
            Some(&client),
            &Request {
                period: *period,
                customer: None,
                now: end,
                // The pipeline was waited for, every sync ran and every webhook was
                // delivered: only the simulated clock excuses a difference.
                settled: true,
            },
        )
        .await
        .with_context(|| format!("reconcile {}", period.start.format("%Y-%m")))?;
        periods.push(period.start.format("%Y-%m").to_string());
        pairs += report.pairs.len();
        for pair in &report.pairs {
            let verdict = match pair.verdict {
                Verdict::Ok => "ok",
                Verdict::Drift => "drift",
                Verdict::Unsynced => "unsynced",
            };
            *verdicts.entry(verdict).or_default() += 1;
            *by_check
                .entry(pair.check.clone())
                .or_default()
                .entry(verdict)
                .or_default() += 1;
            if pair.verdict == Verdict::Unsynced {
                unsynced.push(json!({
                    "check": pair.check,
                    "customer": names.get(pair.customer_id.as_str()).unwrap_or(&"-"),
                    "metric": pair.metric_type,
                    "day": pair.day,
                    "line": pair.line,
                    "left": pair.left.to_string(),
                    "right": pair.right.to_string(),
                    "note": pair.note,
                }));
            }
        }
        for drift in report.drifts() {
            drifts.push(format!(
                "{} {} {} {}: {} vs {} ({:+})",
                names.get(drift.customer_id.as_str()).unwrap_or(&"-"),
                drift.metric_type.as_deref().unwrap_or("-"),
                drift.day.as_deref().unwrap_or("-"),
                drift.check,
                drift.left,
                drift.right,
                drift.difference
            ));
        }
    }
    locks.close().await;
    drop(endpoint);
    drop(standin);
    let allowance = live
        .iter()
        .map(|c| (c.sim.name.clone(), c.allowance))
        .collect();
    Ok(Outcome {
        customers: live.into_iter().map(|c| c.sim).collect(),
        timeline,
        usage,
        allowance,
        periods,
        pairs,
        verdicts,
        drifts,
        by_check,
        unsynced,
        job_failures,
        thresholds: ctl.cron.alert_thresholds.percents().to_vec(),
    })
}

/// The calendar months (UTC) that overlap `[from, to)`.
fn months_between(from: DateTime<Utc>, to: DateTime<Utc>) -> Vec<Period> {
    let mut months = Vec::new();
    let mut month = calendar_month(from);
    while month.start < to {
        months.push(month);
        let next = month.end;
        month = match month_period(next.year(), next.month()) {
            Some(m) => m,
            None => break,
        };
    }
    months
}

/// How the customers answer dunning: a card that recovers is replaced nine hours after the
/// first failed retry (the next retry then succeeds); a customer suspended for a card that
/// keeps failing pays the invoice by hand two days after the suspension.
fn plan_reactions(
    live: &[Live],
    by_id: &HashMap<Arc<str>, usize>,
    news: &timeline::DunningNews,
    at: DateTime<Utc>,
    actions: &mut BTreeMap<DateTime<Utc>, Vec<Action>>,
    reacted: &mut std::collections::HashSet<String>,
) {
    let card = |id: &str| by_id.get(id).map(|&i| live[i].sim.card);
    for (customer, _) in &news.retries_failed {
        if card(customer) == Some(Card::FailsThenRecovers)
            && reacted.insert(format!("card:{customer}"))
        {
            actions
                .entry(at + Duration::hours(9))
                .or_default()
                .push(Action::NewCard(customer.clone()));
        }
    }
    for (customer, invoice) in &news.suspended {
        if card(customer) == Some(Card::FailsUntilSuspended)
            && reacted.insert(format!("byhand:{invoice}"))
        {
            actions
                .entry(at + Duration::days(2))
                .or_default()
                .push(Action::PayByHand(customer.clone(), invoice.clone()));
        }
    }
}

/// Carries out `action` in the stand-in and notes it in the timeline.
async fn act(
    standin: &StandIn,
    live: &[Live],
    by_id: &HashMap<Arc<str>, usize>,
    action: &Action,
    at: DateTime<Utc>,
    timeline: &mut Timeline,
    replaced_cards: &mut std::collections::HashSet<String>,
) -> anyhow::Result<()> {
    let customer = |id: &str| -> anyhow::Result<&Live> {
        by_id
            .get(id)
            .map(|&i| &live[i])
            .with_context(|| format!("no simulated customer {id}"))
    };
    match action {
        Action::Collect(id, invoice) => {
            let c = customer(id)?;
            // The failing cards are declined by Stripe's first attempt as by our retries; a
            // card the customer replaced works from then on.
            let works = c.sim.card == Card::Good || replaced_cards.contains(id);
            standin.collect(invoice, works).await?;
        }
        Action::NewCard(id) => {
            let c = customer(id)?;
            standin.set_card(&c.stripe_id, None).await?;
            replaced_cards.insert(id.clone());
            timeline.push_for(at, "card_updated", id, "a new card that works".into());
        }
        Action::PayByHand(id, invoice) => {
            standin.collect(invoice, true).await?;
            timeline.push_for(
                at,
                "paid_by_hand",
                id,
                "paid on the hosted invoice page".into(),
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::refuse_live;

    #[test]
    fn only_test_keys_and_loopback_stripe_bases_are_taken() {
        for base in [
            None,
            Some("http://127.0.0.1:12111"),
            Some("http://[::1]:12111"),
            Some("http://localhost:12111/v1"),
            Some("http://127.0.0.2"),
        ] {
            refuse_live(Some("sk_test_abc"), base).unwrap();
        }
        refuse_live(None, None).unwrap();
        for key in ["sk_live_abc", "rk_live_abc"] {
            let error = refuse_live(Some(key), None).unwrap_err().to_string();
            assert!(error.contains("live Stripe key"), "{error}");
        }
        for base in [
            "https://api.stripe.com",
            "http://10.0.0.8:12111",
            "http://localhost.example.com",
            "not a url",
        ] {
            let error = refuse_live(None, Some(base)).unwrap_err().to_string();
            assert!(error.contains("not a loopback address"), "{base}: {error}");
        }
    }
}
