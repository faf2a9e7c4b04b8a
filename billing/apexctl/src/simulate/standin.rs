//! The Stripe stand-in of the simulation, on the simulated clock, and the endpoint its
//! webhooks reach.
//!
//! The stand-in is the tests' (`scripts/stripe-standin.py`: localstripe plus the marked test
//! double), compiled in and started as `apex_stripe::testing::StripeStandIn` starts it, with
//! one difference: a short prelude points Python's `time.time` at the simulated clock (an
//! offset the simulation sets at every step through `POST /_config/sim/clock`). Stripe stamps
//! everything with its own clock (an event's `created` is dunning's Day 0, a meter event must
//! lie within its last 35 days, a subscription's period starts at its creation), so a month
//! simulated on our side only would be refused or misdated on Stripe's. This is the role of
//! Stripe's test clocks, which localstripe lacks. `StripeStandIn` itself is not used: it
//! cannot take the prelude, and it lives behind the `test-support` feature, which the
//! binary's normal build should not carry.
//!
//! Webhooks reach [`WebhookEndpoint`], a minimal local endpoint doing what the edge's
//! `POST /webhooks/stripe` does (`ingest/src/webhook.rs`): `apex_billing::webhooks::verify`
//! over the raw body, `parse_event`, then `apex_billing::webhooks::handle` in the simulation's
//! database. (The edge itself is not linked: the CLI would pull in the whole server for one
//! route, and its router checks signatures against the wall clock.)

use std::convert::Infallible;
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use anyhow::{Context, bail};
use apex_billing::dunning::Policy;
use apex_billing::webhooks;
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http_body_util::{BodyExt, Full};
use hyper::service::service_fn;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use sqlx::PgPool;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// `scripts/stripe-standin.py`, compiled in (as `apex_stripe::testing` does: the build folder
/// is shared between clones, so no path is read at run time).
const STANDIN_SCRIPT: &str = include_str!("../../../../scripts/stripe-standin.py");

/// Runs before the script (which arrives on stdin): Python's wall clock becomes the simulated
/// one, settable through `POST /_config/sim/clock {"now": <unix seconds>}`. asyncio and
/// aiohttp time out on `time.monotonic`, which stays real.
const CLOCK_PRELUDE: &str = r#"
import sys, time
_real_time = time.time
_offset = [0.0]
time.time = lambda: _real_time() + _offset[0]
from aiohttp import web
from localstripe.server import app
async def _set_clock(request):
    body = await request.json()
    _offset[0] = float(body["now"]) - _real_time()
    return web.json_response({"now": time.time()})
app.router.add_post("/_config/sim/clock", _set_clock)
exec(compile(sys.stdin.read(), "stripe-standin.py", "exec"), {"__name__": "__main__"})
"#;

/// The key the simulation's Stripe client sends (the stand-in takes any key).
pub(crate) const SIM_KEY: &str = "sk_test_apex_simulation";

/// The invoice events the endpoint takes: those our invoice mirror follows (which include
/// dunning's). localstripe's own subscription events are not asked for: their delivery
/// races the steps of the simulation, and no step waits for them.
const INVOICE_EVENTS: [&str; 6] = apex_billing::invoices::mirror::EVENT_TYPES;

/// How long the stand-in has to print its address after start.
const START_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// How long one test-control call may take (a hung stand-in must not hang the run).
const CALL_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A child process killed (and reaped) when dropped, so an early return or a panic between
/// its spawn and its owner's construction does not leave it running.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The last lines a child wrote on stderr, for the error that says why it stopped.
#[derive(Clone, Default)]
struct StderrTail(Arc<std::sync::Mutex<std::collections::VecDeque<String>>>);

impl StderrTail {
    const LINES: usize = 20;

    /// Reads `stderr` to its end on a thread of its own, keeping the last lines.
    fn follow(stderr: std::process::ChildStderr) -> Self {
        let tail = Self::default();
        let keep = tail.clone();
        std::thread::spawn(move || {
            for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
                let Ok(line) = line else { break };
                let mut lines = keep.0.lock().unwrap_or_else(|e| e.into_inner());
                if lines.len() == Self::LINES {
                    lines.pop_front();
                }
                lines.push_back(line);
            }
        });
        tail
    }

    fn text(&self) -> String {
        let lines = self.0.lock().unwrap_or_else(|e| e.into_inner());
        lines.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}

/// The running stand-in; killed on drop.
pub(crate) struct StandIn {
    _child: KillOnDrop,
    port: u16,
}

