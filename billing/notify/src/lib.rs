//! Email for apex: the operations guide's queue (`email.<type>` rows in `events`, processed
//! every minute by the cron process's `email_queue` job and by `apexctl email process`), the
//! nine kinds of email it lists as templates (HTML and plain text), and the providers that
//! send them (Resend, SMTP, which also covers Amazon SES, and a folder of `.eml` files for
//! development). The billing domain decides what to send by writing `events`; this crate
//! carries it out. The edge never links it.
//!
//! - [`kinds`]: the email types (`welcome`, `trial_ending_7d`, `payment_retry_2`, ...), their
//!   categories (transactional or not) and queue priorities.
//! - [`message`]: an email ready to send, and the provider trait.
//! - [`templates`]: the kinds rendered as subject, HTML and text (`minijinja`).
//! - [`provider`]: Resend, SMTP (`lettre`) and the `.eml` folder behind the trait.
//! - [`config`]: `EMAIL_*`, `RESEND_*`, `SMTP_URL`, checked at start.
//! - [`queue`]: the queue worker: claim, decide, send, log.
//! - [`names`]: the crate's metric names.

pub mod config;
pub mod kinds;
pub mod message;
pub mod names;
pub mod provider;
pub mod queue;
pub mod templates;
#[cfg(feature = "test-support")]
pub mod testing;
