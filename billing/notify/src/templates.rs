//! The nine kinds of email of the operations guide rendered as subject, HTML and plain text
//! with `minijinja`, from the JSON `data` of their `email.<type>` event.
//!
//! The templates are files under `billing/notify/templates/` embedded at compile time, so the
//! binary carries them: `base.html` and `base.txt` (the layout: greeting, and a footer with the
//! support address, the dashboard link when given and an unsubscribe link only when
//! `unsubscribe_url` is given), `_macros.html` (the button), and per kind family
//! `<family>.subject`, `<family>.html` and `<family>.txt`. Undefined variables are errors
//! (`UndefinedBehavior::Strict`), HTML templates auto-escape everything interpolated (a
//! customer name `<script>` arrives as `&lt;script&gt;`), text and subject templates do not
//! escape, and a rendered subject has every control character (CR, LF, ...) replaced by a
//! space, so no data can add a header.
//!
//! Before rendering, the data is checked here, not left to the template engine, so a bad event
//! names its field: a missing (absent, `null` or blank text) required field, or any known field
//! of the wrong type, is [`TemplateError::MissingField`].
//!
//! # Data
//!
//! Money is in integer cents (`*_cents`, shown `$1,234.56`); dates are RFC 3339
//! (`2025-11-14T00:00:00Z`) or plain dates (`2025-11-14`), shown `November 14, 2025` (UTC);
//! URLs are `https://` or `http://`. `null` is the same as absent.
//!
//! Every kind (all optional):
//! - `to`, `customer_id`: read by the queue, not by the templates.
//! - `name` (text): the customer's name; "Hi <name>," or, without it, "Hello,".
//! - `support_email` (text): default `support@apexmediation.com`.
//! - `dashboard_url` (URL): a dashboard link.
//! - `unsubscribe_url` (URL): set by the queue for non-transactional kinds; the footer's
//!   unsubscribe link.
//! - `currency` (three letters, default `usd`): `usd` shows `$1,250.00`, another `1,250.00 EUR`.
//! - `api_key` (text): never shown whole, never passed to a template; see `welcome`.
//!
//! Per kind (required unless marked optional):
//! - `welcome`: `plan_type` (text), `api_key_prefix` (text; shown as its first 12 characters
//!   and "…"; a plain `api_key` stands in for it when it is absent, shown as its first 12
//!   characters but never more than half of it, and "…"), `trial_end` (date, optional).
//! - `trial_ending_7d`, `_3d`, `_1d`: `trial_end` (date), `plan_type` (text), `days_left`
//!   (integer ≥ 0, optional, default the kind's 7, 3 or 1), `upgrade_url` (URL, optional).
//! - `payment_failed`: `amount_due_cents` (integer), `currency` (required here),
//!   `update_payment_url` (URL: the hosted invoice), `retry_schedule` (a non-empty list of
//!   dates, or text such as "Days 1, 3, 7 (after grace period)").
//! - `payment_retry_1` to `_3`: `days_until_retry` (integer ≥ 0: 0 "today", 1 "tomorrow"),
//!   `attempts_remaining` (integer ≥ 0), `amount_due_cents` (integer), `update_payment_url`
//!   (URL), `attempts_total` (integer 1 to 3, optional, default 3: the configured number of
//!   retries). The attempt comes from the kind; the last has the final-retry warning.
//! - `payment_succeeded`: `amount_paid_cents` (integer), `service_status` (text, optional,
//!   default `active`).
//! - `subscription_suspended`: `amount_due_cents` (integer), `update_payment_url` (URL).
//! - `usage_alert_80`, `_90`, `_100`, `_overage`: `metric` (`impressions`, `api_calls` or
//!   `data_transfer_gb`), `used`, `limit`, `percent` (numbers ≥ 0), `period_end` (date);
//!   `usage_alert_overage` also `overage_cost_cents` (integer).
//! - `monthly_summary`: `month` (`YYYY-MM`), `impressions`, `api_calls` (integers ≥ 0),
//!   `data_transfer_gb` (number ≥ 0), `total_cents` (integer: the invoice's total, or the
//!   month's estimate before it is issued), and optionally (`apex_billing::summaries` sends
//!   them all): `plan_type`, `plan_name` (text; with `plan_name` the email shows the full
//!   table), `previous_month` (`YYYY-MM`); per metric `<m>` (`impressions`, `api_calls`,
//!   `data_transfer_gb`, the last in GB) `<m>_included` (absent or `null`: unlimited),
//!   `<m>_overage` (same unit), `<m>_overage_cost_cents` (integer), `<m>_previous` (the
//!   month before's usage), `<m>_change_percent` (whole percent, negative when down; absent
//!   when the month before had none); `overage_cost_cents` (their sum),
//!   `mediated_revenue_cents`, `platform_fee_cents` (integers) and `platform_fee_bps`
//!   (integer ≥ 0; absent: revenue not reported yet), `invoice_total_cents` (integer, when
//!   the month's invoice exists), `invoice_url` (URL).
//! - `sdk_update`: `sdk` (`ios` or `android`), `version` (text), `release_notes_url` (URL),
//!   `notes` (text, optional; its line breaks are kept).
//!
//! The templates also see names derived here, which override data of the same name:
//! `email_type`, `api_key_hint`, `days_left`, `attempt`, `final_attempt`, `threshold`,
//! `over_limit`, `metric_label`, `metric_unit`, `sdk_label` and `subject` (for the HTML title).

