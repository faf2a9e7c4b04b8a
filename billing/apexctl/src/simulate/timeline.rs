//! The simulation's day-by-day timeline: what the system did, read back from the
//! simulation's database after each step through the billing domain's own queries (alerts,
//! the email log, invoices, dunning history, customers), never from the jobs' reports. Events
//! name customers by their simulation names (`sim-03`), never by random ids, and are ordered
//! by time, then kind, customer and detail, so a seed gives the same text every time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use apex_billing::{alerts, customers, dunning, email_log, invoices};
use chrono::{DateTime, NaiveDate, Utc};
use serde::Serialize;
use sqlx::PgPool;

/// One line of the timeline.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub(crate) struct Event {
    /// When it was seen (the simulated time of the step).
    #[serde(skip)]
    pub(crate) at: DateTime<Utc>,
    /// The simulated day, 1 = the first.
    pub(crate) day: i64,
    /// `YYYY-MM-DD HH:MM` (UTC).
    pub(crate) time: String,
    /// `signup`, `alert`, `trial_reminder`, `invoice`, `invoice_paid`, `payment_failed`,
    /// `retry`, `recovered`, `suspension`, `reactivation`, `card_updated`, `paid_by_hand`,
    /// `email`, `job_failed`.
    pub(crate) kind: &'static str,
    /// The customer's simulation name (`-` for none).
    pub(crate) customer: String,
    /// What happened.
    pub(crate) detail: String,
}

/// Dollars and cents for the timeline (`$1,234.56`).
pub(crate) fn dollars(cents: i64) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    format!(
        "{sign}{}",
        apex_billing::statement::dollars(cents.unsigned_abs())
    )
}

/// The timeline and what has been seen of the database so far.
pub(crate) struct Timeline {
    start: NaiveDate,
    /// Customer id to simulation name.
    names: HashMap<String, String>,
    pub(crate) events: Vec<Event>,
    seen_alerts: BTreeSet<i64>,
    seen_emails: BTreeSet<i64>,
    /// Invoice row id to its last seen status.
    invoice_status: HashMap<i64, String>,
    /// (invoice, attempt number) to its last seen status.
    attempt_status: HashMap<(String, i32), String>,
    /// Customer id to its last seen status.
    customer_status: HashMap<String, String>,
    /// Emails sent per simulated day, for the report.
    pub(crate) emails_per_day: BTreeMap<NaiveDate, u64>,
    /// Emails the queue gave up on (`failed`), as `type customer` text: a failure of the run.
    pub(crate) failed_emails: Vec<String>,
}

/// What changed in dunning, for the simulation's scenario to react to (a customer whose
/// retry failed puts in a new card, a suspended one pays by hand).
#[derive(Debug, Default)]
pub(crate) struct DunningNews {
    /// (customer id, Stripe invoice id) of retries that failed in this step.
    pub(crate) retries_failed: Vec<(String, String)>,
    /// (customer id, Stripe invoice id) of cases that were suspended in this step.
    pub(crate) suspended: Vec<(String, String)>,
}

impl Timeline {
    pub(crate) fn new(start: NaiveDate) -> Self {
        Self {
            start,
            names: HashMap::new(),
            events: Vec::new(),
            seen_alerts: BTreeSet::new(),
            seen_emails: BTreeSet::new(),
            invoice_status: HashMap::new(),
            attempt_status: HashMap::new(),
            customer_status: HashMap::new(),
            emails_per_day: BTreeMap::new(),
            failed_emails: Vec::new(),
        }
    }

    /// Names customer `id` `name` in the timeline.
    pub(crate) fn name(&mut self, id: &str, name: &str) {
        self.names.insert(id.to_owned(), name.to_owned());
        self.customer_status.insert(id.to_owned(), "active".into());
    }

    fn name_of(&self, id: Option<&str>) -> String {
        id.and_then(|id| self.names.get(id))
            .cloned()
            .unwrap_or_else(|| "-".to_owned())
    }

    /// Adds an event at `at`; the events of one step are sorted when the step ends.
    pub(crate) fn push(
        &mut self,
        at: DateTime<Utc>,
        kind: &'static str,
        customer: &str,
        detail: String,
    ) {
        self.events.push(Event {
            at,
            day: (at.date_naive() - self.start).num_days() + 1,
            time: at.format("%Y-%m-%d %H:%M").to_string(),
            kind,
            customer: customer.to_owned(),
            detail,
        });
    }

    /// Adds an event for customer `id`.
    pub(crate) fn push_for(
        &mut self,
        at: DateTime<Utc>,
        kind: &'static str,
        id: &str,
        detail: String,
    ) {
        let name = self.name_of(Some(id));
        self.push(at, kind, &name, detail);
    }

    /// Sorts the events of the step at `at` (they were found in database order, which
    /// concurrent sends and random ids make unstable).
    pub(crate) fn end_step(&mut self, at: DateTime<Utc>) {
        let first = self
            .events
            .iter()
            .rposition(|e| e.at < at)
            .map_or(0, |i| i + 1);
        self.events[first..].sort();
    }

    /// Usage alerts recorded since the last look.
    pub(crate) async fn collect_alerts(
        &mut self,
        pool: &PgPool,
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let all = alerts::list(pool, None, DateTime::<Utc>::UNIX_EPOCH).await?;
        for alert in all.into_iter().rev() {
            if self.seen_alerts.insert(alert.id) {
                let detail = format!(
                    "{} at {} %: {} of {}",
                    alert.metric_type,
                    alert.threshold_percent,
                    alert.usage_quantity,
                    alert.limit_quantity
                );
                self.push_for(at, "alert", &alert.customer_id, detail);
            }
        }
        Ok(())
    }

