//! Pricing as pure functions, all in integer cents: overage lines, the platform fee on a
//! month's mediated revenue, billing periods and the run-rate projection. Nothing here reads
//! a clock or a database, so every rule is tested exhaustively below.
//!
//! Rules (the README repeats them for customers):
//!
//! - **Rounding**: a line's amount is `quantity × price ÷ unit`, computed exactly and rounded
//!   half up to the cent once, at the end of the line (never per unit, never per day). Stripe
//!   rounds line amounts the same way.
//! - **Overage**: the units used above the plan's included quantity, priced per
//!   `overage_unit_quantity` units (1,000 impressions, 1,000 API calls, 1 GB), prorated: 1,500
//!   impressions over at 10 cents per 1,000 are 15 cents. An unlimited metric has no overage.
//! - **Platform fee band**: the band follows the month's mediated revenue, not the plan on
//!   record, so a publisher who grows moves band without anyone changing a plan. The whole
//!   month's revenue is charged at the rate of the one band its total falls in, which is how
//!   the operations guide computes its example (Growth, $50,000 × 2.5 % = $1,250); a month is
//!   never split across bands. Band edges are inclusive of their upper bound in cents:
//!   $10,000.00 is Starter (0 %), $10,000.01 is Growth.
//! - **Enterprise contracts**: a customer with a negotiated rate (1.0 % to 1.5 %, the
//!   Enterprise plan's range) pays that rate on every month's revenue, whatever the band; a
//!   negotiated monthly minimum raises the fee to the minimum. Without a contract, revenue
//!   above $500,000 pays the Enterprise plan's default rate.
//! - **Billing period**: the subscription's current period when it has one that contains the
//!   moment asked about, else the calendar month in UTC.
//! - **Projection** (`will_exceed`): usage so far, extended at the period's average rate so far
//!   to the end of the period (at least one hour counts as elapsed, so a period's first minutes
//!   do not extrapolate a single burst); a metric already over its limit will exceed.

use chrono::{DateTime, Datelike, Duration, NaiveDate, TimeZone, Utc};
use serde::{Deserialize, Serialize};

use apex_core::model::Metric;

/// A pricing input that cannot be billed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PricingError {
    /// A price needs a positive unit.
    #[error("the overage unit quantity of {0} must be above zero")]
    ZeroUnit(Metric),
    /// The bands do not cover this revenue.
    #[error("no platform-fee band covers {0} cents of revenue")]
    NoBand(u64),
    /// A negotiated rate outside what the Enterprise plan allows.
    #[error("the negotiated platform fee of {bps} bps is outside {min}..={max} bps")]
    RateOutOfRange {
        /// The rate.
        bps: u32,
        /// Lowest allowed.
        min: u32,
        /// Highest allowed.
        max: u32,
    },
    /// An amount too large for a u64 of cents.
    #[error("the amount overflows")]
    Overflow,
}

/// `value × numerator ÷ denominator`, rounded half up, exactly (128-bit intermediate).
pub fn mul_div_round(value: u64, numerator: u64, denominator: u64) -> Result<u64, PricingError> {
    debug_assert!(denominator > 0);
    let product = u128::from(value) * u128::from(numerator);
    let denominator = u128::from(denominator);
    let rounded = (product + denominator / 2) / denominator;
    u64::try_from(rounded).map_err(|_| PricingError::Overflow)
}

/// What one metric costs on a plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct MetricPrice {
    /// The metric.
    pub metric: Metric,
    /// Included per period, in storage units; `None` is unlimited.
    pub included: Option<u64>,
    /// Overage is priced per this many units.
    pub unit_quantity: u64,
    /// Price of one such block, in cents.
    pub cents_per_unit: u64,
}

/// One metric's usage against its price.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Overage {
    /// The metric.
    pub metric: Metric,
    /// Used in the period, storage units.
    pub used: u64,
    /// Included, if limited.
    pub included: Option<u64>,
    /// Units above the included quantity.
    pub overage: u64,
    /// What the overage costs, cents.
    pub cost_cents: u64,
}

/// Prices `used` units of `price.metric`.
pub fn overage(price: &MetricPrice, used: u64) -> Result<Overage, PricingError> {
    if price.unit_quantity == 0 {
        return Err(PricingError::ZeroUnit(price.metric));
    }
    let over = price
        .included
        .map_or(0, |included| used.saturating_sub(included));
    Ok(Overage {
        metric: price.metric,
        used,
        included: price.included,
        overage: over,
        cost_cents: mul_div_round(over, price.cents_per_unit, price.unit_quantity)?,
    })
}

