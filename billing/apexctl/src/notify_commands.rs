//! `apexctl notify ...`: notices to customers (issue 17: SDK updates).
//!
//! `notify sdk-update --platform ios|android --version V` reads the last `--days` (30) days of
//! SDK telemetry from ClickHouse ([`crate::sdk_telemetry`]), judges each customer seen on the
//! platform by its oldest known SDK version, and enqueues one `sdk_update` email for each
//! active customer on a version older than V (or, with `--min-version-below V2`, older than
//! V2 too), once per customer and version. The rules are those of
//! [`apex_billing::sdk_notices`]; `--dry-run` lists who would get it and writes nothing.
//! Bad flags (`--platform windows`, `--version garbage`, `--days 0`, a release notes link
//! that is not http(s), `--min-version-below` newer than `--version`) are refused with a
//! message naming the flag and a non-zero exit, before anything is read.

use std::collections::BTreeMap;
use std::process::ExitCode;

use anyhow::Context;
use apex_billing::sdk_notices::{
    self, CustomerSdk, Notice, NoticeStatus, Platform, Recipient, Release, SdkVersion,
};
use apex_notify::kinds::EmailKind;
use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde_json::json;
use sqlx::PgPool;

use crate::config::CtlConfig;
use crate::sdk_telemetry;