    /// Emails sent since the last look (trial reminders are the reminder emails).
    pub(crate) async fn collect_emails(
        &mut self,
        pool: &PgPool,
        at: DateTime<Utc>,
    ) -> anyhow::Result<()> {
        let recent = email_log::recent(pool, 100_000).await?;
        for email in recent.into_iter().rev() {
            if !self.seen_emails.insert(email.id) {
                continue;
            }
            let customer = email.customer_id.clone().unwrap_or_default();
            if let Some(ahead) = email.email_type.strip_prefix("trial_ending_") {
                self.push_for(
                    at,
                    "trial_reminder",
                    &customer,
                    format!("trial ends in {ahead}"),
                );
            }
            *self.emails_per_day.entry(at.date_naive()).or_default() += 1;
            let detail = format!("{} ({})", email.email_type, email.status);
            if email.status == "failed" {
                let name = self.name_of(email.customer_id.as_deref());
                self.failed_emails.push(format!(
                    "{} {name} {}",
                    email.email_type,
                    at.format("%F %R")
                ));
            }
            self.push_for(at, "email", &customer, detail);
        }
        Ok(())
    }

    /// Invoices, dunning cases and customers' statuses changed since the last look.
    pub(crate) async fn collect_billing(
        &mut self,
        pool: &PgPool,
        at: DateTime<Utc>,
    ) -> anyhow::Result<DunningNews> {
        let mut news = DunningNews::default();
        for invoice in invoices::list(pool, None, None, 100_000).await? {
            let before = self
                .invoice_status
                .insert(invoice.id, invoice.status.clone());
            if before.as_deref() == Some(invoice.status.as_str()) {
                continue;
            }
            let month = invoice.period_start.format("%Y-%m");
            match invoice.status.as_str() {
                "pending" | "draft" => {}
                "paid" if before.is_some() => self.push_for(
                    at,
                    "invoice_paid",
                    &invoice.customer_id,
                    format!("{month}: {}", dollars(invoice.total_cents)),
                ),
                status => {
                    // Its overage lines, each named: the usage past the plan's allowance
                    // that was billed.
                    let overage: String = invoices::lines(pool, invoice.id)
                        .await?
                        .iter()
                        .filter(|l| l.kind == "overage")
                        .map(|l| {
                            format!(
                                ", overage {} {}",
                                l.metric_type.as_deref().unwrap_or("-"),
                                dollars(l.amount_cents)
                            )
                        })
                        .collect();
                    self.push_for(
                        at,
                        "invoice",
                        &invoice.customer_id,
                        format!(
                            "{month}: {} ({status}){overage}",
                            dollars(invoice.total_cents)
                        ),
                    )
                }
            }
        }
        let ids: Vec<String> = self.names.keys().cloned().collect();
        let mut ids = ids;
        ids.sort();
        for id in &ids {
            let mut rows = dunning::history(pool, id, 1_000).await?;
            rows.reverse();
            for row in rows {
                let key = (row.invoice_id.clone(), row.attempt_number);
                let before = self.attempt_status.insert(key, row.status.clone());
                if before.as_deref() == Some(row.status.as_str()) {
                    continue;
                }
                let amount = dollars(row.amount_due_cents);
                match (row.attempt_number, row.status.as_str()) {
                    (0, "failed") if before.is_none() => {
                        self.push_for(at, "payment_failed", id, format!("{amount} due"));
                    }
                    (0, "succeeded") if before.as_deref() == Some("failed") => {
                        self.push_for(at, "recovered", id, format!("{amount} paid"));
                    }
                    (0, "suspended") => news.suspended.push((id.clone(), row.invoice_id.clone())),
                    (n, "failed") if n > 0 => {
                        let code = row.failure_code.clone().unwrap_or_default();
                        self.push_for(at, "retry", id, format!("attempt {n}: declined ({code})"));
                        news.retries_failed
                            .push((id.clone(), row.invoice_id.clone()));
                    }
                    (n, "succeeded") if n > 0 => {
                        self.push_for(at, "retry", id, format!("attempt {n}: paid {amount}"));
                    }
                    _ => {}
                }
            }
        }
        for customer in customers::list_customers(pool).await? {
            let before = self
                .customer_status
                .insert(customer.id.clone(), customer.status.clone());
            match (before.as_deref(), customer.status.as_str()) {
                (Some("active"), "suspended") => {
                    self.push_for(at, "suspension", &customer.id, "service suspended".into());
                }
                (Some("suspended"), "active") => {
                    self.push_for(at, "reactivation", &customer.id, "service restored".into());
                }
                _ => {}
            }
        }
        Ok(news)
    }

    /// How many events of each kind.
    pub(crate) fn counts(&self) -> BTreeMap<&'static str, u64> {
        let mut counts = BTreeMap::new();
        for event in &self.events {
            *counts.entry(event.kind).or_default() += 1;
        }
        counts
    }

    /// The timeline as text, one line per event.
    pub(crate) fn text(&self) -> String {
        let mut out = String::new();
        for e in &self.events {
            out.push_str(&format!(
                "day {:>2}  {}  {:<15} {:<7} {}\n",
                e.day, e.time, e.kind, e.customer, e.detail
            ));
        }
        out
    }
}
