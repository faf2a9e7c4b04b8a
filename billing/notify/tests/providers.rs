//! The providers against their stand-ins: SMTP to a real aiosmtpd (installed by
//! `scripts/stack.sh up`), Resend to the marked test double of its API
//! (`apex_notify::testing::ResendStandIn`), the `.eml` folder on disk, and the checks of
//! `EmailConfig::from_env`.

use std::time::Duration;

use apex_core::env::EnvSource;
use apex_notify::config::{EmailConfig, ProviderSettings, build_provider};
use apex_notify::message::{EmailProvider, OutgoingEmail, SendError};
use apex_notify::provider::file::FileProvider;
use apex_notify::provider::resend::ResendProvider;
use apex_notify::provider::smtp::{SmtpProvider, SmtpSettings, SmtpTls};
use apex_notify::testing::{
    Fault, ParsedMessage, ResendStandIn, SmtpStandIn, SmtpStandInOptions, TEST_RESEND_KEY, TempDir,
};

const SUBJECT: &str = "⚠️ Payment failed - action required";

fn email(key: &str, unsubscribe: Option<&str>) -> OutgoingEmail {
    OutgoingEmail {
        idempotency_key: key.to_owned(),
        from: "Apex Mediation <noreply@apexmediation.com>".to_owned(),
        to: "billing@studio.example".to_owned(),
        subject: SUBJECT.to_owned(),
        html: "<p>Your payment of <strong>€49.00</strong> failed.</p>\n<p>Update your card.</p>"
            .to_owned(),
        text: "Your payment of €49.00 failed.\nUpdate your card: https://app.apexmediation.com/billing"
            .to_owned(),
        list_unsubscribe: unsubscribe.map(str::to_owned),
        email_type: "payment_failed".to_owned(),
    }
}

// ---------------------------------------------------------------------------------------
// SMTP

#[tokio::test]
async fn smtp_delivers_both_parts_with_our_headers() {
    let server = SmtpStandIn::start();
    let provider = SmtpProvider::new(&server.settings()).unwrap();
    assert_eq!(provider.name(), "smtp");

    let plain = email("apex-email-101", None);
    let accepted = provider.send(&plain).await.unwrap();
    assert_eq!(
        accepted.provider_message_id,
        "<apex-email-101@apexmediation.com>"
    );
    let unsubscribe =
        "<https://app.apexmediation.com/settings/email?customer=c_1&category=usage_alert>";
    let alert = OutgoingEmail {
        email_type: "usage_alert_90".into(),
        ..email("apex-email-102", Some(unsubscribe))
    };
    provider.send(&alert).await.unwrap();

    let messages = server.messages();
    assert_eq!(messages.len(), 2, "{messages:#?}");
    let first = &messages[0];
    assert_eq!(first.subject.as_deref(), Some(SUBJECT));
    assert_eq!(
        first.text.as_deref().map(str::trim_end),
        Some(plain.text.as_str())
    );
    assert_eq!(
        first.html.as_deref().map(str::trim_end),
        Some(plain.html.as_str())
    );
    assert!(
        first
            .content_type
            .as_deref()
            .is_some_and(|c| c.starts_with("multipart/alternative")),
        "{first:?}"
    );
    assert_eq!(
        first.message_id.as_deref(),
        Some("<apex-email-101@apexmediation.com>")
    );
    assert_eq!(first.from.as_deref(), Some("noreply@apexmediation.com"));
    assert_eq!(first.to, vec!["billing@studio.example".to_owned()]);
    assert_eq!(first.email_type.as_deref(), Some("payment_failed"));
    assert_eq!(first.list_unsubscribe, None, "transactional email has none");

    let second = &messages[1];
    assert_eq!(second.list_unsubscribe.as_deref(), Some(unsubscribe));
    assert_eq!(second.email_type.as_deref(), Some("usage_alert_90"));
    assert_eq!(
        second.message_id.as_deref(),
        Some("<apex-email-102@apexmediation.com>")
    );
}

#[tokio::test]
async fn smtp_sends_the_same_key_twice_as_the_same_message_id() {
    // SMTP has no idempotency: the relay takes both copies. What we promise is that they
    // are recognisably the same message.
    let server = SmtpStandIn::start();
    let provider = SmtpProvider::new(&server.settings()).unwrap();
    let again = email("apex-email-7", None);
    provider.send(&again).await.unwrap();
    provider.send(&again).await.unwrap();
    let ids: Vec<_> = server
        .messages()
        .into_iter()
        .map(|m| m.message_id.unwrap())
        .collect();
    assert_eq!(ids, vec!["<apex-email-7@apexmediation.com>"; 2]);
}

