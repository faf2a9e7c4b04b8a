//! `apexctl doctor`: the operations guide's Troubleshooting "common causes" checked in one run,
//! each a named check that is `ok`, `warn` or `fail` with a one-line reason. Postgres reachable
//! and migrated (no migration pending, failed part-way or edited since); ClickHouse reachable
//! and migrated (the guide's "ClickHouse connection failed"); the Stripe key present, its
//! mode, and accepted by Stripe (one cheap authenticated GET through the production client,
//! at `STRIPE_API_BASE`: the guide's "Stripe API key missing or invalid"); every live
//! subscription mapped to Stripe and every metric to a meter active in Stripe under our event
//! name (the guide's "Subscription doesn't have metered price item"); the email provider configured (the guide's
//! "Check Resend API key"); the email queue draining and what it gave up; each cron job's last
//! run (the guide's "Verify cron is running"); dunning retries overdue (the guide's "Check
//! pending retries"). Exit 1 when any check fails; warnings alone exit 0.
//!
//! A check that needs Postgres is reported as a warning "not checked" when Postgres cannot be
//! reached or lacks migrations: the `postgres` check has failed already, and the rest still
//! run. Store and Stripe addresses are printed as `scheme://host:port/path` only: never a
//! URL's credentials or query.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use apex_billing::{dunning, events, subscriptions};
use apex_core::migrate::{self, CLICKHOUSE_MIGRATIONS};
use apex_cron::runs::{self, Run};
use apex_notify::config::ProviderSettings;
use apex_stripe::catalog::{self, MeterHealth, MeterState};
use apex_stripe::client::{ClientSettings, RetryPolicy, StripeClient, StripeError};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;

use crate::config::CtlConfig;

/// How long a store or Stripe may take to answer before the check fails: a doctor that
/// hangs on the outage it should report is no help.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How far back a given-up email still makes the `email.failed` check warn.
const GIVEN_UP_WINDOW_DAYS: i64 = 7;

/// `apexctl doctor`'s options. The job schedules and timeouts it checks the runs against are
/// read from its own environment (`APEX_CRON_SCHEDULE_*`, `APEX_CRON_TIMEOUT_SECS_*`), as
/// `apex-cron` reads them: run it with the cron process's settings.
#[derive(clap::Args)]
pub(crate) struct DoctorArgs {
    /// A cron job is late, and a dunning retry overdue, when the job's last due slot is this
    /// many minutes past without a run (1 to 1440).
    #[arg(long, default_value_t = 15)]
    late_minutes: i64,
    /// The email queue is stuck when an email has been due (created, or its retry's time
    /// come) for longer than this many minutes (1 to 1440; the `email_queue` job runs every
    /// minute).
    #[arg(long, default_value_t = 15)]
    email_stale_minutes: i64,
    /// Print JSON: `status` (the worst of the checks), `now`, and `checks` (each `name`,
    /// `status`: `ok`, `warn` or `fail`, and `reason`).
    #[arg(long)]
    json: bool,
}

/// How a check came out, worst last.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Status {
    Ok,
    Warn,
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One named check's outcome.
#[derive(Debug)]
struct Check {
    name: String,
    status: Status,
    reason: String,
}

/// `n` and `noun`, with an `s` unless `n` is 1.
fn count(n: i64, noun: &str) -> String {
    format!("{n} {noun}{}", if n == 1 { "" } else { "s" })
}

fn check(name: impl Into<String>, status: Status, reason: impl Into<String>) -> Check {
    Check {
        name: name.into(),
        status,
        reason: reason.into(),
    }
}

