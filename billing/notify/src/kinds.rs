//! The kinds of email (the operations guide's nine, per variant), named as `email_log` and the
//! `events` queue name them: the event type is `email.<email_type>`. Each variant is its own
//! type (`trial_ending_7d`, `payment_retry_2`, `usage_alert_90`, ...), so the guide's "same
//! type to the same customer at most once in 24 hours" never swallows a legitimate email.

use std::fmt;

/// What an email is about, per variant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EmailKind {
    /// `welcome`: right after sign-up.
    Welcome,
    /// `trial_ending_7d`, `trial_ending_3d`, `trial_ending_1d`.
    TrialEnding {
        /// Days before the trial ends: 7, 3 or 1.
        days: u8,
    },
    /// `payment_failed`: at once when a payment fails.
    PaymentFailed,
    /// `payment_retry_1` to `payment_retry_3`: before each retry (the third is the last).
    PaymentRetry {
        /// Which retry, 1 to 3.
        attempt: u8,
    },
    /// `payment_succeeded`: a retry (or the customer) paid; service restored.
    PaymentSucceeded,
    /// `subscription_suspended`: the last retry failed.
    SubscriptionSuspended,
    /// `usage_alert_80`, `usage_alert_90`, `usage_alert_100`, `usage_alert_overage`.
    UsageAlert {
        /// The threshold.
        threshold: UsageThreshold,
    },
    /// `monthly_summary`: the 1st of the month.
    MonthlySummary,
    /// `sdk_update`: a new SDK release.
    SdkUpdate,
}

/// A usage alert's threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UsageThreshold {
    /// 80 % of a limit.
    Percent80,
    /// 90 %.
    Percent90,
    /// 100 %.
    Percent100,
    /// Over the limit (overage is being charged).
    Overage,
}

/// Who may refuse an email: transactional ones always go; the others are a category a
/// customer can opt out of (`email_opt_outs.category`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Category {
    /// Payment, suspension, welcome and trial emails: always sent.
    Transactional,
    /// `usage_alert`.
    UsageAlert,
    /// `monthly_summary`.
    MonthlySummary,
    /// `sdk_update`.
    SdkUpdate,
}

impl Category {
    /// The `email_opt_outs.category` name; `None` for transactional email.
    pub fn opt_out_name(self) -> Option<&'static str> {
        match self {
            Category::Transactional => None,
            Category::UsageAlert => Some("usage_alert"),
            Category::MonthlySummary => Some("monthly_summary"),
            Category::SdkUpdate => Some("sdk_update"),
        }
    }
}

impl EmailKind {
    /// Every email type, in the guide's order.
    pub const ALL: [EmailKind; 16] = [
        EmailKind::Welcome,
        EmailKind::TrialEnding { days: 7 },
        EmailKind::TrialEnding { days: 3 },
        EmailKind::TrialEnding { days: 1 },
        EmailKind::PaymentFailed,
        EmailKind::PaymentRetry { attempt: 1 },
        EmailKind::PaymentRetry { attempt: 2 },
        EmailKind::PaymentRetry { attempt: 3 },
        EmailKind::PaymentSucceeded,
        EmailKind::SubscriptionSuspended,
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Percent80,
        },
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Percent90,
        },
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Percent100,
        },
        EmailKind::UsageAlert {
            threshold: UsageThreshold::Overage,
        },
        EmailKind::MonthlySummary,
        EmailKind::SdkUpdate,
    ];

    /// The kind of an `email_type` (`trial_ending_3d`); `None` for an unknown one.
    pub fn from_type(email_type: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|k| k.email_type() == email_type)
    }

    /// The kind of an event type (`email.trial_ending_3d`).
    pub fn from_event_type(event_type: &str) -> Option<Self> {
        Self::from_type(event_type.strip_prefix("email.")?)
    }

    /// Its `email_type` (`email_log.email_type`; the event type is `email.<this>`).
    pub fn email_type(self) -> String {
        match self {
            EmailKind::Welcome => "welcome".into(),
            EmailKind::TrialEnding { days } => format!("trial_ending_{days}d"),
            EmailKind::PaymentFailed => "payment_failed".into(),
            EmailKind::PaymentRetry { attempt } => format!("payment_retry_{attempt}"),
            EmailKind::PaymentSucceeded => "payment_succeeded".into(),
            EmailKind::SubscriptionSuspended => "subscription_suspended".into(),
            EmailKind::UsageAlert { threshold } => format!(
                "usage_alert_{}",
                match threshold {
                    UsageThreshold::Percent80 => "80",
                    UsageThreshold::Percent90 => "90",
                    UsageThreshold::Percent100 => "100",
                    UsageThreshold::Overage => "overage",
                }
            ),
            EmailKind::MonthlySummary => "monthly_summary".into(),
            EmailKind::SdkUpdate => "sdk_update".into(),
        }
    }

    /// Whether a customer may opt out of it.
    pub fn category(self) -> Category {
        match self {
            EmailKind::UsageAlert { .. } => Category::UsageAlert,
            EmailKind::MonthlySummary => Category::MonthlySummary,
            EmailKind::SdkUpdate => Category::SdkUpdate,
            _ => Category::Transactional,
        }
    }

    /// The queue's order: 0 payment and suspension, 1 welcome and trial, 2 the rest. The
    /// same rule is `events.priority` in Postgres (migration 0009).
    pub fn priority(self) -> i16 {
        match self {
            EmailKind::PaymentFailed
            | EmailKind::PaymentRetry { .. }
            | EmailKind::PaymentSucceeded
            | EmailKind::SubscriptionSuspended => 0,
            EmailKind::Welcome | EmailKind::TrialEnding { .. } => 1,
            _ => 2,
        }
    }
}

impl fmt::Display for EmailKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.email_type())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_type_names_one_kind_and_back() {
        let mut seen = std::collections::HashSet::new();
        for kind in EmailKind::ALL {
            let name = kind.email_type();
            assert!(seen.insert(name.clone()), "{name} twice");
            assert_eq!(EmailKind::from_type(&name), Some(kind));
            assert_eq!(
                EmailKind::from_event_type(&format!("email.{name}")),
                Some(kind)
            );
        }
        for bad in [
            "",
            "trial_ending_2d",
            "payment_retry_4",
            "email.welcome",
            "Welcome",
        ] {
            assert_eq!(EmailKind::from_type(bad), None, "{bad}");
        }
        assert_eq!(EmailKind::from_event_type("welcome"), None);
    }

    #[test]
    fn only_alerts_summaries_and_sdk_notices_can_be_refused() {
        for kind in EmailKind::ALL {
            let optional = kind.category().opt_out_name().is_some();
            let expected = matches!(
                kind,
                EmailKind::UsageAlert { .. } | EmailKind::MonthlySummary | EmailKind::SdkUpdate
            );
            assert_eq!(optional, expected, "{kind}");
        }
    }
}