use std::sync::LazyLock;

use chrono::{DateTime, NaiveDate};
use minijinja::value::Serde;
use minijinja::{AutoEscape, Environment, ErrorKind, UndefinedBehavior};
use serde_json::{Map, Value, json};

use crate::kinds::{EmailKind, UsageThreshold};

/// An email's three parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    /// One line: no CR, LF nor other control character.
    pub subject: String,
    /// The HTML part (a full document).
    pub html: String,
    /// The plain-text part (no markup).
    pub text: String,
}

/// Why an email could not be rendered.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TemplateError {
    /// A field the kind needs is missing or of the wrong type: the message names the field
    /// and the email type.
    #[error("email type {email_type}: field `{field}` is missing or of the wrong type")]
    MissingField {
        /// The `email_type` (`payment_retry_2`).
        email_type: String,
        /// The field (`amount_due_cents`).
        field: String,
    },
    /// Anything else: data that is not a JSON object, or what `minijinja` reports.
    #[error("email template: {0}")]
    Render(String),
}

/// The support address when the data has none.
pub const DEFAULT_SUPPORT_EMAIL: &str = "support@apexmediation.com";

/// Characters of an API key (or its prefix) an email may show; the same rule as the queue's
/// scrubbing, which is `apexctl keys list`'s prefix.
const API_KEY_SHOWN: usize = 12;

/// What a field's value must be.
#[derive(Debug, Clone, Copy)]
enum Ty {
    /// A string; blank counts as missing.
    Text,
    /// An `https://` or `http://` URL without whitespace: a `javascript:` URL must never
    /// become a link.
    Url,
    /// Three ASCII letters.
    Currency,
    /// An integer number of cents (negative allowed: a credit).
    Cents,
    /// An integer ≥ 0.
    Count,
    /// A number ≥ 0.
    Quantity,
    /// RFC 3339 or `YYYY-MM-DD`.
    Date,
    /// `YYYY-MM`.
    Month,
    /// Text, or a non-empty list of dates.
    Schedule,
    /// One of these strings.
    OneOf(&'static [&'static str]),
}

/// What a kind family needs: its template names and fields.
struct Spec {
    /// The templates' base name: `<template>.subject`, `.html`, `.txt`.
    template: &'static str,
    /// Fields that must be present.
    required: &'static [&'static str],
    /// The types of its own fields, required and optional.
    fields: &'static [(&'static str, Ty)],
}

/// Fields every kind may carry.
const COMMON_FIELDS: &[(&str, Ty)] = &[
    ("name", Ty::Text),
    ("support_email", Ty::Text),
    ("dashboard_url", Ty::Url),
    ("unsubscribe_url", Ty::Url),
    ("currency", Ty::Currency),
];

const WELCOME: Spec = Spec {
    template: "welcome",
    required: &["plan_type", "api_key_prefix"],
    fields: &[
        ("plan_type", Ty::Text),
        ("api_key_prefix", Ty::Text),
        ("trial_end", Ty::Date),
    ],
};

const TRIAL_ENDING: Spec = Spec {
    template: "trial_ending",
    required: &["trial_end", "plan_type"],
    fields: &[
        ("trial_end", Ty::Date),
        ("plan_type", Ty::Text),
        ("days_left", Ty::Count),
        ("upgrade_url", Ty::Url),
    ],
};

