//! The telemetry the harness sends: many customers, a metric mix, unique event ids, recent
//! timestamps and SDK metadata like the operations guide's example, as single `track`
//! requests, batches (JSON or NDJSON) or a mix. Request `i` of a run is a pure function of the
//! run's seed and `i`, and the harness knows the exact quantity in storage units that each
//! record adds, so `--verify` can compare totals to the unit.

use std::fmt::Write as _;
use std::path::Path;

use apex_core::model::{BYTES_PER_GB, Metric};
use bytes::Bytes;
use serde::Deserialize;

/// A customer the load is sent for: its key and its id (to check its totals).
#[derive(Debug, Clone, Deserialize, PartialEq, Eq)]
pub struct Customer {
    /// `rsk_...`.
    pub api_key: String,
    /// `cus_...`.
    pub customer_id: String,
}

/// Reads customers from a key file: one JSON object per line with at least `api_key` and
/// `customer_id`, as `apexctl customers create --json` prints them. Blank lines are skipped.
pub fn read_key_file(path: &Path) -> Result<Vec<Customer>, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read key file {}: {e}", path.display()))?;
    parse_key_lines(&text).map_err(|e| format!("key file {}: {e}", path.display()))
}

/// Parses the lines of a key file.
pub fn parse_key_lines(text: &str) -> Result<Vec<Customer>, String> {
    let mut customers = Vec::new();
    for (number, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let customer: Customer = serde_json::from_str(line).map_err(|e| {
            format!(
                "line {}: expected {{\"api_key\":...,\"customer_id\":...}}: {e}",
                number + 1
            )
        })?;
        customers.push(customer);
    }
    if customers.is_empty() {
        return Err("no customers in it".into());
    }
    Ok(customers)
}

/// What kind of requests a run sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// `POST /api/usage/track`, one record each.
    Track,
    /// `POST /api/usage/batch`, `--batch-size` records each.
    Batch,
    /// Both: `--batch-share` percent of requests are batches.
    Mixed,
}

/// How batch bodies are sent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum BatchFormat {
    /// `{"api_key":...,"records":[...]}`.
    Json,
    /// One record per line, the key in `Authorization: Bearer`.
    Ndjson,
}

/// The shape of a run's requests.
#[derive(Debug, Clone)]
pub struct Workload {
    /// Customers, chosen uniformly per request.
    pub customers: Vec<Customer>,
    /// Request kinds.
    pub mode: Mode,
    /// Records per batch request.
    pub batch_size: usize,
    /// Percent of requests that are batches in [`Mode::Mixed`].
    pub batch_share: u8,
    /// Batch body format.
    pub batch_format: BatchFormat,
    /// Relative weights of impressions, api_calls and data_transfer records.
    pub mix: [u32; 3],
    /// Seeds the request contents; also names the run in event ids.
    pub seed: u64,
    /// Unix milliseconds at the start of the run (records are stamped up to a minute before).
    pub start_ms: i64,
}

/// One record of a request, as the harness accounts for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SentRecord {
    /// Index into the workload's customers.
    pub customer: usize,
    /// Its metric.
    pub metric: Metric,
    /// Its quantity in storage units (bytes for data transfer).
    pub units: u64,
}

/// A request ready to send.
#[derive(Debug, Clone)]
pub struct PreparedRequest {
    /// Request path.
    pub path: &'static str,
    /// `Content-Type`.
    pub content_type: &'static str,
    /// `Authorization` value, when the key is not in the body.
    pub authorization: Option<String>,
    /// The body.
    pub body: Bytes,
    /// What the body carries, in order (batch answers refer to records by index).
    pub records: Vec<SentRecord>,
}

/// splitmix64: a small, fast generator whose whole state is one word, so request `i` can
/// have its own stream without any shared state.
#[derive(Debug, Clone)]
pub struct Random(u64);

impl Random {
    /// A stream for `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (`n` > 0); the bias of the modulo is negligible for small `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
}

