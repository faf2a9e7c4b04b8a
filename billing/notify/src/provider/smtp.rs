//! SMTP through `lettre` (async on tokio, rustls): covers any relay, Amazon SES among them,
//! without its SDK. Also builds the MIME message that the [`file`](super::file) provider writes.
//!
//! The message is `multipart/alternative` (plain text, then HTML), with a subject and any
//! non-ASCII header encoded by lettre as RFC 2047 words (so "⚠️ Payment failed" survives),
//! `Message-ID: <{idempotency key}@{domain of From}>`, `X-Apex-Email-Type` and, for email a
//! customer may refuse, `List-Unsubscribe`.
//!
//! What SMTP can promise: the `Message-ID` is deterministic, so a message sent again after a
//! crash (the relay accepted it, the worker died before it logged that) is recognisably the
//! same message, and many receivers and archives drop or thread duplicates by it. What it
//! cannot: SMTP has no idempotency key. A relay that accepted the first copy accepts the
//! second and delivers both, SES included (it even replaces the `Message-ID` with its own,
//! keeping ours only in its logs). The queue's own bookkeeping keeps that window to a crash
//! between "250 OK" and the commit that logs it.
//!
//! Errors: a 5xx reply is [`SendError::Permanent`] (the relay refused the message for good:
//! a bad recipient, a refused sender, a message too large), and so is a non-ASCII address to
//! a relay without SMTPUTF8 (lettre refuses it before sending). A 4xx reply, a timeout, a
//! refused or dropped connection, a TLS failure, a relay that does not offer the STARTTLS we
//! require, and a failed `AUTH` (530, 534, 535, 538: a wrong `SMTP_URL`, which must not make
//! the queue give up every email) are [`SendError::Transient`].

use std::str::FromStr;
use std::time::Duration;

use lettre::message::header::{HeaderName, HeaderValue};
use lettre::message::{Mailbox, MultiPart};
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::transport::smtp::extension::ClientId;
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};

use crate::message::{Accepted, EmailProvider, OutgoingEmail, SendError, SendFuture};
use crate::provider::check_idempotency_key;

/// Timeout of one SMTP conversation step (connect, each command), unless set otherwise:
/// long enough for a slow relay's `DATA`, short enough that a dead one does not hold a batch.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SmtpTls {
    /// `smtps://` (default port 465): TLS from the first byte.
    Implicit,
    /// `smtp://` (default port 587): the server must offer STARTTLS, or nothing is sent.
    /// The default for `smtp://`, so a stripped STARTTLS offer cannot downgrade the
    /// connection and expose the password.
    StartTlsRequired,
    /// `smtp://...?tls=opportunistic`: STARTTLS when offered, plaintext otherwise (open to a
    /// man in the middle; for relays on a trusted network only).
    StartTlsOpportunistic,
    /// `smtp://...?tls=none`: plaintext, for a local mail catcher (aiosmtpd, MailHog). With
    /// a password it is refused unless the host is loopback.
    None,
}

/// An SMTP relay. `Debug` prints the password as `***`.
#[derive(Clone, PartialEq)]
pub struct SmtpSettings {
    /// Host name or IP address.
    pub host: String,
    /// Port.
    pub port: u16,
    /// How the connection is protected.
    pub tls: SmtpTls,
    /// User name for `AUTH`, when the relay wants one.
    pub username: Option<String>,
    /// Password for `AUTH` (secret).
    pub password: Option<String>,
    /// The name sent in `EHLO`; `None` is this machine's host name.
    pub hello_name: Option<String>,
    /// Timeout of each step ([`DEFAULT_TIMEOUT`]).
    pub timeout: Duration,
}

impl std::fmt::Debug for SmtpSettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpSettings")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls)
            .field("username", &self.username)
            .field("password", &self.password.as_ref().map(|_| "***"))
            .field("hello_name", &self.hello_name)
            .field("timeout", &self.timeout)
            .finish()
    }
}

