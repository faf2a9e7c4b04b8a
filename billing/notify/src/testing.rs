//! Integration-test support (feature `test-support`): the stand-ins the provider tests, and
//! anything that sends email end to end, talk to.
//!
//! - [`SmtpStandIn`]: a real SMTP server, `aiosmtpd` (installed by `scripts/stack.sh up`),
//!   on a free loopback port, delivering into a Maildir that [`SmtpStandIn::messages`] reads.
//! - [`ResendStandIn`]: a TEST DOUBLE of Resend's `POST /emails` (a small hyper server,
//!   not Resend): records every request, answers like Resend (an id; the same
//!   `Idempotency-Key` again is the same id and one email), and fails on request.
//! - [`ParsedMessage`]: a MIME message decoded with `mail-parser`, for assertions.
//!
//! Both stand-ins stop when dropped.

use std::collections::{HashMap, VecDeque};
use std::convert::Infallible;
use std::io::{Read, Write};
use std::net::{Ipv4Addr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;

use crate::provider::resend::ResendSettings;
use crate::provider::smtp::SmtpSettings;

/// Where `scripts/stack.sh up` installs aiosmtpd, when `APEX_SMTP_STANDIN_PYTHON` is unset.
pub const DEFAULT_SMTP_PYTHON: &str = "/var/cache/apex/tools/aiosmtpd-1.4.6/bin/python";

/// The API key tests give the Resend stand-in (it takes any `re_` key).
pub const TEST_RESEND_KEY: &str = "re_test_apex_standin";

/// Tells apart the folders of stand-ins started at once by one test process.
static SEQUENCE: AtomicU64 = AtomicU64::new(0);

/// A fresh, empty folder under the system's temporary folder.
fn fresh_dir(what: &str) -> PathBuf {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "apex-{what}-{}-{}-{nanos}",
        std::process::id(),
        SEQUENCE.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("cannot create a temporary folder");
    dir
}

/// A temporary folder removed on drop, for tests of the file provider.
#[derive(Debug)]
pub struct TempDir(PathBuf);

impl TempDir {
    /// A new, empty folder.
    pub fn new() -> Self {
        Self(fresh_dir("mail"))
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Default for TempDir {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------
// SMTP

/// How an [`SmtpStandIn`] behaves beyond the defaults.
#[derive(Debug, Clone, Copy, Default)]
pub struct SmtpStandInOptions {
    /// Messages larger than this many bytes are refused with `552` (aiosmtpd `--size`;
    /// default 32 MiB).
    pub max_message_bytes: Option<usize>,
    /// Offer `SMTPUTF8` (aiosmtpd `--smtputf8`), so non-ASCII addresses are taken.
    pub smtputf8: bool,
}

/// A running aiosmtpd delivering into a Maildir; killed (and its folder removed) on drop.
pub struct SmtpStandIn {
    child: Child,
    port: u16,
    maildir: PathBuf,
}

impl SmtpStandIn {
    /// Starts aiosmtpd on a free loopback port and waits until it greets. Panics (never
    /// skips) when its Python is missing: run `scripts/stack.sh up`, which installs it.
    pub fn start() -> Self {
        Self::start_with(SmtpStandInOptions::default())
    }

    /// Like [`SmtpStandIn::start`], with `options`.
    pub fn start_with(options: SmtpStandInOptions) -> Self {
        let python = std::env::var("APEX_SMTP_STANDIN_PYTHON")
            .unwrap_or_else(|_| DEFAULT_SMTP_PYTHON.to_owned());
        assert!(
            Path::new(&python).exists(),
            "{python} is missing: run scripts/stack.sh up, which installs aiosmtpd (the SMTP stand-in)"
        );
        let maildir = fresh_dir("smtp");
        for sub in ["tmp", "new", "cur"] {
            std::fs::create_dir_all(maildir.join(sub)).expect("cannot create the Maildir");
        }
        // The port is found free by binding it, then handed over: another process may take it
        // in between, so a server that dies at once is started again on another port.
        for _ in 0..5 {
            let port = free_port();
            let mut child = Command::new(&python)
                .args(["-m", "aiosmtpd", "-n", "-l"])
                .arg(format!("127.0.0.1:{port}"))
                .args(
                    options
                        .max_message_bytes
                        .map(|size| vec!["-s".to_owned(), size.to_string()])
                        .unwrap_or_default(),
                )
                .args(options.smtputf8.then_some("-u"))
                .args(["-c", "aiosmtpd.handlers.Mailbox"])
                .arg(&maildir)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::inherit())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start aiosmtpd ({python}): {e}"));
            if wait_for_greeting(&mut child, port) {
                return Self {
                    child,
                    port,
                    maildir,
                };
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("aiosmtpd did not start: see its output above");
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `SMTP_URL` for it: plaintext (`tls=none`), as aiosmtpd offers no TLS here.
    pub fn smtp_url(&self) -> String {
        format!("smtp://127.0.0.1:{}?tls=none", self.port)
    }

    /// Settings of an SMTP provider sending to it (5 s timeouts).
    pub fn settings(&self) -> SmtpSettings {
        let mut settings = SmtpSettings::from_url(&self.smtp_url()).expect("a valid URL");
        settings.timeout = Duration::from_secs(5);
        settings
    }

    /// Every message it received, oldest first, decoded. aiosmtpd files a message before it
    /// answers `250` to `DATA`, so a message the provider saw accepted is here.
    pub fn messages(&self) -> Vec<ParsedMessage> {
        let mut files = Vec::new();
        for sub in ["new", "cur"] {
            for entry in std::fs::read_dir(self.maildir.join(sub)).expect("the Maildir") {
                let path = entry.expect("a Maildir entry").path();
                let modified = std::fs::metadata(&path)
                    .and_then(|m| m.modified())
                    .expect("a file's time");
                files.push((modified, path));
            }
        }
        files.sort();
        files
            .into_iter()
            .map(|(_, path)| {
                let bytes = std::fs::read(&path).expect("a delivered message");
                ParsedMessage::parse(&bytes)
                    .unwrap_or_else(|| panic!("{} is not a message", path.display()))
            })
            .collect()
    }
}

impl Drop for SmtpStandIn {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.maildir);
    }
}

/// A port nothing listens on right now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("cannot bind a loopback port")
        .port()
}

/// Waits up to 15 s for a `220` greeting on `port`; false when the server died first.
fn wait_for_greeting(child: &mut Child, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(15);
    while Instant::now() < deadline {
        if child.try_wait().ok().flatten().is_some() {
            return false;
        }
        if let Ok(mut stream) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
            let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
            let mut greeting = [0u8; 3];
            if stream.read_exact(&mut greeting).is_ok() && &greeting == b"220" {
                // A polite goodbye, so the server logs no broken connection.
                let _ = stream.write_all(b"QUIT\r\n");
                return true;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// A MIME message decoded for assertions. Line ends in `text` and `html` are `\n`.
#[derive(Debug, Clone)]
pub struct ParsedMessage {
    /// The decoded subject (RFC 2047 words resolved).
    pub subject: Option<String>,
    /// The address of `From`.
    pub from: Option<String>,
    /// The addresses of `To`.
    pub to: Vec<String>,
    /// `Message-ID` as written, angle brackets included.
    pub message_id: Option<String>,
    /// `List-Unsubscribe` as written.
    pub list_unsubscribe: Option<String>,
    /// `X-Apex-Email-Type`.
    pub email_type: Option<String>,
    /// The `text/plain` part, decoded.
    pub text: Option<String>,
    /// The `text/html` part, decoded.
    pub html: Option<String>,
    /// The `Content-Type` of the whole message (`multipart/alternative; boundary=...`).
    pub content_type: Option<String>,
    headers: Vec<(String, String)>,
}

impl ParsedMessage {
    /// Decodes `raw` (a whole message, headers and body); `None` when it has no headers.
    pub fn parse(raw: &[u8]) -> Option<Self> {
        let message = mail_parser::MessageParser::default().parse(raw)?;
        let headers: Vec<(String, String)> = message
            .headers_raw()
            .map(|(name, value)| (name.to_owned(), unfold(value)))
            .collect();
        if headers.is_empty() {
            return None;
        }
        let header = |name: &str| {
            headers
                .iter()
                .find(|(n, _)| n.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        let part_text = |html: bool| {
            message
                .parts
                .iter()
                .find(|p| p.is_text() && p.is_text_html() == html)
                .and_then(|p| p.text_contents())
                .map(|t| t.replace("\r\n", "\n"))
        };
        let addresses = |address: Option<&mail_parser::Address<'_>>| -> Vec<String> {
            address
                .map(|a| {
                    a.iter()
                        .filter_map(|addr| addr.address().map(str::to_owned))
                        .collect()
                })
                .unwrap_or_default()
        };
        Some(Self {
            subject: message.subject().map(str::to_owned),
            from: addresses(message.from()).into_iter().next(),
            to: addresses(message.to()),
            message_id: header("Message-ID"),
            list_unsubscribe: header("List-Unsubscribe"),
            email_type: header("X-Apex-Email-Type"),
            text: part_text(false),
            html: part_text(true),
            content_type: header("Content-Type"),
            headers,
        })
    }

    /// A top-level header as written (unfolded, trimmed); the first when repeated.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// A header value on one line: folds joined, ends trimmed.
fn unfold(value: &str) -> String {
    value
        .replace("\r\n", "\n")
        .split('\n')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------
// Resend

/// What the Resend stand-in answers to the next request instead of the usual.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    /// 429 `rate_limit_exceeded` with `Retry-After: <seconds>`.
    RateLimited {
        /// The `Retry-After` value, seconds.
        retry_after: u64,
    },
    /// 500 `application_error`.
    ServerError,
    /// 422 `validation_error` with this message.
    Invalid(String),
    /// The usual answer, after holding it this long (for timeouts).
    Slow(Duration),
}

/// One request the Resend stand-in received.
#[derive(Debug, Clone)]
pub struct ResendRequest {
    /// `POST`.
    pub method: String,
    /// `/emails`.
    pub path: String,
    /// `Authorization`, as sent.
    pub authorization: Option<String>,
    /// `Idempotency-Key`.
    pub idempotency_key: Option<String>,
    /// `Content-Type`.
    pub content_type: Option<String>,
    /// The body as JSON (`Null` when it was not JSON).
    pub body: serde_json::Value,
    /// The status it answered.
    pub status: u16,
}

#[derive(Default)]
struct ResendState {
    requests: Vec<ResendRequest>,
    faults: VecDeque<Fault>,
    /// Idempotency key → (email id, the body first sent with it).
    keys: HashMap<String, (String, serde_json::Value)>,
    /// Emails accepted (one per id).
    emails: Vec<(String, serde_json::Value)>,
}

/// TEST DOUBLE of Resend's `POST /emails` on a free loopback port (its own thread and tokio
/// runtime, so it outlives any test's runtime); stopped on drop.
///
/// Like Resend: `Authorization: Bearer re_...` is required (401 `missing_api_key` without
/// one, 403 `invalid_api_key` for another kind); `from`, `to` and `subject` are required
/// (422 `missing_required_field`); the answer is `{"id": "<uuid-like>"}`; an
/// `Idempotency-Key` seen before with the same body answers the same id and adds no email,
/// with a different body 409 `invalid_idempotent_request`. Unlike Resend it checks no
/// domain and has no rate limit of its own: [`ResendStandIn::fail_next`] plays those.
pub struct ResendStandIn {
    port: u16,
    state: Arc<Mutex<ResendState>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl ResendStandIn {
    /// Starts it.
    pub fn start() -> Self {
        let listener =
            TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("cannot bind a loopback port");
        let port = listener.local_addr().expect("a bound address").port();
        listener
            .set_nonblocking(true)
            .expect("a non-blocking listener");
        let state = Arc::new(Mutex::new(ResendState::default()));
        let (shutdown, mut stop) = tokio::sync::oneshot::channel::<()>();
        let shared = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("resend-standin".into())
            .spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .expect("a runtime for the Resend stand-in");
                runtime.block_on(async move {
                    let listener =
                        tokio::net::TcpListener::from_std(listener).expect("a tokio listener");
                    loop {
                        tokio::select! {
                            _ = &mut stop => break,
                            accepted = listener.accept() => {
                                let Ok((stream, _)) = accepted else { continue };
                                let state = Arc::clone(&shared);
                                tokio::spawn(async move {
                                    let service = hyper::service::service_fn(move |request| {
                                        answer(Arc::clone(&state), request)
                                    });
                                    let _ = hyper::server::conn::http1::Builder::new()
                                        .serve_connection(TokioIo::new(stream), service)
                                        .await;
                                });
                            }
                        }
                    }
                });
            })
            .expect("cannot start the Resend stand-in's thread");
        Self {
            port,
            state,
            shutdown: Some(shutdown),
            thread: Some(thread),
        }
    }

    /// `RESEND_BASE_URL` for it.
    pub fn base_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Settings of a provider sending to it: [`TEST_RESEND_KEY`], 100 requests a second (so
    /// tests do not wait on the limiter), a 5 s timeout.
    pub fn settings(&self) -> ResendSettings {
        ResendSettings {
            api_key: TEST_RESEND_KEY.to_owned(),
            base_url: self.base_url(),
            requests_per_second: 100.0,
            timeout: Duration::from_secs(5),
        }
    }

    /// Answers the next `count` requests with `fault`.
    pub fn fail_next(&self, count: usize, fault: Fault) {
        let mut state = self.lock();
        state.faults.extend(std::iter::repeat_n(fault, count));
    }

    /// Every request received, in order.
    pub fn requests(&self) -> Vec<ResendRequest> {
        self.lock().requests.clone()
    }

    /// The emails accepted, one per id (a repeated idempotency key adds none), as
    /// `(id, body)`.
    pub fn emails(&self) -> Vec<(String, serde_json::Value)> {
        self.lock().emails.clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ResendState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for ResendStandIn {
    fn drop(&mut self) {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Resend's error shape.
fn resend_error(status: u16, name: &str, message: &str) -> Response<Full<Bytes>> {
    json_response(
        status,
        &serde_json::json!({"statusCode": status, "name": name, "message": message}),
    )
}

fn json_response(status: u16, body: &serde_json::Value) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_string())))
        .expect("a valid response")
}

async fn answer(
    state: Arc<Mutex<ResendState>>,
    request: Request<Incoming>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let (parts, body) = request.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let mut record = ResendRequest {
        method: parts.method.to_string(),
        path: parts.uri.path().to_owned(),
        authorization: header("authorization"),
        idempotency_key: header("idempotency-key"),
        content_type: header("content-type"),
        body: serde_json::from_slice(&bytes).unwrap_or(serde_json::Value::Null),
        status: 0,
    };
    let fault = state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .faults
        .pop_front();
    if let Some(Fault::Slow(wait)) = &fault {
        tokio::time::sleep(*wait).await;
    }
    let response = match fault {
        Some(Fault::RateLimited { retry_after }) => {
            let mut response = resend_error(
                429,
                "rate_limit_exceeded",
                "Too many requests. You can only make 2 requests per second.",
            );
            response.headers_mut().insert(
                "retry-after",
                retry_after.to_string().parse().expect("a header value"),
            );
            response
        }
        Some(Fault::ServerError) => resend_error(500, "application_error", "Internal server error"),
        Some(Fault::Invalid(message)) => resend_error(422, "validation_error", &message),
        Some(Fault::Slow(_)) | None => {
            let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
            usual_answer(&mut state, &record)
        }
    };
    record.status = response.status().as_u16();
    state
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .requests
        .push(record);
    Ok(response)
}

/// What Resend answers a request that no fault intercepts.
fn usual_answer(state: &mut ResendState, request: &ResendRequest) -> Response<Full<Bytes>> {
    if request.path != "/emails" {
        return resend_error(404, "not_found", "The requested endpoint does not exist.");
    }
    if request.method != "POST" {
        return resend_error(405, "method_not_allowed", "Method is not allowed.");
    }
    let Some(auth) = &request.authorization else {
        return resend_error(
            401,
            "missing_api_key",
            "Missing API key in the authorization header.",
        );
    };
    if !auth.starts_with("Bearer re_") {
        return resend_error(403, "invalid_api_key", "API key is invalid.");
    }
    let body = &request.body;
    for field in ["from", "to", "subject"] {
        if body.get(field).is_none_or(|v| v.is_null()) {
            return resend_error(
                422,
                "missing_required_field",
                &format!("Missing `{field}` field."),
            );
        }
    }
    if let Some(key) = &request.idempotency_key {
        if key.is_empty() || key.len() > 256 {
            return resend_error(
                400,
                "invalid_idempotency_key",
                "The key must be between 1-256 chars.",
            );
        }
        if let Some((id, first)) = state.keys.get(key) {
            return if first == body {
                json_response(200, &serde_json::json!({ "id": id }))
            } else {
                resend_error(
                    409,
                    "invalid_idempotent_request",
                    "Same idempotency key used with a different request payload.",
                )
            };
        }
    }
    let n = state.emails.len() as u64 + 1;
    let id = format!("{:08x}-0000-4000-8000-{n:012x}", std::process::id());
    if let Some(key) = &request.idempotency_key {
        state.keys.insert(key.clone(), (id.clone(), body.clone()));
    }
    state.emails.push((id.clone(), body.clone()));
    json_response(200, &serde_json::json!({ "id": id }))
}
