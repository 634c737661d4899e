//! The dispatcher: the one task that owns the [`TreeQueue`]. Connection tasks send it
//! [`Command`]s; it answers through each connection's outbound channel and never waits on
//! a peer, so one slow connection cannot stall the others.
//!
//! It also keeps what the queue core does not: which worker runs which query (to fail
//! the query at once when that worker's connection breaks, and to forward cancels), the
//! frontends' result endpoints, which queries each frontend must be told were dispatched,
//! the querier protocol's turn-taking, and the phase of the scheduler's life
//! (serving → draining → closed).

use std::collections::{BTreeSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use metrics::counter;

use sluice_protocol::{
    FrontendAddress, Limits, LoadHint, MAX_ID_LEN, QueryErrorKind, QueryId, SchedulerToFrontend, SchedulerToQuerier,
    WorkerSlot,
};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info, warn};

mod admission;
mod cluster;
mod command;
mod handles;
mod outbox;
mod report;
mod workers;

use admission::Pending;
pub(crate) use cluster::forward as forward_load_reports;
pub(crate) use command::Command;
pub(crate) use outbox::{FrontendTx, OUTBOX_CAPACITY, Outbox, WorkerTx};
use workers::{DequeueStream, Running, Worker};

use crate::queue::{FastMap, QueryKey, QueueConfig, TreeQueue, WorkerId};

use crate::metrics::{self as m, Metrics};

struct Frontend {
    name: String,
    tx: FrontendTx,
    address: Option<Arc<FrontendAddress>>,
}

/// Where the scheduler is in its life; admission is open only while `Serving`, and never
/// reopens.
enum Phase {
    Serving,
    /// No enqueues; queued work is still dispatched until the queue is empty or `until`.
    Draining {
        until: Instant,
        done: oneshot::Sender<()>,
    },
    /// The drain is over and the server is closing its connections: a worker stream that
    /// ends now was closed by us, and its querier still delivers its result.
    Closed,
}

/// Commands handled before the frontends are told what was dispatched (one batch).
const BATCH: usize = 256;

pub(crate) struct Dispatcher {
    queue: TreeQueue<Pending>,
    limits: Limits,
    frontends: FastMap<u64, Frontend>,
    next_frontend: u64,
    streams: FastMap<u64, DequeueStream>,
    next_stream: u64,
    workers: FastMap<WorkerId, Worker>,
    /// Workers that asked for work and got none, longest waiting first.
    waiting: VecDeque<WorkerId>,
    /// Which worker runs each dispatched query.
    running: FastMap<QueryKey, Running>,
    /// Which worker's querier delivers each finished query's result (see
    /// `Worker::delivering`); a key enqueued again or cancelled leaves it.
    delivering: FastMap<QueryKey, WorkerId>,
    /// Queries dispatched in this batch, per frontend: sent as one `Dispatched` frame at
    /// the batch's end, or before any other frame to that frontend.
    notes: FastMap<u64, Vec<QueryId>>,
    phase: Phase,
    scheduler_id: String,
    started: Instant,
    metrics: Arc<Metrics>,
    /// Tenants with per-tenant gauges set, so that they are zeroed once when they empty.
    reported_tenants: BTreeSet<String>,
    /// Priority classes with a gauge set, likewise.
    reported_classes: BTreeSet<u8>,
    ticks: u64,
    /// Sharing queued counts with the other schedulers, when gossiping.
    sharing: Option<cluster::Sharing>,
    /// Metric handles of the per-query path.
    handles: handles::Handles,
}

/// A frontend's name, for logs.
fn f_name(frontends: &FastMap<u64, Frontend>, id: u64) -> &str {
    frontends.get(&id).map_or("?", |f| f.name.as_str())
}

/// Bounds of the `/explain` dump: under half a millisecond of the dispatcher's time at
/// 100 000 requests queued (benches/queue.rs, `explain`).
pub(crate) const EXPLAIN_NODES: usize = 2_000;
pub(crate) const EXPLAIN_REQUESTS: usize = 1_000;

/// The `tenant` label of refusals for tenants with nothing queued.
pub(crate) const OTHER_TENANT: &str = "__other__";

/// How often deadlines are swept and disconnected queriers forgotten.
pub(crate) const TICK: Duration = Duration::from_millis(100);

