//! `apexctl`: the admin CLI (migrations, customers, keys, plans, revenue, dashboard tokens,
//! Stripe mapping and usage sync, the cron jobs, the monthly invoices, email, dunning, usage
//! alerts, `doctor`): every manual operation and troubleshooting step of the operations guide
//! is a command here, each with `--help` and `--json` (one JSON document on stdout). Every
//! command reads the process clock of `APEX_CLOCK_*`, as the cron process does. It reads the
//! billing domain (`apex-billing`) and drives Stripe (`apex-stripe`); the edge links neither
//! this binary's dependencies nor Stripe's.

mod alert_commands;
mod config;
mod cron_commands;
mod doctor_commands;
mod dunning_commands;
mod email_commands;
mod invoice_commands;
mod notify_commands;
mod reconcile_commands;
mod rollup_commands;
mod sdk_telemetry;
mod simulate;
mod stripe_commands;
mod trial_commands;
mod usage_commands;

use std::process::ExitCode;

use anyhow::Context;
use apex_billing::customers::{self, NewCustomer};
use apex_billing::{keys, plans};
use apex_core::env::EnvSource;
use apex_core::migrate;
use clap::{Parser, Subcommand};

use crate::config::CtlConfig;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "apexctl",
    version,
    about = "Administer the Apex metering and billing system"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply pending Postgres and ClickHouse migrations (safe to run again).
    Migrate {
        /// Print JSON (`postgres_applied`, `clickhouse_applied`: the versions applied now).
        #[arg(long)]
        json: bool,
    },
    /// Create and list customers.
    #[command(subcommand)]
    Customers(CustomersCommand),
    /// Issue, revoke and list API keys.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Show the plan catalogue.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Print a dashboard token (HS256 JWT, signed with APEX_JWT_SECRET) for a customer.
    Token {
        /// Customer id (`cus_...`).
        #[arg(long)]
        customer: String,
        /// Lifetime in seconds.
        #[arg(long, default_value_t = 3600)]
        ttl_secs: i64,
        /// Print JSON (`customer_id`, `token`, `expires_at`).
        #[arg(long)]
        json: bool,
    },
    /// Record mediated revenue (the platform fee is charged on it).
    #[command(subcommand)]
    Revenue(RevenueCommand),
    /// Stripe: map meters, plans and customers; sync usage as meter events.
    #[command(subcommand)]
    Stripe(stripe_commands::StripeCommand),
    /// The cron jobs: list them, run one now, read their history.
    #[command(subcommand)]
    Cron(cron_commands::CronCommand),
    /// Monthly invoices: list, show, close a month now, review what needs a person.
    #[command(subcommand)]
    Invoices(invoice_commands::InvoicesCommand),
    /// Email: send a test, see the queue, failures and what went out, retry, drain, preview.
    #[command(subcommand)]
    Email(email_commands::EmailCommand),
    /// Dunning: a customer's status and history, make due retries now, reactivate, exempt,
    /// close a case.
    #[command(subcommand)]
    Dunning(dunning_commands::DunningCommand),
    /// Usage alerts: list them, run the hourly check now.
    #[command(subcommand)]
    Alerts(alert_commands::AlertsCommand),
    /// Trials ending soon.
    #[command(subcommand)]
    Trials(trial_commands::TrialsCommand),
    /// Notices to customers: SDK updates.
    #[command(subcommand)]
    Notify(notify_commands::NotifyCommand),
    /// Usage: the customers using the most (the guide's "check customer usage").
    #[command(subcommand)]
    Usage(usage_commands::UsageCommand),
    /// Check the guide's Troubleshooting causes in one run: the stores, Stripe's key and
    /// mapping, the email provider and queue, the cron jobs (against the schedules of this
    /// process's environment, `APEX_CRON_SCHEDULE_*`: run it with apex-cron's settings),
    /// overdue dunning retries. Each check is ok, warn or fail with one line; exits 1 if any
    /// fails.
    Doctor(doctor_commands::DoctorArgs),
    /// Compare one billing period across ClickHouse, Postgres, our sync and Stripe; exit 1 on
    /// any drift.
    Reconcile(reconcile_commands::ReconcileArgs),
    /// Rollups: rebuild them from the raw events.
    #[command(subcommand)]
    Rollup(rollup_commands::RollupCommand),
    /// Run the real system over a simulated month on databases of its own, against the
    /// Stripe stand-in, and print its timeline.
    Simulate(simulate::SimulateArgs),
}

