//! `apexctl doctor`: the operations guide's Troubleshooting "common causes" checked in one run,
//! each a named check that is `ok`, `warn` or `fail` with a one-line reason. Postgres reachable
//! and migrated; ClickHouse reachable and migrated (the guide's "ClickHouse connection
//! failed"); the Stripe key present, its mode, and accepted by Stripe (one authenticated GET
//! through the production client, at `STRIPE_API_BASE`: the guide's "Stripe API key missing
//! or invalid"); every live subscription and metric mapped to Stripe (the guide's
//! "Subscription doesn't have metered price item"); the email provider configured (the guide's
//! "Check Resend API key"); the email queue draining and what it gave up; each cron job's last
//! run (the guide's "Verify cron is running"); dunning retries overdue (the guide's "Check
//! pending retries"). Exit 1 when any check fails; warnings alone exit 0.
//!
//! A check that needs Postgres is reported as a warning "not checked" when Postgres cannot be
//! reached or lacks migrations: the `postgres` check has failed already, and the rest still
//! run.

use std::collections::{BTreeMap, HashSet};
use std::process::ExitCode;
use std::time::Duration;

use apex_billing::{dunning, events, subscriptions};
use apex_core::migrate::CLICKHOUSE_MIGRATIONS;
use apex_core::model::Metric;
use apex_core::stores::redact_url;
use apex_cron::runs;
use apex_notify::config::ProviderSettings;
use apex_stripe::client::{ClientSettings, RetryPolicy, StripeError};
use chrono::{DateTime, Utc};
use serde_json::json;
use sqlx::PgPool;
use stripe_billing::BillingMeterStatus;
use stripe_billing::billing_meter::ListBillingMeter;

use crate::config::CtlConfig;

/// The Postgres migrations this binary was built with (the ones `apexctl migrate` applies), to
/// tell what a database still lacks. `apex_core::migrate` keeps its migrator private, so the
/// same folder is embedded here (`build.rs` rebuilds when it changes).
static POSTGRES_MIGRATIONS: sqlx::migrate::Migrator = sqlx::migrate!("../../migrations/postgres");

/// How long a store or Stripe may take to answer before the check fails: a doctor that
/// hangs on the outage it should report is no help.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(10);

/// How far back a given-up email still makes the `email.failed` check warn.
const GIVEN_UP_WINDOW_DAYS: i64 = 7;

/// `apexctl doctor`'s options.
#[derive(clap::Args)]
pub(crate) struct DoctorArgs {
    /// A cron job is late, and a dunning retry overdue, when the job's last due slot is this
    /// many minutes past without a run (1 to 1440).
    #[arg(long, default_value_t = 15)]
    late_minutes: i64,
    /// The email queue is stuck when an email has been due for longer than this many minutes
    /// (1 to 1440; the `email_queue` job runs every minute).
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

/// The Postgres migration versions applied to the database of `pool`, ascending (none on a
/// database never migrated). The table is sqlx's migrator's own (`_sqlx_migrations`).
pub(crate) async fn applied_postgres_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success ORDER BY version")
        .fetch_all(pool)
        .await
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
    let mut checks = Vec::new();