/// A platform-fee band: revenue from `min_cents` to `max_cents` (inclusive) pays `bps`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeBand {
    /// The plan that names the band (`starter`, `growth`, `scale`, `enterprise`).
    pub plan_id: String,
    /// Lowest monthly revenue of the band, cents.
    pub min_cents: u64,
    /// Highest, cents; `None` is unbounded.
    pub max_cents: Option<u64>,
    /// Default rate, basis points.
    pub bps: u32,
    /// Lowest negotiable rate.
    pub bps_min: u32,
    /// Highest negotiable rate.
    pub bps_max: u32,
}

/// A customer's negotiated terms (an Enterprise contract), if any.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FeeTerms {
    /// Negotiated rate, basis points.
    pub override_bps: Option<u32>,
    /// Monthly minimum fee, cents.
    pub minimum_cents: Option<u64>,
}

/// The platform fee of one month.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PlatformFee {
    /// The month's mediated revenue, cents.
    pub revenue_cents: u64,
    /// The band the revenue falls in.
    pub band: String,
    /// The rate applied, basis points.
    pub bps: u32,
    /// True when the rate is the customer's negotiated one.
    pub negotiated: bool,
    /// Revenue × rate, rounded once.
    pub computed_cents: u64,
    /// True when the minimum raised the fee.
    pub minimum_applied: bool,
    /// What is charged, cents.
    pub amount_cents: u64,
}

/// The band `revenue_cents` falls in; `bands` in any order.
pub fn band_for(revenue_cents: u64, bands: &[FeeBand]) -> Result<&FeeBand, PricingError> {
    bands
        .iter()
        .find(|b| {
            revenue_cents >= b.min_cents && b.max_cents.is_none_or(|max| revenue_cents <= max)
        })
        .ok_or(PricingError::NoBand(revenue_cents))
}

/// The platform fee on `revenue_cents` of mediated revenue in one month.
pub fn platform_fee(
    revenue_cents: u64,
    bands: &[FeeBand],
    terms: &FeeTerms,
) -> Result<PlatformFee, PricingError> {
    let band = band_for(revenue_cents, bands)?;
    let (bps, negotiated) = match terms.override_bps {
        Some(bps) => {
            // The contract's range is the Enterprise band's (the one without an upper bound).
            let contract = bands.iter().find(|b| b.max_cents.is_none()).unwrap_or(band);
            if bps < contract.bps_min || bps > contract.bps_max {
                return Err(PricingError::RateOutOfRange {
                    bps,
                    min: contract.bps_min,
                    max: contract.bps_max,
                });
            }
            (bps, true)
        }
        None => (band.bps, false),
    };
    let computed = mul_div_round(revenue_cents, u64::from(bps), 10_000)?;
    let minimum = terms.minimum_cents.unwrap_or(0);
    Ok(PlatformFee {
        revenue_cents,
        band: band.plan_id.clone(),
        bps,
        negotiated,
        computed_cents: computed,
        minimum_applied: minimum > computed,
        amount_cents: computed.max(minimum),
    })
}

/// A billing period, `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Period {
    /// First instant.
    pub start: DateTime<Utc>,
    /// First instant after it.
    pub end: DateTime<Utc>,
}

/// The calendar month in UTC that contains `at`.
pub fn calendar_month(at: DateTime<Utc>) -> Period {
    month_period(at.year(), at.month()).expect("a month of a valid date")
}

/// The calendar month `year`-`month` in UTC; `None` for an invalid month.
pub fn month_period(year: i32, month: u32) -> Option<Period> {
    let first = NaiveDate::from_ymd_opt(year, month, 1)?;
    let next = if month == 12 {
        NaiveDate::from_ymd_opt(year.checked_add(1)?, 1, 1)?
    } else {
        NaiveDate::from_ymd_opt(year, month + 1, 1)?
    };
    Some(Period {
        start: Utc.from_utc_datetime(&first.and_hms_opt(0, 0, 0)?),
        end: Utc.from_utc_datetime(&next.and_hms_opt(0, 0, 0)?),
    })
}

/// The years [`parse_month`] accepts: every four-digit year whose December still ends in a
/// four-digit year, so every period an answer shows is an RFC 3339 `date-time` (`9999-12`
/// would end at `+10000-01-01`).
pub const MONTH_YEARS: std::ops::RangeInclusive<i32> = 0..=9998;

