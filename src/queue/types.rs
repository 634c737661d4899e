//! The queue's words: a request's key and path, what an enqueue may carry and why it is
//! refused, what a worker gets, and how every request left.

use std::time::{Duration, Instant};

use thiserror::Error;

/// Identifies a queued request: the frontend connection that sent it and its id there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueryKey {
    pub frontend: u64,
    pub query: u64,
}

/// Where a request is queued.
#[derive(Debug, Clone, Copy)]
pub struct QueuePath<'a> {
    pub component: Option<&'a str>,
    pub tenant: &'a str,
    pub actors: &'a [String],
}

/// What the queue needs to know of a request it holds.
pub trait Queued {
    /// The request's place in the tree.
    fn path(&self) -> QueuePath<'_>;
    /// Bytes the request occupies, counted against the global byte limit.
    fn size_bytes(&self) -> u64;
}

/// Per-request scheduling inputs besides the path.
#[derive(Debug, Clone, Copy, Default)]
pub struct EnqueueOptions {
    /// Past this instant the request is never dispatched: it comes out as [`Expired`].
    pub deadline: Option<Instant>,
    /// Priority class; `None`: the tenant's configured priority.
    pub priority: Option<u8>,
    /// Expected cost in the operator's units, debited from the tenant's balance at
    /// dispatch; 0 counts as 1.
    pub cost: u32,
    /// The most of this request's tenant this queue may hold, below its limit when other
    /// schedulers hold part of that limit (see [`cluster`](super::cluster)); `None`: the limit alone.
    pub allowance: Option<u32>,
}

/// Why an enqueue was refused. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum RejectReason {
    #[error("the tenant already has {limit} requests queued, its limit")]
    TooManyOutstanding { limit: u32 },
    #[error("the queue holds {limit} requests, its limit")]
    QueueFull { limit: usize },
    #[error("queued payloads would exceed {limit} bytes, the limit")]
    QueueBytesFull { limit: u64 },
    #[error("a request with this key is already queued")]
    Duplicate,
    /// Its deadline would pass before it is dispatched, by the queue's estimate.
    #[error("it would wait about {estimated_wait:?}, past its deadline")]
    WouldMissDeadline { estimated_wait: Duration },
}

/// A refused request, handed back with the reason so it is never lost.
#[derive(Debug)]
pub struct Rejected<R> {
    pub reason: RejectReason,
    pub request: R,
}

/// The answer to a worker asking for work.
#[derive(Debug)]
pub enum Dequeue<R> {
    /// Run this request.
    Dispatch(Dispatched<R>),
    /// Nothing this worker may take is queued; ask again when something is enqueued.
    Empty,
    /// The worker's querier announced shutdown: it gets no more work.
    ShuttingDown,
    /// The worker is not registered (it was unregistered, or its querier forgotten).
    UnknownWorker,
}

/// A request handed to a worker.
#[derive(Debug)]
pub struct Dispatched<R> {
    pub key: QueryKey,
    pub request: R,
    /// Time from enqueue to this dispatch.
    pub queue_time: Duration,
    pub deadline: Option<Instant>,
    /// The priority class it was queued in (report its service time with it, see
    /// [`TreeQueue::record_service`](super::TreeQueue::record_service)).
    pub priority: u8,
}

/// A request whose deadline passed while it was queued; its frontend must be told.
#[derive(Debug)]
pub struct Expired<R> {
    pub key: QueryKey,
    pub request: R,
    pub queue_time: Duration,
}

/// How every request that entered the queue left it. At all times
/// `enqueued == dispatched + cancelled + expired + handed_back + queued`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub enqueued: u64,
    pub dispatched: u64,
    pub cancelled: u64,
    pub expired: u64,
    pub handed_back: u64,
    /// Refused at enqueue (never entered, so not part of the equation above).
    pub rejected: u64,
}
