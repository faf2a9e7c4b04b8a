//! Support of the cron process's tests: real `apex-cron` processes on the test's own
//! databases and a shared simulated clock, and readers of `cron_runs`.

#![allow(dead_code, unreachable_pub)]

use std::collections::BTreeMap;
use std::net::TcpListener;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use apex_core::testing::TestStores;
use chrono::{DateTime, Utc};

/// Unix seconds now, with fractions.
pub fn wall() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

pub fn at(text: &str) -> DateTime<Utc> {
    text.parse().expect("an RFC 3339 time")
}

/// A simulated clock shared by every process of a test: `start` at wall time `epoch`,
/// `speed` simulated seconds per real second.
#[derive(Debug, Clone, Copy)]
pub struct SimClock {
    pub start: DateTime<Utc>,
    pub speed: f64,
    pub epoch: f64,
}

impl SimClock {
    /// A clock that reads `start` one second from now (so a process started now begins a
    /// second's worth of simulated time before `start`).
    pub fn starting(start: DateTime<Utc>, speed: f64) -> Self {
        Self::starting_in(start, speed, 1.0)
    }

    /// A clock that reads `start` `lead` real seconds from now: a process started now has
    /// that long to come up (connect, migrate) before the slots the test counts, however
    /// loaded the machine.
    pub fn starting_in(start: DateTime<Utc>, speed: f64, lead: f64) -> Self {
        Self {
            start,
            speed,
            epoch: wall() + lead,
        }
    }

    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("APEX_CLOCK_START".into(), self.start.to_rfc3339()),
            ("APEX_CLOCK_SPEED".into(), self.speed.to_string()),
            ("APEX_CLOCK_EPOCH".into(), format!("{:.6}", self.epoch)),
        ]
    }

    pub fn now(&self) -> DateTime<Utc> {
        let simulated = (wall() - self.epoch) * self.speed;
        self.start + chrono::Duration::microseconds((simulated * 1e6) as i64)
    }

    /// Sleeps (real time) until the simulated clock reads `at`.
    pub async fn sleep_until(&self, at: DateTime<Utc>) {
        loop {
            let now = self.now();
            if now >= at {
                return;
            }
            let seconds = (at - now).num_milliseconds() as f64 / 1e3 / self.speed;
            tokio::time::sleep(Duration::from_secs_f64(seconds.clamp(0.001, 1.0))).await;
        }
    }
}

/// A free loopback port (bound and released; the process binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The environment of an `apex-cron` (or `apexctl`) on the test's databases, with nothing
/// from the test's own environment that could change what it does.
pub fn base_env(stores: &TestStores) -> Vec<(String, String)> {
    vec![
        ("DATABASE_URL".into(), stores.config.database_url.clone()),
        (
            "CLICKHOUSE_URL".into(),
            stores.config.clickhouse_url.clone(),
        ),
        (
            "CLICKHOUSE_DATABASE".into(),
            stores.config.clickhouse_database.clone(),
        ),
        ("APEX_LOG".into(), "warn".into()),
        ("APEX_CRON_SHUTDOWN_GRACE_MS".into(), "10000".into()),
        // The email queue runs every minute: its files go to the test's own folder.
        ("EMAIL_PROVIDER".into(), "file".into()),
        (
            "EMAIL_FILE_DIR".into(),
            std::env::temp_dir()
                .join(format!("{}_mail", stores.name))
                .display()
                .to_string(),
        ),
    ]
}

/// A running `apex-cron`; killed on drop.
pub struct CronProcess {
    child: Child,
    pub port: u16,
}