impl SmtpSettings {
    /// Parses `SMTP_URL`: `scheme://[user[:password]@]host[:port][/ehlo-name][?tls=MODE]`.
    ///
    /// - `smtps://` is implicit TLS, port 465 by default; `tls` may not be given.
    /// - `smtp://` is port 587 by default, with `tls=required` (the default: STARTTLS or
    ///   nothing), `tls=opportunistic` or `tls=none` (plaintext; see [`SmtpTls::None`]).
    ///
    /// User and password are percent-decoded (write `@` as `%40`). Errors: why the URL was
    /// refused, never containing the password.
    pub fn from_url(raw: &str) -> Result<Self, String> {
        // The URL parser's own messages name no part of the input, so no password leaks.
        let url = url::Url::parse(raw).map_err(|e| format!("not a URL: {e}"))?;
        let mut tls_param = None;
        for (key, value) in url.query_pairs() {
            match key.as_ref() {
                "tls" if tls_param.is_none() => tls_param = Some(value.into_owned()),
                _ => {
                    return Err(format!(
                        "unknown or repeated parameter {key:?} (only tls=required|opportunistic|none)"
                    ));
                }
            }
        }
        let (tls, default_port) = match (url.scheme(), tls_param.as_deref()) {
            ("smtps", None) => (SmtpTls::Implicit, 465),
            ("smtps", Some(_)) => {
                return Err("smtps:// is always TLS: drop the tls parameter".into());
            }
            ("smtp", None | Some("required")) => (SmtpTls::StartTlsRequired, 587),
            ("smtp", Some("opportunistic")) => (SmtpTls::StartTlsOpportunistic, 587),
            ("smtp", Some("none")) => (SmtpTls::None, 587),
            ("smtp", Some(other)) => {
                return Err(format!(
                    "tls={other:?}: must be required, opportunistic or none"
                ));
            }
            (scheme, _) => return Err(format!("scheme {scheme:?}: must be smtp or smtps")),
        };
        let host = url
            .host_str()
            .filter(|h| !h.is_empty())
            .ok_or("no host")?
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        let decode = |part: &str, what: &str| {
            percent_decode(part)
                .ok_or_else(|| format!("the {what} is not valid percent-encoded UTF-8"))
        };
        let username = match url.username() {
            "" => None,
            user => Some(decode(user, "user name")?),
        };
        let password = match url.password() {
            None => None,
            Some(pass) => Some(decode(pass, "password")?),
        };
        if password.is_some() && username.is_none() {
            return Err("a password without a user name".into());
        }
        let loopback = host == "localhost"
            || host
                .parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback());
        if tls == SmtpTls::None && password.is_some() && !loopback {
            return Err(
                "tls=none would send the password in clear to a remote host: use smtps:// or STARTTLS"
                    .into(),
            );
        }
        let hello_name = match url.path().trim_matches('/') {
            "" => None,
            name => Some(name.to_owned()),
        };
        Ok(Self {
            host,
            port: url.port().unwrap_or(default_port),
            tls,
            username,
            password,
            hello_name,
            timeout: DEFAULT_TIMEOUT,
        })
    }
}

/// `%XX` decoding of a URL's user or password (the `url` crate keeps them encoded).
fn percent_decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = std::str::from_utf8(bytes.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Sends through an SMTP relay, with a small pool of connections kept open between emails.
pub struct SmtpProvider {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    settings: SmtpSettings,
}

impl std::fmt::Debug for SmtpProvider {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SmtpProvider")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl SmtpProvider {
    /// A provider for `settings`. Connects nothing yet (the first email does), but starts the
    /// connection pool's clean-up task, so it must be called inside a tokio runtime. Errors:
    /// no runtime, or the TLS settings cannot be made (a host name rustls refuses).
    pub fn new(settings: &SmtpSettings) -> Result<Self, String> {
        // lettre's pool spawns its task at once and would panic without a runtime.
        tokio::runtime::Handle::try_current()
            .map_err(|_| "the SMTP provider must be built inside a tokio runtime".to_owned())?;
        let tls_params = || {
            TlsParameters::new(settings.host.clone())
                .map_err(|e| format!("TLS to {}: {e}", settings.host))
        };
        let tls = match settings.tls {
            SmtpTls::Implicit => Tls::Wrapper(tls_params()?),
            SmtpTls::StartTlsRequired => Tls::Required(tls_params()?),
            SmtpTls::StartTlsOpportunistic => Tls::Opportunistic(tls_params()?),
            SmtpTls::None => Tls::None,
        };
        // `builder_dangerous` only means "no TLS unless you set it": it is set just above.
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&settings.host)
            .port(settings.port)
            .tls(tls)
            .timeout(Some(settings.timeout));
        if let Some(user) = &settings.username {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                settings.password.clone().unwrap_or_default(),
            ));
        }
        if let Some(name) = &settings.hello_name {
            builder = builder.hello_name(ClientId::Domain(name.clone()));
        }
        Ok(Self {
            transport: builder.build(),
            settings: settings.clone(),
        })
    }
}