#[derive(Subcommand)]
pub(crate) enum NotifyCommand {
    /// Enqueue `sdk_update` emails for the active customers whose recent telemetry shows the
    /// platform's SDK older than VERSION (once per customer and version). A customer on
    /// several versions is judged by its oldest known one; versions that are not versions
    /// (`garbage`, empty, missing) are unknown and never notified.
    SdkUpdate {
        /// `ios` or `android` (any case).
        #[arg(long, value_parser = parse_platform)]
        platform: Platform,
        /// The new SDK version (`MAJOR.MINOR[.PATCH][-PRERELEASE]`, a leading `v` allowed;
        /// compared as versions: 1.10.0 is newer than 1.9.2, 1.2 is 1.2.0, 1.10.0-beta.1 is
        /// older than 1.10.0).
        #[arg(long, value_parser = parse_version)]
        version: SdkVersion,
        /// Narrow to customers whose oldest version is also older than this one (it must not
        /// be newer than --version); default: everyone older than --version.
        #[arg(long, value_parser = parse_version)]
        min_version_below: Option<SdkVersion>,
        /// "Recent" telemetry: records of the last N days (1 to 365).
        #[arg(long, default_value_t = 30, value_parser = clap::value_parser!(u32).range(1..=365))]
        days: u32,
        /// The email's release notes link (http or https); default
        /// https://docs.apexmediation.com/sdk/<platform>/releases/<version>.
        #[arg(long, value_parser = parse_link)]
        release_notes_url: Option<String>,
        /// Text for the email (line breaks kept).
        #[arg(long)]
        notes: Option<String>,
        /// List who would get it; enqueue nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

fn parse_platform(text: &str) -> Result<Platform, String> {
    text.parse()
}

fn parse_version(text: &str) -> Result<SdkVersion, String> {
    text.parse()
}

fn parse_link(text: &str) -> Result<String, String> {
    if sdk_notices::is_link(text.trim()) {
        Ok(text.trim().to_owned())
    } else {
        Err(format!("{text:?} is not an http:// or https:// link"))
    }
}

pub(crate) async fn run(
    command: NotifyCommand,
    ctl: &CtlConfig,
    pool: &PgPool,
    now: DateTime<Utc>,
) -> anyhow::Result<ExitCode> {
    match command {
        NotifyCommand::SdkUpdate {
            platform,
            version,
            min_version_below,
            days,
            release_notes_url,
            notes,
            dry_run,
            json,
        } => {
            let release = Release::new(
                platform,
                version,
                min_version_below,
                release_notes_url,
                notes,
            )?;
            // The email must render (its link, its notes) before any is enqueued.
            let sample = Recipient {
                customer_id: "cus_sample".into(),
                name: "Sample".into(),
                email: "sample@example.com".into(),
                status: "active".into(),
                opted_out: false,
                already_notified: false,
            };
            apex_notify::templates::render(
                EmailKind::SdkUpdate,
                &release.email_data(&sample, &release.version),
            )
            .context("the sdk_update email would not render")?;

            let (since, until) = sdk_telemetry::window(now, days);
            let sightings = sdk_telemetry::sightings(&ctl.cron.stores, platform, since, until)
                .await
                .context("cannot read SDK telemetry from ClickHouse (CLICKHOUSE_URL)")?;
            let fleet = sdk_notices::fleet(&sightings);
            let due: Vec<CustomerSdk> = fleet
                .known
                .iter()
                .filter(|c| release.is_due(c))
                .cloned()
                .collect();
            let up_to_date = fleet.known.len() - due.len();
            let notices =
                sdk_notices::notify(&mut *pool.acquire().await?, &release, due, dry_run, now)
                    .await?;
            let report = Report {
                release: &release,
                days,
                since,
                until,
                dry_run,
                up_to_date,
                unknown_only: &fleet.unknown_only,
                notices: &notices,
            };
            if json {
                println!("{}", report.json());
            } else {
                report.print();
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// What a run decided, for people or as JSON.
struct Report<'a> {
    release: &'a Release,
    days: u32,
    since: DateTime<Utc>,
    until: DateTime<Utc>,
    dry_run: bool,
    up_to_date: usize,
    unknown_only: &'a [String],
    notices: &'a [Notice],
}

impl Report<'_> {
    fn count(&self, status: NoticeStatus) -> usize {
        self.notices.iter().filter(|n| n.status == status).count()
    }

    /// Due customers that get nothing for a reason of their own (not "already notified").
    fn skipped(&self) -> usize {
        self.notices
            .iter()
            .filter(|n| {
                !matches!(
                    n.status,
                    NoticeStatus::Enqueued
                        | NoticeStatus::WouldEnqueue
                        | NoticeStatus::AlreadyNotified
                )
            })
            .count()
    }

    fn json(&self) -> serde_json::Value {
        let mut by_status: BTreeMap<&str, usize> = BTreeMap::new();
        for n in self.notices {
            *by_status.entry(n.status.as_str()).or_default() += 1;
        }
        json!({
            "platform": self.release.platform,
            "version": self.release.version,
            "below": self.release.below,
            "release_notes_url": self.release.release_notes_url,
            "notes": self.release.notes,
            "days": self.days,
            "since": self.since,
            "until": self.until,
            "dry_run": self.dry_run,
            "enqueued": self.count(NoticeStatus::Enqueued),
            "would_enqueue": self.count(NoticeStatus::WouldEnqueue),
            "already_notified": self.count(NoticeStatus::AlreadyNotified),
            "skipped": self.skipped(),
            "by_status": by_status,
            "up_to_date": self.up_to_date,
            "unknown_version_customers": self.unknown_only,
            "customers": self.notices,
        })
    }

    fn print(&self) {
        let r = self.release;
        let label = r.platform.label();
        let bound = if r.below == r.version {
            format!("older than {}", r.version)
        } else {
            format!("older than {} (--min-version-below)", r.below)
        };
        println!(
            "{label} SDK {}: telemetry of the last {} days (since {}): {} customers {bound}, \
             {} up to date, {} with unknown versions only (not notified)",
            r.version,
            self.days,
            self.since.format("%Y-%m-%d %H:%M UTC"),
            self.notices.len(),
            self.up_to_date,
            self.unknown_only.len(),
        );
        if !self.notices.is_empty() {
            let rows: Vec<[String; 5]> = self
                .notices
                .iter()
                .map(|n| {
                    [
                        n.customer.customer_id.clone(),
                        n.customer.oldest.to_string(),
                        n.customer
                            .oldest_last_seen
                            .format("%Y-%m-%d %H:%M")
                            .to_string(),
                        n.status.as_str().to_owned(),
                        n.email.clone().unwrap_or_else(|| "-".into()),
                    ]
                })
                .collect();
            let header = [
                "CUSTOMER",
                "OLDEST VERSION",
                "LAST SEEN (UTC)",
                "STATUS",
                "EMAIL",
            ];
            let mut widths = header.map(str::len);
            for row in &rows {
                for (w, cell) in widths.iter_mut().zip(row) {
                    *w = (*w).max(cell.chars().count());
                }
            }
            let line = |cells: [&str; 5]| {
                let mut out = String::new();
                for (i, (cell, w)) in cells.iter().zip(widths).enumerate() {
                    if i + 1 == cells.len() {
                        out.push_str(cell);
                    } else {
                        out.push_str(&format!("{cell:<w$}  "));
                    }
                }
                println!("{out}");
            };
            line(header);
            for row in &rows {
                line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
            }
        }
        let already = self.count(NoticeStatus::AlreadyNotified);
        let skipped = self.skipped();
        let tail = format!(
            "{already} already notified of {label} {}, {skipped} skipped (opted out, not \
             active or unknown)",
            r.version
        );
        if self.dry_run {
            println!(
                "dry run: {} would get the sdk_update email; {tail}; nothing enqueued",
                self.count(NoticeStatus::WouldEnqueue)
            );
        } else {
            let enqueued = self.count(NoticeStatus::Enqueued);
            if enqueued == 0 {
                println!("nothing new to enqueue: {tail}");
            } else {
                println!("enqueued {enqueued} sdk_update emails; {tail}");
            }
        }
    }
}
