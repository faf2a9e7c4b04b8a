//! The Grafana dashboards of `grafana/dashboards/` as data, for the workspace's check that
//! they and the code agree (`tests/metrics.rs`): the metric names every Prometheus panel
//! queries. The dashboards themselves are JSON that Grafana provisions; this crate only
//! reads them.

use std::collections::BTreeSet;
use std::path::PathBuf;

/// This package's folder (`grafana/`), read when its tests run: cargo sets
/// `CARGO_MANIFEST_DIR` for them. Not the path compiled in, since the build folder is shared
/// between clones and a build still fresh from another clone would read that clone's
/// dashboards. Elsewhere, the folder this crate was built from.
pub fn package_dir() -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

/// The dashboards folder.
pub fn dashboards_dir() -> PathBuf {
    package_dir().join("dashboards")
}

/// Every dashboard file, parsed, with its name.
pub fn dashboards() -> Vec<(String, serde_json::Value)> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dashboards_dir())
        .expect("grafana/dashboards is readable")
        .map(|entry| entry.expect("a dashboard entry").path())
        .filter(|path| path.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    files
        .into_iter()
        .map(|path| {
            let text = std::fs::read_to_string(&path).expect("a dashboard is readable");
            let json = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{} is not JSON: {e}", path.display()));
            (path.display().to_string(), json)
        })
        .collect()
}

/// The `expr` of every Prometheus target of `dashboard`.
pub fn prometheus_exprs(dashboard: &serde_json::Value) -> Vec<String> {
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        if panel["datasource"]["type"] != "prometheus" {
            continue;
        }
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                exprs.push(expr.to_owned());
            }
        }
    }
    exprs
}

/// The `apex_...` metric names a PromQL expression reads, as written (a histogram's
/// `_bucket`, `_sum` or `_count` series included).
pub fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut at = 0;
    while let Some(found) = expr[at..].find("apex_") {
        let start = at + found;
        let preceded_by_word =
            start > 0 && (bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |i| start + i);
        if !preceded_by_word {
            names.insert(expr[start..end].to_owned());
        }
        at = end;
    }
    names
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_read_from_promql() {
        let names = metric_names(
            "histogram_quantile(0.99, sum by (le) (rate(apex_ingest_request_duration_seconds_bucket[5m]))) / apex_x_total",
        );
        assert_eq!(
            names.into_iter().collect::<Vec<_>>(),
            [
                "apex_ingest_request_duration_seconds_bucket",
                "apex_x_total"
            ]
        );
        assert!(metric_names("my_apex_thing").is_empty());
    }
}
