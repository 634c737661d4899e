//! What every clone of a [`Frontend`](super::Frontend) shares: the query table with each
//! query's entry, the scheduler links, and the shell that carries out the table's actions
//! on them (frames to send, callers to answer, links to start and stop).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use sluice_protocol::{Capability, FrontendAddress, FrontendToScheduler, QueryId, RefuseReason};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::outgoing::{self, Outgoing, Placing};
use super::{FrontendConfig, QueryRequest, QueryResponse, link};
use crate::FastMap;
use crate::discovery::Target;
use crate::error::QueryError;
use crate::lifecycle::{Action, Event, Now, QueryTable, SchedulerIx};
use crate::quic_stats::QuicStats;

/// What the shell holds for a query beside its state in the table.
#[derive(Debug)]
pub(super) struct Entry {
    /// Shared with the link writers: each placement is encoded from it, not copied.
    pub(super) request: Arc<QueryRequest>,
    /// Its enqueue's length, at most ([`outgoing::len_bound`]).
    pub(super) len_bound: usize,
    pub(super) capability: Capability,
    /// `submit` waits on this for the first placement.
    pub(super) placed: Option<oneshot::Sender<Result<(), QueryError>>>,
    /// `QueryHandle::response` waits on this.
    pub(super) done: Option<oneshot::Sender<Result<QueryResponse, QueryError>>>,
    /// While the result streams: ends the body with this error (the deadline).
    pub(super) abort: Option<oneshot::Sender<QueryError>>,
}

#[derive(Debug)]
pub(super) struct Inner {
    pub(super) table: QueryTable,
    pub(super) entries: FastMap<QueryId, Entry>,
    /// The table's actions for one event; kept between events for its capacity.
    pub(super) actions: Vec<Action>,
}

/// What the shell does for an event once the lock is released: answering a caller wakes
/// its task, and dropping an ended query's entry frees its request; neither needs the
/// table, so neither holds up the other tasks that do.
#[derive(Debug, Default)]
struct Afterwards {
    /// The first (usually the only) reply, kept inline: no allocation for it.
    first: Option<Reply>,
    more: Vec<Reply>,
}

#[derive(Debug)]
enum Reply {
    /// The first placement succeeded.
    Placed(oneshot::Sender<Result<(), QueryError>>),
    /// The query ended with `error`: whoever waits on `entry` hears it.
    Fail(Entry, QueryError),
    /// The querier reported the query failed.
    Failed(Entry, String),
    /// The query ended with its result delivered: only the entry is left to free.
    Done(Entry),
}

impl Afterwards {
    fn push(&mut self, reply: Reply) {
        if self.first.is_none() && self.more.is_empty() {
            self.first = Some(reply);
        } else {
            self.more.push(reply);
        }
    }

    fn run(self) {
        for reply in self.first.into_iter().chain(self.more) {
            match reply {
                Reply::Placed(tx) => {
                    let _ = tx.send(Ok(()));
                }
                Reply::Fail(e, error) => {
                    if let Some(tx) = e.placed {
                        let _ = tx.send(Err(error));
                    } else if let Some(tx) = e.done {
                        let _ = tx.send(Err(error));
                    } else if let Some(tx) = e.abort {
                        let _ = tx.send(error);
                    }
                }
                Reply::Failed(e, message) => {
                    if let Some(tx) = e.done {
                        let _ = tx.send(Err(QueryError::Failed(message)));
                    }
                }
                Reply::Done(e) => drop(e),
            }
        }
    }
}

/// One scheduler this frontend connects to. Links are only ever appended, so a link's
/// index names it for as long as the frontend lives; a link that is no longer wanted is
/// stopped, and a scheduler that comes back gets a new one.
#[derive(Debug)]
pub(super) struct Link {
    pub(super) addr: SocketAddr,
    /// The frontend loop's outbound frames, while connected.
    pub(super) tx: Mutex<Option<mpsc::UnboundedSender<Outgoing>>>,
    /// The largest frame the scheduler reads, from its `Welcome` (`u32::MAX` before).
    pub(super) max_frame_len: AtomicU32,
    /// Discovery wants new work sent here.
    pub(super) in_use: AtomicBool,
    pub(super) stop: CancellationToken,
}

impl Link {
    pub(super) fn new(addr: SocketAddr, in_use: bool) -> Link {
        Link {
            addr,
            tx: Mutex::new(None),
            max_frame_len: AtomicU32::new(u32::MAX),
            in_use: AtomicBool::new(in_use),
            stop: CancellationToken::new(),
        }
    }

    pub(super) fn send(&self, msg: Outgoing) {
        if let Some(tx) = self.tx.lock().unwrap().as_ref() {
            let _ = tx.send(msg);
        }
    }
}