#[derive(Subcommand)]
enum RevenueCommand {
    /// Set a customer's mediated revenue for a month (replaces an earlier figure).
    Set {
        /// Customer id (`cus_...`).
        #[arg(long)]
        customer: String,
        /// Calendar month, `YYYY-MM` (UTC).
        #[arg(long)]
        month: String,
        /// Revenue in cents.
        #[arg(long)]
        cents: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CustomersCommand {
    /// Sign a customer up and print its first API key (shown once, never stored).
    Create {
        /// Customer name.
        #[arg(long)]
        name: String,
        /// Billing contact email.
        #[arg(long)]
        email: String,
        /// Plan id (see `apexctl plans list`).
        #[arg(long, default_value = "starter")]
        plan: String,
        /// Trial length in days; defaults to the plan's.
        #[arg(long)]
        trial_days: Option<u32>,
        /// Print a JSON object (`customer_id`, `api_key`, ...) instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List customers.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Issue another API key for a customer (shown once).
    Create {
        /// Customer id (`cus_...`).
        #[arg(long)]
        customer: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key, named by its id (`key_...`) or by the key itself (`rsk_...`).
    Revoke {
        /// Key id or plain key.
        key: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// List keys (ids, prefixes, status; never the keys themselves).
    List {
        /// Only this customer's keys.
        #[arg(long)]
        customer: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum PlansCommand {
    /// List plans with limits, overage prices and platform fees.
    List {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("APEX_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    let env = EnvSource::process();
    // Billing settings are checked even by commands that do not use them yet, so a typo
    // shows up at the first command an operator runs, not in a nightly job.
    let ctl = match CtlConfig::from_env(&env) {
        Ok(settings) => settings,
        Err(e) => {
            eprintln!("apexctl: {e}");
            return ExitCode::from(2);
        }
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot start the tokio runtime");
    match runtime.block_on(run(cli.command, ctl)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("apexctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(command: Command, ctl: CtlConfig) -> anyhow::Result<ExitCode> {
    let stores = &ctl.cron.stores;
    // The time of every command: the wall clock, or the simulated one of APEX_CLOCK_*.
    let now = ctl.cron.clock.now();
    // The doctor reports an unreachable Postgres as one of its checks, so it connects itself.
    if let Command::Doctor(args) = command {
        return doctor_commands::run(args, &ctl, now).await;
    }
    let pool = stores
        .connect_postgres()
        .await
        .context("cannot connect to Postgres (DATABASE_URL)")?;
    match command {
        Command::Migrate { json } => {
            let postgres_applied = migrate::migrate_postgres(&pool).await?;
            let applied = migrate::migrate_clickhouse(stores)
                .await
                .context("ClickHouse (CLICKHOUSE_URL)")?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "postgres_applied": postgres_applied,
                        "clickhouse_applied": applied,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "migrations applied: postgres up to date, clickhouse {}",
                if applied.is_empty() {
                    "up to date".to_owned()
                } else {
                    format!("applied {applied:?}")
                }
            );
        }
        Command::Customers(CustomersCommand::Create {
            name,
            email,
            plan,
            trial_days,
            json,
        }) => {
            let new = NewCustomer {
                name,
                email,
                plan_id: plan,
                trial_days,
            };
            let created =
                customers::create_customer(&mut *pool.acquire().await?, &new, now).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "customer_id": created.customer.id,
                        "api_key": created.api_key.expose(),
                        "api_key_id": created.key.id,
                        "api_key_prefix": created.key.prefix,
                        "name": created.customer.name,
                        "email": created.customer.email,
                        "plan": created.plan_id,
                        "subscription_id": created.subscription_id,
                        "trial_end": created.trial_end,
                    })
                );
            } else {
                println!(
                    "customer {} ({}, {}) on plan {}{}",
                    created.customer.id,
                    created.customer.name,
                    created.customer.email,
                    created.plan_id,
                    created
                        .trial_end
                        .map(|t| format!(", trial until {}", t.format("%Y-%m-%d")))
                        .unwrap_or_default()
                );
                println!(
                    "API key (shown once, not stored): {}",
                    created.api_key.expose()
                );
            }
        }
        Command::Customers(CustomersCommand::List { json }) => {
            let all = customers::list_customers(&pool).await?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for c in all {
                    println!(
                        "{}\t{}\t{}\t{}\t{}",
                        c.id,
                        c.status,
                        c.created_at.format("%Y-%m-%d"),
                        c.email,
                        c.name
                    );
                }
            }
        }
        Command::Keys(KeysCommand::Create { customer, json }) => {
            let (key, plain) = keys::create_key(&pool, &customer).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "customer_id": key.customer_id,
                        "api_key": plain.expose(),
                        "api_key_id": key.id,
                        "api_key_prefix": key.prefix,
                    })
                );
            } else {
                println!("key {} for {}", key.id, key.customer_id);
                println!("API key (shown once, not stored): {}", plain.expose());
            }
        }
        Command::Keys(KeysCommand::Revoke { key, json }) => {
            let revoked = keys::revoke_key(&pool, &key).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "api_key_id": revoked.id,
                        "api_key_prefix": revoked.prefix,
                        "customer_id": revoked.customer_id,
                        "revoked": true,
                    })
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "revoked {} ({}) of {}",
                revoked.id, revoked.prefix, revoked.customer_id
            );
        }
        Command::Keys(KeysCommand::List { customer, json }) => {
            let all = keys::list_keys(&pool, customer.as_deref()).await?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for k in all {
                    println!(
                        "{}\t{}\t{:?}\t{}\t{}",
                        k.id,
                        k.prefix,
                        k.status,
                        k.customer_id,
                        k.created_at.format("%Y-%m-%d %H:%M")
                    );
                }
            }
        }
        Command::Token {
            customer,
            ttl_secs,
            json,
        } => {
            let secret = std::env::var("APEX_JWT_SECRET")
                .ok()
                .filter(|s| s.len() >= 32)
                .context("APEX_JWT_SECRET (at least 32 bytes) is needed to sign a token")?;
            anyhow::ensure!(
                (1..=31 * 86_400).contains(&ttl_secs),
                "--ttl-secs must be 1 to 2678400 (31 days)"
            );
            anyhow::ensure!(
                customers::exists(&pool, &customer).await?,
                "customer {customer} not found"
            );
            let token = apex_billing::tokens::dashboard_token(
                &customer,
                secret.as_bytes(),
                now.timestamp(),
                ttl_secs,
            )?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "customer_id": customer,
                        "token": token,
                        // The token's `exp` (`dashboard_token` saturates it the same way),
                        // whole seconds; null past chrono's last representable time.
                        "expires_at": chrono::DateTime::from_timestamp(
                            now.timestamp().saturating_add(ttl_secs),
                            0
                        ),
                    })
                );
            } else {
                println!("{token}");
            }
        }
        Command::Revenue(RevenueCommand::Set {
            customer,
            month,
            cents,
            json,
        }) => {
            let period = apex_billing::pricing::parse_month(&month)
                .with_context(|| format!("--month {month:?}: expected YYYY-MM"))?;
            apex_billing::statement::set_revenue(&pool, &customer, &period, cents).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({
                        "customer_id": customer,
                        "month": month,
                        "revenue_cents": cents,
                    })
                );
            } else {
                println!("{customer} {month}: mediated revenue {cents} cents");
            }
        }
        Command::Stripe(command) => {
            return stripe_commands::run(command, &pool, &ctl.cron.stripe, now).await;
        }
        Command::Cron(command) => {
            return cron_commands::run(command, pool, &ctl.cron).await;
        }
        Command::Email(command) => {
            let clock = ctl.cron.clock;
            let now_fn = move || clock.now();
            return email_commands::run(command, &pool, &ctl.cron.email, now, &now_fn).await;
        }
        Command::Alerts(command) => {
            return alert_commands::run(command, &ctl, &pool, now).await;
        }
        Command::Usage(command) => {
            return usage_commands::run(command, &pool, now).await;
        }
        // Taken before Postgres is connected (above); running it here too keeps the match
        // total without a panic path.
        Command::Doctor(args) => {
            return doctor_commands::run(args, &ctl, now).await;
        }
        Command::Trials(command) => {
            return trial_commands::run(command, &pool, now).await;
        }
        Command::Notify(command) => {
            return notify_commands::run(command, &ctl, &pool, now).await;
        }
        Command::Dunning(command) => {
            return dunning_commands::run(command, &pool, &ctl.cron.stripe, &ctl.cron.dunning, now)
                .await;
        }
        Command::Invoices(command) => {
            return invoice_commands::run(
                command,
                &pool,
                &ctl.cron.stripe,
                ctl.cron.invoicing,
                now,
            )
            .await;
        }
        Command::Reconcile(args) => {
            return reconcile_commands::run(args, &ctl, &pool, now).await;
        }
        Command::Rollup(command) => {
            return rollup_commands::run(command, &ctl, &pool, now).await;
        }
        Command::Simulate(args) => {
            return simulate::run(args, &ctl).await;
        }
        Command::Plans(PlansCommand::List { json }) => {
            let all = plans::list_plans(&mut *pool.acquire().await?).await?;
            if json {
                println!("{}", serde_json::to_string(&all)?);
            } else {
                for p in all {
                    let band_max = p
                        .revenue_band_max_cents
                        .map_or("no limit".to_owned(), |c| format!("${}", c / 100));
                    println!(
                        "{}\t{}\tplatform fee {}.{:02} % (negotiable {}–{} bps)\trevenue ${}–{}",
                        p.id,
                        p.name,
                        p.platform_fee_bps / 100,
                        p.platform_fee_bps % 100,
                        p.platform_fee_bps_min,
                        p.platform_fee_bps_max,
                        p.revenue_band_min_cents / 100,
                        band_max
                    );
                    for l in p.limits {
                        println!(
                            "\t{}: included {}, overage {} cents per {}",
                            l.metric_type,
                            l.included_quantity
                                .map_or("unlimited".to_owned(), |q| q.to_string()),
                            l.overage_cents_per_unit,
                            l.overage_unit_quantity
                        );
                    }
                }
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}
