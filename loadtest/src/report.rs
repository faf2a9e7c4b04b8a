//! What a run reports: a text table for the terminal, a JSON document for scripts, and one
//! self-contained HTML file with SVG charts of throughput and latency over time.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use serde::Serialize;

use crate::runner::{RecordCounts, RunResult};
use crate::stats::Percentiles;
use crate::verify::Verdict;

/// One second of the run.
#[derive(Debug, Clone, Serialize)]
pub struct Second {
    /// Seconds since the start (of the bucket, when buckets are wider than a second).
    pub second: u64,
    /// Requests that ended in it.
    pub requests: u64,
    /// Of which 2xx.
    pub successes: u64,
    /// Records accepted in it.
    pub records: u64,
    /// Median latency, µs.
    pub p50_us: u64,
    /// 99th percentile latency, µs.
    pub p99_us: u64,
    /// Largest latency, µs.
    pub max_us: u64,
    /// Resident memory of the watched process, bytes.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_bytes: Option<u64>,
}

/// The report of one run.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// What ran.
    pub label: String,
    /// The server.
    pub target: String,
    /// `track`, `batch` or `mixed`.
    pub mode: String,
    /// `open` or `closed`.
    pub pacing: &'static str,
    /// Intended arrival rate of an open loop, requests per second.
    pub target_rate: Option<f64>,
    /// Connections used.
    pub connections: usize,
    /// From the first due request to the last answer, seconds.
    pub elapsed_s: f64,
    /// Requests sent (answered or not).
    pub requests: u64,
    /// Requests answered 2xx.
    pub successes: u64,
    /// Requests per second.
    pub request_rate: f64,
    /// 2xx requests per second.
    pub success_rate: f64,
    /// Records accepted per second.
    pub record_rate: f64,
    /// Latency of answered requests, from their intended send time.
    pub latency: Percentiles,
    /// Requests by outcome (status code, `transport`, `timeout`).
    pub outcomes: BTreeMap<String, u64>,
    /// Records by fate.
    pub records: RecordCounts,
    /// Open-loop requests never sent because the run fell too far behind schedule.
    pub missed: u64,
    /// Failed connection attempts.
    pub connect_errors: u64,
    /// Largest resident memory of the watched process, bytes.
    pub max_rss_bytes: Option<u64>,
    /// Width of a timeline bucket, seconds (1 unless the run is over an hour).
    pub bucket_seconds: u64,
    /// Bucket by bucket.
    pub timeline: Vec<Second>,
    /// The `--verify` result.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub verify: Option<Verdict>,
}

/// The parts of a report that describe the run rather than measure it.
#[derive(Debug, Clone)]
pub struct Describe {
    /// Label.
    pub label: String,
    /// Target URL.
    pub target: String,
    /// Mode name.
    pub mode: String,
    /// Open-loop rate, if open.
    pub target_rate: Option<f64>,
    /// Connections.
    pub connections: usize,
}

impl Report {
    /// Builds the report of `result`.
    pub fn new(describe: Describe, result: &RunResult) -> Self {
        let total = &result.stats.total;
        let elapsed_s = result.elapsed.as_secs_f64();
        let timeline = result
            .stats
            .seconds
            .iter()
            .map(|(second, tally)| {
                let p = tally.percentiles();
                Second {
                    second: *second,
                    requests: tally.requests(),
                    successes: tally.successes(),
                    records: tally.records_ok,
                    p50_us: p.p50_us,
                    p99_us: p.p99_us,
                    max_us: p.max_us,
                    rss_bytes: result.rss_bytes.get(second).copied(),
                }
            })
            .collect();
        Self {
            label: describe.label,
            target: describe.target,
            mode: describe.mode,
            pacing: if describe.target_rate.is_some() {
                "open"
            } else {
                "closed"
            },
            target_rate: describe.target_rate,
            connections: describe.connections,
            elapsed_s,
            requests: total.requests(),
            successes: total.successes(),
            request_rate: result.request_rate(),
            success_rate: result.success_rate(),
            record_rate: total.records_ok as f64 / elapsed_s.max(1e-9),
            latency: total.percentiles(),
            outcomes: total
                .outcomes
                .iter()
                .map(|(o, n)| (o.label(), *n))
                .collect(),
            records: result.records,
            missed: result.missed,
            connect_errors: result.connect_errors,
            max_rss_bytes: result.rss_bytes.values().copied().max(),
            bucket_seconds: result.stats.bucket_secs.max(1),
            timeline,
            verify: None,
        }
    }