#[tokio::test]
async fn smtp_without_a_server_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut settings =
        SmtpSettings::from_url(&format!("smtp://127.0.0.1:{port}?tls=none")).unwrap();
    settings.timeout = Duration::from_secs(2);
    let provider = SmtpProvider::new(&settings).unwrap();
    let err = provider
        .send(&email("apex-email-1", None))
        .await
        .unwrap_err();
    assert!(
        matches!(
            &err,
            SendError::Transient {
                rate_limited: false,
                ..
            }
        ),
        "{err:?}"
    );
}

#[tokio::test]
async fn smtp_requiring_starttls_sends_nothing_to_a_server_without_it() {
    // The default for smtp:// is STARTTLS or nothing: aiosmtpd offers none here, so the
    // message must not go out in clear.
    let server = SmtpStandIn::start();
    let settings = SmtpSettings::from_url(&format!("smtp://127.0.0.1:{}", server.port())).unwrap();
    assert_eq!(settings.tls, SmtpTls::StartTlsRequired);
    let provider = SmtpProvider::new(&settings).unwrap();
    let err = provider
        .send(&email("apex-email-2", None))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Transient { .. }), "{err:?}");
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn smtp_refuses_an_unsendable_address_for_good() {
    let server = SmtpStandIn::start();
    let provider = SmtpProvider::new(&server.settings()).unwrap();
    let broken = OutgoingEmail {
        to: "not an address".into(),
        ..email("apex-email-3", None)
    };
    let err = provider.send(&broken).await.unwrap_err();
    assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");
    assert!(server.messages().is_empty());
}

// ---------------------------------------------------------------------------------------
// Resend

#[tokio::test]
async fn resend_posts_what_resend_reads() {
    let api = ResendStandIn::start();
    let provider = ResendProvider::new(&api.settings()).unwrap();
    assert_eq!(provider.name(), "resend");
    let unsubscribe =
        "<https://app.apexmediation.com/settings/email?customer=c_1&category=sdk_update>";
    let sdk = OutgoingEmail {
        email_type: "sdk_update".into(),
        ..email("apex-email-55", Some(unsubscribe))
    };
    let accepted = provider.send(&sdk).await.unwrap();

    let requests = api.requests();
    assert_eq!(requests.len(), 1);
    let request = &requests[0];
    assert_eq!(request.method, "POST");
    assert_eq!(request.path, "/emails");
    assert_eq!(
        request.authorization.as_deref(),
        Some(format!("Bearer {TEST_RESEND_KEY}").as_str())
    );
    assert_eq!(request.idempotency_key.as_deref(), Some("apex-email-55"));
    assert_eq!(request.content_type.as_deref(), Some("application/json"));
    assert_eq!(
        request.body,
        serde_json::json!({
            "from": sdk.from,
            "to": [sdk.to],
            "subject": SUBJECT,
            "html": sdk.html,
            "text": sdk.text,
            "headers": {"List-Unsubscribe": unsubscribe},
            "tags": [{"name": "email_type", "value": "sdk_update"}],
        })
    );
    assert_eq!(api.emails()[0].0, accepted.provider_message_id);

    // Transactional: no headers object at all.
    provider.send(&email("apex-email-56", None)).await.unwrap();
    let body = &api.requests()[1].body;
    assert!(body.get("headers").is_none(), "{body}");
}

#[tokio::test]
async fn resend_the_same_key_twice_is_one_email_with_one_id() {
    let api = ResendStandIn::start();
    let provider = ResendProvider::new(&api.settings()).unwrap();
    let welcome = email("apex-email-9", None);
    let first = provider.send(&welcome).await.unwrap();
    let second = provider.send(&welcome).await.unwrap();
    assert_eq!(first, second);
    assert_eq!(api.requests().len(), 2);
    assert_eq!(api.emails().len(), 1);
    let other = provider.send(&email("apex-email-10", None)).await.unwrap();
    assert_ne!(other, first);
}

