//! The boundary between the edge and the pipeline: the edge submits the records of one
//! request together and answers only when the sink acknowledges them as durable. A sink that
//! is full refuses at once, so the edge can answer 503 instead of queueing without bound.

use tokio::sync::oneshot;

use apex_core::model::UsageRecord;

/// Why a sink did not take or did not make durable a submission.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SinkError {
    /// The queue is full: retry shortly (the edge answers 503 with `Retry-After`).
    #[error("the pipeline queue is full")]
    Full,
    /// The store is unavailable and the records were not made durable: retry later.
    #[error("the pipeline could not make the records durable")]
    Unavailable,
    /// The pipeline is shutting down.
    #[error("the pipeline is shut down")]
    Closed,
}

/// Resolves when the submitted records are durable, or with why they are not. Dropped
/// without an answer (a receive error) when the sink's writer stopped before it wrote them
/// (never at an orderly shutdown, which answers everything taken): the records are not
/// durable, and the caller treats it as [`SinkError::Unavailable`].
pub type Ack = oneshot::Receiver<Result<(), SinkError>>;

/// Where accepted records go. Implementations must never block the caller.
pub trait RecordSink: Send + Sync + 'static {
    /// Takes the records of one request; all of them become durable together or none does.
    fn submit(&self, records: Vec<UsageRecord>) -> Result<Ack, SinkError>;

    /// Submissions waiting in the queue, for the queue-depth metric.
    fn queue_depth(&self) -> usize;

    /// Stops taking submissions, makes everything already taken durable, and returns when
    /// that is done.
    fn shutdown(&self);

    /// Calls `visit(customer_id, event_id)` for every record with an event id that the sink
    /// kept from before this process started (the write-ahead log of a previous run), so the
    /// edge's duplicate detection survives a restart: a client retrying a request that was
    /// logged but never answered (the usual case after a crash) is still counted once.
    /// Returns how many ids were visited. Sinks that keep nothing visit nothing.
    fn replay_event_ids(&self, visit: &mut dyn FnMut(&str, &str)) -> usize {
        let _ = visit;
        0
    }

    /// Stores that stopped taking the log after a permanent error (a schema or type error),
    /// with the batch they stopped at. Records are still acknowledged (the log keeps them)
    /// until it reaches its cap; `/readyz` names these stores.
    fn stuck_stores(&self) -> Vec<StuckStore> {
        Vec::new()
    }

    /// Why the sink stopped taking records while the process runs (its log writer stopped
    /// after a disk fault: nothing can be made durable until a restart), or `None`. `/readyz`
    /// answers 503 with it, so a load balancer takes the instance out of rotation.
    fn writer_failure(&self) -> Option<String> {
        None
    }
}

/// A store whose applier parked a batch after a permanent error: nothing more reaches that
/// store until the cause is fixed and the process restarted, when the batch is applied from
/// the log.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct StuckStore {
    /// `postgres` or `clickhouse`.
    pub store: &'static str,
    /// The log position of the parked batch (its batch id in the store); `None` when the
    /// store failed before its applier knew where it stood (reading its watermark).
    pub batch_id: Option<u64>,
    /// The store's error.
    pub error: String,
}

/// A submission travelling through a pipeline queue with its acknowledgement.
#[derive(Debug)]
pub struct Submission {
    /// The records of one request.
    pub records: Vec<UsageRecord>,
    /// Where to report the outcome.
    pub ack: oneshot::Sender<Result<(), SinkError>>,
}
