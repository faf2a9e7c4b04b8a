//! The email templates: every kind rendered from its sample (insta snapshots), the guide's
//! subjects, missing and mistyped fields, escaping, one-line subjects and the API key.

use apex_notify::kinds::{EmailKind, UsageThreshold};
use apex_notify::templates::{
    DEFAULT_SUPPORT_EMAIL, Rendered, TemplateError, render, required_fields, sample_data,
};
use serde_json::{Value, json};

fn rendered(kind: EmailKind, data: &Value) -> Rendered {
    render(kind, data).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

fn sample_with(kind: EmailKind, field: &str, value: Value) -> Value {
    let mut data = sample_data(kind);
    data[field] = value;
    data
}

fn without(kind: EmailKind, field: &str) -> Value {
    let mut data = sample_data(kind);
    data.as_object_mut().unwrap().remove(field);
    data
}

/// What minijinja's HTML escaping makes of `s`.
fn html_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#x27;")
        .replace('/', "&#x2f;")
}

fn all_parts(r: &Rendered) -> [&str; 3] {
    [&r.subject, &r.html, &r.text]
}

#[test]
fn every_kind_renders_from_its_sample() {
    for kind in EmailKind::ALL {
        let r = rendered(kind, &sample_data(kind));
        insta::assert_snapshot!(
            kind.email_type(),
            format!(
                "subject: {}\n\n----- text -----\n{}\n----- html -----\n{}\n",
                r.subject, r.text, r.html
            )
        );
    }
}

#[test]
fn the_guides_subjects_exactly() {
    let subject = |kind| rendered(kind, &sample_data(kind)).subject;
    assert_eq!(
        subject(EmailKind::PaymentFailed),
        "⚠️ Payment failed - action required"
    );
    for attempt in 1..=3 {
        assert_eq!(
            subject(EmailKind::PaymentRetry { attempt }),
            format!("Payment retry {attempt} of 3")
        );
    }
    assert_eq!(
        subject(EmailKind::PaymentSucceeded),
        "✅ Payment successful - service restored"
    );
    assert_eq!(
        subject(EmailKind::SubscriptionSuspended),
        "🚫 Service suspended - payment required"
    );
}

#[test]
fn the_other_subjects() {
    let subject = |kind| rendered(kind, &sample_data(kind)).subject;
    assert_eq!(subject(EmailKind::Welcome), "Welcome to ApexMediation");
    assert_eq!(
        subject(EmailKind::TrialEnding { days: 7 }),
        "Your trial ends in 7 days"
    );
    assert_eq!(
        subject(EmailKind::TrialEnding { days: 1 }),
        "Your trial ends tomorrow"
    );
    let alert = |threshold| EmailKind::UsageAlert { threshold };
    assert_eq!(
        subject(alert(UsageThreshold::Percent90)),
        "Usage alert: 90% of your impressions limit"
    );
    assert_eq!(
        subject(alert(UsageThreshold::Percent100)),
        "Usage alert: you've reached your impressions limit"
    );
    assert_eq!(
        subject(alert(UsageThreshold::Overage)),
        "Usage alert: you're over your impressions limit"
    );
    assert_eq!(
        subject(EmailKind::MonthlySummary),
        "Your ApexMediation usage for October 2025"
    );
    assert_eq!(
        subject(EmailKind::SdkUpdate),
        "ApexMediation iOS SDK 3.4.0 is available"
    );
}

#[test]
fn a_missing_required_field_is_named() {
    for kind in EmailKind::ALL {
        assert!(!required_fields(kind).is_empty(), "{kind}");
        for &field in required_fields(kind) {
            let expected = TemplateError::MissingField {
                email_type: kind.email_type(),
                field: field.to_owned(),
            };
            for data in [
                without(kind, field),
                sample_with(kind, field, Value::Null),
                sample_with(kind, field, json!({"nested": true})),
            ] {
                let err = render(kind, &data).expect_err(field);
                assert_eq!(err, expected, "{kind} without {field}");
                let message = err.to_string();
                assert!(message.contains(field), "{message}");
                assert!(message.contains(&kind.email_type()), "{message}");
            }
        }
    }
}

#[test]
fn a_mistyped_field_is_named() {
    let cases = [
        (EmailKind::PaymentFailed, "amount_due_cents", json!("12.50")),
        (EmailKind::PaymentFailed, "amount_due_cents", json!(12.5)),
        (EmailKind::PaymentFailed, "currency", json!("dollars")),
        (EmailKind::PaymentFailed, "retry_schedule", json!([])),
        (EmailKind::PaymentFailed, "retry_schedule", json!(["soon"])),
        (
            EmailKind::PaymentFailed,
            "update_payment_url",
            json!("javascript:alert(1)"),
        ),
        (
            EmailKind::PaymentRetry { attempt: 1 },
            "days_until_retry",
            json!(-1),
        ),
        (
            EmailKind::TrialEnding { days: 3 },
            "trial_end",
            json!("next week"),
        ),
        (EmailKind::TrialEnding { days: 3 }, "days_left", json!("3")),
        (
            EmailKind::UsageAlert {
                threshold: UsageThreshold::Percent80,
            },
            "metric",
            json!("bananas"),
        ),
        (EmailKind::MonthlySummary, "month", json!("October")),
        (EmailKind::SdkUpdate, "sdk", json!("windows")),
        (EmailKind::Welcome, "name", json!(42)),
        (EmailKind::Welcome, "dashboard_url", json!("ftp://x")),
    ];
    for (kind, field, value) in cases {
        assert_eq!(
            render(kind, &sample_with(kind, field, value.clone())),
            Err(TemplateError::MissingField {
                email_type: kind.email_type(),
                field: field.to_owned(),
            }),
            "{kind} {field} = {value}"
        );
    }
}

