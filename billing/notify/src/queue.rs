//! The email queue (the guide's `processEmailQueue`, every minute in the cron process's
//! `email_queue` job, and `apexctl email process`): due `email.<type>` events are claimed in
//! bounded batches with `FOR UPDATE SKIP LOCKED` and a lease ([`apex_billing::events`]),
//! rendered, sent through the provider and logged in `email_log`.
//!
//! For each claimed event, in order:
//! 1. An unknown type, a missing or invalid `to`, or a template missing a field gives the event
//!    up at once (`error_message` set with `processed_at`): a poison event never blocks the
//!    queue.
//! 2. A plain `api_key` in the payload (the guide's test payload has one) is replaced by its
//!    prefix in `events` before anything else: the plain key is never stored nor sent.
//! 3. An opted-out customer's non-transactional email is done without sending.
//! 4. A suppressed address (hard bounce, complaint) gets no non-transactional email; a
//!    transactional one is logged `suppressed` for an operator and not sent.
//! 5. The guide's duplicate rule: the same type to the same customer at most once in 24 hours,
//!    for events enqueued without a `dedup_key`. A job that enqueues with one (a usage alert
//!    per metric, a dunning email per invoice, an SDK notice per platform and version) has
//!    decided once already: two metrics crossing 80 % the same day get two emails.
//! 6. Over the daily or monthly cap (counted from `email_log`), the event waits for the next
//!    UTC day or month: never failed, never dropped.
//! 7. The send happens inside a transaction that holds a lock on (customer, email type) and
//!    the event's row: the 24-hour rule is checked again under the lock (two workers never
//!    both send the same type to one customer), and the claim is renewed (a worker whose lease
//!    ran out sends nothing). The provider gets the email with idempotency key
//!    `apex-email-<event id>`; accepted, the `email_log` row and the event's `processed_at`
//!    commit with it. A 429 waits its `Retry-After` (at most the longest backoff) and is not an
//!    attempt; another transient failure retries with backoff (1 minute doubling to 6 hours)
//!    until `max_attempts`, then gives up; a permanent failure gives up at once; a provider
//!    that refuses us (credentials) stops the run without charging any email.
//!
//! A run stops after `max_run` of real time (default 4 minutes) even with events left: the
//! next minute's run goes on, so a backlog never holds a run past its timeout.
//!
//! Delivery is at least once: a worker that dies after the provider accepted and before the
//! commit (crash point `email_after_send` of `APEX_FAILPOINT`, for the tests) leaves the
//! event to be sent again after its lease, under the same key, which Resend deduplicates (for
//! 24 hours) and SMTP cannot (the README says so).

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::{Duration as StdDuration, Instant};

use apex_billing::email_log::{self, NewLogEntry};
use apex_billing::events::{self, ClaimedEvent, Outcome};
use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use futures_util::{StreamExt, stream};
use serde::Serialize;
use sqlx::PgPool;

use crate::kinds::{Category, EmailKind};
use crate::message::{EmailProvider, OutgoingEmail, SendError};
use crate::names;
use crate::templates;

/// How the queue runs.
#[derive(Debug, Clone)]
pub struct QueueSettings {
    /// Events claimed at once.
    pub batch_size: i64,
    /// How long a claim holds before another worker may take the event.
    pub lease: Duration,
    /// Attempts before an event is given up.
    pub max_attempts: i32,
    /// The first retry's wait; doubled for each further one.
    pub first_backoff: Duration,
    /// The longest wait between attempts (and the longest `Retry-After` honoured).
    pub max_backoff: Duration,
    /// Real time one run may take before it stops claiming (the rest goes next run).
    pub max_run: StdDuration,
    /// Sends a worker has in flight at once (each on its own connection).
    pub concurrency: usize,
    /// `From`.
    pub from: String,
    /// Sends a day through this provider at most (`EMAIL_DAILY_CAP`).
    pub daily_cap: Option<i64>,
    /// Sends a month at most (`EMAIL_MONTHLY_CAP`).
    pub monthly_cap: Option<i64>,
    /// The unsubscribe page; the queue adds `?customer=<id>&category=<category>`.
    pub unsubscribe_url: String,
}

