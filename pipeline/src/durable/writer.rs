//! The log writer: one thread drains the bounded submission queue, appends every submission
//! waiting to the log, makes them durable with one fsync (group commit), and only then
//! acknowledges them. It is a plain thread, not a task: it blocks on the queue and on fsync.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crossbeam_channel::Receiver;

use super::{Framed, Shared};
use crate::names;
use crate::sink::SinkError;
use crate::wal::WalWriter;

/// Runs until every sender of `queue` is gone: appends what queued, fsyncs, acknowledges.
/// A group holds at most `group_bytes` of frames; with a non-zero `window` the writer waits
/// that long for more submissions before its fsync. A writer that cannot go on (a failed
/// rollback, a panic) says why ([`Shared::writer_failure`]) and from then on refuses
/// everything queued, until the shutdown closes the queue: no submission is left waiting.
pub(super) fn run(
    log: WalWriter,
    queue: &Receiver<Framed>,
    shared: &Shared,
    group_bytes: usize,
    window: Duration,
) {
    // However this ends, the appliers learn that nothing more comes, so they finish and a
    // shutdown never waits for them in vain.
    let _done = Done(shared);
    // A panic is a stop like a failed rollback: the requests of the group in hand have their
    // acknowledgements dropped (refused), and the rest are refused below.
    let ran = std::panic::catch_unwind(AssertUnwindSafe(|| {
        write(log, queue, shared, group_bytes, window)
    }));
    let why = match ran {
        Ok(None) => return,
        Ok(Some(why)) => why,
        Err(_) => "the log writer panicked; restart the server".to_owned(),
    };
    shared.writer_failed(why);
    // The sink holds the queue's senders until its shutdown, and the queue keeps what it
    // holds while a sender lives: every submission that gets in is answered here.
    for framed in queue {
        let _ = framed.ack.send(Err(SinkError::Unavailable));
    }
}

/// The writer's loop: `None` when the queue closed (a shutdown), or why it stopped.
fn write(
    mut log: WalWriter,
    queue: &Receiver<Framed>,
    shared: &Shared,
    group_bytes: usize,
    window: Duration,
) -> Option<String> {
    // Reused from group to group: a group costs no allocation of the writer's own.
    let mut frames: Vec<Vec<u8>> = Vec::new();
    let mut acks = Vec::new();
    while let Ok(first) = queue.recv() {
        let close_at = Instant::now() + window;
        let mut bytes = first.frame.len();
        frames.push(first.frame);
        acks.push(first.ack);
        // Everything that queued up during the previous fsync rides on this one, and what
        // arrives within the window.
        while bytes < group_bytes {
            let next = if window.is_zero() {
                queue.try_recv().ok()
            } else {
                queue.recv_deadline(close_at).ok()
            };
            let Some(next) = next else { break };
            bytes += next.frame.len();
            frames.push(next.frame);
            acks.push(next.ack);
        }
        let before = log.position();
        let started = Instant::now();
        let outcome = log.append_frames(&frames).and_then(|()| {
            crate::failpoint::hit("wal_before_fsync");
            log.sync()
        });
        let mut stop = None;
        let outcome = match outcome {
            Ok(()) => {
                crate::failpoint::hit("wal_after_fsync");
                shared.durable.store(log.position(), Ordering::SeqCst);
                shared.log_grew();
                metrics::histogram!(names::WAL_FSYNC_SECONDS)
                    .record(started.elapsed().as_secs_f64());
                metrics::counter!(names::WAL_BYTES_TOTAL).increment(log.position() - before);
                Ok(())
            }
            Err(e) => {
                tracing::error!(error = %e, "write-ahead log: append failed; refusing the requests");
                if let Err(e) = log.rollback_to(before) {
                    // The refused frames may still be in the log: appending after them would
                    // make them readable (and applied) once a later group is durable. Stop, as
                    // PostgreSQL does after a failed fsync: submissions are refused from now
                    // on, and a restart recovers the log from what is on disk.
                    tracing::error!(
                        error = %e,
                        "write-ahead log: rollback failed; the log writer stops (restart the server)"
                    );
                    stop = Some(format!(
                        "a group commit failed and the log could not be cut back to its last durable position ({e}); restart the server"
                    ));
                }
                Err(SinkError::Unavailable)
            }
        };
        frames.clear();
        for ack in acks.drain(..) {
            let _ = ack.send(outcome);
        }
        if stop.is_some() {
            return stop;
        }
    }
    None
}

/// Marks the writer done when dropped.
struct Done<'a>(&'a Shared);

impl Drop for Done<'_> {
    fn drop(&mut self) {
        self.0.writer_stopped();
    }
}
