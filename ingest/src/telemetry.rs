//! Prometheus metrics of `apex-server`: the process's recorder (installed once, with the HELP
//! text of every metric it records: the edge's [`crate::names`], the pipeline's and the
//! billing rules' [`apex_billing::names`], which the Stripe webhooks record), and per-thread
//! cached handles for the hot path.

use std::cell::RefCell;
use std::collections::HashMap;
use std::sync::OnceLock;

use metrics::{Counter, Gauge, Histogram, Label};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

use crate::names::{ALL, QUEUE_DEPTH, REQUEST_DURATION_SECONDS};

/// Latency buckets: the edge aims at a p99 of 2 ms.
const LATENCY_BUCKETS: &[f64] = &[
    0.000_25, 0.000_5, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle: the request
/// latency histogram with `LATENCY_BUCKETS`, the dunning recovery-days histogram with
/// [`apex_billing::names::DUNNING_RECOVERY_SECONDS_BUCKETS`], and the HELP text of the edge's,
/// the pipeline's and the billing rules' metrics. Later calls (several servers in one test
/// process) share it.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(REQUEST_DURATION_SECONDS.to_owned()),
                LATENCY_BUCKETS,
            )
            .expect("latency buckets are not empty")
            .set_buckets_for_metric(
                metrics_exporter_prometheus::Matcher::Full(
                    apex_billing::names::DUNNING_RECOVERY_SECONDS.to_owned(),
                ),
                apex_billing::names::DUNNING_RECOVERY_SECONDS_BUCKETS,
            )
            .expect("recovery-days buckets are not empty")
            .build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program; then ours only
        // renders what is recorded through it, which is nothing, and /metrics stays valid.
        if metrics::set_global_recorder(recorder).is_ok() {
            apex_core::telemetry::describe(ALL);
            apex_core::telemetry::describe(apex_pipeline::names::ALL);
            apex_core::telemetry::describe(apex_billing::names::ALL);
        }
        handle
    })
}

/// A metric name and its label values, all `'static`, identified by their addresses: the hot
/// path records with labels known at compile time, and looking a handle up by three addresses
/// costs a fraction of the registry's lookup (which builds, hashes and clones the whole key).
/// Two equal strings at different addresses only make two handles to the same series.
type HandleKey = (usize, usize, usize);

fn handle_key(name: &'static str, first: &'static str, second: &'static str) -> HandleKey {
    (
        name.as_ptr() as usize,
        first.as_ptr() as usize,
        second.as_ptr() as usize,
    )
}

thread_local! {
    static COUNTERS: RefCell<HashMap<HandleKey, Counter>> = RefCell::new(HashMap::new());
    static HISTOGRAMS: RefCell<HashMap<HandleKey, Histogram>> = RefCell::new(HashMap::new());
}

/// Adds `n` to the counter `name` with labels `(first_label, first)` and, when `second_label`
/// is not empty, `(second_label, second)`; the handle is cached per thread.
pub fn count(name: &'static str, labels: [(&'static str, &'static str); 2], n: u64) {
    let key = handle_key(name, labels[0].1, labels[1].1);
    COUNTERS.with(|cache| {
        cache
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| metrics::counter!(name, to_labels(labels)))
            .increment(n);
    });
}

/// Records `value` in the histogram `name` with the label `(label, value_of_label)`; the
/// handle is cached per thread.
pub fn observe(name: &'static str, label: (&'static str, &'static str), value: f64) {
    let key = handle_key(name, label.1, "");
    HISTOGRAMS.with(|cache| {
        cache
            .borrow_mut()
            .entry(key)
            .or_insert_with(|| {
                metrics::histogram!(name, vec![Label::from_static_parts(label.0, label.1)])
            })
            .record(value);
    });
}

/// The queue depth gauge, set when `/metrics` is scraped.
pub fn queue_depth() -> &'static Gauge {
    static GAUGE: OnceLock<Gauge> = OnceLock::new();
    GAUGE.get_or_init(|| metrics::gauge!(QUEUE_DEPTH))
}

fn to_labels(labels: [(&'static str, &'static str); 2]) -> Vec<Label> {
    labels
        .iter()
        .filter(|(name, _)| !name.is_empty())
        .map(|&(name, value)| Label::from_static_parts(name, value))
        .collect()
}
