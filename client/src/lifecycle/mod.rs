//! The life of every query at the frontend, as data: one [`QueryTable`] whose
//! [`handle`](QueryTable::handle) takes an [`Event`] and [`Now`] and returns the [`Action`]s
//! the async shell (`frontend.rs`) must carry out. No I/O, no clock, no tasks: every
//! state a query can be in is a [`State`] here, and every way out of it is an arm of
//! `handle`, so orders of events a network rarely produces are unit- and property-tested.
//!
//! ```text
//!            ┌── refused, handed back unstarted, scheduler lost (not dispatched) ────────┐
//!            ▼                                                                            │
//! submit → Waiting ⇄ Placing(s) ──accepted──▶ Queued(s) ──Dispatched──▶ Dispatched(s) ──result head──▶ Receiving
//!                                                                          │ querier: Started  ▲
//!                                                                          └──▶ Started ───────┘
//!            │           │                        │                        │ querier failed:                │
//!            │           │                        │                        │ retriable → Placing again      │
//!            └───────────┴─ deadline, cancel, every scheduler refused ─────┴─ else failed ──────────────────┴─▶ ended
//! ```
//!
//! Rules it keeps: a query is placed again only while no querier has started it (the
//! scheduler says `Dispatched` before anything else about it). One case is uncertain: the
//! scheduler died right after noting a dispatch, and its dispatch may never have reached
//! the querier. A querier confirms a query that runs longer than a moment (`Started`, or
//! its result), so a dispatch its scheduler's loss left unconfirmed for
//! [`Policy::confirm_grace`] is taken as never started and placed again. Each placement is decided
//! once (an event from a scheduler that no longer holds the query is ignored); the deadline
//! is absolute, travels as the remaining budget, and ends the query even if nobody
//! answers; every submitted query ends exactly once, by one `Fail` or by its result.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

use sluice_protocol::{Capability, EnqueueStatus, QueryErrorKind, QueryId, RefuseReason};

use crate::FastMap;
use crate::error::QueryError;

mod timers;
mod vocabulary;
use timers::Timers;
pub(crate) use vocabulary::{Action, Counters, Event, Now, Policy, SchedulerIx, State};

#[derive(Debug)]
struct Query {
    tenant: String,
    /// What a result must carry to be taken.
    capability: Capability,
    state: State,
    deadline: Option<Instant>,
    /// While `Waiting`: when waiting gives up.
    wait_until: Option<Instant>,
    retriable: bool,
    /// Placements so far (1 = the first).
    attempt: u32,
    /// Whether `Placed` was said (the first placement succeeded or a result arrived).
    placed: bool,
    /// The scheduler of its last dispatch (its querier failures still count once started).
    dispatched_by: Option<SchedulerIx>,
    /// The accepting scheduler's estimate of the wait before dispatch.
    estimated_wait: Option<Duration>,
    /// While `Dispatched` by a scheduler that was lost: when the dispatch counts as never
    /// received unless a querier confirms it first.
    orphaned_until: Option<Instant>,
    /// Schedulers that refused this placement round, and the last refusal.
    refused: HashSet<SchedulerIx>,
    last_refusal: Option<QueryError>,
}

impl Query {
    /// The scheduler that holds the query or dispatched it (and may still report on it).
    fn holder(&self) -> Option<SchedulerIx> {
        match self.state {
            State::Placing(s) | State::Queued(s) | State::Dispatched(s) => Some(s),
            State::Started => self.dispatched_by,
            State::Waiting | State::Receiving => None,
        }
    }
}

/// How a querier's result for a query arrived.
enum Arrival {
    /// Its head: the body follows on the stream.
    Head,
    /// Head, body and end in one frame.
    Whole,
    /// The querier's error instead of a result.
    Failed(String),
}

#[derive(Debug, Clone, Copy, Default)]
struct SchedulerView {
    up: bool,
    in_use: bool,
    draining: bool,
    queued: u32,
}

