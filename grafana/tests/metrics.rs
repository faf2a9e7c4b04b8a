//! The dashboards and the code agree, across the workspace: every metric a Grafana panel
//! queries is one that some crate's names module lists, every metric listed as charted is on
//! a panel and every one listed as uncharted is not, and no code records a metric by a
//! string literal (only by the names modules' constants), so the names modules are the whole
//! list of what the processes record.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use apex_core::telemetry::{Charted, MetricKind, MetricSpec};

/// Every names module of the workspace, by crate.
fn names_modules() -> Vec<(&'static str, &'static [MetricSpec])> {
    vec![
        ("apex-ingest", apex_ingest::names::ALL),
        ("apex-pipeline", apex_pipeline::names::ALL),
        ("apex-stripe", apex_stripe::names::ALL),
        ("apex-cron", apex_cron::names::ALL),
        ("apex-notify", apex_notify::names::ALL),
        ("apex-billing", apex_billing::names::ALL),
    ]
}

fn specs() -> BTreeMap<&'static str, MetricSpec> {
    names_modules()
        .into_iter()
        .flat_map(|(_, specs)| specs.iter().map(|s| (s.name, *s)))
        .collect()
}

/// The names the dashboards query, histogram series folded to their metric.
fn charted() -> BTreeSet<String> {
    let specs = specs();
    let mut used = BTreeSet::new();
    for (_, dashboard) in apex_dashboards::dashboards() {
        for expr in apex_dashboards::prometheus_exprs(&dashboard) {
            for name in apex_dashboards::metric_names(&expr) {
                let base = ["_bucket", "_sum", "_count"]
                    .iter()
                    .find_map(|suffix| {
                        name.strip_suffix(suffix).filter(|base| {
                            specs
                                .get(base)
                                .is_some_and(|s| s.kind == MetricKind::Histogram)
                        })
                    })
                    .unwrap_or(&name)
                    .to_owned();
                used.insert(base);
            }
        }
    }
    used
}

#[test]
fn every_charted_name_is_recorded_by_some_crate() {
    let specs = specs();
    for name in charted() {
        assert!(
            specs.contains_key(name.as_str()),
            "a dashboard queries {name}, which no names module lists"
        );
    }
}

#[test]
fn every_metric_is_charted_or_listed_as_uncharted() {
    let used = charted();
    for (krate, specs) in names_modules() {
        for spec in specs {
            match spec.charted {
                Charted::Yes => assert!(
                    used.contains(spec.name),
                    "{krate} records {} but no dashboard charts it: chart it or mark it uncharted",
                    spec.name
                ),
                Charted::No(reason) => assert!(
                    !used.contains(spec.name),
                    "{} is charted but listed as uncharted ({reason})",
                    spec.name
                ),
            }
        }
    }
}

#[test]
fn names_are_unique_across_crates() {
    let mut seen = BTreeMap::new();
    for (krate, specs) in names_modules() {
        for spec in specs {
            if let Some(other) = seen.insert(spec.name, krate) {
                panic!("{} is listed by {krate} and {other}", spec.name);
            }
        }
    }
}

fn rust_files(dir: &Path, out: &mut Vec<std::path::PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            if !path.ends_with("target") {
                rust_files(&path, out);
            }
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

#[test]
fn code_records_metrics_only_by_their_names_module_constants() {
    let root = apex_dashboards::package_dir().join("..");
    let mut files = Vec::new();
    for krate in ["pipeline", "ingest", "billing", "loadtest"] {
        rust_files(&root.join(krate), &mut files);
    }
    assert!(files.len() > 20, "the crates' sources were not found");
    let mut offenders = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        for macro_call in [
            "counter!(\"",
            "gauge!(\"",
            "histogram!(\"",
            "describe_counter!(\"",
        ] {
            if text.contains(macro_call) {
                offenders.push(format!("{}: {macro_call}", file.display()));
            }
        }
    }
    assert!(
        offenders.is_empty(),
        "metrics recorded by a string literal instead of a names module constant: {offenders:?}"
    );
}