impl Default for QueueSettings {
    fn default() -> Self {
        Self {
            batch_size: 200,
            lease: Duration::minutes(5),
            max_attempts: 8,
            first_backoff: Duration::minutes(1),
            max_backoff: Duration::hours(6),
            max_run: StdDuration::from_secs(240),
            concurrency: 4,
            from: "noreply@apexmediation.com".into(),
            daily_cap: None,
            monthly_cap: None,
            unsubscribe_url: "https://app.apexmediation.com/settings/email".into(),
        }
    }
}

impl QueueSettings {
    /// The defaults, with the sender, caps and unsubscribe page of `config`.
    pub fn from_config(config: &crate::config::EmailConfig) -> Self {
        Self {
            from: config.from.clone(),
            daily_cap: config.daily_cap,
            monthly_cap: config.monthly_cap,
            unsubscribe_url: config.unsubscribe_url.clone(),
            ..Self::default()
        }
    }
}

/// A worker name unique across hosts, processes and workers: `<prefix>:<host>:<pid>:<random>`
/// (`events.leased_by` tells claims apart by it).
pub fn worker_name(prefix: &str) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{prefix}:{host}:{}:{}",
        std::process::id(),
        apex_billing::ids::random_base62(8)
    )
}

/// What a run did, by outcome.
#[derive(Debug, Default, Clone, Serialize)]
pub struct ProcessReport {
    /// Events claimed.
    pub claimed: u64,
    /// Sent.
    pub sent: u64,
    /// The same type went to the customer within 24 hours: not sent again.
    pub duplicate: u64,
    /// Opted out: not sent.
    pub opted_out: u64,
    /// A suppressed address: not sent (a transactional one logged `suppressed`).
    pub suppressed: u64,
    /// Over a cap: waiting for the next day or month.
    pub deferred: u64,
    /// A transient failure: tried again later.
    pub failed: u64,
    /// Rate limited by the provider: tried again after its `Retry-After`, not counted.
    pub rate_limited: u64,
    /// Given up.
    pub given_up: u64,
    /// Events whose claim another worker took over (a lease that ran out): left to it.
    pub lost_claims: u64,
    /// Why the run stopped early: the provider refuses us (credentials), nothing was charged.
    pub provider_unavailable: Option<String>,
}

/// The queue failed as a whole (Postgres); per-event failures are in the report.
#[derive(Debug, thiserror::Error)]
pub enum QueueError {
    /// A query failed.
    #[error(transparent)]
    Billing(#[from] apex_billing::BillingError),
    /// Postgres failed.
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
}

/// A worker: a provider, settings, a name (for leases) and a clock.
pub struct Worker<'a> {
    /// Postgres.
    pub pool: &'a PgPool,
    /// Where emails go.
    pub provider: &'a dyn EmailProvider,
    /// How.
    pub settings: &'a QueueSettings,
    /// This worker's name in `events.leased_by`, unique ([`worker_name`]).
    pub name: String,
    /// The clock (the cron process's, simulated in tests).
    pub now: &'a (dyn Fn() -> DateTime<Utc> + Send + Sync),
}

/// What a batch's checks read up front: suppressed addresses, opt-outs, the (customer, type)
/// pairs sent within 24 hours, and the sends counted against the caps (all kept current as
/// the batch sends).
struct Known {
    suppressed: HashSet<String>,
    opt_outs: HashSet<(String, String)>,
    recent: HashSet<(String, String)>,
    sent_today: i64,
    sent_this_month: i64,
}

impl Known {
    /// A send that was counted against the caps did not happen.
    fn give_back_send(&mut self) {
        self.sent_today -= 1;
        self.sent_this_month -= 1;
    }
}

