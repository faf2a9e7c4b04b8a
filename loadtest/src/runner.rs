//! Runs one load: C connections (HTTP/1.1 keep-alive, or HTTP/2 with prior knowledge) take
//! request tickets in order, send them open or closed loop, and record every outcome, its
//! latency (from the intended send time) and what the server acknowledged, per record.

use std::collections::{BTreeMap, HashMap};
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use apex_core::model::Metric;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use serde::Deserialize;

use crate::schedule::{Bounds, Pacing, Ticket, Tickets, planned_requests};
use crate::stats::{Outcome, Recorder, RunStats, bucket_seconds};
use crate::workload::{PreparedRequest, Workload};

/// A loopback HTTP server to load.
#[derive(Debug, Clone)]
pub struct Target {
    /// Where to connect.
    pub addr: SocketAddr,
    /// `host:port` for the `Host` header and HTTP/2 authority.
    pub authority: String,
}

impl Target {
    /// Parses `http://HOST:PORT[/]` and refuses anything that is not a loopback address: the
    /// harness must never load someone else's server.
    pub fn parse(url: &str) -> Result<Self, String> {
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| format!("target {url:?}: give an http:// URL (TLS is not supported)"))?;
        let authority = rest.trim_end_matches('/');
        if authority.is_empty() || authority.contains('/') {
            return Err(format!(
                "target {url:?}: give only the scheme, host and port, such as http://127.0.0.1:8080"
            ));
        }
        let with_port = if authority
            .rsplit_once(':')
            .is_some_and(|(_, p)| p.parse::<u16>().is_ok())
        {
            authority.to_owned()
        } else {
            format!("{authority}:80")
        };
        let addrs: Vec<SocketAddr> = with_port
            .to_socket_addrs()
            .map_err(|e| format!("target {url:?}: cannot resolve: {e}"))?
            .collect();
        let addr = *addrs
            .first()
            .ok_or_else(|| format!("target {url:?}: no address"))?;
        if let Some(outside) = addrs.iter().find(|a| !a.ip().is_loopback()) {
            return Err(format!(
                "target {url:?} resolves to {outside}, which is not a loopback address: the harness only loads servers on this machine"
            ));
        }
        Ok(Self {
            addr,
            authority: with_port,
        })
    }
}

/// How one run goes.
#[derive(Debug, Clone)]
pub struct RunConfig {
    /// The server.
    pub target: Target,
    /// Open or closed loop.
    pub pacing: Pacing,
    /// Connections (closed loop: the concurrency; open loop: the most requests in flight).
    pub connections: usize,
    /// When it ends.
    pub bounds: Bounds,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    pub http2: bool,
    /// Time an answer may take before the request counts as timed out.
    pub timeout: Duration,
    /// Show a progress bar on a terminal.
    pub progress: bool,
    /// Samples this process's resident memory once a second (the server under test).
    pub watch_pid: Option<u32>,
    /// Names the run in the progress bar.
    pub label: String,
}

/// What the server acknowledged of one customer's metric, in storage units.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LedgerEntry {
    /// Answered 2xx and accepted: the stores must hold exactly this much more.
    pub acked: u64,
    /// Sent, but the outcome is unknown (no answer, a timeout or a 5xx other than 503).
    pub unknown: u64,
}

/// Per customer (index into the workload's customers) and metric.
pub type Ledger = HashMap<(usize, Metric), LedgerEntry>;

/// Record counts by what became of them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct RecordCounts {
    /// Accepted by a 2xx answer.
    pub accepted: u64,
    /// Answered as duplicates.
    pub duplicate: u64,
    /// Refused (4xx, 503, or rejected inside a batch).
    pub refused: u64,
    /// Outcome unknown.
    pub unknown: u64,
}

/// Everything one run measured.
#[derive(Debug, Default)]
pub struct RunResult {
    /// All outcomes and latencies, in total and per second.
    pub stats: RunStats,
    /// What was acknowledged, per customer and metric.
    pub ledger: Ledger,
    /// Records by fate.
    pub records: RecordCounts,
    /// From the first due request to the last answer.
    pub elapsed: Duration,
    /// Open-loop requests that could not be sent before the run's grace period ran out.
    pub missed: u64,
    /// Connection attempts that failed.
    pub connect_errors: u64,
    /// Resident memory of the watched process by second, in bytes.
    pub rss_bytes: BTreeMap<u64, u64>,
}

