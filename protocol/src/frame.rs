//! Every frame of the Sluice conversation, grouped by stream and direction.
//!
//! Four kinds of stream exist. Each starts with a [`Hello`] from the side that
//! opened it; on a scheduler's streams it is answered by a [`HelloReply`], while a result
//! stream carries its result right behind the hello, with no reply to wait for (a frontend
//! closes the connection of a querier whose hello it cannot accept). After that only the
//! two message types named for that stream travel on it.
//!
//! ```text
//! frontend ──(bi stream, one per frontend connection)── scheduler      StreamKind::FrontendLoop
//!   Hello                      ─►
//!                              ◄─ HelloReply::Welcome
//!   FrontendToScheduler::ResultEndpoint ─►                         (once, before the first Enqueue)
//!   FrontendToScheduler::Enqueue ─►
//!                              ◄─ SchedulerToFrontend::EnqueueStatus   (exactly one per Enqueue)
//!                              ◄─ SchedulerToFrontend::Dispatched      (batched: these queries were handed to queriers)
//!   FrontendToScheduler::Cancel  ─►
//!                              ◄─ SchedulerToFrontend::Cancelled       (exactly one per Cancel, once acted on)
//!                              ◄─ SchedulerToFrontend::QueryError      (querier died, deadline, shutdown…)
//!                              ◄─ SchedulerToFrontend::ShuttingDown
//!
//! querier ──(bi stream, one per connection, all its workers)── scheduler  StreamKind::DequeueLoop
//!   Hello                      ─►
//!                              ◄─ HelloReply::Welcome
//!                              ◄─ SchedulerToQuerier::Lifeline         (once: how to tie this process to the scheduler)
//!   QuerierToScheduler::LoopSlots ─►                                    (optional, before the first Ready: prefetch)
//!   QuerierToScheduler::Ready { worker } ─►                             ("give me work"; also "previous one handed to its sender")
//!                              ◄─ SchedulerToQuerier::Dispatch { worker }
//!                              ◄─ SchedulerToQuerier::Cancel { worker } (stop that worker's in-flight query)
//!   QuerierToScheduler::Ready { worker } ─►
//!                              ◄─ SchedulerToQuerier::ShuttingDown     (no more work on this stream)
//!
//!   Each worker takes turns on its own: Ready, then Dispatch, then Ready again. The
//!   workers' frames interleave freely; a worker's first Ready registers it.
//!
//! querier ──(bi stream, short)── scheduler                               StreamKind::ShutdownNotice
//!   Hello, Notice::QuerierShuttingDown ─►
//!                              ◄─ NoticeReply::Acknowledged
//!
//! querier ──(bi stream, one per result)── frontend result endpoint      StreamKind::Result
//!   Hello                      ─►   (no reply: the result follows at once, usually in the same write)
//!   ResultFrame::Head          ─►
//!   ResultFrame::Chunk …       ─►
//!   ResultFrame::End           ─►   (or ResultFrame::Error instead of Head/Chunk/End,
//!                                     or ResultFrame::Abort after Head when the body fails midway)
//!                              ◄─ ResultReceipt
//!
//! querier ──(bi stream, one per connection, many results)── frontend    StreamKind::Results
//!   Hello                      ─►   (no reply)
//!   ResultFrame::Whole …       ─►   (or ResultFrame::Error: each a complete result; written
//!                                     together when several are ready)
//!                              ◄─ ResultAck { query_id, receipt } …   (one per result, in order)
//! ```
//!
//! Query ids are chosen by the frontend and are unique per frontend; a query is
//! identified system-wide by the frontend's id plus its query id.

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// The protocol version this crate speaks. A peer with another version is refused in
/// the [`HelloReply`]; the version is the first field of [`Hello`] so it can always be read.
pub const PROTOCOL_VERSION: u16 = 10;

/// A frontend-chosen query identifier, unique among that frontend's outstanding queries.
pub type QueryId = u64;

/// A query's proof of dispatch: 128 random bits drawn by the frontend.
pub type Capability = u128;