/// What to do with one event after looking at it.
enum Step {
    Finish(FinishKind),
    Send {
        email: OutgoingEmail,
        kind: EmailKind,
        customer_id: Option<String>,
    },
}

enum FinishKind {
    Duplicate,
    OptedOut,
    Suppressed {
        log: bool,
        kind: EmailKind,
        customer_id: Option<String>,
        to: String,
        subject: String,
    },
    Deferred(DateTime<Utc>),
    GiveUp(String),
}

/// How one event's turn ended, for the run.
enum Turn {
    Next,
    /// The provider asked us to slow down until then.
    Pause(DateTime<Utc>),
    /// The provider refuses us: stop the run.
    Stop(String),
}

impl Worker<'_> {
    /// Drains due events until none is due, `max_events` were claimed, the run's real-time
    /// budget is spent, or the provider stops us.
    pub async fn drain(&self, max_events: Option<u64>) -> Result<ProcessReport, QueueError> {
        let started = Instant::now();
        let mut report = ProcessReport::default();
        loop {
            if started.elapsed() >= self.settings.max_run {
                break;
            }
            let now = (self.now)();
            let limit = match max_events {
                Some(max) if report.claimed >= max => break,
                Some(max) => self.settings.batch_size.min((max - report.claimed) as i64),
                None => self.settings.batch_size,
            };
            let batch = events::claim_email_batch(
                self.pool,
                &self.name,
                now,
                now + self.settings.lease,
                limit,
            )
            .await?;
            if batch.is_empty() {
                break;
            }
            if !self.run_batch(batch, &mut report, Some(started)).await? {
                break;
            }
        }
        self.record_depth().await;
        Ok(report)
    }

    /// Sends event `id` alone, now, if it is due (`apexctl email send-test`: the rest of the
    /// queue is left to the queue). Returns false when it was not due or claimed elsewhere.
    pub async fn send_one(&self, id: i64) -> Result<(bool, ProcessReport), QueueError> {
        let now = (self.now)();
        let mut report = ProcessReport::default();
        let batch =
            events::claim_email_event(self.pool, id, &self.name, now, now + self.settings.lease)
                .await?;
        if batch.is_empty() {
            return Ok((false, report));
        }
        self.run_batch(batch, &mut report, None).await?;
        Ok((true, report))
    }

    /// Handles a claimed batch; false when the run must stop (rate limit, provider refused,
    /// time budget spent). Claims not handled are released (due again at once, or when the
    /// provider said).
    async fn run_batch(
        &self,
        batch: Vec<ClaimedEvent>,
        report: &mut ProcessReport,
        started: Option<Instant>,
    ) -> Result<bool, QueueError> {
        report.claimed += batch.len() as u64;
        let known = Mutex::new(self.known_for(&batch, (self.now)()).await?);
        let shared = Mutex::new(std::mem::take(report));
        // The first reason to stop: a rate limit, a provider refusing us, the time budget.
        let halt: Mutex<Option<Turn>> = Mutex::new(None);
        // Up to `concurrency` sends at once: each holds its own connection and transaction,
        // so a slow provider answer (or a file's write) does not idle the others. One
        // priority at a time: every payment email of the batch is done before a welcome starts.
        let mut groups: Vec<Vec<ClaimedEvent>> = Vec::new();
        for event in batch {
            match groups.last_mut() {
                Some(group) if group[0].priority == event.priority => group.push(event),
                _ => groups.push(vec![event]),
            }
        }
        let mut results: Vec<Result<(), QueueError>> = Vec::new();
        for group in groups {
            let done: Vec<Result<(), QueueError>> = stream::iter(group)
                .map(|event| {
                    let (shared, known, halt) = (&shared, &known, &halt);
                    async move {
                        if lock(halt).is_some() {
                            return Ok(());
                        }
                        if started.is_some_and(|s| s.elapsed() >= self.settings.max_run) {
                            lock(halt).get_or_insert(Turn::Next);
                            return Ok(());
                        }
                        match self.handle(event, shared, known).await? {
                            Turn::Next => {}
                            turn => {
                                lock(halt).get_or_insert(turn);
                            }
                        }
                        Ok(())
                    }
                })
                .buffer_unordered(self.settings.concurrency.max(1))
                .collect()
                .await;
            results.extend(done);
        }
        *report = shared.into_inner().unwrap_or_else(|e| e.into_inner());
        results.into_iter().collect::<Result<Vec<()>, _>>()?;
        match halt.into_inner().unwrap_or_else(|e| e.into_inner()) {
            None => Ok(true),
            // The time budget: the batch's other claims are free at once.
            Some(Turn::Next) => {
                self.release_claims(None).await?;
                Ok(false)
            }
            Some(Turn::Pause(until)) => {
                // The provider asked us to slow down: the batch's other claims wait as long,
                // for any worker, and this run stops.
                tracing::info!(%until, "email provider rate limit");
                self.release_claims(Some(until)).await?;
                Ok(false)
            }
            Some(Turn::Stop(reason)) => {
                tracing::error!(%reason, "the email provider refuses us; the queue stops until the setting is fixed");
                self.release_claims(None).await?;
                report.provider_unavailable = Some(reason);
                Ok(false)
            }
        }
    }

    /// What the batch's checks need, in a few queries for the whole batch instead of several
    /// per event.
    async fn known_for(
        &self,
        batch: &[ClaimedEvent],
        now: DateTime<Utc>,
    ) -> Result<Known, QueueError> {
        let mut addresses = Vec::new();
        let mut customers = Vec::new();
        for event in batch {
            if let Some(to) = event.data.get("to").and_then(|v| v.as_str()) {
                addresses.push(to.trim().to_lowercase());
            }
            if let Some(customer) = event.data.get("customer_id").and_then(|v| v.as_str()) {
                customers.push(customer.to_owned());
            }
        }
        let (sent_today, sent_this_month) =
            if self.settings.daily_cap.is_some() || self.settings.monthly_cap.is_some() {
                email_log::sent_counts(self.pool, self.provider.name(), now).await?
            } else {
                (0, 0)
            };
        Ok(Known {
            suppressed: email_log::suppressed_among(self.pool, &addresses).await?,
            opt_outs: email_log::opt_outs_among(self.pool, &customers).await?,
            recent: email_log::sent_recently_among(self.pool, &customers, now).await?,
            sent_today,
            sent_this_month,
        })
    }

    /// Ends this worker's remaining claims: due again at `until` (a provider's
    /// `Retry-After`), or at once.
    async fn release_claims(&self, until: Option<DateTime<Utc>>) -> Result<(), QueueError> {
        events::release_email_claims(self.pool, &self.name, until).await?;
        Ok(())
    }

    async fn record_depth(&self) {
        if let Ok((depth, age)) = events::email_queue_depth(self.pool, (self.now)()).await {
            metrics::gauge!(names::QUEUE_DEPTH).set(depth as f64);
            metrics::gauge!(names::OLDEST_DUE_AGE_SECONDS).set(age.max(0.0));
        }
    }

    /// Handles one claimed event.
    async fn handle(
        &self,
        mut event: ClaimedEvent,
        report: &Mutex<ProcessReport>,
        known: &Mutex<Known>,
    ) -> Result<Turn, QueueError> {
        let kind = EmailKind::from_event_type(&event.event_type);
        let type_label = kind.map_or("unknown".to_owned(), EmailKind::email_type);
        // The plain key must never be stored: keep its prefix only, before anything else.
        if let Some(scrubbed) = scrub_api_key(&event.data) {
            events::set_data(self.pool, event.id, &scrubbed).await?;
            event.data = scrubbed;
        }
        let step = self.decide(&event, kind, &mut lock(known));
        let (email, kind, customer_id) = match step {
            Step::Finish(finish) => {
                self.finish(&event, &type_label, finish, report).await?;
                return Ok(Turn::Next);
            }
            Step::Send {
                email,
                kind,
                customer_id,
            } => (email, kind, customer_id),
        };
        let email_type = kind.email_type();
        // The send happens inside this transaction: the (customer, type) lock and the
        // event's row are held while the provider answers, so no other worker sends the same
        // type to the customer meanwhile, nor this event.
        let mut tx = self.pool.begin().await?;
        let now = (self.now)();
        if let Some(customer) = &customer_id {
            email_log::lock_recipient_type(&mut *tx, customer, &email_type).await?;
            if event.dedup_key.is_none()
                && email_log::sent_recently(&mut *tx, customer, &email_type, now).await?
            {
                drop(tx);
                self.finish(&event, &type_label, FinishKind::Duplicate, report)
                    .await?;
                let mut known = lock(known);
                known.recent.insert((customer.clone(), email_type));
                known.give_back_send();
                return Ok(Turn::Next);
            }
        }
        if !events::renew_email_lease(&mut *tx, event.id, &self.name, now + self.settings.lease)
            .await?
        {
            // Our lease ran out and another worker holds the event: it sends it.
            lock(report).lost_claims += 1;
            lock(known).give_back_send();
            return Ok(Turn::Next);
        }
        let started = Instant::now();
        let sent = self.provider.send(&email).await;
        metrics::histogram!(names::SEND_DURATION_SECONDS, "provider" => self.provider.name())
            .record(started.elapsed().as_secs_f64());
        let now = (self.now)();
        match sent {
            Ok(accepted) => {
                apex_core::failpoint::hit("email_after_send");
                events::finish_email(
                    &mut *tx,
                    event.id,
                    &self.name,
                    now,
                    &Outcome::Done { note: None },
                )
                .await?;
                email_log::record(
                    &mut *tx,
                    &NewLogEntry {
                        customer_id: customer_id.as_deref(),
                        email_type: &email_type,
                        recipient: &email.to,
                        subject: &email.subject,
                        provider: self.provider.name(),
                        provider_message_id: Some(&accepted.provider_message_id),
                        event_id: event.id,
                        status: "sent",
                        idempotency_key: &email.idempotency_key,
                        at: now,
                    },
                )
                .await?;
                tx.commit().await?;
                lock(report).sent += 1;
                let mut known = lock(known);
                if let Some(customer) = customer_id {
                    known.recent.insert((customer, email_type));
                }
                count(&type_label, "sent");
                Ok(Turn::Next)
            }
            Err(error) => {
                // Nothing was sent: the locks go, and the outcome is recorded on its own.
                drop(tx);
                lock(known).give_back_send();
                self.failed(&event, &type_label, error, now, report).await
            }
        }
    }

    /// Records a failed send: later (transient), given up (permanent, or out of attempts), or
    /// the run stops (rate limit, provider refusing us).
    async fn failed(
        &self,
        event: &ClaimedEvent,
        type_label: &str,
        error: SendError,
        now: DateTime<Utc>,
        report: &Mutex<ProcessReport>,
    ) -> Result<Turn, QueueError> {
        match error {
            SendError::Transient {
                reason,
                retry_after,
                rate_limited: true,
            } => {
                // Honoured up to the longest backoff: a "come back in a year" is a glitch.
                let wait = retry_after
                    .and_then(|w| Duration::from_std(w).ok())
                    .unwrap_or(Duration::seconds(1))
                    .clamp(Duration::seconds(1), self.settings.max_backoff);
                let at = now + wait;
                events::finish_email(
                    self.pool,
                    event.id,
                    &self.name,
                    now,
                    &Outcome::Later {
                        at,
                        error: Some(&reason),
                        counted: false,
                    },
                )
                .await?;
                lock(report).rate_limited += 1;
                count(type_label, "deferred");
                Ok(Turn::Pause(at))
            }
            SendError::Transient { reason, .. } => {
                let attempts = event.attempts + 1;
                if attempts >= self.settings.max_attempts {
                    let error = format!("given up after {attempts} attempts: {reason}");
                    self.finish(event, type_label, FinishKind::GiveUp(error), report)
                        .await?;
                } else {
                    let at = now + self.backoff(attempts);
                    events::finish_email(
                        self.pool,
                        event.id,
                        &self.name,
                        now,
                        &Outcome::Later {
                            at,
                            error: Some(&reason),
                            counted: true,
                        },
                    )
                    .await?;
                    lock(report).failed += 1;
                    count(type_label, "failed");
                }
                Ok(Turn::Next)
            }
            SendError::Permanent { reason } => {
                let error = format!("the provider refused it: {reason}");
                self.finish(event, type_label, FinishKind::GiveUp(error), report)
                    .await?;
                Ok(Turn::Next)
            }
            SendError::Unavailable { reason } => {
                events::finish_email(
                    self.pool,
                    event.id,
                    &self.name,
                    now,
                    &Outcome::Later {
                        at: now + self.settings.first_backoff,
                        error: Some(&reason),
                        counted: false,
                    },
                )
                .await?;
                count(type_label, "failed");
                Ok(Turn::Stop(reason))
            }
        }
    }

    /// The wait before attempt `attempts + 1`: the first backoff doubled per attempt made,
    /// capped.
    fn backoff(&self, attempts: i32) -> Duration {
        let doublings = (attempts - 1).clamp(0, 20) as u32;
        let wait = self.settings.first_backoff * 2i32.pow(doublings);
        wait.min(self.settings.max_backoff)
    }

    /// Looks at an event: what to send, or how it ends without a send.
    fn decide(&self, event: &ClaimedEvent, kind: Option<EmailKind>, known: &mut Known) -> Step {
        let Some(kind) = kind else {
            return Step::Finish(FinishKind::GiveUp(format!(
                "unknown email type {:?}",
                event.event_type
            )));
        };
        let to = match event.data.get("to").and_then(|v| v.as_str()) {
            Some(to) if is_address(to) => to.trim().to_owned(),
            Some(to) => {
                return Step::Finish(FinishKind::GiveUp(format!(
                    "invalid recipient address {to:?}"
                )));
            }
            None => {
                return Step::Finish(FinishKind::GiveUp("the event has no \"to\" address".into()));
            }
        };
        let customer_id = event
            .data
            .get("customer_id")
            .and_then(|v| v.as_str())
            .map(str::to_owned);
        let now = (self.now)();
        let category = kind.category();
        if let (Some(customer), Some(name)) = (&customer_id, category.opt_out_name())
            && known
                .opt_outs
                .contains(&(customer.clone(), name.to_owned()))
        {
            return Step::Finish(FinishKind::OptedOut);
        }
        let mut data = event.data.clone();
        if let (Some(customer), Some(name)) = (&customer_id, category.opt_out_name())
            && let Some(map) = data.as_object_mut()
        {
            // Encoded: a customer id is ours, but nothing in a header is taken on trust.
            let query: String = form_urlencoded::Serializer::new(String::new())
                .append_pair("customer", customer)
                .append_pair("category", name)
                .finish();
            map.insert(
                "unsubscribe_url".into(),
                serde_json::Value::String(format!("{}?{query}", self.settings.unsubscribe_url)),
            );
        }
        let rendered = match templates::render(kind, &data) {
            Ok(rendered) => rendered,
            Err(e) => {
                return Step::Finish(FinishKind::GiveUp(format!(
                    "cannot render {}: {e}",
                    kind.email_type()
                )));
            }
        };
        if known.suppressed.contains(&to.to_lowercase()) {
            return Step::Finish(FinishKind::Suppressed {
                log: category == Category::Transactional,
                kind,
                customer_id,
                to,
                subject: rendered.subject,
            });
        }
        if let Some(customer) = &customer_id
            && event.dedup_key.is_none()
            && known
                .recent
                .contains(&(customer.clone(), kind.email_type()))
        {
            return Step::Finish(FinishKind::Duplicate);
        }
        if let Some(until) = self.over_cap(now, known) {
            return Step::Finish(FinishKind::Deferred(until));
        }
        // The send takes its place under the caps now (sends run concurrently); a send that
        // does not happen gives it back.
        known.sent_today += 1;
        known.sent_this_month += 1;
        let list_unsubscribe = data
            .get("unsubscribe_url")
            .and_then(|v| v.as_str())
            .filter(|_| category != Category::Transactional)
            .map(|url| format!("<{url}>"));
        Step::Send {
            email: OutgoingEmail {
                idempotency_key: format!("apex-email-{}", event.id),
                from: self.settings.from.clone(),
                to,
                subject: rendered.subject,
                html: rendered.html,
                text: rendered.text,
                list_unsubscribe,
                email_type: kind.email_type(),
            },
            kind,
            customer_id,
        }
    }

    /// When the caps allow the next send, if they do not allow one now. Counted from
    /// `email_log` at the batch's start and kept in step as it sends (workers running at once
    /// can overshoot a cap by what they send in one batch).
    fn over_cap(&self, now: DateTime<Utc>, known: &Known) -> Option<DateTime<Utc>> {
        let today = now.date_naive();
        if self
            .settings
            .monthly_cap
            .is_some_and(|cap| known.sent_this_month >= cap)
        {
            return Some(next_month(today));
        }
        if self
            .settings
            .daily_cap
            .is_some_and(|cap| known.sent_today >= cap)
        {
            return Some(midnight(today + Duration::days(1)));
        }
        None
    }

    async fn finish(
        &self,
        event: &ClaimedEvent,
        type_label: &str,
        finish: FinishKind,
        report: &Mutex<ProcessReport>,
    ) -> Result<(), QueueError> {
        let now = (self.now)();
        let (outcome, label) = match &finish {
            FinishKind::Duplicate => (
                Outcome::Done {
                    note: Some(
                        "duplicate: the same email type went to this customer within 24 hours",
                    ),
                },
                "duplicate",
            ),
            FinishKind::OptedOut => (
                Outcome::Done {
                    note: Some("opted out: the customer refused this category"),
                },
                "opted_out",
            ),
            FinishKind::Suppressed { .. } => (
                Outcome::Done {
                    note: Some("suppressed: the address bounced or complained"),
                },
                "suppressed",
            ),
            FinishKind::Deferred(at) => (
                Outcome::Later {
                    at: *at,
                    error: Some("deferred: over the provider's send cap"),
                    counted: false,
                },
                "deferred",
            ),
            FinishKind::GiveUp(error) => (Outcome::GivenUp { error }, "given_up"),
        };
        let mut tx = self.pool.begin().await?;
        if !events::finish_email(&mut *tx, event.id, &self.name, now, &outcome).await? {
            lock(report).lost_claims += 1;
            return Ok(());
        }
        if let FinishKind::Suppressed {
            log: true,
            kind,
            customer_id,
            to,
            subject,
        } = &finish
        {
            // A transactional email that did not go: logged, for an operator to reach the
            // customer some other way.
            tracing::warn!(event = event.id, %kind, "transactional email to a suppressed address not sent");
            email_log::record(
                &mut *tx,
                &NewLogEntry {
                    customer_id: customer_id.as_deref(),
                    email_type: &kind.email_type(),
                    recipient: to,
                    subject,
                    provider: self.provider.name(),
                    provider_message_id: None,
                    event_id: event.id,
                    status: "suppressed",
                    idempotency_key: &format!("apex-email-{}", event.id),
                    at: now,
                },
            )
            .await?;
        }
        tx.commit().await?;
        let mut report = lock(report);
        match finish {
            FinishKind::Duplicate => report.duplicate += 1,
            FinishKind::OptedOut => report.opted_out += 1,
            FinishKind::Suppressed { .. } => report.suppressed += 1,
            FinishKind::Deferred(_) => report.deferred += 1,
            FinishKind::GiveUp(error) => {
                tracing::warn!(event = event.id, %error, "email given up");
                report.given_up += 1;
            }
        }
        count(type_label, label);
        Ok(())
    }
}

