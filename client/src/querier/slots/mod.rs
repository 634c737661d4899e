//! The workers of one querier–scheduler link as a state machine, without I/O: which worker
//! may ask for work, which one runs what, when a running query is confirmed, cancelled or
//! aborted, and when a finished one may be reported. The dequeue driver
//! ([`super::dequeue`]) feeds it events (stream opened, dispatch, cancel, handler done,
//! delivery settled, time) and carries out what it answers.
//!
//! A worker's life: `Idle` → (stream open) `Waiting` → (dispatch) `Running` → (handler
//! done) `Settling` while its previous result's delivery is still in flight → `Waiting`
//! again with its `Ready`, which reports the finished query. The scheduler counts on that
//! order: a worker's `Ready` also says that its previous delivery is settled, so at most
//! one delivery per worker is in flight besides the newest.
//!
//! With prefetch, the link has two slots per worker loop (the scheduler sees both, and is
//! told at the stream's start that they come in pairs: `LoopSlots`) but runs at most one
//! handler per loop: loop `k` has slots `2k` and `2k + 1`. A query
//! dispatched to a slot whose loop runs one is `Held` and starts when that handler
//! returns. A held query that is cancelled or reaches its deadline never runs: its slot
//! reports it at once. One still held after the hold limit (its loop runs a long query)
//! is given back to the scheduler unstarted (`HandBack`), and its slot rests, asking for
//! nothing, until a handler of its loop returns within the hold limit: a loop prefetches
//! only while its queries are short.

use std::collections::VecDeque;
use std::time::Duration;

use sluice_protocol::{Finished, MAX_WORKERS_PER_STREAM, QuerierToScheduler, QueryId, WorkerSlot};
use tokio::time::Instant;

/// What one worker is doing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum State {
    /// Free, and has not asked for work on the current stream (or there is none).
    Idle,
    /// Asked for work on the current stream.
    Waiting,
    /// Dispatched, waiting for a worker to run it (prefetch only).
    Held(Run),
    /// Gave its held query back; asks for work again once a handler of its loop returns
    /// within the hold limit (`woken`) and its deliveries are settled (prefetch only).
    Resting { woken: bool },
    /// Runs a query.
    Running(Run),
    /// Its handler is done; its `Ready` waits until no delivery but this query's own
    /// (`delivery`, if its result was handed over) is in flight.
    Settling { finished: Finished, delivery: Option<u64> },
}

/// A running query's clocks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Run {
    pub(super) query_id: QueryId,
    /// When its handler is told to stop (its deadline), until it is.
    pub(super) deadline: Option<Instant>,
    /// When it is confirmed to its frontend, until it is.
    pub(super) confirm_at: Option<Instant>,
    /// Set once cancelled: when the handler is aborted if it has not returned.
    pub(super) abort_at: Option<Instant>,
    /// While held on an open stream: when it is given back if it has not started.
    pub(super) hand_back_at: Option<Instant>,
    /// When its handler started (None while held).
    pub(super) started: Option<Instant>,
}

impl Run {
    pub(super) fn cancelled(&self) -> bool {
        self.abort_at.is_some()
    }

    fn next_moment(&self) -> Option<Instant> {
        let deadline = self.deadline.filter(|_| !self.cancelled());
        [deadline, self.confirm_at, self.abort_at, self.hand_back_at]
            .into_iter()
            .flatten()
            .min()
    }
}

/// The stream the workers ask for work on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Stream {
    /// None now (connecting, or stopped).
    None,
    Open,
    /// The scheduler said `ShuttingDown`: running queries are reported, nothing more is
    /// asked for.
    Draining,
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Action {
    /// Write this frame on the dequeue stream.
    Send(QuerierToScheduler),
    /// Tell the worker's handler to stop (cancel or deadline).
    Cancel(WorkerSlot),
    /// Abort the worker's handler: it ignored its cancel for the whole grace.
    Abort(WorkerSlot),
    /// Confirm the worker's query to its frontend (open its result stream early).
    Confirm(WorkerSlot),
    /// Start the slot's handler (its query was dispatched and a worker is free for it).
    Start(WorkerSlot),
    /// Forget the slot's held query without running it (cancelled, past its deadline, or
    /// given back).
    Drop(WorkerSlot),
}