/// Free-form key/value pairs carried with a query (tracing headers, request ids).
pub type Metadata = Vec<(String, String)>;

/// What a peer is, as it claims in [`Hello`]; the scheduler checks it against the
/// role in the peer's TLS certificate.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A query frontend: enqueues sub-queries, receives results.
    Frontend,
    /// A querier: runs worker loops that dequeue and execute sub-queries.
    Querier,
    /// A scheduler (used by scheduler-to-scheduler traffic).
    Scheduler,
}

/// Which conversation a stream carries; fixed by its opener's [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum StreamKind {
    /// Frontend → scheduler: [`FrontendToScheduler`] / [`SchedulerToFrontend`].
    FrontendLoop,
    /// Querier → scheduler, one per connection, shared by all its workers:
    /// [`QuerierToScheduler`] / [`SchedulerToQuerier`].
    DequeueLoop,
    /// Querier → scheduler: one [`Notice`] answered by one [`NoticeReply`].
    ShutdownNotice,
    /// Querier → frontend result endpoint: [`ResultFrame`]s answered by one [`ResultReceipt`].
    Result,
    /// Querier → frontend result endpoint, one per connection: whole small results
    /// ([`ResultFrame::Whole`] or [`ResultFrame::Error`]), each answered by a [`ResultAck`].
    /// Saves a stream, two tasks and a write each way per result.
    Results,
}

/// First frame on every stream, sent by the side that opened it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    /// Must equal [`PROTOCOL_VERSION`]; always the first encoded field.
    pub version: u16,
    /// The role the opener claims.
    pub role: Role,
    /// The opener's stable identity: frontend id, querier id or scheduler id.
    pub id: String,
    /// The conversation this stream carries.
    pub stream: StreamKind,
}

impl Hello {
    /// A hello for this crate's [`PROTOCOL_VERSION`].
    pub fn new(role: Role, id: impl Into<String>, stream: StreamKind) -> Self {
        Hello {
            version: PROTOCOL_VERSION,
            role,
            id: id.into(),
            stream,
        }
    }
}

/// The answer to a [`Hello`], sent by the side that accepted the stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HelloReply {
    /// Accepted; carries the acceptor's id (scheduler id or frontend id) and the largest
    /// frame it reads (its `max_frame_len`): a larger one would close the connection, so
    /// the opener sends nothing larger on it.
    Welcome { id: String, max_frame_len: u32 },
    /// Refused; the stream is closed after this frame.
    Rejected { code: RejectCode, message: String },
}

/// Why a stream was refused at [`Hello`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RejectCode {
    /// The opener's protocol version is not spoken here.
    UnsupportedVersion,
    /// The claimed role does not match the certificate, or may not open this kind of stream.
    RoleNotAllowed,
    /// The hello was malformed (empty id, bad stream kind for the role).
    InvalidHello,
    /// The acceptor is shutting down and takes no new streams.
    ShuttingDown,
}

// ---------------------------------------------------------------------------
// Frontend loop
// ---------------------------------------------------------------------------

/// Frontend → scheduler on the frontend loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FrontendToScheduler {
    /// Queue a sub-query. Answered by exactly one [`SchedulerToFrontend::EnqueueStatus`].
    Enqueue(Enqueue),
    /// Withdraw a query: removed if queued, or the querier running it is told to stop.
    /// Not answered; a cancelled query produces no further frames.
    Cancel { query_id: QueryId },
    /// Where queriers must send this frontend's results. Sent once, right after the
    /// hello; an `Enqueue` before it is refused as invalid.
    ResultEndpoint(FrontendAddress),
}