impl RunResult {
    /// Requests per second over the run.
    pub fn request_rate(&self) -> f64 {
        self.stats.total.requests() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// 2xx requests per second over the run.
    pub fn success_rate(&self) -> f64 {
        self.stats.total.successes() as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

enum Sender {
    Http1(hyper::client::conn::http1::SendRequest<Full<Bytes>>),
    Http2(hyper::client::conn::http2::SendRequest<Full<Bytes>>),
}

async fn connect(target: &Target, http2: bool) -> Result<Sender, String> {
    let stream = tokio::net::TcpStream::connect(target.addr)
        .await
        .map_err(|e| e.to_string())?;
    let _ = stream.set_nodelay(true);
    let io = TokioIo::new(stream);
    if http2 {
        let (sender, connection) = hyper::client::conn::http2::handshake(TokioExecutor::new(), io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Sender::Http2(sender))
    } else {
        let (sender, connection) = hyper::client::conn::http1::handshake(io)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(connection);
        Ok(Sender::Http1(sender))
    }
}

/// How an exchange failed.
enum ExchangeError {
    /// The connection was closed before the request went out (the server closes idle
    /// keep-alive connections): nothing was sent, so it is safe to send again.
    NotSent,
    /// The request may have reached the server.
    Failed,
    /// No answer within the request timeout.
    TimedOut,
}

impl Sender {
    fn is_closed(&self) -> bool {
        match self {
            Sender::Http1(s) => s.is_closed(),
            Sender::Http2(s) => s.is_closed(),
        }
    }
}

/// Sends `request` and reads the whole answer.
async fn exchange(
    sender: &mut Sender,
    target: &Target,
    request: &PreparedRequest,
) -> Result<(StatusCode, Bytes), ExchangeError> {
    let uri = match sender {
        Sender::Http1(_) => request.path.to_owned(),
        Sender::Http2(_) => format!("http://{}{}", target.authority, request.path),
    };
    let mut builder = Request::builder()
        .method(Method::POST)
        .uri(uri)
        .header(CONTENT_TYPE, request.content_type);
    if let Sender::Http1(_) = sender {
        builder = builder.header(HOST, &target.authority);
    }
    if let Some(authorization) = &request.authorization {
        builder = builder.header(AUTHORIZATION, authorization);
    }
    let http_request = builder
        .body(Full::new(request.body.clone()))
        .expect("a request of valid parts");
    let failed = |_| ExchangeError::Failed;
    let response = match sender {
        Sender::Http1(s) => {
            s.ready().await.map_err(|_| ExchangeError::NotSent)?;
            s.send_request(http_request).await.map_err(failed)?
        }
        Sender::Http2(s) => {
            s.ready().await.map_err(|_| ExchangeError::NotSent)?;
            s.send_request(http_request).await.map_err(failed)?
        }
    };
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(failed)?
        .to_bytes();
    Ok((status, body))
}

#[derive(Deserialize)]
struct BatchAnswer {
    accepted: u64,
    duplicates: u64,
    #[serde(default)]
    errors: Vec<IndexedError>,
}

#[derive(Deserialize)]
struct IndexedError {
    index: usize,
}

/// Books the records of `request` by its outcome; returns how many were accepted.
fn account(
    request: &PreparedRequest,
    outcome: Outcome,
    body: &[u8],
    ledger: &mut Ledger,
    counts: &mut RecordCounts,
) -> u64 {
    let all = request.records.len() as u64;
    let book_unknown = |ledger: &mut Ledger, indexes: &mut dyn Iterator<Item = usize>| {
        for i in indexes {
            let r = request.records[i];
            ledger.entry((r.customer, r.metric)).or_default().unknown += r.units;
        }
    };
    match outcome {
        Outcome::Status(code) if (200..300).contains(&code) => {
            if request.path == "/api/usage/track" {
                if contains(body, b"\"duplicate\":true") {
                    counts.duplicate += 1;
                    return 0;
                }
                let r = request.records[0];
                ledger.entry((r.customer, r.metric)).or_default().acked += r.units;
                counts.accepted += 1;
                return 1;
            }
            let Ok(answer) = serde_json::from_slice::<BatchAnswer>(body) else {
                // A 2xx we cannot read: the records may or may not be stored.
                book_unknown(ledger, &mut (0..request.records.len()));
                counts.unknown += all;
                return 0;
            };
            let mut rejected = vec![false; request.records.len()];
            for e in &answer.errors {
                if let Some(slot) = rejected.get_mut(e.index) {
                    *slot = true;
                }
            }
            let kept = (0..request.records.len()).filter(|&i| !rejected[i]);
            if answer.duplicates > 0 || kept.clone().count() as u64 != answer.accepted {
                // Which records were the duplicates the answer does not say (our event ids are
                // unique, so this only happens when a key file's customers saw this seed
                // before); nor which were kept when the counts disagree.
                book_unknown(ledger, &mut kept.clone());
                counts.unknown += kept.count() as u64;
            } else {
                for i in kept {
                    let r = request.records[i];
                    ledger.entry((r.customer, r.metric)).or_default().acked += r.units;
                }
            }
            counts.accepted += answer.accepted;
            counts.duplicate += answer.duplicates;
            counts.refused += answer.errors.len() as u64;
            answer.accepted
        }
        // 503 means "not taken, retry": nothing of it is stored. Other 4xx refuse it outright.
        Outcome::Status(code) if (400..500).contains(&code) || code == 503 => {
            counts.refused += all;
            0
        }
        _ => {
            book_unknown(ledger, &mut (0..request.records.len()));
            counts.unknown += all;
            0
        }
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

struct Shared {
    config: RunConfig,
    workload: Arc<Workload>,
    tickets: Tickets,
    start: Instant,
    recorder: Recorder,
    done: AtomicU64,
    failed: AtomicU64,
}

struct ConnectionResult {
    ledger: Ledger,
    records: RecordCounts,
    missed: u64,
    connect_errors: u64,
    last_end: Duration,
}

impl Shared {
    fn finish(
        &self,
        result: &mut ConnectionResult,
        outcome: Outcome,
        latency_us: u64,
        records: u64,
    ) {
        let end = self.start.elapsed();
        self.recorder
            .record(end.as_secs(), outcome, latency_us, records);
        if !outcome.is_success() {
            self.failed.fetch_add(1, Ordering::Relaxed);
        }
        self.done.fetch_add(1, Ordering::Relaxed);
        result.last_end = end;
    }
}

/// Connects within `timeout` (a full accept backlog would otherwise hold a connect for the
/// kernel's two minutes of SYN retries).
async fn connect_within(target: &Target, http2: bool, timeout: Duration) -> Option<Sender> {
    tokio::time::timeout(timeout, connect(target, http2))
        .await
        .ok()
        .and_then(Result::ok)
}

async fn connection_loop(shared: Arc<Shared>) -> ConnectionResult {
    let config = &shared.config;
    let mut result = ConnectionResult {
        ledger: Ledger::new(),
        records: RecordCounts::default(),
        missed: 0,
        connect_errors: 0,
        last_end: Duration::ZERO,
    };
    let mut sender: Option<Sender> = None;
    loop {
        let free_at = shared.start.elapsed();
        let ticket = shared.tickets.take(config.pacing, &config.bounds, free_at);
        let (index, due) = match ticket {
            Ticket::Send { index, due } => (index, due),
            Ticket::Stop => break,
            Ticket::Missed { .. } => {
                // Every ticket left in the schedule is missed too: claim them all at once.
                result.missed += shared.tickets.miss_rest(config.pacing, &config.bounds);
                break;
            }
        };
        let request = shared.workload.request(index);
        // Latency runs from the intended send time when this connection was still busy with
        // earlier requests at that time: the server's slowness delayed the send, and hiding
        // that would be coordinated omission. A connection that was free waits for the due
        // time on the runtime's timer, which wakes up to a millisecond late; that lateness is
        // the client's, so its latency runs from the actual send.
        let measured_from = if due > free_at {
            tokio::time::sleep_until((shared.start + due).into()).await;
            shared.start.elapsed().max(due)
        } else {
            due
        };
        // Two tries: a keep-alive connection the server closed while idle sends nothing, and
        // is replaced once.
        let mut answer = Err(ExchangeError::NotSent);
        for _ in 0..2 {
            if sender.as_ref().is_none_or(Sender::is_closed) {
                sender = connect_within(&config.target, config.http2, config.timeout).await;
                if sender.is_none() {
                    result.connect_errors += 1;
                    break;
                }
            }
            let Some(live) = sender.as_mut() else { break };
            answer = match tokio::time::timeout(
                config.timeout,
                exchange(live, &config.target, &request),
            )
            .await
            {
                Ok(answer) => answer,
                Err(_) => Err(ExchangeError::TimedOut),
            };
            match answer {
                Err(ExchangeError::NotSent) => sender = None,
                _ => break,
            }
        }
        let latency_us = shared
            .start
            .elapsed()
            .saturating_sub(measured_from)
            .as_micros() as u64;
        let (outcome, body) = match answer {
            Ok((status, body)) => (Outcome::Status(status.as_u16()), body),
            Err(ExchangeError::NotSent) => {
                // Nothing went out, so nothing can be stored: its records are refused, and the
                // request counts as a transport failure.
                result.records.refused += request.records.len() as u64;
                shared.finish(&mut result, Outcome::Transport, 0, 0);
                // A server that refuses connections is not to be spun on.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
            Err(ExchangeError::Failed) => {
                sender = None;
                (Outcome::Transport, Bytes::new())
            }
            Err(ExchangeError::TimedOut) => {
                // The connection's state is unknown after an abandoned request.
                sender = None;
                (Outcome::Timeout, Bytes::new())
            }
        };
        let accepted = account(
            &request,
            outcome,
            &body,
            &mut result.ledger,
            &mut result.records,
        );
        shared.finish(&mut result, outcome, latency_us, accepted);
    }
    result
}

/// Resident memory of `pid` in bytes, from `/proc`.
pub fn rss_bytes(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Runs the load of `config` with `workload` and returns what it measured.
pub async fn run(config: RunConfig, workload: Arc<Workload>) -> Result<RunResult, String> {
    if config.connections == 0 || config.connections > 50_000 {
        return Err("--connections must be 1 to 50000".into());
    }
    if let Pacing::Open { rate } = config.pacing
        && !(rate.is_finite() && rate > 0.0 && rate <= 10_000_000.0)
    {
        return Err("--rate must be above 0 and at most 10000000 requests per second".into());
    }
    let shared = Arc::new(Shared {
        config: config.clone(),
        workload,
        tickets: Tickets::default(),
        start: Instant::now(),
        recorder: Recorder::new(bucket_seconds(config.bounds.duration.as_secs())),
        done: AtomicU64::new(0),
        failed: AtomicU64::new(0),
    });
    let finished = Arc::new(AtomicBool::new(false));
    let progress = spawn_progress(&shared, finished.clone());
    let rss = spawn_rss_sampler(config.watch_pid, shared.start, finished.clone());
    let mut tasks = Vec::with_capacity(config.connections);
    for _ in 0..config.connections {
        tasks.push(tokio::spawn(connection_loop(shared.clone())));
    }
    let mut result = RunResult::default();
    let mut last_end = Duration::ZERO;
    for task in tasks {
        let part = task
            .await
            .map_err(|e| format!("a connection task failed: {e}"))?;
        for (key, entry) in part.ledger {
            let total = result.ledger.entry(key).or_default();
            total.acked += entry.acked;
            total.unknown += entry.unknown;
        }
        result.records.accepted += part.records.accepted;
        result.records.duplicate += part.records.duplicate;
        result.records.refused += part.records.refused;
        result.records.unknown += part.records.unknown;
        result.missed += part.missed;
        result.connect_errors += part.connect_errors;
        last_end = last_end.max(part.last_end);
    }
    finished.store(true, Ordering::Relaxed);
    if let Some(bar) = progress {
        bar.await.map_err(|e| e.to_string())?;
    }
    result.stats = shared.recorder.snapshot();
    if let Some(sampler) = rss {
        result.rss_bytes = sampler.await.map_err(|e| e.to_string())?;
    }
    result.elapsed = last_end.max(Duration::from_millis(1));
    Ok(result)
}

fn spawn_progress(
    shared: &Arc<Shared>,
    finished: Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<()>> {
    if !shared.config.progress {
        return None;
    }
    let target = ProgressDrawTarget::stderr();
    if target.is_hidden() {
        return None;
    }
    let planned = match shared.config.pacing {
        Pacing::Open { rate } => Some(planned_requests(rate, &shared.config.bounds)),
        Pacing::Closed => None,
    };
    let bar = match planned {
        Some(n) => ProgressBar::with_draw_target(Some(n), target),
        None => ProgressBar::with_draw_target(None, target),
    };
    let style = match planned {
        Some(_) => {
            ProgressStyle::with_template("{prefix} [{elapsed_precise}] {bar:30} {pos}/{len} {msg}")
        }
        None => ProgressStyle::with_template("{prefix} [{elapsed_precise}] {spinner} {pos} {msg}"),
    }
    .expect("a valid progress template");
    bar.set_style(style);
    bar.set_prefix(shared.config.label.clone());
    let shared = shared.clone();
    Some(tokio::spawn(async move {
        let mut last = (Instant::now(), 0u64);
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let done = shared.done.load(Ordering::Relaxed);
            let now = Instant::now();
            let rate = (done - last.1) as f64 / now.duration_since(last.0).as_secs_f64();
            last = (now, done);
            bar.set_position(done);
            bar.set_message(format!(
                "{rate:.0} req/s, {} not 2xx",
                shared.failed.load(Ordering::Relaxed)
            ));
            if finished.load(Ordering::Relaxed) {
                bar.finish_and_clear();
                return;
            }
        }
    }))
}

fn spawn_rss_sampler(
    pid: Option<u32>,
    start: Instant,
    finished: Arc<AtomicBool>,
) -> Option<tokio::task::JoinHandle<BTreeMap<u64, u64>>> {
    let pid = pid?;
    Some(tokio::spawn(async move {
        let mut samples = BTreeMap::new();
        while !finished.load(Ordering::Relaxed) {
            if let Some(bytes) = rss_bytes(pid) {
                let second = start.elapsed().as_secs();
                let slot = samples.entry(second).or_insert(0);
                *slot = (*slot).max(bytes);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        samples
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::SentRecord;

    fn request(path: &'static str, n: usize) -> PreparedRequest {
        PreparedRequest {
            path,
            content_type: "application/json",
            authorization: None,
            body: Bytes::new(),
            records: (0..n)
                .map(|i| SentRecord {
                    customer: i % 2,
                    metric: Metric::Impressions,
                    units: 10 + i as u64,
                })
                .collect(),
        }
    }

    #[test]
    fn targets_must_be_loopback() {
        assert_eq!(
            Target::parse("http://127.0.0.1:8080").unwrap().addr,
            "127.0.0.1:8080".parse().unwrap()
        );
        assert!(Target::parse("http://[::1]:9/").is_ok());
        assert!(Target::parse("http://localhost:8080").is_ok());
        assert!(Target::parse("http://10.1.2.3:8080").is_err());
        assert!(Target::parse("http://8.8.8.8").is_err());
        assert!(Target::parse("https://127.0.0.1:8080").is_err());
        assert!(Target::parse("http://127.0.0.1:8080/api").is_err());
        assert!(Target::parse("127.0.0.1:8080").is_err());
    }

    #[test]
    fn answers_are_booked_by_what_they_say() {
        let mut ledger = Ledger::new();
        let mut counts = RecordCounts::default();
        let track = request("/api/usage/track", 1);
        assert_eq!(
            account(
                &track,
                Outcome::Status(200),
                b"{\"success\":true}",
                &mut ledger,
                &mut counts
            ),
            1
        );
        account(
            &track,
            Outcome::Status(200),
            b"{\"success\":true,\"duplicate\":true}",
            &mut ledger,
            &mut counts,
        );
        account(&track, Outcome::Status(503), b"", &mut ledger, &mut counts);
        account(&track, Outcome::Status(401), b"", &mut ledger, &mut counts);
        account(&track, Outcome::Timeout, b"", &mut ledger, &mut counts);
        account(&track, Outcome::Status(500), b"", &mut ledger, &mut counts);
        assert_eq!(
            ledger[&(0, Metric::Impressions)],
            LedgerEntry {
                acked: 10,
                unknown: 20
            }
        );
        assert_eq!(
            counts,
            RecordCounts {
                accepted: 1,
                duplicate: 1,
                refused: 2,
                unknown: 2
            }
        );

        let mut ledger = Ledger::new();
        let mut counts = RecordCounts::default();
        let batch = request("/api/usage/batch", 4);
        let answer = br#"{"success":true,"accepted":3,"duplicates":0,"rejected":1,"errors":[{"index":2,"code":"invalid_quantity","message":"x"}]}"#;
        assert_eq!(
            account(
                &batch,
                Outcome::Status(200),
                answer,
                &mut ledger,
                &mut counts
            ),
            3
        );
        // Records 0 and 2 are customer 0 (10 and 12 units), 1 and 3 customer 1 (11, 13);
        // record 2 was rejected.
        assert_eq!(ledger[&(0, Metric::Impressions)].acked, 10);
        assert_eq!(ledger[&(1, Metric::Impressions)].acked, 24);
        assert_eq!(counts.refused, 1);
        account(
            &batch,
            Outcome::Status(200),
            b"not json",
            &mut ledger,
            &mut counts,
        );
        assert_eq!(ledger[&(0, Metric::Impressions)].unknown, 22);
        assert_eq!(counts.unknown, 4);
    }
}