#[test]
fn optional_fields_may_be_absent() {
    let optional = [
        "name",
        "support_email",
        "dashboard_url",
        "unsubscribe_url",
        "currency",
        "trial_end",
        "days_left",
        "upgrade_url",
        "service_status",
        "invoice_url",
        "notes",
    ];
    for kind in EmailKind::ALL {
        let mut data = sample_data(kind);
        let map = data.as_object_mut().unwrap();
        for field in optional {
            if !required_fields(kind).contains(&field) {
                map.remove(field);
            }
        }
        let r = rendered(kind, &data);
        assert!(r.text.starts_with("Hello,\n"), "{kind}: {}", r.text);
        assert!(r.html.contains("<p>Hello,</p>"), "{kind}");
        assert!(r.text.contains(DEFAULT_SUPPORT_EMAIL), "{kind}");
        assert!(!r.html.contains("Unsubscribe"), "{kind}");
    }
}

#[test]
fn the_footer_links_to_unsubscribe_only_when_given() {
    for kind in EmailKind::ALL {
        let r = rendered(kind, &sample_data(kind));
        let transactional = kind.category().opt_out_name().is_none();
        assert_eq!(r.html.contains("Unsubscribe"), !transactional, "{kind}");
        assert_eq!(r.text.contains("Unsubscribe:"), !transactional, "{kind}");
    }
    let kind = EmailKind::MonthlySummary;
    let r = rendered(kind, &sample_data(kind));
    // The queue's URL has `&`: escaped in the attribute, as is in the text.
    assert!(
        r.html
            .contains("?customer=cus_Q8x2LmN4pR&amp;category=monthly_summary\"")
    );
    assert!(
        r.text
            .contains("?customer=cus_Q8x2LmN4pR&category=monthly_summary\n")
    );
}

#[test]
fn support_email_defaults_and_can_be_set() {
    let kind = EmailKind::SubscriptionSuspended;
    let r = rendered(kind, &sample_data(kind));
    assert!(r.html.contains("mailto:support@apexmediation.com"));
    let r = rendered(
        kind,
        &sample_with(kind, "support_email", json!("billing@apex.example")),
    );
    assert!(r.html.contains("mailto:billing@apex.example"));
    assert!(r.text.contains("Contact us at billing@apex.example."));
    assert!(!r.text.contains(DEFAULT_SUPPORT_EMAIL));
}

#[test]
fn script_in_data_is_escaped_in_html_and_plain_in_text() {
    let script = "<script>alert(1)</script>";
    for kind in EmailKind::ALL {
        let mut data = sample_with(kind, "name", json!(script));
        for field in ["plan_type", "notes", "version", "service_status"] {
            if data.get(field).is_some() {
                data[field] = json!(format!("x{script}"));
            }
        }
        let r = rendered(kind, &data);
        assert!(!r.html.contains("<script"), "{kind}: {}", r.html);
        assert!(
            r.html
                .contains("Hi &lt;script&gt;alert(1)&lt;&#x2f;script&gt;,"),
            "{kind}: {}",
            r.html
        );
        // Plain text is never interpreted: the name reads as typed.
        assert!(r.text.starts_with(&format!("Hi {script},\n")), "{kind}");
    }
}

#[test]
fn sample_text_has_no_markup() {
    for kind in EmailKind::ALL {
        let r = rendered(kind, &sample_data(kind));
        assert!(!r.text.contains('<'), "{kind}: {}", r.text);
        assert!(!r.text.contains("&amp;"), "{kind}");
        assert!(r.html.starts_with("<!DOCTYPE html>"), "{kind}");
        assert!(
            r.html
                .contains(&format!("<title>{}</title>", html_escape(&r.subject))),
            "{kind}"
        );
    }
}

#[test]
fn no_line_break_reaches_a_subject() {
    let evil = "3.4.0\r\nBcc: victim@example.com\n\rX";
    for kind in EmailKind::ALL {
        let mut data = sample_data(kind);
        for field in ["name", "plan_type", "version", "notes", "service_status"] {
            if data.get(field).is_some() {
                data[field] = json!(evil);
            }
        }
        let r = rendered(kind, &data);
        assert!(!r.subject.contains(['\r', '\n']), "{kind}: {:?}", r.subject);
    }
    let r = rendered(
        EmailKind::SdkUpdate,
        &sample_with(EmailKind::SdkUpdate, "version", json!(evil)),
    );
    assert_eq!(
        r.subject,
        "ApexMediation iOS SDK 3.4.0 Bcc: victim@example.com X is available"
    );
}