#[tokio::test]
async fn resend_rate_limits_are_transient_with_their_retry_after() {
    let api = ResendStandIn::start();
    let provider = ResendProvider::new(&api.settings()).unwrap();
    api.fail_next(1, Fault::RateLimited { retry_after: 7 });
    let err = provider
        .send(&email("apex-email-20", None))
        .await
        .unwrap_err();
    match err {
        SendError::Transient {
            retry_after,
            rate_limited,
            reason,
        } => {
            assert_eq!(retry_after, Some(Duration::from_secs(7)));
            assert!(rate_limited);
            assert!(reason.contains("429"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    // The retry with the same key goes through, once.
    provider.send(&email("apex-email-20", None)).await.unwrap();
    assert_eq!(api.emails().len(), 1);
}

#[tokio::test]
async fn resend_server_errors_and_timeouts_are_transient() {
    let api = ResendStandIn::start();
    let mut settings = api.settings();
    settings.timeout = Duration::from_millis(300);
    let provider = ResendProvider::new(&settings).unwrap();
    api.fail_next(1, Fault::ServerError);
    let err = provider
        .send(&email("apex-email-30", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SendError::Transient { rate_limited: false, reason, .. } if reason.contains("500")),
        "{err:?}"
    );
    api.fail_next(1, Fault::Slow(Duration::from_secs(2)));
    let err = provider
        .send(&email("apex-email-31", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SendError::Transient { rate_limited: false, reason, .. } if reason.contains("did not answer")),
        "{err:?}"
    );
}

#[tokio::test]
async fn resend_refusals_are_permanent_with_resends_message() {
    let api = ResendStandIn::start();
    let provider = ResendProvider::new(&api.settings()).unwrap();
    api.fail_next(
        1,
        Fault::Invalid(
            "Invalid `to` field. The email address needs to follow the `email@example.com` format."
                .into(),
        ),
    );
    let err = provider
        .send(&email("apex-email-40", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SendError::Permanent { reason } if reason.contains("422") && reason.contains("Invalid `to` field")),
        "{err:?}"
    );
    // A key that is not Resend's kind: refused by the stand-in as by Resend.
    let mut settings = api.settings();
    settings.api_key = "sk_live_wrong".into();
    let wrong = ResendProvider::new(&settings).unwrap();
    let err = wrong.send(&email("apex-email-41", None)).await.unwrap_err();
    assert!(
        matches!(&err, SendError::Unavailable { reason } if reason.contains("403")),
        "{err:?}"
    );
}

#[tokio::test]
async fn resend_unreachable_is_transient() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let api = ResendStandIn::start();
    let mut settings = api.settings();
    settings.base_url = format!("http://127.0.0.1:{port}");
    let provider = ResendProvider::new(&settings).unwrap();
    let err = provider
        .send(&email("apex-email-50", None))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SendError::Transient { reason, .. } if reason.contains("cannot reach Resend")),
        "{err:?}"
    );
}

#[tokio::test]
async fn resend_holds_to_its_rate() {
    let api = ResendStandIn::start();
    let mut settings = api.settings();
    settings.requests_per_second = 10.0;
    let provider = ResendProvider::new(&settings).unwrap();
    let started = std::time::Instant::now();
    for n in 0..4 {
        provider
            .send(&email(&format!("apex-email-6{n}"), None))
            .await
            .unwrap();
    }
    // The first goes at once, then one every 100 ms.
    assert!(
        started.elapsed() >= Duration::from_millis(290),
        "{:?}",
        started.elapsed()
    );
}

// ---------------------------------------------------------------------------------------
// The `.eml` folder

#[tokio::test]
async fn files_are_one_per_key_and_parse() {
    let dir = TempDir::new();
    let folder = dir.path().join("nested/mail");
    let provider = FileProvider::create(&folder).unwrap();
    assert_eq!(provider.name(), "file");
    let first = email(
        "apex-email-70",
        Some("<https://app.apexmediation.com/settings/email>"),
    );
    let accepted = provider.send(&first).await.unwrap();
    assert_eq!(
        accepted.provider_message_id,
        "<apex-email-70@apexmediation.com>"
    );
    // The same key again: the same file, rewritten.
    provider.send(&first).await.unwrap();
    provider.send(&email("apex-email-71", None)).await.unwrap();

    let mut names: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["apex-email-70.eml", "apex-email-71.eml"]);

    let parsed = ParsedMessage::parse(&std::fs::read(provider.path_of("apex-email-70")).unwrap())
        .expect("a parseable message");
    assert_eq!(parsed.subject.as_deref(), Some(SUBJECT));
    assert_eq!(
        parsed.text.as_deref().map(str::trim_end),
        Some(first.text.as_str())
    );
    assert_eq!(
        parsed.html.as_deref().map(str::trim_end),
        Some(first.html.as_str())
    );
    assert_eq!(
        parsed.message_id.as_deref(),
        Some("<apex-email-70@apexmediation.com>")
    );
    assert_eq!(
        parsed.list_unsubscribe.as_deref(),
        Some("<https://app.apexmediation.com/settings/email>")
    );
    assert_eq!(parsed.header("X-Apex-Email-Type"), Some("payment_failed"));
}

