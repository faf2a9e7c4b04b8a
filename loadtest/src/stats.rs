//! Latency and outcome statistics: HDR histograms in microseconds, per connection and per
//! second of the run, merged at the end into the summary and the timeline of the report.

use std::collections::BTreeMap;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded exactly, in microseconds; longer ones are recorded as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant digits, 1 µs to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// How one request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Outcome {
    /// An HTTP answer with this status.
    Status(u16),
    /// No answer: the connection failed or closed.
    Transport,
    /// No answer within the request timeout.
    Timeout,
}

impl Outcome {
    /// The label of the outcome in reports: the status code, `transport` or `timeout`.
    pub fn label(self) -> String {
        match self {
            Outcome::Status(code) => code.to_string(),
            Outcome::Transport => "transport".into(),
            Outcome::Timeout => "timeout".into(),
        }
    }

    /// True for a 2xx answer.
    pub fn is_success(self) -> bool {
        matches!(self, Outcome::Status(code) if (200..300).contains(&code))
    }
}

/// Requests that ended in one stretch of the run (one second, one connection, or the whole).
#[derive(Debug, Clone)]
pub struct Tally {
    /// Latency of every answered request, from its intended send time.
    pub latency: Histogram<u64>,
    /// Requests by outcome.
    pub outcomes: BTreeMap<Outcome, u64>,
    /// Usage records carried by 2xx answers.
    pub records_ok: u64,
}

impl Default for Tally {
    fn default() -> Self {
        Self {
            latency: new_histogram(),
            outcomes: BTreeMap::new(),
            records_ok: 0,
        }
    }
}

impl Tally {
    /// Counts one request: its outcome, its latency when it was answered, its records when
    /// they were accepted.
    pub fn record(&mut self, outcome: Outcome, latency_us: u64, records: u64) {
        *self.outcomes.entry(outcome).or_default() += 1;
        if matches!(outcome, Outcome::Status(_)) {
            self.latency
                .saturating_record(latency_us.clamp(1, MAX_LATENCY_US));
        }
        if outcome.is_success() {
            self.records_ok += records;
        }
    }

    /// Adds `other` into this tally.
    pub fn merge(&mut self, other: &Tally) {
        self.latency
            .add(&other.latency)
            .expect("histograms share their bounds");
        for (outcome, n) in &other.outcomes {
            *self.outcomes.entry(*outcome).or_default() += n;
        }
        self.records_ok += other.records_ok;
    }

    /// Requests counted.
    pub fn requests(&self) -> u64 {
        self.outcomes.values().sum()
    }

    /// Requests answered 2xx.
    pub fn successes(&self) -> u64 {
        self.outcomes
            .iter()
            .filter(|(o, _)| o.is_success())
            .map(|(_, n)| n)
            .sum()
    }

    /// Latency percentiles of the tally.
    pub fn percentiles(&self) -> Percentiles {
        let at = |q: f64| {
            if self.latency.is_empty() {
                0
            } else {
                self.latency.value_at_quantile(q)
            }
        };
        Percentiles {
            p50_us: at(0.50),
            p90_us: at(0.90),
            p99_us: at(0.99),
            p999_us: at(0.999),
            max_us: self.latency.max(),
        }
    }
}

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Percentiles {
    /// Median.
    pub p50_us: u64,
    /// 90th percentile.
    pub p90_us: u64,
    /// 99th percentile.
    pub p99_us: u64,
    /// 99.9th percentile.
    pub p999_us: u64,
    /// Largest.
    pub max_us: u64,
}

/// What one connection measured: its whole tally and one tally per second of the run.
#[derive(Debug, Default)]
pub struct ConnectionStats {
    /// Everything.
    pub total: Tally,
    /// By second since the start (the second in which each request ended).
    pub seconds: BTreeMap<u64, Tally>,
}

impl ConnectionStats {
    /// Counts a request that ended `second` seconds after the start.
    pub fn record(&mut self, second: u64, outcome: Outcome, latency_us: u64, records: u64) {
        self.total.record(outcome, latency_us, records);
        self.seconds
            .entry(second)
            .or_default()
            .record(outcome, latency_us, records);
    }

    /// Adds `other` into these stats, second by second.
    pub fn merge(&mut self, other: &ConnectionStats) {
        self.total.merge(&other.total);
        for (second, tally) in &other.seconds {
            self.seconds.entry(*second).or_default().merge(tally);
        }
    }
}

/// The median of `values` (the lower middle one for an even count), or 0 when empty.
pub fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    if sorted.is_empty() {
        0.0
    } else {
        sorted[(sorted.len() - 1) / 2]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merged_histograms_equal_one_histogram_of_all_values() {
        let mut a = ConnectionStats::default();
        let mut b = ConnectionStats::default();
        let mut all = new_histogram();
        for i in 1..=10_000u64 {
            let latency = i * 37 % 5_000 + 1;
            let target = if i % 3 == 0 { &mut a } else { &mut b };
            target.record(i / 2_000, Outcome::Status(200), latency, 1);
            all.record(latency).unwrap();
        }
        let mut merged = ConnectionStats::default();
        merged.merge(&a);
        merged.merge(&b);
        assert_eq!(merged.total.latency, all);
        assert_eq!(merged.total.requests(), 10_000);
        assert_eq!(merged.total.records_ok, 10_000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.total.latency.value_at_quantile(q),
                all.value_at_quantile(q)
            );
        }
        // Seconds merge separately: 0..=5, and each holds what ended in it.
        assert_eq!(merged.seconds.len(), 6);
        let per_second: u64 = merged.seconds.values().map(Tally::requests).sum();
        assert_eq!(per_second, 10_000);
        assert_eq!(merged.seconds[&1].requests(), 2_000);
    }

    #[test]
    fn outcomes_are_counted_by_kind_and_only_answers_have_latency() {
        let mut tally = Tally::default();
        tally.record(Outcome::Status(200), 100, 10);
        tally.record(Outcome::Status(503), 50, 10);
        tally.record(Outcome::Transport, 0, 10);
        tally.record(Outcome::Timeout, 0, 10);
        tally.record(Outcome::Status(200), 300, 5);
        assert_eq!(tally.requests(), 5);
        assert_eq!(tally.successes(), 2);
        assert_eq!(tally.records_ok, 15);
        assert_eq!(tally.latency.len(), 3);
        assert_eq!(tally.outcomes[&Outcome::Status(503)], 1);
        assert_eq!(tally.percentiles().max_us, 300);
        assert_eq!(Outcome::Timeout.label(), "timeout");
        assert_eq!(Outcome::Status(413).label(), "413");
    }

    #[test]
    fn latencies_beyond_the_range_are_kept_at_its_edges() {
        let mut tally = Tally::default();
        tally.record(Outcome::Status(200), 0, 1);
        tally.record(Outcome::Status(200), MAX_LATENCY_US * 10, 1);
        assert_eq!(tally.latency.len(), 2);
        assert_eq!(tally.latency.min(), 1);
        assert!(tally.latency.max() >= MAX_LATENCY_US);
    }

    #[test]
    fn percentiles_of_an_empty_tally_are_zero() {
        let p = Tally::default().percentiles();
        assert_eq!((p.p50_us, p.p99_us, p.max_us), (0, 0, 0));
    }

    #[test]
    fn median_takes_the_middle() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.0);
        assert_eq!(median(&[]), 0.0);
    }
}