/// A lock whose holder never panics mid-update (the counters stay usable regardless).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn count(email_type: &str, outcome: &'static str) {
    metrics::counter!(names::EMAILS_TOTAL, "type" => email_type.to_owned(), "outcome" => outcome)
        .increment(1);
}

fn midnight(day: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&day.and_hms_opt(0, 0, 0).expect("midnight exists"))
}

fn next_month(day: NaiveDate) -> DateTime<Utc> {
    let (year, month) = if day.month() == 12 {
        (day.year() + 1, 1)
    } else {
        (day.year(), day.month() + 1)
    };
    midnight(NaiveDate::from_ymd_opt(year, month, 1).expect("the first of a month exists"))
}

/// A plausible single address: one `@`, something on both sides, a dot in the domain, no
/// spaces, brackets or separators (so no header can be smuggled in); the provider has the
/// last word.
fn is_address(text: &str) -> bool {
    let text = text.trim();
    if text.len() > 320
        || text
            .chars()
            .any(|c| c.is_whitespace() || c.is_control() || "<>,;\"()[]\\".contains(c))
    {
        return false;
    }
    let mut parts = text.split('@');
    let (Some(local), Some(domain), None) = (parts.next(), parts.next(), parts.next()) else {
        return false;
    };
    !local.is_empty() && domain.contains('.') && !domain.starts_with('.') && !domain.ends_with('.')
}