impl SchedulerView {
    fn accepting(&self) -> bool {
        self.up && self.in_use && !self.draining
    }
}

/// Every outstanding query of one frontend and what it knows of the schedulers.
#[derive(Debug)]
pub(crate) struct QueryTable {
    policy: Policy,
    queries: FastMap<QueryId, Query>,
    schedulers: Vec<SchedulerView>,
    /// Queries in `Waiting`, oldest first (stale ids are skipped).
    waiting: VecDeque<QueryId>,
    /// Deadlines, placement waits and confirmation graces, earliest first (stale ones are
    /// skipped, and swept in bulk).
    timers: Timers,
    seed: u64,
    counters: Counters,
}

impl QueryTable {
    pub(crate) fn new(policy: Policy, seed: u64) -> Self {
        QueryTable {
            policy,
            queries: FastMap::default(),
            schedulers: Vec::new(),
            waiting: VecDeque::new(),
            timers: Timers::default(),
            seed,
            counters: Counters::default(),
        }
    }

    /// Queries not ended.
    pub(crate) fn len(&self) -> usize {
        self.queries.len()
    }

    /// The state of `id`, if it has not ended.
    #[cfg(test)]
    pub(crate) fn state(&self, id: QueryId) -> Option<State> {
        self.queries.get(&id).map(|q| q.state)
    }

    /// The run `id` is on (1 = first; more after redeliveries).
    #[cfg(test)]
    pub(crate) fn attempt(&self, id: QueryId) -> Option<u32> {
        self.queries.get(&id).map(|q| q.attempt)
    }

    /// Where `id` is now: its state, the scheduler that holds or dispatched it, its run.
    pub(crate) fn placement(&self, id: QueryId) -> Option<(State, Option<SchedulerIx>, u32, Option<Duration>)> {
        let q = self.queries.get(&id)?;
        Some((q.state, q.holder().or(q.dispatched_by), q.attempt, q.estimated_wait))
    }

    pub(crate) fn counters(&self) -> Counters {
        self.counters
    }

