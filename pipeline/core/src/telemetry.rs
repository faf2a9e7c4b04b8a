//! How a crate describes its metrics: every crate that records metrics has a names module
//! listing each one as a [`MetricSpec`] (its name, kind, HELP text and whether Grafana charts
//! it), and its process registers them with [`describe`] once its recorder is installed, so
//! every series on `/metrics` carries `# HELP` and `# TYPE` (`promtool check metrics` clean).
//! Names follow `apex_<crate>_<noun>_<unit>[_total]`; labels are bounded.

/// What a metric measures over time, as Prometheus types it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetricKind {
    /// Only goes up (`_total`).
    Counter,
    /// Goes up and down.
    Gauge,
    /// Observations in buckets (`_bucket`, `_sum`, `_count`).
    Histogram,
}

/// Whether the Grafana dashboards chart a metric.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Charted {
    /// A dashboard panel queries it.
    Yes,
    /// No panel does, for the reason given (checked by the dashboards' test).
    No(&'static str),
}

/// One metric of a crate.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MetricSpec {
    /// `apex_<crate>_<noun>_<unit>[_total]`.
    pub name: &'static str,
    /// Counter, gauge or histogram.
    pub kind: MetricKind,
    /// The `# HELP` text: what it counts, its unit and its labels.
    pub help: &'static str,
    /// Whether a dashboard charts it.
    pub charted: Charted,
}

impl MetricSpec {
    /// A charted counter.
    pub const fn counter(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Counter,
            help,
            charted: Charted::Yes,
        }
    }

    /// A charted gauge.
    pub const fn gauge(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Gauge,
            help,
            charted: Charted::Yes,
        }
    }

    /// A charted histogram.
    pub const fn histogram(name: &'static str, help: &'static str) -> Self {
        Self {
            name,
            kind: MetricKind::Histogram,
            help,
            charted: Charted::Yes,
        }
    }

    /// The same metric, left off the dashboards for `reason`.
    pub const fn uncharted(self, reason: &'static str) -> Self {
        Self {
            charted: Charted::No(reason),
            ..self
        }
    }
}

/// Registers the HELP text and kind of every metric in `specs` with the installed recorder.
/// Call it once the recorder is installed; without one it does nothing.
pub fn describe(specs: &[MetricSpec]) {
    for spec in specs {
        match spec.kind {
            MetricKind::Counter => metrics::describe_counter!(spec.name, spec.help),
            MetricKind::Gauge => metrics::describe_gauge!(spec.name, spec.help),
            MetricKind::Histogram => metrics::describe_histogram!(spec.name, spec.help),
        }
    }
}

/// Checks a names module: names follow `apex_<prefix>_...`, counters end in `_total` and
/// nothing else does, every HELP text is a sentence, and no name is listed twice. Each names
/// module runs it in a unit test.
pub fn check_names(prefix: &str, specs: &[MetricSpec]) -> Result<(), String> {
    let mut seen = std::collections::HashSet::new();
    for spec in specs {
        let name = spec.name;
        if !seen.insert(name) {
            return Err(format!("{name} is listed twice"));
        }
        if !name.starts_with(&format!("apex_{prefix}_")) {
            return Err(format!("{name} does not start with apex_{prefix}_"));
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(format!("{name} is not snake_case"));
        }
        let total = name.ends_with("_total");
        if total != (spec.kind == MetricKind::Counter) {
            return Err(format!(
                "{name}: only counters end in _total, and all of them"
            ));
        }
        if spec.help.len() < 10 || !spec.help.ends_with('.') {
            return Err(format!("{name}: HELP text must be a sentence"));
        }
        if let Charted::No(reason) = spec.charted
            && reason.is_empty()
        {
            return Err(format!("{name}: say why it is not charted"));
        }
    }
    Ok(())
}

/// Checks that a names module lists every metric it names: each `"apex_..."` literal in its
/// `source` (its own file, by `include_str!`) is the name of one of `specs`, so a constant
/// left out of the list cannot be recorded without HELP text or a dashboard check.
pub fn check_listed(source: &str, specs: &[MetricSpec]) -> Result<(), String> {
    for (at, _) in source.match_indices("\"apex_") {
        let literal = &source[at + 1..];
        let name = &literal[..literal.find('"').unwrap_or(literal.len())];
        if !specs.iter().any(|s| s.name == name) {
            return Err(format!("{name} is named but not listed with its HELP text"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_named_metric_must_be_listed() {
        let specs = [MetricSpec::counter(
            "apex_x_things_total",
            "Things done, by outcome.",
        )];
        let listed = "pub const A: &str = \"apex_x_things_total\";";
        assert_eq!(check_listed(listed, &specs), Ok(()));
        let unlisted = "pub const A: &str = \"apex_x_things_total\";\npub const B: &str = \"apex_x_other_total\";";
        assert!(check_listed(unlisted, &specs).is_err());
    }

    #[test]
    fn names_modules_are_checked() {
        let good = [
            MetricSpec::counter("apex_x_things_total", "Things done, by outcome."),
            MetricSpec::gauge("apex_x_queue_depth", "Items waiting now."),
        ];
        assert_eq!(check_names("x", &good), Ok(()));
        for bad in [
            MetricSpec::counter("apex_x_things", "Things done, by outcome."),
            MetricSpec::gauge("apex_x_things_total", "Things done, by outcome."),
            MetricSpec::counter("apex_y_things_total", "Things done, by outcome."),
            MetricSpec::counter("apex_x_Things_total", "Things done, by outcome."),
            MetricSpec::counter("apex_x_things_total", "no"),
            MetricSpec::counter("apex_x_things_total", "Things.").uncharted(""),
        ] {
            assert!(check_names("x", &[bad]).is_err(), "{bad:?}");
        }
        assert!(check_names("x", &[good[0], good[0]]).is_err());
    }
}