impl EmailProvider for SmtpProvider {
    fn name(&self) -> &'static str {
        "smtp"
    }

    fn send<'a>(&'a self, email: &'a OutgoingEmail) -> SendFuture<'a> {
        Box::pin(async move {
            let built = build_message(email)?;
            self.transport
                .send(built.message)
                .await
                .map_err(|e| classify(&e))?;
            Ok(Accepted {
                provider_message_id: built.message_id,
            })
        })
    }
}

/// The reply codes of a failed `AUTH` (RFC 4954: 530 required, 534 mechanism too weak, 535
/// bad credentials, 538 encryption required): the relay's settings, not this message.
const AUTH_REPLIES: [&str; 4] = ["530", "534", "535", "538"];

/// Transient, permanent or unavailable (see the module's doc). A failed `AUTH` is a 5xx but
/// not about the message: it is `SMTP_URL` that is wrong (a rotated password), so it stops
/// the queue ([`SendError::Unavailable`]) rather than give up every email of it. Of what lettre refuses before sending,
/// only a non-ASCII address to a relay without SMTPUTF8 is about the message; the rest (no
/// STARTTLS offered, no common AUTH mechanism) is about the relay, so transient too.
fn classify(error: &lettre::transport::smtp::Error) -> SendError {
    let reason = format!("SMTP: {}", innermost(error));
    let auth_reply = error
        .status()
        .is_some_and(|code| AUTH_REPLIES.contains(&code.to_string().as_str()));
    let message_refused_by_client = error.is_client() && reason.contains("SMTPUTF8");
    if auth_reply {
        SendError::Unavailable { reason }
    } else if error.is_permanent() || message_refused_by_client {
        SendError::Permanent { reason }
    } else {
        SendError::Transient {
            reason,
            retry_after: None,
            rate_limited: false,
        }
    }
}

/// The error with its causes ("connection refused" says more than "Connection error").
fn innermost(error: &lettre::transport::smtp::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text = format!("{text}: {cause_text}");
        }
        source = cause.source();
    }
    text
}

/// A built MIME message and its `Message-ID`.
pub(crate) struct BuiltMessage {
    pub(crate) message: Message,
    /// `<key@domain>`, angle brackets included, as in the header.
    pub(crate) message_id: String,
}

/// Builds the MIME message of `email`. Errors: [`SendError::Permanent`] for what no retry can
/// fix (a From or To that is not an address, a key that cannot be a `Message-ID`, a header
/// value with line breaks or non-ASCII).
pub(crate) fn build_message(email: &OutgoingEmail) -> Result<BuiltMessage, SendError> {
    let permanent = |reason: String| SendError::Permanent { reason };
    check_idempotency_key(&email.idempotency_key)?;
    let from = Mailbox::from_str(&email.from)
        .map_err(|e| permanent(format!("From {:?} is not an address: {e}", email.from)))?;
    let to = Mailbox::from_str(&email.to)
        .map_err(|e| permanent(format!("To {:?} is not an address: {e}", email.to)))?;
    let message_id = format!("<{}@{}>", email.idempotency_key, from.email.domain());
    let mut builder = Message::builder()
        .from(from)
        .to(to)
        .subject(email.subject.clone())
        .message_id(Some(message_id.clone()));
    builder = builder.raw_header(HeaderValue::new(
        HeaderName::new_from_ascii_str("X-Apex-Email-Type"),
        plain_header("X-Apex-Email-Type", &email.email_type)?,
    ));
    if let Some(unsubscribe) = &email.list_unsubscribe {
        builder = builder.raw_header(HeaderValue::new(
            HeaderName::new_from_ascii_str("List-Unsubscribe"),
            plain_header("List-Unsubscribe", unsubscribe)?,
        ));
    }
    let message = builder
        .multipart(MultiPart::alternative_plain_html(
            email.text.clone(),
            email.html.clone(),
        ))
        .map_err(|e| permanent(format!("cannot build the message: {e}")))?;
    Ok(BuiltMessage {
        message,
        message_id,
    })
}