    /// Schedulers that may be sent new work.
    pub(crate) fn accepting(&self) -> impl Iterator<Item = SchedulerIx> + '_ {
        self.schedulers
            .iter()
            .enumerate()
            .filter(|(_, v)| v.accepting())
            .map(|(i, _)| i)
    }

    /// When [`Event::Tick`] is next due.
    pub(crate) fn next_timer(&mut self) -> Option<Instant> {
        let queries = &self.queries;
        self.timers.next(|at, id| moment_current(queries, at, id))
    }

    /// Whether a moment earlier than every other was added since the last call: whoever
    /// waits for [`next_timer`](Self::next_timer) must look again.
    pub(crate) fn timer_moved_earlier(&mut self) -> bool {
        self.timers.take_earlier()
    }

    fn add_timer(&mut self, at: Instant, id: QueryId) {
        let queries = &self.queries;
        self.timers
            .add(at, id, queries.len(), |at, id| moment_current(queries, at, id));
    }

    /// Applies `event` at `now`, appending what to do to `out`.
    pub(crate) fn handle(&mut self, event: Event, now: &Now, out: &mut Vec<Action>) {
        match event {
            Event::Submit {
                id,
                tenant,
                capability,
                deadline,
                retriable,
            } => {
                if let Some(d) = deadline {
                    self.add_timer(d, id);
                }
                self.queries.insert(
                    id,
                    Query {
                        tenant,
                        capability,
                        state: State::Waiting,
                        deadline,
                        wait_until: None,
                        retriable,
                        attempt: 0,
                        placed: false,
                        dispatched_by: None,
                        estimated_wait: None,
                        orphaned_until: None,
                        refused: HashSet::new(),
                        last_refusal: None,
                    },
                );
                self.place(id, now.get(), out);
            }
            Event::Status {
                scheduler,
                id,
                status,
                queued,
                estimated_wait,
            } => {
                self.view(scheduler).queued = queued;
                if status == EnqueueStatus::Accepted
                    && let Some(q) = self.queries.get_mut(&id)
                    && q.state == State::Placing(scheduler)
                {
                    q.estimated_wait = estimated_wait;
                }
                self.on_status(scheduler, id, status, now, out);
            }
            Event::Dispatched { scheduler, ids } => {
                for id in ids {
                    if let Some(q) = self.queries.get_mut(&id)
                        && matches!(q.state, State::Placing(s) | State::Queued(s) if s == scheduler)
                    {
                        q.state = State::Dispatched(scheduler);
                        q.dispatched_by = Some(scheduler);
                    }
                }
            }
            Event::SchedulerError {
                scheduler,
                id,
                kind,
                message,
            } => self.on_scheduler_error(scheduler, id, kind, message, now.get(), out),
            Event::SchedulerUp { scheduler, in_use } => {
                *self.view(scheduler) = SchedulerView {
                    up: true,
                    in_use,
                    draining: false,
                    queued: 0,
                };
                // A scheduler that comes back is a new chance for everyone.
                for q in self.queries.values_mut() {
                    q.refused.remove(&scheduler);
                }
                self.place_waiting(now.get(), out);
            }
            Event::SchedulerInUse { scheduler, in_use } => {
                self.view(scheduler).in_use = in_use;
                if in_use {
                    self.place_waiting(now.get(), out);
                }
            }
            Event::SchedulerDraining { scheduler } => self.view(scheduler).draining = true,
            Event::SchedulerDown { scheduler } => {
                self.view(scheduler).up = false;
                // Its queued copies are gone with it; dispatched ones still answer directly,
                // once their querier confirms them.
                let (mut lost, mut orphaned) = (Vec::new(), Vec::new());
                let now = now.get();
                let grace = now + self.policy.confirm_grace;
                for (id, q) in self.queries.iter_mut() {
                    match q.state {
                        State::Placing(s) | State::Queued(s) if s == scheduler => lost.push(*id),
                        State::Dispatched(s) if s == scheduler && q.orphaned_until.is_none() => {
                            q.orphaned_until = Some(grace);
                            orphaned.push(*id);
                        }
                        _ => {}
                    }
                }
                for id in orphaned {
                    self.add_timer(grace, id);
                }
                for id in lost {
                    self.replace(id, false, now, out);
                }
            }
            Event::ResultStarted { id, tenant, capability } => self.on_started(id, &tenant, capability, out),
            Event::ResultHead { id, tenant, capability } => self.on_result(id, &tenant, capability, Arrival::Head, out),
            Event::ResultWhole { id, tenant, capability } => {
                self.on_result(id, &tenant, capability, Arrival::Whole, out)
            }
            Event::ResultError {
                id,
                tenant,
                capability,
                message,
            } => self.on_result(id, &tenant, capability, Arrival::Failed(message), out),
            Event::ResultEnd { id } => {
                if self.queries.get(&id).is_some_and(|q| q.state == State::Receiving) {
                    self.end(id);
                    out.push(Action::Done { id });
                }
            }
            Event::Cancel { id } => {
                if let Some(q) = self.end(id)
                    && let Some(s) = q.holder()
                {
                    out.push(Action::Cancel { scheduler: s, id });
                }
            }
            Event::TooLarge { scheduler, id, reason } => {
                if self
                    .queries
                    .get(&id)
                    .is_some_and(|q| q.state == State::Placing(scheduler))
                {
                    self.fail(id, QueryError::Invalid(reason), out);
                }
            }
            Event::Tick => self.tick(now.get(), out),
            Event::Close => {
                let ids: Vec<QueryId> = self.queries.keys().copied().collect();
                for id in ids {
                    self.fail(id, QueryError::Cancelled("the frontend client closed".into()), out);
                }
            }
        }
    }

    fn view(&mut self, s: SchedulerIx) -> &mut SchedulerView {
        if self.schedulers.len() <= s {
            self.schedulers.resize(s + 1, SchedulerView::default());
        }
        &mut self.schedulers[s]
    }

    /// Sends `id` to a scheduler that may take it, or parks it in `Waiting`.
    fn place(&mut self, id: QueryId, now: Instant, out: &mut Vec<Action>) {
        let Some(q) = self.queries.get(&id) else { return };
        let timeout = match q.deadline {
            Some(d) if d <= now => {
                self.fail(id, deadline_error(), out);
                return;
            }
            Some(d) => Some(d - now),
            None => None,
        };
        let Some(s) = pick(&self.schedulers, &mut self.seed, &q.refused) else {
            // Nobody left to ask. After refusals from everyone who could, that is the
            // answer; otherwise wait for a scheduler to (re)appear.
            let q = self.queries.get_mut(&id).expect("checked above");
            if let Some(error) = q.last_refusal.clone()
                && !q.refused.is_empty()
            {
                self.fail(id, error, out);
                return;
            }
            q.state = State::Waiting;
            if q.wait_until.is_none() {
                let until = now + self.policy.placement_wait;
                let until = q.deadline.map_or(until, |d| d.min(until));
                q.wait_until = Some(until);
                self.waiting.push_back(id);
                self.add_timer(until, id);
            }
            return;
        };
        let q = self.queries.get_mut(&id).expect("checked above");
        q.attempt = q.attempt.max(1);
        q.state = State::Placing(s);
        // Its wait's moment goes stale (skipped when due).
        q.wait_until = None;
        out.push(Action::Enqueue {
            scheduler: s,
            id,
            timeout,
            attempt: q.attempt,
        });
    }

    /// Places waiting queries, oldest first.
    fn place_waiting(&mut self, now: Instant, out: &mut Vec<Action>) {
        let ids = std::mem::take(&mut self.waiting);
        let mut still = VecDeque::new();
        for id in ids {
            if self.queries.get(&id).is_none_or(|q| q.state != State::Waiting) {
                continue; // ended or placed meanwhile
            }
            self.place(id, now, out);
            if self.queries.get(&id).is_some_and(|q| q.state == State::Waiting) {
                still.push_back(id);
            }
        }
        still.append(&mut self.waiting);
        self.waiting = still;
    }

    fn on_status(
        &mut self,
        scheduler: SchedulerIx,
        id: QueryId,
        status: EnqueueStatus,
        now: &Now,
        out: &mut Vec<Action>,
    ) {
        let Some(q) = self.queries.get_mut(&id) else { return };
        if q.state != State::Placing(scheduler) {
            return; // an answer for a placement already decided otherwise
        }
        let refusal = match status {
            EnqueueStatus::Accepted => {
                q.state = State::Queued(scheduler);
                q.refused.clear();
                q.last_refusal = None;
                if !q.placed {
                    q.placed = true;
                    out.push(Action::Placed { id });
                }
                return;
            }
            EnqueueStatus::Invalid { reason } => {
                self.fail(id, QueryError::Invalid(reason), out);
                return;
            }
            EnqueueStatus::ShuttingDown => {
                // Not a refusal of the query: that scheduler is going away.
                self.view(scheduler).draining = true;
                None
            }
            EnqueueStatus::TooManyOutstanding { limit } => Some(QueryError::TooManyOutstanding { limit }),
            EnqueueStatus::QueueFull => Some(QueryError::QueueFull),
            EnqueueStatus::WouldMissDeadline { estimated_wait_ms } => Some(QueryError::WouldMissDeadline {
                estimated_wait: Duration::from_millis(estimated_wait_ms),
            }),
            EnqueueStatus::Error { message } => Some(QueryError::Protocol(message)),
        };
        let q = self.queries.get_mut(&id).expect("checked above");
        q.state = State::Waiting;
        if let Some(error) = refusal {
            q.refused.insert(scheduler);
            q.last_refusal = Some(error);
        }
        self.place(id, now.get(), out);
    }

    fn on_scheduler_error(
        &mut self,
        scheduler: SchedulerIx,
        id: QueryId,
        kind: QueryErrorKind,
        message: String,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let Some(q) = self.queries.get(&id) else { return };
        if q.holder() != Some(scheduler) {
            return; // stale: the query moved on, or its result stream decides
        }
        match kind {
            // Not run: not yet dispatched, or its querier gave it back unstarted (a query
            // its querier confirmed has started, and is not given back).
            QueryErrorKind::HandedBack if q.state != State::Started => self.replace(id, false, now, out),
            QueryErrorKind::QuerierFailed if q.retriable && q.attempt < self.policy.max_attempts => {
                self.replace(id, true, now, out)
            }
            QueryErrorKind::QuerierFailed if q.retriable => {
                let error = QueryError::RetriesExhausted {
                    attempts: q.attempt,
                    last: message,
                };
                self.fail(id, error, out);
            }
            QueryErrorKind::QuerierFailed => self.fail(id, QueryError::QuerierFailed(message), out),
            QueryErrorKind::DeadlineExceeded => self.fail(id, QueryError::DeadlineExceeded(message), out),
            QueryErrorKind::Cancelled | QueryErrorKind::HandedBack => {
                self.fail(id, QueryError::Cancelled(message), out)
            }
            QueryErrorKind::Internal => self.fail(id, QueryError::Protocol(message), out),
        }
    }

    /// Places `id` again, away from where it was: `redeliver` after its querier died
    /// (a new attempt), otherwise because it was never started there.
    fn replace(&mut self, id: QueryId, redeliver: bool, now: Instant, out: &mut Vec<Action>) {
        let Some(q) = self.queries.get_mut(&id) else { return };
        if redeliver {
            q.attempt += 1;
            self.counters.redelivered += 1;
        } else {
            self.counters.requeued += 1;
        }
        q.state = State::Waiting;
        q.refused.clear();
        q.last_refusal = None;
        q.orphaned_until = None;
        self.place(id, now, out);
    }

    /// A querier confirms it runs the query: it is no longer at risk of being lost with its
    /// scheduler, and any copy placed again meanwhile is withdrawn.
    fn on_started(&mut self, id: QueryId, tenant: &str, capability: Capability, out: &mut Vec<Action>) {
        if !self.claim(id, tenant, capability, true, out) {
            return;
        }
        let q = self.queries.get_mut(&id).expect("claimed");
        q.orphaned_until = None;
        q.state = State::Started;
        out.push(Action::Confirmed { id });
    }

    fn on_result(
        &mut self,
        id: QueryId,
        tenant: &str,
        capability: Capability,
        arrival: Arrival,
        out: &mut Vec<Action>,
    ) {
        if !self.claim(id, tenant, capability, false, out) {
            return;
        }
        match arrival {
            Arrival::Failed(message) => {
                self.end(id);
                out.push(Action::Failed { id, message });
            }
            Arrival::Head => {
                self.queries.get_mut(&id).expect("claimed").state = State::Receiving;
                out.push(Action::Accept { id, whole: false });
            }
            Arrival::Whole => {
                self.end(id);
                out.push(Action::Accept { id, whole: true });
                out.push(Action::Done { id });
            }
        }
    }

    /// A querier speaks for `id` (its confirmation, or its result when `!confirming`): it
    /// must know the query's capability and tenant, and not repeat itself. A result can
    /// overtake its own enqueue answer or dispatch note (another connection): it proves the
    /// query was accepted, and a copy placed again elsewhere meanwhile is withdrawn. False,
    /// with the refusal pushed, when it is refused.
    fn claim(
        &mut self,
        id: QueryId,
        tenant: &str,
        capability: Capability,
        confirming: bool,
        out: &mut Vec<Action>,
    ) -> bool {
        let refusal = match self.queries.get(&id) {
            None => {
                self.counters.unknown_results += 1;
                Some(RefuseReason::UnknownQuery)
            }
            Some(q) if q.capability != capability => {
                self.counters.forged_results += 1;
                Some(RefuseReason::WrongCapability)
            }
            Some(q) if q.tenant != tenant => Some(RefuseReason::TenantMismatch),
            Some(q) if q.state == State::Receiving || (confirming && q.state == State::Started) => {
                self.counters.duplicate_results += 1;
                Some(RefuseReason::Duplicate)
            }
            Some(_) => None,
        };
        if let Some(reason) = refusal {
            out.push(Action::Refuse { id, reason });
            return false;
        }
        let q = self.queries.get_mut(&id).expect("checked above");
        if !q.placed {
            q.placed = true;
            out.push(Action::Placed { id });
        }
        if let State::Placing(s) | State::Queued(s) = q.state
            && (q.attempt > 1 || q.dispatched_by.is_some())
        {
            out.push(Action::Cancel { scheduler: s, id });
        }
        q.wait_until = None;
        true
    }

    fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        // A moment that went stale finds its query gone, or its fields later than `now`.
        while let Some((_, id)) = self.timers.pop_due(now) {
            let Some(q) = self.queries.get(&id) else { continue };
            if q.deadline.is_some_and(|d| d <= now) {
                if let Some(s) = q.holder() {
                    out.push(Action::Cancel { scheduler: s, id });
                }
                self.fail(id, deadline_error(), out);
            } else if matches!(q.state, State::Dispatched(_)) && q.orphaned_until.is_some_and(|o| o <= now) {
                // Its scheduler died, and no querier ever confirmed the dispatch: it never
                // reached one.
                self.replace(id, false, now, out);
            } else if q.state == State::Waiting && q.wait_until.is_some_and(|w| w <= now) {
                let error = q.last_refusal.clone().unwrap_or(QueryError::NoScheduler);
                self.fail(id, error, out);
            }
        }
    }

    fn fail(&mut self, id: QueryId, error: QueryError, out: &mut Vec<Action>) {
        if self.end(id).is_some() {
            out.push(Action::Fail { id, error });
        }
    }

    /// Forgets `id` (its moments and waiting place are skipped lazily).
    fn end(&mut self, id: QueryId) -> Option<Query> {
        self.queries.remove(&id)
    }
}