/// A sub-query to queue, with everything the scheduler needs to place it fairly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Enqueue {
    /// Frontend-chosen id, unique among this frontend's outstanding queries.
    pub query_id: QueryId,
    /// The tenant the query runs for; the first fairness level.
    pub tenant: String,
    /// Actors below the tenant, outermost first (user, dashboard, query hash…); any depth
    /// up to [`Limits::max_actor_depth`](crate::Limits::max_actor_depth).
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_ACTORS }>")]
    pub actors: Vec<String>,
    /// The backend the query will hit (for example `ingester`, `store-gateway`);
    /// `None` when unknown. Workers are spread across components.
    pub component: Option<String>,
    /// Priority class; higher is served first. `None` means the tenant's default.
    pub priority: Option<u8>,
    /// Expected cost in arbitrary units (default 1), for cost-aware fairness.
    pub cost_hint: Option<u32>,
    /// Time the query may still take, in milliseconds, counted from when the scheduler
    /// receives this frame (relative, so clocks need not agree). `None`: no deadline.
    /// A frontend that enqueues a query again sends what is left of its budget.
    pub timeout_ms: Option<u64>,
    /// Which run of this query this is: 1 for the first, 2 or more when the frontend
    /// redelivers it after its querier died mid-query. Placing it again after a hand-back
    /// or a lost scheduler (never started) keeps the number.
    pub attempt: u32,
    /// An unguessable token the frontend drew for this query. The scheduler passes it to
    /// the querier with the dispatch; the frontend takes a result only if it carries it,
    /// so a querier cannot answer (or pre-empt) a query it was never given.
    pub capability: Capability,
    /// Tracing headers and other metadata, passed through to the querier.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_METADATA }>")]
    pub metadata: Metadata,
    /// The opaque request the querier executes.
    pub payload: Bytes,
}

/// Scheduler → frontend on the frontend loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerToFrontend {
    /// The answer to one [`Enqueue`], with a load hint for client-side balancing.
    EnqueueStatus {
        query_id: QueryId,
        status: EnqueueStatus,
        load: LoadHint,
        /// How long the scheduler expects an accepted query to wait before dispatch, when
        /// it can tell (its component has been backlogged long enough to measure).
        estimated_wait_ms: Option<u64>,
    },
    /// A query that was accepted will not produce a result: the frontend should stop
    /// waiting for it (and may retry it, see [`QueryErrorKind`]).
    QueryError {
        query_id: QueryId,
        kind: QueryErrorKind,
        message: String,
    },
    /// The scheduler is draining: further enqueues will be refused. Queued queries will
    /// still be dispatched or handed back with [`QueryErrorKind::HandedBack`].
    ShuttingDown,
    /// These accepted queries were handed to querier workers: from now on each ends by
    /// its querier's result or failure, and must not be enqueued again. Sent in batches,
    /// always after the query's `EnqueueStatus` and before any later frame about it.
    Dispatched {
        #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_DISPATCHED_IDS }>")]
        query_ids: Vec<QueryId>,
    },
    /// The answer to one [`FrontendToScheduler::Cancel`], once the scheduler acted on it:
    /// the query was removed from the queue, its querier was told to stop, or the scheduler
    /// no longer had it.
    Cancelled { query_id: QueryId },
}

/// The outcome of one [`Enqueue`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum EnqueueStatus {
    /// Queued; a result or a [`SchedulerToFrontend::QueryError`] will follow.
    Accepted,
    /// The tenant already has its maximum of queued queries; try later or elsewhere.
    TooManyOutstanding { limit: u32 },
    /// The scheduler's global queue bound (requests or bytes) is reached.
    QueueFull,
    /// By the scheduler's estimate the query would wait this long, past its deadline: it
    /// was refused rather than queued to expire. Another scheduler may be less loaded.
    WouldMissDeadline { estimated_wait_ms: u64 },
    /// The scheduler is shutting down; enqueue on another scheduler.
    ShuttingDown,
    /// The request breaks a protocol limit (too long a tenant, too deep a path…).
    Invalid { reason: String },
    /// The scheduler failed for another reason.
    Error { message: String },
}

/// How loaded the scheduler is, returned with every enqueue status so a frontend can
/// prefer the less loaded of several schedulers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadHint {
    /// Requests queued across all tenants.
    pub queued: u32,
    /// Querier workers connected and waiting for work.
    pub idle_workers: u32,
}