const PAYMENT_FAILED: Spec = Spec {
    template: "payment_failed",
    required: &[
        "amount_due_cents",
        "currency",
        "update_payment_url",
        "retry_schedule",
    ],
    fields: &[
        ("amount_due_cents", Ty::Cents),
        ("update_payment_url", Ty::Url),
        ("retry_schedule", Ty::Schedule),
    ],
};

const PAYMENT_RETRY: Spec = Spec {
    template: "payment_retry",
    required: &[
        "days_until_retry",
        "attempts_remaining",
        "amount_due_cents",
        "update_payment_url",
    ],
    fields: &[
        ("days_until_retry", Ty::Count),
        ("attempts_remaining", Ty::Count),
        ("attempts_total", Ty::Count),
        ("amount_due_cents", Ty::Cents),
        ("update_payment_url", Ty::Url),
    ],
};

const PAYMENT_SUCCEEDED: Spec = Spec {
    template: "payment_succeeded",
    required: &["amount_paid_cents"],
    fields: &[
        ("amount_paid_cents", Ty::Cents),
        ("service_status", Ty::Text),
    ],
};

const SUBSCRIPTION_SUSPENDED: Spec = Spec {
    template: "subscription_suspended",
    required: &["amount_due_cents", "update_payment_url"],
    fields: &[
        ("amount_due_cents", Ty::Cents),
        ("update_payment_url", Ty::Url),
    ],
};

/// The metrics a usage alert can be about.
const METRICS: &[&str] = &["impressions", "api_calls", "data_transfer_gb"];

const USAGE_ALERT_FIELDS: &[(&str, Ty)] = &[
    ("metric", Ty::OneOf(METRICS)),
    ("used", Ty::Quantity),
    ("limit", Ty::Quantity),
    ("percent", Ty::Quantity),
    ("period_end", Ty::Date),
    ("overage_cost_cents", Ty::Cents),
];

const USAGE_ALERT: Spec = Spec {
    template: "usage_alert",
    required: &["metric", "used", "limit", "percent", "period_end"],
    fields: USAGE_ALERT_FIELDS,
};

const USAGE_OVERAGE: Spec = Spec {
    template: "usage_alert",
    required: &[
        "metric",
        "used",
        "limit",
        "percent",
        "period_end",
        "overage_cost_cents",
    ],
    fields: USAGE_ALERT_FIELDS,
};

const MONTHLY_SUMMARY: Spec = Spec {
    template: "monthly_summary",
    required: &[
        "month",
        "impressions",
        "api_calls",
        "data_transfer_gb",
        "total_cents",
    ],
    // `Ty::Cents` is the signed-integer check: it also types the change percentages.
    fields: &[
        ("month", Ty::Month),
        ("previous_month", Ty::Month),
        ("plan_type", Ty::Text),
        ("plan_name", Ty::Text),
        ("impressions", Ty::Count),
        ("impressions_included", Ty::Count),
        ("impressions_overage", Ty::Count),
        ("impressions_overage_cost_cents", Ty::Cents),
        ("impressions_previous", Ty::Count),
        ("impressions_change_percent", Ty::Cents),
        ("api_calls", Ty::Count),
        ("api_calls_included", Ty::Count),
        ("api_calls_overage", Ty::Count),
        ("api_calls_overage_cost_cents", Ty::Cents),
        ("api_calls_previous", Ty::Count),
        ("api_calls_change_percent", Ty::Cents),
        ("data_transfer_gb", Ty::Quantity),
        ("data_transfer_gb_included", Ty::Quantity),
        ("data_transfer_gb_overage", Ty::Quantity),
        ("data_transfer_gb_overage_cost_cents", Ty::Cents),
        ("data_transfer_gb_previous", Ty::Quantity),
        ("data_transfer_gb_change_percent", Ty::Cents),
        ("overage_cost_cents", Ty::Cents),
        ("mediated_revenue_cents", Ty::Cents),
        ("platform_fee_cents", Ty::Cents),
        ("platform_fee_bps", Ty::Count),
        ("total_cents", Ty::Cents),
        ("invoice_total_cents", Ty::Cents),
        ("invoice_url", Ty::Url),
    ],
};