impl Dispatcher {
    pub(crate) fn new(
        scheduler_id: String,
        queue: QueueConfig,
        limits: Limits,
        metrics: Arc<Metrics>,
    ) -> Result<Self, String> {
        let now = Instant::now();
        Ok(Dispatcher {
            queue: TreeQueue::new(queue, now).map_err(|e| e.to_string())?,
            limits,
            frontends: FastMap::default(),
            next_frontend: 1,
            streams: FastMap::default(),
            next_stream: 1,
            workers: FastMap::default(),
            waiting: VecDeque::new(),
            running: FastMap::default(),
            delivering: FastMap::default(),
            notes: FastMap::default(),
            phase: Phase::Serving,
            scheduler_id,
            started: now,
            metrics,
            reported_tenants: BTreeSet::new(),
            reported_classes: BTreeSet::new(),
            ticks: 0,
            sharing: None,
            handles: handles::Handles::default(),
        })
    }

    /// Makes tenant limits hold for the cluster: this scheduler reports its queued counts
    /// through `reporter` and counts the others' (`Command::PeerReport`).
    pub(crate) fn share_load(&mut self, reporter: sluice_client::gossip::Reporter) {
        self.sharing = Some(cluster::Sharing::new(Some(reporter)));
    }

    /// Counts the others' reports without sending any (the unit tests read the counts).
    #[cfg(test)]
    fn share_load_unsent(&mut self) {
        self.sharing = Some(cluster::Sharing::new(None));
    }

