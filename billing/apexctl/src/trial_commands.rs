//! `apexctl trials ...`: trials ending soon (issue 17). `upcoming` lists the trialing
//! subscriptions whose trial ends within the next days with the reminders the
//! `trial_reminders` job has enqueued for their current end and the one it sends next
//! (`apex_billing::trials`).

use std::process::ExitCode;

use apex_billing::trials::{self, MAX_UPCOMING_DAYS, UpcomingTrial};
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

#[derive(Subcommand)]
pub(crate) enum TrialsCommand {
    /// Trialing subscriptions whose trial ends within the next days, soonest first, with the
    /// reminders sent.
    Upcoming {
        /// How many days ahead (UTC calendar days; 0: trials ending today).
        #[arg(long, default_value_t = 7, allow_negative_numbers = true)]
        days: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

pub(crate) async fn run(
    command: TrialsCommand,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        TrialsCommand::Upcoming { days, json } => {
            anyhow::ensure!(
                (0..=MAX_UPCOMING_DAYS).contains(&days),
                "--days must be 0 to {MAX_UPCOMING_DAYS} (days ahead; 0 is today), not {days}"
            );
            let trials = trials::upcoming(&mut *pool.acquire().await?, now, days).await?;
            if json {
                println!("{}", json!({"now": now, "days": days, "trials": trials}));
            } else if trials.is_empty() {
                println!(
                    "no trial ends within {days} day(s) of {}",
                    now.format("%Y-%m-%d")
                );
            } else {
                print_table(&trials);
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(trials: &[UpcomingTrial]) {
    println!(
        "{:<24} {:<20} {:<28} {:<10} {:<17} {:>4}  {:<14} next",
        "customer", "name", "email", "plan", "trial_end", "days", "sent"
    );
    for t in trials {
        let sent = t
            .reminders
            .iter()
            .map(|r| {
                let short = r.email_type.trim_start_matches("trial_ending_");
                if r.status == "sent" {
                    short.to_owned()
                } else {
                    format!("{short}({})", r.status)
                }
            })
            .collect::<Vec<_>>()
            .join(",");
        let next = match (&t.next_reminder, t.customer_status.as_str()) {
            (_, status) if status != "active" => format!("none (customer {status})"),
            (Some(next), _) => format!(
                "{} from {}",
                next.email_type,
                next.due_from.format("%Y-%m-%d")
            ),
            (None, _) if t.stripe_mapped => "none (Stripe ends the trial)".into(),
            (None, _) => "none (becomes active at the end)".into(),
        };
        println!(
            "{:<24} {:<20} {:<28} {:<10} {:<17} {:>4}  {:<14} {}",
            t.customer_id,
            clip(&t.name, 20),
            clip(&t.email, 28),
            t.plan_id,
            t.trial_end.format("%Y-%m-%d %H:%M"),
            t.days_left,
            if sent.is_empty() { "-" } else { &sent },
            next
        );
    }
    println!("{} trial(s)", trials.len());
}

/// `s` cut to `width` characters (with "…" when cut), so a long name keeps the columns.
fn clip(s: &str, width: usize) -> String {
    if s.chars().count() <= width {
        s.to_owned()
    } else {
        let mut cut: String = s.chars().take(width - 1).collect();
        cut.push('…');
        cut
    }
}
