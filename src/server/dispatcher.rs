//! The dispatcher: the one task that owns the [`TreeQueue`]. Connection tasks send it
//! [`Command`]s; it answers through each connection's outbound channel and never waits on
//! a peer, so one slow connection cannot stall the others.
//!
//! It also keeps what the queue core does not: which worker runs which query (to fail
//! the query at once when that worker's connection breaks, and to forward cancels), the
//! frontends' result endpoints, and the drain at shutdown.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use sluice_protocol::{
    Dispatch, Enqueue, EnqueueStatus, Finished, FrontendAddress, Limits, LoadHint, QueryErrorKind, QueryId,
    SchedulerToFrontend, SchedulerToQuerier,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

use crate::queue::{
    Dequeue, EnqueueOptions, QueryKey, QueueConfig, QueuePath, Queued, RejectReason, TreeQueue, WorkerId,
};

use super::status::{Status, WorkerStatus};

/// Outbound messages to one frontend connection.
pub(crate) type FrontendTx = mpsc::UnboundedSender<SchedulerToFrontend>;
/// Outbound messages to one querier worker stream.
pub(crate) type WorkerTx = mpsc::UnboundedSender<SchedulerToQuerier>;

/// What connection tasks ask of the dispatcher.
#[derive(Debug)]
pub(crate) enum Command {
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
    FrontendClosed {
        frontend: u64,
    },
    WorkerOpened {
        querier: String,
        tx: WorkerTx,
        reply: oneshot::Sender<WorkerId>,
    },
    Ready {
        worker: WorkerId,
        finished: Option<Finished>,
    },
    WorkerClosed {
        worker: WorkerId,
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
    /// Stop taking enqueues, keep dispatching for `drain_timeout`, then hand back the rest.
    /// `done` fires when the queue is empty.
    Shutdown {
        drain_timeout: Duration,
        done: oneshot::Sender<()>,
    },
}

/// A queued query, as the queue core holds it.
struct Pending {
    enqueue: Box<Enqueue>,
}

impl Queued for Pending {
    fn path(&self) -> QueuePath<'_> {
        QueuePath {
            component: self.enqueue.component.as_deref(),
            tenant: &self.enqueue.tenant,
            actors: &self.enqueue.actors,
        }
    }

    fn size_bytes(&self) -> u64 {
        let meta: usize = self.enqueue.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        (self.enqueue.payload.len() + meta) as u64
    }
}

struct Frontend {
    name: String,
    tx: FrontendTx,
    address: Option<FrontendAddress>,
}

struct Worker {
    querier: String,
    tx: WorkerTx,
    /// The query this worker runs, until its next `Ready`.
    running: Option<QueryKey>,
}

struct Draining {
    until: Instant,
    done: oneshot::Sender<()>,
}

pub(crate) struct Dispatcher {
    queue: TreeQueue<Pending>,
    limits: Limits,
    frontends: HashMap<u64, Frontend>,
    next_frontend: u64,
    workers: HashMap<WorkerId, Worker>,
    /// Workers that asked for work and got none, longest waiting first.
    waiting: VecDeque<WorkerId>,
    /// Which worker runs each dispatched query.
    running: HashMap<QueryKey, WorkerId>,
    draining: Option<Draining>,
    scheduler_id: String,
    started: Instant,
}

/// How often deadlines are swept and disconnected queriers forgotten.
pub(crate) const TICK: Duration = Duration::from_millis(100);

impl Dispatcher {
    pub(crate) fn new(scheduler_id: String, queue: QueueConfig, limits: Limits) -> Result<Self, String> {
        let now = Instant::now();
        Ok(Dispatcher {
            queue: TreeQueue::new(queue, now).map_err(|e| e.to_string())?,
            limits,
            frontends: HashMap::new(),
            next_frontend: 1,
            workers: HashMap::new(),
            waiting: VecDeque::new(),
            running: HashMap::new(),
            draining: None,
            scheduler_id,
            started: now,
        })
    }