    /// Runs until every command sender is gone. Commands that wait are handled in
    /// batches; each batch ends by telling the frontends what was dispatched.
    pub(crate) async fn run(mut self, mut commands: mpsc::Receiver<Command>) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let report_due = self.sharing.as_ref().and_then(cluster::Sharing::due);
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    Some(cmd) => {
                        self.handle(cmd, Instant::now());
                        for _ in 1..BATCH {
                            let Ok(cmd) = commands.try_recv() else { break };
                            self.handle(cmd, Instant::now());
                        }
                    }
                    None => break,
                },
                _ = tick.tick() => self.tick(Instant::now()),
                // A report due, or a deferred enqueue's time up.
                _ = sleep_until(report_due) => self.retry_deferred(Instant::now()),
            }
            self.end_batch();
            self.report_load(Instant::now());
        }
    }

    /// Sends every frontend the queries dispatched for it since the last batch.
    pub(crate) fn end_batch(&mut self) {
        for (frontend, query_ids) in self.notes.drain() {
            if let Some(f) = self.frontends.get(&frontend) {
                let _ = f.tx.send(SchedulerToFrontend::Dispatched { query_ids });
            }
        }
    }

    /// Sends `msg` to a frontend, after the dispatch notes it is owed (so it never hears
    /// about a query before hearing that it was dispatched).
    fn tell_frontend(&mut self, frontend: u64, msg: SchedulerToFrontend) {
        let Some(f) = self.frontends.get(&frontend) else { return };
        if let Some(query_ids) = self.notes.remove(&frontend) {
            let _ = f.tx.send(SchedulerToFrontend::Dispatched { query_ids });
        }
        let _ = f.tx.send(msg);
    }

    fn serving(&self) -> bool {
        matches!(self.phase, Phase::Serving)
    }

    fn load(&self) -> LoadHint {
        LoadHint {
            queued: u32::try_from(self.queue.len()).unwrap_or(u32::MAX),
            idle_workers: u32::try_from(self.waiting.len()).unwrap_or(u32::MAX),
        }
    }

    pub(crate) fn handle(&mut self, cmd: Command, now: Instant) {
        if let Some(sharing) = &mut self.sharing {
            sharing.touch();
        }
        match cmd {
            Command::PeerReport(report) => {
                self.peer_report(*report, now);
                self.retry_deferred(now);
            }
            Command::PeersGone(schedulers) => {
                self.peers_gone(schedulers);
                self.retry_deferred(now);
            }
            Command::FrontendOpened { name, tx, reply } => {
                let id = self.next_frontend;
                self.next_frontend += 1;
                if !self.serving() {
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
                let Some(f) = self.frontends.get_mut(&frontend) else {
                    return;
                };
                let fields = [&address.id, &address.address, &address.server_name];
                if fields.iter().any(|x| x.is_empty() || x.len() > MAX_ID_LEN) {
                    warn!(frontend = %f.name, "result endpoint with an empty or over-long field; closing the connection");
                    f.tx.protocol_violation();
                    return;
                }
                if !sluice_protocol::frame_limit_allowed(address.max_frame_len) {
                    warn!(
                        frontend = %f.name,
                        max_frame_len = address.max_frame_len,
                        "result endpoint with a frame limit out of range; closing the connection"
                    );
                    f.tx.protocol_violation();
                    return;
                }
                f.address = Some(Arc::new(address));
            }
            Command::Enqueue {
                frontend,
                enqueue,
                received,
            } => self.enqueue(now, frontend, enqueue, received),
            Command::Cancel { frontend, query } => {
                self.cancel(QueryKey { frontend, query });
                self.tell_frontend(frontend, SchedulerToFrontend::Cancelled { query_id: query });
                self.serve_waiting(now);
            }
            Command::FrontendClosed { frontend, graceful } => self.frontend_closed(now, frontend, graceful),
            Command::DequeueOpened { querier, tx, reply } => {
                let id = self.next_stream;
                self.next_stream += 1;
                let mut s = DequeueStream {
                    querier,
                    tx,
                    workers: FastMap::default(),
                    slots_per_loop: None,
                    told_shutting_down: false,
                };
                // A querier that joins during the drain helps empty the queue.
                if matches!(self.phase, Phase::Closed) {
                    s.tell_shutting_down();
                }
                self.streams.insert(id, s);
                let _ = reply.send(id);
            }
            Command::Ready {
                stream,
                worker,
                finished,
            } => {
                if let Some(worker) = self.worker_of(now, stream, worker) {
                    self.ready(now, worker, finished);
                }
            }
            Command::LoopSlots { stream, slots_per_loop } => self.loop_slots(stream, slots_per_loop),
            Command::HandBack { stream, worker, query } => {
                if let Some(worker) = self.worker_of(now, stream, worker) {
                    self.hand_back(worker, query);
                }
            }
            Command::DequeueClosed { stream } => {
                let Some(s) = self.streams.remove(&stream) else { return };
                let mut workers: Vec<(WorkerSlot, WorkerId)> = s.workers.into_iter().collect();
                workers.sort_unstable_by_key(|(slot, _)| *slot);
                for (_, worker) in workers {
                    self.worker_closed(now, worker);
                }
            }
            Command::QuerierShuttingDown { querier, reply } => {
                self.queue.notify_querier_shutdown(now, &querier);
                let workers = &mut self.workers;
                self.waiting.retain(|w| {
                    let Some(x) = workers.get_mut(w).filter(|x| x.querier == querier) else {
                        return true;
                    };
                    x.waiting = false;
                    false
                });
                // Its running workers finish and report; none of them gets more.
                for s in self.streams.values_mut().filter(|s| s.querier == querier) {
                    s.tell_shutting_down();
                }
                info!(%querier, "querier announced shutdown");
                let _ = reply.send(());
                // Its shards went to other queriers: their waiting workers may take more.
                self.serve_waiting(now);
            }
            Command::SetQueueConfig { config, reply } => {
                let result = self.queue.set_config(config).map_err(|e| e.to_string());
                let _ = reply.send(result);
                // Limits, shard sizes or reservations changed who may take what.
                self.serve_waiting(now);
            }
            Command::Status { reply } => {
                let _ = reply.send(self.status(now));
            }
            Command::Explain { reply } => {
                let _ = reply.send(self.queue.explain(now, EXPLAIN_NODES, EXPLAIN_REQUESTS));
            }
            Command::Shutdown { drain_timeout, done } => {
                if !self.serving() {
                    let _ = done.send(()); // already draining or closed: the phase never goes back
                    return;
                }
                info!(queued = self.queue.len(), ?drain_timeout, "draining");
                let frontends: Vec<u64> = self.frontends.keys().copied().collect();
                for f in frontends {
                    self.tell_frontend(f, SchedulerToFrontend::ShuttingDown);
                }
                self.phase = Phase::Draining {
                    until: now + drain_timeout,
                    done,
                };
                // Deferred enqueues hear `ShuttingDown` now (`tick` tries them again).
                self.tick(now);
            }
            Command::Close { done } => {
                self.end_batch();
                self.drop_deferred(|_| true);
                self.phase = Phase::Closed;
                self.frontends.clear();
                self.streams.clear();
                self.workers.clear();
                self.waiting.clear();
                self.running.clear();
                self.delivering.clear();
                let _ = done.send(());
            }
        }
    }

    fn cancel(&mut self, key: QueryKey) {
        let tenant = if let Some(tenant) = self.withdraw_deferred(key) {
            debug!(?key, "cancelled while deferred");
            tenant
        } else if let Some(p) = self.queue.cancel(key) {
            debug!(?key, "cancelled while queued");
            p.enqueue.tenant
        } else if let Some(r) = self.running.get_mut(&key) {
            r.cancelled = true;
            if let Some(w) = self.workers.get(&r.worker) {
                let _ = w.tx.send(SchedulerToQuerier::Cancel {
                    worker: w.slot,
                    query_id: key.query,
                });
            }
            r.tenant.clone()
        } else {
            // Served, its result on the way: answered `Cancelled` now, it is owed nothing
            // more, even if its querier goes before the delivery settles.
            if self.delivering.remove(&key).is_some() {
                debug!(?key, "cancelled while its result was delivered");
            }
            return;
        };
        self.metrics
            .record(|| counter!(m::CANCELLED_REQUESTS, "tenant" => tenant).increment(1));
    }

    fn frontend_closed(&mut self, now: Instant, frontend: u64, graceful: bool) {
        self.drop_deferred(|d| d.frontend == frontend);
        let removed = self.queue.cancel_frontend(frontend);
        self.metrics.record(|| {
            for (_, p) in &removed {
                counter!(m::CANCELLED_REQUESTS, "tenant" => p.enqueue.tenant.clone()).increment(1);
            }
        });
        let removed = removed.len();
        // A frontend that lost its connection still waits for its dispatched queries'
        // results (they go straight to it); one that closed its loop wants nothing more.
        if graceful {
            let running: Vec<QueryKey> = self
                .running
                .keys()
                .filter(|k| k.frontend == frontend)
                .copied()
                .collect();
            for key in running {
                self.cancel(key);
            }
        }
        self.notes.remove(&frontend);
        if let Some(f) = self.frontends.remove(&frontend) {
            debug!(frontend = %f.name, removed, graceful, "frontend gone");
        }
        // Cancelled work may have held back a tenant's limit or a priority class.
        self.serve_waiting(now);
    }

    fn query_error(&mut self, key: QueryKey, kind: QueryErrorKind, message: String) {
        self.tell_frontend(
            key.frontend,
            SchedulerToFrontend::QueryError {
                query_id: key.query,
                kind,
                message,
            },
        );
    }

    fn send_expired(&mut self) {
        while let Some(e) = self.queue.poll_expired() {
            let tenant = e.request.enqueue.tenant.clone();
            self.metrics
                .record(|| counter!(m::DISCARDED_REQUESTS, "tenant" => tenant, "reason" => "expired").increment(1));
            let message = format!("deadline passed after {:?} in the queue", e.queue_time);
            self.query_error(e.key, QueryErrorKind::DeadlineExceeded, message);
        }
    }

    pub(crate) fn tick(&mut self, now: Instant) {
        if let Some(sharing) = &mut self.sharing {
            sharing.touch();
            sharing.load.expire(now);
        }
        self.queue.expire(now);
        self.send_expired();
        self.retry_deferred(now);
        self.queue.forget_disconnected_queriers(now);
        // Forgotten queriers' shards moved to others; expiries freed tenant slots.
        self.serve_waiting(now);
        let drained = match &self.phase {
            Phase::Draining { until, .. } => self.queue.is_empty() || now >= *until,
            _ => false,
        };
        if drained {
            let handed_back = self.queue.drain();
            if !handed_back.is_empty() {
                info!(
                    count = handed_back.len(),
                    "handing queued queries back to their frontends"
                );
            }
            for (key, p) in handed_back {
                let tenant = p.enqueue.tenant;
                self.metrics.record(|| {
                    counter!(m::DISCARDED_REQUESTS, "tenant" => tenant, "reason" => "handed_back").increment(1)
                });
                self.query_error(
                    key,
                    QueryErrorKind::HandedBack,
                    "scheduler shutting down; the query was not run".into(),
                );
            }
            for w in self.workers.values_mut() {
                w.waiting = false;
            }
            for s in self.streams.values_mut() {
                s.tell_shutting_down();
            }
            self.waiting.clear();
            if let Phase::Draining { done, .. } = std::mem::replace(&mut self.phase, Phase::Closed) {
                let _ = done.send(());
            }
        }
        self.ticks += 1;
        if self.ticks.is_multiple_of(10) {
            self.export_gauges(now);
            // Histogram samples are buffered until upkeep: without a scraper they would
            // pile up for as long as nobody reads /metrics.
            self.metrics.upkeep();
            self.handles.clear();
        }
    }
}

async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests;