/// What a result stream's claim on its query got.
#[derive(Debug)]
pub(crate) enum Claim {
    /// The result is taken: send the caller its response here; `abort` ends the body early
    /// (the deadline).
    Accepted {
        done: oneshot::Sender<Result<QueryResponse, QueryError>>,
        abort: oneshot::Receiver<QueryError>,
    },
    /// The whole result is taken, and its query ended: send the caller its response here.
    Whole {
        done: oneshot::Sender<Result<QueryResponse, QueryError>>,
    },
    /// The querier's early confirmation is taken; the result follows on the same stream.
    Confirmed,
    /// Refused.
    Refused(RefuseReason),
}

#[derive(Debug)]
pub(super) struct Shared {
    pub(super) config: FrontendConfig,
    pub(super) address: FrontendAddress,
    pub(super) inner: Mutex<Inner>,
    pub(super) schedulers: RwLock<Vec<Arc<Link>>>,
    pub(super) available: watch::Sender<usize>,
    pub(super) next_id: AtomicU64,
    /// Wakes the timer task when an earlier deadline appears.
    pub(super) timer: Notify,
    pub(super) stop: CancellationToken,
    pub(super) result_endpoint: quinn::Endpoint,
    /// `QueryHandle::cancel` calls waiting for their scheduler's acknowledgement.
    pub(super) cancels: Mutex<HashMap<QueryId, oneshot::Sender<()>>>,
    /// The QUIC figures of its connections to schedulers and from queriers.
    pub(super) quic: QuicStats,
}

impl Shared {
    /// Feeds `event` to the table and carries out what it decides.
    pub(super) fn event(&self, event: Event) {
        self.event_with(event, None, Now::lazy());
    }

    /// Likewise, first recording a new query's entry, at `now`.
    pub(super) fn event_with(&self, event: Event, new: Option<(QueryId, Entry)>, now: Now) -> Option<Claim> {
        self.with_table(may_change_schedulers(&event), |inner, afterwards| {
            if let Some((id, entry)) = new {
                inner.entries.insert(id, entry);
            }
            self.handle(inner, event, &now, afterwards)
        })
    }

    /// Feeds `events`, in order, to the table under one lock of it (the frames that
    /// arrived together), and carries out what it decides; each event's claim, in order,
    /// into `claims` if given. Empties `events`, keeping its room.
    pub(super) fn events(&self, events: &mut Vec<Event>, mut claims: Option<&mut Vec<Option<Claim>>>) {
        if events.is_empty() {
            return;
        }
        let now = Now::lazy();
        self.with_table(events.iter().any(may_change_schedulers), |inner, afterwards| {
            for event in events.drain(..) {
                let claim = self.handle(inner, event, &now, afterwards);
                if let Some(claims) = claims.as_deref_mut() {
                    claims.push(claim);
                }
            }
        });
    }

    /// Runs `f` with the table locked, then, unlocked, what it left in `afterwards`; and
    /// tells who waits for an accepting scheduler if `schedulers_may_change`.
    fn with_table<R>(&self, schedulers_may_change: bool, f: impl FnOnce(&mut Inner, &mut Afterwards) -> R) -> R {
        let mut afterwards = Afterwards::default();
        let r = f(&mut self.inner.lock().unwrap(), &mut afterwards);
        afterwards.run();
        if schedulers_may_change {
            self.set_available();
        }
        r
    }

    /// One event, the lock held: the table's decision and its frames; the rest into
    /// `afterwards`.
    fn handle(&self, inner: &mut Inner, event: Event, now: &Now, afterwards: &mut Afterwards) -> Option<Claim> {
        let mut actions = std::mem::take(&mut inner.actions);
        inner.table.handle(event, now, &mut actions);
        let claim = self.apply(inner, &mut actions, now, afterwards);
        inner.actions = actions;
        if inner.table.timer_moved_earlier() {
            self.timer.notify_one();
        }
        claim
    }