    /// The summary table printed at the end of a run.
    pub fn text(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "{} -> {}", self.label, self.target);
        let pacing = match self.target_rate {
            Some(rate) => format!("open loop at {rate:.0} req/s"),
            None => "closed loop".to_owned(),
        };
        let _ = writeln!(
            out,
            "  {} {}, {} connections, {:.1} s",
            self.mode, pacing, self.connections, self.elapsed_s
        );
        let _ = writeln!(
            out,
            "  requests   {:>12}   {:>10.0} req/s   2xx {:>12}   {:>10.0} req/s",
            self.requests, self.request_rate, self.successes, self.success_rate
        );
        let _ = writeln!(
            out,
            "  records    accepted {} ({:.0}/s), duplicate {}, refused {}, unknown {}",
            self.records.accepted,
            self.record_rate,
            self.records.duplicate,
            self.records.refused,
            self.records.unknown
        );
        let l = &self.latency;
        let _ = writeln!(
            out,
            "  latency    p50 {}  p90 {}  p99 {}  p99.9 {}  max {}",
            ms(l.p50_us),
            ms(l.p90_us),
            ms(l.p99_us),
            ms(l.p999_us),
            ms(l.max_us)
        );
        let outcomes: Vec<String> = self
            .outcomes
            .iter()
            .map(|(o, n)| format!("{o}: {n}"))
            .collect();
        let _ = writeln!(out, "  outcomes   {}", outcomes.join(", "));
        if self.missed > 0 || self.connect_errors > 0 {
            let _ = writeln!(
                out,
                "  not sent   {} behind schedule, {} failed connects",
                self.missed, self.connect_errors
            );
        }
        if let Some(rss) = self.max_rss_bytes {
            let _ = writeln!(out, "  server RSS max {:.1} MiB", rss as f64 / 1048576.0);
        }
        if let Some(verdict) = &self.verify {
            if verdict.passed {
                let _ = writeln!(
                    out,
                    "  verify     PASSED: {} customer-metric totals equal in postgres, clickhouse and clickhouse_daily, {:.2} s after the load",
                    verdict.compared, verdict.settled_after_s
                );
            } else {
                let _ = writeln!(
                    out,
                    "  verify     FAILED: {} differences{}",
                    verdict.differences.len(),
                    verdict
                        .error
                        .as_ref()
                        .map_or(String::new(), |e| format!("; {e}"))
                );
                // The JSON report has every difference; the terminal gets the first 50.
                for d in verdict.differences.iter().take(50) {
                    let _ = writeln!(
                        out,
                        "    {:<16} {} {:<13} acknowledged {} unknown {} stored {}",
                        d.store, d.customer_id, d.metric, d.acknowledged, d.unknown, d.stored
                    );
                }
            }
        }
        out
    }

    /// One HTML file, no external resources: the summary and two charts.
    pub fn html(&self) -> String {
        let width = self.bucket_seconds.max(1) as f64;
        let throughput: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .map(|s| (s.second as f64, s.requests as f64 / width))
            .collect();
        let successes: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .map(|s| (s.second as f64, s.successes as f64 / width))
            .collect();
        let p50: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .map(|s| (s.second as f64, s.p50_us as f64 / 1000.0))
            .collect();
        let p99: Vec<(f64, f64)> = self
            .timeline
            .iter()
            .map(|s| (s.second as f64, s.p99_us as f64 / 1000.0))
            .collect();
        let mut page = String::new();
        page.push_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>");
        page.push_str(&escape(&self.label));
        page.push_str("</title><style>body{font-family:sans-serif;margin:2em;color:#222}pre{background:#f4f4f4;padding:1em}svg{display:block;margin:1em 0}</style></head><body>\n<h1>");
        page.push_str(&escape(&self.label));
        page.push_str("</h1>\n<pre>");
        page.push_str(&escape(&self.text()));
        page.push_str("</pre>\n<h2>Throughput (requests per second)</h2>\n");
        page.push_str(&svg_chart(
            &[
                ("all", "#1f77b4", &throughput),
                ("2xx", "#2ca02c", &successes),
            ],
            "req/s",
        ));
        page.push_str("<h2>Latency per second (ms, from the intended send time)</h2>\n");
        page.push_str(&svg_chart(
            &[("p50", "#1f77b4", &p50), ("p99", "#d62728", &p99)],
            "ms",
        ));
        page.push_str("</body></html>\n");
        page
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

fn escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One line of a chart: its name, its colour and its (x, y) points.
pub type Series<'a> = (&'a str, &'a str, &'a [(f64, f64)]);