/// Why an accepted query ended without a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum QueryErrorKind {
    /// The querier running the query disconnected or reset its stream.
    QuerierFailed,
    /// The query's deadline passed before a querier took it.
    DeadlineExceeded,
    /// The query was not run and can be enqueued again, on this scheduler or another: the
    /// scheduler shut down before dispatching it, or the querier it was dispatched to gave
    /// it back unstarted ([`QuerierToScheduler::HandBack`]).
    HandedBack,
    /// The scheduler cancelled the query (for example an operator action).
    Cancelled,
    /// Anything else; see the message.
    Internal,
}

// ---------------------------------------------------------------------------
// Dequeue loop
// ---------------------------------------------------------------------------

/// A worker's number on its querier's dequeue stream, chosen by the querier: below
/// [`MAX_WORKERS_PER_STREAM`](crate::MAX_WORKERS_PER_STREAM).
pub type WorkerSlot = u16;

/// Querier → scheduler on the dequeue loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum QuerierToScheduler {
    /// Worker `worker` is free (its first `Ready` registers it). If it was running a query, its handler is done and its result
    /// is handed to the querier's sender: `finished` names it and may report its measured
    /// cost. The delivery goes on while the worker takes its next query; a worker keeps at
    /// most one delivery in flight, so its next `Ready` also says that the previous one is
    /// settled. Until then the scheduler keeps the query as the worker's: if the worker's
    /// stream ends first, the frontend hears that its querier failed (and ignores it if the
    /// result came).
    Ready {
        worker: WorkerSlot,
        finished: Option<Finished>,
    },
    /// Worker `worker` gives back `query_id`, dispatched to it and never started: it was
    /// held (prefetch) behind a query that runs too long. The scheduler forgets the query
    /// and tells its frontend [`QueryErrorKind::HandedBack`], so the frontend places it
    /// again. The worker asks for nothing until its next `Ready` (which reports no
    /// finished query).
    HandBack { worker: WorkerSlot, query_id: QueryId },
    /// The workers come in groups of `slots_per_loop` (at most
    /// [`MAX_SLOTS_PER_LOOP`](crate::MAX_SLOTS_PER_LOOP)): slots `k·n … k·n + n − 1` are
    /// worker loop `k`'s, which runs one query at a time among them (with prefetch, `n` is
    /// 2: one runs, one holds the next). The scheduler places a loop's slots as one worker:
    /// they start at the same component, and a loop's slots are reserved for high
    /// priorities together. Sent at most once, before the stream's first `Ready`; without
    /// it every slot is a loop of its own.
    LoopSlots { slots_per_loop: u8 },
}

/// The query a worker just finished, reported with its next [`QuerierToScheduler::Ready`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Finished {
    /// The query's id at its frontend (the scheduler knows which frontend: it dispatched
    /// the query to this worker).
    pub query_id: QueryId,
    /// Measured cost in the same units as [`Enqueue::cost_hint`], when the querier knows it.
    pub measured_cost: Option<u32>,
}

/// Scheduler → querier on the dequeue loop.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum SchedulerToQuerier {
    /// Worker `worker` (which said `Ready`) runs this query and sends the result to the
    /// frontend's result endpoint.
    Dispatch {
        worker: WorkerSlot,
        dispatch: Box<Dispatch>,
    },
    /// Worker `worker` stops running its in-flight query `query_id` (ignored if it has
    /// finished it); it then says `Ready` as usual.
    Cancel { worker: WorkerSlot, query_id: QueryId },
    /// The querier (or the scheduler) is shutting down: no more work on this stream; the
    /// querier lets its running queries finish, reports them with a last `Ready` each and
    /// closes the stream. May come more than once.
    ShuttingDown,
    /// Sent right after the hello reply: the querier should open a TCP connection to `port`
    /// on the scheduler's host and send [`LIFELINE_MAGIC`] followed by `token` (16 bytes,
    /// big-endian), then keep it open. When that socket closes, as the kernel closes it
    /// when the querier process dies (even by SIGKILL, which QUIC over UDP cannot see), the
    /// scheduler fails the querier's running queries at once. One token per connection.
    Lifeline { port: u16, token: u128 },
}

