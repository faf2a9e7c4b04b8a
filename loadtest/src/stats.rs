//! Latency and outcome statistics: HDR histograms in microseconds. Each connection keeps its
//! own whole-run tally (3 significant digits) and the tally of the second in progress (2
//! digits, a tenth of the memory), which it adds to the shared timeline when the second ends
//! and then reuses: memory stays flat however long the run, and no lock is taken per request.

use std::collections::BTreeMap;
use std::sync::Mutex;

use hdrhistogram::Histogram;
use serde::Serialize;

/// Largest latency recorded exactly, in microseconds; longer ones are recorded as this.
pub const MAX_LATENCY_US: u64 = 60_000_000;

/// A latency histogram in microseconds, 3 significant digits, 1 µs to 60 s.
pub fn new_histogram() -> Histogram<u64> {
    histogram_with_digits(3)
}

fn histogram_with_digits(digits: u8) -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, digits).expect("valid histogram bounds")
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
    /// A tally for one second of the timeline: latency to 2 significant digits.
    pub fn coarse() -> Self {
        Self {
            latency: histogram_with_digits(2),
            ..Self::default()
        }
    }

    /// Empties the tally, keeping its memory.
    pub fn reset(&mut self) {
        self.latency.reset();
        self.outcomes.clear();
        self.records_ok = 0;
    }

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

/// The run second by second, filled by every connection.
#[derive(Debug, Default)]
pub struct Timeline {
    seconds: Mutex<BTreeMap<u64, Tally>>,
}

impl Timeline {
    /// Adds `tally` to second `second`.
    pub fn add(&self, second: u64, tally: &Tally) {
        let mut seconds = self.seconds.lock().unwrap_or_else(|p| p.into_inner());
        seconds
            .entry(second)
            .or_insert_with(Tally::coarse)
            .merge(tally);
    }

    /// The seconds recorded so far.
    pub fn snapshot(&self) -> BTreeMap<u64, Tally> {
        self.seconds
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

/// What one connection measures: its whole-run tally, and the second in progress.
#[derive(Debug)]
pub struct ConnectionStats {
    /// Everything this connection counted.
    pub total: Tally,
    second: u64,
    current: Tally,
}

impl Default for ConnectionStats {
    fn default() -> Self {
        Self {
            total: Tally::default(),
            second: 0,
            current: Tally::coarse(),
        }
    }
}

impl ConnectionStats {
    /// Counts a request that ended `second` seconds after the start; a new second first hands
    /// the finished one to `timeline`.
    pub fn record(
        &mut self,
        timeline: &Timeline,
        second: u64,
        outcome: Outcome,
        latency_us: u64,
        records: u64,
    ) {
        if second != self.second {
            self.flush(timeline);
            self.second = second;
        }
        self.total.record(outcome, latency_us, records);
        self.current.record(outcome, latency_us, records);
    }

    /// Hands the second in progress to `timeline`.
    pub fn flush(&mut self, timeline: &Timeline) {
        if self.current.requests() > 0 {
            timeline.add(self.second, &self.current);
            self.current.reset();
        }
    }
}

/// A whole run: every connection's tally merged, and the timeline.
#[derive(Debug, Default)]
pub struct RunStats {
    /// Everything.
    pub total: Tally,
    /// By second since the start (the second in which each request ended).
    pub seconds: BTreeMap<u64, Tally>,
}

impl RunStats {
    /// Counts one request directly (for runs assembled without connections, as in tests).
    pub fn record(&mut self, second: u64, outcome: Outcome, latency_us: u64, records: u64) {
        self.total.record(outcome, latency_us, records);
        self.seconds
            .entry(second)
            .or_insert_with(Tally::coarse)
            .record(outcome, latency_us, records);
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
        let timeline = Timeline::default();
        let mut a = ConnectionStats::default();
        let mut b = ConnectionStats::default();
        let mut all = new_histogram();
        for i in 1..=10_000u64 {
            let latency = i * 37 % 5_000 + 1;
            let target = if i % 3 == 0 { &mut a } else { &mut b };
            target.record(&timeline, i / 2_000, Outcome::Status(200), latency, 1);
            all.record(latency).unwrap();
        }
        a.flush(&timeline);
        b.flush(&timeline);
        let mut merged = Tally::default();
        merged.merge(&a.total);
        merged.merge(&b.total);
        assert_eq!(merged.latency, all);
        assert_eq!(merged.requests(), 10_000);
        assert_eq!(merged.records_ok, 10_000);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.latency.value_at_quantile(q),
                all.value_at_quantile(q)
            );
        }
        // Seconds merge separately: 0..=5, and each holds what ended in it.
        let seconds = timeline.snapshot();
        assert_eq!(seconds.len(), 6);
        let per_second: u64 = seconds.values().map(Tally::requests).sum();
        assert_eq!(per_second, 10_000);
        assert_eq!(seconds[&1].requests(), 2_000);
        // The coarse per-second histograms agree with the exact one to 2 digits.
        let exact_p99 = all.value_at_quantile(0.99) as f64;
        let mut coarse = Tally::coarse();
        for tally in seconds.values() {
            coarse.merge(tally);
        }
        let coarse_p99 = coarse.latency.value_at_quantile(0.99) as f64;
        assert!((coarse_p99 - exact_p99).abs() / exact_p99 < 0.01);
    }

    #[test]
    fn a_reset_tally_counts_from_zero() {
        let mut tally = Tally::coarse();
        tally.record(Outcome::Status(200), 100, 1);
        tally.reset();
        assert_eq!(tally.requests(), 0);
        assert!(tally.latency.is_empty());
        assert_eq!(tally.records_ok, 0);
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
