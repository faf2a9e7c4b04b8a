//! Prometheus metrics of the edge. Names follow `apex_<crate>_<noun>_<unit>[_total]`, labels
//! are bounded (route templates and status codes, never a customer or a key).

use std::sync::OnceLock;

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Requests served, by `route` and `status`.
pub const REQUESTS_TOTAL: &str = "apex_ingest_requests_total";
/// Connections accepted.
pub const CONNECTIONS_TOTAL: &str = "apex_ingest_connections_total";
/// Connections open now.
pub const CONNECTIONS_OPEN: &str = "apex_ingest_connections_open";

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide Prometheus recorder once and returns its handle. Later calls
/// (several servers in one test process) share it.
pub fn prometheus() -> &'static PrometheusHandle {
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed by an embedding program; then ours only
        // renders what is recorded through it, which is nothing, and /metrics stays valid.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Grafana must chart exactly the names the code records.
    #[test]
    fn dashboards_use_only_recorded_metric_names() {
        let known = [REQUESTS_TOTAL, CONNECTIONS_TOTAL, CONNECTIONS_OPEN];
        let dashboard = include_str!("../../grafana/dashboards/apex-overview.json");
        let mut used = 0;
        for (start, _) in dashboard.match_indices("apex_ingest_") {
            let name: String = dashboard[start..]
                .chars()
                .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                .collect();
            assert!(
                known.contains(&name.as_str()),
                "dashboard uses unknown metric {name}"
            );
            used += 1;
        }
        assert!(used >= known.len());
    }
}