const SDK_UPDATE: Spec = Spec {
    template: "sdk_update",
    required: &["sdk", "version", "release_notes_url"],
    fields: &[
        ("sdk", Ty::OneOf(&["ios", "android"])),
        ("version", Ty::Text),
        ("release_notes_url", Ty::Url),
        ("notes", Ty::Text),
    ],
};

fn spec(kind: EmailKind) -> &'static Spec {
    match kind {
        EmailKind::Welcome => &WELCOME,
        EmailKind::TrialEnding { .. } => &TRIAL_ENDING,
        EmailKind::PaymentFailed => &PAYMENT_FAILED,
        EmailKind::PaymentRetry { .. } => &PAYMENT_RETRY,
        EmailKind::PaymentSucceeded => &PAYMENT_SUCCEEDED,
        EmailKind::SubscriptionSuspended => &SUBSCRIPTION_SUSPENDED,
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Overage,
        } => &USAGE_OVERAGE,
        EmailKind::UsageAlert { .. } => &USAGE_ALERT,
        EmailKind::MonthlySummary => &MONTHLY_SUMMARY,
        EmailKind::SdkUpdate => &SDK_UPDATE,
    }
}

/// The fields `kind` cannot be rendered without (besides `to`, which the queue needs).
pub fn required_fields(kind: EmailKind) -> &'static [&'static str] {
    spec(kind).required
}

/// `(name, source)` of each file under `templates/`, embedded at compile time.
macro_rules! embedded {
    ($($name:literal),* $(,)?) => {
        &[$(($name, include_str!(concat!("../templates/", $name)))),*]
    };
}

/// The embedded templates, by name; the extension picks the escaping.
const TEMPLATES: &[(&str, &str)] = embedded![
    "base.html",
    "base.txt",
    "_macros.html",
    "welcome.subject",
    "welcome.html",
    "welcome.txt",
    "trial_ending.subject",
    "trial_ending.html",
    "trial_ending.txt",
    "payment_failed.subject",
    "payment_failed.html",
    "payment_failed.txt",
    "payment_retry.subject",
    "payment_retry.html",
    "payment_retry.txt",
    "payment_succeeded.subject",
    "payment_succeeded.html",
    "payment_succeeded.txt",
    "subscription_suspended.subject",
    "subscription_suspended.html",
    "subscription_suspended.txt",
    "usage_alert.subject",
    "usage_alert.html",
    "usage_alert.txt",
    "monthly_summary.subject",
    "monthly_summary.html",
    "monthly_summary.txt",
    "sdk_update.subject",
    "sdk_update.html",
    "sdk_update.txt",
];

/// The environment, built once. A template that does not parse is an error of every render
/// (and of the tests) rather than a panic in the queue.
static ENV: LazyLock<Result<Environment<'static>, String>> = LazyLock::new(build_env);

fn build_env() -> Result<Environment<'static>, String> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_auto_escape_callback(|name| {
        if name.ends_with(".html") {
            AutoEscape::Html
        } else {
            AutoEscape::None
        }
    });
    // Block tags on their own lines leave no blank lines behind, so the plain text reads as
    // written in the files.
    let syntax = minijinja::syntax::SyntaxConfig::builder()
        .trim_blocks(true)
        .lstrip_blocks(true)
        .build()
        .map_err(|e| e.to_string())?;
    env.set_syntax(syntax);
    env.add_filter("dollars", dollars);
    env.add_filter("number", number);
    env.add_filter("date", date);
    env.add_filter("month_name", month_name);
    for (name, source) in TEMPLATES {
        env.add_template(name, source)
            .map_err(|e| format!("template {name}: {e:#}"))?;
    }
    Ok(env)
}

/// Renders `kind` from its event's `data` (a JSON object; see the module docs for its fields).
pub fn render(kind: EmailKind, data: &Value) -> Result<Rendered, TemplateError> {
    let env = ENV.as_ref().map_err(|e| TemplateError::Render(e.clone()))?;
    let mut ctx = context(kind, data)?;
    let template = spec(kind).template;
    let run = |ctx: &Map<String, Value>, name: String| {
        env.get_template(&name)
            .and_then(|t| t.render(Serde(ctx)))
            .map_err(|e| TemplateError::Render(format!("{name}: {e:#}")))
    };
    let subject = one_line(&run(&ctx, format!("{template}.subject"))?);
    ctx.insert("subject".into(), Value::String(subject.clone()));
    let html = run(&ctx, format!("{template}.html"))?;
    let text = run(&ctx, format!("{template}.txt"))?;
    // The last guard: the templates never see `api_key`, but a caller could have put the key
    // in another field too. Short strings are skipped: they could match by chance.
    if let Some(key) = data.get("api_key").and_then(Value::as_str)
        && key.chars().count() >= 8
        && [&subject, &html, &text]
            .iter()
            .any(|part| part.contains(key))
    {
        return Err(TemplateError::Render(format!(
            "{kind}: the plain API key would appear in the email"
        )));
    }
    Ok(Rendered {
        subject,
        html,
        text,
    })
}