#[tokio::test]
async fn a_key_that_is_no_file_name_is_refused() {
    let dir = TempDir::new();
    let provider = FileProvider::create(dir.path()).unwrap();
    let err = provider
        .send(&email("../../etc/passwd", None))
        .await
        .unwrap_err();
    assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

// ---------------------------------------------------------------------------------------
// Configuration

fn config(pairs: &[(&str, &str)]) -> Result<EmailConfig, String> {
    EmailConfig::from_env(&EnvSource::from_pairs(pairs.iter().copied())).map_err(|e| e.to_string())
}

#[test]
fn config_errors_name_the_variable() {
    for (pairs, expected) in [
        (
            vec![("EMAIL_PROVIDER", "mailgun")],
            "EMAIL_PROVIDER is invalid: \"mailgun\": must be resend, smtp or file",
        ),
        (
            vec![("EMAIL_PROVIDER", "resend")],
            "RESEND_API_KEY is required but not set: EMAIL_PROVIDER=resend needs an API key (re_...)",
        ),
        (
            vec![
                ("EMAIL_PROVIDER", "smtp"),
                ("SMTP_URL", "mail.example.com:587"),
            ],
            "SMTP_URL is invalid: scheme \"mail.example.com\": must be smtp or smtps",
        ),
        (
            vec![("EMAIL_FROM", "apex at example")],
            "EMAIL_FROM is invalid: \"apex at example\" is not an email address",
        ),
        (
            vec![("EMAIL_DAILY_CAP", "0")],
            "EMAIL_DAILY_CAP is invalid: 0: must be a whole number above 0 (unset for no cap)",
        ),
    ] {
        let err = config(&pairs).unwrap_err();
        assert!(err.starts_with(expected), "{pairs:?}: {err}");
    }
}

#[tokio::test]
async fn build_provider_gives_the_configured_one() {
    let dir = TempDir::new();
    let folder = dir.path().join("mail");
    let folder_text = folder.to_str().unwrap();
    let file = config(&[("EMAIL_PROVIDER", "file"), ("EMAIL_FILE_DIR", folder_text)]).unwrap();
    assert_eq!(build_provider(&file).unwrap().name(), "file");
    assert!(folder.is_dir(), "the folder is made at start-up");

    let api = ResendStandIn::start();
    let base = api.base_url();
    let resend = config(&[
        ("EMAIL_PROVIDER", "resend"),
        ("RESEND_API_KEY", TEST_RESEND_KEY),
        ("RESEND_BASE_URL", &base),
        ("RESEND_RATE", "50"),
    ])
    .unwrap();
    let provider = build_provider(&resend).unwrap();
    assert_eq!(provider.name(), "resend");
    provider.send(&email("apex-email-80", None)).await.unwrap();
    assert_eq!(api.emails().len(), 1);

    let server = SmtpStandIn::start();
    let url = server.smtp_url();
    let smtp = config(&[("EMAIL_PROVIDER", "smtp"), ("SMTP_URL", &url)]).unwrap();
    assert!(matches!(smtp.provider, ProviderSettings::Smtp(_)));
    let provider = build_provider(&smtp).unwrap();
    assert_eq!(provider.name(), "smtp");
    provider.send(&email("apex-email-81", None)).await.unwrap();
    assert_eq!(server.messages().len(), 1);
}

#[tokio::test]
async fn smtp_5xx_replies_are_permanent() {
    let server = SmtpStandIn::start_with(SmtpStandInOptions {
        max_message_bytes: Some(4_000),
        ..SmtpStandInOptions::default()
    });
    let provider = SmtpProvider::new(&server.settings()).unwrap();
    let huge = OutgoingEmail {
        html: "<p>usage</p>\n".repeat(1_000),
        ..email("apex-email-4", None)
    };
    let err = provider.send(&huge).await.unwrap_err();
    assert!(
        matches!(&err, SendError::Permanent { reason } if reason.contains("552")),
        "{err:?}"
    );
    assert!(server.messages().is_empty());
}

#[tokio::test]
async fn smtp_non_ascii_addresses_need_smtputf8() {
    let to = "josé@studio.example";
    let plain = SmtpStandIn::start();
    let provider = SmtpProvider::new(&plain.settings()).unwrap();
    let unicode = OutgoingEmail {
        to: to.into(),
        ..email("apex-email-5", None)
    };
    // lettre refuses before sending: no retry can change that.
    let err = provider.send(&unicode).await.unwrap_err();
    assert!(matches!(err, SendError::Permanent { .. }), "{err:?}");

    let utf8 = SmtpStandIn::start_with(SmtpStandInOptions {
        smtputf8: true,
        ..SmtpStandInOptions::default()
    });
    let provider = SmtpProvider::new(&utf8.settings()).unwrap();
    provider.send(&unicode).await.unwrap();
    assert_eq!(utf8.messages()[0].to, vec![to.to_owned()]);
}

#[test]
fn smtp_outside_a_runtime_is_an_error_not_a_panic() {
    let settings = SmtpSettings::from_url("smtp://127.0.0.1:2525?tls=none").unwrap();
    let err = SmtpProvider::new(&settings).unwrap_err();
    assert!(err.contains("tokio runtime"), "{err}");
}
