//! `apexctl email ...`: the guide's manual email operations (send a test email, see what is
//! queued, failed and sent, retry failed ones, drain the queue now) and a preview of each
//! kind of email with sample data.

use std::process::ExitCode;

use anyhow::Context;
use apex_billing::{email_log, events};
use apex_notify::config::{EmailConfig, build_provider};
use apex_notify::kinds::EmailKind;
use apex_notify::queue::{QueueSettings, Worker, worker_name};
use apex_notify::templates;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum EmailCommand {
    /// Enqueue a test email (the guide's "send test email"), then send it at once.
    #[command(visible_alias = "test")]
    SendTest {
        /// The address.
        #[arg(long)]
        to: String,
        /// The email type (default `welcome`); `apexctl email preview --list` lists them.
        #[arg(long = "type", default_value = "welcome")]
        email_type: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Email events not processed yet, in the order the queue takes them.
    Pending {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Email events given up, newest first, with their error.
    Failed {
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Emails sent (and suppressed), newest first (the guide's "recent emails sent").
    #[command(visible_alias = "sent")]
    Recent {
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Revive given-up email events (the guide's "reset to retry"): one, or all of them.
    Retry {
        /// The event's id.
        #[arg(
            long,
            conflicts_with = "all_failed",
            required_unless_present = "all_failed"
        )]
        id: Option<i64>,
        /// Every given-up email event.
        #[arg(long)]
        all_failed: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Drain the queue now, as the `email_queue` job does every minute.
    #[command(visible_alias = "drain")]
    Process {
        /// Claim at most this many events.
        #[arg(long)]
        max: Option<u64>,
        /// Sends in flight at once (default 4, as the job).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..=64))]
        concurrency: Option<u16>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Record (or, with `--undo`, remove) a customer's opt-out of an optional kind of email:
    /// `usage_alert`, `monthly_summary` or `sdk_update` (the unsubscribe page does the same).
    #[command(visible_alias = "optout")]
    OptOut {
        /// Customer id (`cus_...`).
        #[arg(long)]
        customer: String,
        /// `usage_alert`, `monthly_summary` or `sdk_update`.
        #[arg(long)]
        category: String,
        /// Opt back in.
        #[arg(long)]
        undo: bool,
        /// Print JSON (`customer_id`, `category`, `opted_out`).
        #[arg(long)]
        json: bool,
    },
    /// Render a kind of email with sample data (subject, text, HTML).
    Preview {
        /// The email type.
        #[arg(long = "type", required_unless_present = "list")]
        email_type: Option<String>,
        /// Only the HTML part.
        #[arg(long, conflicts_with = "text")]
        html: bool,
        /// Only the plain-text part.
        #[arg(long)]
        text: bool,
        /// List the email types.
        #[arg(long)]
        list: bool,
        /// Print JSON: `type`, `subject`, `text` and `html` (with `--list`, `types`).
        #[arg(long, conflicts_with_all = ["html", "text"])]
        json: bool,
    },
}

fn kind(email_type: &str) -> anyhow::Result<EmailKind> {
    EmailKind::from_type(email_type).with_context(|| {
        format!(
            "unknown email type {email_type:?}: the types are {}",
            EmailKind::ALL
                .iter()
                .map(|k| k.email_type())
                .collect::<Vec<_>>()
                .join(", ")
        )
    })
}

fn positive(limit: i64) -> anyhow::Result<i64> {
    anyhow::ensure!(limit > 0, "--limit must be at least 1");
    Ok(limit)
}

pub(crate) async fn run(
    command: EmailCommand,
    pool: &PgPool,
    config: &EmailConfig,
    now: DateTime<Utc>,
    clock: &(dyn Fn() -> DateTime<Utc> + Send + Sync),
) -> anyhow::Result<ExitCode> {
    match command {
        EmailCommand::SendTest {
            to,
            email_type,
            json,
        } => {
            let kind = kind(&email_type)?;
            let mut data = templates::sample_data(kind);
            data["to"] = serde_json::Value::String(to);
            // A test send is about no customer: the 24-hour rule does not hold it back.
            if let Some(map) = data.as_object_mut() {
                map.remove("customer_id");
            }
            let id = events::enqueue(pool, &format!("email.{email_type}"), &data, now).await?;
            // Only this event: the rest of the queue is the queue's business.
            let provider = build_provider(config)?;
            let settings = QueueSettings::from_config(config);
            let (_, report) = Worker {
                pool,
                provider: provider.as_ref(),
                settings: &settings,
                name: worker_name("apexctl"),
                now: clock,
            }
            .send_one(id)
            .await?;
            let logged: Option<(String, Option<String>)> = sqlx::query_as(
                "SELECT status, provider_message_id FROM email_log WHERE event_id = $1",
            )
            .bind(id)
            .fetch_optional(pool)
            .await?;
            let error: Option<(Option<String>, Option<String>)> =
                sqlx::query_as("SELECT error_message, last_error FROM events WHERE id = $1")
                    .bind(id)
                    .fetch_optional(pool)
                    .await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"event_id": id, "sent": logged.is_some(),
                        "provider_message_id": logged.as_ref().and_then(|l| l.1.clone()),
                        "error": error.as_ref().and_then(|e| e.0.clone().or(e.1.clone())),
                        "report": report})
                );
            } else if let Some((_, message_id)) = &logged {
                println!(
                    "test email {id} sent through {} ({})",
                    config.provider.name(),
                    message_id.as_deref().unwrap_or("-")
                );
            } else {
                println!(
                    "test email {id} not sent: {}",
                    error
                        .and_then(|e| e.0.or(e.1))
                        .unwrap_or_else(|| "still queued".into())
                );
            }
            Ok(if logged.is_some() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        EmailCommand::Pending { limit, json } => {
            let list = events::pending_emails(pool, positive(limit)?).await?;
            print_events(&list, json)?;
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::Failed { limit, json } => {
            let list = events::failed_emails(pool, positive(limit)?).await?;
            print_events(&list, json)?;
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::Recent { limit, json } => {
            let list = email_log::recent(pool, positive(limit)?).await?;
            if json {
                println!("{}", serde_json::to_string(&list)?);
            } else if list.is_empty() {
                println!("no emails sent");
            } else {
                for email in list {
                    println!(
                        "{}\t{}\t{}\t{}\t{}\t{}",
                        email.sent_at.format("%Y-%m-%d %H:%M:%S"),
                        email.customer_id.as_deref().unwrap_or("-"),
                        email.email_type,
                        email.recipient,
                        email.status,
                        email.delivery_status.as_deref().unwrap_or("-"),
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::Retry {
            id,
            all_failed,
            json,
        } => {
            let revived =
                events::retry_failed_emails(pool, if all_failed { None } else { id }).await?;
            if json {
                println!("{}", serde_json::json!({"revived": revived}));
            } else {
                println!("{revived} email events revived; the next queue run sends them");
            }
            if let (Some(id), 0) = (id, revived) {
                anyhow::bail!("event {id} is not a given-up email event");
            }
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::Process {
            max,
            concurrency,
            json,
        } => {
            let report = drain(pool, config, clock, max, concurrency).await?;
            if json {
                println!("{}", serde_json::to_string(&report)?);
            } else {
                println!(
                    "email queue: {} claimed, {} sent, {} duplicates, {} opted out, {} suppressed, \
                     {} deferred, {} retried later, {} rate limited, {} given up",
                    report.claimed,
                    report.sent,
                    report.duplicate,
                    report.opted_out,
                    report.suppressed,
                    report.deferred,
                    report.failed,
                    report.rate_limited,
                    report.given_up
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::OptOut {
            customer,
            category,
            undo,
            json,
        } => {
            anyhow::ensure!(
                apex_billing::customers::exists(pool, &customer).await?,
                "customer {customer} not found"
            );
            email_log::set_opt_out(pool, &customer, &category, !undo).await?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"customer_id": customer, "category": category,
                        "opted_out": !undo})
                );
                return Ok(ExitCode::SUCCESS);
            }
            println!(
                "{customer} {} {category} emails",
                if undo {
                    "receives"
                } else {
                    "no longer receives"
                }
            );
            Ok(ExitCode::SUCCESS)
        }
        EmailCommand::Preview {
            email_type,
            html,
            text,
            list,
            json,
        } => {
            if list && json {
                let types: Vec<String> = EmailKind::ALL.iter().map(|k| k.to_string()).collect();
                println!("{}", serde_json::json!({"types": types}));
                return Ok(ExitCode::SUCCESS);
            }
            if list {
                for kind in EmailKind::ALL {
                    println!("{kind}");
                }
                return Ok(ExitCode::SUCCESS);
            }
            let kind = kind(email_type.as_deref().unwrap_or_default())?;
            let rendered = templates::render(kind, &templates::sample_data(kind))
                .with_context(|| format!("cannot render {kind}"))?;
            if json {
                println!(
                    "{}",
                    serde_json::json!({"type": kind.to_string(), "subject": rendered.subject,
                        "text": rendered.text, "html": rendered.html})
                );
            } else if html {
                println!("{}", rendered.html);
            } else if text {
                println!("{}", rendered.text);
            } else {
                println!(
                    "Subject: {}\n\n{}\n\n----- HTML -----\n{}",
                    rendered.subject, rendered.text, rendered.html
                );
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn drain(
    pool: &PgPool,
    config: &EmailConfig,
    clock: &(dyn Fn() -> DateTime<Utc> + Send + Sync),
    max: Option<u64>,
    concurrency: Option<u16>,
) -> anyhow::Result<apex_notify::queue::ProcessReport> {
    let provider = build_provider(config)?;
    let mut settings = QueueSettings::from_config(config);
    if let Some(concurrency) = concurrency {
        settings.concurrency = usize::from(concurrency);
    }
    let worker = Worker {
        pool,
        provider: provider.as_ref(),
        settings: &settings,
        name: worker_name("apexctl"),
        now: clock,
    };
    Ok(worker.drain(max).await?)
}

fn print_events(list: &[events::QueuedEmail], json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string(list)?);
    } else if list.is_empty() {
        println!("none");
    } else {
        for e in list {
            println!(
                "{}\t{}\t{}\t{}\tattempts {}\t{}",
                e.id,
                e.event_type,
                e.recipient.as_deref().unwrap_or("-"),
                e.created_at.format("%Y-%m-%d %H:%M:%S"),
                e.attempts,
                e.error_message
                    .as_deref()
                    .or(e.last_error.as_deref())
                    .unwrap_or("-"),
            );
        }
    }
    Ok(())
}