impl StandIn {
    /// Starts it with the Python of `APEX_STRIPE_STANDIN_PYTHON` (default: where
    /// `scripts/stack.sh up` installs it).
    pub(crate) async fn start() -> anyhow::Result<Self> {
        let python = std::env::var("APEX_STRIPE_STANDIN_PYTHON")
            .unwrap_or_else(|_| "/var/cache/apex/tools/localstripe-1.15.10/bin/python".to_owned());
        if !std::path::Path::new(&python).exists() {
            bail!(
                "the Stripe stand-in's Python ({python}) is missing: run scripts/stack.sh up, \
                 which installs it, or set APEX_STRIPE_STANDIN_PYTHON"
            );
        }
        // Started and read on a blocking thread: the script prints its address once it
        // listens, a second or so after start. The child is killed on any early return.
        let (child, port) =
            tokio::task::spawn_blocking(move || -> anyhow::Result<(KillOnDrop, u16)> {
                let mut child = KillOnDrop(
                    Command::new(&python)
                        .args(["-c", CLOCK_PRELUDE, "--port", "0"])
                        .stdin(Stdio::piped())
                        .stdout(Stdio::piped())
                        .stderr(Stdio::piped())
                        .spawn()
                        .with_context(|| {
                            format!("cannot start the Stripe stand-in with {python}")
                        })?,
                );
                let tail =
                    StderrTail::follow(child.0.stderr.take().context("the stand-in's stderr")?);
                let mut stdin = child.0.stdin.take().context("the stand-in's stdin")?;
                std::io::Write::write_all(&mut stdin, STANDIN_SCRIPT.as_bytes())
                    .context("cannot hand the stand-in its script")?;
                drop(stdin);
                let stdout = child.0.stdout.take().context("the stand-in's stdout")?;
                // The first line, read on a thread of its own: a stand-in that never prints
                // must not hang the run (the thread ends when the child is killed).
                let (sender, first) = std::sync::mpsc::channel();
                std::thread::spawn(move || {
                    let mut line = String::new();
                    let read = std::io::BufRead::read_line(
                        &mut std::io::BufReader::new(stdout),
                        &mut line,
                    );
                    let _ = sender.send(read.map(|_| line));
                });
                let line = match first.recv_timeout(START_DEADLINE) {
                    Ok(Ok(line)) => line,
                    Ok(Err(e)) => bail!(
                        "cannot read the Stripe stand-in's address: {e}; its stderr:\n{}",
                        tail.text()
                    ),
                    Err(_) => bail!(
                        "the Stripe stand-in printed no address within {} s; its stderr:\n{}",
                        START_DEADLINE.as_secs(),
                        tail.text()
                    ),
                };
                let port = line.trim().rsplit(':').next().and_then(|p| p.parse().ok());
                match port {
                    Some(port) => Ok((child, port)),
                    None => {
                        drop(child);
                        bail!(
                            "the Stripe stand-in did not start (it printed {line:?}); its \
                             stderr:\n{}",
                            tail.text()
                        )
                    }
                }
            })
            .await??;
        Ok(Self {
            _child: child,
            port,
        })
    }

    /// Its base URL (the simulation's `STRIPE_API_BASE`).
    pub(crate) fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Sets Stripe's clock to `now`.
    pub(crate) async fn set_clock(&self, now: DateTime<Utc>) -> anyhow::Result<()> {
        let seconds = now.timestamp_micros() as f64 / 1e6;
        self.call(
            "POST",
            "/_config/sim/clock",
            &serde_json::json!({ "now": seconds }),
        )
        .await
        .map(drop)
    }

    /// Has the stand-in sign its invoice events with `secret` and send them to `url`.
    pub(crate) async fn deliver_webhooks_to(&self, url: &str, secret: &str) -> anyhow::Result<()> {
        let config = serde_json::json!({"url": url, "secret": secret, "events": INVOICE_EVENTS});
        self.call("POST", "/_config/webhooks/apex", &config)
            .await
            .map(drop)
    }

    /// The customer's default card now succeeds (`None`) or is declined with `decline`.
    pub(crate) async fn set_card(
        &self,
        stripe_customer: &str,
        decline: Option<&str>,
    ) -> anyhow::Result<()> {
        let body = match decline {
            None => serde_json::json!({"outcome": "succeed"}),
            Some(code) => serde_json::json!({"outcome": "decline", "decline_code": code}),
        };
        self.call(
            "POST",
            &format!("/_config/test/customers/{stripe_customer}/card"),
            &body,
        )
        .await
        .map(drop)
    }

    /// A payment attempt of Stripe's own on an open invoice (its automatic collection, or the
    /// customer paying on the hosted page): `succeed` pays it, else it fails. Sends the
    /// invoice's payment events.
    pub(crate) async fn collect(&self, invoice: &str, succeed: bool) -> anyhow::Result<()> {
        let action = if succeed { "pay" } else { "fail_payment" };
        self.call(
            "POST",
            &format!("/_config/test/invoices/{invoice}/{action}"),
            &serde_json::json!({}),
        )
        .await
        .map(drop)
    }

