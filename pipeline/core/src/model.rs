//! The usage record model: which metrics exist and the exact integer unit each is stored in.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

/// Bytes in one GB of data transfer. Data transfer is reported in GB (the operations guide's
/// unit) and stored in bytes, decimal GB as cloud billing counts it, so fractional GB values
/// stay exact integers.
pub const BYTES_PER_GB: u64 = 1_000_000_000;

/// A metered quantity kind. The string forms are the guide's `metric_type` values and the
/// values of the `metric_type` columns in both stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Metric {
    /// Ad impressions served; counted in impressions.
    Impressions,
    /// API requests made; counted in calls.
    ApiCalls,
    /// Data transferred; stored in bytes, reported in GB.
    DataTransfer,
}

impl Metric {
    /// Every metric, in the order dashboards list them.
    pub const ALL: [Metric; 3] = [Metric::Impressions, Metric::ApiCalls, Metric::DataTransfer];

    /// The wire and column name of the metric.
    pub const fn as_str(self) -> &'static str {
        match self {
            Metric::Impressions => "impressions",
            Metric::ApiCalls => "api_calls",
            Metric::DataTransfer => "data_transfer",
        }
    }

    /// The unit quantities of this metric are stored in.
    pub const fn storage_unit(self) -> &'static str {
        match self {
            Metric::Impressions => "impressions",
            Metric::ApiCalls => "calls",
            Metric::DataTransfer => "bytes",
        }
    }
}

impl serde::Serialize for Metric {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl fmt::Display for Metric {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A `metric_type` that is not one of [`Metric::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown metric_type {0:?}: expected impressions, api_calls or data_transfer")]
pub struct UnknownMetric(pub String);

impl FromStr for Metric {
    type Err = UnknownMetric;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "impressions" => Ok(Metric::Impressions),
            "api_calls" => Ok(Metric::ApiCalls),
            "data_transfer" => Ok(Metric::DataTransfer),
            other => Err(UnknownMetric(other.to_owned())),
        }
    }
}

/// One accepted usage record, in storage units, as the edge hands it to the pipeline.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageRecord {
    /// The customer the API key belongs to (shared by every record of a request).
    pub customer_id: Arc<str>,
    /// What was used.
    pub metric: Metric,
    /// How much, in [`Metric::storage_unit`]; never zero.
    pub quantity: u64,
    /// The client's idempotency key, if it sent one.
    pub event_id: Option<Box<str>>,
    /// When the usage happened, unix milliseconds (the client's timestamp, or arrival time).
    pub timestamp_ms: i64,
    /// When the edge accepted it, unix milliseconds.
    pub received_ms: i64,
    /// The client's `metadata` object as compact JSON text, if any.
    pub metadata: Option<Box<str>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metric_names_round_trip() {
        for metric in Metric::ALL {
            assert_eq!(metric.as_str().parse::<Metric>(), Ok(metric));
        }
    }

    #[test]
    fn unknown_and_differently_cased_metrics_are_refused() {
        for name in [
            "",
            "Impressions",
            "impression",
            "data_transfer_gb",
            " api_calls",
        ] {
            assert!(name.parse::<Metric>().is_err(), "{name:?} must be refused");
        }
    }
}