/// Slots per worker loop: two with prefetch (one runs, one holds the next), else one.
/// The scheduler is told it (`LoopSlots`) and sees one worker per slot.
pub(super) fn slots_per_loop(prefetch: bool) -> u8 {
    if prefetch { 2 } else { 1 }
}

/// The workers of one link.
#[derive(Debug)]
pub(super) struct Slots {
    states: Vec<State>,
    /// Handlers that may run at once (the worker count); there are twice as many slots
    /// with prefetch.
    workers: usize,
    prefetch: bool,
    /// Slots in `Running`.
    running: usize,
    /// Slots in `Held`, oldest dispatch first.
    held: VecDeque<usize>,
    /// How long a query may be held before it is given back; None: as long as it takes.
    hold_limit: Option<Duration>,
    /// Per worker, the deliveries in flight (their numbers), oldest first.
    in_flight: Vec<VecDeque<u64>>,
    stream: Stream,
    cancel_grace: Duration,
    confirm_after: Duration,
    /// The earliest moment set since [`take_fresh`](Self::take_fresh) last asked.
    fresh: Option<Instant>,
}

impl Slots {
    pub(super) fn new(cancel_grace: Duration, confirm_after: Duration, prefetch: bool) -> Self {
        Slots {
            states: Vec::new(),
            workers: 0,
            prefetch,
            running: 0,
            held: VecDeque::new(),
            hold_limit: None,
            in_flight: Vec::new(),
            stream: Stream::None,
            cancel_grace,
            confirm_after,
            fresh: None,
        }
    }

    /// Gives a query held this long back to the scheduler (see the module's notes).
    pub(super) fn with_hold_limit(mut self, limit: Option<Duration>) -> Self {
        self.hold_limit = limit;
        self
    }

    /// The earliest moment set since the last call (a dispatch, a cancel or a deadline
    /// gave a running query a new one): what a timer already set must be moved to, if
    /// earlier. Cheaper than [`next_moment`](Self::next_moment), which looks at every worker.
    pub(super) fn take_fresh(&mut self) -> Option<Instant> {
        self.fresh.take()
    }

    fn set_moment(&mut self, at: Instant) {
        self.fresh = Some(self.fresh.map_or(at, |f| f.min(at)));
    }

    /// Slots (what the scheduler sees as workers).
    pub(super) fn len(&self) -> usize {
        self.states.len()
    }

    /// Workers: handlers that may run at once.
    pub(super) fn workers(&self) -> usize {
        self.workers
    }

    pub(super) fn state(&self, slot: WorkerSlot) -> Option<&State> {
        self.states.get(usize::from(slot))
    }

    pub(super) fn stream(&self) -> Stream {
        self.stream
    }

    /// Grows to `n` workers (`2n` slots with prefetch, at most
    /// [`MAX_WORKERS_PER_STREAM`]); new slots ask for work at once if a stream is open, and
    /// held queries start on new workers.
    pub(super) fn grow(&mut self, n: usize, now: Instant, out: &mut Vec<Action>) {
        let max_slots = usize::from(MAX_WORKERS_PER_STREAM);
        let n = n.min(max_slots);
        self.workers = self.workers.max(n);
        let slots = (n * usize::from(slots_per_loop(self.prefetch))).min(max_slots);
        self.start_held(now, out);
        while self.states.len() < slots {
            let slot = self.states.len();
            self.states.push(State::Idle);
            self.in_flight.push(VecDeque::new());
            if self.stream == Stream::Open {
                self.ask(slot, None, out);
            }
        }
    }