impl CronProcess {
    /// Starts `apex-cron` with `env` (on top of the test's databases) on a free port.
    pub fn start(stores: &TestStores, env: &[(String, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(env!("CARGO_BIN_EXE_apex-cron"));
        command
            .env_clear()
            .envs(base_env(stores))
            .env("APEX_CRON_LISTEN", format!("127.0.0.1:{port}"))
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = command.spawn().expect("apex-cron starts");
        Self { child, port }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        self.child.wait().unwrap()
    }

    /// `kill -9`: no shutdown, no clean-up.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GETs `path` from the process's port: (status, body).
    pub fn get(&self, path: &str) -> Option<(u16, String)> {
        use std::io::{Read, Write};
        let mut stream = std::net::TcpStream::connect(("127.0.0.1", self.port)).ok()?;
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
        )
        .ok()?;
        let mut answer = String::new();
        stream.read_to_string(&mut answer).ok()?;
        let (head, body) = answer.split_once("\r\n\r\n")?;
        Some((head.get(9..12)?.parse().ok()?, body.to_owned()))
    }

    /// Waits (up to 30 s) until `/healthz` answers.
    pub async fn wait_healthy(&self) {
        for _ in 0..300 {
            if self
                .get("/healthz")
                .is_some_and(|(status, _)| status == 200)
            {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("apex-cron did not become healthy");
    }
}

impl Drop for CronProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `apex-cron` with `env` to its exit (a configuration that stops it at start).
pub fn run_to_exit(stores: &TestStores, env: &[(&str, &str)]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_apex-cron"))
        .env_clear()
        .envs(base_env(stores))
        .env("APEX_CRON_LISTEN", format!("127.0.0.1:{}", free_port()))
        .envs(env.iter().copied())
        .output()
        .expect("apex-cron runs")
}

/// One row of `cron_runs`.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Row {
    pub job_name: String,
    pub scheduled_for: DateTime<Utc>,
    pub status: String,
    pub attempts: i32,
    pub error_message: Option<String>,
    pub details: serde_json::Value,
}

/// The rows of `job` with slots in `[from, to)`, by slot.
pub async fn rows(
    stores: &TestStores,
    job: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
) -> Vec<Row> {
    sqlx::query_as(
        "SELECT job_name, scheduled_for, status, attempts, error_message, details FROM cron_runs \
         WHERE job_name = $1 AND scheduled_for >= $2 AND scheduled_for < $3 ORDER BY scheduled_for",
    )
    .bind(job)
    .bind(from)
    .bind(to)
    .fetch_all(&stores.pool)
    .await
    .unwrap()
}

/// The rows of `job` with slots in `[from, to)` once `done` holds of them (polled every
/// 100 ms real time, for up to a minute; the test fails with the last rows seen after that).
pub async fn rows_once(
    stores: &TestStores,
    job: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    done: impl Fn(&[Row]) -> bool,
) -> Vec<Row> {
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let found = rows(stores, job, from, to).await;
        if done(&found) {
            return found;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{job}: the rows never got there: {found:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Waits until `job` has at least `expected` rows with slots in `[from, to)` and none of them
/// is running: a process's own counts of runs can be read then (a run that comes a moment
/// before the test looks is still going on a loaded machine).
pub async fn settled(
    stores: &TestStores,
    job: &str,
    from: DateTime<Utc>,
    to: DateTime<Utc>,
    expected: usize,
) {
    rows_once(stores, job, from, to, |found| {
        found.len() >= expected && found.iter().all(|r| r.status != "running")
    })
    .await;
}

/// Statuses of `rows`, counted.
pub fn statuses(rows: &[Row]) -> BTreeMap<String, usize> {
    let mut counted = BTreeMap::new();
    for row in rows {
        *counted.entry(row.status.clone()).or_insert(0) += 1;
    }
    counted
}

/// The slots every `step` from `from` (included) to `to` (excluded).
pub fn slots(from: DateTime<Utc>, to: DateTime<Utc>, step: chrono::Duration) -> Vec<DateTime<Utc>> {
    let mut out = Vec::new();
    let mut at = from;
    while at < to {
        out.push(at);
        at += step;
    }
    out
}

/// Asserts `rows` are exactly the `expected` slots, each once, all succeeded at their first
/// attempt (no runner died, nothing run once more).
pub fn assert_each_slot_once(job: &str, rows: &[Row], expected: &[DateTime<Utc>]) {
    let got: Vec<DateTime<Utc>> = rows.iter().map(|r| r.scheduled_for).collect();
    assert_eq!(got.len(), expected.len(), "{job}: {:?}", statuses(rows));
    assert_eq!(got, expected, "{job}: the slots");
    let not_ok: Vec<&Row> = rows
        .iter()
        .filter(|r| {
            r.status != "succeeded"
                || r.attempts != 1
                || r.details.get("previous_attempts").is_some()
        })
        .collect();
    assert!(not_ok.is_empty(), "{job}: {not_ok:?}");
}

/// The value of the series `series` (its name and labels, exactly as exposed) on a
/// `/metrics` page; 0 when absent.
pub fn series_value(page: &str, series: &str) -> f64 {
    page.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
        .unwrap_or(0.0)
}

/// How many runs of `job` this process saw succeed (`apex_cron_runs_total`): counted where
/// the job ran, independently of the rows.
pub fn succeeded_runs(page: &str, job: &str) -> u64 {
    series_value(
        page,
        &format!("apex_cron_runs_total{{job=\"{job}\",status=\"succeeded\"}}"),
    ) as u64
}

/// The `/metrics` pages of `processes` once, for every `(job, runs)` of `expected`, their
/// counts of succeeded runs add up to at least `runs` (polled every 50 ms for up to 10 s: a
/// run is counted a moment after its row records the end). The caller asserts the counts.
pub async fn pages_once(processes: &[&CronProcess], expected: &[(&str, u64)]) -> Vec<String> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let pages: Vec<String> = processes
            .iter()
            .map(|p| p.get("/metrics").expect("/metrics answers").1)
            .collect();
        let counted = |job: &str| pages.iter().map(|p| succeeded_runs(p, job)).sum::<u64>();
        if std::time::Instant::now() >= deadline
            || expected.iter().all(|&(job, runs)| counted(job) >= runs)
        {
            return pages;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
