//! What connection tasks (and the admin server) ask of the dispatcher.

use std::time::{Duration, Instant};

use sluice_protocol::{Enqueue, Finished, FrontendAddress, QueryId, WorkerSlot};
use tokio::sync::oneshot;

use super::{FrontendTx, WorkerTx};
use crate::queue::{Explain, QueueConfig};
use crate::server::status::Status;

/// What connection tasks ask of the dispatcher.
#[derive(Debug)]
pub(crate) enum Command {
    /// Another scheduler's queued counts (tenant limits for the cluster).
    PeerReport(Box<sluice_protocol::LoadReport>),
    /// Schedulers the gossip declared gone: their counts no longer count.
    PeersGone(Vec<String>),
    FrontendOpened {
        name: String,
        tx: FrontendTx,
        reply: oneshot::Sender<u64>,
    },
    ResultEndpoint {
        frontend: u64,
        address: FrontendAddress,
    },
    Enqueue {
        frontend: u64,
        enqueue: Box<Enqueue>,
        received: Instant,
    },
    Cancel {
        frontend: u64,
        query: QueryId,
    },
    /// A frontend loop ended; `graceful`: the frontend finished or closed it itself (its
    /// running queries are then cancelled; after a lost connection they still run, as the
    /// frontend keeps waiting for their results).
    FrontendClosed {
        frontend: u64,
        graceful: bool,
    },
    /// A querier opened its dequeue stream; the reply names the stream. Its workers
    /// register with their first `Ready`.
    DequeueOpened {
        querier: String,
        tx: WorkerTx,
        reply: oneshot::Sender<u64>,
    },
    Ready {
        stream: u64,
        worker: WorkerSlot,
        finished: Option<Finished>,
    },
    /// The stream's workers come in groups of `slots_per_loop` slots per worker loop.
    LoopSlots {
        stream: u64,
        slots_per_loop: u8,
    },
    /// A worker gives back its query unstarted (it was held behind a long one).
    HandBack {
        stream: u64,
        worker: WorkerSlot,
        query: QueryId,
    },
    /// A dequeue stream ended: every worker on it is gone.
    DequeueClosed {
        stream: u64,
    },
    QuerierShuttingDown {
        querier: String,
        reply: oneshot::Sender<()>,
    },
    SetQueueConfig {
        config: QueueConfig,
        reply: oneshot::Sender<Result<(), String>>,
    },
    Status {
        reply: oneshot::Sender<Status>,
    },
    /// The queue tree, bounded (`/explain`).
    Explain {
        reply: oneshot::Sender<Explain>,
    },
    /// Stop taking enqueues, keep dispatching for `drain_timeout`, then hand back the rest.
    /// `done` fires when the queue is empty.
    Shutdown {
        drain_timeout: Duration,
        done: oneshot::Sender<()>,
    },
    /// After the drain: let go of every outbox, so each connection's writer sends what is
    /// left and finishes its stream.
    Close {
        done: oneshot::Sender<()>,
    },
}