const PLATFORMS: [&str; 2] = ["iOS", "Android"];
const SDK_VERSIONS: [&str; 3] = ["1.0.0", "1.1.2", "2.0.0-beta.1"];

impl Workload {
    /// Checks the settings.
    pub fn validate(&self) -> Result<(), String> {
        if self.customers.is_empty() {
            return Err("no customers to send for".into());
        }
        if self.batch_size == 0 || self.batch_size > 10_000 {
            return Err("--batch-size must be 1 to 10000".into());
        }
        if self.batch_share > 100 {
            return Err("--batch-share is a percentage, 0 to 100".into());
        }
        let total: u64 = self.mix.iter().map(|&w| u64::from(w)).sum();
        if total == 0 || total > u64::from(u32::MAX) {
            return Err(
                "--mix needs weights above zero on some metric, summing to at most 4294967295"
                    .into(),
            );
        }
        Ok(())
    }

    /// Request `index` of the run.
    pub fn request(&self, index: u64) -> PreparedRequest {
        let mut random = Random::new(self.seed ^ index.wrapping_mul(0xD1B5_4A32_D192_ED03));
        let customer = random.below(self.customers.len() as u64) as usize;
        let batch = match self.mode {
            Mode::Track => false,
            Mode::Batch => true,
            Mode::Mixed => random.below(100) < u64::from(self.batch_share),
        };
        if batch {
            self.batch_request(index, customer, &mut random)
        } else {
            self.track_request(index, customer, &mut random)
        }
    }

    fn track_request(&self, index: u64, customer: usize, random: &mut Random) -> PreparedRequest {
        let mut body = String::with_capacity(320);
        body.push_str("{\"api_key\":\"");
        body.push_str(&self.customers[customer].api_key);
        body.push_str("\",");
        let record = self.write_record(&mut body, index, 0, customer, random);
        body.push('}');
        PreparedRequest {
            path: "/api/usage/track",
            content_type: "application/json",
            authorization: None,
            body: Bytes::from(body),
            records: vec![record],
        }
    }

    fn batch_request(&self, index: u64, customer: usize, random: &mut Random) -> PreparedRequest {
        let mut body = String::with_capacity(self.batch_size * 260 + 80);
        let mut records = Vec::with_capacity(self.batch_size);
        match self.batch_format {
            BatchFormat::Json => {
                body.push_str("{\"api_key\":\"");
                body.push_str(&self.customers[customer].api_key);
                body.push_str("\",\"records\":[");
                for n in 0..self.batch_size {
                    if n > 0 {
                        body.push(',');
                    }
                    body.push('{');
                    records.push(self.write_record(&mut body, index, n, customer, random));
                    body.push('}');
                }
                body.push_str("]}");
            }
            BatchFormat::Ndjson => {
                for n in 0..self.batch_size {
                    body.push('{');
                    records.push(self.write_record(&mut body, index, n, customer, random));
                    body.push_str("}\n");
                }
            }
        }
        let (content_type, authorization) = match self.batch_format {
            BatchFormat::Json => ("application/json", None),
            BatchFormat::Ndjson => (
                "application/x-ndjson",
                Some(format!("Bearer {}", self.customers[customer].api_key)),
            ),
        };
        PreparedRequest {
            path: "/api/usage/batch",
            content_type,
            authorization,
            body: Bytes::from(body),
            records,
        }
    }