/// First bytes a querier sends on its TCP lifeline, before the 16-byte token.
pub const LIFELINE_MAGIC: [u8; 4] = *b"SLL1";

/// A query handed to a querier worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Dispatch {
    /// The query's id at its frontend.
    pub query_id: QueryId,
    /// Where to send the result. Shared: a frontend named by an earlier dispatch decoded
    /// on the same thread is not decoded again (see `intern`).
    #[serde(
        serialize_with = "crate::intern::serialize",
        deserialize_with = "crate::intern::deserialize"
    )]
    pub frontend: Arc<FrontendAddress>,
    /// The tenant the query runs for.
    pub tenant: String,
    /// The actor path it was queued under.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_ACTORS }>")]
    pub actors: Vec<String>,
    /// The component it was queued under, if any.
    pub component: Option<String>,
    /// Metadata from the frontend, unchanged.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_METADATA }>")]
    pub metadata: Metadata,
    /// Time the query spent queued, in microseconds.
    pub queue_time_us: u64,
    /// Time left before the query's deadline, in milliseconds; `None`: no deadline. The
    /// querier cancels its handler when it runs out.
    pub timeout_ms: Option<u64>,
    /// The placement attempt this dispatch comes from (see [`Enqueue::attempt`]).
    pub attempt: u32,
    /// The query's capability (see [`Enqueue::capability`]): the result must carry it.
    pub capability: Capability,
    /// The opaque request to execute.
    pub payload: Bytes,
}

/// A frontend's result endpoint, as the frontend announced it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FrontendAddress {
    /// The frontend's id (its [`Hello::id`]).
    pub id: String,
    /// `host:port` of its QUIC result endpoint.
    pub address: String,
    /// TLS server name to verify the endpoint's certificate against.
    pub server_name: String,
    /// The largest frame the endpoint reads (the frontend's `max_frame_len`, between
    /// [`MIN_FRAME_LEN`](crate::MIN_FRAME_LEN) and
    /// [`HARD_MAX_FRAME_LEN`](crate::HARD_MAX_FRAME_LEN)): a querier sends its results in
    /// frames no larger. A scheduler closes the connection of a frontend that announces a
    /// limit outside that range.
    pub max_frame_len: u32,
}

// ---------------------------------------------------------------------------
// Shutdown notice
// ---------------------------------------------------------------------------

/// Querier → scheduler on a shutdown-notice stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Notice {
    /// The querier is going away: give its workers no new work, forget it as soon as its
    /// last worker disconnects (no forget delay).
    QuerierShuttingDown,
}

/// Scheduler → querier on a shutdown-notice stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NoticeReply {
    /// The notice took effect.
    Acknowledged,
}

// ---------------------------------------------------------------------------
// Results
// ---------------------------------------------------------------------------

/// Querier → frontend on a result stream: `Head`, any number of `Chunk`s, `End`; or a
/// single `Error`. A query that runs longer than a moment opens its stream early with
/// `Started`, and the rest follows on the same stream when the handler is done.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultFrame {
    /// The start of a result.
    Head {
        query_id: QueryId,
        /// The tenant the query ran for; checked against the frontend's record.
        tenant: String,
        /// The capability the dispatch carried; checked against the frontend's record.
        capability: Capability,
        /// Application status, HTTP style (200 = success).
        status: u16,
        #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_METADATA }>")]
        metadata: Metadata,
    },
    /// A piece of the result body, in order.
    Chunk(Bytes),
    /// The body is complete; `total_len` is the sum of the chunk lengths.
    End { total_len: u64 },
    /// The query failed in the querier (handler error or panic).
    Error {
        query_id: QueryId,
        tenant: String,
        capability: Capability,
        message: String,
    },
    /// First, when sent: the querier runs this query (it received the dispatch). The
    /// frontend then knows the query cannot have been lost with its scheduler.
    Started {
        query_id: QueryId,
        tenant: String,
        capability: Capability,
    },
    /// After a `Head`: the body failed midway (its producer gave up, or the deadline
    /// passed); what was sent is not the whole result. Ends the stream like `End`.
    Abort { message: String },
    /// A whole result in one frame (`Head`, one `Chunk`, `End`): only on a
    /// [`StreamKind::Results`] stream.
    Whole {
        query_id: QueryId,
        tenant: String,
        capability: Capability,
        status: u16,
        #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_METADATA }>")]
        metadata: Metadata,
        body: Bytes,
    },
}