    /// Carries out the table's actions, draining `actions`: frames under the lock, so
    /// frames about one query leave in the order decided; answers to callers and freeing
    /// into `afterwards`. Returns the claim a result stream asked for, if any.
    fn apply(
        &self,
        inner: &mut Inner,
        actions: &mut Vec<Action>,
        now: &Now,
        afterwards: &mut Afterwards,
    ) -> Option<Claim> {
        let mut claim = None;
        for action in actions.drain(..) {
            match action {
                Action::Enqueue {
                    scheduler,
                    id,
                    timeout,
                    attempt,
                } => {
                    let Some(e) = inner.entries.get(&id) else { continue };
                    let link = self.link(scheduler);
                    let max = link.max_frame_len.load(Ordering::Relaxed);
                    if let Err(len) = outgoing::fits(&e.request, e.len_bound, max) {
                        // Sent, it would close the connection; refused here instead.
                        let reason = outgoing::too_large(len, max, "the scheduler's");
                        let mut more = Vec::new();
                        let event = Event::TooLarge { scheduler, id, reason };
                        inner.table.handle(event, now, &mut more);
                        if let Some(c) = self.apply(inner, &mut more, now, afterwards) {
                            claim = Some(c);
                        }
                        continue;
                    }
                    link.send(Outgoing::Enqueue(Placing {
                        id,
                        request: e.request.clone(),
                        capability: e.capability,
                        timeout,
                        attempt,
                    }));
                }
                Action::Cancel { scheduler, id } => self
                    .link(scheduler)
                    .send(Outgoing::Frame(FrontendToScheduler::Cancel { query_id: id })),
                Action::Placed { id } => {
                    if let Some(tx) = inner.entries.get_mut(&id).and_then(|e| e.placed.take()) {
                        afterwards.push(Reply::Placed(tx));
                    }
                }
                Action::Fail { id, error } => {
                    if let Some(e) = inner.entries.remove(&id) {
                        afterwards.push(Reply::Fail(e, error));
                    }
                }
                Action::Failed { id, message } => {
                    if let Some(e) = inner.entries.remove(&id) {
                        afterwards.push(Reply::Failed(e, message));
                    }
                }
                Action::Accept { id, whole } => {
                    let Some(e) = inner.entries.get_mut(&id) else { continue };
                    claim = e.done.take().map(|done| {
                        if whole {
                            Claim::Whole { done }
                        } else {
                            let (abort, abort_rx) = oneshot::channel();
                            e.abort = Some(abort);
                            Claim::Accepted { done, abort: abort_rx }
                        }
                    });
                }
                Action::Refuse { reason, .. } => claim = Some(Claim::Refused(reason)),
                Action::Confirmed { .. } => claim = Some(Claim::Confirmed),
                Action::Done { id } => {
                    if let Some(e) = inner.entries.remove(&id) {
                        afterwards.push(Reply::Done(e));
                    }
                }
            }
        }
        claim
    }

    fn set_available(&self) {
        let n = self.inner.lock().unwrap().table.accepting().count();
        self.available.send_if_modified(|current| {
            let changed = *current != n;
            *current = n;
            changed
        });
    }

    /// A snapshot of every link (stopped ones included: indexes stay stable).
    pub(super) fn links(&self) -> Vec<Arc<Link>> {
        self.schedulers.read().unwrap().clone()
    }

    /// The link to scheduler `s`.
    pub(super) fn link(&self, s: SchedulerIx) -> Arc<Link> {
        self.schedulers.read().unwrap()[s].clone()
    }

    /// A scheduler acknowledged the cancel of `id`.
    pub(super) fn cancel_acknowledged(&self, id: QueryId) {
        if let Some(waiter) = self.cancels.lock().unwrap().remove(&id) {
            let _ = waiter.send(());
        }
    }

    /// Schedulers discovery wants used now.
    pub(super) fn known_schedulers(&self) -> usize {
        self.links()
            .iter()
            .filter(|l| !l.stop.is_cancelled() && l.in_use.load(Ordering::Relaxed))
            .count()
    }

    /// Connects to the schedulers discovery wants (those in use, and leaving ones whose
    /// queued work may still run) and stops the links to the others; their queries that
    /// had not started are placed again elsewhere.
    pub(super) fn reconcile(self: &Arc<Self>, targets: &[Target]) {
        let wanted = |t: &&Target| t.in_use || t.leaving;
        let mut changed = Vec::new();
        let mut links = self.schedulers.write().unwrap();
        for (s, link) in links.iter().enumerate().filter(|(_, l)| !l.stop.is_cancelled()) {
            match targets.iter().filter(wanted).find(|t| t.addr == link.addr) {
                Some(t) => {
                    if link.in_use.swap(t.in_use, Ordering::Relaxed) != t.in_use {
                        changed.push((s, t.in_use));
                    }
                }
                None => {
                    debug!(addr = %link.addr, "scheduler no longer in use");
                    link.stop.cancel();
                }
            }
        }
        for t in targets.iter().filter(wanted) {
            if !links.iter().any(|l| l.addr == t.addr && !l.stop.is_cancelled()) {
                let link = Arc::new(Link::new(t.addr, t.in_use));
                links.push(link.clone());
                let s = links.len() - 1;
                tokio::spawn(link::scheduler_loop(
                    self.clone(),
                    s,
                    link,
                    self.result_endpoint.clone(),
                ));
            }
        }
        drop(links);
        for (scheduler, in_use) in changed {
            self.event(Event::SchedulerInUse { scheduler, in_use });
        }
    }
}

/// Whether `event` can change which schedulers accept work (only these can).
fn may_change_schedulers(event: &Event) -> bool {
    matches!(
        event,
        Event::SchedulerUp { .. }
            | Event::SchedulerDown { .. }
            | Event::SchedulerInUse { .. }
            | Event::SchedulerDraining { .. }
            | Event::Status {
                status: sluice_protocol::EnqueueStatus::ShuttingDown,
                ..
            }
    )
}