    /// Writes one record's fields (without braces) and returns what it adds.
    fn write_record(
        &self,
        out: &mut String,
        index: u64,
        position: usize,
        customer: usize,
        random: &mut Random,
    ) -> SentRecord {
        let metric = self.pick_metric(random);
        let (quantity, units) = match metric {
            Metric::Impressions => {
                let n = 1 + random.below(1_000);
                (n.to_string(), n)
            }
            Metric::ApiCalls => {
                let n = 1 + random.below(20);
                (n.to_string(), n)
            }
            Metric::DataTransfer => {
                // Micro-GB steps (kilobytes), written as a decimal GB quantity as SDKs do.
                let micro_gb = 1 + random.below(50_000);
                (
                    format!("{}.{:06}", micro_gb / 1_000_000, micro_gb % 1_000_000),
                    micro_gb * (BYTES_PER_GB / 1_000_000),
                )
            }
        };
        let timestamp_ms = self.start_ms - random.below(60_000) as i64;
        let platform = PLATFORMS[random.below(PLATFORMS.len() as u64) as usize];
        let sdk_version = SDK_VERSIONS[random.below(SDK_VERSIONS.len() as u64) as usize];
        let _ = write!(
            out,
            "\"metric_type\":\"{}\",\"quantity\":{quantity},\"event_id\":\"lt-{:016x}-{index}-{position}\",\"timestamp\":{timestamp_ms},\"metadata\":{{\"platform\":\"{platform}\",\"sdk_version\":\"{sdk_version}\",\"app_id\":\"com.example.game{}\"}}",
            metric.as_str(),
            self.seed,
            random.below(50),
        );
        SentRecord {
            customer,
            metric,
            units,
        }
    }

    fn pick_metric(&self, random: &mut Random) -> Metric {
        let total: u32 = self.mix.iter().sum();
        let mut roll = random.below(u64::from(total)) as u32;
        for (weight, metric) in
            self.mix
                .iter()
                .zip([Metric::Impressions, Metric::ApiCalls, Metric::DataTransfer])
        {
            if roll < *weight {
                return metric;
            }
            roll -= weight;
        }
        Metric::Impressions
    }
}