/// A line chart of `series` with axes and a legend, in SVG.
pub fn svg_chart(series: &[Series<'_>], unit: &str) -> String {
    const W: f64 = 800.0;
    const H: f64 = 260.0;
    const LEFT: f64 = 70.0;
    const BOTTOM: f64 = 30.0;
    const TOP: f64 = 20.0;
    let points = series.iter().flat_map(|(_, _, p)| p.iter());
    let (mut max_x, mut max_y) = (1.0f64, 0.0f64);
    for (x, y) in points {
        max_x = max_x.max(*x);
        max_y = max_y.max(*y);
    }
    if max_y <= 0.0 {
        max_y = 1.0;
    }
    let max_y = max_y * 1.1;
    let sx = |x: f64| LEFT + x / max_x * (W - LEFT - 10.0);
    let sy = |y: f64| TOP + (1.0 - y / max_y) * (H - TOP - BOTTOM);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\">\n"
    );
    let _ = writeln!(
        svg,
        "<line x1=\"{LEFT}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"#888\"/><line x1=\"{LEFT}\" y1=\"{TOP}\" x2=\"{LEFT}\" y2=\"{}\" stroke=\"#888\"/>",
        H - BOTTOM,
        W - 10.0,
        H - BOTTOM,
        H - BOTTOM
    );
    for i in 0..=4 {
        let y = max_y * f64::from(i) / 4.0;
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{:.1}\" font-size=\"11\" text-anchor=\"end\">{}</text><line x1=\"{LEFT}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#eee\"/>",
            LEFT - 5.0,
            sy(y) + 4.0,
            short_number(y),
            sy(y),
            W - 10.0,
            sy(y)
        );
    }
    let _ = writeln!(
        svg,
        "<text x=\"{}\" y=\"{}\" font-size=\"11\" text-anchor=\"end\">{max_x:.0} s</text><text x=\"5\" y=\"12\" font-size=\"11\">{unit}</text>",
        W - 10.0,
        H - 8.0
    );
    for (n, (name, colour, points)) in series.iter().enumerate() {
        let path: Vec<String> = points
            .iter()
            .map(|(x, y)| format!("{:.1},{:.1}", sx(*x), sy(*y)))
            .collect();
        let _ = writeln!(
            svg,
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.5\" points=\"{}\"/>",
            path.join(" ")
        );
        let _ = writeln!(
            svg,
            "<text x=\"{}\" y=\"{}\" font-size=\"12\" fill=\"{colour}\">{}</text>",
            LEFT + 10.0 + 60.0 * n as f64,
            TOP - 5.0,
            escape(name)
        );
    }
    svg.push_str("</svg>\n");
    svg
}

fn short_number(value: f64) -> String {
    if value >= 1_000_000.0 {
        format!("{:.1}M", value / 1_000_000.0)
    } else if value >= 1_000.0 {
        format!("{:.1}k", value / 1_000.0)
    } else if value >= 10.0 {
        format!("{value:.0}")
    } else {
        format!("{value:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::Outcome;

    fn result() -> RunResult {
        let mut result = RunResult::default();
        for i in 0..3_000u64 {
            let outcome = if i % 100 == 0 {
                Outcome::Status(503)
            } else {
                Outcome::Status(200)
            };
            result.stats.record(i / 1_000, outcome, 100 + i % 900, 1);
        }
        result.elapsed = std::time::Duration::from_secs(3);
        result.rss_bytes.insert(1, 10 << 20);
        result
    }

    fn describe() -> Describe {
        Describe {
            label: "track <test>".into(),
            target: "http://127.0.0.1:1".into(),
            mode: "track".into(),
            target_rate: Some(1000.0),
            connections: 8,
        }
    }

    #[test]
    fn the_report_sums_the_run() {
        let report = Report::new(describe(), &result());
        assert_eq!(report.requests, 3_000);
        assert_eq!(report.successes, 2_970);
        assert_eq!(report.outcomes["503"], 30);
        assert_eq!(report.timeline.len(), 3);
        assert_eq!(report.timeline[0].requests, 1_000);
        assert_eq!(report.timeline[1].rss_bytes, Some(10 << 20));
        assert_eq!(report.max_rss_bytes, Some(10 << 20));
        assert!((report.request_rate - 1_000.0).abs() < 1e-6);
        let json: serde_json::Value = serde_json::to_value(&report).unwrap();
        assert_eq!(json["latency"]["max_us"], 999);
        assert_eq!(json["pacing"], "open");
        let text = report.text();
        assert!(text.contains("503: 30"), "{text}");
        assert!(text.contains("p99.9"));
    }

    #[test]
    fn the_html_page_is_self_contained_and_escaped() {
        let html = Report::new(describe(), &result()).html();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("track &lt;test&gt;"));
        assert!(!html.contains("<test>"));
        assert_eq!(html.matches("<svg").count(), 2);
        assert_eq!(html.matches("<polyline").count(), 4);
        assert!(!html.contains("src=\"http"));
    }
}