/// The template context: the data checked, `null` and `api_key` dropped, defaults and derived
/// names added.
fn context(kind: EmailKind, data: &Value) -> Result<Map<String, Value>, TemplateError> {
    let Some(data) = data.as_object() else {
        return Err(TemplateError::Render(format!(
            "{kind}: the data must be a JSON object"
        )));
    };
    let missing = |field: &str| TemplateError::MissingField {
        email_type: kind.email_type(),
        field: field.to_owned(),
    };
    let mut ctx: Map<String, Value> = data
        .iter()
        .filter(|(k, v)| !v.is_null() && k.as_str() != "api_key")
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    // A blank name is no name: "Hello," rather than "Hi ,".
    if ctx
        .get("name")
        .and_then(Value::as_str)
        .is_some_and(|n| n.trim().is_empty())
    {
        ctx.remove("name");
    }
    let api_key = data.get("api_key").and_then(Value::as_str);
    let spec = spec(kind);
    for &field in spec.required {
        let present = match ctx.get(field) {
            None => false,
            Some(Value::String(s)) => !s.trim().is_empty(),
            Some(_) => true,
        };
        let stands_in = field == "api_key_prefix" && api_key.is_some_and(|k| !k.is_empty());
        if !present && !stands_in {
            return Err(missing(field));
        }
    }
    for &(field, ty) in COMMON_FIELDS.iter().chain(spec.fields) {
        if let Some(value) = ctx.get(field)
            && !fits(ty, value)
        {
            return Err(missing(field));
        }
    }

    // Defaults: nulls are already gone, so an absent entry is an absent field.
    let mut defaults = vec![
        ("support_email", json!(DEFAULT_SUPPORT_EMAIL)),
        ("currency", json!("usd")),
    ];
    let mut derived = vec![("email_type", json!(kind.email_type()))];
    match kind {
        EmailKind::Welcome => {
            let hint: String = match data.get("api_key_prefix").and_then(Value::as_str) {
                Some(prefix) if !prefix.trim().is_empty() => {
                    prefix.chars().take(API_KEY_SHOWN).collect()
                }
                // Half at most, so a short key (the guide's `rsk_test123`) is never whole.
                _ => {
                    let key = api_key.unwrap_or_default();
                    let shown = API_KEY_SHOWN.min(key.chars().count() / 2);
                    key.chars().take(shown).collect()
                }
            };
            derived.push(("api_key_hint", json!(format!("{hint}…"))));
        }
        EmailKind::TrialEnding { days } => defaults.push(("days_left", json!(days))),
        EmailKind::PaymentRetry { attempt } => {
            // The guide's schedule has three retries; a shorter configured one says so.
            let total = data
                .get("attempts_total")
                .and_then(Value::as_u64)
                .filter(|t| (1..=3).contains(t))
                .unwrap_or(3);
            derived.push(("attempt", json!(attempt)));
            derived.push(("attempts_total", json!(total)));
            derived.push(("final_attempt", json!(u64::from(attempt) >= total)));
        }
        EmailKind::PaymentSucceeded => defaults.push(("service_status", json!("active"))),
        EmailKind::UsageAlert { threshold } => {
            let (value, over) = match threshold {
                UsageThreshold::Percent80 => (json!(80), false),
                UsageThreshold::Percent90 => (json!(90), false),
                UsageThreshold::Percent100 => (json!(100), false),
                UsageThreshold::Overage => (json!("overage"), true),
            };
            let (label, unit) = match data.get("metric").and_then(Value::as_str) {
                Some("api_calls") => ("API calls", ""),
                Some("data_transfer_gb") => ("data transfer", " GB"),
                _ => ("impressions", ""),
            };
            derived.extend([
                ("threshold", value),
                ("over_limit", json!(over)),
                ("metric_label", json!(label)),
                ("metric_unit", json!(unit)),
            ]);
        }
        EmailKind::SdkUpdate => {
            let label = match data.get("sdk").and_then(Value::as_str) {
                Some("ios") => "iOS",
                _ => "Android",
            };
            derived.push(("sdk_label", json!(label)));
        }
        _ => {}
    }
    for (name, value) in defaults {
        ctx.entry(name).or_insert(value);
    }
    for (name, value) in derived {
        ctx.insert(name.to_owned(), value);
    }
    Ok(ctx)
}

