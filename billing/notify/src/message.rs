//! An email ready to send, what a provider answers, and the one trait every provider
//! implements (Resend, SMTP, the file folder), chosen by configuration.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

/// A rendered email, addressed and keyed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutgoingEmail {
    /// `apex-email-<event id>`: Resend's `Idempotency-Key`, and the local part of the SMTP
    /// `Message-ID` (`<apex-email-<event id>@<from domain>>`), so a resend after a crash is
    /// the same message.
    pub idempotency_key: String,
    /// `EMAIL_FROM` (default `noreply@apexmediation.com`).
    pub from: String,
    /// The recipient.
    pub to: String,
    /// The subject (UTF-8; providers encode it as their protocol needs).
    pub subject: String,
    /// The HTML part.
    pub html: String,
    /// The plain-text part.
    pub text: String,
    /// The `List-Unsubscribe` header's value (`<https://...>`) for non-transactional email.
    pub list_unsubscribe: Option<String>,
    /// The `email_type` (a Resend tag, an `X-Apex-Email-Type` header).
    pub email_type: String,
}

/// The provider took the email.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    /// The provider's id of the message (Resend's email id; the `Message-ID` over SMTP and in
    /// the folder's files), kept in `email_log.provider_message_id`.
    pub provider_message_id: String,
}

/// The provider did not take the email.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// It may succeed later: a 5xx, a timeout, a refused connection, a 429.
    #[error("{reason}")]
    Transient {
        /// What happened.
        reason: String,
        /// When the provider said to come back (a 429's `Retry-After`).
        retry_after: Option<Duration>,
        /// True for a rate limit (a 429): not counted as an attempt.
        rate_limited: bool,
    },
    /// It never will: a 422, an invalid address, a refused sender.
    #[error("{reason}")]
    Permanent {
        /// What happened.
        reason: String,
    },
    /// The provider refuses us, whatever the email: a rejected or revoked API key, a failed
    /// SMTP login. Nothing can go until a person fixes the setting, so the queue stops,
    /// charges no email an attempt and gives none up.
    #[error("{reason}")]
    Unavailable {
        /// What happened.
        reason: String,
    },
}

/// A boxed future of a send, so providers can sit behind `dyn EmailProvider`.
pub type SendFuture<'a> = Pin<Box<dyn Future<Output = Result<Accepted, SendError>> + Send + 'a>>;

/// A way to send email.
pub trait EmailProvider: Send + Sync {
    /// Its name (`resend`, `smtp`, `file`): the `provider` label and `email_log.provider`.
    fn name(&self) -> &'static str;

    /// Sends `email` once. The same `idempotency_key` sent twice must not make two emails
    /// where the provider can promise that (Resend keeps keys for 24 hours; SMTP cannot, see
    /// the README).
    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> SendFuture<'a>;
}
