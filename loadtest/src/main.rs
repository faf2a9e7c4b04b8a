//! `apex-loadtest`: the load-test harness. `run` sends realistic SDK telemetry to a loopback
//! server (open loop by default, coordinated omission corrected; or closed loop) and reports
//! latency percentiles, throughput, errors and a plot, and with `--verify` checks the stores
//! against what was acknowledged; `compare` measures apex-server against `null-server`, the
//! bare hyper ceiling, in one run; `null-server` is that ceiling.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Stdio};
use std::sync::Arc;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use serde::Serialize;

use apex_loadtest::report::{Describe, Report};
use apex_loadtest::runner::{self, RunConfig, RunResult, Target};
use apex_loadtest::schedule::{Bounds, Pacing};
use apex_loadtest::stats::median;
use apex_loadtest::workload::{BatchFormat, Customer, Mode, Workload, parse_mix};
use apex_loadtest::{customers, null_server, verify};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "apex-loadtest",
    version,
    about = "Load-test harness for apex-server (loopback targets only)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sends a load and reports what it measured.
    Run(RunArgs),
    /// Closed-loop runs against null-server and apex-server, alternating, ROUNDS times; the
    /// ratio of their median rates; then open-loop runs of apex-server at half its median.
    Compare(CompareArgs),
    /// A bare hyper server that reads each body and answers 200 `{"success":true}`:
    /// the ceiling to compare apex-server against, on the same client and machine.
    NullServer {
        /// Loopback address to listen on (port 0 picks a free one and prints it).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
    },
}

/// What to send, and to whom.
#[derive(Args, Clone)]
struct LoadArgs {
    /// The server, `http://HOST:PORT`; must be a loopback address.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    target: String,
    /// Request kind.
    #[arg(long, value_enum, default_value = "track")]
    mode: Mode,
    /// Records per batch request.
    #[arg(long, default_value_t = 100)]
    batch_size: usize,
    /// Percent of requests that are batches in `mixed` mode.
    #[arg(long, default_value_t = 10)]
    batch_share: u8,
    /// Batch body format.
    #[arg(long, value_enum, default_value = "json")]
    batch_format: BatchFormat,
    /// Metric weights.
    #[arg(long, default_value = "impressions=80,api_calls=15,data_transfer=5")]
    mix: String,
    /// Key file: one `apexctl customers create --json` line per customer.
    #[arg(long, conflicts_with = "customers")]
    keys_file: Option<PathBuf>,
    /// Creates this many customers with apexctl instead of reading a key file.
    #[arg(long)]
    customers: Option<usize>,
    /// Writes the customers used (created or read) to this key file.
    #[arg(long)]
    save_keys: Option<PathBuf>,
    /// The apexctl binary (default: next to this one, else on PATH).
    #[arg(long)]
    apexctl: Option<PathBuf>,
    /// Seeds request contents and event ids (default: random).
    #[arg(long)]
    seed: Option<u64>,
    /// Connections.
    #[arg(long, short = 'c', default_value_t = 64)]
    connections: usize,
    /// Time an answer may take, e.g. `10s`, `500ms`.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
    /// HTTP/2 with prior knowledge instead of HTTP/1.1.
    #[arg(long)]
    http2: bool,
    /// Client threads.
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// No progress bar.
    #[arg(long)]
    no_progress: bool,
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// Open-loop arrival rate, requests per second.
    #[arg(long, default_value_t = 1000.0)]
    rate: f64,
    /// Closed loop: every connection sends as fast as it is answered (`--rate` is ignored).
    #[arg(long)]
    closed: bool,
    /// Run length, e.g. `30s`, `2m`.
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Requests to send at most.
    #[arg(long)]
    requests: Option<u64>,
    /// After the run, waits for the pipeline to drain and checks the stores' totals against
    /// what was acknowledged (reads DATABASE_URL, CLICKHOUSE_URL, CLICKHOUSE_DATABASE).
    #[arg(long)]
    verify: bool,
    /// Longest wait for the drain and the totals.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    verify_timeout: Duration,
    /// Writes the JSON report here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Writes the HTML report (summary and charts) here.
    #[arg(long)]
    html: Option<PathBuf>,
    /// Samples this process's resident memory every second (the server's pid).
    #[arg(long)]
    watch_pid: Option<u32>,
    /// Names the run in reports.
    #[arg(long)]
    label: Option<String>,
}