/// Whether `value` is what `ty` asks for.
fn fits(ty: Ty, value: &Value) -> bool {
    match ty {
        Ty::Text => value.is_string(),
        Ty::Url => value.as_str().is_some_and(|s| {
            let lower = s.to_ascii_lowercase();
            (lower.starts_with("https://") || lower.starts_with("http://"))
                && !s.chars().any(|c| c.is_whitespace() || c.is_control())
        }),
        Ty::Currency => value
            .as_str()
            .is_some_and(|s| s.len() == 3 && s.bytes().all(|b| b.is_ascii_alphabetic())),
        Ty::Cents => value.is_i64(),
        Ty::Count => value.is_u64(),
        Ty::Quantity => value.as_f64().is_some_and(|n| n.is_finite() && n >= 0.0),
        Ty::Date => value.as_str().is_some_and(|s| parse_date(s).is_some()),
        Ty::Month => value.as_str().is_some_and(|s| parse_month(s).is_some()),
        Ty::Schedule => match value {
            Value::String(s) => !s.trim().is_empty(),
            Value::Array(dates) => !dates.is_empty() && dates.iter().all(|d| fits(Ty::Date, d)),
            _ => false,
        },
        Ty::OneOf(allowed) => value.as_str().is_some_and(|s| allowed.contains(&s)),
    }
}

/// A subject on one line: control characters (CR, LF, tab, ...) and Unicode line separators
/// become spaces and runs of spaces one, so no data can start a new header.
fn one_line(subject: &str) -> String {
    let spaced: String = subject
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    spaced.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn parse_date(s: &str) -> Option<NaiveDate> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.to_utc().date_naive())
        .or_else(|| NaiveDate::parse_from_str(s, "%Y-%m-%d").ok())
}

fn parse_month(s: &str) -> Option<NaiveDate> {
    // `%Y` alone would take `20251-01`; a month is exactly `YYYY-MM`.
    if s.len() != 7 {
        return None;
    }
    NaiveDate::parse_from_str(&format!("{s}-01"), "%Y-%m-%d").ok()
}

fn filter_error(message: String) -> minijinja::Error {
    minijinja::Error::new(ErrorKind::InvalidOperation, message)
}

/// `1234567` → `1,234,567`.
fn group_thousands(digits: &str) -> String {
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// The `dollars` filter: cents as money, `125000` → `$1,250.00`, `-599` → `-$5.99`; with a
/// currency other than USD, `1,250.00 EUR`.
fn dollars(cents: i64, currency: Option<&str>) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let abs = cents.unsigned_abs();
    let amount = format!(
        "{}.{:02}",
        group_thousands(&(abs / 100).to_string()),
        abs % 100
    );
    match currency {
        Some(c) if !c.eq_ignore_ascii_case("usd") => {
            format!("{sign}{amount} {}", c.to_ascii_uppercase())
        }
        _ => format!("{sign}${amount}"),
    }
}

/// The `number` filter: `1234567` → `1,234,567`, `1234.5` → `1,234.5` (two decimals at most).
fn number(value: &minijinja::Value) -> Result<String, minijinja::Error> {
    if let Ok(n) = i64::try_from(value.clone()) {
        let grouped = group_thousands(&n.unsigned_abs().to_string());
        return Ok(if n < 0 {
            format!("-{grouped}")
        } else {
            grouped
        });
    }
    let n = f64::try_from(value.clone())
        .map_err(|_| filter_error(format!("number: {value} is not a number")))?;
    let fixed = format!("{:.2}", n.abs());
    let (whole, fraction) = fixed.split_once('.').unwrap_or((&fixed, ""));
    let fraction = fraction.trim_end_matches('0');
    let sign = if n < 0.0 && fixed != "0.00" { "-" } else { "" };
    let whole = group_thousands(whole);
    Ok(if fraction.is_empty() {
        format!("{sign}{whole}")
    } else {
        format!("{sign}{whole}.{fraction}")
    })
}