pub(crate) async fn run(
    args: DoctorArgs,
    ctl: &CtlConfig,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(
        (1..=1440).contains(&args.late_minutes),
        "--late-minutes must be 1 to 1440, not {}",
        args.late_minutes
    );
    anyhow::ensure!(
        (1..=1440).contains(&args.email_stale_minutes),
        "--email-stale-minutes must be 1 to 1440, not {}",
        args.email_stale_minutes
    );
    let late = chrono::Duration::minutes(args.late_minutes);

    // The stores and Stripe are asked at once: each may take up to ANSWER_TIMEOUT to fail.
    let ((postgres_check, pool), clickhouse_check, (api_check, stripe)) =
        tokio::join!(postgres(ctl), clickhouse(ctl), stripe_api(ctl));
    let mut checks = vec![
        postgres_check,
        clickhouse_check,
        stripe_key(ctl),
        api_check,
        email_provider(ctl),
    ];
    match &pool {
        Ok(pool) => {
            checks.push(stripe_mapping(pool, stripe.as_ref()).await);
            checks.extend(email_queue(pool, now, args.email_stale_minutes).await);
            let latest = match runs::latest(pool).await {
                Ok(latest) => {
                    checks.extend(cron_jobs(ctl, &latest, now, late));
                    latest
                }
                Err(e) => {
                    checks.push(check(
                        "cron",
                        Status::Fail,
                        format!("cannot read cron_runs: {e}"),
                    ));
                    BTreeMap::new()
                }
            };
            checks.push(dunning_retries(ctl, pool, &latest, now, late).await);
        }
        Err(why) => {
            for name in [
                "stripe.mapping",
                "email.queue",
                "email.failed",
                "cron",
                "dunning.retries",
            ] {
                checks.push(check(name, Status::Warn, format!("not checked: {why}")));
            }
        }
    }

    let worst = checks.iter().map(|c| c.status).max().unwrap_or(Status::Ok);
    if args.json {
        let list: Vec<serde_json::Value> = checks
            .iter()
            .map(|c| json!({"name": c.name, "status": c.status.as_str(), "reason": c.reason}))
            .collect();
        println!(
            "{}",
            json!({"status": worst.as_str(), "now": now, "checks": list})
        );
    } else {
        let width = checks.iter().map(|c| c.name.len()).max().unwrap_or(0);
        for c in &checks {
            println!("{:<5} {:<width$}  {}", c.status.as_str(), c.name, c.reason);
        }
        let tally = |s: Status| checks.iter().filter(|c| c.status == s).count();
        println!(
            "{} checks: {} ok, {} warn, {} fail",
            checks.len(),
            tally(Status::Ok),
            tally(Status::Warn),
            tally(Status::Fail)
        );
    }
    Ok(if worst == Status::Fail {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// Where `raw` points, safe to print: `scheme://host:port/path`, without the user, password,
/// query or fragment (a query can carry a password too, e.g. `?password=`).
fn location(raw: &str) -> String {
    match url::Url::parse(raw) {
        Ok(url) => format!(
            "{}://{}{}{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port().map(|p| format!(":{p}")).unwrap_or_default(),
            url.path().trim_end_matches('/')
        ),
        Err(_) => "(not a URL)".to_owned(),
    }
}

/// A time as the doctor prints it.
fn time(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d %H:%M UTC").to_string()
}

/// A wait in whole minutes (the unit of `--late-minutes` and `--email-stale-minutes`).
fn minutes(secs: f64) -> String {
    if secs < 60.0 {
        "less than a minute".to_owned()
    } else {
        format!("{} min", (secs / 60.0).floor())
    }
}

const UNREACHABLE: &str = "Postgres cannot be reached";
const UNMIGRATED: &str = "Postgres lacks migrations";
const DIRTY: &str = "a Postgres migration failed part-way";

/// `postgres`: reachable within [`ANSWER_TIMEOUT`], and its schema this binary's
/// ([`migrate::postgres_status`]: nothing pending, failed part-way or edited since it was
/// applied; a migration this binary does not know only warns). Returns the pool when the
/// schema is there for the other checks, else why not.
async fn postgres(ctl: &CtlConfig) -> (Check, Result<PgPool, &'static str>) {
    let name = "postgres";
    let url = location(&ctl.cron.stores.database_url);
    let pool = match tokio::time::timeout(ANSWER_TIMEOUT, ctl.cron.stores.connect_postgres()).await
    {
        Err(_) => {
            let reason = format!("no answer within {ANSWER_TIMEOUT:?} (DATABASE_URL {url})");
            return (check(name, Status::Fail, reason), Err(UNREACHABLE));
        }
        Ok(Err(e)) => {
            let reason = format!("cannot connect (DATABASE_URL {url}): {e}");
            return (check(name, Status::Fail, reason), Err(UNREACHABLE));
        }
        Ok(Ok(pool)) => pool,
    };
    let status = match migrate::postgres_status(&pool).await {
        Ok(status) => status,
        Err(e) => {
            let reason = format!("reachable, but its migrations cannot be read: {e}");
            return (check(name, Status::Fail, reason), Err(UNMIGRATED));
        }
    };
    let versions = |list: &[i64]| {
        list.iter()
            .map(|v| format!("{v:04}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut failures = Vec::new();
    if !status.pending.is_empty() {
        failures.push(format!(
            "{} pending ({}): run `apexctl migrate`",
            count(status.pending.len() as i64, "migration"),
            versions(&status.pending)
        ));
    }
    if !status.dirty.is_empty() {
        failures.push(format!(
            "failed part-way ({}; `success` is false in _sqlx_migrations): repair the schema \
             by hand",
            versions(&status.dirty)
        ));
    }
    if !status.changed.is_empty() {
        failures.push(format!(
            "edited after they were applied ({}): their files differ from what the database \
             ran, and `apexctl migrate` refuses to run",
            versions(&status.changed)
        ));
    }
    if !failures.is_empty() {
        let reason = format!("reachable; migrations {}", failures.join("; "));
        let pool = if !status.pending.is_empty() {
            Err(UNMIGRATED)
        } else if !status.dirty.is_empty() {
            Err(DIRTY)
        } else {
            // An edited migration leaves the tables there: the other checks can still read.
            Ok(pool)
        };
        return (check(name, Status::Fail, reason), pool);
    }
    let outcome = if !status.unknown.is_empty() {
        check(
            name,
            Status::Warn,
            format!(
                "reachable and migrated, with migrations this apexctl does not know ({}): it is \
                 older than the schema",
                versions(&status.unknown)
            ),
        )
    } else {
        check(
            name,
            Status::Ok,
            format!("reachable, all {} migrations applied", status.known.len()),
        )
    };
    (outcome, Ok(pool))
}

/// `clickhouse`: reachable within [`ANSWER_TIMEOUT`] and every migration applied.
async fn clickhouse(ctl: &CtlConfig) -> Check {
    let stores = &ctl.cron.stores;
    let at = format!(
        "CLICKHOUSE_URL {}, database {}",
        location(&stores.clickhouse_url),
        stores.clickhouse_database
    );
    let client = stores.clickhouse();
    let query = client.query("SELECT version FROM schema_migrations");
    let applied = match tokio::time::timeout(ANSWER_TIMEOUT, query.fetch_all::<u32>()).await {
        Err(_) => {
            return check(
                "clickhouse",
                Status::Fail,
                format!("ClickHouse connection failed: no answer within {ANSWER_TIMEOUT:?} ({at})"),
            );
        }
        Ok(Err(e)) => {
            return check(
                "clickhouse",
                Status::Fail,
                format!(
                    "ClickHouse connection failed ({at}): {e} (a missing database or table: run \
                     `apexctl migrate`)"
                ),
            );
        }
        Ok(Ok(applied)) => applied,
    };
    let pending: Vec<&str> = CLICKHOUSE_MIGRATIONS
        .iter()
        .filter(|m| !applied.contains(&m.version))
        .map(|m| m.name)
        .collect();
    if pending.is_empty() {
        check(
            "clickhouse",
            Status::Ok,
            format!(
                "reachable, all {} migrations applied ({at})",
                CLICKHOUSE_MIGRATIONS.len()
            ),
        )
    } else {
        check(
            "clickhouse",
            Status::Fail,
            format!(
                "reachable, migrations pending ({}): run `apexctl migrate`",
                pending.join(", ")
            ),
        )
    }
}

/// The kind of `STRIPE_SECRET_KEY` (`sk_test_`, `rk_live_`, ...), `None` for neither a test
/// nor a live key.
fn key_kind(key: &str) -> Option<&'static str> {
    ["sk_test_", "sk_live_", "rk_test_", "rk_live_"]
        .into_iter()
        .find(|p| key.starts_with(p))
}

/// Whether `api_base` is Stripe's own API (`https://api.stripe.com`): anything else is a
/// stand-in or a proxy, where a live key has no business.
fn is_stripe(api_base: &str) -> bool {
    url::Url::parse(api_base)
        .is_ok_and(|u| u.scheme() == "https" && u.host_str() == Some("api.stripe.com"))
}

/// `stripe.key`: `STRIPE_SECRET_KEY` set, and which mode it is. The key itself is never
/// shown, only its kind.
fn stripe_key(ctl: &CtlConfig) -> Check {
    let config = &ctl.cron.stripe;
    let at = location(&config.api_base);
    let Some(key) = config.secret_key.as_deref() else {
        return check(
            "stripe.key",
            Status::Fail,
            "STRIPE_SECRET_KEY is not set: the usage sync, invoices and dunning cannot run",
        );
    };
    let Some(kind) = key_kind(key) else {
        return check(
            "stripe.key",
            Status::Warn,
            "STRIPE_SECRET_KEY is neither a test nor a live key (sk_test_, sk_live_, rk_test_, \
             rk_live_)",
        );
    };
    let live = kind.ends_with("live_");
    if live && !is_stripe(&config.api_base) {
        check(
            "stripe.key",
            Status::Warn,
            format!("a live key ({kind}...) is set for {at}, not for https://api.stripe.com"),
        )
    } else {
        let mode = if live { "live" } else { "test" };
        check(
            "stripe.key",
            Status::Ok,
            format!("{mode} mode key ({kind}...) for {at}"),
        )
    }
}

/// `stripe.api`: one cheap authenticated GET ([`catalog::check_access`]) through the
/// production client, without retries. Returns the client when Stripe accepted the key, for
/// the mapping check's lookups. A live key is never sent anywhere but Stripe's own API.
async fn stripe_api(ctl: &CtlConfig) -> (Check, Option<StripeClient>) {
    let name = "stripe.api";
    let config = &ctl.cron.stripe;
    let at = location(&config.api_base);
    let Some(key) = config.secret_key.as_deref() else {
        let reason = "not checked: no STRIPE_SECRET_KEY";
        return (check(name, Status::Warn, reason), None);
    };
    if key_kind(key).is_some_and(|k| k.ends_with("live_")) && !is_stripe(&config.api_base) {
        let reason = format!("not checked: a live key is not sent to {at} (not Stripe)");
        return (check(name, Status::Warn, reason), None);
    }
    let settings = ClientSettings {
        timeout: ANSWER_TIMEOUT,
        // One attempt: the doctor reports an outage, it does not ride it out.
        retry: RetryPolicy {
            max_attempts: 1,
            ..RetryPolicy::DEFAULT
        },
        ..ClientSettings::default()
    };
    let client = match apex_stripe::client_from_config(config, settings) {
        Ok(client) => client,
        Err(e) => return (check(name, Status::Fail, e.to_string()), None),
    };
    match catalog::check_access(&client).await {
        Ok(()) => (
            check(name, Status::Ok, format!("Stripe at {at} accepted the key")),
            Some(client),
        ),
        Err(e @ StripeError::Api { status: 401, .. }) => (
            check(name, Status::Fail, format!("Stripe refused the key: {e}")),
            None,
        ),
        Err(e) => (
            check(name, Status::Fail, format!("{e} (STRIPE_API_BASE {at})")),
            None,
        ),
    }
}

/// What is wrong with a meter for the usage sync, `None` when nothing is.
fn meter_problem(meter: &MeterHealth) -> Option<String> {
    let id = meter.stripe_meter_id.as_deref().unwrap_or("-");
    let why = match &meter.state {
        MeterState::Unmapped | MeterState::NotChecked | MeterState::Active => return None,
        MeterState::Missing => "no such meter in Stripe".to_owned(),
        MeterState::NotActive { status } => format!("{status} in Stripe"),
        MeterState::OtherEventName { event_name } => format!(
            "counts {event_name}, not {}",
            catalog::event_name(meter.metric)
        ),
    };
    Some(format!("{} ({id}: {why})", meter.metric))
}

/// `stripe.mapping`: every metric has its billing meter (active in Stripe under its event
/// name, when Stripe answered: [`catalog::meter_health`]), and every live subscription its
/// Stripe subscription and customer: what the usage sync needs to report a customer's usage.
async fn stripe_mapping(pool: &PgPool, stripe: Option<&StripeClient>) -> Check {
    let name = "stripe.mapping";
    let meters = match stripe {
        Some(stripe) => catalog::meter_health(pool, stripe)
            .await
            .map_err(|e| e.to_string()),
        None => catalog::mapped_meters(pool)
            .await
            .map_err(|e| e.to_string()),
    };
    let meters = match meters {
        Ok(meters) => meters,
        Err(e) => return check(name, Status::Fail, format!("cannot read the meters: {e}")),
    };
    let unmapped: Vec<&str> = meters
        .iter()
        .filter(|m| m.state == MeterState::Unmapped)
        .map(|m| m.metric.as_str())
        .collect();
    if !unmapped.is_empty() {
        return check(
            name,
            Status::Fail,
            format!(
                "no Stripe meter for {}: run `apexctl stripe catalog`",
                unmapped.join(", ")
            ),
        );
    }
    let problems: Vec<String> = meters.iter().filter_map(meter_problem).collect();
    if !problems.is_empty() {
        return check(
            name,
            Status::Fail,
            format!(
                "meters the usage sync cannot report to: {}",
                problems.join(", ")
            ),
        );
    }
    let gaps = match subscriptions::stripe_mapping_gaps(pool).await {
        Ok(gaps) => gaps,
        Err(e) => {
            return check(
                name,
                Status::Fail,
                format!("cannot read the subscriptions: {e}"),
            );
        }
    };
    if gaps.unmapped > 0 {
        return check(
            name,
            Status::Fail,
            format!(
                "{} of {} without a Stripe subscription or customer ({}{}): run `apexctl \
                 stripe customers`",
                gaps.unmapped,
                count(gaps.live, "live subscription"),
                gaps.examples.join(", "),
                if gaps.unmapped > 5 { ", ..." } else { "" }
            ),
        );
    }
    check(
        name,
        Status::Ok,
        format!(
            "meters for {} {}; {} mapped",
            meters
                .iter()
                .map(|m| m.metric.as_str())
                .collect::<Vec<_>>()
                .join(", "),
            if stripe.is_some() {
                "(active in Stripe)"
            } else {
                "(not checked in Stripe)"
            },
            if gaps.live == 1 {
                "the live subscription".to_owned()
            } else {
                format!("all {} live subscriptions", gaps.live)
            }
        ),
    )
}

/// `email.provider`: which provider sends, from the settings alone (the provider is not
/// contacted). Unset keeps every email queued; `file` writes files nobody receives.
fn email_provider(ctl: &CtlConfig) -> Check {
    let name = "email.provider";
    match &ctl.cron.email.provider {
        ProviderSettings::Resend(settings) => check(
            name,
            Status::Ok,
            format!(
                "resend at {}, RESEND_API_KEY starts with re_: configured (not contacted)",
                location(&settings.base_url)
            ),
        ),
        ProviderSettings::Smtp(settings) => check(
            name,
            Status::Ok,
            format!(
                "smtp relay {}:{}: configured (not contacted)",
                settings.host, settings.port
            ),
        ),
        ProviderSettings::File { dir } => check(
            name,
            Status::Warn,
            format!(
                "file: emails are written to {} and reach nobody (development only)",
                dir.display()
            ),
        ),
        ProviderSettings::Unset => check(
            name,
            Status::Fail,
            "EMAIL_PROVIDER is not set: every email stays queued (set resend with \
             RESEND_API_KEY=re_..., or smtp)",
        ),
    }
}

/// `email.queue` (an email a run would take has been due longer than `stale_minutes`:
/// [`events::email_queue_lag`]) and `email.failed` (emails given up in the last
/// [`GIVEN_UP_WINDOW_DAYS`] days).
async fn email_queue(pool: &PgPool, now: DateTime<Utc>, stale_minutes: i64) -> Vec<Check> {
    let queue = match events::email_queue_lag(pool, now).await {
        Ok((due, lag_secs)) if due > 0 && lag_secs > (stale_minutes * 60) as f64 => check(
            "email.queue",
            Status::Fail,
            format!(
                "{} due, the longest due for {}: is the email_queue job running? (`apexctl \
                 email pending`, `apexctl email process`)",
                count(due, "email"),
                minutes(lag_secs)
            ),
        ),
        Ok((0, _)) => check("email.queue", Status::Ok, "no email due"),
        Ok((due, lag_secs)) => check(
            "email.queue",
            Status::Ok,
            format!(
                "{} due, the longest due for {}",
                count(due, "email"),
                minutes(lag_secs)
            ),
        ),
        Err(e) => check("email.queue", Status::Fail, format!("cannot read: {e}")),
    };
    let since = now - chrono::Duration::days(GIVEN_UP_WINDOW_DAYS);
    let failed = match events::given_up_emails_count(pool, since).await {
        Ok(0) => check(
            "email.failed",
            Status::Ok,
            format!("no email given up in the last {GIVEN_UP_WINDOW_DAYS} days"),
        ),
        Ok(n) => check(
            "email.failed",
            Status::Warn,
            format!(
                "{} given up in the last {GIVEN_UP_WINDOW_DAYS} days (`apexctl email failed`; \
                 `apexctl email retry --id N` or `--all-failed` once the cause is fixed)",
                count(n, "email")
            ),
        ),
        Err(e) => check("email.failed", Status::Fail, format!("cannot read: {e}")),
    };
    vec![queue, failed]
}

/// `cron.<job>` for every job: its latest recorded slot (`latest`, by job) against the last
/// slot that was due `late` ago. No run of any job at all means the cron process never ran
/// here.
fn cron_jobs(
    ctl: &CtlConfig,
    latest: &BTreeMap<String, Run>,
    now: DateTime<Utc>,
    late: chrono::Duration,
) -> Vec<Check> {
    ctl.cron
        .jobs
        .iter()
        .map(|job| {
            let name = format!("cron.{}", job.name);
            let Some(schedule) = &job.schedule else {
                return check(name, Status::Ok, "off (its schedule is set to off)");
            };
            // The newest slot whose run should be on record by now.
            let due = schedule.last_at_or_before(now - late);
            let Some(last) = latest.get(&job.name) else {
                return match due {
                    None => check(name, Status::Ok, "no slot due yet"),
                    Some(_) if latest.is_empty() => check(
                        name,
                        Status::Fail,
                        "no run of any job is recorded: is apex-cron running?",
                    ),
                    Some(due) => check(
                        name,
                        Status::Warn,
                        format!("no run recorded yet (a slot was due {})", time(due)),
                    ),
                };
            };
            if let Some(due) = due.filter(|due| last.scheduled_for < *due) {
                return check(
                    name,
                    Status::Fail,
                    format!(
                        "late: no run for the {} slot (last slot {}, {}): is apex-cron \
                         running? (`apexctl cron history --job {}`, `apexctl cron run {}`)",
                        time(due),
                        time(last.scheduled_for),
                        last.status,
                        job.name,
                        job.name
                    ),
                );
            }
            if last.status == "running" && now - last.started_at > job.timeout {
                return check(
                    name,
                    Status::Warn,
                    format!(
                        "the {} slot is running since {}, past its timeout ({})",
                        time(last.scheduled_for),
                        time(last.started_at),
                        minutes(job.timeout.num_seconds() as f64)
                    ),
                );
            }
            if last.status == "failed" {
                return check(
                    name,
                    Status::Warn,
                    format!(
                        "the last run ({} slot) failed: {}",
                        time(last.scheduled_for),
                        last.error_message.as_deref().unwrap_or("no message")
                    ),
                );
            }
            check(
                name,
                Status::Ok,
                format!(
                    "last slot {} {}; next {}",
                    time(last.scheduled_for),
                    last.status,
                    schedule.next_after(now).map_or("-".to_owned(), time)
                ),
            )
        })
        .collect()
}

/// `dunning.retries`: the retries the `dunning_retries` job's last slot (at least `late`
/// ago) should have made and did not ([`dunning::overdue_retries_count`]: the guide's
/// pending-retries query, less what no run would make). A retry due since then waits for the
/// next run, which is normal; while a run is at work (its `cron_runs` row `running`, within
/// its timeout) nothing is overdue yet.
async fn dunning_retries(
    ctl: &CtlConfig,
    pool: &PgPool,
    latest: &BTreeMap<String, Run>,
    now: DateTime<Utc>,
    late: chrono::Duration,
) -> Check {
    let name = "dunning.retries";
    let job = ctl.cron.jobs.iter().find(|j| j.name == "dunning_retries");
    let last_slot = job
        .and_then(|j| j.schedule.as_ref())
        .and_then(|s| s.last_at_or_before(now - late));
    let cutoff = last_slot.unwrap_or(now - late);
    let running = job
        .zip(latest.get("dunning_retries"))
        .filter(|(job, run)| run.status == "running" && now - run.started_at <= job.timeout);
    if let Some((_, run)) = running {
        return check(
            name,
            Status::Ok,
            format!(
                "run in progress: the {} slot, started {}",
                time(run.scheduled_for),
                time(run.started_at)
            ),
        );
    }
    let overdue = dunning::overdue_retries_count(pool, cutoff, now).await;
    let due_now = dunning::overdue_retries_count(pool, now, now).await;
    match (overdue, due_now) {
        (Ok((0, _)), Ok((waiting, _))) => check(
            name,
            Status::Ok,
            format!(
                "no retry overdue (due by {}); {waiting} due since, for the next \
                 dunning_retries run",
                time(cutoff)
            ),
        ),
        (Ok((n, oldest)), Ok(_)) => check(
            name,
            Status::Fail,
            format!(
                "{} due by {} not made (the oldest due {}): `apexctl dunning pending`, \
                 `apexctl dunning process`",
                if n == 1 {
                    "1 retry".to_owned()
                } else {
                    format!("{n} retries")
                },
                time(cutoff),
                oldest.map_or("-".to_owned(), time)
            ),
        ),
        (Err(e), _) | (_, Err(e)) => check(name, Status::Fail, format!("cannot read: {e}")),
    }
}
