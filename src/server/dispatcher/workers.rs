//! The querier side of the dispatcher: dequeue streams and their workers, the workers'
//! turns (`Ready`, waiting, parked), dispatch to the longest-waiting worker, and what a
//! worker's loss does to the query it runs or delivers.

use std::time::Instant;

use metrics::counter;
use sluice_client::trace::TraceParent;
use sluice_protocol::{
    Dispatch, Finished, MAX_SLOTS_PER_LOOP, MAX_WORKERS_PER_STREAM, QueryErrorKind, QueryId, SchedulerToQuerier,
    WorkerSlot,
};
use tracing::{debug, warn};

use super::{Dispatcher, Phase, WorkerTx};
use crate::metrics as m;
use crate::queue::{Dequeue, FastMap, QueryKey, WorkerId};

/// A querier connection's dequeue stream: its workers, by the slot the querier numbered
/// each with.
pub(super) struct DequeueStream {
    pub(super) querier: String,
    pub(super) tx: WorkerTx,
    pub(super) workers: FastMap<WorkerSlot, WorkerId>,
    /// Slots per worker loop, if the querier said (`LoopSlots`): worker `slot` is in the
    /// queue's lane `slot / slots_per_loop` (otherwise `slot`).
    pub(super) slots_per_loop: Option<u8>,
    /// It was told `ShuttingDown` (once per stream, not once per worker).
    pub(super) told_shutting_down: bool,
}

impl DequeueStream {
    pub(super) fn tell_shutting_down(&mut self) {
        if !std::mem::replace(&mut self.told_shutting_down, true) {
            let _ = self.tx.send(SchedulerToQuerier::ShuttingDown);
        }
    }
}

pub(super) struct Worker {
    pub(super) querier: String,
    /// Its dequeue stream.
    pub(super) stream: u64,
    /// Its stream's outbox, and its number on that stream.
    pub(super) tx: WorkerTx,
    pub(super) slot: WorkerSlot,
    /// The query this worker runs, until its next `Ready`.
    pub(super) running: Option<QueryKey>,
    /// The query whose result this worker's querier is delivering (it said `Ready` once
    /// the result was handed to its sender), until its next `Ready` says it is settled.
    pub(super) delivering: Option<QueryKey>,
    /// In `waiting`: it said `Ready` and got nothing yet (a second `Ready` breaks the protocol).
    pub(super) waiting: bool,
}

/// A dispatched query, until its worker says `Ready` again.
pub(super) struct Running {
    pub(super) worker: WorkerId,
    pub(super) tenant: String,
    pub(super) component: Option<String>,
    /// The cost debited from the tenant at dispatch (the hint, default 1).
    pub(super) cost: u32,
    /// Its class and when it was dispatched, for the service time admission adds.
    pub(super) priority: u8,
    pub(super) since: Instant,
    /// Its frontend cancelled it and was answered `Cancelled`: it is owed nothing more, even
    /// if its worker goes away before the querier confirms with its next `Ready`.
    pub(super) cancelled: bool,
}

impl Dispatcher {
    /// The worker numbered `slot` on dequeue stream `stream`, registered with the queue
    /// at its first `Ready`. None if the stream is gone, or the slot is out of bounds (the
    /// querier's connection is then closed).
    pub(super) fn worker_of(&mut self, now: Instant, stream: u64, slot: WorkerSlot) -> Option<WorkerId> {
        let s = self.streams.get_mut(&stream)?;
        if let Some(id) = s.workers.get(&slot) {
            return Some(*id);
        }
        if slot >= MAX_WORKERS_PER_STREAM {
            warn!(querier = %s.querier, slot, max = MAX_WORKERS_PER_STREAM, "worker slot out of bounds; closing the connection");
            s.tx.protocol_violation();
            return None;
        }
        let lane = slot / u16::from(s.slots_per_loop.unwrap_or(1));
        let id = self.queue.register_worker_in_lane(now, &s.querier, lane);
        s.workers.insert(slot, id);
        let worker = Worker {
            querier: s.querier.clone(),
            stream,
            tx: s.tx.clone(),
            slot,
            running: None,
            delivering: None,
            waiting: false,
        };
        self.workers.insert(id, worker);
        Some(id)
    }

    /// The querier says its workers on `stream` come in groups of `n` slots per worker loop
    /// (prefetch). Allowed once, before the stream's first worker registers; anything else
    /// closes the connection.
    pub(super) fn loop_slots(&mut self, stream: u64, n: u8) {
        let Some(s) = self.streams.get_mut(&stream) else { return };
        if n == 0 || n > MAX_SLOTS_PER_LOOP || s.slots_per_loop.is_some() || !s.workers.is_empty() {
            warn!(querier = %s.querier, slots_per_loop = n, max = MAX_SLOTS_PER_LOOP, "LoopSlots out of bounds, repeated or after a Ready; closing the connection");
            s.tx.protocol_violation();
            return;
        }
        s.slots_per_loop = Some(n);
    }