/// The `date` filter: RFC 3339 or `YYYY-MM-DD` → `November 14, 2025` (the UTC date).
fn date(value: &str) -> Result<String, minijinja::Error> {
    parse_date(value)
        .map(|d| d.format("%B %-d, %Y").to_string())
        .ok_or_else(|| filter_error(format!("date: {value:?} is not a date")))
}

/// The `month_name` filter: `2025-10` → `October 2025`.
fn month_name(value: &str) -> Result<String, minijinja::Error> {
    parse_month(value)
        .map(|d| d.format("%B %Y").to_string())
        .ok_or_else(|| filter_error(format!("month_name: {value:?} is not YYYY-MM")))
}

/// Realistic data for `kind`: the previews and the snapshot tests. Non-transactional kinds
/// carry the `unsubscribe_url` the queue would add.
pub fn sample_data(kind: EmailKind) -> Value {
    let mut data = json!({
        "to": "jane@acmegames.example",
        "customer_id": "cus_Q8x2LmN4pR",
        "name": "Jane Doe",
        "dashboard_url": "https://app.apexmediation.com/dashboard",
    });
    let specific = match kind {
        EmailKind::Welcome => json!({
            "plan_type": "starter",
            "api_key_prefix": "rsk_AbC12345",
            "trial_end": "2025-12-01T00:00:00Z",
        }),
        EmailKind::TrialEnding { days } => json!({
            "days_left": days,
            "trial_end": "2025-12-01T00:00:00Z",
            "plan_type": "starter",
            "upgrade_url": "https://app.apexmediation.com/billing/upgrade",
        }),
        EmailKind::PaymentFailed => json!({
            "amount_due_cents": 124_950,
            "currency": "usd",
            "update_payment_url": "https://invoice.stripe.com/i/acct_1Apex/test_YWNjdF8x",
            "retry_schedule": [
                "2025-11-17T03:00:00Z",
                "2025-11-18T03:00:00Z",
                "2025-11-21T03:00:00Z",
            ],
        }),
        EmailKind::PaymentRetry { attempt } => json!({
            "days_until_retry": match attempt { 1 => 3, 2 => 1, _ => 3 },
            "attempts_remaining": 3 - attempt.min(3) + 1,
            "amount_due_cents": 124_950,
            "update_payment_url": "https://invoice.stripe.com/i/acct_1Apex/test_YWNjdF8x",
        }),
        EmailKind::PaymentSucceeded => json!({
            "amount_paid_cents": 124_950,
            "service_status": "active",
        }),
        EmailKind::SubscriptionSuspended => json!({
            "amount_due_cents": 124_950,
            "update_payment_url": "https://invoice.stripe.com/i/acct_1Apex/test_YWNjdF8x",
        }),
        EmailKind::UsageAlert { threshold } => {
            let (used, percent) = match threshold {
                UsageThreshold::Percent80 => (8_120_400, 81.2),
                UsageThreshold::Percent90 => (9_034_500, 90.3),
                UsageThreshold::Percent100 => (10_000_000, 100.0),
                UsageThreshold::Overage => (11_250_000, 112.5),
            };
            let mut alert = json!({
                "metric": "impressions",
                "used": used,
                "limit": 10_000_000,
                "percent": percent,
                "period_end": "2025-11-30T23:59:59Z",
                "unsubscribe_url":
                    "https://app.apexmediation.com/settings/email?customer=cus_Q8x2LmN4pR&category=usage_alert",
            });
            if threshold == UsageThreshold::Overage {
                alert["overage_cost_cents"] = json!(62_500);
            }
            alert
        }
        EmailKind::MonthlySummary => json!({
            // A Growth customer's October as `apex_billing::summaries` enqueues it: API calls
            // over the allowance, the platform fee on $50,000 of revenue, the invoice issued.
            "month": "2025-10",
            "previous_month": "2025-09",
            "plan_type": "growth",
            "plan_name": "Growth",
            "currency": "usd",
            "impressions": 9_482_113,
            "impressions_included": 10_000_000,
            "impressions_overage": 0,
            "impressions_overage_cost_cents": 0,
            "impressions_previous": 8_431_950,
            "impressions_change_percent": 12,
            "api_calls": 1_204_877,
            "api_calls_included": 1_000_000,
            "api_calls_overage": 204_877,
            "api_calls_overage_cost_cents": 820,
            "api_calls_previous": 1_242_310,
            "api_calls_change_percent": -3,
            "data_transfer_gb": 48.7,
            "data_transfer_gb_included": 500,
            "data_transfer_gb_overage": 0,
            "data_transfer_gb_overage_cost_cents": 0,
            "data_transfer_gb_previous": 0,
            "data_transfer_gb_change_percent": null,
            "overage_cost_cents": 820,
            "mediated_revenue_cents": 5_000_000,
            "platform_fee_cents": 125_000,
            "platform_fee_bps": 250,
            "total_cents": 125_820,
            "invoice_total_cents": 125_820,
            "invoice_url": "https://invoice.stripe.com/i/acct_1Apex/test_b2N0b2Jlcg",
            "unsubscribe_url":
                "https://app.apexmediation.com/settings/email?customer=cus_Q8x2LmN4pR&category=monthly_summary",
        }),
        EmailKind::SdkUpdate => json!({
            "sdk": "ios",
            "version": "3.4.0",
            "release_notes_url": "https://docs.apexmediation.com/sdk/ios/releases/3.4.0",
            "notes": "Faster interstitial loading.\nNew consent API for TCF 2.2.",
            "unsubscribe_url":
                "https://app.apexmediation.com/settings/email?customer=cus_Q8x2LmN4pR&category=sdk_update",
        }),
    };
    if let (Some(map), Value::Object(more)) = (data.as_object_mut(), specific) {
        map.extend(more);
    }
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_template_parses() {
        assert!(ENV.is_ok(), "{:?}", ENV.as_ref().err());
    }

    #[test]
    fn dollars_group_thousands_and_keep_the_sign() {
        assert_eq!(dollars(125_000, None), "$1,250.00");
        assert_eq!(dollars(0, None), "$0.00");
        assert_eq!(dollars(5, None), "$0.05");
        assert_eq!(dollars(-599, None), "-$5.99");
        assert_eq!(dollars(-123_456_789, Some("usd")), "-$1,234,567.89");
        assert_eq!(dollars(100_000, Some("USD")), "$1,000.00");
        assert_eq!(dollars(100_000, Some("eur")), "1,000.00 EUR");
        assert_eq!(dollars(i64::MIN, None), "-$92,233,720,368,547,758.08");
    }

    #[test]
    fn numbers_group_thousands() {
        let n = |v: Value| number(&minijinja::Value::from(Serde(v))).unwrap();
        assert_eq!(n(json!(0)), "0");
        assert_eq!(n(json!(999)), "999");
        assert_eq!(n(json!(1000)), "1,000");
        assert_eq!(n(json!(10_000_000)), "10,000,000");
        assert_eq!(n(json!(-1234)), "-1,234");
        assert_eq!(n(json!(48.7)), "48.7");
        assert_eq!(n(json!(1234.567)), "1,234.57");
        assert_eq!(n(json!(100.0)), "100");
        assert!(number(&minijinja::Value::from("x")).is_err());
    }

    #[test]
    fn dates_show_the_utc_day() {
        assert_eq!(
            date("2025-11-14T23:30:00-05:00").unwrap(),
            "November 15, 2025"
        );
        assert_eq!(date("2025-01-02").unwrap(), "January 2, 2025");
        assert!(date("tomorrow").is_err());
        assert_eq!(month_name("2025-10").unwrap(), "October 2025");
        assert!(month_name("2025-13").is_err());
        assert!(month_name("2025-10-01").is_err());
    }

    #[test]
    fn subjects_lose_control_characters() {
        assert_eq!(one_line("a\r\nBcc: x@y\tz\u{2028}w  "), "a Bcc: x@y z w");
        assert_eq!(one_line("⚠️ Payment failed"), "⚠️ Payment failed");
    }

    #[test]
    fn urls_must_be_http() {
        assert!(fits(Ty::Url, &json!("https://a.example/x?y=1&z=2")));
        assert!(fits(Ty::Url, &json!("HTTP://a.example")));
        assert!(!fits(Ty::Url, &json!("javascript:alert(1)")));
        assert!(!fits(Ty::Url, &json!("https://a.example/\r\nx")));
        assert!(!fits(Ty::Url, &json!(3)));
    }
}