    /// A dequeue stream was opened: every free worker asks for work on it (with prefetch,
    /// once the scheduler is told that the slots come in pairs).
    pub(super) fn opened(&mut self, out: &mut Vec<Action>) {
        self.stream = Stream::Open;
        if self.prefetch {
            out.push(Action::Send(QuerierToScheduler::LoopSlots {
                slots_per_loop: slots_per_loop(true),
            }));
        }
        for slot in 0..self.states.len() {
            if matches!(self.states[slot], State::Idle | State::Waiting) {
                self.ask(slot, None, out);
            }
        }
    }

    /// The stream ended (lost, or closed by us): waiting and resting workers wait no
    /// more. Running and held queries go on (held ones are no longer given back: the next
    /// stream's scheduler does not know them) and their results are delivered; the
    /// scheduler is not told.
    pub(super) fn closed(&mut self) {
        self.stream = Stream::None;
        self.settle_on_stream_end();
    }

    fn settle_on_stream_end(&mut self) {
        for s in &mut self.states {
            match s {
                State::Waiting | State::Resting { .. } => *s = State::Idle,
                State::Held(run) => run.hand_back_at = None,
                _ => {}
            }
        }
    }

    /// The scheduler said `ShuttingDown`: nothing more is asked for on this stream.
    pub(super) fn draining(&mut self) {
        if self.stream == Stream::Open {
            self.stream = Stream::Draining;
        }
        self.settle_on_stream_end();
    }

    /// Whether any worker runs a query, holds one or waits to report one.
    pub(super) fn busy(&self) -> bool {
        self.states
            .iter()
            .any(|s| matches!(s, State::Running(_) | State::Held(_) | State::Settling { .. }))
    }

    /// Whether any result is still being delivered.
    pub(super) fn delivering(&self) -> bool {
        self.in_flight.iter().any(|d| !d.is_empty())
    }

    /// The scheduler dispatched `query_id` to `slot`: it starts (`Start`) if a worker is
    /// free, or is held. Err: the slot did not ask for work (the scheduler broke the
    /// protocol).
    pub(super) fn dispatched(
        &mut self,
        slot: WorkerSlot,
        query_id: QueryId,
        timeout: Option<Duration>,
        now: Instant,
        out: &mut Vec<Action>,
    ) -> Result<(), String> {
        let i = usize::from(slot);
        match self.states.get(i) {
            None => return Err(format!("a dispatch for worker {slot}, which does not exist")),
            Some(s) if *s != State::Waiting => {
                return Err(format!("a dispatch for worker {slot}, which did not ask for work"));
            }
            Some(_) => {}
        }
        let mut run = Run {
            query_id,
            deadline: timeout.map(|t| now + t),
            confirm_at: Some(now + self.confirm_after),
            abort_at: None,
            hand_back_at: None,
            started: None,
        };
        let held = self.running >= self.workers || !self.loop_free(i);
        if held {
            run.hand_back_at = self
                .hold_limit
                .filter(|_| self.stream == Stream::Open)
                .map(|limit| now + limit);
        } else {
            run.started = Some(now);
        }
        let next = run.next_moment();
        if held {
            self.states[i] = State::Held(run);
            self.held.push_back(i);
        } else {
            self.states[i] = State::Running(run);
            self.running += 1;
            out.push(Action::Start(slot));
        }
        if let Some(at) = next {
            self.set_moment(at);
        }
        Ok(())
    }

    /// Whether no slot of `i`'s worker loop runs a query.
    fn loop_free(&self, i: usize) -> bool {
        self.loop_slots(i).all(|j| !matches!(self.states[j], State::Running(_)))
    }

    /// The slots of `i`'s worker loop (`i` among them): with prefetch, loop `k` has slots
    /// `2k` and `2k + 1`, numbers that stay when the link grows. The scheduler places them
    /// as one worker (docs/queue.md).
    fn loop_slots(&self, i: usize) -> std::ops::Range<usize> {
        let n = usize::from(slots_per_loop(self.prefetch));
        let first = i / n * n;
        first..(first + n).min(self.states.len())
    }