/// A header value we write ourselves must be printable ASCII on one line: these headers are
/// read by machines (mail clients' unsubscribe buttons), which RFC 2047 words would confuse.
fn plain_header(name: &str, value: &str) -> Result<String, SendError> {
    if !value.is_empty() && value.chars().all(|c| c == ' ' || c.is_ascii_graphic()) {
        Ok(value.to_owned())
    } else {
        Err(SendError::Permanent {
            reason: format!("{name} {value:?} is not one line of printable ASCII"),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn email() -> OutgoingEmail {
        OutgoingEmail {
            idempotency_key: "apex-email-7".into(),
            from: "Apex <noreply@apexmediation.com>".into(),
            to: "dev@studio.example".into(),
            subject: "⚠️ Payment failed - action required".into(),
            html: "<p>Hello</p>".into(),
            text: "Hello".into(),
            list_unsubscribe: Some("<https://app.example/settings/email?c=1>".into()),
            email_type: "payment_failed".into(),
        }
    }

    #[test]
    fn the_message_has_our_headers() {
        let built = build_message(&email()).unwrap();
        assert_eq!(built.message_id, "<apex-email-7@apexmediation.com>");
        let text = String::from_utf8(built.message.formatted()).unwrap();
        assert!(
            text.contains("Message-ID: <apex-email-7@apexmediation.com>\r\n"),
            "{text}"
        );
        assert!(
            text.contains("X-Apex-Email-Type: payment_failed\r\n"),
            "{text}"
        );
        assert!(
            text.contains("List-Unsubscribe: <https://app.example/settings/email?c=1>\r\n"),
            "{text}"
        );
        assert!(text.contains("multipart/alternative"), "{text}");
        // The emoji went out as an encoded word, not raw UTF-8.
        assert!(text.contains("Subject: =?utf-8?"), "{text}");
    }

    #[test]
    fn what_can_never_be_sent_is_permanent() {
        for broken in [
            OutgoingEmail {
                to: "nobody".into(),
                ..email()
            },
            OutgoingEmail {
                idempotency_key: "a/b".into(),
                ..email()
            },
            OutgoingEmail {
                list_unsubscribe: Some("<https://x>\r\nBcc: evil@example.com".into()),
                ..email()
            },
        ] {
            assert!(
                matches!(build_message(&broken), Err(SendError::Permanent { .. })),
                "{broken:?}"
            );
        }
    }

    #[test]
    fn urls_choose_tls_and_ports() {
        let s = SmtpSettings::from_url("smtp://u:p%40ss@mail.example.com").unwrap();
        assert_eq!(
            (s.tls, s.port, s.username.as_deref(), s.password.as_deref()),
            (SmtpTls::StartTlsRequired, 587, Some("u"), Some("p@ss"))
        );
        let s = SmtpSettings::from_url("smtps://mail.example.com:2465/apex.example").unwrap();
        assert_eq!(
            (s.tls, s.port, s.hello_name.as_deref()),
            (SmtpTls::Implicit, 2465, Some("apex.example"))
        );
        let s = SmtpSettings::from_url("smtp://127.0.0.1:2525?tls=none").unwrap();
        assert_eq!((s.tls, s.port), (SmtpTls::None, 2525));
        let s = SmtpSettings::from_url("smtp://relay.lan?tls=opportunistic").unwrap();
        assert_eq!(s.tls, SmtpTls::StartTlsOpportunistic);
        for bad in [
            "mail.example.com",
            "http://mail.example.com",
            "smtp://mail.example.com?tls=maybe",
            "smtps://mail.example.com?tls=none",
            "smtp://mail.example.com?port=25",
            "smtp://u:secret@mail.example.com?tls=none",
            "smtp://:secret@mail.example.com",
        ] {
            let err = SmtpSettings::from_url(bad).unwrap_err();
            assert!(!err.contains("secret"), "{bad}: {err}");
        }
        // Loopback catchers may take a password in clear.
        assert!(SmtpSettings::from_url("smtp://u:p@127.0.0.1:2525?tls=none").is_ok());
    }
}