    let pool = postgres(ctl, &mut checks).await;
    checks.push(clickhouse(ctl).await);
    checks.push(stripe_key(ctl));
    let active_meters = stripe_api(ctl, &mut checks).await;
    checks.push(email_provider(ctl));
    match &pool {
        Ok(pool) => {
            checks.push(stripe_mapping(pool, active_meters.as_ref()).await);
            checks.extend(email_queue(pool, now, args.email_stale_minutes).await);
            checks.extend(cron_jobs(ctl, pool, now, late).await);
            checks.push(dunning_retries(ctl, pool, now, late).await);
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

/// `postgres`: reachable within [`ANSWER_TIMEOUT`], and every migration of this binary
/// applied. Returns the pool when the schema is there for the other checks, else why not.
async fn postgres(ctl: &CtlConfig, checks: &mut Vec<Check>) -> Result<PgPool, &'static str> {
    let url = redact_url(&ctl.cron.stores.database_url);
    let pool = match tokio::time::timeout(ANSWER_TIMEOUT, ctl.cron.stores.connect_postgres()).await
    {
        Err(_) => {
            checks.push(check(
                "postgres",
                Status::Fail,
                format!("no answer within {ANSWER_TIMEOUT:?} (DATABASE_URL {url})"),
            ));
            return Err(UNREACHABLE);
        }
        Ok(Err(e)) => {
            checks.push(check(
                "postgres",
                Status::Fail,
                format!("cannot connect (DATABASE_URL {url}): {e}"),
            ));
            return Err(UNREACHABLE);
        }
        Ok(Ok(pool)) => pool,
    };
    let applied = match applied_postgres_versions(&pool).await {
        Ok(applied) => applied,
        Err(e) => {
            checks.push(check(
                "postgres",
                Status::Fail,
                format!("reachable, but its migrations cannot be read: {e}"),
            ));
            return Err(UNMIGRATED);
        }
    };
    let known: Vec<i64> = POSTGRES_MIGRATIONS
        .iter()
        .filter(|m| m.migration_type.is_up_migration())
        .map(|m| m.version)
        .collect();
    let pending: Vec<String> = known
        .iter()
        .filter(|v| !applied.contains(v))
        .map(|v| format!("{v:04}"))
        .collect();
    let unknown: Vec<String> = applied
        .iter()
        .filter(|v| !known.contains(v))
        .map(|v| format!("{v:04}"))
        .collect();
    if !pending.is_empty() {
        checks.push(check(
            "postgres",
            Status::Fail,
            format!(
                "reachable, {} migrations pending ({}): run `apexctl migrate`",
                pending.len(),
                pending.join(", ")
            ),
        ));
        return Err(UNMIGRATED);
    }
    checks.push(if !unknown.is_empty() {
        check(
            "postgres",
            Status::Warn,
            format!(
                "reachable and migrated, with migrations this apexctl does not know ({}): it is \
                 older than the schema",
                unknown.join(", ")
            ),
        )
    } else {
        check(
            "postgres",
            Status::Ok,
            format!("reachable, all {} migrations applied", known.len()),
        )
    });
    Ok(pool)
}

const UNREACHABLE: &str = "Postgres cannot be reached";
const UNMIGRATED: &str = "Postgres lacks migrations";

/// `clickhouse`: reachable within [`ANSWER_TIMEOUT`] and every migration applied.
async fn clickhouse(ctl: &CtlConfig) -> Check {
    let stores = &ctl.cron.stores;
    let at = format!(
        "CLICKHOUSE_URL {}, database {}",
        redact_url(&stores.clickhouse_url),
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

/// `stripe.key`: `STRIPE_SECRET_KEY` set, and which mode it is. The key itself is never
/// shown, only its kind (`sk_test_`, `rk_live_`, ...).
fn stripe_key(ctl: &CtlConfig) -> Check {
    let config = &ctl.cron.stripe;
    let Some(key) = config.secret_key.as_deref() else {
        return check(
            "stripe.key",
            Status::Fail,
            "STRIPE_SECRET_KEY is not set: the usage sync, invoices and dunning cannot run",
        );
    };
    let kind = ["sk_test_", "sk_live_", "rk_test_", "rk_live_"]
        .into_iter()
        .find(|p| key.starts_with(p));
    let Some(kind) = kind else {
        return check(
            "stripe.key",
            Status::Warn,
            "STRIPE_SECRET_KEY is neither a test nor a live key (sk_test_, sk_live_, rk_test_, \
             rk_live_)",
        );
    };
    let live = kind.ends_with("live_");
    let mode = if live { "live" } else { "test" };
    // Stripe's own host: anything else is a stand-in or a proxy, where a live key has no
    // business.
    let official = config.api_base.trim_end_matches('/') == "https://api.stripe.com";
    if live && !official {
        check(
            "stripe.key",
            Status::Warn,
            format!(
                "a live key ({kind}...) is sent to {}, not to https://api.stripe.com",
                config.api_base
            ),
        )
    } else {
        check(
            "stripe.key",
            Status::Ok,
            format!("{mode} mode key ({kind}...) for {}", config.api_base),
        )
    }
}

/// `stripe.api`: one authenticated GET (the active billing meters, which the mapping check
/// reads too) through the production client, without retries. Returns the active meters' ids
/// when Stripe answered.
async fn stripe_api(ctl: &CtlConfig, checks: &mut Vec<Check>) -> Option<HashSet<String>> {
    let config = &ctl.cron.stripe;
    if config.secret_key.is_none() {
        checks.push(check(
            "stripe.api",
            Status::Warn,
            "not checked: no STRIPE_SECRET_KEY",
        ));
        return None;
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
        Err(e) => {
            checks.push(check("stripe.api", Status::Fail, e.to_string()));
            return None;
        }
    };
    let list = ListBillingMeter::new()
        .status(BillingMeterStatus::Active)
        .limit(100);
    match client.send::<serde_json::Value>(&list, None).await {
        Ok(answer) => {
            // Only the ids are read, so a field Stripe adds or a stand-in omits changes nothing.
            let ids: HashSet<String> = answer["data"]
                .as_array()
                .map(|meters| {
                    meters
                        .iter()
                        .filter_map(|m| m["id"].as_str().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default();
            checks.push(check(
                "stripe.api",
                Status::Ok,
                format!(
                    "Stripe at {} accepted the key ({} active billing meters)",
                    config.api_base,
                    ids.len()
                ),
            ));
            Some(ids)
        }
        Err(e @ StripeError::Api { status: 401, .. }) => {
            checks.push(check(
                "stripe.api",
                Status::Fail,
                format!("Stripe refused the key: {e}"),
            ));
            None
        }
        Err(e) => {
            checks.push(check(
                "stripe.api",
                Status::Fail,
                format!("{e} (STRIPE_API_BASE {})", config.api_base),
            ));
            None
        }
    }
}

/// `stripe.mapping`: every metric has its billing meter (active in Stripe, when Stripe
/// answered), and every live subscription its Stripe subscription and customer: what the
/// usage sync needs to report a customer's usage.
async fn stripe_mapping(pool: &PgPool, active: Option<&HashSet<String>>) -> Check {
    let name = "stripe.mapping";
    // `stripe_meters` belongs to `apex_stripe::catalog`, which keeps this query private to
    // its sync; it is read here as the sync reads it, to say what the sync would refuse.
    let meters: Vec<(String, String)> =
        match sqlx::query_as("SELECT metric_type, stripe_meter_id FROM stripe_meters")
            .fetch_all(pool)
            .await
        {
            Ok(meters) => meters,
            Err(e) => return check(name, Status::Fail, format!("cannot read the meters: {e}")),
        };
    let mapped: BTreeMap<String, String> = meters.into_iter().collect();
    let unmapped: Vec<&str> = Metric::ALL
        .iter()
        .map(|m| m.as_str())
        .filter(|m| !mapped.contains_key(*m))
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
    if let Some(active) = active {
        let inactive: Vec<String> = mapped
            .iter()
            .filter(|(_, id)| !active.contains(*id))
            .map(|(metric, id)| format!("{metric} ({id})"))
            .collect();
        if !inactive.is_empty() {
            return check(
                name,
                Status::Fail,
                format!(
                    "meters not active in Stripe: {} (meter events to them are refused)",
                    inactive.join(", ")
                ),
            );
        }
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
            Metric::ALL.map(|m| m.as_str()).join(", "),
            if active.is_some() {
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

/// `email.provider`: which provider sends. Unset keeps every email queued; `file` writes
/// files nobody receives.
fn email_provider(ctl: &CtlConfig) -> Check {
    let name = "email.provider";
    match &ctl.cron.email.provider {
        ProviderSettings::Resend(settings) => check(
            name,
            Status::Ok,
            format!(
                "resend at {}, RESEND_API_KEY starts with re_",
                settings.base_url
            ),
        ),
        ProviderSettings::Smtp(settings) => check(
            name,
            Status::Ok,
            format!("smtp relay {}:{}", settings.host, settings.port),
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

/// `email.queue` (due emails waiting longer than `stale_minutes`) and `email.failed` (emails
/// given up in the last [`GIVEN_UP_WINDOW_DAYS`] days).
async fn email_queue(pool: &PgPool, now: DateTime<Utc>, stale_minutes: i64) -> Vec<Check> {
    let queue = match events::email_queue_depth(pool, now).await {
        Ok((due, oldest_secs)) if due > 0 && oldest_secs > (stale_minutes * 60) as f64 => check(
            "email.queue",
            Status::Fail,
            format!(
                "{} due, the oldest queued {} min ago: is the email_queue job running? \
                 (`apexctl email pending`, `apexctl email process`)",
                count(due, "email"),
                (oldest_secs / 60.0).floor()
            ),
        ),
        Ok((due, oldest_secs)) => check(
            "email.queue",
            Status::Ok,
            if due == 0 {
                "no email due".to_owned()
            } else {
                // An email queued after `now` (a simulated clock behind the wall clock's
                // rows) is simply due, not queued for a negative time.
                format!(
                    "{} due, the oldest queued {} s ago",
                    count(due, "email"),
                    oldest_secs.max(0.0).floor()
                )
            },
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

/// `cron.<job>` for every job: its latest recorded slot against the last slot that was due
/// `late` ago. No run of any job at all means the cron process never ran here.
async fn cron_jobs(
    ctl: &CtlConfig,
    pool: &PgPool,
    now: DateTime<Utc>,
    late: chrono::Duration,
) -> Vec<Check> {
    let latest = match runs::latest(pool).await {
        Ok(latest) => latest,
        Err(e) => {
            return vec![check(
                "cron",
                Status::Fail,
                format!("cannot read cron_runs: {e}"),
            )];
        }
    };
    let time = |t: DateTime<Utc>| t.format("%Y-%m-%d %H:%M UTC").to_string();
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
                        "the {} slot is running since {}, past its {} s timeout",
                        time(last.scheduled_for),
                        time(last.started_at),
                        job.timeout.num_seconds()
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

/// `dunning.retries`: the guide's pending-retries query, for retries due before the
/// `dunning_retries` job's last slot (at least `late` ago): those that run should have made.
/// A retry due since then waits for the next run, which is normal.
async fn dunning_retries(
    ctl: &CtlConfig,
    pool: &PgPool,
    now: DateTime<Utc>,
    late: chrono::Duration,
) -> Check {
    let name = "dunning.retries";
    let last_run = ctl
        .cron
        .jobs
        .iter()
        .find(|j| j.name == "dunning_retries")
        .and_then(|j| j.schedule.as_ref())
        .and_then(|s| s.last_at_or_before(now - late));
    let cutoff = last_run.unwrap_or(now - late);
    let overdue = dunning::due_retries_count(pool, cutoff).await;
    let due_now = dunning::due_retries_count(pool, now).await;
    match (overdue, due_now) {
        (Ok((0, _)), Ok((waiting, _))) => check(
            name,
            Status::Ok,
            format!(
                "no retry overdue; {waiting} due for the next dunning_retries run{}",
                last_run.map_or(String::new(), |t| format!(
                    " (last slot {})",
                    t.format("%Y-%m-%d %H:%M UTC")
                ))
            ),
        ),
        (Ok((n, oldest)), Ok(_)) => check(
            name,
            Status::Fail,
            format!(
                "{} due before {} not made (the oldest due {}): `apexctl dunning pending`, \
                 `apexctl dunning process`",
                if n == 1 {
                    "1 retry".to_owned()
                } else {
                    format!("{n} retries")
                },
                cutoff.format("%Y-%m-%d %H:%M UTC"),
                oldest.map_or("-".to_owned(), |t| t
                    .format("%Y-%m-%d %H:%M UTC")
                    .to_string())
            ),
        ),
        (Err(e), _) | (_, Err(e)) => check(name, Status::Fail, format!("cannot read: {e}")),
    }
}