/// Parses `impressions=80,api_calls=15,data_transfer=5` into weights.
pub fn parse_mix(text: &str) -> Result<[u32; 3], String> {
    let mut mix = [0u32; 3];
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (name, weight) = part
            .split_once('=')
            .ok_or_else(|| format!("--mix: {part:?} is not metric=weight"))?;
        let weight: u32 = weight
            .trim()
            .parse()
            .map_err(|_| format!("--mix: weight {weight:?} is not a whole number"))?;
        let slot = match name.trim().parse::<Metric>() {
            Ok(Metric::Impressions) => 0,
            Ok(Metric::ApiCalls) => 1,
            Ok(Metric::DataTransfer) => 2,
            Err(e) => return Err(format!("--mix: {e}")),
        };
        mix[slot] = weight;
    }
    Ok(mix)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn workload(mode: Mode) -> Workload {
        Workload {
            customers: vec![
                Customer {
                    api_key: "rsk_a".into(),
                    customer_id: "cus_a".into(),
                },
                Customer {
                    api_key: "rsk_b".into(),
                    customer_id: "cus_b".into(),
                },
            ],
            mode,
            batch_size: 5,
            batch_share: 50,
            batch_format: BatchFormat::Json,
            mix: [80, 15, 5],
            seed: 42,
            start_ms: 1_790_000_000_000,
        }
    }

    #[test]
    fn a_request_is_a_function_of_seed_and_index() {
        let w = workload(Mode::Mixed);
        assert_eq!(w.request(7).body, w.request(7).body);
        assert_ne!(w.request(7).body, w.request(8).body);
    }

    #[test]
    fn track_bodies_are_valid_json_with_the_accounted_quantity() {
        let w = workload(Mode::Track);
        let mut seen = [false; 3];
        for i in 0..500 {
            let request = w.request(i);
            assert_eq!(request.path, "/api/usage/track");
            let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
            let record = request.records[0];
            assert_eq!(
                json["api_key"],
                w.customers[record.customer].api_key.as_str()
            );
            assert_eq!(json["metric_type"], record.metric.as_str());
            assert!(json["metadata"]["sdk_version"].is_string());
            // The number as written (serde_json's float would drop trailing zeros).
            let text = std::str::from_utf8(&request.body).unwrap();
            let after = &text[text.find("\"quantity\":").unwrap() + 11..];
            let quantity = &after[..after.find(',').unwrap()];
            let slot = Metric::ALL
                .iter()
                .position(|m| *m == record.metric)
                .unwrap();
            seen[slot] = true;
            match record.metric {
                Metric::DataTransfer => {
                    let (whole, frac) = quantity.split_once('.').unwrap();
                    let units = whole.parse::<u64>().unwrap() * BYTES_PER_GB
                        + frac.parse::<u64>().unwrap() * 1_000;
                    assert_eq!(units, record.units);
                }
                _ => assert_eq!(quantity.parse::<u64>().unwrap(), record.units),
            }
            assert!(record.units > 0);
        }
        assert_eq!(seen, [true; 3]);
    }

    #[test]
    fn batches_carry_their_records_in_order_in_both_formats() {
        let mut w = workload(Mode::Batch);
        let request = w.request(3);
        let json: serde_json::Value = serde_json::from_slice(&request.body).unwrap();
        let records = json["records"].as_array().unwrap();
        assert_eq!(records.len(), 5);
        assert_eq!(request.records.len(), 5);
        for (sent, record) in request.records.iter().zip(records) {
            assert_eq!(record["metric_type"], sent.metric.as_str());
        }
        w.batch_format = BatchFormat::Ndjson;
        let request = w.request(3);
        assert_eq!(request.content_type, "application/x-ndjson");
        assert!(
            request
                .authorization
                .as_deref()
                .unwrap()
                .starts_with("Bearer rsk_")
        );
        let lines: Vec<&str> = std::str::from_utf8(&request.body)
            .unwrap()
            .lines()
            .collect();
        assert_eq!(lines.len(), 5);
        for line in lines {
            serde_json::from_str::<serde_json::Value>(line).unwrap();
        }
    }

    #[test]
    fn event_ids_are_unique_across_requests_and_records() {
        let w = workload(Mode::Mixed);
        let mut ids = std::collections::HashSet::new();
        for i in 0..300 {
            let body = w.request(i).body;
            let text = std::str::from_utf8(&body).unwrap();
            for (at, _) in text.match_indices("\"event_id\":\"") {
                let rest = &text[at + 12..];
                let id = &rest[..rest.find('"').unwrap()];
                assert!(ids.insert(id.to_owned()), "{id} twice");
            }
        }
        assert!(ids.len() > 300);
    }

    #[test]
    fn mixed_mode_sends_roughly_its_batch_share() {
        let w = workload(Mode::Mixed);
        let batches = (0..2_000)
            .filter(|&i| w.request(i).path == "/api/usage/batch")
            .count();
        assert!((800..1_200).contains(&batches), "{batches}");
    }

    #[test]
    fn mixes_and_key_files_parse_and_refuse_nonsense() {
        assert_eq!(
            parse_mix("impressions=80, api_calls=15,data_transfer=5").unwrap(),
            [80, 15, 5]
        );
        assert_eq!(parse_mix("api_calls=1").unwrap(), [0, 1, 0]);
        assert!(parse_mix("clicks=1").is_err());
        assert!(parse_mix("impressions=x").is_err());
        assert!(parse_mix("impressions").is_err());
        let customers = parse_key_lines(
            "{\"api_key\":\"rsk_1\",\"customer_id\":\"cus_1\",\"plan\":\"starter\"}\n\n{\"api_key\":\"rsk_2\",\"customer_id\":\"cus_2\"}\n",
        )
        .unwrap();
        assert_eq!(customers.len(), 2);
        assert!(parse_key_lines("").is_err());
        assert!(parse_key_lines("rsk_plain_key").is_err());
        let mut bad = workload(Mode::Track);
        bad.mix = [0, 0, 0];
        assert!(bad.validate().is_err());
        bad.mix = [u32::MAX, 1, 0];
        assert!(bad.validate().is_err());
        bad.mix = [1, 0, 0];
        bad.batch_size = 0;
        assert!(bad.validate().is_err());
    }
}
