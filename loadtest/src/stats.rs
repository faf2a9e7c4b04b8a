//! Latency and outcome statistics: HDR histograms in microseconds. One recorder per run holds
//! the whole-run tally (3 significant digits) and the timeline (2 digits per bucket, a tenth
//! of the memory); a bucket is one second, or longer for runs over an hour, so the timeline
//! has at most about 3,600 buckets. Connections record under one uncontended lock (the
//! default client is one thread), so memory does not grow with the connection count.

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
        // A timeout's latency is at least the timeout: leaving it out would flatter p99.
        if matches!(outcome, Outcome::Status(_) | Outcome::Timeout) {
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

/// Longest timeline the recorder keeps at one-second resolution.
pub const TIMELINE_BUCKETS: u64 = 3_600;

/// Timeline bucket width for a run of `duration_secs`: 1 s up to an hour, then wider so that
/// the timeline stays near [`TIMELINE_BUCKETS`] buckets.
pub fn bucket_seconds(duration_secs: u64) -> u64 {
    duration_secs.div_ceil(TIMELINE_BUCKETS).max(1)
}

/// A whole run: the total and the timeline.
#[derive(Debug, Default, Clone)]
pub struct RunStats {
    /// Everything.
    pub total: Tally,
    /// By bucket start (seconds since the start): what ended in that bucket.
    pub seconds: BTreeMap<u64, Tally>,
    /// Width of a timeline bucket, seconds (at least 1).
    pub bucket_secs: u64,
}

impl RunStats {
    /// Empty stats with timeline buckets of `bucket_secs`.
    pub fn new(bucket_secs: u64) -> Self {
        Self {
            bucket_secs: bucket_secs.max(1),
            ..Self::default()
        }
    }

    /// Counts a request that ended `second` seconds after the start.
    pub fn record(&mut self, second: u64, outcome: Outcome, latency_us: u64, records: u64) {
        self.total.record(outcome, latency_us, records);
        let width = self.bucket_secs.max(1);
        let bucket = second / width * width;
        self.seconds
            .entry(bucket)
            .or_insert_with(Tally::coarse)
            .record(outcome, latency_us, records);
    }
}

/// The run's stats behind a lock, shared by its connections.
#[derive(Debug, Default)]
pub struct Recorder {
    stats: Mutex<RunStats>,
}

impl Recorder {
    /// A recorder with timeline buckets of `bucket_secs`.
    pub fn new(bucket_secs: u64) -> Self {
        Self {
            stats: Mutex::new(RunStats::new(bucket_secs)),
        }
    }

    /// Counts one request (see [`RunStats::record`]).
    pub fn record(&self, second: u64, outcome: Outcome, latency_us: u64, records: u64) {
        self.stats
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .record(second, outcome, latency_us, records);
    }

    /// What was recorded.
    pub fn snapshot(&self) -> RunStats {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
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
        let recorder = Recorder::new(1);
        let mut a = Tally::default();
        let mut b = Tally::default();
        let mut all = new_histogram();
        for i in 1..=10_000u64 {
            let latency = i * 37 % 5_000 + 1;
            recorder.record(i / 2_000, Outcome::Status(200), latency, 1);
            let part = if i % 3 == 0 { &mut a } else { &mut b };
            part.record(Outcome::Status(200), latency, 1);
            all.record(latency).unwrap();
        }
        let mut merged = Tally::default();
        merged.merge(&a);
        merged.merge(&b);
        assert_eq!(merged.latency, all);
        assert_eq!(merged.requests(), 10_000);
        assert_eq!(merged.records_ok, 10_000);
        let stats = recorder.snapshot();
        assert_eq!(stats.total.latency, all);
        for q in [0.5, 0.9, 0.99, 0.999, 1.0] {
            assert_eq!(
                merged.latency.value_at_quantile(q),
                all.value_at_quantile(q)
            );
        }
        // Seconds 0..=5, each holding what ended in it.
        assert_eq!(stats.seconds.len(), 6);
        let per_second: u64 = stats.seconds.values().map(Tally::requests).sum();
        assert_eq!(per_second, 10_000);
        assert_eq!(stats.seconds[&1].requests(), 2_000);
        // The coarse per-second histograms agree with the exact one to 2 digits.
        let exact_p99 = all.value_at_quantile(0.99) as f64;
        let mut coarse = Tally::coarse();
        for tally in stats.seconds.values() {
            coarse.merge(tally);
        }
        let coarse_p99 = coarse.latency.value_at_quantile(0.99) as f64;
        assert!((coarse_p99 - exact_p99).abs() / exact_p99 < 0.01);
    }

    #[test]
    fn long_runs_get_wider_timeline_buckets() {
        assert_eq!(bucket_seconds(0), 1);
        assert_eq!(bucket_seconds(60), 1);
        assert_eq!(bucket_seconds(3_600), 1);
        assert_eq!(bucket_seconds(3_601), 2);
        assert_eq!(bucket_seconds(24 * 3_600), 24);
        let mut stats = RunStats::new(10);
        for second in 0..95 {
            stats.record(second, Outcome::Status(200), 100, 1);
        }
        assert_eq!(
            stats.seconds.keys().copied().collect::<Vec<_>>(),
            (0..10).map(|b| b * 10).collect::<Vec<_>>()
        );
        assert_eq!(stats.seconds[&90].requests(), 5);
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
        tally.record(Outcome::Timeout, 10_000, 10);
        tally.record(Outcome::Status(200), 300, 5);
        assert_eq!(tally.requests(), 5);
        assert_eq!(tally.successes(), 2);
        assert_eq!(tally.records_ok, 15);
        // Answers and timeouts have a latency; a broken connection has none.
        assert_eq!(tally.latency.len(), 4);
        assert_eq!(tally.outcomes[&Outcome::Status(503)], 1);
        assert_eq!(tally.percentiles().max_us, 10_007);
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