    pub(super) fn ready(&mut self, now: Instant, worker: WorkerId, finished: Option<Finished>) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if w.waiting {
            // A worker that waits has nothing to report and must not be counted twice.
            warn!(querier = %w.querier, "Ready from a worker that was already waiting; closing its connection");
            w.tx.protocol_violation();
            w.waiting = false;
            self.waiting.retain(|x| *x != worker);
            return;
        }
        // The worker's previous delivery is settled; the query it ran is now delivering.
        // (The map's entry goes only if it is still this worker's: the key may have been
        // placed again and be delivering through another worker now.)
        if let Some(settled) = w.delivering.take()
            && self.delivering.get(&settled) == Some(&worker)
        {
            self.delivering.remove(&settled);
        }
        if let Some(key) = w.running {
            w.delivering = Some(key);
            self.delivering.insert(key, worker);
        }
        if let Some(key) = w.running.take()
            && let Some(r) = self.running.remove(&key)
        {
            let measured = finished
                .filter(|f| f.query_id == key.query)
                .and_then(|f| f.measured_cost);
            if let Some(measured) = measured {
                self.queue.charge(&r.tenant, i64::from(measured) - i64::from(r.cost));
            }
            let took = now.saturating_duration_since(r.since);
            self.queue.record_service(r.component.as_deref(), r.priority, took);
            self.count_served_cost(r.tenant, measured.unwrap_or(r.cost));
        }
        if !self.try_dispatch(now, worker) {
            self.park(worker);
        }
        self.send_expired();
    }

    /// `worker` gives back `query`, held and never started: the tenant gets back what the
    /// dispatch debited, the frontend hears `HandedBack` (and places it again), and the
    /// worker waits for nothing until its next `Ready`. A worker that does not run `query`
    /// breaks the protocol.
    pub(super) fn hand_back(&mut self, worker: WorkerId, query: QueryId) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        let Some(key) = w.running.filter(|k| k.query == query) else {
            warn!(querier = %w.querier, query, "HandBack of a query the worker does not run; closing its connection");
            w.tx.protocol_violation();
            return;
        };
        w.running = None;
        let querier = w.querier.clone();
        let Some(r) = self.running.remove(&key) else { return };
        self.queue.charge(&r.tenant, -i64::from(r.cost));
        self.metrics.record(|| counter!(m::QUERIER_HAND_BACKS).increment(1));
        if r.cancelled {
            return; // its frontend heard `Cancelled` already
        }
        debug!(%querier, query, "handed back unstarted");
        self.query_error(
            key,
            QueryErrorKind::HandedBack,
            format!("querier {querier} held it behind a long query and gave it back unstarted"),
        );
    }

    /// Puts `worker` at the back of the waiting line.
    pub(super) fn park(&mut self, worker: WorkerId) {
        if let Some(w) = self.workers.get_mut(&worker) {
            w.waiting = true;
            self.waiting.push_back(worker);
        }
    }

    /// Gives `worker` its next query if there is one; false if it must wait. A request is
    /// taken from the queue only for a worker that exists, and a taken request always ends
    /// somewhere: dispatched, or handed back to its frontend.
    pub(super) fn try_dispatch(&mut self, now: Instant, worker: WorkerId) -> bool {
        if !self.workers.contains_key(&worker) {
            return true; // gone: nothing to wait for
        }
        loop {
            let d = match self.queue.dequeue(now, worker) {
                Dequeue::Dispatch(d) => d,
                Dequeue::Empty => return false,
                Dequeue::ShuttingDown => {
                    if let Some(s) = self.workers.get(&worker).and_then(|w| self.streams.get_mut(&w.stream)) {
                        s.tell_shutting_down();
                    }
                    return true;
                }
                Dequeue::UnknownWorker => return true,
            };
            let Some(address) = self.frontends.get(&d.key.frontend).and_then(|f| f.address.clone()) else {
                // Unreachable by construction (a gone frontend's queued queries are
                // cancelled with it), but never silent.
                warn!(key = ?d.key, "queued query of a frontend that is gone; discarded");
                let tenant = d.request.enqueue.tenant.clone();
                self.metrics.record(|| {
                    counter!(m::DISCARDED_REQUESTS, "tenant" => tenant, "reason" => "frontend_gone").increment(1)
                });
                continue;
            };
            let e = *d.request.enqueue;
            if tracing::enabled!(tracing::Level::DEBUG)
                && let Some(t) = TraceParent::of(&e.metadata)
            {
                debug!(query = e.query_id, tenant = %e.tenant, querier = %self.workers[&worker].querier, trace_id = %t.trace_id_hex(), queue_time = ?d.queue_time, "dispatch");
            }
            let (tenant, component) = (e.tenant.clone(), e.component.clone());
            let cost = e.cost_hint.unwrap_or(1).max(1);
            self.handles
                .queue_duration(&self.metrics, &tenant, component.as_deref())
                .record(d.queue_time.as_secs_f64());
            let timeout_ms = d
                .deadline
                .map(|dl| u64::try_from(dl.saturating_duration_since(now).as_millis()).unwrap_or(u64::MAX));
            let dispatch = Dispatch {
                query_id: e.query_id,
                frontend: address,
                tenant: e.tenant,
                actors: e.actors,
                component: e.component,
                metadata: e.metadata,
                queue_time_us: u64::try_from(d.queue_time.as_micros()).unwrap_or(u64::MAX),
                timeout_ms,
                attempt: e.attempt,
                capability: e.capability,
                payload: e.payload,
            };
            let w = self.workers.get_mut(&worker).expect("checked above");
            let msg = SchedulerToQuerier::Dispatch {
                worker: w.slot,
                dispatch: Box::new(dispatch),
            };
            if w.tx.send(msg) {
                w.running = Some(d.key);
                w.waiting = false;
                self.running.insert(
                    d.key,
                    Running {
                        worker,
                        tenant,
                        component,
                        cost,
                        priority: d.priority,
                        since: now,
                        cancelled: false,
                    },
                );
                self.notes.entry(d.key.frontend).or_default().push(d.key.query);
            } else {
                // The stream task is gone and its close is on the way. The query never
                // ran: its frontend places it again.
                self.query_error(
                    d.key,
                    QueryErrorKind::HandedBack,
                    "the worker it was dispatched to was gone; it did not run".into(),
                );
            }
            return true;
        }
    }

    /// Hands queued work to waiting workers, longest waiting first, stopping as soon as
    /// the queue is empty (so an enqueue costs one dispatch, not a walk of every waiting
    /// worker). Workers that could take nothing (shuffle sharding) keep their place. Called
    /// after every event that can make queued work eligible for a waiting worker.
    pub(super) fn serve_waiting(&mut self, now: Instant) {
        let mut skipped = Vec::new();
        while !self.queue.is_empty() {
            let Some(w) = self.waiting.pop_front() else { break };
            if let Some(x) = self.workers.get_mut(&w) {
                x.waiting = false;
            }
            if !self.try_dispatch(now, w) {
                skipped.push(w);
            }
        }
        for w in skipped.into_iter().rev() {
            if let Some(x) = self.workers.get_mut(&w) {
                x.waiting = true;
                self.waiting.push_front(w);
            }
        }
        self.send_expired();
    }

    pub(super) fn worker_closed(&mut self, now: Instant, worker: WorkerId) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.waiting.retain(|x| *x != worker);
        if let Some(key) = w.delivering
            && self.delivering.remove(&key) == Some(worker)
            && !matches!(self.phase, Phase::Closed)
        {
            // Its frontend ignores this if the result arrived.
            debug!(querier = %w.querier, query = key.query, "querier worker gone while delivering a result");
            self.query_error(
                key,
                QueryErrorKind::QuerierFailed,
                format!("querier {} disconnected while delivering the result", w.querier),
            );
        }
        if let Some(key) = w.running {
            let cancelled = self.running.remove(&key).is_some_and(|r| {
                let cancelled = r.cancelled;
                self.count_served_cost(r.tenant, r.cost);
                cancelled
            });
            if matches!(self.phase, Phase::Closed) {
                debug!(querier = %w.querier, query = key.query, "worker stream closed at shutdown while running");
                self.queue.unregister_worker(now, worker);
                return;
            }
            if cancelled {
                // Its frontend heard `Cancelled` already: one answer per query.
                debug!(querier = %w.querier, query = key.query, "querier worker gone while its cancelled query stopped");
            } else {
                warn!(querier = %w.querier, query = key.query, "querier worker gone while running a query");
                self.metrics.record(|| counter!(m::QUERIER_FAILURES).increment(1));
                self.query_error(
                    key,
                    QueryErrorKind::QuerierFailed,
                    format!("querier {} disconnected while running the query", w.querier),
                );
            }
        }
        self.queue.unregister_worker(now, worker);
        // The querier's last worker may have gone: its shards move to others.
        self.serve_waiting(now);
    }

    pub(super) fn count_served_cost(&mut self, tenant: String, cost: u32) {
        self.handles
            .served_cost(&self.metrics, &tenant)
            .increment(u64::from(cost));
    }
}