#[test]
fn a_plain_api_key_never_appears_whole() {
    let key = format!(
        "rsk_{}",
        "AbC12345xYz".repeat(4).chars().take(40).collect::<String>()
    );
    assert_eq!(key.len(), 44);
    for kind in EmailKind::ALL {
        let r = rendered(kind, &sample_with(kind, "api_key", json!(key)));
        for part in all_parts(&r) {
            assert!(!part.contains(&key), "{kind}");
        }
    }
    // The key alone stands in for the prefix: its first 12 characters and "…".
    let mut data = without(EmailKind::Welcome, "api_key_prefix");
    data["api_key"] = json!(key);
    let r = rendered(EmailKind::Welcome, &data);
    for part in all_parts(&r) {
        assert!(!part.contains(&key));
    }
    assert!(r.text.contains("starts with rsk_AbC12345…\n"), "{}", r.text);
    assert!(r.html.contains("rsk_AbC12345…</code>"));
    // A short key (the guide's test payload) shows half of it at most.
    data["api_key"] = json!("rsk_test123");
    let r = rendered(EmailKind::Welcome, &data);
    assert!(r.text.contains("starts with rsk_t…\n"), "{}", r.text);
    // A "prefix" that is really the whole key is cut too.
    let r = rendered(
        EmailKind::Welcome,
        &sample_with(EmailKind::Welcome, "api_key_prefix", json!(key)),
    );
    for part in all_parts(&r) {
        assert!(!part.contains(&key));
    }
    // Put in another field, the key stops the email rather than leak.
    let mut data = sample_with(EmailKind::Welcome, "api_key", json!(key));
    data["name"] = json!(key);
    assert!(matches!(
        render(EmailKind::Welcome, &data),
        Err(TemplateError::Render(_))
    ));
}

#[test]
fn only_the_third_retry_is_final() {
    for attempt in 1..=3 {
        let kind = EmailKind::PaymentRetry { attempt };
        let r = rendered(kind, &sample_data(kind));
        let warning = "This is the final attempt; if it fails your service will be suspended.";
        assert_eq!(r.text.contains(warning), attempt == 3, "{attempt}");
        assert_eq!(r.html.contains(warning), attempt == 3, "{attempt}");
    }
}

#[test]
fn a_retry_schedule_may_be_text() {
    let kind = EmailKind::PaymentFailed;
    let r = rendered(
        kind,
        &sample_with(
            kind,
            "retry_schedule",
            json!("Days 1, 3, 7 (after grace period)"),
        ),
    );
    assert!(
        r.text
            .contains("Retry schedule: Days 1, 3, 7 (after grace period)")
    );
    let r = rendered(kind, &sample_data(kind));
    assert!(r.text.contains("  - November 17, 2025\n"));
    assert!(r.html.contains("<li>November 21, 2025</li>"));
    assert!(r.text.contains("$1,249.50"));
}

#[test]
fn money_and_derived_values() {
    let kind = EmailKind::PaymentSucceeded;
    let r = rendered(
        kind,
        &sample_with(kind, "amount_paid_cents", json!(-125_000)),
    );
    assert!(r.text.contains("payment of -$1,250.00."), "{}", r.text);
    let r = rendered(kind, &sample_with(kind, "currency", json!("eur")));
    assert!(r.text.contains("payment of 1,249.50 EUR."), "{}", r.text);
    // The kind gives the trial's days when the data does not.
    let kind = EmailKind::TrialEnding { days: 3 };
    let r = rendered(kind, &without(kind, "days_left"));
    assert_eq!(r.subject, "Your trial ends in 3 days");
    let kind = EmailKind::UsageAlert {
        threshold: UsageThreshold::Percent80,
    };
    let mut data = sample_with(kind, "metric", json!("data_transfer_gb"));
    data["used"] = json!(81.25);
    data["limit"] = json!(100);
    let r = rendered(kind, &data);
    assert_eq!(r.subject, "Usage alert: 80% of your data transfer limit");
    assert!(r.text.contains("81.25 GB of your 100 GB"), "{}", r.text);
}

#[test]
fn data_must_be_an_object() {
    for data in [json!(null), json!([1]), json!("welcome")] {
        assert!(matches!(
            render(EmailKind::Welcome, &data),
            Err(TemplateError::Render(_))
        ));
    }
}

#[test]
fn a_shorter_retry_schedule_names_its_own_last_attempt() {
    let second = EmailKind::PaymentRetry { attempt: 2 };
    // The guide's three retries: the second is not the last.
    let default = rendered(second, &sample_data(second));
    assert_eq!(default.subject, "Payment retry 2 of 3");
    assert!(!default.text.contains("final attempt"), "{}", default.text);
    // Two configured retries: the second is the last, with the warning.
    let short = rendered(second, &sample_with(second, "attempts_total", json!(2)));
    assert_eq!(short.subject, "Payment retry 2 of 2");
    assert!(
        short.text.contains("This is the final attempt"),
        "{}",
        short.text
    );
    assert!(short.html.contains("This is the final attempt"));
}