    /// Waits until every invoice event made so far was delivered; an event our endpoint did
    /// not take is an error (the simulation would go on with state Stripe and we disagree on).
    pub(crate) async fn settle_webhooks(&self) -> anyhow::Result<()> {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        while std::time::Instant::now() < deadline {
            let sent = self.call("GET", "/_config/test/webhooks_sent", &()).await?;
            let events = sent["data"].as_array().with_context(|| {
                format!("the stand-in's list of webhooks sent has no data array: {sent}")
            })?;
            if let Some(failed) = events.iter().find(|e| e["delivery"] == "failed") {
                bail!("a Stripe webhook was refused by our endpoint: {failed}");
            }
            if events.iter().all(|e| e["delivery"] != "pending") {
                return Ok(());
            }
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
        bail!("Stripe's webhooks were not delivered within 30 s")
    }

    /// One HTTP/1.1 request to the stand-in's test controls (plain HTTP on loopback, one
    /// connection each; the Stripe API itself goes through `apex_stripe::client`).
    async fn call(
        &self,
        method: &str,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<serde_json::Value> {
        let body = if method == "GET" {
            String::new()
        } else {
            serde_json::to_string(body)?
        };
        tokio::time::timeout(CALL_DEADLINE, self.exchange(method, path, body))
            .await
            .with_context(|| {
                format!(
                    "the Stripe stand-in did not answer {method} {path} within {} s",
                    CALL_DEADLINE.as_secs()
                )
            })?
    }

    async fn exchange(
        &self,
        method: &str,
        path: &str,
        body: String,
    ) -> anyhow::Result<serde_json::Value> {
        let mut stream = TcpStream::connect(("127.0.0.1", self.port))
            .await
            .context("the Stripe stand-in is down")?;
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {SIM_KEY}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        );
        stream.write_all(request.as_bytes()).await?;
        let mut answer = Vec::new();
        stream.read_to_end(&mut answer).await?;
        let answer = String::from_utf8_lossy(&answer);
        let (head, body) = answer
            .split_once("\r\n\r\n")
            .context("the stand-in's answer is not HTTP")?;
        if !head.starts_with("HTTP/1.1 2") {
            bail!("the Stripe stand-in refused {method} {path}: {head}: {body}");
        }
        // Some controls answer with no body (localstripe's webhook configuration).
        if body.trim().is_empty() {
            return Ok(serde_json::Value::Null);
        }
        serde_json::from_str(body).with_context(|| {
            format!("the Stripe stand-in's answer to {method} {path} is not JSON: {body}")
        })
    }
}

/// The simulation's `POST /webhooks/stripe`: verified as the edge verifies, handled by
/// `apex_billing::webhooks::handle` in the simulation's database.
pub(crate) struct WebhookEndpoint {
    /// Where it listens.
    pub(crate) addr: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

/// What each request needs.
struct Receiver {
    pool: PgPool,
    policy: Policy,
    secret: String,
    /// The simulated time, unix seconds: signatures are checked against it, as the edge
    /// checks them against its (wall) clock.
    now: Arc<AtomicI64>,
}

impl WebhookEndpoint {
    /// Listens on a free loopback port.
    pub(crate) async fn start(
        pool: PgPool,
        policy: Policy,
        secret: String,
        now: Arc<AtomicI64>,
    ) -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let receiver = Arc::new(Receiver {
            pool,
            policy,
            secret,
            now,
        });
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let receiver = receiver.clone();
                tokio::spawn(async move {
                    let service = service_fn(move |request| {
                        let receiver = receiver.clone();
                        async move { Ok::<_, Infallible>(receiver.receive(request).await) }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Ok(Self { addr, task })
    }

    /// Its URL.
    pub(crate) fn url(&self) -> String {
        format!("http://{}/webhooks/stripe", self.addr)
    }
}

impl Drop for WebhookEndpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Receiver {
    async fn receive(&self, request: Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
        let (status, body) = match self.apply(request).await {
            Ok(()) => (StatusCode::OK, "{\"received\":true}".to_owned()),
            Err((status, message)) => (status, serde_json::json!({ "error": message }).to_string()),
        };
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        response
    }

    async fn apply(
        &self,
        request: Request<hyper::body::Incoming>,
    ) -> Result<(), (StatusCode, String)> {
        let bad = |m: String| (StatusCode::BAD_REQUEST, m);
        let (parts, body) = request.into_parts();
        let header = parts
            .headers
            .get("stripe-signature")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let payload = body
            .collect()
            .await
            .map_err(|e| bad(e.to_string()))?
            .to_bytes();
        webhooks::verify(
            header.as_deref(),
            &payload,
            &[self.secret.as_str()],
            self.now.load(Ordering::SeqCst),
        )
        .map_err(|e| bad(e.to_string()))?;
        let event = webhooks::parse_event(&payload)
            .ok_or_else(|| bad("the body is not a Stripe event".to_owned()))?;
        // Handled at the simulated time (the step's), so dunning dates its emails and steps on
        // the simulation's clock, as the edge does on the wall clock.
        let now = chrono::DateTime::from_timestamp(self.now.load(Ordering::SeqCst), 0)
            .ok_or_else(|| bad("the simulated clock is out of range".to_owned()))?;
        let unavailable = |e: String| (StatusCode::SERVICE_UNAVAILABLE, e);
        let mut conn = self
            .pool
            .acquire()
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        webhooks::handle(&mut conn, &self.policy, &event, now)
            .await
            .map_err(|e| unavailable(e.to_string()))?;
        Ok(())
    }
}
