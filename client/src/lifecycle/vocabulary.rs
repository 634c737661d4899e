//! The vocabulary of the frontend's query table: where a query is ([`State`]), what the
//! shell saw happen ([`Event`]), what it must do ([`Action`]), and the table's settings and
//! counters.

use std::time::{Duration, Instant};

use sluice_protocol::{Capability, EnqueueStatus, QueryErrorKind, QueryId, RefuseReason};

use crate::error::QueryError;

/// The moment an event is handled at. The shell's clock is read only if the event needs
/// it, once: most of a query's events (its acceptance, its dispatch, its result) do not,
/// and a clock read is paid per event.
#[derive(Debug, Default)]
pub(crate) struct Now(std::cell::OnceCell<Instant>);

impl Now {
    /// Read from the clock when first asked for.
    pub(crate) fn lazy() -> Self {
        Now::default()
    }

    /// A moment already known (a clock the caller has just read; the tests' fake clock).
    pub(crate) fn at(at: Instant) -> Self {
        Now(std::cell::OnceCell::from(at))
    }

    pub(crate) fn get(&self) -> Instant {
        *self.0.get_or_init(Instant::now)
    }

    /// Whether the clock was asked for.
    #[cfg(test)]
    pub(crate) fn was_read(&self) -> bool {
        self.0.get().is_some()
    }
}

/// A scheduler link's index at the frontend; names the link for the frontend's life.
pub(crate) type SchedulerIx = usize;

/// Where a query is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum State {
    /// No scheduler can take it now; it waits for one, until `placement_wait` runs out.
    Waiting,
    /// Its enqueue went to this scheduler; the answer is awaited.
    Placing(SchedulerIx),
    /// Accepted by this scheduler and queued there.
    Queued(SchedulerIx),
    /// Handed to a querier by this scheduler: ends by that querier's result or failure.
    Dispatched(SchedulerIx),
    /// Its querier confirmed it runs it (the scheduler that dispatched it no longer matters).
    Started,
    /// Its result is streaming in.
    Receiving,
}

/// What happened, as the shell saw it.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Event {
    /// A new query. `deadline`: when it must have ended.
    Submit {
        id: QueryId,
        tenant: String,
        capability: Capability,
        deadline: Option<Instant>,
        retriable: bool,
    },
    /// A scheduler answered an enqueue; `queued` is its load hint.
    Status {
        scheduler: SchedulerIx,
        id: QueryId,
        status: EnqueueStatus,
        queued: u32,
        /// The scheduler's estimate of the wait before dispatch, when it can tell.
        estimated_wait: Option<Duration>,
    },
    /// A scheduler handed these queries to queriers.
    Dispatched { scheduler: SchedulerIx, ids: Vec<QueryId> },
    /// A scheduler reports that an accepted query will not produce a result from it.
    SchedulerError {
        scheduler: SchedulerIx,
        id: QueryId,
        kind: QueryErrorKind,
        message: String,
    },
    /// A scheduler connection is up (again); `in_use`: new work may go there.
    SchedulerUp { scheduler: SchedulerIx, in_use: bool },
    /// Discovery moved a connected scheduler in or out of use.
    SchedulerInUse { scheduler: SchedulerIx, in_use: bool },
    /// The scheduler said it is draining: no new work; queued work is dispatched or
    /// handed back.
    SchedulerDraining { scheduler: SchedulerIx },
    /// The connection to a scheduler ended (lost, or the link is no longer wanted).
    SchedulerDown { scheduler: SchedulerIx },
    /// A querier confirms it runs `id` (its result stream opened early).
    ResultStarted {
        id: QueryId,
        tenant: String,
        capability: Capability,
    },
    /// A result stream opened for `id`, naming `tenant` and carrying `capability`.
    ResultHead {
        id: QueryId,
        tenant: String,
        capability: Capability,
    },
    /// A whole result arrived for `id` at once (head, body and end in one frame): taken
    /// and ended in one step.
    ResultWhole {
        id: QueryId,
        tenant: String,
        capability: Capability,
    },
    /// A querier reports the query failed in its handler (instead of a result).
    ResultError {
        id: QueryId,
        tenant: String,
        capability: Capability,
        message: String,
    },
    /// The accepted result stream of `id` ended (complete, or with an error that the body
    /// already carries).
    ResultEnd { id: QueryId },
    /// The caller gave the query up (dropped or cancelled its handle).
    Cancel { id: QueryId },
    /// The shell could not send the enqueue the table asked for to `scheduler`: the query
    /// is too large for the frames that scheduler reads. Fails the query (`Invalid`).
    TooLarge {
        scheduler: SchedulerIx,
        id: QueryId,
        reason: String,
    },
    /// Time passed: deadlines and placement waits are checked.
    Tick,
    /// The frontend is closing: every query ends as cancelled.
    Close,
}

/// What the shell must do.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Action {
    /// Send an `Enqueue` for `id` to `scheduler`, with what is left of its budget.
    Enqueue {
        scheduler: SchedulerIx,
        id: QueryId,
        timeout: Option<Duration>,
        attempt: u32,
    },
    /// Tell `scheduler` to drop `id` (queued there, or running on a querier it dispatched to).
    Cancel { scheduler: SchedulerIx, id: QueryId },
    /// The query's first placement succeeded: `submit` returns its handle.
    Placed { id: QueryId },
    /// The query ended with this error; forget it.
    Fail { id: QueryId, error: QueryError },
    /// The result stream for `id` is taken: hand it to the caller. `whole` when the result
    /// came in one frame: the query has ended already, there is no body left to cut short.
    Accept { id: QueryId, whole: bool },
    /// The early result stream of `id` (its querier's confirmation) is taken; its result
    /// follows on it.
    Confirmed { id: QueryId },
    /// The querier reports the query failed: the caller gets `Failed`; forget it.
    Failed { id: QueryId, message: String },
    /// The result stream is refused.
    Refuse { id: QueryId, reason: RefuseReason },
    /// The result was delivered in full (or its body carried its error): forget it.
    Done { id: QueryId },
}

/// Counters of what the table decided.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) duplicate_results: u64,
    pub(crate) unknown_results: u64,
    pub(crate) forged_results: u64,
    pub(crate) requeued: u64,
    pub(crate) redelivered: u64,
}

/// Settings of the table.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Policy {
    /// How long a query may wait for a scheduler to take it (within its deadline).
    pub(crate) placement_wait: Duration,
    /// Placements a retriable query may have when its querier dies mid-query.
    pub(crate) max_attempts: u32,
    /// How long a dispatch whose scheduler was lost may go unconfirmed by a querier before
    /// it is taken as never started and placed again.
    pub(crate) confirm_grace: Duration,
}