    /// Starts held queries, oldest first, whose worker loop is free (at most `workers`
    /// running in all).
    fn start_held(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut k = 0;
        while k < self.held.len() && self.running < self.workers {
            let i = self.held[k];
            if !self.loop_free(i) {
                k += 1;
                continue;
            }
            self.held.remove(k);
            let State::Held(mut run) = std::mem::replace(&mut self.states[i], State::Idle) else {
                unreachable!("only held slots are queued");
            };
            run.hand_back_at = None;
            run.started = Some(now);
            self.states[i] = State::Running(run);
            self.running += 1;
            out.push(Action::Start(slot_of(i)));
        }
    }

    /// A held query still held at its limit goes back to the scheduler unstarted; its slot
    /// rests.
    fn hand_back(&mut self, i: usize, out: &mut Vec<Action>) {
        let State::Held(run) = std::mem::replace(&mut self.states[i], State::Resting { woken: false }) else {
            unreachable!("only held queries are given back");
        };
        self.held.retain(|h| *h != i);
        out.push(Action::Send(QuerierToScheduler::HandBack {
            worker: slot_of(i),
            query_id: run.query_id,
        }));
        out.push(Action::Drop(slot_of(i)));
    }

    /// A handler of `i`'s loop returned within the hold limit: the loop's resting slot may
    /// ask again.
    fn wake_loop(&mut self, i: usize, out: &mut Vec<Action>) {
        for j in self.loop_slots(i) {
            if self.states[j] == (State::Resting { woken: false }) {
                self.states[j] = State::Resting { woken: true };
                self.report_if_settled(j, out);
            }
        }
    }

    /// A held query ends without running (cancelled, or past its deadline): forgotten,
    /// and its slot reports it like a finished one.
    fn drop_held(&mut self, i: usize, out: &mut Vec<Action>) {
        let State::Held(run) = std::mem::replace(&mut self.states[i], State::Idle) else {
            return;
        };
        self.held.retain(|h| *h != i);
        out.push(Action::Drop(slot_of(i)));
        let finished = Finished {
            query_id: run.query_id,
            measured_cost: None,
        };
        self.states[i] = State::Settling {
            finished,
            delivery: None,
        };
        self.report_if_settled(i, out);
    }

    /// The scheduler cancelled `query_id` on `slot` (ignored if that worker no longer
    /// runs it).
    pub(super) fn cancel(&mut self, slot: WorkerSlot, query_id: QueryId, now: Instant, out: &mut Vec<Action>) {
        let i = usize::from(slot);
        if let Some(State::Held(run)) = self.states.get(i)
            && run.query_id == query_id
        {
            return self.drop_held(i, out);
        }
        if let Some(State::Running(run)) = self.states.get_mut(i)
            && run.query_id == query_id
            && !run.cancelled()
        {
            run.abort_at = Some(now + self.cancel_grace);
            out.push(Action::Cancel(slot));
            self.set_moment(now + self.cancel_grace);
        }
    }

    /// The earliest moment at which [`tick`](Self::tick) has something to do.
    pub(super) fn next_moment(&self) -> Option<Instant> {
        self.states
            .iter()
            .filter_map(|s| match s {
                State::Running(run) | State::Held(run) => run.next_moment(),
                _ => None,
            })
            .min()
    }

    /// Confirms, cancels at their deadline and aborts after their grace the running
    /// queries whose moment has come; drops held ones at their deadline, gives them back
    /// at the hold limit, and confirms those that cannot be given back.
    pub(super) fn tick(&mut self, now: Instant, out: &mut Vec<Action>) {
        let mut expired = Vec::new();
        let mut given_back = Vec::new();
        for (i, state) in self.states.iter_mut().enumerate() {
            let slot = slot_of(i);
            if let State::Held(run) = state {
                if run.deadline.is_some_and(|at| at <= now) {
                    expired.push(i);
                } else if run.hand_back_at.is_some_and(|at| at <= now) {
                    given_back.push(i);
                } else if run.confirm_at.is_some_and(|at| at <= now) {
                    run.confirm_at = None;
                    out.push(Action::Confirm(slot));
                }
                continue;
            }
            let State::Running(run) = state else { continue };
            if run.abort_at.is_some_and(|at| at <= now) {
                run.abort_at = Some(now + Duration::from_secs(86_400 * 365)); // once
                out.push(Action::Abort(slot));
            } else if !run.cancelled() && run.deadline.is_some_and(|at| at <= now) {
                run.abort_at = Some(now + self.cancel_grace);
                out.push(Action::Cancel(slot));
            }
            if run.confirm_at.is_some_and(|at| at <= now) {
                run.confirm_at = None;
                if !run.cancelled() {
                    out.push(Action::Confirm(slot));
                }
            }
        }
        for i in expired {
            self.drop_held(i, out);
        }
        for i in given_back {
            self.hand_back(i, out);
        }
    }

