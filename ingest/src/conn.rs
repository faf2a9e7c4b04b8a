//! One accepted connection: its first bytes are awaited (within the header timeout) before
//! hyper reads them, an HTTP/2 connection with no request open for the idle timeout is closed,
//! and every connection ends gracefully (in-flight requests answered) at shutdown.
//!
//! Why our own code around hyper: hyper-util's protocol detection waits for the first bytes
//! with no timeout, and hyper's HTTP/2 server has no idle timeout, so a client could hold
//! every one of the `APEX_MAX_CONNECTIONS` slots by connecting and sending nothing (or a
//! part of the HTTP/2 preface, or an HTTP/2 preface and then nothing), and the edge would
//! stop accepting. HTTP/1 is covered by hyper's header read timeout, which also closes a
//! keep-alive connection idle between requests.

use std::convert::Infallible;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use tokio::time::Instant;

use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use tokio::net::TcpStream;
use tokio::sync::watch;

use crate::routes;
use crate::state::AppState;

/// HTTP/2's connection preface (RFC 9113, section 3.4): what a client that speaks HTTP/2
/// with prior knowledge sends first. Anything else is served as HTTP/1.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// How soon a connection that sent only part of the HTTP/2 preface is looked at again
/// (`peek` answers at once while those bytes wait unread, so it cannot simply be awaited),
/// doubling up to [`PREFACE_POLL_MAX`]: a real client sends the preface in one write, so
/// this is for the odd split packet, and a client that stops part-way costs a few peeks.
const PREFACE_POLL_MIN: Duration = Duration::from_millis(2);
const PREFACE_POLL_MAX: Duration = Duration::from_millis(200);

/// The protocol a connection's first bytes start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// Anything but the HTTP/2 preface: hyper serves HTTP/1 (and answers garbage 400).
    Http1,
    /// The HTTP/2 preface.
    Http2,
}

/// Waits up to `timeout` for the first bytes of `stream`, without consuming them (hyper
/// reads them next): the protocol they start, or `None` when the peer closed, failed, or
/// sent nothing (or only a part of the HTTP/2 preface) in time.
pub async fn sniff(stream: &TcpStream, timeout: Duration) -> Option<Protocol> {
    let mut first = [0u8; H2_PREFACE.len()];
    let mut poll = PREFACE_POLL_MIN;
    let look = async {
        loop {
            let n = stream.peek(&mut first).await.ok()?;
            if n == 0 {
                return None;
            }
            if first[..n] != H2_PREFACE[..n] {
                return Some(Protocol::Http1);
            }
            if n == H2_PREFACE.len() {
                return Some(Protocol::Http2);
            }
            tokio::time::sleep(poll).await;
            poll = (poll * 2).min(PREFACE_POLL_MAX);
        }
    };
    tokio::time::timeout(timeout, look).await.ok().flatten()
}

/// The requests open on a connection, and when the last one ended: what its idle timer
/// reads. Shared by the connection's requests (each holds a [`RequestGuard`]).
#[derive(Debug)]
pub struct Activity {
    /// Requests whose answer is not yet complete.
    open: AtomicUsize,
    /// When the last request ended (or the connection started), in ms since `epoch`.
    last_ms: AtomicU64,
    epoch: Instant,
}

impl Activity {
    /// A connection's activity, idle from now.
    pub fn new() -> Arc<Self> {
        Arc::new(Self {
            open: AtomicUsize::new(0),
            last_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        })
    }

    fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// Counts a request open until the guard is dropped.
    pub fn begin(self: &Arc<Self>) -> RequestGuard {
        self.open.fetch_add(1, Ordering::SeqCst);
        RequestGuard(self.clone())
    }

    /// How long no request has been open; `None` while one is.
    fn idle_for(&self) -> Option<Duration> {
        if self.open.load(Ordering::SeqCst) > 0 {
            return None;
        }
        let since = self
            .now_ms()
            .saturating_sub(self.last_ms.load(Ordering::SeqCst));
        Some(Duration::from_millis(since))
    }

    /// Resolves once no request has been open for `timeout`.
    pub async fn idle(&self, timeout: Duration) {
        loop {
            let wait = match self.idle_for() {
                Some(idle) if idle >= timeout => return,
                Some(idle) => timeout - idle,
                None => timeout,
            };
            tokio::time::sleep(wait).await;
        }
    }
}