    /// Runs until every command sender is gone.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => self.handle(cmd, Instant::now()),
                    None => break,
                },
                _ = tick.tick() => self.tick(Instant::now()),
            }
        }
    }

    fn load(&self) -> LoadHint {
        LoadHint {
            queued: u32::try_from(self.queue.len()).unwrap_or(u32::MAX),
            idle_workers: u32::try_from(self.waiting.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn handle(&mut self, cmd: Command, now: Instant) {
        match cmd {
            Command::FrontendOpened { name, tx, reply } => {
                let id = self.next_frontend;
                self.next_frontend += 1;
                if self.draining.is_some() {
                    let _ = tx.send(SchedulerToFrontend::ShuttingDown);
                }
                self.frontends.insert(
                    id,
                    Frontend {
                        name,
                        tx,
                        address: None,
                    },
                );
                let _ = reply.send(id);
            }
            Command::ResultEndpoint { frontend, address } => {
                if let Some(f) = self.frontends.get_mut(&frontend) {
                    f.address = Some(address);
                }
            }
            Command::Enqueue {
                frontend,
                enqueue,
                received,
            } => self.enqueue(now, frontend, enqueue, received),
            Command::Cancel { frontend, query } => self.cancel(QueryKey { frontend, query }),
            Command::FrontendClosed { frontend } => self.frontend_closed(frontend),
            Command::WorkerOpened { querier, tx, reply } => {
                let id = self.queue.register_worker(now, &querier);
                if self.draining.is_some() {
                    let _ = tx.send(SchedulerToQuerier::ShuttingDown);
                }
                self.workers.insert(
                    id,
                    Worker {
                        querier,
                        tx,
                        running: None,
                    },
                );
                let _ = reply.send(id);
            }
            Command::Ready { worker, finished } => self.ready(now, worker, finished),
            Command::WorkerClosed { worker } => self.worker_closed(now, worker),
            Command::QuerierShuttingDown { querier, reply } => {
                self.queue.notify_querier_shutdown(now, &querier);
                let workers = &self.workers;
                self.waiting.retain(|w| {
                    let theirs = workers.get(w).is_some_and(|x| x.querier == querier);
                    if theirs {
                        let _ = workers[w].tx.send(SchedulerToQuerier::ShuttingDown);
                    }
                    !theirs
                });
                info!(%querier, "querier announced shutdown");
                let _ = reply.send(());
            }
            Command::SetQueueConfig { config, reply } => {
                let result = self.queue.set_config(config).map_err(|e| e.to_string());
                let _ = reply.send(result);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status(now));
            }
            Command::Shutdown { drain_timeout, done } => {
                info!(queued = self.queue.len(), ?drain_timeout, "draining");
                for f in self.frontends.values() {
                    let _ = f.tx.send(SchedulerToFrontend::ShuttingDown);
                }
                self.draining = Some(Draining {
                    until: now + drain_timeout,
                    done,
                });
                self.tick(now);
            }
        }
    }

    fn enqueue(&mut self, now: Instant, frontend: u64, enqueue: Box<Enqueue>, received: Instant) {
        let Some(f) = self.frontends.get(&frontend) else {
            return; // its connection already closed
        };
        let query_id = enqueue.query_id;
        let status = if self.draining.is_some() {
            EnqueueStatus::ShuttingDown
        } else if f.address.is_none() {
            EnqueueStatus::Invalid {
                reason: "the result endpoint must be announced before the first enqueue".into(),
            }
        } else if let Err(e) = enqueue.validate(&self.limits) {
            EnqueueStatus::Invalid { reason: e.to_string() }
        } else {
            let options = EnqueueOptions {
                deadline: enqueue.timeout_ms.map(|ms| received + Duration::from_millis(ms)),
            };
            let key = QueryKey {
                frontend,
                query: query_id,
            };
            match self.queue.enqueue(now, key, Pending { enqueue }, options) {
                Ok(()) => EnqueueStatus::Accepted,
                Err(rejected) => match rejected.reason {
                    RejectReason::TooManyOutstanding { limit } => EnqueueStatus::TooManyOutstanding { limit },
                    RejectReason::QueueFull { .. } | RejectReason::QueueBytesFull { .. } => EnqueueStatus::QueueFull,
                    RejectReason::Duplicate => EnqueueStatus::Invalid {
                        reason: format!("query {query_id} is already queued"),
                    },
                },
            }
        };
        let accepted = status == EnqueueStatus::Accepted;
        let _ = f.tx.send(SchedulerToFrontend::EnqueueStatus {
            query_id,
            status,
            load: self.load(),
        });
        if accepted {
            self.serve_waiting(now);
        }
    }

    fn cancel(&mut self, key: QueryKey) {
        if self.queue.cancel(key).is_some() {
            debug!(?key, "cancelled while queued");
            return;
        }
        if let Some(w) = self.running.get(&key).and_then(|w| self.workers.get(w)) {
            let _ = w.tx.send(SchedulerToQuerier::Cancel { query_id: key.query });
        }
    }

    fn frontend_closed(&mut self, frontend: u64) {
        let removed = self.queue.cancel_frontend(frontend).len();
        let running: Vec<QueryKey> = self
            .running
            .keys()
            .filter(|k| k.frontend == frontend)
            .copied()
            .collect();
        for key in running {
            self.cancel(key);
        }
        if let Some(f) = self.frontends.remove(&frontend) {
            debug!(frontend = %f.name, removed, "frontend gone");
        }
    }

    fn ready(&mut self, now: Instant, worker: WorkerId, _finished: Option<Finished>) {
        let Some(w) = self.workers.get_mut(&worker) else {
            return;
        };
        if let Some(key) = w.running.take() {
            self.running.remove(&key);
        }
        if !self.try_dispatch(now, worker) {
            self.waiting.push_back(worker);
        }
        self.send_expired();
    }

    /// Gives `worker` its next query if there is one; false if it must wait.
    fn try_dispatch(&mut self, now: Instant, worker: WorkerId) -> bool {
        match self.queue.dequeue(now, worker) {
            Dequeue::Dispatch(d) => {
                let Some(w) = self.workers.get_mut(&worker) else {
                    return true;
                };
                let Some(address) = self.frontends.get(&d.key.frontend).and_then(|f| f.address.clone()) else {
                    return false; // cannot happen: a closed frontend's queries are cancelled
                };
                let e = *d.request.enqueue;
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
                    payload: e.payload,
                };
                if w.tx.send(SchedulerToQuerier::Dispatch(Box::new(dispatch))).is_ok() {
                    w.running = Some(d.key);
                    self.running.insert(d.key, worker);
                } else {
                    // The stream task is gone and its close is on the way: fail the query now.
                    self.query_error(d.key, QueryErrorKind::QuerierFailed, "querier stream closed".into());
                }
                true
            }
            Dequeue::Empty => false,
            Dequeue::ShuttingDown => {
                if let Some(w) = self.workers.get(&worker) {
                    let _ = w.tx.send(SchedulerToQuerier::ShuttingDown);
                }
                true
            }
            Dequeue::UnknownWorker => true,
        }
    }

    /// Hands queued work to waiting workers, longest waiting first.
    fn serve_waiting(&mut self, now: Instant) {
        let mut still = VecDeque::new();
        while let Some(w) = self.waiting.pop_front() {
            if self.queue.is_empty() {
                still.push_back(w);
                continue;
            }
            if !self.try_dispatch(now, w) {
                still.push_back(w);
            }
        }
        self.waiting = still;
        self.send_expired();
    }

    fn worker_closed(&mut self, now: Instant, worker: WorkerId) {
        let Some(w) = self.workers.remove(&worker) else {
            return;
        };
        self.waiting.retain(|x| *x != worker);
        if let Some(key) = w.running {
            self.running.remove(&key);
            warn!(querier = %w.querier, query = key.query, "querier worker gone while running a query");
            self.query_error(
                key,
                QueryErrorKind::QuerierFailed,
                format!("querier {} disconnected while running the query", w.querier),
            );
        }
        self.queue.unregister_worker(now, worker);
    }

    fn query_error(&self, key: QueryKey, kind: QueryErrorKind, message: String) {
        if let Some(f) = self.frontends.get(&key.frontend) {
            let _ = f.tx.send(SchedulerToFrontend::QueryError {
                query_id: key.query,
                kind,
                message,
            });
        }
    }

    fn send_expired(&mut self) {
        while let Some(e) = self.queue.poll_expired() {
            let message = format!("deadline passed after {:?} in the queue", e.queue_time);
            self.query_error(e.key, QueryErrorKind::DeadlineExceeded, message);
        }
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        self.queue.expire(now);
        self.send_expired();
        self.queue.forget_disconnected_queriers(now);
        let drained = match &self.draining {
            Some(d) => self.queue.is_empty() || now >= d.until,
            None => false,
        };
        if drained {
            let handed_back = self.queue.drain();
            if !handed_back.is_empty() {
                info!(
                    count = handed_back.len(),
                    "handing queued queries back to their frontends"
                );
            }
            for (key, _) in handed_back {
                self.query_error(
                    key,
                    QueryErrorKind::HandedBack,
                    "scheduler shutting down; the query was not run".into(),
                );
            }
            for w in self.workers.values() {
                let _ = w.tx.send(SchedulerToQuerier::ShuttingDown);
            }
            self.waiting.clear();
            if let Some(d) = self.draining.take() {
                let _ = d.done.send(());
            }
        }
    }

    fn status(&self, now: Instant) -> Status {
        let mut workers: Vec<WorkerStatus> = self
            .workers
            .iter()
            .map(|(id, w)| WorkerStatus {
                querier: w.querier.clone(),
                slot: id.slot,
                busy: w.running.is_some(),
            })
            .collect();
        workers.sort_by(|a, b| (&a.querier, a.slot).cmp(&(&b.querier, b.slot)));
        let mut frontends: Vec<String> = self.frontends.values().map(|f| f.name.clone()).collect();
        frontends.sort();
        Status {
            scheduler_id: self.scheduler_id.clone(),
            uptime: now.saturating_duration_since(self.started),
            draining: self.draining.is_some(),
            queued: self.queue.len(),
            queued_bytes: self.queue.queued_bytes(),
            running: self.running.len(),
            counters: self.queue.counters(),
            tenants: self.queue.tenant_stats(now),
            components: self.queue.component_lengths(),
            queriers: self.queue.querier_stats(now),
            workers,
            frontends,
        }
    }
}