#[derive(Args)]
struct CompareArgs {
    #[command(flatten)]
    load: LoadArgs,
    /// The null server to compare with (default: one started here on a free port).
    #[arg(long)]
    null: Option<String>,
    /// Rounds of each.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Length of each run, e.g. `15s`.
    #[arg(long, default_value = "15s", value_parser = parse_duration)]
    duration: Duration,
    /// Skips the open-loop runs at half the measured rate.
    #[arg(long)]
    no_half_load: bool,
    /// Writes the JSON summary here.
    #[arg(long)]
    json: Option<PathBuf>,
}

impl LoadArgs {
    /// The run settings these flags give, for one run against `target`.
    fn run_config(
        &self,
        target: &Target,
        pacing: Pacing,
        bounds: Bounds,
        watch_pid: Option<u32>,
        label: String,
    ) -> RunConfig {
        RunConfig {
            target: target.clone(),
            pacing,
            connections: self.connections,
            bounds,
            http2: self.http2,
            timeout: self.timeout,
            progress: !self.no_progress,
            watch_pid,
            label,
        }
    }
}

/// Parses `250ms`, `30s`, `2m`, `1h` or a plain number of seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration such as 30s, 500ms or 2m"))?;
    let seconds = match unit {
        "" | "s" => value,
        "ms" => value / 1000.0,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        _ => return Err(format!("{text:?}: unit must be ms, s, m or h")),
    };
    if !seconds.is_finite() || !(0.0..=366.0 * 86400.0).contains(&seconds) {
        return Err(format!("{text:?} is out of range"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

fn main() {
    let cli = Cli::parse();
    let threads = match &cli.command {
        Command::Run(args) => args.load.threads,
        Command::Compare(args) => args.load.threads,
        Command::NullServer { .. } => 0,
    };
    // One client thread runs everything on the main thread: no wake-ups across threads, which
    // on 2 cores cost the client more than the requests themselves.
    let mut builder = if threads == 1 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if threads > 1 {
        builder.worker_threads(threads.min(64));
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => fail(&format!("cannot start the runtime: {e}")),
    };
    let outcome = match cli.command {
        Command::NullServer { listen } => runtime.block_on(null_server::serve(listen)),
        Command::Run(args) => runtime.block_on(run_command(args)),
        Command::Compare(args) => runtime.block_on(compare_command(args)),
    };
    if let Err(e) = outcome {
        fail(&e);
    }
}

fn fail(message: &str) -> ! {
    eprintln!("apex-loadtest: {message}");
    std::process::exit(1);
}

fn new_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    nanos ^ (u64::from(std::process::id()) << 40)
}

fn workload(load: &LoadArgs, customers: Vec<Customer>, seed: u64) -> Result<Workload, String> {
    let workload = Workload {
        customers,
        mode: load.mode,
        batch_size: load.batch_size,
        batch_share: load.batch_share,
        batch_format: load.batch_format,
        mix: parse_mix(&load.mix)?,
        seed,
        start_ms: chrono_now_ms(),
    };
    workload.validate()?;
    Ok(workload)
}

fn chrono_now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

async fn customers_for(load: &LoadArgs, seed: u64) -> Result<Vec<Customer>, String> {
    let apexctl = load
        .apexctl
        .clone()
        .unwrap_or_else(customers::default_apexctl);
    let customers = customers::load_or_create(
        load.keys_file.as_deref(),
        load.customers,
        &apexctl,
        &format!("{seed:016x}"),
        load.save_keys.as_deref(),
    )?;
    if load.customers.is_some() {
        // New keys reach a running server's key cache by LISTEN/NOTIFY within a second.
        tokio::time::sleep(Duration::from_millis(1500)).await;
    }
    Ok(customers)
}

fn mode_name(mode: Mode) -> &'static str {
    match mode {
        Mode::Track => "track",
        Mode::Batch => "batch",
        Mode::Mixed => "mixed",
    }
}

async fn run_command(args: RunArgs) -> Result<(), String> {
    let target = Target::parse(&args.load.target)?;
    let bounds = Bounds::new(args.duration, args.requests)?;
    let seed = args.load.seed.unwrap_or_else(new_seed);
    let customers = customers_for(&args.load, seed).await?;
    let workload = Arc::new(workload(&args.load, customers, seed)?);
    let stores = if args.verify {
        Some(verify::Stores::from_env().await?)
    } else {
        None
    };
    let before = match &stores {
        Some(stores) => {
            // Earlier load still in flight would otherwise count toward this run.
            verify::wait_drained(&target, args.verify_timeout).await?;
            Some(stores.totals(&workload.customers).await?)
        }
        None => None,
    };
    let pacing = if args.closed {
        Pacing::Closed
    } else {
        Pacing::Open { rate: args.rate }
    };
    let label = args
        .label
        .clone()
        .unwrap_or_else(|| format!("apex-loadtest {}", mode_name(args.load.mode)));
    let config = args
        .load
        .run_config(&target, pacing, bounds, args.watch_pid, label.clone());
    let result = runner::run(config, workload.clone()).await?;
    let mut report = Report::new(
        Describe {
            label,
            target: args.load.target.clone(),
            mode: mode_name(args.load.mode).into(),
            target_rate: match pacing {
                Pacing::Open { rate } => Some(rate),
                Pacing::Closed => None,
            },
            connections: args.load.connections,
        },
        &result,
    );
    if let (Some(stores), Some(before)) = (&stores, &before) {
        let verdict = if result.records.accepted == 0 {
            // Equal totals prove nothing when nothing was accepted (wrong keys, a server
            // refusing everything).
            verify::Verdict::failed(
                "the server accepted no records, so there is nothing to verify".into(),
            )
        } else {
            verify::verify(
                stores,
                &target,
                &workload.customers,
                &result.ledger,
                before,
                args.verify_timeout,
            )
            .await
            .unwrap_or_else(verify::Verdict::failed)
        };
        report.verify = Some(verdict);
    }
    print!("{}", report.text());
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    if let Some(path) = &args.html {
        std::fs::write(path, report.html())
            .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    match &report.verify {
        Some(verdict) if !verdict.passed => Err("verification failed".into()),
        _ => Ok(()),
    }
}

/// A child process killed when dropped.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Starts `apex-loadtest null-server` on a free loopback port and returns it and its URL.
fn spawn_null_server() -> Result<(ChildGuard, String), String> {
    use std::io::{BufRead, BufReader};
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut child = std::process::Command::new(exe)
        .args(["null-server", "--listen", "127.0.0.1:0"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot start null-server: {e}"))?;
    let stderr = child.stderr.take().ok_or("null-server has no stderr")?;
    let guard = ChildGuard(child);
    let mut line = String::new();
    BufReader::new(stderr)
        .read_line(&mut line)
        .map_err(|e| e.to_string())?;
    let addr = line
        .trim()
        .strip_prefix("null-server listening on ")
        .ok_or_else(|| format!("null-server said {line:?}"))?;
    Ok((guard, format!("http://{addr}")))
}

#[derive(Serialize)]
struct CompareRun {
    server: &'static str,
    round: usize,
    request_rate: f64,
    success_rate: f64,
    p50_us: u64,
    p99_us: u64,
    non_2xx: u64,
}

#[derive(Serialize)]
struct CompareSummary {
    connections: usize,
    duration_s: f64,
    rounds: usize,
    cores: usize,
    null_median_rate: f64,
    apex_median_rate: f64,
    ratio: f64,
    half_load_rate: Option<f64>,
    half_load_p99_us: Vec<u64>,
    half_load_median_p99_us: Option<u64>,
    runs: Vec<CompareRun>,
}

async fn compare_command(args: CompareArgs) -> Result<(), String> {
    if args.rounds == 0 || args.rounds > 100 {
        return Err("--rounds must be 1 to 100".into());
    }
    let apex = Target::parse(&args.load.target)?;
    let (_null_process, null_url) = match &args.null {
        Some(url) => (None, url.clone()),
        None => {
            let (guard, url) = spawn_null_server()?;
            (Some(guard), url)
        }
    };
    let null = Target::parse(&null_url)?;
    let seed = args.load.seed.unwrap_or_else(new_seed);
    let customers = customers_for(&args.load, seed).await?;
    let bounds = Bounds::new(Some(args.duration), None)?;
    let mut runs = Vec::new();
    let mut index = 0u64;
    let mut one_run = |target: &Target, pacing: Pacing, label: String| {
        index += 1;
        let config = args.load.run_config(target, pacing, bounds, None, label);
        // Every run gets fresh event ids: apex-server would answer repeats as duplicates.
        let workload = workload(&args.load, customers.clone(), seed.wrapping_add(index));
        async move { runner::run(config, Arc::new(workload?)).await }
    };
    let summarize = |server: &'static str, round: usize, r: &RunResult| {
        let p = r.stats.total.percentiles();
        let line = CompareRun {
            server,
            round,
            request_rate: r.request_rate(),
            success_rate: r.success_rate(),
            p50_us: p.p50_us,
            p99_us: p.p99_us,
            non_2xx: r.stats.total.requests() - r.stats.total.successes(),
        };
        println!(
            "{:<12} round {round}: {:>10.0} req/s  p50 {:.2} ms  p99 {:.2} ms  non-2xx {}",
            server,
            line.request_rate,
            line.p50_us as f64 / 1000.0,
            line.p99_us as f64 / 1000.0,
            line.non_2xx
        );
        line
    };
    for round in 1..=args.rounds {
        let r = one_run(&null, Pacing::Closed, format!("null-server {round}")).await?;
        runs.push(summarize("null-server", round, &r));
        let r = one_run(&apex, Pacing::Closed, format!("apex-server {round}")).await?;
        runs.push(summarize("apex-server", round, &r));
    }
    let rates = |server: &str| -> Vec<f64> {
        runs.iter()
            .filter(|r| r.server == server)
            // Only 2xx answers count for apex-server: a fast error is not throughput.
            .map(|r| {
                if server == "apex-server" {
                    r.success_rate
                } else {
                    r.request_rate
                }
            })
            .collect()
    };
    let null_median = median(&rates("null-server"));
    let apex_median = median(&rates("apex-server"));
    let ratio = apex_median / null_median.max(1e-9);
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    println!(
        "-- medians of {} rounds, {:.0} s each, {} connections, {} client threads, {cores} cores",
        args.rounds,
        args.duration.as_secs_f64(),
        args.load.connections,
        args.load.threads
    );
    println!("null-server  {null_median:>10.0} req/s");
    println!("apex-server  {apex_median:>10.0} req/s (2xx)");
    println!("ratio apex/null: {ratio:.2}");
    let mut half_load_p99 = Vec::new();
    let half_rate = (!args.no_half_load && apex_median > 0.0).then_some(apex_median / 2.0);
    if let Some(rate) = half_rate {
        for round in 1..=args.rounds {
            let r = one_run(
                &apex,
                Pacing::Open { rate },
                format!("apex-server half load {round}"),
            )
            .await?;
            let line = summarize("half-load", round, &r);
            half_load_p99.push(line.p99_us);
            runs.push(line);
        }
        let p99s: Vec<f64> = half_load_p99.iter().map(|&p| p as f64).collect();
        println!(
            "apex-server at half load ({rate:.0} req/s, open loop, latency from the intended send time): median p99 {:.2} ms",
            median(&p99s) / 1000.0
        );
    }
    let summary = CompareSummary {
        connections: args.load.connections,
        duration_s: args.duration.as_secs_f64(),
        rounds: args.rounds,
        cores,
        null_median_rate: null_median,
        apex_median_rate: apex_median,
        ratio,
        half_load_rate: half_rate,
        half_load_median_p99_us: (!half_load_p99.is_empty()).then(|| {
            let p99s: Vec<f64> = half_load_p99.iter().map(|&p| p as f64).collect();
            median(&p99s) as u64
        }),
        half_load_p99_us: half_load_p99,
        runs,
    };
    if let Some(path) = &args.json {
        let json = serde_json::to_string_pretty(&summary).map_err(|e| e.to_string())?;
        std::fs::write(path, json).map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_in_the_usual_units() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("30").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
        assert!(parse_duration("").is_err());
        assert!(parse_duration("10 parsecs").is_err());
        assert!(parse_duration("-1s").is_err());
        assert!(parse_duration("99999999h").is_err());
    }
}