/// Parses `YYYY-MM` (the month of `?month=` and `--month`), years in [`MONTH_YEARS`].
pub fn parse_month(text: &str) -> Option<Period> {
    let (year, month) = text.split_once('-')?;
    if year.len() != 4
        || month.len() != 2
        || !year
            .bytes()
            .chain(month.bytes())
            .all(|b| b.is_ascii_digit())
    {
        return None;
    }
    let year: i32 = year.parse().ok()?;
    if !MONTH_YEARS.contains(&year) {
        return None;
    }
    month_period(year, month.parse().ok()?)
}

/// The billing period containing `at`: the subscription's when it has one containing `at`,
/// else the calendar month.
pub fn billing_period(
    at: DateTime<Utc>,
    subscription: Option<(DateTime<Utc>, DateTime<Utc>)>,
) -> Period {
    match subscription {
        Some((start, end)) if start <= at && at < end => Period { start, end },
        _ => calendar_month(at),
    }
}

/// Usage at the end of `period` if it goes on at the average rate of `[period.start, at)`.
pub fn projected(used: u64, period: &Period, at: DateTime<Utc>) -> u64 {
    let length = (period.end - period.start).num_seconds().max(1);
    let elapsed = (at - period.start)
        .max(Duration::hours(1))
        .num_seconds()
        .clamp(1, length);
    mul_div_round(used, length as u64, elapsed as u64).unwrap_or(u64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bands() -> Vec<FeeBand> {
        // The seeded plans (migrations/postgres/0002_seed_plans.sql).
        let band = |plan: &str, min, max, bps, lo, hi| FeeBand {
            plan_id: plan.into(),
            min_cents: min,
            max_cents: max,
            bps,
            bps_min: lo,
            bps_max: hi,
        };
        vec![
            band("enterprise", 50_000_001, None, 150, 100, 150),
            band("starter", 0, Some(1_000_000), 0, 0, 0),
            band("scale", 10_000_001, Some(50_000_000), 200, 200, 200),
            band("growth", 1_000_001, Some(10_000_000), 250, 250, 250),
        ]
    }

    fn at(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text)
            .unwrap()
            .with_timezone(&Utc)
    }

    #[test]
    fn the_guides_example_holds() {
        // Growth, $50,000 of mediated revenue -> $1,250.
        let fee = platform_fee(5_000_000, &bands(), &FeeTerms::default()).unwrap();
        assert_eq!(fee.band, "growth");
        assert_eq!(fee.bps, 250);
        assert_eq!(fee.amount_cents, 125_000);
        assert!(!fee.negotiated && !fee.minimum_applied);
    }

    #[test]
    fn each_band_edge_lands_in_the_right_band() {
        let terms = FeeTerms::default();
        for (revenue, band, fee) in [
            (0, "starter", 0),
            (1, "starter", 0),
            (1_000_000, "starter", 0),
            (1_000_001, "growth", 25_000),
            (10_000_000, "growth", 250_000),
            (10_000_001, "scale", 200_000),
            (50_000_000, "scale", 1_000_000),
            (50_000_001, "enterprise", 750_000),
            (1_000_000_000_000, "enterprise", 15_000_000_000),
        ] {
            let got = platform_fee(revenue, &bands(), &terms).unwrap();
            assert_eq!(
                (got.band.as_str(), got.amount_cents),
                (band, fee),
                "{revenue}"
            );
        }
    }

    #[test]
    fn every_revenue_falls_in_exactly_one_band_and_pays_its_rate() {
        let bands = bands();
        let terms = FeeTerms::default();
        // Every band edge and its neighbours, then a deterministic spread up to $10M.
        let mut revenues: Vec<u64> = vec![0, 1, 99, 100];
        for edge in [1_000_000u64, 10_000_000, 50_000_000] {
            revenues.extend(edge - 2..=edge + 2);
        }
        let mut x = 0x2545_F491_4F6C_DD1Du64;
        for _ in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            revenues.push(x % 1_000_000_000);
        }
        for revenue in revenues {
            let containing: Vec<&FeeBand> = bands
                .iter()
                .filter(|b| revenue >= b.min_cents && b.max_cents.is_none_or(|m| revenue <= m))
                .collect();
            assert_eq!(containing.len(), 1, "{revenue}");
            let fee = platform_fee(revenue, &bands, &terms).unwrap();
            let bps = u128::from(containing[0].bps);
            // Half up, written independently of mul_div_round.
            let expected = (u128::from(revenue) * bps * 2 + 10_000) / 20_000;
            assert_eq!(u128::from(fee.amount_cents), expected, "{revenue}");
            assert_eq!(fee.band, containing[0].plan_id);
        }
    }

    #[test]
    fn fees_round_half_up_once() {
        let terms = FeeTerms::default();
        // 1,000,003 cents x 2.5 % = 25,000.075 -> 25,000
        assert_eq!(
            platform_fee(1_000_003, &bands(), &terms)
                .unwrap()
                .amount_cents,
            25_000
        );
        // 1,000,020 x 2.5 % = 25,000.5 -> 25,001 (half up)
        assert_eq!(
            platform_fee(1_000_020, &bands(), &terms)
                .unwrap()
                .amount_cents,
            25_001
        );
        // 1,000,019 x 2.5 % = 25,000.475 -> 25,000
        assert_eq!(
            platform_fee(1_000_019, &bands(), &terms)
                .unwrap()
                .amount_cents,
            25_000
        );
    }

    #[test]
    fn a_contract_rate_applies_to_every_month_and_minimums_raise_the_fee() {
        let contract = FeeTerms {
            override_bps: Some(100),
            minimum_cents: Some(600_000),
        };
        // $1M at 1.0 % = $10,000, above the $6,000 minimum.
        let big = platform_fee(100_000_000, &bands(), &contract).unwrap();
        assert_eq!(
            (big.bps, big.amount_cents, big.minimum_applied),
            (100, 1_000_000, false)
        );
        assert!(big.negotiated);
        // A slow month in the Scale band still pays the contract rate, and the minimum.
        let slow = platform_fee(20_000_000, &bands(), &contract).unwrap();
        assert_eq!(slow.band, "scale");
        assert_eq!((slow.bps, slow.computed_cents), (100, 200_000));
        assert_eq!((slow.amount_cents, slow.minimum_applied), (600_000, true));
        // Rates outside 1.0 %..1.5 % are refused, not billed.
        for bps in [99, 151, 0, 250] {
            let terms = FeeTerms {
                override_bps: Some(bps),
                minimum_cents: None,
            };
            assert!(matches!(
                platform_fee(100_000_000, &bands(), &terms),
                Err(PricingError::RateOutOfRange { .. })
            ));
        }
        for bps in [100, 125, 150] {
            let terms = FeeTerms {
                override_bps: Some(bps),
                minimum_cents: None,
            };
            assert_eq!(
                platform_fee(100_000_000, &bands(), &terms).unwrap().bps,
                bps
            );
        }
    }

    #[test]
    fn revenue_outside_every_band_is_an_error() {
        let only_growth: Vec<FeeBand> = bands()
            .into_iter()
            .filter(|b| b.plan_id == "growth")
            .collect();
        assert_eq!(
            platform_fee(5, &only_growth, &FeeTerms::default()),
            Err(PricingError::NoBand(5))
        );
    }

    #[test]
    fn overage_is_prorated_per_block_and_rounded_once() {
        let impressions = MetricPrice {
            metric: Metric::Impressions,
            included: Some(1_000_000),
            unit_quantity: 1_000,
            cents_per_unit: 10,
        };
        let cases = [
            (0, 0, 0),
            (999_999, 0, 0),
            (1_000_000, 0, 0),
            (1_000_001, 1, 0),      // 0.01 cents -> 0
            (1_000_050, 50, 1),     // 0.5 cents -> 1 (half up)
            (1_000_049, 49, 0),     // 0.49 -> 0
            (1_001_500, 1_500, 15), // 15 cents
            (2_000_000, 1_000_000, 10_000),
        ];
        for (used, over, cents) in cases {
            let o = overage(&impressions, used).unwrap();
            assert_eq!((o.overage, o.cost_cents), (over, cents), "{used}");
        }
        // Rounding happens once per line: 1,000 lines of 1 unit would be 0 cents each, one
        // line of 1,000 units is 10 cents.
        assert_eq!(overage(&impressions, 1_001_000).unwrap().cost_cents, 10);
    }

    #[test]
    fn data_transfer_is_priced_per_gb_in_bytes_and_unlimited_metrics_cost_nothing() {
        let gb = MetricPrice {
            metric: Metric::DataTransfer,
            included: Some(50_000_000_000),
            unit_quantity: 1_000_000_000,
            cents_per_unit: 10,
        };
        // 52.5 GB used: 2.5 GB over at 10 cents per GB = 25 cents.
        assert_eq!(overage(&gb, 52_500_000_000).unwrap().cost_cents, 25);
        let unlimited = MetricPrice {
            included: None,
            ..gb
        };
        let o = overage(&unlimited, u64::MAX).unwrap();
        assert_eq!((o.overage, o.cost_cents), (0, 0));
        let broken = MetricPrice {
            unit_quantity: 0,
            ..gb
        };
        assert_eq!(
            overage(&broken, 1),
            Err(PricingError::ZeroUnit(Metric::DataTransfer))
        );
    }

    #[test]
    fn huge_quantities_do_not_overflow_silently() {
        assert_eq!(mul_div_round(u64::MAX, 2, 1), Err(PricingError::Overflow));
        assert_eq!(mul_div_round(u64::MAX, 10, 10), Ok(u64::MAX));
        let price = MetricPrice {
            metric: Metric::ApiCalls,
            included: Some(0),
            unit_quantity: 1_000,
            cents_per_unit: 5,
        };
        assert_eq!(
            overage(&price, u64::MAX).unwrap().cost_cents,
            92_233_720_368_547_758
        );
    }

    #[test]
    fn periods_are_calendar_months_unless_a_subscription_period_contains_the_moment() {
        let month = calendar_month(at("2025-11-15T12:00:00Z"));
        assert_eq!(month.start, at("2025-11-01T00:00:00Z"));
        assert_eq!(month.end, at("2025-12-01T00:00:00Z"));
        let december = calendar_month(at("2025-12-31T23:59:59Z"));
        assert_eq!(december.end, at("2026-01-01T00:00:00Z"));
        assert_eq!(
            calendar_month(at("2024-02-29T00:00:00Z")).end,
            at("2024-03-01T00:00:00Z")
        );
        let subscription = Some((at("2025-11-10T08:30:00Z"), at("2025-12-10T08:30:00Z")));
        assert_eq!(
            billing_period(at("2025-11-20T00:00:00Z"), subscription),
            Period {
                start: at("2025-11-10T08:30:00Z"),
                end: at("2025-12-10T08:30:00Z")
            }
        );
        // A stale subscription period (the next one not yet reported) is not used.
        assert_eq!(
            billing_period(at("2025-12-11T00:00:00Z"), subscription),
            calendar_month(at("2025-12-11T00:00:00Z"))
        );
        // The start is inside, the end is not.
        assert_eq!(
            billing_period(at("2025-11-10T08:30:00Z"), subscription).start,
            at("2025-11-10T08:30:00Z")
        );
        assert_eq!(
            billing_period(at("2025-12-10T08:30:00Z"), subscription).start,
            at("2025-12-01T00:00:00Z")
        );
    }

    #[test]
    fn months_parse_strictly() {
        assert_eq!(
            parse_month("2025-11").unwrap().start,
            at("2025-11-01T00:00:00Z")
        );
        assert_eq!(
            parse_month("2025-12").unwrap().end,
            at("2026-01-01T00:00:00Z")
        );
        for bad in [
            "2025-13",
            "2025-00",
            "2025-1",
            "25-11",
            "2025/11",
            "2025-11-01",
            "",
            "abcd-ef",
            "+025-11",
            "2025-+1",
            "9999-12",
            "9999-01",
        ] {
            assert!(parse_month(bad).is_none(), "{bad}");
        }
        // The last month accepted still ends in a four-digit year.
        assert_eq!(
            parse_month("9998-12").unwrap().end.to_rfc3339(),
            "9999-01-01T00:00:00+00:00"
        );
        assert_eq!(
            parse_month("0000-01").unwrap().start.to_rfc3339(),
            "0000-01-01T00:00:00+00:00"
        );
    }

    #[test]
    fn projections_extend_the_run_rate_to_the_period_end() {
        let period = month_period(2025, 11).unwrap(); // 30 days
        // A third of the way in, 100 used -> 300 by the end.
        assert_eq!(projected(100, &period, at("2025-11-11T00:00:00Z")), 300);
        // At the end (or after), what was used.
        assert_eq!(projected(100, &period, period.end), 100);
        assert_eq!(projected(100, &period, at("2026-01-05T00:00:00Z")), 100);
        // In the first minutes, one hour counts as elapsed: 10 used in 1 minute is 10 per
        // hour, 7,200 over the 720-hour month.
        assert_eq!(projected(10, &period, at("2025-11-01T00:01:00Z")), 7_200);
        assert_eq!(projected(0, &period, at("2025-11-20T00:00:00Z")), 0);
    }
}