/// Whether `id`'s moment `at` still matters: the query is live and has it.
fn moment_current(queries: &FastMap<QueryId, Query>, at: Instant, id: QueryId) -> bool {
    queries
        .get(&id)
        .is_some_and(|q| [q.deadline, q.wait_until, q.orphaned_until].contains(&Some(at)))
}

/// Two random choices among accepting schedulers not in `skip`, the less loaded wins.
fn pick(schedulers: &[SchedulerView], seed: &mut u64, skip: &HashSet<SchedulerIx>) -> Option<SchedulerIx> {
    // Counted, then walked again for the two picks: no list is built for every placement.
    let candidates = || {
        schedulers
            .iter()
            .enumerate()
            .filter(|(i, v)| v.accepting() && !skip.contains(i))
            .map(|(i, _)| i)
    };
    let n = candidates().count() as u64;
    if n == 0 {
        return None;
    }
    *seed = seed.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let r = mix(*seed);
    let nth = |k: u64| candidates().nth(k as usize).expect("below the count");
    let a = nth(r % n);
    let b = nth((r >> 32) % n);
    Some(if schedulers[b].queued < schedulers[a].queued {
        b
    } else {
        a
    })
}

fn deadline_error() -> QueryError {
    QueryError::DeadlineExceeded("the query's deadline passed".into())
}

/// splitmix64's finaliser, for picking two schedulers at random.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests;