/// Frontend → querier on a [`StreamKind::Results`] stream: the receipt of one result, in
/// the order the results came.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResultAck {
    pub query_id: QueryId,
    pub receipt: ResultReceipt,
}

/// Frontend → querier: the single answer on a result stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResultReceipt {
    /// The result was delivered to the waiting caller.
    Delivered,
    /// The result was not taken; the querier must not retry it.
    Refused { reason: RefuseReason },
}

/// Why a frontend refused a result.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefuseReason {
    /// The frontend has no such query outstanding (finished, cancelled or unknown).
    UnknownQuery,
    /// The result names another tenant than the query.
    TenantMismatch,
    /// A result for this query was already received.
    Duplicate,
    /// The result does not carry the query's capability: it did not come from the querier
    /// the query was dispatched to.
    WrongCapability,
    /// The frames broke the result protocol (chunk before head, wrong length…).
    Malformed,
}

/// Between schedulers, over the gossip's socket (not a QUIC stream): what a scheduler
/// holds of the tenants nearest their `max_outstanding`, so that the limit holds for the
/// cluster. Sent within a few milliseconds of a change and every 100 ms; a report replaces
/// the sender's previous one. Encoded with [`LoadReport::encode`], at most one UDP packet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LoadReport {
    /// The sender's scheduler id.
    pub scheduler: String,
    /// Increases with every report of one sender's life (a restart starts from its start time).
    pub seq: u64,
    /// Increases whenever `tenants` changes; what the receivers acknowledge.
    pub version: u64,
    /// (tenant, requests queued there), nearest the limit first; a tenant not listed has
    /// nothing queued there, or little.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_REPORTED_TENANTS }>")]
    pub tenants: Vec<(String, u32)>,
    /// (scheduler, version of its report the sender has seen): the sender's
    /// acknowledgements, so that each scheduler knows which of its admissions the others
    /// have counted. When they do not all fit one packet they take turns, and an entry
    /// with an empty scheduler name says so: a scheduler missing from such a report keeps
    /// the acknowledgement it had; missing from a report without it, it has seen nothing.
    #[serde(deserialize_with = "crate::bounded::seq::<_, _, { crate::bounded::HARD_MAX_REPORTED_TENANTS }>")]
    pub seen: Vec<(String, u64)>,
}

impl LoadReport {
    /// The report's bytes (postcard, no length prefix: the datagram delimits it).
    pub fn encode(&self) -> Vec<u8> {
        postcard::to_allocvec(self).expect("a report always encodes")
    }

    /// A report from a datagram's bytes; trailing bytes are refused.
    pub fn decode(bytes: &[u8]) -> Result<LoadReport, crate::DecodeError> {
        crate::decode_body(bytes)
    }
}

/// QUIC application error codes used when a stream is reset or a connection closed. The
/// reason text says more.
pub mod close_code {
    /// A normal close.
    pub const DONE: u32 = 0;
    /// The peer broke the protocol (bad frame, wrong order, frame too large).
    pub const PROTOCOL_ERROR: u32 = 1;
    /// The peer's certificate names no role, or a role that may not do this.
    pub const ROLE_NOT_ALLOWED: u32 = 2;
    /// The other side is shutting down.
    pub const SHUTTING_DOWN: u32 = 3;
    /// The scheduler has too many connections.
    pub const TOO_MANY_CONNECTIONS: u32 = 4;
    /// The stream did not say hello in time.
    pub const HELLO_TIMEOUT: u32 = 5;
    /// The querier's TCP lifeline closed: the querier process is gone.
    pub const LIFELINE_LOST: u32 = 6;
    /// The peer stopped reading: its unread replies reached the scheduler's bound.
    pub const NOT_READING: u32 = 7;
}