/// One open request of a connection ([`Activity::begin`]); ends it when dropped (the
/// handler returned its response, or the client cancelled the stream). The response body
/// is sent after that: this API's bodies are small and sent whole, so a connection idle for
/// the timeout has nothing left to send.
#[derive(Debug)]
pub struct RequestGuard(Arc<Activity>);

impl Drop for RequestGuard {
    fn drop(&mut self) {
        // The end first, then the count: a timer that sees no request open sees this end.
        self.0.last_ms.fetch_max(self.0.now_ms(), Ordering::SeqCst);
        self.0.open.fetch_sub(1, Ordering::SeqCst);
    }
}

/// The timeouts a connection is served with.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    /// For the first bytes (and, by hyper, for each HTTP/1 request's headers).
    pub first_bytes: Duration,
    /// For an HTTP/2 connection with no request open.
    pub idle: Duration,
}

/// Serves `stream` until it ends, the client idles past the timeouts, or `stop` turns true
/// (then the connection ends gracefully: requests in flight are answered, HTTP/2 gets a
/// GOAWAY).
pub async fn serve(
    stream: TcpStream,
    builder: Arc<auto::Builder<TokioExecutor>>,
    state: Arc<AppState>,
    timeouts: Timeouts,
    mut stop: watch::Receiver<bool>,
) {
    // A connection that has sent nothing yet has no request to finish: a shutdown closes it.
    let sniffed = tokio::select! {
        sniffed = sniff(&stream, timeouts.first_bytes) => sniffed,
        _ = stop.wait_for(|stop| *stop) => return,
    };
    let Some(protocol) = sniffed else {
        tracing::debug!("connection closed: nothing (or a part of a preface) sent in time");
        return;
    };
    // Only HTTP/2 needs the idle timer (see the module's note): HTTP/1 requests pay nothing.
    let activity = (protocol == Protocol::Http2).then(Activity::new);
    let service = {
        let activity = activity.clone();
        service_fn(move |request| {
            let state = state.clone();
            let guard = activity.as_ref().map(Activity::begin);
            async move {
                let response = routes::handle(state, request).await;
                drop(guard);
                Ok::<_, Infallible>(response)
            }
        })
    };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(connection);
    let idle = async {
        match &activity {
            Some(activity) => activity.idle(timeouts.idle).await,
            None => std::future::pending().await,
        }
    };
    tokio::pin!(idle);
    // Once an idle connection is sent its GOAWAY: the client has the first-bytes timeout to
    // go (hyper waits for its acknowledgement, which a client that went quiet never sends).
    let cut = tokio::time::sleep(Duration::MAX);
    tokio::pin!(cut);
    let (mut closing, mut cutting) = (false, false);
    loop {
        tokio::select! {
            result = connection.as_mut() => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "connection ended with an error");
                }
                return;
            }
            _ = stop.wait_for(|stop| *stop), if !closing => {
                // Requests in flight have the server's shutdown grace.
                connection.as_mut().graceful_shutdown();
                closing = true;
            }
            () = &mut idle, if !closing => {
                tracing::debug!("HTTP/2 connection idle: closing it");
                connection.as_mut().graceful_shutdown();
                closing = true;
                cutting = true;
                cut.as_mut().reset(Instant::now() + timeouts.first_bytes);
            }
            () = &mut cut, if cutting => {
                // A request that came as the GOAWAY went out is let finish.
                if activity.as_ref().is_some_and(|a| a.idle_for().is_none()) {
                    cut.as_mut().reset(Instant::now() + timeouts.first_bytes);
                    continue;
                }
                tracing::debug!("idle HTTP/2 connection did not go: closed");
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_connection_is_idle_only_with_no_request_open_for_the_timeout() {
        let activity = Activity::new();
        let timeout = Duration::from_secs(60);
        let guard = activity.begin();
        // A request open for longer than the timeout keeps the connection.
        let waited = tokio::time::timeout(Duration::from_secs(120), activity.idle(timeout)).await;
        assert!(waited.is_err(), "idle while a request was open");
        drop(guard);
        let started = tokio::time::Instant::now();
        activity.idle(timeout).await;
        assert!(started.elapsed() >= timeout);
    }
}