    /// `slot`'s handler returned (or was aborted) at `now`; `delivery` numbers its result's
    /// delivery if one was handed to a sender, and `measured_cost` is reported with the
    /// worker's next `Ready`, sent once its previous delivery is settled.
    pub(super) fn done(
        &mut self,
        slot: WorkerSlot,
        delivery: Option<u64>,
        measured_cost: Option<u32>,
        now: Instant,
        out: &mut Vec<Action>,
    ) {
        let i = usize::from(slot);
        if !matches!(self.states.get(i), Some(State::Running(_))) {
            return;
        }
        let State::Running(run) = std::mem::replace(&mut self.states[i], State::Idle) else {
            unreachable!("checked above");
        };
        self.running -= 1;
        let finished = Finished {
            query_id: run.query_id,
            measured_cost,
        };
        if let Some(d) = delivery {
            self.in_flight[i].push_back(d);
        }
        self.states[i] = State::Settling { finished, delivery };
        self.start_held(now, out);
        self.report_if_settled(i, out);
        if let (Some(limit), Some(started)) = (self.hold_limit, run.started)
            && now.saturating_duration_since(started) < limit
        {
            self.wake_loop(i, out);
        }
    }

    /// Delivery `delivery` of `slot` is settled (arrived, or given up).
    pub(super) fn settled(&mut self, slot: WorkerSlot, delivery: u64, out: &mut Vec<Action>) {
        let i = usize::from(slot);
        if let Some(d) = self.in_flight.get_mut(i) {
            d.retain(|x| *x != delivery);
            self.report_if_settled(i, out);
        }
    }

    /// Whether `slot`'s query is cancelled (its result is then not sent).
    pub(super) fn is_cancelled(&self, slot: WorkerSlot) -> bool {
        matches!(self.state(slot), Some(State::Running(run)) if run.cancelled())
    }

    /// A settling worker reports its query once no delivery older than its own is in
    /// flight; a woken resting one asks again once none is.
    fn report_if_settled(&mut self, i: usize, out: &mut Vec<Action>) {
        if self.states[i] == (State::Resting { woken: true }) {
            if self.in_flight[i].is_empty() && self.stream == Stream::Open {
                self.ask(i, None, out);
            }
            return;
        }
        let State::Settling { delivery, .. } = &self.states[i] else {
            return;
        };
        if self.in_flight[i].iter().any(|d| Some(*d) != *delivery) {
            return;
        }
        let State::Settling { finished, .. } = std::mem::replace(&mut self.states[i], State::Idle) else {
            unreachable!("checked above");
        };
        match self.stream {
            Stream::Open => self.ask(i, Some(finished), out),
            // The last word on a draining stream: the scheduler learns the query ended.
            Stream::Draining => out.push(Action::Send(QuerierToScheduler::Ready {
                worker: slot_of(i),
                finished: Some(finished),
            })),
            Stream::None => {}
        }
    }

    fn ask(&mut self, i: usize, finished: Option<Finished>, out: &mut Vec<Action>) {
        self.states[i] = State::Waiting;
        out.push(Action::Send(QuerierToScheduler::Ready {
            worker: slot_of(i),
            finished,
        }));
    }
}

fn slot_of(i: usize) -> WorkerSlot {
    WorkerSlot::try_from(i).expect("worker counts are bounded by MAX_WORKERS_PER_STREAM")
}

#[cfg(test)]
mod tests;
