//! Whether a customer is served: the `customers.status` values and what the edge does with
//! each. Its own module because keys, customers and (next) dunning all read it.

use std::str::FromStr;

use serde::Serialize;

use crate::error::BillingError;

/// Whether a customer is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CustomerStatus {
    /// Served.
    Active,
    /// Refused at the edge with 403 `account_suspended` until payment reactivates it.
    Suspended,
    /// Closed; refused like an unknown key.
    Canceled,
}

impl CustomerStatus {
    /// The `customers.status` value.
    pub const fn as_str(self) -> &'static str {
        match self {
            CustomerStatus::Active => "active",
            CustomerStatus::Suspended => "suspended",
            CustomerStatus::Canceled => "canceled",
        }
    }
}

impl FromStr for CustomerStatus {
    type Err = BillingError;
    fn from_str(s: &str) -> Result<Self, BillingError> {
        match s {
            "active" => Ok(CustomerStatus::Active),
            "suspended" => Ok(CustomerStatus::Suspended),
            "canceled" => Ok(CustomerStatus::Canceled),
            other => Err(BillingError::Invalid(format!(
                "unknown customer status {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_round_trip() {
        for s in [
            CustomerStatus::Active,
            CustomerStatus::Suspended,
            CustomerStatus::Canceled,
        ] {
            assert_eq!(s.as_str().parse::<CustomerStatus>().unwrap(), s);
        }
        assert!("paused".parse::<CustomerStatus>().is_err());
    }
}