/// The payload without a plain `api_key`: replaced by `api_key_prefix` (its first 12
/// characters, the prefix `apexctl keys list` shows, but never more than half of it, so a
/// short key such as the guide's `rsk_test123` is not shown whole). `None` when there is none.
pub fn scrub_api_key(data: &serde_json::Value) -> Option<serde_json::Value> {
    let key = data.get("api_key")?.as_str().map(str::to_owned);
    let mut data = data.clone();
    let map = data.as_object_mut()?;
    map.remove("api_key");
    if let Some(key) = key
        && !map.contains_key("api_key_prefix")
    {
        let shown = 12.min(key.chars().count() / 2);
        let prefix: String = key.chars().take(shown).collect();
        map.insert("api_key_prefix".into(), serde_json::Value::String(prefix));
    }
    Some(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_checked_plainly() {
        for good in ["dev@example.com", "a.b+c@sub.example.co.uk", " x@y.io "] {
            assert!(is_address(good), "{good}");
        }
        for bad in [
            "",
            "nobody",
            "@example.com",
            "a@b",
            "a@@b.com",
            "a b@c.com",
            "a@b.com, c@d.com",
            "<a@b.com>",
            "a@b.com\r\nBcc: x@y.com",
            "a@.com",
        ] {
            assert!(!is_address(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_plain_key_leaves_only_its_prefix() {
        let data = serde_json::json!({"to": "a@b.com", "api_key": "rsk_test123456789abcdef"});
        let scrubbed = scrub_api_key(&data).unwrap();
        // 23 characters: the first 11 (never more than half).
        assert_eq!(scrubbed["api_key_prefix"], "rsk_test123");
        assert!(scrubbed.get("api_key").is_none());
        assert!(!scrubbed.to_string().contains("rsk_test123456789abcdef"));
        assert_eq!(scrub_api_key(&serde_json::json!({"to": "a@b.com"})), None);
        let short = scrub_api_key(&serde_json::json!({"api_key": "rsk_test123"})).unwrap();
        assert_eq!(short["api_key_prefix"], "rsk_t");
    }

    #[test]
    fn caps_wait_for_the_next_day_or_month() {
        let day = NaiveDate::from_ymd_opt(2026, 12, 31).unwrap();
        assert_eq!(next_month(day).to_rfc3339(), "2027-01-01T00:00:00+00:00");
        assert_eq!(
            midnight(day + Duration::days(1)).to_rfc3339(),
            "2027-01-01T00:00:00+00:00"
        );
    }
}
